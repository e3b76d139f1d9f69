//! The broker's side of the contract: the names, the queue arguments, declaring them,
//! and connecting.
//!
//! Both producers and workers declare everything at every connection, so whichever
//! starts first creates it and a broker that lost its definitions gets them back.
//! Declaring an existing queue with the same arguments is a no-op; with other arguments
//! the broker refuses (`PRECONDITION_FAILED`, and closes the channel), which here is
//! [`DistributedError::Mismatch`]: a start-up error, never retried, since retrying
//! cannot change the queue's arguments.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{redact_url, DistributedConfig};

/// How long connecting to the broker (TCP and the AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long declaring the topology may take.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// The broker cannot be reached, or the connection or channel broke; retrying may
    /// succeed.
    #[error("RabbitMQ broker {url} unavailable: {message}")]
    Unavailable {
        /// The broker (password redacted).
        url: String,
        /// What happened.
        message: String,
    },
    /// A queue exists with other arguments than this configuration declares.
    #[error(
        "RabbitMQ queue `{queue}` exists with other arguments than audit.distributed declares ({argument}): {message}; \
         delete the queue or make the configuration match it"
    )]
    Mismatch {
        /// The queue (or exchange) whose declaration was refused.
        queue: String,
        /// The argument that differs, as the broker named it (`x-delivery-limit`), or
        /// `unknown` when its message did not say.
        argument: String,
        /// The broker's message.
        message: String,
    },
    /// The broker refused something else (permissions, a missing vhost).
    #[error("RabbitMQ broker {url} refused {what}: {message}")]
    Refused {
        /// The broker (password redacted).
        url: String,
        /// What was being done.
        what: String,
        /// The broker's message.
        message: String,
    },
    /// Distributed mode is not configured.
    #[error("audit.distributed.amqp_url is not set (AUDIT_DISTRIBUTED_AMQP_URL)")]
    NotConfigured,
    /// The database could not be opened or prepared for writes.
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl DistributedError {
    /// True when retrying later may succeed (the broker was away).
    pub fn is_transient(&self) -> bool {
        matches!(self, DistributedError::Unavailable { .. })
    }

    /// The error for `error` while doing `what` against the broker at `url` (redacted).
    pub(crate) fn from_lapin(url: &str, what: &str, queue: &str, error: &lapin::Error) -> DistributedError {
        if let lapin::ErrorKind::ProtocolError(amqp) = error.kind() {
            let message = amqp.get_message().as_str().to_owned();
            return match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => DistributedError::Mismatch {
                    queue: queue_named_in(&message).unwrap_or_else(|| queue.to_owned()),
                    argument: argument_named_in(&message).unwrap_or_else(|| "unknown".into()),
                    message,
                },
                // What retrying cannot mend: wrong credentials or permissions, a vhost
                // that does not exist. Everything else (the broker shutting down,
                // CONNECTION_FORCED, a resource alarm, a broken frame) is waited out.
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH) => {
                    DistributedError::Refused { url: redact_url(url), what: what.to_owned(), message }
                }
                AMQPErrorKind::Soft(_) | AMQPErrorKind::Hard(_) => {
                    DistributedError::Unavailable { url: redact_url(url), message: format!("{what}: {message}") }
                }
            };
        }
        DistributedError::Unavailable { url: redact_url(url), message: format!("{what}: {error}") }
    }

    pub(crate) fn timeout(url: &str, what: &str, after: Duration) -> DistributedError {
        DistributedError::Unavailable { url: redact_url(url), message: format!("{what}: no answer within {after:?}") }
    }
}

/// The argument a `PRECONDITION_FAILED` message names: RabbitMQ says
/// "inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': …".
fn argument_named_in(message: &str) -> Option<String> {
    let rest = message.split_once("inequivalent arg '")?.1;
    Some(rest.split_once('\'')?.0.to_owned())
}

/// The queue a `PRECONDITION_FAILED` message names ("… for queue 'q' in vhost …").
fn queue_named_in(message: &str) -> Option<String> {
    let rest = message.split_once("for queue '")?.1;
    Some(rest.split_once('\'')?.0.to_owned())
}

