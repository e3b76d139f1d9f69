//! Forwarding one request to the agent and its answer back.
//!
//! Headers pass untouched but for the hop-by-hop ones (RFC 9110 §7.6.1: `Connection`
//! and the headers it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade`), which belong to each connection, and `Host`, which
//! is the agent's (the upstream's authority, as nginx's `proxy_pass` does by default).
//! No `X-Forwarded-*` header is added: the agent sees what it would without the proxy.
//! An upgrade (websocket, `101 Switching Protocols`) keeps `Connection`/`Upgrade` and,
//! once both sides switched, the two connections are joined byte for byte, unaudited.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;

use super::audit::{read_unread, Audited, Capture, Outcome, Pending, RequestInfo, Tee};
use super::identity::{session, session_cookie, upstream_session, Identity};
use super::strip::without_trace;
use super::{BoxError, ProxyBody, ProxyStats};
use crate::pipeline::AuditLogger;

/// The query parameter asking the agent for its trace.
const SHOW_THOUGHT: &str = "show-thought";
/// Longest wait for a TCP connection to the agent (within the upstream timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the rest of a request body the agent did not read (it was down),
/// so the record has the question.
const UNREAD_BODY_WAIT: Duration = Duration::from_secs(5);

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1; plus the
/// old `Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Everything a request needs: the client, where to, what to audit.
pub struct Forwarder {
    /// The pooled HTTP/1 client to the agent.
    client: Client<HttpConnector, ProxyBody>,
    /// `http://host:port` of the agent.
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Exact paths audited (`POST`).
    paths: Vec<String>,
    capture_thoughts: bool,
    upstream_timeout: Duration,
    max_body_bytes: usize,
    identity: Identity,
    logger: AuditLogger,
    stats: Arc<ProxyStats>,
}

/// What [`Forwarder::new`] needs.
pub struct Settings {
    /// The agent.
    pub upstream: Uri,
    /// Audited paths.
    pub paths: Vec<String>,
    /// `audit.proxy.capture_thoughts`.
    pub capture_thoughts: bool,
    /// `audit.proxy.upstream_timeout`.
    pub upstream_timeout: Duration,
    /// `audit.limits.max_body_bytes`: most of a body kept for the record.
    pub max_body_bytes: usize,
}

