//! `GET /openapi.json`: the OpenAPI 3 document of every route, generated from the handlers'
//! `#[utoipa::path]` annotations and the models' `ToSchema` derives. Open, like `/healthz`.

use std::sync::OnceLock;

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::http::AppState;
use crate::http::{callbacks, health, operations, stream, subscriptions, ui};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "callops",
        description = "Call-control operations on Azure Communication Services and Microsoft \
            Graph, correlated with their callbacks. Every error has the body \
            `{\"error\": {\"code\", \"message\"}}`; a method a route does not have is answered \
            `405` with it."
    ),
    paths(
        operations::create_removal,
        operations::create_cancel,
        operations::get_operation,
        operations::list_operations,
        operations::list_call_events,
        operations::list_graph_call_events,
        stream::stream_operations,
        subscriptions::create_subscription,
        subscriptions::list_subscriptions,
        subscriptions::get_subscription,
        subscriptions::delete_subscription,
        subscriptions::rotate_secret_doc,
        subscriptions::enable_doc,
        subscriptions::list_deliveries,
        subscriptions::get_delivery,
        subscriptions::redeliver,
        callbacks::receive_acs_callback,
        callbacks::receive_graph_callback,
        health::get_health,
        health::get_ready,
        health::get_metrics,
        get_openapi,
        ui::front_door,
        ui::page,
        ui::asset,
    ),
    components(schemas(crate::error::ErrorBody, crate::correlation::DeliverySummary)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "acs", description = "Azure Communication Services call automation"),
        (name = "graph", description = "Microsoft Graph calls"),
        (name = "operations", description = "Operations, whichever platform"),
        (name = "webhooks", description = "Signed completion webhooks (Standard Webhooks): subscriptions and their delivery logs"),
        (name = "callbacks", description = "Callbacks from the platforms (bearer JWT they sign)"),
        (name = "health", description = "Probes, metrics and this document: no credentials"),
        (name = "ui", description = "The operations page for people, and links to the rest: no credentials (the page asks for an API key when the client API needs one)"),
    )
)]
pub struct ApiDoc;

/// The client API's keys (`api-key` header or `Authorization: Bearer`), and the platforms'
/// signed callback tokens.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "api-key",
                "One of CALLOPS_API_KEYS (when any is configured)",
            ))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("One of CALLOPS_API_KEYS as a bearer token"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "callbackJwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("The JWT the platform signs each callback with"))
                    .build(),
            ),
        );
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(get_openapi))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    operation_id = "getOpenApi",
    responses((status = 200, description = "The OpenAPI 3 document", body = serde_json::Value))
)]
pub(crate) async fn get_openapi() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let document = DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the document serializes")
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.as_str(),
    )
        .into_response()
}