/// The names and arguments of distributed mode's queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The records' queue.
    pub queue: String,
    /// The dead-letter exchange (`<queue>.dlx`).
    pub dead_letter_exchange: String,
    /// The queue dead-lettered messages end in (`<queue>.dead`).
    pub dead_letter_queue: String,
    /// `x-delivery-limit` of the records' queue.
    pub delivery_limit: u32,
}

impl Topology {
    /// The topology `config` describes.
    pub fn from_config(config: &DistributedConfig) -> Topology {
        Topology {
            queue: config.queue.clone(),
            dead_letter_exchange: format!("{}.dlx", config.queue),
            dead_letter_queue: format!("{}.dead", config.queue),
            delivery_limit: config.delivery_limit,
        }
    }

    /// The records' queue's arguments. The integer's AMQP type matters: the broker
    /// compares type and value, so every declaration must send the same one.
    pub fn queue_arguments(&self) -> FieldTable {
        let mut args = quorum();
        args.insert(ShortString::from("x-delivery-limit"), AMQPValue::LongLongInt(i64::from(self.delivery_limit)));
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
        );
        args
    }

    /// Declares the dead-letter exchange and queue, then the records' queue, on
    /// `channel` (which the broker closes if a declaration is refused).
    pub async fn declare(&self, channel: &Channel, url: &str) -> Result<(), DistributedError> {
        let declare = async {
            let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
            channel
                .exchange_declare(
                    self.dead_letter_exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    DistributedError::from_lapin(url, "declaring the dead-letter exchange", &self.queue, &e)
                })?;
            let queue_options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
            channel.queue_declare(self.dead_letter_queue.as_str().into(), queue_options, quorum()).await.map_err(
                |e| DistributedError::from_lapin(url, "declaring the dead-letter queue", &self.dead_letter_queue, &e),
            )?;
            channel
                .queue_bind(
                    self.dead_letter_queue.as_str().into(),
                    self.dead_letter_exchange.as_str().into(),
                    ShortString::from(""),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    DistributedError::from_lapin(url, "binding the dead-letter queue", &self.dead_letter_queue, &e)
                })?;
            channel
                .queue_declare(self.queue.as_str().into(), queue_options, self.queue_arguments())
                .await
                .map_err(|e| DistributedError::from_lapin(url, "declaring the queue", &self.queue, &e))?;
            Ok(())
        };
        tokio::time::timeout(DECLARE_TIMEOUT, declare)
            .await
            .unwrap_or_else(|_| Err(DistributedError::timeout(url, "declaring the queues", DECLARE_TIMEOUT)))
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString("quorum".into()));
    args
}

/// Connects to the broker at `url`, naming the connection `name` (shown by the broker's
/// tools), within [`CONNECT_TIMEOUT`]. No automatic recovery: the callers reconnect
/// themselves, because a worker must know that the deliveries of a lost connection are
/// void (their acks would go nowhere) and a producer must know that a batch's confirms
/// will never come.
pub async fn connect(url: &str, name: &str) -> Result<Connection, DistributedError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(DistributedError::from_lapin(url, "connecting", "", &e)),
        Err(_) => Err(DistributedError::timeout(url, "connecting", CONNECT_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_queue() {
        let t = Topology::from_config(&DistributedConfig::default());
        assert_eq!(t.queue, "opsagent-audit");
        assert_eq!(t.dead_letter_exchange, "opsagent-audit.dlx");
        assert_eq!(t.dead_letter_queue, "opsagent-audit.dead");
    }

    #[test]
    fn the_differing_argument_is_read_from_the_brokers_message() {
        let m = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q1' in vhost '/': \
                 received the value '5' of type 'longlong' but current is none";
        assert_eq!(argument_named_in(m).as_deref(), Some("x-delivery-limit"));
        assert_eq!(queue_named_in(m).as_deref(), Some("q1"));
        assert_eq!(argument_named_in("something else"), None);
    }
}
