//! Test helpers, in one place: a fresh PostgreSQL database per test (as `sqlx::test`
//! does), SQLite temp files, `spawn_app` starting the service the way `serve` does
//! ([`Application::build`]) on a free loopback port, the real binary as a child process
//! ([`server`]), private PostgreSQL clusters for fault tests ([`pg_cluster`]), private
//! RabbitMQ brokers for the distributed-mode tests ([`rabbit`]), free ports
//! and bounded waiting.
//!
//! PostgreSQL comes from `AUDIT_TEST_DATABASE_URL` when set, else the machine's server on
//! 127.0.0.1:5432. If none answers, the test fails with what to start; it never skips.
#![allow(dead_code)]

pub mod load;
pub mod pg_cluster;
pub mod rabbit;
pub mod server;
pub mod spool;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opsagent_audit::api::{router, AppState, Application, Authenticator};
use opsagent_audit::config::{AsyncConfig, Config, LimitsConfig};
use opsagent_audit::pipeline::{AuditLogger, ShutdownReport};
use opsagent_audit::store::{self, Store};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

/// A free loopback port, from the kernel (bind to port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local addr").port()
}

/// Waits until `check` holds, polling; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The server tests connect to for PostgreSQL (administrative database).
pub fn postgres_admin_url() -> String {
    std::env::var("AUDIT_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > base.find("://").map_or(0, |p| p + 2) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{db}?{q}"),
        None => format!("{prefix}/{db}"),
    }
}

/// A database that exists for one test and is dropped after it.
pub struct TestDb {
    /// URL of the database.
    pub url: String,
    name: String,
    admin_url: String,
    /// Keeps a SQLite file's directory alive.
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh, empty PostgreSQL database.
    pub async fn postgres() -> TestDb {
        let admin_url = postgres_admin_url();
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is required for these tests and is not reachable at {admin_url}: {e}\n\
                 Start the local server (e.g. `pg_ctlcluster 15 main start`), install it \
                 (`apt-get install postgresql`), or point AUDIT_TEST_DATABASE_URL at one."
            )
        });
        let name = format!("audit_test_{}", uuid::Uuid::new_v4().simple());
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create test database");
        admin.close().await.ok();
        TestDb { url: with_database(&admin_url, &name), name, admin_url, _dir: None }
    }

    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.db");
        TestDb {
            url: format!("sqlite://{}", path.display()),
            name: String::new(),
            admin_url: String::new(),
            _dir: Some(dir),
        }
    }

    /// True for a SQLite file.
    pub fn is_sqlite(&self) -> bool {
        self.url.starts_with("sqlite:")
    }

    /// Another fresh database of the same backend.
    pub async fn like(&self) -> TestDb {
        if self.is_sqlite() {
            TestDb::sqlite()
        } else {
            TestDb::postgres().await
        }
    }

    /// Runs SQL statements on the (migrated) database over a connection of its own, as
    /// someone with a SQL client would.
    pub async fn execute(&self, sql: &str) {
        self.store().await.close().await;
        if self.is_sqlite() {
            let mut c = sqlx::sqlite::SqliteConnection::connect(&self.url).await.expect("open SQLite");
            c.execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            c.close().await.ok();
        } else {
            let mut c = PgConnection::connect(&self.url).await.expect("connect PostgreSQL");
            c.execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            c.close().await.ok();
        }
    }

    /// Makes the database itself refuse any interaction whose question contains
    /// `REFUSE-ME` (a constraint violation, as bad data would be): the service must
    /// dead-letter it. A CHECK on PostgreSQL; SQLite cannot add one to a table, so a
    /// trigger raising ABORT (also a constraint error).
    pub async fn refuse_marked_questions(&self) {
        self.execute(if self.is_sqlite() {
            "CREATE TRIGGER refuse_marked BEFORE INSERT ON interactions WHEN NEW.question LIKE '%REFUSE-ME%' \
             BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
        } else {
            "ALTER TABLE interactions ADD CONSTRAINT refuse_marked CHECK (question NOT LIKE '%REFUSE-ME%')"
        })
        .await;
    }

    /// Opens and migrates the store.
    pub async fn store(&self) -> Arc<dyn Store> {
        let store = store::connect(&self.url, &Config::default().database).await.expect("open store");
        store.migrate().await.expect("migrate");
        store
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside any runtime guarantee; a private one does the async work.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await.ok()?;
                Some(())
            })
        })
        .join();
    }
}

