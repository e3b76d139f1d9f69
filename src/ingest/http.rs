//! `POST /api/v1/interactions`: one record, a JSON array of records, or NDJSON.
//!
//! Each record is validated alone: a bad record in an array is rejected with its index and
//! the offending field, and the good ones are accepted. A body that cannot be read at all
//! (not JSON, too large, wrong content type) is refused whole.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::record::{parse_record, FieldError};
use crate::api::{ApiError, AppState, ErrorBody};
use crate::config::AckMode;
use crate::model::Interaction;

/// The answer to an ingest request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IngestResponse {
    /// Records taken into the pipeline.
    pub accepted: usize,
    /// Records refused.
    pub rejected: usize,
    /// One entry per record, in request order.
    pub results: Vec<RecordResult>,
}

/// What happened to one record of a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordResult {
    /// Position in the request (array index or NDJSON record number), from 0.
    pub index: usize,
    /// The stored id, when accepted.
    pub interaction_id: Option<Uuid>,
    /// `accepted`, `rejected` (invalid), or `failed` (valid, but not stored durably:
    /// send it again).
    pub status: String,
    /// Why it was rejected.
    pub error: Option<ErrorBody>,
}

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Json,
    NdJson,
}

fn framing(headers: &HeaderMap) -> Result<Framing, ApiError> {
    let unsupported = |got: &str| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content type `{got}` is not accepted; send application/json or application/x-ndjson"),
        )
        .with_field("content-type")
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported("(none)"));
    };
    let text = value.to_str().map_err(|_| unsupported("(not text)"))?;
    let essence = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Framing::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" | "application/x-jsonlines" => {
            Ok(Framing::NdJson)
        }
        _ => Err(unsupported(text)),
    }
}

/// Splits a body into records, each parsed or refused on its own.
fn parse_body(framing: Framing, body: &str) -> Result<Vec<Result<Value, FieldError>>, ApiError> {
    let malformed = |e: serde_json::Error| {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("body is not valid JSON: {e}"))
    };
    match framing {
        Framing::Json => match serde_json::from_str::<Value>(body).map_err(malformed)? {
            Value::Array(items) => Ok(items.into_iter().map(Ok).collect()),
            one @ Value::Object(_) => Ok(vec![Ok(one)]),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                "body must be a record (JSON object) or an array of records",
            )),
        },
        Framing::NdJson => Ok(body
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                serde_json::from_str::<Value>(line).map_err(|e| FieldError {
                    field: String::new(),
                    message: format!("line {}: not valid JSON: {e}", n + 1),
                })
            })
            .collect()),
    }
}

/// The ingest handler.
pub async fn post_interactions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !app.logger.is_enabled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_disabled",
            "auditing is disabled (audit.enabled: false); records are not accepted",
        ));
    }
    let framing = framing(&headers)?;
    let limit = app.config.limits.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds {limit} bytes (audit.limits.max_body_bytes)"),
        )
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over_limit = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .any(|e| e.is::<http_body_util::LengthLimitError>());
        if over_limit {
            too_large()
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "body_unreadable", format!("could not read request body: {e}"))
        }
    })?;
    // Invalid UTF-8 is replaced, not refused: a record with a mangled byte is still evidence.
    let text = String::from_utf8_lossy(&bytes);
    let text = replace_lone_surrogates(&text);
    let values = parse_body(framing, &text)?;
    if values.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty_body", "the request holds no records"));
    }
    let max_records = app.config.limits.max_records_per_request;
    if values.len() > max_records {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_records",
            format!(
                "{} records in one request; at most {max_records} (audit.limits.max_records_per_request)",
                values.len()
            ),
        ));
    }

    let received_at = Utc::now();
    let single = framing == Framing::Json && values.len() == 1 && text.trim_start().starts_with('{');
    let parsed: Vec<Result<Interaction, FieldError>> =
        values.into_iter().map(|v| v.and_then(|v| parse_record(v, received_at))).collect();
    if single {
        if let Some(Err(e)) = parsed.first() {
            return Err(invalid(e));
        }
    }
    let mut response = IngestResponse { accepted: 0, rejected: 0, results: Vec::with_capacity(parsed.len()) };
    let mut valid: Vec<(usize, Interaction)> = Vec::with_capacity(parsed.len());
    for (index, outcome) in parsed.into_iter().enumerate() {
        match outcome {
            Ok(record) => {
                response.results.push(RecordResult {
                    index,
                    interaction_id: Some(record.interaction_id),
                    status: "accepted".into(),
                    error: None,
                });
                valid.push((index, record));
            }
            Err(e) => {
                response.rejected += 1;
                response.results.push(RecordResult {
                    index,
                    interaction_id: None,
                    status: "rejected".into(),
                    error: Some(invalid(&e).body()),
                });
            }
        }
    }
    if valid.is_empty() {
        let error =
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "all_rejected", "every record was rejected; see results");
        return Ok(results_with_error(&response, error));
    }
    let not_durable = match app.config.pipeline.ack {
        AckMode::Queued => {
            response.accepted = valid.len();
            for (_, record) in valid {
                app.logger.log(record);
            }
            0
        }
        AckMode::Durable => acknowledge_durably(&app, valid, &mut response).await,
    };
    if not_durable > 0 {
        // Some records are not safe: the client should send them again (with their
        // interaction_id, re-sending what did get stored is harmless).
        let error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_durable",
            format!("{not_durable} record(s) could not be stored durably; see results and retry them"),
        );
        return Ok(results_with_error(&response, error));
    }
    Ok((StatusCode::ACCEPTED, Json(response)).into_response())
}

