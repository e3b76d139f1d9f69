//! The audit pipeline: capture → queue → batching writers → store.
//!
//! # Invariants
//! - [`AuditLogger::log`] never blocks and never fails the caller. A record that cannot be
//!   kept is counted (by reason) and logged, rate-limited; it is never lost silently.
//! - Memory is bounded by `async.queue_size` records plus one batch per writer.
//! - A batch is written in one transaction. Writes are idempotent on `interaction_id`, so
//!   retrying a batch whose commit acknowledgement was lost stores nothing twice.
//! - A batch the database refuses because of its data is split in halves until the
//!   refused records are isolated; the others are committed. A batch that fails for any
//!   other reason (connection, database restarting) is retried with backoff and jitter.
//! - [`AuditLogger::shutdown`] stops intake, then writes everything queued and in flight
//!   before it returns, or reports what it could not write by the deadline.
//!
//! # Shape
//! Producers push [`Envelope`]s (a sanitised record, its enqueue time, and an optional
//! acknowledgement channel) into a [`MemoryQueue`]. `workers` writer tasks each take the
//! next [`Batch`] (`batch_size` records, or fewer once the oldest has waited
//! `batch_interval_ms`), write it, and resolve each envelope's acknowledgement with the
//! outcome.
//!
//! The [`Spool`] (optional, on by default in `serve`) is the queue's write-ahead log and
//! overflow. Records go to it when a producer wants a durable acknowledgement
//! ([`AuditLogger::log_durable`]), when the memory queue is full (the evicted oldest
//! record), while the database is down (new records and the batches that failed), and at
//! shutdown (whatever the deadline left). A reader task hands spooled records back as
//! batches; writers alternate between those and the memory queue, so a backlog drains
//! while new records keep flowing. A spooled record's segment is settled on commit.
//!
//! A record the database refuses goes to the `dead_letters` table (or, if that write
//! fails too, to `dead-letters.ndjson` in the spool directory), with the reason.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AsyncConfig, LimitsConfig};
use crate::model::Interaction;
use crate::store::Store;

pub mod queue;
pub mod spool;
mod writer;

pub use queue::MemoryQueue;
pub use spool::{Spool, SpoolError, SpoolRef, SpoolStats};

/// Why a record was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The queue was full and this was its oldest record.
    QueueFull,
    /// The logger was shut down before the record could be written.
    Shutdown,
    /// The record arrived after shutdown began.
    Closed,
    /// The database refused the record itself and it could not be dead-lettered.
    Rejected,
    /// The spool was full and its policy gave this record up.
    SpoolFull,
    /// The spool could not write it (disk full, I/O error).
    SpoolError,
}

impl DropReason {
    /// A fixed short name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Shutdown => "shutdown",
            DropReason::Closed => "closed",
            DropReason::Rejected => "rejected",
            DropReason::SpoolFull => "spool_full",
            DropReason::SpoolError => "spool_error",
        }
    }
}

/// What happened to a record whose producer waited for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed to the database by this write.
    Committed,
    /// Already stored before (same `interaction_id`); nothing written.
    Duplicate,
    /// Handed to the disk spool (the database was down or the queue full); it will be
    /// committed from there.
    Spooled,
    /// Refused by the database and stored in `dead_letters` with the reason.
    DeadLettered(String),
    /// Not stored, and why (with the database's message for `Rejected`).
    Dropped(DropReason, String),
}

/// Where a record in a batch came from, so its commit can be reported there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The memory queue.
    Memory,
    /// A spool segment; settled on commit.
    Spool(SpoolRef),
}

/// A record on its way to the store.
#[derive(Debug)]
pub struct Envelope {
    /// The sanitised record.
    pub record: Interaction,
    /// When it entered the pipeline (for batching deadlines and latency).
    pub enqueued_at: Instant,
    /// Resolved with the record's outcome, for producers that wait.
    pub ack: Option<oneshot::Sender<Outcome>>,
    /// Where it came from.
    pub origin: Origin,
}

impl Envelope {
    /// A record from the memory path.
    pub fn new(record: Interaction, ack: Option<oneshot::Sender<Outcome>>) -> Envelope {
        Envelope { record, enqueued_at: Instant::now(), ack, origin: Origin::Memory }
    }

