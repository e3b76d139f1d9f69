//! `bench outage`: records arriving while the database is down (spooled), then the drain.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{payload_bytes, peak_rss_bytes, tempfile_dir, Workload};
use crate::config::Config;
use crate::model::Interaction;
use crate::pipeline::AuditLogger;
use crate::store::{self, BatchSink, DeadLetter, StoreError, WriteSummary};

/// Options of `bench outage`.
#[derive(Debug, Clone, clap::Args)]
pub struct OutageBenchArgs {
    /// Interactions arriving while the database is down.
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Seed of the workload's content.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// A sink that refuses every write as unreachable while `down` is set, then passes
/// through: the outage is simulated at the store boundary so one process can measure
/// both the backlog's memory and the drain. (The fault tests stop a real server.)
struct SwitchableSink {
    inner: Arc<dyn BatchSink>,
    down: AtomicBool,
}

#[async_trait::async_trait]
impl BatchSink for SwitchableSink {
    async fn write_batch(&self, batch: &[Interaction]) -> Result<WriteSummary, StoreError> {
        if self.down.load(Ordering::Acquire) {
            return Err(StoreError::unavailable("simulated outage (bench outage)"));
        }
        self.inner.write_batch(batch).await
    }
    async fn write_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        self.inner.write_dead_letters(letters).await
    }
}

/// `bench outage`: `records` arrive (fire-and-forget, as fast as they come) while the
/// database is down; prints the peak RSS then (bounded by the queue and spool settings,
/// not by the backlog) and the time to drain the backlog once it is back.
pub async fn run_outage(config: &Config, args: OutageBenchArgs) -> anyhow::Result<()> {
    let store = store::open(&config.database).await.context("opening the benchmark database")?;
    store.migrate().await.context("migrating the benchmark database")?;
    let sink = Arc::new(SwitchableSink { inner: store.clone(), down: AtomicBool::new(true) });
    let before = store.count_interactions().await?;
    let dir = tempfile_dir()?;
    let spool_config = crate::config::SpoolConfig { dir: dir.clone(), ..config.spool.clone() };
    let spool = crate::pipeline::Spool::open(&spool_config, config.pipeline.queue_size)?;
    let logger = AuditLogger::start_with_spool(sink.clone(), &config.pipeline, &config.limits, Some(spool));
    let rss_start = peak_rss_bytes();
    let mut workload = Workload::new(args.seed);
    let started = Instant::now();
    let mut bytes = 0u64;
    for i in 0..args.records {
        let record = workload.record(i);
        bytes += payload_bytes(&record) as u64;
        logger.log(record);
        // Let the spool's writer keep up instead of measuring the appender's bounded
        // backlog policy.
        if i % 1000 == 999 {
            while logger.snapshot().spooled + 5_000 < i {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let snapshot = loop {
        let snapshot = logger.snapshot();
        if snapshot.spool_records + snapshot.dropped_total() >= args.records {
            break snapshot;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let arrived = started.elapsed();
    let rss_outage = peak_rss_bytes();
    sink.down.store(false, Ordering::Release);
    let recovered = Instant::now();
    while store.count_interactions().await? < before + args.records - snapshot.dropped_total() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = recovered.elapsed();
    let report = logger.shutdown(Duration::from_secs(3600)).await;
    let _ = std::fs::remove_dir_all(&dir);
    let mb = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1048576.0));
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opsagent-audit bench outage: {} interactions ({:.0} MB) while the database is down, {:?}",
        args.records,
        bytes as f64 / 1e6,
        store.backend()
    )?;
    writeln!(
        out,
        "arrival: {:.2} s; spooled {} ({} MB on disk at peak), dropped {}",
        arrived.as_secs_f64(),
        snapshot.spool_records,
        snapshot.spool_bytes / 1048576,
        snapshot.dropped_total()
    )?;
    writeln!(
        out,
        "peak RSS: {} MB before, {} MB after the backlog arrived (queue_size {})",
        mb(rss_start),
        mb(rss_outage),
        config.pipeline.queue_size
    )?;
    writeln!(
        out,
        "drain after recovery: {:.2} s ({:.0} records/s), committed {}",
        drain.as_secs_f64(),
        (args.records - snapshot.dropped_total()) as f64 / drain.as_secs_f64().max(1e-9),
        report.stats.committed
    )?;
    writeln!(
        out,
        "outage_records={} peak_rss_mb={} drain_s={:.2} dropped={}",
        args.records,
        mb(rss_outage),
        drain.as_secs_f64(),
        report.stats.dropped_total()
    )?;
    Ok(())
}
