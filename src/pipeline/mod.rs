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
//! The disk spool slots in as the queue's overflow and write-ahead log: it sits behind
//! the same push / `next_batch` seam, and a writer reports every committed batch back
//! through [`Batch`]'s acknowledgements, which is the point at which a spool may delete
//! the records' segment. Nothing in the writers changes.

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
mod writer;

pub use queue::MemoryQueue;

/// Why a record was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The queue was full and this was its oldest record.
    QueueFull,
    /// The logger was shut down before the record could be written.
    Shutdown,
    /// The record arrived after shutdown began.
    Closed,
    /// The database refused the record itself.
    Rejected,
}

impl DropReason {
    /// A fixed short name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Shutdown => "shutdown",
            DropReason::Closed => "closed",
            DropReason::Rejected => "rejected",
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
    /// Not stored, and why (with the database's message for `Rejected`).
    Dropped(DropReason, String),
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
}

impl Envelope {
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
            // Three significant figures up to an hour, in microseconds.
            latency_us: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")),
        }
    }
}

impl PipelineStats {
    fn counter(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::QueueFull => &self.dropped_queue_full,
            DropReason::Shutdown => &self.dropped_shutdown,
            DropReason::Closed => &self.dropped_closed,
            DropReason::Rejected => &self.rejected,
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

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
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
}

impl StatsSnapshot {
    /// Every record not stored, whatever the reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_queue_full + self.dropped_shutdown + self.dropped_closed + self.rejected
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
    drop_log: RateLimitedLog,
}

impl Shared {
    /// Counts, logs (rate-limited) and resolves a record that will not be stored.
    pub(crate) fn drop_record(&self, envelope: Envelope, reason: DropReason, detail: &str) {
        self.stats.counter(reason).fetch_add(1, Ordering::Relaxed);
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
}

struct Running {
    shared: Arc<Shared>,
    closing: AtomicBool,
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

impl AuditLogger {
    /// Starts the writers on the current Tokio runtime.
    pub fn start(store: Arc<dyn Store>, config: &AsyncConfig, limits: &LimitsConfig) -> AuditLogger {
        let shared = Arc::new(Shared {
            queue: MemoryQueue::new(config.queue_size),
            store,
            stats: Arc::new(PipelineStats::default()),
            settings: Settings {
                batch_size: config.batch_size.max(1),
                batch_interval: Duration::from_millis(config.batch_interval_ms.max(1)),
                max_field_bytes: limits.max_field_bytes,
            },
            give_up: CancellationToken::new(),
            drop_log: RateLimitedLog::new(Duration::from_secs(1)),
        });
        let workers = (0..config.workers.max(1)).map(|id| tokio::spawn(writer::run(id, shared.clone()))).collect();
        tracing::info!(
            workers = config.workers,
            queue_size = config.queue_size,
            batch_size = config.batch_size,
            batch_interval_ms = config.batch_interval_ms,
            "audit pipeline started"
        );
        AuditLogger {
            inner: Some(Arc::new(Running { shared, closing: AtomicBool::new(false), workers: Mutex::new(workers) })),
        }
    }

    /// A logger that does nothing (`audit.enabled: false`): `log` costs one branch.
    pub fn disabled() -> AuditLogger {
        AuditLogger { inner: None }
    }

    /// True unless this is [`AuditLogger::disabled`].
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues a record for writing. Never blocks, never fails: when the queue is full the
    /// oldest record is dropped and counted.
    pub fn log(&self, record: Interaction) {
        self.enqueue(record, None);
    }

    /// Queues a record and waits until it is committed, found already stored, or dropped.
    pub async fn log_committed(&self, record: Interaction) -> Outcome {
        if self.inner.is_none() {
            return Outcome::Dropped(DropReason::Closed, "audit logging is disabled".into());
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(record, Some(tx));
        rx.await.unwrap_or_else(|_| Outcome::Dropped(DropReason::Shutdown, "pipeline stopped before writing".into()))
    }

    fn enqueue(&self, mut record: Interaction, ack: Option<oneshot::Sender<Outcome>>) {
        let Some(running) = &self.inner else {
            return;
        };
        let shared = &running.shared;
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let changed = record.sanitize(shared.settings.max_field_bytes);
        if changed > 0 {
            shared.stats.sanitized_fields.fetch_add(changed as u64, Ordering::Relaxed);
        }
        let envelope = Envelope { record, enqueued_at: Instant::now(), ack };
        if running.closing.load(Ordering::Acquire) {
            shared.drop_record(envelope, DropReason::Closed, "logger is shutting down");
            return;
        }
        match shared.queue.push(envelope, shared.settings.batch_size) {
            None => {}
            Some(rejected) if shared.give_up.is_cancelled() || running.closing.load(Ordering::Acquire) => {
                shared.drop_record(rejected, DropReason::Closed, "logger is shutting down")
            }
            Some(evicted) => shared.drop_record(evicted, DropReason::QueueFull, "queue full, oldest record dropped"),
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

    /// The store records are written to, if enabled.
    pub fn store(&self) -> Option<Arc<dyn Store>> {
        self.inner.as_ref().map(|r| r.shared.store.clone())
    }

    /// Stops intake and writes everything queued and in flight. Returns when all is
    /// written or `deadline` has passed; what could not be written by then is counted as
    /// dropped (reason `shutdown`) and logged.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let Some(running) = &self.inner else {
            return ShutdownReport { drained: true, abandoned: 0, stats: StatsSnapshot::default() };
        };
        let shared = &running.shared;
        running.closing.store(true, Ordering::Release);
        shared.queue.close();
        let handles: Vec<JoinHandle<()>> =
            std::mem::take(&mut *running.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let before = shared.stats.dropped_shutdown.load(Ordering::Relaxed);
        let mut all = futures::future::join_all(handles);
        let drained = match tokio::time::timeout(deadline, &mut all).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(
                    queued = shared.queue.len(),
                    ?deadline,
                    "shutdown deadline passed with records unwritten; giving up on them"
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
        for envelope in shared.queue.drain_all() {
            shared.drop_record(envelope, DropReason::Shutdown, "shutdown deadline passed");
        }
        let stats = shared.stats.snapshot();
        let abandoned = stats.dropped_shutdown - before;
        tracing::info!(
            drained,
            committed = stats.committed,
            dropped = stats.dropped_total(),
            abandoned,
            "audit pipeline stopped"
        );
        ShutdownReport { drained: drained && abandoned == 0, abandoned, stats }
    }
}
