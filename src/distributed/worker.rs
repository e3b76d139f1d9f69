//! `opsagent-audit worker`: consumes records from the queue and writes them to the
//! database, acknowledging each delivery only once its record is safe there.
//!
//! One connection and one channel per worker process. The loop gathers a batch (the
//! first delivery, then whatever else arrives without a pause of 10 ms, for at most
//! `audit.async.batch_interval_ms`, up to the prefetch), writes it through a pipeline of its own (sink: the store; no spool:
//! the broker is this worker's buffer; no stages: producers masked the records), waits
//! for every record's outcome and acknowledges. Batches are handled one at a time, so a
//! `multiple` ack of the batch's highest delivery tag acknowledges exactly this batch.
//!
//! A broken connection voids the deliveries in hand (the broker requeues them; acking
//! them on a new channel is impossible): the worker reconnects with backoff and the
//! records come again, to this worker or another, and are found already stored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::message;
use super::topology::{self, DistributedError, Topology};
use crate::config::{redact_url, AsyncConfig, Config};
use crate::model::Interaction;
use crate::pipeline::stats::RateLimitedLog;
use crate::pipeline::{backoff, AuditLogger, Outcome, ShutdownReport};
use crate::store::{self, Store};

/// First wait before reconnecting to the broker or retrying the database; doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between attempts.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long the worker's own pipeline waits to fill a batch. The worker hands it whole
/// batches at once, so waiting would only add latency.
const PIPELINE_LINGER_MS: u64 = 1;

/// A pause in deliveries this long ends the batch being gathered.
const GATHER_IDLE: Duration = Duration::from_millis(10);

/// The worker's counters, read by `/metrics`.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Deliveries received.
    pub deliveries: AtomicU64,
    /// Deliveries the broker marked as redelivered (another consumer had them first).
    pub redelivered: AtomicU64,
    /// Deliveries acknowledged after their record was committed, found stored, or
    /// dead-lettered.
    pub acknowledged: AtomicU64,
    /// Deliveries handed back to the queue (nack with requeue) because their record
    /// could not be written.
    pub requeued: AtomicU64,
    /// Messages rejected to the dead-letter exchange because they are not records.
    pub undecodable: AtomicU64,
    /// Batches acknowledged.
    pub batches: AtomicU64,
    /// Connections to the broker that were lost (or could not be made).
    pub broker_errors: AtomicU64,
    /// True while connected and consuming.
    pub consuming: AtomicBool,
}

/// What a worker did by the time it stopped.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    /// Deliveries acknowledged over the worker's life.
    pub acknowledged: u64,
    /// Deliveries in hand at shutdown that could not be written within
    /// `audit.async.shutdown_timeout` (left unacknowledged: the broker requeues them).
    pub left_in_queue: u64,
    /// The worker's pipeline at the end.
    pub pipeline: ShutdownReport,
}

/// How a consuming session ended.
enum SessionEnd {
    /// Shutdown was asked for; `left` deliveries in hand were not written in time.
    Shutdown { left: u64 },
}

