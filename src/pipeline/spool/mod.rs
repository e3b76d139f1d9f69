//! The disk spool: a write-ahead log of records that are not yet in the database.
//!
//! Records reach the spool when a producer asks for a durable acknowledgement, when the
//! memory queue overflows, when the database is down, and at shutdown. They are read
//! back in order and handed to the batch writers; a segment file is deleted only once
//! every record in it was committed (or dead-lettered).
//!
//! # Invariants
//! - Order: records are read back in the order they were appended.
//! - Every record appended is read back, or counted as dropped (full policy, I/O error,
//!   corruption) and logged.
//! - Bytes on disk stay within `audit.spool.max_bytes` (segments are small against it,
//!   so `drop_oldest` frees space in small steps).
//! - A segment file exists only while it holds records not yet settled; the rule lives
//!   in one place, [`ledger`].
//! - One process per spool directory (`DIR/LOCK`, an exclusive file lock).
//!
//! # Two kinds of acknowledgement
//! - *fsync'd* ([`FsyncNotice`], [`Spool::append_durable`]): the record is on disk and
//!   survives a crash. This is what a durable producer waits for.
//! - *settled* ([`Spool::settle`]): the record left the spool for good (committed, found
//!   already stored, dead-lettered). This is what lets a segment be deleted.
//!
//! # On disk
//! `DIR/LOCK` and segment files `DIR/<id as 16 hex digits>.seg`, each the magic
//! `OASPOOL1` and then frames (length, CRC-32, JSON payload: [`frame`]). Frames are
//! appended by one thread and fsync'd in groups: every append waiting while one fsync
//! runs shares the next one (group commit, `appender`). The reader never reads past
//! the last fsync'd byte (`reader`).
//!
//! # Crashes
//! A crash can leave a torn frame at the end of the segment being written. At start-up
//! every segment is checked frame by frame ([`recovery`]): a torn tail is cut off, a
//! corrupt frame in the middle is skipped and the frames after it kept; each loss is
//! logged and counted. That is never a start-up failure. Segments found at start-up are
//! never appended to; writing starts in a new segment.
//!
//! Replay after a crash may resend records that were committed but whose segment was not
//! yet deleted; writes are idempotent on `interaction_id`, so nothing is stored twice.
//!
//! # Files
//! [`frame`] (encoding, pure), [`ledger`] (the segment table), [`recovery`] (lock, scan,
//! repair), `appender` (the writing thread), `reader` (the reading task), [`io`] (the
//! filesystem seam tests inject faults through).

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{FullPolicy, SpoolConfig};
use crate::model::Interaction;

mod appender;
pub mod frame;
pub mod io;
pub mod ledger;
mod reader;
pub mod recovery;

pub use io::{AppendFile, Filesystem, ReadFile, StdFilesystem};
use ledger::{Ledger, Segment, Settled};

/// Why the spool could not open or take a record.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading or writing the spool directory failed.
    #[error("spool I/O error on {path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong (in the message, not a separate `source()`).
        cause: std::io::Error,
    },
    /// Another process holds the spool directory.
    #[error("spool directory {0} is in use by another process (its LOCK file is held)")]
    Locked(PathBuf),
    /// The spool is full and its policy refused the record.
    #[error("spool is full ({max_bytes} bytes, audit.spool.max_bytes)")]
    Full {
        /// The configured cap.
        max_bytes: u64,
    },
    /// Too many fire-and-forget records wait for the disk (it is slower than they come).
    #[error("{limit} records already wait for the spool's disk; this one was not taken")]
    Backlog {
        /// The bound (`audit.async.queue_size`).
        limit: usize,
    },
    /// The spool is closed (shutting down).
    #[error("spool is closed")]
    Closed,
}

impl SpoolError {
    pub(crate) fn io(path: &Path, cause: std::io::Error) -> SpoolError {
        SpoolError::Io { path: path.to_path_buf(), cause }
    }

    /// A copy for a second receiver (`io::Error` is not `Clone`).
    fn duplicate(&self) -> SpoolError {
        match self {
            SpoolError::Io { path, cause } => {
                SpoolError::Io { path: path.clone(), cause: std::io::Error::new(cause.kind(), cause.to_string()) }
            }
            SpoolError::Locked(p) => SpoolError::Locked(p.clone()),
            SpoolError::Full { max_bytes } => SpoolError::Full { max_bytes: *max_bytes },
            SpoolError::Backlog { limit } => SpoolError::Backlog { limit: *limit },
            SpoolError::Closed => SpoolError::Closed,
        }
    }
}

