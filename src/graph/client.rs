//! The outbound Graph client: `call: cancelMediaProcessing`, as the official SDK sends it.
//!
//! `POST {base}/communications/calls/{id}/cancelMediaProcessing` with
//! `{"clientContext": ...}` and an app-only bearer token ([`TokenProvider`]). Connection
//! errors, 408, 429 (fractional `Retry-After`) and 5xx are retried within the bounds of
//! [`RetryConfig`]; a 401 drops the cached token and is retried once with a new one.
//! Retrying is safe: cancelling media processing twice cancels nothing more.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
use url::Url;

use crate::config::RetryConfig;
use crate::graph::notifications;
use crate::identity::{TokenError, TokenProvider};
use crate::metrics::Metrics;
use crate::operation::ResultInfo;
use crate::trace_context::{TRACEPARENT, TraceParent};
use crate::upstream::{self, AttemptError, Retried, TransientError};

/// What Graph answered to a cancel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CancelAnswer {
    /// The cancel operation's id: the body's `id`, else the last segment of `Location`.
    pub operation_id: Option<String>,
    /// The last segment of `Location` when it names the operation differently from the body
    /// (Microsoft's own v1.0 example does).
    pub location_id: Option<String>,
    /// `status` as sent (any case), when there was one.
    pub status: Option<String>,
    pub result: Option<ResultInfo>,
}

/// How a cancel request ended, when Graph did not take it.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// Graph refused the request for good (a 4xx other than 408/429).
    #[error("Graph rejected the request with {status}: {}", .message.as_deref().unwrap_or("no message"))]
    Rejected {
        status: StatusCode,
        code: Option<String>,
        message: Option<String>,
    },
    /// No token could be had for good (wrong credentials).
    #[error(transparent)]
    Token(TokenError),
    /// Every attempt failed transiently, or the retry budget ran out.
    #[error("Graph did not accept the request after {attempts} attempt(s)")]
    Unavailable {
        attempts: u32,
        #[source]
        last: TransientError,
    },
}

/// Microsoft Graph cloud-communications client.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base_url: Url,
    tokens: Arc<TokenProvider>,
    retry: RetryConfig,
    metrics: Metrics,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CancelMediaProcessingOut<'a> {
    client_context: &'a str,
}

