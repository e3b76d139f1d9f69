//! The disk spool (`pipeline::spool`) checked against what its design doc promises, in
//! the manner of vector's disk buffer tests (a model, invariants, named regressions):
//!
//! - a model-based test: random sequences of appends, reads, settlements, reopenings and
//!   crashes (a damaged tail) run against the real spool on real files, and after every
//!   step compared with a plain in-memory queue: order, no duplicates beyond the
//!   documented replay, every record read or counted as dropped, disk use within
//!   `max_bytes`, a segment file only while it holds unsettled records;
//! - property tests of the pure parts (`frame`, `recovery::check`), which every other
//!   guarantee rests on: decoding never panics, frames round-trip, and one corrupt frame
//!   costs only itself (the resync argument in `frame`'s docs);
//! - fault injection through the `Filesystem` seam (disk full, I/O errors on create,
//!   write and fsync), which real disks produce and a temp dir never does;
//! - example tests of corruption in the middle of a segment, found at start-up and live;
//! - named regression tests for the bugs these found.
//!
//! Everything runs on a 2-core machine: the model test is bounded (cases, actions,
//! record and segment sizes) to stay well under a minute. `PROPTEST_CASES` raises the
//! number of cases for a longer soak.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::common::spool::{config, read_n, settle_all, PATIENCE};
use opsagent_audit::config::{FullPolicy, SpoolConfig};
use opsagent_audit::model::{Interaction, Status};
use opsagent_audit::pipeline::spool::frame::{self, Corruption, Decoded, HEADER, MAGIC};
use opsagent_audit::pipeline::spool::{recovery, AppendFile, Filesystem, ReadFile, StdFilesystem};
use opsagent_audit::pipeline::{Spool, SpoolError, SpoolRef, SpoolStats, Spooled};
use proptest::prelude::*;
use proptest::sample::Index;
use tokio::sync::mpsc;
use uuid::Uuid;

/// How long a read waits when nothing has to come.
const GLANCE: Duration = Duration::from_millis(30);
/// How long a record that must not come is waited for.
const QUIET: Duration = Duration::from_millis(200);
/// Longer than the appender's idle check (500 ms), which retires a drained segment.
const IDLE_RETIREMENT: Duration = Duration::from_secs(3);
/// Bound on fire-and-forget records waiting for the appender (unused by durable appends).
const PENDING_LIMIT: usize = 1000;

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn records(n: usize) -> Vec<Interaction> {
    (0..n).map(|i| Interaction::new(format!("question {i}: {}", "x".repeat(100)))).collect()
}

/// The segment files in `dir`: id to length.
fn segment_files(dir: &Path) -> BTreeMap<u64, u64> {
    fs::read_dir(dir)
        .expect("read the spool dir")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let id = u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()?;
            // A file deleted between listing and stat is simply gone.
            Some((id, entry.metadata().ok()?.len()))
        })
        .collect()
}

/// Where each whole frame of a segment file starts, and its length.
fn frames_of(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut frames = Vec::new();
    let mut at = MAGIC.len();
    while let Decoded::Frame { len, .. } = frame::decode(&bytes[at..]) {
        frames.push((at, len));
        at += len;
    }
    frames
}

fn flip_byte(path: &Path, at: u64, mask: u8) {
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path).expect("open segment");
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).unwrap();
    io::Read::read_exact(&mut file, &mut byte).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&[byte[0] ^ mask]).unwrap();
    file.sync_all().unwrap();
}

/// Asserts that no further batch arrives for a while.
async fn nothing_more(rx: &mut mpsc::Receiver<Vec<Spooled>>) {
    if let Ok(Some(batch)) = tokio::time::timeout(QUIET, rx.recv()).await {
        let questions: Vec<&str> = batch.iter().map(|s| s.record.question.as_str()).collect();
        panic!("unexpected records read back: {questions:?}");
    }
}

