//! Risk classification end to end (issue #14), on both backends: records sent over HTTP
//! are classified at ingest (a level the producer sent is overwritten), the roll-up read
//! back agrees with the tool calls, `min_risk` narrows list, stats and export, stats group
//! by `risk_rule`, and a bad `min_risk` is a 400 naming it. The anomaly job over real
//! data: what it stores (once, however often it runs), `GET /api/v1/anomalies`, the
//! metrics and the webhook, which gets what was found even after being down a while.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use opsagent_audit::config::Config;
use opsagent_audit::model::{Interaction, RiskLevel, Status, ToolCall};
use opsagent_audit::risk::alert::{self, Outcome};
use opsagent_audit::risk::anomaly::Settings;
use opsagent_audit::risk::detect::{detect, hour_of};
use opsagent_audit::store::{AnomalyKind, NewAnomaly};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::{fast_config, scrape_metrics, spawn_app, spawn_app_with, wait_until, TestApp, TestDb};

both_backends! {
    min_risk_filters_list_stats_and_export_and_the_roll_up_matches_the_calls,
    the_anomaly_job_stores_each_anomaly_once_and_serves_them_newest_first,
    the_running_job_counts_anomalies_and_posts_them_to_the_webhook,
}

/// (tool, input, expected level, expected rule) for the calls of the test records.
const CALLS: &[(&str, &str, &str, Option<&str>)] = &[
    ("kubectl", "kubectl get pods -n shop -l app=delete-me", "none", None),
    ("kubectl", "kubectl delete pod checkout-0 -n shop", "high", Some("kubectl_delete")),
    ("kubectl", "kubectl delete ns staging", "critical", Some("kubectl_delete_namespace")),
    ("shell", "rm -rf /var/tmp/cache", "high", Some("shell_rm_rf")),
    ("kubectl", "kubectl rollout restart deploy/api", "medium", Some("kubectl_rollout_restart")),
    ("sql", "SELECT * FROM orders WHERE id = 7", "none", None),
    ("kubectl", "kubectl label pod web-0 debug=true", "low", Some("kubectl_label")),
];

fn rank(level: &str) -> usize {
    ["none", "low", "medium", "high", "critical"].iter().position(|l| *l == level).expect("a level")
}

/// Record `n` runs the calls `CALLS[n % 7]` and `CALLS[(n * 3) % 7]` (the first one
/// sent with a forged `risk_level: none` that the classifier must overwrite).
fn calls_of(n: usize) -> [usize; 2] {
    [n % CALLS.len(), (n * 3) % CALLS.len()]
}

async fn send(app: &TestApp, records: &[Value]) {
    let response = app.client.post(app.url("/api/v1/interactions")).json(records).send().await.expect("post");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("json answer");
    assert!(status == 200 || status == 202, "{status}: {body}");
}

async fn get(app: &TestApp, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let response = app.client.get(app.url(path)).query(query).send().await.expect("get");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")))
}

async fn list_ids(app: &TestApp, query: &[(&str, &str)]) -> HashSet<Uuid> {
    let mut q = query.to_vec();
    q.push(("limit", "500"));
    let (status, body) = get(app, "/api/v1/interactions", &q).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["next_cursor"].is_null(), "{body}");
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["interaction_id"].as_str().unwrap().parse().unwrap())
        .collect()
}

