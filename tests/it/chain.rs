//! Tamper evidence (issue #9 part 4), on PostgreSQL and SQLite: a log written in several
//! batches over three days verifies; editing, deleting or adding rows with SQL is caught
//! and named; removing a whole day through retention is not a failure. On PostgreSQL,
//! concurrent writers chain without losing a block. The `verify` command's exit status.

use std::sync::Arc;

use chrono::NaiveDate;
use opsagent_audit::config::Config;
use opsagent_audit::model::{Interaction, Status, Thought, ToolCall};
use opsagent_audit::store::verify::{verify, DayStatus, ProblemKind, VerifyReport};
use opsagent_audit::store::{self, Store};
use serde_json::json;
use sqlx::{Connection, Executor};
use uuid::Uuid;

use crate::common::server::{bin, run};
use crate::common::TestDb;

const DAYS: [&str; 3] = ["2026-11-18", "2026-11-19", "2026-11-20"];

fn day(text: &str) -> NaiveDate {
    text.parse().expect("a day")
}

/// A record on `day` with what a round trip through a database could change: a
/// nanosecond time, text in several scripts and escapes, children out of sequence
/// order, and attributes with floats, big and negative integers, exponents, nesting.
/// Every fifth record has no children and no attributes.
fn record(day: &str, n: usize) -> Interaction {
    let mut r = Interaction::new(format!("为什么 pod web-{n} 崩溃？ \"quoted\" \\ tab\t✓"));
    r.created_at = format!("{day}T{:02}:{:02}:03.123456789Z", n % 24, n % 60).parse().expect("a time");
    if n.is_multiple_of(5) {
        return r;
    }
    r.user_id = Some(format!("user-{}", n % 3));
    r.endpoint = Some("/api/diagnose".into());
    r.model_name = Some("gpt-4o".into());
    r.provider = Some("openai".into());
    r.base_url = Some("https://api.openai.com/v1".into());
    r.cluster = Some("prod-east".into());
    r.client_ip = Some("10.0.0.7".into());
    r.thoughts = vec![
        Thought { content: "then check the limits".into(), sequence_number: 2 },
        Thought { content: "look at the pod — ça va".into(), sequence_number: 1 },
    ];
    r.tool_calls = vec![
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
    ];
    r.final_answer = Some(format!("raise the memory limit ({n})"));
    let failed = n.is_multiple_of(4);
    r.status = if failed { Status::Error } else { Status::Success };
    r.error = failed.then(|| "tool failed".into());
    r.http_status = Some(if failed { 500 } else { 200 });
    r.total_duration_ms = Some(5230 + n as i64);
    r.assistant_duration_ms = Some(4100);
    r.parse_duration_ms = Some(0);
    r.metrics.insert("llm_first_token_ms".into(), 800);
    r.metrics.insert("a_metric".into(), -1);
    r.input_tokens = Some(1200);
    r.output_tokens = Some(300);
    r.attributes = json!({
        "float": 0.1, "third": 1.0 / 3.0, "int_float": 1.0, "exp": 1e300, "huge": 1e20, "tiny": 5e-324,
        "u64_max": u64::MAX, "i64_min": i64::MIN, "neg_zero": -0.0,
        "nested": {"z": [1, "two", null, true, {"k": 2.5e-3}], "a": "ü\u{1F600}\\\"", "": {}},
        "n": n,
    })
    .as_object()
    .expect("an object")
    .clone();
    r
}

fn records(day: &str, range: std::ops::Range<usize>) -> Vec<Interaction> {
    range.map(|n| record(day, n)).collect()
}

/// What was written, to pick records to tamper with.
struct Written {
    store: Arc<dyn Store>,
    /// Per day, the records stored.
    by_day: Vec<Vec<Interaction>>,
}

