//! SQLite store: the zero-set-up default, one file in WAL mode.
//!
//! SQLite takes one writer at a time, so writes are serialised in-process by a mutex
//! instead of contending for the file lock. A batch is one transaction of set-based
//! statements: each table's rows are passed as ONE JSON array parameter and expanded with
//! `json_each`, so the statement count does not grow with the batch and no batch can hit
//! SQLite's limit on bound parameters.
//!
//! With the hash chain on, each record carries its block's id (`chain_block`) and the
//! batch's blocks are appended to their days' chains at the end of the same transaction
//! (the in-process mutex already makes this the only writer).

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use futures::stream::BoxStream;
use serde_json::json;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::Arguments;
use tokio::sync::Mutex;
use tracing::instrument;
use uuid::Uuid;

use super::anomalies::{Anomaly, NewAnomaly};
use super::chain::{self, ChainBlock, ChainDay, ChainPlan, DayCount, ExpiredDay, PendingBlock, RecordLink};
use super::consistency::{self, ChildTable, Finding, Inspection};
use super::filter::{Filter, FrequentQuestion, InteractionSummary, Keyset, Page, SessionView, StatsRequest, StatsRow};
use super::read::{self, Fetch, ReadRow};
use super::rows::SELECT_APPLIED_MIGRATIONS;
use super::sql::{self, Param, Sql};
use super::{
    dedup_dead_letters, dedup_sorted, migrate_error, sessions_of, Backend, BatchSink, DeadLetter, Readiness, Store,
    StoreError, WriteSummary,
};
use crate::model::Interaction;

/// How long a statement waits for SQLite's file lock (another process, a checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections of a file database.
const MAX_CONNECTIONS: u32 = 4;
/// Idle connections of a file database are closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A connection of a file database is replaced after this.
const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// The full-text index over question and final answer (migration 0003).
const FTS_TABLE: &str = "interactions_fts";

/// The SQLite schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// A store in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    write_lock: Mutex<()>,
    hash_chain: bool,
}

/// Formats a time the way the schema stores it (sortable RFC 3339, microseconds, `Z`).
pub(crate) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl SqliteStore {
    /// Opens (creating if missing) the database file a `sqlite://PATH` URL names.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Other(e.into()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed batch survives power loss, which the audit promise needs.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            // An in-memory database exists once per connection: keep exactly one.
            .max_connections(if in_memory { 1 } else { MAX_CONNECTIONS })
            .min_connections(if in_memory { 1 } else { 0 })
            .idle_timeout(if in_memory { None } else { Some(IDLE_TIMEOUT) })
            .max_lifetime(if in_memory { None } else { Some(MAX_LIFETIME) })
            .connect_with(options)
            .await
            .map_err(classify)?;
        Ok(SqliteStore { pool, write_lock: Mutex::new(()), hash_chain: true })
    }

    /// Whether written records are hash-chained (on by default; `audit.database.hash_chain`).
    pub fn with_hash_chain(mut self, on: bool) -> Self {
        self.hash_chain = on;
        self
    }

    /// The underlying pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable(e.into())
        }
        sqlx::Error::Database(db) => {
            // Primary result codes: 5 BUSY, 6 LOCKED, 10 IOERR, 13 FULL, 14 CANTOPEN are
            // about the file; 19 CONSTRAINT, 18 TOOBIG, 20 MISMATCH are about the rows.
            let code: i64 = db.code().and_then(|c| c.parse().ok()).unwrap_or(0);
            match code & 0xff {
                5 | 6 | 10 | 13 | 14 => StoreError::Unavailable(e.into()),
                18..=20 => StoreError::Rejected(e.into()),
                _ => StoreError::Other(e.into()),
            }
        }
        _ => StoreError::Other(e.into()),
    }
}

const INSERT_SESSIONS: &str = "\
INSERT INTO sessions (session_id, user_id, client_ip, user_agent, created_at)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4 FROM json_each(?1) WHERE true
ON CONFLICT (session_id) DO NOTHING";

const INSERT_INTERACTIONS: &str = "\
INSERT INTO interactions (interaction_id, session_id, user_id, endpoint, question, model_name,
    provider, base_url, cluster, final_answer, status, error, http_status, created_at,
    total_duration_ms, assistant_duration_ms, parse_duration_ms, input_tokens, output_tokens,
    attributes, chain_block, risk_level, risk_flagged)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7,
    value->>8, value->>9, value->>10, value->>11, value->>12, value->>13, value->>14, value->>15,
    value->>16, value->>17, value->>18, value->>19, value->>20, value->>21, value->>22
