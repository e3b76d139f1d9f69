//! PostgreSQL store: the production backend.
//!
//! A batch is one transaction of five set-based statements, one per table, each taking
//! whole columns as arrays and expanding them with `UNNEST` (one round trip per table,
//! whatever the batch size). Interactions are inserted with
//! `ON CONFLICT (interaction_id) DO NOTHING RETURNING interaction_id`, and children are
//! written only for the ids that came back, which makes re-delivery a no-op.
//!
//! With the hash chain on, each record carries its block's id (`chain_block`), and the
//! batch's blocks are appended to their days' chains as the last statements before
//! COMMIT: the day row's lock (`FOR UPDATE`, days in ascending order) is held only for
//! the commit, so concurrent writers chain in parallel and never deadlock.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::NaiveDate;
use futures::stream::BoxStream;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Arguments, Connection};
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
use crate::config::DatabaseConfig;
use crate::model::{Interaction, Thought, ToolCall};

/// How long an operation waits for a pooled connection before the database counts as
/// unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the direct connection that explains a pool timeout may take.
const CONNECT_PROBE: Duration = Duration::from_secs(3);

/// The PostgreSQL schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// A store backed by a PostgreSQL connection pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    hash_chain: bool,
}

impl PostgresStore {
    /// Creates the pool. Connections are opened on first use, so a database that is down
    /// at start-up is reported by the first operation, not here.
    pub async fn connect(url: &str, options: &DatabaseConfig) -> Result<Self, StoreError> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Other(e.into()))?
            .application_name("opsagent-audit");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_open_conns)
            .max_lifetime(options.conn_max_lifetime)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(connect);
        Ok(PostgresStore { pool, hash_chain: true })
    }

    /// Wraps an existing pool (tests, benchmarks).
    pub fn from_pool(pool: PgPool) -> Self {
        PostgresStore { pool, hash_chain: true }
    }

    /// Whether written records are hash-chained (on by default; `audit.database.hash_chain`).
    pub fn with_hash_chain(mut self, on: bool) -> Self {
        self.hash_chain = on;
        self
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// sqlx reports a server that refuses connections as "pool timed out", hiding why;
    /// for the operations an operator reads the error of (migrate, readiness), one
    /// direct connection attempt names the cause ("connection refused", a bad password).
    async fn explain_timeout(&self, e: StoreError) -> StoreError {
        let timed_out = matches!(&e, StoreError::Unavailable(inner)
            if matches!(inner.downcast_ref::<sqlx::Error>(), Some(sqlx::Error::PoolTimedOut)));
        if !timed_out {
            return e;
        }
        let options = self.pool.connect_options();
        match tokio::time::timeout(CONNECT_PROBE, PgConnection::connect_with(&options)).await {
            Ok(Err(cause)) => StoreError::unavailable(format!("cannot connect: {cause}")),
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                e
            }
            Err(_) => StoreError::unavailable(format!("cannot connect: no answer within {CONNECT_PROBE:?}")),
        }
    }
}

/// Sorts a database error into what the pipeline should do about it.
pub(crate) fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.into()),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLSTATE classes: 08 connection, 53 resources, 57 operator intervention
            // (shutdown, terminated backend), 58 system; 40001/40P01 serialisation and
            // deadlock are worth a retry. 22 data and 23 integrity are about the rows.
            match &code[..code.len().min(2)] {
                "08" | "53" | "57" | "58" | "40" => StoreError::Unavailable(e.into()),
                "22" | "23" | "54" => StoreError::Rejected(e.into()),
                _ => StoreError::Other(e.into()),
            }
        }
        sqlx::Error::Encode(_) => StoreError::Rejected(e.into()),
        _ => StoreError::Other(e.into()),
    }
}

const INSERT_SESSIONS: &str = "\
INSERT INTO sessions (session_id, user_id, client_ip, user_agent, created_at)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
ON CONFLICT (session_id) DO NOTHING";

const INSERT_INTERACTIONS: &str = "\
INSERT INTO interactions (interaction_id, session_id, user_id, endpoint, question, model_name,
    provider, base_url, cluster, final_answer, status, error, http_status, created_at,
    total_duration_ms, assistant_duration_ms, parse_duration_ms, input_tokens, output_tokens,
    attributes, chain_block, risk_level, risk_flagged)
SELECT u.iid, u.sid, u.uid, u.ep, u.q, u.model, u.prov, u.url, u.cl, u.ans, u.st, u.err, u.http,
    u.at, u.total, u.asst, u.parse, u.tin, u.tout, u.attrs::jsonb, u.block, u.risk, u.flagged
FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::int4[], $14::timestamptz[],
    $15::int8[], $16::int8[], $17::int8[], $18::int8[], $19::int8[], $20::text[], $21::uuid[],
    $22::int2[], $23::int4[])
    AS u(iid, sid, uid, ep, q, model, prov, url, cl, ans, st, err, http, at, total, asst, parse,
         tin, tout, attrs, block, risk, flagged)
ON CONFLICT (interaction_id) DO NOTHING
RETURNING interaction_id";

const INSERT_THOUGHTS: &str = "\
INSERT INTO thoughts (interaction_id, thought, sequence_number, created_at)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::timestamptz[])";

const INSERT_TOOL_CALLS: &str = "\
INSERT INTO tool_calls (interaction_id, tool_name, tool_input, tool_observation, sequence_number,
    duration_ms, thought_sequence_number, error, created_at, risk_level, risk_rule)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int8[],
    $7::int4[], $8::text[], $9::timestamptz[], $10::int2[], $11::text[])";

const INSERT_METRICS: &str = "\
INSERT INTO performance_metrics (interaction_id, metric_name, duration_ms, created_at)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::timestamptz[])";

/// Creates a day's chain row if it is the day's first block (genesis as head and anchor).
const INSERT_CHAIN_DAY: &str = "\
INSERT INTO chain_days (day, head, anchor_hash) VALUES ($1, $2, $2) ON CONFLICT (day) DO NOTHING";

/// Locks the day's chain row until commit and reads where the chain is.
const LOCK_CHAIN_DAY: &str = "SELECT head, blocks FROM chain_days WHERE day = $1 FOR UPDATE";

/// Appends a block and moves the day's head to it, in one round trip.
const APPEND_BLOCK: &str = "\
WITH block AS (
    INSERT INTO chain_blocks (day, seq, block_id, prev_hash, root, hash, record_count, leaves)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8))
UPDATE chain_days SET head = $6, blocks = $2, records = records + $7 WHERE day = $1";

