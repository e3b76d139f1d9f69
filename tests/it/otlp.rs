//! `POST /v1/traces` (and `/v1/logs`) against the real app over loopback: real protobuf
//! built with opentelemetry-proto types, OTLP/JSON bodies, gzip; the records asserted
//! in the real store. The quiet period is 100 ms so a trace finishes soon after its root;
//! records are polled for with a bounded wait, never timed.

use std::io::Write;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, KeyValueList};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::Event;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use opsagent_audit::config::Config;
use opsagent_audit::model::{id_from_key, Interaction, Status as RecordStatus};
use prost::Message;
use serde_json::json;
use uuid::Uuid;

use crate::common::{fast_config, spawn_app_keeping_spool, spawn_app_with, TestApp, TestDb};

const PROTOBUF: &str = "application/x-protobuf";
/// Nanoseconds of a fixed instant, so durations are exact.
const T0: u64 = 1_760_000_000_000_000_000;
const MS: u64 = 1_000_000;

fn config() -> Config {
    let mut c = fast_config();
    c.otlp.quiet_period = Duration::from_millis(100);
    c
}

fn s(v: &str) -> AnyValue {
    AnyValue { value: Some(Value::StringValue(v.into())) }
}

fn int(v: i64) -> AnyValue {
    AnyValue { value: Some(Value::IntValue(v)) }
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue { key: key.into(), value: Some(value), ..Default::default() }
}

fn kvlist(pairs: Vec<(&str, AnyValue)>) -> AnyValue {
    AnyValue {
        value: Some(Value::KvlistValue(KeyValueList { values: pairs.into_iter().map(|(k, v)| kv(k, v)).collect() })),
    }
}

fn array(values: Vec<AnyValue>) -> AnyValue {
    AnyValue { value: Some(Value::ArrayValue(ArrayValue { values })) }
}

/// A message as a structured AnyValue: `{role, parts: [{type, content}…]}`.
fn message(role: &str, parts: &[(&str, &str)]) -> AnyValue {
    let parts = parts.iter().map(|(t, c)| kvlist(vec![("type", s(t)), ("content", s(c))])).collect();
    kvlist(vec![("role", s(role)), ("parts", array(parts))])
}

struct Trace {
    id: [u8; 16],
}

impl Trace {
    fn new() -> Trace {
        Trace { id: Uuid::new_v4().into_bytes() }
    }

    fn record_id(&self) -> Uuid {
        Uuid::from_bytes(self.id)
    }

    fn span(&self, id: u8, parent: Option<u8>, name: &str, start_ms: u64, end_ms: u64, attrs: Vec<KeyValue>) -> Span {
        Span {
            trace_id: self.id.to_vec(),
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: name.into(),
            kind: 1,
            start_time_unix_nano: T0 + start_ms * MS,
            end_time_unix_nano: T0 + end_ms * MS,
            attributes: attrs,
            ..Default::default()
        }
    }
}

fn request(resource: Vec<KeyValue>, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource { attributes: resource, ..Default::default() }),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
}

async fn post(app: &TestApp, path: &str, content_type: &str, body: Vec<u8>, gzip: bool) -> reqwest::Response {
    let mut r = app.client.post(app.url(path)).header("content-type", content_type);
    let body = if gzip {
        r = r.header("content-encoding", "gzip");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&body).expect("gzip");
        gz.finish().expect("gzip")
    } else {
        body
    };
    r.body(body).send().await.expect("POST")
}

/// Posts a protobuf export; returns the status and the decoded answer.
async fn post_proto(app: &TestApp, req: &ExportTraceServiceRequest) -> (u16, ExportTraceServiceResponse) {
    let response = post(app, "/v1/traces", PROTOBUF, req.encode_to_vec(), false).await;
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], PROTOBUF);
    let bytes = response.bytes().await.expect("body");
    (status, ExportTraceServiceResponse::decode(bytes).expect("an ExportTraceServiceResponse"))
}

