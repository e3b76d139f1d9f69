//! The bounded in-memory queue between capture and the batch writers.
//!
//! `push` never blocks: when the queue is full the OLDEST record is evicted and handed
//! back to the caller to count (the seed's stated policy: recent records matter most
//! during an incident). `next_batch` hands a writer up to `max` records as soon as that
//! many are queued, or whatever is queued once the oldest record has waited `linger`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::envelope::{Batch, Envelope};

/// A bounded FIFO of records that drops its oldest entry when full.
#[derive(Debug)]
pub struct MemoryQueue {
    state: Mutex<State>,
    ready: Notify,
    capacity: usize,
    /// Records taken by [`MemoryQueue::next_batch`] and not yet [`MemoryQueue::finished`]:
    /// counted under the lock that removes them, so a record is always in the queue or here.
    taken: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Envelope>,
    closed: bool,
}

impl MemoryQueue {
    /// A queue holding at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        MemoryQueue {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
            taken: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the deque half-updated (every
        // critical section is a single push/pop), so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a record. Returns the record evicted to make room, if the queue was full,
    /// or the record itself if the queue is closed.
    pub fn push(&self, envelope: Envelope, batch_size: usize) -> Option<Envelope> {
        let (evicted, len) = {
            let mut state = self.lock();
            if state.closed {
                return Some(envelope);
            }
            let evicted = if state.items.len() >= self.capacity { state.items.pop_front() } else { None };
            state.items.push_back(envelope);
            (evicted, state.items.len())
        };
        // Wake a writer when there is something new to time (first record) or a full
        // batch; waking on every record would cost a context switch per record.
        if len == 1 || len >= batch_size {
            self.ready.notify_one();
        }
        evicted
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Records taken as batches and not yet finished (a writer holds them).
    pub fn taken(&self) -> u64 {
        self.taken.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A writer is done with `n` records it took (committed, refused, spilled or dropped).
    pub fn finished(&self, n: u64) {
        self.taken.fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// When the oldest waiting record was queued.
    pub fn oldest_enqueued_at(&self) -> Option<tokio::time::Instant> {
        self.lock().items.front().map(|e| e.enqueued_at)
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops accepting records and wakes every writer so they drain what is left.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_waiters();
        self.ready.notify_one();
    }

    /// Removes and returns everything still queued.
    pub fn drain_all(&self) -> Vec<Envelope> {
        self.lock().items.drain(..).collect()
    }

    /// Waits for the next batch: `max` records, or fewer once the oldest has waited
    /// `linger` or the queue is closed. An empty batch means closed and drained.
    pub async fn next_batch(&self, max: usize, linger: Duration) -> Batch {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Register before looking, so a push between the look and the wait is not missed.
            notified.as_mut().enable();
            let wait_until = {
                let mut state = self.lock();
                let due = match state.items.front() {
                    None if state.closed => return Batch::default(),
                    None => None,
                    Some(front) => Some(front.enqueued_at + linger),
                };
                if state.items.len() >= max || state.closed || due.is_some_and(|d| d <= Instant::now()) {
                    let take = state.items.len().min(max);
                    let batch: Batch = state.items.drain(..take).collect();
                    self.taken.fetch_add(take as u64, std::sync::atomic::Ordering::SeqCst);
                    let more = !state.items.is_empty();
                    drop(state);
                    if more {
                        // Pass the baton: another writer may take the rest now.
                        self.ready.notify_one();
                    }
                    return batch;
                }
                due
            };
            match wait_until {
                Some(due) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}
