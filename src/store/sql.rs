//! The read statements, built once for both dialects.
//!
//! A read is dynamic (any subset of the filters), so its SQL is assembled here with `$N`
//! placeholders (both databases accept them) and a list of [`Param`]s that each backend
//! binds its own way: PostgreSQL gets `timestamptz` and `uuid` values, SQLite the text the
//! schema stores. Where the dialects differ (full-text search, time buckets, percentiles,
//! JSON aggregation of children) the [`Backend`] chooses the fragment; everything else is
//! one text.

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use uuid::Uuid;

use super::filter::{Bucket, Filter, GroupBy, Keyset, StatsRequest};
use super::Backend;
use crate::model::RiskLevel;

/// A value bound to a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
    Time(DateTime<Utc>),
    Uuid(Uuid),
    Date(NaiveDate),
    Float(f64),
}

/// A statement being assembled: its text and the values of `$1…$N`.
#[derive(Debug, Clone)]
pub(crate) struct Sql {
    pub text: String,
    pub params: Vec<Param>,
    backend: Backend,
}

impl Sql {
    pub fn new(backend: Backend) -> Sql {
        Sql { text: String::with_capacity(1024), params: Vec::new(), backend }
    }

    pub fn push(&mut self, text: &str) -> &mut Sql {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder for `param`.
    pub fn bind(&mut self, param: Param) -> &mut Sql {
        self.params.push(param);
        // Writing to a String cannot fail.
        let _ = write!(self.text, "${}", self.params.len());
        self
    }

    /// Appends `AND <each condition of filter>` (the statement must already have a WHERE).
    /// `i` is the alias of `interactions`.
    pub fn filter(&mut self, f: &Filter) -> &mut Sql {
        if let Some(from) = f.from {
            self.push(" AND i.created_at >= ").bind(Param::Time(from));
        }
        if let Some(to) = f.to {
            self.push(" AND i.created_at < ").bind(Param::Time(to));
        }
        for (column, value) in
            [("user_id", &f.user_id), ("model_name", &f.model_name), ("provider", &f.provider), ("cluster", &f.cluster)]
        {
            if let Some(value) = value {
                self.push(" AND i.").push(column).push(" = ").bind(Param::Text(value.clone()));
            }
        }
        if let Some(session) = f.session_id {
            self.push(" AND i.session_id = ").bind(Param::Uuid(session));
        }
        match f.status.as_slice() {
            [] => {}
            [one] => {
                self.push(" AND i.status = ").bind(Param::Text(one.as_str().into()));
            }
            many => {
                self.push(" AND i.status IN (");
                for (n, status) in many.iter().enumerate() {
                    if n > 0 {
                        self.push(", ");
                    }
                    self.bind(Param::Text(status.as_str().into()));
                }
                self.push(")");
            }
        }
        if let Some(tool) = &f.tool_name {
            self.push(" AND EXISTS (SELECT 1 FROM tool_calls tf WHERE tf.interaction_id = i.interaction_id AND tf.tool_name = ")
                .bind(Param::Text(tool.clone()))
                .push(")");
        }
        if let Some(min) = f.min_duration_ms {
            self.push(" AND i.total_duration_ms >= ").bind(Param::Int(min));
        }
        if let Some(max) = f.max_duration_ms {
            self.push(" AND i.total_duration_ms <= ").bind(Param::Int(max));
        }
        if let Some(min) = f.min_risk.filter(|l| *l > RiskLevel::None) {
            self.push(" AND i.risk_level >= ").bind(Param::Int(min.rank().into()));
        }
        if let Some(text) = &f.text {
            self.text_search(text);
        }
        self
    }

    /// Substring search over question and final answer, case-insensitive.
    fn text_search(&mut self, text: &str) {
        match self.backend {
            // ILIKE is served by the trigram GIN indexes for patterns of 3+ characters.
            Backend::Postgres => {
                let pattern = Param::Text(format!("%{}%", escape_like(text)));
                self.push(" AND (i.question ILIKE ").bind(pattern.clone());
                self.push(" OR i.final_answer ILIKE ").bind(pattern).push(")");
            }
            // The trigram tokenizer indexes every 3-character window, so a quoted phrase
            // of 3+ characters is a substring match; shorter terms have no trigram and
            // fall back to LIKE over the index's own columns.
            Backend::Sqlite if text.chars().count() >= 3 => {
                let phrase = format!("\"{}\"", text.replace('"', "\"\""));
                self.push(" AND i.id IN (SELECT rowid FROM interactions_fts WHERE interactions_fts MATCH ")
                    .bind(Param::Text(phrase))
                    .push(")");
            }
            Backend::Sqlite => {
                let pattern = Param::Text(format!("%{}%", escape_like(text)));
                self.push(" AND (i.question LIKE ").bind(pattern.clone());
                self.push(" ESCAPE '\\' OR i.final_answer LIKE ").bind(pattern).push(" ESCAPE '\\')");
            }
        }
    }

    /// Appends the keyset condition of a newest-first page ordered by `position` (the
    /// `(time, id)` columns): only rows older than `keyset`, the last row of the page before.
    pub fn before(&mut self, position: &str, keyset: Option<Keyset>) -> &mut Sql {
        if let Some(k) = keyset {
            self.push(" AND ").push(position).push(" < (").bind(Param::Time(k.created_at));
            self.push(", ").bind(Param::Int(k.id)).push(")");
        }
        self
    }
}

/// Escapes LIKE's wildcards so the text matches literally (backslash is the escape
/// character: PostgreSQL's default, SQLite's by `ESCAPE '\'`).
fn escape_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The columns of an interaction row, `i` being `interactions` and `s` its session.
const INTERACTION_COLUMNS: &str = "\
i.id, CAST(i.interaction_id AS TEXT) AS interaction_id, CAST(i.session_id AS TEXT) AS session_id,
    i.user_id, s.client_ip, s.user_agent, i.created_at, i.endpoint, i.question, i.model_name,
    i.provider, i.base_url, i.cluster, i.final_answer, i.status, i.error, i.http_status,
    i.total_duration_ms, i.assistant_duration_ms, i.parse_duration_ms, i.input_tokens,
    i.output_tokens, CAST(i.attributes AS TEXT) AS attributes, CAST(i.risk_level AS INTEGER) AS risk_level,
    i.risk_flagged";

/// An interaction's children as JSON text, one correlated subquery each (index reads by
/// `interaction_id`), so a full record is one row and an export one streamed statement.
fn children_columns(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "\
(SELECT coalesce(json_agg(json_build_object('content', coalesce(th.thought, ''),
        'sequence_number', th.sequence_number) ORDER BY th.sequence_number, th.id), '[]')::text
    FROM thoughts th WHERE th.interaction_id = i.interaction_id) AS thoughts,
