//! `bench distributed`: the standard workload through the producer's pipeline (masking
//! and risk classification, as `serve` runs it) → RabbitMQ (publisher confirms, a
//! quorum queue of its own) → 1, then 2 workers → PostgreSQL; against direct mode (the
//! same pipeline writing the database itself) and `COPY`, in the same run. Producer and
//! workers run in this process, on the same cores a deployment on one machine would
//! share; on two cores the figure that matters is the overhead, not the scaling.
//!
//! Records/s is timed from the first record logged to the last one stored; with
//! `--rate` the producer offers records at that pace (below capacity the latency is the
//! path's own, flooded it is mostly waiting in queues). The
//! latency is enqueue → commit as the database saw it: each record's `created_at` is
//! set when it is logged, and `ingested_at` is the start of the transaction that
//! stored it (so the commit itself, a few milliseconds, is not counted, alike in every
//! phase). The last line is machine-readable:
//! `direct_per_s=… distributed_1w_per_s=… distributed_2w_per_s=… copy_per_s=…
//! direct_p99_ms=… distributed_1w_p50_ms=… distributed_1w_p99_ms=… distributed_2w_p99_ms=…`.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::copy::run_copy_baseline;
use super::ingest::IngestBenchArgs;
use super::{payload_bytes, peak_rss_bytes, phase_table, PhaseResult, Workload};
use crate::config::{Config, DistributedConfig};
use crate::distributed::{BrokerSink, Worker};
use crate::mask::Masker;
use crate::pipeline::{AuditLogger, Stage};
use crate::risk::RiskClassifier;
use crate::store::{self, Backend, BatchSink, Store};

/// The broker used when neither `--amqp-url` nor `audit.distributed.amqp_url` says.
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Longest a phase may take to store everything after the last record was logged.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// Options of `bench distributed`.
#[derive(Debug, Clone, clap::Args)]
pub struct DistributedBenchArgs {
    /// Interactions per phase.
    #[arg(long, default_value_t = 10_000)]
    pub records: u64,
    /// Seed of the workload's content.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The broker [default: audit.distributed.amqp_url, else the local broker as guest].
    #[arg(long, value_name = "URL", env = "AUDIT_BENCH_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// Records per second the producer offers (0: as fast as the pipeline takes them).
    /// Below capacity, the latency is the path's own; flooded, it is mostly queueing.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Skip the COPY baseline.
    #[arg(long)]
    pub no_baseline: bool,
}

/// Runs the benchmark and prints its table to stdout.
pub async fn run_distributed(config: &Config, args: DistributedBenchArgs) -> anyhow::Result<()> {
    let url = config.database.resolved_url()?;
    let store = store::open(&config.database).await.context("opening the benchmark database")?;
    if store.backend() != Backend::Postgres {
        bail!("bench distributed needs PostgreSQL (--database-url postgres://…)");
    }
    store.migrate().await.context("migrating the benchmark database")?;
    let amqp_url = args
        .amqp_url
        .clone()
        .or_else(|| config.distributed.amqp_url.clone())
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
    // A queue of its own, deleted at the end, so a run never meets another's messages.
    let queue = format!("opsagent-audit-bench-{}", uuid::Uuid::new_v4().simple());
    let distributed = DistributedConfig { amqp_url: Some(amqp_url.clone()), queue, ..config.distributed.clone() };
    let mut worker_config = config.clone();
    worker_config.distributed = distributed.clone();
    worker_config.database.url = Some(url.clone());

    let masker: Option<Arc<dyn Stage>> = Masker::from_config(&config.masking)?.map(|m| Arc::new(m) as Arc<dyn Stage>);
    let risk: Option<Arc<dyn Stage>> =
        RiskClassifier::from_config(&config.risk)?.map(|r| Arc::new(r) as Arc<dyn Stage>);
    let stages: Vec<Arc<dyn Stage>> = masker.iter().chain(risk.iter()).cloned().collect();

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opsagent-audit bench distributed: {} interactions per phase ({}), seed {}, broker {}, queue {}, \
         prefetch {}, batch {}",
        args.records,
        if args.rate > 0 { format!("offered at {}/s", args.rate) } else { "flood".to_owned() },
        args.seed,
        crate::config::redact_url(&amqp_url),
        distributed.queue,
        distributed.prefetch,
        config.pipeline.batch_size
    )?;
    out.flush()?;

    let broker = Arc::new(BrokerSink::new(&distributed)?);
    broker.check().await.context("connecting to RabbitMQ")?;
    let direct_sink: Arc<dyn BatchSink> = store.clone();
    let direct = run_phase(&store, direct_sink, config, &stages, &args, args.seed ^ 0xd1, 0, &worker_config).await?;
    let broker_sink: Arc<dyn BatchSink> = broker.clone();
    let one =
        run_phase(&store, broker_sink.clone(), config, &stages, &args, args.seed ^ 0xd2, 1, &worker_config).await?;
    let two = run_phase(&store, broker_sink, config, &stages, &args, args.seed ^ 0xd3, 2, &worker_config).await?;
    broker.close().await;
    delete_queues(&distributed).await;
    let baseline = if args.no_baseline {
        None
    } else {
        let copy_args = IngestBenchArgs {
            records: args.records,
            seed: args.seed,
            workers: None,
            batch_size: None,
            no_baseline: false,
        };
        Some(run_copy_baseline(&url, &copy_args).await?)
    };
    store.close().await;

    let table = phase_table(
        &[
            ("direct", Some(&direct)),
            ("rabbitmq-1worker", Some(&one)),
            ("rabbitmq-2worker", Some(&two)),
            ("copy", baseline.as_ref()),
        ],
        16,
    )?;
    write!(out, "{table}")?;
    let ms_of = |us: Option<u64>| us.map_or(0.0, |v| v as f64 / 1000.0);
    writeln!(
        out,
        "direct_per_s={:.0} distributed_1w_per_s={:.0} distributed_2w_per_s={:.0} copy_per_s={:.0} \
         direct_p99_ms={:.1} distributed_1w_p50_ms={:.1} distributed_1w_p99_ms={:.1} distributed_2w_p99_ms={:.1}",
        direct.per_second(),
        one.per_second(),
        two.per_second(),
        baseline.as_ref().map_or(0.0, PhaseResult::per_second),
        ms_of(direct.p99_us),
        ms_of(one.p50_us),
        ms_of(one.p99_us),
        ms_of(two.p99_us),
    )?;
    Ok(())
}

