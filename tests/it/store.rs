//! The behavioural suite every store must pass, run against PostgreSQL and SQLite.

use std::collections::BTreeSet;

use std::sync::Arc;
use std::time::Duration;

use crate::common::TestDb;
use chrono::{DateTime, TimeZone, Timelike, Utc};
use opsagent_audit::config::{AsyncConfig, Config, LimitsConfig};
use opsagent_audit::model::{Interaction, Status, Thought, ToolCall, TRUNCATION_MARKER};
use opsagent_audit::pipeline::{AuditLogger, Outcome};
use opsagent_audit::store::{self, DeadLetter, Store, StoreError};
use uuid::Uuid;

/// Now, at the microsecond precision both databases keep.
fn now_us() -> DateTime<Utc> {
    let t = Utc::now();
    t.with_nanosecond(t.nanosecond() / 1000 * 1000).unwrap()
}

fn full_record() -> Interaction {
    let mut r = Interaction::new("why is pod web-1 crashlooping?");
    r.created_at = now_us();
    r.user_id = Some("alice".into());
    r.client_ip = Some("10.0.0.7".into());
    r.user_agent = Some("curl/8".into());
    r.endpoint = Some("/api/diagnose".into());
    r.model_name = Some("gpt-4o".into());
    r.provider = Some("openai".into());
    r.base_url = Some("https://api.openai.com/v1".into());
    r.cluster = Some("prod-east".into());
    r.thoughts = vec![
        Thought { content: "look at the pod".into(), sequence_number: 1 },
        Thought { content: "it was OOM killed".into(), sequence_number: 2 },
    ];
    r.tool_calls = vec![
        ToolCall {
            tool_name: "kubectl".into(),
            tool_input: "get pods -n web".into(),
            tool_observation: Some("web-1 0/1 CrashLoopBackOff".into()),
            sequence_number: 1,
            duration_ms: Some(120),
            thought_sequence_number: Some(1),
            error: None,
            ..ToolCall::new("", "")
        },
        ToolCall {
            tool_name: "kubectl".into(),
            tool_input: "describe pod web-1".into(),
            tool_observation: None,
            sequence_number: 2,
            duration_ms: Some(90),
            thought_sequence_number: Some(2),
            error: Some("forbidden".into()),
            ..ToolCall::new("", "")
        },
    ];
    r.final_answer = Some("raise the memory limit".into());
    r.status = Status::Error;
    r.error = Some("tool failed".into());
    r.http_status = Some(500);
    r.total_duration_ms = Some(5230);
    r.assistant_duration_ms = Some(4100);
    r.parse_duration_ms = Some(12);
    r.metrics.insert("llm_first_token_ms".into(), 800);
    r.metrics.insert("tool_total_ms".into(), 210);
    r.input_tokens = Some(1200);
    r.output_tokens = Some(300);
    r.attributes.insert("agent_version".into(), serde_json::json!("1.0.3"));
    r.attributes.insert("nested".into(), serde_json::json!({"a": [1, 2]}));
    r
}

fn simple(session: Uuid, n: usize) -> Vec<Interaction> {
    (0..n)
        .map(|i| {
            let mut r = Interaction::new(format!("question {i}"));
            r.session_id = session;
            r.created_at = now_us();
            r.tool_calls.push(ToolCall {
                tool_name: "shell".into(),
                tool_input: format!("echo {i}"),
                tool_observation: Some(i.to_string()),
                sequence_number: 1,
                duration_ms: Some(1),
                thought_sequence_number: None,
                error: None,
                ..ToolCall::new("", "")
            });
            r
        })
        .collect()
}

fn logger(store: Arc<dyn Store>, batch_size: usize, max_field_bytes: usize) -> AuditLogger {
    let pipeline = AsyncConfig { workers: 2, batch_size, batch_interval_ms: 20, ..AsyncConfig::default() };
    let limits = LimitsConfig { max_field_bytes, ..LimitsConfig::default() };
    AuditLogger::start(store, &pipeline, &limits)
}

async fn a_record_reads_back_exactly_as_written(db: &TestDb) {
    let store = db.store().await;
    let r = full_record();
    let summary = store.write_batch(std::slice::from_ref(&r)).await.unwrap();
    assert_eq!(summary.inserted, 1);
    assert_eq!(store.get_interaction(r.interaction_id).await.unwrap(), r);
}

