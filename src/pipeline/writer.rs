//! A batch writer: takes batches from the queue and gets each into the store.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::{Batch, DropReason, Envelope, Outcome, Shared};
use crate::model::Interaction;
use crate::store::StoreError;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs one writer until the queue is closed and drained, or shutdown gives up.
pub(super) async fn run(id: usize, shared: Arc<Shared>) {
    tracing::debug!(writer = id, "audit writer started");
    loop {
        let batch = shared.queue.next_batch(shared.settings.batch_size, shared.settings.batch_interval).await;
        if batch.is_empty() {
            break;
        }
        write(&shared, batch).await;
    }
    tracing::debug!(writer = id, "audit writer stopped");
}

/// Writes a batch: retries failures that are not about the data, and splits a batch the
/// database refuses until the refused records are isolated and the rest committed.
async fn write(shared: &Shared, batch: Batch) {
    // Parts still to write, the next one last; splitting pushes the second half first so
    // the records keep their queue order.
    let mut parts: Vec<Vec<Envelope>> = vec![batch.envelopes];
    let mut attempt: u32 = 0;
    while let Some(mut part) = parts.pop() {
        // The store takes a slice of records; the envelopes are split off and rejoined
        // so no record is cloned on the hot path.
        let (records, meta): (Vec<Interaction>, Vec<Meta>) =
            part.drain(..).map(|e| (e.record, Meta { enqueued_at: e.enqueued_at, ack: e.ack })).unzip();
        match shared.store.write_batch(&records).await {
            Ok(summary) => {
                attempt = 0;
                let stats = &shared.stats;
                stats.committed.fetch_add(summary.inserted, Ordering::Relaxed);
                stats.duplicates.fetch_add(summary.duplicates, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.record_latency(&meta.iter().map(|m| m.enqueued_at).collect::<Vec<_>>());
                for (record, m) in records.iter().zip(meta) {
                    if let Some(ack) = m.ack {
                        let _ = ack.send(if summary.already_stored.contains(&record.interaction_id) {
                            Outcome::Duplicate
                        } else {
                            Outcome::Committed
                        });
                    }
                }
            }
            Err(e @ StoreError::Rejected(_)) => {
                shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                let envelopes = rejoin(records, meta);
                if envelopes.len() == 1 {
                    let envelope = envelopes.into_iter().next().expect("one envelope");
                    tracing::error!(interaction_id = %envelope.record.interaction_id, error = %e, "database refused an audit record");
                    shared.drop_record(envelope, DropReason::Rejected, &e.to_string());
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
                let envelopes = rejoin(records, meta);
                let delay = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(records = envelopes.len(), attempt, retry_in = ?delay, error = %e, "audit batch write failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.give_up.cancelled() => {}
                }
                if shared.give_up.is_cancelled() {
                    for envelope in envelopes.into_iter().chain(parts.drain(..).flatten()) {
                        shared.drop_record(envelope, DropReason::Shutdown, "shutdown deadline passed during retries");
                    }
                    return;
                }
                shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                parts.push(envelopes);
            }
        }
    }
}

struct Meta {
    enqueued_at: Instant,
    ack: Option<tokio::sync::oneshot::Sender<Outcome>>,
}

fn rejoin(records: Vec<Interaction>, meta: Vec<Meta>) -> Vec<Envelope> {
    records
        .into_iter()
        .zip(meta)
        .map(|(record, m)| Envelope { record, enqueued_at: m.enqueued_at, ack: m.ack })
        .collect()
}

/// Exponential backoff with ±50% jitter, so writers that failed together do not all
/// retry in the same instant.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_FIRST.saturating_mul(1u32 << attempt.min(10)).min(BACKOFF_MAX);
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}
