//! `bench query`: the read side at scale. Loads standard-workload interactions into
//! PostgreSQL (spread over `--days`), then measures list-query latency for the typical
//! filters, 7-day stats, and an export against `COPY (the same SELECT) TO STDOUT` in the
//! same run, sampling resident memory as the export grows. The last line printed is
//! machine-readable: `list_p95_ms=… stats_7d_ms=… export_rows_ratio=… …`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, DurationRound, Utc};
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgConnection;
use sqlx::Connection;

use crate::config::Config;
use crate::export::{self, Format};
use crate::model::Status;
use crate::query::{self, ListRequest};
use crate::store::{self, Backend, Bucket, Filter, GroupBy, StatsRequest, Store};

/// Options of `bench query`.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryBenchArgs {
    /// Interactions in the database.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// The interactions are spread evenly over this many days up to now.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// Runs of each list query.
    #[arg(long, default_value_t = 200)]
    pub repeats: u32,
    /// The export covers the newest this many days.
    #[arg(long, default_value_t = 7)]
    pub export_days: u32,
    /// Export format measured.
    #[arg(long, default_value = "ndjson")]
    pub export_format: String,
    /// Use the interactions already in the database if there are at least --records
    /// (a second run skips the load).
    #[arg(long)]
    pub reuse: bool,
    /// Seed of the workload's content.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Runs the benchmark and prints its report to stdout.
