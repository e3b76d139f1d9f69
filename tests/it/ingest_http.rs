//! `POST /api/v1/interactions` over real HTTP on loopback: each bad input gets its status
//! code, error code and field; good records in a mixed request are stored; health and
//! readiness answer as documented.
//!
//! Tests that store records run on both backends (`both_backends!`); tests that only
//! exercise validation and framing run on SQLite.

use std::time::Duration;

use crate::common::{spawn_app, spawn_app_with, spawn_router, TestApp, TestDb};
use chrono::{DateTime, Utc};
use opsagent_audit::config::{AckMode, Config, LimitsConfig};
use opsagent_audit::model::{Status, TRUNCATION_MARKER};
use opsagent_audit::pipeline::AuditLogger;
use opsagent_audit::store;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const INGEST: &str = "/api/v1/interactions";

/// Posts `body` with the given content type (none when `None`); returns status and JSON body.
async fn post(app: &TestApp, content_type: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let mut request = app.client.post(app.url(INGEST)).body(body);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.send().await.expect("send the ingest request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("read the ingest answer");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer is not JSON ({e}), status {status}: {text:?}")),
    )
}

async fn post_json(app: &TestApp, body: &Value) -> (u16, Value) {
    post(app, Some("application/json"), body.to_string()).await
}

/// GETs a path; returns status and JSON body.
async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let response = app.client.get(app.url(path)).send().await.expect("send the GET request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("read the GET answer");
    (
        status,
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: answer is not JSON ({e}), status {status}: {text:?}")),
    )
}

/// A complete, valid record with a fresh UUID `interaction_id`.
fn record(question: &str) -> Value {
    json!({
        "interaction_id": Uuid::now_v7(),
        "session_id": Uuid::now_v7(),
        "user_id": "alice",
        "client_ip": "10.0.0.7",
        "user_agent": "curl/8",
        "created_at": "2026-11-24T12:00:00.123+02:00",
        "endpoint": "/api/diagnose",
        "question": question,
        "model_name": "gpt-4o",
        "provider": "openai",
        "base_url": "https://api.openai.com/v1",
        "cluster": "prod-east",
        "thoughts": [
            {"content": "first look at the pod", "sequence_number": 1},
            {"content": "then at its events", "sequence_number": 2},
            {"content": "it was OOM killed", "sequence_number": 3}
        ],
        "tool_calls": [
            {"tool_name": "kubectl", "tool_input": "get pods", "tool_observation": "web-1 CrashLoopBackOff",
             "sequence_number": 1, "duration_ms": 5, "thought_sequence_number": 1},
            {"tool_name": "shell", "tool_input": "df -h", "tool_observation": "disk full",
             "sequence_number": 2, "duration_ms": 7, "thought_sequence_number": 2, "error": "exit 1"},
            {"tool_name": "trivy", "tool_input": "image web:1", "sequence_number": 3, "duration_ms": 0}
        ],
        "final_answer": "raise the memory limit",
        "status": "error",
        "error": "partial",
        "http_status": 200,
        "total_duration_ms": 1200,
        "assistant_duration_ms": 1000,
        "parse_duration_ms": 12,
        "metrics": {"llm_first_token_ms": 800},
        "input_tokens": 1200,
        "output_tokens": 300,
        "attributes": {"team": "sre", "nested": {"list": [1, 2, 3]}}
    })
}

/// The smallest valid record.
fn minimal(question: &str) -> Value {
    json!({"interaction_id": Uuid::now_v7(), "question": question})
}

fn id_of(record: &Value) -> String {
    record["interaction_id"].as_str().expect("record has a string interaction_id").to_string()
}

/// Asserts an error answer: status, `error.code`, a message, and `error.field`
/// (`None`: no field is named).
#[track_caller]
fn assert_error(answer: &(u16, Value), status: u16, code: &str, field: Option<&str>) {
    let (got, body) = answer;
    assert_eq!(*got, status, "status of {body}");
    assert_eq!(body["error"]["code"], code, "code of {body}");
    assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty(), "message of {body}");
    match field {
        Some(field) => assert_eq!(body["error"]["field"], field, "field of {body}"),
        None => assert!(body["error"]["field"].is_null(), "no field expected in {body}"),
    }
}

/// `(accepted, rejected)` of an ingest answer.
fn counts(answer: &Value) -> (u64, u64) {
    (
        answer["accepted"].as_u64().unwrap_or_else(|| panic!("no accepted count in {answer}")),
        answer["rejected"].as_u64().unwrap_or_else(|| panic!("no rejected count in {answer}")),
    )
}

