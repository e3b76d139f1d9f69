//! The private PostgreSQL cluster harness (`common::pg_cluster`) works: it survives a
//! stop/restart with its data, kills connections on request, runs side by side with
//! another cluster, and leaves neither a process nor a directory behind when dropped.
//!
//! Blocking harness calls run under `block_in_place` on a multi-threaded runtime; every
//! `pg_ctl` call is bounded by its own `-t`, and each test by `LIMIT`.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::pg_cluster::PgCluster;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};
use tokio::task::block_in_place;

const LIMIT: Duration = Duration::from_secs(120);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, test).await.expect("test exceeded its time limit")
}

/// Runs a blocking harness call, printing how long it took.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = block_in_place(f);
    eprintln!("{what}: {:?}", started.elapsed());
    out
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

async fn connect_fails(url: &str) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url)).await, Ok(Err(_)))
}

fn postmaster_pid(data: &Path) -> u32 {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).expect("postmaster.pid");
    text.lines().next().and_then(|l| l.trim().parse().ok()).expect("pid on the first line of postmaster.pid")
}

/// Alive and not a zombie (an unreaped zombie in a container without an init counts as gone).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_stop_and_restart() {
    bounded(async {
        let cluster = timed("start", PgCluster::start);
        assert_ne!(cluster.port(), 5432, "never the shared server");
        assert!(cluster.is_running());
        let url = cluster.create_database("survive").await;
        assert_eq!(url, format!("postgres://postgres@127.0.0.1:{}/survive", cluster.port()));

        let mut conn = connect(&url).await;
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text NOT NULL)").await.expect("create table");
        conn.execute("INSERT INTO t VALUES (1, 'kept')").await.expect("insert");

        timed("stop (fast)", || cluster.stop());
        assert!(!cluster.is_running(), "stopped");
        assert!(conn.execute("SELECT 1").await.is_err(), "a held connection is cut by the stop");
        assert!(connect_fails(&url).await, "no new connection while stopped");

        timed("restart", || cluster.restart());
        assert!(cluster.is_running(), "running again");
        let mut conn = connect(&url).await;
        let note: String = sqlx::query_scalar("SELECT note FROM t WHERE id = 1")
            .fetch_one(&mut conn)
            .await
            .expect("the row is still there after restart");
        assert_eq!(note, "kept");
        conn.close().await.ok();
        timed("drop", || drop(cluster));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_backends_cuts_held_connections() {
    bounded(async {
        let cluster = timed("start", PgCluster::start);
        let url = cluster.create_database("victim").await;
        let mut held = connect(&url).await;
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut held).await.expect("held connection works");
        assert_eq!(one, 1);

        let killed = cluster.terminate_backends("victim").await;
        assert!(killed >= 1, "terminated {killed} backends");
        assert!(sqlx::query("SELECT 1").execute(&mut held).await.is_err(), "the held connection is dead");

        // The server itself is unharmed: new connections work.
        let mut fresh = connect(&url).await;
        fresh.execute("SELECT 1").await.expect("a new connection works");
        fresh.close().await.ok();
        assert_eq!(cluster.terminate_backends("nobody").await, 0, "no connections to an unknown database");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_run_side_by_side() {
    bounded(async {
        let started = Instant::now();
        let (a, b) =
            tokio::join!(tokio::task::spawn_blocking(PgCluster::start), tokio::task::spawn_blocking(PgCluster::start));
        let (a, b) = (a.expect("start a"), b.expect("start b"));
        eprintln!("two clusters started concurrently: {:?}", started.elapsed());
        assert_ne!(a.port(), b.port());
        assert_ne!(a.data_dir(), b.data_dir());
        for cluster in [&a, &b] {
            let mut conn = connect(&cluster.url("postgres")).await;
            let port: String = sqlx::query_scalar("SELECT current_setting('port')")
                .fetch_one(&mut conn)
                .await
                .expect("query the cluster");
            assert_eq!(port, cluster.port().to_string(), "each URL reaches its own cluster");
            conn.close().await.ok();
        }
        // Stopping one leaves the other running.
        block_in_place(|| a.stop());
        assert!(!a.is_running());
        assert!(b.is_running());
        connect(&b.url("postgres")).await.close().await.ok();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_removes_process_and_directory() {
    bounded(async {
        let cluster = timed("start", PgCluster::start);
        let url = cluster.url("postgres");
        // A connection still open at drop time must not keep anything alive.
        let mut held = connect(&url).await;
        held.execute("SELECT 1").await.expect("connected");

        let data = cluster.data_dir().to_path_buf();
        let root = data.parent().expect("temp dir").to_path_buf();
        let pid_file = data.join("postmaster.pid");
        let pid = postmaster_pid(&data);
        assert!(process_alive(pid), "postmaster {pid} runs");

        timed("drop", || drop(cluster));
        assert!(!pid_file.exists(), "postmaster.pid is gone");
        assert!(!data.exists(), "data directory removed");
        assert!(!root.exists(), "temp directory removed");
        assert!(!process_alive(pid), "postmaster {pid} has exited");
        assert!(connect_fails(&url).await, "nothing listens on the port any more");
        assert!(held.execute("SELECT 1").await.is_err(), "the held connection is dead");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_after_a_panic_still_cleans_up() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = tokio::task::spawn_blocking(move || {
        let cluster = PgCluster::start();
        tx.send((cluster.data_dir().to_path_buf(), postmaster_pid(cluster.data_dir()), cluster.url("postgres")))
            .unwrap();
        panic!("a fault test failing with the cluster in scope");
    })
    .await;
    assert!(result.is_err_and(|e| e.is_panic()), "the task panicked");
    let (data, pid, url) = rx.recv().expect("cluster details");
    assert!(!data.exists(), "data directory removed after the panic");
    assert!(!process_alive(pid), "postmaster {pid} has exited after the panic");
    assert!(connect_fails(&url).await, "nothing listens on the port any more");
}
