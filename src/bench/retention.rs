//! `bench retention`: does a large clean-up block ingest? Loads standard-workload
//! interactions into PostgreSQL over `--days` (the loader of `bench query`), then:
//! 1. baseline: a producer writes small batches through the store's `write_batch` for
//!    `--baseline-secs`, each write's latency recorded;
//! 2. clean-up: retention keeps `--keep-days` (by default half of the data goes) while
//!    the same producer keeps writing; its latencies are recorded until the run ends.
//!
//! Prints max and p99 insert latency in both phases, interactions (and child rows)
//! deleted per second, and a machine-readable last line
//! `cleanup_max_insert_ms=… cleanup_p99_insert_ms=… baseline_max_insert_ms=… …`.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DurationRound, Utc};
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;

use super::Workload;
use crate::config::Config;
use crate::retention::{self, RunOptions};
use crate::store::{self, Backend, Store};

/// Options of `bench retention`.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionBenchArgs {
    /// Interactions loaded before the clean-up.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// The interactions are spread evenly over this many days up to now.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// Days kept by the clean-up [default: half of --days].
    #[arg(long)]
    pub keep_days: Option<u32>,
    /// Interactions per delete statement [default: audit.retention.batch_size].
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Interactions per write of the concurrent producer.
    #[arg(long, default_value_t = 10)]
    pub producer_batch: u64,
    /// Pause between two writes of the producer (a steady stream, not a flood).
    #[arg(long, default_value_t = 5)]
    pub producer_pause_ms: u64,
    /// Length of the baseline phase (producer alone).
    #[arg(long, default_value_t = 15)]
    pub baseline_secs: u64,
    /// Also archive the expiring days here (measures the archive's cost too).
    #[arg(long)]
    pub archive_dir: Option<PathBuf>,
    /// Seed of the workload's content.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// What the producer measured.
struct Produced {
    latency: Histogram<u64>,
    records: u64,
}