fn results(answer: &Value) -> &Vec<Value> {
    answer["results"].as_array().unwrap_or_else(|| panic!("no results in {answer}"))
}

/// Sends a raw HTTP/1.1 request and returns the status code and body of the answer.
/// For what reqwest (without its `stream` feature) cannot send: chunked bodies.
async fn raw_request(app: &TestApp, head: &str, body: &[u8]) -> (u16, String) {
    let addr = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the server");
    // The server may answer and close before reading all of a body it refuses.
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    // Read until the server closes; a reset after the answer (unread request bytes) ends it too.
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if !answer.is_empty() => {
                    eprintln!("connection ended with {e} after the answer");
                    break;
                }
                Err(e) => panic!("no answer from the server: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the server answers and closes within 10 s");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

// ---------------------------------------------------------------------------------------
// Storage-touching tests, on both backends.
// ---------------------------------------------------------------------------------------

async fn a_record_is_accepted_stored_and_read_back(db: &TestDb) {
    let app = spawn_app(db).await;
    let sent = record("why is web-1 crashlooping?");
    let id = id_of(&sent);
    let (status, answer) = post_json(&app, &sent).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(counts(&answer), (1, 0), "{answer}");
    assert_eq!(results(&answer).len(), 1, "{answer}");
    assert_eq!(answer["results"][0]["index"], 0, "{answer}");
    assert_eq!(answer["results"][0]["status"], "accepted", "{answer}");
    assert_eq!(answer["results"][0]["interaction_id"], id.as_str(), "{answer}");
    assert!(answer["results"][0]["error"].is_null(), "{answer}");

    app.wait_for_count(1).await;
    let (status, got) = get(&app, &format!("{INGEST}/{id}")).await;
    assert_eq!(status, 200, "{got}");
    for key in [
        "interaction_id",
        "session_id",
        "user_id",
        "client_ip",
        "user_agent",
        "endpoint",
        "question",
        "model_name",
        "provider",
        "base_url",
        "cluster",
        "final_answer",
        "status",
        "error",
        "http_status",
        "total_duration_ms",
        "assistant_duration_ms",
        "parse_duration_ms",
        "metrics",
        "input_tokens",
        "output_tokens",
        "attributes",
    ] {
        assert_eq!(got[key], sent[key], "field {key} read back differs: {got}");
    }
    // `created_at` is the time the producer sent (converted to UTC), not the time received.
    let created: DateTime<Utc> =
        serde_json::from_value(got["created_at"].clone()).expect("created_at read back is a date-time");
    let expected: DateTime<Utc> = "2026-11-24T10:00:00.123Z".parse().expect("expected date");
    assert_eq!(created, expected, "{got}");
    // Thoughts and tool calls keep their order and their details.
    let thoughts: Vec<(&str, i64)> = got["thoughts"]
        .as_array()
        .expect("thoughts is an array")
        .iter()
        .map(|t| (t["content"].as_str().expect("thought content"), t["sequence_number"].as_i64().expect("seq")))
        .collect();
    assert_eq!(thoughts, [("first look at the pod", 1), ("then at its events", 2), ("it was OOM killed", 3)]);
    let tools = got["tool_calls"].as_array().expect("tool_calls is an array");
    let names: Vec<&str> = tools.iter().map(|t| t["tool_name"].as_str().expect("tool name")).collect();
    assert_eq!(names, ["kubectl", "shell", "trivy"], "{got}");
    for (i, sent_tool) in sent["tool_calls"].as_array().expect("sent tool calls").iter().enumerate() {
        for key in ["tool_input", "sequence_number", "duration_ms"] {
            assert_eq!(tools[i][key], sent_tool[key], "tool_calls[{i}].{key}: {got}");
        }
    }
    assert_eq!(tools[1]["error"], "exit 1", "{got}");
    assert_eq!(tools[1]["tool_observation"], "disk full", "{got}");
    assert!(tools[2]["tool_observation"].is_null(), "{got}");
    app.stop().await;
}

async fn a_minimal_record_gets_ids_and_defaults(db: &TestDb) {
    let app = spawn_app(db).await;
    let before = Utc::now();
    let (status, answer) = post_json(&app, &json!({"question": "only a question"})).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["results"][0]["interaction_id"].as_str().expect("a generated interaction_id").to_string();
    Uuid::parse_str(&id).expect("the generated id is a UUID");
    app.wait_for_count(1).await;
    let (status, got) = get(&app, &format!("{INGEST}/{id}")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["question"], "only a question");
    assert_eq!(got["status"], Status::Success.as_str());
    assert!(got["thoughts"].as_array().is_some_and(Vec::is_empty), "{got}");
    assert!(got["tool_calls"].as_array().is_some_and(Vec::is_empty), "{got}");
    let created: DateTime<Utc> = serde_json::from_value(got["created_at"].clone()).expect("created_at");
    assert!(created >= before - chrono::Duration::seconds(1) && created <= Utc::now(), "{created}");
    app.stop().await;
}

async fn non_uuid_ids_are_mapped_and_readable_by_their_key(db: &TestDb) {
    let app = spawn_app(db).await;
    let key = format!("req-{}", Uuid::now_v7().simple());
    let (status, answer) =
        post_json(&app, &json!({"interaction_id": key, "session_id": "conv-7", "question": "keyed"})).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["results"][0]["interaction_id"].as_str().expect("mapped id").to_string();
    assert_ne!(id, key);
    Uuid::parse_str(&id).expect("the mapped id is a UUID");
    app.wait_for_count(1).await;
    // Readable by the mapped UUID and by the producer's own key.
    for path in [format!("{INGEST}/{id}"), format!("{INGEST}/{key}")] {
        let (status, got) = get(&app, &path).await;
        assert_eq!(status, 200, "{path}: {got}");
        assert_eq!(got["interaction_id"], id.as_str(), "{got}");
        assert_eq!(got["attributes"]["source_interaction_id"], key.as_str(), "{got}");
        assert_eq!(got["attributes"]["source_session_id"], "conv-7", "{got}");
    }
    app.stop().await;
}

async fn a_mixed_array_keeps_the_good_records(db: &TestDb) {
    let app = spawn_app(db).await;
    let good = [record("one"), record("two"), record("three")];
    let bad_question = json!({"interaction_id": Uuid::now_v7(), "user_id": "no question"});
    let bad_status = json!({"interaction_id": Uuid::now_v7(), "question": "bad status", "status": "exploded"});
    let body = json!([good[0], bad_question, good[1], bad_status, good[2]]);
    let (status, answer) = post_json(&app, &body).await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer["error"].is_null(), "a partly good request is not an error: {answer}");
    assert_eq!(counts(&answer), (3, 2), "{answer}");
    let results = results(&answer);
    assert_eq!(results.len(), 5, "{answer}");
    let indexes: Vec<u64> = results.iter().map(|r| r["index"].as_u64().expect("index")).collect();
    assert_eq!(indexes, [0, 1, 2, 3, 4], "results are in request order");
    let statuses: Vec<&str> = results.iter().map(|r| r["status"].as_str().expect("status")).collect();
    assert_eq!(statuses, ["accepted", "rejected", "accepted", "rejected", "accepted"]);
    for (result, sent) in [(&results[0], &good[0]), (&results[2], &good[1]), (&results[4], &good[2])] {
        assert_eq!(result["interaction_id"], sent["interaction_id"], "{answer}");
        assert!(result["error"].is_null(), "{answer}");
    }
    for (i, field) in [(1, "question"), (3, "status")] {
        assert!(results[i]["interaction_id"].is_null(), "{answer}");
        assert_eq!(results[i]["error"]["code"], "invalid_record", "{answer}");
        assert_eq!(results[i]["error"]["field"], field, "{answer}");
    }
    app.wait_for_count(3).await;
    for sent in &good {
        let (status, got) = get(&app, &format!("{INGEST}/{}", id_of(sent))).await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["question"], sent["question"]);
    }
    for sent in [&bad_question, &bad_status] {
        let (status, got) = get(&app, &format!("{INGEST}/{}", id_of(sent))).await;
        assert_eq!(status, 404, "a rejected record must not be stored: {got}");
    }
    app.stop().await;
}

