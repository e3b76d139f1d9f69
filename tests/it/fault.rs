//! Fault tests: the real server binary under load, against a private PostgreSQL cluster
//! that is stopped, restarted and has its connections killed; the server itself is sent
//! SIGTERM and SIGKILL. Each test sends records with distinct `interaction_id`s and at
//! the end compares the database with what was acknowledged: 0 lost, 0 duplicated,
//! every drop counted.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::free_port;
use crate::common::load::Load;
use crate::common::pg_cluster::PgCluster;
use crate::common::server::{Server, ServerBuilder};
use serde_json::{json, Value};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use uuid::Uuid;

/// The server binary over the private cluster: durable or queued acknowledgements,
/// short batches, a 20 s shutdown deadline; the same port across restarts.
async fn start_server(port: u16, db_url: &str, spool: &Path, work: &Path, ack: &str) -> Server {
    ServerBuilder::new(work, db_url)
        .port(port)
        .env("AUDIT_SPOOL_DIR", spool.display())
        .env("AUDIT_ASYNC_ACK", ack)
        .env("AUDIT_ASYNC_BATCH_INTERVAL_MS", "50")
        .env("AUDIT_ASYNC_SHUTDOWN_TIMEOUT", "20s")
        .start()
        .await
}

/// The `i`-th record of load task `t`.
fn record(t: usize, i: usize) -> Value {
    json!({
        "interaction_id": Uuid::now_v7(),
        "session_id": format!("load-{t}"),
        "user_id": "fault-test",
        "question": format!("question {i} from task {t}"),
        "final_answer": "x".repeat(500),
        "tool_calls": [{"tool_name": "kubectl", "tool_input": "get pods",
                        "tool_observation": "y".repeat(1000), "sequence_number": 1,
                        "duration_ms": 12}],
    })
}

async fn stored(url: &str) -> (BTreeSet<Uuid>, u64) {
    let mut conn = PgConnection::connect(url).await.expect("connect to check");
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT interaction_id FROM interactions").fetch_all(&mut conn).await.expect("ids");
    let rows = ids.len() as u64;
    conn.close().await.ok();
    (ids.into_iter().collect(), rows)
}

/// Waits until every acknowledged record is stored; asserts none is duplicated.
async fn assert_all_stored(url: &str, acked: &BTreeSet<Uuid>, allowed_missing: usize) -> BTreeSet<Uuid> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ids, rows) = stored(url).await;
        assert_eq!(rows, ids.len() as u64, "an interaction is stored twice");
        let missing: BTreeSet<Uuid> = acked.difference(&ids).copied().collect();
        if missing.len() <= allowed_missing {
            return missing;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged records still missing after 60 s",
            missing.len(),
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every acknowledged record is stored once, and the server counted no drop.
async fn assert_nothing_lost(server: &Server, url: &str, acked: &BTreeSet<Uuid>) {
    assert_all_stored(url, acked, 0).await;
    let (_, body) = server.readyz().await;
    assert_eq!(dropped_total(&body["pipeline"]), 0, "{body}");
}

fn dropped_total(pipeline: &Value) -> u64 {
    [
        "dropped_queue_full",
        "dropped_shutdown",
        "dropped_closed",
        "rejected",
        "dropped_spool_full",
        "dropped_spool_error",
        "spool_corrupt_records",
    ]
    .iter()
    .map(|k| pipeline[k].as_u64().unwrap_or_else(|| panic!("counter {k} in {pipeline}")))
    .sum()
}

struct Setup {
    cluster: Arc<PgCluster>,
    url: String,
    work: tempfile::TempDir,
    spool: PathBuf,
}

async fn setup() -> Setup {
    let cluster = Arc::new(tokio::task::spawn_blocking(PgCluster::start).await.expect("start cluster"));
    let url = cluster.create_database("audit").await;
    let work = tempfile::tempdir().expect("work dir");
    let spool = work.path().join("spool");
    Setup { cluster, url, work, spool }
}

async fn blocking(cluster: &Arc<PgCluster>, f: fn(&PgCluster)) {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || f(&cluster)).await.expect("cluster operation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stopped_for_20s_under_load_loses_nothing() {
    let s = setup().await;
    let port = free_port();
    let server = start_server(port, &s.url, &s.spool, s.work.path(), "durable").await;
    let load = Load::start(port, 2, 5, Duration::from_millis(25), record);
    tokio::time::sleep(Duration::from_secs(3)).await;

    blocking(&s.cluster, PgCluster::stop).await;
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = server.readyz().await;
    assert_eq!((status, body["status"].as_str()), (200, Some("degraded")), "{body}");
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(outage.elapsed())).await;
    blocking(&s.cluster, PgCluster::restart).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked, sent) = load.finish().await;
    assert!(acked.len() > 2000, "a steady load was acknowledged through the outage: {} of {sent}", acked.len());
    assert_all_stored(&s.url, &acked, 0).await;
    let (status, body) = server.readyz().await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")), "{body}");
    let pipeline = &body["pipeline"];
    assert_eq!(dropped_total(pipeline), 0, "{pipeline}");
    assert!(pipeline["write_errors"].as_u64() > Some(0), "the outage was seen: {pipeline}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_mid_batch_lose_nothing() {
    let s = setup().await;
    let port = free_port();
    let server = start_server(port, &s.url, &s.spool, s.work.path(), "durable").await;
    let load = Load::start(port, 2, 20, Duration::from_millis(20), record);
    let mut killed = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        killed += s.cluster.terminate_backends("audit").await;
    }
    let (acked, _) = load.finish().await;
    assert!(killed > 0, "connections were killed");
    assert_nothing_lost(&server, &s.url, &acked).await;
}

