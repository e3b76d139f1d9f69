//! `bench ingest`: the standard workload through the real pipeline, queued and with
//! durable acknowledgements, and the same rows loaded with plain PostgreSQL `COPY` into a
//! fresh schema in the same run, as the baseline. First, the same workload queued with
//! masking and the hash chain both off (`plain`), so what security costs is measured in
//! the same run: it goes first, so the secured phases write into the larger table (the
//! ratio errs against security, not for it). Then the same with only risk
//! classification off (`no-risk`), right before the secured phase, for the cost of
//! classification alone. The last lines printed are machine-readable:
//! `risk_on_per_s=… risk_off_per_s=… risk_ratio=…`, `secured_per_s=… plain_per_s=…
//! security_ratio=…`, then `ingest_per_s=… copy_per_s=… ratio=…` (SQLite:
//! `ingest_per_s=…`).

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use super::copy::run_copy_baseline;
use super::{payload_bytes, peak_rss_bytes, phase_table, tempfile_dir, PhaseResult, Workload};
use crate::config::{Config, LimitsConfig};
use crate::mask::Masker;
use crate::model::Interaction;
use crate::pipeline::{AuditLogger, Stage};
use crate::risk::RiskClassifier;
use crate::store::{self, Backend, Store};

/// Options of `bench ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestBenchArgs {
    /// Interactions to send.
    #[arg(long, default_value_t = 20_000)]
    pub records: u64,
    /// Seed of the workload's content.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Writers (default: audit.async.workers).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Records per transaction (default: audit.async.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Skip the COPY baseline.
    #[arg(long)]
    pub no_baseline: bool,
}

/// Runs the benchmark and prints its table to stdout.
pub async fn run_ingest(config: &Config, args: IngestBenchArgs) -> anyhow::Result<()> {
    let url = config.database.resolved_url()?;
    let store = store::open(&config.database).await.context("opening the benchmark database")?;
    store.migrate().await.context("migrating the benchmark database")?;
    let mut pipeline_config = config.pipeline.clone();
    if let Some(w) = args.workers {
        pipeline_config.workers = w;
    }
    if let Some(b) = args.batch_size {
        pipeline_config.batch_size = b;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opsagent-audit bench ingest: {} interactions, seed {}, {:?} (workers {}, batch {}, queue {})",
        args.records,
        args.seed,
        store.backend(),
        pipeline_config.workers,
        pipeline_config.batch_size,
        pipeline_config.queue_size
    )?;
    out.flush()?;

    // Masking, risk classification and the chain as configured (all on by default) for
    // the secured phases, as `serve` runs them; `no-risk` leaves classification out.
    let masker: Option<Arc<dyn Stage>> = Masker::from_config(&config.masking)?.map(|m| Arc::new(m) as Arc<dyn Stage>);
    let risk: Option<Arc<dyn Stage>> =
        RiskClassifier::from_config(&config.risk)?.map(|r| Arc::new(r) as Arc<dyn Stage>);
    let stages: Vec<Arc<dyn Stage>> = masker.iter().chain(risk.iter()).cloned().collect();
    let plain_store = {
        let mut options = config.database.clone();
        options.hash_chain = false;
        store::open(&options).await.context("opening the benchmark database")?
    };
    let plain_seed = args.seed ^ 0x91a1_0000;
    let plain = run_pipeline(plain_store.clone(), &pipeline_config, &config.limits, &args, &[], plain_seed).await?;
    plain_store.close().await;
    // Risk off and on back to back, in the same run, so the ratio compares like with like.
    let no_risk_stages: Vec<Arc<dyn Stage>> = masker.iter().cloned().collect();
    let no_risk =
        run_pipeline(store.clone(), &pipeline_config, &config.limits, &args, &no_risk_stages, args.seed ^ 0x0715_c000)
            .await?;
    let pipeline = run_pipeline(store.clone(), &pipeline_config, &config.limits, &args, &stages, args.seed).await?;
    let durable = run_durable(store.clone(), config, &pipeline_config, &args, &stages).await?;
    let baseline = if store.backend() == Backend::Postgres && !args.no_baseline {
        Some(run_copy_baseline(&url, &args).await?)
    } else {
        None
    };
    store.close().await;

    let table = phase_table(
        &[
            ("plain", Some(&plain)),
            ("no-risk", Some(&no_risk)),
            ("pipeline", Some(&pipeline)),
            ("durable", Some(&durable)),
            ("copy", baseline.as_ref()),
        ],
        10,
    )?;
    write!(out, "{table}")?;
    writeln!(
        out,
        "plain: masking, risk and hash chain off; no-risk: risk off; pipeline and durable: masking {}, risk {}, \
         hash chain {}",
        if masker.is_some() { "on" } else { "off" },
        if risk.is_some() { "on" } else { "off" },
        if config.database.hash_chain { "on" } else { "off" },
    )?;
    writeln!(
        out,
        "risk_on_per_s={:.0} risk_off_per_s={:.0} risk_ratio={:.2}",
        pipeline.per_second(),
        no_risk.per_second(),
        pipeline.per_second() / no_risk.per_second()
    )?;
    writeln!(
        out,
        "queued_per_s={:.0} durable_per_s={:.0} durable_ratio={:.2}",
        pipeline.per_second(),
        durable.per_second(),
        durable.per_second() / pipeline.per_second()
    )?;
    writeln!(
        out,
        "secured_per_s={:.0} plain_per_s={:.0} security_ratio={:.2}",
        pipeline.per_second(),
        plain.per_second(),
        pipeline.per_second() / plain.per_second()
    )?;
    match baseline {
        Some(b) => writeln!(
            out,
            "ingest_per_s={:.0} copy_per_s={:.0} ratio={:.2}",
            pipeline.per_second(),
            b.per_second(),
            pipeline.per_second() / b.per_second()
        )?,
        None => writeln!(out, "ingest_per_s={:.0}", pipeline.per_second())?,
    }
    Ok(())
}

