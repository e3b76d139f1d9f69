//! Reading the audit log back: the requests an operator makes (list, stats, overview,
//! dead letters) parsed from parameters, run against a [`Store`], and shaped for the
//! HTTP API and the command line alike.
//!
//! Parameters come in as [`Params`] (a query string or command-line options) and are
//! checked here once, so both front ends refuse the same input with the same message.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::export::Format;

use crate::store::{
    Bucket, DeadLetter, Filter, FrequentQuestion, GroupBy, InteractionSummary, Keyset, SessionView, StatsRequest,
    StatsRow, Store, StoreError,
};

pub mod cursor;
pub mod params;
pub mod time;

pub use params::{ParamError, Params};

/// Interactions per page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 50;
/// Most interactions (or dead letters) one page may hold.
pub const MAX_LIMIT: u32 = 500;
/// Interactions of a session returned when `limit` is not given.
pub const DEFAULT_SESSION_LIMIT: u32 = 200;
/// Most interactions of a session one request may return in full.
pub const MAX_SESSION_LIMIT: u32 = 1000;
/// Groups an overview lists per view when `top` is not given.
pub const DEFAULT_TOP: u32 = 10;
/// Most groups a stats query or an overview view may return with `top`.
pub const MAX_TOP: u32 = 1000;

/// A page request: which interactions and where the page starts.
#[derive(Debug, Clone, PartialEq)]
pub struct ListRequest {
    /// Which interactions.
    pub filter: Filter,
    /// Start after this row (from `cursor`).
    pub after: Option<Keyset>,
    /// Page size.
    pub limit: u32,
    /// The instant relative times were resolved against (carried by the next cursor).
    pub now: DateTime<Utc>,
}

impl ListRequest {
    /// Reads a list request; every parameter must be known.
    pub fn from_params(mut params: Params) -> Result<ListRequest, ParamError> {
        let now = params.pin_now();
        let filter = params.take_filter()?;
        let after = params.take_cursor(&filter)?;
        let limit = params.take_limit(DEFAULT_LIMIT, MAX_LIMIT)?;
        params.finish()?;
        Ok(ListRequest { filter, after, limit, now })
    }
}

/// A page of interactions, newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListResponse {
    /// The interactions.
    pub items: Vec<InteractionSummary>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Runs a list request.
pub async fn list(store: &dyn Store, request: &ListRequest) -> Result<ListResponse, StoreError> {
    let page = store.list_interactions(&request.filter, request.after, request.limit).await?;
    Ok(ListResponse {
        items: page.items,
        next_cursor: page.next.map(|k| cursor::encode(k, &request.filter, request.now)),
    })
}

/// Reads the `limit` of a session request.
pub fn session_limit(mut params: Params) -> Result<u32, ParamError> {
    let limit = params.take_limit(DEFAULT_SESSION_LIMIT, MAX_SESSION_LIMIT)?;
    params.finish()?;
    Ok(limit)
}

/// A session and its interactions.
pub async fn session(store: &dyn Store, session_key: &str, limit: u32) -> Result<SessionView, StoreError> {
    store.get_session(crate::model::id_from_key(session_key), limit).await
}

/// A page of dead letters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterPage {
    /// The refused records, newest first.
    pub items: Vec<DeadLetter>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Reads and runs a dead-letter page request (`limit`, `cursor`).
pub async fn dead_letters(store: &dyn Store, mut params: Params) -> Result<DeadLetterPage, QueryError> {
    // Dead letters have no filters: their cursors are bound to the empty filter.
    let unfiltered = Filter::default();
    let now = params.pin_now();
    let before = params.take_cursor(&unfiltered)?;
    let limit = params.take_limit(DEFAULT_LIMIT, MAX_LIMIT)?;
    params.finish()?;
    let page = store.list_dead_letters(before, limit).await?;
    Ok(DeadLetterPage { items: page.items, next_cursor: page.next.map(|k| cursor::encode(k, &unfiltered, now)) })
}

/// A page of anomalies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnomalyPage {
    /// The anomalies, newest window first.
    pub items: Vec<crate::store::Anomaly>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Reads and runs an anomaly page request (`limit`, `cursor`).
pub async fn anomalies(store: &dyn Store, mut params: Params) -> Result<AnomalyPage, QueryError> {
    // No filters: cursors are bound to the empty filter, as for dead letters.
    let unfiltered = Filter::default();
    let now = params.pin_now();
    let before = params.take_cursor(&unfiltered)?;
    let limit = params.take_limit(DEFAULT_LIMIT, MAX_LIMIT)?;
    params.finish()?;
    let page = store.list_anomalies(before, limit).await?;
    Ok(AnomalyPage { items: page.items, next_cursor: page.next.map(|k| cursor::encode(k, &unfiltered, now)) })
}

