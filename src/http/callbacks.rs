//! `POST /callbacks/acs`: ACS CloudEvent deliveries. Authenticate, decode, hand over, answer.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;

use crate::acs::events;
use crate::callback_auth::{CallbackAuthenticator, CallbackSource};
use crate::error::ApiError;
use crate::http::AppState;
use crate::service::{DeliverySummary, OperationService};

pub fn router() -> Router<AppState> {
    Router::new().route("/callbacks/acs", post(receive_acs_callback))
}

/// Content-Type is not checked: upstreams send odd charsets, and the body is verified and
/// decoded on its own terms.
async fn receive_acs_callback(
    State(auth): State<CallbackAuthenticator>,
    State(service): State<OperationService>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::Json<DeliverySummary>, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    })?;
    let verified = auth
        .verify(CallbackSource::Acs, &headers, &body)
        .map_err(|error| ApiError::Unauthorized(error.to_string()))?;
    let events = events::decode(verified.bytes())
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    Ok(axum::Json(service.deliver_acs(events)))
}