/// Appends `blocks` (in ascending day order) to their days' chains.
async fn append_blocks(tx: &mut PgConnection, blocks: &[PendingBlock]) -> Result<(), StoreError> {
    for block in blocks {
        sqlx::query(INSERT_CHAIN_DAY)
            .bind(block.day)
            .bind(chain::genesis(block.day).as_slice())
            .execute(&mut *tx)
            .await
            .map_err(chain_error)?;
        let (head, blocks): (Vec<u8>, i64) =
            sqlx::query_as(LOCK_CHAIN_DAY).bind(block.day).fetch_one(&mut *tx).await.map_err(chain_error)?;
        let seq = blocks + 1;
        let hash = block.hash(&head, seq);
        sqlx::query(APPEND_BLOCK)
            .bind(block.day)
            .bind(seq)
            .bind(block.block_id)
            .bind(head.as_slice())
            .bind(block.root.as_slice())
            .bind(hash.as_slice())
            .bind(block.record_count)
            .bind(block.leaves.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(chain_error)?;
    }
    Ok(())
}

/// Classifies a failure of the chain statements. They carry no record data, so the
/// database refusing them is never about a record: reported as a database error (the
/// batch is retried), not as refused data (which would split the batch and dead-letter
/// good records).
fn chain_error(e: sqlx::Error) -> StoreError {
    match classify(e) {
        StoreError::Rejected(inner) => StoreError::Other(format!("hash chain: {inner}").into()),
        other => other,
    }
}

#[async_trait]
impl BatchSink for PostgresStore {
    #[instrument(skip_all, fields(records = batch.len()))]
    async fn write_batch(&self, batch: &[Interaction]) -> Result<WriteSummary, StoreError> {
        let (records, repeats) = dedup_sorted(batch);
        if records.is_empty() {
            return Ok(WriteSummary::default());
        }
        // Hashing needs no database: done before the transaction, so it holds no locks.
        let plan = self.hash_chain.then(|| ChainPlan::new(&records));
        let chain_blocks: Vec<Option<Uuid>> =
            (0..records.len()).map(|i| plan.as_ref().and_then(|p| p.block_of(i))).collect();
        let mut tx = self.pool.begin().await.map_err(classify)?;

        let sessions = sessions_of(&records);
        sqlx::query(INSERT_SESSIONS)
            .bind(sessions.iter().map(|r| r.session_id).collect::<Vec<_>>())
            .bind(sessions.iter().map(|r| r.user_id.as_deref()).collect::<Vec<_>>())
            .bind(sessions.iter().map(|r| r.client_ip.as_deref()).collect::<Vec<_>>())
            .bind(sessions.iter().map(|r| r.user_agent.as_deref()).collect::<Vec<_>>())
            .bind(sessions.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;

        let attributes: Vec<String> =
            records.iter().map(|r| serde_json::Value::Object(r.attributes.clone()).to_string()).collect();
        let inserted: Vec<Uuid> = sqlx::query_scalar(INSERT_INTERACTIONS)
            .bind(records.iter().map(|r| r.interaction_id).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.session_id).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.user_id.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.endpoint.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.question.as_str()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.model_name.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.provider.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.base_url.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.cluster.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.final_answer.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.http_status).collect::<Vec<_>>())
            // At the microsecond the column keeps, cut the way the record hash cuts it
            // (sqlx would round toward 2000-01-01 instead, which differs before it).
            .bind(records.iter().map(|r| chain::stored_time(r.created_at)).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.total_duration_ms).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.assistant_duration_ms).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.parse_duration_ms).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.input_tokens).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.output_tokens).collect::<Vec<_>>())
            .bind(attributes)
            .bind(chain_blocks)
            .bind(records.iter().map(|r| r.risk_level.rank()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.risk_flagged).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let inserted: HashSet<Uuid> = inserted.into_iter().collect();
        let blocks = match &plan {
            Some(plan) => plan.blocks(|i| inserted.contains(&records[i].interaction_id)),
            None => Vec::new(),
        };
        let (fresh, old): (Vec<&Interaction>, Vec<&Interaction>) =
            records.into_iter().partition(|r| inserted.contains(&r.interaction_id));
        let summary = WriteSummary {
            inserted: fresh.len() as u64,
            duplicates: repeats + old.len() as u64,
            already_stored: old.iter().map(|r| r.interaction_id).collect(),
        };

        let thoughts: Vec<(&Interaction, &Thought)> =
            fresh.iter().flat_map(|r| r.thoughts.iter().map(move |t| (*r, t))).collect();
        if !thoughts.is_empty() {
            sqlx::query(INSERT_THOUGHTS)
                .bind(thoughts.iter().map(|(r, _)| r.interaction_id).collect::<Vec<_>>())
                .bind(thoughts.iter().map(|(_, t)| t.content.as_str()).collect::<Vec<_>>())
                .bind(thoughts.iter().map(|(_, t)| t.sequence_number).collect::<Vec<_>>())
                .bind(thoughts.iter().map(|(r, _)| r.created_at).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }

        let calls: Vec<(&Interaction, &ToolCall)> =
            fresh.iter().flat_map(|r| r.tool_calls.iter().map(move |c| (*r, c))).collect();
        if !calls.is_empty() {
            sqlx::query(INSERT_TOOL_CALLS)
                .bind(calls.iter().map(|(r, _)| r.interaction_id).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.tool_name.as_str()).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.tool_input.as_str()).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.tool_observation.as_deref()).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.sequence_number).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.duration_ms).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.thought_sequence_number).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.error.as_deref()).collect::<Vec<_>>())
                .bind(calls.iter().map(|(r, _)| r.created_at).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.risk_level.rank()).collect::<Vec<_>>())
                .bind(calls.iter().map(|(_, c)| c.risk_rule.as_deref()).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }

        let metrics: Vec<(&Interaction, &String, i64)> =
            fresh.iter().flat_map(|r| r.metrics.iter().map(move |(k, v)| (*r, k, *v))).collect();
        if !metrics.is_empty() {
            sqlx::query(INSERT_METRICS)
                .bind(metrics.iter().map(|(r, _, _)| r.interaction_id).collect::<Vec<_>>())
                .bind(metrics.iter().map(|(_, k, _)| k.as_str()).collect::<Vec<_>>())
                .bind(metrics.iter().map(|(_, _, v)| *v).collect::<Vec<_>>())
                .bind(metrics.iter().map(|(r, _, _)| r.created_at).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }

        // Last, so each day's row is locked only until the commit right after.
        append_blocks(&mut tx, &blocks).await?;
        tx.commit().await.map_err(classify)?;
        Ok(summary)
    }

    async fn write_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let letters = dedup_dead_letters(letters);
        sqlx::query(
            "INSERT INTO dead_letters (interaction_id, record, error, failed_at)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
             ON CONFLICT (interaction_id) DO UPDATE
             SET error = EXCLUDED.error, failed_at = EXCLUDED.failed_at,
                 attempts = dead_letters.attempts + 1, record = EXCLUDED.record",
        )
        .bind(letters.iter().map(|l| l.interaction_id).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.record.as_str()).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.error.as_str()).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.failed_at).collect::<Vec<_>>())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    #[instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        match MIGRATOR.run(&self.pool).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.explain_timeout(migrate_error(e, classify)).await),
        }
    }

    #[instrument(skip_all)]
    async fn readiness(&self) -> Result<Readiness, StoreError> {
        let applied: Vec<i64> = match sqlx::query_scalar(SELECT_APPLIED_MIGRATIONS).fetch_all(&self.pool).await {
            Ok(v) => v,
            // 42P01: the bookkeeping table does not exist yet, so nothing is applied.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => Vec::new(),
            Err(e) => return Err(self.explain_timeout(classify(e)).await),
        };
        Ok(Readiness::against(&MIGRATOR, &applied))
    }

    async fn database_bytes(&self) -> Result<u64, StoreError> {
        let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
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
        sqlx::query("UPDATE chain_days SET retired_at = now() WHERE day = $1")
            .bind(day)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    #[instrument(skip(self))]
    async fn delete_day_batch(&self, day: NaiveDate, limit: u32) -> Result<u64, StoreError> {
        // By the (created_at, id) index; the children go by ON DELETE CASCADE through
        // their interaction_id indexes. One statement, so its own short transaction.
        let deleted = sqlx::query(
            "DELETE FROM interactions WHERE id IN (
                 SELECT id FROM interactions WHERE created_at >= $1 AND created_at < $2 LIMIT $3)",
        )
        .bind(sql::day_start(day))
        .bind(sql::day_end(day))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(deleted)
    }

    #[instrument(skip(self))]
    async fn retire_day(&self, day: NaiveDate) -> Result<ExpiredDay, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // The day's row first: a writer appending to this day waits for the commit and
        // then continues the chain from the anchor set here.
        let chained: Option<i64> = sqlx::query_scalar("SELECT blocks FROM chain_days WHERE day = $1 FOR UPDATE")
            .bind(day)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        // Normally nothing is left: the batches took the day. Records of the day
        // committed since (late arrivals) go here, before their blocks do.
        let records = sqlx::query("DELETE FROM interactions WHERE created_at >= $1 AND created_at < $2")
            .bind(sql::day_start(day))
            .bind(sql::day_end(day))
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        let mut blocks = 0;
        if let Some(last) = chained {
            blocks = sqlx::query("DELETE FROM chain_blocks WHERE day = $1 AND seq <= $2")
                .bind(day)
                .bind(last)
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
            sqlx::query(
                "UPDATE chain_days SET anchor_seq = blocks, anchor_hash = head, retired_at = now() WHERE day = $1",
            )
            .bind(day)
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
        let done = sqlx::query(&consistency::delete_orphans(child)).execute(&self.pool).await.map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn search_index_intact(&self) -> Result<Option<bool>, StoreError> {
        // The trigram GIN indexes are ordinary indexes, kept in step by PostgreSQL.
        Ok(None)
    }

    async fn rebuild_search_index(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// The bound values of a statement, as PostgreSQL types.
fn arguments(params: Vec<Param>) -> Result<PgArguments, StoreError> {
    let mut args = PgArguments::default();
    for param in params {
        match param {
            Param::Text(v) => args.add(v),
            Param::Int(v) => args.add(v),
            Param::Time(v) => args.add(v),
            Param::Uuid(v) => args.add(v),
            Param::Date(v) => args.add(v),
            Param::Float(v) => args.add(v),
        }
        .map_err(StoreError::Other)?;
    }
    Ok(args)
}

#[async_trait]
impl Fetch for PostgresStore {
    fn dialect(&self) -> Backend {
        Backend::Postgres
    }

    async fn fetch_all<R: ReadRow>(&self, sql: Sql) -> Result<Vec<R>, StoreError> {
        let args = arguments(sql.params)?;
        match sqlx::query_as_with::<_, R, _>(&sql.text, args).fetch_all(&self.pool).await {
            Ok(rows) => Ok(rows),
            Err(e) => Err(self.explain_timeout(classify(e)).await),
        }
    }

    fn fetch_stream<R: ReadRow>(&self, sql: Sql) -> BoxStream<'static, Result<R, StoreError>> {
        read::spawn_rows!(self.pool.clone(), sql, arguments, classify)
    }
}