    fn resolve(self, outcome: Outcome) {
        if let Some(ack) = self.ack {
            // The producer may have stopped waiting; that is its choice.
            let _ = ack.send(outcome);
        }
    }
}

/// Records written together in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// The records, in queue order.
    pub envelopes: Vec<Envelope>,
}

impl FromIterator<Envelope> for Batch {
    fn from_iter<I: IntoIterator<Item = Envelope>>(iter: I) -> Self {
        Batch { envelopes: iter.into_iter().collect() }
    }
}

impl Batch {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.envelopes.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
    }
}

/// Counters of everything the pipeline did, for metrics and reports.
#[derive(Debug)]
pub struct PipelineStats {
    /// Records taken by `log`.
    pub accepted: AtomicU64,
    /// Records committed to the database.
    pub committed: AtomicU64,
    /// Records skipped because they were already stored.
    pub duplicates: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped because shutdown's deadline passed before they were written.
    pub dropped_shutdown: AtomicU64,
    /// Dropped because they arrived after shutdown began.
    pub dropped_closed: AtomicU64,
    /// Refused by the database because of their data.
    pub rejected: AtomicU64,
    /// Failed write attempts (each is retried or split).
    pub write_errors: AtomicU64,
    /// Write attempts that were retries.
    pub retries: AtomicU64,
    /// Text fields changed by sanitising (NUL bytes, truncation).
    pub sanitized_fields: AtomicU64,
    /// Refused by the database and stored in the dead-letter table or file.
    pub dead_lettered: AtomicU64,
    /// Records moved from memory to the spool (queue full, database down, shutdown).
    pub spilled: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

impl Default for PipelineStats {
    fn default() -> Self {
        PipelineStats {
            accepted: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_shutdown: AtomicU64::new(0),
            dropped_closed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            sanitized_fields: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            spilled: AtomicU64::new(0),
            // Three significant figures up to an hour, in microseconds.
            latency_us: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")),
        }
    }
}

impl PipelineStats {
    /// The counter of a drop reason; `None` for the spool's reasons, which the spool
    /// counts itself where the drop happens.
    fn counter(&self, reason: DropReason) -> Option<&AtomicU64> {
        match reason {
            DropReason::QueueFull => Some(&self.dropped_queue_full),
            DropReason::Shutdown => Some(&self.dropped_shutdown),
            DropReason::Closed => Some(&self.dropped_closed),
            DropReason::Rejected => Some(&self.rejected),
            DropReason::SpoolFull | DropReason::SpoolError => None,
        }
    }

    fn record_latency(&self, since: &[Instant]) {
        let now = Instant::now();
        let mut h = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        for t in since {
            h.saturating_record(now.saturating_duration_since(*t).as_micros() as u64);
        }
    }

    /// Enqueue→commit latency quantile (0.0–1.0), in microseconds.
    pub fn latency_quantile_us(&self, q: f64) -> u64 {
        self.latency_us.lock().unwrap_or_else(|p| p.into_inner()).value_at_quantile(q)
    }

    /// A plain copy of the counters (spool counters left at zero).
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            dead_lettered: get(&self.dead_lettered),
            spilled: get(&self.spilled),
            accepted: get(&self.accepted),
            committed: get(&self.committed),
            duplicates: get(&self.duplicates),
            batches: get(&self.batches),
            dropped_queue_full: get(&self.dropped_queue_full),
            dropped_shutdown: get(&self.dropped_shutdown),
            dropped_closed: get(&self.dropped_closed),
            rejected: get(&self.rejected),
            write_errors: get(&self.write_errors),
            retries: get(&self.retries),
            sanitized_fields: get(&self.sanitized_fields),
            ..StatsSnapshot::default()
        }
    }
}