/// The workload of `seed`, queued (fire and forget), through `stages`.
async fn run_pipeline(
    store: Arc<dyn Store>,
    pipeline_config: &crate::config::AsyncConfig,
    limits: &LimitsConfig,
    args: &IngestBenchArgs,
    stages: &[Arc<dyn Stage>],
    seed: u64,
) -> anyhow::Result<PhaseResult> {
    let before = store.count_interactions().await?;
    let mut workload = Workload::new(seed);
    let logger = stages
        .iter()
        .cloned()
        .fold(AuditLogger::builder(store.clone(), pipeline_config, limits), |b, s| b.stage(s))
        .start();
    // Pace the producer so the benchmark measures the writers, not the drop policy.
    let high_water = (pipeline_config.queue_size / 2).max(pipeline_config.batch_size);
    let mut bytes = 0u64;
    let started = Instant::now();
    for i in 0..args.records {
        let record = workload.record(i);
        bytes += payload_bytes(&record) as u64;
        while logger.queue_len() >= high_water {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        logger.log(record);
    }
    let report = logger.shutdown(Duration::from_secs(3600)).await;
    let elapsed = started.elapsed();
    let stats = logger.stats();
    let after = store.count_interactions().await?;
    ensure!(
        report.stats.dropped_total() == 0 && after - before == args.records,
        "pipeline lost records: {} sent, {} stored, {} dropped",
        args.records,
        after - before,
        report.stats.dropped_total()
    );
    Ok(PhaseResult {
        records: args.records,
        elapsed,
        bytes,
        p50_us: Some(stats.latency_quantile_us(0.5)),
        p99_us: Some(stats.latency_quantile_us(0.99)),
        peak_rss: peak_rss_bytes(),
    })
}

/// The same workload with durable acknowledgements (the HTTP default): each record is
/// fsync'd in a spool (in a temporary directory) before its producer is answered, then
/// written from there. `DURABLE_PRODUCERS` records are in flight at once, as from that
/// many concurrent clients. Timed until every record is committed.
async fn run_durable(
    store: Arc<dyn Store>,
    config: &Config,
    pipeline_config: &crate::config::AsyncConfig,
    args: &IngestBenchArgs,
    stages: &[Arc<dyn Stage>],
) -> anyhow::Result<PhaseResult> {
    use futures::StreamExt;
    const DURABLE_PRODUCERS: usize = 256;
    let before = store.count_interactions().await?;
    let dir = tempfile_dir()?;
    let spool_config = crate::config::SpoolConfig { dir: dir.clone(), ..config.spool.clone() };
    let spool = crate::pipeline::Spool::open(&spool_config, pipeline_config.queue_size)?;
    let builder = AuditLogger::builder(store.clone(), pipeline_config, &config.limits).spool(Some(spool));
    let logger = stages.iter().cloned().fold(builder, |b, s| b.stage(s)).start();
    // Fresh ids: the queued phase already stored this seed's records.
    let mut workload = Workload::new(args.seed ^ 0x5eed_d0d0);
    let records: Vec<Interaction> = (0..args.records).map(|i| workload.record(i)).collect();
    let bytes = records.iter().map(|r| payload_bytes(r) as u64).sum();
    let started = Instant::now();
    let failures = futures::stream::iter(records)
        .map(|r| logger.log_durable(r))
        .buffer_unordered(DURABLE_PRODUCERS)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    let acked_in = started.elapsed();
    while store.count_interactions().await? < before + args.records {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let report = logger.shutdown(Duration::from_secs(3600)).await;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(failures == 0 && report.stats.dropped_total() == 0, "durable phase lost records: {failures} failed");
    tracing::info!(?acked_in, ?elapsed, "durable phase: all acknowledged, then all committed");
    Ok(PhaseResult {
        records: args.records,
        elapsed,
        bytes,
        p50_us: Some(logger.stats().latency_quantile_us(0.5)),
        p99_us: Some(logger.stats().latency_quantile_us(0.99)),
        peak_rss: peak_rss_bytes(),
    })
}
