//! The tower layer (issue #10, part 3): the example agent's handler fills in thoughts and
//! tool calls, the layer the rest, through the same engine `serve` runs on; one record per
//! request whether the handler answers, fails, panics or is abandoned.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use opsagent_audit::api::Engine;
use opsagent_audit::config::Config;
use opsagent_audit::layer::{AuditContext, AuditLayer};
use opsagent_audit::model::{Interaction, Status};
use opsagent_audit::pipeline::AuditLogger;
use opsagent_audit::store::{Filter, Store};
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::json;
use tower::ServiceExt;

use crate::common::{fast_config, wait_for_count, TestDb};

#[path = "../../examples/audit_layer.rs"]
#[allow(dead_code)]
mod example;

both_backends! {
    the_example_agent_stores_its_thoughts_and_tool_calls,
}

/// The engine over `db`, as the example's `main` starts it, and the example agent served
/// on a free loopback port.
async fn start_example(db: &TestDb) -> (Engine, String, tokio::task::JoinHandle<()>) {
    let mut config: Config = fast_config();
    config.database.url = Some(db.url.clone());
    config.spool.enabled = false;
    let engine = Engine::start(&config).await.expect("start the engine");
    let address = serve(example::app(engine.logger())).await;
    (engine, address.0, address.1)
}

async fn serve(app: Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.expect("serve");
    });
    (address, server)
}

async fn only_record(store: &dyn Store) -> Interaction {
    let page = store.list_interactions(&Filter::default(), None, 10).await.expect("list");
    assert_eq!(page.items.len(), 1, "exactly one record expected");
    store.get_interaction(page.items[0].interaction_id).await.expect("read the record")
}