(SELECT coalesce(json_agg(json_build_object('tool_name', t.tool_name, 'tool_input', t.tool_input,
        'tool_observation', t.tool_observation, 'sequence_number', t.sequence_number,
        'duration_ms', t.duration_ms, 'thought_sequence_number', t.thought_sequence_number,
        'error', t.error, 'risk_level', CASE t.risk_level WHEN 1 THEN 'low' WHEN 2 THEN 'medium'
        WHEN 3 THEN 'high' WHEN 4 THEN 'critical' ELSE 'none' END, 'risk_rule', t.risk_rule)
        ORDER BY t.sequence_number, t.id), '[]')::text
    FROM tool_calls t WHERE t.interaction_id = i.interaction_id) AS tool_calls,
(SELECT coalesce(json_object_agg(m.metric_name, m.duration_ms), '{}')::text
    FROM performance_metrics m WHERE m.interaction_id = i.interaction_id) AS metrics"
        }
        Backend::Sqlite => {
            "\
(SELECT coalesce(json_group_array(json_object('content', coalesce(th.thought, ''),
        'sequence_number', th.sequence_number) ORDER BY th.sequence_number, th.id), '[]')
    FROM thoughts th WHERE th.interaction_id = i.interaction_id) AS thoughts,
(SELECT coalesce(json_group_array(json_object('tool_name', t.tool_name, 'tool_input', t.tool_input,
        'tool_observation', t.tool_observation, 'sequence_number', t.sequence_number,
        'duration_ms', t.duration_ms, 'thought_sequence_number', t.thought_sequence_number,
        'error', t.error, 'risk_level', CASE t.risk_level WHEN 1 THEN 'low' WHEN 2 THEN 'medium'
        WHEN 3 THEN 'high' WHEN 4 THEN 'critical' ELSE 'none' END, 'risk_rule', t.risk_rule)
        ORDER BY t.sequence_number, t.id), '[]')
    FROM tool_calls t WHERE t.interaction_id = i.interaction_id) AS tool_calls,
