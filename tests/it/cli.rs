//! The binary as an operator runs it: configuration errors (exit 2, naming the key),
//! the loopback guard, `migrate`, `show`, and `serve` stopped by SIGTERM with nothing lost,
//! on SQLite and PostgreSQL.
//!
//! Every child process runs in a temporary working directory with no `AUDIT_…` variable
//! inherited, and is killed if the test fails ([`ChildGuard`](crate::common::server::ChildGuard)).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::server::{bin, run, ChildGuard, Server, ServerBuilder, COMMAND_TIMEOUT};
use crate::common::{free_port, TestDb};
use opsagent_audit::config::Config;
use opsagent_audit::store;
use serde_json::{json, Value};
use uuid::Uuid;

/// Writes a config file into `dir`.
fn config_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write the config file");
    path
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("a.db").display())
}

/// Runs `migrate` with the given config file and environment; asserts a configuration
/// error (exit 2, nothing on stdout) and returns stderr.
fn config_error(dir: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> String {
    let mut c = bin(dir);
    c.args(["--database-url", &sqlite_url(dir)]);
    if let Some(config) = config {
        c.arg("--config").arg(config);
    }
    c.envs(env.iter().copied()).arg("migrate");
    let ran = run(&mut c);
    assert_eq!(ran.code, Some(2), "a configuration error exits 2: {ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");
    assert!(!dir.join("a.db").exists(), "nothing is touched before the configuration is valid");
    ran.stderr
}

#[test]
fn an_unknown_key_in_the_audit_section_exits_2_and_names_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Keys outside `audit:` belong to the agent and are ignored; inside it, a typo is an error.
    let path = config_file(dir.path(), "c.yaml", "server:\n  port: 8080\naudit:\n  async:\n    wrokers: 2\n");
    let err = config_error(dir.path(), Some(&path), &[]);
    assert!(err.contains("audit.async.wrokers"), "{err}");

    let path = config_file(dir.path(), "top.yaml", "audit:\n  enabeld: true\n");
    let err = config_error(dir.path(), Some(&path), &[]);
    assert!(err.contains("audit.enabeld"), "{err}");

    // The same through AUDIT_CONFIG instead of --config.
    let path = config_file(dir.path(), "env.yaml", "audit:\n  database:\n    hots: db\n");
    let err = config_error(dir.path(), None, &[("AUDIT_CONFIG", path.to_str().expect("utf-8 path"))]);
    assert!(err.contains("audit.database.hots"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_exits_2_and_names_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("audit:\n  async:\n    workers: \"many\"\n", "audit.async.workers"),
        ("audit:\n  async:\n    workers: many\n", "audit.async.workers"),
        ("audit:\n  async:\n    batch_size: -1\n", "audit.async.batch_size"),
        ("audit:\n  async:\n    shutdown_timeout: soon\n", "audit.async.shutdown_timeout"),
        ("audit:\n  async:\n    ack: sometimes\n", "audit.async.ack"),
        ("audit:\n  database:\n    port: 99999\n", "audit.database.port"),
        ("audit:\n  enabled: maybe\n", "audit.enabled"),
        ("audit:\n  async: 5\n", "audit.async"),
        // Valid types, invalid values.
        ("audit:\n  async:\n    workers: 0\n", "audit.async.workers"),
        ("audit:\n  retention:\n    cleanup_time: '25:00'\n", "audit.retention.cleanup_time"),
    ];
    for (yaml, key) in cases {
        let path = config_file(dir.path(), "c.yaml", yaml);
        let err = config_error(dir.path(), Some(&path), &[]);
        assert!(err.contains(key), "{yaml:?} should name {key}: {err}");
    }
    // The seed's `driver` key is checked when no URL overrides it.
    let path = config_file(dir.path(), "c.yaml", "audit:\n  database:\n    driver: oracle\n");
    let ran = run(bin(dir.path()).arg("--config").arg(&path).arg("migrate"));
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(ran.stderr.contains("audit.database.driver") && ran.stderr.contains("oracle"), "{ran:?}");
    assert!(!dir.path().join("opsagent-audit.db").exists(), "the default database was not created");
}

#[test]
fn an_unusable_config_file_exits_2_and_names_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.yaml");
    let err = config_error(dir.path(), Some(&missing), &[]);
    assert!(err.contains("missing.yaml"), "{err}");
    let broken = config_file(dir.path(), "broken.yaml", "audit:\n  async: [unclosed\n");
    let err = config_error(dir.path(), Some(&broken), &[]);
    assert!(err.contains("broken.yaml") && err.contains("YAML"), "{err}");
}

