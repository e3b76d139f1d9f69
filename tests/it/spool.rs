//! The disk spool on real files: order, group-committed appends, segment deletion after
//! commit, torn and corrupt tails, the directory lock, and the three full policies.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::spool::{config, read_at_least, settle_all};
use crate::common::wait_until;
use opsagent_audit::config::{FullPolicy, SpoolConfig};
use opsagent_audit::model::Interaction;
use opsagent_audit::pipeline::{Spool, SpoolError};
use uuid::Uuid;

fn records(n: usize) -> Vec<Interaction> {
    (0..n).map(|i| Interaction::new(format!("question {i}: {}", "x".repeat(200)))).collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read spool dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_come_back_in_order_and_settled_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments so the records span several files.
    let spool = Spool::open(&SpoolConfig { segment_bytes: 16 * 1024, ..config(dir.path()) }, 1000).unwrap();
    let sent = records(300);
    let acks = futures::future::join_all(sent.iter().map(|r| spool.append_durable(r))).await;
    assert!(acks.iter().all(|a| a.is_ok()), "{acks:?}");
    assert_eq!(spool.stats().spooled.load(Ordering::Relaxed), 300);
    assert!(segments(dir.path()).len() > 3, "several segments: {:?}", segments(dir.path()));

    let mut rx = spool.start_reader(64);
    let read = read_at_least(&mut rx, 300).await;
    let ids: Vec<Uuid> = read.iter().map(|s| s.record.interaction_id).collect();
    assert_eq!(ids, sent.iter().map(|r| r.interaction_id).collect::<Vec<_>>(), "same records, same order");
    assert_eq!(read[7].record, sent[7], "records round-trip unchanged");

    // Nothing is deleted before it is acknowledged.
    assert!(!segments(dir.path()).is_empty());
    settle_all(&spool, &read);
    wait_until("every segment deleted", Duration::from_secs(10), || segments(dir.path()).is_empty()).await;
    assert!(spool.is_empty());
    assert_eq!(spool.stats().records.load(Ordering::Relaxed), 0);
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_records_are_replayed_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let sent = records(50);
    {
        let spool = Spool::open(&config(dir.path()), 1000).unwrap();
        for r in &sent {
            spool.append_durable(r).await.unwrap();
        }
        // Read some and acknowledge only the first 20, then stop.
        let mut rx = spool.start_reader(10);
        let read = read_at_least(&mut rx, 30).await;
        settle_all(&spool, &read[..20]);
        spool.close().await;
    }
    let spool = Spool::open(&config(dir.path()), 1000).unwrap();
    assert_eq!(spool.stats().records.load(Ordering::Relaxed), 50, "a segment is kept whole until all of it settles");
    let mut rx = spool.start_reader(100);
    let read = read_at_least(&mut rx, 50).await;
    let ids: Vec<Uuid> = read.iter().map(|s| s.record.interaction_id).collect();
    assert_eq!(ids, sent.iter().map(|r| r.interaction_id).collect::<Vec<_>>());
    spool.close().await;
}

/// Writes `n` records, closes, and returns the one segment's path.
async fn spool_with(dir: &Path, sent: &[Interaction]) -> PathBuf {
    let spool = Spool::open(&config(dir), 1000).unwrap();
    for r in sent {
        spool.append_durable(r).await.unwrap();
    }
    spool.close().await;
    let segs = segments(dir);
    assert_eq!(segs.len(), 1);
    segs[0].clone()
}

