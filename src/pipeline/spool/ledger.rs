//! The segment table, shared by the appender and the reader under the spool's lock.
//!
//! Each segment counts what happened to its records: `records` fsync'd, `read` handed to
//! the writers (or found unreadable), `settled` reported back as committed (or
//! otherwise finished with). The rule this file exists for: a segment leaves the table
//! for deletion only when it is *done*: sealed (no more appends), every record read,
//! every record read settled. `Ledger::take_if_done` is the one place that decides it;
//! every method that can finish a segment returns it for the caller to delete outside
//! the lock. The only other way out is [`Ledger::evict`], the `drop_oldest` full
//! policy, whose records are counted as dropped.
//!
//! The table lives in memory only: at start-up it is rebuilt from the files on disk
//! (`recovery`). A crash between "the segment is done" and "its file is deleted" leaves
//! a file whose records were committed; they are replayed, and idempotent writes make
//! that harmless. There is no second record of deletion to fall out of step with.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

/// One segment file's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The file.
    pub path: PathBuf,
    /// Durable (fsync'd) length in bytes, magic included.
    pub bytes: u64,
    /// Durable records.
    pub records: u64,
    /// No more appends will come.
    pub sealed: bool,
    /// Records handed out by the reader, or found unreadable.
    pub read: u64,
    /// Records settled (committed, already stored, dead-lettered, or unreadable).
    pub settled: u64,
    /// When its first record was written, at the latest: creation for a new segment,
    /// the file's modification time for one found at start-up (its records are older).
    pub since: SystemTime,
}

impl Segment {
    /// A segment found at start-up: sealed, nothing read yet.
    pub fn recovered(path: PathBuf, bytes: u64, records: u64) -> Segment {
        let since = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|_| SystemTime::now());
        Segment { path, bytes, records, sealed: true, read: 0, settled: 0, since }
    }

    /// A new segment the appender writes to.
    pub fn active(path: PathBuf, bytes: u64) -> Segment {
        Segment { path, bytes, records: 0, sealed: false, read: 0, settled: 0, since: SystemTime::now() }
    }

    /// Every record read and every record read settled.
    pub fn drained(&self) -> bool {
        self.read >= self.records && self.settled >= self.read
    }

    /// Sealed and drained: its file may be deleted.
    pub fn done(&self) -> bool {
        self.sealed && self.drained()
    }
}

/// What settling records found.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// The segment is gone already (evicted by `drop_oldest` while its records were in
    /// flight).
    Gone,
    /// Recorded; the segment still has work.
    Kept,
    /// That finished the segment: delete its file.
    Done(Segment),
}

/// The table of live segments, by id (ids grow; lower is older).
#[derive(Debug, Default)]
pub struct Ledger {
    segments: BTreeMap<u64, Segment>,
    next_id: u64,
}

impl Ledger {
    /// A ledger of recovered segments; new ids start after `highest_seen`.
    pub fn new(segments: BTreeMap<u64, Segment>, highest_seen: Option<u64>) -> Ledger {
        Ledger { segments, next_id: highest_seen.map_or(1, |h| h + 1) }
    }

