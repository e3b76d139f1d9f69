//! `doctor` (issue #11 part 3), on PostgreSQL and SQLite: a clean database and spool
//! pass every check; each planted inconsistency (an orphan tool call written with
//! foreign keys off, a sequence gap, a deleted thought, an edited record, an unapplied
//! migration, garbage in the spool) is found by its check; `--repair` deletes the
//! orphans and sets the garbage aside, and never touches records or the chain. The
//! command's exit status and JSON output.

use std::path::Path;
use std::sync::Arc;

use opsagent_audit::config::SpoolConfig;
use opsagent_audit::doctor::{self, Options, Report, Status};
use opsagent_audit::model::{Interaction, Thought, ToolCall};
use opsagent_audit::pipeline::spool::Spool;
use opsagent_audit::store::Store;
use serde_json::Value;
use uuid::Uuid;

use crate::common::server::{bin, run};
use crate::common::TestDb;

/// A record with two thoughts and two tool calls referring to them, numbered
/// `tool_sequence` (1, 2 unless a test plants a gap).
fn record(n: usize, tool_sequence: [i32; 2]) -> Interaction {
    let mut r = Interaction::new(format!("why is web-{n} crashlooping?"));
    r.created_at = format!("2026-11-2{}T10:00:00Z", n % 3).parse().expect("a time");
    r.thoughts = vec![
        Thought { content: "look at the pod".into(), sequence_number: 1 },
        Thought { content: "then the limits".into(), sequence_number: 2 },
    ];
    r.tool_calls = tool_sequence
        .iter()
        .enumerate()
        .map(|(i, &seq)| ToolCall {
            tool_name: "kubectl".into(),
            tool_input: format!("get pods -n web-{i}"),
            tool_observation: Some("web-1 0/1 CrashLoopBackOff".into()),
            sequence_number: seq,
            duration_ms: Some(100),
            thought_sequence_number: Some(i as i32 + 1),
            error: None,
            ..ToolCall::new("", "")
        })
        .collect();
    r.final_answer = Some("raise the memory limit".into());
    r.metrics.insert("llm_first_token_ms".into(), 800);
    r
}

/// A migrated store holding `records`.
async fn store_with(db: &TestDb, records: &[Interaction]) -> Arc<dyn Store> {
    let store = db.store().await;
    store.write_batch(records).await.expect("write");
    store
}

/// A spool configuration over `dir`, with a cap any test machine has room for.
fn spool(dir: &Path) -> SpoolConfig {
    SpoolConfig { dir: dir.to_path_buf(), max_bytes: 1 << 20, ..SpoolConfig::default() }
}

async fn doctor(store: &dyn Store, dir: &Path, repair: bool) -> Report {
    doctor::run(store, &spool(dir), Options { repair }).await
}

fn check<'a>(report: &'a Report, name: &str) -> &'a doctor::Check {
    report.check(name).unwrap_or_else(|| panic!("no check {name} in {report:#?}"))
}

fn assert_status(report: &Report, name: &str, status: Status) {
    let c = check(report, name);
    assert_eq!(c.status, status, "{name}: {c:?}");
}

/// Writes a tool call whose interaction does not exist, with foreign keys off as a
/// person with a SQL client could.
async fn plant_orphan_tool_call(db: &TestDb, ghost: Uuid) {
    let insert = format!(
        "INSERT INTO tool_calls (interaction_id, tool_name, tool_input, sequence_number, created_at)
         VALUES ('{ghost}', 'kubectl', 'delete pod web-1', 1, '2026-11-20T10:00:00Z')"
    );
    if db.is_sqlite() {
        db.execute(&format!("PRAGMA foreign_keys = OFF; {insert};")).await;
    } else {
        db.execute(&format!("SET session_replication_role = replica; {insert};")).await;
    }
}