async fn min_risk_filters_list_stats_and_export_and_the_roll_up_matches_the_calls(db: &TestDb) {
    let app = spawn_app(db).await;
    let count = 35;
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let records: Vec<Value> = (0..count)
        .map(|n| {
            let calls: Vec<Value> = calls_of(n)
                .iter()
                .enumerate()
                .map(|(k, &c)| {
                    let (tool, input, ..) = CALLS[c];
                    let mut call = json!({"tool_name": tool, "tool_input": input});
                    if k == 0 {
                        call["risk_level"] = json!("none");
                        call["risk_rule"] = json!("producer_says_fine");
                    }
                    call
                })
                .collect();
            json!({"interaction_id": ids[n], "question": format!("risk test {n}"), "tool_calls": calls})
        })
        .collect();
    send(&app, &records).await;
    app.wait_for_count(count as u64).await;

    // Expected roll-ups, computed here from the table.
    let expected_max: Vec<usize> =
        (0..count).map(|n| calls_of(n).iter().map(|&c| rank(CALLS[c].2)).max().unwrap()).collect();

    // The detail view: each call's level and rule, and a roll-up that matches them.
    for (n, id) in ids.iter().enumerate().take(CALLS.len()) {
        let (status, record) = get(&app, &format!("/api/v1/interactions/{id}"), &[]).await;
        assert_eq!(status, 200, "{record}");
        let calls = record["tool_calls"].as_array().expect("tool calls");
        for (call, &c) in calls.iter().zip(calls_of(n).iter()) {
            assert_eq!(call["risk_level"], CALLS[c].2, "{call}");
            assert_eq!(call["risk_rule"].as_str(), CALLS[c].3, "{call}");
        }
        let max = calls.iter().map(|c| rank(c["risk_level"].as_str().unwrap())).max().unwrap();
        let flagged = calls.iter().filter(|c| c["risk_level"] != "none").count();
        assert_eq!(rank(record["risk_level"].as_str().unwrap()), max, "{record}");
        assert_eq!(record["risk_flagged"], flagged, "{record}");
        assert_eq!(max, expected_max[n]);
    }

    // min_risk on the list, each level.
    for (level, min) in [("none", 0), ("low", 1), ("medium", 2), ("high", 3), ("critical", 4)] {
        let want: HashSet<Uuid> = (0..count).filter(|&n| expected_max[n] >= min).map(|n| ids[n]).collect();
        assert_eq!(list_ids(&app, &[("min_risk", level)]).await, want, "min_risk={level}");
    }
    // The list shows the roll-up too.
    let (_, body) = get(&app, "/api/v1/interactions", &[("min_risk", "critical"), ("limit", "500")]).await;
    for item in body["items"].as_array().unwrap() {
        assert_eq!(item["risk_level"], "critical", "{item}");
        assert!(item["risk_flagged"].as_i64().unwrap() >= 1, "{item}");
    }

    // Stats by rule: the flagged calls of each rule (min_risk=high: at high or above).
    let mut by_rule: BTreeMap<&str, i64> = BTreeMap::new();
    let mut by_rule_high: BTreeMap<&str, i64> = BTreeMap::new();
    for n in 0..count {
        for &c in &calls_of(n) {
            if let Some(rule) = CALLS[c].3 {
                *by_rule.entry(rule).or_default() += 1;
                if rank(CALLS[c].2) >= 3 {
                    *by_rule_high.entry(rule).or_default() += 1;
                }
            }
        }
    }
    for (query, want) in [(vec![], by_rule), (vec![("min_risk", "high")], by_rule_high)] {
        let mut q = vec![("group_by", "risk_rule")];
        q.extend(query.iter().copied());
        let (status, body) = get(&app, "/api/v1/stats", &q).await;
        assert_eq!(status, 200, "{body}");
        let rows = body["rows"].as_array().or_else(|| body.as_array()).unwrap_or_else(|| panic!("{body}"));
        let got: BTreeMap<&str, i64> =
            rows.iter().map(|r| (r["key"].as_str().unwrap(), r["count"].as_i64().unwrap())).collect();
        assert_eq!(got, want, "{q:?}");
    }

    // Export with min_risk: exactly the interactions of the list.
    let response = app
        .client
        .get(app.url("/api/v1/export"))
        .query(&[("format", "ndjson"), ("min_risk", "high")])
        .send()
        .await
        .expect("export");
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    let exported: HashSet<Uuid> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["interaction_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(exported, list_ids(&app, &[("min_risk", "high")]).await);

    // A bad level is refused, naming the parameter, on each endpoint.
    for path in ["/api/v1/interactions", "/api/v1/stats", "/api/v1/export"] {
        let (status, body) = get(&app, path, &[("min_risk", "severe")]).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["field"], "min_risk", "{path}: {body}");
    }
    app.stop().await;
}

