//! `GET /metrics`: Prometheus text exposition, through `prometheus-client`.
//!
//! Counters the HTTP layer owns (auth failures, rate-limited requests) are registered
//! families; the pipeline's counters and the masking counts already live in atomics of
//! their own, so a [`Collector`] reads them at scrape time rather than keeping a second
//! copy in step.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::auth::Refusal;
use super::AppState;
use crate::distributed::WorkerStats;
use crate::ingest::otlp::receiver::OtlpStats;
use crate::mask::Masker;
use crate::pipeline::{AuditLogger, StatsSnapshot};
use crate::proxy::ProxyStats;
use crate::risk::RiskClassifier;

/// Label of the auth failure counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Labels of an HTTP request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route pattern (`/api/v1/interactions/{interaction_id}`), `unmatched` for 404s,
    /// so ids never become label values.
    route: String,
    method: String,
    status: u16,
}

/// Labels of a request's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
}

/// Label of the anomaly counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Label of the webhook counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Label naming an API token.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabel {
    token: String,
}

/// The service's metrics registry.
pub struct Metrics {
    registry: Registry,
    auth_failures: Family<ReasonLabel, Counter>,
    rate_limited: Family<TokenLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RouteLabels, Histogram>,
    database_bytes: Gauge,
    anomalies: Family<KindLabel, Counter>,
    alerts: Family<OutcomeLabel, Counter>,
    /// The OTLP receiver's counters, once it is started.
    otlp: Arc<std::sync::OnceLock<Arc<OtlpStats>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry reporting the pipeline of `logger` and the counts of `masker`.
    pub fn new(logger: AuditLogger, masker: Option<Arc<Masker>>) -> Metrics {
        Metrics::with_risk(logger, masker, None)
    }

