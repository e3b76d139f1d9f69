//! Capturing an audited exchange while it streams through, and recording it once it
//! ends.
//!
//! Bodies are never held back: [`Tee`] (the request) and [`Audited`] (the response)
//! pass each frame on as it comes and copy it into a capture buffer up to
//! `audit.limits.max_body_bytes`. The record is built when the response body ends, fails,
//! or is dropped unfinished (the client went away), by [`Pending`], which is also what
//! records an exchange that never got an answer: its `Drop` is the one place a forgotten
//! exchange would otherwise be lost.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;
use uuid::Uuid;

use super::identity::User;
use super::ProxyStats;
use crate::ingest::opsagent::{map_exchange, Captured, Ending, Exchange};
use crate::pipeline::AuditLogger;

/// The first bytes of a body, up to a limit.
#[derive(Debug, Default)]
pub struct Capture {
    bytes: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Capture {
    /// An empty capture keeping at most `limit` bytes.
    pub fn new(limit: usize) -> Capture {
        Capture { bytes: Vec::new(), limit, truncated: false }
    }

    /// A whole body, already read.
    pub fn whole(bytes: Vec<u8>) -> Capture {
        Capture { limit: bytes.len(), bytes, truncated: false }
    }

    /// Keeps what fits of `data`.
    pub fn push(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// What was kept.
    pub fn captured(&self) -> Captured<'_> {
        Captured { bytes: &self.bytes, truncated: self.truncated }
    }
}

/// What the proxy knows of an audited request besides its bodies.
#[derive(Debug)]
pub struct RequestInfo {
    /// The path.
    pub path: String,
    /// The query string as the client sent it.
    pub query: Option<String>,
    /// The request's session (cookie, or a new one).
    pub session_id: Uuid,
    /// Who asked.
    pub user: User,
    /// The client's address.
    pub client_ip: IpAddr,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// When the request arrived.
    pub created_at: DateTime<Utc>,
}

/// How an audited exchange ended, owning what was captured (see [`Ending`]).
#[derive(Debug)]
pub enum Outcome {
    /// The whole answer went through.
    Answered {
        /// HTTP status.
        status: u16,
        /// The answer's body.
        body: Capture,
    },
    /// The answer was cut: the client went away, or the agent's body failed.
    Interrupted {
        /// HTTP status.
        status: u16,
        /// What of the body went through.
        body: Capture,
        /// True when the client went away.
        client_gone: bool,
        /// What happened.
        reason: String,
    },
    /// The client went away before the answer began.
    ClientGone,
    /// The agent was not reached; answered with `status`.
    Unreachable {
        /// The status the client got.
        status: u16,
        /// Why.
        reason: String,
    },
    /// The agent did not answer in time; answered with `status`.
    TimedOut {
        /// The status the client got.
        status: u16,
        /// Why.
        reason: String,
    },
}

impl Outcome {
    fn ending(&self) -> Ending<'_> {
        match self {
            Outcome::Answered { status, body } => Ending::Answered { status: *status, body: body.captured() },
            Outcome::Interrupted { status, body, client_gone, reason } => {
                Ending::Interrupted { status: *status, body: body.captured(), client_gone: *client_gone, reason }
            }
            Outcome::ClientGone => Ending::ClientGone,
            Outcome::Unreachable { status, reason } => Ending::Unreachable { status: *status, reason },
            Outcome::TimedOut { status, reason } => Ending::TimedOut { status: *status, reason },
        }
    }
}

/// What a record is built from, besides its outcome.
struct Parts {
    logger: AuditLogger,
    stats: Arc<ProxyStats>,
    info: RequestInfo,
    request: Arc<Mutex<Capture>>,
    head_ms: Option<i64>,
}

/// An audited exchange not yet recorded.
pub struct Pending {
    parts: Option<Parts>,
    /// When the request was sent to the agent.
    sent: Instant,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("recorded", &self.parts.is_none()).finish()
    }
}

impl Pending {
    /// An exchange about to be sent upstream; its request body is captured into
    /// `request` (by a [`Tee`]).
    pub fn new(logger: AuditLogger, stats: Arc<ProxyStats>, info: RequestInfo, request: Arc<Mutex<Capture>>) -> Self {
        Pending { parts: Some(Parts { logger, stats, info, request, head_ms: None }), sent: Instant::now() }
    }

    /// Records the exchange under `session_id` (the one the agent set) instead.
    pub fn adopt_session(&mut self, session_id: uuid::Uuid) {
        if let Some(parts) = &mut self.parts {
            parts.info.session_id = session_id;
        }
    }

    /// The agent's response head arrived.
    pub fn answered(&mut self) {
        let elapsed = self.sent.elapsed().as_millis() as i64;
        if let Some(parts) = &mut self.parts {
            parts.head_ms = Some(elapsed);
        }
    }

    /// Records the exchange (once). The record is built and masked on a task of its own,
    /// so not even the last bytes of an answer wait for it.
    pub fn record(&mut self, outcome: Outcome) {
        let Some(parts) = self.parts.take() else { return };
        let total_ms = self.sent.elapsed().as_millis() as i64;
        let job = move || build_and_log(parts, &outcome, total_ms);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { job() });
            }
            // Outside a runtime (dropped at its end): here and now.
            Err(_) => job(),
        }
    }
}

