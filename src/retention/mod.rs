//! Retention (`audit.retention`): whole UTC days older than `days` are removed, each
//! optionally archived to Parquet first, without ever locking the tables for long.
//!
//! # Invariants
//! - The unit is a whole UTC day (the hash chain's unit, see [`crate::store::chain`]): a
//!   day is expired when it lies entirely before the cutoff, `now - days` cut to its day.
//!   The cutoff's own day is kept, so at least `days` days of history always remain.
//! - Children (thoughts, tool calls, metrics) go with their interaction in the same
//!   statement (`ON DELETE CASCADE`), never orphaned; sessions stay (they span days).
//! - With an archive directory, a day is deleted only after its file is on disk under
//!   its final name (written as `.partial`, fsynced, renamed, directory fsynced), read
//!   back in full with a Parquet reader, and its row count equals the day's count in the
//!   database. A day whose archive fails in any way is not deleted, and the run stops
//!   there (days are processed oldest first, so what remains is a contiguous tail).
//! - Deleting goes in batches of `batch_size` interactions, each its own short
//!   transaction ([`Store::expire_day`]): concurrent ingest waits for one batch at most.
//!
//! # Crashes and re-runs
//! - Stopped while archiving: a `.partial` file is left, the day untouched; the next run
//!   writes the archive again.
//! - Stopped while deleting: the archive is complete, the day partly deleted, and
//!   `verify` says the day's expiry did not finish. The next run lists the day again (it
//!   still has records or blocks to retire) and archives what is left to a new file
//!   beside the first (`interactions-YYYY-MM-DD.2.parquet`): an archive file is never
//!   overwritten, so records archived and then deleted are never lost from the archive.
//!
//! # Known window
//! A record of an expiring day (at least `days` old) that arrives after the day's
//! archive was counted and before its deletion finished is deleted without being in the
//! archive. The run compares what it deleted with what it archived and logs a warning
//! naming the difference.
//!
//! # Files
//! - `archive`: writing a day's Parquet file and reading it back.
//! - `schedule`: when `serve` runs retention next (`cleanup_time` in `time_zone`), and
//!   the daily task.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};

use crate::export::ExportError;
use crate::store::{DayCount, Filter, Store, StoreError};

mod archive;
mod schedule;

pub use archive::{archive_path, read_back_rows};
pub use schedule::{next_run, spawn_scheduler, Schedule};

/// Why a retention run stopped. Each message carries its cause's text (not a separate
/// `source()`), so a chain printer shows it once.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The database failed (reading, counting or deleting).
    #[error("retention of {day}: {cause}")]
    Store {
        /// The day being processed.
        day: NaiveDate,
        /// What the store said.
        cause: StoreError,
    },
    /// Listing the days to expire failed.
    #[error("planning retention: {0}")]
    Plan(StoreError),
    /// The archive directory cannot be created or written.
    #[error("archive directory {}: {cause}; nothing deleted", dir.display())]
    ArchiveDir {
        /// The directory.
        dir: PathBuf,
        /// The file system's error.
        cause: std::io::Error,
    },
    /// Writing a day's archive file failed.
    #[error("writing archive {}: {cause}; {day} not deleted", path.display())]
    ArchiveWrite {
        /// The day.
        day: NaiveDate,
        /// The file being written.
        path: PathBuf,
        /// The file system's error.
        cause: std::io::Error,
    },
    /// Reading or encoding the day's records for the archive failed.
    #[error("archiving {day} to {}: {cause}; not deleted", path.display())]
    ArchiveEncode {
        /// The day.
        day: NaiveDate,
        /// The file being written.
        path: PathBuf,
        /// The export's error.
        cause: ExportError,
    },
    /// The archive written does not read back whole.
    #[error("archive {} does not read back: {message}; {day} not deleted", path.display())]
    ArchiveUnreadable {
        /// The day.
        day: NaiveDate,
        /// The file.
        path: PathBuf,
        /// The reader's error.
        message: String,
    },
    /// The archive's rows differ from the day's count in the database (a record
    /// arrived or went meanwhile); the next run tries again.
    #[error(
        "archive {} holds {archived} records but the database has {stored} for {day}; not deleted (the next run \
         archives it again)",
        path.display()
    )]
    ArchiveMismatch {
        /// The day.
        day: NaiveDate,
        /// The file.
        path: PathBuf,
        /// Rows read back from the file.
        archived: u64,
        /// Interactions of the day in the database.
        stored: u64,
    },
}