/// Waits (bounded) for the record of a trace.
async fn stored(app: &TestApp, id: Uuid) -> Interaction {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = app.store.get_interaction(id).await {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "trace {id} not stored within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent run in the current GenAI conventions: root, one chat call, three tools.
fn genai_trace(t: &Trace) -> Vec<Span> {
    let root = t.span(
        1,
        None,
        "invoke_agent ops-agent",
        0,
        2500,
        vec![
            kv("gen_ai.operation.name", s("invoke_agent")),
            kv("gen_ai.agent.name", s("ops-agent")),
            kv("gen_ai.conversation.id", s("conv-42")),
            kv("user.id", s("alice")),
            kv(
                "gen_ai.input.messages",
                array(vec![
                    message("system", &[("text", "you are an SRE")]),
                    message("user", &[("text", "why is web-1 crashlooping?")]),
                ]),
            ),
            kv("gen_ai.output.messages", array(vec![message("assistant", &[("text", "it runs out of memory")])])),
            kv("deployment.tier", s("gold")),
        ],
    );
    let chat = t.span(
        2,
        Some(1),
        "chat gpt-4o",
        10,
        900,
        vec![
            kv("gen_ai.operation.name", s("chat")),
            kv("gen_ai.provider.name", s("openai")),
            kv("gen_ai.request.model", s("gpt-4o")),
            kv("gen_ai.response.model", s("gpt-4o-2024-08-06")),
            kv("gen_ai.request.temperature", AnyValue { value: Some(Value::DoubleValue(0.2)) }),
            kv("gen_ai.usage.input_tokens", int(1200)),
            kv("gen_ai.usage.output_tokens", int(300)),
            kv("server.address", s("api.openai.com")),
            kv("server.port", int(443)),
            // A JSON string, as many emitters send it.
            kv(
                "gen_ai.output.messages",
                s(r#"[{"role":"assistant","parts":[{"type":"reasoning","content":"check the pod events first"},{"type":"tool_call","id":"c1","name":"kubectl","arguments":{"cmd":"get pods"}}]}]"#),
            ),
        ],
    );
    let tool = |id: u8, start: u64, end: u64, name: &str, args: &str, result: &str| {
        t.span(
            id,
            Some(1),
            &format!("execute_tool {name}"),
            start,
            end,
            vec![
                kv("gen_ai.operation.name", s("execute_tool")),
                kv("gen_ai.tool.name", s(name)),
                kv("gen_ai.tool.call.id", s(&format!("call-{id}"))),
                kv("gen_ai.tool.call.arguments", s(args)),
                kv("gen_ai.tool.call.result", s(result)),
            ],
        )
    };
    let mut failing = tool(5, 1500, 1700, "shell", "dmesg | tail", "");
    failing.status = Some(Status { code: 2, message: "permission denied".into() });
    vec![
        tool(4, 1200, 1450, "kubectl", "describe pod web-1", "OOMKilled"),
        chat,
        tool(3, 1000, 1100, "kubectl", "get pods -n web", "web-1 CrashLoopBackOff"),
        failing,
        root,
    ]
}

async fn genai_current_names_map_to_one_interaction(db: &TestDb) {
    let app = spawn_app_with(db, config()).await;
    let t = Trace::new();
    let req =
        request(vec![kv("service.name", s("ops-agent")), kv("k8s.cluster.name", s("prod-eu-1"))], genai_trace(&t));
    let (status, answer) = post_proto(&app, &req).await;
    assert_eq!(status, 200);
    assert_eq!(answer.partial_success, None);
    let r = stored(&app, t.record_id()).await;
    assert_eq!(r.question, "why is web-1 crashlooping?");
    assert_eq!(r.final_answer.as_deref(), Some("it runs out of memory"));
    assert_eq!(r.session_id, id_from_key("conv-42"));
    assert_eq!(r.user_id.as_deref(), Some("alice"));
    assert_eq!(r.model_name.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(r.provider.as_deref(), Some("openai"));
    assert_eq!(r.base_url.as_deref(), Some("api.openai.com:443"));
    assert_eq!(r.cluster.as_deref(), Some("prod-eu-1"));
    assert_eq!((r.input_tokens, r.output_tokens), (Some(1200), Some(300)));
    assert_eq!(r.total_duration_ms, Some(2500));
    assert_eq!(r.status, RecordStatus::Success);
    assert_eq!(r.created_at.timestamp_nanos_opt(), Some(T0 as i64));
    assert_eq!(r.thoughts.len(), 1);
    assert_eq!(r.thoughts[0].content, "check the pod events first");
    let tools: Vec<(&str, &str, Option<i64>)> =
        r.tool_calls.iter().map(|c| (c.tool_name.as_str(), c.tool_input.as_str(), c.duration_ms)).collect();
    assert_eq!(
        tools,
        vec![
            ("kubectl", "get pods -n web", Some(100)),
            ("kubectl", "describe pod web-1", Some(250)),
            ("shell", "dmesg | tail", Some(200)),
        ],
        "tool calls in start order"
    );
    assert_eq!(r.tool_calls[1].tool_observation.as_deref(), Some("OOMKilled"));
    assert_eq!(r.tool_calls[2].error.as_deref(), Some("permission denied"));
    assert_eq!(r.attributes["gen_ai.agent.name"], "ops-agent");
    assert_eq!(r.attributes["deployment.tier"], "gold");
    assert_eq!(r.attributes["gen_ai.request.temperature"], 0.2);
    assert_eq!(r.attributes["otlp.trace_id"], hex::encode(t.id));
    assert_eq!(r.attributes["service.name"], "ops-agent");
    assert!(!r.attributes.contains_key("gen_ai.input.messages"), "messages are mapped, not copied again");
    assert!(!r.attributes.contains_key("otlp.incomplete"));

    // The same export again (a retry): a duplicate, nothing refused, still one record.
    let (status, answer) = post_proto(&app, &req).await;
    assert_eq!((status, answer.partial_success), (200, None));
    // A new span of the audited trace: refused as late, not a second record.
    let late = request(vec![], vec![t.span(9, Some(1), "execute_tool late", 2600, 2700, vec![])]);
    let (status, answer) = post_proto(&app, &late).await;
    let partial = answer.partial_success.expect("partial success");
    assert_eq!((status, partial.rejected_spans), (200, 1));
    assert!(partial.error_message.contains("late_span"), "{}", partial.error_message);
    app.stop().await;
    assert_eq!(app_count(db).await, 1);
}

async fn app_count(db: &TestDb) -> u64 {
    let store = db.store().await;
    let n = store.count_interactions().await.expect("count");
    store.close().await;
    n
}

/// A span in OTLP/JSON: hex ids, integer enums, 64-bit integers as strings.
fn json_span(
    t: &Trace,
    id: u8,
    parent: Option<u8>,
    name: &str,
    start_ms: u64,
    end_ms: u64,
    attrs: serde_json::Value,
) -> serde_json::Value {
    json!({
        "traceId": hex::encode(t.id),
        "spanId": hex::encode([id; 8]),
        "parentSpanId": parent.map(|p| hex::encode([p; 8])).unwrap_or_default(),
        "name": name,
        "kind": 1,
        "startTimeUnixNano": (T0 + start_ms * MS).to_string(),
        "endTimeUnixNano": (T0 + end_ms * MS).to_string(),
        "attributes": attrs,
        "status": {},
    })
}

fn json_request(spans: Vec<serde_json::Value>) -> Vec<u8> {
    json!({ "resourceSpans": [{ "resource": { "attributes": [] }, "scopeSpans": [{ "scope": {}, "spans": spans }] }] })
        .to_string()
        .into_bytes()
}

async fn json_gzip_trace_split_over_two_requests_root_last(db: &TestDb) {
    let app = spawn_app_with(db, config()).await;
    let t = Trace::new();
    let tool = json_span(
        &t,
        2,
        Some(1),
        "execute_tool kubectl",
        100,
        300,
        json!([
            {"key": "gen_ai.operation.name", "value": {"stringValue": "execute_tool"}},
            {"key": "gen_ai.tool.name", "value": {"stringValue": "kubectl"}},
            {"key": "gen_ai.tool.call.arguments", "value": {"stringValue": "get nodes"}},
            {"key": "empty", "value": {}},
        ]),
    );
    let chat = json_span(
        &t,
        3,
        Some(1),
        "chat qwen-max",
        10,
        90,
        json!([
            {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
            {"key": "gen_ai.request.model", "value": {"stringValue": "qwen-max"}},
            {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "77"}},
        ]),
    );
    let response =
        post(&app, "/v1/traces", "application/json; charset=utf-8", json_request(vec![tool, chat]), true).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "{}");
    // Long past the quiet period, nothing is stored: the root has not come.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(app.store.count_interactions().await.expect("count"), 0, "audited before its root came");
    let root = json_span(
        &t,
        1,
        None,
        "invoke_agent",
        0,
        400,
        json!([
            {"key": "gen_ai.operation.name", "value": {"stringValue": "invoke_agent"}},
            {"key": "gen_ai.input.messages", "value": {"stringValue": "[{\"role\":\"user\",\"parts\":[{\"type\":\"text\",\"content\":\"list nodes\"}]}]"}},
        ]),
    );
    let response = post(&app, "/v1/traces", "application/json", json_request(vec![root]), true).await;
    assert_eq!(response.status(), 200);
    let r = stored(&app, t.record_id()).await;
    assert_eq!(r.question, "list nodes");
    assert_eq!(r.model_name.as_deref(), Some("qwen-max"));
    assert_eq!(r.input_tokens, Some(77));
    assert_eq!(r.tool_calls.len(), 1);
    assert_eq!((r.tool_calls[0].tool_input.as_str(), r.tool_calls[0].duration_ms), ("get nodes", Some(200)));
    assert_eq!(r.attributes["otlp.span_count"], 3);
    app.stop().await;
}

async fn older_genai_names_and_events(db: &TestDb) {
    let app = spawn_app_with(db, config()).await;
    let t = Trace::new();
    let mut chat = t.span(
        2,
        Some(1),
        "chat claude",
        5,
        50,
        vec![
            kv("gen_ai.system", s("anthropic")),
            kv("gen_ai.request.model", s("claude-sonnet-4")),
            kv("gen_ai.usage.prompt_tokens", int(40)),
            kv("gen_ai.usage.completion_tokens", int(8)),
        ],
    );
    chat.events = vec![
        Event {
            name: "gen_ai.user.message".into(),
            attributes: vec![kv("content", s("is etcd healthy?"))],
            ..Default::default()
        },
        Event {
            name: "gen_ai.choice".into(),
            attributes: vec![kv("message", s(r#"{"role":"assistant","content":"yes, 3 of 3 members"}"#))],
            ..Default::default()
        },
    ];
    let root = t.span(1, None, "agent run", 0, 60, vec![]);
    let (status, _) = post_proto(&app, &request(vec![], vec![chat, root])).await;
    assert_eq!(status, 200);
    let r = stored(&app, t.record_id()).await;
    assert_eq!(r.question, "is etcd healthy?");
    assert_eq!(r.final_answer.as_deref(), Some("yes, 3 of 3 members"));
    assert_eq!(r.provider.as_deref(), Some("anthropic"));
    assert_eq!(r.model_name.as_deref(), Some("claude-sonnet-4"));
    assert_eq!((r.input_tokens, r.output_tokens), (Some(40), Some(8)));
    assert_eq!(r.session_id, id_from_key(&format!("otlp-trace:{}", hex::encode(t.id))));
    app.stop().await;
}

async fn openinference_names(db: &TestDb) {
    let app = spawn_app_with(db, config()).await;
    let t = Trace::new();
    let agent = t.span(
        1,
        None,
        "AgentExecutor",
        0,
        1000,
        vec![
            kv("openinference.span.kind", s("AGENT")),
            kv("input.value", s("restart the payments deployment")),
            kv("output.value", s("payments restarted")),
            kv("session.id", s("sess-7")),
            kv("user.id", s("bob")),
            kv("metadata", s(r#"{"k8s.cluster.name":"staging","team":"payments"}"#)),
        ],
    );
    let llm = t.span(
        2,
        Some(1),
        "ChatOpenAI",
        10,
        200,
        vec![
            kv("openinference.span.kind", s("LLM")),
            kv("llm.model_name", s("gpt-4o-mini")),
            kv("llm.provider", s("openai")),
            kv("llm.token_count.prompt", int(500)),
            kv("llm.token_count.completion", int(20)),
            kv("llm.output_messages.0.message.role", s("assistant")),
            kv("llm.output_messages.0.message.contents.0.message_content.type", s("reasoning")),
            kv("llm.output_messages.0.message.contents.0.message_content.text", s("a rollout restart is safe")),
        ],
    );
    let tool = t.span(
        3,
        Some(1),
        "kubectl",
        300,
        800,
        vec![
            kv("openinference.span.kind", s("TOOL")),
            kv("tool.name", s("kubectl")),
            kv("input.value", s("rollout restart deploy/payments")),
            kv("output.value", s("deployment.apps/payments restarted")),
        ],
    );
    let (status, _) = post_proto(&app, &request(vec![], vec![llm, tool, agent])).await;
    assert_eq!(status, 200);
    let r = stored(&app, t.record_id()).await;
    assert_eq!(r.question, "restart the payments deployment");
    assert_eq!(r.final_answer.as_deref(), Some("payments restarted"));
    assert_eq!(r.session_id, id_from_key("sess-7"));
    assert_eq!(r.user_id.as_deref(), Some("bob"));
    assert_eq!(r.cluster.as_deref(), Some("staging"));
    assert_eq!((r.model_name.as_deref(), r.provider.as_deref()), (Some("gpt-4o-mini"), Some("openai")));
    assert_eq!((r.input_tokens, r.output_tokens), (Some(500), Some(20)));
    assert_eq!(r.thoughts.len(), 1);
    assert_eq!(r.thoughts[0].content, "a rollout restart is safe");
    assert_eq!(r.tool_calls.len(), 1);
    assert_eq!(r.tool_calls[0].tool_observation.as_deref(), Some("deployment.apps/payments restarted"));
    assert_eq!(r.attributes["metadata"]["team"], "payments");
    app.stop().await;
}

async fn spans_with_bad_ids_are_refused_alone(db: &TestDb) {
    let app = spawn_app_with(db, config()).await;
    let t = Trace::new();
    let mut bad = t.span(7, None, "log posing as a span", 0, 1, vec![]);
    bad.trace_id = Vec::new();
    bad.span_id = Vec::new();
    let mut short = t.span(8, None, "short span id", 0, 1, vec![]);
    short.span_id = vec![1, 2, 3];
    let good = t.span(
        1,
        None,
        "invoke_agent",
        0,
        10,
        vec![kv("gen_ai.operation.name", s("invoke_agent")), kv("input.value", s("ping"))],
    );
    let (status, answer) = post_proto(&app, &request(vec![], vec![bad, good, short])).await;
    assert_eq!(status, 200);
    let partial = answer.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 2);
    assert!(partial.error_message.contains("traceId must be 16 bytes"), "{}", partial.error_message);
    let r = stored(&app, t.record_id()).await;
    assert_eq!(r.question, "ping");
    app.stop().await;
}

/// What is refused whole, and how: empty bodies are successes; other content types are
/// 415; undecodable bodies 400 with a `google.rpc.Status`; over the limit once
/// decompressed 413; `/v1/logs` answers with every record refused and why.
async fn bodies_refused_and_empty_ones_accepted(db: &TestDb) {
    let mut c = config();
    c.limits.max_body_bytes = 64 * 1024;
    let app = spawn_app_with(db, c).await;
    let (status, answer) = post_proto(&app, &ExportTraceServiceRequest::default()).await;
    assert_eq!((status, answer.partial_success), (200, None));
    let response = post(&app, "/v1/traces", "application/json", b"{}".to_vec(), false).await;
    assert_eq!((response.status().as_u16(), response.text().await.unwrap()), (200, "{}".to_string()));

    let response = post(&app, "/v1/traces", "text/plain", b"hello".to_vec(), false).await;
    assert_eq!(response.status(), 415);
    let body: serde_json::Value = response.json().await.expect("JSON status");
    assert!(body["message"].as_str().unwrap().contains("application/x-protobuf"), "{body}");

    let response = post(&app, "/v1/traces", PROTOBUF, vec![0xff, 0xff, 0xff], false).await;
    assert_eq!(response.status(), 400);
    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        message: String,
    }
    let status = RpcStatus::decode(response.bytes().await.unwrap()).expect("a google.rpc.Status");
    assert_eq!(status.code, 3);
    assert!(status.message.contains("protobuf"), "{}", status.message);

    let response = post(&app, "/v1/traces", "application/json", b"{\"resourceSpans\": 5}".to_vec(), false).await;
    assert_eq!(response.status(), 400);

    // 200 KB of zeros compress to a few hundred bytes: refused once decompressed.
    let response = post(&app, "/v1/traces", PROTOBUF, vec![0u8; 200 * 1024], true).await;
    assert_eq!(response.status(), 413);
    let response = post(&app, "/v1/traces", PROTOBUF, vec![0u8; 100 * 1024], false).await;
    assert_eq!(response.status(), 413);

    let logs = json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [
        {"eventName": "gen_ai.user.message", "body": {"stringValue": "hi"}},
        {"body": {"stringValue": "plain"}}
    ]}]}]});
    let response = post(&app, "/v1/logs", "application/json", logs.to_string().into_bytes(), false).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["partialSuccess"]["rejectedLogRecords"], "2");
    assert!(body["partialSuccess"]["errorMessage"].as_str().unwrap().contains("traces only"), "{body}");
    assert_eq!(app.store.count_interactions().await.unwrap(), 0);
    app.stop().await;
}

