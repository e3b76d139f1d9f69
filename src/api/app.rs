//! The application: configuration in, a listening server out. `serve` and the tests
//! start the service the same way, through [`Application::build`] and
//! [`Application::run_until`].
//!
//! Start-up never depends on the database (SPEC: operations). The listener is bound and
//! the pipeline started whether or not the database answers; a start-up task connects,
//! applies migrations (`audit.database.migrate_on_start`) or waits for someone to run
//! `migrate`, retrying with backoff, and only then lets the writers at the database.
//! Until then records are acknowledged into the spool and `/readyz` says `degraded`;
//! without a spool the service is not ready and ingest answers `503`.
//!
//! With `audit.retention.auto_cleanup`, a background task runs retention daily at
//! `cleanup_time` ([`crate::retention::spawn_scheduler`]); like the start-up task, it
//! stops at shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{router, serve, AppState, Authenticator};
use crate::config::{redact_url, Config, ConfigError};
use crate::distributed::{BrokerSink, DistributedError};
use crate::ingest::otlp::{OtlpReceiver, ReceiverError};
use crate::mask::{MaskError, Masker};
use crate::pipeline::{backoff, AuditLogger, ShutdownReport, Spool, SpoolError};
use crate::proxy::{Proxy, ProxyError, ProxyStats};
use crate::retention::{spawn_scheduler, Schedule};
use crate::risk::{alert, detect, RiskClassifier, RiskError};
use crate::store::{self, BatchSink, Store, StoreError};