impl Forwarder {
    /// A forwarder to `settings.upstream`, recording through `logger`.
    pub fn new(settings: Settings, identity: Identity, logger: AuditLogger, stats: Arc<ProxyStats>) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT.min(settings.upstream_timeout)));
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        let parts = settings.upstream.into_parts();
        Forwarder {
            client,
            scheme: parts.scheme.unwrap_or(http::uri::Scheme::HTTP),
            authority: parts.authority.unwrap_or_else(|| http::uri::Authority::from_static("127.0.0.1")),
            paths: settings.paths,
            capture_thoughts: settings.capture_thoughts,
            upstream_timeout: settings.upstream_timeout,
            max_body_bytes: settings.max_body_bytes,
            identity,
            logger,
            stats,
        }
    }

    /// Forwards `request` from `peer`; every failure is an answer (`502`, `504`).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if is_upgrade(request.headers()) {
            self.stats.forwarded();
            return Ok(self.upgrade(request).await);
        }
        let audited = request.method() == Method::POST && self.paths.iter().any(|p| p == request.uri().path());
        if !audited {
            self.stats.forwarded();
            return Ok(self.pass(request).await);
        }
        Ok(self.audit(request, peer).await)
    }

    /// The agent's URI for `uri`'s path and `query`.
    fn upstream_uri(&self, path: &str, query: Option<&str>) -> Uri {
        let path_and_query = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            // Built from an already valid URI's parts.
            .unwrap_or_else(|_| Uri::from_static("/"))
    }

    /// An unaudited request: forwarded, its answer streamed back.
    async fn pass(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = request.into_parts();
        parts.uri = self.upstream_uri(parts.uri.path(), parts.uri.query());
        strip_hop_by_hop(&mut parts.headers, false);
        parts.headers.remove(header::HOST);
        let upstream = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
        match tokio::time::timeout(self.upstream_timeout, self.client.request(upstream)).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers, false);
                Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
            }
            Ok(Err(e)) => {
                self.stats.upstream_error();
                tracing::debug!(error = %chain(&e), "the agent could not be reached");
                error_response(StatusCode::BAD_GATEWAY, &unreachable_reason(&e))
            }
            Err(_) => {
                self.stats.upstream_timeout();
                error_response(StatusCode::GATEWAY_TIMEOUT, &self.timeout_reason())
            }
        }
    }

    /// An audited request: forwarded with its bodies captured, recorded when it ends.
    async fn audit(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let created_at = Utc::now();
        let (mut parts, body) = request.into_parts();
        let (session_id, mut new_session) = session(&parts.headers);
        let info = RequestInfo {
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            session_id,
            user: self.identity.user(&parts.headers),
            client_ip: peer.ip(),
            user_agent: parts.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_string),
            created_at,
        };
        // The trace is asked for only where the client did not ask itself; then the
        // answer has to be rewritten without it.
        let add_trace = self.capture_thoughts && !asks_for_trace(parts.uri.query());
        let query = match (add_trace, parts.uri.query()) {
            (false, q) => q.map(str::to_string),
            (true, None) => Some(format!("{SHOW_THOUGHT}=true")),
            (true, Some(q)) => Some(format!("{q}&{SHOW_THOUGHT}=true")),
        };
        parts.uri = self.upstream_uri(parts.uri.path(), query.as_deref());
        strip_hop_by_hop(&mut parts.headers, false);
        parts.headers.remove(header::HOST);
        let request_capture = Arc::new(Mutex::new(Capture::new(self.max_body_bytes)));
        let unread = Arc::new(Mutex::new(None));
        let body = Tee::new(body, request_capture.clone(), unread.clone()).map_err(Into::into).boxed_unsync();
        let mut pending = Pending::new(self.logger.clone(), self.stats.clone(), info, request_capture.clone());
        let upstream = Request::from_parts(parts, body);
        let mut response = match tokio::time::timeout(self.upstream_timeout, self.client.request(upstream)).await {
            Ok(Ok(response)) => {
                pending.answered();
                // An agent that keeps the session itself (the seed's middleware does) has
                // set one already: the record follows it and the client gets one cookie.
                if let Some(id) = upstream_session(response.headers()).filter(|_| new_session) {
                    pending.adopt_session(id);
                    new_session = false;
                }
                self.answer(response, add_trace, pending).await
            }
            Ok(Err(e)) => {
                self.stats.upstream_error();
                tracing::debug!(error = %chain(&e), "the agent could not be reached");
                let reason = unreachable_reason(&e);
                read_unread(&unread, &request_capture, UNREAD_BODY_WAIT).await;
                let response = error_response(StatusCode::BAD_GATEWAY, &reason);
                pending.record(Outcome::Unreachable { status: StatusCode::BAD_GATEWAY.as_u16(), reason });
                response
            }
            Err(_) => {
                self.stats.upstream_timeout();
                let reason = self.timeout_reason();
                read_unread(&unread, &request_capture, UNREAD_BODY_WAIT).await;
                let response = error_response(StatusCode::GATEWAY_TIMEOUT, &reason);
                pending.record(Outcome::TimedOut { status: StatusCode::GATEWAY_TIMEOUT.as_u16(), reason });
                response
            }
        };
        if new_session {
            response.headers_mut().append(header::SET_COOKIE, session_cookie(session_id));
        }
        response
    }

    /// The agent's answer to an audited request, on its way back.
    async fn answer(
        &self,
        response: Response<Incoming>,
        remove_trace: bool,
        mut pending: Pending,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let status = parts.status.as_u16();
        if !remove_trace {
            let body = Audited::new(body, status, Capture::new(self.max_body_bytes), pending);
            return Response::from_parts(parts, body.map_err(Into::into).boxed_unsync());
        }
        // Rewriting needs the whole answer: it is read first, up to the body limit.
        let mut body = body;
        let mut buffer = Vec::new();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        buffer.extend_from_slice(data);
                    }
                    if buffer.len() > self.max_body_bytes {
                        // Too large to rewrite: forwarded as it is, trace included.
                        self.stats.trace_kept();
                        tracing::warn!(
                            max_body_bytes = self.max_body_bytes,
                            "an answer with the trace is larger than audit.limits.max_body_bytes: forwarded with \
                             the trace the client did not ask for"
                        );
                        let mut capture = Capture::new(self.max_body_bytes);
                        capture.push(&buffer);
                        let head = Full::new(Bytes::from(buffer)).map_err(|never| -> BoxError { match never {} });
                        let rest = Audited::new(body, status, capture, pending).map_err(BoxError::from);
                        let chained = Chain { first: Some(head), rest };
                        return Response::from_parts(parts, chained.boxed_unsync());
                    }
                }
                Some(Err(e)) => {
                    let reason = format!("the agent's answer failed while being read: {e}");
                    let response = error_response(StatusCode::BAD_GATEWAY, &reason);
                    pending.record(Outcome::Unreachable { status: StatusCode::BAD_GATEWAY.as_u16(), reason });
                    return response;
                }
                None => break,
            }
        }
        let stripped = without_trace(&buffer);
        let stripped = match stripped {
            Some(stripped) => {
                pending.record(Outcome::Answered { status, body: Capture::whole(buffer) });
                stripped
            }
            None => {
                pending.record(Outcome::Answered { status, body: Capture::whole(buffer.clone()) });
                self.stats.trace_kept();
                tracing::warn!("an answer with the trace is not a JSON object: forwarded as it is");
                buffer
            }
        };
        let had_length = parts.headers.contains_key(header::CONTENT_LENGTH);
        if had_length {
            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(stripped.len()));
            return Response::from_parts(
                parts,
                Full::new(Bytes::from(stripped)).map_err(|never| match never {}).boxed_unsync(),
            );
        }
        // Chunked as the agent sent it: a body of unknown length keeps it chunked.
        let once = futures::stream::once(std::future::ready(Ok::<_, Infallible>(Frame::data(Bytes::from(stripped)))));
        Response::from_parts(parts, StreamBody::new(once).map_err(|never| match never {}).boxed_unsync())
    }

    /// A websocket (or any other upgrade): forwarded; on `101` both connections are
    /// joined.
    async fn upgrade(&self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let client_side = hyper::upgrade::on(&mut request);
        let (mut parts, _body) = request.into_parts();
        parts.uri = self.upstream_uri(parts.uri.path(), parts.uri.query());
        strip_hop_by_hop(&mut parts.headers, true);
        parts.headers.remove(header::HOST);
        let upstream = Request::from_parts(parts, Empty::new().map_err(|never| match never {}).boxed_unsync());
        let mut response = match tokio::time::timeout(self.upstream_timeout, self.client.request(upstream)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                self.stats.upstream_error();
                return error_response(StatusCode::BAD_GATEWAY, &unreachable_reason(&e));
            }
            Err(_) => {
                self.stats.upstream_timeout();
                return error_response(StatusCode::GATEWAY_TIMEOUT, &self.timeout_reason());
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_side = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match futures::future::try_join(client_side, upstream_side).await {
                    Ok((client, upstream)) => {
                        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                            tracing::debug!(error = %e, "an upgraded connection ended with an error");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "an upgrade did not complete"),
                }
            });
        }
        let (mut parts, body) = response.into_parts();
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(&mut parts.headers, switching);
        Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
    }

    fn timeout_reason(&self) -> String {
        format!(
            "the agent did not answer within {} (audit.proxy.upstream_timeout)",
            humantime::format_duration(self.upstream_timeout)
        )
    }
}