async fn a_clean_database_and_spool_pass_every_check(db: &TestDb) {
    let store = store_with(db, &(0..6).map(|n| record(n, [1, 2])).collect::<Vec<_>>()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // A spool with records left by a stopped server.
    let spooled = Spool::open(&spool(dir.path()), 16).expect("open the spool");
    spooled.append_durable(&record(9, [1, 2])).await.expect("spool a record");
    spooled.close().await;
    drop(spooled);

    let report = doctor(&*store, dir.path(), false).await;
    for c in &report.checks {
        assert_eq!(c.status, Status::Ok, "{c:?}");
    }
    assert!(report.is_ok());
    assert!(check(&report, "hash chain").detail.contains("3 days verified"), "{report:#?}");
    let spool_detail = &check(&report, "spool").detail;
    assert!(spool_detail.contains("1 segments, 1 records") && spool_detail.contains("no server"), "{spool_detail}");
}

async fn each_planted_problem_is_found_and_the_safe_ones_repaired(db: &TestDb) {
    let mut records: Vec<Interaction> = (0..6).map(|n| record(n, [1, 2])).collect();
    records.push(record(7, [1, 3]));
    let gapped = records[6].interaction_id;
    let store = store_with(db, &records).await;
    let ghost = Uuid::new_v4();
    plant_orphan_tool_call(db, ghost).await;
    let edited = records[0].interaction_id;
    db.execute(&format!("UPDATE interactions SET final_answer = 'all fine' WHERE interaction_id = '{edited}'")).await;
    let thinned = records[1].interaction_id;
    db.execute(&format!("DELETE FROM thoughts WHERE interaction_id = '{thinned}' AND sequence_number = 2")).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("0000000000000001.seg");
    std::fs::write(&garbage, b"this is not a spool segment").expect("write garbage");

    let report = doctor(&*store, dir.path(), false).await;
    assert!(!report.is_ok());
    let orphans = check(&report, "orphan tool calls");
    assert_eq!((orphans.status, orphans.repairable, orphans.repaired), (Status::Fail, true, false), "{orphans:?}");
    assert!(orphans.detail.starts_with("1 (e.g. ") && orphans.detail.contains(&ghost.to_string()), "{orphans:?}");
    assert_status(&report, "orphan thoughts", Status::Ok);
    assert_status(&report, "orphan metrics", Status::Ok);
    assert_status(&report, "migrations", Status::Ok);
    let gaps = check(&report, "tool call sequences");
    assert_eq!(gaps.status, Status::Warn, "{gaps:?}");
    assert!(gaps.detail.contains(&gapped.to_string()), "{gaps:?}");
    assert_status(&report, "thought sequences", Status::Ok);
    let childless = check(&report, "interactions without children");
    assert!(childless.status == Status::Warn && childless.detail.contains(&thinned.to_string()), "{childless:?}");
    let chain = check(&report, "hash chain");
    assert!(chain.status == Status::Fail && chain.detail.contains("modified"), "{chain:?}");
    assert!(!chain.repairable);
    let spooled = check(&report, "spool");
    assert!(spooled.status == Status::Fail && spooled.repairable, "{spooled:?}");
    assert!(spooled.detail.contains("0000000000000001.seg (no segment header)"), "{spooled:?}");
    assert!(garbage.exists(), "nothing is repaired without --repair");

    let repaired = doctor(&*store, dir.path(), true).await;
    let orphans = check(&repaired, "orphan tool calls");
    assert!(orphans.repaired && orphans.detail.ends_with("deleted 1"), "{orphans:?}");
    let spooled = check(&repaired, "spool");
    assert!(spooled.repaired, "{spooled:?}");
    assert!(!garbage.exists() && dir.path().join("0000000000000001.seg.unreadable").exists());
    assert!(!repaired.is_ok(), "the broken chain is evidence, never repaired");
    assert_eq!(repaired.failing().map(|c| c.name).collect::<Vec<_>>(), ["hash chain"]);

    let again = doctor(&*store, dir.path(), false).await;
    assert_status(&again, "orphan tool calls", Status::Ok);
    let spooled = check(&again, "spool");
    assert!(spooled.status == Status::Warn && spooled.detail.contains("set aside earlier"), "{spooled:?}");
    assert_status(&again, "hash chain", Status::Fail);
    // Records that exist were left alone, the edited one included.
    assert_eq!(store.count_interactions().await.expect("count"), records.len() as u64);
    let kept = store.get_interaction(edited).await.expect("the edited record");
    assert_eq!(kept.final_answer.as_deref(), Some("all fine"));
    assert_eq!(store.get_interaction(gapped).await.expect("gapped").tool_calls.len(), 2);
}

async fn an_unapplied_migration_fails(db: &TestDb) {
    let store = store_with(db, &[record(1, [1, 2])]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let latest: i64 = if db.is_sqlite() { 4 } else { 5 };
    db.execute(&format!("DELETE FROM _sqlx_migrations WHERE version = {latest}")).await;
    let report = doctor(&*store, dir.path(), false).await;
    let migrations = check(&report, "migrations");
    assert!(migrations.status == Status::Fail && migrations.detail.contains(&format!("{latest:04}")), "{migrations:?}");
    assert!(!report.is_ok());
}

both_backends!(
    a_clean_database_and_spool_pass_every_check,
    each_planted_problem_is_found_and_the_safe_ones_repaired,
    an_unapplied_migration_fails,
);

/// SQLite's full-text index is checked against the rows and rebuilt by `--repair`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_search_index_is_rebuilt() {
    let db = TestDb::sqlite();
    let store = store_with(&db, &(0..3).map(|n| record(n, [1, 2])).collect::<Vec<_>>()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Removes one row's entries from the index behind the triggers' back.
    db.execute(
        "INSERT INTO interactions_fts (interactions_fts, rowid, question, final_answer)
         SELECT 'delete', id, question, final_answer FROM interactions ORDER BY id LIMIT 1",
    )
    .await;
    let report = doctor(&*store, dir.path(), false).await;
    let index = check(&report, "search index");
    assert!(index.status == Status::Fail && index.repairable, "{index:?}");
    let repaired = doctor(&*store, dir.path(), true).await;
    assert!(check(&repaired, "search index").repaired, "{repaired:#?}");
    assert_status(&doctor(&*store, dir.path(), false).await, "search index", Status::Ok);
}

/// A spool a server holds is inspected read-only: reported as held, never repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_held_by_a_server_is_only_read() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Spool::open(&spool(dir.path()), 16).expect("open the spool");
    server.append_durable(&record(1, [1, 2])).await.expect("spool a record");
    let garbage = dir.path().join("00000000000000ff.seg");
    std::fs::write(&garbage, b"garbage").expect("write garbage");

    let report = doctor(&*store, dir.path(), true).await;
    let spooled = check(&report, "spool");
    assert!(spooled.detail.contains("held by a running server"), "{spooled:?}");
    assert!(spooled.status == Status::Fail && !spooled.repaired, "{spooled:?}");
    assert!(garbage.exists(), "a held spool is not touched");
    // The server still owns its spool: it keeps appending.
    server.append_durable(&record(2, [1, 2])).await.expect("the server keeps its spool");
    server.close().await;
}

/// `doctor` exits 1 naming the failing check, 0 once `--repair` fixed it; `--format
/// json` prints the report as one document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_command_exits_1_when_a_check_fails() {
    let db = TestDb::sqlite();
    store_with(&db, &[record(1, [1, 2])]).await.close().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let doctor = |args: &[&str]| {
        let mut c = bin(dir.path());
        c.args(["--database-url", &db.url, "doctor"]).args(args);
        run(&mut c)
    };
    let ran = doctor(&[]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("orphan tool calls") && ran.stdout.contains(" 0 fail"), "{ran:?}");

    plant_orphan_tool_call(&db, Uuid::new_v4()).await;
    let ran = doctor(&["--format", "json"]);
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("orphan tool calls"), "{ran:?}");
    let json: Value = serde_json::from_str(&ran.stdout).expect("the report is JSON");
    let orphans = json["checks"].as_array().expect("checks").iter().find(|c| c["name"] == "orphan tool calls");
    let orphans = orphans.expect("the orphan check");
    assert_eq!((orphans["status"].as_str(), orphans["repairable"].as_bool()), (Some("fail"), Some(true)));

    let ran = doctor(&["--repair"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("repaired"), "{ran:?}");
    assert_eq!(doctor(&[]).code, Some(0));
}
