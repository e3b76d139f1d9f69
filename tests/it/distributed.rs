//! Distributed mode end to end: the real `serve` binary publishing to a private RabbitMQ
//! broker, real `worker` processes writing to PostgreSQL. Each test sends records with
//! distinct `interaction_id`s, keeps those the producer acknowledged (`202`,
//! `accepted`), and at the end compares them with the database: 0 lost, 0 duplicated.
//! Brokers are heavy on two cores, so these tests run one at a time
//! ([`rabbit::exclusive`]), each bounded in time and record count.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use sqlx::postgres::PgConnection;
use sqlx::Connection as _;
use uuid::Uuid;

use opsagent_audit::api::Engine;
use opsagent_audit::config::Config;
use opsagent_audit::model::Interaction;
use opsagent_audit::pipeline::Durable;

use crate::common::load::{post, Load};
use crate::common::pg_cluster::PgCluster;
use crate::common::rabbit::{exclusive, RabbitBroker};
use crate::common::server::{bin, ChildGuard, Server, ServerBuilder};
use crate::common::{free_port, scrape_metrics, TestDb};

/// The records' queue of these tests.
const QUEUE: &str = "audit-test";
/// A secret the producer must mask before publishing (workers do not mask).
const SECRET: &str = "sk-proj-rhTuvqCdmPG0tmKXPDZpAemm1za7v0fHhvjwdbT2HwDqzuM14qHOX";
/// Longest wait for every acknowledged record to be stored.
const SETTLE: Duration = Duration::from_secs(90);

/// Starts `serve` in distributed mode: publishes to `amqp_url`, spools in `work/spool`,
/// reads from `db_url`.
async fn start_producer(work: &Path, db_url: &str, amqp_url: &str) -> Server {
    ServerBuilder::new(work, db_url)
        .env("AUDIT_DISTRIBUTED_AMQP_URL", amqp_url)
        .env("AUDIT_DISTRIBUTED_QUEUE", QUEUE)
        .env("AUDIT_DISTRIBUTED_CONFIRM_TIMEOUT", "5s")
        .env("AUDIT_ASYNC_BATCH_INTERVAL_MS", "20")
        .env("AUDIT_ASYNC_SHUTDOWN_TIMEOUT", "20s")
        .start()
        .await
}

/// A `worker` process.
struct WorkerProc {
    child: ChildGuard,
    port: u16,
    log: PathBuf,
}

