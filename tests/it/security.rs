//! Security (issue #9): masking on every way in (HTTP, the library logger, the spool,
//! dead letters), API tokens with roles on every endpoint, the loopback rule, the
//! per-token rate limit, and the metrics that count masking and refusals.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use opsagent_audit::api::{AppError, Application};
use opsagent_audit::config::{AckMode, Config, CustomRule, Role, TokenConfig};
use opsagent_audit::mask::Masker;
use opsagent_audit::model::{Interaction, Status, Thought, ToolCall};
use opsagent_audit::pipeline::AuditLogger;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::{fast_config, free_port, scrape_metrics, spawn_app_with, wait_for_count, TestApp, TestDb};

both_backends! {
    every_text_field_is_masked_before_it_is_stored,
    the_library_logger_masks_too,
    masking_can_be_turned_off_and_custom_rules_added,
    dead_letters_hold_the_masked_record,
    each_role_reaches_exactly_its_endpoints,
}

// Secrets of the corpus (tests/data/mask/secrets.txt), one per field.
const OPENAI: &str = "sk-proj-rhTuvqCdmPG0tmKXPDZpAemm1za7v0fHhvjwdbT2HwDqzuM14qHOXHlpaBqCefuvT3BlbkFJ2FSJghB6hRLeos47wGJkcU_0XXkHG5qJwv1MkAuYVbpS0Jso2jKF08mmf1ULmmcW";
const AWS_KEY_ID: &str = "AKIAQX7RZT2MWB4KPL3N";
const GITHUB: &str = "ghp_R8mVnQ2xWc7TzLp4KjH9sD3fG6yB1aE5uN0o";
const DB_PASSWORD: &str = "Pg-Pr0d-2024!x";
const SECRET_VALUE_B64: &str = "c3VwZXItc2VjcmV0LXBhc3N3b3Jk";
const SLACK: &str = "xoxb-2841937563-5528193746029-Xq8bT3mLzR7kVp2NwY6cHd4J";
const ATTRIBUTE_SECRET: &str = "a8f3k2m9q1w7e5r4";
const BEARER: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJvcHMtYm90Iiwicm9sZSI6ImFkbWluIn0.c2lnbmF0dXJlLWJ5dGVzLWhlcmU";

const ALL_SECRETS: [&str; 8] =
    [OPENAI, AWS_KEY_ID, GITHUB, DB_PASSWORD, SECRET_VALUE_B64, SLACK, ATTRIBUTE_SECRET, BEARER];

/// A record with a secret in every text field, as an agent would send it.
fn leaky_record() -> Value {
    json!({
        "question": format!("我的 key 是 {OPENAI}，为什么 401？"),
        "user_id": "alice",
        "thoughts": [{"content": format!("the pod env has AWS_ACCESS_KEY_ID={AWS_KEY_ID}"), "sequence_number": 1}],
        "tool_calls": [
            {
                "tool_name": "kubectl",
                "tool_input": format!("curl -H 'Authorization: Bearer {BEARER}' http://api"),
                "tool_observation": format!(
                    "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\ndata:\n  password: {SECRET_VALUE_B64}\n"
                ),
                "sequence_number": 1,
                "error": format!("git clone https://{GITHUB}@github.com/acme/ops failed"),
            }
        ],
        "final_answer": format!("connect with postgres://app:{DB_PASSWORD}@db.prod:5432/orders"),
        "status": "error",
        "error": format!("slack notify failed for token {SLACK}"),
        "attributes": {"api_key": ATTRIBUTE_SECRET, "nested": {"deep": [format!("token={ATTRIBUTE_SECRET}")]}},
    })
}

fn assert_no_secret(text: &str, what: &str) {
    for secret in ALL_SECRETS {
        assert!(!text.contains(secret), "{what} still holds secret {secret}: {text}");
    }
}

