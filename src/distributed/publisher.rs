//! The producer's sink: a batch is taken once the broker confirmed every message of it.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, Connection};

use super::message;
use super::topology::{self, DistributedError, Topology};
use crate::config::{redact_url, DistributedConfig};
use crate::model::Interaction;
use crate::store::{BatchSink, DeadLetter, StoreError, WriteSummary};

/// The name the producer's connection shows in the broker's tools.
const CONNECTION_NAME: &str = "opsagent-audit serve";

/// Publishes batches to the records' queue with publisher confirms; what the pipeline
/// of `serve` writes to in distributed mode.
///
/// One connection, re-opened when it broke (the topology is declared again each time),
/// and a pool of confirm-mode channels, one per batch in flight, so that the pipeline's
/// writers publish concurrently and each waits only for its own confirms.
pub struct BrokerSink {
    url: String,
    topology: Topology,
    confirm_timeout: Duration,
    connection: tokio::sync::Mutex<Option<Connection>>,
    idle: Mutex<Vec<Channel>>,
}

impl std::fmt::Debug for BrokerSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSink")
            .field("url", &redact_url(&self.url))
            .field("queue", &self.topology.queue)
            .finish_non_exhaustive()
    }
}

impl BrokerSink {
    /// A sink for `config` (`audit.distributed`); connects on first use.
    pub fn new(config: &DistributedConfig) -> Result<BrokerSink, DistributedError> {
        let url = config.amqp_url.clone().ok_or(DistributedError::NotConfigured)?;
        Ok(BrokerSink {
            url,
            topology: Topology::from_config(config),
            confirm_timeout: config.confirm_timeout,
            connection: tokio::sync::Mutex::new(None),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Connects and declares the topology now (start-up): a queue declared with other
    /// arguments is reported here, before anything is accepted.
    pub async fn check(&self) -> Result<(), DistributedError> {
        let channel = self.channel().await?;
        self.give_back(channel);
        Ok(())
    }

    /// Closes the connection (at shutdown, after the pipeline drained).
    pub async fn close(&self) {
        let idle: Vec<Channel> = std::mem::take(&mut *self.lock_idle());
        for channel in idle {
            let _ = channel.close(200, ShortString::from("shutting down")).await;
        }
        if let Some(connection) = self.connection.lock().await.take() {
            // The broker may be gone already; nothing is waiting on this connection.
            let _ = connection.close(200, ShortString::from("shutting down")).await;
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Channel>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn give_back(&self, channel: Channel) {
        if channel.status().connected() {
            self.lock_idle().push(channel);
        }
    }

    /// An open confirm-mode channel: an idle one, else a new one on the connection
    /// (opened, and the topology declared, if there is none or it broke).
    async fn channel(&self) -> Result<Channel, DistributedError> {
        loop {
            let Some(channel) = self.lock_idle().pop() else { break };
            if channel.status().connected() {
                return Ok(channel);
            }
        }
        let mut connection = self.connection.lock().await;
        if connection.as_ref().is_none_or(|c| !c.status().connected()) {
            // Channels of the broken connection are useless now.
            self.lock_idle().clear();
            let fresh = topology::connect(&self.url, CONNECTION_NAME).await?;
            let declaring = fresh
                .create_channel()
                .await
                .map_err(|e| DistributedError::from_lapin(&self.url, "opening a channel", "", &e))?;
            self.topology.declare(&declaring, &self.url).await?;
            // The declaring channel is closed; publishing channels are in confirm mode.
            let _ = declaring.close(200, ShortString::from("declared")).await;
            tracing::info!(broker = %redact_url(&self.url), queue = %self.topology.queue, "connected to RabbitMQ");
            *connection = Some(fresh);
        }
        let Some(open) = connection.as_ref() else {
            return Err(DistributedError::Unavailable { url: redact_url(&self.url), message: "not connected".into() });
        };
        let channel = open
            .create_channel()
            .await
            .map_err(|e| DistributedError::from_lapin(&self.url, "opening a channel", "", &e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| DistributedError::from_lapin(&self.url, "enabling publisher confirms", "", &e))?;
        Ok(channel)
    }

    /// Publishes every record of `batch` on `channel` and waits for all confirms.
    async fn publish(&self, channel: &Channel, batch: &[Interaction]) -> Result<(), DistributedError> {
        let queue = ShortString::from(self.topology.queue.as_str());
        // `mandatory`: a message no queue takes (the queue was deleted) comes back with
        // its confirm instead of being dropped by the broker while confirmed.
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let mut confirms = Vec::with_capacity(batch.len());
        for record in batch {
            let body = message::encode(record).map_err(|e| DistributedError::Unavailable {
                url: redact_url(&self.url),
                message: format!("record {} does not serialise: {e}", record.interaction_id),
            })?;
            let confirm = channel
                .basic_publish(ShortString::from(""), queue.clone(), options, &body, message::properties(record))
                .await
                .map_err(|e| DistributedError::from_lapin(&self.url, "publishing", &self.topology.queue, &e))?;
            confirms.push(confirm);
        }
        let confirmed = tokio::time::timeout(self.confirm_timeout, futures::future::try_join_all(confirms))
            .await
            .map_err(|_| DistributedError::timeout(&self.url, "waiting for publisher confirms", self.confirm_timeout))?
            .map_err(|e| DistributedError::from_lapin(&self.url, "waiting for publisher confirms", "", &e))?;
        for confirmation in confirmed {
            let problem = match confirmation {
                Confirmation::Ack(None) => continue,
                Confirmation::Ack(Some(returned)) => {
                    format!("a message came back unroutable ({}): is queue `{}` there?", returned.reply_text, queue)
                }
                Confirmation::Nack(_) => "the broker refused (nacked) a message".to_owned(),
                Confirmation::NotRequested => "the channel is not in confirm mode".to_owned(),
            };
            return Err(DistributedError::Unavailable { url: redact_url(&self.url), message: problem });
        }
        Ok(())
    }
}

#[async_trait]
impl BatchSink for BrokerSink {
    /// Publishes the batch; every record counts as "inserted" once confirmed (whether it
    /// is already in the database is for the worker to find). Any failure is
    /// [`StoreError::Unavailable`]: the pipeline spools the batch and retries, and a
    /// retry may publish a record twice, which the workers' idempotent writes absorb.
    async fn write_batch(&self, batch: &[Interaction]) -> Result<WriteSummary, StoreError> {
        if batch.is_empty() {
            return Ok(WriteSummary::default());
        }
        let channel = self.channel().await.map_err(StoreError::unavailable)?;
        match self.publish(&channel, batch).await {
            Ok(()) => {
                self.give_back(channel);
                Ok(WriteSummary { inserted: batch.len() as u64, duplicates: 0, already_stored: Vec::new() })
            }
            Err(e) => {
                // The channel may hold confirms that will never come: never reuse it.
                let _ = channel.close(200, ShortString::from("batch failed")).await;
                Err(StoreError::unavailable(e))
            }
        }
    }

    /// Never reached: publishing never refuses a record for its data (the broker does not
    /// look inside), so the pipeline has no dead letters to give here. Refusing keeps
    /// one in the spool's dead-letter file should it ever happen.
    async fn write_dead_letters(&self, _letters: &[DeadLetter]) -> Result<(), StoreError> {
        Err(StoreError::Other("a distributed producer does not store dead letters; the workers do".into()))
    }
}