both_backends!(
    genai_current_names_map_to_one_interaction,
    json_gzip_trace_split_over_two_requests_root_last,
    older_genai_names_and_events,
    openinference_names,
    spans_with_bad_ids_are_refused_alone,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_refused_and_empty_ones_accepted_sqlite() {
    bodies_refused_and_empty_ones_accepted(&TestDb::sqlite()).await;
}

/// Spans acknowledged before their root survive a restart: journaled before the `200`,
/// read back at the next start, finished when the root comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_waiting_for_their_root_survive_a_restart() {
    let db = TestDb::sqlite();
    let spool = tempfile::tempdir().expect("spool dir");
    let mut c = config();
    c.spool.dir = spool.path().to_path_buf();
    let t = Trace::new();
    let spans = genai_trace(&t);
    let (root, children): (Vec<Span>, Vec<Span>) = spans.into_iter().partition(|s| s.parent_span_id.is_empty());

    let app = spawn_app_keeping_spool(&db, c.clone()).await;
    let (status, _) = post_proto(&app, &request(vec![kv("k8s.cluster.name", s("prod-eu-1"))], children)).await;
    assert_eq!(status, 200);
    app.stop().await;
    assert_eq!(app_count(&db).await, 0);
    assert!(spool.path().join("otlp").join("journal.oaj").exists());

    let app = spawn_app_keeping_spool(&db, c).await;
    let (status, _) = post_proto(&app, &request(vec![], root)).await;
    assert_eq!(status, 200);
    let r = stored(&app, t.record_id()).await;
    assert_eq!(r.tool_calls.len(), 3);
    assert_eq!(r.thoughts.len(), 1);
    assert_eq!(r.cluster.as_deref(), Some("prod-eu-1"));
    assert_eq!(r.question, "why is web-1 crashlooping?");
    assert!(!r.attributes.contains_key("otlp.incomplete"));
    app.stop().await;
    assert_eq!(app_count(&db).await, 1);
    // A clean stop compacts the journal: nothing waits, only its header is left.
    let journal = spool.path().join("otlp").join("journal.oaj");
    assert_eq!(std::fs::metadata(journal).expect("journal").len(), 8);
}