/// The counters of [`PipelineStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub committed: u64,
    pub duplicates: u64,
    pub batches: u64,
    pub dropped_queue_full: u64,
    pub dropped_shutdown: u64,
    pub dropped_closed: u64,
    pub rejected: u64,
    pub write_errors: u64,
    pub retries: u64,
    pub sanitized_fields: u64,
    pub dead_lettered: u64,
    pub spilled: u64,
    /// Records in the memory queue.
    pub queue_len: u64,
    pub spooled: u64,
    pub replayed: u64,
    pub dropped_spool_full: u64,
    pub dropped_spool_error: u64,
    pub spool_corrupt_records: u64,
    pub spool_corrupt_bytes: u64,
    /// Bytes of spool segment files.
    pub spool_bytes: u64,
    /// Records in the spool not yet committed.
    pub spool_records: u64,
}

impl StatsSnapshot {
    /// Every record lost, whatever the reason (dead-lettered records are kept, not lost).
    pub fn dropped_total(&self) -> u64 {
        self.dropped_queue_full
            + self.dropped_shutdown
            + self.dropped_closed
            + self.rejected
            + self.dropped_spool_full
            + self.dropped_spool_error
            + self.spool_corrupt_records
    }
}

/// What [`AuditLogger::shutdown`] managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// True when everything queued and in flight was written before the deadline.
    pub drained: bool,
    /// Records given up on at the deadline (counted as dropped, reason `shutdown`).
    pub abandoned: u64,
    /// The counters at the end.
    pub stats: StatsSnapshot,
}

/// Logs at most one line per interval, counting the lines it held back.
#[derive(Debug)]
pub(crate) struct RateLimitedLog {
    interval: Duration,
    last: Mutex<Option<std::time::Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    pub(crate) fn new(interval: Duration) -> Self {
        RateLimitedLog { interval, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// Calls `emit(suppressed_since_last)` if the interval has passed, else counts.
    pub(crate) fn log(&self, emit: impl FnOnce(u64)) {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        drop(last);
        emit(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

/// Settings of a running pipeline.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) batch_size: usize,
    pub(crate) batch_interval: Duration,
    pub(crate) max_field_bytes: usize,
}

pub(crate) struct Shared {
    pub(crate) queue: MemoryQueue,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) stats: Arc<PipelineStats>,
    pub(crate) settings: Settings,
    /// Cancelled when shutdown's deadline passes: writers stop retrying.
    pub(crate) give_up: CancellationToken,
    /// The disk spool, when configured.
    pub(crate) spool: Option<Spool>,
    /// Batches read back from the spool, shared by the writers.
    pub(crate) spool_batches: Option<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Batch>>>,
    /// Set when shutdown begins: writers take no more spool batches.
    pub(crate) closing: AtomicBool,
    pub(crate) health: Health,
    drop_log: RateLimitedLog,
}

/// Whether the database is taking writes, as the writers last saw it.
#[derive(Debug, Default)]
pub(crate) struct Health {
    down: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Health {
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Records a failed write; logs the transition to down once.
    pub(crate) fn failed(&self, error: &str, spooling: bool) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::error!(error, spooling, "database unavailable: audit writes are failing; retrying with backoff");
        }
    }

    /// Records a successful write; logs the recovery once.
    pub(crate) fn succeeded(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("database available again: audit writes resumed");
        }
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Shared {
    /// Counts, logs (rate-limited) and resolves a record that will not be stored.
    pub(crate) fn drop_record(&self, envelope: Envelope, reason: DropReason, detail: &str) {
        if let Some(counter) = self.stats.counter(reason) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let id = envelope.record.interaction_id;
        self.drop_log.log(|suppressed| {
            tracing::warn!(
                reason = reason.as_str(),
                interaction_id = %id,
                suppressed_since_last = suppressed,
                detail,
                "audit record dropped"
            );
        });
        envelope.resolve(Outcome::Dropped(reason, detail.to_string()));
    }

    /// Moves memory records to the spool (fire-and-forget appends). Records already from
    /// the spool stay where they are: still on disk, they are replayed on the next start.
    /// Without a spool, the records are dropped with `reason`.
    pub(crate) fn spill(&self, envelopes: Vec<Envelope>, reason: DropReason, detail: &str) {
        for envelope in envelopes {
            if let Origin::Spool(_) = envelope.origin {
                continue;
            }
            match &self.spool {
                Some(spool) => match spool.append(&envelope.record, None) {
                    Ok(()) => {
                        self.stats.spilled.fetch_add(1, Ordering::Relaxed);
                        envelope.resolve(Outcome::Spooled);
                    }
                    Err(e @ SpoolError::Full { .. }) => {
                        self.drop_record(envelope, DropReason::SpoolFull, &e.to_string());
                    }
                    Err(e) => self.drop_record(envelope, reason, &format!("{detail}; spool: {e}")),
                },
                None => self.drop_record(envelope, reason, detail),
            }
        }
    }
}

struct Running {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// The handle producers log through. Cheap to clone; all clones share one pipeline.
#[derive(Clone)]
pub struct AuditLogger {
    inner: Option<Arc<Running>>,
}

impl std::fmt::Debug for AuditLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLogger")
            .field("enabled", &self.inner.is_some())
            .field("queued", &self.queue_len())
            .finish()
    }
}

/// A durable acknowledgement: where the record is safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durable {
    /// fsync'd in the spool; it will be committed from there.
    Spooled,
    /// Committed to the database.
    Committed,
    /// Already in the database.
    Duplicate,
    /// Refused by the database and kept in `dead_letters`.
    DeadLettered(String),
}

/// Why a record could not be made durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}", reason = .reason.as_str())]
pub struct NotDurable {
    /// The drop reason.
    pub reason: DropReason,
    /// What happened.
    pub detail: String,
}

impl AuditLogger {
    /// Starts the writers on the current Tokio runtime, with memory only: without a
    /// spool, records live in memory until committed.
    pub fn start(store: Arc<dyn Store>, config: &AsyncConfig, limits: &LimitsConfig) -> AuditLogger {
        Self::start_with_spool(store, config, limits, None)
    }