async fn the_example_agent_stores_its_thoughts_and_tool_calls(db: &TestDb) {
    let (engine, address, server) = start_example(db).await;
    let client = reqwest::Client::new();
    // A secret in the question: the engine masks what the layer logs, as serve does.
    let question = "are the web pods healthy? my key is sk-proj-4f8KqL2mN9xR7tV3wY6zB1cD5eH0jA8sG2uI4oP6";
    let response = client
        .post(format!("{address}/api/execute"))
        .header("user-agent", "layer-test/1.0")
        .json(&json!({"instructions": question, "currentModel": "gpt-4o-mini", "cluster": "prod-eu"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let cookie = response.headers().get(SET_COOKIE).expect("a new session cookie").to_str().unwrap().to_owned();
    assert!(cookie.contains("Path=/") && cookie.contains("HttpOnly") && cookie.contains("Max-Age=86400"), "{cookie}");
    let session = cookie.trim_start_matches("session_id=").split(';').next().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "success");
    // An unaudited path, then nothing stored for it.
    let version = client.get(format!("{address}/api/version")).send().await.unwrap();
    assert_eq!(version.status(), 200);
    assert!(version.headers().get(SET_COOKIE).is_none(), "unaudited paths get no cookie");
    wait_for_count(&*engine.store(), 1).await;

    let record = only_record(&*engine.store()).await;
    assert!(record.question.starts_with("are the web pods healthy? my key is "), "{}", record.question);
    assert!(!record.question.contains("sk-proj-4f8KqL2"), "the key was stored: {}", record.question);
    assert_eq!(record.session_id.to_string(), session);
    assert_eq!(record.endpoint.as_deref(), Some("/api/execute"));
    assert_eq!(record.model_name.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(record.provider.as_deref(), Some("openai"));
    assert_eq!(record.cluster.as_deref(), Some("prod-eu"));
    assert_eq!(record.client_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(record.user_agent.as_deref(), Some("layer-test/1.0"));
    assert_eq!(record.status, Status::Success);
    assert_eq!(record.http_status, Some(200));
    assert_eq!(
        record.final_answer.as_deref(),
        Some("All web pods are running and there are no recent warning events.")
    );
    let thoughts: Vec<(i32, &str)> = record.thoughts.iter().map(|t| (t.sequence_number, t.content.as_str())).collect();
    assert_eq!(
        thoughts,
        [
            (1, "I should look at the pods in the web namespace first."),
            (2, "web-0 is running; its recent events tell whether it is healthy."),
        ]
    );
    let calls = &record.tool_calls;
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0].sequence_number, calls[0].tool_name.as_str()), (1, "kubectl"));
    assert_eq!(calls[0].tool_input, "get pods -n web");
    assert!(calls[0].tool_observation.as_deref().unwrap().contains("web-0   1/1     Running"));
    assert_eq!(calls[0].thought_sequence_number, Some(1));
    assert_eq!(calls[1].sequence_number, 2);
    assert_eq!(calls[1].thought_sequence_number, Some(2));
    assert!(calls.iter().all(|c| c.duration_ms.is_some() && c.error.is_none()));
    assert_eq!((record.input_tokens, record.output_tokens), (Some(1200), Some(85)));
    assert!(record.total_duration_ms.is_some() && record.assistant_duration_ms.is_some());
    assert_eq!(record.metrics.get("llm_first_token"), Some(&3));

    // The same session again: the cookie is read, not replaced.
    let again = client
        .post(format!("{address}/api/execute"))
        .header(COOKIE, format!("theme=dark; session_id={session}"))
        .json(&json!({"instructions": "and now?"}))
        .send()
        .await
        .unwrap();
    assert!(again.headers().get(SET_COOKIE).is_none(), "an existing session is kept");
    wait_for_count(&*engine.store(), 2).await;
    let view = engine.store().get_session(session.parse().unwrap(), 10).await.unwrap();
    assert_eq!(view.interactions.len(), 2);
    server.abort();
    engine.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tool_and_answer_are_recorded_as_the_handler_says() {
    let db = TestDb::sqlite();
    let (engine, address, server) = start_example(&db).await;
    let response = reqwest::Client::new()
        .post(format!("{address}/api/execute"))
        .json(&json!({"instructions": "why is the cluster unreachable?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    wait_for_count(&*engine.store(), 1).await;
    let record = only_record(&*engine.store()).await;
    assert_eq!(record.status, Status::Error);
    assert_eq!(record.error.as_deref(), Some("the cluster did not answer"));
    assert_eq!(record.http_status, Some(502));
    assert_eq!(record.tool_calls.len(), 1);
    assert!(record.tool_calls[0].error.as_deref().unwrap().contains("i/o timeout"));
    assert_eq!(record.tool_calls[0].tool_observation, None);
    server.abort();
    engine.shutdown(Duration::from_secs(10)).await;
}

/// A logger over a fresh SQLite database, for the tests that build their own handlers.
async fn logger(db: &TestDb) -> (AuditLogger, std::sync::Arc<dyn Store>) {
    let store = db.store().await;
    let config = fast_config();
    (AuditLogger::start(store.clone(), &config.pipeline, &config.limits), store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_recorded_and_the_panic_goes_on() {
    let db = TestDb::sqlite();
    let (logger, store) = logger(&db).await;
    let app = Router::new()
        .route(
            "/api/diagnose",
            post(|audit: AuditContext, _body: axum::Json<serde_json::Value>| async move {
                audit.thought("this will not end well");
                let _run = audit.start_tool("kubectl", "describe pod web-0");
                // Gives the closure a response type; a session id is never nil.
                if audit.session_id().is_nil() {
                    return "unreachable";
                }
                panic!("boom in the handler")
            }),
        )
        .layer(AuditLayer::new(logger.clone()))
        // Outside the audit layer, as an application would have it: the client gets 500.
        .layer(tower_http::catch_panic::CatchPanicLayer::new());
    let (address, server) = serve(app).await;
    let response = reqwest::Client::new()
        .post(format!("{address}/api/diagnose"))
        .json(&json!({"question": "diagnose web/web-0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    wait_for_count(&*store, 1).await;
    let record = only_record(&*store).await;
    assert_eq!(record.question, "diagnose web/web-0", "taken from the body the handler read");
    assert_eq!(record.status, Status::Error);
    assert_eq!(record.error.as_deref(), Some("the handler panicked: boom in the handler"));
    assert_eq!(record.http_status, Some(500));
    assert_eq!(record.thoughts.len(), 1);
    // The tool that was running when the handler panicked is kept, as failed.
    assert_eq!(record.tool_calls.len(), 1);
    assert!(record.tool_calls[0].error.as_deref().unwrap().contains("not finished"));
    server.abort();
    logger.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_request_is_recorded_as_cancelled_once() {
    let db = TestDb::sqlite();
    let (logger, store) = logger(&db).await;
    let app = Router::new()
        .route(
            "/api/analyze",
            post(|audit: AuditContext| async move {
                audit.set_question("analyze deployment/nginx");
                std::future::pending::<()>().await;
                "never"
            }),
        )
        .layer(AuditLayer::new(logger.clone()).paths(["/api/analyze"]));
    let request = axum::http::Request::post("/api/analyze").body(axum::body::Body::empty()).unwrap();
    // The server drops the request's future when its client goes away; so does this.
    let abandoned = tokio::time::timeout(Duration::from_millis(200), app.oneshot(request)).await;
    assert!(abandoned.is_err(), "the handler never answers");
    wait_for_count(&*store, 1).await;
    let record = only_record(&*store).await;
    assert_eq!(record.question, "analyze deployment/nginx");
    assert_eq!(record.status, Status::Cancelled);
    assert_eq!(record.http_status, None);
    logger.shutdown(Duration::from_secs(10)).await;
    assert_eq!(store.count_interactions().await.unwrap(), 1, "logged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_without_the_layer_is_told_so() {
    let app: Router = Router::new().route("/api/execute", post(|_audit: AuditContext| async { "ok" }));
    let (address, server) = serve(app).await;
    let response = reqwest::Client::new().post(format!("{address}/api/execute")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    assert!(response.text().await.unwrap().contains("AuditLayer"));
    server.abort();
}
