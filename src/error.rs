//! `ApiError`: every error the HTTP API answers, in the Azure shape
//! `{"error": {"code", "message"}}`, and extractors that turn bad input into it.

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::service::StartError;
use crate::store::StoreError;
use crate::telemetry::LogBudget;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: the message names the field.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the request body is larger than the limit")]
    PayloadTooLarge,
    /// The request (its body) did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unauthorized(String),
    /// A dependency is missing for now; the client should retry.
    #[error("{0}")]
    Unavailable(String),
    /// This deployment does not offer the route (its store backend lacks it).
    #[error("{0}")]
    NotImplemented(String),
}

/// Why a request body was cut off; body rejections carry it in their source chain.
#[derive(Debug, thiserror::Error)]
pub enum SlowBody {
    #[error("the request body did not arrive within {} s", .0.as_secs())]
    Deadline(Duration),
    #[error("too many request bodies are arriving slowly at once; retry shortly")]
    TooMany,
}

impl SlowBody {
    /// The `SlowBody` behind a body error, if that is what ended it.
    pub fn behind<'a>(mut error: &'a (dyn std::error::Error + 'static)) -> Option<&'a SlowBody> {
        loop {
            if let Some(slow) = error.downcast_ref::<SlowBody>() {
                return Some(slow);
            }
            error = error.source()?;
        }
    }
}

/// The error body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong: a stable `code` and a message for people.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// E.g. `InvalidRequest`, `Unauthorized`, `NotFound`, `MethodNotAllowed`, `Conflict`,
    /// `PayloadTooLarge`, `UnsupportedMediaType`, `RequestTimeout`, `ServiceUnavailable`.
    #[schema(example = "InvalidRequest")]
    code: String,
    message: String,
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "RequestTimeout"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType")
            }
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            Self::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "NotImplemented"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut response = error_response(status, code, self.to_string());
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: a 401 names the scheme the request should have used.
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The error body with any status, for middleware that answers on its own.
pub fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message,
        },
    };
    (status, axum::Json(body)).into_response()
}

impl From<StartError> for ApiError {
    fn from(error: StartError) -> Self {
        match error {
            StartError::Participant(_) | StartError::Context | StartError::ClientContext => {
                Self::BadRequest(error.to_string())
            }
            StartError::Conflict(_) => Self::Conflict(format!(
                "operationContext: {error}; choose another context or wait for it to settle"
            )),
            StartError::Store(_) => Self::Unavailable(error.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    /// The store cannot answer now (a shared store unreachable): 503, so the client retries.
    fn from(error: StoreError) -> Self {
        if let StoreError::Unsupported(what) = error {
            return Self::NotImplemented(what.to_owned());
        }
        log_store_failure(&error);
        Self::Unavailable(format!("the store is unavailable: {error}"))
    }
}

impl From<crate::webhooks::WebhookError> for ApiError {
    fn from(error: crate::webhooks::WebhookError) -> Self {
        use crate::webhooks::WebhookError;
        match error {
            WebhookError::Store(error) => error.into(),
            WebhookError::Invalid(message) => Self::BadRequest(message),
            WebhookError::NotFound(message) => Self::NotFound(message),
            WebhookError::Conflict(message) => Self::Conflict(message),
        }
    }
}

/// Logs that the store could not serve a request: at most ten lines a second as errors
/// (an outage fails every request), the rest at debug.
pub fn log_store_failure(error: &dyn std::fmt::Display) {
    static BUDGET: LogBudget = LogBudget::new();
    if BUDGET.allow() {
        tracing::error!(%error, "the store is unavailable; answered 503");
    } else {
        tracing::debug!(%error, "the store is unavailable; answered 503");
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => {
                Self::UnsupportedMediaType("expected Content-Type: application/json".to_owned())
            }
            JsonRejection::BytesRejection(inner) => inner.into(),
            // `body_text` names the field and position of the problem.
            other => Self::BadRequest(bounded(other.body_text())),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::PayloadTooLarge;
        }
        match SlowBody::behind(&rejection) {
            Some(slow @ SlowBody::Deadline(_)) => Self::RequestTimeout(slow.to_string()),
            Some(slow @ SlowBody::TooMany) => Self::Unavailable(slow.to_string()),
            None => Self::BadRequest(bounded(rejection.body_text())),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest(bounded(rejection.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::BadRequest(bounded(rejection.body_text()))
    }
}

/// The longest rejection message answered: deserializers quote the input (`invalid type:
/// string "..."`, `unknown field `...``), which may be as large as the body.
const MAX_MESSAGE_CHARS: usize = 300;

/// `message` cut to [`MAX_MESSAGE_CHARS`] characters; the field it names comes first.
fn bounded(mut message: String) -> String {
    if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

/// `deserialize_with` for a member that must be a JSON object: serde would otherwise take
/// an array for a struct, field by field.
pub fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::Deserialize;
    use serde::de::Error;
    let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
    if !raw.get().starts_with('{') {
        return Err(D::Error::custom("invalid type: expected a JSON object"));
    }
    parse_object(raw.get()).map_err(D::Error::custom)
}

/// `text` (a JSON object) as a `T`; an error names the member inside it that is wrong.
fn parse_object<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
}

/// As [`object`], for a member that may also be null or absent (with `#[serde(default)]`).
pub fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::Deserialize;
    use serde::de::Error;
    let raw = Option::<Box<serde_json::value::RawValue>>::deserialize(deserializer)?;
    match raw {
        None => Ok(None),
        Some(raw) if raw.get().starts_with('{') => {
            parse_object(raw.get()).map(Some).map_err(D::Error::custom)
        }
        Some(_) => Err(D::Error::custom("invalid type: expected a JSON object")),
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s, and whose body must be a JSON object
/// (serde would otherwise take an array for a struct, field by field).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(raw) =
            axum::Json::<Box<serde_json::value::RawValue>>::from_request(request, state).await?;
        if !raw.get().starts_with('{') {
            return Err(Self::Rejection::BadRequest(
                "invalid type: the body must be a JSON object".to_owned(),
            ));
        }
        let axum::Json(value) = axum::Json::<T>::from_bytes(raw.get().as_bytes())?;
        Ok(Self(value))
    }
}

/// `axum::extract::Query` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_have_the_azure_shape() {
        let response = ApiError::NotFound("operation x does not exist".into()).into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "NotFound");
        assert_eq!(json["error"]["message"], "operation x does not exist");
    }

    #[test]
    fn rejection_messages_do_not_echo_a_whole_body() {
        assert_eq!(bounded("short".to_owned()), "short");
        let long = format!("field: invalid type: string \"{}\"", "é".repeat(10_000));
        let cut = bounded(long);
        assert!(cut.starts_with("field: invalid type"));
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS + 3);
    }
}