/// The days a run would expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPlan {
    /// The first day kept: every day before it is expired.
    pub cutoff: NaiveDate,
    /// Days to expire, oldest first, with their interactions now. A day with 0 records
    /// has blocks left to retire (an interrupted earlier run).
    pub days: Vec<DayCount>,
}

impl RetentionPlan {
    /// Interactions the plan would delete.
    pub fn records(&self) -> u64 {
        self.days.iter().map(|d| d.records).sum()
    }
}

/// How a run goes.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Archive each day here before deleting it.
    pub archive_dir: Option<PathBuf>,
    /// Report only: write nothing, delete nothing.
    pub dry_run: bool,
    /// Interactions per delete statement.
    pub batch_size: u32,
}

/// A day's archive file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Rows read back from it.
    pub rows: u64,
}

/// What a run did to one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayOutcome {
    /// The UTC day.
    pub day: NaiveDate,
    /// Interactions of the day when planned.
    pub records: u64,
    /// The archive written, if any.
    pub archive: Option<ArchivedFile>,
    /// Interactions deleted (0 in a dry run).
    pub deleted: u64,
    /// Hash-chain blocks retired.
    pub blocks: u64,
    /// Time spent on the day.
    pub duration: Duration,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct RetentionReport {
    /// The first day kept.
    pub cutoff: Option<NaiveDate>,
    /// True when nothing was written or deleted.
    pub dry_run: bool,
    /// Days processed, oldest first (in a dry run: the days that would be).
    pub days: Vec<DayOutcome>,
    /// Why the run stopped before the end of its plan.
    pub error: Option<RetentionError>,
    /// Wall time of the run.
    pub duration: Duration,
}

impl RetentionReport {
    /// Interactions deleted.
    pub fn deleted(&self) -> u64 {
        self.days.iter().map(|d| d.deleted).sum()
    }

    /// The report, or the error that stopped the run.
    pub fn into_result(self) -> Result<RetentionReport, RetentionError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }
}

/// Midnight (UTC) starting `day`.
fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

/// The interactions of one UTC day.
fn day_filter(day: NaiveDate) -> Filter {
    Filter { from: Some(day_start(day)), to: day.succ_opt().map(day_start), ..Filter::default() }
}

/// The first day kept when keeping `days` days at `now`.
pub fn cutoff(now: DateTime<Utc>, days: u32) -> NaiveDate {
    (now - chrono::Duration::days(i64::from(days))).date_naive()
}

/// The days to expire when keeping `days` days at `now` (0: keep forever, an empty
/// plan): every UTC day before the cutoff that has interactions, and every such day
/// whose chain still has blocks to retire (an expiry interrupted after its last record
/// went).
pub async fn plan(store: &dyn Store, days: u32, now: DateTime<Utc>) -> Result<RetentionPlan, RetentionError> {
    let cutoff = cutoff(now, days);
    if days == 0 {
        return Ok(RetentionPlan { cutoff: NaiveDate::MIN, days: Vec::new() });
    }
    let Some(last) = cutoff.pred_opt() else {
        return Ok(RetentionPlan { cutoff, days: Vec::new() });
    };
    let mut by_day: std::collections::BTreeMap<NaiveDate, u64> = store
        .record_days(None, Some(last))
        .await
        .map_err(RetentionError::Plan)?
        .into_iter()
        .map(|d| (d.day, d.records))
        .collect();
    for chain_day in store.chain_days(None, Some(last)).await.map_err(RetentionError::Plan)? {
        if chain_day.blocks > chain_day.anchor_seq {
            by_day.entry(chain_day.day).or_insert(0);
        }
    }
    Ok(RetentionPlan { cutoff, days: by_day.into_iter().map(|(day, records)| DayCount { day, records }).collect() })
}

