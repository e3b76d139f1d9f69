//! `POST /v1/traces` and `POST /v1/logs`: OTLP/HTTP, served by
//! [`OtlpReceiver`](crate::ingest::otlp::OtlpReceiver). This file reads the body within
//! `audit.limits.max_body_bytes` and turns the receiver's answer into a response.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::ingest::otlp::decode::{encode_status, encoding_of, rpc_code, Encoding};
use crate::ingest::otlp::ExportOutcome;

/// `POST /v1/traces`.
pub async fn traces(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    export(app, headers, body, false).await
}

/// `POST /v1/logs`.
pub async fn logs(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    export(app, headers, body, true).await
}

async fn export(app: AppState, headers: HeaderMap, body: Body, logs: bool) -> Response {
    let text = |name| headers.get(name).map(|v: &HeaderValue| v.to_str().unwrap_or("(not text)"));
    let (content_type, content_encoding) = (text(header::CONTENT_TYPE), text(header::CONTENT_ENCODING));
    // Errors before the receiver answers go in the request's encoding when it has one.
    let encoding = encoding_of(content_type).unwrap_or(Encoding::Json);
    let Some(receiver) = app.otlp.as_ref().filter(|_| app.logger.is_enabled()) else {
        let message = "auditing is disabled (audit.enabled: false); spans are not accepted";
        return answer(error(503, rpc_code::UNAVAILABLE, message, encoding));
    };
    let limit = app.config.limits.max_body_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        let message = format!("request body exceeds {limit} bytes (audit.limits.max_body_bytes)");
        answer(error(413, rpc_code::INVALID_ARGUMENT, &message, encoding))
    };
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let over_limit = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            if over_limit {
                return too_large();
            }
            let message = format!("could not read request body: {e}");
            return answer(error(400, rpc_code::INVALID_ARGUMENT, &message, encoding));
        }
    };
    let outcome = if logs {
        receiver.export_logs(&bytes, content_type, content_encoding).await
    } else {
        receiver.export_traces(&bytes, content_type, content_encoding).await
    };
    answer(outcome)
}

fn error(status: u16, code: i32, message: &str, encoding: Encoding) -> ExportOutcome {
    ExportOutcome {
        status,
        content_type: encoding.content_type(),
        body: encode_status(code, message, encoding),
        retry_after: (status == 503).then_some(5),
    }
}

fn answer(outcome: ExportOutcome) -> Response {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, [(header::CONTENT_TYPE, outcome.content_type)], outcome.body).into_response();
    if let Some(seconds) = outcome.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}
