//! Webhook subscriptions: create (the secret shown once), list, read, delete, rotate the
//! secret, enable again; each subscription's delivery log and redelivery.
//!
//! `{id}:verb` routes are one path segment to the router (it matches whole segments), so
//! `POST /subscriptions/{segment}` splits the verb off itself.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiJson, ApiPath, ErrorBody, error_response};
use crate::graph::ids;
use crate::http::AppState;
use crate::store::outbox::{Attempt, Delivery, DeliveryStatus, Subscription, SubscriptionFilter};
use crate::webhooks::{NewSubscription, Webhooks};

/// The longest id accepted in a path.
const MAX_ID_LEN: usize = 64;

/// Routes relative to `/v1`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/subscriptions",
            post(create_subscription).get(list_subscriptions),
        )
        .route("/subscriptions/{id}", any(subscription_segment))
        .route("/subscriptions/{id}/deliveries", get(list_deliveries))
        .route(
            "/subscriptions/{id}/deliveries/{deliveryId}",
            any(delivery_segment),
        )
}

/// Body of `POST /v1/subscriptions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SubscriptionIn {
    #[schema(schema_with = crate::webhooks::url_schema_object)]
    url: String,
    #[serde(default, deserialize_with = "crate::error::object")]
    filter: SubscriptionFilter,
    /// `operation.settled` (an operation settled, or a late callback changed its outcome),
    /// `operation.changed` (every change).
    #[schema(schema_with = event_types_schema)]
    event_types: Vec<String>,
}

/// A subscription as the API shows it; `secret` only when created or rotated.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SubscriptionOut {
    id: String,
    url: String,
    filter: SubscriptionFilter,
    event_types: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_date_time: OffsetDateTime,
    /// `enabled`, or `disabled` after its endpoint kept failing.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled_reason: Option<String>,
    /// The first failure since the last success, while failing.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    failing_since: Option<OffsetDateTime>,
    /// The signing secret (`whsec_...`): shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl SubscriptionOut {
    fn of(subscription: Subscription, with_secret: bool) -> Self {
        Self {
            status: if subscription.disabled {
                "disabled"
            } else {
                "enabled"
            },
            secret: with_secret.then_some(subscription.secret),
            id: subscription.id,
            url: subscription.url,
            filter: subscription.filter,
            event_types: subscription.event_types,
            created_date_time: subscription.created_date_time,
            disabled_reason: subscription.disabled_reason,
            failing_since: subscription.failing_since,
        }
    }
}

/// A delivery in the attempt log.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeliveryOut {
    /// The `webhook-id` of every attempt.
    id: String,
    event_type: String,
    operation_id: String,
    status: DeliveryStatus,
    attempt_count: u32,
    /// The last attempts, oldest first.
    attempts: Vec<Attempt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_date_time: OffsetDateTime,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    next_attempt_date_time: Option<OffsetDateTime>,
}

impl From<Delivery> for DeliveryOut {
    fn from(delivery: Delivery) -> Self {
        Self {
            last_error: delivery
                .attempts
                .last()
                .and_then(|attempt| attempt.error.clone()),
            id: delivery.id,
            event_type: delivery.event_type,
            operation_id: delivery.operation_id.to_string(),
            status: delivery.status,
            attempt_count: delivery.attempt_count,
            attempts: delivery.attempts,
            created_date_time: delivery.created_date_time,
            next_attempt_date_time: delivery.next_attempt_date_time,
        }
    }
}

/// `/subscriptions/{id}`: GET and DELETE on an id, POST on `{id}:rotateSecret` and
/// `{id}:enable`; any other method is a 405 naming what that path takes (the router sees one
/// segment for both). Anything else after a `:` is part of the id (and refused as one).
async fn subscription_segment(
    method: Method,
    state: State<Webhooks>,
    ApiPath(segment): ApiPath<String>,
) -> Result<Response, ApiError> {
    let verb = matches!(
        segment.rsplit_once(':'),
        Some((_, "rotateSecret" | "enable"))
    );
    match (verb, method) {
        (false, Method::GET | Method::HEAD) => get_subscription(state, ApiPath(segment))
            .await
            .map(IntoResponse::into_response),
        (false, Method::DELETE) => delete_subscription(state, ApiPath(segment))
            .await
            .map(IntoResponse::into_response),
        (true, Method::POST) => act_on_subscription(state, ApiPath(segment)).await,
        (false, _) => Ok(not_allowed("GET,HEAD,DELETE")),
        (true, _) => Ok(not_allowed("POST")),
    }
}

