//! Pipeline behaviour: batching triggers, the drop-oldest policy, retries and shutdown.
//!
//! Records land in real databases. Where a test must hold a write back or make it fail,
//! [`GatedStore`] wraps the real store: it delays or fails `write_batch` before passing
//! it through, and never pretends to have stored anything.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{wait_until, TestDb};
use async_trait::async_trait;
use opsagent_audit::config::{AsyncConfig, LimitsConfig, SpoolConfig};
use opsagent_audit::model::Interaction;
use opsagent_audit::pipeline::{AuditLogger, DropReason, Durable, Outcome, Spool};
use opsagent_audit::store::{BatchSink, DeadLetter, Store, StoreError, WriteSummary};
use tokio::sync::watch;
use uuid::Uuid;

/// A real store whose writes can be held at a gate or made to fail as if the database
/// were unreachable.
struct GatedStore {
    inner: Arc<dyn Store>,
    open: watch::Receiver<bool>,
    failing: AtomicBool,
    waiting: AtomicUsize,
    attempts: AtomicUsize,
}

/// The pipeline sees only the two write operations; reads go to `inner` directly.
#[async_trait]
impl BatchSink for GatedStore {
    async fn write_batch(&self, batch: &[Interaction]) -> Result<WriteSummary, StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("gate closed: simulated outage"));
        }
        self.inner.write_batch(batch).await
    }
    async fn write_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        self.inner.write_dead_letters(letters).await
    }
}

async fn gated(db: &TestDb, open: bool) -> (Arc<GatedStore>, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(open);
    let store = Arc::new(GatedStore {
        inner: db.store().await,
        open: rx,
        failing: AtomicBool::new(false),
        waiting: AtomicUsize::new(0),
        attempts: AtomicUsize::new(0),
    });
    (store, tx)
}

fn records(n: usize) -> Vec<Interaction> {
    (0..n).map(|i| Interaction::new(format!("question {i}"))).collect()
}

fn config(workers: usize, queue_size: usize, batch_size: usize, batch_interval_ms: u64) -> AsyncConfig {
    AsyncConfig { workers, queue_size, batch_size, batch_interval_ms, ..AsyncConfig::default() }
}

async fn stored_ids(store: &dyn Store, candidates: &[Uuid]) -> BTreeSet<Uuid> {
    let mut found = BTreeSet::new();
    for id in candidates {
        if store.get_interaction(*id).await.is_ok() {
            found.insert(*id);
        }
    }
    found
}

async fn a_full_queue_drops_the_oldest_and_counts_it(db: &TestDb) {
    let (store, gate) = gated(db, false).await;
    let log = AuditLogger::start(store.clone(), &config(1, 10, 5, 60_000), &LimitsConfig::default());
    let batch = records(30);
    let ids: Vec<Uuid> = batch.iter().map(|r| r.interaction_id).collect();
    let mut batch = batch.into_iter();
    // The first 5 fill a batch; the writer takes it and is held at the gate.
    for r in batch.by_ref().take(5) {
        log.log(r);
    }
    wait_until("the writer to hold the first batch", Duration::from_secs(20), || {
        store.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    // 25 more into a queue of 10: the 15 oldest of them are dropped.
    for r in batch {
        log.log(r);
    }
    let stats = log.stats().snapshot();
    assert_eq!(stats.dropped_queue_full, 15);
    assert_eq!(stats.accepted, 30);
    assert_eq!(log.queue_len(), 10);
    gate.send(true).unwrap();
    let report = log.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained);
    assert_eq!(report.stats.committed, 15);
    let expected: BTreeSet<Uuid> = ids[..5].iter().chain(&ids[20..]).copied().collect();
    assert_eq!(stored_ids(&*store.inner, &ids).await, expected, "the first batch and the newest 10 survive");
}

async fn a_full_batch_is_written_without_waiting_for_the_interval(db: &TestDb) {
    let store = db.store().await;
    let log = AuditLogger::start(store.clone(), &config(2, 1000, 10, 600_000), &LimitsConfig::default());
    for r in records(25) {
        log.log(r);
    }
    crate::common::wait_for_count(&*store, 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.count_interactions().await.unwrap(), 20, "the partial batch waits for its interval");
    assert_eq!(log.queue_len(), 5);
    let report = log.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained);
    assert_eq!(store.count_interactions().await.unwrap(), 25);
}

