//! The read routes: list, one interaction, a session, dead letters, stats, overview and
//! export. Parameters are parsed by `query` (unknown or bad ones are a 400 naming the
//! parameter); the handlers only shape responses.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use futures::StreamExt;

use super::{ApiError, AppState};
use crate::export;
use crate::model::id_from_key;
use crate::query::{self, ListRequest, ParamError, Params, QueryError};

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", e.to_string()).with_field(e.field)
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Param(e) => e.into(),
            QueryError::Store(e) => e.into(),
        }
    }
}

/// `GET /api/v1/interactions`: a page of interactions, newest first.
pub(super) async fn list(State(app): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let request = ListRequest::from_params(Params::from_query(q.as_deref()))?;
    Ok(Json(query::list(app.store.as_ref(), &request).await?).into_response())
}

/// `GET /api/v1/interactions/{id}`: one interaction in full.
pub(super) async fn interaction(
    State(app): State<AppState>,
    Path(key): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    Params::from_query(q.as_deref()).finish()?;
    let record = app.store.get_interaction(id_from_key(&key)).await?;
    Ok(Json(record).into_response())
}

/// `GET /api/v1/sessions/{id}`: the session and its interactions in time order.
pub(super) async fn session(
    State(app): State<AppState>,
    Path(key): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let limit = query::session_limit(Params::from_query(q.as_deref()))?;
    Ok(Json(query::session(app.store.as_ref(), &key, limit).await?).into_response())
}

/// `GET /api/v1/dead-letters`: refused records, newest first.
pub(super) async fn dead_letters(State(app): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let page = query::dead_letters(app.store.as_ref(), Params::from_query(q.as_deref())).await?;
    Ok(Json(page).into_response())
}

/// `GET /api/v1/anomalies`: what the anomaly job found, newest window first.
pub(super) async fn anomalies(State(app): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let page = query::anomalies(app.store.as_ref(), Params::from_query(q.as_deref())).await?;
    Ok(Json(page).into_response())
}

/// `GET /api/v1/stats`: aggregates by a column, optionally per time bucket.
pub(super) async fn stats(State(app): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let request = query::stats_request(Params::from_query(q.as_deref()))?;
    Ok(Json(query::stats(app.store.as_ref(), &request).await?).into_response())
}

/// `GET /api/v1/stats/overview`: most used, failing and slowest tools, busiest users
/// and clusters, frequent questions.
pub(super) async fn overview(State(app): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let (filter, top) = query::overview_request(Params::from_query(q.as_deref()))?;
    Ok(Json(query::overview(app.store.as_ref(), &filter, top).await?).into_response())
}

/// `GET /api/v1/export?format=…`: every matching interaction, streamed as it is read.
///
/// The status line goes out before the last row is read, so a database failure midway
/// cannot become an error status: the body is cut off instead (the chunked encoding
/// ends without its terminator), which every HTTP client reports as an incomplete
/// download rather than a short file that looks whole.
pub(super) async fn export(State(app): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let (filter, format) = query::export_request(Params::from_query(q.as_deref()))?;
    let Ok(permit) = app.exports.clone().try_acquire_owned() else {
        let busy = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_exports",
            format!("{} exports are already running; try again when one has finished", super::MAX_CONCURRENT_EXPORTS),
        );
        return Ok(([(header::RETRY_AFTER, "10")], busy).into_response());
    };
    let file_name = export::file_name(format, chrono::Utc::now());
    let body = export::encode_stream(app.store.export(&filter), format).map(move |chunk| {
        // The permit lives as long as the body: released when the download ends or the
        // client goes away.
        let _running = &permit;
        chunk.inspect_err(|e| tracing::error!(error = %e, "export failed midway; the download is cut off"))
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    if let Ok(disposition) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    Ok(response)
}