/// `/subscriptions/{id}/deliveries/{deliveryId}`: GET on an id, POST on `{id}:redeliver`.
async fn delivery_segment(
    method: Method,
    state: State<Webhooks>,
    ApiPath(ids): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let verb = ids.1.ends_with(":redeliver");
    match (verb, method) {
        (false, Method::GET | Method::HEAD) => get_delivery(state, ApiPath(ids))
            .await
            .map(IntoResponse::into_response),
        (true, Method::POST) => redeliver(state, ApiPath(ids)).await,
        (false, _) => Ok(not_allowed("GET,HEAD")),
        (true, _) => Ok(not_allowed("POST")),
    }
}

/// `405` with the error body and the methods the path takes.
fn not_allowed(allow: &'static str) -> Response {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "this method is not allowed on this route".to_owned(),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// A list: `value`.
#[derive(Serialize, ToSchema)]
pub(crate) struct List<T> {
    value: Vec<T>,
}

#[utoipa::path(
    post,
    path = "/v1/subscriptions",
    tag = "webhooks",
    operation_id = "createSubscription",
    request_body = SubscriptionIn,
    responses(
        (status = 201, description = "Created; `secret` is shown this once", body = SubscriptionOut),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 409, description = "Too many subscriptions", body = ErrorBody),
        (status = 413, description = "The body is larger than the limit", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 501, description = "Not offered on this store backend", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn create_subscription(
    State(webhooks): State<Webhooks>,
    ApiJson(body): ApiJson<SubscriptionIn>,
) -> Result<Response, ApiError> {
    check_filter(&body.filter)?;
    let mut filter = body.filter;
    // Graph spells call ids two ways; operations keep the canonical one.
    filter.call_id = filter.call_id.map(|id| ids::canonical(&id).into_owned());
    let subscription = webhooks
        .create_subscription(NewSubscription {
            url: body.url,
            filter,
            event_types: body.event_types,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(SubscriptionOut::of(subscription, true)),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/subscriptions",
    tag = "webhooks",
    operation_id = "listSubscriptions",
    responses(
        (status = 200, description = "Every subscription, without secrets", body = List<SubscriptionOut>),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 501, description = "Not offered on this store backend", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn list_subscriptions(
    State(webhooks): State<Webhooks>,
) -> Result<axum::Json<List<SubscriptionOut>>, ApiError> {
    let value = webhooks
        .subscriptions()?
        .into_iter()
        .map(|subscription| SubscriptionOut::of(subscription, false))
        .collect();
    Ok(axum::Json(List { value }))
}

#[utoipa::path(
    get,
    path = "/v1/subscriptions/{id}",
    tag = "webhooks",
    operation_id = "getSubscription",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$")),
    responses(
        (status = 200, description = "The subscription, without its secret", body = SubscriptionOut),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn get_subscription(
    State(webhooks): State<Webhooks>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<SubscriptionOut>, ApiError> {
    check_id(&id, "id")?;
    Ok(axum::Json(SubscriptionOut::of(
        webhooks.subscription(&id)?,
        false,
    )))
}

#[utoipa::path(
    delete,
    path = "/v1/subscriptions/{id}",
    tag = "webhooks",
    operation_id = "deleteSubscription",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$")),
    responses(
        (status = 204, description = "Deleted; its pending deliveries are dead-lettered"),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn delete_subscription(
    State(webhooks): State<Webhooks>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id, "id")?;
    webhooks.delete_subscription(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/subscriptions/{id}:rotateSecret",
    tag = "webhooks",
    operation_id = "rotateSubscriptionSecret",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$")),
    responses(
        (status = 200, description = "A new secret, shown this once; the old one no longer signs", body = SubscriptionOut),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
#[expect(
    dead_code,
    reason = "documents the rotateSecret verb of act_on_subscription"
)]
pub(crate) fn rotate_secret_doc() {}

#[utoipa::path(
    post,
    path = "/v1/subscriptions/{id}:enable",
    tag = "webhooks",
    operation_id = "enableSubscription",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$")),
    responses(
        (status = 200, description = "Enabled again", body = SubscriptionOut),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
#[expect(dead_code, reason = "documents the enable verb of act_on_subscription")]
pub(crate) fn enable_doc() {}

/// `POST /subscriptions/{id}:rotateSecret` and `POST /subscriptions/{id}:enable`.
pub(crate) async fn act_on_subscription(
    State(webhooks): State<Webhooks>,
    ApiPath(segment): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (id, verb) = segment
        .rsplit_once(':')
        .ok_or_else(|| ApiError::NotFound("no such route".to_owned()))?;
    check_id(id, "id")?;
    let (subscription, with_secret) = match verb {
        "rotateSecret" => (webhooks.rotate_secret(id).await?, true),
        "enable" => (webhooks.enable(id).await?, false),
        _ => return Err(ApiError::NotFound("no such route".to_owned())),
    };
    Ok(axum::Json(SubscriptionOut::of(subscription, with_secret)).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/subscriptions/{id}/deliveries",
    tag = "webhooks",
    operation_id = "listDeliveries",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$")),
    responses(
        (status = 200, description = "The subscription's deliveries, newest first, with their attempts", body = List<DeliveryOut>),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn list_deliveries(
    State(webhooks): State<Webhooks>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<List<DeliveryOut>>, ApiError> {
    check_id(&id, "id")?;
    let value = webhooks
        .deliveries(&id)?
        .into_iter()
        .map(DeliveryOut::from)
        .collect();
    Ok(axum::Json(List { value }))
}

#[utoipa::path(
    get,
    path = "/v1/subscriptions/{id}/deliveries/{deliveryId}",
    tag = "webhooks",
    operation_id = "getDelivery",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$"), ("deliveryId" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$")),
    responses(
        (status = 200, description = "The delivery and its attempts", body = DeliveryOut),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such subscription or delivery", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn get_delivery(
    State(webhooks): State<Webhooks>,
    ApiPath((id, delivery)): ApiPath<(String, String)>,
) -> Result<axum::Json<DeliveryOut>, ApiError> {
    check_id(&id, "id")?;
    check_id(&delivery, "deliveryId")?;
    let found = webhooks
        .deliveries(&id)?
        .into_iter()
        .find(|found| found.id == delivery)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "delivery {delivery} of subscription {id} does not exist"
            ))
        })?;
    Ok(axum::Json(found.into()))
}

#[utoipa::path(
    post,
    path = "/v1/subscriptions/{id}/deliveries/{deliveryId}:redeliver",
    tag = "webhooks",
    operation_id = "redeliver",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$"), ("deliveryId" = String, Path, min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_]+$")),
    responses(
        (status = 202, description = "Queued again (same webhook-id), with a new retry window", body = DeliveryOut),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 404, description = "No such subscription or delivery", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn redeliver(
    State(webhooks): State<Webhooks>,
    ApiPath((id, segment)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    check_id(&id, "id")?;
    let delivery = match segment.rsplit_once(':') {
        Some((delivery, "redeliver")) => delivery,
        _ => return Err(ApiError::NotFound("no such route".to_owned())),
    };
    check_id(delivery, "deliveryId")?;
    let queued = webhooks.redeliver(&id, delivery).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(DeliveryOut::from(queued))).into_response())
}

/// At least one of the event types.
fn event_types_schema() -> utoipa::openapi::Array {
    let name = utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(crate::store::outbox::EVENT_TYPES));
    utoipa::openapi::ArrayBuilder::new()
        .items(name)
        .min_items(Some(1))
        .build()
}

/// Ids are ours (`sub_...`, `msg_...`): short, letters, digits and `_`.
fn check_id(id: &str, field: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(ApiError::BadRequest(format!(
            "{field}: not an id from this API (letters, digits and _, at most {MAX_ID_LEN})"
        )));
    }
    Ok(())
}

/// Filter values are bounded like the list's.
fn check_filter(filter: &SubscriptionFilter) -> Result<(), ApiError> {
    let fields = [
        ("filter.kind", &filter.kind, 64),
        ("filter.callConnectionId", &filter.call_connection_id, 256),
        ("filter.callId", &filter.call_id, 256),
        ("filter.contextPrefix", &filter.context_prefix, 512),
    ];
    for (field, value, max) in fields {
        if value
            .as_ref()
            .is_some_and(|value| value.is_empty() || value.chars().count() > max)
        {
            return Err(ApiError::BadRequest(format!(
                "{field}: must be 1 to {max} characters"
            )));
        }
    }
    Ok(())
}
