//! The appender: one thread that writes frames to the active segment, fsyncs them in
//! groups, rotates segments, and applies the full policy.
//!
//! Group commit: producers queue frames under the lock and wake the thread; the thread
//! takes everything queued, writes it with one `write` and one `fdatasync`, then resolves
//! every [`FsyncNotice`] of the group. Appends that arrive during an fsync share the next
//! one, so the fsync rate, not the record rate, bounds the disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::frame::MAGIC;
use super::io::AppendFile;
use super::ledger::Segment;
use super::recovery::{segment_path, valid_marker_path};
use super::{sub_saturating, FsyncNotice, Pending, Shared, SpoolError, SpoolStats};
use crate::config::FullPolicy;

/// How long the appender sleeps when idle before checking whether the active segment is
/// fully settled and can be retired.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// How often a `block`ed append looks again for room.
const BLOCK_POLL: Duration = Duration::from_millis(20);

/// The room a frame of `size` bytes needs under the cap: itself and the magic of the
/// segment it may open. Whether it opens one is known only after making room (`drop_oldest`
/// may evict the active segment, `block` may retire it), so the magic is always reserved:
/// 8 bytes of slack, against a cap overrun by a segment opened when the spool was full.
fn room_for(size: u64) -> u64 {
    size + MAGIC.len() as u64
}

/// Starts the appender thread.
pub(super) fn spawn(shared: Arc<Shared>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("audit-spool-writer".into()).spawn(move || Appender::new(shared).run())
}

/// The segment being written; owned by the appender thread.
struct Active {
    id: u64,
    path: PathBuf,
    file: Box<dyn AppendFile>,
    /// Durable length.
    len: u64,
    /// Durable records.
    records: u64,
}

struct Appender {
    shared: Arc<Shared>,
    active: Option<Active>,
}

/// Frames written to the active segment but not yet fsync'd.
#[derive(Default)]
struct Group {
    bytes: Vec<u8>,
    records: u64,
    notices: Vec<Option<FsyncNotice>>,
}

impl Appender {
    fn new(shared: Arc<Shared>) -> Self {
        Appender { shared, active: None }
    }

    fn run(mut self) {
        loop {
            let work: Vec<Pending> = {
                let mut state = self.shared.lock();
                while state.pending.is_empty() && !state.closing {
                    let (guard, timeout) =
                        self.shared.work.wait_timeout(state, IDLE_CHECK).unwrap_or_else(|p| p.into_inner());
                    state = guard;
                    if timeout.timed_out() && state.pending.is_empty() {
                        drop(state);
                        self.retire_if_drained();
                        state = self.shared.lock();
                    }
                }
                if state.pending.is_empty() && state.closing {
                    break;
                }
                state.pending_unnoticed = 0;
                state.writing = state.pending.len();
                state.pending.drain(..).collect()
            };
            self.write_group(work);
            self.shared.lock().writing = 0;
        }
        self.seal_active();
    }

    /// Writes a group of frames and fsyncs once for all of them.
    fn write_group(&mut self, work: Vec<Pending>) {
        let mut group = Group::default();
        for item in work {
            let size = item.frame.len() as u64;
            let over_cap = self.shared.stats.bytes.load(Ordering::Relaxed) + room_for(size) > self.shared.max_bytes;
            // Making room may seal or delete the active segment: what is buffered for it
            // must be on disk first.
            if over_cap && !group.bytes.is_empty() {
                self.flush(&mut group);
            }
            if !self.make_room(size) {
                self.refuse(item.notice, SpoolError::Full { max_bytes: self.shared.max_bytes });
                continue;
            }
            let needs_rotation = self
                .active
                .as_ref()
                .is_some_and(|a| a.len + group.bytes.len() as u64 + size > self.shared.segment_bytes);
            if needs_rotation || self.active.is_none() {
                // What is buffered belongs to the current segment: write it first. On
                // failure the active segment is sealed; this record goes to a new one.
                if !group.bytes.is_empty() {
                    self.flush(&mut group);
                }
                if needs_rotation {
                    self.seal_active();
                }
                if let Err(e) = self.open_active() {
                    tracing::error!(error = %e, "cannot create a spool segment");
                    self.refuse(item.notice, e);
                    continue;
                }
            }
            group.bytes.extend_from_slice(&item.frame);
            group.records += 1;
            group.notices.push(item.notice);
            // The cap is checked per frame against what is durable plus what is buffered.
            self.shared.stats.bytes.fetch_add(size, Ordering::Relaxed);
        }
        if !group.bytes.is_empty() {
            self.flush(&mut group);
        }
    }