(SELECT coalesce(json_group_object(m.metric_name, m.duration_ms), '{}')
    FROM performance_metrics m WHERE m.interaction_id = i.interaction_id) AS metrics"
        }
    }
}

/// Full records (a row of `rows::FullRow`) matching `where_` (`i`: interactions).
fn full_records(backend: Backend) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push("SELECT ").push(INTERACTION_COLUMNS).push(",\n").push(children_columns(backend));
    sql.push("\nFROM interactions i LEFT JOIN sessions s ON s.session_id = i.session_id WHERE true");
    sql
}

/// One interaction in full, by id.
pub(crate) fn select_interaction(backend: Backend, id: Uuid) -> Sql {
    let mut sql = full_records(backend);
    sql.push(" AND i.interaction_id = ").bind(Param::Uuid(id));
    sql
}

/// Every interaction matching `filter` in full, oldest first (an export).
pub(crate) fn select_export(backend: Backend, filter: &Filter) -> Sql {
    let mut sql = full_records(backend);
    sql.filter(filter).push(" ORDER BY i.created_at, i.id");
    sql
}

/// A session's interactions in full, oldest first, at most `limit`.
pub(crate) fn select_session_interactions(backend: Backend, session_id: Uuid, limit: u32) -> Sql {
    let mut sql = full_records(backend);
    sql.push(" AND i.session_id = ").bind(Param::Uuid(session_id));
    sql.push(" ORDER BY i.created_at, i.id LIMIT ").bind(Param::Int(limit.into()));
    sql
}

/// How many interactions match `filter`.
pub(crate) fn select_count(backend: Backend, filter: &Filter) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push("SELECT count(*) AS n FROM interactions i WHERE true").filter(filter);
    sql
}

/// A session's row.
pub(crate) fn select_session(backend: Backend, session_id: Uuid) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push(
        "SELECT CAST(s.session_id AS TEXT) AS session_id, s.user_id, s.client_ip, s.user_agent, s.created_at,
    (SELECT count(*) FROM interactions i WHERE i.session_id = s.session_id) AS interaction_count
FROM sessions s WHERE s.session_id = ",
    )
    .bind(Param::Uuid(session_id));
    sql
}

/// A newest-first page of summaries (rows of `rows::SummaryRow`).
pub(crate) fn select_page(backend: Backend, filter: &Filter, after: Option<Keyset>, limit: u32) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push(
        "SELECT i.id, CAST(i.interaction_id AS TEXT) AS interaction_id, CAST(i.session_id AS TEXT) AS session_id,
    i.user_id, i.created_at, i.endpoint, i.question, i.model_name, i.provider, i.cluster,
    i.final_answer, i.status, i.error, i.http_status, i.total_duration_ms, i.input_tokens,
    i.output_tokens,
    (SELECT count(*) FROM tool_calls t WHERE t.interaction_id = i.interaction_id) AS tool_call_count,
    (SELECT count(*) FROM thoughts th WHERE th.interaction_id = i.interaction_id) AS thought_count,
    CAST(i.risk_level AS INTEGER) AS risk_level, i.risk_flagged
FROM interactions i WHERE true",
    );
    sql.filter(filter).before("(i.created_at, i.id)", after);
    sql.push(" ORDER BY i.created_at DESC, i.id DESC LIMIT ").bind(Param::Int(limit.into()));
    sql
}

