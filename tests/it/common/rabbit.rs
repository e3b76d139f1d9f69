//! A private, throwaway RabbitMQ broker for the distributed-mode tests: they stop and
//! restart it, which must never happen to the machine's shared broker.
//!
//! Debian's `rabbitmq-server` run directly from `/usr/lib/rabbitmq/bin` (the `/usr/sbin`
//! wrappers switch user and log to `/var/log/rabbitmq`), with everything the machine's
//! broker fixes in `/etc/rabbitmq` set by environment instead: node name, listener
//! port, distribution port, data and log directories, plugins file, config files, and a
//! `HOME` holding the Erlang cookie that the server and `rabbitmqctl` share.
//!
//! `rabbitmq-server` exits 0 even when start-up fails, so readiness is
//! `rabbitmqctl await_startup`, never the exit code. Brokers take 4–7 s to start on two
//! cores and a lot of memory, so the tests that use one take [`exclusive`] first and run
//! one at a time.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::server::ChildGuard;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// Longest a start (or restart) may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Ports tried for the listener and the distribution port: below the ephemeral range,
/// for the reason `pg_cluster` gives, and apart from its range.
const BROKER_PORTS: std::ops::Range<u16> = 15_000..19_000;

static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for the whole of a test that starts a broker (and workers): such tests run one
/// at a time, whatever `--test-threads` says. (A test that panics releases it too.)
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

fn free_port() -> u16 {
    use rand::Rng;
    for _ in 0..200 {
        let port = rand::rng().random_range(BROKER_PORTS);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {BROKER_PORTS:?}")
}

/// A broker in a temporary directory on a free loopback port; stopped and removed when
/// dropped, even after a panic.
pub struct RabbitBroker {
    dir: tempfile::TempDir,
    port: u16,
    dist_port: u16,
    node: String,
    server: Option<ChildGuard>,
}

impl RabbitBroker {
    /// Creates and starts a broker; panics with what to install when RabbitMQ is missing.
    pub fn start() -> RabbitBroker {
        assert!(
            std::path::Path::new(SERVER).exists(),
            "a private RabbitMQ broker is needed for the distributed tests: apt-get install rabbitmq-server"
        );
        let dir = tempfile::Builder::new().prefix("audit-rabbit-").tempdir().expect("temp dir");
        let port = free_port();
        let mut dist_port = free_port();
        while dist_port == port {
            dist_port = free_port();
        }
        let broker = RabbitBroker { node: format!("t{port}@localhost"), dir, port, dist_port, server: None };
        let home = broker.home();
        std::fs::create_dir_all(&home).expect("broker home");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("AUDITTEST{port}COOKIE")).expect("cookie");
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).expect("cookie mode");
        std::fs::write(
            broker.dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\n\
                 collect_statistics_interval = 500\n\
                 log.console = false\n\
                 log.file.level = warning\n"
            ),
        )
        .expect("broker config");
        std::fs::write(broker.dir.path().join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(broker.dir.path().join("rabbitmq-env.conf"), "").expect("env file");
        let mut broker = broker;
        broker.launch();
        broker
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn env(&self, c: &mut Command) {
        let d = self.dir.path();
        c.env("HOME", self.home())
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("broker.pid"))
            // The Erlang distribution port on loopback too, not every interface.
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .stdin(Stdio::null());
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(CTL);
        self.env(&mut c);
        c.arg("-n").arg(&self.node).args(args);
        c.output().expect("run rabbitmqctl")
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.out")).expect("server output");
        let mut c = Command::new(SERVER);
        self.env(&mut c);
        c.stdout(log.try_clone().expect("log handle")).stderr(log);
        self.server = Some(ChildGuard(c.spawn().expect("start rabbitmq-server")));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = self.ctl(&["await_startup", "--timeout", "30"]);
            if out.status.success() {
                return;
            }
            if let Some(server) = self.server.as_mut() {
                if let Ok(Some(status)) = server.0.try_wait() {
                    panic!("rabbitmq-server exited at start-up with {status}:\n{}", self.log_tail());
                }
            }
            assert!(
                Instant::now() < deadline,
                "private RabbitMQ did not start within {START_TIMEOUT:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the broker cleanly (durable messages stay in its data directory).
    pub fn stop(&mut self) {
        let out = self.ctl(&["stop"]);
        assert!(out.status.success(), "rabbitmqctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        if let Some(mut server) = self.server.take() {
            server.wait_timeout(Duration::from_secs(30));
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.launch();
    }

    /// Messages in `queue` (ready and unacknowledged), from `rabbitmqctl list_queues`
    /// (quorum queues' counts lag by up to `collect_statistics_interval`).
    pub fn queue_messages(&self, queue: &str) -> Option<u64> {
        let out = self.ctl(&["list_queues", "-q", "--no-table-headers", "name", "messages"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next() == Some(queue)).then(|| parts.next().and_then(|n| n.parse().ok())).flatten()
        })
    }

    /// The end of the broker's logs, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut text = std::fs::read_to_string(self.dir.path().join("server.out")).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) {
            for entry in entries.flatten() {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for RabbitBroker {
    fn drop(&mut self) {
        if self.server.is_some() {
            let _ = self.ctl(&["stop"]);
            if let Some(mut server) = self.server.take() {
                if server.wait_timeout(Duration::from_secs(15)).is_none() {
                    let _ = server.0.kill();
                }
            }
        }
    }
}
