//! The auditing reverse proxy (issue #10, part 1) in front of a stub OpsAgent that
//! speaks the agent's API (opsagent-api.md) and writes JSON as Go's `encoding/json` does
//! (sorted keys, `<`, `>`, `&` escaped), so byte identity is proven, not assumed: a
//! proxy that re-serialised would fail. Real HTTP over loopback, the real pipeline and
//! database, the real binary where logs are read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::{SinkExt, StreamExt};
use opsagent_audit::api::Application;
use opsagent_audit::config::Config;
use opsagent_audit::model::{Interaction, Status};
use opsagent_audit::store::{Filter, Store};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::common::server::ServerBuilder;
use crate::common::{fast_config, free_port, scrape_metrics, wait_for_count, TestDb};

both_backends! {
    an_execute_exchange_is_recorded_field_by_field,
}

/// The provider key the client sends the agent: it must reach the agent, and nothing else.
const API_KEY: &str = "sk-proxytest-APIKEY-5f1d2c9e8b7a6f5e4d3c2b1a";
/// Secret of the stub's JWTs.
const JWT_SECRET: &[u8] = b"stub-agent-jwt-secret";

/// An HS256 JWT naming `username`, as the agent's `/login` issues.
fn jwt(username: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"username": username, "exp": 4102444800u64}),
        &EncodingKey::from_secret(JWT_SECRET),
    )
    .expect("sign a token")
}

/// JSON as Go's `encoding/json` writes it: keys sorted, no spaces, `<`, `>`, `&`
/// escaped as `\u003c`, `\u003e`, `\u0026`.
fn go_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            let members: Vec<String> = sorted.iter().map(|(k, v)| format!("{}:{}", go_string(k), go_json(v))).collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(go_json).collect::<Vec<_>>().join(",")),
        Value::String(s) => go_string(s),
        other => other.to_string(),
    }
}

fn go_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string").replace('<', "\\u003c").replace('>', "\\u003e").replace('&', "\\u0026")
}

/// What the stub agent saw and how it behaves.
#[derive(Default)]
struct Agent {
    /// `/api/execute` requests that asked for the trace.
    show_thought: AtomicU64,
    /// `X-API-Key` values received.
    api_keys: Mutex<Vec<String>>,
    /// `Host` headers received.
    hosts: Mutex<Vec<String>>,
    /// Released to let a hanging request or the SSE stream go on.
    release: Notify,
    /// Told when a hanging request arrived.
    hanging: Notify,
}

/// A reply as gin's `c.JSON` writes it.
fn gin_json(status: StatusCode, value: &Value) -> Response {
    (status, [("content-type", "application/json; charset=utf-8")], go_json(value)).into_response()
}

fn tools_history() -> Value {
    json!([
        {"name": "kubectl", "input": "get pods -n web", "observation": "nginx-7d9 0/1 CrashLoopBackOff", "thought": "look at the pods <first>"},
        {"name": "kubectl", "input": "logs nginx-7d9 -n web", "observation": "open /etc/nginx/conf.d: no such file", "thought": "read its logs & errors"},
        {"name": "kubectl", "input": "get configmap nginx -n web -o yaml", "observation": "data: {}", "thought": "check the config map"},
    ])
}