    /// Starts the writers with an opened spool; records it holds from an earlier run
    /// are replayed at once.
    pub fn start_with_spool(
        store: Arc<dyn Store>,
        config: &AsyncConfig,
        limits: &LimitsConfig,
        spool: Option<Spool>,
    ) -> AuditLogger {
        let batch_size = config.batch_size.max(1);
        let spool_batches = spool.as_ref().map(|spool| tokio::sync::Mutex::new(spool.start_reader(batch_size)));
        let shared = Arc::new(Shared {
            queue: MemoryQueue::new(config.queue_size),
            store,
            stats: Arc::new(PipelineStats::default()),
            settings: Settings {
                batch_size,
                batch_interval: Duration::from_millis(config.batch_interval_ms.max(1)),
                max_field_bytes: limits.max_field_bytes,
            },
            give_up: CancellationToken::new(),
            spool,
            spool_batches,
            closing: AtomicBool::new(false),
            health: Health::default(),
            drop_log: RateLimitedLog::new(Duration::from_secs(1)),
        });
        let workers = (0..config.workers.max(1)).map(|id| tokio::spawn(writer::run(id, shared.clone()))).collect();
        tracing::info!(
            workers = config.workers,
            queue_size = config.queue_size,
            batch_size = config.batch_size,
            batch_interval_ms = config.batch_interval_ms,
            spool = ?shared.spool.as_ref().map(|s| s.dir().display().to_string()),
            "audit pipeline started"
        );
        AuditLogger { inner: Some(Arc::new(Running { shared, workers: Mutex::new(workers) })) }
    }

    /// A logger that does nothing (`audit.enabled: false`): `log` costs one branch.
    pub fn disabled() -> AuditLogger {
        AuditLogger { inner: None }
    }

    /// True unless this is [`AuditLogger::disabled`].
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// True when this logger has a disk spool.
    pub fn has_spool(&self) -> bool {
        self.inner.as_ref().is_some_and(|r| r.shared.spool.is_some())
    }

    /// Queues a record for writing. Never blocks, never fails: when the queue is full the
    /// oldest record goes to the spool (or, without one, is dropped and counted).
    pub fn log(&self, record: Interaction) {
        self.enqueue(record, None);
    }

