//! A batch writer: takes batches from the memory queue and the spool and gets each into
//! the store.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::envelope::{Batch, Envelope, Origin, Outcome};
use super::health::backoff;
use super::shared::{Shared, SpillCause, SpoolBatches};
use super::spool::SpoolRef;
use super::stats::DropReason;
use crate::model::Interaction;
use crate::store::{DeadLetter, StoreError};

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs one writer until the queue is closed and drained, or shutdown gives up.
pub(super) async fn run(id: usize, shared: Arc<Shared>) {
    tracing::debug!(writer = id, "audit writer started");
    // Writers alternate between the spool and the memory queue when both have work, so
    // a spool backlog drains while new records keep flowing.
    let mut prefer_spool = id.is_multiple_of(2);
    let mut memory_done = false;
    loop {
        let batch = next_batch(&shared, prefer_spool, &mut memory_done).await;
        prefer_spool = !prefer_spool;
        let Some(batch) = batch else { break };
        if batch.is_empty() {
            continue;
        }
        // The queue counted the memory records it handed out (in flight) until now.
        let in_memory = batch.envelopes.iter().filter(|e| e.in_memory()).count() as u64;
        write(&shared, batch).await;
        shared.queue.finished(in_memory);
    }
    tracing::debug!(writer = id, "audit writer stopped");
}

/// The next batch from either source; `None` once the memory queue is closed and
/// drained and the spool reader has stopped (shutdown stops it once the spool is
/// drained or the deadline passed).
async fn next_batch(shared: &Shared, prefer_spool: bool, memory_done: &mut bool) -> Option<Batch> {
    let Some(spool_batches) = shared.spool_batches.as_ref() else {
        return memory_batch(shared).await;
    };
    let spool = spool_batch(spool_batches);
    if *memory_done {
        return spool.await;
    }
    let batch = if prefer_spool {
        tokio::select! {
            biased;
            batch = spool => Source::Spool(batch),
            batch = memory_batch(shared) => Source::Memory(batch),
        }
    } else {
        tokio::select! {
            biased;
            batch = memory_batch(shared) => Source::Memory(batch),
            batch = spool => Source::Spool(batch),
        }
    };
    match batch {
        Source::Memory(Some(batch)) | Source::Spool(Some(batch)) => Some(batch),
        Source::Memory(None) => {
            // Closed and drained: keep writing spooled records until the reader stops.
            *memory_done = true;
            spool_batch(spool_batches).await
        }
        Source::Spool(None) => memory_batch(shared).await,
    }
}

enum Source {
    Memory(Option<Batch>),
    Spool(Option<Batch>),
}

/// The next batch read back from the spool; `None` once its reader stopped.
async fn spool_batch(batches: &SpoolBatches) -> Option<Batch> {
    batches.lock().await.recv().await.map(|read| read.into_iter().map(Envelope::from_spool).collect())
}

/// The next memory batch; `None` once the queue is closed and drained.
async fn memory_batch(shared: &Shared) -> Option<Batch> {
    let batch = shared.queue.next_batch(shared.settings.batch_size, shared.settings.batch_interval).await;
    if batch.is_empty() {
        None
    } else {
        Some(batch)
    }
}