/// Carries out `plan`, oldest day first: archives (when `archive_dir` is set), checks
/// the archive, deletes. Stops at the first day that fails, which is left undeleted;
/// the report holds the days done and the error.
pub async fn run(store: &dyn Store, plan: &RetentionPlan, options: &RunOptions) -> RetentionReport {
    let started = Instant::now();
    let mut report = RetentionReport { cutoff: Some(plan.cutoff), dry_run: options.dry_run, ..Default::default() };
    if let (Some(dir), false) = (&options.archive_dir, options.dry_run || plan.days.is_empty()) {
        if let Err(cause) = archive::prepare_dir(dir).await {
            report.error = Some(RetentionError::ArchiveDir { dir: dir.clone(), cause });
            report.duration = started.elapsed();
            return report;
        }
    }
    for planned in &plan.days {
        let day_started = Instant::now();
        let outcome = if options.dry_run {
            Ok(DayOutcome {
                day: planned.day,
                records: planned.records,
                archive: None,
                deleted: 0,
                blocks: 0,
                duration: Duration::ZERO,
            })
        } else {
            expire(store, *planned, options.archive_dir.as_deref(), options.batch_size).await
        };
        match outcome {
            Ok(mut outcome) => {
                outcome.duration = day_started.elapsed();
                report.days.push(outcome);
            }
            Err(e) => {
                report.error = Some(e);
                break;
            }
        }
    }
    report.duration = started.elapsed();
    report
}

/// Archives (optionally) and deletes one day.
async fn expire(
    store: &dyn Store,
    planned: DayCount,
    archive_dir: Option<&Path>,
    batch_size: u32,
) -> Result<DayOutcome, RetentionError> {
    let day = planned.day;
    let store_error = |cause| RetentionError::Store { day, cause };
    let mut archived = None;
    if let Some(dir) = archive_dir {
        // Counted now, not taken from the plan: records may have arrived since.
        let stored = store.count_matching(&day_filter(day)).await.map_err(store_error)?;
        if stored > 0 {
            let file = archive::write_day(store, dir, day, &day_filter(day)).await?;
            if file.rows != stored {
                return Err(RetentionError::ArchiveMismatch { day, path: file.path, archived: file.rows, stored });
            }
            archived = Some(file);
        }
    }
    let expired = store.expire_day(day, batch_size).await.map_err(store_error)?;
    if let Some(file) = &archived {
        if expired.records > file.rows {
            tracing::warn!(
                %day,
                deleted = expired.records,
                archived = file.rows,
                "records of the day arrived after it was archived and were deleted with it"
            );
        }
    }
    Ok(DayOutcome {
        day,
        records: planned.records,
        archive: archived,
        deleted: expired.records,
        blocks: expired.blocks,
        duration: Duration::ZERO,
    })
}

/// Plans and runs retention as configured (`audit.retention`), keeping `days` days.
/// Logs one summary line at info (counts and files, never record content).
pub async fn run_configured(
    store: &dyn Store,
    config: &crate::config::RetentionConfig,
    days: u32,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<RetentionReport, RetentionError> {
    let plan = plan(store, days, now).await?;
    let options = RunOptions { archive_dir: config.archive_dir.clone(), dry_run, batch_size: config.batch_size };
    let report = run(store, &plan, &options).await;
    tracing::info!(
        cutoff = %plan.cutoff,
        days = report.days.len(),
        deleted = report.deleted(),
        archived = report.days.iter().filter(|d| d.archive.is_some()).count(),
        dry_run,
        elapsed = ?report.duration,
        failed = report.error.is_some(),
        "retention run"
    );
    report.into_result()
}
