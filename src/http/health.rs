//! `GET /healthz`: liveness.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::json;

use crate::callback_auth::{CallbackAuthenticator, CallbackSource};
use crate::http::AppState;
use crate::service::OperationService;

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(get_health))
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