/// Dead letters, newest first, strictly before `before` (`failed_at`, `id`) when given.
pub(crate) fn select_dead_letters(backend: Backend, before: Option<Keyset>, limit: u32) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push(
        "SELECT d.id, CAST(d.interaction_id AS TEXT) AS interaction_id, d.record, d.error, d.attempts, d.failed_at
FROM dead_letters d WHERE true",
    );
    sql.before("(d.failed_at, d.id)", before);
    sql.push(" ORDER BY d.failed_at DESC, d.id DESC LIMIT ").bind(Param::Int(limit.into()));
    sql
}

/// A time bucket: the expression computing it per row (`b`), and the one turning a
/// group's `b` into RFC 3339 text. PostgreSQL groups on the truncated timestamp and
/// formats once per group, not once per row.
fn bucket_exprs(backend: Backend, bucket: Option<Bucket>) -> (&'static str, &'static str) {
    const PG_TEXT: &str = "to_char(b, 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";
    match (backend, bucket) {
        (Backend::Postgres, None) => ("CAST(NULL AS TIMESTAMP)", PG_TEXT),
        (Backend::Postgres, Some(Bucket::Hour)) => ("date_trunc('hour', i.created_at AT TIME ZONE 'UTC')", PG_TEXT),
        (Backend::Postgres, Some(Bucket::Day)) => ("date_trunc('day', i.created_at AT TIME ZONE 'UTC')", PG_TEXT),
        (Backend::Sqlite, None) => ("CAST(NULL AS TEXT)", "b"),
        (Backend::Sqlite, Some(Bucket::Hour)) => ("strftime('%Y-%m-%dT%H:00:00Z', i.created_at)", "b"),
        (Backend::Sqlite, Some(Bucket::Day)) => ("strftime('%Y-%m-%dT00:00:00Z', i.created_at)", "b"),
    }
}

/// A stats query (rows of `rows::StatsRowRaw`): the filtered rows projected to
/// (key, bucket, duration, failed, tokens) in `src`, then aggregated in the database.
pub(crate) fn select_stats(backend: Backend, request: &StatsRequest) -> Sql {
    let mut sql = Sql::new(backend);
    let (bucket, bucket_text) = bucket_exprs(backend, request.bucket);
    sql.push("WITH src AS (SELECT ");
    if matches!(request.group_by, GroupBy::ToolName | GroupBy::RiskRule) {
        let key = if request.group_by == GroupBy::ToolName { "t.tool_name" } else { "t.risk_rule" };
        sql.push(key).push(" AS k, ").push(bucket).push(
            " AS b, t.duration_ms AS d, CASE WHEN t.error IS NOT NULL THEN 1 ELSE 0 END AS e,
    CAST(NULL AS BIGINT) AS tin, CAST(NULL AS BIGINT) AS tout
FROM tool_calls t JOIN interactions i ON i.interaction_id = t.interaction_id WHERE true",
        );
        // "Stats of kubectl" means kubectl's calls, not every tool its interactions ran.
        if let Some(tool) = &request.filter.tool_name {
            sql.push(" AND t.tool_name = ").bind(Param::Text(tool.clone()));
        }
        if request.group_by == GroupBy::RiskRule {
            // The calls a rule flagged, at the level asked for (not every call of an
            // interaction that reached it).
            sql.push(" AND t.risk_rule IS NOT NULL");
            if let Some(min) = request.filter.min_risk.filter(|l| *l > RiskLevel::None) {
                sql.push(" AND t.risk_level >= ").bind(Param::Int(min.rank().into()));
            }
        }
    } else {
        sql.push("CAST(i.").push(request.group_by.as_str()).push(" AS TEXT) AS k, ").push(bucket).push(
            " AS b, i.total_duration_ms AS d, CASE WHEN i.status <> 'success' THEN 1 ELSE 0 END AS e,
    i.input_tokens AS tin, i.output_tokens AS tout
FROM interactions i WHERE true",
        );
    }
    sql.filter(&request.filter);
    sql.push(")\n");
    match backend {
        Backend::Postgres => {
            sql.push("SELECT k AS key, ").push(bucket_text).push(
                " AS bucket, count(*) AS count, sum(e) AS error_count,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY d) AS p95_ms,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS p99_ms,
    avg(d)::float8 AS mean_ms, sum(tin)::int8 AS input_tokens, sum(tout)::int8 AS output_tokens
FROM src GROUP BY k, b",
            );
        }
        Backend::Sqlite => {
            // SQLite has no percentile_cont: rank each group's non-null durations (nulls
            // sort last, so ranks 0..n-1 are the values) and interpolate between the two
            // ranks around p·(n−1), exactly as percentile_cont does.
            sql.push("SELECT k AS key, b AS bucket, count(*) AS count, sum(e) AS error_count, ");
            for (p, name) in [("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms")] {
                let pos = format!("({p} * (n - 1))");
                let lo = format!("CAST({pos} AS INTEGER)");
                let _ = write!(
                    sql.text,
                    "CASE WHEN max(n) = 0 THEN NULL ELSE \
                     max(CASE WHEN rn = {lo} THEN d END) + max({pos} - {lo}) * \
                     (coalesce(max(CASE WHEN rn = {lo} + 1 THEN d END), max(CASE WHEN rn = {lo} THEN d END)) \
                     - max(CASE WHEN rn = {lo} THEN d END)) END AS {name},\n    "
                );
            }
            sql.push(
                "avg(d) AS mean_ms, sum(tin) AS input_tokens, sum(tout) AS output_tokens
FROM (SELECT k, b, d, e, tin, tout,
        ROW_NUMBER() OVER (PARTITION BY k, b ORDER BY d IS NULL, d) - 1 AS rn,
        COUNT(d) OVER (PARTITION BY k, b) AS n
    FROM src) GROUP BY k, b",
            );
        }
    }
    // NULLS LAST on both: SQLite sorts NULL first by default, PostgreSQL last, and with
    // `top` the group of rows without a value would be cut on one database only.
    sql.push(" ORDER BY b, count(*) DESC, k NULLS LAST");
    if let Some(top) = request.top {
        sql.push(" LIMIT ").bind(Param::Int(top.into()));
    }
    sql
}