async fn every_text_field_is_masked_before_it_is_stored(db: &TestDb) {
    let app = spawn_app_with(db, fast_config()).await;
    let response = app.client.post(app.url("/api/v1/interactions")).json(&leaky_record()).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    app.wait_for_count(1).await;
    let list: Value = app.client.get(app.url("/api/v1/interactions")).send().await.unwrap().json().await.unwrap();
    let id = list["items"][0]["interaction_id"].as_str().unwrap().to_owned();
    let stored = app.client.get(app.url(&format!("/api/v1/interactions/{id}"))).send().await.unwrap();
    let stored = stored.text().await.unwrap();
    assert_no_secret(&stored, "the stored record");
    for rule in [
        "openai_key",
        "aws_access_key_id",
        "jwt",
        "k8s_secret",
        "github_token",
        "url_password",
        "slack_token",
        "password_pair",
    ] {
        assert!(stored.contains(&format!("[MASKED:{rule}]")), "no {rule} marker in {stored}");
    }
    // The text around each secret is kept as evidence.
    assert!(stored.contains("为什么 401") && stored.contains("@db.prod:5432/orders"), "{stored}");

    // The export reads what was stored: masked too.
    let export = app.client.get(app.url("/api/v1/export?format=ndjson")).send().await.unwrap().text().await.unwrap();
    assert_no_secret(&export, "the export");

    // Each rule's hits are counted in /metrics.
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let m = scrape_metrics(&metrics);
    let masked = |rule: &str| m[&format!("opsagent_audit_masked_total{{rule=\"{rule}\"}}")];
    assert!(masked("openai_key") >= 1.0 && masked("k8s_secret") >= 1.0, "{metrics}");
    app.stop().await;
}

async fn the_library_logger_masks_too(db: &TestDb) {
    let store = db.store().await;
    let config = fast_config();
    let masker = Arc::new(Masker::from_config(&config.masking).unwrap().expect("masking is on by default"));
    let logger = AuditLogger::builder(store.clone(), &config.pipeline, &config.limits).stage(masker.clone()).start();
    let mut record = Interaction::new(format!("rotate {GITHUB} please"));
    record.thoughts = vec![Thought { content: format!("found {AWS_KEY_ID}"), sequence_number: 1 }];
    record.tool_calls = vec![ToolCall {
        tool_name: "shell".into(),
        tool_input: format!("export OPENAI_API_KEY={OPENAI}"),
        tool_observation: None,
        sequence_number: 1,
        duration_ms: Some(3),
        thought_sequence_number: None,
        error: None,
        ..ToolCall::new("", "")
    }];
    let id = record.interaction_id;
    // Every way into the pipeline: fire-and-forget, committed, durable.
    logger.log(record.clone());
    let mut second = record.clone();
    second.interaction_id = uuid::Uuid::now_v7();
    logger.log_committed(second).await;
    let mut third = record;
    third.interaction_id = uuid::Uuid::now_v7();
    logger.log_durable(third).await.unwrap();
    wait_for_count(&*store, 3).await;
    let stored = serde_json::to_string(&store.get_interaction(id).await.unwrap()).unwrap();
    assert_no_secret(&stored, "a record logged through the library");
    assert!(masker.counts()["github_token"] >= 3, "{:?}", masker.counts());
    logger.shutdown(Duration::from_secs(10)).await;
}

async fn masking_can_be_turned_off_and_custom_rules_added(db: &TestDb) {
    let mut config = fast_config();
    config.masking.rules = vec![CustomRule {
        name: "ticket".into(),
        regex: r"TICKET-(?P<secret>\d{6})".into(),
        replacement: Some("######".into()),
    }];
    let app = spawn_app_with(db, config).await;
    let body = json!({"question": format!("see TICKET-123456 and {OPENAI}")});
    app.client.post(app.url("/api/v1/interactions")).json(&body).send().await.unwrap().error_for_status().unwrap();
    app.wait_for_count(1).await;
    let list: Value = app.client.get(app.url("/api/v1/interactions")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["items"][0]["question"], "see TICKET-###### and [MASKED:openai_key]");
    app.stop().await;

    // Off: stored verbatim (an operator's explicit choice).
    let other = TestDb::like(db).await;
    let mut config = fast_config();
    config.masking.enabled = false;
    let app = spawn_app_with(&other, config).await;
    app.client.post(app.url("/api/v1/interactions")).json(&body).send().await.unwrap().error_for_status().unwrap();
    app.wait_for_count(1).await;
    let list: Value = app.client.get(app.url("/api/v1/interactions")).send().await.unwrap().json().await.unwrap();
    assert!(list["items"][0]["question"].as_str().unwrap().contains(OPENAI));
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("opsagent_audit_masked_total"), "no masking counts when masking is off");
    app.stop().await;
}