impl GraphClient {
    pub fn new(
        http: reqwest::Client,
        base_url: Url,
        tokens: Arc<TokenProvider>,
        retry: RetryConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            http,
            base_url,
            tokens,
            retry,
            metrics,
        }
    }

    /// The Graph root requests go to.
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// The token source (for its counters).
    pub fn tokens(&self) -> &TokenProvider {
        &self.tokens
    }

    /// Sends cancelMediaProcessing until Graph takes it (any 2xx), refuses it for good, or
    /// the retry budget runs out.
    #[tracing::instrument(skip_all, fields(call.id = %call_id))]
    pub async fn cancel_media_processing(
        &self,
        call_id: &str,
        client_context: &str,
        traceparent: Option<&TraceParent>,
    ) -> Result<CancelAnswer, GraphError> {
        let url = self.cancel_url(call_id);
        let body = serde_json::to_vec(&CancelMediaProcessingOut { client_context })
            .expect("the request serialises");
        let refreshed = AtomicBool::new(false);
        let result = upstream::with_retries(&self.retry, "graph", &self.metrics, || {
            self.attempt(&url, &body, &refreshed, traceparent)
        })
        .await;
        match result {
            Ok(answer) => Ok(answer),
            Err(Retried::Final(error)) => Err(error),
            Err(Retried::Exhausted { attempts, last }) => {
                Err(GraphError::Unavailable { attempts, last })
            }
        }
    }

    /// Whether Graph still knows the call (`GET /communications/calls/{id}`): `false` on a
    /// 404 or a call in state `terminated`. Transient failures are retried within
    /// `graph.retry`.
    #[tracing::instrument(skip_all, fields(call.id = %call_id))]
    pub async fn call_exists(&self, call_id: &str) -> Result<bool, GraphError> {
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .expect("the base URL is an http(s) URL")
            .pop_if_empty()
            .extend(["communications", "calls", call_id]);
        let refreshed = AtomicBool::new(false);
        let result = upstream::with_retries(&self.retry, "graph", &self.metrics, || async {
            let (token, authorization) = self.authorization().await?;
            let response = self
                .http
                .get(url.clone())
                .header("accept", "application/json")
                .header("authorization", authorization)
                .send()
                .await
                .map_err(AttemptError::transport)?;
            match response.status() {
                StatusCode::NOT_FOUND => Ok(false),
                status if status.is_success() => {
                    let bytes = response.bytes().await.map_err(AttemptError::transport)?;
                    let state = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|call| call.get("state")?.as_str().map(str::to_ascii_lowercase));
                    Ok(state.as_deref() != Some("terminated"))
                }
                _ => Err(self.refused(response, &token, &refreshed).await),
            }
        })
        .await;
        match result {
            Ok(exists) => Ok(exists),
            Err(Retried::Final(error)) => Err(error),
            Err(Retried::Exhausted { attempts, last }) => {
                Err(GraphError::Unavailable { attempts, last })
            }
        }
    }

    /// A bearer token and its `Authorization` value (marked sensitive).
    async fn authorization(&self) -> Result<(SecretString, HeaderValue), AttemptError<GraphError>> {
        let token = match self.tokens.token().await {
            Ok(token) => token,
            Err(error) if error.is_transient() => {
                tracing::warn!(error = %error, "no Graph token yet");
                return Err(AttemptError::Transient {
                    error: TransientError::Status {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                    },
                    retry_after: None,
                });
            }
            Err(error) => return Err(AttemptError::Final(GraphError::Token(error))),
        };
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
            .map_err(|_| AttemptError::Final(GraphError::Token(TokenError::Malformed)))?;
        authorization.set_sensitive(true);
        Ok((token, authorization))
    }

    /// The failure a non-2xx answer means; a first 401 drops the token and is retried.
    async fn refused(
        &self,
        response: reqwest::Response,
        token: &SecretString,
        refreshed: &AtomicBool,
    ) -> AttemptError<GraphError> {
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED && !refreshed.swap(true, Ordering::Relaxed) {
            // The token was revoked or expired early: once, with a fresh one.
            self.tokens.invalidate(token);
            tracing::info!("Graph refused the token; retrying once with a new one");
            return AttemptError::Transient {
                error: TransientError::Status { status },
                retry_after: Some(std::time::Duration::ZERO),
            };
        }
        // A final refusal keeps the upstream's own code and message.
        upstream::failure(response, |status, code, message| GraphError::Rejected {
            status,
            code,
            message,
        })
        .await
    }

    fn cancel_url(&self, call_id: &str) -> Url {
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .expect("the base URL is an http(s) URL")
            .pop_if_empty()
            .extend(["communications", "calls", call_id, "cancelMediaProcessing"]);
        url
    }

    async fn attempt(
        &self,
        url: &Url,
        body: &[u8],
        refreshed: &AtomicBool,
        traceparent: Option<&TraceParent>,
    ) -> Result<CancelAnswer, AttemptError<GraphError>> {
        let (token, authorization) = self.authorization().await?;
        let mut request = self
            .http
            .post(url.clone())
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .header("authorization", authorization);
        if let Some(traceparent) = traceparent {
            request = request.header(TRACEPARENT, traceparent.header_value().clone());
        }
        let response = request
            .body(body.to_vec())
            .send()
            .await
            .map_err(AttemptError::transport)?;
        let status = response.status();
        if status.is_success() {
            let location = location_id(response.headers());
            let bytes = response.bytes().await.map_err(AttemptError::transport)?;
            return Ok(parse_answer(&bytes, location));
        }
        Err(self.refused(response, &token, refreshed).await)
    }
}

/// The last path segment of `Location`.
fn location_id(headers: &HeaderMap) -> Option<String> {
    let location = headers.get(reqwest::header::LOCATION)?.to_str().ok()?;
    let path = location.split(['?', '#']).next()?;
    path.rsplit('/')
        .find(|segment| !segment.is_empty())
        .map(str::to_owned)
}