/// How long start-up waits for the database before it starts without it (and keeps
/// trying in the background).
const FIRST_ATTEMPT: Duration = Duration::from_secs(1);
/// First wait between start-up attempts; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between start-up attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why the application could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Beyond loopback without API tokens and without `--insecure`.
    #[error(
        "refusing to listen on {0}: beyond loopback the API must be protected by tokens, which are not configured; \
         listen on 127.0.0.1 or pass --insecure"
    )]
    Unprotected(SocketAddr),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened (not: the database is down, which is waited out).
    #[error("opening the database")]
    Store(#[from] StoreError),
    /// A configured API token cannot be read.
    #[error(transparent)]
    Auth(#[from] super::AuthError),
    /// A masking rule is unusable.
    #[error(transparent)]
    Mask(#[from] MaskError),
    /// A risk rule or override is unusable.
    #[error(transparent)]
    Risk(#[from] RiskError),
    /// The spool directory could not be opened.
    #[error("opening the spool")]
    Spool(#[from] SpoolError),
    /// The auditing proxy could not start.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The OTLP receiver's journal could not be opened.
    #[error(transparent)]
    Otlp(#[from] ReceiverError),
    /// Distributed mode cannot start: the queue exists with other arguments, or the
    /// broker refuses access (an unreachable broker is waited out, spooling).
    #[error("distributed mode (RabbitMQ)")]
    Distributed(#[from] DistributedError),
    /// The listen address could not be bound.
    #[error("binding {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The service's machinery without its HTTP listener: the store, the masking stage and
/// the pipeline, with the start-up task that waits for the database. [`Application`]
/// runs on one; a Rust agent that logs through the library (the
/// [`AuditLayer`](crate::layer::AuditLayer), or [`AuditLogger::log`] directly) starts
/// one from the same configuration, so its records are masked, spooled and retried
/// exactly as the server's are.
pub struct Engine {
    logger: AuditLogger,
    store: Arc<dyn Store>,
    masker: Option<Arc<Masker>>,
    risk: Option<Arc<RiskClassifier>>,
    /// The background task waiting for the database, when start-up did not reach it.
    startup: Option<JoinHandle<()>>,
    /// Stops the start-up retries at shutdown.
    stop: CancellationToken,
    /// Distributed mode's sink, which the pipeline writes to instead of the store.
    broker: Option<Arc<BrokerSink>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("logger", &self.logger).finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens the store and the spool and starts the pipeline. Returns without waiting
    /// for the database when it does not answer at once: records are spooled (or held
    /// in memory) until it does.
    pub async fn start(config: &Config) -> Result<Engine, AppError> {
        let masker = Masker::from_config(&config.masking)?.map(Arc::new);
        let risk = RiskClassifier::from_config(&config.risk)?.map(Arc::new);
        let url = config.database.resolved_url()?;
        let store = store::connect(&url, &config.database).await?;
        // The first attempt runs in a task of its own: when it outlasts FIRST_ATTEMPT
        // (a database that does not answer, or a long migration) start-up goes on and
        // the background task waits for that same attempt rather than cancelling it.
        let migrate = config.database.migrate_on_start;
        let mut in_flight = tokio::spawn(prepare_database(store.clone(), migrate));
        let (in_flight, not_ready) = match tokio::time::timeout(FIRST_ATTEMPT, &mut in_flight).await {
            Ok(joined) => (None, attempt_result(joined).err()),
            Err(_) => {
                (Some(in_flight), Some(format!("the database did not answer within {FIRST_ATTEMPT:?}; still trying")))
            }
        };
        let broker = start_broker(config).await?;
        let logger = match &broker {
            // Distributed: the pipeline publishes; the database is only read here, so its
            // readiness does not hold the writers back.
            Some(broker) => {
                let sink: Arc<dyn BatchSink> = broker.clone();
                start_pipeline(config, sink, masker.clone(), risk.clone(), None).await?
            }
            None => start_pipeline(config, store.clone(), masker.clone(), risk.clone(), not_ready.as_ref()).await?,
        };
        let stop = CancellationToken::new();
        let startup = match not_ready {
            None => {
                tracing::info!(migrate, database = %redact_url(&url), "database ready");
                None
            }
            Some(reason) => {
                tracing::warn!(
                    reason = %reason,
                    database = %redact_url(&url),
                    spool = logger.has_spool(),
                    "database not ready at start-up; going on anyway, retrying in the background"
                );
                // In distributed mode the pipeline's health is the broker's, not the
                // database's: the retries must not mark it down.
                let gate = if broker.is_some() { AuditLogger::disabled() } else { logger.clone() };
                let task = wait_for_database(store.clone(), gate, migrate, in_flight, stop.clone());
                Some(tokio::spawn(task))
            }
        };
        Ok(Engine { logger, store, masker, risk, startup, stop, broker })
    }

    /// The pipeline to log through. Cheap to clone.
    pub fn logger(&self) -> AuditLogger {
        self.logger.clone()
    }

    /// The store records are written to and read from.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Stops the start-up retries, drains the pipeline (writing what it can within
    /// `deadline`, spooling the rest) and closes the store.
    pub async fn shutdown(self, deadline: Duration) -> ShutdownReport {
        self.stop.cancel();
        if let Some(startup) = self.startup {
            let _ = startup.await;
        }
        let report = self.logger.shutdown(deadline).await;
        if let Some(broker) = &self.broker {
            broker.close().await;
        }
        self.store.close().await;
        if report.abandoned > 0 {
            tracing::error!(
                abandoned = report.abandoned,
                "shutdown dropped records it could neither write nor spool before its deadline"
            );
        } else if !report.drained {
            tracing::warn!(
                spooled = report.stats.spool_records,
                "records left unwritten at shutdown (database unavailable, or the deadline passed) are in the spool; \
                 the next start writes them"
            );
        }
        report
    }
}

/// A built service: bound, pipeline running, not yet serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    engine: Engine,
    /// The daily retention run (`audit.retention.auto_cleanup`).
    retention: Option<JoinHandle<()>>,
    /// Stops the background tasks (retention, database size sampling) at shutdown.
    stop_tasks: CancellationToken,
    /// The auditing proxy, when `audit.proxy.upstream` is set.
    proxy: Option<Proxy>,
    /// The anomaly job and its webhook task (`audit.anomalies`, `audit.alerts`).
    anomalies: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application").field("address", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Application {
    /// Binds the listener and starts the [`Engine`]. Returns without waiting for the
    /// database when it does not answer at once.
    pub async fn build(config: Config, insecure: bool) -> Result<Application, AppError> {
        let listen = config.server.listen;
        let auth = Authenticator::new(&config.auth, &config.limits, |var| std::env::var(var).ok())?;
        if !listen.ip().is_loopback() && !insecure && !auth.is_enabled() {
            return Err(AppError::Unprotected(listen));
        }
        // Checked before anything starts, so a bad schedule does not leave a pipeline
        // running behind an error.
        let schedule = retention_schedule(&config)?;
        let listener = TcpListener::bind(listen).await.map_err(|source| AppError::Bind { addr: listen, source })?;
        let address = listener.local_addr().map_err(|source| AppError::Bind { addr: listen, source })?;
        let engine = Engine::start(&config).await?;
        let stop_tasks = CancellationToken::new();
        let retention =
            schedule.map(|s| spawn_scheduler(engine.store(), config.retention.clone(), s, stop_tasks.clone()));
        let proxy = Proxy::bind(&config, engine.logger(), |var| std::env::var(var).ok()).await?;
        tracing::info!(address = %address, "opsagent-audit listening");
        let otlp = start_otlp(&config, &engine.logger()).await?;
        let mut state = AppState::with_risk(
            engine.logger(),
            engine.store(),
            config,
            engine.masker.clone(),
            engine.risk.clone(),
            auth,
        );
        if let (Some(proxy), Some(metrics)) = (&proxy, Arc::get_mut(&mut state.metrics)) {
            metrics.register_proxy(proxy.stats());
        }
        if let Some(receiver) = otlp {
            state = state.with_otlp(receiver);
        }
        tokio::spawn(sample_database_size(state.clone(), stop_tasks.clone()));
        let anomalies = start_anomalies(&state, &stop_tasks);
        Ok(Application { listener, state, engine, retention, stop_tasks, proxy, anomalies })
    }

    /// The address the auditing proxy listens on, when it runs.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy.as_ref().map(Proxy::local_addr)
    }

    /// The auditing proxy's counters, when it runs.
    pub fn proxy_stats(&self) -> Option<Arc<ProxyStats>> {
        self.proxy.as_ref().map(Proxy::stats)
    }

    /// The address the server listens on (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.state.config.server.listen)
    }

    /// The pipeline records go through.
    pub fn logger(&self) -> AuditLogger {
        self.state.logger.clone()
    }

    /// The store reads come from.
    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    /// Serves (within the connection limits of `audit.limits`, see [`serve`]) until
    /// `shutdown` resolves, then stops accepting connections, lets in-flight requests
    /// finish (proxied ones for up to `audit.async.shutdown_timeout`, then they are cut
    /// and recorded `cancelled`), drains the pipeline (within
    /// `audit.async.shutdown_timeout`) and closes the store.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<ShutdownReport, AppError> {
        let Application { listener, state, engine, retention, stop_tasks, proxy, anomalies } = self;
        let otlp = state.otlp.clone();
        let shutdown_timeout = state.config.pipeline.shutdown_timeout;
        let limits = state.config.limits.clone();
        // One signal stops both listeners; the proxy's records reach the pipeline before
        // it drains.
        let stop = CancellationToken::new();
        let signal = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            signal.cancel();
        });
        let proxy = proxy.map(|p| tokio::spawn(p.run_until(stop.clone().cancelled_owned(), shutdown_timeout)));
        serve::serve(listener, router(state), &limits, stop.cancelled_owned()).await;
        if let Some(proxy) = proxy {
            if let Err(e) = proxy.await {
                tracing::error!(error = %e, "the auditing proxy's task failed");
            }
        }
        tracing::info!("stopped accepting requests; draining the audit pipeline");
        stop_tasks.cancel();
        if let Some(retention) = retention {
            let _ = retention.await;
        }
        for task in anomalies {
            let _ = task.await;
        }
        if let Some(otlp) = otlp {
            // Traces being finished go to the pipeline before it drains; what still waits
            // for its trace stays in the journal.
            otlp.shutdown(shutdown_timeout / 2).await;
        }
        Ok(engine.shutdown(shutdown_timeout).await)
    }
}

/// Distributed mode's sink (`audit.distributed.amqp_url` set, auditing on), connected
/// and with the topology declared if the broker answers now. A broker that does not
/// answer is not a start-up failure (records are spooled until it does); a queue
/// declared with other arguments, or a refusal, is.
async fn start_broker(config: &Config) -> Result<Option<Arc<BrokerSink>>, AppError> {
    if !config.distributed.is_enabled() || !config.enabled {
        return Ok(None);
    }
    let broker = Arc::new(BrokerSink::new(&config.distributed)?);
    match broker.check().await {
        Ok(()) => tracing::info!(queue = %config.distributed.queue, "distributed mode: publishing records to RabbitMQ"),
        Err(e) if e.is_transient() => tracing::warn!(
            error = %e,
            spool = config.spool.enabled,
            "distributed mode: RabbitMQ not reachable at start-up; going on, records wait in the spool"
        ),
        Err(e) => return Err(e.into()),
    }
    Ok(Some(broker))
}

/// Opens the spool (if configured) and starts the pipeline with masking (unless
/// `audit.masking.enabled` is off) and then risk classification (unless
/// `audit.risk.enabled` is off), waiting for the database when `not_ready` says why it
/// is not ready.
async fn start_pipeline(
    config: &Config,
    sink: Arc<dyn BatchSink>,
    masker: Option<Arc<Masker>>,
    risk: Option<Arc<RiskClassifier>>,
    not_ready: Option<&String>,
) -> Result<AuditLogger, AppError> {
    if !config.enabled {
        tracing::warn!("audit.enabled is false: the ingest API refuses records");
        return Ok(AuditLogger::disabled());
    }
    let spool = if config.spool.enabled {
        let (spool_config, pending) = (config.spool.clone(), config.pipeline.queue_size);
        // Opening checks every segment left by an earlier run: blocking work.
        let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_config, pending))
            .await
            .map_err(|e| SpoolError::io(&config.spool.dir, std::io::Error::other(e)))??;
        Some(spool)
    } else {
        tracing::warn!("audit.spool.enabled is false: records live only in memory until committed");
        None
    };
    let mut builder = AuditLogger::builder(sink, &config.pipeline, &config.limits)
        .spool(spool)
        .waiting_for(not_ready.map(|r| r.as_str()));
    match masker {
        Some(masker) => builder = builder.stage(masker),
        None => tracing::warn!("audit.masking.enabled is false: records are stored with any secrets they carry"),
    }
    // After masking: rules see (and custom patterns match) what is stored.
    match risk {
        Some(risk) => builder = builder.stage(risk),
        None => tracing::warn!("audit.risk.enabled is false: tool calls keep the risk levels their producers sent"),
    }
    Ok(builder.start())
}