async fn ndjson_with_bad_and_blank_lines_keeps_the_good_ones(db: &TestDb) {
    let app = spawn_app(db).await;
    let (a, b, c) = (minimal("a"), minimal("b"), minimal("c"));
    // Physical lines: 1 a, 2 blank, 3 not JSON, 4 b (CRLF), 5 spaces only, 6 bad field, 7 c, no final newline.
    let body = format!(
        "{a}\n\n{{not json\n{b}\r\n   \n{}\n{c}",
        json!({"question": "q", "tool_calls": [{"tool_name": "k", "duration_ms": "slow"}]})
    );
    let (status, answer) = post(&app, Some("application/x-ndjson"), body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(counts(&answer), (3, 2), "{answer}");
    let results = results(&answer);
    // Blank lines are not records; indexes count records.
    let summary: Vec<(u64, &str)> =
        results.iter().map(|r| (r["index"].as_u64().expect("index"), r["status"].as_str().expect("status"))).collect();
    assert_eq!(summary, [(0, "accepted"), (1, "rejected"), (2, "accepted"), (3, "rejected"), (4, "accepted")]);
    assert_eq!(results[0]["interaction_id"], a["interaction_id"]);
    assert_eq!(results[2]["interaction_id"], b["interaction_id"]);
    assert_eq!(results[4]["interaction_id"], c["interaction_id"]);
    // The unparseable line is named by its physical line number.
    let message = results[1]["error"]["message"].as_str().expect("message of the bad line");
    assert!(message.contains("line 3"), "{answer}");
    assert_eq!(results[3]["error"]["field"], "tool_calls[0].duration_ms", "{answer}");
    app.wait_for_count(3).await;
    for sent in [&a, &b, &c] {
        let (status, got) = get(&app, &format!("{INGEST}/{}", id_of(sent))).await;
        assert_eq!((status, &got["question"]), (200, &sent["question"]), "{got}");
    }
    app.stop().await;
}

async fn redelivery_over_http_is_stored_once(db: &TestDb) {
    let app = spawn_app(db).await;
    let sent = record("twice");
    let id = id_of(&sent);
    for _ in 0..2 {
        let (status, answer) = post_json(&app, &sent).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["results"][0]["interaction_id"], id.as_str());
    }
    app.wait_for_count(1).await;
    // The same record twice in one request, and again as NDJSON.
    let (status, answer) = post_json(&app, &json!([sent, sent])).await;
    assert_eq!((status, counts(&answer)), (202, (2, 0)), "{answer}");
    let (status, answer) = post(&app, Some("application/x-ndjson"), format!("{sent}\n{sent}\n")).await;
    assert_eq!((status, counts(&answer)), (202, (2, 0)), "{answer}");
    // Something else after them: once it is stored, the pipeline has passed the repeats.
    let marker = minimal("marker");
    assert_eq!(post_json(&app, &marker).await.0, 202);
    app.wait_for_count(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.store.count_interactions().await.expect("count"), 2);
    let (status, got) = get(&app, &format!("{INGEST}/{id}")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["tool_calls"].as_array().map(Vec::len), Some(3), "children are not duplicated: {got}");
    assert_eq!(got["thoughts"].as_array().map(Vec::len), Some(3), "children are not duplicated: {got}");
    app.stop().await;
}