async fn execute(
    State(agent): State<Arc<Agent>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(key) = headers.get("x-api-key") {
        agent.api_keys.lock().unwrap().push(key.to_str().unwrap().to_string());
    }
    if let Some(host) = headers.get("host") {
        agent.hosts.lock().unwrap().push(host.to_str().unwrap().to_string());
    }
    let Ok(request) = serde_json::from_str::<Value>(&body) else {
        return gin_json(StatusCode::BAD_REQUEST, &json!({"error": "invalid request body"}));
    };
    let instructions = request["instructions"].as_str().unwrap_or_default();
    if instructions.contains("FAIL") {
        return gin_json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": "model call failed: <upstream> 429 & retry"}),
        );
    }
    if instructions.contains("HANG") {
        agent.hanging.notify_one();
        agent.release.notified().await;
    }
    let mut answer = json!({"message": "The pod <nginx-7d9> lacks its config & crashes", "status": "success"});
    if query.get("show-thought").map(String::as_str) == Some("true") {
        agent.show_thought.fetch_add(1, Ordering::SeqCst);
        let extra = json!({
            "thought": "I have the answer",
            "question": instructions,
            "action": {"name": "kubectl", "input": "get configmap nginx -n web -o yaml"},
            "observation": "data: {}",
            "tools_history": tools_history(),
        });
        answer.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    }
    let mut response = gin_json(StatusCode::OK, &answer);
    response.headers_mut().append("set-cookie", "agent_pref=compact; Path=/".parse().unwrap());
    response
}

async fn diagnose(Query(query): Query<BTreeMap<String, String>>, body: String) -> Response {
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    let message = format!(
        "{}/{} is OOMKilled (model {})",
        request["namespace"].as_str().unwrap_or(""),
        request["name"].as_str().unwrap_or(""),
        query.get("model").map_or("gpt-4o", String::as_str)
    );
    gin_json(StatusCode::OK, &json!({"message": message, "status": "success"}))
}

async fn analyze(body: String) -> Response {
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    let message = format!("{} has no readiness probe", request["resource"].as_str().unwrap_or(""));
    gin_json(StatusCode::OK, &json!({"message": message, "status": "success"}))
}

async fn login() -> Response {
    gin_json(StatusCode::OK, &json!({"token": jwt("alice")}))
}

async fn sse(State(agent): State<Arc<Agent>>) -> Response {
    let stream = futures::stream::unfold(0, move |step| {
        let agent = agent.clone();
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>("data: first\n\n".to_string()), 1)),
                1 => {
                    agent.release.notified().await;
                    Some((Ok("data: second\n\n".to_string()), 2))
                }
                _ => None,
            }
        }
    });
    ([("content-type", "text/event-stream"), ("cache-control", "no-cache")], Body::from_stream(stream)).into_response()
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            if let Message::Text(text) = message {
                if socket.send(Message::Text(format!("echo: {}", text.as_str()).into())).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// Starts the stub agent on a free loopback port: its base URL and state.
async fn start_agent() -> (String, Arc<Agent>) {
    let agent = Arc::new(Agent::default());
    let app = Router::new()
        .route("/api/execute", post(execute))
        .route("/api/diagnose", post(diagnose))
        .route("/api/analyze", post(analyze))
        .route("/login", post(login))
        .route("/api/version", get(|| async { gin_json(StatusCode::OK, &json!({"version": "v1.0.3"})) }))
        .route(
            "/index.html",
            get(|| async {
                ([("content-type", "text/html; charset=utf-8")], "<!doctype html><title>OpsAgent</title>")
            }),
        )
        .route("/api/events", get(sse))
        .route("/ws", get(ws))
        .with_state(agent.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the stub agent");
    let url = format!("http://{}", listener.local_addr().expect("stub address"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("stub agent") });
    (url, agent)
}

/// The service with its proxy in front of `upstream`.
struct ProxyApp {
    /// `http://127.0.0.1:PORT` of the proxy.
    proxy: String,
    /// `http://127.0.0.1:PORT` of the API.
    api: String,
    store: Arc<dyn Store>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    _spool: tempfile::TempDir,
}

impl ProxyApp {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proxy)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.expect("server task");
    }
}