fn questions(records: impl IntoIterator<Item = Interaction>) -> Vec<String> {
    records.into_iter().map(|r| r.question).collect()
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The proptest runner's case count: `cases`, unless `PROPTEST_CASES` asks for more.
fn cases(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    // Failures are kept as named regression tests below, not as files beside the source.
    ProptestConfig { cases, failure_persistence: None, max_shrink_time: 120_000, ..ProptestConfig::default() }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------
// 1. The model
// ---------------------------------------------------------------------------------------

/// What the model knows of a record still (possibly) in the spool during one open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Not handed to the test yet in this open.
    Queued,
    /// Handed to the test from this segment, not settled.
    Read(u64),
    /// Handed to the test from this segment and settled.
    Settled(u64),
}

impl Held {
    fn segment(self) -> Option<u64> {
        match self {
            Held::Queued => None,
            Held::Read(s) | Held::Settled(s) => Some(s),
        }
    }
}

#[derive(Debug)]
struct Entry {
    idx: usize,
    held: Held,
}

/// The spool as a queue. The model does not simulate segments: it learns a record's
/// segment when the record is read, and learns from the directory which segments a
/// reopening found, so it checks outcomes without re-implementing the appender.
#[derive(Debug)]
struct Model {
    policy: FullPolicy,
    /// Records the spool holds or still owes the test, in append order. Records handed to
    /// the test always precede those not handed out yet.
    entries: VecDeque<Entry>,
    /// Records `drop_oldest` counted as dropped that no skipped record has matched yet:
    /// the model cannot know which unread records an evicted segment held, only how many.
    unmatched_drops: u64,
    /// The highest segment read from in this open (segments are read in id order).
    last_segment: u64,
    /// Segments `drop_oldest` evicted while records read from them were unsettled. Those
    /// records are still settled (as a writer would, finding the segment gone) but never
    /// come back after a reopening.
    evicted: BTreeSet<u64>,
    /// Fates, over the whole run.
    delivered: BTreeSet<usize>,
    refused: BTreeSet<usize>,
    skipped: BTreeSet<usize>,
    torn: BTreeSet<usize>,
    /// `corrupt_records` the damage done so far must have produced.
    expect_corrupt: u64,
}

impl Model {
    fn new(policy: FullPolicy) -> Model {
        Model {
            policy,
            entries: VecDeque::new(),
            unmatched_drops: 0,
            last_segment: 0,
            evicted: BTreeSet::new(),
            delivered: BTreeSet::new(),
            refused: BTreeSet::new(),
            skipped: BTreeSet::new(),
            torn: BTreeSet::new(),
            expect_corrupt: 0,
        }
    }

    fn queued(&self) -> u64 {
        self.entries.iter().filter(|e| e.held == Held::Queued).count() as u64
    }

    /// More records are owed than counted drops could explain: one must come.
    fn must_deliver(&self) -> bool {
        self.queued() > self.unmatched_drops
    }

    /// The spool handed out record `idx` from `segment`.
    fn handed_out(&mut self, idx: usize, segment: u64) {
        let Some(pos) = self.entries.iter().position(|e| e.idx == idx && e.held == Held::Queued) else {
            let known = self.entries.iter().find(|e| e.idx == idx);
            panic!(
                "record {idx} read back from segment {segment}, but the spool owes no such record \
                 (model entry: {known:?}; a duplicate, a record that was dropped, or one whose \
                 segment should have been deleted)"
            );
        };
        // Queued records before it were not read: only drop_oldest's eviction may do that,
        // and each must be counted.
        let passed: Vec<usize> =
            self.entries.iter().take(pos).filter(|e| e.held == Held::Queued).map(|e| e.idx).collect();
        assert!(
            passed.len() as u64 <= self.unmatched_drops,
            "records {passed:?} were skipped before record {idx} (out of order or lost), but only {} drops \
             were counted for them under {:?}",
            self.unmatched_drops,
            self.policy
        );
        self.unmatched_drops -= passed.len() as u64;
        self.skipped.extend(&passed);
        self.entries.retain(|e| !(e.held == Held::Queued && passed.contains(&e.idx)));
        let entry = self.entries.iter_mut().find(|e| e.idx == idx).expect("still there");
        entry.held = Held::Read(segment);
        self.delivered.insert(idx);
    }

    /// Checks the segment files against what the model knows, and forgets records whose
    /// segment is gone. `closed`: the spool was just closed (its active segment sealed).
    fn check_segments(&mut self, files: &BTreeMap<u64, u64>, closed: bool) {
        let oldest_on_disk = files.keys().next().copied().unwrap_or(u64::MAX);
        let known: BTreeSet<u64> = self.entries.iter().filter_map(|e| e.held.segment()).collect();
        for &s in &known {
            let unsettled = self.entries.iter().filter(|e| e.held == Held::Read(s)).count();
            if files.contains_key(&s) {
                // A later segment was read, so this one was sealed and wholly read: once all
                // of it is settled its file must be gone (settling deletes synchronously).
                let complete = s < self.last_segment || (closed && self.queued() == 0);
                assert!(
                    unsettled > 0 || !complete,
                    "segment {s} is still on disk though every record in it was read and settled \
                     (files: {files:?})"
                );
                continue;
            }
            // Records of a deleted segment never come back.
            if unsettled > 0 && !self.evicted.contains(&s) {
                // Eviction takes the oldest segment, so it is older than any still on disk.
                assert!(
                    self.policy == FullPolicy::DropOldest && s < oldest_on_disk,
                    "segment {s} was deleted while {unsettled} records read from it were not settled \
                     (files: {files:?}, policy {:?})",
                    self.policy
                );
                self.evicted.insert(s);
            }
            self.entries.retain(|e| e.held != Held::Settled(s));
        }
        if closed && self.queued() == 0 {
            for s in files.keys() {
                assert!(
                    self.entries.iter().any(|e| e.held == Held::Read(*s)),
                    "segment {s} is on disk after close, yet every record still in the spool is in \
                     another segment (files: {files:?}, model: {:?})",
                    self.entries
                );
            }
        }
    }

    /// After a reopening every record left on disk comes back, in order: those never read,
    /// those read and not settled, and the settled ones sharing a segment with them (the
    /// documented replay; writes are idempotent on `interaction_id`).
    fn reopened(&mut self) {
        let evicted = std::mem::take(&mut self.evicted);
        self.entries.retain(|e| e.held.segment().is_none_or(|s| !evicted.contains(&s)));
        for e in &mut self.entries {
            e.held = Held::Queued;
        }
        self.last_segment = 0;
    }
}

#[derive(Debug, Clone)]
enum Damage {
    /// Cut the newest segment inside its last frame (at this byte of it, never its first
    /// or past its last): a crash mid-write.
    Truncate(Index),
    /// Append these bytes to the newest segment: a crash mid-write of a frame's header.
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Action {
    /// Append records with questions of these lengths, all awaited for their fsync.
    Append(Vec<usize>),
    /// Wait for one batch from the reader.
    Read,
    /// Settle the records read and not settled whose position (mod 64) is set here.
    Settle(u64),
    /// Close and open again.
    Reopen,
    /// Close, damage the newest segment's tail, open again.
    Crash(Damage),
}

#[derive(Debug, Clone)]
struct Setup {
    policy: FullPolicy,
    segment_bytes: u64,
    max_bytes: u64,
    batch_size: usize,
}

fn setup() -> impl Strategy<Value = Setup> {
    (prop_oneof![Just(FullPolicy::DropOldest), Just(FullPolicy::DropNewest)], 2048u64..=8192, 2u64..=4, 1usize..=8)
        .prop_map(|(policy, segment_bytes, segments, batch_size)| Setup {
            policy,
            segment_bytes,
            // A few segments, so rotation and the full policy both happen often.
            max_bytes: segment_bytes * segments,
            batch_size,
        })
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        // A record is ~0.6 KiB of JSON plus its question.
        4 => prop::collection::vec(0usize..400, 1..=6).prop_map(Action::Append),
        4 => Just(Action::Read),
        3 => prop_oneof![Just(u64::MAX), any::<u64>()].prop_map(Action::Settle),
        1 => Just(Action::Reopen),
        1 => prop_oneof![
            any::<Index>().prop_map(Damage::Truncate),
            // Fewer bytes than a header, so the garbage cannot happen to be a valid frame.
            prop::collection::vec(any::<u8>(), 1..HEADER).prop_map(Damage::Garbage),
        ]
        .prop_map(Action::Crash),
    ]
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    dropped_full: u64,
    dropped_io: u64,
    corrupt: u64,
}

impl Counters {
    fn of(stats: &SpoolStats) -> Counters {
        Counters {
            dropped_full: load(&stats.dropped_full),
            dropped_io: load(&stats.dropped_io),
            corrupt: load(&stats.corrupt_records),
        }
    }

    fn plus(self, o: Counters) -> Counters {
        Counters {
            dropped_full: self.dropped_full + o.dropped_full,
            dropped_io: self.dropped_io + o.dropped_io,
            corrupt: self.corrupt + o.corrupt,
        }
    }
}

/// The real spool, the model, and what connects them.
struct Harness {
    dir: tempfile::TempDir,
    config: SpoolConfig,
    batch_size: usize,
    spool: Spool,
    rx: mpsc::Receiver<Vec<Spooled>>,
    sent: Vec<Interaction>,
    index: HashMap<Uuid, usize>,
    /// Counters of the spools closed so far (each open starts its own).
    past: Counters,
    model: Model,
}

impl Harness {
    fn new(setup: &Setup) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = SpoolConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: setup.max_bytes,
            segment_bytes: setup.segment_bytes,
            full_policy: setup.policy,
            ..SpoolConfig::default()
        };
        let spool = Spool::open(&config, PENDING_LIMIT).expect("open the spool");
        let rx = spool.start_reader(setup.batch_size);
        Harness {
            dir,
            config,
            batch_size: setup.batch_size,
            spool,
            rx,
            sent: Vec::new(),
            index: HashMap::new(),
            past: Counters::default(),
            model: Model::new(setup.policy),
        }
    }

    fn counters(&self) -> Counters {
        self.past.plus(Counters::of(&self.spool.stats()))
    }

    async fn step(&mut self, action: &Action) {
        match action {
            Action::Append(lens) => self.append(lens).await,
            Action::Read => self.read(GLANCE).await,
            Action::Settle(mask) => self.settle(*mask),
            Action::Reopen => self.reopen(None).await,
            Action::Crash(damage) => self.reopen(Some(damage)).await,
        }
        self.check(false);
    }

    async fn append(&mut self, lens: &[usize]) {
        let first = self.sent.len();
        let batch: Vec<Interaction> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| Interaction::new(format!("r{} {}", first + i, "q".repeat(n))))
            .collect();
        let stats = self.spool.stats();
        let dropped_before = load(&stats.dropped_full);
        // Concurrently, so appends share fsyncs (group commit) as they do in production.
        let results = futures::future::join_all(batch.iter().map(|r| self.spool.append_durable(r))).await;
        let mut refused = 0;
        for (record, result) in batch.into_iter().zip(results) {
            let idx = self.sent.len();
            self.index.insert(record.interaction_id, idx);
            self.sent.push(record);
            match result {
                Ok(()) => self.model.entries.push_back(Entry { idx, held: Held::Queued }),
                Err(SpoolError::Full { .. }) if self.model.policy == FullPolicy::DropNewest => {
                    refused += 1;
                    self.model.refused.insert(idx);
                }
                Err(e) => panic!("append of record {idx} failed under {:?}: {e}", self.model.policy),
            }
        }
        let counted = load(&stats.dropped_full) - dropped_before;
        match self.model.policy {
            FullPolicy::DropNewest => assert_eq!(counted, refused, "drop_newest counts exactly the records it refused"),
            _ => self.model.unmatched_drops += counted,
        }
    }

    async fn read(&mut self, patience_if_optional: Duration) {
        let must = self.model.must_deliver();
        let wait = if must { PATIENCE } else { patience_if_optional };
        match tokio::time::timeout(wait, self.rx.recv()).await {
            Ok(Some(batch)) => self.take(batch),
            Ok(None) => panic!("the reader stopped while the spool is open"),
            Err(_) => assert!(
                !must,
                "{} records are owed ({} drops unmatched) but none was read within {wait:?}",
                self.model.queued(),
                self.model.unmatched_drops
            ),
        }
    }

    fn take(&mut self, batch: Vec<Spooled>) {
        assert!(!batch.is_empty(), "an empty batch");
        assert!(batch.len() <= self.batch_size, "a batch of {} over batch_size {}", batch.len(), self.batch_size);
        let segment = batch[0].at.segment;
        assert!(batch.iter().all(|s| s.at.segment == segment), "a batch holds one segment's records");
        assert!(
            segment >= self.model.last_segment,
            "segment {segment} read after segment {}: segments are read in id order",
            self.model.last_segment
        );
        self.model.last_segment = segment;
        for spooled in batch {
            let idx = *self.index.get(&spooled.record.interaction_id).expect("a record that was never appended");
            assert_eq!(spooled.record, self.sent[idx], "record {idx} changed on its way through the spool");
            self.model.handed_out(idx, segment);
        }
    }

    fn settle(&mut self, mask: u64) {
        let mut per_segment: BTreeMap<u64, u64> = BTreeMap::new();
        let mut position = 0u32;
        for e in &mut self.model.entries {
            if let Held::Read(s) = e.held {
                if mask >> (position % 64) & 1 == 1 {
                    e.held = Held::Settled(s);
                    *per_segment.entry(s).or_default() += 1;
                }
                position += 1;
            }
        }
        for (segment, n) in per_segment {
            self.spool.settle(SpoolRef { segment }, n);
        }
    }

    async fn reopen(&mut self, damage: Option<&Damage>) {
        // As the pipeline's shutdown does: stop reading, let the writers take what the
        // channel holds (it is theirs: counted as read), then close.
        self.spool.stop_reading();
        loop {
            match tokio::time::timeout(PATIENCE, self.rx.recv()).await {
                Ok(Some(batch)) => self.take(batch),
                Ok(None) => break,
                Err(_) => panic!("the reader did not stop within {PATIENCE:?}"),
            }
        }
        self.spool.close().await;
        self.past = self.counters();
        self.check(true);
        if let Some(damage) = damage {
            self.damage(damage);
        }
        self.model.reopened();
        self.spool = Spool::open(&self.config, PENDING_LIMIT).expect("a damaged tail never stops start-up");
        self.rx = self.spool.start_reader(self.batch_size);
        assert_eq!(
            self.past.corrupt + load(&self.spool.stats().corrupt_records),
            self.model.expect_corrupt,
            "each damaged tail is counted once in corrupt_records"
        );
        // What recovery found on disk is what the model owes, less what evictions took.
        assert_eq!(
            load(&self.spool.stats().records) + self.model.unmatched_drops,
            self.model.queued(),
            "records found at start-up: those owed, less those evictions took"
        );
    }

    /// A crash mid-write of the newest segment, after a clean close.
    fn damage(&mut self, damage: &Damage) {
        let files = segment_files(self.dir.path());
        let Some(&newest) = files.keys().next_back() else { return };
        let path = recovery::segment_path(self.dir.path(), newest);
        let bytes = fs::read(&path).expect("read the newest segment");
        let frames = frames_of(&bytes);
        assert_eq!(
            frames.last().map_or(MAGIC.len(), |&(at, len)| at + len),
            bytes.len(),
            "a closed segment holds whole frames only"
        );
        self.model.expect_corrupt += 1;
        match (damage, frames.last()) {
            (Damage::Truncate(at), Some(&(start, len))) => {
                let cut = start + 1 + at.index(len - 1);
                let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
                file.set_len(cut as u64).unwrap();
                let record: Interaction = serde_json::from_slice(&bytes[start + HEADER..start + len]).unwrap();
                let idx = self.index[&record.interaction_id];
                let Some(pos) = self.model.entries.iter().position(|e| e.idx == idx) else {
                    panic!("segment {newest} holds record {idx}, which the model says left the spool")
                };
                self.model.entries.remove(pos);
                self.model.torn.insert(idx);
            }
            (damage, _) => {
                let garbage = match damage {
                    Damage::Garbage(g) => g.clone(),
                    Damage::Truncate(_) => vec![0xff],
                };
                let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
                file.write_all(&garbage).unwrap();
            }
        }
    }

    /// The invariants that hold after every step.
    fn check(&mut self, closed: bool) {
        let files = segment_files(self.dir.path());
        let total: u64 = files.values().sum();
        assert!(
            total <= self.config.max_bytes,
            "segment files take {total} bytes, over max_bytes {} (files: {files:?})",
            self.config.max_bytes
        );
        self.model.check_segments(&files, closed);
    }

    /// Reads everything owed, settles it, and checks that nothing is left and every record
    /// is accounted for.
    async fn finish(mut self) {
        loop {
            let must = self.model.must_deliver();
            match tokio::time::timeout(if must { PATIENCE } else { QUIET }, self.rx.recv()).await {
                Ok(Some(batch)) => self.take(batch),
                Ok(None) => panic!("the reader stopped while the spool is open"),
                Err(_) => {
                    assert!(!must, "{} records owed were never read", self.model.queued());
                    break;
                }
            }
        }
        // What never came must be exactly what drop_oldest counted.
        assert_eq!(
            self.model.queued(),
            self.model.unmatched_drops,
            "records never read must equal the drops counted for them"
        );
        let never_read: Vec<usize> =
            self.model.entries.iter().filter(|e| e.held == Held::Queued).map(|e| e.idx).collect();
        self.model.skipped.extend(&never_read);
        self.model.entries.retain(|e| e.held != Held::Queued);
        self.model.unmatched_drops = 0;
        self.settle(u64::MAX);
        self.check(false);

        // The appender's idle check retires the drained active segment: nothing remains.
        let dir = self.dir.path().to_path_buf();
        wait_until("every segment file deleted once all is settled", IDLE_RETIREMENT, || {
            segment_files(&dir).is_empty()
        })
        .await;
        let stats = self.spool.stats();
        assert_eq!(load(&stats.records), 0, "records gauge once everything is settled");
        assert_eq!(load(&stats.bytes), 0, "bytes gauge once every segment is deleted");
        assert!(self.spool.is_empty());

        let c = self.counters();
        assert_eq!(c.dropped_io, 0, "no I/O errors on a healthy disk");
        assert_eq!(c.corrupt, self.model.expect_corrupt, "corrupt_records counts each damaged tail once");
        assert_eq!(
            c.dropped_full,
            (self.model.refused.len() + self.model.skipped.len()) as u64,
            "dropped_full counts the records refused or evicted unread, no more, no fewer"
        );
        let m = &self.model;
        for idx in 0..self.sent.len() {
            assert!(
                m.delivered.contains(&idx)
                    || m.refused.contains(&idx)
                    || m.skipped.contains(&idx)
                    || m.torn.contains(&idx),
                "record {idx} was neither read nor counted as dropped"
            );
        }

        // And a last reopening finds nothing.
        self.spool.close().await;
        let spool = Spool::open(&self.config, PENDING_LIMIT).unwrap();
        assert_eq!(load(&spool.stats().records), 0);
        assert!(segment_files(&dir).is_empty());
        spool.close().await;
    }
}