/// A worker: the store, its pipeline and the broker's coordinates.
pub struct Worker {
    url: String,
    topology: Topology,
    prefetch: u16,
    gather: Duration,
    shutdown_timeout: Duration,
    migrate: bool,
    store: Arc<dyn Store>,
    logger: AuditLogger,
    stats: Arc<WorkerStats>,
    /// Why the worker is not ready yet (the database), `None` once it is.
    not_ready: std::sync::Mutex<Option<String>>,
    /// One "not a record" line a second at most: a publisher sending garbage in a loop
    /// must not flood the log (the counter has every one).
    undecodable_log: RateLimitedLog,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("broker", &redact_url(&self.url))
            .field("queue", &self.topology.queue)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Opens the store (without waiting for the database) and starts the worker's
    /// pipeline. Nothing is consumed until [`Worker::run`].
    pub async fn start(config: &Config) -> Result<Worker, DistributedError> {
        let d = &config.distributed;
        let url = d.amqp_url.clone().ok_or(DistributedError::NotConfigured)?;
        let database = config.database.resolved_url().map_err(store::StoreError::from)?;
        let store = store::connect(&database, &config.database).await?;
        let batch = usize::from(d.prefetch);
        let pipeline = AsyncConfig {
            // One batch at a time: the worker waits for it before taking the next.
            workers: 1,
            queue_size: batch * 2,
            batch_size: batch,
            batch_interval_ms: PIPELINE_LINGER_MS,
            ..config.pipeline.clone()
        };
        let logger = AuditLogger::builder(store.clone(), &pipeline, &config.limits)
            .waiting_for(Some("the database is not prepared yet"))
            .start();
        Ok(Worker {
            url,
            topology: Topology::from_config(d),
            prefetch: d.prefetch,
            gather: Duration::from_millis(config.pipeline.batch_interval_ms.max(1)),
            shutdown_timeout: config.pipeline.shutdown_timeout,
            migrate: config.database.migrate_on_start,
            store,
            logger,
            stats: Arc::new(WorkerStats::default()),
            not_ready: std::sync::Mutex::new(Some("starting".into())),
            undecodable_log: RateLimitedLog::new(Duration::from_secs(1)),
        })
    }

    /// The worker's pipeline (for its metrics).
    pub fn logger(&self) -> AuditLogger {
        self.logger.clone()
    }