/// A 2xx answer: a `cancelMediaProcessingOperation`, or nothing at all.
fn parse_answer(body: &[u8], location: Option<String>) -> CancelAnswer {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let text = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let result = notifications::result_info(&value);
    let body_id = text("id");
    let location_id = match (&body_id, &location) {
        (Some(body), Some(location)) if body != location => Some(location.clone()),
        _ => None,
    };
    CancelAnswer {
        operation_id: body_id.or(location),
        location_id,
        status: text("status"),
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_client(base: &str) -> GraphClient {
        let http = reqwest::Client::new();
        let credential =
            crate::identity::Credential::new(crate::identity::CredentialSettings::ClientSecret {
                authority: Url::parse("http://127.0.0.1:1/").unwrap(),
                tenant_id: "t".into(),
                client_id: "c".into(),
                secret: secrecy::SecretString::from("s"),
            })
            .unwrap();
        let tokens = TokenProvider::new(
            http.clone(),
            credential,
            crate::identity::GRAPH_SCOPE,
            "Graph",
        );
        GraphClient::new(
            http,
            Url::parse(base).unwrap(),
            Arc::new(tokens),
            crate::config::Config::embedded().graph.retry,
            Metrics::new(),
        )
    }

    #[test]
    fn the_url_and_body_are_the_sdks() {
        let fixture: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/sdk-requests/graph_cancel_media_processing.msgraph-sdk-1.65.0.json"
        ))
        .unwrap();
        let request = &fixture["request"];
        let client = make_client("https://127.0.0.1:18556/v1.0");
        let url = client.cancel_url("57dab8b1-894c-409a-b240-bd8beae78896");
        assert_eq!(url.path(), request["path"].as_str().unwrap());
        let body = serde_json::to_value(CancelMediaProcessingOut {
            client_context: "cc-1",
        })
        .unwrap();
        assert_eq!(body, request["body"]);
        // A trailing slash on the base changes nothing.
        let url = make_client("https://graph.microsoft.com/v1.0/").cancel_url("a/b");
        assert_eq!(
            url.as_str(),
            "https://graph.microsoft.com/v1.0/communications/calls/a%2Fb/cancelMediaProcessing"
        );
    }

    #[test]
    fn answers_with_a_body_an_empty_body_or_odd_fields() {
        let fixture =
            include_bytes!("../../tests/fixtures/graph/v1_cancelmediaprocessing_response_200.json");
        let answer = parse_answer(fixture, Some("17e3b46c-f61d-4f4d-9635-c626ef18e6ad".into()));
        // The body's id wins over Location's (they differ in Microsoft's own example).
        assert_eq!(
            answer.operation_id.as_deref(),
            Some("0fe0623f-d628-42ed-b4bd-8ac290072cc5")
        );
        assert_eq!(answer.status.as_deref(), Some("completed"));
        assert_eq!(
            answer.location_id.as_deref(),
            Some("17e3b46c-f61d-4f4d-9635-c626ef18e6ad")
        );
        let answer = parse_answer(b"", Some("17e3b46c".into()));
        assert_eq!(answer.location_id, None);
        assert_eq!(answer.operation_id.as_deref(), Some("17e3b46c"));
        assert_eq!(answer.status, None);
        let answer = parse_answer(
            br#"{"status":"Failed","resultInfo":{"code":"500","subcode":9999,"message":"x"}}"#,
            None,
        );
        assert_eq!(answer.status.as_deref(), Some("Failed"));
        assert_eq!(answer.result.unwrap().code, Some(500));
    }

    #[test]
    fn location_ids() {
        let id = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("location", HeaderValue::from_str(value).unwrap());
            location_id(&headers)
        };
        assert_eq!(
            id(
                "https://graph.microsoft.com/v1.0/communications/calls/57da/operations/17e3b46c-f61d"
            ),
            Some("17e3b46c-f61d".into())
        );
        assert_eq!(id("/operations/abc/?x=1"), Some("abc".into()));
        assert_eq!(location_id(&HeaderMap::new()), None);
    }
}
