//! The binary as an operator runs it: configuration errors, the loopback guard,
//! `migrate`, `show`, and `serve` stopped by SIGTERM with nothing lost.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_opsagent-audit"));
    c.env_remove("AUDIT_CONFIG").env_remove("AUDIT_DATABASE_URL").env("RUST_LOG", "warn");
    c
}

fn run(c: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = c.output().expect("run the binary");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn config_file(dir: &Path, yaml: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).expect("write config");
    path
}

#[test]
fn configuration_errors_exit_2_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/a.db", dir.path().display());
    let unknown = config_file(dir.path(), "server_port: 1\naudit:\n  async:\n    wrokers: 2\n");
    let (code, _, err) = run(bin().args(["--database-url", &db, "--config"]).arg(&unknown).arg("migrate"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("audit.async.wrokers"), "{err}");

    let wrong_type = config_file(dir.path(), "audit:\n  async:\n    workers: many\n");
    let (code, _, err) = run(bin().args(["--database-url", &db, "--config"]).arg(&wrong_type).arg("migrate"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("audit.async.workers"), "{err}");

    let (code, _, err) = run(bin().args(["--database-url", &db, "migrate"]).env("AUDIT_ASYNC_WORKERS", "abc"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("AUDIT_ASYNC_WORKERS") && err.contains("audit.async.workers"), "{err}");

    let (code, _, err) = run(bin().args(["--database-url", &db, "migrate"]).env("AUDIT_SPOOL_FULL_POLICY", "shrug"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("audit.spool.full_policy"), "{err}");
}

#[test]
fn serve_refuses_a_public_address_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/a.db", dir.path().display());
    let (code, _, err) = run(bin().args(["--database-url", &db, "serve", "--listen", "0.0.0.0:0"]));
    assert_ne!(code, 0);
    assert!(err.contains("--insecure") && err.contains("loopback"), "{err}");
}

#[test]
fn migrate_then_show_an_unknown_id() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/a.db", dir.path().display());
    let (code, _, err) = run(bin().args(["--database-url", &db, "migrate"]));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(bin().args(["--database-url", &db, "show", &Uuid::now_v7().to_string()]));
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_sqlite_then_sigterm_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/a.db", dir.path().display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = bin()
        .args(["--database-url", &db, "serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("AUDIT_SPOOL_DIR", dir.path().join("spool"))
        .env("AUDIT_ASYNC_ACK", "queued")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let records: Vec<Value> =
        (0..50).map(|i| json!({"interaction_id": Uuid::now_v7(), "question": format!("q{i}")})).collect();
    let answer: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v1/interactions"))
        .json(&records)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["accepted"], 50);
    // Stop at once: the queued records (interval 200 ms) must be drained, not lost.
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    for r in records.iter().step_by(7) {
        let id = r["interaction_id"].as_str().unwrap();
        let (code, out, err) = run(bin().args(["--database-url", &db, "show", id]));
        assert_eq!(code, 0, "{err}");
        let shown: Value = serde_json::from_str(&out).expect("show prints JSON");
        assert_eq!(shown["question"], r["question"]);
    }
}
