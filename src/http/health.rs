//! `GET /healthz`: liveness. `GET /readyz`: readiness — the store commits, and the callback
//! signing keys are loaded (or load now); `503` naming what is not ready otherwise.
//! `GET /metrics`: Prometheus metrics ([`crate::metrics`]), open like the probes.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::callback_auth::{CallbackAuthenticator, CallbackSource};
use crate::http::AppState;
use crate::metrics::{self, Metrics, Snapshot};
use crate::service::OperationService;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(get_health))
        .route("/readyz", get(get_ready))
        .route("/metrics", get(get_metrics))
}

/// Liveness, with store and callback counts.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "getHealth",
    responses((status = 200, description = "Alive", body = serde_json::Value))
)]
pub(crate) async fn get_health(
    State(service): State<OperationService>,
    State(callback_auth): State<CallbackAuthenticator>,
    State(metrics): State<Metrics>,
) -> axum::Json<serde_json::Value> {
    let stats = service.store_stats();
    let mut health = json!({
        "status": "ok",
        "operations": stats.operations,
        "parkedCallbacks": stats.parked,
        "longPolls": stats.waiting,
        "callbacksRefused": {
            "acs": callback_auth.rejected(CallbackSource::Acs),
            "graph": callback_auth.rejected(CallbackSource::Graph),
        },
        "callbacksDuplicate": {
            "acs": metrics.duplicate_callbacks("acs"),
            "graph": metrics.duplicate_callbacks("graph"),
        },
    });
    if let Some(conflicts) = service.store_conflicts() {
        // Transitions rerun because another request (or replica) changed what they read.
        health["storeConflicts"] = json!(conflicts);
    }
    axum::Json(health)
}

/// Prometheus metrics in OpenMetrics text.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "getMetrics",
    responses(
        (status = 200, description = "Every metric", body = String,
            content_type = "application/openmetrics-text"),
        (status = 500, description = "The metrics could not be encoded"),
    )
)]
pub(crate) async fn get_metrics(
    State(metrics): State<Metrics>,
    State(service): State<OperationService>,
    State(callback_auth): State<CallbackAuthenticator>,
    State(webhooks): State<crate::webhooks::Webhooks>,
    headers: axum::http::HeaderMap,
) -> Response {
    let store = service.store_stats();
    let (webhook_pending, webhook_oldest_pending_seconds) = webhooks.pending();
    let journal = service.journal_stats();
    let snapshot = Snapshot {
        operations_in_memory: store.operations as u64,
        parked_callbacks: store.parked as u64,
        parked_callbacks_expired: store.parked_expired,
        long_poll_waiters: store.waiting as u64,
        store_transactions: journal.transactions,
        store_records: journal.records,
        store_largest_batch: journal.largest_batch,
        store_commit_seconds: journal.commit_time.as_secs_f64(),
        key_fetches_acs: callback_auth.keys(CallbackSource::Acs).fetches(),
        key_fetches_graph: callback_auth.keys(CallbackSource::Graph).fetches(),
        graph_token_fetches: service.graph_token_fetches(),
        operations_started: store.started,
        operations_settled: store.settled,
        webhook_pending,
        webhook_oldest_pending_seconds,
    };
    // OpenMetrics unless the scraper asks for the classic text format only.
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let classic = accept.contains("text/plain") && !accept.contains("application/openmetrics-text");
    match metrics.encode(snapshot) {
        Ok(text) if classic => (
            [(header::CONTENT_TYPE, metrics::PROMETHEUS_CONTENT_TYPE)],
            metrics::to_prometheus_text(&text),
        )
            .into_response(),
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// How long the store's readiness probe may take.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness: the store commits and the callback signing keys are loaded.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "getReady",
    responses(
        (status = 200, description = "Ready, with per-check `checks`", body = serde_json::Value),
        (status = 503, description = "Not ready: `error.message` names what, `checks` per check",
            body = serde_json::Value),
    )
)]
pub(crate) async fn get_ready(
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
