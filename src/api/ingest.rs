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
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

use super::{ApiError, AppState, ErrorBody};
use crate::config::AckMode;
use crate::ingest::{self, FieldError, IngestError};
use crate::model::Interaction;

/// Time kept free before `audit.limits.request_timeout` to build and send the answer of
/// a request whose records were still waiting for a durable acknowledgement.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);

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

/// What became of one record of a request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    /// Taken: safe (durable mode) or queued (queued mode).
    Accepted,
    /// Invalid: fix it before sending again.
    Rejected,
    /// Valid, but not stored durably: send it again.
    Failed,
}

/// What happened to one record of a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordResult {
    /// Position in the request (array index or NDJSON record number), from 0.
    pub index: usize,
    /// The stored id, when accepted.
    pub interaction_id: Option<Uuid>,
    /// What became of it.
    pub status: RecordStatus,
    /// Why it was rejected or failed.
    pub error: Option<ErrorBody>,
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        let status = match e {
            IngestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::BodyTooLarge { .. } | IngestError::TooManyRecords { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Malformed(_) | IngestError::NotRecords | IngestError::Empty => StatusCode::BAD_REQUEST,
        };
        let error = ApiError::new(status, e.code(), e.to_string());
        match e {
            IngestError::UnsupportedMediaType(_) => error.with_field("content-type"),
            _ => error,
        }
    }
}

fn invalid(e: &FieldError) -> ApiError {
    let err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_record", e.to_string());
    if e.field.is_empty() {
        err
    } else {
        err.with_field(e.field.clone())
    }
}

/// The ingest handler.
pub async fn post_interactions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The request timeout started about now too (its layer called this handler).
    let started = Instant::now();
    if !app.logger.is_enabled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_disabled",
            "auditing is disabled (audit.enabled: false); records are not accepted",
        ));
    }
    if !app.logger.has_spool() && !app.logger.is_store_ready() {
        // Without a spool there is nowhere safe to keep records until the database is
        // reached: refuse them so the producer keeps and resends them.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database has not been reached yet and there is no spool (audit.spool.enabled); retry later",
        ));
    }
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("(not text)"));
    let framing = ingest::framing_of(content_type)?;
    let limit = app.config.limits.max_body_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(IngestError::BodyTooLarge { limit }.into());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over_limit = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .any(|e| e.is::<http_body_util::LengthLimitError>());
        if over_limit {
            IngestError::BodyTooLarge { limit }.into()
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "body_unreadable", format!("could not read request body: {e}"))
        }
    })?;
    let parsed = ingest::parse_body(framing, &bytes, Utc::now(), &app.config.limits)?;
    if parsed.single {
        if let Some(Err(e)) = parsed.records.first() {
            return Err(invalid(e));
        }
    }
    let mut response = IngestResponse { accepted: 0, rejected: 0, results: Vec::with_capacity(parsed.records.len()) };
    let mut valid: Vec<(usize, Interaction)> = Vec::with_capacity(parsed.records.len());
    for (index, outcome) in parsed.records.into_iter().enumerate() {
        match outcome {
            Ok(record) => {
                response.results.push(RecordResult {
                    index,
                    interaction_id: Some(record.interaction_id),
                    status: RecordStatus::Accepted,
                    error: None,
                });
                valid.push((index, record));
            }
            Err(e) => {
                response.rejected += 1;
                response.results.push(RecordResult {
                    index,
                    interaction_id: None,
                    status: RecordStatus::Rejected,
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
        AckMode::Durable => acknowledge_durably(&app, started, valid, &mut response).await,
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
/// `async.ack_timeout` and before the request's own timeout (`started` +
/// `limits.request_timeout`). Marks the ones that are not as `failed`; returns how many.
async fn acknowledge_durably(
    app: &AppState,
    started: Instant,
    valid: Vec<(usize, Interaction)>,
    response: &mut IngestResponse,
) -> usize {
    let indexes: Vec<usize> = valid.iter().map(|(i, _)| *i).collect();
    let all = futures::future::join_all(valid.into_iter().map(|(_, record)| app.logger.log_durable(record)));
    let ack_timeout = app.config.pipeline.ack_timeout;
    // Stop waiting early enough that the per-record answer goes out, rather than a bare
    // 408 that tells the producer nothing about which records are safe.
    let request_timeout = app.config.limits.request_timeout;
    let request_deadline = started + request_timeout - ANSWER_MARGIN.min(request_timeout / 4);
    let (deadline, limit) = if Instant::now() + ack_timeout <= request_deadline {
        (Instant::now() + ack_timeout, format!("{ack_timeout:?} (audit.async.ack_timeout)"))
    } else {
        (request_deadline, format!("{request_timeout:?} (audit.limits.request_timeout)"))
    };
    let outcomes: Vec<Result<(), ErrorBody>> = match tokio::time::timeout_at(deadline, all).await {
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
                format!("not stored durably within {limit}; it may still be stored"),
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
                result.status = RecordStatus::Failed;
                result.error = Some(error);
            }
        }
    }
    failed
}