async fn nul_bytes_and_invalid_utf8_are_replaced_not_refused(db: &TestDb) {
    let app = spawn_app(db).await;
    let mut with_nul = record("nul\u{0}question");
    with_nul["final_answer"] = json!("before\u{0}after");
    with_nul["thoughts"][0]["content"] = json!("thought\u{0}");
    with_nul["tool_calls"][0]["tool_observation"] = json!("\u{0}observed");
    with_nul["attributes"] = json!({"key\u{0}": ["x\u{0}y"]});
    with_nul["metrics"] = json!({"m\u{0}": 1});
    let nul_id = id_of(&with_nul);
    let body = with_nul.to_string();
    assert!(body.contains("\\u0000"), "the JSON text carries the NUL as an escape");
    let (status, answer) = post(&app, Some("application/json"), body).await;
    assert_eq!(status, 202, "{answer}");

    let utf8_id = Uuid::now_v7();
    let mut bytes = format!(r#"{{"interaction_id":"{utf8_id}","question":"bad "#).into_bytes();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(br#" bytes","final_answer":"cut "#);
    bytes.extend_from_slice(&"é".as_bytes()[..1]);
    bytes.extend_from_slice(br#""}"#);
    let (status, answer) = post(&app, Some("application/json"), bytes).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["results"][0]["interaction_id"], utf8_id.to_string());

    app.wait_for_count(2).await;
    let (status, got) = get(&app, &format!("{INGEST}/{nul_id}")).await;
    assert_eq!(status, 200, "{got}");
    let text = got.to_string();
    assert!(!text.contains("\\u0000"), "a NUL was stored: {got}");
    assert_eq!(got["question"], "nul\u{FFFD}question");
    assert_eq!(got["final_answer"], "before\u{FFFD}after");
    assert_eq!(got["thoughts"][0]["content"], "thought\u{FFFD}");
    assert_eq!(got["tool_calls"][0]["tool_observation"], "\u{FFFD}observed");
    assert_eq!(got["attributes"]["key\u{FFFD}"], json!(["x\u{FFFD}y"]), "{got}");
    assert_eq!(got["metrics"]["m\u{FFFD}"], 1, "{got}");

    let got = app.store.get_interaction(utf8_id).await.expect("the invalid UTF-8 record is stored");
    assert_eq!(got.question, "bad \u{FFFD}\u{FFFD} bytes");
    assert_eq!(got.final_answer.as_deref(), Some("cut \u{FFFD}"));
    app.stop().await;
}

async fn oversized_fields_are_truncated_with_a_marker(db: &TestDb) {
    let mut config = crate::common::fast_config();
    config.limits.max_field_bytes = 100;
    let app = spawn_app_with(db, config).await;
    let mut sent = minimal("short question");
    sent["final_answer"] = json!("é".repeat(300)); // 600 bytes
    sent["tool_calls"] = json!([{"tool_name": "kubectl", "tool_observation": "x".repeat(1000)}]);
    let (status, answer) = post_json(&app, &sent).await;
    assert_eq!(status, 202, "{answer}");
    app.wait_for_count(1).await;
    let (status, got) = get(&app, &format!("{INGEST}/{}", id_of(&sent))).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["question"], "short question");
    let answer = got["final_answer"].as_str().expect("final_answer kept");
    assert!(answer.starts_with(&"é".repeat(50)) && answer.contains(TRUNCATION_MARKER), "{answer}");
    assert!(answer.ends_with("500 bytes]"), "{answer}");
    let observation = got["tool_calls"][0]["tool_observation"].as_str().expect("observation kept");
    assert!(observation.starts_with(&"x".repeat(100)) && observation.ends_with("900 bytes]"), "{observation}");
    app.stop().await;
}

