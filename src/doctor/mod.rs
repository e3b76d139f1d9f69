//! `doctor`: consistency checks of the database and the spool, and the repairs that are
//! safe to make.
//!
//! # Checks
//! Each check yields one [`Check`] (ok, warn or fail, with what it saw); a check that
//! cannot run (the database is down, a table is missing) fails with the reason, and the
//! other checks still run.
//! - `migrations`: migrations of this binary the database has not applied (fail).
//! - `orphan thoughts|tool calls|metrics`: child rows whose interaction is gone (fail;
//!   repairable). Foreign keys forbid them, so they appear only when someone bypassed
//!   them (`session_replication_role = replica`, SQLite's per-connection
//!   `foreign_keys` pragma off; this store's pool turns it on).
//! - `empty sessions`: sessions without interactions (warn; retention leaves sessions
//!   alone by design, so this is expected after it runs).
//! - `thought|tool call sequences`: per interaction, sequence numbers that repeat or skip
//!   (warn: agents may legitimately skip; count and first examples).
//! - `interactions without children`: nothing stores how many children a record had
//!   except the record's hash in the chain, which covers its thoughts, tool calls and
//!   metrics. So the evidence is twofold: a child deleted from a chained record changes
//!   its hash and is named by `hash chain` (as `modified`), and a tool call that names a
//!   `thought_sequence_number` with no such thought in its interaction is reported here
//!   (warn: ingest does not refuse a producer's dangling reference either).
//! - `hash chain`: [`verify`](crate::store::verify) over every day (fail naming the
//!   first broken day and record). Reads every record: time grows with the database.
//! - `search index`: SQLite's FTS5 index against the rows (fail; repairable by a
//!   rebuild). PostgreSQL keeps its trigram indexes itself.
//! - `dead letters`: records the database refused, waiting for an operator (warn).
//! - `spool`: segments, records and bytes; segments that cannot be read or are not
//!   segments (fail; repairable: set aside), damaged frames and torn tails (warn: the
//!   server skips or cuts them at its next start), files set aside earlier (warn).
//! - `spool disk`: free space on the spool's filesystem against `spool.max_bytes` (warn
//!   when less is free).
//!
//! # Repairs (`--repair`)
//! Only what cannot lose or alter an audit record: deleting orphan child rows (their
//! interaction is gone; no record or chain row refers to them), rebuilding the SQLite
//! full-text index from the rows, and renaming unreadable spool files `….unreadable`
//! (never deleting them) — only when no server holds the spool's lock. Records that
//! exist and chain rows are never touched: a broken chain is evidence, not damage to fix.
//!
//! # A running server
//! The spool is inspected read-only and its lock is not held: doctor only tests whether
//! a server holds it (a shared lock taken and dropped at once) and says so in the
//! report. The database checks are reads (the hash-chain walk is the one that takes
//! time) and run beside a live server.

use serde::Serialize;

use crate::config::SpoolConfig;
use crate::store::Store;

mod database;
mod spool;

/// Examples named per finding.
const EXAMPLES: u32 = 3;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Nothing wrong.
    Ok,
    /// Worth a look; not a failure (exit status stays 0).
    Warn,
    /// Something is wrong (exit status 1 unless repaired).
    Fail,
}

impl Status {
    /// A fixed short name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Which check (fixed names, see the module docs).
    pub name: &'static str,
    /// The outcome, as found (before any repair).
    pub status: Status,
    /// What was seen, with counts and first examples.
    pub detail: String,
    /// True when `--repair` can fix what was found.
    pub repairable: bool,
    /// True when `--repair` fixed it.
    pub repaired: bool,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, status: Status::Ok, detail: detail.into(), repairable: false, repaired: false }
    }

    fn warn(name: &'static str, detail: impl Into<String>) -> Check {
        Check { status: Status::Warn, ..Check::ok(name, detail) }
    }

    fn fail(name: &'static str, detail: impl Into<String>) -> Check {
        Check { status: Status::Fail, ..Check::ok(name, detail) }
    }

    fn repairable(mut self) -> Check {
        self.repairable = true;
        self
    }

    /// True when this check still fails after the repairs made.
    pub fn is_failing(&self) -> bool {
        self.status == Status::Fail && !self.repaired
    }
}

/// What [`run`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Every check, in the order run.
    pub checks: Vec<Check>,
    /// Whether repairs were asked for.
    pub repair: bool,
}

impl Report {
    /// The check of this name.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Checks that fail and were not repaired.
    pub fn failing(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.is_failing())
    }

    /// True when no check fails (warnings allowed), counting repairs made.
    pub fn is_ok(&self) -> bool {
        self.failing().next().is_none()
    }
}

/// What to do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Make the safe repairs.
    pub repair: bool,
}

/// Runs every check against `store` and the spool `spool` configures, repairing what is
/// safe when asked.
pub async fn run(store: &dyn Store, spool: &SpoolConfig, options: Options) -> Report {
    let mut checks = database::checks(store, options).await;
    checks.extend(spool::checks(spool, options));
    for check in &checks {
        tracing::debug!(check = check.name, status = check.status.as_str(), repaired = check.repaired, "checked");
    }
    Report { checks, repair: options.repair }
}

/// `n` of `what` with the first examples: "2 (e.g. a, b)".
fn counted(n: u64, examples: &[String]) -> String {
    if examples.is_empty() {
        n.to_string()
    } else {
        format!("{n} (e.g. {})", examples.join(", "))
    }
}
