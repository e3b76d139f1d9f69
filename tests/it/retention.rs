//! Retention (issue #11 part 2), on PostgreSQL and SQLite: ten days of records with
//! children; keeping 5 days removes exactly the older days (children too, no orphans,
//! counted with SQL), keeps the newer, and `verify` passes after. Archives read back
//! with the day's row count and content; a dry run changes nothing; an archive
//! directory that cannot be written deletes nothing; an expiry interrupted between
//! batches is named by `verify` and finished by the next run. The CLI's dry run.

use std::path::Path;

use arrow_array::{Array, StringArray};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use opsagent_audit::model::{Interaction, Thought, ToolCall};
use opsagent_audit::retention::{self, RunOptions};
use opsagent_audit::store::verify::{verify, ProblemKind};
use opsagent_audit::store::{Store, StoreError};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sqlx::Connection;

use crate::common::server::{bin, run};
use crate::common::TestDb;

/// Days of records, the newest on `NOW`'s day.
const DAYS: i64 = 10;
/// Records per day.
const PER_DAY: usize = 4;
/// Days kept.
const KEEP: u32 = 5;
/// Interactions per delete statement: smaller than a day, so every day takes batches.
const BATCH: u32 = 3;

fn now() -> DateTime<Utc> {
    "2026-11-20T12:00:00Z".parse().expect("a time")
}

/// The first day kept: `NOW - KEEP days`, so days 11–14 go and 15–20 stay.
fn cutoff() -> NaiveDate {
    "2026-11-15".parse().expect("a day")
}

fn record(day: NaiveDate, n: usize) -> Interaction {
    let mut r = Interaction::new(format!("why is pod web-{n} on {day} crashlooping?"));
    r.created_at = day.and_hms_opt(1 + n as u32, 0, 0).expect("a time").and_utc();
    r.thoughts = vec![
        Thought { content: "look at the pod".into(), sequence_number: 1 },
        Thought { content: "then the limits".into(), sequence_number: 2 },
    ];
    r.tool_calls = (1..=3)
        .map(|s| ToolCall {
            tool_name: "kubectl".into(),
            tool_input: format!("get pods -n web #{s}"),
            tool_observation: Some("web-1 0/1 CrashLoopBackOff".into()),
            sequence_number: s,
            duration_ms: Some(100),
            thought_sequence_number: Some(1),
            error: None,
            ..ToolCall::new("", "")
        })
        .collect();
    r.metrics.insert("llm_first_token_ms".into(), 800);
    r.metrics.insert("tool_ms".into(), 300);
    r.final_answer = Some("raise the memory limit".into());
    r
}

/// Ten days of records, each day written in two batches (two blocks per day).
async fn write_days(store: &dyn Store) -> Vec<Interaction> {
    let last = now().date_naive();
    let mut all = Vec::new();
    for back in 0..DAYS {
        let day = last - Duration::days(back);
        let records: Vec<Interaction> = (0..PER_DAY).map(|n| record(day, n)).collect();
        for half in records.chunks(PER_DAY / 2) {
            assert_eq!(store.write_batch(half).await.expect("write").inserted, half.len() as u64);
        }
        all.extend(records);
    }
    all
}

/// Rows per table and child rows whose interaction is gone, by SQL.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    interactions: i64,
    thoughts: i64,
    tool_calls: i64,
    metrics: i64,
    orphans: i64,
}

async fn counts(db: &TestDb) -> Counts {
    let orphans = ["thoughts", "tool_calls", "performance_metrics"]
        .map(|t| {
            format!(
                "(SELECT count(*) FROM {t} c WHERE NOT EXISTS \
                 (SELECT 1 FROM interactions i WHERE i.interaction_id = c.interaction_id))"
            )
        })
        .join(" + ");
    let statement = format!(
        "SELECT (SELECT count(*) FROM interactions), (SELECT count(*) FROM thoughts), \
         (SELECT count(*) FROM tool_calls), (SELECT count(*) FROM performance_metrics), {orphans}"
    );
    let row: (i64, i64, i64, i64, i64) = if db.is_sqlite() {
        let mut c = sqlx::SqliteConnection::connect(&db.url).await.expect("open SQLite");
        sqlx::query_as(&statement).fetch_one(&mut c).await.expect("count")
    } else {
        let mut c = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        sqlx::query_as(&statement).fetch_one(&mut c).await.expect("count")
    };
    Counts { interactions: row.0, thoughts: row.1, tool_calls: row.2, metrics: row.3, orphans: row.4 }
}