async fn spawn_proxy(db: &TestDb, upstream: &str, configure: impl FnOnce(&mut Config)) -> ProxyApp {
    let mut config = fast_config();
    config.database.url = Some(db.url.clone());
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.upstream = Some(upstream.to_string());
    config.proxy.listen = "127.0.0.1:0".parse().unwrap();
    let spool = tempfile::tempdir().expect("spool dir");
    config.spool.dir = spool.path().to_path_buf();
    configure(&mut config);
    let app = Application::build(config, false).await.expect("build the application");
    let proxy = format!("http://{}", app.proxy_addr().expect("the proxy runs"));
    let api = format!("http://{}", app.local_addr());
    let store = app.store();
    let stop = CancellationToken::new();
    let signal = stop.clone().cancelled_owned();
    let server = tokio::spawn(async move {
        app.run_until(signal).await.expect("serve");
    });
    ProxyApp { proxy, api, store, stop, server, _spool: spool }
}

/// Every stored record, oldest first.
async fn records(store: &dyn Store) -> Vec<Interaction> {
    let mut all: Vec<Interaction> =
        store.export(&Filter::default()).map(|r| r.expect("read a record")).collect::<Vec<_>>().await;
    all.sort_by_key(|r| r.created_at);
    all
}

fn execute_body(instructions: &str) -> Value {
    json!({
        "instructions": instructions,
        "args": "",
        "provider": "openai",
        "baseUrl": "https://api.openai.com/v1",
        "currentModel": "gpt-4o-mini",
        "cluster": "prod-east",
        "selectedModels": ["gpt-4o-mini"],
    })
}

/// A stored tool call: position, name, input, observation, thought.
type CallRow<'a> = (i32, &'a str, &'a str, Option<&'a str>, Option<i32>);

