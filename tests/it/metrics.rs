//! `/metrics` (issue #11): scraped during a load and after it, the text parses as
//! Prometheus exposition format and the record counters add up: every accepted record
//! is committed, a duplicate, dead-lettered, dropped, or still queued, being appended
//! to the spool, spooled, or held by a writer. Also `/readyz`'s backlog.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::common::{fast_config, scrape_metrics, spawn_app_with, TestApp, TestDb};

both_backends! {
    counters_add_up_during_and_after_a_load,
}

const REQUESTS: usize = 40;
const RECORDS_PER_REQUEST: usize = 25;

async fn metrics(app: &TestApp) -> (String, HashMap<String, f64>) {
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let samples = scrape_metrics(&text);
    (text, samples)
}

/// `(accepted, terminal outcomes, still waiting)` from one scrape.
fn ledger(m: &HashMap<String, f64>) -> (f64, f64, f64) {
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k}"));
    let dropped: f64 =
        m.iter().filter(|(k, _)| k.starts_with("opsagent_audit_records_dropped_total{")).map(|(_, v)| v).sum();
    let terminal = get("opsagent_audit_records_committed_total")
        + get("opsagent_audit_records_duplicate_total")
        + get("opsagent_audit_records_dead_lettered_total")
        + dropped;
    let waiting = get("opsagent_audit_intake_records")
        + get("opsagent_audit_queue_records")
        + get("opsagent_audit_spool_records")
        + get("opsagent_audit_in_flight_records")
        + get("opsagent_audit_spool_appending_records");
    (get("opsagent_audit_records_accepted_total"), terminal, waiting)
}

async fn counters_add_up_during_and_after_a_load(db: &TestDb) {
    let app = spawn_app_with(db, fast_config()).await;
    db.refuse_marked_questions().await;

    // The load: REQUESTS concurrent posts; the first is sent twice (duplicates), one
    // record is refused by the database (a dead letter).
    let bodies: Vec<serde_json::Value> = (0..REQUESTS)
        .map(|r| {
            let records: Vec<serde_json::Value> = (0..RECORDS_PER_REQUEST)
                .map(|i| {
                    let id = uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + (r * 1000 + i) as u128);
                    let question = if r == 7 && i == 3 { "REFUSE-ME".to_owned() } else { format!("q {r}/{i}") };
                    json!({"interaction_id": id, "question": question, "tool_calls": [{"tool_name": "kubectl", "tool_input": "get pods", "sequence_number": 1}]})
                })
                .collect();
            json!(records)
        })
        .collect();
    let mut posts = tokio::task::JoinSet::new();
    for body in bodies.iter().cloned().chain(std::iter::once(bodies[0].clone())) {
        let (client, url) = (app.client.clone(), app.url("/api/v1/interactions"));
        posts.spawn(async move { client.post(url).json(&body).send().await.unwrap().status() });
    }
    // Scrapes while the load runs: nothing is counted twice or lost in between.
    let mut during = 0;
    while !posts.is_empty() {
        let (_, m) = metrics(&app).await;
        let (accepted, terminal, waiting) = ledger(&m);
        assert!(terminal <= accepted, "more outcomes ({terminal}) than records accepted ({accepted})");
        assert!(accepted <= terminal + waiting, "accepted {accepted} > outcomes {terminal} + waiting {waiting}");
        during += 1;
        tokio::select! {
            Some(status) = posts.join_next() => assert!(status.unwrap().is_success()),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    assert!(during > 0);

    // After: everything settled, and the equation is exact.
    let total = (REQUESTS + 1) * RECORDS_PER_REQUEST;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (text, m) = loop {
        let (text, m) = metrics(&app).await;
        let (_, terminal, waiting) = ledger(&m);
        if terminal as usize == total && waiting == 0.0 {
            break (text, m);
        }
        assert!(tokio::time::Instant::now() < deadline, "not settled after 30 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (accepted, terminal, _) = ledger(&m);
    assert_eq!(accepted, terminal);
    assert_eq!(accepted as usize, total);
    assert_eq!(m["opsagent_audit_records_duplicate_total"] as usize, RECORDS_PER_REQUEST);
    assert_eq!(m["opsagent_audit_records_dead_lettered_total"], 1.0);
    assert_eq!(m["opsagent_audit_records_committed_total"] as usize, total - RECORDS_PER_REQUEST - 1);
    // Every committed or duplicate record's latency was observed once.
    assert_eq!(m["opsagent_audit_commit_latency_seconds_count"] as usize, total - 1, "{text}");
    assert_eq!(
        m["opsagent_audit_http_requests_total{method=\"POST\",route=\"/api/v1/interactions\",status=\"202\"}"] as usize,
        REQUESTS + 1,
        "{text}"
    );
    assert!(m["opsagent_audit_http_request_duration_seconds_count{method=\"GET\",route=\"/metrics\"}"] >= 1.0);
    assert_eq!(m["opsagent_audit_oldest_uncommitted_record_age_seconds"], 0.0);
    // The type lines follow the conventions.
    for line in [
        "# TYPE opsagent_audit_records_accepted_total counter",
        "# TYPE opsagent_audit_commit_latency_seconds histogram",
    ] {
        assert!(text.contains(line), "missing `{line}`:\n{text}");
    }
    // An id never becomes a label: unknown paths are one series.
    app.client.get(app.url("/no/such/path/123")).send().await.unwrap();
    let (_, m) = metrics(&app).await;
    assert_eq!(m["opsagent_audit_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}"], 1.0);

    let ready: serde_json::Value = app.client.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["backlog"]["spool_filling"], false, "{ready}");
    assert!(ready["backlog"]["oldest_uncommitted_seconds"].is_null(), "{ready}");
    app.stop().await;
}