/// An error answer that still carries the per-record results.
fn results_with_error(response: &IngestResponse, error: ApiError) -> Response {
    let mut body = serde_json::to_value(response).unwrap_or_default();
    body["error"] = serde_json::to_value(error.body()).unwrap_or_default();
    (error.status, Json(body)).into_response()
}

/// Waits until every record is fsync'd in the spool or committed, within
/// `async.ack_timeout`. Marks the ones that are not as `failed`; returns how many.
async fn acknowledge_durably(app: &AppState, valid: Vec<(usize, Interaction)>, response: &mut IngestResponse) -> usize {
    let indexes: Vec<usize> = valid.iter().map(|(i, _)| *i).collect();
    let all = futures::future::join_all(valid.into_iter().map(|(_, record)| app.logger.log_durable(record)));
    let outcomes: Vec<Result<(), ErrorBody>> = match tokio::time::timeout(app.config.pipeline.ack_timeout, all).await {
        Ok(outcomes) => outcomes
            .into_iter()
            .map(|o| {
                o.map(|_| ())
                    .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.reason.as_str(), e.detail).body())
            })
            .collect(),
        Err(_) => {
            let body = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ack_timeout",
                format!(
                    "not stored durably within {:?} (audit.async.ack_timeout); it may still be stored",
                    app.config.pipeline.ack_timeout
                ),
            )
            .body();
            indexes.iter().map(|_| Err(body.clone())).collect()
        }
    };
    let mut failed = 0;
    for (index, outcome) in indexes.into_iter().zip(outcomes) {
        match outcome {
            Ok(()) => response.accepted += 1,
            Err(error) => {
                failed += 1;
                let result = &mut response.results[index];
                result.status = "failed".into();
                result.error = Some(error);
            }
        }
    }
    failed
}

/// Replaces `\uD800`–`\uDFFF` escapes that are not a valid surrogate pair with
/// `\uFFFD`. JSON parsers refuse them, yet Python's `json.dumps` writes them for bytes
/// it could not decode (tool output often has some); like invalid UTF-8, they are
/// replaced rather than costing the record. serde_json has no lenient mode for this.
fn replace_lone_surrogates(text: &str) -> std::borrow::Cow<'_, str> {
    fn hex4(b: &[u8]) -> Option<u16> {
        let s = std::str::from_utf8(b.get(..4)?).ok()?;
        u16::from_str_radix(s, 16).ok()
    }
    let is_high = |u: u16| (0xD800..0xDC00).contains(&u);
    let is_low = |u: u16| (0xDC00..0xE000).contains(&u);
    let bytes = text.as_bytes();
    if !text.contains("\\u") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut i, mut in_string) = (0, 0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                in_string = !in_string;
                i += 1;
            }
            b'\\' if in_string => {
                if bytes.get(i + 1) == Some(&b'u') {
                    if let Some(unit) = hex4(&bytes[i + 2..]) {
                        let paired = is_high(unit)
                            && bytes.get(i + 6) == Some(&b'\\')
                            && bytes.get(i + 7) == Some(&b'u')
                            && hex4(&bytes[(i + 8).min(bytes.len())..]).is_some_and(is_low);
                        if paired {
                            i += 12;
                            continue;
                        }
                        if is_high(unit) || is_low(unit) {
                            out.push_str(&text[copied..i]);
                            out.push_str("\\uFFFD");
                            i += 6;
                            copied = i;
                            continue;
                        }
                    }
                }
                // Any other escape: skip the backslash and the escaped character.
                i += 2;
            }
            _ => i += 1,
        }
    }
    out.push_str(&text[copied.min(text.len())..]);
    std::borrow::Cow::Owned(out)
}

fn invalid(e: &FieldError) -> ApiError {
    let err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_record", e.to_string());
    if e.field.is_empty() {
        err
    } else {
        err.with_field(e.field.clone())
    }
}
