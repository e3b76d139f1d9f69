//! API tokens and roles: who may call which endpoint.
//!
//! Tokens come from `audit.auth.tokens`, each as the name of an environment variable
//! holding it or as its SHA-256: the YAML never holds a token in clear. A request's
//! `Authorization: Bearer …` is hashed once and compared with every configured digest in
//! constant time, so neither a match's position nor a partial match shows in the timing.
//! Without tokens the API is open (and `serve` stays on loopback unless `--insecure`).
//!
//! Which role an endpoint needs is declared where the router is built; this module only
//! answers "who is this, and may they?". A refusal is `401` (no token, or one that is
//! not configured) or `403` (a valid token of the wrong role), logged without the token,
//! rate-limited, and counted by reason.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::{AuthConfig, LimitsConfig, Role};
use crate::pipeline::stats::RateLimitedLog;

/// At most one "refused" log line per this interval (a scanner must not flood the log).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Why the configured tokens cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// `token_env` names a variable that is not set (or is empty).
    #[error("audit.auth.tokens `{name}`: environment variable {var} is not set or empty")]
    MissingEnv {
        /// The token's name.
        name: String,
        /// The variable.
        var: String,
    },
    /// `token_sha256` is not 64 hex digits.
    #[error("audit.auth.tokens `{name}`: token_sha256 must be 64 hex digits")]
    BadDigest {
        /// The token's name.
        name: String,
    },
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's configured name; `anonymous` when no tokens are configured.
    pub name: Arc<str>,
    /// What it may do.
    pub role: Role,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that is not configured (or a malformed header).
    Invalid,
    /// A valid token whose role does not allow the endpoint.
    Forbidden,
}

impl Refusal {
    /// The label of the `auth_failures` metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
            Refusal::Forbidden => "forbidden",
        }
    }
}

struct Token {
    name: Arc<str>,
    role: Role,
    digest: [u8; 32],
}