#[test]
fn a_bad_environment_override_exits_2_and_names_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("AUDIT_ASYNC_WORKERS", "abc", "audit.async.workers"),
        ("AUDIT_ASYNC_BATCH_SIZE", "lots", "audit.async.batch_size"),
        ("AUDIT_SPOOL_FULL_POLICY", "shrug", "audit.spool.full_policy"),
        ("AUDIT_ASYNC_SHUTDOWN_TIMEOUT", "soon", "audit.async.shutdown_timeout"),
        ("AUDIT_LIMITS_MAX_BODY_BYTES", "-5", "audit.limits.max_body_bytes"),
        ("AUDIT_ENABLED", "maybe", "audit.enabled"),
    ];
    for (var, value, key) in cases {
        let err = config_error(dir.path(), None, &[(var, value)]);
        assert!(err.contains(var) && err.contains(key), "{var}={value} should name {var} and {key}: {err}");
    }
}

#[test]
fn the_environment_beats_the_file_and_the_flag_beats_the_environment() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The file's bad value is replaced by the environment's good one.
    let path = config_file(dir.path(), "c.yaml", "audit:\n  async:\n    workers: many\n");
    let ran = run(bin(dir.path())
        .args(["--database-url", &sqlite_url(dir.path()), "--config"])
        .arg(&path)
        .arg("migrate")
        .env("AUDIT_ASYNC_WORKERS", "3"));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // --database-url wins over AUDIT_DATABASE_URL (which points nowhere usable).
    let flag_db = dir.path().join("flag.db");
    let ran = run(bin(dir.path())
        .args(["--database-url", &format!("sqlite://{}", flag_db.display()), "migrate"])
        .env("AUDIT_DATABASE_URL", "sqlite:///nonexistent-directory-for-opsagent-audit/x.db"));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(flag_db.exists(), "the flag's database was migrated");
}

#[test]
fn serve_refuses_a_public_address_without_insecure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sqlite_url(dir.path());
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let ran = run(bin(dir.path()).args(["--database-url", &db, "serve", "--listen", listen]));
        assert!(ran.code.is_some_and(|c| c != 0), "{listen}: {ran:?}");
        assert!(ran.stderr.contains("--insecure") && ran.stderr.contains("loopback"), "{listen}: {ran:?}");
    }
    // The address may come from AUDIT_LISTEN too.
    let ran = run(bin(dir.path()).args(["--database-url", &db, "serve"]).env("AUDIT_LISTEN", "0.0.0.0:0"));
    assert!(ran.code.is_some_and(|c| c != 0), "{ran:?}");
    assert!(ran.stderr.contains("--insecure") && ran.stderr.contains("loopback"), "{ran:?}");
}

#[test]
fn migrate_creates_the_schema_and_is_idempotent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sqlite_url(dir.path());
    for _ in 0..2 {
        let ran = run(bin(dir.path()).args(["--database-url", &db, "migrate"]));
        assert_eq!(ran.code, Some(0), "{ran:?}");
    }
    assert!(dir.path().join("a.db").exists(), "the SQLite file was created");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = store::connect(&db, &Config::default().database).await.expect("open the migrated store");
        let readiness = store.readiness().await.expect("readiness");
        assert!(readiness.is_ready(), "pending after migrate: {readiness:?}");
        assert_eq!(store.count_interactions().await.expect("count"), 0);
        store.close().await;
    });
}

#[test]
fn migrate_without_a_reachable_database_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let closed = free_port();
    let ran =
        run(bin(dir.path()).args(["--database-url", &format!("postgres://postgres@127.0.0.1:{closed}/x"), "migrate"]));
    assert_eq!(ran.code, Some(1), "{ran:?}");
    // Regression: the error chain was printed three times, its cause hidden behind
    // "pool timed out".
    assert_eq!(ran.stderr.matches("error:").count(), 1, "one error line: {ran:?}");
    assert_eq!(ran.stderr.matches("Connection refused").count(), 1, "the cause, once: {ran:?}");
    let ran = run(bin(dir.path()).args(["--database-url", "mysql://localhost/x", "migrate"]));
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("mysql://"), "{ran:?}");
}