async fn reopen_and_read(dir: &Path, expect: usize) -> (Spool, Vec<Interaction>) {
    let spool = Spool::open(&config(dir), 1000).expect("a corrupt tail is never a start-up failure");
    let mut rx = spool.start_reader(1000);
    let read = read_at_least(&mut rx, expect).await;
    // Nothing more arrives.
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err());
    (spool, read.into_iter().map(|s| s.record).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_truncated_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sent = records(10);
    let seg = spool_with(dir.path(), &sent).await;
    let len = fs::metadata(&seg).unwrap().len();
    // A crash in the middle of writing the last frame.
    let file = fs::OpenOptions::new().write(true).open(&seg).unwrap();
    file.set_len(len - 7).unwrap();
    drop(file);

    let (spool, read) = reopen_and_read(dir.path(), 9).await;
    assert_eq!(read, sent[..9].to_vec());
    let stats = spool.stats();
    assert_eq!(stats.corrupt_records.load(Ordering::Relaxed), 1);
    let frame = len - fs::metadata(&seg).unwrap().len();
    assert_eq!(stats.corrupt_bytes.load(Ordering::Relaxed), frame - 7, "the torn part of the frame is discarded");
    assert!(fs::metadata(&seg).unwrap().len() < len - 7, "the file is truncated at the last good frame");
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_fail_the_crc_and_cost_that_frame() {
    let dir = tempfile::tempdir().unwrap();
    let sent = records(10);
    let seg = spool_with(dir.path(), &sent).await;
    let mut bytes = fs::read(&seg).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0xff;
    bytes[at + 1] ^= 0x55;
    fs::write(&seg, &bytes).unwrap();

    let (spool, read) = reopen_and_read(dir.path(), 9).await;
    assert_eq!(read, sent[..9].to_vec());
    assert_eq!(spool.stats().corrupt_records.load(Ordering::Relaxed), 1);
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_segments_and_empty_files_do_not_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let sent = records(3);
    spool_with(dir.path(), &sent).await;
    fs::write(dir.path().join("00000000000000ff.seg"), b"not a spool segment at all").unwrap();
    fs::write(dir.path().join("00000000000000fe.seg"), b"").unwrap();
    let (spool, read) = reopen_and_read(dir.path(), 3).await;
    assert_eq!(read, sent);
    assert_eq!(spool.stats().corrupt_records.load(Ordering::Relaxed), 1, "the garbage file is counted");
    assert!(!dir.path().join("00000000000000ff.seg").exists());
    spool.close().await;
}

/// Regression: an I/O error reading a segment at start-up (a damaged disk) made opening
/// the spool fail, and `serve` with it. A directory named like a segment fails every read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_segment_is_set_aside_and_counted_not_a_start_up_failure() {
    let dir = tempfile::tempdir().unwrap();
    let sent = records(3);
    spool_with(dir.path(), &sent).await;
    fs::create_dir(dir.path().join("00000000000000ff.seg")).unwrap();
    let (spool, read) = reopen_and_read(dir.path(), 3).await;
    assert_eq!(read, sent, "the readable segment is replayed");
    assert_eq!(spool.stats().corrupt_records.load(Ordering::Relaxed), 1, "the unreadable one is counted");
    assert!(dir.path().join("00000000000000ff.seg.unreadable").exists(), "and set aside for the operator");
    spool.close().await;
}

/// Regression: a read error retried every second for ever, so one segment deleted under
/// the spool (or unreadable) stalled every segment behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_deleted_under_the_spool_is_skipped_and_its_records_counted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&SpoolConfig { segment_bytes: 16 * 1024, ..config(dir.path()) }, 1000).unwrap();
    let sent = records(300);
    for r in &sent {
        spool.append_durable(r).await.unwrap();
    }
    let files = segments(dir.path());
    assert!(files.len() > 3, "several segments: {files:?}");
    let lost = fs::read(&files[0]).map(|b| opsagent_audit::pipeline::spool::recovery::check(&b)).unwrap().unwrap();
    fs::remove_file(&files[0]).unwrap();

    let mut rx = spool.start_reader(64);
    let rest = 300 - lost.records as usize;
    let read = read_at_least(&mut rx, rest).await;
    let ids: Vec<Uuid> = read.iter().map(|s| s.record.interaction_id).collect();
    let expected: Vec<Uuid> = sent[lost.records as usize..].iter().map(|r| r.interaction_id).collect();
    assert_eq!(ids, expected, "the segments after it, in order");
    settle_all(&spool, &read);
    wait_until("the loss to be counted", Duration::from_secs(10), || {
        spool.stats().corrupt_records.load(Ordering::Relaxed) == lost.records
    })
    .await;
    wait_until("the spool to empty", Duration::from_secs(10), || spool.is_empty()).await;
    spool.close().await;
}

