//! `retention run [--dry-run] [--days N]`: expires the days older than the retention
//! period (archiving them first when `audit.retention.archive_dir` is set) and prints one
//! line per day and a summary. `--dry-run` prints what would go and touches nothing.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};

use crate::config::Config;
use crate::retention::{self, RetentionReport, RunOptions};
use crate::store::Store;

/// `retention` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum RetentionCommand {
    /// Delete (and archive, when configured) the days older than the retention period.
    Run(RetentionRunArgs),
}

/// `retention run` options.
#[derive(Debug, Clone, Default, Args)]
pub struct RetentionRunArgs {
    /// Print what would be deleted; write and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep this many days instead of `audit.retention.days`.
    #[arg(long, value_name = "N")]
    pub days: Option<u32>,
}

/// Runs `retention run`.
pub async fn run_retention(store: Arc<dyn Store>, config: &Config, args: RetentionRunArgs) -> anyhow::Result<()> {
    let days = args.days.unwrap_or(config.retention.days);
    let mut out = std::io::stdout().lock();
    if days == 0 {
        writeln!(out, "retention.days is 0: records are kept forever, nothing to do")?;
        return Ok(());
    }
    let plan = retention::plan(store.as_ref(), days, Utc::now()).await.context("planning retention")?;
    writeln!(
        out,
        "keeping {days} days: {} day(s) before {} expire, {} interactions{}",
        plan.days.len(),
        plan.cutoff,
        plan.records(),
        if args.dry_run { " (dry run: nothing is written or deleted)" } else { "" }
    )?;
    out.flush()?;
    let options = RunOptions {
        archive_dir: config.retention.archive_dir.clone(),
        dry_run: args.dry_run,
        batch_size: config.retention.batch_size,
    };
    let report = retention::run(store.as_ref(), &plan, &options).await;
    print_report(&mut out, &report)?;
    out.flush()?;
    report.into_result().context("retention run")?;
    Ok(())
}

fn print_report(out: &mut impl Write, report: &RetentionReport) -> std::io::Result<()> {
    if report.days.is_empty() {
        return Ok(());
    }
    writeln!(out, "{:<10} {:>9} {:>9} {:>8} {:>12}  archive", "day", "records", "deleted", "seconds", "archive MiB")?;
    for day in &report.days {
        let (mib, file) = match &day.archive {
            Some(a) => (format!("{:.2}", a.bytes as f64 / (1 << 20) as f64), a.path.display().to_string()),
            None => ("-".into(), if report.dry_run { "(dry run)".into() } else { "-".into() }),
        };
        writeln!(
            out,
            "{:<10} {:>9} {:>9} {:>8.2} {:>12}  {file}",
            day.day.to_string(),
            day.records,
            day.deleted,
            day.duration.as_secs_f64(),
            mib
        )?;
    }
    let verb = if report.dry_run { "would delete" } else { "deleted" };
    let count = if report.dry_run { report.days.iter().map(|d| d.records).sum::<u64>() } else { report.deleted() };
    writeln!(
        out,
        "{verb} {count} interactions (with their thoughts, tool calls and metrics) on {} day(s) in {:.1} s",
        report.days.len(),
        report.duration.as_secs_f64()
    )
}
