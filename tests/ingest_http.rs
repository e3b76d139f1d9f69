//! `POST /api/v1/interactions` over real HTTP on loopback: each bad input gets its status
//! code, error code and field; good records in a mixed request are stored; health and
//! readiness answer as documented.

mod common;

use common::{spawn_app, spawn_app_with, spawn_router, TestApp, TestDb};
use opsagent_audit::config::{AckMode, Config, LimitsConfig};
use opsagent_audit::pipeline::AuditLogger;
use opsagent_audit::store;
use serde_json::{json, Value};
use uuid::Uuid;

async fn post(app: &TestApp, content_type: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let mut request = app.client.post(app.url("/api/v1/interactions")).body(body);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {text}")))
}

async fn post_json(app: &TestApp, body: &Value) -> (u16, Value) {
    post(app, Some("application/json"), body.to_string()).await
}

fn record(question: &str) -> Value {
    json!({
        "interaction_id": Uuid::now_v7(),
        "session_id": "s-1",
        "user_id": "alice",
        "question": question,
        "model_name": "gpt-4o",
        "thoughts": [{"content": "first", "sequence_number": 1}, {"content": "second", "sequence_number": 2}],
        "tool_calls": [
            {"tool_name": "kubectl", "tool_input": "get pods", "tool_observation": "ok", "sequence_number": 1, "duration_ms": 5},
            {"tool_name": "shell", "tool_input": "df -h", "tool_observation": "full", "sequence_number": 2, "duration_ms": 7}
        ],
        "final_answer": "done",
        "total_duration_ms": 1200
    })
}

/// Asserts an error answer: status, `error.code` and `error.field`.
fn assert_error(answer: &(u16, Value), status: u16, code: &str, field: Option<&str>) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty(), "{body}");
    if let Some(field) = field {
        assert_eq!(body["error"]["field"], field, "{body}");
    }
}