    /// Queues a record and waits until it is committed, found already stored, spooled
    /// (the database is down), dead-lettered, or dropped.
    pub async fn log_committed(&self, record: Interaction) -> Outcome {
        if self.inner.is_none() {
            return Outcome::Dropped(DropReason::Closed, "audit logging is disabled".into());
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(record, Some(tx));
        rx.await.unwrap_or_else(|_| Outcome::Dropped(DropReason::Shutdown, "pipeline stopped before writing".into()))
    }

    /// Takes a record and resolves once it is safe: fsync'd in the spool, or (without a
    /// spool) committed to the database.
    pub async fn log_durable(&self, record: Interaction) -> Result<Durable, NotDurable> {
        let Some(running) = &self.inner else {
            return Err(NotDurable { reason: DropReason::Closed, detail: "audit logging is disabled".into() });
        };
        let shared = &running.shared;
        let Some(spool) = &shared.spool else {
            return match self.log_committed(record).await {
                Outcome::Committed => Ok(Durable::Committed),
                Outcome::Duplicate => Ok(Durable::Duplicate),
                Outcome::Spooled => Ok(Durable::Spooled),
                Outcome::DeadLettered(e) => Ok(Durable::DeadLettered(e)),
                Outcome::Dropped(reason, detail) => Err(NotDurable { reason, detail }),
            };
        };
        let record = self.prepare(shared, record);
        match spool.append_durable(&record).await {
            Ok(()) => Ok(Durable::Spooled),
            // The spool counted the drop where it happened.
            Err(e @ SpoolError::Full { .. }) => {
                Err(NotDurable { reason: DropReason::SpoolFull, detail: e.to_string() })
            }
            Err(SpoolError::Closed) => {
                shared.stats.dropped_closed.fetch_add(1, Ordering::Relaxed);
                Err(NotDurable { reason: DropReason::Closed, detail: "logger is shutting down".into() })
            }
            Err(e) => Err(NotDurable { reason: DropReason::SpoolError, detail: e.to_string() }),
        }
    }

    /// Counts and sanitises a record on its way in.
    fn prepare(&self, shared: &Shared, mut record: Interaction) -> Interaction {
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let changed = record.sanitize(shared.settings.max_field_bytes);
        if changed > 0 {
            shared.stats.sanitized_fields.fetch_add(changed as u64, Ordering::Relaxed);
        }
        record
    }

    fn enqueue(&self, record: Interaction, ack: Option<oneshot::Sender<Outcome>>) {
        let Some(running) = &self.inner else {
            return;
        };
        let shared = &running.shared;
        let record = self.prepare(shared, record);
        let envelope = Envelope::new(record, ack);
        // While the database is down, or once shutdown began, new records go straight
        // to disk rather than piling up in memory.
        let closing = shared.closing.load(Ordering::Acquire);
        if shared.spool.is_some() && (closing || (shared.health.is_down() && envelope.ack.is_none())) {
            shared.spill(vec![envelope], DropReason::Closed, "logger is shutting down");
            return;
        }
        if closing {
            shared.drop_record(envelope, DropReason::Closed, "logger is shutting down");
            return;
        }
        match shared.queue.push(envelope, shared.settings.batch_size) {
            None => {}
            Some(rejected) if shared.closing.load(Ordering::Acquire) => {
                shared.spill(vec![rejected], DropReason::Closed, "logger is shutting down")
            }
            Some(evicted) => shared.spill(vec![evicted], DropReason::QueueFull, "queue full, oldest record dropped"),
        }
    }

    /// Records waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.inner.as_ref().map_or(0, |r| r.shared.queue.len())
    }

    /// The pipeline's counters.
    pub fn stats(&self) -> Arc<PipelineStats> {
        self.inner.as_ref().map_or_else(|| Arc::new(PipelineStats::default()), |r| r.shared.stats.clone())
    }

    /// Every counter, the spool's included, and the queue and spool depths.
    pub fn snapshot(&self) -> StatsSnapshot {
        let Some(running) = &self.inner else { return StatsSnapshot::default() };
        let shared = &running.shared;
        let mut snapshot = shared.stats.snapshot();
        snapshot.queue_len = shared.queue.len() as u64;
        if let Some(spool) = &shared.spool {
            let s = spool.stats();
            let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
            snapshot.spooled = get(&s.spooled);
            snapshot.replayed = get(&s.replayed);
            snapshot.dropped_spool_full = get(&s.dropped_full);
            snapshot.dropped_spool_error = get(&s.dropped_io);
            snapshot.spool_corrupt_records = get(&s.corrupt_records);
            snapshot.spool_corrupt_bytes = get(&s.corrupt_bytes);
            snapshot.spool_bytes = get(&s.bytes);
            snapshot.spool_records = get(&s.records);
        }
        snapshot
    }

