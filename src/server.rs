//! The accept loop both listeners run on (the API's and the auditing proxy's): TCP
//! connections in, HTTP/1.1 served by hyper, with the limits that `axum::serve` has no
//! knob for.
//!
//! - **Concurrent connections** (`audit.limits.max_connections`, per listener): every
//!   served connection holds a permit for its lifetime. One over the limit is still
//!   accepted, answered `503` with `Retry-After: 1` and `Connection: close`, and closed:
//!   the client learns why at once instead of waiting unseen in the kernel's backlog. At
//!   most [`REJECTIONS_IN_FLIGHT`] such answers are pending at a time; past that a
//!   connection is closed without one, so a flood cannot turn the answers into the
//!   resource it exhausts.
//! - **Slow headers** (`audit.limits.header_read_timeout`): hyper's HTTP/1 header read
//!   timeout. It runs whenever hyper waits for a request head, so it also closes idle
//!   keep-alive connections, which would otherwise hold their permit for ever.
//! - **Accept errors** (`EMFILE` when out of file descriptors, …) never end the loop:
//!   they are logged, rate-limited, and accepting resumes after [`ACCEPT_ERROR_PAUSE`],
//!   as `axum::serve` does.
//! - **Upgrades** (websockets) are served: the proxy joins them to the agent's.
//! - **Graceful shutdown**: at the signal the listener is closed; hyper-util's
//!   [`GracefulShutdown`] closes idle connections and lets in-flight requests finish;
//!   with a grace period, connections still open when it ends are cut.
//!
//! Below [`crate::api`] and [`crate::proxy`], which only say what a connection serves.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::pipeline::stats::RateLimitedLog;

/// Over-limit connections being answered `503` at once; more are closed unanswered.
pub const REJECTIONS_IN_FLIGHT: usize = 64;
/// How long accepting pauses after an error such as `EMFILE`, so a process out of file
/// descriptors does not spin; connections that end meanwhile free some.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);
/// At most one log line per interval for each kind of refused or failed connection.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The error type a served body or service may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Which listener this is, for its log lines (`api`, `proxy`).
    pub listener: &'static str,
    /// Connections served at once (`audit.limits.max_connections`).
    pub max_connections: usize,
    /// Longest wait for a request head (`audit.limits.header_read_timeout`).
    pub header_read_timeout: Duration,
    /// After the shutdown signal, how long open connections may finish; `None` waits
    /// for all of them.
    pub grace: Option<Duration>,
}

/// Serves on `listener` within `limits` until `shutdown` resolves, then lets in-flight
/// requests finish (for up to `limits.grace`) and returns once every connection has
/// ended. `service_for(peer)` gives the service of one connection.
pub async fn serve<S, B>(
    listener: TcpListener,
    service_for: impl Fn(SocketAddr) -> S,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let served = http_builder(limits.header_read_timeout, true);
    let refused = http_builder(limits.header_read_timeout, false);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let rejections = Arc::new(Semaphore::new(REJECTIONS_IN_FLIGHT));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let (accept_log, over_limit_log) = (RateLimitedLog::new(LOG_INTERVAL), RateLimitedLog::new(LOG_INTERVAL));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e, &accept_log, limits.listener).await;
                    continue;
                }
            },
            // Reaps ended connections, so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            over_limit_log.log(|suppressed| {
                tracing::warn!(
                    listener = limits.listener,
                    max_connections = limits.max_connections,
                    suppressed,
                    "a connection over audit.limits.max_connections is answered 503 and closed"
                )
            });
            let Ok(slot) = rejections.clone().try_acquire_owned() else {
                // Already answering many: closing is the cheapest answer left.
                drop(stream);
                continue;
            };
            let max = limits.max_connections;
            let service = hyper::service::service_fn(move |_| async move { Ok::<_, Infallible>(over_limit(max)) });
            let connection = graceful.watch(refused.serve_connection(TokioIo::new(stream), service).into_owned());
            connections.spawn(async move {
                // The client may close first or send garbage: nothing to report.
                let _ = connection.await;
                drop(slot);
            });
            continue;
        };
        let (served, watcher, service) = (served.clone(), graceful.watcher(), service_for(peer));
        let listener_name = limits.listener;
        let header_read_timeout = limits.header_read_timeout;
        connections.spawn(async move {
            // An upgradeable connection first sniffs the HTTP version, and hyper's header
            // timeout starts only after that: a client that never sends a byte is closed
            // here instead, so it cannot hold its permit for ever.
            // (`peek`, not `readable`: readiness may be reported before any byte came.)
            match tokio::time::timeout(header_read_timeout, stream.peek(&mut [0u8; 1])).await {
                Ok(Ok(n)) if n > 0 => {}
                // Closed, failed, or silent for too long.
                _ => {
                    tracing::debug!(listener = listener_name, %peer, "a connection sent nothing: closed");
                    return;
                }
            }
            let connection = served.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            let connection = watcher.watch(connection);
            if let Err(e) = connection.await {
                // Header timeouts, resets, malformed requests: the client's doing, not ours.
                tracing::debug!(listener = listener_name, %peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::debug!(listener = limits.listener, open, "not accepting connections; waiting for open ones to finish");
    match limits.grace {
        None => graceful.shutdown().await,
        Some(grace) => {
            if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
                tracing::warn!(
                    listener = limits.listener,
                    open,
                    ?grace,
                    "requests still running at shutdown after the grace period are cut"
                );
            }
        }
    }
    connections.shutdown().await;
}

/// An HTTP/1.1 connection builder. Only HTTP/1.1, as `axum::serve` served before; and
/// with the version sniffing of `auto` hyper's header timeout would not start until a
/// first byte arrives, so a silent connection would be kept for ever.
fn http_builder(header_read_timeout: Duration, keep_alive: bool) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(keep_alive);
    builder
}

/// The answer to a connection over `audit.limits.max_connections`, in the API's error
/// shape (`{"error": {"code", "message"}}`).
fn over_limit(max_connections: usize) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": {
        "code": "too_many_connections",
        "message": format!(
            "the server is at its limit of {max_connections} concurrent connections \
             (audit.limits.max_connections); retry shortly"
        ),
    }});
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Logs a failed `accept` and pauses when the error is the server's (out of file
/// descriptors, out of memory), not the client's.
async fn accept_failed(e: std::io::Error, log: &RateLimitedLog, listener: &'static str) {
    use std::io::ErrorKind;
    // The peer gave up between connecting and being accepted: nothing to wait out.
    if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) {
        return;
    }
    log.log(|suppressed| {
        tracing::error!(listener, error = %e, suppressed, pause = ?ACCEPT_ERROR_PAUSE, "accepting a connection failed; retrying")
    });
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}