async fn queued_acknowledgement_mode_also_stores_everything(db: &TestDb) {
    let mut config = crate::common::fast_config();
    config.pipeline.ack = AckMode::Queued;
    let app = spawn_app_with(db, config).await;
    let body: Vec<Value> = (0..50).map(|i| minimal(&format!("q{i}"))).collect();
    let (status, answer) = post_json(&app, &json!(body)).await;
    assert_eq!((status, counts(&answer)), (202, (50, 0)), "{answer}");
    app.wait_for_count(50).await;
    for sent in body.iter().step_by(10) {
        let got = app
            .store
            .get_interaction(id_of(sent).parse().expect("uuid"))
            .await
            .expect("each acknowledged record is stored");
        assert_eq!(got.question, sent["question"].as_str().expect("question"));
    }
    app.stop().await;
}

async fn readiness_follows_migrations(db: &TestDb) {
    // A database without the schema is not ready.
    let store = store::connect(&db.url, &Config::default().database).await.expect("open the store unmigrated");
    let config = crate::common::fast_config();
    let logger = AuditLogger::start(store.clone(), &config.pipeline, &config.limits);
    let app = spawn_router(store.clone(), logger, config).await;
    let (status, body) = get(&app, "/healthz").await;
    assert_eq!((status, &body["status"]), (200, &json!("ok")), "liveness does not need the schema: {body}");
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "migrations_pending", "{body}");
    assert!(body["pending_migrations"].as_array().is_some_and(|p| !p.is_empty()), "{body}");
    assert!(body["hint"].as_str().is_some_and(|h| h.contains("migrate")), "{body}");
    // Once migrated, the same server is ready.
    store.migrate().await.expect("migrate");
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready", "{body}");
    assert!(body["pipeline"]["accepted"].is_u64(), "the pipeline counters are reported: {body}");
    app.stop().await;
}

both_backends!(
    a_record_is_accepted_stored_and_read_back,
    a_minimal_record_gets_ids_and_defaults,
    non_uuid_ids_are_mapped_and_readable_by_their_key,
    a_mixed_array_keeps_the_good_records,
    ndjson_with_bad_and_blank_lines_keeps_the_good_ones,
    redelivery_over_http_is_stored_once,
    nul_bytes_and_invalid_utf8_are_replaced_not_refused,
    oversized_fields_are_truncated_with_a_marker,
    queued_acknowledgement_mode_also_stores_everything,
    readiness_follows_migrations,
);