/// Writes the three days in batches: one a day, one spanning two days, one with
/// repeats of stored records (and a repeat within the batch), one of repeats only.
async fn write_log(db: &TestDb) -> Written {
    let store = db.store().await;
    let [d1, d2, d3] = DAYS;
    let a = records(d1, 0..10);
    let b = records(d2, 0..10);
    let c: Vec<Interaction> = records(d1, 10..15).into_iter().chain(records(d2, 10..15)).collect();
    let mut d = records(d3, 0..4);
    d.extend(a[..3].iter().cloned());
    d.push(d[0].clone());
    let f = records(d3, 4..14);
    for (batch, fresh) in [(&a, 10), (&b, 10), (&c, 10), (&d, 4), (&b, 0), (&f, 10)] {
        assert_eq!(store.write_batch(batch).await.expect("write a batch").inserted, fresh);
    }
    let by_day = vec![
        a.iter().chain(&c[..5]).cloned().collect(),
        b.iter().chain(&c[5..]).cloned().collect(),
        d[..4].iter().chain(&f).cloned().collect(),
    ];
    Written { store, by_day }
}

async fn verify_all(store: &dyn Store) -> VerifyReport {
    verify(store, None, None).await.expect("verify runs")
}

/// Runs SQL on the test database directly, as someone with database access would.
async fn sql(db: &TestDb, statement: &str) -> u64 {
    if db.url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        c.execute(statement).await.unwrap_or_else(|e| panic!("{statement}: {e}")).rows_affected()
    } else {
        let mut c = sqlx::SqliteConnection::connect(&db.url).await.expect("connect");
        c.execute(statement).await.unwrap_or_else(|e| panic!("{statement}: {e}")).rows_affected()
    }
}

/// A UUID literal in the database's dialect.
fn uuid_literal(db: &TestDb, id: Uuid) -> String {
    if db.url.starts_with("postgres") {
        format!("'{id}'::uuid")
    } else {
        format!("'{id}'")
    }
}

/// Asserts the log is broken on `on` first, by `kind`, naming `id` when given.
fn assert_broken(report: &VerifyReport, on: &str, kind: ProblemKind, id: Option<Uuid>) {
    let (broken_day, problem) = report.first_problem().unwrap_or_else(|| panic!("verify passed: {report:#?}"));
    assert_eq!((broken_day, problem.kind), (day(on), kind), "{problem}");
    if let Some(id) = id {
        assert_eq!(problem.interaction_id, Some(id), "{problem}");
        assert!(problem.to_string().contains(&id.to_string()), "{problem}");
    }
    let broken = report.days.iter().filter(|d| matches!(d.status, DayStatus::Broken(_))).count();
    assert_eq!(broken, 1, "only the tampered day is broken: {report:#?}");
}

async fn a_log_written_in_batches_verifies(db: &TestDb) {
    let log = write_log(db).await;
    let report = verify_all(&*log.store).await;
    assert!(report.is_ok(), "{report:#?}");
    let days: Vec<(String, u64, u64, bool)> = report
        .days
        .iter()
        .map(|d| (d.day.to_string(), d.blocks, d.records, d.status == DayStatus::Ok && d.head.is_some()))
        .collect();
    // Day 1: batch a and half of c; day 2: b and the other half; day 3: d (its fresh
    // part) and f. Repeats made no block.
    assert_eq!(days, [(DAYS[0].into(), 2, 15, true), (DAYS[1].into(), 2, 15, true), (DAYS[2].into(), 2, 14, true)]);
    // A range checks only its days.
    let one = verify(&*log.store, Some(day(DAYS[1])), Some(day(DAYS[1]))).await.expect("verify");
    assert_eq!(one.days.len(), 1);
    assert_eq!(one.days[0].day, day(DAYS[1]));
    // What was written reads back as hashed (the records survive the round trip whole).
    let back = log.store.get_interaction(log.by_day[0][1].interaction_id).await.expect("read back");
    assert_eq!(back.attributes, log.by_day[0][1].attributes);
}