proptest! {
    #![proptest_config(cases(32))]

    /// The spool behaves as a queue with the documented exceptions, whatever the sequence
    /// of appends, reads, settlements, reopenings and crashes.
    #[test]
    fn the_spool_behaves_like_a_queue(setup in setup(), actions in prop::collection::vec(action(), 1..=60)) {
        runtime().block_on(async {
            let mut harness = Harness::new(&setup);
            for action in &actions {
                harness.step(action).await;
            }
            harness.finish().await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// 2. Frames and recovery, pure
// ---------------------------------------------------------------------------------------

fn interaction() -> impl Strategy<Value = Interaction> {
    (
        any::<String>(),
        proptest::option::of(any::<String>()),
        proptest::option::of(any::<String>()),
        prop::collection::btree_map(any::<String>(), any::<i64>(), 0..3),
        prop::collection::vec((any::<String>(), any::<String>()), 0..3),
        prop::sample::select(Status::ALL.to_vec()),
    )
        .prop_map(|(question, user_id, error, metrics, attributes, status)| {
            let mut r = Interaction::new(question);
            r.user_id = user_id;
            r.error = error;
            r.metrics = metrics;
            r.attributes = attributes.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
            r.status = status;
            r
        })
}

/// Bytes shaped like a segment body: valid frames mixed with garbage, so decoding and
/// recovery see both (purely random bytes almost never hold a valid frame).
fn segment_body() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 1..40).prop_map(|p| frame::encode_payload(&p)),
            prop::collection::vec(any::<u8>(), 0..24),
        ],
        0..8,
    )
    .prop_map(|chunks| chunks.concat())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn decode_never_panics_and_a_frame_it_finds_is_what_it_says(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        segment_body(),
    ]) {
        match frame::decode(&bytes) {
            Decoded::Frame { payload, len } => {
                prop_assert_eq!(len, HEADER + payload.len());
                prop_assert!(len <= bytes.len());
                prop_assert_eq!(frame::encode_payload(payload), bytes[..len].to_vec());
            }
            Decoded::End => prop_assert!(bytes.is_empty()),
            Decoded::Corrupt(Corruption::TornHeader) => prop_assert!(bytes.len() < HEADER),
            Decoded::Corrupt(_) => prop_assert!(bytes.len() >= HEADER),
        }
        if let Some(at) = frame::resync(&bytes) {
            prop_assert!(at > 0 && at < bytes.len());
            let found_frame = matches!(frame::decode(&bytes[at..]), Decoded::Frame { .. });
            prop_assert!(found_frame, "resync points at a valid frame");
        }
    }

    #[test]
    // Non-empty: a record never serialises to nothing, and an empty frame is refused
    // (eight zero bytes would otherwise pass for one).
    fn a_payload_round_trips(payload in prop::collection::vec(any::<u8>(), 1..2048),
                             trailing in prop::collection::vec(any::<u8>(), 0..16)) {
        let frame = frame::encode_payload(&payload);
        prop_assert_eq!(frame.len(), HEADER + payload.len());
        // Bytes after a frame (the next frame, or a torn one) do not change it.
        let bytes = [frame.as_slice(), &trailing].concat();
        prop_assert_eq!(frame::decode(&bytes), Decoded::Frame { payload: &payload, len: frame.len() });
    }

    #[test]
    fn a_record_round_trips_as_json_without_control_bytes(record in interaction()) {
        let frame = frame::encode(&record);
        let Decoded::Frame { payload, len } = frame::decode(&frame) else {
            return Err(TestCaseError::fail("an encoded record does not decode"));
        };
        prop_assert_eq!(len, frame.len());
        let json = serde_json::to_vec(&record).unwrap();
        prop_assert_eq!(payload, json.as_slice());
        prop_assert_eq!(serde_json::from_slice::<Interaction>(payload).unwrap(), record);
        // The premise of resync: no payload byte looks like a length's top byte.
        prop_assert!(payload.iter().all(|&b| b >= 0x20), "a control byte in a JSON payload");
    }

    #[test]
    fn recovery_check_never_panics_nor_overcounts(body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..128),
        segment_body(),
    ]) {
        let bytes = [MAGIC.as_slice(), &body].concat();
        let checked = recovery::check(&bytes).expect("starts with the magic");
        let len = bytes.len() as u64;
        prop_assert!(checked.bytes >= MAGIC.len() as u64 && checked.bytes <= len);
        prop_assert!(checked.corrupt_bytes <= len - MAGIC.len() as u64);
        prop_assert!(checked.records * HEADER as u64 <= checked.bytes - MAGIC.len() as u64);
        prop_assert_eq!(checked.corrupt_regions > 0, checked.corrupt_bytes > 0);
        if checked.corrupt_regions == 0 {
            prop_assert_eq!(checked.bytes, len, "nothing is cut from a clean segment");
        }
        // Without the magic it is not a segment at all.
        prop_assert!(recovery::check(&body).is_none() || body.starts_with(MAGIC));
    }

    /// The resync design: with JSON payloads, one damaged frame (any of its bytes, header
    /// included, flipped any way) costs that frame and no other.
    #[test]
    fn one_damaged_frame_costs_only_itself(
        texts in prop::collection::vec(any::<String>(), 2..8),
        victim in any::<Index>(),
        flips in prop::collection::vec((any::<Index>(), 1u8..=255), 1..=3),
    ) {
        let payloads: Vec<Vec<u8>> = texts.iter().map(|t| serde_json::to_vec(t).unwrap()).collect();
        let frames: Vec<Vec<u8>> = payloads.iter().map(|p| frame::encode_payload(p)).collect();
        let mut bytes = MAGIC.to_vec();
        let mut starts = Vec::new();
        for f in &frames {
            starts.push(bytes.len());
            bytes.extend_from_slice(f);
        }
        let k = victim.index(frames.len());
        // One flip per position, so no two cancel out.
        let flips: BTreeMap<usize, u8> = flips.iter().map(|(at, mask)| (at.index(frames[k].len()), *mask)).collect();
        for (at, mask) in flips {
            bytes[starts[k] + at] ^= mask;
        }
        let checked = recovery::check(&bytes).unwrap();
        prop_assert_eq!(checked.records, frames.len() as u64 - 1);
        prop_assert_eq!(checked.corrupt_regions, 1);
        prop_assert_eq!(checked.corrupt_bytes, frames[k].len() as u64);
        let expect_len = if k == frames.len() - 1 { starts[k] } else { bytes.len() };
        prop_assert_eq!(checked.bytes, expect_len as u64, "only a damaged last frame is cut off");

        // Walking as the reader does gives every other payload, in order.
        let mut kept = Vec::new();
        let mut at = MAGIC.len();
        loop {
            match frame::decode(&bytes[at..]) {
                Decoded::Frame { payload, len } => {
                    kept.push(payload.to_vec());
                    at += len;
                }
                Decoded::End => break,
                Decoded::Corrupt(_) => match frame::resync(&bytes[at..]) {
                    Some(skip) => at += skip,
                    None => break,
                },
            }
        }
        let mut expect = payloads.clone();
        expect.remove(k);
        prop_assert_eq!(kept, expect);
    }
}

