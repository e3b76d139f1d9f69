//! [`AuditLogger`]: the handle producers log through, and its start and shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::envelope::{Envelope, Outcome};
use super::health::Health;
use super::queue::MemoryQueue;
use super::shared::{Settings, Shared, SpillCause};
use super::spool::{Spool, SpoolError};
use super::stage::Stage;
use super::stats::{DropReason, PipelineStats, RateLimitedLog, StatsSnapshot};
use super::writer;
use crate::config::{AsyncConfig, LimitsConfig};
use crate::model::Interaction;
use crate::store::BatchSink;

/// How often shutdown looks whether memory and the spool have drained.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// How long shutdown waits for writers to stop once its deadline has passed.
const WRITER_STOP_GRACE: Duration = Duration::from_secs(10);
/// At most one "record dropped" log line per this interval.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What [`AuditLogger::shutdown`] managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// True when everything queued, in flight and spooled was written before the deadline.
    pub drained: bool,
    /// Records given up on at the deadline (counted as dropped, reason `shutdown`).
    pub abandoned: u64,
    /// The counters at the end.
    pub stats: StatsSnapshot,
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

impl AuditLogger {
    /// Starts the writers on the current Tokio runtime, with memory only: without a
    /// spool, records live in memory until committed. No [`Stage`]s: see
    /// [`AuditLogger::builder`].
    pub fn start(sink: Arc<dyn BatchSink>, config: &AsyncConfig, limits: &LimitsConfig) -> AuditLogger {
        Self::builder(sink, config, limits).start()
    }

    /// Starts the writers with an opened spool; records it holds from an earlier run
    /// are replayed at once.
    pub fn start_with_spool(
        sink: Arc<dyn BatchSink>,
        config: &AsyncConfig,
        limits: &LimitsConfig,
        spool: Option<Spool>,
    ) -> AuditLogger {
        Self::builder(sink, config, limits).spool(spool).start()
    }

    /// Starts the writers before the database is ready for writes: see
    /// [`LoggerBuilder::waiting_for`].
    pub fn start_waiting(
        sink: Arc<dyn BatchSink>,
        config: &AsyncConfig,
        limits: &LimitsConfig,
        spool: Option<Spool>,
        waiting_for: &str,
    ) -> AuditLogger {
        Self::builder(sink, config, limits).spool(spool).waiting_for(Some(waiting_for)).start()
    }

    /// A logger writing to `sink`, to be completed with a spool, stages and start-up
    /// state, then started.
    pub fn builder(sink: Arc<dyn BatchSink>, config: &AsyncConfig, limits: &LimitsConfig) -> LoggerBuilder {
        LoggerBuilder {
            sink,
            config: config.clone(),
            limits: limits.clone(),
            spool: None,
            waiting_for: None,
            stages: Vec::new(),
        }
    }

