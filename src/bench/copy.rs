//! The baseline of `bench ingest`: the same workload loaded with PostgreSQL `COPY`.

use std::time::Instant;

use anyhow::{ensure, Context};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use super::ingest::IngestBenchArgs;
use super::{payload_bytes, PhaseResult, Workload};
use crate::model::Interaction;

/// Loads the same workload with `COPY` into a fresh schema made by the same migration,
/// in one transaction, then drops the schema.
pub(crate) async fn run_copy_baseline(url: &str, args: &IngestBenchArgs) -> anyhow::Result<PhaseResult> {
    let mut conn = PgConnection::connect(url).await.context("connecting for the COPY baseline")?;
    let schema = format!("bench_copy_{}", uuid::Uuid::new_v4().simple());
    conn.execute(format!("CREATE SCHEMA {schema}").as_str()).await?;
    // `public` stays on the path for the extensions the migrations use (pg_trgm).
    conn.execute(format!("SET search_path TO {schema}, public").as_str()).await?;
    let schema_sql = crate::store::postgres::MIGRATOR.iter().map(|m| m.sql.to_string()).collect::<Vec<_>>().join(";\n");
    sqlx::raw_sql(&schema_sql).execute(&mut conn).await.context("creating the baseline schema")?;

    let result = copy_all(&mut conn, args).await;
    conn.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await?;
    conn.close().await?;
    result
}

async fn copy_all(conn: &mut PgConnection, args: &IngestBenchArgs) -> anyhow::Result<PhaseResult> {
    const CHUNK: u64 = 5_000;
    let mut workload = Workload::new(args.seed);
    let mut bytes = 0u64;
    let started = Instant::now();
    let mut tx = conn.begin().await?;
    let mut seen_sessions = std::collections::HashSet::new();
    let mut next = 0u64;
    while next < args.records {
        let end = (next + CHUNK).min(args.records);
        let records: Vec<Interaction> = (next..end).map(|i| workload.record(i)).collect();
        next = end;
        bytes += records.iter().map(|r| payload_bytes(r) as u64).sum::<u64>();
        let mut tables: [String; 5] = Default::default();
        for r in &records {
            if seen_sessions.insert(r.session_id) {
                copy_row(
                    &mut tables[0],
                    &[
                        Some(&r.session_id.to_string()),
                        r.user_id.as_deref(),
                        r.client_ip.as_deref(),
                        r.user_agent.as_deref(),
                        Some(&r.created_at.to_rfc3339()),
                    ],
                );
            }
            let id = r.interaction_id.to_string();
            let at = r.created_at.to_rfc3339();
            let num = |v: Option<i64>| v.map(|v| v.to_string());
            copy_row(
                &mut tables[1],
                &[
                    Some(&id),
                    Some(&r.session_id.to_string()),
                    r.user_id.as_deref(),
                    r.endpoint.as_deref(),
                    Some(&r.question),
                    r.model_name.as_deref(),
                    r.provider.as_deref(),
                    r.base_url.as_deref(),
                    r.cluster.as_deref(),
                    r.final_answer.as_deref(),
                    Some(r.status.as_str()),
                    r.error.as_deref(),
                    num(r.http_status.map(i64::from)).as_deref(),
                    Some(&at),
                    num(r.total_duration_ms).as_deref(),
                    num(r.assistant_duration_ms).as_deref(),
                    num(r.parse_duration_ms).as_deref(),
                    num(r.input_tokens).as_deref(),
                    num(r.output_tokens).as_deref(),
                    Some(&serde_json::Value::Object(r.attributes.clone()).to_string()),
                    Some(&r.risk_level.rank().to_string()),
                    Some(&r.risk_flagged.to_string()),
                ],
            );
            for t in &r.thoughts {
                copy_row(
                    &mut tables[2],
                    &[Some(&id), Some(&t.content), Some(&t.sequence_number.to_string()), Some(&at)],
                );
            }
            for c in &r.tool_calls {
                copy_row(
                    &mut tables[3],
                    &[
                        Some(&id),
                        Some(&c.tool_name),
                        Some(&c.tool_input),
                        c.tool_observation.as_deref(),
                        Some(&c.sequence_number.to_string()),
                        num(c.duration_ms).as_deref(),
                        num(c.thought_sequence_number.map(i64::from)).as_deref(),
                        c.error.as_deref(),
                        Some(&at),
                        Some(&c.risk_level.rank().to_string()),
                        c.risk_rule.as_deref(),
                    ],
                );
            }
            for (name, ms) in &r.metrics {
                copy_row(&mut tables[4], &[Some(&id), Some(name), Some(&ms.to_string()), Some(&at)]);
            }
        }
        let statements = [
            "COPY sessions (session_id, user_id, client_ip, user_agent, created_at) FROM STDIN",
            "COPY interactions (interaction_id, session_id, user_id, endpoint, question, model_name, provider, base_url, cluster, final_answer, status, error, http_status, created_at, total_duration_ms, assistant_duration_ms, parse_duration_ms, input_tokens, output_tokens, attributes, risk_level, risk_flagged) FROM STDIN",
            "COPY thoughts (interaction_id, thought, sequence_number, created_at) FROM STDIN",
            "COPY tool_calls (interaction_id, tool_name, tool_input, tool_observation, sequence_number, duration_ms, thought_sequence_number, error, created_at, risk_level, risk_rule) FROM STDIN",
            "COPY performance_metrics (interaction_id, metric_name, duration_ms, created_at) FROM STDIN",
        ];
        for (statement, data) in statements.iter().zip(tables) {
            if data.is_empty() {
                continue;
            }
            let mut copy = tx.copy_in_raw(statement).await?;
            copy.send(data.into_bytes()).await?;
            copy.finish().await?;
        }
    }
    tx.commit().await?;
    let elapsed = started.elapsed();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM interactions").fetch_one(&mut *conn).await?;
    ensure!(stored as u64 == args.records, "COPY baseline stored {stored} of {} rows", args.records);
    Ok(PhaseResult { records: args.records, elapsed, bytes, p50_us: None, p99_us: None, peak_rss: None })
}

/// Appends one row in COPY's text format (tab-separated, `\N` for NULL).
pub fn copy_row(out: &mut String, fields: &[Option<&str>]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        match field {
            None => out.push_str("\\N"),
            Some(text) => {
                // Copy runs of plain text whole; only the four special bytes are escaped.
                let mut rest = *text;
                while let Some(at) = rest.find(['\\', '\t', '\n', '\r']) {
                    out.push_str(&rest[..at]);
                    out.push_str(match rest.as_bytes()[at] {
                        b'\\' => "\\\\",
                        b'\t' => "\\t",
                        b'\n' => "\\n",
                        _ => "\\r",
                    });
                    rest = &rest[at + 1..];
                }
                out.push_str(rest);
            }
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_the_text_format_specials() {
        let mut out = String::new();
        copy_row(&mut out, &[Some("a\tb\\c\nd\re"), None, Some("plain")]);
        assert_eq!(out, "a\\tb\\\\c\\nd\\re\t\\N\tplain\n");
    }
}