// ---------------------------------------------------------------------------------------
// Validation and framing, on SQLite.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn each_invalid_field_is_named() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let q = |extra: Value| {
        let mut r = json!({"question": "q"});
        for (k, v) in extra.as_object().expect("object") {
            r[k] = v.clone();
        }
        r
    };
    let cases = [
        // Missing, empty, wrong type for the one required field.
        (json!({"user_id": "u"}), "question"),
        (json!({"question": "   "}), "question"),
        (json!({"question": 5}), "question"),
        // Wrong types and out-of-range numbers at the top level.
        (q(json!({"total_duration_ms": "abc"})), "total_duration_ms"),
        (q(json!({"total_duration_ms": -1})), "total_duration_ms"),
        (q(json!({"assistant_duration_ms": -0.5e3})), "assistant_duration_ms"),
        (q(json!({"parse_duration_ms": true})), "parse_duration_ms"),
        (q(json!({"input_tokens": -3})), "input_tokens"),
        (q(json!({"output_tokens": 1e300})), "output_tokens"),
        (q(json!({"http_status": 42})), "http_status"),
        (q(json!({"interaction_id": 7})), "interaction_id"),
        (q(json!({"attributes": [1, 2]})), "attributes"),
        (q(json!({"metrics": {"llm_first_token_ms": -8}})), "metrics.llm_first_token_ms"),
        // Enumerations and dates.
        (q(json!({"status": "exploded"})), "status"),
        (q(json!({"status": "SUCCESS"})), "status"),
        (q(json!({"created_at": "yesterday"})), "created_at"),
        (q(json!({"created_at": "2026-13-01T00:00:00Z"})), "created_at"),
        (q(json!({"created_at": "2026-11-24 10:00:00"})), "created_at"),
        // Unknown keys (typos) are named, not ignored.
        (q(json!({"qestion": "typo"})), "qestion"),
        // Nested: the path of the offending field.
        (q(json!({"tool_calls": [{"tool_name": "k", "duration_ms": -3}]})), "tool_calls[0].duration_ms"),
        (
            q(json!({"tool_calls": [{"tool_name": "k"}, {"tool_name": "s", "duration_ms": "abc"}]})),
            "tool_calls[1].duration_ms",
        ),
        (q(json!({"tool_calls": [{"tool_input": "get pods"}]})), "tool_calls[0].tool_name"),
        (q(json!({"tool_calls": [{"tool_name": "k", "bogus": 1}]})), "tool_calls[0].bogus"),
        (
            q(json!({"tool_calls": [{"tool_name": "k", "thought_sequence_number": -1}]})),
            "tool_calls[0].thought_sequence_number",
        ),
        (
            q(json!({"tool_calls": [{"tool_name": "k", "sequence_number": 3_000_000_000_u64}]})),
            "tool_calls[0].sequence_number",
        ),
        (q(json!({"tool_calls": {"tool_name": "k"}})), "tool_calls"),
        (q(json!({"thoughts": [{"content": "a"}, {"sequence_number": 2}]})), "thoughts[1].content"),
        (q(json!({"thoughts": [{"content": "a", "sequence_number": -2}]})), "thoughts[0].sequence_number"),
        (q(json!({"thoughts": "one long thought"})), "thoughts"),
    ];
    for (body, field) in &cases {
        let answer = post_json(&app, body).await;
        assert_error(&answer, 422, "invalid_record", Some(field));
        // One record sent alone: the error answer, not per-record results.
        assert!(answer.1.get("results").is_none(), "{}", answer.1);
    }
    assert_eq!(app.store.count_interactions().await.expect("count"), 0, "nothing invalid is stored");
    assert_eq!(app.logger.snapshot().accepted, 0, "nothing invalid reached the pipeline");
    app.stop().await;
}

#[tokio::test]
async fn every_documented_status_is_accepted() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let body: Vec<Value> = Status::ALL
        .iter()
        .map(|s| json!({"question": "q", "status": s.as_str(), "created_at": "2026-11-24T10:00:00Z"}))
        .collect();
    let (status, answer) = post_json(&app, &json!(body)).await;
    assert_eq!((status, counts(&answer)), (202, (4, 0)), "{answer}");
    app.wait_for_count(4).await;
    for (result, s) in results(&answer).iter().zip(Status::ALL) {
        let id: Uuid = result["interaction_id"].as_str().expect("id").parse().expect("uuid");
        assert_eq!(app.store.get_interaction(id).await.expect("stored").status, s);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_request_whose_every_record_is_bad_is_422_with_results() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let (status, answer) =
        post_json(&app, &json!([{"user_id": "a"}, {"question": "q", "status": "nope"}, 42, {"question": ""}])).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "all_rejected", "{answer}");
    assert_eq!(counts(&answer), (0, 4), "{answer}");
    let results = results(&answer);
    let fields: Vec<&Value> = results.iter().map(|r| &r["error"]["field"]).collect();
    assert_eq!(fields, [&json!("question"), &json!("status"), &Value::Null, &json!("question")], "{answer}");
    assert!(results.iter().all(|r| r["status"] == "rejected" && r["interaction_id"].is_null()), "{answer}");
    assert!(results[2]["error"]["message"].as_str().is_some_and(|m| m.contains("object")), "{answer}");

    // One bad record in an array is still answered with results, not as a bare error.
    let (status, answer) = post_json(&app, &json!([{"question": "q", "total_duration_ms": -1}])).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "all_rejected", "{answer}");
    assert_eq!(answer["results"][0]["error"]["field"], "total_duration_ms", "{answer}");

    // NDJSON with nothing good either.
    let (status, answer) = post(&app, Some("application/x-ndjson"), "{\"user_id\": \"a\"}\n[1]\n").await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(counts(&answer), (0, 2), "{answer}");
    assert_eq!(app.store.count_interactions().await.expect("count"), 0);
    app.stop().await;
}

