//! `POST /callbacks/acs` (ACS CloudEvents) and `POST /callbacks/graph` (Graph
//! commsNotifications): authenticate, decode, hand over, answer.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::routing::post;
use time::OffsetDateTime;

use crate::acs::events;
use crate::callback_auth::{AuthError, CallbackAuthenticator, CallbackSource, Verified};
use crate::correlation::DeliverySummary;
use crate::error::{ApiError, ErrorBody};
use crate::graph::notifications;
use crate::http::AppState;
use crate::service::OperationService;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/callbacks/acs", post(receive_acs_callback))
        .route("/callbacks/graph", post(receive_graph_callback))
}

/// Content-Type is not checked: upstreams send odd charsets, and the body is decoded on its
/// own terms once the request is authenticated (401 otherwise, 503 while the signing keys
/// cannot be loaded, so the platform retries).
#[utoipa::path(
    post,
    path = "/callbacks/acs",
    tag = "callbacks",
    operation_id = "receiveAcsCallback",
    request_body(content = serde_json::Value, content_type = "application/json",
        description = "ACS CloudEvents: a JSON array, or a single event"),
    responses(
        (status = 200, description = "Counts of what became of the events", body = DeliverySummary),
        (status = 400, description = "The body is not a callback this endpoint decodes", body = ErrorBody),
        (status = 401, description = "The callback token is missing or not valid", body = ErrorBody),
        (status = 413, description = "The body is larger than the limit", body = ErrorBody),
        (status = 503, description = "The signing keys cannot be loaded, or the effects could not be stored: retry", body = ErrorBody)
    ),
    security(("callbackJwt" = []))
)]
pub(crate) async fn receive_acs_callback(
    State(auth): State<CallbackAuthenticator>,
    State(service): State<OperationService>,
    request: Request,
) -> Result<axum::Json<DeliverySummary>, ApiError> {
    let (verified, body) = authenticated_body(&auth, CallbackSource::Acs, request).await?;
    let events = events::decode(verified.body(&body).bytes())
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let summary = service.deliver_acs(events).await.map_err(not_stored)?;
    Ok(axum::Json(summary))
}

/// `POST /callbacks/graph`: Graph `commsNotifications`. Answered `202 Accepted` (what Graph
/// expects) with the same counts as the ACS endpoint.
#[utoipa::path(
    post,
    path = "/callbacks/graph",
    tag = "callbacks",
    operation_id = "receiveGraphCallback",
    request_body(content = serde_json::Value, content_type = "application/json",
        description = "Graph `commsNotifications`"),
    responses(
        (status = 202, description = "Counts of what became of the notifications", body = DeliverySummary),
        (status = 400, description = "The body is not a callback this endpoint decodes", body = ErrorBody),
        (status = 401, description = "The callback token is missing or not valid", body = ErrorBody),
        (status = 413, description = "The body is larger than the limit", body = ErrorBody),
        (status = 503, description = "The signing keys cannot be loaded, or the effects could not be stored: retry", body = ErrorBody)
    ),
    security(("callbackJwt" = []))
)]
pub(crate) async fn receive_graph_callback(
    State(auth): State<CallbackAuthenticator>,
    State(service): State<OperationService>,
    request: Request,
) -> Result<(StatusCode, axum::Json<DeliverySummary>), ApiError> {
    let (verified, body) = authenticated_body(&auth, CallbackSource::Graph, request).await?;
    let events = notifications::decode(verified.body(&body).bytes(), OffsetDateTime::now_utc())
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let summary = service.deliver_graph(events).await.map_err(not_stored)?;
    Ok((StatusCode::ACCEPTED, axum::Json(summary)))
}

/// Authenticates `request` from its headers and query, then reads its body (within the body
/// limit): the body of a request that fails authentication is never read.
async fn authenticated_body(
    auth: &CallbackAuthenticator,
    source: CallbackSource,
    request: Request,
) -> Result<(Verified, Bytes), ApiError> {
    let (parts, body) = request.into_parts();
    let verified = auth
        .verify(source, &parts.headers, parts.uri.query())
        .await
        .map_err(refused)?;
    let body = Bytes::from_request(Request::from_parts(parts, body), &())
        .await
        .map_err(body_error)?;
    Ok((verified, body))
}

/// The callback's effects could not be made durable: 503, so the platform retries.
fn not_stored(error: crate::service::DeliveryError) -> ApiError {
    crate::error::log_store_failure(&format_args!("callback not acknowledged: {error}"));
    ApiError::Unavailable(error.to_string())
}

fn refused(error: AuthError) -> ApiError {
    if error.is_unavailable() {
        ApiError::Unavailable(error.to_string())
    } else {
        ApiError::Unauthorized(error.to_string())
    }
}

fn body_error(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    rejection.into()
}