/// Starts the OTLP receiver (unless `audit.otlp.enabled` or auditing is off), its
/// journal in `<spool dir>/otlp` when there is a spool.
async fn start_otlp(config: &Config, logger: &AuditLogger) -> Result<Option<OtlpReceiver>, AppError> {
    if !config.otlp.enabled || !logger.is_enabled() {
        return Ok(None);
    }
    let journal_dir = logger.has_spool().then(|| config.spool.dir.join(crate::pipeline::journal::OTLP_DIR));
    let receiver = OtlpReceiver::start(&config.otlp, journal_dir.as_deref(), logger.clone(), &config.limits).await?;
    Ok(Some(receiver))
}

/// The daily retention schedule, when `audit.retention.auto_cleanup` is on (and `days`
/// is not 0, which keeps everything).
fn retention_schedule(config: &Config) -> Result<Option<Schedule>, AppError> {
    let retention = &config.retention;
    if !retention.auto_cleanup {
        return Ok(None);
    }
    if retention.days == 0 {
        tracing::warn!("audit.retention.auto_cleanup is on but retention.days is 0 (keep forever): no clean-up runs");
        return Ok(None);
    }
    Ok(Some(Schedule::from_config(retention)?))
}

/// Starts the anomaly job (`audit.anomalies.enabled`) and, with
/// `audit.alerts.webhook_url`, the webhook task it hands new anomalies to. Both stop at
/// `stop`.
fn start_anomalies(state: &AppState, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
    let config = &state.config;
    if !config.anomalies.enabled {
        return Vec::new();
    }
    let mut tasks = Vec::new();
    let metrics = state.metrics.clone();
    let sender = alert::spawn(&config.alerts, Arc::new(move |outcome| metrics.alert_outcome(outcome)), stop.clone())
        .map(|(sender, task)| {
            tasks.push(task);
            sender
        });
    let metrics = state.metrics.clone();
    let found = move |anomalies: Vec<crate::store::NewAnomaly>| {
        for anomaly in anomalies {
            metrics.anomaly_found(anomaly.kind);
            if let Some(sender) = &sender {
                sender.send(anomaly);
            }
        }
    };
    tasks.push(detect::spawn(state.store.clone(), config.anomalies.clone(), found, stop.clone()));
    tasks
}

