//! `GET /healthz`: liveness. `GET /readyz`: readiness — the store commits, and the callback
//! signing keys are loaded (or load now); `503` naming what is not ready otherwise.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;

use crate::callback_auth::{CallbackAuthenticator, CallbackSource};
use crate::http::AppState;
use crate::service::OperationService;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(get_health))
        .route("/readyz", get(get_ready))
}

async fn get_health(
    State(service): State<OperationService>,
    State(callback_auth): State<CallbackAuthenticator>,
) -> axum::Json<serde_json::Value> {
    let stats = service.store().stats();
    axum::Json(json!({
        "status": "ok",
        "operations": stats.operations,
        "parkedCallbacks": stats.parked,
        "longPolls": stats.waiting,
        "callbacksRefused": {
            "acs": callback_auth.rejected(CallbackSource::Acs),
            "graph": callback_auth.rejected(CallbackSource::Graph),
        },
    }))
}

/// How long the store's readiness probe may take.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn get_ready(
    State(service): State<OperationService>,
    State(callback_auth): State<CallbackAuthenticator>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let (store, acs, graph) = tokio::join!(
        service.store_ready(STORE_PROBE_TIMEOUT),
        callback_auth.ready(CallbackSource::Acs),
        callback_auth.ready(CallbackSource::Graph),
    );
    let mut problems = Vec::new();
    if let Err(reason) = &store {
        problems.push(format!("store: {reason}"));
    }
    for (name, ready) in [("ACS", acs), ("Graph", graph)] {
        if !ready {
            problems.push(format!(
                "{name} callback signing keys: not loaded and cannot be loaded now"
            ));
        }
    }
    let keys = |ready: bool| if ready { "ok" } else { "unavailable" };
    let checks = json!({
        "store": store.as_ref().map_or_else(|reason| reason.as_str(), |()| "ok"),
        "callbackKeys": { "acs": keys(acs), "graph": keys(graph) },
        "configuration": "ok",
    });
    if problems.is_empty() {
        (
            StatusCode::OK,
            axum::Json(json!({ "status": "ready", "checks": checks })),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "status": "notReady",
                "error": { "code": "NotReady", "message": problems.join("; ") },
                "checks": checks,
            })),
        )
    }
}
