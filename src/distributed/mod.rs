//! Distributed mode: capture front-ends publish to RabbitMQ, `worker` processes write
//! to the database.
//!
//! # Invariants
//! - A record is on the wire only after the producer's pipeline stages ran: masking and
//!   risk classification happen in `serve` (the front-end), exactly as in direct mode;
//!   the broker and the workers only ever see masked records.
//! - A producer counts a batch as taken only once the broker confirmed every message of
//!   it (publisher confirms, `mandatory`, so a message no queue took is an error, not a
//!   silent drop). An unreachable broker, a nack, a returned message or a confirm that
//!   does not come within `confirm_timeout` is [`StoreError::Unavailable`]: the pipeline
//!   treats the broker exactly as it treats a database that is down (spool, retry with
//!   backoff, forward on return). So a durable `202` still means "fsync'd in the local
//!   spool", or, without a spool, "confirmed by the broker".
//! - A worker acknowledges a delivery only after the transaction holding its record
//!   committed (or the record was found already stored, or the database refused it and
//!   it was written to `dead_letters`). Anything else leaves the delivery unacknowledged:
//!   if the worker dies, the broker gives it to another worker. Writes are idempotent on
//!   `interaction_id`, so such a redelivery stores nothing twice.
//! - A message that is not a record (it does not decode) is rejected without requeue,
//!   and the broker moves it to the dead-letter exchange; it is never acknowledged as if
//!   it had been stored.
//!
//! # Topology ([`topology`])
//! One durable quorum queue (`audit.distributed.queue`, replicated and fsync'd by the
//! broker), with `x-delivery-limit` (a message redelivered that often is dead-lettered
//! rather than going round for ever) and `x-dead-letter-exchange` `<queue>.dlx`, a fanout
//! exchange bound to the quorum queue `<queue>.dead`. Both sides declare all of it at
//! every connection; declaring is idempotent, and an existing queue with other arguments
//! is a start-up error naming the queue and the argument.
//!
//! # Producer ([`publisher`])
//! [`BrokerSink`] is a [`BatchSink`](crate::store::BatchSink): `serve`'s pipeline (queue,
//! batching, spool, retries, drop counting) is the one of direct mode, with this sink in
//! place of the database. One message per record (JSON, persistent, `message_id` = the
//! `interaction_id`), so that any worker can take any record and one refused record
//! stays one dead letter.
//!
//! # Worker ([`worker`])
//! Consumes with `basic.qos` prefetch = `audit.distributed.prefetch`, gathers what has
//! arrived into a batch, and hands it to a pipeline of its own whose sink is the store:
//! the same batching writer, the same split-in-halves isolation of refused records, the
//! same dead-letter path and retries as direct mode. It waits for every record's outcome,
//! then acknowledges the batch with one `multiple` ack. While the database is down the
//! pipeline retries with backoff and the worker acknowledges nothing; the broker holds
//! everything else. SIGTERM stops consuming, finishes (and acknowledges) the batch in
//! hand within `audit.async.shutdown_timeout`, and exits; deliveries not acknowledged
//! by then go back to the queue when the connection closes.
//!
//! # Files
//! [`topology`] (names, arguments, declaration, connecting), [`message`] (a record as an
//! AMQP message and back), [`publisher`] (the producer's sink), [`worker`] (the consumer).

pub mod message;
pub mod publisher;
pub mod topology;
pub mod worker;

pub use message::DecodeError;
pub use publisher::BrokerSink;
pub use topology::{DistributedError, Topology};
pub use worker::{Worker, WorkerReport, WorkerStats};

#[cfg(doc)]
use crate::store::StoreError;