/// A full buffer refuses the export whole with `503` and `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_answers_503_with_retry_after() {
    let db = TestDb::sqlite();
    let mut c = config();
    c.otlp.max_pending_spans = 2;
    let app = spawn_app_with(&db, c).await;
    let t = Trace::new();
    let children: Vec<Span> = (2..5).map(|i| t.span(i, Some(1), "execute_tool x", 0, 1, vec![])).collect();
    let response = post(&app, "/v1/traces", PROTOBUF, request(vec![], children).encode_to_vec(), false).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    app.stop().await;
}

/// A trace whose root never comes is audited after `trace_timeout`, marked incomplete,
/// its earliest span standing in for the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_without_its_root_is_audited_incomplete_after_the_timeout() {
    let db = TestDb::sqlite();
    let mut c = config();
    c.otlp.trace_timeout = Duration::from_millis(300);
    let app = spawn_app_with(&db, c).await;
    let t = Trace::new();
    let children: Vec<Span> = genai_trace(&t).into_iter().filter(|s| !s.parent_span_id.is_empty()).collect();
    let (status, _) = post_proto(&app, &request(vec![], children)).await;
    assert_eq!(status, 200);
    let r = stored(&app, t.record_id()).await;
    assert_eq!(r.attributes["otlp.incomplete"], true);
    assert_eq!(r.tool_calls.len(), 3);
    assert_eq!(r.model_name.as_deref(), Some("gpt-4o-2024-08-06"));
    app.stop().await;
}

/// A trace with more tool calls than `limits.max_tool_calls_per_record` is kept, cut to
/// the limit, the cut said in `attributes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_over_the_per_record_limits_is_cut_not_lost() {
    let db = TestDb::sqlite();
    let mut c = config();
    c.limits.max_tool_calls_per_record = 2;
    let app = spawn_app_with(&db, c).await;
    let t = Trace::new();
    let (status, _) = post_proto(&app, &request(vec![], genai_trace(&t))).await;
    assert_eq!(status, 200);
    let r = stored(&app, t.record_id()).await;
    assert_eq!(r.tool_calls.len(), 2);
    assert_eq!(r.attributes["otlp.tool_calls_omitted"], 1);
    app.stop().await;
}