/// What a [`prepare_database`] task came to, a task that died counting as a failure.
fn attempt_result(joined: Result<Result<(), String>, tokio::task::JoinError>) -> Result<(), String> {
    joined.unwrap_or_else(|e| Err(format!("start-up task failed: {e}")))
}

/// Gets the database ready for writes (see [`store::prepare`]).
async fn prepare_database(store: Arc<dyn Store>, migrate: bool) -> Result<(), String> {
    store::prepare(store.as_ref(), migrate).await
}

/// Waits for the attempt still `in_flight` from start-up (if any), then retries
/// [`prepare_database`] with backoff and jitter until it succeeds, and lets the pipeline
/// write. Stops early at shutdown.
async fn wait_for_database(
    store: Arc<dyn Store>,
    logger: AuditLogger,
    migrate: bool,
    in_flight: Option<JoinHandle<Result<(), String>>>,
    stop: CancellationToken,
) {
    let mut attempts = 1u32;
    let mut wait = backoff(0, RETRY_FIRST, RETRY_MAX);
    let mut attempt = in_flight;
    loop {
        let result = match attempt.take() {
            Some(task) => tokio::select! {
                joined = task => attempt_result(joined),
                _ = stop.cancelled() => return,
            },
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
                attempts += 1;
                tokio::select! {
                    result = prepare_database(store.clone(), migrate) => result,
                    _ = stop.cancelled() => return,
                }
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(attempts, "database ready: migrations applied; writing what was spooled meanwhile");
                logger.set_store_ready();
                return;
            }
            Err(reason) => {
                // One line per attempt: the gaps grow to RETRY_MAX, so at most one a
                // RETRY_MAX once the outage lasts.
                wait = backoff(attempts - 1, RETRY_FIRST, RETRY_MAX);
                tracing::warn!(attempts, retry_in = ?wait, reason = %reason, "database still not ready");
                logger.store_not_ready(&reason);
            }
        }
    }
}

/// How often the database size gauge is refreshed.
const DATABASE_SIZE_EVERY: Duration = Duration::from_secs(60);

/// Samples the database's size for `/metrics` every [`DATABASE_SIZE_EVERY`] until `stop`.
/// A failure (the database down) leaves the last value and is not logged: the outage
/// is reported by the pipeline already.
async fn sample_database_size(state: AppState, stop: CancellationToken) {
    let mut every = tokio::time::interval(DATABASE_SIZE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Ok(bytes) = state.store.database_bytes().await {
            state.metrics.set_database_bytes(bytes);
        }
    }
}