#[tokio::test]
async fn body_and_record_count_limits() {
    let db = TestDb::sqlite();
    let mut config = crate::common::fast_config();
    config.limits = LimitsConfig { max_body_bytes: 4096, max_records_per_request: 3, ..LimitsConfig::default() };
    let app = spawn_app_with(&db, config).await;

    // A body of exactly the limit is read; one byte more is refused whole.
    let exact = {
        let r = minimal("at the limit").to_string();
        format!("{r}{}", " ".repeat(4096 - r.len()))
    };
    assert_eq!(exact.len(), 4096);
    let (status, answer) = post(&app, Some("application/json"), exact.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let over = format!("{exact} ");
    let answer = post(&app, Some("application/json"), over).await;
    assert_error(&answer, 413, "body_too_large", None);
    assert!(answer.1["error"]["message"].as_str().is_some_and(|m| m.contains("4096")), "{}", answer.1);
    // Not even valid JSON is needed to be refused for size: the size is checked first.
    assert_error(&post(&app, Some("application/json"), "x".repeat(5000)).await, 413, "body_too_large", None);
    assert_error(&post(&app, Some("application/x-ndjson"), "x".repeat(5000)).await, 413, "body_too_large", None);

    // Record count: three are fine, four are refused, as JSON and as NDJSON.
    let three: Vec<Value> = (0..3).map(|i| minimal(&format!("q{i}"))).collect();
    let (status, answer) = post_json(&app, &json!(three)).await;
    assert_eq!((status, counts(&answer)), (202, (3, 0)), "{answer}");
    let four: Vec<Value> = (0..4).map(|i| json!({"question": format!("q{i}")})).collect();
    let answer = post_json(&app, &json!(four)).await;
    assert_error(&answer, 413, "too_many_records", None);
    assert!(answer.1["results"].is_null(), "nothing of a refused request is taken: {}", answer.1);
    let ndjson: String = four.iter().map(|r| format!("{r}\n")).collect();
    assert_error(&post(&app, Some("application/x-ndjson"), ndjson).await, 413, "too_many_records", None);

    app.wait_for_count(4).await;
    assert_eq!(app.logger.snapshot().accepted, 4, "refused requests did not reach the pipeline");
    app.stop().await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_while_reading() {
    let db = TestDb::sqlite();
    let mut config = crate::common::fast_config();
    config.limits.max_body_bytes = 4096;
    let app = spawn_app_with(&db, config).await;
    let head = "POST /api/v1/interactions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";

    // No Content-Length to check up front: the limit applies while the body is read.
    let mut body = Vec::new();
    for _ in 0..5 {
        body.extend_from_slice(format!("{:x}\r\n{}\r\n", 1000, " ".repeat(1000)).as_bytes());
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let (status, text) = raw_request(&app, head, &body).await;
    let answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    assert_error(&(status, answer), 413, "body_too_large", None);

    // A small chunked body is read and accepted.
    let record = minimal("chunked").to_string();
    let body = format!("{:x}\r\n{record}\r\n0\r\n\r\n", record.len());
    let (status, text) = raw_request(&app, head, body.as_bytes()).await;
    assert_eq!(status, 202, "{text}");
    app.wait_for_count(1).await;
    app.stop().await;
}

#[tokio::test]
async fn content_types() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let body = minimal("q").to_string();
    for refused in [Some("text/plain"), None, Some("application/xml"), Some("application/jsonx"), Some("")] {
        let answer = post(&app, refused, body.clone()).await;
        assert_error(&answer, 415, "unsupported_media_type", Some("content-type"));
    }
    for accepted in ["application/json; charset=utf-8", "Application/JSON", " application/json "] {
        let (status, answer) = post(&app, Some(accepted), minimal("q").to_string()).await;
        assert_eq!(status, 202, "{accepted}: {answer}");
    }
    for ndjson in ["application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"] {
        // Two records on two lines: only line framing reads this as two records.
        let two = format!("{}\n{}\n", minimal("n1"), minimal("n2"));
        let (status, answer) = post(&app, Some(ndjson), two).await;
        assert_eq!((status, counts(&answer)), (202, (2, 0)), "{ndjson}: {answer}");
    }
    // NDJSON sent as application/json is not valid JSON.
    let two = format!("{}\n{}\n", minimal("n1"), minimal("n2"));
    assert_error(&post(&app, Some("application/json"), two).await, 400, "malformed_json", None);
    app.wait_for_count(3 + 8).await;
    app.stop().await;
}

#[tokio::test]
async fn unreadable_bodies_are_refused_whole() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let json = Some("application/json");
    assert_error(&post(&app, json, "{\"question\": ").await, 400, "malformed_json", None);
    assert_error(&post(&app, json, "[{\"question\": \"a\"}, {\"question\": }]").await, 400, "malformed_json", None);
    assert_error(&post(&app, json, "{\"question\": \"a\"} trailing").await, 400, "malformed_json", None);
    for scalar in ["42", "\"a record\"", "null", "true"] {
        assert_error(&post(&app, json, scalar).await, 400, "malformed_json", None);
    }
    assert_error(&post(&app, json, "[]").await, 400, "empty_body", None);
    assert_error(&post(&app, Some("application/x-ndjson"), "").await, 400, "empty_body", None);
    assert_error(&post(&app, Some("application/x-ndjson"), "\n\n  \r\n").await, 400, "empty_body", None);
    // An empty JSON body is not JSON at all.
    let (status, answer) = post(&app, json, "").await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        ["empty_body", "malformed_json"].contains(&answer["error"]["code"].as_str().unwrap_or_default()),
        "{answer}"
    );
    let (status, answer) = post(&app, json, "  \n ").await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(app.logger.snapshot().accepted, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_chunked_encoding_is_a_400_json_error() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let head = "POST /api/v1/interactions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let (status, text) = raw_request(&app, head, b"zz\r\n{}\r\n0\r\n\r\n").await;
    let answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    assert_error(&(status, answer), 400, "body_unreadable", None);
    assert_eq!(app.logger.snapshot().accepted, 0);
    app.stop().await;
}

#[tokio::test]
async fn disabled_auditing_answers_503() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, Config { enabled: false, ..crate::common::fast_config() }).await;
    assert_error(&post_json(&app, &minimal("q")).await, 503, "audit_disabled", None);
    let answer = post(&app, Some("application/x-ndjson"), format!("{}\n", minimal("q"))).await;
    assert_error(&answer, 503, "audit_disabled", None);
    // Disabled wins over everything else wrong with the request.
    assert_error(&post(&app, Some("text/plain"), "junk").await, 503, "audit_disabled", None);
    // The process is alive all the same.
    let (status, _) = get(&app, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(app.store.count_interactions().await.expect("count"), 0);
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let (status, body) = get(&app, "/healthz").await;
    assert_eq!((status, &body["status"]), (200, &json!("ok")), "{body}");
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!((status, &body["status"]), (200, &json!("ready")), "{body}");
    assert!(body["pipeline"]["accepted"].is_u64(), "counters are reported: {body}");

    for path in ["/nope", "/api/v1/nope", "/api/v2/interactions", "/healthz/extra"] {
        let answer = get(&app, path).await;
        assert_error(&answer, 404, "not_found", None);
    }
    let response = app.client.post(app.url("/nope")).json(&minimal("q")).send().await.expect("POST unknown path");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("404 body is JSON");
    assert_eq!(body["error"]["code"], "not_found", "{body}");

    // An interaction that does not exist, by UUID and by producer key.
    for key in [Uuid::now_v7().to_string(), "no-such-key".to_string()] {
        assert_error(&get(&app, &format!("{INGEST}/{key}")).await, 404, "not_found", None);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_wrong_method_on_a_known_path_is_a_json_error() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    for (method, path) in [(reqwest::Method::PUT, INGEST.to_string()), (reqwest::Method::DELETE, format!("{INGEST}/x"))]
    {
        let response = app.client.request(method.clone(), app.url(&path)).send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        assert_eq!(status, 405, "{method} {path}: {text}");
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: 405 body is not JSON ({e}): {text:?}"));
        assert!(body["error"]["code"].is_string(), "{body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_lone_surrogate_escape_is_replaced_not_refused() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let good = minimal("good");
    let bad_id = Uuid::now_v7();
    let body = format!(r#"[{good}, {{"interaction_id": "{bad_id}", "question": "tool said \udcff here"}}]"#);
    let (status, answer) = post(&app, Some("application/json"), body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(counts(&answer), (2, 0), "{answer}");
    app.wait_for_count(2).await;
    let got = app.store.get_interaction(bad_id).await.expect("the record is stored");
    assert_eq!(got.question, "tool said \u{FFFD} here");
    app.stop().await;
}
