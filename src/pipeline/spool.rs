//! The disk spool: a write-ahead log of records that are not yet in the database.
//!
//! Records reach the spool when a producer asks for a durable acknowledgement, when the
//! memory queue overflows, when the database is down, and at shutdown. They are read
//! back in order and handed to the batch writers; a segment file is deleted only once
//! every record in it was committed (or dead-lettered).
//!
//! # On disk
//! `DIR/LOCK` (held with an exclusive file lock, so two processes never share a spool)
//! and segment files `DIR/<id as 16 hex digits>.seg`. A segment starts with the 8-byte
//! magic `OASPOOL1`, then frames: payload length (u32 LE), CRC-32 of the payload (u32
//! LE), payload (the record as JSON). Frames are appended by one thread and fsync'd in
//! groups: every append waiting while one fsync runs shares the next one (group commit).
//! The reader never reads past the last fsync'd byte.
//!
//! # Crashes
//! A crash can leave a torn frame at the end of the segment being written. At start-up
//! every segment is checked frame by frame; the first frame that is short or fails its
//! CRC ends the segment: the file is truncated there, and the discarded bytes are logged
//! and counted. That is never a start-up failure. Segments found at start-up are never
//! appended to; writing starts in a new segment.
//!
//! Replay after a crash may resend records that were committed but whose segment was not
//! yet deleted; writes are idempotent on `interaction_id`, so nothing is stored twice.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Batch, Envelope, Origin};
use crate::config::{FullPolicy, SpoolConfig};
use crate::model::Interaction;

const MAGIC: &[u8; 8] = b"OASPOOL1";
const FRAME_HEADER: usize = 8;
/// Frames larger than this are treated as corruption when read back: no valid record is
/// this large (fields are truncated at `limits.max_field_bytes` before they get here).
const MAX_FRAME: usize = 256 * 1024 * 1024;
/// How long the appender sleeps when idle before checking whether the active segment is
/// fully committed and can be retired.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// Why the spool could not open or take a record.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading or writing the spool directory failed.
    #[error("spool I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
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
    /// The spool is closed (shutting down).
    #[error("spool is closed")]
    Closed,
}

impl SpoolError {
    fn io(path: &Path, source: io::Error) -> SpoolError {
        SpoolError::Io { path: path.to_path_buf(), source }
    }
}

/// Counters of the spool, read by the pipeline's stats.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Records appended (fsync'd).
    pub spooled: AtomicU64,
    /// Records read back and handed to the writers.
    pub replayed: AtomicU64,
    /// Records dropped because the spool was full (policy `drop_oldest`/`drop_newest`,
    /// or the bounded backlog of fire-and-forget records under `block`).
    pub dropped_full: AtomicU64,
    /// Records lost to a write error of the spool itself (disk full, I/O error).
    pub dropped_io: AtomicU64,
    /// Frames found corrupt (CRC mismatch, torn, undecodable) and discarded.
    pub corrupt_records: AtomicU64,
    /// Bytes discarded with them.
    pub corrupt_bytes: AtomicU64,
    /// Bytes in segment files now.
    pub bytes: AtomicU64,
    /// Records in the spool not yet committed.
    pub records: AtomicU64,
}

/// Where a spooled record lives, so its commit can be acknowledged to the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolRef {
    /// The segment holding it.
    pub segment: u64,
}

/// Resolved when an appended record is fsync'd, or with why it was not.
pub type AppendAck = oneshot::Sender<Result<(), SpoolError>>;

