//! Benchmarks that print numbers: `bench ingest` (the pipeline against a PostgreSQL
//! `COPY` baseline measured in the same run, queued and durable acknowledgements) and
//! `bench outage` (a backlog arriving while the database is down, then its drain) and
//! `bench query` (list latency, stats and export against `COPY … TO STDOUT` at scale),
//! `bench mask` (masking throughput), `bench storage` (bytes per interaction at rest and
//! in the Parquet archive), `bench retention` (insert latency while a large clean-up
//! deletes in batches), `bench proxy` (the auditing proxy's latency against calling
//! a stub agent directly), `bench otlp` (the workload as OpenTelemetry traces to
//! `/v1/traces` against the same records to `/api/v1/interactions`), `bench distributed`
//! (serve's pipeline → RabbitMQ → 1 and 2 workers, against direct mode and `COPY`). Each prints a
//! table, then one machine-readable last line.
//!
//! Files: [`ingest`], [`copy`] (the baseline), [`outage`], [`query`], [`storage`],
//! [`mask`](mod@mask), [`retention`](mod@retention), [`load`] (loading at scale, for
//! `query`, `storage` and `retention`), [`proxy`](mod@proxy), [`otlp`](mod@otlp),
//! [`distributed`](mod@distributed),
//! [`workload`] (the standard workload of SPEC.md).

use std::time::Duration;

use anyhow::Context;

pub mod copy;
pub mod distributed;
pub mod ingest;
pub mod load;
pub mod mask;
pub mod otlp;
pub mod outage;
pub mod proxy;
pub mod query;
pub mod retention;
pub mod storage;
pub mod workload;

pub use distributed::{run_distributed, DistributedBenchArgs};
pub use ingest::{run_ingest, IngestBenchArgs};
pub use mask::{run_mask, MaskBenchArgs};
pub use otlp::{run_otlp, OtlpBenchArgs};
pub use outage::{run_outage, OutageBenchArgs};
pub use proxy::{run_proxy, ProxyBenchArgs};
pub use query::{run_query, QueryBenchArgs};
pub use retention::{run_retention, RetentionBenchArgs};
pub use storage::{run_storage, StorageBenchArgs};
pub use workload::{payload_bytes, Workload};

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

/// The table of phases `bench ingest` and `bench distributed` print: one row per phase
/// that ran (`None`: skipped), names left-aligned in `name_width` columns.
pub fn phase_table(phases: &[(&str, Option<&PhaseResult>)], name_width: usize) -> Result<String, std::fmt::Error> {
    use std::fmt::Write as _;
    let mut table = String::new();
    writeln!(
        table,
        "{:<name_width$} {:>9} {:>9} {:>11} {:>8} {:>9} {:>9} {:>12}",
        "phase", "records", "seconds", "records/s", "MB/s", "p50 ms", "p99 ms", "peak RSS MB"
    )?;
    let ms = |us: Option<u64>| us.map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1000.0));
    for (name, r) in phases {
        let Some(r) = r else { continue };
        writeln!(
            table,
            "{:<name_width$} {:>9} {:>9.2} {:>11.0} {:>8.1} {:>9} {:>9} {:>12}",
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
    Ok(table)
}

/// Peak resident set size of this process. Read from `/proc` (Linux) rather than a
/// crate: one line of one file, and absent elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A fresh directory under the system's temporary directory.
pub(crate) fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("opsagent-audit-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
