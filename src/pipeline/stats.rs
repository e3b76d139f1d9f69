//! What the pipeline counts: drops by reason, commits, retries, latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// Why a record was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The queue was full and this was its oldest record (no spool to overflow to).
    QueueFull,
    /// The logger was shut down before the record could be written (no spool to keep it).
    Shutdown,
    /// The record arrived after shutdown began.
    Closed,
    /// The database was down and the record could not be spooled either.
    DatabaseDown,
    /// The database refused the record itself and it could not be dead-lettered.
    Rejected,
    /// The spool was full and its policy gave this record up.
    SpoolFull,
    /// The spool could not write it (disk full, I/O error).
    SpoolError,
}

impl DropReason {
    /// A fixed short name, for logs, metric labels and API error codes.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Shutdown => "shutdown",
            DropReason::Closed => "closed",
            DropReason::DatabaseDown => "database_down",
            DropReason::Rejected => "rejected",
            DropReason::SpoolFull => "spool_full",
            DropReason::SpoolError => "spool_error",
        }
    }
}

/// Latency histogram bounds: 1 µs to an hour, three significant figures.
const LATENCY_MAX_US: u64 = 3_600_000_000;

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
    /// Dropped because the queue was full (no spool).
    pub dropped_queue_full: AtomicU64,
    /// Dropped because shutdown's deadline passed before they were written (no spool).
    pub dropped_shutdown: AtomicU64,
    /// Dropped because they arrived after shutdown began.
    pub dropped_closed: AtomicU64,
    /// Dropped because the database was down and the spool refused them.
    pub dropped_database_down: AtomicU64,
    /// Refused by the database because of their data and not kept anywhere.
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
    /// Records accepted and being masked and placed (not yet in the queue or the spool).
    pub intake: AtomicU64,
    /// Enqueue→commit latency, seconds (exported as a Prometheus histogram).
    pub commit_latency: prometheus_client::metrics::histogram::Histogram,
    /// Records per committed batch.
    pub batch_records: prometheus_client::metrics::histogram::Histogram,
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
            dropped_database_down: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            sanitized_fields: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            spilled: AtomicU64::new(0),
            intake: AtomicU64::new(0),
            // 1 ms to ~2 min: a commit within a batch interval, up to a long outage's
            // spool drain.
            commit_latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 18),
            ),
            batch_records: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 14),
            ),
            latency_us: Mutex::new(Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")),
        }
    }
}

impl PipelineStats {
    /// The counter of a drop reason; `None` for the spool's reasons, which the spool
    /// counts itself where the drop happens.
    pub(crate) fn counter(&self, reason: DropReason) -> Option<&AtomicU64> {
        match reason {
            DropReason::QueueFull => Some(&self.dropped_queue_full),
            DropReason::Shutdown => Some(&self.dropped_shutdown),
            DropReason::Closed => Some(&self.dropped_closed),
            DropReason::DatabaseDown => Some(&self.dropped_database_down),
            DropReason::Rejected => Some(&self.rejected),
            DropReason::SpoolFull | DropReason::SpoolError => None,
        }
    }

    pub(crate) fn record_latency(&self, since: impl IntoIterator<Item = Instant>) {
        let now = Instant::now();
        let mut h = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        let mut records = 0u64;
        for t in since {
            let waited = now.saturating_duration_since(t);
            h.saturating_record(waited.as_micros() as u64);
            self.commit_latency.observe(waited.as_secs_f64());
            records += 1;
        }
        self.batch_records.observe(records as f64);
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
            dropped_database_down: get(&self.dropped_database_down),
            rejected: get(&self.rejected),
            write_errors: get(&self.write_errors),
            retries: get(&self.retries),
            sanitized_fields: get(&self.sanitized_fields),
            ..StatsSnapshot::default()
        }
    }
}

/// The counters of [`PipelineStats`] and the spool at one moment.
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
    pub dropped_database_down: u64,
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
    /// Memory records a writer holds now.
    pub in_flight: u64,
    /// Records handed to the spool, not yet written and fsync'd.
    pub spool_appending: u64,
    /// Records accepted and being masked and placed.
    pub intake: u64,
    /// Age of the oldest record not yet committed, in milliseconds (the queue's oldest,
    /// or the spool's oldest segment with records waiting); `None` when nothing waits.
    pub oldest_uncommitted_ms: Option<u64>,
}

impl StatsSnapshot {
    /// Every record lost, whatever the reason (dead-lettered records are kept, not lost).
    pub fn dropped_total(&self) -> u64 {
        self.dropped_queue_full
            + self.dropped_shutdown
            + self.dropped_closed
            + self.dropped_database_down
            + self.rejected
            + self.dropped_spool_full
            + self.dropped_spool_error
            + self.spool_corrupt_records
    }
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