#[test]
fn show_of_an_unknown_id_fails_with_a_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sqlite_url(dir.path());
    assert_eq!(run(bin(dir.path()).args(["--database-url", &db, "migrate"])).code, Some(0));
    for id in [Uuid::now_v7().to_string(), "no-such-key".to_string()] {
        let ran = run(bin(dir.path()).args(["--database-url", &db, "show", &id]));
        assert_eq!(ran.code, Some(1), "{ran:?}");
        assert!(ran.stdout.is_empty(), "{ran:?}");
        assert!(ran.stderr.contains("not found") && ran.stderr.contains(&id), "{ran:?}");
    }
}

// ---------------------------------------------------------------------------------------
// `serve` end to end.
// ---------------------------------------------------------------------------------------

/// Records with thoughts and tool calls, each with a fresh UUID.
fn records(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "interaction_id": Uuid::now_v7(),
                "question": format!("question {i}: why is web-{i} down?"),
                "thoughts": [{"content": format!("thought {i}.1")}, {"content": format!("thought {i}.2")}],
                "tool_calls": [{"tool_name": "kubectl", "tool_input": format!("get pod web-{i}")},
                               {"tool_name": "shell", "tool_input": "df -h"}],
                "final_answer": format!("answer {i}")
            })
        })
        .collect()
}

/// Posts `records` as one JSON array; asserts all were accepted.
async fn post_all(server: &Server, records: &[Value]) {
    let response = reqwest::Client::new()
        .post(server.url("/api/v1/interactions"))
        .json(&records)
        .send()
        .await
        .expect("post the records");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.expect("ingest answer is JSON");
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"].as_u64(), Some(records.len() as u64), "{answer}");
}

/// Runs `show` for every seventh record and compares what it prints with what was sent.
fn assert_shown(dir: &Path, db_url: &str, records: &[Value]) {
    for sent in records.iter().step_by(7) {
        let id = sent["interaction_id"].as_str().expect("id");
        let ran = run(bin(dir).args(["--database-url", db_url, "show", id]));
        assert_eq!(ran.code, Some(0), "show {id}: {ran:?}");
        let shown: Value = serde_json::from_str(&ran.stdout).expect("show prints JSON");
        assert_eq!(shown["interaction_id"], sent["interaction_id"], "{shown}");
        assert_eq!(shown["question"], sent["question"], "{shown}");
        assert_eq!(shown["final_answer"], sent["final_answer"], "{shown}");
        let tools: Vec<&Value> =
            shown["tool_calls"].as_array().expect("tool calls").iter().map(|t| &t["tool_input"]).collect();
        assert_eq!(tools, [&sent["tool_calls"][0]["tool_input"], &json!("df -h")], "{shown}");
        let thoughts: Vec<&Value> =
            shown["thoughts"].as_array().expect("thoughts").iter().map(|t| &t["content"]).collect();
        assert_eq!(thoughts, [&sent["thoughts"][0]["content"], &sent["thoughts"][1]["content"]], "{shown}");
    }
}

/// How many interactions the database holds, opened directly.
async fn stored(db_url: &str) -> u64 {
    let store = store::connect(db_url, &Config::default().database).await.expect("open the store");
    let n = store.count_interactions().await.expect("count");
    store.close().await;
    n
}

