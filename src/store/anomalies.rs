//! The `anomalies` table: what the background detection found, one row per kind, scope
//! and window (a rerun over the same hours adds nothing).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::filter::{Keyset, Page};
use super::read::{paginate, Fetch};
use super::sql::{Param, Sql};
use super::StoreError;

/// What kind of unusual behaviour an anomaly is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// Share of failed interactions far above the series' own baseline.
    ErrorRate,
    /// p95 duration far above the baseline.
    Latency,
    /// Requests in the hour far above the same hour on baseline days.
    Volume,
    /// Share of failed calls of a tool far above its baseline.
    ToolFailureRate,
    /// A user's first high- or critical-risk action.
    FirstHighRisk,
    /// A tool called for the first time.
    NewTool,
    /// A user active at an hour of day they never are.
    UnusualHour,
}

impl AnomalyKind {
    /// Every kind.
    pub const ALL: [AnomalyKind; 7] = [
        AnomalyKind::ErrorRate,
        AnomalyKind::Latency,
        AnomalyKind::Volume,
        AnomalyKind::ToolFailureRate,
        AnomalyKind::FirstHighRisk,
        AnomalyKind::NewTool,
        AnomalyKind::UnusualHour,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::ErrorRate => "error_rate",
            AnomalyKind::Latency => "latency",
            AnomalyKind::Volume => "volume",
            AnomalyKind::ToolFailureRate => "tool_failure_rate",
            AnomalyKind::FirstHighRisk => "first_high_risk",
            AnomalyKind::NewTool => "new_tool",
            AnomalyKind::UnusualHour => "unusual_hour",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<AnomalyKind> {
        AnomalyKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// An anomaly as detected, before it is stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewAnomaly {
    /// What it is.
    pub kind: AnomalyKind,
    /// Whose: `model:…`, `user:…`, `cluster:…` or `tool:…`.
    pub scope: String,
    /// Start of the hour it was found in (UTC).
    pub window_start: DateTime<Utc>,
    /// End of that hour.
    pub window_end: DateTime<Utc>,
    /// Robust score (scaled MADs above the baseline median; 0 for first-time kinds).
    pub score: f64,
    /// The hour's value (rate, milliseconds, requests).
    pub value: f64,
    /// The baseline's typical value.
    pub baseline: f64,
    /// A sentence for people.
    pub detail: String,
}

/// A stored anomaly.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Anomaly {
    /// Storage id.
    pub id: i64,
    /// What was found.
    #[serde(flatten)]
    pub anomaly: NewAnomaly,
    /// When the job found it.
    pub detected_at: DateTime<Utc>,
}

#[derive(Debug, sqlx::FromRow)]
struct AnomalyRow {
    id: i64,
    kind: String,
    scope: String,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    score: f64,
    value: f64,
    baseline: f64,
    detail: String,
    detected_at: DateTime<Utc>,
}

#[derive(Debug, sqlx::FromRow)]
struct IdRow {
    #[allow(dead_code)]
    id: i64,
}

impl AnomalyRow {
    fn into_anomaly(self) -> Result<(Anomaly, Keyset), StoreError> {
        let kind = AnomalyKind::parse(&self.kind).ok_or_else(|| StoreError::Decode {
            column: "anomalies.kind",
            message: format!("`{}` is not a known kind", self.kind),
        })?;
        let keyset = Keyset { created_at: self.window_start, id: self.id };
        let anomaly = Anomaly {
            id: self.id,
            anomaly: NewAnomaly {
                kind,
                scope: self.scope,
                window_start: self.window_start,
                window_end: self.window_end,
                score: self.score,
                value: self.value,
                baseline: self.baseline,
                detail: self.detail,
            },
            detected_at: self.detected_at,
        };
        Ok((anomaly, keyset))
    }
}

/// Stores `anomalies`, skipping those already stored (same kind, scope and window);
/// returns the ones that are new.
pub(crate) async fn write(db: &impl Fetch, anomalies: &[NewAnomaly]) -> Result<Vec<NewAnomaly>, StoreError> {
    let mut fresh = Vec::new();
    let now = Utc::now();
    for a in anomalies {
        let mut sql = Sql::new(db.dialect());
        sql.push(
            "INSERT INTO anomalies (kind, scope, window_start, window_end, score, value, baseline, detail, detected_at)
VALUES (",
        );
        sql.bind(Param::Text(a.kind.as_str().into())).push(", ");
        sql.bind(Param::Text(a.scope.clone())).push(", ");
        sql.bind(Param::Time(a.window_start)).push(", ");
        sql.bind(Param::Time(a.window_end)).push(", ");
        sql.bind(Param::Float(a.score)).push(", ");
        sql.bind(Param::Float(a.value)).push(", ");
        sql.bind(Param::Float(a.baseline)).push(", ");
        sql.bind(Param::Text(a.detail.clone())).push(", ");
        sql.bind(Param::Time(now));
        sql.push(") ON CONFLICT (kind, scope, window_start) DO NOTHING RETURNING id");
        let rows: Vec<IdRow> = db.fetch_all(sql).await?;
        if !rows.is_empty() {
            fresh.push(a.clone());
        }
    }
    Ok(fresh)
}

/// Anomalies newest first (by window), strictly before `before` when given.
pub(crate) async fn list(db: &impl Fetch, before: Option<Keyset>, limit: u32) -> Result<Page<Anomaly>, StoreError> {
    let mut sql = Sql::new(db.dialect());
    sql.push(
        "SELECT a.id, a.kind, a.scope, a.window_start, a.window_end, a.score, a.value, a.baseline, a.detail,
    a.detected_at
FROM anomalies a WHERE true",
    );
    sql.before("(a.window_start, a.id)", before);
    sql.push(" ORDER BY a.window_start DESC, a.id DESC LIMIT ").bind(Param::Int(i64::from(limit) + 1));
    let rows: Vec<AnomalyRow> = db.fetch_all(sql).await?;
    paginate(rows.into_iter().map(AnomalyRow::into_anomaly), limit)
}