async fn dead_letters_hold_the_masked_record(db: &TestDb) {
    let app = spawn_app_with(db, fast_config()).await;
    // A rule of the database (not of the service) refuses this record: it becomes a
    // dead letter, which must hold the masked record, never the original.
    db.refuse_marked_questions().await;
    let body = json!({"question": format!("REFUSE-ME {OPENAI}"), "error": format!("token {SLACK}")});
    app.client.post(app.url("/api/v1/interactions")).json(&body).send().await.unwrap().error_for_status().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let letters = loop {
        let page: Value = app.client.get(app.url("/api/v1/dead-letters")).send().await.unwrap().json().await.unwrap();
        if !page["items"].as_array().unwrap().is_empty() {
            break page;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = letters.to_string();
    assert_no_secret(&text, "the dead letter");
    assert!(text.contains("[MASKED:openai_key]") && text.contains("REFUSE-ME"), "{text}");
    app.stop().await;
}

/// The spool is on disk: a record waiting there for the database must already be masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_never_holds_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    // Nothing listens there: every record waits in the spool.
    config.database.url = Some(format!("postgres://postgres@127.0.0.1:{}/none", free_port()));
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.spool.dir = dir.path().join("spool");
    config.pipeline.ack = AckMode::Durable;
    let app = Application::build(config, false).await.unwrap();
    let address = format!("http://{}", app.local_addr());
    let logger = app.logger();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run_until(stop.clone().cancelled_owned()));
    let client = reqwest::Client::new();
    let response = client.post(format!("{address}/api/v1/interactions")).json(&leaky_record()).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    assert!(logger.snapshot().spool_records >= 1);
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir.path().join("spool")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            bytes.extend(std::fs::read(path).unwrap());
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("[MASKED:openai_key]"), "the spooled record is not there");
    assert_no_secret(&text, "the spool");
    stop.cancel();
    server.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// Tokens and roles.

const INGEST_TOKEN: &str = "ingest-7f3a9c";
const READ_TOKEN: &str = "read-2b8e4d";
const ADMIN_TOKEN: &str = "admin-9d1c5e";

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn config_with_tokens() -> Config {
    let mut config = fast_config();
    config.auth.tokens =
        [("agent", Role::Ingest, INGEST_TOKEN), ("auditor", Role::Read, READ_TOKEN), ("ops", Role::Admin, ADMIN_TOKEN)]
            .into_iter()
            .map(|(name, role, token)| TokenConfig {
                name: name.into(),
                role,
                token_env: None,
                token_sha256: Some(sha256_hex(token)),
            })
            .collect();
    config
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Nobody,
    Forged,
    Ingest,
    Read,
    Admin,
}

impl Caller {
    fn header(self) -> Option<String> {
        match self {
            Caller::Nobody => None,
            Caller::Forged => Some("Bearer not-a-configured-token".into()),
            Caller::Ingest => Some(format!("Bearer {INGEST_TOKEN}")),
            Caller::Read => Some(format!("Bearer {READ_TOKEN}")),
            Caller::Admin => Some(format!("Bearer {ADMIN_TOKEN}")),
        }
    }
}