impl WorkerProc {
    /// Starts a worker writing to `db_url` and waits until `/healthz` answers.
    async fn start(work: &Path, db_url: &str, amqp_url: &str) -> WorkerProc {
        let port = free_port();
        let log = work.join(format!("worker-{port}.log"));
        let out = std::fs::File::create(&log).expect("worker log");
        let child = bin(work)
            .args(["--database-url", db_url, "worker", "--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info")
            .env("AUDIT_DISTRIBUTED_AMQP_URL", amqp_url)
            .env("AUDIT_DISTRIBUTED_QUEUE", QUEUE)
            .env("AUDIT_DISTRIBUTED_PREFETCH", "100")
            .env("AUDIT_ASYNC_BATCH_INTERVAL_MS", "20")
            .env("AUDIT_ASYNC_SHUTDOWN_TIMEOUT", "20s")
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start worker");
        let mut worker = WorkerProc { child: ChildGuard(child), port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health =
                reqwest::Client::new().get(worker.url("/healthz")).timeout(Duration::from_secs(2)).send().await;
            if health.is_ok_and(|r| r.status() == 200) {
                return worker;
            }
            if let Ok(Some(status)) = worker.child.0.try_wait() {
                panic!("worker exited at start-up with {status}:\n{}", worker.log_text());
            }
            assert!(Instant::now() < deadline, "worker did not answer /healthz:\n{}", worker.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A counter or gauge of its `/metrics` (0 when absent).
    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics")).await.expect("metrics").text().await.expect("metrics text");
        scrape_metrics(&text).get(name).copied().unwrap_or(0.0)
    }

    async fn acknowledged(&self) -> u64 {
        self.metric("opsagent_audit_worker_acknowledged_total").await as u64
    }

    /// The worker's log so far (for tests that read what it said at exit).
    fn said(&self, text: &str) -> bool {
        self.log_text().contains(text)
    }

    /// Waits (bounded) until `/readyz` says ready.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest::get(self.url("/readyz")).await.map(|r| r.status() == 200).unwrap_or(false);
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "worker not ready after 60 s:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.0.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    /// SIGTERM, then the exit code (bounded).
    fn terminate(&mut self) -> Option<i32> {
        self.signal("TERM");
        let status = self.child.wait_timeout(Duration::from_secs(40));
        let status = status.unwrap_or_else(|| panic!("worker did not exit after SIGTERM:\n{}", self.log_text()));
        status.code()
    }
}

/// The `i`-th record of load task `task`; its answer holds a secret masking must catch.
fn record(task: usize, i: usize) -> Value {
    json!({
        "interaction_id": Uuid::now_v7(),
        "session_id": format!("dist-{task}"),
        "user_id": "distributed-test",
        "question": format!("question {i} from task {task}"),
        "final_answer": format!("the key was {SECRET}; {}", "x".repeat(400)),
        "tool_calls": [{"tool_name": "kubectl", "tool_input": "get pods",
                        "tool_observation": "y".repeat(800), "sequence_number": 1, "duration_ms": 12}],
    })
}

/// The stored ids and the number of rows.
async fn stored(url: &str) -> (BTreeSet<Uuid>, u64) {
    let mut conn = PgConnection::connect(url).await.expect("connect to check");
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT interaction_id FROM interactions").fetch_all(&mut conn).await.expect("ids");
    conn.close().await.ok();
    let rows = ids.len() as u64;
    (ids.into_iter().collect(), rows)
}

/// Waits (bounded) until every acknowledged record is stored; asserts that no row is
/// stored twice and that nothing was stored that was not acknowledged.
async fn assert_exactly_stored(url: &str, acked: &BTreeSet<Uuid>) {
    assert!(!acked.is_empty(), "nothing was acknowledged");
    let deadline = Instant::now() + SETTLE;
    loop {
        let (ids, rows) = stored(url).await;
        assert_eq!(rows, ids.len() as u64, "an interaction is stored twice");
        let missing = acked.difference(&ids).count();
        if missing == 0 {
            let extra = ids.difference(acked).count();
            assert_eq!(extra, 0, "{extra} stored records were never acknowledged");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acknowledged records missing after {SETTLE:?}",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Records on the wire were masked by the producer: no stored text holds the secret.
async fn assert_masked(url: &str) {
    let mut conn = PgConnection::connect(url).await.expect("connect to check");
    let leaked: i64 = sqlx::query_scalar("SELECT count(*) FROM interactions WHERE final_answer LIKE '%' || $1 || '%'")
        .bind(SECRET)
        .fetch_one(&mut conn)
        .await
        .expect("count leaks");
    conn.close().await.ok();
    assert_eq!(leaked, 0, "a secret reached the database: masking did not run before publishing");
}

async fn start_broker() -> RabbitBroker {
    tokio::task::spawn_blocking(RabbitBroker::start).await.expect("start broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_steady_load_nothing_lost_nothing_duplicated() {
    let _one = exclusive().await;
    let broker = start_broker().await;
    let db = TestDb::postgres().await;
    let work = tempfile::tempdir().expect("work dir");
    let producer = start_producer(work.path(), &db.url, &broker.url()).await;
    let amqp_url = broker.url();
    let (mut a, mut b) = tokio::join!(
        WorkerProc::start(work.path(), &db.url, &amqp_url),
        WorkerProc::start(work.path(), &db.url, &amqp_url)
    );
    a.wait_ready().await;
    b.wait_ready().await;
    let load = Load::start(producer.port, 3, 20, Duration::from_millis(50), record);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (by_a, by_b) = (a.acknowledged().await, b.acknowledged().await);
    assert!(by_a > 0 && by_b > 0, "both workers take a share: {by_a} and {by_b}");
    // SIGTERM under load: a finishes and acknowledges its batch in hand and exits 0;
    // b takes the rest.
    assert_eq!(tokio::task::block_in_place(|| a.terminate()), Some(0), "{}", a.log_text());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked, _) = load.finish().await;
    assert_exactly_stored(&db.url, &acked).await;
    assert_masked(&db.url).await;
    assert_eq!(tokio::task::block_in_place(|| b.terminate()), Some(0), "{}", b.log_text());
    drop(producer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_engine_publishes_and_without_a_spool_durable_means_broker_confirmed() {
    let _one = exclusive().await;
    let broker = start_broker().await;
    let db = TestDb::postgres().await;
    let mut config = Config::default();
    config.database.url = Some(db.url.clone());
    config.spool.enabled = false;
    config.pipeline.batch_interval_ms = 20;
    config.distributed.amqp_url = Some(broker.url());
    config.distributed.queue = QUEUE.into();
    let engine = Engine::start(&config).await.expect("engine");
    let logger = engine.logger();
    let mut ids = BTreeSet::new();
    for i in 0..20 {
        let mut record = Interaction::new(format!("library question {i}"));
        record.final_answer = Some(format!("the key was {SECRET}"));
        ids.insert(record.interaction_id);
        // No spool: durable means the broker confirmed it (the worker is not even running).
        assert_eq!(logger.log_durable(record).await, Ok(Durable::Committed));
    }
    assert_eq!(stored(&db.url).await.1, 0, "a producer in distributed mode writes nothing itself");
    let work = tempfile::tempdir().expect("work dir");
    let worker = WorkerProc::start(work.path(), &db.url, &broker.url()).await;
    assert_exactly_stored(&db.url, &ids).await;
    assert_masked(&db.url).await;
    let report = engine.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained, "{report:?}");
    assert!(!worker.said("guest:guest"), "the broker's password was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_leaves_its_deliveries_to_the_other() {
    let _one = exclusive().await;
    let broker = start_broker().await;
    let db = TestDb::postgres().await;
    let work = tempfile::tempdir().expect("work dir");
    let producer = start_producer(work.path(), &db.url, &broker.url()).await;
    let victim = WorkerProc::start(work.path(), &db.url, &broker.url()).await;
    victim.wait_ready().await;
    let load = Load::start(producer.port, 3, 25, Duration::from_millis(40), record);
    // Kill it while it is busy: it has written batches and holds deliveries in hand.
    let deadline = Instant::now() + Duration::from_secs(30);
    while victim.acknowledged().await < 300 {
        assert!(Instant::now() < deadline, "the first worker wrote nothing:\n{}", victim.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    victim.signal("KILL");
    let survivor = WorkerProc::start(work.path(), &db.url, &broker.url()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked, _) = load.finish().await;
    assert_exactly_stored(&db.url, &acked).await;
    let redelivered = survivor.metric("opsagent_audit_worker_redelivered_total").await;
    assert!(redelivered > 0.0, "the survivor got none of the killed worker's deliveries:\n{}", survivor.log_text());
    drop(producer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_for_15s_under_load_producers_spool_then_forward() {
    let _one = exclusive().await;
    let mut broker = start_broker().await;
    let db = TestDb::postgres().await;
    let work = tempfile::tempdir().expect("work dir");
    let producer = start_producer(work.path(), &db.url, &broker.url()).await;
    let worker = WorkerProc::start(work.path(), &db.url, &broker.url()).await;
    worker.wait_ready().await;
    let load = Load::start(producer.port, 2, 20, Duration::from_millis(100), record);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker = tokio::task::spawn_blocking(move || {
        broker.stop();
        broker
    })
    .await
    .expect("stop broker");
    // Producers keep acknowledging (into the spool) while the broker is away.
    let before = producer.readyz().await.1["pipeline"]["accepted"].as_u64().expect("accepted");
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (_, during) = producer.readyz().await;
    let accepted_during = during["pipeline"]["accepted"].as_u64().expect("accepted") - before;
    assert!(accepted_during > 100, "producers stopped acknowledging while the broker was down: {during}");
    assert!(during["pipeline"]["spool_records"].as_u64().expect("spool records") > 0, "{during}");
    let mut broker = broker;
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .expect("restart broker");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, _) = load.finish().await;
    assert_exactly_stored(&db.url, &acked).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = producer.readyz().await;
        if body["pipeline"]["spool_records"].as_u64() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the spool did not drain: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((producer, worker, broker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_for_15s_workers_hold_off_and_the_queue_keeps_the_records() {
    let _one = exclusive().await;
    let broker = start_broker().await;
    let cluster = Arc::new(tokio::task::spawn_blocking(PgCluster::start).await.expect("start cluster"));
    let url = cluster.create_database("audit").await;
    let work = tempfile::tempdir().expect("work dir");
    let producer = start_producer(work.path(), &url, &broker.url()).await;
    let worker = WorkerProc::start(work.path(), &url, &broker.url()).await;
    worker.wait_ready().await;
    let load = Load::start(producer.port, 2, 20, Duration::from_millis(100), record);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop()).await.expect("stop cluster");
    // Whatever was in flight settles; from then on nothing is acknowledged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked_before = worker.acknowledged().await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(worker.acknowledged().await, acked_before, "the worker acknowledged while the database was down");
    let held = broker.queue_messages(QUEUE).unwrap_or(0);
    assert!(held > 0, "the queue holds nothing during the outage");
    let not_ready = reqwest::get(worker.url("/readyz")).await.expect("readyz").status();
    assert_eq!(not_ready, 503, "a worker without its database is not ready");
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart()).await.expect("restart cluster");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, _) = load.finish().await;
    assert_exactly_stored(&url, &acked).await;
    drop((producer, worker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_dead_lettered_and_the_rest_committed() {
    let _one = exclusive().await;
    let broker = start_broker().await;
    let db = TestDb::postgres().await;
    db.store().await.close().await;
    db.refuse_marked_questions().await;
    let work = tempfile::tempdir().expect("work dir");
    let producer = start_producer(work.path(), &db.url, &broker.url()).await;
    let worker = WorkerProc::start(work.path(), &db.url, &broker.url()).await;
    worker.wait_ready().await;
    let mut body: Vec<Value> = (0..200).map(|i| record(0, i)).collect();
    let poison = Uuid::now_v7();
    body[117]["interaction_id"] = json!(poison);
    body[117]["question"] = json!("REFUSE-ME please");
    let client = reqwest::Client::new();
    let acked = post(&client, &producer.url("/api/v1/interactions"), &body).await;
    assert_eq!(acked.len(), 200, "the producer takes all 200 (it does not know the database's rules)");
    // Something that is not a record, published by someone else.
    let amqp = Connection::connect(&broker.url(), ConnectionProperties::default()).await.expect("connect");
    let channel = amqp.create_channel().await.expect("channel");
    channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(QUEUE),
            BasicPublishOptions::default(),
            b"this is not json",
            BasicProperties::default(),
        )
        .await
        .expect("publish garbage");
    let good: BTreeSet<Uuid> = acked.iter().copied().filter(|id| *id != poison).collect();
    assert_exactly_stored(&db.url, &good).await;
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let letters: Vec<Uuid> =
            sqlx::query_scalar("SELECT interaction_id FROM dead_letters").fetch_all(&mut conn).await.expect("letters");
        if letters == vec![poison] {
            break;
        }
        assert!(Instant::now() < deadline, "dead letters: {letters:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    conn.close().await.ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.metric("opsagent_audit_worker_undecodable_total").await < 1.0 {
        assert!(Instant::now() < deadline, "the garbage message was not rejected:\n{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dead = format!("{QUEUE}.dead");
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.queue_messages(&dead) != Some(1) {
        assert!(Instant::now() < deadline, "the garbage message is not in {dead}: {:?}", broker.queue_messages(&dead));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    amqp.close(200, ShortString::from("done")).await.ok();
    drop((producer, worker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_with_other_arguments_is_a_clear_startup_error() {
    let _one = exclusive().await;
    let broker = start_broker().await;
    let db = TestDb::postgres().await;
    let amqp = Connection::connect(&broker.url(), ConnectionProperties::default()).await.expect("connect");
    let channel = amqp.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString("quorum".into()));
    args.insert(ShortString::from("x-delivery-limit"), AMQPValue::LongLongInt(3));
    args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(format!("{QUEUE}.dlx").into()));
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(ShortString::from(QUEUE), durable, args).await.expect("declare a conflicting queue");
    amqp.close(200, ShortString::from("done")).await.ok();
    let work = tempfile::tempdir().expect("work dir");
    for command in ["serve", "worker"] {
        let mut c = bin(work.path());
        c.args(["--database-url", &db.url, command, "--listen", &format!("127.0.0.1:{}", free_port())])
            .env("AUDIT_DISTRIBUTED_AMQP_URL", broker.url())
            .env("AUDIT_DISTRIBUTED_QUEUE", QUEUE)
            .env("AUDIT_SPOOL_DIR", work.path().join(format!("spool-{command}")));
        let ran = tokio::task::block_in_place(|| crate::common::server::run(&mut c));
        assert_ne!(ran.code, Some(0), "{command} started against a mismatched queue");
        assert!(
            ran.stderr.contains(QUEUE) && ran.stderr.contains("x-delivery-limit"),
            "{command}'s error names the queue and the argument:\n{}",
            ran.stderr
        );
        assert!(!ran.stderr.contains("guest:guest"), "the password was logged:\n{}", ran.stderr);
    }
}
