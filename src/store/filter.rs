//! What a read asks the store for: which interactions ([`Filter`]), where a page starts
//! ([`Keyset`]), how to aggregate ([`GroupBy`], [`Bucket`]), and the shapes that come
//! back. Plain data: parsing from HTTP parameters or the command line is `query`'s job.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::model::{RiskLevel, Status};

/// Which interactions a list, a stats query or an export covers. Every field narrows;
/// the empty filter is everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// `created_at >= from`.
    pub from: Option<DateTime<Utc>>,
    /// `created_at < to`.
    pub to: Option<DateTime<Utc>>,
    /// Who asked.
    pub user_id: Option<String>,
    /// One conversation.
    pub session_id: Option<Uuid>,
    /// The model that answered.
    pub model_name: Option<String>,
    /// The model's provider.
    pub provider: Option<String>,
    /// The cluster worked on.
    pub cluster: Option<String>,
    /// Any of these outcomes (empty: any outcome).
    pub status: Vec<Status>,
    /// Interactions that ran this tool at least once.
    pub tool_name: Option<String>,
    /// `total_duration_ms >= min_duration_ms`.
    pub min_duration_ms: Option<i64>,
    /// `total_duration_ms <= max_duration_ms`.
    pub max_duration_ms: Option<i64>,
    /// Substring of the question or the final answer, case-insensitive, any language.
    pub text: Option<String>,
    /// Interactions whose highest tool-call risk is at least this (`none`: any).
    pub min_risk: Option<RiskLevel>,
}

/// Where a newest-first page starts: strictly after (older than) this row. Lists are
/// ordered by `(created_at, id)` descending, a total order, so a page boundary is exact
/// and rows inserted meanwhile never shift what the next page returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyset {
    /// The last row's `created_at`.
    pub created_at: DateTime<Utc>,
    /// The last row's storage id (the tie-breaker among equal times).
    pub id: i64,
}

/// What stats are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// The model that answered.
    ModelName,
    /// Who asked.
    UserId,
    /// How interactions ended.
    Status,
    /// The cluster worked on.
    Cluster,
    /// The model's provider.
    Provider,
    /// Each tool: its calls, failures and durations (not the interactions').
    ToolName,
    /// Each risk rule: the tool calls it flagged (calls no rule matched are left out).
    RiskRule,
}

impl GroupBy {
    /// Every grouping, in the documented order.
    pub const ALL: [GroupBy; 7] = [
        GroupBy::ModelName,
        GroupBy::UserId,
        GroupBy::Status,
        GroupBy::Cluster,
        GroupBy::Provider,
        GroupBy::ToolName,
        GroupBy::RiskRule,
    ];

    /// The parameter value, which is also the column name.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::ModelName => "model_name",
            GroupBy::UserId => "user_id",
            GroupBy::Status => "status",
            GroupBy::Cluster => "cluster",
            GroupBy::Provider => "provider",
            GroupBy::ToolName => "tool_name",
            GroupBy::RiskRule => "risk_rule",
        }
    }

    /// Parses a parameter value.
    pub fn parse(name: &str) -> Option<GroupBy> {
        GroupBy::ALL.into_iter().find(|g| g.as_str() == name)
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Time buckets of a stats query (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Calendar hours.
    Hour,
    /// Calendar days.
    Day,
}

impl Bucket {
    /// Every bucket size.
    pub const ALL: [Bucket; 2] = [Bucket::Hour, Bucket::Day];

    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }

    /// Parses a parameter value.
    pub fn parse(name: &str) -> Option<Bucket> {
        Bucket::ALL.into_iter().find(|b| b.as_str() == name)
    }
}

/// A stats request: which rows, grouped how.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsRequest {
    /// Which interactions.
    pub filter: Filter,
    /// The grouping column.
    pub group_by: GroupBy,
    /// Time buckets, if any.
    pub bucket: Option<Bucket>,
    /// Keep only the biggest groups by count (per bucket when bucketed).
    pub top: Option<u32>,
}

/// One interaction in a list: every stored column of the interaction itself, without
/// its thoughts, tool calls and metrics (their counts instead), so a page stays small
/// whatever the tools printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InteractionSummary {
    /// The interaction's id.
    pub interaction_id: Uuid,
    /// Its conversation.
    pub session_id: Uuid,
    /// Who asked.
    pub user_id: Option<String>,
    /// When it happened.
    pub created_at: DateTime<Utc>,
    /// The agent endpoint called.
    pub endpoint: Option<String>,
    /// What was asked.
    pub question: String,
    /// The model that answered.
    pub model_name: Option<String>,
    /// The model's provider.
    pub provider: Option<String>,
    /// The cluster worked on.
    pub cluster: Option<String>,
    /// What the agent answered.
    pub final_answer: Option<String>,
    /// How it ended.
    pub status: Status,
    /// The error, when it failed.
    pub error: Option<String>,
    /// The HTTP status answered.
    pub http_status: Option<i32>,
    /// Whole request, in milliseconds.
    pub total_duration_ms: Option<i64>,
    /// Prompt tokens.
    pub input_tokens: Option<i64>,
    /// Completion tokens.
    pub output_tokens: Option<i64>,
    /// How many tools it ran.
    pub tool_call_count: i64,
    /// How many reasoning steps it recorded.
    pub thought_count: i64,
    /// The highest risk level of its tool calls.
    pub risk_level: RiskLevel,
    /// How many of its tool calls were flagged (above `none`).
    pub risk_flagged: i32,
}

/// One page of a newest-first list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The rows, newest first.
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Keyset>,
}

/// One conversation: its session row and its interactions in the order they happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionView {
    /// The session's id.
    pub session_id: Uuid,
    /// Who the session belongs to (its first interaction's user).
    pub user_id: Option<String>,
    /// The client's address.
    pub client_ip: Option<String>,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// When the session started.
    pub created_at: DateTime<Utc>,
    /// How many interactions the session holds in all.
    pub interaction_count: i64,
    /// The interactions, oldest first, in full (at most the limit asked for).
    pub interactions: Vec<crate::model::Interaction>,
}

/// One group (and bucket) of a stats query. Durations are the interactions'
/// `total_duration_ms`, or the tools' `duration_ms` when grouped by tool or risk rule;
/// an error is a status other than `success`, or a tool call with an error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsRow {
    /// The group's value (`null` for rows where the column is empty).
    pub key: Option<String>,
    /// The bucket's start (UTC), when bucketed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<DateTime<Utc>>,
    /// Interactions (or tool calls) in the group.
    pub count: i64,
    /// How many of them failed.
    pub error_count: i64,
    /// `error_count / count`.
    pub error_rate: f64,
    /// Median duration (continuous percentile, as PostgreSQL's `percentile_cont`).
    pub p50_ms: Option<f64>,
    /// 95th percentile duration.
    pub p95_ms: Option<f64>,
    /// 99th percentile duration.
    pub p99_ms: Option<f64>,
    /// Mean duration.
    pub mean_ms: Option<f64>,
    /// Prompt tokens in all (not for tools).
    pub input_tokens: Option<i64>,
    /// Completion tokens in all (not for tools).
    pub output_tokens: Option<i64>,
}

/// A question asked again and again, after normalising case and white space.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrequentQuestion {
    /// The normalised question.
    pub question: String,
    /// How often it was asked.
    pub count: i64,
    /// When it was last asked.
    pub last_asked: DateTime<Utc>,
}