FROM json_each(?1) WHERE true
ON CONFLICT (interaction_id) DO NOTHING
RETURNING interaction_id";

const INSERT_THOUGHTS: &str = "\
INSERT INTO thoughts (interaction_id, thought, sequence_number, created_at)
SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1)";

const INSERT_TOOL_CALLS: &str = "\
INSERT INTO tool_calls (interaction_id, tool_name, tool_input, tool_observation, sequence_number,
    duration_ms, thought_sequence_number, error, created_at, risk_level, risk_rule)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7,
    value->>8, value->>9, value->>10
FROM json_each(?1)";

const INSERT_METRICS: &str = "\
INSERT INTO performance_metrics (interaction_id, metric_name, duration_ms, created_at)
SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1)";

/// Appends `blocks` (in ascending day order) to their days' chains.
async fn append_blocks(tx: &mut SqliteConnection, blocks: &[PendingBlock]) -> Result<(), StoreError> {
    let committed_at = format_time(&Utc::now());
    for block in blocks {
        let day = block.day.to_string();
        sqlx::query("INSERT INTO chain_days (day, head, anchor_hash) VALUES (?1, ?2, ?2) ON CONFLICT (day) DO NOTHING")
            .bind(&day)
            .bind(chain::genesis(block.day).as_slice())
            .execute(&mut *tx)
            .await
            .map_err(chain_error)?;
        let (head, blocks): (Vec<u8>, i64) = sqlx::query_as("SELECT head, blocks FROM chain_days WHERE day = ?1")
            .bind(&day)
            .fetch_one(&mut *tx)
            .await
            .map_err(chain_error)?;
        let seq = blocks + 1;
        let hash = block.hash(&head, seq);
        sqlx::query(
            "INSERT INTO chain_blocks (day, seq, block_id, prev_hash, root, hash, record_count, leaves, committed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(&day)
        .bind(seq)
        .bind(block.block_id.to_string())
        .bind(head.as_slice())
        .bind(block.root.as_slice())
        .bind(hash.as_slice())
        .bind(block.record_count)
        .bind(block.leaves.as_slice())
        .bind(&committed_at)
        .execute(&mut *tx)
        .await
        .map_err(chain_error)?;
        sqlx::query("UPDATE chain_days SET head = ?1, blocks = ?2, records = records + ?3 WHERE day = ?4")
            .bind(hash.as_slice())
            .bind(seq)
            .bind(block.record_count)
            .bind(&day)
            .execute(&mut *tx)
            .await
            .map_err(chain_error)?;
    }
    Ok(())
}

/// Classifies a failure of the chain statements: never about a record's data (they
/// carry none), so never [`StoreError::Rejected`], which would split the batch.
fn chain_error(e: sqlx::Error) -> StoreError {
    match classify(e) {
        StoreError::Rejected(inner) => StoreError::Other(format!("hash chain: {inner}").into()),
        other => other,
    }
}

#[async_trait]
impl BatchSink for SqliteStore {
    #[instrument(skip_all, fields(records = batch.len()))]
    async fn write_batch(&self, batch: &[Interaction]) -> Result<WriteSummary, StoreError> {
        let (records, repeats) = dedup_sorted(batch);
        if records.is_empty() {
            return Ok(WriteSummary::default());
        }
        let sessions: Vec<serde_json::Value> = sessions_of(&records)
            .iter()
            .map(|r| {
                json!([r.session_id.to_string(), r.user_id, r.client_ip, r.user_agent, format_time(&r.created_at)])
            })
            .collect();
        // Hashing needs no database: done before taking the write lock.
        let plan = self.hash_chain.then(|| ChainPlan::new(&records));
        let interactions: Vec<serde_json::Value> = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                json!([
                    r.interaction_id.to_string(),
                    r.session_id.to_string(),
                    r.user_id,
                    r.endpoint,
                    r.question,
                    r.model_name,
                    r.provider,
                    r.base_url,
                    r.cluster,
                    r.final_answer,
                    r.status.as_str(),
                    r.error,
                    r.http_status,
                    format_time(&r.created_at),
                    r.total_duration_ms,
                    r.assistant_duration_ms,
                    r.parse_duration_ms,
                    r.input_tokens,
                    r.output_tokens,
                    serde_json::Value::Object(r.attributes.clone()).to_string(),
                    plan.as_ref().and_then(|p| p.block_of(i)).map(|b| b.to_string()),
                    r.risk_level.rank(),
                    r.risk_flagged,
                ])
            })
            .collect();

        let _guard = self.write_lock.lock().await;
        let mut tx = self.pool.begin().await.map_err(classify)?;
        sqlx::query(INSERT_SESSIONS)
            .bind(serde_json::Value::Array(sessions).to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let inserted: Vec<String> = sqlx::query_scalar(INSERT_INTERACTIONS)
            .bind(serde_json::Value::Array(interactions).to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let inserted: HashSet<String> = inserted.into_iter().collect();
        let blocks = match &plan {
            Some(plan) => plan.blocks(|i| inserted.contains(&records[i].interaction_id.to_string())),
            None => Vec::new(),
        };
        let (fresh, old): (Vec<(&Interaction, String)>, Vec<(&Interaction, String)>) =
            records.iter().map(|r| (*r, r.interaction_id.to_string())).partition(|(_, id)| inserted.contains(id));
        let summary = WriteSummary {
            inserted: fresh.len() as u64,
            duplicates: repeats + old.len() as u64,
            already_stored: old.iter().map(|(r, _)| r.interaction_id).collect(),
        };

        let mut thoughts = Vec::new();
        let mut calls = Vec::new();
        let mut metrics = Vec::new();
        for (r, id) in &fresh {
            let at = format_time(&r.created_at);
            for t in &r.thoughts {
                thoughts.push(json!([id, t.content, t.sequence_number, at]));
            }
            for c in &r.tool_calls {
                calls.push(json!([
                    id,
                    c.tool_name,
                    c.tool_input,
                    c.tool_observation,
                    c.sequence_number,
                    c.duration_ms,
                    c.thought_sequence_number,
                    c.error,
                    at,
                    c.risk_level.rank(),
                    c.risk_rule
                ]));
            }
            for (name, ms) in &r.metrics {
                metrics.push(json!([id, name, ms, at]));
            }
        }
        for (sql, rows) in [(INSERT_THOUGHTS, thoughts), (INSERT_TOOL_CALLS, calls), (INSERT_METRICS, metrics)] {
            if !rows.is_empty() {
                sqlx::query(sql)
                    .bind(serde_json::Value::Array(rows).to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
            }
        }
        append_blocks(&mut tx, &blocks).await?;
        tx.commit().await.map_err(classify)?;
        Ok(summary)
    }

    async fn write_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let rows: Vec<serde_json::Value> = dedup_dead_letters(letters)
            .into_iter()
            .map(|l| json!([l.interaction_id.to_string(), l.record, l.error, format_time(&l.failed_at)]))
            .collect();
        let _guard = self.write_lock.lock().await;
        sqlx::query(
            "INSERT INTO dead_letters (interaction_id, record, error, failed_at)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?1) WHERE true
             ON CONFLICT (interaction_id) DO UPDATE
             SET error = excluded.error, failed_at = excluded.failed_at,
                 attempts = dead_letters.attempts + 1, record = excluded.record",
        )
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    #[instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().await;
        MIGRATOR.run(&self.pool).await.map_err(|e| migrate_error(e, classify))
    }

    #[instrument(skip_all)]
    async fn readiness(&self) -> Result<Readiness, StoreError> {
        let has_table: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'")
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
        let applied: Vec<i64> = if has_table == 0 {
            Vec::new()
        } else {
            sqlx::query_scalar(SELECT_APPLIED_MIGRATIONS).fetch_all(&self.pool).await.map_err(classify)?
        };
        Ok(Readiness::against(&MIGRATOR, &applied))
    }

    async fn database_bytes(&self) -> Result<u64, StoreError> {
        // The main file only: the WAL is checkpointed back into it.
        let bytes: i64 =
            sqlx::query_scalar("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
        Ok(u64::try_from(bytes).unwrap_or(0))
    }

    #[instrument(skip(self))]
    async fn get_interaction(&self, interaction_id: Uuid) -> Result<Interaction, StoreError> {
        read::interaction(self, interaction_id).await
    }

    async fn count_matching(&self, filter: &Filter) -> Result<u64, StoreError> {
        read::count(self, filter).await
    }

    #[instrument(skip_all)]
    async fn list_interactions(
        &self,
        filter: &Filter,
        after: Option<Keyset>,
        limit: u32,
    ) -> Result<Page<InteractionSummary>, StoreError> {
        read::page(self, filter, after, limit).await
    }

    #[instrument(skip(self))]
    async fn get_session(&self, session_id: Uuid, limit: u32) -> Result<SessionView, StoreError> {
        read::session(self, session_id, limit).await
    }

    #[instrument(skip_all)]
    async fn stats(&self, request: &StatsRequest) -> Result<Vec<StatsRow>, StoreError> {
        read::stats(self, request).await
    }

    #[instrument(skip_all)]
    async fn frequent_questions(&self, filter: &Filter, limit: u32) -> Result<Vec<FrequentQuestion>, StoreError> {
        read::frequent_questions(self, filter, limit).await
    }

    async fn list_dead_letters(&self, before: Option<Keyset>, limit: u32) -> Result<Page<DeadLetter>, StoreError> {
        read::dead_letters(self, before, limit).await
    }

    async fn write_anomalies(&self, anomalies: &[NewAnomaly]) -> Result<Vec<NewAnomaly>, StoreError> {
        let _guard = self.write_lock.lock().await;
        super::anomalies::write(self, anomalies).await
    }

    async fn list_anomalies(&self, before: Option<Keyset>, limit: u32) -> Result<Page<Anomaly>, StoreError> {
        super::anomalies::list(self, before, limit).await
    }

    fn export(&self, filter: &Filter) -> BoxStream<'static, Result<Interaction, StoreError>> {
        read::export(self, filter)
    }

    async fn chain_days(&self, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Result<Vec<ChainDay>, StoreError> {
        read::chain_days(self, from, to).await
    }

    async fn record_days(&self, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Result<Vec<DayCount>, StoreError> {
        read::record_days(self, from, to).await
    }

    async fn chain_blocks(&self, day: NaiveDate, after_seq: i64, limit: u32) -> Result<Vec<ChainBlock>, StoreError> {
        read::chain_blocks(self, day, after_seq, limit).await
    }

    async fn block_records(&self, block_id: Uuid) -> Result<Vec<Interaction>, StoreError> {
        read::block_records(self, block_id).await
    }

    fn day_links(&self, day: NaiveDate) -> BoxStream<'static, Result<RecordLink, StoreError>> {
        read::day_links(self, day)
    }

    #[instrument(skip(self))]
    async fn mark_expiring(&self, day: NaiveDate) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().await;
        sqlx::query("UPDATE chain_days SET retired_at = ?2 WHERE day = ?1")
            .bind(day.to_string())
            .bind(format_time(&Utc::now()))
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    #[instrument(skip(self))]
    async fn delete_day_batch(&self, day: NaiveDate, limit: u32) -> Result<u64, StoreError> {
        // The write lock is taken per batch, so the pipeline's writers get their turn
        // between batches. Children go by ON DELETE CASCADE (the pool turns
        // `foreign_keys` on for every connection).
        let _guard = self.write_lock.lock().await;
        let deleted = sqlx::query(
            "DELETE FROM interactions WHERE id IN (
                 SELECT id FROM interactions WHERE created_at >= ?1 AND created_at < ?2 LIMIT ?3)",
        )
        .bind(format_time(&sql::day_start(day)))
        .bind(format_time(&sql::day_end(day)))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(deleted)
    }

    #[instrument(skip(self))]
    async fn retire_day(&self, day: NaiveDate) -> Result<ExpiredDay, StoreError> {
        let _guard = self.write_lock.lock().await;
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let text = day.to_string();
        let chained: Option<i64> = sqlx::query_scalar("SELECT blocks FROM chain_days WHERE day = ?1")
            .bind(&text)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        // Normally nothing is left: the batches took the day (the write lock makes
        // this the only writer, so nothing arrives between the two).
        let records = sqlx::query("DELETE FROM interactions WHERE created_at >= ?1 AND created_at < ?2")
            .bind(format_time(&sql::day_start(day)))
            .bind(format_time(&sql::day_end(day)))
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        let mut blocks = 0;
        if let Some(last) = chained {
            blocks = sqlx::query("DELETE FROM chain_blocks WHERE day = ?1 AND seq <= ?2")
                .bind(&text)
                .bind(last)
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
            sqlx::query(
                "UPDATE chain_days SET anchor_seq = blocks, anchor_hash = head, retired_at = ?2 WHERE day = ?1",
            )
            .bind(&text)
            .bind(format_time(&Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(ExpiredDay { records, blocks })
    }

    #[instrument(skip(self))]
    async fn inspect(&self, inspection: Inspection, examples: u32) -> Result<Finding, StoreError> {
        consistency::inspect(self, inspection, examples).await
    }

    #[instrument(skip(self))]
    async fn delete_orphans(&self, child: ChildTable) -> Result<u64, StoreError> {
        let _guard = self.write_lock.lock().await;
        let done = sqlx::query(&consistency::delete_orphans(child)).execute(&self.pool).await.map_err(classify)?;
        Ok(done.rows_affected())
    }

    #[instrument(skip(self))]
    async fn search_index_intact(&self) -> Result<Option<bool>, StoreError> {
        // With rank 1, FTS5 also compares the index with the external content table
        // (`interactions`), which is where a drift shows: rows written while the
        // triggers were missing, or the index edited by hand.
        match sqlx::query(&format!("INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rank) VALUES ('integrity-check', 1)"))
            .execute(&self.pool)
            .await
        {
            Ok(_) => Ok(Some(true)),
            // SQLITE_CORRUPT (11) and its extended codes (SQLITE_CORRUPT_VTAB): the check's
            // way of saying the index disagrees.
            Err(sqlx::Error::Database(db))
                if db.code().and_then(|c| c.parse::<i64>().ok()).is_some_and(|c| c & 0xff == 11) =>
            {
                Ok(Some(false))
            }
            Err(e) => Err(classify(e)),
        }
    }

    #[instrument(skip(self))]
    async fn rebuild_search_index(&self) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().await;
        sqlx::query(&format!("INSERT INTO {FTS_TABLE} ({FTS_TABLE}) VALUES ('rebuild')"))
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// The bound values of a statement, as the text and integers the schema stores.
fn arguments(params: Vec<Param>) -> Result<SqliteArguments<'static>, StoreError> {
    let mut args = SqliteArguments::default();
    for param in params {
        match param {
            Param::Text(v) => args.add(v),
            Param::Int(v) => args.add(v),
            Param::Time(v) => args.add(format_time(&v)),
            Param::Uuid(v) => args.add(v.to_string()),
            Param::Date(v) => args.add(v.to_string()),
            Param::Float(v) => args.add(v),
        }
        .map_err(StoreError::Other)?;
    }
    Ok(args)
}

#[async_trait]
impl Fetch for SqliteStore {
    fn dialect(&self) -> Backend {
        Backend::Sqlite
    }

    async fn fetch_all<R: ReadRow>(&self, sql: Sql) -> Result<Vec<R>, StoreError> {
        let args = arguments(sql.params)?;
        sqlx::query_as_with::<_, R, _>(&sql.text, args).fetch_all(&self.pool).await.map_err(classify)
    }

    fn fetch_stream<R: ReadRow>(&self, sql: Sql) -> BoxStream<'static, Result<R, StoreError>> {
        read::spawn_rows!(self.pool.clone(), sql, arguments, classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Status;
    use crate::store::sql;

    /// Every typical list filter is an index read on SQLite too (PostgreSQL's plans are
    /// checked at 1M rows by `bench query`): no `SCAN i` of `interactions` without an
    /// index.
    #[tokio::test]
    async fn typical_list_filters_read_an_index() {
        let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
        store.migrate().await.unwrap();
        sqlx::query("ANALYZE").execute(&store.pool).await.unwrap();
        let at: DateTime<Utc> = "2026-11-20T00:00:00Z".parse().unwrap();
        let filters = [
            Filter::default(),
            Filter { user_id: Some("alice".into()), ..Filter::default() },
            Filter { model_name: Some("gpt-4o".into()), ..Filter::default() },
            Filter { cluster: Some("prod-east".into()), ..Filter::default() },
            Filter { provider: Some("openai".into()), ..Filter::default() },
            Filter { status: vec![Status::Error], ..Filter::default() },
            Filter { session_id: Some(Uuid::nil()), ..Filter::default() },
            Filter { from: Some(at), to: Some(at + chrono::Duration::days(1)), ..Filter::default() },
            Filter { text: Some("crashloop".into()), ..Filter::default() },
        ];
        for filter in filters {
            let statement = sql::select_page(Backend::Sqlite, &filter, None, 51);
            let args = arguments(statement.params.clone()).unwrap();
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as_with(&format!("EXPLAIN QUERY PLAN {}", statement.text), args)
                    .fetch_all(&store.pool)
                    .await
                    .unwrap();
            let details: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
            assert!(!details.contains(&"SCAN i"), "{filter:?} scans interactions without an index: {details:?}");
        }
    }
}