async fn created_at_is_when_it_happened_not_when_written(db: &TestDb) {
    let store = db.store().await;
    let mut r = Interaction::new("old question");
    r.created_at = Utc.with_ymd_and_hms(2021, 3, 4, 5, 6, 7).unwrap();
    store.write_batch(std::slice::from_ref(&r)).await.unwrap();
    assert_eq!(store.get_interaction(r.interaction_id).await.unwrap().created_at, r.created_at);
}

async fn redelivery_stores_nothing_twice(db: &TestDb) {
    let store = db.store().await;
    let batch = simple(Uuid::now_v7(), 50);
    assert_eq!(store.write_batch(&batch).await.unwrap().inserted, 50);
    let again = store.write_batch(&batch).await.unwrap();
    assert_eq!((again.inserted, again.duplicates, again.already_stored.len()), (0, 50, 50));
    // Half old, half new: only the new half is written, children included.
    let mut mixed = batch[..25].to_vec();
    mixed.extend(simple(batch[0].session_id, 25));
    let summary = store.write_batch(&mixed).await.unwrap();
    assert_eq!((summary.inserted, summary.duplicates), (25, 25));
    assert_eq!(store.count_interactions().await.unwrap(), 75);
    let back = store.get_interaction(batch[3].interaction_id).await.unwrap();
    assert_eq!(back.tool_calls.len(), 1, "children must not be duplicated by re-delivery");
}

async fn a_repeated_id_within_one_batch_is_stored_once(db: &TestDb) {
    let store = db.store().await;
    let r = full_record();
    let summary = store.write_batch(&[r.clone(), r.clone()]).await.unwrap();
    assert_eq!((summary.inserted, summary.duplicates), (1, 1));
    assert_eq!(store.get_interaction(r.interaction_id).await.unwrap().tool_calls.len(), 2);
}

async fn two_producers_writing_one_session_at_once_lose_nothing(db: &TestDb) {
    let store = db.store().await;
    let shared_session = Uuid::now_v7();
    let other_session = Uuid::now_v7();
    let mut tasks = Vec::new();
    for _producer in 0..2 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let mut batch = simple(shared_session, 20);
                batch.extend(simple(other_session, 5));
                store.write_batch(&batch).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.count_interactions().await.unwrap(), 2 * 20 * 25);
    // And through two independent pipelines at once.
    let (a, b) = (logger(store.clone(), 7, 1 << 20), logger(store.clone(), 11, 1 << 20));
    for r in simple(shared_session, 300) {
        a.log(r);
    }
    for r in simple(shared_session, 300) {
        b.log(r);
    }
    let (ra, rb) = tokio::join!(a.shutdown(Duration::from_secs(30)), b.shutdown(Duration::from_secs(30)));
    assert!(ra.drained && rb.drained);
    assert_eq!(ra.stats.committed + rb.stats.committed, 600);
    assert_eq!(store.count_interactions().await.unwrap(), 1600);
}

async fn a_missing_record_is_not_found(db: &TestDb) {
    let store = db.store().await;
    assert!(matches!(store.get_interaction(Uuid::now_v7()).await, Err(StoreError::NotFound)));
}

async fn readiness_reports_pending_migrations(db: &TestDb) {
    let store = store::connect(&db.url, &Config::default().database).await.unwrap();
    let before = store.readiness().await.unwrap();
    assert!(!before.is_ready() && !before.pending_migrations.is_empty());
    store.migrate().await.unwrap();
    assert!(store.readiness().await.unwrap().is_ready());
    store.migrate().await.expect("migrating twice is a no-op");
}

async fn data_the_database_refuses_is_rejected_not_transient(db: &TestDb) {
    let store = db.store().await;
    let mut r = Interaction::new("bad");
    r.total_duration_ms = Some(-5);
    let err = store.write_batch(&[r]).await.unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
    assert!(!err.is_transient());
    assert_eq!(store.count_interactions().await.unwrap(), 0);
}

