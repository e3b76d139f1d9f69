//! The auditing reverse proxy (`serve --proxy-upstream URL`): put in front of an
//! unmodified OpsAgent, it forwards every request on its own listener
//! (`audit.proxy.listen`) and records the exchanges on `audit.proxy.paths` as
//! interactions, through the same pipeline as every other way in.
//!
//! - Requests and answers stream through untouched (status, headers but hop-by-hop ones
//!   and `Host`, bodies frame by frame; SSE as it comes; websockets joined after the
//!   `101`): see [`forward`].
//! - An audited exchange's bodies are copied as they pass, up to
//!   `audit.limits.max_body_bytes`, and mapped by [`crate::ingest::opsagent`] when the
//!   answer ends ([`audit`]). An agent that is down is answered `502`, one that does
//!   not answer within `audit.proxy.upstream_timeout` `504`, both recorded.
//! - The user comes from the agent's JWT, the session from the seed's `session_id`
//!   cookie ([`identity`]). `Authorization`, `X-API-Key` and cookies are never stored
//!   or logged.
//! - With `audit.proxy.capture_thoughts` the agent is asked for its trace and the
//!   answer rewritten without it ([`strip`]); such an answer is read whole before it is
//!   forwarded (bounded by `max_body_bytes`; beyond, forwarded with the trace, warned
//!   and counted).
//!
//! Depends on [`crate::ingest`] and [`crate::pipeline`] only; [`crate::api`]'s
//! application starts it beside the API.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::config::{redact_url, Config};
use crate::model::Status;
use crate::pipeline::AuditLogger;
use crate::server::{self, ServeLimits};

pub mod audit;
pub mod forward;
pub mod identity;
pub mod strip;

pub use identity::Identity;

/// The error of a body the proxy sends.
pub use crate::server::BoxError;
/// The body type of everything the proxy sends (either way).
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// `audit.proxy.jwt_secret_env` names a variable that is not set.
    #[error(
        "audit.proxy.jwt_secret_env names the environment variable {0}, which is not set (or empty); set it to the \
         agent's JWT secret, or remove the key to read users unverified"
    )]
    MissingSecret(String),
    /// The listen address could not be bound.
    #[error("binding the proxy's address {addr} (audit.proxy.listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What the proxy counted (reported by `/metrics`).
#[derive(Debug)]
pub struct ProxyStats {
    /// Requests forwarded without a record (other paths and methods, upgrades).
    pub forwarded: AtomicU64,
    /// Audited exchanges recorded, by how they ended.
    pub audited_success: AtomicU64,
    /// … with status `error` (the agent's error answers included).
    pub audited_error: AtomicU64,
    /// … with status `timeout`.
    pub audited_timeout: AtomicU64,
    /// … with status `cancelled` (the client went away).
    pub audited_cancelled: AtomicU64,
    /// Requests the agent could not be reached for (`502`).
    pub upstream_errors: AtomicU64,
    /// Requests the agent did not answer in time (`504`).
    pub upstream_timeouts: AtomicU64,
    /// Answers forwarded with a trace the client did not ask for (too large to
    /// rewrite, or not JSON).
    pub trace_kept: AtomicU64,
    /// Time from sending an audited request to the end of the agent's answer, seconds.
    pub upstream_seconds: Histogram,
}

impl Default for ProxyStats {
    fn default() -> Self {
        ProxyStats {
            forwarded: AtomicU64::new(0),
            audited_success: AtomicU64::new(0),
            audited_error: AtomicU64::new(0),
            audited_timeout: AtomicU64::new(0),
            audited_cancelled: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
            upstream_timeouts: AtomicU64::new(0),
            trace_kept: AtomicU64::new(0),
            // 5 ms to ~6 min: agent calls last seconds to minutes.
            upstream_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 17)),
        }
    }
}

impl ProxyStats {
    fn forwarded(&self) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    fn upstream_timeout(&self) {
        self.upstream_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    fn trace_kept(&self) {
        self.trace_kept.fetch_add(1, Ordering::Relaxed);
    }

    fn record(&self, status: Status) {
        let counter = match status {
            Status::Success => &self.audited_success,
            Status::Error => &self.audited_error,
            Status::Timeout => &self.audited_timeout,
            Status::Cancelled => &self.audited_cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Audited exchanges recorded, all endings.
    pub fn audited(&self) -> u64 {
        [&self.audited_success, &self.audited_error, &self.audited_timeout, &self.audited_cancelled]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// A bound proxy, not yet serving.
pub struct Proxy {
    listener: TcpListener,
    forwarder: Arc<forward::Forwarder>,
    limits: ServeLimits,
    stats: Arc<ProxyStats>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("address", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds `audit.proxy.listen` when `audit.proxy.upstream` is set (`None`: the proxy
    /// is off). `env` reads the JWT secret's variable.
    pub async fn bind(
        config: &Config,
        logger: AuditLogger,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Proxy>, ProxyError> {
        let proxy = &config.proxy;
        let Some(upstream) = proxy.upstream_uri()? else { return Ok(None) };
        let secret = match &proxy.jwt_secret_env {
            Some(var) => {
                Some(env(var).filter(|s| !s.is_empty()).ok_or_else(|| ProxyError::MissingSecret(var.clone()))?)
            }
            None => None,
        };
        let identity = Identity::new(secret.as_deref().map(str::as_bytes));
        let listener =
            TcpListener::bind(proxy.listen).await.map_err(|source| ProxyError::Bind { addr: proxy.listen, source })?;
        let stats = Arc::new(ProxyStats::default());
        let settings = forward::Settings {
            upstream: upstream.clone(),
            paths: proxy.paths.clone(),
            capture_thoughts: proxy.capture_thoughts,
            upstream_timeout: proxy.upstream_timeout,
            max_body_bytes: config.limits.max_body_bytes,
        };
        let forwarder = Arc::new(forward::Forwarder::new(settings, identity, logger, stats.clone()));
        tracing::info!(
            address = %listener.local_addr().map_err(|source| ProxyError::Bind { addr: proxy.listen, source })?,
            upstream = %redact_url(&upstream.to_string()),
            paths = ?proxy.paths,
            capture_thoughts = proxy.capture_thoughts,
            verifies_jwt = secret.is_some(),
            "auditing proxy listening"
        );
        let limits = ServeLimits {
            listener: "proxy",
            max_connections: config.limits.max_connections,
            header_read_timeout: config.limits.header_read_timeout,
            grace: None,
        };
        Ok(Some(Proxy { listener, forwarder, limits, stats }))
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<ProxyStats> {
        self.stats.clone()
    }

    /// Serves until `shutdown`, then stops accepting and lets exchanges in flight finish
    /// for up to `grace`; those still running then are cut (and recorded `cancelled`).
    /// The listener has the API's connection limit and header timeout
    /// (`audit.limits.max_connections`, `header_read_timeout`), its own count.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static, grace: Duration) {
        let Proxy { listener, forwarder, limits, stats: _ } = self;
        let limits = ServeLimits { grace: Some(grace), ..limits };
        let service_for = |peer| {
            let forwarder = forwarder.clone();
            hyper::service::service_fn(move |request| forwarder.clone().handle(request, peer))
        };
        server::serve(listener, service_for, limits, shutdown).await;
    }
}