/// Regression: `drop_oldest` looked up the oldest segment and evicted "the oldest" in two
/// steps; nothing here can force the interleaving, so this checks the visible rule: a
/// segment that finished is never evicted in its place, and disk use stays within the cap
/// while a writer settles as fast as it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_while_records_are_settled_keeps_within_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let config = small(dir.path(), FullPolicy::DropOldest);
    let spool = Spool::open(&config, 10_000).unwrap();
    let mut rx = spool.start_reader(16);
    let reader = {
        let spool = spool.clone();
        tokio::spawn(async move {
            let mut seen = 0u64;
            while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                for s in batch {
                    spool.settle(s.at, 1);
                    seen += 1;
                }
            }
            seen
        })
    };
    for r in records(2000) {
        let _ = spool.append_durable(&r).await;
        assert!(dir_bytes(dir.path()) <= config.max_bytes, "disk use within max_bytes");
    }
    let seen = reader.await.unwrap();
    let stats = spool.stats();
    assert_eq!(seen + stats.dropped_full.load(Ordering::Relaxed), 2000, "every record read or counted as dropped");
    wait_until("the spool to empty", Duration::from_secs(10), || spool.is_empty()).await;
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&config(dir.path()), 10).unwrap();
    match Spool::open(&config(dir.path()), 10) {
        Err(SpoolError::Locked(d)) => assert_eq!(d, dir.path()),
        other => panic!("second open must fail with Locked, got {other:?}"),
    }
    spool.close().await;
    drop(spool);
    Spool::open(&config(dir.path()), 10).expect("free again once the first is gone").close().await;
}

fn small(dir: &Path, policy: FullPolicy) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 256 * 1024,
        segment_bytes: 32 * 1024,
        full_policy: policy,
        ..SpoolConfig::default()
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    segments(dir).iter().map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_with_drop_oldest_keeps_the_newest_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&small(dir.path(), FullPolicy::DropOldest), 100_000).unwrap();
    let sent = records(3000); // ~0.75 MB of frames into a 256 KiB spool
    for chunk in sent.chunks(100) {
        let acks = futures::future::join_all(chunk.iter().map(|r| spool.append_durable(r))).await;
        assert!(acks.iter().all(|a| a.is_ok()), "drop_oldest always takes the new record");
        assert!(dir_bytes(dir.path()) <= 256 * 1024, "disk use stays under max_bytes");
    }
    let stats = spool.stats();
    let dropped = stats.dropped_full.load(Ordering::Relaxed);
    let kept = stats.records.load(Ordering::Relaxed);
    assert!(dropped > 0);
    assert_eq!(dropped + kept, 3000, "every record is either kept or counted as dropped");
    let mut rx = spool.start_reader(5000);
    let read = read_at_least(&mut rx, kept as usize).await;
    let ids: Vec<Uuid> = read.iter().map(|s| s.record.interaction_id).collect();
    let newest: Vec<Uuid> = sent[3000 - kept as usize..].iter().map(|r| r.interaction_id).collect();
    assert_eq!(ids, newest, "the survivors are the newest, in order");
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_with_drop_newest_refuses_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&small(dir.path(), FullPolicy::DropNewest), 100_000).unwrap();
    let sent = records(3000);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for r in &sent {
        match spool.append_durable(r).await {
            Ok(()) => accepted.push(r.interaction_id),
            Err(SpoolError::Full { .. }) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(refused > 0);
    assert_eq!(spool.stats().dropped_full.load(Ordering::Relaxed), refused);
    assert_eq!(
        accepted,
        sent[..accepted.len()].iter().map(|r| r.interaction_id).collect::<Vec<_>>(),
        "the oldest are kept"
    );
    assert!(dir_bytes(dir.path()) <= 256 * 1024);
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_with_block_waits_for_room_then_takes_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&small(dir.path(), FullPolicy::Block), 100_000).unwrap();
    let sent = records(2000);
    let mut rx = spool.start_reader(100);
    let appender = {
        let spool = spool.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            for r in &sent {
                spool.append_durable(r).await.expect("block never refuses a durable record");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!appender.is_finished(), "the producer waits while the spool is full");
    assert!(dir_bytes(dir.path()) <= 256 * 1024);
    // Committing (acknowledging) frees room; everything gets through, in order.
    let mut seen = Vec::new();
    while seen.len() < sent.len() {
        let read = read_at_least(&mut rx, 1).await;
        settle_all(&spool, &read);
        seen.extend(read.into_iter().map(|s| s.record.interaction_id));
    }
    appender.await.unwrap();
    assert_eq!(seen, sent.iter().map(|r| r.interaction_id).collect::<Vec<_>>());
    assert_eq!(spool.stats().dropped_full.load(Ordering::Relaxed), 0);
    let unique: BTreeSet<Uuid> = seen.into_iter().collect();
    assert_eq!(unique.len(), 2000);
    spool.close().await;
}
