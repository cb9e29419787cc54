//! The HTTP edge: shared state, the router and its middleware. Handlers stay thin: they
//! extract, call the service once, and map the result. They never touch DashMap or reqwest.

pub mod callbacks;
pub mod health;
pub mod operations;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::http::{HeaderName, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::callback_auth::CallbackAuthenticator;
use crate::error::{ApiError, error_response};
use crate::service::OperationService;

/// The request id header, set when absent and echoed on the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-request-id");

/// Everything handlers may use; each field is a cheap handle.
#[derive(Clone, FromRef)]
pub struct AppState {
    pub service: OperationService,
    pub callback_auth: CallbackAuthenticator,
    pub limits: ApiLimits,
}

/// Bounds of the client API.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    pub max_wait: Duration,
    pub retry_after_secs: u64,
    pub page_size: usize,
    pub page_size_max: usize,
}

/// The whole application.
pub fn router(state: AppState, body_limit: usize, request_timeout: Duration) -> Router {
    // Outermost first: the request id exists before the span that logs it; the timeout and
    // panic guard sit inside, so their answers carry the id too.
    let middleware = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let request_id = request
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request.id = %request_id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "the server failed to handle the request".to_owned(),
            )
        }));
    Router::new()
        .merge(operations::router())
        .merge(callbacks::router())
        .merge(health::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".to_owned())
}

async fn method_not_allowed() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "this method is not allowed on this route".to_owned(),
    )
    .into_response()
}
