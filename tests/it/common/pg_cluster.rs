//! A private, throwaway PostgreSQL cluster for fault tests: they stop it, restart it and
//! kill its connections, which must never happen to the machine's shared server.
//!
//! `initdb` and `pg_ctl` come from `/usr/lib/postgresql/*/bin` (the newest), else PATH.
//! `initdb` refuses to run as root, so as root every command runs through
//! `runuser -u postgres --` in a temporary directory owned by `postgres`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

/// A PostgreSQL cluster in a temporary directory on a free loopback port. Stopped and
/// removed when dropped, even after a panic.
pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    sockets: PathBuf,
    log: PathBuf,
    port: u16,
    as_postgres: bool,
    _dir: tempfile::TempDir,
}

fn bin_dir() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((version, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return bin;
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if bin.join("initdb").exists() {
                return bin;
            }
        }
        panic!(
            "a private PostgreSQL cluster is needed for the fault tests: install the server package \
             (apt-get install postgresql); initdb/pg_ctl were not found under /usr/lib/postgresql/*/bin"
        )
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Lowest and highest port tried for a cluster: below the kernel's ephemeral range
/// (32768–60999 here), so no outgoing connection can take the port while the cluster is
/// stopped mid-test and make its restart fail.
const CLUSTER_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free loopback port below the ephemeral range.
fn free_port() -> u16 {
    use rand::Rng;
    for _ in 0..200 {
        let port = rand::rng().random_range(CLUSTER_PORTS);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {CLUSTER_PORTS:?}")
}

impl PgCluster {
    /// Creates and starts a cluster; panics with what to install if PostgreSQL's server
    /// binaries are missing.
    pub fn start() -> PgCluster {
        let bin = bin_dir().clone();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("audit-pg-").tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        std::fs::create_dir_all(&sockets).expect("socket dir");
        if as_postgres {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "chown of the cluster dir to postgres failed");
        }
        let log = dir.path().join("postgres.log");
        let mut cluster = PgCluster { bin, data, sockets, log, port: 0, as_postgres, _dir: dir };
        let data = cluster.data.to_string_lossy().into_owned();
        let out = cluster.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
        );
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        // A port taken between choosing and binding is retried with another.
        for attempt in 0..3 {
            cluster.port = free_port();
            if cluster.pg_ctl_start() {
                return cluster;
            }
            eprintln!("private PostgreSQL did not start on port {} (attempt {attempt})", cluster.port);
        }
        panic!("private PostgreSQL cluster did not start:\n{}", cluster.log_tail());
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args).current_dir(self._dir.path());
        command.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    }

    fn pg_ctl_start(&self) -> bool {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off \
             -c max_connections=60 -c shared_buffers=16MB",
            self.port,
            self.sockets.display()
        );
        let (data, log) = (self.data.to_string_lossy(), self.log.to_string_lossy());
        self.run("pg_ctl", &["-D", &data, "-l", &log, "-w", "-t", "30", "-o", &options, "start"]).status.success()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of a database in this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let mut admin = PgConnection::connect(&self.url("postgres")).await.expect("connect to private cluster");
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create database");
        admin.close().await.ok();
        self.url(name)
    }

    /// Stops it (fast shutdown: connections are cut), waiting until it is down.
    pub fn stop(&self) {
        let data = self.data.to_string_lossy();
        let out = self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "-t", "30", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// Starts it again on the same port and data; waits until it accepts connections.
    pub fn restart(&self) {
        assert!(self.pg_ctl_start(), "private PostgreSQL did not restart:\n{}", self.log_tail());
    }

    /// True while the server process runs.
    pub fn is_running(&self) -> bool {
        let data = self.data.to_string_lossy();
        self.run("pg_ctl", &["-D", &data, "status"]).status.success()
    }

    /// Kills every connection to `db` from the server side; returns how many.
    pub async fn terminate_backends(&self, db: &str) -> u64 {
        let mut admin = PgConnection::connect(&self.url("postgres")).await.expect("connect to private cluster");
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(db)
        .fetch_one(&mut admin)
        .await
        .expect("terminate backends");
        admin.close().await.ok();
        n as u64
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "-t", "10", "stop"]);
    }
}

/// Waits (bounded) until `f` is true.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