// ---------------------------------------------------------------------------------------
// 3. Fault injection
// ---------------------------------------------------------------------------------------

/// Failures to inject, shared between the test and its [`FaultyFs`].
#[derive(Debug, Default)]
struct Faults {
    /// Fail the next N segment creations.
    create: AtomicUsize,
    /// Fail the next N appends.
    append: AtomicUsize,
    /// Fail the next N fsyncs.
    sync: AtomicUsize,
    /// Fail the next N truncations of an open segment.
    truncate: AtomicUsize,
    /// Fail the next N directory fsyncs.
    sync_dir: AtomicUsize,
    /// The errno failures carry (ENOSPC unless set).
    errno: AtomicI32,
    /// A failing append first writes half its bytes, as a short write does.
    partial: AtomicBool,
    /// While set, fsyncs wait: appends made meanwhile gather into the next group.
    hold_syncs: Mutex<bool>,
    released: Condvar,
    /// Fsyncs waiting on `hold_syncs`.
    held: AtomicUsize,
}

impl Faults {
    /// Consumes one failure from `counter`, if any is armed.
    fn fail(&self, counter: &AtomicUsize) -> io::Result<()> {
        match counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
            Ok(_) => {
                let errno = self.errno.load(Ordering::SeqCst);
                Err(io::Error::from_raw_os_error(if errno == 0 { ENOSPC } else { errno }))
            }
            Err(_) => Ok(()),
        }
    }

    fn hold_syncs(&self, hold: bool) {
        *self.hold_syncs.lock().unwrap() = hold;
        self.released.notify_all();
    }

    fn wait_if_held(&self) {
        let mut held = self.hold_syncs.lock().unwrap();
        if *held {
            self.held.fetch_add(1, Ordering::SeqCst);
            while *held {
                held = self.released.wait(held).unwrap();
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The real filesystem, with failures on demand.
#[derive(Debug, Clone, Default)]
struct FaultyFs {
    faults: Arc<Faults>,
}

struct FaultyFile {
    inner: Box<dyn AppendFile>,
    faults: Arc<Faults>,
}

impl AppendFile for FaultyFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Err(e) = self.faults.fail(&self.faults.append) {
            if self.faults.partial.load(Ordering::SeqCst) {
                self.inner.append(&bytes[..bytes.len() / 2])?;
            }
            return Err(e);
        }
        self.inner.append(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.faults.wait_if_held();
        self.faults.fail(&self.faults.sync)?;
        self.inner.sync()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.faults.fail(&self.faults.truncate)?;
        self.inner.truncate(len)
    }
}

impl Filesystem for FaultyFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        self.faults.fail(&self.faults.create)?;
        Ok(Box::new(FaultyFile { inner: StdFilesystem.create(path)?, faults: self.faults.clone() }))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn ReadFile>> {
        StdFilesystem.open(path)
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        StdFilesystem.len(path)
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        StdFilesystem.truncate(path, len)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFilesystem.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.faults.fail(&self.faults.sync_dir)?;
        StdFilesystem.sync_dir(dir)
    }
}

fn open_faulty(config: &SpoolConfig) -> (Spool, Arc<Faults>) {
    let fs = FaultyFs::default();
    let faults = fs.faults.clone();
    (Spool::open_with(config, PENDING_LIMIT, Arc::new(fs)).expect("open the spool"), faults)
}

/// The error is the injected one, with the segment it was writing.
fn assert_injected(error: &SpoolError, errno: i32, dir: &Path) {
    match error {
        SpoolError::Io { path, cause } => {
            assert!(cause.to_string().contains(&format!("os error {errno}")), "{cause}");
            assert!(path.starts_with(dir), "names a path in the spool: {}", path.display());
        }
        other => panic!("expected SpoolError::Io, got {other:?}"),
    }
}

#[derive(Debug, Clone, Copy)]
enum WriteFault {
    Append,
    Sync,
}

/// (a) A failed write or fsync fails every durable append of its group, counts them in
/// `dropped_io`, and the next appends go to a fresh segment and are read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_or_fsync_fails_its_group_and_the_next_appends_use_a_fresh_segment() {
    for (fault, errno) in [(WriteFault::Append, ENOSPC), (WriteFault::Sync, ENOSPC), (WriteFault::Sync, EIO)] {
        let dir = tempfile::tempdir().unwrap();
        let (spool, faults) = open_faulty(&config(dir.path()));
        faults.errno.store(errno, Ordering::SeqCst);
        let sent = records(9);
        for r in &sent[..3] {
            spool.append_durable(r).await.unwrap();
        }
        let first_segment = *segment_files(dir.path()).keys().next().unwrap();
        match fault {
            WriteFault::Append => faults.append.store(1, Ordering::SeqCst),
            WriteFault::Sync => faults.sync.store(1, Ordering::SeqCst),
        }
        // Group membership depends on timing: whichever group is written first fails.
        let results = futures::future::join_all(sent[3..].iter().map(|r| spool.append_durable(r))).await;
        let failed = results.iter().take_while(|r| r.is_err()).count();
        assert!(failed >= 1, "{fault:?}: the first group fails: {results:?}");
        for r in &results[..failed] {
            assert_injected(r.as_ref().unwrap_err(), errno, dir.path());
        }
        assert!(results[failed..].iter().all(|r| r.is_ok()), "{fault:?}: later groups succeed: {results:?}");
        let stats = spool.stats();
        assert_eq!(load(&stats.dropped_io), failed as u64, "{fault:?}");
        assert_eq!(load(&stats.spooled), 9 - failed as u64, "{fault:?}");

        let mut rx = spool.start_reader(100);
        let read = read_n(&mut rx, 9 - failed).await;
        let expect: Vec<Interaction> = sent[..3].iter().chain(&sent[3 + failed..]).cloned().collect();
        assert_eq!(questions(read.iter().map(|s| s.record.clone())), questions(expect), "{fault:?}");
        assert!(read[..3].iter().all(|s| s.at.segment == first_segment));
        assert!(read[3..].iter().all(|s| s.at.segment > first_segment), "{fault:?}: written to a fresh segment");
        nothing_more(&mut rx).await;
        settle_all(&spool, &read);
        let d = dir.path().to_path_buf();
        wait_until("every segment deleted", IDLE_RETIREMENT, || segment_files(&d).is_empty()).await;
        spool.close().await;
    }
}

