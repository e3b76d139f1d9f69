//! The OTLP receiver: export bodies in, answers out; spans buffered until their trace is
//! complete, each finished trace handed to the pipeline as one record.
//!
//! # Durability
//! The spans an export adds are appended to the [`Journal`] (in `<spool dir>/otlp/`,
//! fsync'd) before the export is answered `200`; at start-up the journal is read back
//! into the buffer. A finished trace's record goes through
//! [`AuditLogger::log_durable`]; only once that resolved (spooled or committed) does the
//! journal forget the trace. A crash in between replays the trace: same trace id, same
//! record id, stored once. Read-back spans start their trace's `trace_timeout` afresh
//! (arrival times are not journaled). A span that raced its trace's end (journaled, then
//! found late) stays in the journal until the next start, which re-audits that trace as
//! a duplicate: harmless, and rare. Without a spool (`audit.spool.enabled: false`) there is no
//! journal: spans waiting for their trace are in memory only (a warning says so at
//! start-up), and exports are refused (`503`) until the database has been reached.
//!
//! # Bounds
//! At most `audit.otlp.max_pending_spans` spans wait; an export that would pass it is
//! answered `503` with `Retry-After` and nothing of it is kept. A retried export's spans
//! are duplicates (accepted, nothing to do); spans with bad ids and spans arriving after
//! their trace was audited are refused in the answer's partial success, counted and
//! logged.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, TracesData};
use prost::Message;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::assemble::{Assembler, ReadyTrace};
use super::decode::{self, rpc_code, DecodeError, Encoding};
use super::{map, split, OtlpSpan, TraceId};
use crate::config::{LimitsConfig, OtlpConfig};
use crate::pipeline::{AuditLogger, Journal, JournalError};

/// Finished traces being made durable at once, at most.
const CONCURRENT_FINISHES: usize = 64;
/// `Retry-After` of a `503` (seconds).
const RETRY_AFTER_SECS: u64 = 5;

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// The journal could not be opened.
    #[error("opening the OTLP journal")]
    Journal(#[from] JournalError),
}

/// The answer to an export, for the HTTP layer to send as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOutcome {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type` of `body`.
    pub content_type: &'static str,
    /// An `Export…ServiceResponse` (success) or a `google.rpc.Status` (error).
    pub body: Vec<u8>,
    /// `Retry-After` seconds, for `503`.
    pub retry_after: Option<u64>,
}

impl ExportOutcome {
    fn error(status: u16, code: i32, message: &str, encoding: Encoding) -> ExportOutcome {
        ExportOutcome {
            status,
            content_type: encoding.content_type(),
            body: decode::encode_status(code, message, encoding),
            retry_after: (status == 503 || status == 429).then_some(RETRY_AFTER_SECS),
        }
    }

    fn decode_error(e: &DecodeError, encoding: Encoding) -> ExportOutcome {
        let status = match e {
            DecodeError::UnsupportedMediaType(_) | DecodeError::UnsupportedEncoding(_) => 415,
            DecodeError::TooLarge { .. } => 413,
            DecodeError::Undecodable { .. } => 400,
        };
        ExportOutcome::error(status, rpc_code::INVALID_ARGUMENT, &e.to_string(), encoding)
    }
}

/// What the receiver counted since start (exposed at `/metrics`).
#[derive(Debug, Default)]
pub struct OtlpStats {
    /// Spans taken into the buffer (journaled).
    pub accepted: AtomicU64,
    /// Spans received again (retried exports): nothing to do.
    pub duplicate: AtomicU64,
    /// Spans refused for bad trace or span ids.
    pub bad_id: AtomicU64,
    /// Spans refused because their trace was already audited.
    pub late: AtomicU64,
    /// Spans refused with `503` (buffer full, journal failed, database not reached).
    pub unavailable: AtomicU64,
    /// Traces audited (records handed to the pipeline and made durable).
    pub traces_audited: AtomicU64,
    /// Of those, audited without their root after `audit.otlp.trace_timeout`.
    pub traces_incomplete: AtomicU64,
    /// Log records refused by `/v1/logs`.
    pub log_records_refused: AtomicU64,
}

