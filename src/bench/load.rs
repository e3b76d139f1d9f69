//! Loading the standard workload at scale, shared by `bench query` and `bench
//! retention`: through the store's own batch writes (the statements the pipeline uses),
//! with the secondary indexes dropped during the load and rebuilt once after it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use super::Workload;
use crate::store::Store;

/// Interactions per write while loading.
const BATCH: u64 = 1_000;
/// Concurrent writers while loading.
const WRITERS: u64 = 2;

/// How a load went.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Wall time, indexes included.
    pub total: Duration,
    /// Time spent writing rows.
    pub writing: Duration,
    /// Secondary indexes rebuilt.
    pub indexes: usize,
}

/// Loads `records` interactions spread evenly over the `days` days before `end` into the
/// PostgreSQL database at `url`, building the secondary indexes once after the load
/// rather than row by row (a million trigram-indexed rows inserted one batch at a time
/// would take most of a benchmark's run). The definitions are read back from the
/// catalogue, so the rebuilt indexes are exactly the migrations'. Ends with `VACUUM
/// ANALYZE`, as a database that has been running a while would be.
pub async fn load_indexed_after(
    url: &str,
    store: Arc<dyn Store>,
    records: u64,
    days: u32,
    seed: u64,
    end: DateTime<Utc>,
) -> anyhow::Result<Loaded> {
    let started = Instant::now();
    let mut conn = PgConnection::connect(url).await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexname, i.indexdef FROM pg_indexes i
         WHERE i.schemaname = current_schema()
           AND i.tablename IN ('interactions', 'sessions', 'thoughts', 'tool_calls', 'performance_metrics')
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
    )
    .fetch_all(&mut conn)
    .await?;
    for (name, _) in &indexes {
        conn.execute(format!("DROP INDEX {name}").as_str()).await?;
    }
    load(store, records, days, seed, end).await?;
    let writing = started.elapsed();
    conn.execute("SET maintenance_work_mem = '1GB'").await?;
    for (name, definition) in &indexes {
        tracing::info!(index = %name, "building");
        conn.execute(definition.as_str()).await.with_context(|| format!("rebuilding {name}"))?;
    }
    conn.execute("VACUUM ANALYZE").await.context("analysing after the load")?;
    conn.close().await?;
    Ok(Loaded { total: started.elapsed(), writing, indexes: indexes.len() })
}

/// Writes the workload through the store, two writers at a time, `created_at`
/// spread evenly over the `days` days before `end`.
pub async fn load(store: Arc<dyn Store>, records: u64, days: u32, seed: u64, end: DateTime<Utc>) -> anyhow::Result<()> {
    let span_us = i64::from(days) * 86_400_000_000;
    let step_us = (span_us / records.max(1) as i64).max(1);
    let start = end - chrono::Duration::microseconds(span_us);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut workload = Workload::new(seed + w);
            let mut first = w * BATCH;
            while first < records {
                let last = (first + BATCH).min(records);
                let batch: Vec<_> = (first..last)
                    .map(|i| {
                        let mut r = workload.record(i);
                        r.created_at = start + chrono::Duration::microseconds(step_us * i as i64);
                        r
                    })
                    .collect();
                store.write_batch(&batch).await?;
                if w == 0 && (first / BATCH).is_multiple_of(100) {
                    tracing::info!(written = first, of = records, "loading");
                }
                first += BATCH * WRITERS;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await.context("a loader task panicked")??;
    }
    Ok(())
}
