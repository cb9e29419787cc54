//! `POST /callbacks/acs` (ACS CloudEvents) and `POST /callbacks/graph` (Graph
//! commsNotifications): authenticate, decode, hand over, answer.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use time::OffsetDateTime;

use crate::acs::events;
use crate::callback_auth::{AuthError, CallbackAuthenticator, CallbackSource};
use crate::error::ApiError;
use crate::graph::notifications;
use crate::http::AppState;
use crate::service::{DeliverySummary, OperationService};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/callbacks/acs", post(receive_acs_callback))
        .route("/callbacks/graph", post(receive_graph_callback))
}

/// Content-Type is not checked: upstreams send odd charsets, and the body is decoded on its
/// own terms once the request is authenticated (401 otherwise, 503 while the signing keys
/// cannot be loaded, so the platform retries).
async fn receive_acs_callback(
    State(auth): State<CallbackAuthenticator>,
    State(service): State<OperationService>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::Json<DeliverySummary>, ApiError> {
    let body = body.map_err(body_error)?;
    let verified = auth
        .verify(CallbackSource::Acs, &headers, query.as_deref(), &body)
        .await
        .map_err(refused)?;
    let events = events::decode(verified.bytes())
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    Ok(axum::Json(service.deliver_acs(events)))
}

/// `POST /callbacks/graph`: Graph `commsNotifications`. Answered `202 Accepted` (what Graph
/// expects) with the same counts as the ACS endpoint.
async fn receive_graph_callback(
    State(auth): State<CallbackAuthenticator>,
    State(service): State<OperationService>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, axum::Json<DeliverySummary>), ApiError> {
    let body = body.map_err(body_error)?;
    let verified = auth
        .verify(CallbackSource::Graph, &headers, query.as_deref(), &body)
        .await
        .map_err(refused)?;
    let events = notifications::decode(verified.bytes(), OffsetDateTime::now_utc())
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(service.deliver_graph(events)),
    ))
}

fn refused(error: AuthError) -> ApiError {
    if error.is_unavailable() {
        ApiError::Unavailable(error.to_string())
    } else {
        ApiError::Unauthorized(error.to_string())
    }
}

fn body_error(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        ApiError::BadRequest(rejection.body_text())
    }
}