async fn a_partial_batch_is_written_after_the_interval(db: &TestDb) {
    let store = db.store().await;
    let log = AuditLogger::start(store.clone(), &config(2, 1000, 1000, 50), &LimitsConfig::default());
    for r in records(3) {
        log.log(r);
    }
    crate::common::wait_for_count(&*store, 3).await;
    assert_eq!(log.stats().snapshot().batches, 1);
    log.shutdown(Duration::from_secs(10)).await;
}

async fn shutdown_writes_everything_queued(db: &TestDb) {
    let store = db.store().await;
    // An interval far beyond the test: only shutdown can write the partial batches.
    let log = AuditLogger::start(store.clone(), &config(2, 10_000, 1000, 600_000), &LimitsConfig::default());
    for r in records(2_500) {
        log.log(r);
    }
    let report = log.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained, "{report:?}");
    assert_eq!((report.stats.committed, report.stats.dropped_total()), (2_500, 0));
    assert_eq!(store.count_interactions().await.unwrap(), 2_500);
}

async fn shutdown_waits_for_the_batch_in_flight(db: &TestDb) {
    let (store, gate) = gated(db, false).await;
    let log = AuditLogger::start(store.clone(), &config(1, 100, 10, 600_000), &LimitsConfig::default());
    for r in records(15) {
        log.log(r);
    }
    wait_until("a batch in flight", Duration::from_secs(20), || store.waiting.load(Ordering::SeqCst) == 1).await;
    let shutdown = tokio::spawn({
        let log = log.clone();
        async move { log.shutdown(Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!shutdown.is_finished(), "shutdown returned with a batch still in flight");
    gate.send(true).unwrap();
    let report = shutdown.await.unwrap();
    assert!(report.drained);
    assert_eq!(store.inner.count_interactions().await.unwrap(), 15);
}

async fn transient_failures_are_retried_until_the_write_succeeds(db: &TestDb) {
    let (store, _gate) = gated(db, true).await;
    store.failing.store(true, Ordering::SeqCst);
    let log = AuditLogger::start(store.clone(), &config(2, 1000, 50, 10), &LimitsConfig::default());
    for r in records(120) {
        log.log(r);
    }
    wait_until("three failed attempts", Duration::from_secs(20), || store.attempts.load(Ordering::SeqCst) >= 3).await;
    assert_eq!(store.inner.count_interactions().await.unwrap(), 0);
    store.failing.store(false, Ordering::SeqCst);
    crate::common::wait_for_count(&*store.inner, 120).await;
    let report = log.shutdown(Duration::from_secs(30)).await;
    assert!(report.stats.retries >= 1 && report.stats.write_errors >= 3, "{:?}", report.stats);
    assert_eq!((report.stats.committed, report.stats.dropped_total()), (120, 0));
}

async fn records_left_at_the_shutdown_deadline_are_counted_not_lost_silently(db: &TestDb) {
    let (store, _gate) = gated(db, true).await;
    store.failing.store(true, Ordering::SeqCst);
    let log = AuditLogger::start(store.clone(), &config(1, 1000, 10, 10), &LimitsConfig::default());
    for r in records(35) {
        log.log(r);
    }
    let report = log.shutdown(Duration::from_millis(300)).await;
    assert!(!report.drained);
    assert_eq!(report.abandoned, 35);
    assert_eq!(report.stats.dropped_shutdown, 35);
    assert_eq!(store.inner.count_interactions().await.unwrap(), 0);
}

async fn records_after_shutdown_are_refused_and_counted(db: &TestDb) {
    let store = db.store().await;
    let log = AuditLogger::start(store.clone(), &config(1, 100, 10, 10), &LimitsConfig::default());
    log.shutdown(Duration::from_secs(5)).await;
    log.log(Interaction::new("late"));
    let outcome = log.log_committed(Interaction::new("late too")).await;
    assert!(matches!(outcome, Outcome::Dropped(DropReason::Closed, _)), "{outcome:?}");
    assert_eq!(log.stats().snapshot().dropped_closed, 2);
    assert_eq!(store.count_interactions().await.unwrap(), 0);
}

/// A logger over `sink` with a spool in `dir`.
fn spooled_logger(sink: Arc<dyn BatchSink>, config: &AsyncConfig, dir: &std::path::Path) -> AuditLogger {
    let spool =
        Spool::open(&SpoolConfig { dir: dir.to_path_buf(), ..SpoolConfig::default() }, 10_000).expect("open spool");
    AuditLogger::start_with_spool(sink, config, &LimitsConfig::default(), Some(spool))
}

async fn while_the_database_is_down_records_go_to_the_spool_and_drain_on_recovery(db: &TestDb) {
    let (store, _gate) = gated(db, true).await;
    store.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let log = spooled_logger(store.clone(), &config(2, 1000, 50, 20), dir.path());
    let batch = records(500);
    let ids: Vec<Uuid> = batch.iter().map(|r| r.interaction_id).collect();
    for r in batch {
        log.log(r);
    }
    // Memory does not hold the backlog: it all goes to disk.
    wait_until("the backlog to be on disk", Duration::from_secs(20), || {
        log.snapshot().spool_records == 500 && log.queue_len() == 0
    })
    .await;
    assert!(log.database_down().is_some(), "the outage is visible");
    assert_eq!(log.snapshot().dropped_total(), 0);

    store.failing.store(false, Ordering::SeqCst);
    crate::common::wait_for_count(&*store.inner, 500).await;
    wait_until("the spool to settle", Duration::from_secs(20), || log.snapshot().spool_records == 0).await;
    assert!(log.database_down().is_none(), "recovery is visible");
    let report = log.shutdown(Duration::from_secs(30)).await;
    assert_eq!(report.stats.committed, 500);
    assert_eq!(report.stats.dropped_total(), 0);
    assert!(report.stats.retries > 0 || report.stats.write_errors > 0);
    assert_eq!(stored_ids(&*store.inner, &ids).await.len(), 500);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .collect();
    assert!(leftovers.is_empty(), "committed segments are deleted: {leftovers:?}");
}

async fn shutdown_spools_what_it_cannot_write_and_the_next_start_replays_it(db: &TestDb) {
    let (store, _gate) = gated(db, true).await;
    store.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    // Without the spool being reached first: a huge interval keeps records in memory.
    let log = spooled_logger(store.clone(), &config(1, 10_000, 500, 600_000), dir.path());
    let batch = records(300);
    for r in batch {
        log.log(r);
    }
    let report = log.shutdown(Duration::from_millis(500)).await;
    assert_eq!(report.stats.dropped_total(), 0, "nothing is dropped when there is a spool");
    assert_eq!(report.stats.spool_records, 300, "everything unwritten is on disk");
    assert_eq!(store.inner.count_interactions().await.unwrap(), 0);

    // Next start, database back: the spool is replayed.
    let log = spooled_logger(db.store().await, &config(2, 1000, 100, 20), dir.path());
    crate::common::wait_for_count(&*store.inner, 300).await;
    let report = log.shutdown(Duration::from_secs(30)).await;
    assert_eq!((report.stats.replayed, report.stats.committed), (300, 300));
    assert_eq!(report.stats.spool_records, 0);
}

async fn durable_logging_resolves_once_on_disk_even_with_the_database_down(db: &TestDb) {
    let (store, _gate) = gated(db, true).await;
    store.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let log = spooled_logger(store.clone(), &config(2, 1000, 50, 20), dir.path());
    let acks = futures::future::join_all(records(100).into_iter().map(|r| log.log_durable(r))).await;
    assert!(acks.iter().all(|a| *a == Ok(Durable::Spooled)), "{acks:?}");
    store.failing.store(false, Ordering::SeqCst);
    crate::common::wait_for_count(&*store.inner, 100).await;
    log.shutdown(Duration::from_secs(30)).await;
}

async fn a_full_queue_overflows_to_the_spool_instead_of_dropping(db: &TestDb) {
    let (store, gate) = gated(db, false).await;
    let dir = tempfile::tempdir().unwrap();
    let log = spooled_logger(store.clone(), &config(1, 10, 5, 60_000), dir.path());
    let batch = records(200);
    let ids: Vec<Uuid> = batch.iter().map(|r| r.interaction_id).collect();
    for r in batch {
        log.log(r);
    }
    let stats = log.snapshot();
    assert_eq!(stats.dropped_total(), 0);
    assert!(stats.spilled >= 180, "the overflow went to disk: {stats:?}");
    assert!(log.queue_len() <= 10, "memory stays bounded");
    gate.send(true).unwrap();
    crate::common::wait_for_count(&*store.inner, 200).await;
    log.shutdown(Duration::from_secs(30)).await;
    assert_eq!(stored_ids(&*store.inner, &ids).await.len(), 200);
}

/// Regression: a record that could not be spooled while the database was down was
/// counted as `shutdown`; it is `database_down` now, and the producer is told why.
async fn a_record_the_spool_refuses_while_the_database_is_down_is_counted_as_such(db: &TestDb) {
    let (store, _gate) = gated(db, true).await;
    store.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let log = spooled_logger(store.clone(), &config(1, 1000, 10, 10), dir.path());
    log.log(Interaction::new("first, to find the database down"));
    wait_until("the outage to be noticed", Duration::from_secs(20), || log.database_down().is_some()).await;
    // The spool goes away (as when it is closed under the pipeline).
    log.spool().expect("spool").close().await;
    let outcome = log.log_committed(Interaction::new("nowhere to go")).await;
    assert!(matches!(&outcome, Outcome::Dropped(DropReason::DatabaseDown, d) if d.contains("spool")), "{outcome:?}");
    let stats = log.snapshot();
    assert_eq!((stats.dropped_database_down, stats.dropped_shutdown, stats.dropped_closed), (1, 0, 0), "{stats:?}");
    log.shutdown(Duration::from_secs(5)).await;
}

/// Regression: a writer retrying a batch read from the spool while `drop_oldest` evicted
/// that batch's segment held the only copy of those records; at shutdown they were
/// "left on disk" that no longer existed, neither stored nor counted.
async fn records_held_by_a_writer_when_their_segment_is_evicted_are_spooled_again(db: &TestDb) {
    let (store, _gate) = gated(db, true).await;
    store.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let spool_config = SpoolConfig {
        dir: dir.path().to_path_buf(),
        max_bytes: 512 * 1024,
        segment_bytes: 16 * 1024,
        ..SpoolConfig::default()
    };
    let spool = Spool::open(&spool_config, 10_000).expect("open spool");
    let log =
        AuditLogger::start_with_spool(store.clone(), &config(1, 10_000, 10, 10), &LimitsConfig::default(), Some(spool));
    for r in records(2000) {
        log.log(r);
        // Let the spool keep up, so drops come from its cap, not its bounded backlog.
        if log.snapshot().spooled + 500 < log.snapshot().accepted {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    wait_until("every record spooled or dropped", Duration::from_secs(20), || {
        let s = log.snapshot();
        s.spooled + s.dropped_total() >= 2000
    })
    .await;
    let report = log.shutdown(Duration::from_millis(500)).await;
    assert!(report.stats.dropped_spool_full > 0, "the cap was reached: {:?}", report.stats);
    let reopened = Spool::open(&spool_config, 10_000).expect("reopen spool");
    let on_disk = reopened.stats().records.load(Ordering::Relaxed);
    reopened.close().await;
    assert_eq!(
        report.stats.accepted,
        report.stats.dropped_total() + on_disk,
        "every record is on disk or counted as dropped: {:?}",
        report.stats
    );
}

/// A sink that refuses records whose question contains "poison" as bad data, and cannot
/// keep dead letters either.
struct PoisonSink {
    inner: Arc<dyn Store>,
}

#[async_trait]
impl BatchSink for PoisonSink {
    async fn write_batch(&self, batch: &[Interaction]) -> Result<WriteSummary, StoreError> {
        if batch.iter().any(|r| r.question.contains("poison")) {
            return Err(StoreError::rejected("value out of range (simulated)"));
        }
        self.inner.write_batch(batch).await
    }
    async fn write_dead_letters(&self, _: &[DeadLetter]) -> Result<(), StoreError> {
        Err(StoreError::unavailable("dead-letter table unavailable (simulated)"))
    }
}

/// Regression: a spooled record that could be neither dead-lettered nor written to the
/// dead-letter file was counted as rejected yet never settled: its segment stayed, every
/// shutdown waited its full deadline, and the next start replayed (and counted) it again.
async fn a_spooled_record_that_cannot_be_kept_anywhere_is_counted_once_and_settled(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    // The dead-letter file cannot be created: a directory stands in its place.
    std::fs::create_dir(dir.path().join("dead-letters.ndjson")).unwrap();
    let sink = Arc::new(PoisonSink { inner: db.store().await });
    let log = spooled_logger(sink.clone(), &config(1, 1000, 10, 10), dir.path());
    let mut batch = records(9);
    batch.push(Interaction::new("poison"));
    for r in batch {
        log.log_durable(r).await.expect("durable in the spool");
    }
    crate::common::wait_for_count(&*sink.inner, 9).await;
    wait_until("the poison record to be given up", Duration::from_secs(20), || log.snapshot().rejected == 1).await;
    wait_until("the spool to settle", Duration::from_secs(20), || log.snapshot().spool_records == 0).await;
    let report = log.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained, "{report:?}");
    assert_eq!((report.stats.rejected, report.stats.dead_lettered), (1, 0));
}

both_backends!(
    records_held_by_a_writer_when_their_segment_is_evicted_are_spooled_again,
    a_spooled_record_that_cannot_be_kept_anywhere_is_counted_once_and_settled,
    a_record_the_spool_refuses_while_the_database_is_down_is_counted_as_such,
    a_full_queue_drops_the_oldest_and_counts_it,
    a_full_batch_is_written_without_waiting_for_the_interval,
    a_partial_batch_is_written_after_the_interval,
    shutdown_writes_everything_queued,
    shutdown_waits_for_the_batch_in_flight,
    transient_failures_are_retried_until_the_write_succeeds,
    records_left_at_the_shutdown_deadline_are_counted_not_lost_silently,
    records_after_shutdown_are_refused_and_counted,
    while_the_database_is_down_records_go_to_the_spool_and_drain_on_recovery,
    shutdown_spools_what_it_cannot_write_and_the_next_start_replays_it,
    durable_logging_resolves_once_on_disk_even_with_the_database_down,
    a_full_queue_overflows_to_the_spool_instead_of_dropping,
);

#[tokio::test]
async fn a_disabled_logger_does_nothing() {
    let log = AuditLogger::disabled();
    assert!(!log.is_enabled());
    for r in records(1000) {
        log.log(r);
    }
    assert_eq!(log.queue_len(), 0);
    assert_eq!(log.stats().snapshot().accepted, 0);
    assert!(log.shutdown(Duration::from_secs(1)).await.drained);
}