/// A record of `user` at `at` (model m1, cluster c1) running kubectl, failed if `failed`,
/// at `risk` (set as the classifier would: records written through the store directly).
fn interaction(user: &str, at: DateTime<Utc>, failed: bool, risk: RiskLevel) -> Interaction {
    let mut r = Interaction::new(format!("status of {user}'s pods"));
    r.user_id = Some(user.into());
    r.model_name = Some("m1".into());
    r.cluster = Some("c1".into());
    r.created_at = at;
    r.total_duration_ms = Some(900);
    if failed {
        r.status = Status::Error;
        r.error = Some("model timeout".into());
    }
    let mut call = ToolCall::new("kubectl", "kubectl get pods");
    call.duration_ms = Some(120);
    call.risk_level = risk;
    r.tool_calls.push(call);
    r.roll_up_risk();
    r
}

async fn the_anomaly_job_stores_each_anomaly_once_and_serves_them_newest_first(db: &TestDb) {
    let mut config = fast_config();
    config.anomalies.enabled = false;
    let app = spawn_app_with(db, config).await;
    let day = |d: i64| Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap() + Duration::days(d);
    // Three days of `ops` at 10 requests an hour, one in 20 failing; on day 3 at 10:00,
    // 8 of 10 fail; at 11:20 `mallory` runs her first high-risk command.
    let mut records = Vec::new();
    let mut n = 0;
    for hour in 0..(3 * 24 + 24) {
        for k in 0..10 {
            let at = day(0) + Duration::hours(hour) + Duration::minutes(k * 5);
            let failed = if hour == 3 * 24 + 10 { k < 8 } else { n % 20 == 0 };
            records.push(interaction("ops", at, failed, RiskLevel::None));
            n += 1;
        }
    }
    records.push(interaction("mallory", day(3) + Duration::minutes(11 * 60 + 20), false, RiskLevel::High));
    for batch in records.chunks(500) {
        app.store.write_batch(batch).await.expect("write");
    }

    let settings = Settings { baseline_days: 3, min_volume: 5, threshold: 6.0 };
    let found = detect(app.store.as_ref(), &settings, day(3), day(4)).await.expect("detect");
    let mut got: Vec<(AnomalyKind, String, DateTime<Utc>)> =
        found.iter().map(|a| (a.kind, a.scope.clone(), a.window_start)).collect();
    got.sort();
    let ten = day(3) + Duration::hours(10);
    let mut want = vec![
        (AnomalyKind::ErrorRate, "cluster:c1".to_owned(), ten),
        (AnomalyKind::ErrorRate, "model:m1".to_owned(), ten),
        (AnomalyKind::ErrorRate, "user:ops".to_owned(), ten),
        (AnomalyKind::FirstHighRisk, "user:mallory".to_owned(), day(3) + Duration::hours(11)),
    ];
    want.sort();
    assert_eq!(got, want, "{found:#?}");
    // A rerun over the same hours finds the same and stores nothing new.
    assert_eq!(detect(app.store.as_ref(), &settings, day(3), day(4)).await.expect("rerun"), vec![]);

    let (status, body) = get(&app, "/api/v1/anomalies", &[("limit", "3")]).await;
    assert_eq!(status, 200, "{body}");
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{body}");
    assert_eq!(items[0]["kind"], "first_high_risk", "{body}");
    assert_eq!(items[0]["scope"], "user:mallory", "{body}");
    let cursor = body["next_cursor"].as_str().expect("a second page").to_owned();
    let (_, rest) = get(&app, "/api/v1/anomalies", &[("limit", "3"), ("cursor", &cursor)]).await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1, "{rest}");
    assert!(rest["next_cursor"].is_null());
    let (status, body) = get(&app, "/api/v1/anomalies", &[("limit", "0")]).await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("limit")), "{body}");
    app.stop().await;
}