/// What `n` of the test's records hold.
fn counts_of(n: usize) -> Counts {
    let n = n as i64;
    Counts { interactions: n, thoughts: 2 * n, tool_calls: 3 * n, metrics: 2 * n, orphans: 0 }
}

fn expired_days() -> Vec<NaiveDate> {
    let first = now().date_naive() - Duration::days(DAYS - 1);
    first.iter_days().take_while(|d| *d < cutoff()).collect()
}

fn options(archive_dir: Option<&Path>, dry_run: bool) -> RunOptions {
    RunOptions { archive_dir: archive_dir.map(Path::to_path_buf), dry_run, batch_size: BATCH }
}

async fn old_days_go_with_their_children_and_newer_days_stay(db: &TestDb) {
    let store = db.store().await;
    let written = write_days(&*store).await;
    assert_eq!(counts(db).await, counts_of(written.len()));

    let plan = retention::plan(&*store, KEEP, now()).await.expect("plan");
    assert_eq!(plan.cutoff, cutoff());
    assert_eq!(plan.days.iter().map(|d| d.day).collect::<Vec<_>>(), expired_days());
    assert!(plan.days.iter().all(|d| d.records == PER_DAY as u64), "{plan:?}");

    let report = retention::run(&*store, &plan, &options(None, false)).await.into_result().expect("run");
    let expired = expired_days().len() * PER_DAY;
    assert_eq!(report.deleted(), expired as u64);
    assert!(report.days.iter().all(|d| d.blocks == 2 && d.archive.is_none()), "{report:?}");
    assert_eq!(counts(db).await, counts_of(written.len() - expired));
    for r in &written {
        let found = store.get_interaction(r.interaction_id).await;
        if r.created_at.date_naive() < cutoff() {
            assert!(matches!(found, Err(StoreError::NotFound)), "{} should be gone", r.created_at);
        } else {
            assert_eq!(found.expect("kept").question, r.question);
        }
    }
    let verified = verify(&*store, None, None).await.expect("verify");
    assert!(verified.is_ok(), "{verified:#?}");

    // A second run finds nothing left to do.
    let again = retention::plan(&*store, KEEP, now()).await.expect("plan");
    assert!(again.days.is_empty(), "{again:?}");
}

/// The question column of an archive, in file order.
fn archived_questions(path: &Path) -> Vec<String> {
    let file = std::fs::File::open(path).expect("open archive");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("a parquet file").build().expect("reader");
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.expect("a batch");
        let column = batch.column_by_name("question").expect("a question column");
        let questions = column.as_any().downcast_ref::<StringArray>().expect("text");
        out.extend((0..questions.len()).map(|i| questions.value(i).to_string()));
    }
    out
}

async fn archives_read_back_with_the_days_rows(db: &TestDb) {
    let store = db.store().await;
    let written = write_days(&*store).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("archive");
    let plan = retention::plan(&*store, KEEP, now()).await.expect("plan");
    let report = retention::run(&*store, &plan, &options(Some(&archive), false)).await.into_result().expect("run");

    for (outcome, day) in report.days.iter().zip(expired_days()) {
        let file = outcome.archive.as_ref().expect("archived");
        assert_eq!(file.path, archive.join(format!("interactions-{day}.parquet")));
        assert_eq!(std::fs::metadata(&file.path).expect("archive exists").len(), file.bytes);
        assert_eq!(retention::read_back_rows(&file.path).await.expect("reads back"), PER_DAY as u64);
        assert_eq!(file.rows, PER_DAY as u64);
        let mut expected: Vec<String> =
            written.iter().filter(|r| r.created_at.date_naive() == day).map(|r| r.question.clone()).collect();
        let mut questions = archived_questions(&file.path);
        expected.sort();
        questions.sort();
        assert_eq!(questions, expected);
    }
    let mut names: Vec<String> = std::fs::read_dir(&archive)
        .expect("list archive")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), expired_days().len(), "one file per day, no leftovers: {names:?}");
    assert_eq!(counts(db).await, counts_of(written.len() - expired_days().len() * PER_DAY));
}

