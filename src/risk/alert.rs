//! The anomaly webhook (`audit.alerts.webhook_url`): each new anomaly is POSTed as JSON
//! by a task of its own, behind a bounded channel, so neither ingest nor the detection
//! job ever waits for it. Posts are rate-limited (`max_per_minute`) and retried with
//! backoff (`max_attempts`), so a receiver that is down for a while gets them later;
//! anything given up (the channel full, the attempts spent) is counted and logged.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::AlertsConfig;
use crate::store::NewAnomaly;

/// Anomalies waiting for the webhook; one more is dropped (counted).
const QUEUE: usize = 1024;
/// First wait before a retry; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How a webhook delivery ended, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed.
    Failed,
    /// The queue was full.
    Dropped,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
        }
    }
}

/// The body of a webhook POST.
#[derive(Debug, Serialize)]
struct Payload<'a> {
    source: &'static str,
    anomaly: &'a NewAnomaly,
}

/// Where anomalies are handed to the webhook task.
#[derive(Clone)]
pub struct AlertSender {
    tx: mpsc::Sender<NewAnomaly>,
    outcome: Arc<dyn Fn(Outcome) + Send + Sync>,
}

impl std::fmt::Debug for AlertSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSender").finish_non_exhaustive()
    }
}

impl AlertSender {
    /// Queues an anomaly without waiting; a full queue drops it (counted, logged).
    pub fn send(&self, anomaly: NewAnomaly) {
        if let Err(e) = self.tx.try_send(anomaly) {
            (self.outcome)(Outcome::Dropped);
            tracing::warn!(reason = %e, "anomaly webhook queue full or closed: anomaly not sent (it is stored)");
        }
    }
}

/// Starts the webhook task when `config.webhook_url` is set; `outcome` is told how each
/// anomaly ended. The task stops at `stop` (what is queued then is not sent).
pub fn spawn(
    config: &AlertsConfig,
    outcome: Arc<dyn Fn(Outcome) + Send + Sync>,
    stop: CancellationToken,
) -> Option<(AlertSender, JoinHandle<()>)> {
    let url = config.webhook_url.clone()?;
    let client = reqwest::Client::builder().timeout(config.timeout).build().ok()?;
    let per_minute = NonZeroU32::new(config.max_per_minute).unwrap_or(NonZeroU32::MIN);
    let limiter = RateLimiter::direct(Quota::per_minute(per_minute));
    let attempts = config.max_attempts.max(1);
    let (tx, mut rx) = mpsc::channel::<NewAnomaly>(QUEUE);
    let report = outcome.clone();
    let task = tokio::spawn(async move {
        loop {
            let anomaly = tokio::select! {
                next = rx.recv() => match next { Some(a) => a, None => return },
                _ = stop.cancelled() => return,
            };
            tokio::select! {
                _ = limiter.until_ready() => {}
                _ = stop.cancelled() => return,
            }
            let mut delivered = false;
            for attempt in 0..attempts {
                match client.post(&url).json(&Payload { source: "opsagent-audit", anomaly: &anomaly }).send().await {
                    Ok(r) if r.status().is_success() => {
                        delivered = true;
                        break;
                    }
                    // The URL may carry a token: never logged.
                    Ok(r) => tracing::debug!(status = r.status().as_u16(), attempt, "anomaly webhook refused"),
                    Err(e) => tracing::debug!(error = %e.without_url(), attempt, "anomaly webhook unreachable"),
                }
                if attempt + 1 < attempts {
                    tokio::select! {
                        _ = tokio::time::sleep(crate::pipeline::backoff(attempt, RETRY_FIRST, RETRY_MAX)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
            if delivered {
                report(Outcome::Delivered);
            } else {
                report(Outcome::Failed);
                tracing::warn!(
                    kind = anomaly.kind.as_str(),
                    attempts,
                    "anomaly webhook failed on every attempt; the anomaly is stored but was not sent"
                );
            }
        }
    });
    Some((AlertSender { tx, outcome }, task))
}