/// The most frequent questions after normalising case and white space.
pub(crate) fn select_frequent_questions(backend: Backend, filter: &Filter, limit: u32) -> Sql {
    let mut sql = Sql::new(backend);
    let normalised = match backend {
        // Fold first, then trim: btrim alone strips only spaces, so a question ending in
        // a newline or starting with a tab would count apart from its plain spelling.
        Backend::Postgres => "lower(btrim(regexp_replace(i.question, '\\s+', ' ', 'g')))",
        // No regexp_replace in SQLite: map the usual white space to spaces and fold runs
        // of up to eight spaces (enough for questions typed by people).
        Backend::Sqlite => {
            "lower(trim(replace(replace(replace(replace(replace(replace(i.question, char(9), ' '), \
             char(10), ' '), char(13), ' '), '    ', ' '), '  ', ' '), '  ', ' ')))"
        }
    };
    sql.push("SELECT ").push(normalised).push(
        " AS question, count(*) AS count, max(i.created_at) AS last_asked
FROM interactions i WHERE true",
    );
    sql.filter(filter);
    sql.push(" GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT ").bind(Param::Int(limit.into()));
    sql
}

/// Midnight (UTC) starting `day`.
pub(crate) fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

/// Midnight (UTC) ending `day`; the last representable day ends at its last instant.
pub(crate) fn day_end(day: NaiveDate) -> DateTime<Utc> {
    day.succ_opt().map_or(DateTime::<Utc>::MAX_UTC, day_start)
}

/// `AND` the interactions (`i`) of the days from `from` to `to`, inclusive.
fn on_days(sql: &mut Sql, from: Option<NaiveDate>, to: Option<NaiveDate>) {
    if let Some(from) = from {
        sql.push(" AND i.created_at >= ").bind(Param::Time(day_start(from)));
    }
    if let Some(to) = to {
        sql.push(" AND i.created_at < ").bind(Param::Time(day_end(to)));
    }
}

/// The chain rows of the days from `from` to `to` (rows of `rows::ChainDayRow`).
pub(crate) fn select_chain_days(backend: Backend, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push(
        "SELECT c.day, c.head, c.blocks, c.records, c.anchor_seq, c.anchor_hash, c.retired_at,
    COALESCE(l.records, 0) AS legacy_records
FROM chain_days c LEFT JOIN chain_legacy l ON l.day = c.day WHERE true",
    );
    if let Some(from) = from {
        sql.push(" AND c.day >= ").bind(Param::Date(from));
    }
    if let Some(to) = to {
        sql.push(" AND c.day <= ").bind(Param::Date(to));
    }
    sql.push(" ORDER BY c.day");
    sql
}

