//! [`AuditLayer`]: the seed's gin middleware (section 5.2) as a tower layer, for Rust
//! agents served by axum or hyper.
//!
//! On an audited path the layer gives the handler an [`AuditContext`] (a request
//! extension, also an axum extractor) to fill with what only the handler knows: the
//! model, each thought, each tool call with its output and timing, the answer. The layer
//! itself records what it can see from outside: the session (the `session_id` cookie, set
//! on the response when absent, as the seed does), the caller, the question when the
//! handler did not give one (from the request body), the HTTP status and the duration.
//!
//! It logs exactly one record per audited request, whatever happens: when the handler
//! answers, when it panics (the record says so, then the panic goes on as before), and
//! when the request is dropped before an answer because the client went away
//! (`cancelled`). Logging goes through [`AuditLogger::log`], which never blocks and never
//! fails the request.
//!
//! ```no_run
//! # use opsagent_audit::layer::{AuditContext, AuditLayer};
//! # use opsagent_audit::model::ToolCall;
//! # fn app(logger: opsagent_audit::pipeline::AuditLogger) -> axum::Router {
//! async fn execute(audit: AuditContext) -> &'static str {
//!     audit.set_model("gpt-4o");
//!     audit.thought("the pods should be listed first");
//!     let run = audit.start_tool("kubectl", "get pods -n web");
//!     run.finish("web-0   1/1   Running");
//!     audit.answer("all pods are running");
//!     "all pods are running"
//! }
//! axum::Router::new()
//!     .route("/api/execute", axum::routing::post(execute))
//!     .layer(AuditLayer::new(logger).paths(["/api/execute"]))
//! # }
//! ```

mod body;
mod context;
mod service;

pub use context::{AuditContext, ToolRun};
pub use service::{AuditFuture, AuditService};

use std::sync::Arc;

use crate::pipeline::AuditLogger;

/// The paths the seed audits: the agent's three model-calling endpoints.
pub const DEFAULT_PATHS: [&str; 3] = ["/api/execute", "/api/diagnose", "/api/analyze"];

/// How much of a request body the layer keeps to find the question in, by default.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// A tower [`Layer`](tower::Layer) that audits requests to chosen paths: see the module
/// documentation.
#[derive(Clone)]
pub struct AuditLayer {
    logger: AuditLogger,
    paths: Arc<[String]>,
    max_body_bytes: usize,
}

impl std::fmt::Debug for AuditLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLayer").field("paths", &self.paths).field("max_body_bytes", &self.max_body_bytes).finish()
    }
}

impl AuditLayer {
    /// A layer logging through `logger`, auditing the seed's paths ([`DEFAULT_PATHS`]).
    pub fn new(logger: AuditLogger) -> Self {
        AuditLayer {
            logger,
            paths: DEFAULT_PATHS.iter().map(|p| p.to_string()).collect(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Audits exactly these request paths (compared with the URI's path, without the
    /// query). An empty list audits every request.
    pub fn paths<I, P>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.paths = paths.into_iter().map(Into::into).collect();
        self
    }

    /// Keeps at most this many bytes of an audited request's body to find the question
    /// in (the handler still reads all of it).
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    fn audits(&self, path: &str) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|p| p == path)
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = AuditService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuditService::new(inner, self.clone())
    }
}
