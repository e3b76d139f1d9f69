//! Rows read back from either database, mapped once.
//!
//! The SQL here is written in the subset both dialects accept: `$1` placeholders (SQLite
//! reads `$N` as parameter N), and ids and JSON selected `CAST(… AS TEXT)` so one row
//! type decodes from PostgreSQL's `uuid`/`jsonb` and SQLite's `TEXT` alike. Each backend
//! binds the id its own way (a `uuid`, or its text) and runs these statements; the
//! conversion into [`Interaction`] and [`DeadLetter`], with its checks, happens here.
//! A stored value that does not parse is a [`StoreError::Decode`], never another value.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{DeadLetter, StoreError};
use crate::model::{Interaction, Status, Thought, ToolCall};

/// One interaction with its session's client details, by `interaction_id` ($1).
pub const SELECT_INTERACTION: &str = "\
SELECT CAST(i.interaction_id AS TEXT) AS interaction_id, CAST(i.session_id AS TEXT) AS session_id,
    i.user_id, s.client_ip, s.user_agent, i.created_at, i.endpoint, i.question, i.model_name,
    i.provider, i.base_url, i.cluster, i.final_answer, i.status, i.error, i.http_status,
    i.total_duration_ms, i.assistant_duration_ms, i.parse_duration_ms, i.input_tokens,
    i.output_tokens, CAST(i.attributes AS TEXT) AS attributes
FROM interactions i LEFT JOIN sessions s ON s.session_id = i.session_id
WHERE i.interaction_id = $1";

/// An interaction's thoughts in order ($1: `interaction_id`).
pub const SELECT_THOUGHTS: &str = "\
SELECT thought, sequence_number FROM thoughts WHERE interaction_id = $1 ORDER BY sequence_number, id";

/// An interaction's tool calls in order ($1: `interaction_id`).
pub const SELECT_TOOL_CALLS: &str = "\
SELECT tool_name, tool_input, tool_observation, sequence_number, duration_ms, thought_sequence_number, error
FROM tool_calls WHERE interaction_id = $1 ORDER BY sequence_number, id";

/// An interaction's performance metrics ($1: `interaction_id`).
pub const SELECT_METRICS: &str = "\
SELECT metric_name, duration_ms FROM performance_metrics WHERE interaction_id = $1";

/// The newest dead letters ($1: limit).
pub const SELECT_DEAD_LETTERS: &str = "\
SELECT CAST(interaction_id AS TEXT) AS interaction_id, record, error, attempts, failed_at
FROM dead_letters ORDER BY failed_at DESC, id DESC LIMIT $1";

/// The migrations recorded as applied.
pub const SELECT_APPLIED_MIGRATIONS: &str = "SELECT version FROM _sqlx_migrations WHERE success";

/// Number of interactions.
pub const COUNT_INTERACTIONS: &str = "SELECT count(*) FROM interactions";

/// A row of [`SELECT_INTERACTION`].
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct InteractionRow {
    pub interaction_id: String,
    pub session_id: String,
    pub user_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub endpoint: Option<String>,
    pub question: String,
    pub model_name: Option<String>,
    pub provider: Option<String>,
    pub base_url: Option<String>,
    pub cluster: Option<String>,
    pub final_answer: Option<String>,
    pub status: String,
    pub error: Option<String>,
    pub http_status: Option<i32>,
    pub total_duration_ms: Option<i64>,
    pub assistant_duration_ms: Option<i64>,
    pub parse_duration_ms: Option<i64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub attributes: String,
}

/// A row of [`SELECT_THOUGHTS`].
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct ThoughtRow {
    pub thought: Option<String>,
    pub sequence_number: i32,
}

/// A row of [`SELECT_TOOL_CALLS`].
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct ToolCallRow {
    pub tool_name: String,
    pub tool_input: String,
    pub tool_observation: Option<String>,
    pub sequence_number: i32,
    pub duration_ms: Option<i64>,
    pub thought_sequence_number: Option<i32>,
    pub error: Option<String>,
}

/// A row of [`SELECT_METRICS`].
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct MetricRow {
    pub metric_name: String,
    pub duration_ms: i64,
}

/// A row of [`SELECT_DEAD_LETTERS`].
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct DeadLetterRow {
    pub interaction_id: String,
    pub record: String,
    pub error: String,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
}

fn uuid(column: &'static str, text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::Decode { column, message: format!("`{text}`: {e}") })
}

impl TryFrom<InteractionRow> for Interaction {
    type Error = StoreError;