async fn an_updated_answer_is_caught_as_modified(db: &TestDb) {
    let log = write_log(db).await;
    let target = log.by_day[1][3].interaction_id;
    let n = sql(
        db,
        &format!("UPDATE interactions SET final_answer = 'x' WHERE interaction_id = {}", uuid_literal(db, target)),
    )
    .await;
    assert_eq!(n, 1);
    assert_broken(&verify_all(&*log.store).await, DAYS[1], ProblemKind::Modified, Some(target));
}

async fn an_updated_tool_call_is_caught_as_modified(db: &TestDb) {
    let log = write_log(db).await;
    let target = log.by_day[2][7].interaction_id;
    let n = sql(
        db,
        &format!(
            "UPDATE tool_calls SET tool_input = 'get pods -A' WHERE interaction_id = {} AND sequence_number = 1",
            uuid_literal(db, target)
        ),
    )
    .await;
    assert_eq!(n, 1);
    assert_broken(&verify_all(&*log.store).await, DAYS[2], ProblemKind::Modified, Some(target));
}

async fn a_moved_time_is_caught_as_modified(db: &TestDb) {
    let log = write_log(db).await;
    let target = log.by_day[0][2].interaction_id;
    // Moved to another day: still found through its block, and its time is hashed.
    let moved = if db.url.starts_with("postgres") {
        "created_at + interval '1 day'"
    } else {
        "strftime('%Y-%m-%dT%H:%M:%fZ', created_at, '+1 day')"
    };
    sql(
        db,
        &format!("UPDATE interactions SET created_at = {moved} WHERE interaction_id = {}", uuid_literal(db, target)),
    )
    .await;
    let report = verify_all(&*log.store).await;
    let (broken_day, problem) = report.first_problem().expect("broken");
    assert_eq!((broken_day, problem.kind, problem.interaction_id), (day(DAYS[0]), ProblemKind::Modified, Some(target)));
}

async fn a_deleted_record_is_caught(db: &TestDb) {
    let log = write_log(db).await;
    let target = log.by_day[0][12].interaction_id;
    let n = sql(db, &format!("DELETE FROM interactions WHERE interaction_id = {}", uuid_literal(db, target))).await;
    assert_eq!(n, 1);
    assert_broken(&verify_all(&*log.store).await, DAYS[0], ProblemKind::Deleted, Some(target));
}

/// A copy of a stored row under a new id: once carrying the original's block, once
/// with no block at all.
async fn a_forged_row_is_caught_as_inserted(db: &TestDb) {
    let log = write_log(db).await;
    let original = log.by_day[1][4].interaction_id;
    for block in ["chain_block", "NULL"] {
        let forged = Uuid::now_v7();
        sql(
            db,
            &format!(
                "INSERT INTO interactions (interaction_id, session_id, user_id, question, final_answer, status,
                     created_at, attributes, chain_block)
                 SELECT {}, session_id, user_id, question, final_answer, status, created_at, attributes, {block}
                 FROM interactions WHERE interaction_id = {}",
                uuid_literal(db, forged),
                uuid_literal(db, original)
            ),
        )
        .await;
        assert_broken(&verify_all(&*log.store).await, DAYS[1], ProblemKind::Inserted, Some(forged));
        sql(db, &format!("DELETE FROM interactions WHERE interaction_id = {}", uuid_literal(db, forged))).await;
    }
    assert!(verify_all(&*log.store).await.is_ok(), "the forged rows are gone again");
}

async fn a_removed_block_is_caught(db: &TestDb) {
    let log = write_log(db).await;
    // The first block of day 3 with its records: the chain now starts at block 2.
    let removed = sql(
        db,
        &format!(
            "DELETE FROM interactions WHERE chain_block = (SELECT block_id FROM chain_blocks WHERE day = '{}' AND seq = 1)",
            DAYS[2]
        ),
    )
    .await;
    assert_eq!(removed, 4);
    assert_eq!(sql(db, &format!("DELETE FROM chain_blocks WHERE day = '{}' AND seq = 1", DAYS[2])).await, 1);
    assert_broken(&verify_all(&*log.store).await, DAYS[2], ProblemKind::MissingBlock, None);
}