/// (b) A segment that cannot be created (disk full), or whose magic cannot be written,
/// refuses the record that needed it, with the error, counted, and leaves no file; the
/// next record gets a segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_that_cannot_be_created_refuses_its_record_and_the_spool_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: rotations come every two or three records.
    let cfg = SpoolConfig { segment_bytes: 2048, ..config(dir.path()) };
    let (spool, faults) = open_faulty(&cfg);
    let sent = records(10);

    faults.create.store(1, Ordering::SeqCst);
    assert_injected(&spool.append_durable(&sent[0]).await.unwrap_err(), ENOSPC, dir.path());
    assert_eq!(load(&spool.stats().dropped_io), 1);
    assert!(segment_files(dir.path()).is_empty(), "no file is left by a failed creation");

    faults.append.store(1, Ordering::SeqCst);
    assert_injected(&spool.append_durable(&sent[1]).await.unwrap_err(), ENOSPC, dir.path());
    assert_eq!(load(&spool.stats().dropped_io), 2);
    assert!(segment_files(dir.path()).is_empty(), "a segment whose magic failed is removed");

    spool.append_durable(&sent[2]).await.unwrap();
    let first = segment_files(dir.path());
    assert_eq!(first.len(), 1);

    // A rotation that cannot create its segment: the sealed segment keeps its records.
    faults.create.store(1, Ordering::SeqCst);
    let mut refused = vec![0, 1];
    for (i, r) in sent.iter().enumerate().skip(3) {
        if let Err(e) = spool.append_durable(r).await {
            assert_injected(&e, ENOSPC, dir.path());
            refused.push(i);
        }
    }
    assert_eq!(refused.len(), 3, "exactly the record that needed the new segment: {refused:?}");
    assert_eq!(load(&spool.stats().dropped_io), 3);
    assert!(segment_files(dir.path()).contains_key(first.keys().next().unwrap()), "the sealed segment is kept");

    let mut rx = spool.start_reader(100);
    let want: Vec<Interaction> =
        sent.iter().enumerate().filter(|(i, _)| !refused.contains(i)).map(|(_, r)| r.clone()).collect();
    let read = read_n(&mut rx, want.len()).await;
    assert_eq!(questions(read.into_iter().map(|s| s.record)), questions(want));
    nothing_more(&mut rx).await;
    spool.close().await;
}