async fn bad_records_are_isolated_and_the_rest_of_the_batch_committed(db: &TestDb) {
    let store = db.store().await;
    // One batch of 1,000 with three records the database refuses (a CHECK constraint).
    let log = logger(store.clone(), 1000, 1 << 20);
    let mut batch = simple(Uuid::now_v7(), 1000);
    for i in [3, 500, 997] {
        batch[i].output_tokens = Some(-1);
    }
    let bad: BTreeSet<Uuid> = [3, 500, 997].iter().map(|&i| batch[i].interaction_id).collect();
    for r in batch {
        log.log(r);
    }
    let report = log.shutdown(Duration::from_secs(60)).await;
    assert_eq!((report.stats.committed, report.stats.dead_lettered, report.stats.rejected), (997, 3, 0));
    assert_eq!(report.stats.dropped_total(), 0);
    assert_eq!(store.count_interactions().await.unwrap(), 997);
    for id in &bad {
        assert!(matches!(store.get_interaction(*id).await, Err(StoreError::NotFound)));
    }
    let letters = store.list_dead_letters(None, 100).await.unwrap().items;
    assert_eq!(letters.iter().map(|l| l.interaction_id).collect::<BTreeSet<_>>(), bad);
    for letter in &letters {
        assert!(letter.error.to_lowercase().contains("constraint"), "reason is kept: {}", letter.error);
        let record: Interaction = serde_json::from_str(&letter.record).expect("the record is kept as JSON");
        assert_eq!(record.interaction_id, letter.interaction_id);
        assert_eq!(record.output_tokens, Some(-1));
        assert_eq!(letter.attempts, 1);
    }
    // Re-delivering a poison record counts another attempt; it does not add a row.
    let again = serde_json::from_str::<Interaction>(&letters[0].record).unwrap();
    let log = logger(store.clone(), 10, 1 << 20);
    log.log(again);
    log.shutdown(Duration::from_secs(30)).await;
    let letters = store.list_dead_letters(None, 100).await.unwrap().items;
    assert_eq!(letters.len(), 3);
    assert_eq!(letters.iter().map(|l| l.attempts).max(), Some(2));
}

async fn nul_bytes_are_sanitised_never_a_failure(db: &TestDb) {
    let store = db.store().await;
    let log = logger(store.clone(), 10, 1 << 20);
    let mut r = full_record();
    r.question = "why\0?".into();
    r.tool_calls[0].tool_observation = Some("bin\0ary".into());
    r.attributes.insert("raw".into(), serde_json::json!("a\u{0}b"));
    let id = r.interaction_id;
    assert_eq!(log.log_committed(r).await, Outcome::Committed);
    let back = store.get_interaction(id).await.unwrap();
    assert_eq!(back.question, "why\u{FFFD}?");
    assert_eq!(back.tool_calls[0].tool_observation.as_deref(), Some("bin\u{FFFD}ary"));
    assert_eq!(back.attributes["raw"], serde_json::json!("a\u{FFFD}b"));
    assert!(log.stats().snapshot().sanitized_fields >= 3);
    log.shutdown(Duration::from_secs(10)).await;
}

async fn oversized_fields_are_truncated_with_a_marker(db: &TestDb) {
    let store = db.store().await;
    let log = logger(store.clone(), 10, 100);
    let mut r = Interaction::new("q");
    r.final_answer = Some("x".repeat(1000));
    let id = r.interaction_id;
    assert_eq!(log.log_committed(r).await, Outcome::Committed);
    let answer = store.get_interaction(id).await.unwrap().final_answer.unwrap();
    assert!(answer.starts_with(&"x".repeat(100)) && answer.contains(TRUNCATION_MARKER), "{answer}");
    assert!(answer.ends_with("900 bytes]"), "{answer}");
    log.shutdown(Duration::from_secs(10)).await;
}

async fn a_waiting_producer_learns_about_duplicates(db: &TestDb) {
    let store = db.store().await;
    let log = logger(store.clone(), 10, 1 << 20);
    let r = full_record();
    assert_eq!(log.log_committed(r.clone()).await, Outcome::Committed);
    assert_eq!(log.log_committed(r).await, Outcome::Duplicate);
    log.shutdown(Duration::from_secs(10)).await;
}