async fn a_record_is_accepted_stored_and_read_back(db: &TestDb) {
    let app = spawn_app(db).await;
    let sent = record("why is web-1 crashlooping?");
    let (status, body) = post_json(&app, &sent).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!((body["accepted"].as_u64(), body["rejected"].as_u64()), (Some(1), Some(0)));
    let id = body["results"][0]["interaction_id"].as_str().expect("id").to_string();
    assert_eq!(id, sent["interaction_id"].as_str().unwrap());
    app.wait_for_count(1).await;
    let got: Value =
        app.client.get(app.url(&format!("/api/v1/interactions/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["question"], sent["question"]);
    assert_eq!(got["final_answer"], "done");
    let thoughts: Vec<&str> =
        got["thoughts"].as_array().unwrap().iter().map(|t| t["content"].as_str().unwrap()).collect();
    assert_eq!(thoughts, ["first", "second"]);
    let tools: Vec<&str> =
        got["tool_calls"].as_array().unwrap().iter().map(|t| t["tool_name"].as_str().unwrap()).collect();
    assert_eq!(tools, ["kubectl", "shell"]);
    app.stop().await;
}

async fn a_mixed_array_keeps_the_good_records(db: &TestDb) {
    let app = spawn_app(db).await;
    let body = json!([
        record("one"),
        {"user_id": "no question"},
        record("two"),
        {"question": "bad status", "status": "exploded"},
        record("three"),
    ]);
    let (status, answer) = post_json(&app, &body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!((answer["accepted"].as_u64(), answer["rejected"].as_u64()), (Some(3), Some(2)));
    let results = answer["results"].as_array().unwrap();
    let statuses: Vec<&str> = results.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["accepted", "rejected", "accepted", "rejected", "accepted"]);
    assert_eq!(results.iter().map(|r| r["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    assert_eq!(results[1]["error"]["field"], "question");
    assert_eq!(results[3]["error"]["field"], "status");
    app.wait_for_count(3).await;
    app.stop().await;
}

async fn ndjson_with_a_bad_line_keeps_the_good_ones(db: &TestDb) {
    let app = spawn_app(db).await;
    let body = format!("{}\n\n{{not json\n{}\n", record("a"), record("b"));
    let (status, answer) = post(&app, Some("application/x-ndjson"), body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!((answer["accepted"].as_u64(), answer["rejected"].as_u64()), (Some(2), Some(1)));
    assert!(answer["results"][1]["error"]["message"].as_str().unwrap().contains("line 3"), "{answer}");
    app.wait_for_count(2).await;
    app.stop().await;
}

async fn redelivery_over_http_is_stored_once(db: &TestDb) {
    let app = spawn_app(db).await;
    let sent = record("twice");
    for _ in 0..2 {
        assert_eq!(post_json(&app, &sent).await.0, 202);
    }
    assert_eq!(post_json(&app, &json!([sent, sent])).await.0, 202);
    app.wait_for_count(1).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.store.count_interactions().await.unwrap(), 1);
    app.stop().await;
}

async fn nul_bytes_and_invalid_utf8_are_replaced_not_refused(db: &TestDb) {
    let app = spawn_app(db).await;
    let mut with_nul = record("nul");
    with_nul["final_answer"] = json!("before\u{0}after");
    let nul_id = with_nul["interaction_id"].as_str().unwrap().to_string();
    assert_eq!(post_json(&app, &with_nul).await.0, 202);

    let utf8_id = Uuid::now_v7();
    let mut bytes = format!(r#"{{"interaction_id":"{utf8_id}","question":"bad "#).into_bytes();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(br#" bytes"}"#);
    let (status, answer) = post(&app, Some("application/json"), bytes).await;
    assert_eq!(status, 202, "{answer}");
    app.wait_for_count(2).await;
    let got = app.store.get_interaction(nul_id.parse().unwrap()).await.unwrap();
    let answer = got.final_answer.expect("answer kept");
    assert!(!answer.contains('\0') && answer.contains("before") && answer.contains("after"), "{answer:?}");
    let got = app.store.get_interaction(utf8_id).await.unwrap();
    assert!(got.question.contains('\u{FFFD}'), "{:?}", got.question);
    app.stop().await;
}

both_backends!(
    a_record_is_accepted_stored_and_read_back,
    a_mixed_array_keeps_the_good_records,
    ndjson_with_a_bad_line_keeps_the_good_ones,
    redelivery_over_http_is_stored_once,
    nul_bytes_and_invalid_utf8_are_replaced_not_refused,
);

#[tokio::test]
async fn each_invalid_field_is_named() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let cases = [
        (json!({"user_id": "u"}), "question"),
        (json!({"question": "q", "total_duration_ms": "abc"}), "total_duration_ms"),
        (json!({"question": "q", "total_duration_ms": -1}), "total_duration_ms"),
        (json!({"question": "q", "status": "exploded"}), "status"),
        (json!({"question": "q", "created_at": "yesterday"}), "created_at"),
        (json!({"question": "q", "tool_calls": [{"tool_name": "k", "duration_ms": -3}]}), "tool_calls[0].duration_ms"),
    ];
    for (body, field) in cases {
        assert_error(&post_json(&app, &body).await, 422, "invalid_record", Some(field));
    }
    assert_eq!(app.store.count_interactions().await.unwrap(), 0);
    app.stop().await;
}

#[tokio::test]
async fn unreadable_bodies_are_refused_whole() {
    let db = TestDb::sqlite();
    let mut config = common::fast_config();
    config.limits = LimitsConfig { max_body_bytes: 4096, max_records_per_request: 3, ..LimitsConfig::default() };
    let app = spawn_app_with(&db, config).await;
    assert_error(&post(&app, Some("application/json"), "x".repeat(5000)).await, 413, "body_too_large", None);
    let four = json!([record("1"), record("2"), record("3"), record("4")]);
    let four: Vec<Value> = four.as_array().unwrap().iter().map(|r| json!({"question": r["question"]})).collect();
    assert_error(&post_json(&app, &json!(four)).await, 413, "too_many_records", None);
    assert_error(&post(&app, Some("text/plain"), "{}").await, 415, "unsupported_media_type", Some("content-type"));
    assert_error(&post(&app, None, "{}").await, 415, "unsupported_media_type", Some("content-type"));
    assert_error(&post(&app, Some("application/json"), "{\"question\": ").await, 400, "malformed_json", None);
    assert_error(&post(&app, Some("application/json"), "42").await, 400, "malformed_json", None);
    assert_error(&post(&app, Some("application/json"), "[]").await, 400, "empty_body", None);
    assert_error(&post(&app, Some("application/x-ndjson"), "\n\n").await, 400, "empty_body", None);
    let (status, body) = post_json(&app, &json!([{"user_id": "a"}, {"user_id": "b"}])).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "all_rejected");
    assert_eq!(body["results"].as_array().unwrap().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn queued_acknowledgement_mode_also_stores_everything() {
    let db = TestDb::sqlite();
    let mut config = common::fast_config();
    config.pipeline.ack = AckMode::Queued;
    let app = spawn_app_with(&db, config).await;
    let body: Vec<Value> = (0..50).map(|i| record(&format!("q{i}"))).collect();
    let (status, answer) = post_json(&app, &json!(body)).await;
    assert_eq!((status, answer["accepted"].as_u64()), (202, Some(50)));
    app.wait_for_count(50).await;
    app.stop().await;
}

#[tokio::test]
async fn disabled_auditing_answers_503() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, Config { enabled: false, ..common::fast_config() }).await;
    assert_error(&post_json(&app, &record("q")).await, 503, "audit_disabled", None);
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let get = |path: &str| app.client.get(app.url(path)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert!(body["pipeline"]["accepted"].is_u64(), "counters are reported: {body}");
    let missing = get("/nope").await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["error"]["code"], "not_found");
    let unknown = get(&format!("/api/v1/interactions/{}", Uuid::now_v7())).await.unwrap();
    assert_eq!(unknown.status(), 404);
    app.stop().await;

    // A database without the schema is not ready.
    let bare = TestDb::sqlite();
    let store = store::connect(&bare.url, &Config::default().database).await.unwrap();
    let config = common::fast_config();
    let logger = AuditLogger::start(store.clone(), &config.pipeline, &config.limits);
    let app = spawn_router(store, logger, config).await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "migrations_pending");
    assert!(!body["pending_migrations"].as_array().unwrap().is_empty());
    app.stop().await;
}