/// Counters of the spool, read by the pipeline's stats.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Records appended (fsync'd).
    pub spooled: AtomicU64,
    /// Records read back and handed to the writers.
    pub replayed: AtomicU64,
    /// Records dropped because the spool was full (policy `drop_oldest`/`drop_newest`),
    /// or because too many fire-and-forget records already waited for the disk.
    pub dropped_full: AtomicU64,
    /// Records lost to a write error of the spool itself (disk full, I/O error).
    pub dropped_io: AtomicU64,
    /// Records lost to corruption: frames that failed their CRC or could not be decoded
    /// (a corrupt region found at start-up counts once: how many frames it held is not
    /// knowable).
    pub corrupt_records: AtomicU64,
    /// Bytes discarded with them.
    pub corrupt_bytes: AtomicU64,
    /// Bytes in segment files now.
    pub bytes: AtomicU64,
    /// Records in the spool not yet settled.
    pub records: AtomicU64,
}

/// Where a spooled record lives, so it can be settled once committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpoolRef {
    /// The segment holding it.
    pub segment: u64,
}

/// A record read back from the spool, with where it lives.
#[derive(Debug)]
pub struct Spooled {
    /// The record.
    pub record: Interaction,
    /// Its position, to settle.
    pub at: SpoolRef,
}

/// Resolved once an appended record is fsync'd, or with why it was not.
pub type FsyncNotice = oneshot::Sender<Result<(), SpoolError>>;

/// A frame waiting for the appender.
struct Pending {
    frame: Vec<u8>,
    notice: Option<FsyncNotice>,
}

/// Everything behind the lock.
#[derive(Default)]
struct State {
    ledger: Ledger,
    pending: VecDeque<Pending>,
    /// Records in `pending` without a notice (fire-and-forget), bounded.
    pending_unnoticed: usize,
    /// Records the appender took from `pending` and has not finished writing.
    writing: usize,
    closing: bool,
}

/// What the appender, the reader and the handles share.
struct Shared {
    dir: PathBuf,
    fs: Arc<dyn Filesystem>,
    max_bytes: u64,
    segment_bytes: u64,
    policy: FullPolicy,
    /// Bound on fire-and-forget records waiting for the appender.
    pending_limit: usize,
    /// Records inside `append` (being encoded), not yet in `pending`.
    entering: AtomicU64,
    state: Mutex<State>,
    /// Wakes the appender thread.
    work: Condvar,
    /// Wakes the reader after an fsync or a deletion.
    readable: Notify,
    stats: Arc<SpoolStats>,
    stop_reading: CancellationToken,
    appender: Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
    /// Held for the spool's lifetime: the exclusive lock on `DIR/LOCK`.
    lock: File,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes a finished (or evicted) segment's file. Called outside the lock.
    fn delete(&self, seg: Segment) {
        sub_saturating(&self.stats.bytes, seg.bytes);
        if let Err(e) = self.fs.remove(&seg.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(segment = %seg.path.display(), error = %e, "cannot delete a settled spool segment; it will be replayed (harmlessly) on the next start");
            }
        }
        // Rare (a failed write that could not be cut off), so looked for on every delete
        // rather than tracked.
        recovery::remove_marker(&*self.fs, &seg.path);
        self.readable.notify_one();
    }
}

/// Subtracts without wrapping below zero (gauges updated from several threads).
fn sub_saturating(gauge: &AtomicU64, n: u64) {
    let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
}

