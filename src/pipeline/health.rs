//! Whether the database takes writes: as the writers last saw it, and whether start-up
//! has reached it yet (connected, migrated).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

use tokio::sync::watch;

/// The database's state as the pipeline sees it.
#[derive(Debug)]
pub(crate) struct Health {
    down: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// True once the store is ready for writes (reachable and migrated). Until then
    /// writers hold spooled batches and memory records go to the spool.
    ready: watch::Sender<bool>,
}

impl Health {
    /// Health of a store that is (`ready`) or is not yet ready for writes.
    pub(crate) fn new(ready: bool, waiting_for: &str) -> Health {
        Health {
            down: AtomicBool::new(!ready),
            last_error: Mutex::new((!ready).then(|| waiting_for.to_string())),
            ready: watch::Sender::new(ready),
        }
    }

    /// True while writes are failing, and always while the store is not ready yet (the
    /// writers rely on this to send memory records to the spool meanwhile).
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// True once start-up has reached the database.
    pub(crate) fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until start-up has reached the database.
    pub(crate) async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives as long as `self`, so this only ends when ready.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Start-up reached the database: writes may begin.
    pub(crate) fn set_ready(&self) {
        self.ready.send_replace(true);
        self.succeeded();
    }

    /// Start-up is still waiting for the database, for this reason.
    pub(crate) fn not_ready(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        self.down.store(true, Ordering::Release);
    }

    /// Records a failed write; logs the transition to down once.
    pub(crate) fn failed(&self, error: &str, spooling: bool) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::error!(error, spooling, "database unavailable: audit writes are failing; retrying with backoff");
        }
    }

    /// Records a successful write; logs the recovery once.
    pub(crate) fn succeeded(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("database available again: audit writes resumed");
        }
    }

    /// The last error while down.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How long to wait before retry number `attempt` (from 0) against a database that
/// failed: `first`, doubling up to `max`, with ±50% jitter so that callers that failed
/// together (writers, restarted services) do not all retry in the same instant.
pub(crate) fn backoff(attempt: u32, first: Duration, max: Duration) -> Duration {
    let base = first.saturating_mul(1u32 << attempt.min(10)).min(max);
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}
