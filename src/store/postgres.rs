//! PostgreSQL store: the production backend.
//!
//! A batch is one transaction of five set-based statements, one per table, each taking
//! whole columns as arrays and expanding them with `UNNEST` (one round trip per table,
//! whatever the batch size). Interactions are inserted with
//! `ON CONFLICT (interaction_id) DO NOTHING RETURNING interaction_id`, and children are
//! written only for the ids that came back, which makes re-delivery a no-op.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use tracing::instrument;
use uuid::Uuid;

use super::{dedup_sorted, sessions_of, Backend, DeadLetter, Readiness, Store, StoreError, WriteSummary};
use crate::config::DatabaseConfig;
use crate::model::{Interaction, Status, Thought, ToolCall};

/// The PostgreSQL schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// A store backed by a PostgreSQL connection pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Creates the pool. Connections are opened on first use, so a database that is down
    /// at start-up is reported by the first operation, not here.
    pub async fn connect(url: &str, options: &DatabaseConfig) -> Result<Self, StoreError> {
        let connect = PgConnectOptions::from_str(url).map_err(StoreError::Other)?.application_name("opsagent-audit");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_open_conns)
            .max_lifetime(options.conn_max_lifetime)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(connect);
        Ok(PostgresStore { pool })
    }

    /// Wraps an existing pool (tests, benchmarks).
    pub fn from_pool(pool: PgPool) -> Self {
        PostgresStore { pool }
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
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
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLSTATE classes: 08 connection, 53 resources, 57 operator intervention
            // (shutdown, terminated backend), 58 system; 40001/40P01 serialisation and
            // deadlock are worth a retry. 22 data and 23 integrity are about the rows.
            match &code[..code.len().min(2)] {
                "08" | "53" | "57" | "58" | "40" => StoreError::Unavailable(e),
                "22" | "23" | "54" => StoreError::Rejected(e),
                _ => StoreError::Other(e),
            }
        }
        sqlx::Error::Encode(_) => StoreError::Rejected(e),
        _ => StoreError::Other(e),
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
    attributes)
SELECT u.iid, u.sid, u.uid, u.ep, u.q, u.model, u.prov, u.url, u.cl, u.ans, u.st, u.err, u.http,
    u.at, u.total, u.asst, u.parse, u.tin, u.tout, u.attrs::jsonb
FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::int4[], $14::timestamptz[],
    $15::int8[], $16::int8[], $17::int8[], $18::int8[], $19::int8[], $20::text[])
    AS u(iid, sid, uid, ep, q, model, prov, url, cl, ans, st, err, http, at, total, asst, parse,
         tin, tout, attrs)
ON CONFLICT (interaction_id) DO NOTHING
RETURNING interaction_id";

const INSERT_THOUGHTS: &str = "\
INSERT INTO thoughts (interaction_id, thought, sequence_number, created_at)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::timestamptz[])";

const INSERT_TOOL_CALLS: &str = "\
INSERT INTO tool_calls (interaction_id, tool_name, tool_input, tool_observation, sequence_number,
    duration_ms, thought_sequence_number, error, created_at)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int8[],
    $7::int4[], $8::text[], $9::timestamptz[])";

const INSERT_METRICS: &str = "\
INSERT INTO performance_metrics (interaction_id, metric_name, duration_ms, created_at)
SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::timestamptz[])";

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    #[instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn readiness(&self) -> Result<Readiness, StoreError> {
        let applied: Vec<i64> = match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&self.pool)
            .await
        {
            Ok(v) => v,
            // 42P01: the bookkeeping table does not exist yet, so nothing is applied.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => Vec::new(),
            Err(e) => return Err(classify(e)),
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
            .bind(records.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.total_duration_ms).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.assistant_duration_ms).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.parse_duration_ms).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.input_tokens).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.output_tokens).collect::<Vec<_>>())
            .bind(attributes)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        let inserted: HashSet<Uuid> = inserted.into_iter().collect();
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

        tx.commit().await.map_err(classify)?;
        Ok(summary)
    }

    #[instrument(skip(self))]
    async fn get_interaction(&self, interaction_id: Uuid) -> Result<Interaction, StoreError> {
        let row = sqlx::query(
            "SELECT i.*, s.client_ip, s.user_agent, i.attributes::text AS attributes_text
             FROM interactions i LEFT JOIN sessions s USING (session_id)
             WHERE i.interaction_id = $1",
        )
        .bind(interaction_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .ok_or(StoreError::NotFound)?;
        let mut record = interaction_from_row(&row).map_err(StoreError::Other)?;

        record.thoughts = sqlx::query(
            "SELECT thought, sequence_number FROM thoughts WHERE interaction_id = $1 ORDER BY sequence_number, id",
        )
        .bind(interaction_id)
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
             FROM tool_calls WHERE interaction_id = $1 ORDER BY sequence_number, id",
        )
        .bind(interaction_id)
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
            sqlx::query("SELECT metric_name, duration_ms FROM performance_metrics WHERE interaction_id = $1")
                .bind(interaction_id)
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
        let mut letters: Vec<&DeadLetter> = letters.iter().collect();
        // One row per id: ON CONFLICT cannot touch the same row twice in one statement.
        letters.sort_by_key(|l| l.interaction_id);
        letters.dedup_by_key(|l| l.interaction_id);
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

    async fn list_dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(
            "SELECT interaction_id, record, error, attempts, failed_at FROM dead_letters
             ORDER BY failed_at DESC, id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    interaction_id: row.try_get("interaction_id")?,
                    record: row.try_get("record")?,
                    error: row.try_get("error")?,
                    attempts: row.try_get("attempts")?,
                    failed_at: row.try_get("failed_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::Other)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

fn interaction_from_row(row: &PgRow) -> Result<Interaction, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let attributes: String = row.try_get("attributes_text")?;
    Ok(Interaction {
        interaction_id: row.try_get("interaction_id")?,
        session_id: row.try_get("session_id")?,
        user_id: row.try_get("user_id")?,
        client_ip: row.try_get("client_ip")?,
        user_agent: row.try_get("user_agent")?,
        created_at: row.try_get::<DateTime<Utc>, _>("created_at")?,
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