/// Runs `ack` mode under load for 3 s, sends `signal`, then restarts the server (durable)
/// over the same spool and database: every acknowledged record is stored once, nothing
/// counted as dropped.
async fn stop_under_load_then_restart_keeps_everything(signal: &str, ack: &str) {
    let s = setup().await;
    let port = free_port();
    let mut server = start_server(port, &s.url, &s.spool, s.work.path(), ack).await;
    let load = Load::start(port, 2, 20, Duration::from_millis(20), record);
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.signal(signal);
    let status = server.wait_exit(Duration::from_secs(40)).await;
    if signal == "TERM" {
        assert!(status.success(), "exit status {status}:\n{}", server.log_tail());
    }
    let (acked, _) = load.finish().await;
    assert!(acked.len() > 100);
    drop(server);

    let server = start_server(port, &s.url, &s.spool, s.work.path(), "durable").await;
    assert_nothing_lost(&server, &s.url, &acked).await;
}

/// Queued acknowledgements: records are only in memory when acknowledged, so this checks
/// that shutdown drains them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_0_then_restart_keeps_everything() {
    stop_under_load_then_restart_keeps_everything("TERM", "queued").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_durable_mode_loses_no_acknowledged_record() {
    stop_under_load_then_restart_keeps_everything("KILL", "durable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_spool_tail_after_a_kill_is_truncated_counted_and_the_rest_replayed() {
    let s = setup().await;
    let port = free_port();
    let mut server = start_server(port, &s.url, &s.spool, s.work.path(), "durable").await;
    // With the database down everything acknowledged is in the spool.
    blocking(&s.cluster, PgCluster::stop).await;
    let load = Load::start(port, 1, 10, Duration::from_millis(20), record);
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).await;
    let (acked, _) = load.finish().await;
    assert!(acked.len() > 100);
    drop(server);

    // Tear the last frame, as a crash in the middle of a write would.
    let mut segments: Vec<PathBuf> = fs::read_dir(&s.spool)
        .expect("spool dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let last = segments.last().expect("the spool holds segments");
    let len = fs::metadata(last).expect("segment").len();
    fs::OpenOptions::new().write(true).open(last).expect("open segment").set_len(len - 5).expect("truncate");

    blocking(&s.cluster, PgCluster::restart).await;
    let server = start_server(port, &s.url, &s.spool, s.work.path(), "durable").await;
    let (_, body) = server.readyz().await;
    let pipeline = &body["pipeline"];
    assert_eq!(pipeline["spool_corrupt_records"], 1, "the torn frame is counted: {pipeline}");
    assert!(pipeline["spool_corrupt_bytes"].as_u64() > Some(0));
    let missing = assert_all_stored(&s.url, &acked, 1).await;
    assert!(missing.len() <= 1, "at most the torn record is lost, and it is counted");
    assert!(server.log_text().contains("corrupt spool frames"), "the truncation is logged");
}

/// Regression (issue: `serve` exited when the database was unreachable at start-up): a
/// restart during an outage comes up anyway, acknowledges durably into the spool, and
/// migrates and drains once the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_started_while_the_database_is_down_comes_up_spools_then_migrates_and_drains() {
    let s = setup().await;
    // The database exists but was never migrated, and the cluster is down.
    blocking(&s.cluster, PgCluster::stop).await;
    let port = free_port();
    let server = start_server(port, &s.url, &s.spool, s.work.path(), "durable").await;
    let (status, body) = server.readyz().await;
    assert_eq!((status, body["status"].as_str()), (200, Some("degraded")), "{body}");

    let load = Load::start(port, 2, 10, Duration::from_millis(25), record);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let spooled = server.readyz().await.1["pipeline"]["spool_records"].as_u64().unwrap_or_default();
    assert!(spooled > 100, "acknowledged records wait in the spool: {spooled}");
    blocking(&s.cluster, PgCluster::restart).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, sent) = load.finish().await;
    assert!(acked.len() > 500, "acknowledged through the outage: {} of {sent}", acked.len());

    assert_all_stored(&s.url, &acked, 0).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.readyz().await;
        if status == 200 && body["status"] == "ready" {
            assert_eq!(dropped_total(&body["pipeline"]), 0, "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "not ready 30 s after the database returned: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = server.log_text();
    assert!(log.contains("database not ready at start-up"), "the wait is logged:\n{log}");
    assert!(log.contains("database ready"), "the recovery is logged:\n{log}");
}

/// Without a spool there is nowhere safe for records while the database is away: the
/// service still starts, says it is not ready, refuses records with 503 (the producer
/// keeps them), and takes them once the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_spool_started_while_the_database_is_down_refuses_until_it_answers() {
    let s = setup().await;
    blocking(&s.cluster, PgCluster::stop).await;
    let server = ServerBuilder::new(s.work.path(), &s.url)
        .env("AUDIT_SPOOL_ENABLED", "false")
        .env("AUDIT_ASYNC_BATCH_INTERVAL_MS", "50")
        .start()
        .await;
    let (status, body) = server.readyz().await;
    assert_eq!((status, body["status"].as_str()), (503, Some("database_unavailable")), "{body}");
    let client = reqwest::Client::new();
    let record = json!({"interaction_id": Uuid::now_v7(), "question": "is the database back?"});
    let response = client.post(server.url("/api/v1/interactions")).json(&record).send().await.expect("post");
    assert_eq!(response.status().as_u16(), 503);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["error"]["code"], "database_unavailable", "{answer}");

    blocking(&s.cluster, PgCluster::restart).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = client.post(server.url("/api/v1/interactions")).json(&record).send().await.expect("post");
        if response.status().as_u16() == 202 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused 30 s after the database returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id: Uuid = record["interaction_id"].as_str().expect("id").parse().expect("uuid");
    assert_all_stored(&s.url, &BTreeSet::from([id]), 0).await;
}