/// Reads a stats request: the filters, `group_by` (default `model_name`), `bucket`
/// (`hour`, `day`) and `top`.
pub fn stats_request(mut params: Params) -> Result<StatsRequest, ParamError> {
    let filter = params.take_filter()?;
    let group_names: Vec<&str> = GroupBy::ALL.iter().map(|g| g.as_str()).collect();
    let group_by = params.take_choice("group_by", GroupBy::parse, &group_names)?.unwrap_or(GroupBy::ModelName);
    let bucket_names: Vec<&str> = Bucket::ALL.iter().map(|b| b.as_str()).collect();
    let bucket = params.take_choice("bucket", Bucket::parse, &bucket_names)?;
    let top = params.take_int("top", 1, MAX_TOP.into())?.map(|n| n as u32);
    if top.is_some() && bucket.is_some() {
        return Err(ParamError::new("top", "cannot be combined with `bucket`"));
    }
    params.finish()?;
    Ok(StatsRequest { filter, group_by, bucket, top })
}

/// Reads an export request: the filters and `format` (ndjson when not given).
pub fn export_request(mut params: Params) -> Result<(Filter, Format), ParamError> {
    let filter = params.take_filter()?;
    let names: Vec<&str> = Format::ALL.iter().map(|f| f.as_str()).collect();
    let format = params.take_choice("format", |s| s.parse::<Format>().ok(), &names)?.unwrap_or(Format::Ndjson);
    params.finish()?;
    Ok((filter, format))
}

/// Stats as the API returns them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsResponse {
    /// The grouping.
    pub group_by: &'static str,
    /// The bucket size, if bucketed.
    pub bucket: Option<&'static str>,
    /// One row per group (and bucket), by bucket then biggest group first.
    pub rows: Vec<StatsRow>,
}

/// Runs a stats request.
pub async fn stats(store: &dyn Store, request: &StatsRequest) -> Result<StatsResponse, StoreError> {
    Ok(StatsResponse {
        group_by: request.group_by.as_str(),
        bucket: request.bucket.map(Bucket::as_str),
        rows: store.stats(request).await?,
    })
}

/// The first questions an operator asks of the log (seed 8.1), over one filter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    /// Tools by number of calls.
    pub most_used_tools: Vec<StatsRow>,
    /// Tools by number of failed calls (only tools that failed).
    pub most_failing_tools: Vec<StatsRow>,
    /// Tools by 95th percentile duration.
    pub slowest_tools: Vec<StatsRow>,
    /// Users by number of interactions.
    pub busiest_users: Vec<StatsRow>,
    /// Clusters by number of interactions.
    pub busiest_clusters: Vec<StatsRow>,
    /// Questions asked most often.
    pub frequent_questions: Vec<FrequentQuestion>,
}

/// Reads an overview request: the filters and `top`.
pub fn overview_request(mut params: Params) -> Result<(Filter, u32), ParamError> {
    let filter = params.take_filter()?;
    let top = params.take_int("top", 1, MAX_TOP.into())?.map_or(DEFAULT_TOP, |n| n as u32);
    params.finish()?;
    Ok((filter, top))
}

/// Runs an overview: four aggregate queries, each computed by the database.
pub async fn overview(store: &dyn Store, filter: &Filter, top: u32) -> Result<Overview, StoreError> {
    let by = |group_by, top| StatsRequest { filter: filter.clone(), group_by, bucket: None, top };
    // Every tool's row, once; the three tool views are orderings of it. Tools are a
    // short list (the agent's tool set), unlike users or questions.
    let tools = store.stats(&by(GroupBy::ToolName, None)).await?;
    let ranked = |key: &dyn Fn(&StatsRow) -> f64, keep: &dyn Fn(&StatsRow) -> bool| {
        let mut rows: Vec<StatsRow> = tools.iter().filter(|r| keep(r)).cloned().collect();
        rows.sort_by(|a, b| key(b).total_cmp(&key(a)).then_with(|| a.key.cmp(&b.key)));
        rows.truncate(top as usize);
        rows
    };
    Ok(Overview {
        most_used_tools: ranked(&|r| r.count as f64, &|_| true),
        most_failing_tools: ranked(&|r| r.error_count as f64, &|r| r.error_count > 0),
        slowest_tools: ranked(&|r| r.p95_ms.unwrap_or(f64::NEG_INFINITY), &|r| r.p95_ms.is_some()),
        busiest_users: store.stats(&by(GroupBy::UserId, Some(top))).await?,
        busiest_clusters: store.stats(&by(GroupBy::Cluster, Some(top))).await?,
        frequent_questions: store.frequent_questions(filter, top).await?,
    })
}

/// Why a read failed: the request, or the store.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A parameter is wrong.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
