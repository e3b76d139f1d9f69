//! The accept loop: TCP connections in, HTTP/1.1 served by hyper, with the limits that
//! `axum::serve` has no knob for.
//!
//! - **Concurrent connections** (`audit.limits.max_connections`): every served
//!   connection holds a permit for its lifetime. One over the limit is still accepted,
//!   answered `503` with `Retry-After: 1` and `Connection: close`, and closed: the client
//!   learns why at once instead of waiting unseen in the kernel's backlog. At most
//!   [`REJECTIONS_IN_FLIGHT`] such answers are pending at a time; past that a connection
//!   is closed without one, so a flood cannot turn the answers into the resource it
//!   exhausts.
//! - **Slow headers** (`audit.limits.header_read_timeout`): hyper's HTTP/1 header read
//!   timeout. It runs whenever hyper waits for a request head, so it also closes idle
//!   keep-alive connections, which would otherwise hold their permit for ever.
//! - **Accept errors** (`EMFILE` when out of file descriptors, …) never end the loop:
//!   they are logged, rate-limited, and accepting resumes after [`ACCEPT_ERROR_PAUSE`],
//!   as `axum::serve` does.
//! - **Graceful shutdown**: at the signal the listener is closed; hyper-util's
//!   [`GracefulShutdown`] closes idle connections and lets in-flight requests finish;
//!   [`serve`] returns when the last connection has ended.
//!
//! The request timeout is not here but a layer of the router ([`super::router`]): it
//! bounds the handler, body reading included, and not a response body that is already
//! streaming.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::Layer;

use super::ApiError;
use crate::config::LimitsConfig;
use crate::pipeline::stats::RateLimitedLog;

/// Over-limit connections being answered `503` at once; more are closed unanswered.
pub const REJECTIONS_IN_FLIGHT: usize = 64;
/// How long accepting pauses after an error such as `EMFILE`, so a process out of file
/// descriptors does not spin; connections that end meanwhile free some.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);
/// At most one log line per interval for each kind of refused or failed connection.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then lets
/// in-flight requests finish and returns once every connection has ended.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &LimitsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let served = http_builder(limits.header_read_timeout, true);
    let refused = http_builder(limits.header_read_timeout, false);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let rejections = Arc::new(Semaphore::new(REJECTIONS_IN_FLIGHT));
    let graceful = GracefulShutdown::new();
    let (accept_log, over_limit_log) = (RateLimitedLog::new(LOG_INTERVAL), RateLimitedLog::new(LOG_INTERVAL));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e, &accept_log).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            over_limit_log.log(|suppressed| {
                tracing::warn!(
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
            tokio::spawn(async move {
                // The client may close first or send garbage: nothing to report.
                let _ = connection.await;
                drop(slot);
            });
            continue;
        };
        // What `into_make_service_with_connect_info` would add: handlers may ask for the peer.
        let service = Extension(ConnectInfo(peer)).layer(router.clone());
        let connection = served.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Header timeouts, resets, malformed requests: the client's doing, not ours.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::debug!(connections = graceful.count(), "not accepting connections; waiting for open ones to finish");
    graceful.shutdown().await;
}

/// An HTTP/1.1 connection builder. Only HTTP/1.1, as `axum::serve` served before; and
/// with the version sniffing of `auto` hyper's header timeout would not start until a
/// first byte arrives, so a silent connection would be kept for ever.
fn http_builder(header_read_timeout: Duration, keep_alive: bool) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(keep_alive);
    builder
}

/// The answer to a connection over `audit.limits.max_connections`.
fn over_limit(max_connections: usize) -> Response {
    let error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        format!(
            "the server is at its limit of {max_connections} concurrent connections \
             (audit.limits.max_connections); retry shortly"
        ),
    );
    let mut response = error.into_response();
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Logs a failed `accept` and pauses when the error is the server's (out of file
/// descriptors, out of memory), not the client's.
async fn accept_failed(e: std::io::Error, log: &RateLimitedLog) {
    use std::io::ErrorKind;
    // The peer gave up between connecting and being accepted: nothing to wait out.
    if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) {
        return;
    }
    log.log(|suppressed| {
        tracing::error!(error = %e, suppressed, pause = ?ACCEPT_ERROR_PAUSE, "accepting a connection failed; retrying")
    });
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}