struct Pending {
    frame: Vec<u8>,
    ack: Option<AppendAck>,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Durable (fsync'd) length.
    bytes: u64,
    /// Durable records.
    records: u64,
    /// No more appends will come.
    sealed: bool,
    /// Records the reader has handed out or skipped.
    read: u64,
    /// Records committed (or otherwise settled) after being handed out.
    acked: u64,
}

impl Segment {
    /// Sealed, every record read, and every record read settled: safe to delete.
    fn settled(&self) -> bool {
        self.sealed && self.read >= self.records && self.acked >= self.read
    }
}

#[derive(Default)]
struct State {
    segments: BTreeMap<u64, Segment>,
    pending: VecDeque<Pending>,
    /// Records in `pending` without an acknowledgement (fire-and-forget), bounded.
    pending_unacked: usize,
    closing: bool,
    next_id: u64,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    policy: FullPolicy,
    /// Bound on fire-and-forget records waiting for the appender.
    pending_limit: usize,
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

/// A handle on the spool. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

/// Subtracts without wrapping below zero (gauges updated from several threads).
fn sub_saturating(gauge: &AtomicU64, n: u64) {
    let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// Encodes a record as one frame: length, CRC-32, JSON.
pub fn encode_frame(record: &Interaction) -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_HEADER];
    // Writing into a Vec cannot fail, and a record of strings and numbers always
    // serialises; an empty payload would fail to decode and be counted, never hidden.
    let _ = serde_json::to_writer(&mut frame, record);
    let payload_len = (frame.len() - FRAME_HEADER) as u32;
    let crc = crc32fast::hash(&frame[FRAME_HEADER..]);
    frame[0..4].copy_from_slice(&payload_len.to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    frame
}

/// What reading one frame found.
enum FrameRead {
    Record(Vec<u8>),
    /// Clean end of data.
    End,
    /// A torn or corrupt frame at this point.
    Corrupt(&'static str),
}

fn read_frame(reader: &mut impl Read, available: u64) -> io::Result<(FrameRead, u64)> {
    if available == 0 {
        return Ok((FrameRead::End, 0));
    }
    if available < FRAME_HEADER as u64 {
        return Ok((FrameRead::Corrupt("torn frame header"), 0));
    }
    let mut header = [0u8; FRAME_HEADER];
    reader.read_exact(&mut header)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_FRAME {
        return Ok((FrameRead::Corrupt("frame length out of range"), 0));
    }
    if (FRAME_HEADER + len) as u64 > available {
        return Ok((FrameRead::Corrupt("torn frame"), 0));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    if crc32fast::hash(&payload) != crc {
        return Ok((FrameRead::Corrupt("CRC mismatch"), 0));
    }
    Ok((FrameRead::Record(payload), (FRAME_HEADER + len) as u64))
}

/// Checks a segment found at start-up; truncates it at its first bad frame.
/// Returns (valid length, records), or None when the file is not a segment at all.
fn recover_segment(path: &Path, stats: &SpoolStats) -> Result<Option<(u64, u64)>, SpoolError> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| SpoolError::io(path, e))?;
    let len = file.metadata().map_err(|e| SpoolError::io(path, e))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, &file);
    let mut magic = [0u8; 8];
    if len < MAGIC.len() as u64 || reader.read_exact(&mut magic).is_err() || &magic != MAGIC {
        stats.corrupt_bytes.fetch_add(len, Ordering::Relaxed);
        if len > 0 {
            stats.corrupt_records.fetch_add(1, Ordering::Relaxed);
        }
        tracing::error!(segment = %path.display(), bytes = len, "spool segment has no valid header; discarding it");
        return Ok(None);
    }
    let mut offset = MAGIC.len() as u64;
    let mut records = 0u64;
    loop {
        match read_frame(&mut reader, len - offset).map_err(|e| SpoolError::io(path, e))? {
            (FrameRead::Record(_), n) => {
                offset += n;
                records += 1;
            }
            (FrameRead::End, _) => break,
            (FrameRead::Corrupt(why), _) => {
                let discarded = len - offset;
                stats.corrupt_records.fetch_add(1, Ordering::Relaxed);
                stats.corrupt_bytes.fetch_add(discarded, Ordering::Relaxed);
                tracing::warn!(
                    segment = %path.display(),
                    offset,
                    discarded_bytes = discarded,
                    reason = why,
                    "corrupt spool tail (a crash mid-write?); truncating the segment there"
                );
                drop(reader);
                file.set_len(offset).map_err(|e| SpoolError::io(path, e))?;
                file.sync_all().map_err(|e| SpoolError::io(path, e))?;
                break;
            }
        }
    }
    Ok(Some((offset, records)))
}

impl Spool {
    /// Opens (creating) the spool directory, locks it, and checks the segments left by an
    /// earlier run; their records will be replayed first.
    pub fn open(config: &SpoolConfig, pending_limit: usize) -> Result<Spool, SpoolError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| SpoolError::io(&dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| SpoolError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir)),
            Err(fs::TryLockError::Error(e)) => return Err(SpoolError::io(&lock_path, e)),
        }
        let stats = Arc::new(SpoolStats::default());
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| SpoolError::io(&dir, e))? {
            let entry = entry.map_err(|e| SpoolError::io(&dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(".seg").and_then(|h| u64::from_str_radix(h, 16).ok()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut state = State::default();
        let (mut total_bytes, mut total_records) = (0u64, 0u64);
        for &id in &ids {
            let path = segment_path(&dir, id);
            match recover_segment(&path, &stats)? {
                Some((bytes, records)) if records > 0 => {
                    total_bytes += bytes;
                    total_records += records;
                    let segment = Segment { path, bytes, records, sealed: true, read: 0, acked: 0 };
                    state.segments.insert(id, segment);
                }
                _ => {
                    fs::remove_file(&path).map_err(|e| SpoolError::io(&path, e))?;
                }
            }
        }
        state.next_id = ids.last().map_or(1, |last| last + 1);
        stats.bytes.store(total_bytes, Ordering::Relaxed);
        stats.records.store(total_records, Ordering::Relaxed);
        if total_records > 0 {
            tracing::info!(
                dir = %dir.display(),
                segments = state.segments.len(),
                records = total_records,
                bytes = total_bytes,
                "spool holds records from an earlier run; replaying them"
            );
        }
        // A segment is at most an eighth of the cap, so `drop_oldest` frees space in
        // steps far smaller than the spool.
        let segment_bytes = config.segment_bytes.min((config.max_bytes / 8).max(64 * 1024));
        let inner = Arc::new(Inner {
            dir,
            max_bytes: config.max_bytes,
            segment_bytes,
            policy: config.full_policy,
            pending_limit: pending_limit.max(1),
            state: Mutex::new(state),
            work: Condvar::new(),
            readable: Notify::new(),
            stats,
            stop_reading: CancellationToken::new(),
            appender: Mutex::new(None),
            closed: AtomicBool::new(false),
            lock,
        });
        let appender_inner = inner.clone();
        let handle = std::thread::Builder::new()
            .name("audit-spool-writer".into())
            .spawn(move || Appender::new(appender_inner).run())
            .map_err(|e| SpoolError::io(&inner.dir, e))?;
        *inner.appender.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(Spool { inner })
    }

    /// The spool's counters.
    pub fn stats(&self) -> Arc<SpoolStats> {
        self.inner.stats.clone()
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends a record. Never blocks: the write happens on the spool's own thread, and
    /// `ack` (if given) is resolved once the record is fsync'd, or with why it was not.
    /// A fire-and-forget record (no `ack`) that finds the appender's backlog full is
    /// dropped and counted; the returned error says so.
    pub fn append(&self, record: &Interaction, ack: Option<AppendAck>) -> Result<(), SpoolError> {
        let frame = encode_frame(record);
        let mut state = self.inner.lock();
        if state.closing {
            drop(state);
            let err = SpoolError::Closed;
            if let Some(ack) = ack {
                let _ = ack.send(Err(SpoolError::Closed));
            }
            return Err(err);
        }
        if ack.is_none() {
            if state.pending_unacked >= self.inner.pending_limit {
                drop(state);
                self.inner.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                return Err(SpoolError::Full { max_bytes: self.inner.max_bytes });
            }
            state.pending_unacked += 1;
        }
        state.pending.push_back(Pending { frame, ack });
        drop(state);
        self.inner.work.notify_one();
        Ok(())
    }

    /// Appends a record and waits until it is fsync'd.
    pub async fn append_durable(&self, record: &Interaction) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        self.append(record, Some(tx))?;
        rx.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Settles `n` records of `segment` (committed, found already stored, or
    /// dead-lettered); deletes the segment once all of it is settled.
    pub fn ack(&self, segment: u64, n: u64) {
        let removed = {
            let mut state = self.inner.lock();
            let Some(seg) = state.segments.get_mut(&segment) else {
                // Deleted by `drop_oldest` while these were in flight.
                sub_saturating(&self.inner.stats.records, n);
                return;
            };
            seg.acked += n;
            sub_saturating(&self.inner.stats.records, n);
            if seg.settled() {
                state.segments.remove(&segment)
            } else {
                None
            }
        };
        if let Some(seg) = removed {
            self.inner.delete_segment_file(&seg);
        }
    }

    /// Starts the task that reads spooled records back in order and hands them out as
    /// batches of at most `batch_size`. Read batches wait in a channel of one.
    pub fn start_reader(&self, batch_size: usize) -> mpsc::Receiver<Batch> {
        let (tx, rx) = mpsc::channel(1);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            Reader { inner, batch_size: batch_size.max(1), tx, segment: None, offset: 0, file: None, next_from: 0 }
                .run()
                .await;
        });
        rx
    }

    /// Stops the reader: records not yet read stay on disk for the next run.
    pub fn stop_reading(&self) {
        self.inner.stop_reading.cancel();
        self.inner.readable.notify_waiters();
    }

    /// True when every record appended so far has been committed.
    pub fn is_empty(&self) -> bool {
        self.inner.stats.records.load(Ordering::Relaxed) == 0 && self.inner.lock().pending.is_empty()
    }

    /// Writes and fsyncs everything pending, then stops the appender. Appends after this
    /// fail with [`SpoolError::Closed`].
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop_reading();
        self.inner.lock().closing = true;
        self.inner.work.notify_all();
        let handle = self.inner.appender.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // Let the next owner in now, not when the last handle is dropped.
        if let Err(e) = self.inner.lock.unlock() {
            tracing::warn!(error = %e, "cannot release the spool lock");
        }
        let stats = &self.inner.stats;
        tracing::info!(
            dir = %self.inner.dir.display(),
            records = stats.records.load(Ordering::Relaxed),
            bytes = stats.bytes.load(Ordering::Relaxed),
            "spool closed"
        );
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn delete_segment_file(&self, seg: &Segment) {
        sub_saturating(&self.stats.bytes, seg.bytes);
        if let Err(e) = fs::remove_file(&seg.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::error!(segment = %seg.path.display(), error = %e, "cannot delete a settled spool segment; it will be replayed (harmlessly) on the next start");
            }
        }
        self.readable.notify_one();
    }
}

/// The segment being written; owned by the appender thread.
struct Active {
    id: u64,
    file: File,
    len: u64,
    records: u64,
}

struct Appender {
    inner: Arc<Inner>,
    active: Option<Active>,
}

impl Appender {
    fn new(inner: Arc<Inner>) -> Self {
        Appender { inner, active: None }
    }

    fn run(mut self) {
        loop {
            let work: Vec<Pending> = {
                let mut state = self.inner.lock();
                while state.pending.is_empty() && !state.closing {
                    let (guard, timeout) =
                        self.inner.work.wait_timeout(state, IDLE_CHECK).unwrap_or_else(|p| p.into_inner());
                    state = guard;
                    if timeout.timed_out() && state.pending.is_empty() {
                        drop(state);
                        self.retire_if_settled();
                        state = self.inner.lock();
                    }
                }
                if state.pending.is_empty() && state.closing {
                    break;
                }
                let work: Vec<Pending> = state.pending.drain(..).collect();
                state.pending_unacked = 0;
                work
            };
            self.write_group(work);
        }
        self.seal_active();
    }

    /// Writes a group of frames and fsyncs once for all of them.
    fn write_group(&mut self, work: Vec<Pending>) {
        let mut written: Vec<Option<AppendAck>> = Vec::with_capacity(work.len());
        let mut buffer: Vec<u8> = Vec::new();
        let mut buffered_records = 0u64;
        for item in work {
            let size = item.frame.len() as u64;
            let over_cap = self.inner.stats.bytes.load(Ordering::Relaxed) + size > self.inner.max_bytes;
            // Making room may seal or delete the active segment: what is buffered for it
            // must be on disk first.
            if over_cap && !buffer.is_empty() {
                self.flush(&mut buffer, &mut buffered_records, &mut written);
            }
            if !self.make_room(size) {
                self.refuse(item.ack, SpoolError::Full { max_bytes: self.inner.max_bytes });
                continue;
            }
            let needs_rotation =
                self.active.as_ref().is_some_and(|a| a.len + buffer.len() as u64 + size > self.inner.segment_bytes);
            if needs_rotation || self.active.is_none() {
                // What is buffered belongs to the current segment: write it first.
                if !buffer.is_empty() {
                    // On failure the active segment is sealed; this record goes to a new one.
                    self.flush(&mut buffer, &mut buffered_records, &mut written);
                }
                if needs_rotation {
                    self.seal_active();
                }
                if let Err(e) = self.open_active() {
                    tracing::error!(error = %e, "cannot create a spool segment");
                    self.refuse(item.ack, e);
                    continue;
                }
            }
            buffer.extend_from_slice(&item.frame);
            buffered_records += 1;
            written.push(item.ack);
            // The cap is checked per frame against what is durable plus what is buffered.
            self.inner.stats.bytes.fetch_add(size, Ordering::Relaxed);
        }
        if !buffer.is_empty() {
            self.flush(&mut buffer, &mut buffered_records, &mut written);
        }
    }

    /// Writes the buffer to the active segment and fsyncs it; resolves the
    /// acknowledgements of what it held.
    fn flush(&mut self, buffer: &mut Vec<u8>, records: &mut u64, acks: &mut Vec<Option<AppendAck>>) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let path = segment_path(&self.inner.dir, active.id);
        let result = active.file.write_all(buffer).and_then(|()| active.file.sync_data());
        let bytes = buffer.len() as u64;
        let n = *records;
        buffer.clear();
        *records = 0;
        match result {
            Ok(()) => {
                active.len += bytes;
                active.records += n;
                {
                    let mut state = self.inner.lock();
                    if let Some(seg) = state.segments.get_mut(&active.id) {
                        seg.bytes = active.len;
                        seg.records = active.records;
                    }
                }
                self.inner.stats.spooled.fetch_add(n, Ordering::Relaxed);
                self.inner.stats.records.fetch_add(n, Ordering::Relaxed);
                self.inner.readable.notify_one();
                for ack in acks.drain(..).flatten() {
                    let _ = ack.send(Ok(()));
                }
                true
            }
            Err(e) => {
                tracing::error!(segment = %path.display(), records = n, error = %e, "spool write failed; these records are lost");
                sub_saturating(&self.inner.stats.bytes, bytes);
                self.inner.stats.dropped_io.fetch_add(n, Ordering::Relaxed);
                // Cut off whatever part of the group reached the file, and move on to a
                // fresh segment.
                let _ = active.file.set_len(active.len);
                self.seal_active();
                for ack in acks.drain(..).flatten() {
                    let _ = ack.send(Err(SpoolError::Io {
                        path: path.clone(),
                        source: io::Error::new(e.kind(), e.to_string()),
                    }));
                }
                false
            }
        }
    }

    fn refuse(&self, ack: Option<AppendAck>, error: SpoolError) {
        match &error {
            SpoolError::Full { .. } => self.inner.stats.dropped_full.fetch_add(1, Ordering::Relaxed),
            _ => self.inner.stats.dropped_io.fetch_add(1, Ordering::Relaxed),
        };
        match ack {
            Some(ack) => {
                let _ = ack.send(Err(error));
            }
            None => tracing::warn!(error = %error, "audit record dropped by the spool"),
        }
    }

    /// Ensures `size` more bytes fit under the cap, applying the full policy. False when
    /// the record must be refused.
    fn make_room(&mut self, size: u64) -> bool {
        let inner = self.inner.clone();
        let stats = &inner.stats;
        let max_bytes = inner.max_bytes;
        let fits = |stats: &SpoolStats| stats.bytes.load(Ordering::Relaxed) + size <= max_bytes;
        if fits(stats) {
            return true;
        }
        if size + MAGIC.len() as u64 > max_bytes {
            return false;
        }
        match inner.policy {
            FullPolicy::DropNewest => false,
            FullPolicy::DropOldest => {
                while !fits(stats) {
                    let oldest = inner.lock().segments.keys().next().copied();
                    let Some(oldest) = oldest else { return fits(stats) };
                    if self.active.as_ref().is_some_and(|a| a.id == oldest) {
                        self.seal_active();
                    }
                    let removed = inner.lock().segments.remove(&oldest);
                    if let Some(seg) = removed {
                        let lost = seg.records.saturating_sub(seg.read);
                        stats.dropped_full.fetch_add(lost, Ordering::Relaxed);
                        sub_saturating(&stats.records, lost);
                        tracing::warn!(
                            segment = %seg.path.display(),
                            records = lost,
                            "spool full: dropped its oldest segment (audit.spool.full_policy: drop_oldest)"
                        );
                        inner.delete_segment_file(&seg);
                    }
                }
                true
            }
            FullPolicy::Block => {
                let mut warned = false;
                while !fits(stats) {
                    if inner.lock().closing {
                        return false;
                    }
                    if !warned {
                        tracing::warn!("spool full: durable producers wait for room (audit.spool.full_policy: block)");
                        warned = true;
                    }
                    // Room comes from writers settling segments; the active one may be the
                    // only thing left to free, so let it be retired when settled.
                    self.retire_if_settled();
                    std::thread::sleep(Duration::from_millis(20));
                }
                true
            }
        }
    }

    fn open_active(&mut self) -> Result<(), SpoolError> {
        let id = {
            let mut state = self.inner.lock();
            let id = state.next_id;
            state.next_id += 1;
            id
        };
        let path = segment_path(&self.inner.dir, id);
        let mut file =
            OpenOptions::new().create_new(true).append(true).open(&path).map_err(|e| SpoolError::io(&path, e))?;
        file.write_all(MAGIC).and_then(|()| file.sync_data()).map_err(|e| SpoolError::io(&path, e))?;
        // The new name must survive a crash too.
        File::open(&self.inner.dir).and_then(|d| d.sync_all()).map_err(|e| SpoolError::io(&self.inner.dir, e))?;
        let len = MAGIC.len() as u64;
        self.inner.stats.bytes.fetch_add(len, Ordering::Relaxed);
        self.inner
            .lock()
            .segments
            .insert(id, Segment { path, bytes: len, records: 0, sealed: false, read: 0, acked: 0 });
        self.active = Some(Active { id, file, len, records: 0 });
        Ok(())
    }

    /// Marks the active segment as complete; the reader may finish it.
    fn seal_active(&mut self) {
        let Some(active) = self.active.take() else { return };
        let removed = {
            let mut state = self.inner.lock();
            match state.segments.get_mut(&active.id) {
                Some(seg) => {
                    seg.sealed = true;
                    if seg.records == 0 || seg.settled() {
                        state.segments.remove(&active.id)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if let Some(seg) = removed {
            self.inner.delete_segment_file(&seg);
        }
        self.inner.readable.notify_one();
    }

    /// Retires the active segment when the reader has read all of it and every record
    /// is settled, so a drained spool leaves no files behind.
    fn retire_if_settled(&mut self) {
        let Some(active) = &self.active else { return };
        let settled = {
            let state = self.inner.lock();
            state.segments.get(&active.id).is_some_and(|s| s.read == s.records && s.acked >= s.read)
        };
        if settled {
            self.seal_active();
        }
    }
}

struct Reader {
    inner: Arc<Inner>,
    batch_size: usize,
    tx: mpsc::Sender<Batch>,
    /// The segment being read, if any.
    segment: Option<u64>,
    /// Where the next frame starts in it.
    offset: u64,
    /// An open reader positioned at `offset`, reused between batches.
    file: Option<BufReader<File>>,
    /// Segments below this id are finished.
    next_from: u64,
}

/// What the reader should do next, decided under the lock.
enum Step {
    Read { segment: u64, path: PathBuf, from: u64, until: u64 },
    Wait,
}

impl Reader {
    async fn run(mut self) {
        let inner = self.inner.clone();
        loop {
            if inner.stop_reading.is_cancelled() {
                break;
            }
            let notified = inner.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.next_step() {
                Step::Wait => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = self.inner.stop_reading.cancelled() => break,
                        // Belt and braces against a missed wake-up.
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Step::Read { segment, path, from, until } => {
                    let Some(batch) = self.read(segment, path, from, until).await else { continue };
                    if batch.is_empty() {
                        continue;
                    }
                    tokio::select! {
                        sent = self.tx.send(batch) => if sent.is_err() { break },
                        _ = self.inner.stop_reading.cancelled() => break,
                    }
                }
            }
        }
        tracing::debug!("spool reader stopped");
    }

    /// Picks the next range to read: the rest of the current segment up to its durable
    /// length, else the next segment; marks segments read to their end.
    fn next_step(&mut self) -> Step {
        let mut finished = Vec::new();
        let step = self.plan(&mut finished);
        // File deletion happens outside the lock the appender and the writers share.
        for seg in finished {
            self.inner.delete_segment_file(&seg);
        }
        step
    }

    /// [`Reader::next_step`] under the lock; settled segments it passes are handed back
    /// in `finished` for deletion.
    fn plan(&mut self, finished: &mut Vec<Segment>) -> Step {
        let mut state = self.inner.lock();
        loop {
            let id = match self.segment {
                Some(id) if state.segments.contains_key(&id) => id,
                dropped => {
                    // None yet, or the current one was dropped (drop_oldest): go on after it.
                    if let Some(old) = dropped {
                        self.next_from = self.next_from.max(old + 1);
                    }
                    self.file = None;
                    let Some((&id, _)) = state.segments.range(self.next_from..).next() else {
                        self.segment = None;
                        return Step::Wait;
                    };
                    self.segment = Some(id);
                    self.offset = MAGIC.len() as u64;
                    id
                }
            };
            let seg = state.segments.get_mut(&id).expect("segment present");
            if self.offset < seg.bytes {
                return Step::Read { segment: id, path: seg.path.clone(), from: self.offset, until: seg.bytes };
            }
            if !seg.sealed {
                return Step::Wait;
            }
            // Frames cut off by a corrupt read count as read.
            seg.read = seg.read.max(seg.records);
            if seg.settled() {
                finished.extend(state.segments.remove(&id));
            }
            self.next_from = id + 1;
            self.segment = None;
            self.file = None;
        }
    }

    /// Reads up to a batch of records from `segment` between `from` and `until`.
    async fn read(&mut self, segment: u64, path: PathBuf, from: u64, until: u64) -> Option<Batch> {
        let open = self.file.take();
        let max = self.batch_size;
        type Read = (BufReader<File>, u64, Vec<Vec<u8>>, Option<&'static str>);
        let result = tokio::task::spawn_blocking(move || -> io::Result<Read> {
            let mut reader = match open {
                Some(reader) => reader,
                None => {
                    let mut file = File::open(&path)?;
                    file.seek(SeekFrom::Start(from))?;
                    BufReader::with_capacity(1 << 20, file)
                }
            };
            let mut offset = from;
            let mut payloads = Vec::new();
            while payloads.len() < max && offset < until {
                match read_frame(&mut reader, until - offset)? {
                    (FrameRead::Record(p), n) => {
                        offset += n;
                        payloads.push(p);
                    }
                    (FrameRead::End, _) => break,
                    (FrameRead::Corrupt(why), _) => return Ok((reader, offset, payloads, Some(why))),
                }
            }
            Ok((reader, offset, payloads, None))
        })
        .await;
        let (reader, offset, payloads, corrupt) = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(segment, error = %e, "cannot read the spool; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return None;
            }
            Err(e) => {
                tracing::error!(segment, error = %e, "spool read task failed; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return None;
            }
        };
        let stats = &self.inner.stats;
        let mut envelopes = Vec::with_capacity(payloads.len());
        let mut undecodable = 0u64;
        for payload in payloads {
            match serde_json::from_slice::<Interaction>(&payload) {
                Ok(record) => envelopes.push(Envelope {
                    record,
                    enqueued_at: Instant::now(),
                    ack: None,
                    origin: Origin::Spool(SpoolRef { segment }),
                }),
                Err(e) => {
                    undecodable += 1;
                    stats.corrupt_records.fetch_add(1, Ordering::Relaxed);
                    stats.corrupt_bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
                    tracing::error!(segment, error = %e, "spooled record cannot be decoded; discarding it");
                }
            }
        }
        {
            let mut state = self.inner.lock();
            if let Some(seg) = state.segments.get_mut(&segment) {
                seg.read += envelopes.len() as u64 + undecodable;
                seg.acked += undecodable;
                if let Some(why) = corrupt {
                    // Found live (not at start-up): the rest of this segment is unreadable.
                    let discarded = until - offset;
                    stats.corrupt_records.fetch_add(1, Ordering::Relaxed);
                    stats.corrupt_bytes.fetch_add(discarded, Ordering::Relaxed);
                    tracing::error!(
                        segment,
                        offset,
                        discarded_bytes = discarded,
                        reason = why,
                        "corrupt spool frame; skipping the rest of the segment"
                    );
                    seg.records = seg.read;
                    seg.bytes = offset;
                }
            }
        }
        if undecodable > 0 {
            sub_saturating(&stats.records, undecodable);
        }
        stats.replayed.fetch_add(envelopes.len() as u64, Ordering::Relaxed);
        self.offset = offset;
        self.file = if corrupt.is_some() { None } else { Some(reader) };
        Some(Batch { envelopes })
    }
}
