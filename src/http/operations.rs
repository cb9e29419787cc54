//! The client API: start a removal, read one operation (optionally long-polling), list
//! operations, read a call's events.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::acs::identifier::CommunicationIdentifier;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use crate::graph::ids;
use crate::http::{ApiLimits, AppState};
use crate::operation::{
    CallRef, EventRecord, NotifyTarget, Operation, OperationId, OperationKind, OperationStatus,
};
use crate::service::{MAX_CONTEXT_LEN, OperationService};
use crate::store::ListFilter;
use crate::trace_context::{TRACEPARENT, TraceParent};
use crate::webhooks::Webhooks;
use crate::webhooks::signing::SigningKey;

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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RemoveParticipantIn {
    #[serde(deserialize_with = "crate::error::object")]
    participant_to_remove: CommunicationIdentifier,
    /// Unique per call among running operations; generated when absent.
    #[schema(min_length = 1, max_length = 512)]
    operation_context: Option<String>,
    #[serde(default, deserialize_with = "crate::error::optional_object")]
    notify: Option<NotifyIn>,
}

/// Where to POST the operation once it settles (and again if a late callback changes its
/// outcome): a URL, with an optional `whsec_` secret to sign with, or a subscription.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct NotifyIn {
    url: Option<String>,
    /// `whsec_` + base64 of 24 to 64 bytes; the deliveries are unsigned without it.
    secret: Option<String>,
    /// A subscription whose URL and secret are used instead.
    subscription_id: Option<String>,
}

/// The schema says what [`notify_target`] accepts: a URL with an optional secret, or a
/// subscription id. Written by hand because a derived schema cannot say "one of" for
/// optional members.
impl utoipa::PartialSchema for NotifyIn {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let schema = serde_json::json!({
            "description": "Where to POST the operation once it settles (and again if a late callback changes its outcome): a URL, with an optional secret to sign with, or a subscription.",
            "oneOf": [
                {
                    "type": "object",
                    "title": "url",
                    "required": ["url"],
                    "additionalProperties": false,
                    "properties": {
                        "url": crate::webhooks::url_schema(),
                        "secret": crate::webhooks::secret_schema(),
                        "subscriptionId": {"type": "null"}
                    }
                },
                {
                    "type": "object",
                    "title": "subscriptionId",
                    "required": ["subscriptionId"],
                    "additionalProperties": false,
                    "properties": {
                        "subscriptionId": {
                            "type": "string",
                            "description": "A subscription whose URL and secret are used instead.",
                            "pattern": "^[A-Za-z0-9_]+$",
                            "minLength": 1,
                            "maxLength": 64
                        },
                        "url": {"type": "null"},
                        "secret": {"type": "null"}
                    }
                }
            ]
        });
        serde_json::from_value(schema).expect("the notify schema is a valid schema")
    }
}

impl utoipa::ToSchema for NotifyIn {}

/// The `notify` member as the operation keeps it, once checked.
fn notify_target(
    notify: Option<NotifyIn>,
    webhooks: &Webhooks,
) -> Result<Option<NotifyTarget>, ApiError> {
    let Some(notify) = notify else {
        return Ok(None);
    };
    match (notify.url, notify.subscription_id) {
        (Some(url), None) => {
            webhooks
                .check_url(&url)
                .map_err(|error| ApiError::BadRequest(format!("notify.{error}")))?;
            if let Some(secret) = &notify.secret {
                SigningKey::parse(secret)
                    .map_err(|error| ApiError::BadRequest(format!("notify.secret: {error}")))?;
            }
            Ok(Some(NotifyTarget::Url {
                url,
                secret: notify.secret,
            }))
        }
        (None, Some(id)) if notify.secret.is_none() => {
            webhooks.subscription(&id).map_err(|_| {
                ApiError::BadRequest(format!("notify.subscriptionId: {id:.64} does not exist"))
            })?;
            Ok(Some(NotifyTarget::Subscription(id)))
        }
        _ => Err(ApiError::BadRequest(
            "notify: give url (and optionally secret), or subscriptionId".to_owned(),
        )),
    }
}

