//! The audit pipeline: capture → queue → batching writers → store.
//!
//! # Invariants
//! - [`AuditLogger::log`] never blocks and never fails the caller. A record that cannot be
//!   kept is counted (by reason) and logged, rate-limited; it is never lost silently.
//! - Memory is bounded by `async.queue_size` records plus one batch per writer.
//! - A batch is written in one transaction. Writes are idempotent on `interaction_id`, so
//!   retrying a batch whose commit acknowledgement was lost stores nothing twice.
//! - A batch the database refuses because of its data is split in halves until the
//!   refused records are isolated; the others are committed. A batch that fails for any
//!   other reason (connection, database restarting) is retried with backoff and jitter.
//! - [`AuditLogger::shutdown`] stops intake, then writes everything queued and in flight
//!   before it returns, or reports what it could not write by the deadline.
//!
//! # Shape
//! Every record first passes the [`Stage`]s the logger was built with (masking), then
//! is sanitised. Producers push [`Envelope`]s (a masked, sanitised record, its enqueue time, and an optional
//! channel resolved on commit) into a [`MemoryQueue`]. `workers` writer tasks each take the
//! next [`Batch`] (`batch_size` records, or fewer once the oldest has waited
//! `batch_interval_ms`), write it, and resolve each envelope's acknowledgement with the
//! outcome.
//!
//! The [`Spool`] (optional, on by default in `serve`) is the queue's write-ahead log and
//! overflow. Records go to it when a producer wants a durable acknowledgement
//! ([`AuditLogger::log_durable`]), when the memory queue is full (the evicted oldest
//! record), while the database is down (new records and the batches that failed), and at
//! shutdown (whatever the deadline left). A reader task hands spooled records back as
//! batches; writers alternate between those and the memory queue, so a backlog drains
//! while new records keep flowing. A spooled record's segment is settled on commit.
//!
//! A record the database refuses goes to the `dead_letters` table (or, if that write
//! fails too, to `dead-letters.ndjson` in the spool directory), with the reason.
//!
//! The pipeline may start before the database is reachable or migrated
//! ([`AuditLogger::start_waiting`]): until [`AuditLogger::set_store_ready`], records go to
//! the spool (memory without one) and nothing is written.
//!
//! The pipeline needs two things of a database, [`BatchSink`](crate::store::BatchSink):
//! write a batch, write dead letters.
//!
//! # Files
//! [`envelope`] (a record in flight, batches, outcomes), [`queue`] (the bounded memory
//! queue), [`stats`] (counters, drop reasons), `health` (is the database taking writes),
//! `shared` (spill and drop), `stage` (work done on the way in), `writer` (the batch writers), [`logger`] (the producer's
//! handle, start and shutdown), [`spool`] (the disk spool), [`journal`] (a keyed durable
//! buffer for work that is not a record yet: the OTLP receiver's incomplete traces).

pub mod envelope;
mod health;
pub mod journal;
pub mod logger;
pub mod queue;
mod shared;
pub mod spool;
mod stage;
pub mod stats;
mod writer;

pub use envelope::{Batch, Envelope, Origin, Outcome};
pub(crate) use health::backoff;
pub use journal::{Journal, JournalError, Replayed};
pub use logger::{AuditLogger, Durable, LoggerBuilder, NotDurable, ShutdownReport};
pub use queue::MemoryQueue;
pub use spool::{Spool, SpoolError, SpoolRef, SpoolStats, Spooled};
pub use stage::Stage;
pub use stats::{DropReason, PipelineStats, StatsSnapshot};
