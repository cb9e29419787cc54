//! The operations page (`/ui`) and the service's front door (`GET /`). The page's three files
//! are compiled into the binary: no build step, no CDN, so it works on a closed network.
//! They load from this origin only (a strict Content-Security-Policy) and read the client
//! API with the key the person gives, kept in the browser's session storage.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::error::ApiError;
use crate::http::AppState;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// Same-origin scripts, styles and requests only; no inline script, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(front_door))
        .route("/ui", get(page))
        .route("/ui/{file}", get(asset))
}

/// Links to the page and the documents: HTML for a browser, JSON for anything else.
#[utoipa::path(
    get,
    path = "/",
    tag = "ui",
    operation_id = "getIndex",
    responses((status = 200, description = "Links to the operations page, the OpenAPI document and the probes (HTML when `Accept` asks for it, JSON otherwise)", body = serde_json::Value))
)]
pub(crate) async fn front_door(headers: HeaderMap) -> Response {
    let html = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if html {
        return static_file(
            "text/html; charset=utf-8",
            concat!(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
                "<meta name=\"color-scheme\" content=\"light dark\"><title>callops</title></head>",
                "<body><main><h1>callops</h1><ul>",
                "<li><a href=\"/ui\">Operations page</a></li>",
                "<li><a href=\"/openapi.json\">OpenAPI document</a></li>",
                "<li><a href=\"/healthz\">Health</a></li>",
                "</ul></main></body></html>"
            ),
        );
    }
    axum::Json(json!({
        "name": "callops",
        "version": env!("CARGO_PKG_VERSION"),
        "links": {
            "ui": "/ui",
            "openapi": "/openapi.json",
            "health": "/healthz",
            "ready": "/readyz",
            "metrics": "/metrics",
        },
    }))
    .into_response()
}

/// The operations page.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "ui",
    operation_id = "getOperationsPage",
    responses((status = 200, description = "The operations page", body = String, content_type = "text/html"))
)]
pub(crate) async fn page() -> Response {
    static_file("text/html; charset=utf-8", INDEX_HTML)
}

/// The page's script and style sheet.
#[utoipa::path(
    get,
    path = "/ui/{file}",
    tag = "ui",
    operation_id = "getOperationsPageAsset",
    params(("file" = String, Path, description = "`app.js` or `app.css`")),
    responses(
        (status = 200, description = "The file", body = String),
        (status = 404, description = "No such file", body = crate::error::ErrorBody)
    )
)]
pub(crate) async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    match file.as_str() {
        "app.js" => Ok(static_file("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Ok(static_file("text/css; charset=utf-8", APP_CSS)),
        _ => Err(ApiError::NotFound("no such file of the page".to_owned())),
    }
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Served from the binary: a new build brings new files, so browsers revalidate.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}