    fn launch(builder: LoggerBuilder) -> AuditLogger {
        let LoggerBuilder { sink, config, limits, spool, waiting_for, stages } = builder;
        let waiting_for = waiting_for.as_deref();
        let batch_size = config.batch_size.max(1);
        let spool_batches = spool.as_ref().map(|spool| tokio::sync::Mutex::new(spool.start_reader(batch_size)));
        let shared = Arc::new(Shared {
            queue: MemoryQueue::new(config.queue_size),
            sink,
            stats: Arc::new(PipelineStats::default()),
            settings: Settings {
                batch_size,
                batch_interval: Duration::from_millis(config.batch_interval_ms.max(1)),
                max_field_bytes: limits.max_field_bytes,
            },
            stages,
            give_up: CancellationToken::new(),
            spool,
            spool_batches,
            closing: CancellationToken::new(),
            health: Health::new(waiting_for.is_none(), waiting_for.unwrap_or_default()),
            drop_log: RateLimitedLog::new(DROP_LOG_INTERVAL),
            dead_letter_log: RateLimitedLog::new(DROP_LOG_INTERVAL),
        });
        let workers = (0..config.workers.max(1)).map(|id| tokio::spawn(writer::run(id, shared.clone()))).collect();
        tracing::info!(
            workers = config.workers,
            queue_size = config.queue_size,
            batch_size = config.batch_size,
            batch_interval_ms = config.batch_interval_ms,
            stages = shared.stages.len(),
            spool = ?shared.spool.as_ref().map(|s| s.dir().display().to_string()),
            database_ready = waiting_for.is_none(),
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

    /// The database is ready for writes (start-up reached and migrated it).
    pub fn set_store_ready(&self) {
        if let Some(running) = &self.inner {
            running.shared.health.set_ready();
        }
    }

    /// Start-up is still waiting for the database, for this reason (shown by `/readyz`).
    pub fn store_not_ready(&self, reason: &str) {
        if let Some(running) = &self.inner {
            running.shared.health.not_ready(reason);
        }
    }

    /// True once the database has been ready for writes (a later outage does not
    /// change this; see [`AuditLogger::database_down`]).
    pub fn is_store_ready(&self) -> bool {
        self.inner.as_ref().is_none_or(|r| r.shared.health.is_ready())
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
        let record = prepare(shared, record);
        let (fsynced, notice) = oneshot::channel();
        // An error here is also sent to the notice, which reports it below.
        let _ = spool.append(&record, Some(fsynced));
        shared.stats.intake.fetch_sub(1, Ordering::SeqCst);
        match notice.await.unwrap_or(Err(SpoolError::Closed)) {
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

    fn enqueue(&self, record: Interaction, on_commit: Option<oneshot::Sender<Outcome>>) {
        let Some(running) = &self.inner else {
            return;
        };
        let shared = &running.shared;
        let envelope = Envelope::new(prepare(shared, record), on_commit);
        Self::place(shared, envelope);
        shared.stats.intake.fetch_sub(1, Ordering::SeqCst);
    }

    /// Puts a prepared record in the queue, or the spool, or counts its drop.
    fn place(shared: &Shared, envelope: Envelope) {
        // While the database is down, or once shutdown began, new records go straight
        // to disk rather than piling up in memory.
        let closing = shared.closing.is_cancelled();
        if shared.spool.is_some() && closing {
            shared.spill(vec![envelope], SpillCause::Closing);
            return;
        }
        if shared.spool.is_some() && shared.health.is_down() && envelope.on_commit.is_none() {
            shared.spill(vec![envelope], SpillCause::DatabaseDown);
            return;
        }
        if closing {
            shared.drop_record(envelope, DropReason::Closed, "logger is shutting down");
            return;
        }
        match shared.queue.push(envelope, shared.settings.batch_size) {
            None => {}
            Some(rejected) if shared.closing.is_cancelled() => shared.spill(vec![rejected], SpillCause::Closing),
            Some(evicted) => shared.spill(vec![evicted], SpillCause::QueueFull),
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
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        // Read in the order records flow (accepted, then where they wait, then the
        // outcomes), so a record moving on between two reads is seen at least once:
        // accepted <= outcomes + waiting holds in every snapshot, even under load.
        let accepted = get(&shared.stats.accepted);
        let intake = get(&shared.stats.intake);
        let queue_len = shared.queue.len() as u64;
        let spool_appending = shared.spool.as_ref().map_or(0, |s| s.appending());
        let in_flight = shared.queue.taken();
        let spool_records = shared.spool.as_ref().map_or(0, |s| get(&s.stats().records));
        let mut snapshot = shared.stats.snapshot();
        snapshot.accepted = accepted;
        snapshot.queue_len = queue_len;
        snapshot.in_flight = in_flight;
        snapshot.intake = intake;
        if let Some(spool) = &shared.spool {
            let s = spool.stats();
            snapshot.spooled = get(&s.spooled);
            snapshot.replayed = get(&s.replayed);
            snapshot.dropped_spool_full = get(&s.dropped_full);
            snapshot.dropped_spool_error = get(&s.dropped_io);
            snapshot.spool_corrupt_records = get(&s.corrupt_records);
            snapshot.spool_corrupt_bytes = get(&s.corrupt_bytes);
            snapshot.spool_bytes = get(&s.bytes);
            snapshot.spool_records = spool_records;
            snapshot.spool_appending = spool_appending;
        }
        snapshot.oldest_uncommitted_ms = self.oldest_uncommitted_age().map(|age| age.as_millis() as u64);
        snapshot
    }

    /// How long the oldest record not yet committed has waited: the memory queue's
    /// oldest, or the spool's oldest segment with records waiting (whichever is older).
    pub fn oldest_uncommitted_age(&self) -> Option<Duration> {
        let shared = &self.inner.as_ref()?.shared;
        let in_memory = shared.queue.oldest_enqueued_at().map(|t| t.elapsed());
        let in_spool =
            shared.spool.as_ref().and_then(|s| s.oldest_pending_since()).map(|t| t.elapsed().unwrap_or_default());
        in_memory.into_iter().chain(in_spool).max()
    }

    /// Why the database is not taking writes (a failing write, or start-up still
    /// waiting for it); `None` when writes succeed.
    pub fn database_down(&self) -> Option<String> {
        let running = self.inner.as_ref()?;
        let health = &running.shared.health;
        if health.is_down() {
            Some(health.last_error().unwrap_or_else(|| "database unavailable".into()))
        } else {
            None
        }
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
        shared.closing.cancel();
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
                tokio::time::sleep(DRAIN_POLL).await;
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
                if tokio::time::timeout(WRITER_STOP_GRACE, &mut all).await.is_err() {
                    tracing::error!("writers did not stop within 10s of the shutdown deadline");
                }
                false
            }
        };
        shared.spill(shared.queue.drain_all(), SpillCause::Shutdown);
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

/// Counts a record on its way in, runs the stages (masking) over it, then sanitises it:
/// the one door every record comes through, so nothing reaches the queue, the spool, a
/// dead letter or a log line unmasked.
/// The caller takes the record off `intake` once it has placed it.
fn prepare(shared: &Shared, mut record: Interaction) -> Interaction {
    // `intake` before `accepted`: see `snapshot` for why the order matters.
    shared.stats.intake.fetch_add(1, Ordering::SeqCst);
    shared.stats.accepted.fetch_add(1, Ordering::SeqCst);
    // Masking runs before truncation so a secret straddling the cut is still seen whole.
    for stage in &shared.stages {
        stage.process(&mut record);
    }
    let changed = record.sanitize(shared.settings.max_field_bytes);
    if changed > 0 {
        shared.stats.sanitized_fields.fetch_add(changed as u64, Ordering::Relaxed);
    }
    record
}

/// How a logger is put together before it starts: [`AuditLogger::builder`].
#[must_use = "a builder does nothing until `start`"]
pub struct LoggerBuilder {
    sink: Arc<dyn BatchSink>,
    config: AsyncConfig,
    limits: LimitsConfig,
    spool: Option<Spool>,
    waiting_for: Option<String>,
    stages: Vec<Arc<dyn Stage>>,
}

impl LoggerBuilder {
    /// The disk spool (`None`: memory only); what it holds from an earlier run is
    /// replayed at once.
    pub fn spool(mut self, spool: Option<Spool>) -> Self {
        self.spool = spool;
        self
    }

    /// The database is not ready for writes yet (unreachable, or not migrated), for this
    /// reason (shown by `/readyz`): records are spooled (or, without a spool, held in
    /// memory) and nothing is written until [`AuditLogger::set_store_ready`].
    pub fn waiting_for(mut self, reason: Option<&str>) -> Self {
        self.waiting_for = reason.map(str::to_owned);
        self
    }

    /// Adds a stage every record passes through on its way in, after those added before.
    pub fn stage(mut self, stage: Arc<dyn Stage>) -> Self {
        self.stages.push(stage);
        self
    }

    /// Starts the writers on the current Tokio runtime.
    pub fn start(self) -> AuditLogger {
        AuditLogger::launch(self)
    }
}