fn build_and_log(parts: Parts, outcome: &Outcome, total_ms: i64) {
    let Parts { logger, stats, info, request, head_ms } = parts;
    let request = request.lock().unwrap_or_else(|p| p.into_inner());
    let mut record = map_exchange(&Exchange {
        path: &info.path,
        query: info.query.as_deref(),
        request: request.captured(),
        ending: outcome.ending(),
    });
    drop(request);
    record.session_id = info.session_id;
    record.user_id = info.user.user_id;
    record.client_ip = Some(info.client_ip.to_string());
    record.user_agent = info.user_agent;
    record.created_at = info.created_at;
    record.total_duration_ms = Some(total_ms);
    if let Some(head_ms) = head_ms {
        record.metrics.insert("upstream_headers_ms".into(), head_ms);
        stats.upstream_seconds.observe(total_ms as f64 / 1000.0);
    }
    record.attributes.insert("source".into(), Value::from("proxy"));
    if let Some(claimed) = info.user.unverified {
        record.attributes.insert("user_unverified".into(), Value::from(claimed));
    }
    stats.record(record.status);
    tracing::debug!(path = %info.path, status = %record.status, total_ms, "proxied exchange recorded");
    logger.log(record);
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Dropped before an outcome was recorded: hyper dropped the request's future,
        // which it does when the client goes away.
        self.record(Outcome::ClientGone);
    }
}

/// A request body on its way to the agent, copied into a shared capture. When the
/// agent is not reached, the client dropped nothing: what the agent never read is handed
/// back through `unread`, so the record still gets the question.
pub struct Tee<B> {
    inner: Option<B>,
    capture: Arc<Mutex<Capture>>,
    unread: Arc<Mutex<Option<B>>>,
}

impl<B> Tee<B> {
    /// Passes `inner` on, copying into `capture`; a rest not read goes to `unread` when
    /// the tee is dropped.
    pub fn new(inner: B, capture: Arc<Mutex<Capture>>, unread: Arc<Mutex<Option<B>>>) -> Self {
        Tee { inner: Some(inner), capture, unread }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.capture.lock().unwrap_or_else(|p| p.into_inner()).push(data);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            *self.unread.lock().unwrap_or_else(|p| p.into_inner()) = Some(inner);
        }
    }
}

/// Reads into `capture` what of a request body the agent did not (it was not reached),
/// for at most `within`: the client is waiting for its answer and sends it anyway.
pub async fn read_unread<B>(unread: &Mutex<Option<B>>, capture: &Mutex<Capture>, within: std::time::Duration)
where
    B: Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let Some(mut body) = unread.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
    let limit = capture.lock().unwrap_or_else(|p| p.into_inner()).limit;
    let read = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                let mut capture = capture.lock().unwrap_or_else(|p| p.into_inner());
                capture.push(data);
                if capture.bytes.len() >= limit {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
}

/// A response body on its way to the client, captured, its exchange recorded when it
/// ends: completely (`Answered`), with an error of the agent's side, or dropped early
/// (the client went away).
pub struct Audited<B: Body> {
    inner: B,
    status: u16,
    capture: Capture,
    pending: Option<Pending>,
}

impl<B: Body> Audited<B> {
    /// Passes `inner` (the body of an answer with `status`) on, recording `pending` when
    /// it ends. `capture` may already hold the body's first bytes.
    pub fn new(inner: B, status: u16, capture: Capture, pending: Pending) -> Self {
        Audited { inner, status, capture, pending: Some(pending) }
    }

    /// Records the exchange: complete (`interrupted` `None`), or cut for this reason
    /// (`true`: the client went away).
    fn end(&mut self, interrupted: Option<(bool, String)>) {
        let Some(mut pending) = self.pending.take() else { return };
        let (status, body) = (self.status, std::mem::take(&mut self.capture));
        pending.record(match interrupted {
            None => Outcome::Answered { status, body },
            Some((client_gone, reason)) => Outcome::Interrupted { status, body, client_gone, reason },
        });
    }
}

impl<B> Body for Audited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.capture.push(data);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let reason = format!("the agent's answer failed while streaming: {e}");
                self.end(Some((false, reason)));
            }
            Poll::Ready(None) => self.end(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> Drop for Audited<B> {
    fn drop(&mut self) {
        if self.pending.is_some() {
            // hyper stops polling once the body says it has ended and drops it: that is
            // a complete answer, not a client gone.
            if self.inner.is_end_stream() {
                self.end(None);
            } else {
                self.end(Some((true, "the client went away before the answer was complete".into())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_keeps_its_limit_and_says_it_was_cut() {
        let mut c = Capture::new(5);
        c.push(b"abc");
        assert!(!c.captured().truncated);
        c.push(b"defg");
        assert_eq!((c.captured().bytes, c.captured().truncated), (&b"abcde"[..], true));
        c.push(b"h");
        assert_eq!(c.captured().bytes, b"abcde");
    }
}