    /// Writes the group to the active segment and fsyncs it; resolves its notices.
    fn flush(&mut self, group: &mut Group) {
        let bytes = group.bytes.len() as u64;
        let records = std::mem::take(&mut group.records);
        let notices = std::mem::take(&mut group.notices);
        let result = match self.active.as_mut() {
            Some(active) => {
                active.file.append(&group.bytes).and_then(|()| active.file.sync()).map_err(|e| (active.path.clone(), e))
            }
            None => Err((self.shared.dir.clone(), std::io::Error::other("no active segment"))),
        };
        group.bytes.clear();
        match result {
            Ok(()) => {
                let active = self.active.as_mut().expect("checked above");
                active.len += bytes;
                active.records += records;
                // Counted before they become readable: a reader and a commit could
                // otherwise settle them first, and the gauge, clamped at 0, would drift up.
                self.shared.stats.spooled.fetch_add(records, Ordering::Relaxed);
                self.shared.stats.records.fetch_add(records, Ordering::Relaxed);
                self.shared.lock().ledger.appended(active.id, active.len, active.records);
                self.shared.readable.notify_one();
                for notice in notices.into_iter().flatten() {
                    let _ = notice.send(Ok(()));
                }
            }
            Err((path, e)) => {
                tracing::error!(segment = %path.display(), records, error = %e, "spool write failed; these records are lost");
                sub_saturating(&self.shared.stats.bytes, bytes);
                self.shared.stats.dropped_io.fetch_add(records, Ordering::Relaxed);
                // Cut off whatever part of the group reached the file, and move on to a
                // fresh segment.
                if let Some(active) = self.active.as_mut() {
                    if let Err(e) = active.file.truncate(active.len) {
                        let valid = active.len;
                        self.mark_valid_length(&path, valid, &e);
                    }
                }
                self.seal_active();
                let error = SpoolError::Io { path, cause: e };
                for notice in notices.into_iter().flatten() {
                    let _ = notice.send(Err(error.duplicate()));
                }
            }
        }
    }

    /// The failed part of a write could not be cut off: records the valid length beside
    /// the segment, so the next start does not replay frames reported as failed. (In this
    /// run the ledger already ends the segment there.)
    fn mark_valid_length(&self, segment: &Path, valid: u64, cut_error: &std::io::Error) {
        let fs = &self.shared.fs;
        let marker = valid_marker_path(segment);
        let written = fs.create(&marker).and_then(|mut file| {
            file.append(valid.to_string().as_bytes())?;
            file.sync()?;
            fs.sync_dir(&self.shared.dir)
        });
        match written {
            Ok(()) => tracing::warn!(
                segment = %segment.display(),
                valid_bytes = valid,
                error = %cut_error,
                "cannot cut a failed write off the segment; recorded its valid length for the next start"
            ),
            Err(e) => tracing::error!(
                segment = %segment.display(),
                error = %cut_error,
                marker_error = %e,
                "cannot cut a failed write off the segment nor record its valid length; the next start may replay those records"
            ),
        }
    }

    /// Counts and reports a record the spool could not take.
    fn refuse(&self, notice: Option<FsyncNotice>, error: SpoolError) {
        match &error {
            SpoolError::Full { .. } => self.shared.stats.dropped_full.fetch_add(1, Ordering::Relaxed),
            _ => self.shared.stats.dropped_io.fetch_add(1, Ordering::Relaxed),
        };
        match notice {
            Some(notice) => {
                let _ = notice.send(Err(error));
            }
            None => tracing::warn!(error = %error, "audit record dropped by the spool"),
        }
    }