/// `serve`, 50 records, SIGTERM at once: exit 0 and every record in the database.
async fn serve_then_sigterm_keeps_every_record(dir: &Path, db_url: &str, ack: &str) {
    let mut server = ServerBuilder::new(dir, db_url).env("AUDIT_ASYNC_ACK", ack).start().await;
    // Regression: logs carried colour codes when stderr was a file.
    assert!(!server.log_text().contains('\u{1b}'), "no terminal escapes in a log file:\n{}", server.log_text());
    let sent = records(50);
    post_all(&server, &sent).await;
    // Stop at once: records still queued (batch interval 200 ms) must be written, not lost.
    let status = server.terminate(Duration::from_secs(25)).await;
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
    assert_eq!(stored(db_url).await, 50, "after SIGTERM ({ack} acks):\n{}", server.log_text());
    assert_shown(dir, db_url, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_sqlite_then_sigterm_keeps_every_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    serve_then_sigterm_keeps_every_record(dir.path(), &sqlite_url(dir.path()), "queued").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgres_then_sigterm_keeps_every_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::postgres().await;
    serve_then_sigterm_keeps_every_record(dir.path(), &db.url, "queued").await;
}

/// Durable acknowledgements (the default): a `202` means the record is in the spool.
/// SIGTERM exits 0; what shutdown left in the spool is written by the next start.
async fn durable_serve_then_sigterm_then_restart_keeps_every_record(dir: &Path, db_url: &str) {
    let mut server = ServerBuilder::new(dir, db_url).start().await;
    let sent = records(50);
    post_all(&server, &sent).await;
    let status = server.terminate(Duration::from_secs(25)).await;
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
    let after_stop = stored(db_url).await;
    assert!(after_stop <= 50, "{after_stop} stored");
    assert!(server.log_text().contains("dropped=0"), "nothing dropped at shutdown:\n{}", server.log_text());

    // The next start replays the spool; then a second SIGTERM.
    let mut server = ServerBuilder::new(dir, db_url).start().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = stored(db_url).await;
        if n == 50 {
            break;
        }
        assert!(n < 50, "{n} stored, more than sent");
        assert!(Instant::now() < deadline, "{n} of 50 stored 20 s after restart:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = server.terminate(Duration::from_secs(25)).await;
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
    assert_eq!(stored(db_url).await, 50);
    assert_shown(dir, db_url, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_serve_on_sqlite_then_sigterm_then_restart_keeps_every_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    durable_serve_then_sigterm_then_restart_keeps_every_record(dir.path(), &sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_serve_on_postgres_then_sigterm_then_restart_keeps_every_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = TestDb::postgres().await;
    durable_serve_then_sigterm_then_restart_keeps_every_record(dir.path(), &db.url).await;
}

/// With durable acks and a healthy database, SIGTERM should write the spooled records
/// too before exiting: the shutdown deadline is 30 s and the database answers. One writer
/// and 2,000 records, so that the spool reader is behind when the signal comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_serve_then_sigterm_writes_every_record_before_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sqlite_url(dir.path());
    let mut server = ServerBuilder::new(dir.path(), &db)
        .env("AUDIT_ASYNC_ACK", "durable")
        .env("AUDIT_ASYNC_WORKERS", "1")
        .start()
        .await;
    for _ in 0..4 {
        post_all(&server, &records(500)).await;
    }
    let status = server.terminate(Duration::from_secs(25)).await;
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
    assert_eq!(stored(&db).await, 2000, "in the database after SIGTERM:\n{}", server.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_insecure_listens_beyond_loopback() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sqlite_url(dir.path());
    let mut server = ServerBuilder::new(dir.path(), &db).host("0.0.0.0").flag("--insecure").start().await;
    let ready = reqwest::Client::new().get(server.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200, "serve migrated the database at start-up");
    let status = server.terminate(Duration::from_secs(25)).await;
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
}

/// `query … | head`: the reader closing the pipe early ends the command quietly with
/// status 0, as Unix tools do, not with `error: Broken pipe`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_early_is_not_an_error() {
    use std::io::Read;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let records: Vec<_> = (0..2_000)
        .map(|i| {
            let mut r = opsagent_audit::model::Interaction::new(format!("question {i} {}", "x".repeat(200)));
            r.final_answer = Some("y".repeat(500));
            r
        })
        .collect();
    store.write_batch(&records).await.expect("seed");
    store.close().await;
    let dir = tempfile::tempdir().expect("temp dir");
    for format in ["ndjson", "json"] {
        let mut child = bin(dir.path())
            .args(["--database-url", &db.url, "query", "--all", "--format", format])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start query");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut first = [0u8; 64];
        stdout.read_exact(&mut first).expect("some output");
        drop(stdout);
        let mut guard = ChildGuard(child);
        let status = guard.wait_timeout(COMMAND_TIMEOUT).expect("query exits");
        let mut stderr = String::new();
        guard.0.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
        assert_eq!(status.code(), Some(0), "{format}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{format}: {stderr}");
    }
}
