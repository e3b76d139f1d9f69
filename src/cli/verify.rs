//! `verify`: checks the hash chain of each day and prints one line per day (with the
//! day's head, so it can be kept somewhere the database's writers cannot reach) and a
//! summary. Exits non-zero, naming the first broken record, when anything is broken.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use chrono::{NaiveDate, Utc};
use clap::Args;

use crate::query::time::parse_time;
use crate::store::verify::{self, DayReport, DayStatus, VerifyReport};
use crate::store::Store;

/// `verify` options.
#[derive(Debug, Clone, Default, Args)]
pub struct VerifyArgs {
    /// First day (UTC) to check: 2026-11-01, or any time `query --from` takes (7d) [default: the oldest].
    #[arg(long, value_name = "DAY")]
    pub from: Option<String>,
    /// Last day (UTC) to check, inclusive (same forms as --from) [default: the newest].
    #[arg(long, value_name = "DAY")]
    pub to: Option<String>,
}

/// The day an option names: `YYYY-MM-DD`, or the UTC day of any time `query` accepts.
fn parse_day(option: &str, text: &str) -> anyhow::Result<NaiveDate> {
    if let Ok(day) = NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d") {
        return Ok(day);
    }
    parse_time(text, Utc::now()).map(|t| t.date_naive()).map_err(|e| anyhow::anyhow!("--{option}: {e}"))
}

/// Runs `verify`.
pub async fn run_verify(store: Arc<dyn Store>, args: VerifyArgs) -> anyhow::Result<()> {
    let from = args.from.as_deref().map(|t| parse_day("from", t)).transpose()?;
    let to = args.to.as_deref().map(|t| parse_day("to", t)).transpose()?;
    let report = verify::verify(store.as_ref(), from, to).await.context("verifying the hash chain")?;
    let mut out = std::io::stdout().lock();
    print_report(&mut out, &report)?;
    out.flush()?;
    match report.first_problem() {
        None => Ok(()),
        Some((day, problem)) => anyhow::bail!("verification failed on {day}: {problem}"),
    }
}

fn print_report(out: &mut impl Write, report: &VerifyReport) -> std::io::Result<()> {
    writeln!(out, "{:<10} {:>7} {:>9}  status", "day", "blocks", "records")?;
    let (mut ok, mut retired, mut unchained, mut broken) = (0, 0, 0, 0);
    for day in &report.days {
        let status = match &day.status {
            DayStatus::Ok => {
                ok += 1;
                "OK".to_string()
            }
            DayStatus::Retired { at } => {
                retired += 1;
                format!("retired {}", at.format("%Y-%m-%dT%H:%M:%SZ"))
            }
            DayStatus::Unchained => {
                unchained += 1;
                "unchained (written before the hash chain, or with it off)".to_string()
            }
            DayStatus::Broken(problem) => {
                broken += 1;
                format!("BROKEN: {problem}")
            }
        };
        writeln!(out, "{:<10} {:>7} {:>9}  {status}{}", day.day, day.blocks, day.records, head(day))?;
    }
    writeln!(out, "{} days: {ok} ok, {retired} retired, {unchained} unchained, {broken} broken", report.days.len())
}

fn head(day: &DayReport) -> String {
    day.head.as_ref().map(|h| format!("  head {h}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_as_dates_or_times() {
        assert_eq!(parse_day("from", "2026-11-01").unwrap().to_string(), "2026-11-01");
        assert_eq!(parse_day("from", "2026-11-01T23:59:00Z").unwrap().to_string(), "2026-11-01");
        assert!(parse_day("from", "0d").is_ok());
        assert!(parse_day("to", "someday").unwrap_err().to_string().starts_with("--to: "));
    }
}