async fn a_dry_run_changes_nothing(db: &TestDb) {
    let store = db.store().await;
    let written = write_days(&*store).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("archive");
    let plan = retention::plan(&*store, KEEP, now()).await.expect("plan");
    let report = retention::run(&*store, &plan, &options(Some(&archive), true)).await.into_result().expect("run");
    assert_eq!(
        report.days.iter().map(|d| (d.day, d.records)).collect::<Vec<_>>(),
        expired_days().into_iter().map(|d| (d, PER_DAY as u64)).collect::<Vec<_>>()
    );
    assert_eq!(report.deleted(), 0);
    assert!(report.days.iter().all(|d| d.archive.is_none()));
    assert_eq!(counts(db).await, counts_of(written.len()));
    assert!(!archive.exists(), "a dry run creates no archive directory");
    let verified = verify(&*store, None, None).await.expect("verify");
    assert!(verified.is_ok() && verified.days.iter().all(|d| d.status == opsagent_audit::store::verify::DayStatus::Ok));
}

async fn an_archive_dir_that_cannot_be_written_deletes_nothing(db: &TestDb) {
    let store = db.store().await;
    let written = write_days(&*store).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // A directory below a regular file cannot be created, even by root.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").expect("write");
    let archive = blocker.join("archive");
    let plan = retention::plan(&*store, KEEP, now()).await.expect("plan");
    let report = retention::run(&*store, &plan, &options(Some(&archive), false)).await;
    assert!(report.days.is_empty(), "{report:?}");
    let error = report.into_result().expect_err("the run fails").to_string();
    assert!(error.contains(&archive.display().to_string()) && error.contains("nothing deleted"), "{error}");
    assert_eq!(counts(db).await, counts_of(written.len()));
}

async fn an_interrupted_expiry_is_named_by_verify_and_finished_by_the_next_run(db: &TestDb) {
    let store = db.store().await;
    let written = write_days(&*store).await;
    let [first, second, ..] = expired_days()[..] else { panic!("two expired days") };
    // The first two steps of expire_day, then a stop: one batch of the first day gone,
    // all records of the second gone but its blocks not retired.
    store.mark_expiring(first).await.expect("mark");
    assert_eq!(store.delete_day_batch(first, 1).await.expect("one batch"), 1);
    store.mark_expiring(second).await.expect("mark");
    assert_eq!(store.delete_day_batch(second, 100).await.expect("whole day"), PER_DAY as u64);

    let verified = verify(&*store, None, None).await.expect("verify");
    let (day, problem) = verified.first_problem().expect("broken");
    assert_eq!((day, problem.kind), (first, ProblemKind::Deleted), "{problem}");
    assert!(problem.detail.contains("did not finish") && problem.detail.contains("retention run"), "{problem}");

    let plan = retention::plan(&*store, KEEP, now()).await.expect("plan");
    assert_eq!(plan.days.iter().map(|d| d.day).collect::<Vec<_>>(), expired_days(), "the emptied day is listed");
    assert_eq!(plan.days[1].records, 0);
    retention::run(&*store, &plan, &options(None, false)).await.into_result().expect("run");
    let verified = verify(&*store, None, None).await.expect("verify");
    assert!(verified.is_ok(), "{verified:#?}");
    assert_eq!(counts(db).await, counts_of(written.len() - expired_days().len() * PER_DAY));
}

both_backends!(
    old_days_go_with_their_children_and_newer_days_stay,
    archives_read_back_with_the_days_rows,
    a_dry_run_changes_nothing,
    an_archive_dir_that_cannot_be_written_deletes_nothing,
    an_interrupted_expiry_is_named_by_verify_and_finished_by_the_next_run,
);

/// `retention run --dry-run` prints the days and what would go, and deletes nothing;
/// without --dry-run the same command deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_command_reports_a_dry_run_and_then_deletes() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    // Relative to the real clock: the command plans against now.
    let today = Utc::now().date_naive();
    let mut records = Vec::new();
    for back in [1, 2, 8, 9] {
        records.extend((0..3).map(|n| record(today - Duration::days(back), n)));
    }
    store.write_batch(&records).await.expect("write");
    store.close().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let retention = |args: &[&str]| {
        let mut c = bin(dir.path());
        c.args(["--database-url", &db.url, "retention", "run", "--days", "5"]).args(args);
        run(&mut c)
    };
    let ran = retention(&["--dry-run"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("keeping 5 days: 2 day(s) before"), "{ran:?}");
    assert!(ran.stdout.contains("would delete 6 interactions"), "{ran:?}");
    for back in [8, 9] {
        let line = format!("{} ", today - Duration::days(back));
        assert!(ran.stdout.lines().any(|l| l.starts_with(&line) && l.contains("(dry run)")), "{ran:?}");
    }
    assert_eq!(counts(&db).await.interactions, 12);

    let ran = retention(&[]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("deleted 6 interactions"), "{ran:?}");
    assert_eq!(counts(&db).await, counts_of(6));
}
