//! What the logger handles and the writers share, and the two ways a record leaves
//! memory without being committed: to the spool, or counted as dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::envelope::{Envelope, Origin, Outcome};
use super::health::Health;
use super::queue::MemoryQueue;
use super::spool::{Spool, SpoolError, Spooled};
use super::stage::Stage;
use super::stats::{DropReason, PipelineStats, RateLimitedLog};
use crate::store::BatchSink;

/// Settings of a running pipeline.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) batch_size: usize,
    pub(crate) batch_interval: Duration,
    pub(crate) max_field_bytes: usize,
}

/// Why records leave memory for the spool; names the drop if the spool cannot take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpillCause {
    /// The memory queue overflowed (its oldest record).
    QueueFull,
    /// The database is down (or not reached yet).
    DatabaseDown,
    /// Shutdown's deadline passed.
    Shutdown,
    /// The record arrived after shutdown began.
    Closing,
}

impl SpillCause {
    /// The drop reason when there is no spool, or it refused for a reason other than
    /// being full.
    fn drop_reason(self) -> DropReason {
        match self {
            SpillCause::QueueFull => DropReason::QueueFull,
            SpillCause::DatabaseDown => DropReason::DatabaseDown,
            SpillCause::Shutdown => DropReason::Shutdown,
            SpillCause::Closing => DropReason::Closed,
        }
    }

    fn detail(self) -> &'static str {
        match self {
            SpillCause::QueueFull => "queue full, oldest record dropped",
            SpillCause::DatabaseDown => "database down",
            SpillCause::Shutdown => "shutdown deadline passed",
            SpillCause::Closing => "logger is shutting down",
        }
    }
}

/// The spool reader's channel, which the writers take turns to receive from.
pub(crate) type SpoolBatches = tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Vec<Spooled>>>;

pub(crate) struct Shared {
    pub(crate) queue: MemoryQueue,
    pub(crate) sink: Arc<dyn BatchSink>,
    pub(crate) stats: Arc<PipelineStats>,
    pub(crate) settings: Settings,
    /// What every record goes through on its way in (masking).
    pub(crate) stages: Vec<Arc<dyn Stage>>,
    /// Cancelled when shutdown's deadline passes: writers stop retrying.
    pub(crate) give_up: CancellationToken,
    /// The disk spool, when configured.
    pub(crate) spool: Option<Spool>,
    /// Records read back from the spool, shared by the writers.
    pub(crate) spool_batches: Option<SpoolBatches>,
    /// Cancelled when shutdown begins.
    pub(crate) closing: CancellationToken,
    pub(crate) health: Health,
    pub(crate) drop_log: RateLimitedLog,
    pub(crate) dead_letter_log: RateLimitedLog,
}

impl Shared {
    /// Counts, logs (rate-limited) and resolves a record that will not be stored.
    pub(crate) fn drop_record(&self, envelope: Envelope, reason: DropReason, detail: &str) {
        if let Some(counter) = self.stats.counter(reason) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let id = envelope.record.interaction_id;
        self.drop_log.log(|suppressed| {
            tracing::warn!(
                reason = reason.as_str(),
                interaction_id = %id,
                suppressed_since_last = suppressed,
                detail,
                "audit record dropped"
            );
        });
        envelope.resolve(Outcome::Dropped(reason, detail.to_string()));
    }

    /// Moves memory records to the spool (fire-and-forget appends). Records read from
    /// the spool stay where they are: still on disk, they are replayed on the next start.
    /// But one whose segment `drop_oldest` evicted while a writer held it exists only in
    /// memory now: it is appended again and its old place settled. Without a spool, or
    /// when it refuses them, the records are dropped and counted under a reason that
    /// says why.
    pub(crate) fn spill(&self, envelopes: Vec<Envelope>, cause: SpillCause) {
        for envelope in envelopes {
            let Some(spool) = &self.spool else {
                self.drop_record(envelope, cause.drop_reason(), cause.detail());
                continue;
            };
            if let Origin::Spool(at) = envelope.origin {
                if spool.holds(at) {
                    continue;
                }
                // Its old place is gone: the gauge must not wait for it.
                spool.settle(at, 1);
            }
            match spool.append(&envelope.record, None) {
                Ok(()) => {
                    self.stats.spilled.fetch_add(1, Ordering::Relaxed);
                    envelope.resolve(Outcome::Spooled);
                }
                Err(e @ (SpoolError::Full { .. } | SpoolError::Backlog { .. })) => {
                    self.drop_record(envelope, DropReason::SpoolFull, &e.to_string());
                }
                Err(e) => {
                    let detail = format!("{}; the spool refused it too: {e}", cause.detail());
                    self.drop_record(envelope, cause.drop_reason(), &detail);
                }
            }
        }
    }
}
