//! `opsagent-audit worker` as a process: the [`Worker`] and its own small HTTP listener
//! (`audit.distributed.worker_listen`) with `/metrics`, `/healthz` and `/readyz`, the
//! same endpoints as `serve`'s, so the same probes and scrapes work. The listener holds
//! no data (no records, no tokens needed); it is up from the start, so a worker waiting
//! for its database is seen as alive and not ready.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{AppError, Metrics};
use crate::config::{Config, LimitsConfig};
use crate::distributed::{Worker, WorkerReport};

#[derive(Clone)]
struct WorkerState {
    worker: Arc<Worker>,
    metrics: Arc<Metrics>,
}

/// A started worker, its listener bound, not yet consuming.
pub struct WorkerApp {
    listener: TcpListener,
    worker: Arc<Worker>,
    metrics: Arc<Metrics>,
    limits: LimitsConfig,
}

impl std::fmt::Debug for WorkerApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerApp").field("worker", &self.worker).finish_non_exhaustive()
    }
}

impl WorkerApp {
    /// Binds `audit.distributed.worker_listen` and starts the worker (its store and
    /// pipeline; not the consuming, which [`WorkerApp::run_until`] does).
    pub async fn build(config: &Config) -> Result<WorkerApp, AppError> {
        let listen = config.distributed.worker_listen;
        let listener = TcpListener::bind(listen).await.map_err(|source| AppError::Bind { addr: listen, source })?;
        let worker = Arc::new(Worker::start(config).await?);
        let mut metrics = Metrics::new(worker.logger(), None);
        metrics.register_worker(worker.stats());
        Ok(WorkerApp { listener, worker, metrics: Arc::new(metrics), limits: config.limits.clone() })
    }

    /// The address the listener is bound to (the real port when configured with 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The worker.
    pub fn worker(&self) -> Arc<Worker> {
        self.worker.clone()
    }

    /// Consumes and serves the endpoints until `shutdown` resolves; then stops consuming,
    /// finishes the batch in hand and returns.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<WorkerReport, AppError> {
        let WorkerApp { listener, worker, metrics, limits } = self;
        let stop = CancellationToken::new();
        let signal = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            signal.cancel();
        });
        let router = Router::new()
            .route("/metrics", get(metrics_text))
            .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
            .route("/readyz", get(readyz))
            .with_state(WorkerState { worker: worker.clone(), metrics });
        // The endpoints answer until the worker has stopped, so a probe sees it drain.
        let http_stop = CancellationToken::new();
        let graceful = http_stop.clone().cancelled_owned();
        // The same accept loop and connection limits as serve's listeners.
        let serving = tokio::spawn(async move { super::serve::serve(listener, router, &limits, graceful).await });
        let report = worker.run(stop).await;
        http_stop.cancel();
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "the worker's HTTP listener failed");
        }
        Ok(report?)
    }
}

async fn metrics_text(State(state): State<WorkerState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Ready: the database prepared and answering now (asked, as `serve`'s `/readyz` asks,
/// so an idle worker whose database went away is not reported ready), and consuming
/// from the broker.
async fn readyz(State(state): State<WorkerState>) -> Response {
    let pipeline = state.worker.logger().snapshot();
    let not_ready = match state.worker.not_ready() {
        Some(reason) => Some(reason),
        None => match super::probe_database(state.worker.store().as_ref()).await {
            Ok(r) if r.is_ready() => None,
            Ok(r) => Some(format!("migrations {:?} are not applied", r.pending_migrations)),
            Err(e) => Some(format!("database unavailable: {e}")),
        },
    };
    match not_ready {
        None => (StatusCode::OK, Json(json!({ "status": "ready", "pipeline": pipeline }))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": reason, "pipeline": pipeline })),
        )
            .into_response(),
    }
}