struct Inner {
    assembler: Mutex<Assembler>,
    journal: Option<Arc<Journal>>,
    logger: AuditLogger,
    limits: LimitsConfig,
    stats: Arc<OtlpStats>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The receiver; cheap to clone.
#[derive(Clone)]
pub struct OtlpReceiver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver").field("journal", &self.inner.journal).finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Assembler>) -> std::sync::MutexGuard<'_, Assembler> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OtlpReceiver {
    /// Opens the journal in `journal_dir` (none: memory only), reads back what an earlier
    /// run left there, and starts finishing traces into `logger`.
    pub async fn start(
        config: &OtlpConfig,
        journal_dir: Option<&Path>,
        logger: AuditLogger,
        limits: &LimitsConfig,
    ) -> Result<OtlpReceiver, ReceiverError> {
        let mut assembler = Assembler::new(config.quiet_period, config.trace_timeout, config.max_pending_spans);
        let journal = match journal_dir {
            Some(dir) => {
                let dir = dir.to_path_buf();
                let (journal, replayed) = tokio::task::spawn_blocking(move || Journal::open(&dir))
                    .await
                    .map_err(|e| JournalError { path: Default::default(), cause: std::io::Error::other(e) })??;
                let now = Instant::now();
                let (mut spans, mut undecodable) = (0usize, 0usize);
                for (_, bytes) in replayed.records {
                    let Ok(data) = TracesData::decode(bytes.as_slice()) else {
                        undecodable += 1;
                        continue;
                    };
                    let request = ExportTraceServiceRequest { resource_spans: data.resource_spans };
                    for (trace_id, group) in split(request).traces {
                        spans += group.len();
                        assembler.insert(trace_id, group, 0, now);
                    }
                }
                if spans > 0 || undecodable > 0 {
                    tracing::info!(
                        spans,
                        traces = assembler.pending_traces(),
                        undecodable,
                        "OTLP spans waiting for their traces read back from the journal"
                    );
                }
                Some(Arc::new(journal))
            }
            None => {
                tracing::warn!(
                    "audit.spool.enabled is false: OTLP spans waiting for the rest of their trace are kept in memory \
                     only and are lost if the process stops"
                );
                None
            }
        };
        let inner = Arc::new(Inner {
            assembler: Mutex::new(assembler),
            journal,
            logger,
            limits: limits.clone(),
            stats: Arc::new(OtlpStats::default()),
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        });
        let tick = (config.quiet_period / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let task = tokio::spawn(finish_loop(inner.clone(), tick));
        *inner.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(OtlpReceiver { inner })
    }

    /// The receiver's counters.
    pub fn stats(&self) -> Arc<OtlpStats> {
        self.inner.stats.clone()
    }

    /// Spans waiting for their traces.
    pub fn pending_spans(&self) -> usize {
        lock(&self.inner.assembler).pending_spans()
    }

    /// Stops finishing traces (what waits stays in the journal for the next start);
    /// waits up to `deadline` for records being handed to the pipeline.
    pub async fn shutdown(&self, deadline: Duration) {
        self.inner.stop.cancel();
        let task = self.inner.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut task) = task {
            if tokio::time::timeout(deadline, &mut task).await.is_err() {
                task.abort();
                tracing::warn!("OTLP traces still being written at the shutdown deadline; the journal keeps them");
            }
        }
        if let Some(journal) = self.inner.journal.clone() {
            let pending = self.pending_spans();
            match tokio::task::spawn_blocking(move || journal.compact()).await {
                Ok(Ok(())) => tracing::info!(pending_spans = pending, "OTLP journal kept for the next start"),
                // The old file stays whole: the next start replays more, stores nothing twice.
                Ok(Err(e)) => tracing::warn!(error = %e, "OTLP journal could not be compacted at shutdown"),
                Err(e) => tracing::warn!(error = %e, "OTLP journal compaction task failed"),
            }
        }
    }

    /// The body as a request of one signal, and its encoding (the answer's too); or the
    /// answer refusing it (`415`, `413`, `400`).
    fn decode<T>(
        &self,
        body: &[u8],
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        decode_request: fn(&[u8], Encoding) -> Result<T, decode::DecodeError>,
    ) -> Result<(T, Encoding), ExportOutcome> {
        let encoding =
            decode::encoding_of(content_type).map_err(|e| ExportOutcome::decode_error(&e, Encoding::Json))?;
        decode::decompress(body, content_encoding, self.inner.limits.max_body_bytes)
            .and_then(|bytes| decode_request(&bytes, encoding))
            .map(|request| (request, encoding))
            .map_err(|e| ExportOutcome::decode_error(&e, encoding))
    }