#[utoipa::path(
    post,
    path = "/v1/acs/callConnections/{callConnectionId}/participants:remove",
    tag = "acs",
    operation_id = "removeParticipant",
    params(("callConnectionId" = String, Path, min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._~:-]+$"), TraceParentHeader),
    request_body = RemoveParticipantIn,
    responses(
        (status = 202, description = "Accepted: the operation, to follow at `Operation-Location`", body = Operation,
            headers(
                ("Operation-Location" = String, description = "`/v1/operations/{id}`"),
                ("Retry-After" = u64, description = "Seconds before polling again"),
            )),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such operation or route", body = ErrorBody),
        (status = 409, description = "The context names a still-running operation on the same call", body = ErrorBody),
        (status = 413, description = "The body is larger than the limit", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The operation could not be stored; retry", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn create_removal(
    State(service): State<OperationService>,
    State(webhooks): State<Webhooks>,
    State(limits): State<ApiLimits>,
    ApiPath(call_connection_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RemoveParticipantIn>,
) -> Result<Response, ApiError> {
    check_call_id(&call_connection_id, "callConnectionId")?;
    let notify = notify_target(body.notify, &webhooks)?;
    let operation = service
        .start_remove_participant(
            call_connection_id,
            body.participant_to_remove,
            body.operation_context,
            traceparent(&headers),
            notify,
        )
        .await?;
    Ok(accepted(operation, limits.retry_after_secs))
}

/// Body of `cancelMediaProcessing`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct CancelMediaProcessingIn {
    /// Unique per call among running operations; generated when absent.
    #[schema(min_length = 1, max_length = 256)]
    client_context: Option<String>,
    #[serde(default, deserialize_with = "crate::error::optional_object")]
    notify: Option<NotifyIn>,
}

#[utoipa::path(
    post,
    path = "/v1/graph/calls/{callId}/cancelMediaProcessing",
    tag = "graph",
    operation_id = "cancelMediaProcessing",
    params(("callId" = String, Path, min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._~:-]+$"), TraceParentHeader),
    request_body = CancelMediaProcessingIn,
    responses(
        (status = 202, description = "Accepted: the operation, to follow at `Operation-Location`", body = Operation,
            headers(
                ("Operation-Location" = String, description = "`/v1/operations/{id}`"),
                ("Retry-After" = u64, description = "Seconds before polling again"),
            )),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such operation or route", body = ErrorBody),
        (status = 409, description = "The context names a still-running operation on the same call", body = ErrorBody),
        (status = 413, description = "The body is larger than the limit", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The operation could not be stored; retry", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn create_cancel(
    State(service): State<OperationService>,
    State(webhooks): State<Webhooks>,
    State(limits): State<ApiLimits>,
    ApiPath(call_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CancelMediaProcessingIn>,
) -> Result<Response, ApiError> {
    check_call_id(&call_id, "callId")?;
    let notify = notify_target(body.notify, &webhooks)?;
    let operation = service
        .start_cancel_media_processing(call_id, body.client_context, traceparent(&headers), notify)
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct GetQuery {
    /// Seconds to wait for the operation to settle (capped at `operations.max_wait_secs`).
    #[param(schema_with = wait_seconds)]
    wait: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/v1/operations/{id}",
    tag = "operations",
    operation_id = "getOperation",
    params(("id" = String, Path, format = Uuid, description = "The operation id"), GetQuery),
    responses(
        (status = 200, description = "The operation; `Retry-After` while it has not settled", body = Operation,
            headers(("Retry-After" = u64, description = "Seconds before polling again"))),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such operation or route", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn get_operation(
    State(service): State<OperationService>,
    State(limits): State<ApiLimits>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<GetQuery>,
) -> Result<Response, ApiError> {
    let operation_id = parse_operation_id(&id, "id")?;
    let unknown = || ApiError::NotFound(format!("operation {operation_id} does not exist"));
    let operation = match query.wait {
        Some(seconds) if seconds > 0 => {
            let wait = Duration::from_secs(seconds.into()).min(limits.max_wait);
            service.wait(operation_id, wait).await?
        }
        _ => service.get(operation_id).await?,
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

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Operations with this context (empty: those reported without one).
    #[param(max_length = 512)]
    context: Option<String>,
    #[param(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._~:-]+$")]
    call_connection_id: Option<String>,
    #[param(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._~:-]+$")]
    call_id: Option<String>,
    /// One of `NotStarted`, `Running`, `Succeeded`, `Failed`, `Canceled` (any case).
    #[param(value_type = Option<OperationStatus>)]
    status: Option<String>,
    /// E.g. `removeParticipant`: letters and digits.
    #[param(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9]+$")]
    kind: Option<String>,
    /// Page size (default 50, capped).
    #[serde(rename = "maxpagesize")]
    #[param(rename = "maxpagesize", schema_with = page_size)]
    max_page_size: Option<u32>,
    /// From a `nextLink`.
    #[param(format = Uuid)]
    skip_token: Option<String>,
}

/// A non-negative integer. No `maximum` nor `format`: any value up to 2^64 - 1 is taken (and
/// capped where the API caps it), larger ones are refused.
fn unsigned() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Integer)
        .minimum(Some(0))
        .build()
}

/// As [`unsigned`], up to 2³² − 1 (a longer wait would be capped anyway; a larger number is 400).
fn wait_seconds() -> utoipa::openapi::Object {
    let mut schema = unsigned();
    schema.maximum = Some(u32::MAX.into());
    schema
}

/// From 1 to 2³² − 1 (larger pages are capped anyway; a larger number is 400).
fn page_size() -> utoipa::openapi::Object {
    let mut schema = wait_seconds();
    schema.minimum = Some(1.into());
    schema
}

/// Trace context passed on to the upstream request.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub(crate) struct TraceParentHeader {
    /// A W3C `traceparent`; ignored when malformed.
    traceparent: Option<String>,
}

/// A page of a list: `value`, and `nextLink` when there is more.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Page<T> {
    value: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_link: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/operations",
    tag = "operations",
    operation_id = "listOperations",
    params(ListQuery),
    responses(
        (status = 200, description = "Operations, newest first", body = Page<Operation>),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn list_operations(
    State(service): State<OperationService>,
    State(limits): State<ApiLimits>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<axum::Json<Page<Operation>>, ApiError> {
    let before = match &query.skip_token {
        Some(token) => Some(parse_operation_id(token, "skipToken").map_err(|_| {
            ApiError::BadRequest("skipToken: not a token from nextLink".to_owned())
        })?),
        None => None,
    };
    let filter = ListFilter {
        before,
        ..list_filter(&query)?
    };
    let page_size = match query.max_page_size {
        Some(0) => {
            return Err(ApiError::BadRequest(
                "maxpagesize: must be at least 1".to_owned(),
            ));
        }
        Some(size) => usize::try_from(size)
            .map_or(limits.page_size_max, |size| size.min(limits.page_size_max)),
        None => limits.page_size,
    };
    let (value, next) = service.list(&filter, page_size).await?;
    let next_link = next.map(|before| next_link(&query, page_size, before));
    Ok(axum::Json(Page { value, next_link }))
}

/// The filters of a list (or stream) query, checked; no paging cursor.
pub(crate) fn list_filter(query: &ListQuery) -> Result<ListFilter, ApiError> {
    let status = match &query.status {
        Some(text) => Some(OperationStatus::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "status: {text:.64} is not one of NotStarted, Running, Succeeded, Failed, Canceled"
            ))
        })?),
        None => None,
    };
    check_filters(query)?;
    Ok(ListFilter {
        context: query.context.clone(),
        call_connection_id: query.call_connection_id.clone(),
        // Graph spells call ids two ways; the store keeps the canonical one.
        call_id: query
            .call_id
            .as_deref()
            .map(|id| ids::canonical(id).into_owned()),
        status,
        kind: query.kind.as_deref().map(OperationKind::from_name),
        before: None,
    })
}

/// The list's filters without its paging (the stream's query).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct FilterQuery {
    /// Operations with this context (empty: those reported without one).
    #[param(max_length = 512)]
    context: Option<String>,
    #[param(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._~:-]+$")]
    call_connection_id: Option<String>,
    #[param(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._~:-]+$")]
    call_id: Option<String>,
    /// One of `NotStarted`, `Running`, `Succeeded`, `Failed`, `Canceled` (any case).
    #[param(value_type = Option<OperationStatus>)]
    status: Option<String>,
    /// E.g. `removeParticipant`: letters and digits.
    #[param(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9]+$")]
    kind: Option<String>,
}

impl FilterQuery {
    /// The filter it names, checked as the list checks it.
    pub(crate) fn filter(self) -> Result<ListFilter, ApiError> {
        list_filter(&ListQuery {
            context: self.context,
            call_connection_id: self.call_connection_id,
            call_id: self.call_id,
            status: self.status,
            kind: self.kind,
            ..ListQuery::default()
        })
    }
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

#[utoipa::path(
    get,
    path = "/v1/acs/callConnections/{callConnectionId}/events",
    tag = "acs",
    operation_id = "listCallConnectionEvents",
    params(("callConnectionId" = String, Path, min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._~:-]+$")),
    responses(
        (status = 200, description = "The call's own events, and callbacks whose operation never appeared", body = Page<EventRecord>),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such operation or route", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn list_call_events(
    State(service): State<OperationService>,
    ApiPath(call_connection_id): ApiPath<String>,
) -> Result<axum::Json<Page<EventRecord>>, ApiError> {
    check_call_id(&call_connection_id, "callConnectionId")?;
    let value = service
        .call_events(&CallRef::CallConnection(call_connection_id))
        .await?;
    Ok(axum::Json(Page {
        value,
        next_link: None,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/graph/calls/{callId}/events",
    tag = "graph",
    operation_id = "listGraphCallEvents",
    params(("callId" = String, Path, min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9._~:-]+$")),
    responses(
        (status = 200, description = "The call's own events, and callbacks whose operation never appeared", body = Page<EventRecord>),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such operation or route", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn list_graph_call_events(
    State(service): State<OperationService>,
    ApiPath(call_id): ApiPath<String>,
) -> Result<axum::Json<Page<EventRecord>>, ApiError> {
    check_call_id(&call_id, "callId")?;
    let value = service
        .call_events(&CallRef::Call(ids::canonical(&call_id).into_owned()))
        .await?;
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