pub async fn run_query(config: &Config, args: QueryBenchArgs) -> anyhow::Result<()> {
    let format: Format = args.export_format.parse().map_err(|e| anyhow::anyhow!("--export-format: {e}"))?;
    let url = config.database.resolved_url()?;
    let store = store::open(&config.database).await.context("opening the benchmark database")?;
    if store.backend() != Backend::Postgres {
        bail!("bench query measures PostgreSQL (its baseline is COPY … TO STDOUT): pass --database-url postgres://…");
    }
    store.migrate().await.context("migrating the benchmark database")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "opsagent-audit bench query: {} interactions over {} days", args.records, args.days)?;
    out.flush()?;

    // Whole seconds, so a reused data set and this run agree on "now".
    let end = Utc::now().duration_trunc(chrono::Duration::seconds(1))?;
    let existing = store.count_interactions().await?;
    let end = if existing >= args.records && args.reuse {
        writeln!(out, "reusing the {existing} interactions already loaded")?;
        newest(&url).await?.unwrap_or(end)
    } else if existing > 0 {
        bail!("the database already holds {existing} interactions: use a fresh database, or --reuse with at least --records");
    } else {
        let loaded =
            super::load::load_indexed_after(&url, store.clone(), args.records, args.days, args.seed, end).await?;
        writeln!(
            out,
            "loaded in {:.0} s ({:.0} s writing, {:.0} s building {} indexes)",
            loaded.total.as_secs_f64(),
            loaded.writing.as_secs_f64(),
            (loaded.total - loaded.writing).as_secs_f64(),
            loaded.indexes
        )?;
        end
    };
    out.flush()?;

    let lists = measure_lists(store.as_ref(), &url, &args, end).await?;
    let mut report = String::new();
    writeln!(
        report,
        "\n{:<28} {:>8} {:>8} {:>8} {:>8}",
        "list query (limit 50)", "p50 ms", "p95 ms", "max ms", "rows"
    )?;
    for l in &lists {
        writeln!(
            report,
            "{:<28} {:>8.2} {:>8.2} {:>8.2} {:>8.1}  {}",
            l.name,
            ms(l.latency.value_at_quantile(0.5)),
            ms(l.latency.value_at_quantile(0.95)),
            ms(l.latency.max()),
            l.mean_rows,
            if l.seq_scans.is_empty() { "index".to_owned() } else { format!("SEQ SCAN of {}", l.seq_scans.join(", ")) }
        )?;
    }
    let worst_p95 = lists.iter().map(|l| l.latency.value_at_quantile(0.95)).max().unwrap_or(0);
    let seq_scanned = lists.iter().filter(|l| !l.seq_scans.is_empty()).count();

    let week = Filter { from: Some(end - chrono::Duration::days(7)), ..Filter::default() };
    writeln!(report, "\n{:<40} {:>9} {:>9} {:>6}", "stats over the last 7 days", "median ms", "max ms", "rows")?;
    let mut stats_7d = Duration::ZERO;
    for (name, group_by, bucket) in [
        ("group_by=model_name", GroupBy::ModelName, None),
        ("group_by=model_name bucket=day", GroupBy::ModelName, Some(Bucket::Day)),
        ("group_by=user_id", GroupBy::UserId, None),
        ("group_by=tool_name", GroupBy::ToolName, None),
    ] {
        let request = StatsRequest { filter: week.clone(), group_by, bucket, top: None };
        let (median, max, rows) = time_stats(store.as_ref(), &request).await?;
        if group_by == GroupBy::ModelName && bucket.is_none() {
            stats_7d = median;
        }
        writeln!(report, "{name:<40} {:>9.1} {:>9.1} {rows:>6}", secs_ms(median), secs_ms(max))?;
    }
    write!(out, "{report}")?;
    out.flush()?;

    let export_filter =
        Filter { from: Some(end - chrono::Duration::days(args.export_days.into())), ..Filter::default() };
    let rows = store.count_matching(&export_filter).await?;
    let copy = copy_baseline(&url, &export_filter).await?;
    let ours = measure_export(store.clone(), &export_filter, format, rows).await?;
    store.close().await;

    let mut report = String::new();
    writeln!(report, "\nexport of the last {} days ({rows} interactions)", args.export_days)?;
    writeln!(report, "{:<24} {:>9} {:>10} {:>9} {:>11}", "", "seconds", "rows/s", "MB/s", "MB written")?;
    for (name, e) in [("COPY … TO STDOUT", &copy), (format.as_str(), &ours)] {
        writeln!(
            report,
            "{name:<24} {:>9.2} {:>10.0} {:>9.1} {:>11.0}",
            e.elapsed.as_secs_f64(),
            e.rows as f64 / e.elapsed.as_secs_f64(),
            e.bytes as f64 / 1e6 / e.elapsed.as_secs_f64(),
            e.bytes as f64 / 1e6
        )?;
    }
    let rss: Vec<String> = ours.rss_samples.iter().map(|(pct, mb)| format!("{pct}%:{mb:.0}")).collect();
    writeln!(report, "resident memory (MB) as the export grows: {}", rss.join(" "))?;
    let rows_ratio = (ours.rows as f64 / ours.elapsed.as_secs_f64()) / (copy.rows as f64 / copy.elapsed.as_secs_f64());
    let bytes_ratio =
        (ours.bytes as f64 / ours.elapsed.as_secs_f64()) / (copy.bytes as f64 / copy.elapsed.as_secs_f64());
    let growth = ours.rss_growth_mb();
    writeln!(
        report,
        "list_p95_ms={:.2} list_seq_scans={seq_scanned} stats_7d_ms={:.0} export_rows_ratio={rows_ratio:.2} export_mb_ratio={bytes_ratio:.2} \
         export_mb_s={:.0} copy_mb_s={:.0} export_rss_growth_mb={growth:.0}",
        ms(worst_p95),
        secs_ms(stats_7d),
        ours.bytes as f64 / 1e6 / ours.elapsed.as_secs_f64(),
        copy.bytes as f64 / 1e6 / copy.elapsed.as_secs_f64(),
    )?;
    write!(out, "{report}")?;
    Ok(())
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn secs_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The newest stored `created_at` (the end of a reused data set).
async fn newest(url: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    let mut conn = PgConnection::connect(url).await?;
    let newest: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(created_at) FROM interactions").fetch_one(&mut conn).await?;
    conn.close().await?;
    Ok(newest)
}

/// One list query's measurements.
struct ListResult {
    name: &'static str,
    latency: Histogram<u64>,
    mean_rows: f64,
    /// Tables the plan reads with a sequential scan (should be none).
    seq_scans: Vec<String>,
}