async fn call(app: &TestApp, method: &str, path: &str, caller: Caller) -> StatusCode {
    let url = app.url(path);
    let mut request = match method {
        "POST" => app.client.post(url).json(&json!({"question": "is the API guarded?"})),
        _ => app.client.get(url),
    };
    if let Some(h) = caller.header() {
        request = request.header("authorization", h);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED {
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap().to_owned();
        assert!(!message.contains("-7f3a9c") && !message.contains("-2b8e4d"), "a token echoed back: {message}");
    }
    status
}

async fn each_role_reaches_exactly_its_endpoints(db: &TestDb) {
    let app = spawn_app_with(db, config_with_tokens()).await;
    let id = uuid::Uuid::now_v7();
    let endpoints: [(&str, String, Role); 9] = [
        ("POST", "/api/v1/interactions".into(), Role::Ingest),
        ("GET", "/api/v1/interactions".into(), Role::Read),
        ("GET", format!("/api/v1/interactions/{id}"), Role::Read),
        ("GET", format!("/api/v1/sessions/{id}"), Role::Read),
        ("GET", "/api/v1/stats?group_by=model_name".into(), Role::Read),
        ("GET", "/api/v1/stats/overview".into(), Role::Read),
        ("GET", "/api/v1/export?format=csv".into(), Role::Read),
        ("GET", "/metrics".into(), Role::Read),
        ("GET", "/api/v1/dead-letters".into(), Role::Admin),
    ];
    let mut table = BTreeMap::new();
    for (method, path, needs) in &endpoints {
        for caller in [Caller::Nobody, Caller::Forged, Caller::Ingest, Caller::Read, Caller::Admin] {
            let status = call(&app, method, path, caller).await;
            let role = match caller {
                Caller::Ingest => Some(Role::Ingest),
                Caller::Read => Some(Role::Read),
                Caller::Admin => Some(Role::Admin),
                _ => None,
            };
            let expected = match role {
                None => StatusCode::UNAUTHORIZED,
                Some(role) if role.allows(*needs) => status, // allowed: whatever the endpoint says
                Some(_) => StatusCode::FORBIDDEN,
            };
            assert_eq!(status, expected, "{caller:?} {method} {path}");
            if role.is_some_and(|r| r.allows(*needs)) {
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN && !status.is_server_error(),
                    "{caller:?} {method} {path} → {status}"
                );
            }
            table.insert(format!("{method} {path} {caller:?}"), status.as_u16());
        }
    }
    // Health stays open to probes.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(call(&app, "GET", path, Caller::Nobody).await, StatusCode::OK, "{path}");
    }
    // The refusals were counted by reason.
    let metrics =
        app.client.get(app.url("/metrics")).bearer_auth(READ_TOKEN).send().await.unwrap().text().await.unwrap();
    let m = scrape_metrics(&metrics);
    let failures = |reason: &str| m[&format!("opsagent_audit_auth_failures_total{{reason=\"{reason}\"}}")];
    assert_eq!(failures("missing"), 9.0, "{metrics}");
    assert_eq!(failures("invalid"), 9.0, "{metrics}");
    // ingest is refused 8 read/admin endpoints; read is refused ingest and dead letters.
    assert_eq!(failures("forbidden"), 8.0 + 2.0, "{metrics} {table:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_public() {
    let db = TestDb::sqlite();
    let mut config = config_with_tokens();
    config.auth.metrics_public = true;
    let app = spawn_app_with(&db, config).await;
    assert_eq!(call(&app, "GET", "/metrics", Caller::Nobody).await, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/api/v1/interactions", Caller::Nobody).await, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_only_with_tokens_or_insecure() {
    let db = TestDb::sqlite();
    let mut config = fast_config();
    config.database.url = Some(db.url.clone());
    config.spool.enabled = false;
    config.server.listen = "0.0.0.0:0".parse().unwrap();
    let refused = Application::build(config.clone(), false).await.unwrap_err();
    assert!(matches!(refused, AppError::Unprotected(_)), "{refused}");
    assert!(refused.to_string().contains("--insecure"), "{refused}");

    let insecure = Application::build(config.clone(), true).await.unwrap();
    drop(insecure);

    let mut protected = config_with_tokens();
    protected.database = config.database.clone();
    protected.spool.enabled = false;
    protected.server.listen = "0.0.0.0:0".parse().unwrap();
    let app = Application::build(protected, false).await.unwrap();
    assert!(app.local_addr().ip().is_unspecified());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_env_variable_that_is_not_set_stops_start_up() {
    let db = TestDb::sqlite();
    let mut config = fast_config();
    config.database.url = Some(db.url.clone());
    config.spool.enabled = false;
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.auth.tokens = vec![TokenConfig {
        name: "agent".into(),
        role: Role::Ingest,
        token_env: Some("OPSAGENT_AUDIT_TEST_TOKEN_THAT_IS_NEVER_SET".into()),
        token_sha256: None,
    }];
    let err = Application::build(config, false).await.unwrap_err().to_string();
    assert!(err.contains("OPSAGENT_AUDIT_TEST_TOKEN_THAT_IS_NEVER_SET") && err.contains("agent"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_rate_gets_429_with_retry_after() {
    let db = TestDb::sqlite();
    let mut config = config_with_tokens();
    config.limits.requests_per_second = 1;
    config.limits.request_burst = 3;
    let app = spawn_app_with(&db, config).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = app.client.get(app.url("/api/v1/interactions")).bearer_auth(READ_TOKEN).send().await.unwrap();
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
            let body: Value = response.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("audit.limits.requests_per_second") && message.contains("auditor"), "{message}");
        }
    }
    // A burst of 3 passes (a 4th may pass if a second ticked over), the rest are refused.
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert!((1..=2).contains(&refused) && statuses[..3].iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    // Another token has a bucket of its own.
    let other = app.client.get(app.url("/api/v1/interactions")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    let metrics =
        app.client.get(app.url("/metrics")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().text().await.unwrap();
    let limited = scrape_metrics(&metrics)["opsagent_audit_rate_limited_requests_total{token=\"auditor\"}"];
    assert_eq!(limited, refused as f64, "{metrics}");
    app.stop().await;
}

/// Status is ingested as written: an error record keeps its status through masking.
#[test]
fn masking_leaves_non_text_fields_alone() {
    let masker = Masker::new(false, &[]).unwrap();
    let mut record = Interaction::new(format!("key {OPENAI}"));
    record.status = Status::Timeout;
    record.http_status = Some(504);
    record.model_name = Some("gpt-4o".into());
    masker.mask_record(&mut record);
    assert_eq!(
        (record.status, record.http_status, record.model_name.as_deref()),
        (Status::Timeout, Some(504), Some("gpt-4o"))
    );
    assert_eq!(record.question, "key [MASKED:openai_key]");
}