/// The last block of a day with its records: the day's row still counts it.
async fn a_removed_last_block_is_caught(db: &TestDb) {
    let log = write_log(db).await;
    sql(
        db,
        &format!(
            "DELETE FROM interactions WHERE chain_block = (SELECT block_id FROM chain_blocks WHERE day = '{}' AND seq = 2)",
            DAYS[0]
        ),
    )
    .await;
    sql(db, &format!("DELETE FROM chain_blocks WHERE day = '{}' AND seq = 2", DAYS[0])).await;
    assert_broken(&verify_all(&*log.store).await, DAYS[0], ProblemKind::MissingBlock, None);
}

async fn an_expired_day_still_verifies(db: &TestDb) {
    let log = write_log(db).await;
    let expired = log.store.expire_day(day(DAYS[0]), 4).await.expect("expire the oldest day");
    assert_eq!((expired.records, expired.blocks), (15, 2));
    let report = verify_all(&*log.store).await;
    assert!(report.is_ok(), "{report:#?}");
    assert!(matches!(report.days[0].status, DayStatus::Retired { .. }), "{report:#?}");
    assert_eq!((report.days[0].day, report.days[0].records), (day(DAYS[0]), 0));
    assert!(report.days[1..].iter().all(|d| d.status == DayStatus::Ok), "{report:#?}");

    // A late record of the retired day continues its chain from the anchor.
    let late = record(DAYS[0], 40);
    assert_eq!(log.store.write_batch(std::slice::from_ref(&late)).await.expect("write").inserted, 1);
    let report = verify_all(&*log.store).await;
    assert!(report.is_ok(), "{report:#?}");
    assert_eq!((report.days[0].blocks, report.days[0].records), (1, 1));
    // ... and is protected like any other.
    sql(
        db,
        &format!(
            "UPDATE interactions SET question = 'x' WHERE interaction_id = {}",
            uuid_literal(db, late.interaction_id)
        ),
    )
    .await;
    assert_broken(&verify_all(&*log.store).await, DAYS[0], ProblemKind::Modified, Some(late.interaction_id));
}

async fn records_written_with_the_chain_off_are_unchained(db: &TestDb) {
    let mut options = Config::default().database;
    options.hash_chain = false;
    let store = store::connect(&db.url, &options).await.expect("open");
    store.migrate().await.expect("migrate");
    store.write_batch(&records(DAYS[0], 0..5)).await.expect("write");
    let report = verify_all(&*store).await;
    assert!(report.is_ok(), "{report:#?}");
    assert_eq!(report.days.len(), 1);
    assert_eq!(
        (&report.days[0].status, report.days[0].unchained, report.days[0].head.as_deref()),
        (&DayStatus::Unchained, 5, None)
    );
    // Once the day is chained, an unchained record on it cannot be told from a forged one.
    let chained = db.store().await;
    chained.write_batch(&records(DAYS[0], 5..6)).await.expect("write");
    let report = verify_all(&*chained).await;
    assert_eq!(report.first_problem().map(|(_, p)| p.kind), Some(ProblemKind::Inserted));
}

/// The upgrade day: records stored before migration 0004 have no block, and the day is
/// chained from then on. Migration 0004 counted them per day, so `verify` expects exactly
/// that many unchained records on that day: it passes, and one more unchained record (a
/// forgery) is caught.
async fn records_stored_before_the_chain_existed_are_expected_on_the_upgrade_day(db: &TestDb) {
    let mut options = Config::default().database;
    options.hash_chain = false;
    let before = store::connect(&db.url, &options).await.expect("open");
    before.migrate().await.expect("migrate");
    before.write_batch(&records(DAYS[0], 0..5)).await.expect("write");
    // What migration 0004 does at upgrade time, over the rows stored before it.
    let day_of = if db.is_sqlite() { "substr(created_at, 1, 10)" } else { "(created_at AT TIME ZONE 'UTC')::date" };
    db.execute(&format!(
        "DELETE FROM chain_legacy; INSERT INTO chain_legacy (day, records) \
         SELECT {day_of}, count(*) FROM interactions GROUP BY 1"
    ))
    .await;
    let after = db.store().await;
    after.write_batch(&records(DAYS[0], 5..9)).await.expect("write");
    let report = verify_all(&*after).await;
    assert!(report.is_ok(), "{report:#?}");
    assert_eq!((report.days[0].records, report.days[0].unchained), (9, 5));
    // A sixth unchained record on that day is one too many.
    before.write_batch(&records(DAYS[0], 20..21)).await.expect("write");
    let report = verify_all(&*after).await;
    assert_eq!(report.first_problem().map(|(_, p)| p.kind), Some(ProblemKind::Inserted), "{report:#?}");
}