/// A running service on a free loopback port, started as `serve` starts it.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// The server's pipeline.
    pub logger: AuditLogger,
    /// The server's store.
    pub store: Arc<dyn Store>,
    /// An HTTP client.
    pub client: reqwest::Client,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Option<ShutdownReport>>,
    _spool_dir: Option<tempfile::TempDir>,
}

impl TestApp {
    /// URL of a path on the server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Waits until `n` interactions are stored (bounded; panics after 20 s).
    pub async fn wait_for_count(&self, n: u64) {
        wait_for_count(&*self.store, n).await
    }

    /// Stops the server as SIGTERM would: drains the pipeline, closes the store.
    pub async fn stop(self) -> Option<ShutdownReport> {
        self.stop.cancel();
        self.server.await.expect("server task")
    }
}

/// Waits until the store holds `n` interactions (bounded; panics after 20 s).
pub async fn wait_for_count(store: &dyn Store, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let count = store.count_interactions().await.expect("count");
        if count >= n {
            assert_eq!(count, n, "more interactions stored than expected");
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {count} of {n} interactions stored after 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the service over `db` with `config` through [`Application::build`], as
/// `serve` does (it migrates the database). With `spool.enabled` (the default), the
/// spool lives in a temporary directory owned by the returned app.
pub async fn spawn_app_with(db: &TestDb, mut config: Config) -> TestApp {
    let mut spool_dir = None;
    if config.spool.enabled {
        let dir = tempfile::tempdir().expect("spool temp dir");
        config.spool.dir = dir.path().to_path_buf();
        spool_dir = Some(dir);
    }
    let mut app = spawn_app_keeping_spool(db, config).await;
    app._spool_dir = spool_dir;
    app
}

/// Starts the service over `db` with `config` as it is: the spool (if enabled) stays in
/// `config.spool.dir`, for tests that restart a service on the same directory.
pub async fn spawn_app_keeping_spool(db: &TestDb, mut config: Config) -> TestApp {
    config.database.url = Some(db.url.clone());
    config.server.listen = "127.0.0.1:0".parse().expect("loopback address");
    let spool_dir = None;
    let app = Application::build(config, false).await.expect("build the application");
    let address = format!("http://{}", app.local_addr());
    let (logger, store) = (app.logger(), app.store());
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until(stop.clone().cancelled_owned()));
    let server = tokio::spawn(async move { server.await.expect("server task").ok() });
    TestApp { address, logger, store, client: reqwest::Client::new(), stop, server, _spool_dir: spool_dir }
}

/// Serves the router over an already opened store and logger (for tests that need a
/// store in a state `Application::build` would change, e.g. unmigrated).
pub async fn spawn_router(store: Arc<dyn Store>, logger: AuditLogger, config: Config) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    let auth = Authenticator::new(&config.auth, &config.limits, |_| None).expect("tests configure tokens by digest");
    let state = AppState::new(logger.clone(), store.clone(), config, None, auth);
    let stop = CancellationToken::new();
    let signal = stop.clone().cancelled_owned();
    let shutdown_logger = logger.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, router(state)).with_graceful_shutdown(signal).await.expect("serve");
        Some(shutdown_logger.shutdown(Duration::from_secs(30)).await)
    });
    TestApp { address, logger, store, client: reqwest::Client::new(), stop, server, _spool_dir: None }
}

/// The samples of a `/metrics` text, which must parse as Prometheus exposition format: metric name (with its labels sorted, `name{a="x"}`) → value.
pub fn scrape_metrics(text: &str) -> HashMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed =
        prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("not valid exposition text: {e}\n{text}"));
    let mut out = HashMap::new();
    for sample in parsed.samples {
        let mut labels: Vec<String> = sample.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        labels.sort();
        let key = if labels.is_empty() {
            sample.metric.clone()
        } else {
            format!("{}{{{}}}", sample.metric, labels.join(","))
        };
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(key, value);
    }
    out
}

/// Starts the server with test-friendly pipeline settings (short batch interval).
pub async fn spawn_app(db: &TestDb) -> TestApp {
    spawn_app_with(db, fast_config()).await
}

/// Defaults with a 20 ms batch interval, so tests do not wait for partial batches.
pub fn fast_config() -> Config {
    Config {
        pipeline: AsyncConfig { batch_interval_ms: 20, ..AsyncConfig::default() },
        limits: LimitsConfig::default(),
        ..Config::default()
    }
}

/// Runs each listed `async fn NAME(&TestDb)` of the calling module as two tests,
/// `postgres::NAME` and `sqlite::NAME`, each on a fresh database.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::common::TestDb::postgres().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::common::TestDb::sqlite();
                    super::$name(&db).await;
                }
            )*
        }
    };
}
