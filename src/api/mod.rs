//! The HTTP API: one axum router for ingest, reads and health, and the
//! [`Application`] that serves it.

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::BoxError;
use axum::{Json, Router};
use serde_json::json;
use tower::timeout::TimeoutLayer;
use tower::ServiceBuilder;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::ingest::otlp::OtlpReceiver;
use crate::mask::Masker;
use crate::pipeline::AuditLogger;
use crate::risk::RiskClassifier;
use crate::store::Store;

mod app;
pub mod auth;
pub mod dashboard;
mod error;
mod ingest;
pub mod metrics;
mod otlp;
mod read;
mod serve;
mod worker;

pub use app::{AppError, Application, Engine};
pub use auth::{AuthError, Authenticator, Caller};
pub use error::{ApiError, ErrorBody};
pub use ingest::{IngestResponse, RecordResult, RecordStatus};
pub use metrics::Metrics;
pub use worker::WorkerApp;

/// How long `/readyz` waits for the database to answer.
const READINESS_PROBE: Duration = Duration::from_secs(3);

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Where ingested records go.
    pub logger: AuditLogger,
    /// Where reads come from.
    pub store: Arc<dyn Store>,
    /// The configuration the server runs with.
    pub config: Arc<Config>,
    /// Exports running now. Each holds a database connection for as long as its client
    /// takes to download, so they are few, and the pool stays free for the writers.
    pub exports: Arc<tokio::sync::Semaphore>,
    /// Who may call what.
    pub auth: Arc<Authenticator>,
    /// The registry `/metrics` reports.
    pub metrics: Arc<Metrics>,
    /// The OTLP receiver (`POST /v1/traces`), unless `audit.otlp.enabled` is off.
    pub otlp: Option<OtlpReceiver>,
}

/// Exports that may run at once; one more is answered `429`.
pub const MAX_CONCURRENT_EXPORTS: usize = 2;

impl AppState {
    /// The state of a server writing through `logger` (whose masking stage, if any, is
    /// `masker`, for its counts), reading from `store`, checking callers with `auth`.
    pub fn new(
        logger: AuditLogger,
        store: Arc<dyn Store>,
        config: Config,
        masker: Option<Arc<Masker>>,
        auth: Authenticator,
    ) -> AppState {
        AppState::with_risk(logger, store, config, masker, None, auth)
    }

    /// [`AppState::new`] whose pipeline also classifies risk with `risk`, for its counts.
    pub fn with_risk(
        logger: AuditLogger,
        store: Arc<dyn Store>,
        config: Config,
        masker: Option<Arc<Masker>>,
        risk: Option<Arc<RiskClassifier>>,
        auth: Authenticator,
    ) -> AppState {
        AppState {
            metrics: Arc::new(Metrics::with_risk(logger.clone(), masker, risk)),
            logger,
            store,
            config: Arc::new(config),
            exports: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_EXPORTS)),
            auth: Arc::new(auth),
            otlp: None,
        }
    }

    /// Serves OTLP through `receiver` (and reports its counters at `/metrics`).
    pub fn with_otlp(mut self, receiver: OtlpReceiver) -> AppState {
        self.metrics.set_otlp(receiver.stats());
        self.otlp = Some(receiver);
        self
    }
}

/// Builds the router. Each endpoint's role is declared here, beside its route: `ingest`
/// writes, `read` reads, `admin` sees what was refused; health stays open. Every route
/// is bounded by `audit.limits.request_timeout`.
pub fn router(state: AppState) -> Router {
    let request_timeout = state.config.limits.request_timeout;
    use axum::middleware::from_fn_with_state as guard;
    let mut ingest = Router::new().route("/api/v1/interactions", post(ingest::post_interactions));
    if state.otlp.is_some() {
        ingest = ingest.route("/v1/traces", post(otlp::traces)).route("/v1/logs", post(otlp::logs));
    }
    let ingest = ingest.route_layer(guard(state.clone(), auth::require_ingest));
    let read = Router::new()
        .route("/api/v1/interactions", get(read::list))
        .route("/api/v1/interactions/{interaction_id}", get(read::interaction))
        .route("/api/v1/sessions/{session_id}", get(read::session))
        .route("/api/v1/stats", get(read::stats))
        .route("/api/v1/stats/overview", get(read::overview))
        .route("/api/v1/export", get(read::export))
        .route("/api/v1/anomalies", get(read::anomalies))
        .route_layer(guard(state.clone(), auth::require_read));
    let admin = Router::new()
        .route("/api/v1/dead-letters", get(read::dead_letters))
        .route_layer(guard(state.clone(), auth::require_admin));
    let metrics =
        Router::new().route("/metrics", get(metrics::metrics)).route_layer(guard(state.clone(), auth::require_metrics));
    Router::new()
        .merge(ingest)
        .merge(read)
        .merge(admin)
        .merge(metrics)
        .merge(dashboard::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Around the handler, so it bounds reading the body too; a response's body is
        // streamed after the handler returned and is not cut (an export download).
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |e: BoxError| async move { request_failed(e, request_timeout) }))
                .layer(TimeoutLayer::new(request_timeout)),
        )
        // Outside the timeout, so a 408 is counted too.
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The answer to a request that did not complete within `audit.limits.request_timeout`.
fn request_failed(error: BoxError, request_timeout: Duration) -> ApiError {
    if error.is::<tower::timeout::error::Elapsed>() {
        return ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request did not complete within {} (audit.limits.request_timeout)",
                humantime::format_duration(request_timeout)
            ),
        );
    }
    // Handlers cannot fail (their errors are answers); this is for a layer added later.
    tracing::error!(error = %error, "request failed in a middleware layer");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "the request failed")
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this endpoint does not accept that method")
}