both_backends!(
    records_stored_before_the_chain_existed_are_expected_on_the_upgrade_day,
    a_log_written_in_batches_verifies,
    an_updated_answer_is_caught_as_modified,
    an_updated_tool_call_is_caught_as_modified,
    a_moved_time_is_caught_as_modified,
    a_deleted_record_is_caught,
    a_forged_row_is_caught_as_inserted,
    a_removed_block_is_caught,
    a_removed_last_block_is_caught,
    an_expired_day_still_verifies,
    records_written_with_the_chain_off_are_unchained,
);

/// Four writers at once, each batch spanning two days (so each takes two day locks):
/// no deadlock, no lost block, every record in exactly one block.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_chain_every_batch_on_postgres() {
    const WRITERS: usize = 4;
    const BATCHES: usize = 10;
    const PER_DAY: usize = 25;
    let db = TestDb::postgres().await;
    let store = db.store().await;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for b in 0..BATCHES {
                    let base = (w * BATCHES + b) * PER_DAY;
                    let mut batch = records(DAYS[0], base..base + PER_DAY);
                    batch.extend(records(DAYS[1], base..base + PER_DAY));
                    store.write_batch(&batch).await.expect("write a batch");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    let report = verify_all(&*store).await;
    assert!(report.is_ok(), "{report:#?}");
    let expected = (WRITERS * BATCHES) as u64;
    for d in &report.days {
        assert_eq!((d.blocks, d.records), (expected, expected * PER_DAY as u64), "{d:?}");
    }
    let chain_days = store.chain_days(None, None).await.expect("chain days");
    assert_eq!(
        chain_days.iter().map(|d| (d.blocks, d.records)).collect::<Vec<_>>(),
        [(expected as i64, (expected as usize * PER_DAY) as i64); 2]
    );
}

/// `verify` exits 0 on an intact log and 1, naming the record, on a tampered one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verify_command_exits_1_naming_the_broken_record() {
    let db = TestDb::sqlite();
    let log = write_log(&db).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let verify = |args: &[&str]| {
        let mut c = bin(dir.path());
        c.args(["--database-url", &db.url, "verify"]).args(args);
        run(&mut c)
    };
    let ran = verify(&[]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("3 days: 3 ok, 0 retired, 0 unchained, 0 broken"), "{ran:?}");
    assert!(ran.stdout.lines().filter(|l| l.contains(" OK  head ")).count() == 3, "{ran:?}");

    let target = log.by_day[2][0].interaction_id;
    sql(&db, &format!("UPDATE interactions SET final_answer = 'nothing happened' WHERE interaction_id = '{target}'"))
        .await;
    let ran = verify(&[]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains(&target.to_string()) && ran.stderr.contains("modified"), "{ran:?}");
    assert!(ran.stdout.contains("BROKEN"), "{ran:?}");
    // The days before it alone are fine.
    let ran = verify(&["--from", DAYS[0], "--to", DAYS[1]]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("2 days: 2 ok"), "{ran:?}");
    let ran = verify(&["--from", "someday"]);
    assert!(ran.code != Some(0) && ran.stderr.contains("--from"), "{ran:?}");
}