/// The UTC days that have interactions, with counts (rows of `rows::DayCountRow`).
pub(crate) fn select_record_days(backend: Backend, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Sql {
    let mut sql = Sql::new(backend);
    // Both group on a value of the time index's leading column: PostgreSQL reads the
    // index alone; SQLite's text times start with the day.
    let day = match backend {
        Backend::Postgres => "(i.created_at AT TIME ZONE 'UTC')::date",
        Backend::Sqlite => "substr(i.created_at, 1, 10)",
    };
    sql.push("SELECT ").push(day).push(" AS day, count(*) AS n FROM interactions i WHERE true");
    on_days(&mut sql, from, to);
    sql.push(" GROUP BY 1 ORDER BY 1");
    sql
}

/// Blocks of a day after a seq (rows of `rows::ChainBlockRow`).
pub(crate) fn select_chain_blocks(backend: Backend, day: NaiveDate, after_seq: i64, limit: u32) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push(
        "SELECT day, seq, CAST(block_id AS TEXT) AS block_id, prev_hash, root, hash, record_count, leaves
FROM chain_blocks WHERE day = ",
    )
    .bind(Param::Date(day));
    sql.push(" AND seq > ").bind(Param::Int(after_seq));
    sql.push(" ORDER BY seq LIMIT ").bind(Param::Int(limit.into()));
    sql
}

/// The interactions of one block in full, by id.
pub(crate) fn select_block_records(backend: Backend, block_id: Uuid) -> Sql {
    let mut sql = full_records(backend);
    sql.push(" AND i.chain_block = ").bind(Param::Uuid(block_id));
    sql.push(" ORDER BY i.interaction_id");
    sql
}

/// Every interaction of a day with its block (rows of `rows::LinkRow`).
pub(crate) fn select_day_links(backend: Backend, day: NaiveDate) -> Sql {
    let mut sql = Sql::new(backend);
    sql.push(
        "SELECT CAST(i.interaction_id AS TEXT) AS interaction_id, CAST(i.chain_block AS TEXT) AS chain_block
FROM interactions i WHERE true",
    );
    on_days(&mut sql, Some(day), Some(day));
    sql
}

/// `sql` with its values written in as PostgreSQL literals, for statements that take no
/// parameters (`COPY (…) TO STDOUT`, the baseline of `bench query`). Never used with
/// values from a request.
pub(crate) fn postgres_literal(sql: &Sql) -> String {
    let mut text = sql.text.clone();
    // Highest first, so `$1` does not match the start of `$12`.
    for (n, param) in sql.params.iter().enumerate().rev() {
        let literal = match param {
            Param::Text(v) => format!("'{}'", v.replace('\'', "''")),
            Param::Int(v) => v.to_string(),
            Param::Time(v) => format!("'{}'::timestamptz", v.to_rfc3339()),
            Param::Uuid(v) => format!("'{v}'::uuid"),
            Param::Date(v) => format!("'{v}'::date"),
            Param::Float(v) => format!("{v:?}::float8"),
        };
        text = text.replace(&format!("${}", n + 1), &literal);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(escape_like(r"100%_a\b"), r"100\%\_a\\b");
    }

    #[test]
    fn placeholders_are_numbered_in_bind_order() {
        let filter = Filter { user_id: Some("alice".into()), min_duration_ms: Some(5), ..Filter::default() };
        let sql = select_page(Backend::Postgres, &filter, None, 10);
        assert!(sql.text.contains("i.user_id = $1"), "{}", sql.text);
        assert!(sql.text.contains("i.total_duration_ms >= $2"), "{}", sql.text);
        assert!(sql.text.ends_with("LIMIT $3"), "{}", sql.text);
        assert_eq!(sql.params, vec![Param::Text("alice".into()), Param::Int(5), Param::Int(10)]);
    }
}