/// Writes `batch` records at a time until `stop`, recording each write's latency (µs).
async fn produce(
    store: Arc<dyn Store>,
    args: RetentionBenchArgs,
    seed: u64,
    stop: CancellationToken,
) -> anyhow::Result<Produced> {
    let mut workload = Workload::new(seed);
    let mut latency = Histogram::<u64>::new(3)?;
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let batch: Vec<_> = (n..n + args.producer_batch)
            .map(|i| {
                let mut r = workload.record(i);
                r.created_at = Utc::now();
                r
            })
            .collect();
        let started = Instant::now();
        store.write_batch(&batch).await.context("producer write")?;
        latency.record(started.elapsed().as_micros() as u64)?;
        n += args.producer_batch;
        tokio::time::sleep(Duration::from_millis(args.producer_pause_ms)).await;
    }
    Ok(Produced { latency, records: n })
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Runs the benchmark and prints its report to stdout.
pub async fn run_retention(config: &Config, args: RetentionBenchArgs) -> anyhow::Result<()> {
    let url = config.database.resolved_url()?;
    let store = store::open(&config.database).await.context("opening the benchmark database")?;
    if store.backend() != Backend::Postgres {
        bail!("bench retention measures PostgreSQL: pass --database-url postgres://…");
    }
    store.migrate().await.context("migrating the benchmark database")?;
    let existing = store.count_interactions().await?;
    if existing > 0 {
        bail!("the database already holds {existing} interactions: use a fresh database");
    }
    let keep_days = args.keep_days.unwrap_or(args.days / 2).max(1);
    let batch_size = args.batch_size.unwrap_or(config.retention.batch_size);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opsagent-audit bench retention: {} interactions over {} days, keeping {keep_days} days, delete batches of \
         {batch_size}",
        args.records, args.days
    )?;
    out.flush()?;

    let end = Utc::now().duration_trunc(chrono::Duration::seconds(1))?;
    let loaded = super::load::load_indexed_after(&url, store.clone(), args.records, args.days, args.seed, end).await?;
    writeln!(out, "loaded in {:.0} s", loaded.total.as_secs_f64())?;

    // Baseline: the producer alone.
    let stop = CancellationToken::new();
    let producer = tokio::spawn(produce(store.clone(), args.clone(), args.seed + 100, stop.clone()));
    tokio::time::sleep(Duration::from_secs(args.baseline_secs)).await;
    stop.cancel();
    let baseline = producer.await.context("producer panicked")??;

    // Clean-up with the producer running.
    let now = Utc::now();
    let plan = retention::plan(store.as_ref(), keep_days, now).await?;
    let children = expiring_child_rows(&url, plan.cutoff).await?;
    let stop = CancellationToken::new();
    let producer = tokio::spawn(produce(store.clone(), args.clone(), args.seed + 200, stop.clone()));
    let options = RunOptions { archive_dir: args.archive_dir.clone(), dry_run: false, batch_size };
    let started = Instant::now();
    let report = retention::run(store.as_ref(), &plan, &options).await;
    let cleanup = started.elapsed();
    stop.cancel();
    let during = producer.await.context("producer panicked")??;
    let report = report.into_result().context("the clean-up failed")?;
    store.close().await;

    let deleted = report.deleted();
    let per_second = deleted as f64 / cleanup.as_secs_f64().max(1e-9);
    let archived_bytes: u64 = report.days.iter().filter_map(|d| d.archive.as_ref()).map(|a| a.bytes).sum();
    writeln!(
        out,
        "\nclean-up: {} days, {deleted} interactions and {children} child rows deleted in {:.1} s: {per_second:.0} \
         interactions/s{}",
        report.days.len(),
        cleanup.as_secs_f64(),
        if archived_bytes > 0 {
            format!(
                ", archived {:.1} MiB ({:.0} bytes/interaction)",
                archived_bytes as f64 / 1048576.0,
                archived_bytes as f64 / deleted.max(1) as f64
            )
        } else {
            String::new()
        }
    )?;
    let slowest_day = report.days.iter().map(|d| d.duration).max().unwrap_or_default();
    writeln!(out, "slowest day: {:.1} s", slowest_day.as_secs_f64())?;
    writeln!(
        out,
        "\n{:<24} {:>8} {:>9} {:>9} {:>9}",
        format!("insert of {} records", args.producer_batch),
        "writes",
        "p50 ms",
        "p99 ms",
        "max ms"
    )?;
    for (name, p) in [("baseline (no clean-up)", &baseline), ("during clean-up", &during)] {
        writeln!(
            out,
            "{name:<24} {:>8} {:>9.1} {:>9.1} {:>9.1}",
            p.latency.len(),
            ms(p.latency.value_at_quantile(0.5)),
            ms(p.latency.value_at_quantile(0.99)),
            ms(p.latency.max())
        )?;
    }
    writeln!(
        out,
        "cleanup_max_insert_ms={:.1} cleanup_p99_insert_ms={:.1} baseline_max_insert_ms={:.1} \
         baseline_p99_insert_ms={:.1} deleted={deleted} deleted_per_s={per_second:.0} cleanup_s={:.1} \
         produced={}",
        ms(during.latency.max()),
        ms(during.latency.value_at_quantile(0.99)),
        ms(baseline.latency.max()),
        ms(baseline.latency.value_at_quantile(0.99)),
        cleanup.as_secs_f64(),
        baseline.records + during.records
    )?;
    Ok(())
}

/// Child rows (thoughts, tool calls, metrics) of the interactions before `cutoff`:
/// what the clean-up deletes besides the interactions (the producer's new rows are not
/// among them).
async fn expiring_child_rows(url: &str, cutoff: chrono::NaiveDate) -> anyhow::Result<u64> {
    use sqlx::Connection;
    let mut conn = sqlx::postgres::PgConnection::connect(url).await?;
    let before = cutoff.and_time(chrono::NaiveTime::MIN).and_utc();
    let sum = ["thoughts", "tool_calls", "performance_metrics"]
        .map(|t| {
            format!("(SELECT count(*) FROM {t} c JOIN interactions i USING (interaction_id) WHERE i.created_at < $1)")
        })
        .join(" + ");
    let n: i64 = sqlx::query_scalar(&format!("SELECT {sum}")).bind(before).fetch_one(&mut conn).await?;
    conn.close().await?;
    Ok(n as u64)
}