/// Liveness: the process answers.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: the database answers and every migration is applied. With a spool, a
/// database outage is `degraded` but still ready (`200`): ingest keeps accepting into the
/// spool, which is the point of having one. Without a spool it is `503`.
async fn readyz(State(app): State<AppState>) -> Response {
    let pipeline = app.logger.snapshot();
    let backlog = backlog(&app, &pipeline);
    let unavailable = |error: String| {
        if app.logger.has_spool() {
            (
                StatusCode::OK,
                Json(json!({
                    "status": "degraded",
                    "database": "unavailable",
                    "error": error,
                    "detail": "records are being spooled to disk and will be written when the database returns",
                    "pipeline": pipeline,
                    "backlog": backlog,
                })),
            )
                .into_response()
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "database_unavailable", "error": error, "pipeline": pipeline, "backlog": backlog })),
            )
                .into_response()
        }
    };
    if !app.logger.is_store_ready() {
        // Start-up is still waiting for the database: its last attempt says why, at
        // once, without another probe.
        return unavailable(app.logger.database_down().unwrap_or_else(|| "database not reached yet".into()));
    }
    match probe_database(app.store.as_ref()).await {
        Ok(r) if r.is_ready() => match app.logger.database_down() {
            // The database answers a probe but batch writes still fail.
            Some(error) => unavailable(error),
            // Writes succeed but the spool is close to its limit: still taking records,
            // but someone should look before records are dropped.
            None if backlog["spool_filling"] == true => (
                StatusCode::OK,
                Json(json!({
                    "status": "degraded",
                    "detail": format!(
                        "the spool is {:.0}% full (audit.spool.max_bytes): records will be dropped by its full_policy soon",
                        backlog["spool_fill"].as_f64().unwrap_or(0.0) * 100.0
                    ),
                    "pipeline": pipeline,
                    "backlog": backlog,
                })),
            )
                .into_response(),
            None => {
                (StatusCode::OK, Json(json!({ "status": "ready", "pipeline": pipeline, "backlog": backlog })))
                    .into_response()
            }
        },
        Ok(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "migrations_pending",
                "pending_migrations": r.pending_migrations,
                "hint": "run `opsagent-audit migrate`",
            })),
        )
            .into_response(),
        Err(error) => unavailable(error),
    }
}

/// Asks the database whether it is ready (answering, migrations applied), waiting at
/// most [`READINESS_PROBE`]; the error says why not. `serve`'s and `worker`'s `/readyz`.
async fn probe_database(store: &dyn crate::store::Store) -> Result<crate::store::Readiness, String> {
    match tokio::time::timeout(READINESS_PROBE, store.readiness()).await {
        Ok(Ok(readiness)) => Ok(readiness),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {READINESS_PROBE:?}")),
    }
}

/// Share of `audit.spool.max_bytes` from which `/readyz` reports the spool filling up.
pub const SPOOL_FILLING: f64 = 0.9;

/// What waits to be written: the spool's fill and the oldest record's age.
fn backlog(app: &AppState, pipeline: &crate::pipeline::StatsSnapshot) -> serde_json::Value {
    let max_bytes = app.config.spool.max_bytes.max(1);
    let fill = if app.logger.has_spool() { pipeline.spool_bytes as f64 / max_bytes as f64 } else { 0.0 };
    json!({
        "spool_bytes": pipeline.spool_bytes,
        "spool_max_bytes": app.config.spool.max_bytes,
        "spool_fill": (fill * 1000.0).round() / 1000.0,
        "spool_filling": fill >= SPOOL_FILLING,
        "oldest_uncommitted_seconds": pipeline.oldest_uncommitted_ms.map(|ms| ms as f64 / 1000.0),
    })
}
