//! SQLite store: the zero-set-up default, one file in WAL mode.
//!
//! SQLite takes one writer at a time, so writes are serialised in-process by a mutex
//! instead of contending for the file lock. A batch is one transaction of set-based
//! statements: each table's rows are passed as ONE JSON array parameter and expanded with
//! `json_each`, so the statement count does not grow with the batch and no batch can hit
//! SQLite's limit on bound parameters.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::Mutex;
use tracing::instrument;
use uuid::Uuid;

use super::{dedup_sorted, sessions_of, Backend, DeadLetter, Readiness, Store, StoreError, WriteSummary};
use crate::model::{Interaction, Status, Thought, ToolCall};

/// The SQLite schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// A store in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    write_lock: Mutex<()>,
}

/// Formats a time the way the schema stores it (sortable RFC 3339, microseconds, `Z`).
pub(crate) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn parse_uuid(s: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl SqliteStore {
    /// Opens (creating if missing) the database file a `sqlite://PATH` URL names.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Other)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed batch survives power loss, which the audit promise needs.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            // An in-memory database exists once per connection: keep exactly one.
            .max_connections(if in_memory { 1 } else { 4 })
            .min_connections(if in_memory { 1 } else { 0 })
            .idle_timeout(if in_memory { None } else { Some(Duration::from_secs(600)) })
            .max_lifetime(if in_memory { None } else { Some(Duration::from_secs(3600)) })
            .connect_with(options)
            .await
            .map_err(classify)?;
        Ok(SqliteStore { pool, write_lock: Mutex::new(()) })
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
            StoreError::Unavailable(e)
        }
        sqlx::Error::Database(db) => {
            // Primary result codes: 5 BUSY, 6 LOCKED, 10 IOERR, 13 FULL, 14 CANTOPEN are
            // about the file; 19 CONSTRAINT, 18 TOOBIG, 20 MISMATCH are about the rows.
            let code: i64 = db.code().and_then(|c| c.parse().ok()).unwrap_or(0);
            match code & 0xff {
                5 | 6 | 10 | 13 | 14 => StoreError::Unavailable(e),
                18..=20 => StoreError::Rejected(e),
                _ => StoreError::Other(e),
            }
        }
        _ => StoreError::Other(e),
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
    attributes)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7,
    value->>8, value->>9, value->>10, value->>11, value->>12, value->>13, value->>14, value->>15,
    value->>16, value->>17, value->>18, value->>19
FROM json_each(?1) WHERE true
ON CONFLICT (interaction_id) DO NOTHING
RETURNING interaction_id";

const INSERT_THOUGHTS: &str = "\
INSERT INTO thoughts (interaction_id, thought, sequence_number, created_at)
SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1)";

const INSERT_TOOL_CALLS: &str = "\
INSERT INTO tool_calls (interaction_id, tool_name, tool_input, tool_observation, sequence_number,
    duration_ms, thought_sequence_number, error, created_at)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7,
    value->>8
FROM json_each(?1)";

