//! `doctor`: prints the consistency report as a table or JSON; exits 1 when a check
//! fails (and was not repaired), 0 otherwise, warnings included.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::config::SpoolConfig;
use crate::doctor::{self, Options, Report, Status};
use crate::store::Store;

/// How the report is printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum DoctorFormat {
    /// A table for a person.
    #[default]
    Table,
    /// One JSON document for a script.
    Json,
}

/// `doctor` options.
#[derive(Debug, Clone, Default, Args)]
pub struct DoctorArgs {
    /// Make the safe repairs: delete orphan child rows, rebuild the SQLite full-text
    /// index, set unreadable spool files aside. Records and chain rows are never touched.
    #[arg(long)]
    pub repair: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = DoctorFormat::Table)]
    pub format: DoctorFormat,
}

/// Runs `doctor`.
pub async fn run_doctor(store: Arc<dyn Store>, spool: &SpoolConfig, args: DoctorArgs) -> anyhow::Result<()> {
    let report = doctor::run(store.as_ref(), spool, Options { repair: args.repair }).await;
    let mut out = std::io::stdout().lock();
    match args.format {
        DoctorFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &report).context("writing the report")?;
            writeln!(out)?;
        }
        DoctorFormat::Table => print_table(&mut out, &report)?,
    }
    out.flush()?;
    let failing: Vec<&str> = report.failing().map(|c| c.name).collect();
    if failing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("doctor: {} failing: {}", failing.len(), failing.join(", "))
    }
}

fn print_table(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    let mut table = super::read::table(&["check", "status", "detail", "repair"]);
    for check in &report.checks {
        let repair = match (check.repairable, check.repaired) {
            (_, true) => "repaired",
            (true, false) if report.repair => "not repaired",
            (true, false) => "--repair",
            (false, false) => "",
        };
        table.add_row(vec![check.name, check.status.as_str(), check.detail.as_str(), repair]);
    }
    writeln!(out, "{table}")?;
    let count = |s: Status| report.checks.iter().filter(|c| c.status == s).count();
    let repaired = report.checks.iter().filter(|c| c.repaired).count();
    writeln!(
        out,
        "{} checks: {} ok, {} warn, {} fail ({repaired} repaired)",
        report.checks.len(),
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    )
}
