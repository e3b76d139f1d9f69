//! The API's listener: the router served on [`crate::server`]'s accept loop (the
//! connection limit, header timeout and graceful stop are described there).
//!
//! The request timeout is not here but a layer of the router ([`super::router`]): it
//! bounds the handler, body reading included, and not a response body that is already
//! streaming.

use std::future::Future;

use axum::extract::connect_info::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::Layer;

use crate::config::LimitsConfig;
use crate::server::{self, ServeLimits};

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then lets
/// in-flight requests finish and returns once every connection has ended.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &LimitsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let limits = ServeLimits {
        listener: "api",
        max_connections: limits.max_connections,
        header_read_timeout: limits.header_read_timeout,
        grace: None,
    };
    // What `into_make_service_with_connect_info` would add: handlers may ask for the peer.
    let service_for =
        |peer: std::net::SocketAddr| TowerToHyperService::new(Extension(ConnectInfo(peer)).layer(router.clone()));
    server::serve(listener, service_for, limits, shutdown).await;
}