/// A directory fsync that fails after the segment file was created must not leave an
/// empty, untracked segment behind (the bytes gauge would not count it, and it would
/// outlive every record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_failed_directory_fsync_leaves_no_stray_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, faults) = open_faulty(&config(dir.path()));
    faults.sync_dir.store(1, Ordering::SeqCst);
    let sent = records(2);
    assert_injected(&spool.append_durable(&sent[0]).await.unwrap_err(), ENOSPC, dir.path());
    assert_eq!(load(&spool.stats().dropped_io), 1);
    assert!(segment_files(dir.path()).is_empty(), "stray segment: {:?}", segment_files(dir.path()));
    spool.append_durable(&sent[1]).await.unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    spool.close().await;
}

/// Appends `n` records while fsyncs are held, so they form one group, then fails that
/// group's write (half of it reaching the file). Returns the records appended before it.
async fn fail_one_group(spool: &Spool, faults: &Faults, dir: &Path, n: usize) -> Vec<Interaction> {
    // One record so the segment exists and its creation is out of the way.
    let warm = records(1);
    spool.append_durable(&warm[0]).await.unwrap();
    let holder = records(1);
    faults.hold_syncs(true);
    let first = {
        let spool = spool.clone();
        let r = holder[0].clone();
        tokio::spawn(async move { spool.append_durable(&r).await })
    };
    wait_until("the appender waiting in fsync", PATIENCE, || faults.held.load(Ordering::SeqCst) == 1).await;
    let group = records(n);
    let mut notices = Vec::new();
    for r in &group {
        let (tx, rx) = tokio::sync::oneshot::channel();
        spool.append(r, Some(tx)).unwrap();
        notices.push(rx);
    }
    faults.partial.store(true, Ordering::SeqCst);
    faults.append.store(1, Ordering::SeqCst);
    faults.hold_syncs(false);
    first.await.unwrap().expect("the group before is unaffected");
    for rx in notices {
        assert_injected(&rx.await.unwrap().unwrap_err(), ENOSPC, dir);
    }
    assert_eq!(load(&spool.stats().dropped_io), n as u64, "the whole group is lost and counted");
    [warm, holder].concat()
}