    /// The last write error while the database is considered down; `None` when writes
    /// succeed.
    pub fn database_down(&self) -> Option<String> {
        let running = self.inner.as_ref()?;
        let health = &running.shared.health;
        if health.is_down() {
            Some(health.last_error().unwrap_or_else(|| "database unavailable".into()))
        } else {
            None
        }
    }

    /// The store records are written to, if enabled.
    pub fn store(&self) -> Option<Arc<dyn Store>> {
        self.inner.as_ref().map(|r| r.shared.store.clone())
    }

    /// The spool, if any.
    pub fn spool(&self) -> Option<Spool> {
        self.inner.as_ref().and_then(|r| r.shared.spool.clone())
    }

    /// Stops intake and writes everything queued, in flight and spooled to the database.
    /// Returns when all is written, when the database is down and memory is empty, or
    /// when `deadline` has passed. Then what is left in memory goes to the spool (which is
    /// flushed and closed), or, without one, is counted as dropped (reason `shutdown`)
    /// and logged. Records still in the spool stay there for the next start.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let Some(running) = &self.inner else {
            return ShutdownReport { drained: true, abandoned: 0, stats: StatsSnapshot::default() };
        };
        let shared = &running.shared;
        shared.closing.store(true, Ordering::Release);
        shared.queue.close();
        let deadline_at = tokio::time::Instant::now() + deadline;
        // First drain memory and the spool to the database; only then stop reading the
        // spool, so a graceful stop leaves nothing behind while the database is up.
        let emptied = tokio::time::timeout_at(deadline_at, async {
            loop {
                let memory_empty = shared.queue.is_empty();
                let spool_empty = shared.spool.as_ref().is_none_or(|s| s.is_empty());
                // With the database down the spool cannot drain now; it is on disk and
                // replayed at the next start, so there is no point waiting for it.
                if memory_empty && (spool_empty || shared.health.is_down()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok();
        if let Some(spool) = &shared.spool {
            spool.stop_reading();
        }
        let handles: Vec<JoinHandle<()>> =
            std::mem::take(&mut *running.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let before = shared.stats.dropped_shutdown.load(Ordering::Relaxed);
        let spilled_before = shared.stats.spilled.load(Ordering::Relaxed);
        let mut all = futures::future::join_all(handles);
        let drained = match tokio::time::timeout_at(deadline_at, &mut all).await {
            Ok(_) => emptied,
            Err(_) => {
                tracing::warn!(
                    queued = shared.queue.len(),
                    ?deadline,
                    spool = shared.spool.is_some(),
                    "shutdown deadline passed with records unwritten; spooling them (or dropping, without a spool)"
                );
                shared.give_up.cancel();
                // Writers stop at their next retry; one in the middle of a statement is
                // bounded by the pool's acquire timeout and the server's own limits.
                if tokio::time::timeout(Duration::from_secs(10), &mut all).await.is_err() {
                    tracing::error!("writers did not stop within 10s of the shutdown deadline");
                }
                false
            }
        };
        shared.spill(shared.queue.drain_all(), DropReason::Shutdown, "shutdown deadline passed");
        if let Some(spool) = &shared.spool {
            spool.close().await;
        }
        let stats = self.snapshot();
        let abandoned = stats.dropped_shutdown - before;
        let spilled = stats.spilled - spilled_before;
        tracing::info!(
            drained,
            committed = stats.committed,
            dropped = stats.dropped_total(),
            abandoned,
            spilled_at_shutdown = spilled,
            spool_records = stats.spool_records,
            "audit pipeline stopped"
        );
        ShutdownReport { drained: drained && abandoned == 0 && stats.spool_records == 0, abandoned, stats }
    }
}
