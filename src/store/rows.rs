//! Rows read back from either database, mapped once.
//!
//! The statements (built in `sql`) select ids and JSON `CAST(… AS TEXT)` and an
//! interaction's children as JSON text, so one row type decodes from PostgreSQL's
//! `uuid`/`jsonb` and SQLite's `TEXT` alike. The conversion into the public types, with
//! its checks, happens here: a stored value that does not parse is a
//! [`StoreError::Decode`], never another value.

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::chain::{ChainBlock, ChainDay, DayCount, RecordLink};
use super::filter::{FrequentQuestion, InteractionSummary, Keyset, SessionView, StatsRow};
use super::{DeadLetter, StoreError};
use crate::model::{Interaction, RiskLevel, Status};

/// The migrations recorded as applied.
pub const SELECT_APPLIED_MIGRATIONS: &str = "SELECT version FROM _sqlx_migrations WHERE success";

/// An interaction in full: its columns, its session's client details and its children
/// as JSON text.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct FullRow {
    pub id: i64,
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
    pub risk_level: i32,
    pub risk_flagged: i32,
    pub thoughts: String,
    pub tool_calls: String,
    pub metrics: String,
}

/// An interaction in a list.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct SummaryRow {
    pub id: i64,
    pub interaction_id: String,
    pub session_id: String,
    pub user_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub endpoint: Option<String>,
    pub question: String,
    pub model_name: Option<String>,
    pub provider: Option<String>,
    pub cluster: Option<String>,
    pub final_answer: Option<String>,
    pub status: String,
    pub error: Option<String>,
    pub http_status: Option<i32>,
    pub total_duration_ms: Option<i64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub tool_call_count: i64,
    pub thought_count: i64,
    pub risk_level: i32,
    pub risk_flagged: i32,
}

/// A session's own row.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct SessionRow {
    pub session_id: String,
    pub user_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub interaction_count: i64,
}

/// One group of a stats query; the bucket is RFC 3339 text in both dialects.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct StatsRowRaw {
    pub key: Option<String>,
    pub bucket: Option<String>,
    pub count: i64,
    pub error_count: Option<i64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
}

/// A normalised question and how often it was asked.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct QuestionRow {
    pub question: String,
    pub count: i64,
    pub last_asked: DateTime<Utc>,
}

/// A count.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct CountRow {
    pub n: i64,
}

/// One offending item of a consistency inspection, named.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct ExampleRow {
    pub example: String,
}

/// A dead letter.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct DeadLetterRow {
    pub id: i64,
    pub interaction_id: String,
    pub record: String,
    pub error: String,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
}

/// A day's chain row.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct ChainDayRow {
    pub day: NaiveDate,
    pub head: Vec<u8>,
    pub blocks: i64,
    pub records: i64,
    pub anchor_seq: i64,
    pub anchor_hash: Vec<u8>,
    pub retired_at: Option<DateTime<Utc>>,
    pub legacy_records: i64,
}

/// A block of a day's chain.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct ChainBlockRow {
    pub day: NaiveDate,
    pub seq: i64,
    pub block_id: String,
    pub prev_hash: Vec<u8>,
    pub root: Vec<u8>,
    pub hash: Vec<u8>,
    pub record_count: i64,
    pub leaves: Vec<u8>,
}

/// A day and how many interactions it has.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct DayCountRow {
    pub day: NaiveDate,
    pub n: i64,
}

/// An interaction's id and block.
#[derive(Debug, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct LinkRow {
    pub interaction_id: String,
    pub chain_block: Option<String>,
}

fn uuid(column: &'static str, text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::Decode { column, message: format!("`{text}`: {e}") })
}

fn status(text: &str) -> Result<Status, StoreError> {
    Status::parse(text).ok_or_else(|| StoreError::Decode {
        column: "interactions.status",
        message: format!("`{text}` is not a known status"),
    })
}

fn risk_level(column: &'static str, rank: i32) -> Result<RiskLevel, StoreError> {
    RiskLevel::from_rank(rank.into())
        .ok_or_else(|| StoreError::Decode { column, message: format!("{rank} is not a risk level (0–4)") })
}

fn json<T: serde::de::DeserializeOwned>(column: &'static str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Decode { column, message: e.to_string() })
}

impl TryFrom<FullRow> for Interaction {
    type Error = StoreError;

    fn try_from(row: FullRow) -> Result<Interaction, StoreError> {
        let record = Interaction {
            risk_level: risk_level("interactions.risk_level", row.risk_level)?,
            risk_flagged: row.risk_flagged,
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
            thoughts: json("thoughts", &row.thoughts)?,
            tool_calls: json("tool_calls", &row.tool_calls)?,
            final_answer: row.final_answer,
            status: status(&row.status)?,
            error: row.error,
            http_status: row.http_status,
            total_duration_ms: row.total_duration_ms,
            assistant_duration_ms: row.assistant_duration_ms,
            parse_duration_ms: row.parse_duration_ms,
            metrics: json("performance_metrics", &row.metrics)?,
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            attributes: json("interactions.attributes", &row.attributes)?,
        };
        Ok(record)
    }
}