    /// Reserves the id of the next segment.
    pub fn allocate(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Adds a segment.
    pub fn insert(&mut self, id: u64, segment: Segment) {
        self.segments.insert(id, segment);
    }

    /// The segment, if still live.
    pub fn get(&self, id: u64) -> Option<&Segment> {
        self.segments.get(&id)
    }

    /// The oldest live segment with an id of at least `from`.
    pub fn first_from(&self, from: u64) -> Option<u64> {
        self.segments.range(from..).next().map(|(&id, _)| id)
    }

    /// When the oldest record not yet settled was written, at the latest.
    pub fn oldest_unsettled_since(&self) -> Option<SystemTime> {
        self.segments.values().filter(|s| s.settled < s.records).map(|s| s.since).min()
    }

    /// The oldest live segment.
    pub fn oldest(&self) -> Option<u64> {
        self.segments.keys().next().copied()
    }

    /// Records that `bytes`/`records` of segment `id` are now durable.
    pub fn appended(&mut self, id: u64, bytes: u64, records: u64) {
        if let Some(seg) = self.segments.get_mut(&id) {
            seg.bytes = bytes;
            seg.records = records;
        }
    }

    /// Seals a segment: no more appends. Returns it if that finished it.
    pub fn seal(&mut self, id: u64) -> Option<Segment> {
        self.segments.get_mut(&id)?.sealed = true;
        self.take_if_done(id)
    }

    /// Counts records the reader handed out, and records it found unreadable (which are
    /// settled at once: there is nothing to commit). False when the segment is gone
    /// (evicted: its records not yet read were counted as dropped).
    pub fn handed_out(&mut self, id: u64, records: u64, unreadable: u64) -> bool {
        let Some(seg) = self.segments.get_mut(&id) else { return false };
        seg.read += records + unreadable;
        seg.settled += unreadable;
        true
    }

    /// Settles `n` records of segment `id`.
    pub fn settle(&mut self, id: u64, n: u64) -> Settled {
        let Some(seg) = self.segments.get_mut(&id) else { return Settled::Gone };
        seg.settled += n;
        match self.take_if_done(id) {
            Some(seg) => Settled::Done(seg),
            None => Settled::Kept,
        }
    }

    /// The reader reached the durable end of a segment (sealed or still active). Records
    /// it never saw (lost inside corrupt bytes found after they were written) count as read
    /// and settled; returns how many, and the segment if that finished it.
    pub fn finish_reading(&mut self, id: u64) -> (u64, Option<Segment>) {
        let Some(seg) = self.segments.get_mut(&id) else { return (0, None) };
        let lost = seg.records.saturating_sub(seg.read);
        seg.read += lost;
        seg.settled += lost;
        (lost, self.take_if_done(id))
    }

    /// True when the active segment `id` has been read and settled to its durable end,
    /// so the appender may retire it.
    pub fn drained(&self, id: u64) -> bool {
        self.segments.get(&id).is_some_and(Segment::drained)
    }

    /// Removes segment `id` whatever its state (`drop_oldest`); its records not yet read
    /// are lost and must be counted by the caller. `None` when it is gone already (it
    /// finished between the caller's look and this call).
    pub fn evict(&mut self, id: u64) -> Option<Segment> {
        self.segments.remove(&id)
    }

    /// The one rule: a segment leaves the table for deletion only when done.
    fn take_if_done(&mut self, id: u64) -> Option<Segment> {
        if self.segments.get(&id).is_some_and(Segment::done) {
            self.segments.remove(&id)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_is_done_only_when_sealed_read_and_settled() {
        let mut ledger = Ledger::default();
        let id = ledger.allocate();
        ledger.insert(id, Segment::active("a.seg".into(), 8));
        ledger.appended(id, 100, 3);
        ledger.handed_out(id, 3, 0);
        assert_eq!(ledger.settle(id, 3), Settled::Kept, "not sealed yet");
        assert!(ledger.seal(id).is_some(), "sealing a drained segment finishes it");
        assert_eq!(ledger.settle(id, 1), Settled::Gone);
    }

    #[test]
    fn eviction_is_by_id_so_a_segment_that_finished_meanwhile_is_not_replaced() {
        // Regression: "evict the oldest" after "look at the oldest" could evict the next
        // segment (even the active one) when the first finished in between.
        let mut ledger = Ledger::default();
        ledger.insert(1, Segment::recovered("1.seg".into(), 100, 1));
        ledger.insert(2, Segment::active("2.seg".into(), 8));
        let oldest = ledger.oldest().unwrap();
        ledger.handed_out(1, 1, 0);
        assert!(matches!(ledger.settle(1, 1), Settled::Done(_)), "segment 1 finishes meanwhile");
        assert_eq!(ledger.evict(oldest), None);
        assert!(ledger.get(2).is_some(), "the active segment is untouched");
    }

    #[test]
    fn records_lost_to_corruption_are_counted_when_reading_finishes() {
        let mut ledger = Ledger::default();
        ledger.insert(7, Segment::recovered("b.seg".into(), 100, 5));
        ledger.handed_out(7, 3, 0);
        ledger.settle(7, 3);
        let (lost, done) = ledger.finish_reading(7);
        assert_eq!(lost, 2);
        assert!(done.is_some());
    }
}
