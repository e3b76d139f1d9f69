//! Input limits (`audit.limits.*`) over real HTTP on loopback: per-record limits reject
//! the record alone (`422`, naming the limit); a client too slow with its body gets `408`
//! and one too slow with its headers is disconnected, while others are served; a
//! connection over `max_connections` gets `503` at once; an export download outlives the
//! request timeout; graceful shutdown lets an in-flight request finish.
//!
//! Every test runs on SQLite: the limits are the HTTP layer's, not the store's. Each is
//! bounded to a few seconds.

use std::time::{Duration, Instant};

use crate::common::{fast_config, spawn_app_with, TestApp, TestDb};
use opsagent_audit::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

const INGEST: &str = "/api/v1/interactions";

async fn post_json(app: &TestApp, body: &Value) -> (u16, Value) {
    let response = app.client.post(app.url(INGEST)).json(body).send().await.expect("send the ingest request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

fn record(question: &str) -> Value {
    json!({"interaction_id": Uuid::now_v7(), "question": question})
}

/// `{"l": {"l": … 1 …}}`, `depth` objects deep.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "l": inner }))
}

/// Asserts a per-record rejection in `results[index]` naming `field` and `limit`.
#[track_caller]
fn assert_rejected(answer: &Value, index: usize, field: &str, limit: &str) {
    let result = &answer["results"][index];
    assert_eq!(result["status"], "rejected", "{answer}");
    assert_eq!(result["error"]["field"], field, "{answer}");
    let message = result["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(limit), "message should name {limit}: {answer}");
}

/// Posts `[good, bad]` and `bad` alone: the array keeps the good record, the single bad
/// record is a `422` naming `field` and `limit`.
async fn assert_record_limit(app: &TestApp, bad: Value, field: &str, limit: &str) {
    let (status, answer) = post_json(app, &json!([record("good"), bad])).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!((answer["accepted"].as_u64(), answer["rejected"].as_u64()), (Some(1), Some(1)), "{answer}");
    assert_eq!(answer["results"][0]["status"], "accepted", "{answer}");
    assert_rejected(&answer, 1, field, limit);

    let (status, answer) = post_json(app, &bad).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_record", "{answer}");
    assert_eq!(answer["error"]["field"], field, "{answer}");
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains(limit)), "{answer}");
}

fn limited_config(limits: impl FnOnce(&mut Config)) -> Config {
    let mut config = fast_config();
    limits(&mut config);
    config
}

#[tokio::test]
async fn too_many_thoughts_reject_the_record_alone() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, limited_config(|c| c.limits.max_thoughts_per_record = 3)).await;
    let thoughts = |n: usize| (0..n).map(|i| json!({"content": format!("step {i}")})).collect::<Vec<_>>();

    let (status, answer) = post_json(&app, &json!({"question": "at the limit", "thoughts": thoughts(3)})).await;
    assert_eq!(status, 202, "{answer}");
    let bad = json!({"question": "over", "thoughts": thoughts(4)});
    assert_record_limit(&app, bad, "thoughts", "audit.limits.max_thoughts_per_record").await;
    app.wait_for_count(2).await;
    app.stop().await;
}

#[tokio::test]
async fn too_many_tool_calls_reject_the_record_alone() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, limited_config(|c| c.limits.max_tool_calls_per_record = 2)).await;
    let calls =
        |n: usize| (0..n).map(|_| json!({"tool_name": "kubectl", "tool_input": "get pods"})).collect::<Vec<_>>();

    let (status, answer) = post_json(&app, &json!({"question": "at the limit", "tool_calls": calls(2)})).await;
    assert_eq!(status, 202, "{answer}");
    let bad = json!({"question": "over", "tool_calls": calls(3)});
    assert_record_limit(&app, bad, "tool_calls", "audit.limits.max_tool_calls_per_record").await;
    // The message counts what was sent.
    let (_, answer) = post_json(&app, &json!({"question": "over", "tool_calls": calls(5)})).await;
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("5 tool calls; at most 2")), "{answer}");
    app.wait_for_count(2).await;
    app.stop().await;
}

#[tokio::test]
async fn attributes_nested_too_deep_reject_the_record_and_the_limit_itself_is_accepted() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, limited_config(|c| c.limits.max_attributes_depth = 4)).await;

    // The attributes map is level 1: nested(4) is 4 objects deep, exactly the limit.
    let (status, answer) = post_json(&app, &json!({"question": "at the limit", "attributes": nested(4)})).await;
    assert_eq!(status, 202, "{answer}");
    let flat = json!({"question": "flat", "attributes": {"team": "sre", "ticket": 42}});
    let (status, answer) = post_json(&app, &flat).await;
    assert_eq!(status, 202, "{answer}");
    let bad = json!({"question": "too deep", "attributes": nested(5)});
    assert_record_limit(&app, bad, "attributes", "audit.limits.max_attributes_depth").await;
    // Arrays are levels too.
    let arrays = json!({"question": "arrays", "attributes": {"a": [[[["x"]]]]}});
    let (status, answer) = post_json(&app, &arrays).await;
    assert_eq!((status, &answer["error"]["field"]), (422, &json!("attributes")), "{answer}");
    app.wait_for_count(3).await;
    app.stop().await;
}

/// Reads from `stream` until the server closes it, resets it, or `limit` passes;
/// returns what was read and whether the server ended the connection.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> (String, bool) {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&answer).into_owned(), ended)
}