impl SummaryRow {
    /// The summary and its position in the list.
    pub fn into_summary(self) -> Result<(InteractionSummary, Keyset), StoreError> {
        let row = self;
        let keyset = Keyset { created_at: row.created_at, id: row.id };
        let summary = InteractionSummary {
            interaction_id: uuid("interactions.interaction_id", &row.interaction_id)?,
            session_id: uuid("interactions.session_id", &row.session_id)?,
            user_id: row.user_id,
            created_at: row.created_at,
            endpoint: row.endpoint,
            question: row.question,
            model_name: row.model_name,
            provider: row.provider,
            cluster: row.cluster,
            final_answer: row.final_answer,
            status: status(&row.status)?,
            error: row.error,
            http_status: row.http_status,
            total_duration_ms: row.total_duration_ms,
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            tool_call_count: row.tool_call_count,
            thought_count: row.thought_count,
            risk_level: risk_level("interactions.risk_level", row.risk_level)?,
            risk_flagged: row.risk_flagged,
        };
        Ok((summary, keyset))
    }
}

impl SessionRow {
    /// The session with its interactions.
    pub fn into_view(self, interactions: Vec<Interaction>) -> Result<SessionView, StoreError> {
        Ok(SessionView {
            session_id: uuid("sessions.session_id", &self.session_id)?,
            user_id: self.user_id,
            client_ip: self.client_ip,
            user_agent: self.user_agent,
            created_at: self.created_at,
            interaction_count: self.interaction_count,
            interactions,
        })
    }
}

impl TryFrom<StatsRowRaw> for StatsRow {
    type Error = StoreError;

    fn try_from(row: StatsRowRaw) -> Result<StatsRow, StoreError> {
        let bucket = row
            .bucket
            .map(|text| {
                DateTime::parse_from_rfc3339(&text)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| StoreError::Decode { column: "bucket", message: format!("`{text}`: {e}") })
            })
            .transpose()?;
        let error_count = row.error_count.unwrap_or(0);
        Ok(StatsRow {
            key: row.key,
            bucket,
            count: row.count,
            error_count,
            error_rate: if row.count > 0 { error_count as f64 / row.count as f64 } else { 0.0 },
            p50_ms: row.p50_ms,
            p95_ms: row.p95_ms,
            p99_ms: row.p99_ms,
            mean_ms: row.mean_ms,
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
        })
    }
}

impl From<QuestionRow> for FrequentQuestion {
    fn from(row: QuestionRow) -> FrequentQuestion {
        FrequentQuestion { question: row.question, count: row.count, last_asked: row.last_asked }
    }
}

impl DeadLetterRow {
    /// The dead letter and its position in the newest-first list.
    pub fn into_letter(self) -> Result<(DeadLetter, Keyset), StoreError> {
        let keyset = Keyset { created_at: self.failed_at, id: self.id };
        let letter = DeadLetter {
            interaction_id: uuid("dead_letters.interaction_id", &self.interaction_id)?,
            record: self.record,
            error: self.error,
            attempts: self.attempts,
            failed_at: self.failed_at,
        };
        Ok((letter, keyset))
    }
}

impl From<ChainDayRow> for ChainDay {
    fn from(row: ChainDayRow) -> ChainDay {
        ChainDay {
            day: row.day,
            head: row.head,
            blocks: row.blocks,
            records: row.records,
            anchor_seq: row.anchor_seq,
            anchor_hash: row.anchor_hash,
            retired_at: row.retired_at,
            legacy_records: row.legacy_records,
        }
    }
}

impl TryFrom<ChainBlockRow> for ChainBlock {
    type Error = StoreError;

    fn try_from(row: ChainBlockRow) -> Result<ChainBlock, StoreError> {
        Ok(ChainBlock {
            day: row.day,
            seq: row.seq,
            block_id: uuid("chain_blocks.block_id", &row.block_id)?,
            prev_hash: row.prev_hash,
            root: row.root,
            hash: row.hash,
            record_count: row.record_count,
            leaves: row.leaves,
        })
    }
}

impl From<DayCountRow> for DayCount {
    fn from(row: DayCountRow) -> DayCount {
        DayCount { day: row.day, records: row.n.max(0) as u64 }
    }
}

impl TryFrom<LinkRow> for RecordLink {
    type Error = StoreError;

    fn try_from(row: LinkRow) -> Result<RecordLink, StoreError> {
        Ok(RecordLink {
            interaction_id: uuid("interactions.interaction_id", &row.interaction_id)?,
            chain_block: row.chain_block.as_deref().map(|b| uuid("interactions.chain_block", b)).transpose()?,
        })
    }
}