    /// Ensures `size` more bytes fit under the cap, applying the full policy. False when
    /// the record must be refused.
    fn make_room(&mut self, size: u64) -> bool {
        let shared = self.shared.clone();
        let max_bytes = shared.max_bytes;
        let needed = room_for(size);
        let fits = |stats: &SpoolStats| stats.bytes.load(Ordering::Relaxed) + needed <= max_bytes;
        if fits(&shared.stats) {
            return true;
        }
        if needed > max_bytes {
            return false;
        }
        match shared.policy {
            FullPolicy::DropNewest => false,
            FullPolicy::DropOldest => {
                while !fits(&shared.stats) {
                    let oldest = shared.lock().ledger.oldest();
                    let Some(oldest) = oldest else { return fits(&shared.stats) };
                    if self.active.as_ref().is_some_and(|a| a.id == oldest) {
                        self.seal_active();
                    }
                    // By id, not "the oldest now": a segment that finished meanwhile must
                    // not make this evict the next one (perhaps the active one).
                    let evicted = shared.lock().ledger.evict(oldest);
                    if let Some(seg) = evicted {
                        let lost = seg.records.saturating_sub(seg.read);
                        shared.stats.dropped_full.fetch_add(lost, Ordering::Relaxed);
                        sub_saturating(&shared.stats.records, lost);
                        tracing::warn!(
                            segment = %seg.path.display(),
                            records = lost,
                            "spool full: dropped its oldest segment (audit.spool.full_policy: drop_oldest)"
                        );
                        shared.delete(seg);
                    }
                }
                true
            }
            FullPolicy::Block => {
                let mut warned = false;
                while !fits(&shared.stats) {
                    if shared.lock().closing {
                        return false;
                    }
                    if !warned {
                        tracing::warn!("spool full: durable producers wait for room (audit.spool.full_policy: block)");
                        warned = true;
                    }
                    // Room comes from writers settling segments; the active one may be the
                    // only thing left to free, so let it be retired when drained.
                    self.retire_if_drained();
                    std::thread::sleep(BLOCK_POLL);
                }
                true
            }
        }
    }

    fn open_active(&mut self) -> Result<(), SpoolError> {
        let id = self.shared.lock().ledger.allocate();
        let path = segment_path(&self.shared.dir, id);
        let fs = &self.shared.fs;
        let mut file = fs.create(&path).map_err(|e| SpoolError::io(&path, e))?;
        if let Err(e) = file.append(MAGIC).and_then(|()| file.sync()) {
            // A file that holds no record yet: nothing lost by removing it.
            let _ = fs.remove(&path);
            return Err(SpoolError::io(&path, e));
        }
        // The new name must survive a crash too. If it cannot be made to, the file holds no
        // record yet: remove it, or it would outlive every record, uncounted in `bytes`.
        if let Err(e) = fs.sync_dir(&self.shared.dir) {
            let _ = fs.remove(&path);
            return Err(SpoolError::io(&self.shared.dir, e));
        }
        let len = MAGIC.len() as u64;
        self.shared.stats.bytes.fetch_add(len, Ordering::Relaxed);
        self.shared.lock().ledger.insert(id, Segment::active(path.clone(), len));
        self.active = Some(Active { id, path, file, len, records: 0 });
        Ok(())
    }

    /// Marks the active segment as complete; the reader may finish it.
    fn seal_active(&mut self) {
        let Some(active) = self.active.take() else { return };
        let finished = self.shared.lock().ledger.seal(active.id);
        if let Some(seg) = finished {
            self.shared.delete(seg);
        }
        self.shared.readable.notify_one();
    }

    /// Retires the active segment when the reader has read all of it and every record is
    /// settled, so a drained spool leaves no files behind.
    fn retire_if_drained(&mut self) {
        let Some(active) = &self.active else { return };
        if self.shared.lock().ledger.drained(active.id) {
            self.seal_active();
        }
    }
}