#[tokio::test]
async fn a_body_trickled_slower_than_the_request_timeout_gets_408_and_others_are_served() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, limited_config(|c| c.limits.request_timeout = Duration::from_secs(1))).await;
    let body = record("slow").to_string().into_bytes();
    let stream = TcpStream::connect(app.address.trim_start_matches("http://")).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST {INGEST} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    writer.write_all(head.as_bytes()).await.expect("send the headers");
    // One byte every 100 ms: the whole body would take several seconds.
    let trickle = tokio::spawn(async move {
        for byte in body {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Meanwhile the server serves others.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = post_json(&app, &record("fast")).await;
    assert_eq!(status, 202, "{answer}");

    let (text, closed) = read_until_closed(&mut reader, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(closed, "the connection is still open after 5 s; read so far: {text:?}");
    assert!(elapsed >= Duration::from_millis(900), "answered after {elapsed:?}, before the timeout");
    assert!(elapsed < Duration::from_secs(3), "answered only after {elapsed:?}");
    if !text.is_empty() {
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        let answer: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        assert_eq!(answer["error"]["code"], "request_timeout", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("audit.limits.request_timeout"), "{answer}");
    }
    app.wait_for_count(1).await;
    assert_eq!(app.logger.snapshot().accepted, 1, "the slow record was not taken");
    app.stop().await;
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_disconnected_after_the_header_read_timeout() {
    let db = TestDb::sqlite();
    let timeout = Duration::from_millis(500);
    let app = spawn_app_with(&db, limited_config(|c| c.limits.header_read_timeout = timeout)).await;
    let address = app.address.trim_start_matches("http://").to_string();

    // Headers one byte every 50 ms, never finished.
    let started = Instant::now();
    let stream = TcpStream::connect(&address).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for byte in format!("GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: {}", "a".repeat(200)).bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let (text, closed) = read_until_closed(&mut reader, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(closed, "still connected after 5 s: {text:?}");
    assert!(elapsed >= timeout - Duration::from_millis(50), "disconnected after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "disconnected only after {elapsed:?}");
    assert!(!text.contains("200 OK"), "the trickled request was not served: {text}");

    // A connection that sends nothing at all is closed the same way.
    let started = Instant::now();
    let mut silent = TcpStream::connect(&address).await.expect("connect");
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(closed && started.elapsed() < Duration::from_secs(3), "a silent connection was kept");

    // Others are served all along.
    let health = app.client.get(app.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_connection_over_max_connections_gets_503_and_a_freed_slot_serves_again() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, limited_config(|c| c.limits.max_connections = 2)).await;
    let address = app.address.trim_start_matches("http://").to_string();

    // Two open, idle connections take both slots (the header read timeout, 10 s by
    // default, is far away). A request on the first proves it is being served.
    let mut first = TcpStream::connect(&address).await.expect("connect 1");
    first.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("request on 1");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf)).await.expect("answer").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    let second = TcpStream::connect(&address).await.expect("connect 2");
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The third is answered at once, and closed.
    let client = reqwest::Client::new();
    let started = Instant::now();
    let response = client.get(app.url("/healthz")).send().await.expect("an answer, not a hang");
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert_eq!(response.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    let answer: Value = response.json().await.expect("a JSON error");
    assert_eq!(answer["error"]["code"], "too_many_connections", "{answer}");
    assert!(
        answer["error"]["message"].as_str().is_some_and(|m| m.contains("audit.limits.max_connections")),
        "{answer}"
    );

    // Closing one frees its slot (as soon as the server sees the close).
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.get(app.url("/healthz")).send().await.expect("healthz").status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "no slot freed 5 s after a connection closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(first);
    app.stop().await;
}

#[tokio::test]
async fn an_export_download_outlives_the_request_timeout() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, limited_config(|c| c.limits.request_timeout = Duration::from_secs(1))).await;
    // More than loopback socket buffers hold, so the server is still writing the body
    // while the client waits past the request timeout.
    let (records, answer_bytes) = (24, 900 * 1024);
    for chunk in 0..records / 4 {
        let batch: Vec<Value> = (0..4)
            .map(|i| json!({"question": format!("q{chunk}-{i}"), "final_answer": "a".repeat(answer_bytes)}))
            .collect();
        let (status, answer) = post_json(&app, &json!(batch)).await;
        assert_eq!(status, 202, "{}", answer["error"]);
    }
    app.wait_for_count(records as u64).await;

    let response = app.client.get(app.url("/api/v1/export?format=ndjson")).send().await.expect("export");
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = response.bytes().await.expect("the whole download, not cut at the request timeout");
    assert!(body.len() > records * answer_bytes, "{} bytes", body.len());
    let lines = body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
    assert_eq!(lines, records);
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish_then_stops_accepting() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(&db, fast_config()).await;
    let address = app.address.trim_start_matches("http://").to_string();
    let logger = app.logger.clone();
    let body = record("in flight at shutdown").to_string().into_bytes();

    let mut stream = TcpStream::connect(&address).await.expect("connect");
    let head = format!(
        "POST {INGEST} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("headers");
    stream.write_all(&body[..10]).await.expect("part of the body");
    let request = tokio::spawn(async move {
        // The rest arrives after shutdown began.
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(&body[10..]).await.expect("the rest of the body");
        read_until_closed(&mut stream, Duration::from_secs(5)).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = tokio::time::timeout(Duration::from_secs(10), app.stop()).await.expect("shutdown within 10 s");

    let (text, closed) = request.await.expect("request task");
    assert!(text.starts_with("HTTP/1.1 202"), "{text}");
    assert!(closed, "the connection is closed after its answer at shutdown");
    let report = report.expect("a shutdown report");
    assert!(report.drained, "{report:?}");
    assert_eq!(logger.snapshot().accepted, 1);
    assert_eq!(report.stats.committed, 1, "{report:?}");
    assert!(TcpStream::connect(&address).await.is_err(), "still accepting after shutdown");
}
