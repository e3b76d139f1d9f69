//! A record on its way to the store, and the batches writers take.

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::spool::{SpoolRef, Spooled};
use super::stats::DropReason;
use crate::model::Interaction;

/// What happened to a record whose producer waited for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed to the database by this write.
    Committed,
    /// Already stored before (same `interaction_id`); nothing written.
    Duplicate,
    /// Handed to the disk spool (the database was down or the queue full); it will be
    /// committed from there.
    Spooled,
    /// Refused by the database and stored in `dead_letters` with the reason.
    DeadLettered(String),
    /// Not stored, and why (with the database's message for `Rejected`).
    Dropped(DropReason, String),
}

/// Where a record in a batch came from, so its commit can be reported there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The memory queue.
    Memory,
    /// A spool segment; settled on commit.
    Spool(SpoolRef),
}

/// A record on its way to the store.
#[derive(Debug)]
pub struct Envelope {
    /// The sanitised record.
    pub record: Interaction,
    /// When it entered the pipeline (for batching deadlines and latency).
    pub enqueued_at: Instant,
    /// Resolved with the record's outcome once committed, for producers that wait.
    pub on_commit: Option<oneshot::Sender<Outcome>>,
    /// Where it came from.
    pub origin: Origin,
}

impl Envelope {
    /// A record from the memory path.
    pub fn new(record: Interaction, on_commit: Option<oneshot::Sender<Outcome>>) -> Envelope {
        Envelope { record, enqueued_at: Instant::now(), on_commit, origin: Origin::Memory }
    }

    /// A record read back from the spool.
    pub fn from_spool(spooled: Spooled) -> Envelope {
        Envelope {
            record: spooled.record,
            enqueued_at: Instant::now(),
            on_commit: None,
            origin: Origin::Spool(spooled.at),
        }
    }

    /// True for a record that lives only in memory.
    pub fn in_memory(&self) -> bool {
        self.origin == Origin::Memory
    }

    /// Tells a waiting producer what happened.
    pub(crate) fn resolve(self, outcome: Outcome) {
        if let Some(tx) = self.on_commit {
            // The producer may have stopped waiting; that is its choice.
            let _ = tx.send(outcome);
        }
    }
}

/// Records written together in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// The records, in queue order.
    pub envelopes: Vec<Envelope>,
}

impl FromIterator<Envelope> for Batch {
    fn from_iter<I: IntoIterator<Item = Envelope>>(iter: I) -> Self {
        Batch { envelopes: iter.into_iter().collect() }
    }
}

impl Batch {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.envelopes.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
    }
}
