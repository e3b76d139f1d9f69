//! `bench ingest`: the standard workload through the real pipeline, and the same rows
//! loaded with plain PostgreSQL `COPY` into a fresh schema in the same run, as the
//! baseline. The last line printed is machine-readable:
//! `ingest_per_s=… copy_per_s=… ratio=…` (SQLite: `ingest_per_s=…` only).

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use crate::config::{Config, LimitsConfig};
use crate::model::Interaction;
use crate::pipeline::AuditLogger;
use crate::store::{Backend, Store};

pub mod workload;

pub use workload::{payload_bytes, Workload};

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

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// Interactions written.
    pub records: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Payload bytes written.
    pub bytes: u64,
    /// Enqueue→commit latency percentiles (pipeline only), microseconds.
    pub p50_us: Option<u64>,
    /// See `p50_us`.
    pub p99_us: Option<u64>,
    /// Peak resident memory of the process after the phase, bytes.
    pub peak_rss: Option<u64>,
}

impl PhaseResult {
    /// Interactions per second.
    pub fn per_second(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Peak resident set size of this process. Read from `/proc` (Linux) rather than a
/// crate: one line of one file, and absent elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the benchmark and prints its table to stdout.
pub async fn run_ingest(config: &Config, args: IngestBenchArgs) -> anyhow::Result<()> {
    let url = config.database.resolved_url()?;
    let store = crate::cli::open_store(config).await?;
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

    let pipeline = run_pipeline(store.clone(), &pipeline_config, &config.limits, &args).await?;
    let durable = run_durable(store.clone(), config, &pipeline_config, &args).await?;
    let baseline = if store.backend() == Backend::Postgres && !args.no_baseline {
        Some(run_copy_baseline(&url, &args).await?)
    } else {
        None
    };
    store.close().await;

    let mut table = String::new();
    writeln!(
        table,
        "{:<10} {:>9} {:>9} {:>11} {:>8} {:>9} {:>9} {:>12}",
        "phase", "records", "seconds", "records/s", "MB/s", "p50 ms", "p99 ms", "peak RSS MB"
    )?;
    for (name, r) in [("pipeline", Some(&pipeline)), ("durable", Some(&durable)), ("copy", baseline.as_ref())] {
        let Some(r) = r else { continue };
        let ms = |us: Option<u64>| us.map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1000.0));
        writeln!(
            table,
            "{:<10} {:>9} {:>9.2} {:>11.0} {:>8.1} {:>9} {:>9} {:>12}",
            name,
            r.records,
            r.elapsed.as_secs_f64(),
            r.per_second(),
            r.bytes as f64 / 1e6 / r.elapsed.as_secs_f64().max(1e-9),
            ms(r.p50_us),
            ms(r.p99_us),
            r.peak_rss.map_or("-".to_string(), |b| format!("{:.0}", b as f64 / 1048576.0)),
        )?;
    }
    write!(out, "{table}")?;
    writeln!(
        out,
        "queued_per_s={:.0} durable_per_s={:.0} durable_ratio={:.2}",
        pipeline.per_second(),
        durable.per_second(),
        durable.per_second() / pipeline.per_second()
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

async fn run_pipeline(
    store: Arc<dyn Store>,
    pipeline_config: &crate::config::AsyncConfig,
    limits: &LimitsConfig,
    args: &IngestBenchArgs,
) -> anyhow::Result<PhaseResult> {
    let before = store.count_interactions().await?;
    let mut workload = Workload::new(args.seed);
    let logger = AuditLogger::start(store.clone(), pipeline_config, limits);
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
) -> anyhow::Result<PhaseResult> {
    use futures::StreamExt;
    const DURABLE_PRODUCERS: usize = 256;
    let before = store.count_interactions().await?;
    let dir = tempfile_dir()?;
    let spool_config = crate::config::SpoolConfig { dir: dir.clone(), ..config.spool.clone() };
    let spool = crate::pipeline::Spool::open(&spool_config, pipeline_config.queue_size)?;
    let logger = AuditLogger::start_with_spool(store.clone(), pipeline_config, &config.limits, Some(spool));
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

/// A fresh directory under the system's temporary directory.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("opsagent-audit-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

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

/// A store that refuses every write as unreachable while `down` is set, then passes
/// through: the outage is simulated at the store boundary so one process can measure
/// both the backlog's memory and the drain. (The fault tests stop a real server.)
struct SwitchableStore {
    inner: Arc<dyn Store>,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Store for SwitchableStore {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    async fn migrate(&self) -> Result<(), crate::store::StoreError> {
        self.inner.migrate().await
    }
    async fn readiness(&self) -> Result<crate::store::Readiness, crate::store::StoreError> {
        self.inner.readiness().await
    }
    async fn write_batch(&self, batch: &[Interaction]) -> Result<crate::store::WriteSummary, crate::store::StoreError> {
        if self.down.load(std::sync::atomic::Ordering::Acquire) {
            return Err(crate::store::StoreError::Unavailable(sqlx::Error::PoolTimedOut));
        }
        self.inner.write_batch(batch).await
    }
    async fn get_interaction(&self, id: uuid::Uuid) -> Result<Interaction, crate::store::StoreError> {
        self.inner.get_interaction(id).await
    }
    async fn count_interactions(&self) -> Result<u64, crate::store::StoreError> {
        self.inner.count_interactions().await
    }
    async fn write_dead_letters(&self, l: &[crate::store::DeadLetter]) -> Result<(), crate::store::StoreError> {
        self.inner.write_dead_letters(l).await
    }
    async fn list_dead_letters(&self, limit: u32) -> Result<Vec<crate::store::DeadLetter>, crate::store::StoreError> {
        self.inner.list_dead_letters(limit).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

/// `bench outage`: `records` arrive (fire-and-forget, as fast as they come) while the
/// database is down; prints the peak RSS then (bounded by the queue and spool settings,
/// not by the backlog) and the time to drain the backlog once it is back.
pub async fn run_outage(config: &Config, args: OutageBenchArgs) -> anyhow::Result<()> {
    let inner = crate::cli::open_store(config).await?;
    inner.migrate().await.context("migrating the benchmark database")?;
    let store = Arc::new(SwitchableStore { inner, down: std::sync::atomic::AtomicBool::new(true) });
    let before = store.count_interactions().await?;
    let dir = tempfile_dir()?;
    let spool_config = crate::config::SpoolConfig { dir: dir.clone(), ..config.spool.clone() };
    let spool = crate::pipeline::Spool::open(&spool_config, config.pipeline.queue_size)?;
    let logger = AuditLogger::start_with_spool(store.clone(), &config.pipeline, &config.limits, Some(spool));
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
    store.down.store(false, std::sync::atomic::Ordering::Release);
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

/// Loads the same workload with `COPY` into a fresh schema made by the same migration,
/// in one transaction, then drops the schema.
async fn run_copy_baseline(url: &str, args: &IngestBenchArgs) -> anyhow::Result<PhaseResult> {
    let mut conn = PgConnection::connect(url).await.context("connecting for the COPY baseline")?;
    let schema = format!("bench_copy_{}", uuid::Uuid::new_v4().simple());
    conn.execute(format!("CREATE SCHEMA {schema}").as_str()).await?;
    conn.execute(format!("SET search_path TO {schema}").as_str()).await?;
    let schema_sql = crate::store::postgres::MIGRATOR.iter().map(|m| m.sql.to_string()).collect::<Vec<_>>().join(";\n");
    sqlx::raw_sql(&schema_sql).execute(&mut conn).await.context("creating the baseline schema")?;

    let result = copy_all(&mut conn, args).await;
    conn.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await?;
    conn.close().await?;
    result
}

async fn copy_all(conn: &mut PgConnection, args: &IngestBenchArgs) -> anyhow::Result<PhaseResult> {
    const CHUNK: u64 = 5_000;
    let mut workload = Workload::new(args.seed);
    let mut bytes = 0u64;
    let started = Instant::now();
    let mut tx = conn.begin().await?;
    let mut seen_sessions = std::collections::HashSet::new();
    let mut next = 0u64;
    while next < args.records {
        let end = (next + CHUNK).min(args.records);
        let records: Vec<Interaction> = (next..end).map(|i| workload.record(i)).collect();
        next = end;
        bytes += records.iter().map(|r| payload_bytes(r) as u64).sum::<u64>();
        let mut tables: [String; 5] = Default::default();
        for r in &records {
            if seen_sessions.insert(r.session_id) {
                copy_row(
                    &mut tables[0],
                    &[
                        Some(&r.session_id.to_string()),
                        r.user_id.as_deref(),
                        r.client_ip.as_deref(),
                        r.user_agent.as_deref(),
                        Some(&r.created_at.to_rfc3339()),
                    ],
                );
            }
            let id = r.interaction_id.to_string();
            let at = r.created_at.to_rfc3339();
            let num = |v: Option<i64>| v.map(|v| v.to_string());
            copy_row(
                &mut tables[1],
                &[
                    Some(&id),
                    Some(&r.session_id.to_string()),
                    r.user_id.as_deref(),
                    r.endpoint.as_deref(),
                    Some(&r.question),
                    r.model_name.as_deref(),
                    r.provider.as_deref(),
                    r.base_url.as_deref(),
                    r.cluster.as_deref(),
                    r.final_answer.as_deref(),
                    Some(r.status.as_str()),
                    r.error.as_deref(),
                    num(r.http_status.map(i64::from)).as_deref(),
                    Some(&at),
                    num(r.total_duration_ms).as_deref(),
                    num(r.assistant_duration_ms).as_deref(),
                    num(r.parse_duration_ms).as_deref(),
                    num(r.input_tokens).as_deref(),
                    num(r.output_tokens).as_deref(),
                    Some(&serde_json::Value::Object(r.attributes.clone()).to_string()),
                ],
            );
            for t in &r.thoughts {
                copy_row(
                    &mut tables[2],
                    &[Some(&id), Some(&t.content), Some(&t.sequence_number.to_string()), Some(&at)],
                );
            }
            for c in &r.tool_calls {
                copy_row(
                    &mut tables[3],
                    &[
                        Some(&id),
                        Some(&c.tool_name),
                        Some(&c.tool_input),
                        c.tool_observation.as_deref(),
                        Some(&c.sequence_number.to_string()),
                        num(c.duration_ms).as_deref(),
                        num(c.thought_sequence_number.map(i64::from)).as_deref(),
                        c.error.as_deref(),
                        Some(&at),
                    ],
                );
            }
            for (name, ms) in &r.metrics {
                copy_row(&mut tables[4], &[Some(&id), Some(name), Some(&ms.to_string()), Some(&at)]);
            }
        }
        let statements = [
            "COPY sessions (session_id, user_id, client_ip, user_agent, created_at) FROM STDIN",
            "COPY interactions (interaction_id, session_id, user_id, endpoint, question, model_name, provider, base_url, cluster, final_answer, status, error, http_status, created_at, total_duration_ms, assistant_duration_ms, parse_duration_ms, input_tokens, output_tokens, attributes) FROM STDIN",
            "COPY thoughts (interaction_id, thought, sequence_number, created_at) FROM STDIN",
            "COPY tool_calls (interaction_id, tool_name, tool_input, tool_observation, sequence_number, duration_ms, thought_sequence_number, error, created_at) FROM STDIN",
            "COPY performance_metrics (interaction_id, metric_name, duration_ms, created_at) FROM STDIN",
        ];
        for (statement, data) in statements.iter().zip(tables) {
            if data.is_empty() {
                continue;
            }
            let mut copy = tx.copy_in_raw(statement).await?;
            copy.send(data.into_bytes()).await?;
            copy.finish().await?;
        }
    }
    tx.commit().await?;
    let elapsed = started.elapsed();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM interactions").fetch_one(&mut *conn).await?;
    ensure!(stored as u64 == args.records, "COPY baseline stored {stored} of {} rows", args.records);
    Ok(PhaseResult { records: args.records, elapsed, bytes, p50_us: None, p99_us: None, peak_rss: None })
}

/// Appends one row in COPY's text format (tab-separated, `\N` for NULL).
pub fn copy_row(out: &mut String, fields: &[Option<&str>]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        match field {
            None => out.push_str("\\N"),
            Some(text) => {
                // Copy runs of plain text whole; only the four special bytes are escaped.
                let mut rest = *text;
                while let Some(at) = rest.find(['\\', '\t', '\n', '\r']) {
                    out.push_str(&rest[..at]);
                    out.push_str(match rest.as_bytes()[at] {
                        b'\\' => "\\\\",
                        b'\t' => "\\t",
                        b'\n' => "\\n",
                        _ => "\\r",
                    });
                    rest = &rest[at + 1..];
                }
                out.push_str(rest);
            }
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_the_text_format_specials() {
        let mut out = String::new();
        copy_row(&mut out, &[Some("a\tb\\c\nd\re"), None, Some("plain")]);
        assert_eq!(out, "a\\tb\\\\c\\nd\\re\t\\N\tplain\n");
    }
}