/// (c) After a write that failed half-way nothing of it is read back, neither live nor
/// after reopening: only the records whose append succeeded, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_failed_half_way_leaves_nothing_to_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, faults) = open_faulty(&config(dir.path()));
    let mut good = fail_one_group(&spool, &faults, dir.path(), 5).await;
    let after = records(3);
    for r in &after {
        spool.append_durable(r).await.unwrap();
    }
    good.extend(after);

    let mut rx = spool.start_reader(100);
    let read = read_n(&mut rx, good.len()).await;
    assert_eq!(questions(read.into_iter().map(|s| s.record)), questions(good.clone()));
    nothing_more(&mut rx).await;
    spool.close().await;
    drop(spool);

    let spool = Spool::open(&config(dir.path()), PENDING_LIMIT).unwrap();
    assert_eq!(load(&spool.stats().corrupt_records), 0, "the torn half was cut off when the write failed");
    let mut rx = spool.start_reader(100);
    let read = read_n(&mut rx, good.len()).await;
    assert_eq!(questions(read.into_iter().map(|s| s.record)), questions(good));
    nothing_more(&mut rx).await;
    spool.close().await;
}

/// (c) again, when cutting the failed write off fails too: the next start must not read
/// back whole frames of a group whose producers were told it failed. Regression: recovery
/// cut only a torn tail and resync found the whole frames; the appender now records the
/// valid length beside the segment (`<id>.seg.valid`) and recovery honours it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_write_that_failed_half_way_and_could_not_be_cut_off_is_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, faults) = open_faulty(&config(dir.path()));
    faults.truncate.store(1, Ordering::SeqCst);
    let good = fail_one_group(&spool, &faults, dir.path(), 5).await;
    spool.close().await;
    drop(spool);

    let spool = Spool::open(&config(dir.path()), PENDING_LIMIT).unwrap();
    let markers: Vec<PathBuf> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".seg.valid"))
        .collect();
    assert!(markers.is_empty(), "the marker is removed once recovery made the cut: {markers:?}");
    let mut rx = spool.start_reader(100);
    let read = read_n(&mut rx, good.len()).await;
    assert_eq!(questions(read.into_iter().map(|s| s.record)), questions(good));
    nothing_more(&mut rx).await;
    spool.close().await;
}

// ---------------------------------------------------------------------------------------
// 4. Corruption in the middle of a segment
// ---------------------------------------------------------------------------------------

/// Writes `sent` durably and returns the one segment's path and its frames.
async fn one_segment(spool: &Spool, dir: &Path, sent: &[Interaction]) -> (PathBuf, Vec<(usize, usize)>) {
    for r in sent {
        spool.append_durable(r).await.unwrap();
    }
    let files = segment_files(dir);
    assert_eq!(files.len(), 1);
    let path = recovery::segment_path(dir, *files.keys().next().unwrap());
    let frames = frames_of(&fs::read(&path).unwrap());
    assert_eq!(frames.len(), sent.len());
    (path, frames)
}

/// How many bytes of a frame [`damage_at`] picks.
const DAMAGE_SITES: usize = 6;

/// A byte of the 2nd frame to damage: in its length (low and top byte), its CRC, its
/// payload (first, middle, last byte).
fn damage_at(frames: &[(usize, usize)], site: usize) -> u64 {
    let (start, len) = frames[1];
    let offset = [0, 3, 5, HEADER, HEADER + 40, len - 1][site];
    (start + offset) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_frame_in_the_middle_of_a_closed_segment_costs_only_itself() {
    let sent = records(5);
    let expect = questions([&sent[0], &sent[2], &sent[3], &sent[4]].into_iter().cloned());
    let probe = tempfile::tempdir().unwrap();
    let spool = Spool::open(&config(probe.path()), PENDING_LIMIT).unwrap();
    let (_, frames) = one_segment(&spool, probe.path(), &sent).await;
    spool.close().await;

    for site in 0..DAMAGE_SITES {
        let at = damage_at(&frames, site);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&config(dir.path()), PENDING_LIMIT).unwrap();
        let (path, _) = one_segment(&spool, dir.path(), &sent).await;
        spool.close().await;
        drop(spool);
        flip_byte(&path, at, 0x5a);

        let spool = Spool::open(&config(dir.path()), PENDING_LIMIT).expect("corruption never stops start-up");
        let stats = spool.stats();
        assert_eq!(load(&stats.corrupt_records), 1, "byte {at}");
        assert_eq!(load(&stats.corrupt_bytes), frames[1].1 as u64, "byte {at}: exactly the 2nd frame is discarded");
        assert_eq!(load(&stats.records), 4);
        let mut rx = spool.start_reader(100);
        let read = read_n(&mut rx, 4).await;
        assert_eq!(questions(read.iter().map(|s| s.record.clone())), expect, "byte {at}");
        nothing_more(&mut rx).await;
        settle_all(&spool, &read);
        wait_until("the segment deleted", IDLE_RETIREMENT, || segment_files(dir.path()).is_empty()).await;
        assert_eq!(load(&stats.corrupt_records), 1, "counted once");
        spool.close().await;
    }
}

