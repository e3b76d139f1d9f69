//! [`AuditService`]: the layer's service, and the guard that logs each audited request
//! exactly once.

use std::any::Any;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use futures::future::BoxFuture;
use futures::FutureExt;
use tower::Service;
use uuid::Uuid;

use super::body::{Captured, CapturingBody};
use super::context::AuditContext;
use super::AuditLayer;
use crate::ingest::opsagent::{session_in_cookies, session_set_cookie};
use crate::model::{Interaction, Status};
use crate::pipeline::AuditLogger;

/// The future of an [`AuditService`] call.
pub type AuditFuture<R, E> = BoxFuture<'static, Result<R, E>>;

/// The service [`AuditLayer`] wraps around a handler or router.
#[derive(Clone, Debug)]
pub struct AuditService<S> {
    inner: S,
    layer: AuditLayer,
}

impl<S> AuditService<S> {
    pub(super) fn new(inner: S, layer: AuditLayer) -> Self {
        AuditService { inner, layer }
    }
}

impl<S, B, ResBody> Service<Request<B>> for AuditService<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = AuditFuture<Response<ResBody>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.layer.audits(request.uri().path()) {
            return self.inner.call(request.map(Body::new)).boxed();
        }
        let (session_id, new_session) = match session_cookie(request.headers()) {
            Some(id) => (id, false),
            None => (Uuid::now_v7(), true),
        };
        let mut record = Interaction::new(String::new());
        record.session_id = session_id;
        record.endpoint = Some(request.uri().path().to_owned());
        record.user_agent = header_text(request.headers(), header::USER_AGENT);
        record.client_ip = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
        let audit = AuditContext::new(record);
        let request_line = format!("{} {}", request.method(), request.uri());
        let (mut request, captured) = {
            let (parts, body) = request.into_parts();
            let (body, captured) = CapturingBody::new(body, self.layer.max_body_bytes);
            (Request::from_parts(parts, Body::new(body)), captured)
        };
        request.extensions_mut().insert(audit.clone());
        let mut pending = Pending {
            audit,
            logger: self.layer.logger.clone(),
            started: Instant::now(),
            captured,
            request_line,
            logged: false,
        };
        let answer = self.inner.call(request);
        async move {
            match AssertUnwindSafe(answer).catch_unwind().await {
                Ok(Ok(mut response)) => {
                    pending.log(Some(response.status()), None);
                    if new_session {
                        if let Ok(cookie) = HeaderValue::from_str(&session_set_cookie(session_id)) {
                            response.headers_mut().append(header::SET_COOKIE, cookie);
                        }
                    }
                    Ok(response)
                }
                Ok(Err(error)) => {
                    pending.log(None, Some((Status::Error, "the service failed before answering".into())));
                    Err(error)
                }
                Err(panic) => {
                    let message = format!("the handler panicked: {}", panic_message(&*panic));
                    pending.log(Some(StatusCode::INTERNAL_SERVER_ERROR), Some((Status::Error, message)));
                    // Whoever handled panics before the layer was added still does.
                    std::panic::resume_unwind(panic)
                }
            }
        }
        .boxed()
    }
}

/// One audited request on its way: logs its record once, when the handler answers,
/// fails or panics, or (on drop) when the request is abandoned before any of those.
struct Pending {
    audit: AuditContext,
    logger: AuditLogger,
    started: Instant,
    captured: Arc<Mutex<Captured>>,
    request_line: String,
    logged: bool,
}

impl Pending {
    /// Completes the record from what the layer saw and logs it. `outcome` overrides the
    /// status derived from the HTTP status, unless the handler gave one.
    fn log(&mut self, http_status: Option<StatusCode>, outcome: Option<(Status, String)>) {
        if std::mem::replace(&mut self.logged, true) {
            return;
        }
        let mut draft = self.audit.draft();
        let (question_given, status_given) = (draft.question_given, draft.status_given);
        let record = &mut draft.record;
        record.total_duration_ms = Some(i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX));
        record.http_status = http_status.map(|s| i32::from(s.as_u16()));
        if !question_given {
            let captured = self.captured.lock().unwrap_or_else(|p| p.into_inner());
            record.question = question_in(&captured.bytes).unwrap_or_else(|| self.request_line.clone());
        }
        if !status_given {
            if let Some((status, error)) = outcome.or_else(|| http_status.and_then(outcome_of)) {
                record.status = status;
                record.error = Some(error);
            }
        }
        let record = record.clone();
        drop(draft);
        self.logger.log(record);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.logged {
            self.log(None, Some((Status::Cancelled, "the request was abandoned before the handler answered".into())));
        }
    }
}

/// What a response status says about the interaction, when it was not a success.
fn outcome_of(status: StatusCode) -> Option<(Status, String)> {
    match status {
        s if s.is_success() || s.is_redirection() || s.is_informational() => None,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => Some((Status::Timeout, format!("HTTP {status}"))),
        s => Some((Status::Error, format!("HTTP {s}"))),
    }
}

/// The question in a JSON request body: OpsAgent's `instructions`, else a `question`.
fn question_in(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    ["instructions", "question"]
        .into_iter()
        .find_map(|key| value.get(key).and_then(|v| v.as_str()).filter(|s| !s.trim().is_empty()))
        .map(str::to_owned)
}

/// The session id in the request's `session_id` cookie, if there is a valid one.
fn session_cookie(headers: &HeaderMap) -> Option<Uuid> {
    session_in_cookies(headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()))
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_session_among_other_cookies() {
        let id = Uuid::now_v7();
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("theme=dark"));
        headers.append(header::COOKIE, HeaderValue::from_str(&format!("a=1; session_id={id}; b=2")).unwrap());
        assert_eq!(session_cookie(&headers), Some(id));
    }

    #[test]
    fn a_session_cookie_that_is_not_a_uuid_is_no_session() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("session_id=not-a-uuid"));
        assert_eq!(session_cookie(&headers), None);
    }

    #[test]
    fn the_question_comes_from_instructions_or_question() {
        assert_eq!(question_in(br#"{"instructions":"list pods"}"#).as_deref(), Some("list pods"));
        assert_eq!(question_in(br#"{"question":"why"}"#).as_deref(), Some("why"));
        assert_eq!(question_in(br#"{"instructions":"  "}"#), None);
        assert_eq!(question_in(b"not json"), None);
    }

    #[test]
    fn only_failures_change_the_status() {
        assert_eq!(outcome_of(StatusCode::OK), None);
        assert_eq!(outcome_of(StatusCode::GATEWAY_TIMEOUT).map(|o| o.0), Some(Status::Timeout));
        assert_eq!(outcome_of(StatusCode::BAD_REQUEST).map(|o| o.0), Some(Status::Error));
    }
}
