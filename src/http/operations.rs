//! The client API: start a removal, read one operation (optionally long-polling), list
//! operations, read a call's events.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::acs::identifier::CommunicationIdentifier;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::graph::ids;
use crate::http::{ApiLimits, AppState};
use crate::operation::{CallRef, Operation, OperationId, OperationKind, OperationStatus};
use crate::service::{MAX_CONTEXT_LEN, OperationService};
use crate::store::ListFilter;
use crate::trace_context::{TRACEPARENT, TraceParent};

/// The longest call id accepted in a path or filter.
const MAX_CALL_ID_LEN: usize = 256;

/// The longest operation kind accepted in a filter.
const MAX_KIND_LEN: usize = 64;

/// The client API's routes, relative to `/v1` (where `http::router` nests them).
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/acs/callConnections/{callConnectionId}/participants:remove",
            post(create_removal),
        )
        .route(
            "/acs/callConnections/{callConnectionId}/events",
            get(list_call_events),
        )
        .route(
            "/graph/calls/{callId}/cancelMediaProcessing",
            post(create_cancel),
        )
        .route("/graph/calls/{callId}/events", get(list_graph_call_events))
        .route("/operations", get(list_operations))
        .route("/operations/{id}", get(get_operation))
}

/// Body of `participants:remove`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RemoveParticipantIn {
    participant_to_remove: CommunicationIdentifier,
    operation_context: Option<String>,
}

async fn create_removal(
    State(service): State<OperationService>,
    State(limits): State<ApiLimits>,
    ApiPath(call_connection_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RemoveParticipantIn>,
) -> Result<Response, ApiError> {
    check_call_id(&call_connection_id, "callConnectionId")?;
    let operation = service
        .start_remove_participant(
            call_connection_id,
            body.participant_to_remove,
            body.operation_context,
            traceparent(&headers),
        )
        .await?;
    Ok(accepted(operation, limits.retry_after_secs))
}

/// Body of `cancelMediaProcessing`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CancelMediaProcessingIn {
    client_context: Option<String>,
}

async fn create_cancel(
    State(service): State<OperationService>,
    State(limits): State<ApiLimits>,
    ApiPath(call_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CancelMediaProcessingIn>,
) -> Result<Response, ApiError> {
    check_call_id(&call_id, "callId")?;
    let operation = service
        .start_cancel_media_processing(call_id, body.client_context, traceparent(&headers))
        .await?;
    Ok(accepted(operation, limits.retry_after_secs))
}

/// The client's `traceparent`, when well-formed: passed on to the upstream request.
fn traceparent(headers: &HeaderMap) -> Option<TraceParent> {
    headers.get(TRACEPARENT).and_then(TraceParent::parse)
}

/// `202 Accepted` with `Operation-Location` and the operation.
fn accepted(operation: Operation, retry_after_secs: u64) -> Response {
    let location = format!("/v1/operations/{}", operation.id);
    let mut response = operation_response(operation, retry_after_secs);
    *response.status_mut() = StatusCode::ACCEPTED;
    response.headers_mut().insert(
        "operation-location",
        HeaderValue::from_str(&location).expect("ids are ASCII"),
    );
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    /// Seconds to wait for the operation to settle (capped).
    wait: Option<u64>,
}

async fn get_operation(
    State(service): State<OperationService>,
    State(limits): State<ApiLimits>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<GetQuery>,
) -> Result<Response, ApiError> {
    let operation_id = parse_operation_id(&id, "id")?;
    let unknown = || ApiError::NotFound(format!("operation {operation_id} does not exist"));
    let operation = match query.wait {
        Some(seconds) if seconds > 0 => {
            let wait = Duration::from_secs(seconds).min(limits.max_wait);
            service.wait(operation_id, wait).await
        }
        _ => service.get(operation_id),
    }
    .ok_or_else(unknown)?;
    Ok(operation_response(operation, limits.retry_after_secs))
}

fn operation_response(operation: Operation, retry_after_secs: u64) -> Response {
    let settled = operation.status.is_terminal();
    let mut response = axum::Json(operation).into_response();
    if !settled {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    }
    response
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    context: Option<String>,
    call_connection_id: Option<String>,
    call_id: Option<String>,
    status: Option<String>,
    kind: Option<String>,
    #[serde(rename = "maxpagesize")]
    max_page_size: Option<usize>,
    skip_token: Option<String>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Page<T> {
    value: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_link: Option<String>,
}

async fn list_operations(
    State(service): State<OperationService>,
    State(limits): State<ApiLimits>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<axum::Json<Page<Operation>>, ApiError> {
    let status = match &query.status {
        Some(text) => Some(OperationStatus::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "status: {text:.64} is not one of NotStarted, Running, Succeeded, Failed, Canceled"
            ))
        })?),
        None => None,
    };
    let before = match &query.skip_token {
        Some(token) => Some(parse_operation_id(token, "skipToken").map_err(|_| {
            ApiError::BadRequest("skipToken: not a token from nextLink".to_owned())
        })?),
        None => None,
    };
    check_filters(&query)?;
    let page_size = match query.max_page_size {
        Some(0) => {
            return Err(ApiError::BadRequest(
                "maxpagesize: must be at least 1".to_owned(),
            ));
        }
        Some(size) => size.min(limits.page_size_max),
        None => limits.page_size,
    };
    let filter = ListFilter {
        context: query.context.clone(),
        call_connection_id: query.call_connection_id.clone(),
        // Graph spells call ids two ways; the store keeps the canonical one.
        call_id: query
            .call_id
            .as_deref()
            .map(|id| ids::canonical(id).into_owned()),
        status,
        kind: query.kind.as_deref().map(OperationKind::from_name),
        before,
    };
    let (value, more) = service.list(&filter, page_size);
    let next_link = match value.last() {
        Some(last) if more => Some(next_link(&query, page_size, last.id)),
        _ => None,
    };
    Ok(axum::Json(Page { value, next_link }))
}