/// The configured tokens, ready to check requests against.
pub struct Authenticator {
    tokens: Vec<Token>,
    /// Requests per token per second, when limited.
    rate: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    failure_log: RateLimitedLog,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and roles only: digests stay out of logs too.
        let tokens: Vec<(&str, &str)> = self.tokens.iter().map(|t| (&*t.name, t.role.as_str())).collect();
        f.debug_struct("Authenticator").field("tokens", &tokens).finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Reads the tokens of `config`, looking `token_env` variables up with `env`.
    pub fn new(
        config: &AuthConfig,
        limits: &LimitsConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Authenticator, AuthError> {
        let mut tokens = Vec::with_capacity(config.tokens.len());
        for t in &config.tokens {
            let digest = match (&t.token_env, &t.token_sha256) {
                (Some(var), _) => match env(var) {
                    Some(token) if !token.trim().is_empty() => sha256(token.trim().as_bytes()),
                    _ => return Err(AuthError::MissingEnv { name: t.name.clone(), var: var.clone() }),
                },
                (None, Some(hex)) => parse_digest(hex).ok_or_else(|| AuthError::BadDigest { name: t.name.clone() })?,
                // Config validation refuses a token with neither.
                (None, None) => return Err(AuthError::BadDigest { name: t.name.clone() }),
            };
            tokens.push(Token { name: t.name.as_str().into(), role: t.role, digest });
        }
        let rate = NonZeroU32::new(limits.requests_per_second).map(|per_second| {
            let burst = NonZeroU32::new(limits.request_burst).unwrap_or(per_second);
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        Ok(Authenticator { tokens, rate, failure_log: RateLimitedLog::new(FAILURE_LOG_INTERVAL) })
    }

    /// True when tokens are configured (the API is protected).
    pub fn is_enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Who sent a request with this `Authorization` header.
    pub fn identify(&self, authorization: Option<&HeaderValue>) -> Result<Caller, Refusal> {
        if self.tokens.is_empty() {
            return Ok(Caller { name: "anonymous".into(), role: Role::Admin });
        }
        let header = authorization.ok_or(Refusal::Missing)?;
        let token = bearer(header).ok_or(Refusal::Invalid)?;
        let presented = sha256(token.as_bytes());
        // Every digest is compared, whatever matched before, so the time taken does not
        // tell which token (or how many) came close.
        let mut found: Option<&Token> = None;
        for t in &self.tokens {
            if bool::from(t.digest.ct_eq(&presented)) {
                found = Some(t);
            }
        }
        found.map(|t| Caller { name: t.name.clone(), role: t.role }).ok_or(Refusal::Invalid)
    }

    /// True when `caller` may make another request now (always, without a rate limit
    /// or without tokens: the anonymous caller of a loopback service is not limited).
    fn within_rate(&self, caller: &Caller) -> Result<(), Duration> {
        let Some(rate) = &self.rate else { return Ok(()) };
        if !self.is_enabled() {
            return Ok(());
        }
        rate.check_key(&caller.name).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()))
        })
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(header: &HeaderValue) -> Option<&str> {
    let value = header.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware: the request needs a token of role `ingest` (or `admin`).
pub async fn require_ingest(State(app): State<AppState>, request: Request, next: Next) -> Response {
    authorize(&app, Role::Ingest, request, next).await
}

/// Middleware: the request needs a token of role `read` (or `admin`).
pub async fn require_read(State(app): State<AppState>, request: Request, next: Next) -> Response {
    authorize(&app, Role::Read, request, next).await
}

/// Middleware: the request needs a token of role `admin`.
pub async fn require_admin(State(app): State<AppState>, request: Request, next: Next) -> Response {
    authorize(&app, Role::Admin, request, next).await
}

/// Middleware for `/metrics`: a `read` token, unless `audit.auth.metrics_public`.
pub async fn require_metrics(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if app.config.auth.metrics_public {
        return next.run(request).await;
    }
    authorize(&app, Role::Read, request, next).await
}

async fn authorize(app: &AppState, required: Role, mut request: Request, next: Next) -> Response {
    let auth = &app.auth;
    let caller = match auth.identify(request.headers().get(header::AUTHORIZATION)) {
        Ok(caller) if caller.role.allows(required) => caller,
        Ok(caller) => {
            refuse(app, Refusal::Forbidden, &request, Some(&caller));
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token `{}` has role `{}`; this endpoint needs `{}`",
                    caller.name,
                    caller.role.as_str(),
                    required.as_str()
                ),
            )
            .into_response();
        }
        Err(refusal) => {
            refuse(app, refusal, &request, None);
            let message = match refusal {
                Refusal::Missing => "this endpoint needs `Authorization: Bearer <token>`",
                _ => "the bearer token is not valid",
            };
            let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    if let Err(wait) = auth.within_rate(&caller) {
        app.metrics.rate_limited(&caller.name);
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "token `{}` exceeds audit.limits.requests_per_second ({} per second); retry in {seconds}s",
                caller.name, app.config.limits.requests_per_second
            ),
        )
        .into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return response;
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Counts and logs (rate-limited, never the token) a refused request.
fn refuse(app: &AppState, refusal: Refusal, request: &Request, caller: Option<&Caller>) {
    app.metrics.auth_failure(refusal);
    app.auth.failure_log.log(|suppressed| {
        tracing::warn!(
            reason = refusal.as_str(),
            method = %request.method(),
            path = request.uri().path(),
            token = caller.map(|c| &*c.name),
            suppressed,
            "API request refused"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    fn config(tokens: &[(&str, Role, &str)]) -> AuthConfig {
        AuthConfig {
            tokens: tokens
                .iter()
                .map(|(name, role, var)| TokenConfig {
                    name: (*name).into(),
                    role: *role,
                    token_env: Some((*var).into()),
                    token_sha256: None,
                })
                .collect(),
            metrics_public: false,
        }
    }

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn identifies_tokens_by_env_and_digest() {
        let mut auth_config = config(&[("agent", Role::Ingest, "T_AGENT")]);
        auth_config.tokens.push(TokenConfig {
            name: "auditor".into(),
            role: Role::Read,
            token_env: None,
            // sha256("s3cret")
            token_sha256: Some("c89ae5d5d5a9f2b1fe0ee1ec6d4dc1fc84f0e6a2c2d4dc1ae4f6a23fbd1f2b6c".into()),
        });
        let env = |v: &str| (v == "T_AGENT").then(|| "agent-token".to_string());
        let auth = Authenticator::new(&auth_config, &LimitsConfig::default(), env).unwrap();
        let agent = auth.identify(Some(&header("Bearer agent-token"))).unwrap();
        assert_eq!((&*agent.name, agent.role), ("agent", Role::Ingest));
        assert_eq!(auth.identify(Some(&header("bearer  agent-token"))).unwrap().role, Role::Ingest);
        assert_eq!(auth.identify(None), Err(Refusal::Missing));
        assert_eq!(auth.identify(Some(&header("Bearer nope"))), Err(Refusal::Invalid));
        assert_eq!(auth.identify(Some(&header("Basic agent-token"))), Err(Refusal::Invalid));
        assert_eq!(auth.identify(Some(&header("Bearer "))), Err(Refusal::Invalid));
        let digest = sha256(b"s3cret").iter().map(|b| format!("{b:02x}")).collect::<String>();
        auth_config.tokens[1].token_sha256 = Some(digest);
        let auth = Authenticator::new(&auth_config, &LimitsConfig::default(), env).unwrap();
        assert_eq!(auth.identify(Some(&header("Bearer s3cret"))).unwrap().role, Role::Read);
    }

    #[test]
    fn a_missing_env_token_is_a_start_up_error() {
        let err = Authenticator::new(&config(&[("agent", Role::Ingest, "NOPE")]), &LimitsConfig::default(), |_| None)
            .unwrap_err();
        assert!(err.to_string().contains("NOPE") && err.to_string().contains("agent"), "{err}");
    }

    #[test]
    fn without_tokens_everyone_is_admin() {
        let auth = Authenticator::new(&AuthConfig::default(), &LimitsConfig::default(), |_| None).unwrap();
        assert!(!auth.is_enabled());
        assert_eq!(auth.identify(None).unwrap().role, Role::Admin);
    }

    #[test]
    fn roles() {
        assert!(Role::Admin.allows(Role::Ingest) && Role::Admin.allows(Role::Read));
        assert!(!Role::Ingest.allows(Role::Read) && !Role::Read.allows(Role::Ingest));
        assert!(!Role::Read.allows(Role::Admin));
    }
}