/// Runs each typical list query `repeats` times with varying values.
async fn measure_lists(
    store: &dyn Store,
    url: &str,
    args: &QueryBenchArgs,
    end: DateTime<Utc>,
) -> anyhow::Result<Vec<ListResult>> {
    let mut conn = PgConnection::connect(url).await?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    type Make = fn(&mut StdRng, DateTime<Utc>) -> Filter;
    let cases: [(&'static str, Make); 10] = [
        ("newest (no filter)", |_, _| Filter::default()),
        ("user_id", |r, _| Filter { user_id: Some(format!("user-{:02}", r.random_range(0..50))), ..Filter::default() }),
        ("model_name", |r, _| {
            let models = ["gpt-4o", "claude-sonnet-4", "qwen-max"];
            Filter { model_name: Some(models[r.random_range(0..3)].into()), ..Filter::default() }
        }),
        ("cluster", |r, _| Filter { cluster: Some(format!("prod-{}", r.random_range(0..4))), ..Filter::default() }),
        ("status=error", |_, _| Filter { status: vec![Status::Error], ..Filter::default() }),
        ("tool_name=shell", |_, _| Filter { tool_name: Some("shell".into()), ..Filter::default() }),
        ("last 24h, one user", |r, end| Filter {
            from: Some(end - chrono::Duration::hours(24)),
            user_id: Some(format!("user-{:02}", r.random_range(0..50))),
            ..Filter::default()
        }),
        ("a day 2 weeks ago", |r, end| {
            let day = end - chrono::Duration::days(r.random_range(10..20));
            Filter { from: Some(day), to: Some(day + chrono::Duration::days(1)), ..Filter::default() }
        }),
        ("min_duration_ms (top 2%)", |_, _| Filter { min_duration_ms: Some(6_900), ..Filter::default() }),
        ("q= (full text)", |r, _| {
            let words = ["crashloop", "throttling", "toleration", "readiness", "kubelet"];
            Filter { text: Some(words[r.random_range(0..words.len())].into()), ..Filter::default() }
        }),
    ];
    let mut results = Vec::new();
    for (name, make) in cases {
        let mut latency = Histogram::<u64>::new(3)?;
        let mut rows = 0usize;
        let seq_scans = seq_scans(&mut conn, &make(&mut rng, end)).await?;
        for _ in 0..args.repeats {
            let request =
                ListRequest { filter: make(&mut rng, end), after: None, limit: query::DEFAULT_LIMIT, now: end };
            let started = Instant::now();
            let page = query::list(store, &request).await?;
            latency.record(started.elapsed().as_micros() as u64)?;
            rows += page.items.len();
        }
        results.push(ListResult { name, latency, mean_rows: rows as f64 / f64::from(args.repeats.max(1)), seq_scans });
    }
    // Deep pages: the fifth page after following cursors, timed on its own.
    let mut latency = Histogram::<u64>::new(3)?;
    let mut rows = 0usize;
    for _ in 0..args.repeats.div_ceil(5).max(1) {
        let filter = Filter { user_id: Some(format!("user-{:02}", rng.random_range(0..50))), ..Filter::default() };
        let mut request = ListRequest { filter, after: None, limit: query::DEFAULT_LIMIT, now: end };
        for page_no in 0..5 {
            let started = Instant::now();
            let page = store.list_interactions(&request.filter, request.after, request.limit).await?;
            if page_no == 4 {
                latency.record(started.elapsed().as_micros() as u64)?;
                rows += page.items.len();
            }
            request.after = page.next;
        }
    }
    conn.close().await?;
    results.push(ListResult {
        seq_scans: Vec::new(),
        name: "user_id, 5th page (cursor)",
        latency,
        mean_rows: rows as f64 / args.repeats.div_ceil(5).max(1) as f64,
    });
    Ok(results)
}

/// The tables a list query's plan scans sequentially.
async fn seq_scans(conn: &mut PgConnection, filter: &Filter) -> anyhow::Result<Vec<String>> {
    let statement =
        format!("EXPLAIN (FORMAT JSON) {}", store::list_statement_for_explain(filter, query::DEFAULT_LIMIT));
    let plan: serde_json::Value = sqlx::query_scalar(&statement).fetch_one(&mut *conn).await?;
    let mut found = Vec::new();
    fn walk(node: &serde_json::Value, found: &mut Vec<String>) {
        if node.get("Node Type").and_then(|t| t.as_str()) == Some("Seq Scan") {
            found.push(node.get("Relation Name").and_then(|r| r.as_str()).unwrap_or("?").to_owned());
        }
        for child in node.get("Plans").and_then(|p| p.as_array()).into_iter().flatten() {
            walk(child, found);
        }
    }
    for root in plan.as_array().into_iter().flatten() {
        if let Some(plan) = root.get("Plan") {
            walk(plan, &mut found);
        }
    }
    Ok(found)
}

/// Median and maximum of five runs, and the rows returned.
async fn time_stats(store: &dyn Store, request: &StatsRequest) -> anyhow::Result<(Duration, Duration, usize)> {
    let mut times = Vec::new();
    let mut rows = 0;
    for _ in 0..5 {
        let started = Instant::now();
        rows = store.stats(request).await?.len();
        times.push(started.elapsed());
    }
    times.sort();
    Ok((times[times.len() / 2], times[times.len() - 1], rows))
}

/// What one export measured.
struct ExportResult {
    rows: u64,
    bytes: u64,
    elapsed: Duration,
    /// (percent of rows done, resident MB) samples.
    rss_samples: Vec<(u64, f64)>,
}

impl ExportResult {
    /// Resident memory growth from the first sample to the largest.
    fn rss_growth_mb(&self) -> f64 {
        let first = self.rss_samples.first().map_or(0.0, |s| s.1);
        let max = self.rss_samples.iter().map(|s| s.1).fold(first, f64::max);
        max - first
    }
}

/// `COPY (the export's SELECT) TO STDOUT`, bytes counted and dropped.
async fn copy_baseline(url: &str, filter: &Filter) -> anyhow::Result<ExportResult> {
    let statement = format!("COPY ({}) TO STDOUT", store::export_statement_for_copy(filter));
    let mut conn = PgConnection::connect(url).await?;
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut rows = 0u64;
    {
        let mut copy = conn.copy_out_raw(&statement).await.context("COPY … TO STDOUT")?;
        while let Some(chunk) = copy.try_next().await? {
            bytes += chunk.len() as u64;
            rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    let elapsed = started.elapsed();
    conn.close().await?;
    Ok(ExportResult { rows, bytes, elapsed, rss_samples: Vec::new() })
}

/// The real export path (store stream → encoder), bytes counted and dropped, resident
/// memory sampled every tenth of the rows.
async fn measure_export(
    store: Arc<dyn Store>,
    filter: &Filter,
    format: Format,
    total: u64,
) -> anyhow::Result<ExportResult> {
    let rss = Arc::new(std::sync::Mutex::new(vec![(0, resident_mb())]));
    let counted = {
        let rss = rss.clone();
        let step = (total / 10).max(1);
        let mut n = 0u64;
        store.export(filter).inspect(move |_| {
            n += 1;
            if n.is_multiple_of(step) {
                if let Ok(mut samples) = rss.lock() {
                    samples.push((n * 100 / total.max(1), resident_mb()));
                }
            }
        })
    };
    let started = Instant::now();
    let mut chunks = std::pin::pin!(export::encode_stream(counted, format));
    let mut bytes = 0u64;
    while let Some(chunk) = chunks.next().await {
        bytes += chunk?.len() as u64;
    }
    let elapsed = started.elapsed();
    let rss_samples = rss.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(ExportResult { rows: total, bytes, elapsed, rss_samples })
}

/// Resident memory now, in MB (`VmRSS`; the peak is not what grows with an export).
fn resident_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