const INSERT_METRICS: &str = "\
INSERT INTO performance_metrics (interaction_id, metric_name, duration_ms, created_at)
SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1)";

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    #[instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().await;
        MIGRATOR.run(&self.pool).await?;
        Ok(())
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
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?
        };
        let pending = MIGRATOR.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect();
        Ok(Readiness { pending_migrations: pending })
    }

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
        let interactions: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
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
                    at
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
        tx.commit().await.map_err(classify)?;
        Ok(summary)
    }

    #[instrument(skip(self))]
    async fn get_interaction(&self, interaction_id: Uuid) -> Result<Interaction, StoreError> {
        let id = interaction_id.to_string();
        let row = sqlx::query(
            "SELECT i.*, s.client_ip, s.user_agent
             FROM interactions i LEFT JOIN sessions s ON s.session_id = i.session_id
             WHERE i.interaction_id = ?1",
        )
        .bind(&id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .ok_or(StoreError::NotFound)?;
        let mut record = interaction_from_row(&row).map_err(StoreError::Other)?;

        record.thoughts = sqlx::query(
            "SELECT thought, sequence_number FROM thoughts WHERE interaction_id = ?1 ORDER BY sequence_number, id",
        )
        .bind(&id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(|r| {
            Ok(Thought {
                content: r.try_get::<Option<String>, _>("thought")?.unwrap_or_default(),
                sequence_number: r.try_get("sequence_number")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::Other)?;

        record.tool_calls = sqlx::query(
            "SELECT tool_name, tool_input, tool_observation, sequence_number, duration_ms,
                    thought_sequence_number, error
             FROM tool_calls WHERE interaction_id = ?1 ORDER BY sequence_number, id",
        )
        .bind(&id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(|r| {
            Ok(ToolCall {
                tool_name: r.try_get("tool_name")?,
                tool_input: r.try_get("tool_input")?,
                tool_observation: r.try_get("tool_observation")?,
                sequence_number: r.try_get("sequence_number")?,
                duration_ms: r.try_get("duration_ms")?,
                thought_sequence_number: r.try_get("thought_sequence_number")?,
                error: r.try_get("error")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::Other)?;

        record.metrics =
            sqlx::query("SELECT metric_name, duration_ms FROM performance_metrics WHERE interaction_id = ?1")
                .bind(&id)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?
                .iter()
                .map(|r| Ok((r.try_get("metric_name")?, r.try_get("duration_ms")?)))
                .collect::<Result<BTreeMap<_, _>, sqlx::Error>>()
                .map_err(StoreError::Other)?;
        Ok(record)
    }

    async fn count_interactions(&self) -> Result<u64, StoreError> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM interactions").fetch_one(&self.pool).await.map_err(classify)?;
        Ok(n as u64)
    }

    async fn write_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let rows: Vec<serde_json::Value> = letters
            .iter()
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

    async fn list_dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(
            "SELECT interaction_id, record, error, attempts, failed_at FROM dead_letters
             ORDER BY failed_at DESC, id DESC LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    interaction_id: parse_uuid(row.try_get("interaction_id")?)?,
                    record: row.try_get("record")?,
                    error: row.try_get("error")?,
                    attempts: row.try_get("attempts")?,
                    failed_at: parse_time(row.try_get("failed_at")?)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::Other)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

fn interaction_from_row(row: &SqliteRow) -> Result<Interaction, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let attributes: String = row.try_get("attributes")?;
    Ok(Interaction {
        interaction_id: parse_uuid(row.try_get("interaction_id")?)?,
        session_id: parse_uuid(row.try_get("session_id")?)?,
        user_id: row.try_get("user_id")?,
        client_ip: row.try_get("client_ip")?,
        user_agent: row.try_get("user_agent")?,
        created_at: parse_time(row.try_get("created_at")?)?,
        endpoint: row.try_get("endpoint")?,
        question: row.try_get("question")?,
        model_name: row.try_get("model_name")?,
        provider: row.try_get("provider")?,
        base_url: row.try_get("base_url")?,
        cluster: row.try_get("cluster")?,
        thoughts: Vec::new(),
        tool_calls: Vec::new(),
        final_answer: row.try_get("final_answer")?,
        status: Status::parse(&status).unwrap_or(Status::Error),
        error: row.try_get("error")?,
        http_status: row.try_get("http_status")?,
        total_duration_ms: row.try_get("total_duration_ms")?,
        assistant_duration_ms: row.try_get("assistant_duration_ms")?,
        parse_duration_ms: row.try_get("parse_duration_ms")?,
        metrics: BTreeMap::new(),
        input_tokens: row.try_get("input_tokens")?,
        output_tokens: row.try_get("output_tokens")?,
        attributes: serde_json::from_str(&attributes).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
    })
}
