//! `bench storage`: bytes per interaction at rest in PostgreSQL and in the Parquet
//! archive. Loads standard-workload interactions (the loader of `bench query`), then
//! reads `pg_total_relation_size` (heap, TOAST and indexes) and `pg_table_size` (heap
//! and TOAST) of every audit table, and exports every row through the real Parquet
//! encoder, counting its bytes. The last line printed is machine-readable:
//! `at_rest_bytes=… at_rest_no_index_bytes=… parquet_bytes=…` (per interaction).
//!
//! `--baseline` undoes the storage settings of migration 0005 (lz4 column compression,
//! `toast_tuple_target`) before loading, so one binary measures before and after on two
//! databases at the same N.
//!
//! Like `bench query`, the secondary indexes are dropped for the load and rebuilt after
//! it (the load would otherwise take most of the run): rebuilt B-trees are packed,
//! about 10–30% smaller than ones grown row by row, so the index share is a lower bound.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use chrono::{DurationRound, Utc};
use futures::StreamExt;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use crate::config::Config;
use crate::export::{self, Format};
use crate::store::{self, Backend, Filter, Store};

/// The tables an interaction's data lives in (with the chain's and dead letters').
const AUDIT_TABLES: &[&str] = &[
    "sessions",
    "interactions",
    "thoughts",
    "tool_calls",
    "performance_metrics",
    "chain_days",
    "chain_blocks",
    "chain_legacy",
    "dead_letters",
];

/// What `--baseline` runs: migration 0005 undone (pglz, the default target).
const UNDO_STORAGE_SETTINGS: &[&str] = &[
    "ALTER TABLE interactions ALTER COLUMN question SET COMPRESSION pglz, ALTER COLUMN final_answer SET COMPRESSION pglz,
        ALTER COLUMN error SET COMPRESSION pglz, ALTER COLUMN attributes SET COMPRESSION pglz",
    "ALTER TABLE thoughts ALTER COLUMN thought SET COMPRESSION pglz",
    "ALTER TABLE tool_calls ALTER COLUMN tool_input SET COMPRESSION pglz,
        ALTER COLUMN tool_observation SET COMPRESSION pglz, ALTER COLUMN error SET COMPRESSION pglz",
    "ALTER TABLE dead_letters ALTER COLUMN record SET COMPRESSION pglz",
    "ALTER TABLE interactions RESET (toast_tuple_target)",
    "ALTER TABLE thoughts RESET (toast_tuple_target)",
    "ALTER TABLE tool_calls RESET (toast_tuple_target)",
];

/// Options of `bench storage`.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageBenchArgs {
    /// Interactions to load (the report's figures are at 1,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// The interactions are spread evenly over this many days up to now.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// Measure the storage settings before migration 0005 (pglz, default TOAST target).
    #[arg(long)]
    pub baseline: bool,
    /// Skip the Parquet export.
    #[arg(long)]
    pub no_parquet: bool,
    /// Seed of the workload's content.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// One table's sizes.
struct TableSize {
    name: &'static str,
    total: i64,
    without_indexes: i64,
}

/// Runs the benchmark and prints its report to stdout.
pub async fn run_storage(config: &Config, args: StorageBenchArgs) -> anyhow::Result<()> {
    let url = config.database.resolved_url()?;
    let store = store::open(&config.database).await.context("opening the benchmark database")?;
    if store.backend() != Backend::Postgres {
        bail!("bench storage measures PostgreSQL: pass --database-url postgres://…");
    }
    store.migrate().await.context("migrating the benchmark database")?;
    if store.count_interactions().await? > 0 {
        bail!("bench storage needs an empty database (it divides sizes by --records)");
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "opsagent-audit bench storage: {} interactions over {} days, {}",
        args.records,
        args.days,
        if args.baseline { "baseline (pglz, default TOAST target)" } else { "as migrated (lz4, toast_tuple_target)" }
    )?;
    out.flush()?;

    let mut conn = PgConnection::connect(&url).await?;
    if args.baseline {
        for statement in UNDO_STORAGE_SETTINGS {
            conn.execute(*statement).await.with_context(|| format!("running {statement}"))?;
        }
    }
    let end = Utc::now().duration_trunc(chrono::Duration::seconds(1))?;
    let loaded = super::load::load_indexed_after(&url, store.clone(), args.records, args.days, args.seed, end).await?;
    writeln!(out, "loaded in {:.0} s ({:.0} s writing)", loaded.total.as_secs_f64(), loaded.writing.as_secs_f64())?;

    let mut sizes = Vec::new();
    for &name in AUDIT_TABLES {
        let (total, without_indexes): (i64, i64) =
            sqlx::query_as("SELECT pg_total_relation_size($1::regclass), pg_table_size($1::regclass)")
                .bind(name)
                .fetch_one(&mut conn)
                .await
                .with_context(|| format!("measuring {name}"))?;
        sizes.push(TableSize { name, total, without_indexes });
    }
    conn.close().await?;

    let n = args.records.max(1) as f64;
    writeln!(out, "\n{:<22} {:>12} {:>12} {:>14}", "table", "total MB", "no-index MB", "bytes/inter.")?;
    for s in &sizes {
        writeln!(
            out,
            "{:<22} {:>12.1} {:>12.1} {:>14.0}",
            s.name,
            mb(s.total),
            mb(s.without_indexes),
            s.total as f64 / n
        )?;
    }
    let total: i64 = sizes.iter().map(|s| s.total).sum();
    let without_indexes: i64 = sizes.iter().map(|s| s.without_indexes).sum();
    writeln!(out, "{:<22} {:>12.1} {:>12.1} {:>14.0}", "all", mb(total), mb(without_indexes), total as f64 / n)?;

    let parquet = if args.no_parquet { None } else { Some(parquet_bytes(store.clone()).await?) };
    store.close().await;
    if let Some((bytes, secs)) = parquet {
        writeln!(out, "\nparquet (zstd) archive of every row: {:.1} MB in {secs:.1} s", mb(bytes as i64))?;
    }
    writeln!(
        out,
        "at_rest_bytes={:.0} at_rest_no_index_bytes={:.0} parquet_bytes={}",
        total as f64 / n,
        without_indexes as f64 / n,
        parquet.map_or("-".to_string(), |(bytes, _)| format!("{:.0}", bytes as f64 / n))
    )?;
    Ok(())
}

/// Bytes of every stored interaction encoded as Parquet by the exporter (retention's
/// archive format), and the seconds it took.
async fn parquet_bytes(store: Arc<dyn Store>) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let mut chunks = std::pin::pin!(export::encode_stream(store.export(&Filter::default()), Format::Parquet));
    let mut bytes = 0u64;
    while let Some(chunk) = chunks.next().await {
        bytes += chunk.context("encoding the Parquet archive")?.len() as u64;
    }
    Ok((bytes, started.elapsed().as_secs_f64()))
}

fn mb(bytes: i64) -> f64 {
    bytes as f64 / 1_048_576.0
}
