//! Risk classification end to end (issue #14), on both backends: records sent over HTTP
//! are classified at ingest (a level the producer sent is overwritten), the roll-up read
//! back agrees with the tool calls, `min_risk` narrows list, stats and export, stats group
//! by `risk_rule`, and a bad `min_risk` is a 400 naming it.

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::{spawn_app, TestApp, TestDb};

both_backends! {
    min_risk_filters_list_stats_and_export_and_the_roll_up_matches_the_calls,
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