    /// Answers `POST /v1/traces`.
    pub async fn export_traces(
        &self,
        body: &[u8],
        content_type: Option<&str>,
        content_encoding: Option<&str>,
    ) -> ExportOutcome {
        let (request, encoding) = match self.decode(body, content_type, content_encoding, decode::decode_traces) {
            Ok(decoded) => decoded,
            Err(refused) => return refused,
        };
        let logger = &self.inner.logger;
        if !logger.has_spool() && !logger.is_store_ready() {
            return ExportOutcome::error(
                503,
                rpc_code::UNAVAILABLE,
                "the database has not been reached yet and there is no spool (audit.spool.enabled); retry later",
                encoding,
            );
        }
        let split = split(request);
        let stats = &self.inner.stats;
        if split.rejected > 0 {
            stats.bad_id.fetch_add(split.rejected as u64, Ordering::Relaxed);
            tracing::warn!(
                rejected = split.rejected,
                first = split.first_error.as_deref().unwrap_or_default(),
                "OTLP spans refused for their ids"
            );
        }
        let (mut duplicates, mut late) = (0usize, 0usize);
        let mut groups: Vec<(TraceId, Vec<OtlpSpan>)> = Vec::with_capacity(split.traces.len());
        let reserved = {
            let mut assembler = lock(&self.inner.assembler);
            for (trace_id, mut spans) in split.traces {
                let sorted = assembler.sort(&trace_id, &mut spans);
                duplicates += sorted.duplicates;
                late += sorted.late;
                if !spans.is_empty() {
                    groups.push((trace_id, spans));
                }
            }
            let n: usize = groups.iter().map(|(_, s)| s.len()).sum();
            if let Err(full) = assembler.reserve(n) {
                drop(assembler);
                stats.unavailable.fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(spans = n, pending = full.pending, "OTLP export refused: the trace buffer is full");
                return ExportOutcome::error(503, rpc_code::UNAVAILABLE, &full.to_string(), encoding);
            }
            n
        };
        if let Some(journal) = &self.inner.journal {
            let records: Vec<(u128, Vec<u8>)> =
                groups.iter().map(|(id, spans)| (u128::from_be_bytes(*id), encode_spans(spans))).collect();
            let journal = journal.clone();
            let appended = tokio::task::spawn_blocking(move || {
                let refs: Vec<(u128, &[u8])> = records.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                journal.append(&refs)
            })
            .await
            .unwrap_or_else(|e| Err(JournalError { path: Default::default(), cause: std::io::Error::other(e) }));
            if let Err(e) = appended {
                lock(&self.inner.assembler).unreserve(reserved);
                stats.unavailable.fetch_add(reserved as u64, Ordering::Relaxed);
                tracing::error!(error = %e, spans = reserved, "OTLP export refused: the journal could not be written");
                return ExportOutcome::error(
                    503,
                    rpc_code::UNAVAILABLE,
                    &format!("spans could not be stored durably ({e}); retry later"),
                    encoding,
                );
            }
        }
        let mut accepted = 0usize;
        {
            let now = Instant::now();
            let mut assembler = lock(&self.inner.assembler);
            let mut left = reserved;
            for (trace_id, spans) in groups {
                let n = spans.len();
                left -= n;
                let sorted = assembler.insert(trace_id, spans, n, now);
                // Racing a concurrent export or the trace's end: sorted again.
                duplicates += sorted.duplicates;
                late += sorted.late;
                accepted += n - sorted.duplicates - sorted.late;
            }
            assembler.unreserve(left);
        }
        stats.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
        stats.duplicate.fetch_add(duplicates as u64, Ordering::Relaxed);
        if late > 0 {
            stats.late.fetch_add(late as u64, Ordering::Relaxed);
            tracing::warn!(late_spans = late, "OTLP spans arrived after their trace was audited; refused");
        }
        let rejected = split.rejected + late;
        let mut message = Vec::new();
        if let Some(first) = &split.first_error {
            message.push(format!("{} span(s) with invalid ids refused (first: {first})", split.rejected));
        }
        if late > 0 {
            message.push(format!(
                "{late} span(s) arrived after their trace was audited (late_span; raise audit.otlp.quiet_period)"
            ));
        }
        ExportOutcome {
            status: 200,
            content_type: encoding.content_type(),
            body: decode::encode_export_response(rejected as i64, &message.join("; "), false, encoding),
            retry_after: None,
        }
    }

    /// Answers `POST /v1/logs`: the body is checked like a trace export, and every log
    /// record is refused in the partial success with the reason: interactions are built
    /// from traces; GenAI message content is read from span attributes and span events.
    pub async fn export_logs(
        &self,
        body: &[u8],
        content_type: Option<&str>,
        content_encoding: Option<&str>,
    ) -> ExportOutcome {
        let (request, encoding) = match self.decode(body, content_type, content_encoding, decode::decode_logs) {
            Ok(decoded) => decoded,
            Err(refused) => return refused,
        };
        let records: usize =
            request.resource_logs.iter().flat_map(|r| &r.scope_logs).map(|s| s.log_records.len()).sum();
        if records > 0 {
            self.inner.stats.log_records_refused.fetch_add(records as u64, Ordering::Relaxed);
            tracing::debug!(records, "OTLP log records refused: only traces are audited");
        }
        let message = if records > 0 {
            "opsagent-audit audits traces only: log records (GenAI events included) are not stored. Export traces to \
             /v1/traces and record message content on spans (gen_ai.input.messages / gen_ai.output.messages \
             attributes or span events)"
        } else {
            ""
        };
        ExportOutcome {
            status: 200,
            content_type: encoding.content_type(),
            body: decode::encode_export_response(records as i64, message, true, encoding),
            retry_after: None,
        }
    }
}