async fn an_execute_exchange_is_recorded_field_by_field(db: &TestDb) {
    let (agent_url, agent) = start_agent().await;
    let app = spawn_proxy(db, &agent_url, |_| {}).await;
    let client = reqwest::Client::new();
    let token = jwt("alice");
    let response = client
        .post(app.url("/api/execute?show-thought=true"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-api-key", API_KEY)
        .header("user-agent", "opsagent-web/1.0")
        .json(&execute_body("why does nginx crash in web?"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cookies: Vec<String> =
        response.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert!(cookies.contains(&"agent_pref=compact; Path=/".to_string()), "the agent's cookie passes: {cookies:?}");
    let session = cookies
        .iter()
        .find_map(|c| c.strip_prefix("session_id="))
        .and_then(|c| c.strip_suffix("; Path=/; Max-Age=86400; HttpOnly"))
        .unwrap_or_else(|| panic!("a session cookie as the seed sets it: {cookies:?}"))
        .to_string();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["tools_history"].as_array().map(Vec::len), Some(3), "the client asked for the trace: {answer}");
    assert_eq!(agent.api_keys.lock().unwrap().as_slice(), [API_KEY], "the agent gets its provider key");
    let host = agent.hosts.lock().unwrap()[0].clone();
    assert_eq!(format!("http://{host}"), agent_url, "Host is the agent's");

    // The same session again: its cookie is reused, not set anew.
    let response = client
        .post(app.url("/api/execute"))
        .header("cookie", format!("theme=dark; session_id={session}"))
        // The same browser: PostgreSQL keeps client and user agent per session.
        .header("user-agent", "opsagent-web/1.0")
        .json(&execute_body("and now?"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get_all("set-cookie").iter().all(|c| !c.to_str().unwrap().starts_with("session_id=")));
    wait_for_count(&*app.store, 2).await;
    let stored = records(&*app.store).await;
    let r = &stored[0];
    assert_eq!(r.question, "why does nginx crash in web?");
    assert_eq!(r.endpoint.as_deref(), Some("/api/execute"));
    assert_eq!(r.model_name.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(r.provider.as_deref(), Some("openai"));
    assert_eq!(r.base_url.as_deref(), Some("https://api.openai.com/v1"));
    assert_eq!(r.cluster.as_deref(), Some("prod-east"));
    assert_eq!(r.final_answer.as_deref(), Some("The pod <nginx-7d9> lacks its config & crashes"));
    assert_eq!((r.status, r.http_status, r.error.as_deref()), (Status::Success, Some(200), None));
    assert_eq!(r.user_id.as_deref(), Some("alice"));
    assert_eq!(r.session_id.to_string(), session);
    assert_eq!(r.client_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(r.user_agent.as_deref(), Some("opsagent-web/1.0"));
    assert!(r.total_duration_ms.is_some_and(|ms| ms >= 0));
    assert!(r.metrics.contains_key("upstream_headers_ms"), "{:?}", r.metrics);
    assert_eq!(r.attributes["source"], "proxy");
    assert_eq!(r.attributes["agent_status"], "success");
    let thoughts: Vec<(i32, &str)> = r.thoughts.iter().map(|t| (t.sequence_number, t.content.as_str())).collect();
    assert_eq!(
        thoughts,
        [
            (1, "look at the pods <first>"),
            (2, "read its logs & errors"),
            (3, "check the config map"),
            (4, "I have the answer")
        ]
    );
    let calls: Vec<CallRow> = r
        .tool_calls
        .iter()
        .map(|c| {
            (
                c.sequence_number,
                c.tool_name.as_str(),
                c.tool_input.as_str(),
                c.tool_observation.as_deref(),
                c.thought_sequence_number,
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            (1, "kubectl", "get pods -n web", Some("nginx-7d9 0/1 CrashLoopBackOff"), Some(1)),
            (2, "kubectl", "logs nginx-7d9 -n web", Some("open /etc/nginx/conf.d: no such file"), Some(2)),
            (3, "kubectl", "get configmap nginx -n web -o yaml", Some("data: {}"), Some(3)),
        ]
    );
    let again = &stored[1];
    assert_eq!(again.session_id, r.session_id, "the cookie's session is reused");
    assert_eq!((again.question.as_str(), again.user_id.as_deref()), ("and now?", None));
    assert!(again.thoughts.is_empty() && again.tool_calls.is_empty(), "no trace was asked for");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_analyze_and_error_replies_are_recorded() {
    let db = TestDb::sqlite();
    let (agent_url, _agent) = start_agent().await;
    let app = spawn_proxy(&db, &agent_url, |_| {}).await;
    let client = reqwest::Client::new();
    let r = client
        .post(app.url("/api/diagnose?model=qwen-max&cluster=staging"))
        .json(&json!({"name": "api-7d9", "namespace": "shop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client.post(app.url("/api/analyze")).json(&json!({"resource": "deployment/nginx"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.post(app.url("/api/execute")).json(&execute_body("FAIL please")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    wait_for_count(&*app.store, 3).await;
    let stored = records(&*app.store).await;
    let d = stored.iter().find(|r| r.endpoint.as_deref() == Some("/api/diagnose")).unwrap();
    assert_eq!(d.question, "diagnose shop/api-7d9");
    assert_eq!((d.model_name.as_deref(), d.cluster.as_deref()), (Some("qwen-max"), Some("staging")));
    assert_eq!(d.final_answer.as_deref(), Some("shop/api-7d9 is OOMKilled (model qwen-max)"));
    let a = stored.iter().find(|r| r.endpoint.as_deref() == Some("/api/analyze")).unwrap();
    assert_eq!(a.question, "analyze deployment/nginx");
    assert_eq!((a.model_name.as_deref(), a.cluster.as_deref()), (Some("gpt-4o"), Some("default")));
    let e = stored.iter().find(|r| r.endpoint.as_deref() == Some("/api/execute")).unwrap();
    assert_eq!((e.status, e.http_status), (Status::Error, Some(500)));
    assert_eq!(e.error.as_deref(), Some("model call failed: <upstream> 429 & retry"));
    assert_eq!(e.final_answer, None);
    app.stop().await;
}

/// One request, sent the same way to the agent and to the proxy.
struct Call {
    method: reqwest::Method,
    path: &'static str,
    body: Option<Value>,
}

/// Status, headers (but `date`, and the proxy's own session cookie) and body bytes.
async fn exchange(client: &reqwest::Client, base: &str, call: &Call) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut request = client.request(call.method.clone(), format!("{base}{}", call.path));
    if let Some(body) = &call.body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(name, value)| {
            *name != "date" && !(*name == "set-cookie" && value.to_str().unwrap().starts_with("session_id="))
        })
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_string()))
        .collect();
    headers.sort();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_byte_identical_answers_with_and_without_the_proxy() {
    let db = TestDb::sqlite();
    let (agent_url, agent) = start_agent().await;
    // capture_thoughts on: the proxy asks for the trace and must hand back exactly the
    // answer without it.
    let app = spawn_proxy(&db, &agent_url, |c| c.proxy.capture_thoughts = true).await;
    let client = reqwest::Client::new();
    let calls = [
        Call {
            method: reqwest::Method::POST,
            path: "/api/execute",
            body: Some(execute_body("why <crash> & restart?")),
        },
        Call {
            method: reqwest::Method::POST,
            path: "/api/execute?show-thought=true",
            body: Some(execute_body("trace please")),
        },
        Call {
            method: reqwest::Method::POST,
            path: "/api/diagnose?model=qwen-max",
            body: Some(json!({"name": "db-0", "namespace": "data"})),
        },
        Call {
            method: reqwest::Method::POST,
            path: "/api/analyze",
            body: Some(json!({"resource": "deployment/<web>"})),
        },
        Call { method: reqwest::Method::POST, path: "/api/execute", body: Some(execute_body("FAIL now")) },
        Call {
            method: reqwest::Method::POST,
            path: "/login",
            body: Some(json!({"username": "alice", "password": "pw"})),
        },
        Call { method: reqwest::Method::GET, path: "/api/version", body: None },
        Call { method: reqwest::Method::GET, path: "/index.html", body: None },
        Call { method: reqwest::Method::GET, path: "/no/such/page", body: None },
    ];
    let mut audited = 0;
    for call in &calls {
        let direct = exchange(&client, &agent_url, call).await;
        if call.path.starts_with("/api/execute") && direct.0 == 200 {
            // The stub writes as Go does, so a proxy that re-serialised would differ.
            assert!(String::from_utf8_lossy(&direct.2).contains("\\u003cnginx-7d9\\u003e"), "{:?}", direct.2);
        }
        let before = agent.show_thought.load(Ordering::SeqCst);
        let proxied = exchange(&client, &app.proxy, call).await;
        assert_eq!(proxied.0, direct.0, "{}: status", call.path);
        assert_eq!(proxied.1, direct.1, "{}: headers", call.path);
        assert_eq!(String::from_utf8_lossy(&proxied.2), String::from_utf8_lossy(&direct.2), "{}: body", call.path);
        assert_eq!(proxied.2, direct.2, "{}: body bytes", call.path);
        if call.path.starts_with("/api/execute") && call.body.as_ref().is_some_and(|b| b["instructions"] != "FAIL now")
        {
            // The proxy asked for the trace even where the client did not.
            assert_eq!(agent.show_thought.load(Ordering::SeqCst), before + 1, "{}", call.path);
        }
        if call.method == reqwest::Method::POST && call.path.starts_with("/api/") {
            audited += 1;
        }
    }
    wait_for_count(&*app.store, audited).await;
    let stored = records(&*app.store).await;
    let first = stored.iter().find(|r| r.question == "why <crash> & restart?").expect("the first call's record");
    assert_eq!(first.tool_calls.len(), 3, "the trace the client did not see is recorded");
    assert_eq!(first.thoughts.last().map(|t| t.content.as_str()), Some("I have the answer"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaudited_paths_pass_through_and_are_not_recorded() {
    let db = TestDb::sqlite();
    let (agent_url, _agent) = start_agent().await;
    let app = spawn_proxy(&db, &agent_url, |_| {}).await;
    let client = reqwest::Client::new();
    let login =
        client.post(app.url("/login")).json(&json!({"username": "alice", "password": "pw"})).send().await.unwrap();
    assert_eq!(login.status(), 200);
    assert!(login.headers().get("set-cookie").is_none(), "no session cookie outside the audited paths");
    let token: Value = login.json().await.unwrap();
    assert!(token["token"].as_str().is_some_and(|t| t.split('.').count() == 3));
    assert_eq!(client.get(app.url("/index.html")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(app.url("/api/version")).send().await.unwrap().status(), 200);
    // An audited path, but not POST: forwarded (the stub answers 405), not recorded.
    assert_eq!(client.get(app.url("/api/execute")).send().await.unwrap().status(), 405);
    // One audited request after them: once it is stored, nothing else was.
    client.post(app.url("/api/analyze")).json(&json!({"resource": "pod/x"})).send().await.unwrap();
    wait_for_count(&*app.store, 1).await;
    assert_eq!(records(&*app.store).await[0].question, "analyze pod/x");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_is_down_or_too_slow_is_answered_and_recorded() {
    let db = TestDb::sqlite();
    // Down: nothing listens on that port.
    let down = format!("http://127.0.0.1:{}", free_port());
    let app = spawn_proxy(&db, &down, |_| {}).await;
    let client = reqwest::Client::new();
    let r = client.post(app.url("/api/execute")).json(&execute_body("is anyone there?")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().is_some_and(|e| e.contains("could not be reached")), "{body}");
    assert_eq!(client.get(app.url("/index.html")).send().await.unwrap().status(), 502, "unaudited paths too");
    wait_for_count(&*app.store, 1).await;
    let r = &records(&*app.store).await[0];
    assert_eq!((r.status, r.http_status, r.question.as_str()), (Status::Error, Some(502), "is anyone there?"));
    assert!(r.error.as_deref().is_some_and(|e| e.contains("could not be reached")), "{:?}", r.error);
    let metrics = client.get(format!("{}/metrics", app.api)).send().await.unwrap().text().await.unwrap();
    let metrics = scrape_metrics(&metrics);
    let get = |name: &str| metrics.get(name).copied().unwrap_or_else(|| panic!("no {name} in {metrics:?}"));
    assert_eq!(get(r#"opsagent_audit_proxy_requests_total{audited="true",outcome="error"}"#), 1.0);
    assert_eq!(get(r#"opsagent_audit_proxy_requests_total{audited="false",outcome="forwarded"}"#), 1.0);
    assert_eq!(get(r#"opsagent_audit_proxy_upstream_failures_total{kind="unreachable"}"#), 2.0);
    app.stop().await;

    // Slow: the agent never answers within the timeout.
    let db = TestDb::sqlite();
    let (agent_url, agent) = start_agent().await;
    let app = spawn_proxy(&db, &agent_url, |c| c.proxy.upstream_timeout = Duration::from_millis(300)).await;
    let r = client.post(app.url("/api/execute")).json(&execute_body("HANG forever")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    wait_for_count(&*app.store, 1).await;
    let r = &records(&*app.store).await[0];
    assert_eq!((r.status, r.http_status), (Status::Timeout, Some(504)));
    assert!(r.error.as_deref().is_some_and(|e| e.contains("audit.proxy.upstream_timeout")), "{:?}", r.error);
    agent.release.notify_waiters();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_recorded_as_cancelled() {
    let db = TestDb::sqlite();
    let (agent_url, agent) = start_agent().await;
    let app = spawn_proxy(&db, &agent_url, |_| {}).await;
    let url = app.url("/api/execute");
    let request = tokio::spawn(async move {
        reqwest::Client::new().post(url).json(&execute_body("HANG until the client leaves")).send().await
    });
    agent.hanging.notified().await;
    request.abort();
    let _ = request.await;
    wait_for_count(&*app.store, 1).await;
    let r = &records(&*app.store).await[0];
    assert_eq!(
        (r.status, r.http_status, r.question.as_str()),
        (Status::Cancelled, None, "HANG until the client leaves")
    );
    agent.release.notify_waiters();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_stream_through() {
    let db = TestDb::sqlite();
    let (agent_url, agent) = start_agent().await;
    let app = spawn_proxy(&db, &agent_url, |_| {}).await;
    let response = reqwest::Client::new().get(app.url("/api/events")).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut response = response;
    // The first event arrives while the agent still holds the stream open.
    let first = response.chunk().await.unwrap().expect("a first chunk");
    assert_eq!(&first[..], b"data: first\n\n");
    agent.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: second\n\n");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_joined_through_the_proxy() {
    let db = TestDb::sqlite();
    let (agent_url, _agent) = start_agent().await;
    let app = spawn_proxy(&db, &agent_url, |_| {}).await;
    let ws_url = app.url("/ws").replacen("http://", "ws://", 1);
    let (mut socket, response) = tokio_tungstenite::connect_async(ws_url).await.expect("websocket through the proxy");
    assert_eq!(response.status(), 101);
    for text in ["hello", "kubectl get pods"] {
        socket.send(tokio_tungstenite::tungstenite::Message::Text(text.into())).await.unwrap();
        let echoed = socket.next().await.expect("an echo").unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("echo: {text}"));
    }
    socket.close(None).await.unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_tokens_reach_neither_database_spool_nor_logs() {
    let (agent_url, agent) = start_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("audit.db");
    let db_url = format!("sqlite://{}", db_path.display());
    let proxy_port = free_port();
    let server = ServerBuilder::new(dir.path(), &db_url)
        .flag("--proxy-upstream")
        .flag(&agent_url)
        .flag("--proxy-listen")
        .flag(&format!("127.0.0.1:{proxy_port}"))
        .env("RUST_LOG", "debug")
        .env("AUDIT_ASYNC_BATCH_INTERVAL_MS", "20")
        .start()
        .await;
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let token = jwt("alice");
    let cookie_secret = "csrf-7f3a9b2c1d0e";
    let client = reqwest::Client::new();
    for path in ["/api/execute?show-thought=true", "/api/execute", "/login"] {
        let r = client
            .post(format!("{proxy}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("x-api-key", API_KEY)
            .header("cookie", format!("csrf={cookie_secret}"))
            .json(&execute_body("answer me"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success() || r.status() == 500, "{path}: {}", r.status());
    }
    assert_eq!(agent.api_keys.lock().unwrap().len(), 2, "the agent got its key on the audited calls");
    let store = opsagent_audit::store::connect(&db_url, &Config::default().database).await.unwrap();
    wait_for_count(&*store, 2).await;
    let stored = records(&*store).await;
    assert!(stored.iter().all(|r| r.user_id.as_deref() == Some("alice")));
    store.close().await;
    // Also shut the server down, so everything it would write is written.
    let mut server = server;
    assert!(server.terminate(Duration::from_secs(30)).await.success());
    let secrets = [API_KEY, token.as_str(), token.split('.').nth(2).unwrap(), cookie_secret];
    let mut files = vec![db_path.clone()];
    for entry in walk(dir.path()) {
        files.push(entry);
    }
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for secret in secrets {
            assert!(!text.contains(secret), "{} holds {secret}", file.display());
        }
    }
    let log = server.log_text();
    assert!(log.contains("auditing proxy listening"), "{log}");
    for secret in secrets {
        assert!(!log.contains(secret), "the log holds {secret}:\n{log}");
    }
}

/// Every file under `dir` (the database and its WAL, the spool, the server's log).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_jwt_secret_variable_stops_start_up_and_a_forged_token_names_no_user() {
    let db = TestDb::sqlite();
    let (agent_url, _agent) = start_agent().await;
    let mut config = fast_config();
    config.database.url = Some(db.url.clone());
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.spool.enabled = false;
    config.proxy.upstream = Some(agent_url.clone());
    config.proxy.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.jwt_secret_env = Some("OPSAGENT_AUDIT_TEST_UNSET_SECRET_VAR".into());
    let err = Application::build(config, false).await.unwrap_err().to_string();
    assert!(err.contains("OPSAGENT_AUDIT_TEST_UNSET_SECRET_VAR"), "{err}");

    // A variable every process has stands in for the secret's: setting one here would
    // race with the other tests reading the environment.
    let secret = std::env::var("PATH").expect("PATH is set");
    let app = spawn_proxy(&db, &agent_url, |c| c.proxy.jwt_secret_env = Some("PATH".into())).await;
    let sign = |name: &str, key: &[u8]| {
        use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
        encode(&Header::new(Algorithm::HS256), &json!({ "username": name }), &EncodingKey::from_secret(key)).unwrap()
    };
    let (alice, forged) = (sign("alice", secret.as_bytes()), sign("mallory", b"guess"));
    let client = reqwest::Client::new();
    for token in [alice, forged] {
        let r = client
            .post(app.url("/api/analyze"))
            .header("authorization", format!("Bearer {token}"))
            .json(&json!({"resource": "pod/x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    wait_for_count(&*app.store, 2).await;
    let stored = records(&*app.store).await;
    let users: Vec<(Option<&str>, Option<&Value>)> =
        stored.iter().map(|r| (r.user_id.as_deref(), r.attributes.get("user_unverified"))).collect();
    assert!(users.contains(&(Some("alice"), None)), "{users:?}");
    assert!(users.contains(&(None, Some(&json!("mallory")))), "{users:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_keeps_its_own_session_is_followed() {
    // The seed's middleware sets `session_id` itself: the proxy adopts it rather than
    // setting a second, different one.
    let agent_session = uuid::Uuid::new_v4();
    let agent = Router::new().route(
        "/api/execute",
        post(move || async move {
            (
                [("set-cookie", format!("session_id={agent_session}; Path=/; Max-Age=86400; HttpOnly"))],
                axum::Json(json!({"message": "ok", "status": "success"})),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, agent).await.expect("agent") });
    let db = TestDb::sqlite();
    let app = spawn_proxy(&db, &agent_url, |_| {}).await;
    let response = reqwest::Client::new()
        .post(app.url("/api/execute"))
        .json(&execute_body("which session?"))
        .send()
        .await
        .unwrap();
    let cookies: Vec<String> =
        response.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert_eq!(cookies.len(), 1, "one session cookie: {cookies:?}");
    assert!(cookies[0].starts_with(&format!("session_id={agent_session};")), "{cookies:?}");
    wait_for_count(&*app.store, 1).await;
    assert_eq!(records(&*app.store).await[0].session_id, agent_session);
    app.stop().await;
}

/// The proxy's listener has the API's connection limit, counted on its own: one
/// connection too many is answered `503` at once (not left in the backlog), and a freed
/// slot forwards again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_a_connection_over_its_limit_with_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::sqlite();
    let (agent_url, _agent) = start_agent().await;
    let app = spawn_proxy(&db, &agent_url, |c| c.limits.max_connections = 2).await;
    let address = app.proxy.trim_start_matches("http://").to_string();
    let mut first = tokio::net::TcpStream::connect(&address).await.expect("connect 1");
    first.write_all(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("request on 1");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf)).await.expect("answer").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    let second = tokio::net::TcpStream::connect(&address).await.expect("connect 2");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let client = reqwest::Client::new();
    let response = tokio::time::timeout(Duration::from_secs(2), client.get(app.url("/api/version")).send())
        .await
        .expect("answered at once, not left waiting")
        .expect("an answer");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    let answer: Value = response.json().await.expect("a JSON error");
    assert_eq!(answer["error"]["code"], "too_many_connections", "{answer}");
    // The API's own listener counts its connections apart: it still answers.
    assert_eq!(client.get(format!("{}/healthz", app.api)).send().await.expect("healthz").status(), 200);

    drop(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.get(app.url("/api/version")).send().await.expect("version").status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(std::time::Instant::now() < deadline, "no slot freed 5 s after a connection closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(first);
    app.stop().await;
}
