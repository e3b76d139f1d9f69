//! The read routes: list, one interaction, a session, dead letters, stats, overview and
//! export. Parameters are parsed by `query` (unknown or bad ones are a 400 naming the
//! parameter); the handlers only shape responses.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{ApiError, AppState};
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