/// One phase: the workload of `seed` logged through `stages` into a pipeline writing to
/// `sink`; with `workers` > 0, that many workers consume the queue into `store`. Timed
/// until every record is stored.
#[allow(clippy::too_many_arguments)]
async fn run_phase(
    store: &Arc<dyn Store>,
    sink: Arc<dyn BatchSink>,
    config: &Config,
    stages: &[Arc<dyn Stage>],
    args: &DistributedBenchArgs,
    seed: u64,
    workers: usize,
    worker_config: &Config,
) -> anyhow::Result<PhaseResult> {
    let before = store.count_interactions().await?;
    let stop = CancellationToken::new();
    let mut running = Vec::new();
    for _ in 0..workers {
        let worker = Worker::start(worker_config).await?;
        let stop = stop.clone();
        running.push(tokio::spawn(async move { worker.run(stop).await }));
    }
    let pipeline = &config.pipeline;
    let logger =
        stages.iter().cloned().fold(AuditLogger::builder(sink, pipeline, &config.limits), |b, s| b.stage(s)).start();
    let mut workload = Workload::new(seed);
    // Pace the producer so the benchmark measures the writers, not the drop policy.
    let high_water = (pipeline.queue_size / 2).max(pipeline.batch_size);
    let mut bytes = 0u64;
    let started_at = Utc::now();
    let started = Instant::now();
    for i in 0..args.records {
        if args.rate > 0 {
            // Paced: record i is due i/rate seconds after the start.
            let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut record = workload.record(i);
        record.created_at = Utc::now();
        bytes += payload_bytes(&record) as u64;
        while logger.queue_len() >= high_water {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        logger.log(record);
    }
    let report = logger.shutdown(Duration::from_secs(3600)).await;
    ensure!(report.stats.dropped_total() == 0, "the producer dropped {} records", report.stats.dropped_total());
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let stored = store.count_interactions().await? - before;
        if stored >= args.records {
            ensure!(stored == args.records, "{stored} stored of {} sent", args.records);
            break;
        }
        ensure!(Instant::now() < deadline, "only {stored} of {} stored after {DRAIN_TIMEOUT:?}", args.records);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    for worker in running {
        worker.await.context("worker task")??;
    }
    let url = config.database.resolved_url()?;
    let (p50_us, p99_us) = commit_latency(&url, started_at).await?;
    Ok(PhaseResult { records: args.records, elapsed, bytes, p50_us, p99_us, peak_rss: peak_rss_bytes() })
}

/// Percentiles of `ingested_at - created_at` of the records created since `since`,
/// microseconds.
async fn commit_latency(url: &str, since: DateTime<Utc>) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    use sqlx::Connection as _;
    let mut conn = sqlx::postgres::PgConnection::connect(url).await.context("connecting for the latencies")?;
    let row: (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ingested_at - created_at)), \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM ingested_at - created_at)) \
         FROM interactions WHERE created_at >= $1",
    )
    .bind(since)
    .fetch_one(&mut conn)
    .await
    .context("reading commit latencies")?;
    conn.close().await.ok();
    let us = |s: Option<f64>| s.map(|s| (s.max(0.0) * 1e6) as u64);
    Ok((us(row.0), us(row.1)))
}

/// Deletes the benchmark's queues (best effort: a failure leaves an empty queue).
async fn delete_queues(config: &DistributedConfig) {
    let Some(url) = &config.amqp_url else { return };
    let topology = crate::distributed::Topology::from_config(config);
    let Ok(connection) = crate::distributed::topology::connect(url, "opsagent-audit bench").await else { return };
    if let Ok(channel) = connection.create_channel().await {
        for queue in [&topology.queue, &topology.dead_letter_queue] {
            let _ = channel.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
        }
        let _ = channel
            .exchange_delete(
                topology.dead_letter_exchange.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = channel.close(200, "bench done".into()).await;
    }
    let _ = connection.close(200, "bench done".into()).await;
}