/// Writes a batch: retries failures that are not about the data, and splits a batch the
/// database refuses until the refused records are isolated and the rest committed.
async fn write(shared: &Shared, batch: Batch) {
    // Parts still to write, the next one last; splitting pushes the second half first so
    // the records keep their queue order.
    let mut parts: Vec<Vec<Envelope>> = vec![batch.envelopes];
    let mut attempt: u32 = 0;
    while let Some(part) = parts.pop() {
        // While the database is down (or not reached yet since start-up), memory records
        // go to disk at once instead of waiting here; spool records are what probes for
        // the database's return.
        if shared.spool.is_some() && shared.health.is_down() && part.iter().all(Envelope::in_memory) {
            shared.spill(part, SpillCause::DatabaseDown);
            continue;
        }
        let Some(mut part) = wait_for_database(shared, part).await else { continue };
        // The store takes a slice of records; the envelopes are split off and rejoined
        // so no record is cloned on the hot path.
        let (records, meta): (Vec<Interaction>, Vec<Meta>) = part
            .drain(..)
            .map(|e| (e.record, Meta { enqueued_at: e.enqueued_at, on_commit: e.on_commit, origin: e.origin }))
            .unzip();
        match shared.sink.write_batch(&records).await {
            Ok(summary) => {
                attempt = 0;
                shared.health.succeeded();
                let stats = &shared.stats;
                stats.committed.fetch_add(summary.inserted, Ordering::Relaxed);
                stats.duplicates.fetch_add(summary.duplicates, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.record_latency(meta.iter().map(|m| m.enqueued_at));
                settle_spool(shared, meta.iter().map(|m| m.origin));
                for (record, m) in records.iter().zip(meta) {
                    if let Some(tx) = m.on_commit {
                        let _ = tx.send(if summary.already_stored.contains(&record.interaction_id) {
                            Outcome::Duplicate
                        } else {
                            Outcome::Committed
                        });
                    }
                }
            }
            Err(e @ StoreError::Rejected(_)) => {
                shared.health.succeeded();
                shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                let envelopes = rejoin(records, meta);
                if envelopes.len() == 1 {
                    let envelope = envelopes.into_iter().next().expect("one envelope");
                    dead_letter(shared, envelope, &e).await;
                } else {
                    tracing::warn!(records = envelopes.len(), error = %e, "database refused a batch; splitting it to isolate the bad records");
                    let mut first = envelopes;
                    let second = first.split_off(first.len() / 2);
                    parts.push(second);
                    parts.push(first);
                }
            }
            Err(e) => {
                shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                shared.health.failed(&e.to_string(), shared.spool.is_some());
                let envelopes = rejoin(records, meta);
                if shared.spool.is_some() && envelopes.iter().all(Envelope::in_memory) {
                    shared.spill(envelopes, SpillCause::DatabaseDown);
                    continue;
                }
                // Records that reached memory before the outage was noticed go to disk
                // too, rather than waiting behind this retry.
                if shared.spool.is_some() {
                    shared.spill(shared.queue.drain_all(), SpillCause::DatabaseDown);
                }
                let delay = backoff(attempt, BACKOFF_FIRST, BACKOFF_MAX);
                attempt = attempt.saturating_add(1);
                tracing::warn!(records = envelopes.len(), attempt, retry_in = ?delay, error = %e, "audit batch write failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.give_up.cancelled() => {}
                }
                if shared.give_up.is_cancelled() {
                    // Memory records go to the spool (or are dropped without one); spool
                    // records stay on disk for the next start.
                    let rest: Vec<Envelope> = envelopes.into_iter().chain(parts.drain(..).flatten()).collect();
                    shared.spill(rest, SpillCause::Shutdown);
                    return;
                }
                shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                parts.push(envelopes);
            }
        }
    }
}

/// Tells the spool that these records are settled, segment by segment.
fn settle_spool(shared: &Shared, origins: impl Iterator<Item = Origin>) {
    let Some(spool) = &shared.spool else { return };
    let mut per_segment: BTreeMap<SpoolRef, u64> = BTreeMap::new();
    for origin in origins {
        if let Origin::Spool(at) = origin {
            *per_segment.entry(at).or_default() += 1;
        }
    }
    for (at, n) in per_segment {
        spool.settle(at, n);
    }
}

/// Holds a part until start-up has reached the database (connected, migrated); it waits
/// safe on disk, or (without a spool) in memory. Returns the part when writing may go
/// ahead, `None` when shutdown dealt with it first.
async fn wait_for_database(shared: &Shared, part: Vec<Envelope>) -> Option<Vec<Envelope>> {
    if shared.health.is_ready() {
        return Some(part);
    }
    tokio::select! {
        _ = shared.health.wait_ready() => Some(part),
        _ = shared.closing.cancelled() => {
            // Shutting down before the database was ever reached: memory records go to
            // the spool (or are dropped and counted); spooled ones stay on disk.
            shared.spill(part, SpillCause::DatabaseDown);
            None
        }
    }
}

/// Keeps a refused record aside with the reason: in the `dead_letters` table, else in
/// `dead-letters.ndjson` in the spool directory, else (nowhere to keep it) counted as
/// dropped. A dead letter is never retried into the batch.
async fn dead_letter(shared: &Shared, envelope: Envelope, error: &StoreError) {
    let reason = error.to_string();
    let letter = DeadLetter::new(&envelope.record, reason.clone());
    let id = envelope.record.interaction_id;
    let stored = match shared.sink.write_dead_letters(std::slice::from_ref(&letter)).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(interaction_id = %id, error = %e, "cannot write to the dead-letter table; trying the dead-letter file");
            dead_letter_file(shared, &letter)
        }
    };
    if !stored {
        // Nowhere to keep it: the drop is final, so a spooled copy is settled too (else it
        // would be replayed, counted twice, and hold its segment and every shutdown).
        settle_spool(shared, std::iter::once(envelope.origin));
        shared.drop_record(envelope, DropReason::Rejected, &reason);
        return;
    }
    // One line a second at most: a producer sending bad records in a loop must not
    // flood the log; the counter (and the table) has every one.
    shared.dead_letter_log.log(|suppressed| {
        tracing::error!(interaction_id = %id, error = %reason, suppressed, "database refused an audit record; dead-lettered");
    });
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    settle_spool(shared, std::iter::once(envelope.origin));
    envelope.resolve(Outcome::DeadLettered(reason));
}

/// Appends a dead letter to the spool directory's `dead-letters.ndjson`.
fn dead_letter_file(shared: &Shared, letter: &DeadLetter) -> bool {
    let Some(spool) = &shared.spool else { return false };
    let path = spool.dir().join("dead-letters.ndjson");
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let mut line = serde_json::to_vec(letter).map_err(std::io::Error::other)?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()
    })();
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot write the dead-letter file");
            false
        }
    }
}

struct Meta {
    enqueued_at: Instant,
    on_commit: Option<tokio::sync::oneshot::Sender<Outcome>>,
    origin: Origin,
}

fn rejoin(records: Vec<Interaction>, meta: Vec<Meta>) -> Vec<Envelope> {
    records
        .into_iter()
        .zip(meta)
        .map(|(record, m)| Envelope { record, enqueued_at: m.enqueued_at, on_commit: m.on_commit, origin: m.origin })
        .collect()
}