    /// The worker's counters.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// The store records are written to.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// `None` when the worker is ready (database prepared and answering, consuming from
    /// the broker), else why not.
    pub fn not_ready(&self) -> Option<String> {
        if let Some(reason) = self.not_ready.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(reason);
        }
        if let Some(reason) = self.logger.database_down() {
            return Some(format!("database unavailable: {reason}"));
        }
        if !self.stats.consuming.load(Ordering::Relaxed) {
            return Some(format!("not consuming from RabbitMQ {}", redact_url(&self.url)));
        }
        None
    }

    fn set_not_ready(&self, reason: Option<String>) {
        *self.not_ready.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Prepares the database, then consumes until `shutdown`; reconnects to the broker
    /// with backoff whenever the connection breaks. Fails only on what retrying cannot
    /// mend: a queue declared with other arguments, a broker refusing access.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<WorkerReport, DistributedError> {
        let mut left_in_queue = 0;
        let result = async {
            if !self.prepare_database(&shutdown).await {
                return Ok(());
            }
            let mut attempt = 0u32;
            while !shutdown.is_cancelled() {
                match self.session(&shutdown, &mut attempt).await {
                    Ok(SessionEnd::Shutdown { left }) => {
                        left_in_queue = left;
                        break;
                    }
                    Err(e) if e.is_transient() => {
                        self.stats.consuming.store(false, Ordering::Relaxed);
                        self.stats.broker_errors.fetch_add(1, Ordering::Relaxed);
                        let wait = backoff(attempt, RETRY_FIRST, RETRY_MAX);
                        attempt = attempt.saturating_add(1);
                        tracing::warn!(error = %e, retry_in = ?wait, "RabbitMQ connection lost or refused; reconnecting");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
        .await;
        self.stats.consuming.store(false, Ordering::Relaxed);
        // Nothing is in the worker's pipeline now but what shutdown gave up on (those
        // deliveries were not acknowledged: the broker has them again).
        let pipeline = self.logger.shutdown(Duration::from_secs(1)).await;
        self.store.close().await;
        result?;
        let acknowledged = self.stats.acknowledged.load(Ordering::Relaxed);
        tracing::info!(acknowledged, left_in_queue, "worker stopped");
        Ok(WorkerReport { acknowledged, left_in_queue, pipeline })
    }

    /// Migrates (or checks the migrations of) the database, retrying with backoff until
    /// it answers. False when shutdown came first.
    async fn prepare_database(&self, shutdown: &CancellationToken) -> bool {
        let mut attempt = 0u32;
        loop {
            let result = tokio::select! {
                r = store::prepare(self.store.as_ref(), self.migrate) => r,
                _ = shutdown.cancelled() => return false,
            };
            match result {
                Ok(()) => {
                    self.logger.set_store_ready();
                    self.set_not_ready(None);
                    return true;
                }
                Err(reason) => {
                    let wait = backoff(attempt, RETRY_FIRST, RETRY_MAX);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(reason = %reason, retry_in = ?wait, "database not ready; not consuming yet");
                    self.set_not_ready(Some(format!("database not ready: {reason}")));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return false,
                    }
                }
            }
        }
    }

    /// One connection: declare, consume, write and acknowledge batches until shutdown
    /// or until the connection breaks.
    async fn session(&self, shutdown: &CancellationToken, attempt: &mut u32) -> Result<SessionEnd, DistributedError> {
        let connection = topology::connect(&self.url, "opsagent-audit worker").await?;
        let result = self.consume(&connection, shutdown, attempt).await;
        // Closing hands every unacknowledged delivery (prefetched, not in hand) back.
        let _ = connection.close(200, ShortString::from("worker stopping")).await;
        result
    }

    async fn consume(
        &self,
        connection: &Connection,
        shutdown: &CancellationToken,
        attempt: &mut u32,
    ) -> Result<SessionEnd, DistributedError> {
        let lapin_err = |what: &'static str| {
            let url = self.url.clone();
            let queue = self.topology.queue.clone();
            move |e: lapin::Error| DistributedError::from_lapin(&url, what, &queue, &e)
        };
        let channel = connection.create_channel().await.map_err(lapin_err("opening a channel"))?;
        self.topology.declare(&channel, &self.url).await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(lapin_err("setting the prefetch"))?;
        let tag = format!("opsagent-audit-worker-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let mut consumer = channel
            .basic_consume(
                self.topology.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(lapin_err("starting to consume"))?;
        self.stats.consuming.store(true, Ordering::Relaxed);
        *attempt = 0;
        tracing::info!(
            broker = %redact_url(&self.url),
            queue = %self.topology.queue,
            prefetch = self.prefetch,
            "consuming"
        );
        let end = self.consume_batches(&channel, &mut consumer, shutdown).await;
        if end.is_ok() {
            // Stop deliveries first, then close the channel: what was prefetched and not
            // in hand goes back to the queue now, before the connection closes.
            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
            let _ = channel.close(200, ShortString::from("worker stopping")).await;
        }
        end
    }

    /// Gathers, writes and acknowledges batches until shutdown or a broker error.
    async fn consume_batches(
        &self,
        channel: &Channel,
        consumer: &mut lapin::Consumer,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, DistributedError> {
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown { left: 0 }),
                next = consumer.next() => next,
            };
            let mut batch = vec![next_delivery(first, &self.url)?];
            // Gather what else comes, up to the prefetch, for one transaction: until the
            // deliveries pause for GATHER_IDLE (a producer's batch arrives as one burst,
            // so waiting longer would only add latency) or `gather` has passed.
            let until = Instant::now() + self.gather;
            while batch.len() < usize::from(self.prefetch) {
                let wait = until.min(Instant::now() + GATHER_IDLE);
                match tokio::time::timeout_at(wait, consumer.next()).await {
                    Ok(next) => batch.push(next_delivery(next, &self.url)?),
                    Err(_) => break,
                }
            }
            let left = self.handle(channel, batch, shutdown).await?;
            if left > 0 {
                return Ok(SessionEnd::Shutdown { left });
            }
        }
    }

    /// Writes one batch of deliveries and acknowledges it. Returns how many deliveries
    /// were left unacknowledged because shutdown's deadline passed first.
    async fn handle(
        &self,
        channel: &Channel,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<u64, DistributedError> {
        let stats = &self.stats;
        let mut records: Vec<(u64, Interaction)> = Vec::with_capacity(batch.len());
        for delivery in batch {
            stats.deliveries.fetch_add(1, Ordering::Relaxed);
            if delivery.redelivered {
                stats.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            match message::decode(&delivery.properties, &delivery.data) {
                Ok(record) => records.push((delivery.delivery_tag, record)),
                Err(e) => {
                    self.undecodable_log.log(|suppressed| {
                        tracing::error!(
                            delivery_tag = delivery.delivery_tag,
                            message_id = ?delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned()),
                            error = %e,
                            suppressed,
                            "message is not an audit record; rejecting it to the dead-letter exchange"
                        )
                    });
                    channel
                        .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
                        .await
                        .map_err(|e| DistributedError::from_lapin(&self.url, "rejecting a message", "", &e))?;
                    stats.undecodable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if records.is_empty() {
            return Ok(0);
        }
        let in_hand = records.len() as u64;
        let writes = futures::future::join_all(records.into_iter().map(|(tag, record)| {
            let logger = self.logger.clone();
            async move { (tag, logger.log_committed(record).await) }
        }));
        tokio::pin!(writes);
        let outcomes = tokio::select! {
            outcomes = &mut writes => outcomes,
            _ = shutdown.cancelled() => {
                // Finish the batch in hand, within the deadline: written and acked, or
                // left to the broker.
                match tokio::time::timeout(self.shutdown_timeout, &mut writes).await {
                    Ok(outcomes) => outcomes,
                    Err(_) => {
                        tracing::warn!(
                            deliveries = in_hand,
                            deadline = ?self.shutdown_timeout,
                            "shutdown deadline passed before the batch in hand was written; leaving it to the broker"
                        );
                        return Ok(in_hand);
                    }
                }
            }
        };
        self.acknowledge(channel, outcomes).await?;
        Ok(0)
    }

    /// Acknowledges the deliveries whose records are safe: all at once (`multiple`)
    /// when all are, else one by one, handing the others back to the queue.
    async fn acknowledge(&self, channel: &Channel, outcomes: Vec<(u64, Outcome)>) -> Result<(), DistributedError> {
        let stats = &self.stats;
        let failed = |what: &'static str| {
            let url = self.url.clone();
            move |e: lapin::Error| DistributedError::from_lapin(&url, what, "", &e)
        };
        let safe = |o: &Outcome| matches!(o, Outcome::Committed | Outcome::Duplicate | Outcome::DeadLettered(_));
        if outcomes.iter().all(|(_, o)| safe(o)) {
            let Some(last) = outcomes.iter().map(|(tag, _)| *tag).max() else { return Ok(()) };
            channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .map_err(failed("acknowledging a batch"))?;
            stats.acknowledged.fetch_add(outcomes.len() as u64, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        for (tag, outcome) in outcomes {
            if safe(&outcome) {
                channel.basic_ack(tag, BasicAckOptions { multiple: false }).await.map_err(failed("acknowledging"))?;
                stats.acknowledged.fetch_add(1, Ordering::Relaxed);
            } else {
                tracing::warn!(delivery_tag = tag, ?outcome, "record not written; handing it back to the queue");
                channel
                    .basic_nack(tag, BasicNackOptions { multiple: false, requeue: true })
                    .await
                    .map_err(failed("handing a delivery back"))?;
                stats.requeued.fetch_add(1, Ordering::Relaxed);
            }
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The delivery a consumer stream gave, or the error that ends the session (the stream
/// ends when the channel or connection closes, or the broker cancelled the consumer).
fn next_delivery(next: Option<lapin::Result<Delivery>>, url: &str) -> Result<Delivery, DistributedError> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(e)) => Err(DistributedError::from_lapin(url, "consuming", "", &e)),
        None => Err(DistributedError::Unavailable {
            url: redact_url(url),
            message: "the broker ended the consumer (channel closed or consumer cancelled)".into(),
        }),
    }
}
