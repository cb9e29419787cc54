//! The HTTP edge: shared state, the router and its middleware. Handlers stay thin: they
//! extract, call the service once, and map the result. They never touch DashMap or reqwest.

pub mod api_keys;
pub mod callbacks;
mod edge;
pub mod health;
pub mod openapi;
pub mod operations;
pub mod serve;
pub mod stream;
pub mod subscriptions;
pub mod ui;

use std::time::Duration;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath};
use axum::http::{HeaderName, Request, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::callback_auth::CallbackAuthenticator;
use crate::config::{ConfigError, HttpConfig};
use crate::error::{ApiError, error_response};
use crate::http::api_keys::ApiKeys;
use crate::http::stream::StreamHub;
use crate::metrics::Metrics;
use crate::service::OperationService;
use crate::telemetry::LogBudget;
use crate::webhooks::Webhooks;

/// The request id header, set when absent and echoed on the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-request-id");

/// The client's own request id (Azure's convention): logged and echoed on the response.
pub const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");

/// Everything handlers may use; each field is a cheap handle.
#[derive(Clone, FromRef)]
pub struct AppState {
    pub service: OperationService,
    pub callback_auth: CallbackAuthenticator,
    pub metrics: Metrics,
    pub limits: ApiLimits,
    pub webhooks: Webhooks,
    pub stream: StreamHub,
}

/// Bounds of the client API.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    pub max_wait: Duration,
    pub retry_after_secs: u64,
    pub page_size: usize,
    pub page_size_max: usize,
}

/// The whole application. The client API (`/v1`) sits behind the API keys of `http`, when
/// any are configured; health and callbacks do not.
/// At most this many access-log lines a second; a flood is counted, not written.
const ACCESS_LOG_PER_SECOND: u64 = 100;

pub fn router(state: AppState, http: &HttpConfig, access_log: bool) -> Result<Router, ConfigError> {
    let keys = http.api_keys()?;
    if keys.is_empty() {
        tracing::warn!(
            "CALLOPS_API_KEYS is empty: the client API (/v1) is open to anyone who can reach it"
        );
    } else {
        tracing::info!(
            api_keys = keys.len(),
            "the client API (/v1) requires an API key"
        );
    }
    // Outermost first: credentials are hidden from anything that logs headers; a client's
    // request id is kept only when it is a sane one, and one exists before the span that
    // logs it; the deadline and panic guard sit inside, so their answers carry the id too.
    let access_budget = Arc::new(LogBudget::per_second(ACCESS_LOG_PER_SECOND));
    let middleware = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            api_keys::API_KEY,
        ]))
        .map_request(drop_unusable_request_id)
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let header = |name| {
                        request
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                    };
                    let route = request
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("", MatchedPath::as_str);
                    tracing::info_span!(
                        "http",
                        method = %request.method(),
                        route = %route,
                        path = %request.uri().path(),
                        request.id = %header(REQUEST_ID),
                        client_request.id = %header(CLIENT_REQUEST_ID),
                    )
                })
                // A 5xx is in the access line; the store's own failure is logged within a budget
                // where it happens, so the layer's own error line per 5xx would double it.
                .on_failure(())
                .on_response(
                    move |response: &Response, latency: std::time::Duration, _: &tracing::Span| {
                        if access_log && access_budget.allow() {
                            tracing::info!(
                                status = response.status().as_u16(),
                                latency_us = latency.as_micros() as u64,
                                "request"
                            );
                        }
                    },
                ),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(edge::EdgeLayer::new(
            http.request_timeout(),
            http.body_read_timeout(),
            http.max_slow_bodies,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "the server failed to handle the request".to_owned(),
            )
        }));
    // The key check wraps the whole of /v1, its own 404 and 405 included: without a key,
    // nothing under /v1 is revealed.
    let client_api = operations::router()
        .route(
            "/operations:stream",
            axum::routing::get(stream::stream_operations),
        )
        .merge(subscriptions::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(
            ApiKeys::new(&keys),
            api_keys::require_api_key,
        ));
    Ok(Router::new()
        .nest("/v1", client_api)
        .merge(callbacks::router())
        .merge(health::router())
        .merge(openapi::router())
        .merge(ui::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(http.body_limit_bytes))
        .layer(middleware)
        .with_state(state))
}

/// The longest request id a client may choose (it is logged and echoed).
const MAX_REQUEST_ID_LEN: usize = 128;

/// True for one request id of at most [`MAX_REQUEST_ID_LEN`] letters, digits and `-_.:`.
fn usable_request_id(value: &axum::http::HeaderValue) -> bool {
    let id = value.as_bytes();
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Drops a client's `x-ms-request-id` and `x-ms-client-request-id` unless each is one usable
/// value ([`usable_request_id`]); a fresh `x-ms-request-id` replaces the first.
fn drop_unusable_request_id<B>(mut request: Request<B>) -> Request<B> {
    for name in [REQUEST_ID, CLIENT_REQUEST_ID] {
        let mut values = request.headers().get_all(&name).iter();
        let keep = match (values.next(), values.next()) {
            (None, _) => true,
            (Some(value), None) => usable_request_id(value),
            (Some(_), Some(_)) => false,
        };
        if !keep {
            request.headers_mut().remove(&name);
        }
    }
    request
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