/// A trace's spans as one journal record: a `TracesData`, spans of one resource together.
fn encode_spans(spans: &[OtlpSpan]) -> Vec<u8> {
    let mut resource_spans: Vec<ResourceSpans> = Vec::new();
    let mut last: Option<&Arc<Vec<opentelemetry_proto::tonic::common::v1::KeyValue>>> = None;
    for s in spans {
        if !last.is_some_and(|r| Arc::ptr_eq(r, &s.resource)) {
            resource_spans.push(ResourceSpans {
                resource: Some(Resource { attributes: (*s.resource).clone(), ..Default::default() }),
                scope_spans: vec![ScopeSpans::default()],
                ..Default::default()
            });
            last = Some(&s.resource);
        }
        if let Some(scope) = resource_spans.last_mut().and_then(|r| r.scope_spans.last_mut()) {
            scope.spans.push(s.span.clone());
        }
    }
    TracesData { resource_spans }.encode_to_vec()
}

/// Holds a record built from a trace to the per-record limits the JSON ingest enforces
/// (`limits.max_tool_calls_per_record`, `max_thoughts_per_record`): a trace is evidence
/// and is kept, cut to the limits, the cut said in `attributes`.
fn bound(record: &mut crate::model::Interaction, limits: &LimitsConfig) {
    let tools = record.tool_calls.len().saturating_sub(limits.max_tool_calls_per_record);
    if tools > 0 {
        record.tool_calls.truncate(limits.max_tool_calls_per_record);
        record.attributes.insert("otlp.tool_calls_omitted".into(), tools.into());
    }
    let thoughts = record.thoughts.len().saturating_sub(limits.max_thoughts_per_record);
    if thoughts > 0 {
        record.thoughts.truncate(limits.max_thoughts_per_record);
        record.attributes.insert("otlp.thoughts_omitted".into(), thoughts.into());
    }
    if tools > 0 || thoughts > 0 {
        tracing::warn!(
            interaction_id = %record.interaction_id,
            tools_omitted = tools,
            thoughts_omitted = thoughts,
            "OTLP trace has more tool calls or thoughts than audit.limits allow; the rest are left out"
        );
    }
}

/// Every `tick`, takes the ready traces and finishes each in a task of its own (bounded),
/// until stopped; then waits for those in flight.
async fn finish_loop(inner: Arc<Inner>, tick: Duration) {
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = inner.stop.cancelled() => break,
        }
        while running.try_join_next().is_some() {}
        if running.len() >= CONCURRENT_FINISHES {
            continue;
        }
        let ready = lock(&inner.assembler).take_ready(Instant::now());
        for trace in ready {
            running.spawn(finish(inner.clone(), trace));
        }
    }
    while running.join_next().await.is_some() {}
}

/// Makes one trace's record durable, then lets the journal forget the trace; puts it
/// back to wait if the pipeline could not take it.
async fn finish(inner: Arc<Inner>, trace: ReadyTrace) {
    let mut record = map::to_interaction(trace.trace_id, &trace.spans, trace.complete);
    bound(&mut record, &inner.limits);
    let interaction_id = record.interaction_id;
    match inner.logger.log_durable(record).await {
        Ok(_) => {
            lock(&inner.assembler).finished(trace.trace_id, Instant::now());
            inner.stats.traces_audited.fetch_add(1, Ordering::Relaxed);
            if !trace.complete {
                inner.stats.traces_incomplete.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%interaction_id, spans = trace.spans.len(), "OTLP trace audited without its root (timed out)");
            }
            if let Some(journal) = inner.journal.clone() {
                let key = u128::from_be_bytes(trace.trace_id);
                let forgotten = tokio::task::spawn_blocking(move || journal.forget(key)).await;
                if let Ok(Err(e)) = forgotten {
                    // The trace stays in the journal: replayed at the next start, stored once.
                    tracing::warn!(error = %e, "OTLP journal could not be compacted");
                }
            }
        }
        Err(e) => {
            tracing::warn!(
                %interaction_id,
                reason = e.reason.as_str(),
                detail = %e.detail,
                "OTLP trace could not be handed to the pipeline durably; it waits and is tried again"
            );
            lock(&inner.assembler).restore(trace, Instant::now());
        }
    }
}
