//! A Rust agent on axum, audited by [`AuditLayer`]: the handler reports what only it
//! knows (the model, each thought, each tool call with its output and timing, the
//! answer); the layer records the rest (session cookie, caller, question, HTTP status,
//! duration) and logs one record per request, even when the handler fails or panics.
//!
//! Run it, ask it something, read the record back:
//!
//! ```text
//! cargo run --example audit_layer        # 127.0.0.1:8080, records in sqlite://opsagent-audit.db
//! curl -s -X POST 127.0.0.1:8080/api/execute -H 'content-type: application/json' \
//!      -d '{"instructions":"are the web pods healthy?","currentModel":"gpt-4o","cluster":"prod"}'
//! cargo run -- query --limit 1
//! ```
//!
//! It reads the configuration as `serve` does (`AUDIT_CONFIG`, `AUDIT_…` variables), so
//! its records are masked, spooled and retried exactly as the server's are;
//! `LAYER_EXAMPLE_LISTEN` changes the address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use opsagent_audit::api::Engine;
use opsagent_audit::config::{CliOverrides, Config};
use opsagent_audit::layer::{AuditContext, AuditLayer};
use opsagent_audit::model::Status;
use opsagent_audit::pipeline::AuditLogger;
use serde::Deserialize;
use serde_json::{json, Value};

/// OpsAgent's `/api/execute` request, the fields this agent uses.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecuteRequest {
    instructions: String,
    current_model: Option<String>,
    cluster: Option<String>,
}

/// The agent's routes, audited on `/api/execute` (`/api/version` is not).
pub fn app(logger: AuditLogger) -> Router {
    Router::new()
        .route("/api/execute", post(execute))
        .route("/api/version", get(|| async { Json(json!({"version": "example-1.0"})) }))
        .layer(AuditLayer::new(logger).paths(["/api/execute"]))
}

/// A ReAct loop in miniature: think, run kubectl, think again, answer. An instruction
/// mentioning "unreachable" makes the tool fail, and the request with it.
async fn execute(audit: AuditContext, Json(request): Json<ExecuteRequest>) -> (StatusCode, Json<Value>) {
    let started = Instant::now();
    let model = request.current_model.unwrap_or_else(|| "gpt-4o".into());
    audit.set_model(&model);
    audit.set_provider("openai");
    if let Some(cluster) = &request.cluster {
        audit.set_cluster(cluster);
    }
    let first = audit.thought("I should look at the pods in the web namespace first.");
    let pods = audit.start_tool("kubectl", "get pods -n web").after_thought(first);
    if request.instructions.contains("unreachable") {
        pods.fail("Unable to connect to the server: dial tcp 10.0.0.1:6443: i/o timeout");
        audit.fail(Status::Error, "the cluster did not answer");
        return (StatusCode::BAD_GATEWAY, Json(json!({"error": "the cluster did not answer"})));
    }
    pods.finish("NAME    READY   STATUS    RESTARTS   AGE\nweb-0   1/1     Running   0          3d");
    let second = audit.thought("web-0 is running; its recent events tell whether it is healthy.");
    let events = audit.start_tool("kubectl", "get events -n web --field-selector involvedObject.name=web-0");
    events.after_thought(second).finish("No resources found in web namespace.");
    audit.add_tokens(1200, 85);
    audit.set_assistant_duration(started.elapsed());
    audit.timing("llm_first_token", Duration::from_millis(3));
    let answer = "All web pods are running and there are no recent warning events.";
    audit.answer(answer);
    (StatusCode::OK, Json(json!({"message": answer, "status": "success"})))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let config_path = std::env::var_os("AUDIT_CONFIG").map(PathBuf::from);
    let config = Config::load(config_path.as_deref(), &CliOverrides::default())?;
    let engine = Engine::start(&config).await?;
    let listen: SocketAddr =
        std::env::var("LAYER_EXAMPLE_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into()).parse()?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "example agent listening; POST /api/execute");
    axum::serve(listener, app(engine.logger()).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Drains what the layer logged to the database (or the spool) before exiting.
    engine.shutdown(config.pipeline.shutdown_timeout).await;
    Ok(())
}