/// The same damage, done to an fsync'd frame while the spool is open and found by the
/// reader: it skips that frame only, and counts it once the segment is finished, which
/// for an idle spool is when its active segment is retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_frame_found_by_the_live_reader_costs_only_itself() {
    let sent = records(5);
    let expect = questions([&sent[0], &sent[2], &sent[3], &sent[4]].into_iter().cloned());
    for site in 0..DAMAGE_SITES {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&config(dir.path()), PENDING_LIMIT).unwrap();
        let (path, frames) = one_segment(&spool, dir.path(), &sent).await;
        let at = damage_at(&frames, site);
        flip_byte(&path, at, 0x5a);

        let mut rx = spool.start_reader(100);
        let read = read_n(&mut rx, 4).await;
        assert_eq!(questions(read.iter().map(|s| s.record.clone())), expect, "byte {at}");
        nothing_more(&mut rx).await;
        settle_all(&spool, &read);
        let stats = spool.stats();
        wait_until("the lost frame counted and the segment retired", IDLE_RETIREMENT, || {
            load(&stats.corrupt_records) == 1 && segment_files(dir.path()).is_empty()
        })
        .await;
        assert_eq!(load(&stats.records), 0);
        assert!(spool.is_empty());
        spool.close().await;
        drop(spool);
        // Nothing is left to be found again at the next start.
        let spool = Spool::open(&config(dir.path()), PENDING_LIMIT).unwrap();
        assert_eq!(load(&spool.stats().corrupt_records), 0);
        assert_eq!(load(&spool.stats().records), 0);
        spool.close().await;
    }
}

/// A record whose frame is exactly `len` bytes (timestamps make the JSON vary a little).
fn record_with_frame_len(len: usize) -> Interaction {
    let mut record = Interaction::new("");
    let base = frame::encode(&record).len();
    record.question = "x".repeat(len - base);
    assert_eq!(frame::encode(&record).len(), len);
    record
}

/// A record that fits under the cap by fewer bytes than a segment's magic, and needs a
/// new segment, must not take the spool past `max_bytes`: the magic needs room too.
/// Found by the model test (4097 bytes on disk under a 4096-byte cap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_segment_opened_near_the_cap_stays_within_max_bytes() {
    for policy in [FullPolicy::DropNewest, FullPolicy::DropOldest] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig { max_bytes: 4096, segment_bytes: 2048, full_policy: policy, ..config(dir.path()) };
        let spool = Spool::open(&cfg, PENDING_LIMIT).unwrap();
        // Fills the first segment exactly: 8 + 2040 = 2048 bytes.
        spool.append_durable(&record_with_frame_len(2040)).await.unwrap();
        // 2048 + 2044 fits under 4096, but its new segment's magic does not.
        let result = spool.append_durable(&record_with_frame_len(2044)).await;
        let files = segment_files(dir.path());
        let total: u64 = files.values().sum();
        assert!(total <= cfg.max_bytes, "{policy:?}: {total} bytes on disk over max_bytes 4096 ({files:?})");
        assert!(load(&spool.stats().bytes) <= cfg.max_bytes, "{policy:?}");
        match policy {
            FullPolicy::DropNewest => assert!(matches!(result, Err(SpoolError::Full { .. })), "{result:?}"),
            _ => {
                result.expect("drop_oldest makes room");
                assert_eq!(load(&spool.stats().dropped_full), 1, "the first record was evicted");
            }
        }
        spool.close().await;
    }
}

/// `drop_oldest` evicting the segment the reader is in: the batch the reader holds while
/// the channel is full must be counted as dropped, not as read, or stopping the reader
/// (shutdown) loses it uncounted. Found by the model test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_batch_held_by_the_reader_when_drop_oldest_evicts_its_segment_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        SpoolConfig { max_bytes: 4096, segment_bytes: 2048, full_policy: FullPolicy::DropOldest, ..config(dir.path()) };
    let spool = Spool::open(&cfg, PENDING_LIMIT).unwrap();
    let sent = records(8);
    // Two records to a segment.
    spool.append_durable(&sent[0]).await.unwrap();
    spool.append_durable(&sent[1]).await.unwrap();
    let first = *segment_files(dir.path()).keys().next().unwrap();
    // Batches of one: the channel holds the first record, the reader the second.
    let mut rx = spool.start_reader(1);
    let stats = spool.stats();
    wait_until("the first batch in the channel", PATIENCE, || load(&stats.replayed) >= 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for r in &sent[2..] {
        spool.append_durable(r).await.unwrap();
    }
    assert!(!segment_files(dir.path()).contains_key(&first), "the first segment was evicted");

    spool.stop_reading();
    // Let the reader see the stop while the channel is still full, as it would if the
    // writers were busy; draining first would race its pending batch into the channel.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut delivered = Vec::new();
    while let Some(batch) = rx.recv().await {
        delivered.extend(batch);
    }
    spool.close().await;
    let dropped = load(&stats.dropped_full);
    drop(spool);
    let spool = Spool::open(&cfg, PENDING_LIMIT).unwrap();
    let on_disk = load(&spool.stats().records);
    assert_eq!(
        delivered.len() as u64 + dropped + on_disk,
        sent.len() as u64,
        "every record read, counted as dropped or still spooled (read {}, dropped {dropped}, spooled {on_disk})",
        delivered.len()
    );
    spool.close().await;
}

// ---------------------------------------------------------------------------------------
// The `block` policy, as an example: in the model a full spool would wait forever.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_with_block_waits_for_settling_then_takes_every_record_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        max_bytes: 8 * 1024,
        segment_bytes: 2 * 1024,
        full_policy: FullPolicy::Block,
        ..config(dir.path())
    };
    let spool = Spool::open(&cfg, PENDING_LIMIT).unwrap();
    let sent = records(60);
    let producer = {
        let spool = spool.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            for r in &sent {
                spool.append_durable(r).await.expect("block never refuses a durable record");
            }
        })
    };
    let frame_len = frame::encode(&sent[0]).len() as u64;
    wait_until("the spool full", PATIENCE, || {
        segment_files(dir.path()).values().sum::<u64>() + frame_len + MAGIC.len() as u64 > cfg.max_bytes
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!producer.is_finished(), "the producer waits while the spool is full");

    let mut rx = spool.start_reader(4);
    let mut seen = Vec::new();
    while seen.len() < sent.len() {
        let read = tokio::time::timeout(PATIENCE, rx.recv()).await.expect("a batch in time").expect("reader running");
        assert!(segment_files(dir.path()).values().sum::<u64>() <= cfg.max_bytes);
        settle_all(&spool, &read);
        seen.extend(read.into_iter().map(|s| s.record.question));
    }
    producer.await.unwrap();
    assert_eq!(seen, questions(sent));
    assert_eq!(load(&spool.stats().dropped_full), 0);
    spool.close().await;
}
