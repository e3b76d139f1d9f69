//! The real `opsagent-audit` binary as a child process: `serve` started on a loopback
//! port in a working directory of the test's, its output in a log file; one-shot commands
//! (`migrate`, `query`, `export`, …) run to their end with their output captured. Every
//! child is killed and reaped when dropped (even after a panic).

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a server may take to answer `/healthz` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary in `dir`, with no `AUDIT_…` variable inherited from the test's environment.
pub fn bin(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_opsagent-audit"));
    c.current_dir(dir).env("RUST_LOG", "warn").stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AUDIT_") {
            c.env_remove(name);
        }
    }
    c
}

/// Longest a one-shot command (`migrate`, `show`, `export`, a refused start) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Kills and reaps the child when dropped, so a failing test leaves no process behind.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// Waits for the exit, polling; `None` if `timeout` passes first.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("poll the child") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a finished command did.
#[derive(Debug)]
pub struct Ran {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Its standard output (UTF-8; binary output goes to a file, not here).
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs a command to its end (bounded by [`COMMAND_TIMEOUT`]). Blocks the thread: from
/// an async test, wrap it in `tokio::task::block_in_place`.
pub fn run(c: &mut Command) -> Ran {
    let mut out = tempfile::tempfile().expect("stdout file");
    let mut err = tempfile::tempfile().expect("stderr file");
    c.stdout(out.try_clone().expect("stdout handle")).stderr(err.try_clone().expect("stderr handle"));
    let mut child = ChildGuard(c.spawn().expect("start the binary"));
    let status = child.wait_timeout(COMMAND_TIMEOUT);
    let read = |f: &mut File| {
        let mut text = String::new();
        f.rewind().expect("rewind output");
        f.read_to_string(&mut text).expect("read output");
        text
    };
    let (stdout, stderr) = (read(&mut out), read(&mut err));
    let status = status.unwrap_or_else(|| panic!("{c:?} did not finish within {COMMAND_TIMEOUT:?}:\n{stderr}"));
    Ran { code: status.code(), stdout, stderr }
}

/// How to start a server.
pub struct ServerBuilder {
    dir: PathBuf,
    db_url: String,
    host: String,
    port: Option<u16>,
    flags: Vec<String>,
    env: Vec<(String, String)>,
}

impl ServerBuilder {
    /// A server over `db_url`, working in `dir`, its spool in `dir/spool`.
    pub fn new(dir: &Path, db_url: &str) -> ServerBuilder {
        ServerBuilder {
            dir: dir.to_path_buf(),
            db_url: db_url.to_string(),
            host: "127.0.0.1".into(),
            port: None,
            flags: Vec::new(),
            env: vec![("AUDIT_SPOOL_DIR".into(), dir.join("spool").display().to_string())],
        }
    }

    /// Listens on `host` instead of 127.0.0.1.
    pub fn host(mut self, host: &str) -> Self {
        self.host = host.into();
        self
    }

    /// Listens on this port (a restart keeps its port); default: a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Adds a `serve` flag.
    pub fn flag(mut self, flag: &str) -> Self {
        self.flags.push(flag.into());
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, name: &str, value: impl ToString) -> Self {
        self.env.push((name.into(), value.to_string()));
        self
    }

    /// Starts the server and waits until `/healthz` answers; panics with its log if it
    /// exits or does not answer in time.
    pub async fn start(self) -> Server {
        let port = self.port.unwrap_or_else(super::free_port);
        let log = self.dir.join(format!("serve-{port}-{}.log", uuid::Uuid::now_v7().simple()));
        let out = std::fs::File::create(&log).expect("server log");
        let child = bin(&self.dir)
            .args(["--database-url", &self.db_url, "serve", "--listen", &format!("{}:{port}", self.host)])
            .args(&self.flags)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start serve");
        let mut server = Server { child, port, log };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let health = client.get(server.url("/healthz")).timeout(Duration::from_secs(2)).send().await;
            if health.is_ok_and(|r| r.status() == 200) {
                return server;
            }
            if let Some(status) = server.child.try_wait().expect("poll serve") {
                panic!("serve exited at start-up with {status}:\n{}", server.log_text());
            }
            assert!(Instant::now() < deadline, "serve did not answer /healthz within 30 s:\n{}", server.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A running `serve`.
pub struct Server {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
}

impl Server {
    /// URL of a path on the server.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `GET /readyz`: status code and body.
    pub async fn readyz(&self) -> (u16, Value) {
        let response = reqwest::Client::new().get(self.url("/readyz")).send().await.expect("readyz");
        (response.status().as_u16(), response.json().await.expect("readyz json"))
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 40 lines of the log.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Sends a signal (`TERM`, `KILL`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    /// Waits (bounded) for the exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll serve") {
                return status;
            }
            assert!(Instant::now() < deadline, "serve did not exit within {timeout:?}:\n{}", self.log_tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(timeout).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