/// Runs one statement on the test database over a connection of its own, behind the
/// store's back (to damage rows as a stray client or a bug could).
async fn execute_raw(db: &TestDb, sql: &str) {
    use sqlx::{Connection, Executor};
    if db.url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        conn.execute(sql).await.expect("raw statement");
    } else {
        let mut conn = sqlx::SqliteConnection::connect(&db.url).await.expect("connect");
        conn.execute(sql).await.expect("raw statement");
    }
}

/// Regression: a stored `status` that does not parse used to read back as `error`.
async fn a_stored_status_that_does_not_parse_is_a_decode_error(db: &TestDb) {
    let store = db.store().await;
    let r = full_record();
    store.write_batch(std::slice::from_ref(&r)).await.unwrap();
    let sql = format!(
        "UPDATE interactions SET status = 'exploded' WHERE CAST(interaction_id AS TEXT) = '{}'",
        r.interaction_id
    );
    execute_raw(db, &sql).await;
    let err = store.get_interaction(r.interaction_id).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Decode { column: "interactions.status", message } if message.contains("exploded")),
        "{err:?}"
    );
}

/// Regression: PostgreSQL de-duplicated dead letters within one call, SQLite did not;
/// both now keep one row per record, with the last reason, counting one attempt.
async fn dead_letters_repeated_in_one_call_are_one_row(db: &TestDb) {
    let store = db.store().await;
    let r = full_record();
    let first = DeadLetter::new(&r, "first reason");
    let second = DeadLetter::new(&r, "second reason");
    store.write_dead_letters(&[first, second]).await.unwrap();
    let letters = store.list_dead_letters(None, 10).await.unwrap().items;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].error.as_str(), letters[0].attempts), ("second reason", 1));
    // A later re-delivery counts as another attempt.
    store.write_dead_letters(&[DeadLetter::new(&r, "third reason")]).await.unwrap();
    let letters = store.list_dead_letters(None, 10).await.unwrap().items;
    assert_eq!((letters[0].error.as_str(), letters[0].attempts), ("third reason", 2));
}

both_backends! {
    a_stored_status_that_does_not_parse_is_a_decode_error,
    dead_letters_repeated_in_one_call_are_one_row,
    a_record_reads_back_exactly_as_written,
    created_at_is_when_it_happened_not_when_written,
    redelivery_stores_nothing_twice,
    a_repeated_id_within_one_batch_is_stored_once,
    two_producers_writing_one_session_at_once_lose_nothing,
    a_missing_record_is_not_found,
    readiness_reports_pending_migrations,
    data_the_database_refuses_is_rejected_not_transient,
    bad_records_are_isolated_and_the_rest_of_the_batch_committed,
    nul_bytes_are_sanitised_never_a_failure,
    oversized_fields_are_truncated_with_a_marker,
    a_waiting_producer_learns_about_duplicates,
}

/// PostgreSQL: 5,000 records through the pipeline are one batch and one transaction (every
/// row carries the same `xmin`, the id of the transaction that wrote it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_of_5000_is_committed_in_one_transaction() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    let pipeline = AsyncConfig {
        workers: 2,
        queue_size: 10_000,
        batch_size: 5_000,
        batch_interval_ms: 60_000,
        ..AsyncConfig::default()
    };
    let log = AuditLogger::start(store.clone(), &pipeline, &LimitsConfig::default());
    for r in simple(Uuid::now_v7(), 5_000) {
        log.log(r);
    }
    crate::common::wait_for_count(&*store, 5_000).await;
    let report = log.shutdown(Duration::from_secs(30)).await;
    assert_eq!((report.stats.batches, report.stats.committed), (1, 5_000));

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    for table in ["interactions", "tool_calls"] {
        let xids: i64 = sqlx::query_scalar(&format!("SELECT count(DISTINCT xmin::text) FROM {table}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(xids, 1, "{table} written by {xids} transactions");
    }
    let same: bool = sqlx::query_scalar(
        "SELECT (SELECT min(xmin::text) FROM interactions) = (SELECT min(xmin::text) FROM tool_calls)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(same, "children must commit in the parent's transaction");
    pool.close().await;
}

/// SQLite runs in WAL mode, so readers do not block the writer.
#[tokio::test]
async fn sqlite_uses_wal_mode() {
    let db = TestDb::sqlite();
    let _store = db.store().await;
    let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&pool).await.unwrap();
    assert_eq!(mode, "wal");
}