/// True for a request asking to switch protocols (`Connection: upgrade` + `Upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// True when the query already asks for the trace (`show-thought=true`).
fn asks_for_trace(query: Option<&str>) -> bool {
    query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == SHOW_THOUGHT && v == "true"))
}

/// Removes hop-by-hop headers; `keep_upgrade` keeps `Connection` and `Upgrade` for an
/// upgrade handshake.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if keep_upgrade && (*name == header::CONNECTION || *name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The answer to a request the agent did not answer: a small JSON error.
fn error_response(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": format!("opsagent-audit proxy: {reason}") }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Why the agent could not be reached, for the record and the client: the innermost
/// cause (`Connection refused`), which names no header or body.
fn unreachable_reason(e: &hyper_util::client::legacy::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    if e.is_connect() {
        format!("the agent could not be reached: {cause}")
    } else {
        format!("the agent's answer failed: {cause}")
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// One body, then another.
struct Chain<A, B> {
    first: Option<A>,
    rest: B,
}

impl<A, B> http_body::Body for Chain<A, B>
where
    A: http_body::Body<Data = Bytes> + Unpin,
    B: http_body::Body<Data = Bytes, Error = A::Error> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        use std::task::Poll;
        if let Some(first) = &mut self.first {
            match std::pin::Pin::new(first).poll_frame(cx) {
                Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame)),
                Poll::Ready(None) => self.first = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.as_ref().is_none_or(|f| f.is_end_stream()) && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_the_rest_kept() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-api-key", "k"),
            ("content-type", "application/json"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        let mut names: Vec<&str> = plain.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "x-api-key"]);
        let mut upgrade = h;
        strip_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade["upgrade"], "websocket");
        assert_eq!(upgrade["connection"], "upgrade");
        assert!(!upgrade.contains_key("x-hop"));
    }

    #[test]
    fn the_trace_is_asked_for_only_once() {
        assert!(asks_for_trace(Some("show-thought=true")));
        assert!(asks_for_trace(Some("a=1&show-thought=true")));
        assert!(!asks_for_trace(Some("show-thought=false")));
        assert!(!asks_for_trace(None));
    }
}