/// A handle on the spool. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens (creating) the spool directory, locks it, and checks the segments left by an
    /// earlier run; their records will be read back first. `pending_limit` bounds the
    /// fire-and-forget records waiting for the disk.
    pub fn open(config: &SpoolConfig, pending_limit: usize) -> Result<Spool, SpoolError> {
        Self::open_with(config, pending_limit, Arc::new(StdFilesystem))
    }

    /// [`Spool::open`] over a given filesystem (tests inject faults through it).
    pub fn open_with(config: &SpoolConfig, pending_limit: usize, fs: Arc<dyn Filesystem>) -> Result<Spool, SpoolError> {
        let dir = config.dir.clone();
        let lock = recovery::lock(&dir)?;
        let stats = Arc::new(SpoolStats::default());
        let ledger = recovery::recover(&*fs, &dir, &stats)?;
        // A segment is at most an eighth of the cap, so `drop_oldest` frees space in
        // steps far smaller than the spool.
        let segment_bytes = config.segment_bytes.min((config.max_bytes / 8).max(64 * 1024));
        let shared = Arc::new(Shared {
            dir,
            fs,
            max_bytes: config.max_bytes,
            segment_bytes,
            policy: config.full_policy,
            pending_limit: pending_limit.max(1),
            entering: AtomicU64::new(0),
            state: Mutex::new(State { ledger, ..State::default() }),
            work: Condvar::new(),
            readable: Notify::new(),
            stats,
            stop_reading: CancellationToken::new(),
            appender: Mutex::new(None),
            closed: AtomicBool::new(false),
            lock,
        });
        let handle = appender::spawn(shared.clone()).map_err(|e| SpoolError::io(&shared.dir, e))?;
        *shared.appender.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(Spool { shared })
    }

    /// The spool's counters.
    pub fn stats(&self) -> Arc<SpoolStats> {
        self.shared.stats.clone()
    }

    /// Records handed to the spool and not yet written and fsync'd (waiting for the
    /// appender's next group commit); they are not in [`SpoolStats::records`] yet.
    pub fn appending(&self) -> u64 {
        // `entering` first: a record moving on into `pending` is then seen at least once.
        let entering = self.shared.entering.load(Ordering::SeqCst);
        let state = self.shared.lock();
        entering + (state.pending.len() + state.writing) as u64
    }

    /// When the oldest record still waiting in the spool was written (at the latest;
    /// segment granularity).
    pub fn oldest_pending_since(&self) -> Option<std::time::SystemTime> {
        self.shared.lock().ledger.oldest_unsettled_since()
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends a record. Never blocks: the write happens on the spool's own thread, and
    /// `notice` (if given) is resolved once the record is fsync'd, or with why it was not.
    /// A fire-and-forget record (no `notice`) that finds the appender's backlog full is
    /// dropped and counted; the returned error says so.
    pub fn append(&self, record: &Interaction, notice: Option<FsyncNotice>) -> Result<(), SpoolError> {
        self.shared.entering.fetch_add(1, Ordering::SeqCst);
        let result = self.enter(record, notice);
        self.shared.entering.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn enter(&self, record: &Interaction, notice: Option<FsyncNotice>) -> Result<(), SpoolError> {
        let frame = frame::encode(record);
        let mut state = self.shared.lock();
        if state.closing {
            drop(state);
            if let Some(notice) = notice {
                let _ = notice.send(Err(SpoolError::Closed));
            }
            return Err(SpoolError::Closed);
        }
        if notice.is_none() {
            if state.pending_unnoticed >= self.shared.pending_limit {
                drop(state);
                self.shared.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                return Err(SpoolError::Backlog { limit: self.shared.pending_limit });
            }
            state.pending_unnoticed += 1;
        }
        state.pending.push_back(Pending { frame, notice });
        drop(state);
        self.shared.work.notify_one();
        Ok(())
    }

    /// Appends a record and waits until it is fsync'd.
    pub async fn append_durable(&self, record: &Interaction) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        // An error here was also sent to the notice; the receiver below reports it.
        let _ = self.append(record, Some(tx));
        rx.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Settles `n` records read from `at` (committed, found already stored, or
    /// dead-lettered); deletes the segment once all of it is settled.
    pub fn settle(&self, at: SpoolRef, n: u64) {
        sub_saturating(&self.shared.stats.records, n);
        let settled = self.shared.lock().ledger.settle(at.segment, n);
        if let Settled::Done(seg) = settled {
            self.shared.delete(seg);
        }
    }

    /// True while the segment holding `at` is still on disk. False once `drop_oldest`
    /// evicted it: a record read from it that is still in memory is then its only copy.
    pub fn holds(&self, at: SpoolRef) -> bool {
        self.shared.lock().ledger.get(at.segment).is_some()
    }

    /// Starts the task that reads spooled records back in order and hands them out in
    /// batches of at most `batch_size`. Read batches wait in a channel of one. A batch in
    /// the channel counts as read: after [`Spool::stop_reading`], receive until the channel
    /// closes, or a batch whose segment `drop_oldest` evicted is lost uncounted.
    pub fn start_reader(&self, batch_size: usize) -> mpsc::Receiver<Vec<Spooled>> {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(reader::Reader::new(self.shared.clone(), batch_size, tx).run());
        rx
    }

    /// Stops the reader: records not yet read stay on disk for the next run.
    pub fn stop_reading(&self) {
        self.shared.stop_reading.cancel();
        self.shared.readable.notify_waiters();
    }

    /// True when every record appended so far has been settled.
    pub fn is_empty(&self) -> bool {
        let state = self.shared.lock();
        // Records the appender is writing count too: they are in neither gauge yet.
        state.pending.is_empty() && state.writing == 0 && self.shared.stats.records.load(Ordering::Relaxed) == 0
    }

    /// Writes and fsyncs everything pending, then stops the appender. Appends after this
    /// fail with [`SpoolError::Closed`].
    pub async fn close(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop_reading();
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        let handle = self.shared.appender.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // Let the next owner in now, not when the last handle is dropped.
        if let Err(e) = self.shared.lock.unlock() {
            tracing::warn!(error = %e, "cannot release the spool lock");
        }
        let stats = &self.shared.stats;
        tracing::info!(
            dir = %self.shared.dir.display(),
            records = stats.records.load(Ordering::Relaxed),
            bytes = stats.bytes.load(Ordering::Relaxed),
            "spool closed"
        );
    }
}