    /// [`Metrics::new`] also reporting the tool calls `risk` flagged.
    pub fn with_risk(logger: AuditLogger, masker: Option<Arc<Masker>>, risk: Option<Arc<RiskClassifier>>) -> Metrics {
        let mut registry = Registry::with_prefix("opsagent_audit");
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "auth_failures",
            "API requests refused: no token (missing), an unknown token (invalid), the wrong role (forbidden)",
            auth_failures.clone(),
        );
        let rate_limited = Family::<TokenLabel, Counter>::default();
        registry.register(
            "rate_limited_requests",
            "API requests refused with 429 because a token exceeded audit.limits.requests_per_second",
            rate_limited.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests answered, by route, method and status", requests.clone());
        let request_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's arrival to its response head, by route and method",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let database_bytes = Gauge::default();
        registry.register_with_unit(
            "database_size",
            "Size of the database (PostgreSQL: pg_database_size; SQLite: pages), sampled every minute",
            Unit::Bytes,
            database_bytes.clone(),
        );
        let anomalies = Family::<KindLabel, Counter>::default();
        registry.register(
            "anomalies",
            "Anomalies found by the detection job (new ones only), by kind",
            anomalies.clone(),
        );
        let alerts = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "anomaly_webhook_posts",
            "Anomalies sent to audit.alerts.webhook_url: delivered, failed (every attempt) or dropped (queue full)",
            alerts.clone(),
        );
        let stats = logger.stats();
        registry.register_with_unit(
            "commit_latency",
            "Time from a record's enqueue to its commit",
            Unit::Seconds,
            stats.commit_latency.clone(),
        );
        registry.register("batch_records", "Records per committed batch", stats.batch_records.clone());
        registry.register_collector(Box::new(PipelineCollector { logger, masker, risk }));
        let otlp = Arc::new(std::sync::OnceLock::new());
        registry.register_collector(Box::new(OtlpCollector { stats: otlp.clone() }));
        Metrics {
            registry,
            auth_failures,
            rate_limited,
            requests,
            request_seconds,
            database_bytes,
            anomalies,
            alerts,
            otlp,
        }
    }

    /// Reports the auditing proxy's counters and upstream durations too.
    pub fn register_proxy(&mut self, stats: Arc<ProxyStats>) {
        self.registry.register_with_unit(
            "proxy_upstream_duration",
            "Time from sending an audited request to the agent to the end of its answer",
            Unit::Seconds,
            stats.upstream_seconds.clone(),
        );
        self.registry.register_collector(Box::new(ProxyCollector { stats }));
    }

    /// Reports a distributed-mode worker's counters too (`opsagent-audit worker`).
    pub fn register_worker(&mut self, stats: Arc<WorkerStats>) {
        self.registry.register_collector(Box::new(WorkerCollector { stats }));
    }

    /// Counts a refused request.
    pub(crate) fn auth_failure(&self, refusal: Refusal) {
        self.auth_failures.get_or_create(&ReasonLabel { reason: refusal.as_str() }).inc();
    }

    /// Counts a request refused for its token's rate.
    pub(crate) fn rate_limited(&self, token: &str) {
        self.rate_limited.get_or_create(&TokenLabel { token: token.to_owned() }).inc();
    }

    /// Counts an anomaly the detection job stored.
    pub fn anomaly_found(&self, kind: crate::store::AnomalyKind) {
        self.anomalies.get_or_create(&KindLabel { kind: kind.as_str() }).inc();
    }

    /// Counts how an anomaly's webhook delivery ended.
    pub fn alert_outcome(&self, outcome: crate::risk::alert::Outcome) {
        self.alerts.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
    }

    /// Reports the OTLP receiver's counters from now on.
    pub fn set_otlp(&self, stats: Arc<OtlpStats>) {
        let _ = self.otlp.set(stats);
    }

    /// Sets the sampled database size.
    pub fn set_database_bytes(&self, bytes: u64) {
        self.database_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The exposition text, in the Prometheus text format (0.0.4) every scraper reads.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Reads the pipeline's and the masker's own counters at each scrape.
#[derive(Debug)]
struct PipelineCollector {
    logger: AuditLogger,
    masker: Option<Arc<Masker>>,
    risk: Option<Arc<RiskClassifier>>,
}

impl Collector for PipelineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s: StatsSnapshot = self.logger.snapshot();
        let counters: [(&str, &str, u64); 10] = [
            ("records_accepted", "Records taken in by the pipeline", s.accepted),
            ("records_committed", "Records committed to the database", s.committed),
            ("records_duplicate", "Records found already stored (re-deliveries)", s.duplicates),
            ("records_spooled", "Records written to the disk spool", s.spooled),
            ("records_replayed", "Records read back from the spool", s.replayed),
            ("records_dead_lettered", "Records the database refused, kept in dead_letters", s.dead_lettered),
            ("batches", "Batches committed", s.batches),
            ("database_write_errors", "Batch writes that failed", s.write_errors),
            ("database_write_retries", "Batch writes retried", s.retries),
            ("fields_sanitized", "Text fields truncated or cleaned of NUL bytes", s.sanitized_fields),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }

        let dropped = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "records_dropped",
            "Records that will never be stored, by reason",
            None,
            dropped.metric_type(),
        )?;
        for (reason, value) in [
            ("queue_full", s.dropped_queue_full),
            ("shutdown", s.dropped_shutdown),
            ("closed", s.dropped_closed),
            ("database_down", s.dropped_database_down),
            ("spool_full", s.dropped_spool_full),
            ("spool_error", s.dropped_spool_error),
            ("rejected", s.rejected),
        ] {
            ConstCounter::new(value).encode(family.encode_family(&[("reason", reason)])?)?;
        }

        for (name, help, unit, value) in [
            ("queue_records", "Records waiting in the memory queue", None, s.queue_len),
            ("intake_records", "Records accepted and being masked and placed in the queue or spool", None, s.intake),
            ("in_flight_records", "Memory records a writer holds now", None, s.in_flight),
            ("spool_records", "Records in the disk spool not yet committed", None, s.spool_records),
            (
                "spool_appending_records",
                "Records handed to the spool, not yet written and fsync'd",
                None,
                s.spool_appending,
            ),
            ("spool", "Size of the disk spool's segment files", Some(&Unit::Bytes), s.spool_bytes),
        ] {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, unit, gauge.metric_type())?)?;
        }
        let oldest = ConstGauge::new(s.oldest_uncommitted_ms.map_or(0.0, |ms| ms as f64 / 1000.0));
        oldest.encode(encoder.encode_descriptor(
            "oldest_uncommitted_record_age",
            "Age of the oldest record not yet committed (0 when none waits)",
            Some(&Unit::Seconds),
            oldest.metric_type(),
        )?)?;

        if let Some(masker) = &self.masker {
            let masked = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "masked",
                "Secrets (and personal data) replaced before storing, by masking rule",
                None,
                masked.metric_type(),
            )?;
            for (rule, value) in masker.counts() {
                ConstCounter::new(value).encode(family.encode_family(&[("rule", rule.as_str())])?)?;
            }
        }
        if let Some(risk) = &self.risk {
            let flagged = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "risk_flagged_tool_calls",
                "Tool calls classified above `none` at ingest, by risk level",
                None,
                flagged.metric_type(),
            )?;
            for (level, value) in risk.counts() {
                ConstCounter::new(value).encode(family.encode_family(&[("level", level.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// Reads the auditing proxy's counters at each scrape.
#[derive(Debug)]
struct ProxyCollector {
    stats: Arc<ProxyStats>,
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        let requests = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "proxy_requests",
            "Requests through the auditing proxy: audited ones by how they ended, the others forwarded",
            None,
            requests.metric_type(),
        )?;
        for (audited, outcome, counter) in [
            ("true", "success", &s.audited_success),
            ("true", "error", &s.audited_error),
            ("true", "timeout", &s.audited_timeout),
            ("true", "cancelled", &s.audited_cancelled),
            ("false", "forwarded", &s.forwarded),
        ] {
            ConstCounter::new(counter.load(Relaxed))
                .encode(family.encode_family(&[("audited", audited), ("outcome", outcome)])?)?;
        }
        let failures = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "proxy_upstream_failures",
            "Requests the agent was not reached for (502) or did not answer in time (504)",
            None,
            failures.metric_type(),
        )?;
        for (kind, counter) in [("unreachable", &s.upstream_errors), ("timeout", &s.upstream_timeouts)] {
            ConstCounter::new(counter.load(Relaxed)).encode(family.encode_family(&[("kind", kind)])?)?;
        }
        let kept = ConstCounter::new(s.trace_kept.load(Relaxed));
        kept.encode(encoder.encode_descriptor(
            "proxy_trace_kept",
            "Answers forwarded with a trace the client did not ask for (over audit.limits.max_body_bytes, or not JSON)",
            None,
            kept.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Reads the OTLP receiver's counters at each scrape (nothing before it is started).
#[derive(Debug)]
struct OtlpCollector {
    stats: Arc<std::sync::OnceLock<Arc<OtlpStats>>>,
}

impl Collector for OtlpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = self.stats.get() else { return Ok(()) };
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        {
            let spans = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "otlp_spans",
                "OTLP spans received, by outcome: accepted (buffered until their trace is complete), duplicate (seen \
                 before), bad_id, late (after their trace was audited) and unavailable (503) are refused",
                None,
                spans.metric_type(),
            )?;
            for (outcome, value) in [
                ("accepted", get(&s.accepted)),
                ("duplicate", get(&s.duplicate)),
                ("bad_id", get(&s.bad_id)),
                ("late", get(&s.late)),
                ("unavailable", get(&s.unavailable)),
            ] {
                ConstCounter::new(value).encode(family.encode_family(&[("outcome", outcome)])?)?;
            }
        }
        for (name, help, value) in [
            ("otlp_traces_audited", "OTLP traces turned into interactions", get(&s.traces_audited)),
            (
                "otlp_traces_incomplete",
                "Of those, audited without their root after trace_timeout",
                get(&s.traces_incomplete),
            ),
            (
                "otlp_log_records_refused",
                "OTLP log records refused by /v1/logs (only traces are audited)",
                get(&s.log_records_refused),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

/// Reads a worker's counters at scrape time.
#[derive(Debug)]
struct WorkerCollector {
    stats: Arc<WorkerStats>,
}

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        for (name, help, counter) in [
            ("worker_deliveries", "Messages received from RabbitMQ", &s.deliveries),
            ("worker_redelivered", "Messages the broker had given to a consumer before", &s.redelivered),
            (
                "worker_acknowledged",
                "Messages acknowledged after their record was committed, found stored or dead-lettered",
                &s.acknowledged,
            ),
            ("worker_requeued", "Messages handed back to the queue because their record was not written", &s.requeued),
            ("worker_undecodable", "Messages rejected to the dead-letter exchange: not audit records", &s.undecodable),
            ("worker_batches", "Batches written and acknowledged", &s.batches),
            ("worker_broker_errors", "Connections to RabbitMQ lost or refused", &s.broker_errors),
        ] {
            let counter = ConstCounter::new(counter.load(Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let consuming = ConstGauge::new(i64::from(s.consuming.load(Relaxed)));
        consuming.encode(encoder.encode_descriptor(
            "worker_consuming",
            "1 while connected to RabbitMQ and consuming",
            None,
            consuming.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Middleware: counts every request by route, method and status, and times it.
pub async fn track(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let metrics = &app.metrics;
    metrics
        .request_seconds
        .get_or_create(&RouteLabels { route: route.clone(), method: method.clone() })
        .observe(started.elapsed().as_secs_f64());
    metrics.requests.get_or_create(&RequestLabels { route, method, status: response.status().as_u16() }).inc();
    response
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<AppState>) -> Response {
    match app.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
