//! Fault tests: the real server binary under load, against a private PostgreSQL cluster
//! that is stopped, restarted and has its connections killed; the server itself is sent
//! SIGTERM and SIGKILL. Each test sends records with distinct `interaction_id`s and at
//! the end compares the database with what was acknowledged: 0 lost, 0 duplicated,
//! every drop counted.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg_cluster::PgCluster;
use serde_json::{json, Value};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use uuid::Uuid;

/// The server binary, running.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn start(port: u16, db_url: &str, spool: &Path, work: &Path, ack: &str) -> Server {
        let log = work.join(format!("server-{}.log", Uuid::now_v7().simple()));
        let out = fs::File::create(&log).expect("server log");
        let child = Command::new(env!("CARGO_BIN_EXE_opsagent-audit"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database-url", db_url])
            .env_remove("AUDIT_CONFIG")
            .env("AUDIT_SPOOL_DIR", spool)
            .env("AUDIT_ASYNC_ACK", ack)
            .env("AUDIT_ASYNC_BATCH_INTERVAL_MS", "50")
            .env("AUDIT_ASYNC_SHUTDOWN_TIMEOUT", "20s")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start the server binary");
        let mut server = Server { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("server exited at start-up with {status}:\n{}", server.log_tail());
            }
            assert!(Instant::now() < deadline, "server did not listen within 30 s:\n{}", server.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for server") {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit within {timeout:?}:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn readyz(&self) -> (u16, Value) {
        let response = reqwest::Client::new().get(self.url("/readyz")).send().await.expect("readyz");
        (response.status().as_u16(), response.json().await.expect("readyz json"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Steady load: each task posts an array of `per_request` records every `interval` and
/// keeps the ids the server acknowledged (202, or `accepted` inside a partial answer).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(BTreeSet<Uuid>, usize)>>,
}

impl Load {
    fn start(port: u16, tasks: usize, per_request: usize, interval: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks)
            .map(|t| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let client = reqwest::Client::builder().timeout(Duration::from_secs(40)).build().expect("client");
                    let url = format!("http://127.0.0.1:{port}/api/v1/interactions");
                    let (mut acked, mut sent) = (BTreeSet::new(), 0usize);
                    let mut tick = tokio::time::interval(interval);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let body: Vec<Value> = (0..per_request)
                            .map(|i| {
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
                            })
                            .collect();
                        sent += per_request;
                        let Ok(response) = client.post(&url).json(&body).send().await else { continue };
                        let status = response.status().as_u16();
                        let Ok(answer) = response.json::<Value>().await else { continue };
                        if status != 202 && status != 503 {
                            panic!("unexpected answer {status}: {answer}");
                        }
                        for result in answer["results"].as_array().into_iter().flatten() {
                            if result["status"] == "accepted" {
                                let id = result["interaction_id"].as_str().expect("accepted id");
                                acked.insert(id.parse().expect("uuid"));
                            }
                        }
                    }
                    (acked, sent)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> (BTreeSet<Uuid>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = BTreeSet::new();
        let mut sent = 0;
        for task in self.tasks {
            let (a, s) = task.await.expect("load task");
            acked.extend(a);
            sent += s;
        }
        (acked, sent)
    }
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
    let server = Server::start(port, &s.url, &s.spool, s.work.path(), "durable");
    let load = Load::start(port, 2, 5, Duration::from_millis(25));
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
    let server = Server::start(port, &s.url, &s.spool, s.work.path(), "durable");
    let load = Load::start(port, 2, 20, Duration::from_millis(20));
    let mut killed = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        killed += s.cluster.terminate_backends("audit").await;
    }
    let (acked, _) = load.finish().await;
    assert!(killed > 0, "connections were killed");
    assert_nothing_lost(&server, &s.url, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_0_then_restart_keeps_everything() {
    let s = setup().await;
    let port = free_port();
    // Queued acknowledgements: records are only in memory when acknowledged, so this
    // checks that shutdown drains them.
    let mut server = Server::start(port, &s.url, &s.spool, s.work.path(), "queued");
    let load = Load::start(port, 2, 20, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "exit status {status}:\n{}", server.log_tail());
    let (acked, _) = load.finish().await;
    assert!(acked.len() > 100);
    drop(server);

    let server = Server::start(port, &s.url, &s.spool, s.work.path(), "durable");
    assert_nothing_lost(&server, &s.url, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_durable_mode_loses_no_acknowledged_record() {
    let s = setup().await;
    let port = free_port();
    let mut server = Server::start(port, &s.url, &s.spool, s.work.path(), "durable");
    let load = Load::start(port, 2, 20, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10));
    let (acked, _) = load.finish().await;
    assert!(acked.len() > 100);
    drop(server);

    let server = Server::start(port, &s.url, &s.spool, s.work.path(), "durable");
    assert_nothing_lost(&server, &s.url, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_spool_tail_after_a_kill_is_truncated_counted_and_the_rest_replayed() {
    let s = setup().await;
    let port = free_port();
    let mut server = Server::start(port, &s.url, &s.spool, s.work.path(), "durable");
    // With the database down everything acknowledged is in the spool.
    blocking(&s.cluster, PgCluster::stop).await;
    let load = Load::start(port, 1, 10, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10));
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
    let server = Server::start(port, &s.url, &s.spool, s.work.path(), "durable");
    let (_, body) = server.readyz().await;
    let pipeline = &body["pipeline"];
    assert_eq!(pipeline["spool_corrupt_records"], 1, "the torn frame is counted: {pipeline}");
    assert!(pipeline["spool_corrupt_bytes"].as_u64() > Some(0));
    let missing = assert_all_stored(&s.url, &acked, 1).await;
    assert!(missing.len() <= 1, "at most the torn record is lost, and it is counted");
    assert!(server.log_tail().contains("corrupt spool tail"), "the truncation is logged");
}