/// A webhook receiver on loopback that keeps what it is sent.
async fn webhook_server(listener: tokio::net::TcpListener) -> (Arc<Mutex<Vec<Value>>>, tokio::task::JoinHandle<()>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let keep = received.clone();
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (received, task)
}

async fn the_running_job_counts_anomalies_and_posts_them_to_the_webhook(db: &TestDb) {
    // History: `ops` every hour of the last two days; then `mallory`'s first high-risk
    // action in the last completed hour, which the job scores at start-up.
    let store = db.store().await;
    let now = hour_of(Utc::now());
    let mut records: Vec<Interaction> =
        (2..48).map(|h| interaction("ops", now - Duration::hours(h), false, RiskLevel::Low)).collect();
    records.push(interaction("mallory", now - Duration::minutes(30), false, RiskLevel::Critical));
    store.write_batch(&records).await.expect("write");
    store.close().await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (received, server) = webhook_server(listener).await;
    let mut config: Config = fast_config();
    config.alerts.webhook_url = Some(url);
    let app = spawn_app_with(db, config).await;
    wait_until("the webhook gets the anomaly", StdDuration::from_secs(30), || !received.lock().unwrap().is_empty())
        .await;
    let body = received.lock().unwrap()[0].clone();
    assert_eq!(body["source"], "opsagent-audit", "{body}");
    assert_eq!(body["anomaly"]["kind"], "first_high_risk", "{body}");
    assert_eq!(body["anomaly"]["scope"], "user:mallory", "{body}");

    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let metrics = scrape_metrics(&text);
    assert_eq!(metrics.get("opsagent_audit_anomalies_total{kind=\"first_high_risk\"}"), Some(&1.0), "{text}");
    assert_eq!(metrics.get("opsagent_audit_anomaly_webhook_posts_total{outcome=\"delivered\"}"), Some(&1.0), "{text}");
    app.stop().await;
    server.abort();
}

/// The webhook is down when the anomaly is found and comes up a while later: the post
/// is retried with backoff until it is received, and reported delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_the_anomaly_after_being_down_for_a_while() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("reserve a port");
    let address = listener.local_addr().unwrap();
    drop(listener);
    let mut config = Config::default().alerts;
    config.webhook_url = Some(format!("http://{address}/hook"));
    config.timeout = StdDuration::from_secs(2);
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let seen = outcomes.clone();
    let stop = CancellationToken::new();
    let (sender, task) = alert::spawn(&config, Arc::new(move |o| seen.lock().unwrap().push(o)), stop.clone())
        .expect("webhook configured");
    let anomaly = NewAnomaly {
        kind: AnomalyKind::ErrorRate,
        scope: "model:m1".into(),
        window_start: hour_of(Utc::now()),
        window_end: hour_of(Utc::now()) + Duration::hours(1),
        score: 12.5,
        value: 0.4,
        baseline: 0.02,
        detail: "40 % of requests failed; usually 2 %".into(),
    };
    sender.send(anomaly);
    // Down for a while: several attempts fail first.
    tokio::time::sleep(StdDuration::from_millis(1500)).await;
    assert!(outcomes.lock().unwrap().is_empty(), "nothing is settled while the receiver is down");
    let listener = tokio::net::TcpListener::bind(address).await.expect("bind the reserved port again");
    let (received, server) = webhook_server(listener).await;
    wait_until("the webhook gets the anomaly once it is up", StdDuration::from_secs(40), || {
        !received.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(received.lock().unwrap()[0]["anomaly"]["scope"], "model:m1");
    wait_until("the delivery is reported", StdDuration::from_secs(5), || !outcomes.lock().unwrap().is_empty()).await;
    assert_eq!(*outcomes.lock().unwrap(), vec![Outcome::Delivered]);
    stop.cancel();
    let _ = task.await;
    server.abort();
}
