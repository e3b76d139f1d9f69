//! The reader: a task that reads spooled records back in order, never past the last
//! fsync'd byte, and hands them out in batches.
//!
//! A corrupt frame found while reading (damage after the write was fsync'd) is skipped
//! by resynchronising on the next valid frame (`frame::resync`); the records it cost are
//! counted when the reader reaches the segment's durable end, from the gap between the
//! records the segment holds and the records read.
//!
//! A record counts as read once its batch is in the channel, not when it is read from
//! disk: `drop_oldest` may evict a segment meanwhile, and each of its records must then be
//! counted once, as dropped (not yet in the channel) or as read (the writers have it).

use std::io::{BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::frame::{self, Corruption, HEADER, MAGIC};
use super::io::{read_frame, read_range, ReadFile};
use super::ledger::Segment;
use super::{sub_saturating, Shared, SpoolRef, Spooled};
use crate::model::Interaction;

/// Wait before retrying after a read error.
const READ_RETRY: Duration = Duration::from_secs(1);
/// Failed reads of the same range before the reader gives up on it (counting its
/// records as lost) rather than stall every segment behind it.
const READ_ATTEMPTS: u32 = 5;
/// Look again this often even without a wake-up (belt and braces).
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// Read buffer size.
const READ_BUFFER: usize = 1 << 20;

pub(super) struct Reader {
    shared: Arc<Shared>,
    batch_size: usize,
    tx: mpsc::Sender<Vec<Spooled>>,
    /// The segment being read, if any.
    segment: Option<u64>,
    /// Where the next frame starts in it.
    offset: u64,
    /// An open reader positioned at `offset`, reused between batches.
    file: Option<BufReader<Box<dyn ReadFile>>>,
    /// Segments below this id are finished.
    next_from: u64,
    /// Consecutive failed reads of the current range.
    read_failures: u32,
}

/// What the reader should do next, decided under the lock.
enum Step {
    Read { segment: u64, path: PathBuf, from: u64, until: u64 },
    Wait,
}

/// What one blocking read found.
struct Chunk {
    reader: Option<BufReader<Box<dyn ReadFile>>>,
    /// Where reading stopped.
    offset: u64,
    payloads: Vec<Vec<u8>>,
    /// A corrupt region skipped: why, and its length.
    skipped: Option<(Corruption, u64)>,
}

impl Reader {
    pub(super) fn new(shared: Arc<Shared>, batch_size: usize, tx: mpsc::Sender<Vec<Spooled>>) -> Reader {
        Reader {
            shared,
            batch_size: batch_size.max(1),
            tx,
            segment: None,
            offset: 0,
            file: None,
            next_from: 0,
            read_failures: 0,
        }
    }

    pub(super) async fn run(mut self) {
        let shared = self.shared.clone();
        loop {
            if shared.stop_reading.is_cancelled() {
                break;
            }
            let notified = shared.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.next_step() {
                Step::Wait => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = shared.stop_reading.cancelled() => break,
                        _ = tokio::time::sleep(IDLE_RECHECK) => {}
                    }
                }
                Step::Read { segment, path, from, until } => {
                    let Some(batch) = self.read(segment, path, from, until).await else { continue };
                    if batch.is_empty() {
                        continue;
                    }
                    // Room in the channel first: a batch dropped here by `stop_reading` was
                    // never counted as read, so its records stay owed (replayed, or counted
                    // as dropped if `drop_oldest` evicts their segment).
                    let permit = tokio::select! {
                        permit = self.tx.reserve() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                        _ = shared.stop_reading.cancelled() => break,
                    };
                    self.hand_over(segment, batch, permit);
                }
            }
        }
        tracing::debug!("spool reader stopped");
    }

    /// Picks the next range to read: the rest of the current segment up to its durable
    /// length, else the next segment. Segments it finishes are deleted outside the lock.
    fn next_step(&mut self) -> Step {
        let mut finished = Vec::new();
        let step = self.plan(&mut finished);
        for seg in finished {
            self.shared.delete(seg);
        }
        step
    }

    fn plan(&mut self, finished: &mut Vec<Segment>) -> Step {
        let mut state = self.shared.lock();
        loop {
            let id = match self.segment {
                Some(id) if state.ledger.get(id).is_some() => id,
                evicted => {
                    // None yet, or the current one was evicted (drop_oldest): go on after it.
                    if let Some(old) = evicted {
                        self.next_from = self.next_from.max(old + 1);
                    }
                    self.file = None;
                    let Some(id) = state.ledger.first_from(self.next_from) else {
                        self.segment = None;
                        return Step::Wait;
                    };
                    self.segment = Some(id);
                    self.offset = MAGIC.len() as u64;
                    id
                }
            };
            let Some(seg) = state.ledger.get(id) else { continue };
            if self.offset < seg.bytes {
                return Step::Read { segment: id, path: seg.path.clone(), from: self.offset, until: seg.bytes };
            }
            // At the durable end every durable record was read or lost to corruption: count
            // the loss now, sealed or not. An idle active segment is retired only once
            // drained, so waiting for the seal would keep it, and the loss uncounted,
            // until the next start.
            let sealed = seg.sealed;
            let (lost, done) = state.ledger.finish_reading(id);
            if lost > 0 {
                let stats = &self.shared.stats;
                stats.corrupt_records.fetch_add(lost, Ordering::Relaxed);
                sub_saturating(&stats.records, lost);
                tracing::error!(
                    segment = id,
                    records = lost,
                    "spooled records lost to a corrupt or unreadable region of the segment"
                );
            }
            finished.extend(done);
            if !sealed {
                return Step::Wait;
            }
            self.next_from = id + 1;
            self.segment = None;
            self.file = None;
        }
    }

    /// Reads up to a batch of records from `segment` between `from` and `until`.
    async fn read(&mut self, segment: u64, path: PathBuf, from: u64, until: u64) -> Option<Vec<Spooled>> {
        let open = self.file.take();
        let max = self.batch_size;
        let fs = self.shared.fs.clone();
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<Chunk> {
            let mut reader = match open {
                Some(reader) => reader,
                None => {
                    let mut file = fs.open(&path)?;
                    file.seek(SeekFrom::Start(from))?;
                    BufReader::with_capacity(READ_BUFFER, file)
                }
            };
            let mut offset = from;
            let mut payloads = Vec::new();
            while payloads.len() < max && offset < until {
                match read_frame(&mut reader, until - offset)? {
                    Ok(payload) => {
                        offset += (HEADER + payload.len()) as u64;
                        payloads.push(payload);
                    }
                    Err(why) => {
                        // Read the rest of the durable range and look for the next frame.
                        let rest = read_range(&*fs, &path, offset, until)?;
                        let skip = frame::resync(&rest).unwrap_or(rest.len()) as u64;
                        return Ok(Chunk { reader: None, offset: offset + skip, payloads, skipped: Some((why, skip)) });
                    }
                }
            }
            Ok(Chunk { reader: Some(reader), offset, payloads, skipped: None })
        })
        .await;
        let chunk = match result {
            Ok(Ok(chunk)) => {
                self.read_failures = 0;
                chunk
            }
            Ok(Err(e)) => {
                self.read_failures += 1;
                if e.kind() == std::io::ErrorKind::NotFound || self.read_failures >= READ_ATTEMPTS {
                    // Deleted under the spool, or unreadable: skip to the durable end; the
                    // records there are counted as lost when the segment is finished.
                    tracing::error!(
                        segment,
                        from,
                        until,
                        attempts = self.read_failures,
                        error = %e,
                        "spool segment unreadable; giving up on this part of it, its records are counted as lost"
                    );
                    self.read_failures = 0;
                    self.offset = until;
                    return None;
                }
                tracing::error!(segment, error = %e, "cannot read the spool; retrying in 1s");
                tokio::time::sleep(READ_RETRY).await;
                return None;
            }
            Err(e) => {
                tracing::error!(segment, error = %e, "spool read task failed; retrying in 1s");
                tokio::time::sleep(READ_RETRY).await;
                return None;
            }
        };
        if let Some((why, bytes)) = chunk.skipped {
            tracing::error!(
                segment,
                offset = chunk.offset - bytes,
                skipped_bytes = bytes,
                reason = why.as_str(),
                "corrupt spool frame; skipped to the next valid frame"
            );
        }
        let stats = &self.shared.stats;
        let at = SpoolRef { segment };
        let mut batch = Vec::with_capacity(chunk.payloads.len());
        let (mut undecodable, mut undecodable_bytes) = (0u64, 0u64);
        for payload in chunk.payloads {
            match serde_json::from_slice::<Interaction>(&payload) {
                Ok(record) => batch.push(Spooled { record, at }),
                Err(e) => {
                    undecodable += 1;
                    undecodable_bytes += payload.len() as u64;
                    tracing::error!(segment, error = %e, "spooled record cannot be decoded; discarding it");
                }
            }
        }
        // Counted only if the segment was not evicted meanwhile: eviction counted them.
        if undecodable > 0 && self.shared.lock().ledger.handed_out(segment, 0, undecodable) {
            stats.corrupt_records.fetch_add(undecodable, Ordering::Relaxed);
            stats.corrupt_bytes.fetch_add(undecodable_bytes, Ordering::Relaxed);
            sub_saturating(&stats.records, undecodable);
        }
        self.offset = chunk.offset;
        self.file = chunk.reader;
        Some(batch)
    }

    /// Counts a batch as read and puts it in the channel, in one step under the lock, so
    /// that an eviction (`drop_oldest`) counts each record either as dropped or as read,
    /// never both nor neither. A batch whose segment was evicted since it was read is
    /// discarded: the eviction counted its records as dropped.
    fn hand_over(&self, segment: u64, batch: Vec<Spooled>, permit: mpsc::Permit<'_, Vec<Spooled>>) {
        let n = batch.len() as u64;
        let mut state = self.shared.lock();
        if !state.ledger.handed_out(segment, n, 0) {
            drop(state);
            tracing::warn!(
                segment,
                records = n,
                "spool segment evicted while its records were being read; they were counted as dropped"
            );
            return;
        }
        permit.send(batch);
        drop(state);
        self.shared.stats.replayed.fetch_add(n, Ordering::Relaxed);
    }
}