    fn try_from(row: InteractionRow) -> Result<Interaction, StoreError> {
        let status = Status::parse(&row.status).ok_or_else(|| StoreError::Decode {
            column: "interactions.status",
            message: format!("`{}` is not a known status", row.status),
        })?;
        let attributes = serde_json::from_str(&row.attributes)
            .map_err(|e| StoreError::Decode { column: "interactions.attributes", message: e.to_string() })?;
        Ok(Interaction {
            interaction_id: uuid("interactions.interaction_id", &row.interaction_id)?,
            session_id: uuid("interactions.session_id", &row.session_id)?,
            user_id: row.user_id,
            client_ip: row.client_ip,
            user_agent: row.user_agent,
            created_at: row.created_at,
            endpoint: row.endpoint,
            question: row.question,
            model_name: row.model_name,
            provider: row.provider,
            base_url: row.base_url,
            cluster: row.cluster,
            thoughts: Vec::new(),
            tool_calls: Vec::new(),
            final_answer: row.final_answer,
            status,
            error: row.error,
            http_status: row.http_status,
            total_duration_ms: row.total_duration_ms,
            assistant_duration_ms: row.assistant_duration_ms,
            parse_duration_ms: row.parse_duration_ms,
            metrics: BTreeMap::new(),
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            attributes,
        })
    }
}

impl From<ThoughtRow> for Thought {
    fn from(row: ThoughtRow) -> Thought {
        Thought { content: row.thought.unwrap_or_default(), sequence_number: row.sequence_number }
    }
}

impl From<ToolCallRow> for ToolCall {
    fn from(row: ToolCallRow) -> ToolCall {
        ToolCall {
            tool_name: row.tool_name,
            tool_input: row.tool_input,
            tool_observation: row.tool_observation,
            sequence_number: row.sequence_number,
            duration_ms: row.duration_ms,
            thought_sequence_number: row.thought_sequence_number,
            error: row.error,
        }
    }
}

impl TryFrom<DeadLetterRow> for DeadLetter {
    type Error = StoreError;

    fn try_from(row: DeadLetterRow) -> Result<DeadLetter, StoreError> {
        Ok(DeadLetter {
            interaction_id: uuid("dead_letters.interaction_id", &row.interaction_id)?,
            record: row.record,
            error: row.error,
            attempts: row.attempts,
            failed_at: row.failed_at,
        })
    }
}

/// Puts an interaction row and its children together.
pub fn assemble(
    row: InteractionRow,
    thoughts: Vec<ThoughtRow>,
    tool_calls: Vec<ToolCallRow>,
    metrics: Vec<MetricRow>,
) -> Result<Interaction, StoreError> {
    let mut record = Interaction::try_from(row)?;
    record.thoughts = thoughts.into_iter().map(Thought::from).collect();
    record.tool_calls = tool_calls.into_iter().map(ToolCall::from).collect();
    record.metrics = metrics.into_iter().map(|m| (m.metric_name, m.duration_ms)).collect();
    Ok(record)
}

/// Reads one interaction in full with the shared statements; `$pool` is the backend's
/// pool, `$id` the id bound as the backend stores it, `$classify` its error mapping.
/// A macro rather than a generic function: sqlx's executor bounds over two databases
/// would be longer than the four statements they abstract.
macro_rules! read_interaction {
    ($pool:expr, $id:expr, $classify:expr) => {{
        use $crate::store::rows;
        let row = sqlx::query_as::<_, rows::InteractionRow>(rows::SELECT_INTERACTION)
            .bind($id)
            .fetch_optional($pool)
            .await
            .map_err($classify)?
            .ok_or($crate::store::StoreError::NotFound)?;
        let thoughts = sqlx::query_as::<_, rows::ThoughtRow>(rows::SELECT_THOUGHTS)
            .bind($id)
            .fetch_all($pool)
            .await
            .map_err($classify)?;
        let tool_calls = sqlx::query_as::<_, rows::ToolCallRow>(rows::SELECT_TOOL_CALLS)
            .bind($id)
            .fetch_all($pool)
            .await
            .map_err($classify)?;
        let metrics = sqlx::query_as::<_, rows::MetricRow>(rows::SELECT_METRICS)
            .bind($id)
            .fetch_all($pool)
            .await
            .map_err($classify)?;
        rows::assemble(row, thoughts, tool_calls, metrics)
    }};
}
pub(crate) use read_interaction;

/// Reads the newest dead letters with the shared statement.
macro_rules! read_dead_letters {
    ($pool:expr, $limit:expr, $classify:expr) => {{
        use $crate::store::rows;
        sqlx::query_as::<_, rows::DeadLetterRow>(rows::SELECT_DEAD_LETTERS)
            .bind(i64::from($limit))
            .fetch_all($pool)
            .await
            .map_err($classify)?
            .into_iter()
            .map($crate::store::DeadLetter::try_from)
            .collect()
    }};
}
pub(crate) use read_dead_letters;