fn next_link(query: &ListQuery, page_size: usize, last: OperationId) -> String {
    let mut params = url::form_urlencoded::Serializer::new(String::new());
    let filters = [
        ("context", &query.context),
        ("callConnectionId", &query.call_connection_id),
        ("callId", &query.call_id),
        ("status", &query.status),
        ("kind", &query.kind),
    ];
    for (name, value) in filters {
        if let Some(value) = value {
            params.append_pair(name, value);
        }
    }
    params.append_pair("maxpagesize", &page_size.to_string());
    params.append_pair("skipToken", &last.to_string());
    format!("/v1/operations?{}", params.finish())
}

async fn list_call_events(
    State(service): State<OperationService>,
    ApiPath(call_connection_id): ApiPath<String>,
) -> Result<axum::Json<Page<crate::operation::EventRecord>>, ApiError> {
    check_call_id(&call_connection_id, "callConnectionId")?;
    let value = service
        .store()
        .call_events(&CallRef::CallConnection(call_connection_id))
        .unwrap_or_default();
    Ok(axum::Json(Page {
        value,
        next_link: None,
    }))
}

async fn list_graph_call_events(
    State(service): State<OperationService>,
    ApiPath(call_id): ApiPath<String>,
) -> Result<axum::Json<Page<crate::operation::EventRecord>>, ApiError> {
    check_call_id(&call_id, "callId")?;
    let value = service
        .store()
        .call_events(&CallRef::Call(ids::canonical(&call_id).into_owned()))
        .unwrap_or_default();
    Ok(axum::Json(Page {
        value,
        next_link: None,
    }))
}

/// Operation ids are this service's: UUIDs in their hyphenated form (any case).
fn parse_operation_id(text: &str, field: &str) -> Result<OperationId, ApiError> {
    const HYPHENATED_LEN: usize = 36;
    let id = (text.len() == HYPHENATED_LEN)
        .then(|| OperationId::parse(text))
        .flatten();
    id.ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{field}: not an operation id (a UUID such as 0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d)"
        ))
    })
}

/// The list filters are bounded like the values they match.
fn check_filters(query: &ListQuery) -> Result<(), ApiError> {
    if let Some(id) = &query.call_connection_id {
        check_call_id(id, "callConnectionId")?;
    }
    if let Some(id) = &query.call_id {
        check_call_id(id, "callId")?;
    }
    // Empty matches operations reported without a context.
    if query
        .context
        .as_ref()
        .is_some_and(|context| context.chars().count() > MAX_CONTEXT_LEN)
    {
        return Err(ApiError::BadRequest(format!(
            "context: longer than {MAX_CONTEXT_LEN} characters"
        )));
    }
    let kind_char = |c: char| c.is_ascii_alphanumeric();
    if let Some(kind) = &query.kind
        && (kind.is_empty() || kind.len() > MAX_KIND_LEN || !kind.chars().all(kind_char))
    {
        return Err(ApiError::BadRequest(format!(
            "kind: must be 1 to {MAX_KIND_LEN} letters and digits (e.g. removeParticipant)"
        )));
    }
    Ok(())
}

/// Call ids are opaque upstream ids: bounded in length, no separators or control characters.
fn check_call_id(id: &str, field: &str) -> Result<(), ApiError> {
    let valid_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | ':');
    if id.is_empty() || id.len() > MAX_CALL_ID_LEN || !id.chars().all(valid_char) {
        return Err(ApiError::BadRequest(format!(
            "{field}: must be 1 to {MAX_CALL_ID_LEN} characters of A-Z a-z 0-9 - _ . ~ :"
        )));
    }
    Ok(())
}
