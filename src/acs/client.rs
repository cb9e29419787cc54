//! The outbound ACS client: Remove Participant, authenticated as the official SDK does it
//! ([`AcsAuth`]: access key or Entra ID token), retried safely, and the participant read a
//! reconciliation asks (`participant`).
//!
//! Retries are safe because every attempt carries the same `Repeatability-Request-ID` /
//! `Repeatability-First-Sent` pair, created once per operation by [`Repeatability::new`].
//! Each attempt is authenticated afresh (a new `x-ms-date` and signature, or the current
//! token); a 401 to a bearer token drops that token and is retried once with a new one. Transient failures (connection errors,
//! timeouts, 408, 429, 5xx) are retried with exponential backoff and full jitter, honouring
//! `Retry-After`, within the attempt and total-time bounds of [`RetryConfig`].

use std::sync::atomic::{AtomicBool, Ordering};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::time::Instant;
use url::Url;
use uuid::Uuid;

use crate::acs::auth::AcsAuth;
use crate::acs::identifier::CommunicationIdentifier;
use crate::config::{AcsConfig, RetryConfig};
use crate::identity::TokenError;
use crate::metrics::Metrics;
use crate::trace_context::{TRACEPARENT, TraceParent};
use crate::upstream::{self, AttemptError, Retried, TransientError};

/// The repeatability pair of one operation, resent unchanged on every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeatability {
    pub request_id: Uuid,
    /// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
    pub first_sent: String,
}

impl Repeatability {
    /// A fresh pair: a UUID v4 and the current time.
    pub fn new() -> Self {
        Self {
            request_id: Uuid::new_v4(),
            first_sent: httpdate::fmt_http_date(std::time::SystemTime::now()),
        }
    }
}

impl Default for Repeatability {
    fn default() -> Self {
        Self::new()
    }
}

/// One Remove Participant request.
#[derive(Debug, Clone)]
pub struct RemoveParticipant {
    pub call_connection_id: String,
    /// Already normalised (see [`CommunicationIdentifier::normalize`]).
    pub participant: CommunicationIdentifier,
    pub operation_context: String,
    pub repeatability: Repeatability,
    /// The client's trace context, passed on.
    pub traceparent: Option<TraceParent>,
}

/// How a Remove Participant request ended, when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum AcsError {
    /// ACS refused the request for good (a 4xx other than 408/429).
    #[error("ACS rejected the request with {status}: {}", .message.as_deref().unwrap_or("no message"))]
    Rejected {
        status: StatusCode,
        code: Option<String>,
        message: Option<String>,
    },
    /// No Entra ID token could be had for good (wrong credential or identity).
    #[error("no ACS access token: {0}")]
    Token(TokenError),
    /// Every attempt failed transiently, or the retry budget ran out.
    #[error("ACS did not accept the request after {attempts} attempt(s)")]
    Unavailable {
        attempts: u32,
        #[source]
        last: TransientError,
    },
}

/// Whether ACS still lists a participant on a call (`GET …/participants/{rawId}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParticipantReading {
    Present,
    /// The call is there, the participant is not.
    Gone,
    /// ACS does not know the call (any more).
    CallGone,
}

/// What a path segment escapes: everything but the unreserved characters, as the SDKs'
/// URL serializer does (`8:acs:x` → `8%3Aacs%3Ax`, `+` → `%2B`).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// ACS Call Automation client.
#[derive(Clone)]
pub struct AcsClient {
    http: reqwest::Client,
    auth: AcsAuth,
    api_version: String,
    callback_url: Url,
    retry: RetryConfig,
    metrics: Metrics,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RemoveParticipantRequestOut<'a> {
    participant_to_remove: &'a CommunicationIdentifier,
    operation_context: &'a str,
    operation_callback_uri: &'a str,
}

impl AcsClient {
    /// A client authenticated by `auth`, calling back `callback_url`.
    pub fn new(
        config: &AcsConfig,
        auth: AcsAuth,
        callback_url: Url,
        http: reqwest::Client,
        metrics: Metrics,
    ) -> Self {
        Self {
            http,
            metrics,
            auth,
            api_version: config.api_version.clone(),
            callback_url,
            retry: config.retry.clone(),
        }
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &Url {
        self.auth.endpoint()
    }

    /// How requests are authenticated.
    pub fn auth(&self) -> &AcsAuth {
        &self.auth
    }

    /// Sends Remove Participant until ACS accepts it (202), refuses it for good, or the retry
    /// budget runs out.
    #[tracing::instrument(skip_all, fields(call.connection_id = %request.call_connection_id))]
    pub async fn remove_participant(&self, request: &RemoveParticipant) -> Result<(), AcsError> {
        let url = self.remove_participant_url(&request.call_connection_id);
        let body = serde_json::to_vec(&RemoveParticipantRequestOut {
            participant_to_remove: &request.participant,
            operation_context: &request.operation_context,
            operation_callback_uri: self.callback_url.as_str(),
        })
        .expect("the request serialises");
        let started = Instant::now();
        let refreshed = AtomicBool::new(false);
        let result = upstream::with_retries(&self.retry, "acs", &self.metrics, || {
            self.attempt(&url, &body, request, &refreshed)
        })
        .await;
        match result {
            Ok(()) => {
                tracing::info!(
                    duration_ms = started.elapsed().as_millis() as u64,
                    "ACS accepted remove participant"
                );
                Ok(())
            }
            Err(Retried::Final(error)) => Err(error),
            Err(Retried::Exhausted { attempts, last }) => {
                Err(AcsError::Unavailable { attempts, last })
            }
        }
    }

    /// Whether ACS still lists `raw_id` on the call, as the SDK's `get_participant` asks
    /// (`GET /calling/callConnections/{id}/participants/{rawId}`); a 404 is told apart (call
    /// gone or participant gone) by reading the call (`GET /calling/callConnections/{id}`).
    /// Transient failures are retried within `acs.retry`.
    #[tracing::instrument(skip_all, fields(call.connection_id = %call_connection_id))]
    pub async fn participant(
        &self,
        call_connection_id: &str,
        raw_id: &str,
    ) -> Result<ParticipantReading, AcsError> {
        let participant = self.read_url(call_connection_id, Some(raw_id));
        if self.found(&participant).await? {
            return Ok(ParticipantReading::Present);
        }
        let call = self.read_url(call_connection_id, None);
        Ok(if self.found(&call).await? {
            ParticipantReading::Gone
        } else {
            ParticipantReading::CallGone
        })
    }

    /// `GET url`: `true` on 200, `false` on 404, retried while transient.
    async fn found(&self, url: &Url) -> Result<bool, AcsError> {
        let refreshed = AtomicBool::new(false);
        let result = upstream::with_retries(&self.retry, "acs", &self.metrics, || async {
            let mut headers = HeaderMap::new();
            headers.insert("accept", HeaderValue::from_static("application/json"));
            headers.insert(
                "x-ms-client-request-id",
                HeaderValue::from_str(&Uuid::new_v4().to_string()).expect("a UUID is ASCII"),
            );
            let token = match self
                .auth
                .authorize_request("GET", &mut headers, url, b"")
                .await
            {
                Ok(token) => token,
                Err(error) if error.is_transient() => {
                    return Err(AttemptError::Transient {
                        error: TransientError::Status {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                        },
                        retry_after: None,
                    });
                }
                Err(error) => return Err(AttemptError::Final(AcsError::Token(error))),
            };
            let response = self
                .http
                .get(url.clone())
                .headers(headers)
                .send()
                .await
                .map_err(AttemptError::transport)?;
            match response.status() {
                StatusCode::OK => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                StatusCode::UNAUTHORIZED
                    if token.is_some() && !refreshed.swap(true, Ordering::Relaxed) =>
                {
                    if let Some(token) = &token {
                        self.auth.refused(token);
                    }
                    Err(AttemptError::Transient {
                        error: TransientError::Status {
                            status: StatusCode::UNAUTHORIZED,
                        },
                        retry_after: Some(std::time::Duration::ZERO),
                    })
                }
                _ => Err(
                    upstream::failure(response, |status, code, message| AcsError::Rejected {
                        status,
                        code,
                        message,
                    })
                    .await,
                ),
            }
        })
        .await;
        match result {
            Ok(found) => Ok(found),
            Err(Retried::Final(error)) => Err(error),
            Err(Retried::Exhausted { attempts, last }) => {
                Err(AcsError::Unavailable { attempts, last })
            }
        }
    }

    /// `…/calling/callConnections/{id}[/participants/{rawId}]?api-version=…`, each id
    /// escaped as the SDK escapes it.
    fn read_url(&self, call_connection_id: &str, raw_id: Option<&str>) -> Url {
        let escape = |text| percent_encoding::utf8_percent_encode(text, SEGMENT).to_string();
        let mut url = self.auth.endpoint().clone();
        let mut path = url.path().trim_end_matches('/').to_owned();
        path.push_str("/calling/callConnections/");
        path.push_str(&escape(call_connection_id));
        if let Some(raw_id) = raw_id {
            path.push_str("/participants/");
            path.push_str(&escape(raw_id));
        }
        url.set_path(&path);
        url.query_pairs_mut()
            .clear()
            .append_pair("api-version", &self.api_version);
        url
    }

    fn remove_participant_url(&self, call_connection_id: &str) -> Url {
        let mut url = self.auth.endpoint().clone();
        url.path_segments_mut()
            .expect("the endpoint is an http(s) URL")
            .pop_if_empty()
            .extend([
                "calling",
                "callConnections",
                call_connection_id,
                "participants:remove",
            ]);
        url.query_pairs_mut()
            .append_pair("api-version", &self.api_version);
        url
    }

    async fn attempt(
        &self,
        url: &Url,
        body: &[u8],
        request: &RemoveParticipant,
        refreshed: &AtomicBool,
    ) -> Result<(), AttemptError<AcsError>> {
        let mut headers = request_headers(&request.repeatability);
        let token = match self.auth.authorize(&mut headers, url, body).await {
            Ok(token) => token,
            Err(error) if error.is_transient() => {
                tracing::warn!(error = %error, "no ACS token yet");
                return Err(AttemptError::Transient {
                    error: TransientError::Status {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                    },
                    retry_after: None,
                });
            }
            Err(error) => return Err(AttemptError::Final(AcsError::Token(error))),
        };
        if let Some(traceparent) = &request.traceparent {
            headers.insert(TRACEPARENT, traceparent.header_value().clone());
        }
        let response = self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body.to_vec())
            .send()
            .await
            .map_err(AttemptError::transport)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if let Some(token) = &token
            && status == StatusCode::UNAUTHORIZED
            && !refreshed.swap(true, Ordering::Relaxed)
        {
            // The token was revoked or expired early: once, with a fresh one.
            self.auth.refused(token);
            tracing::info!("ACS refused the token; retrying once with a new one");
            return Err(AttemptError::Transient {
                error: TransientError::Status { status },
                retry_after: Some(std::time::Duration::ZERO),
            });
        }
        // A final refusal keeps the upstream's own code and message.
        Err(
            upstream::failure(response, |status, code, message| AcsError::Rejected {
                status,
                code,
                message,
            })
            .await,
        )
    }
}

/// The headers of every attempt but authentication: what the SDK sends (a new client
/// request id per attempt, the operation's repeatability pair).
fn request_headers(repeatability: &Repeatability) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        let value = HeaderValue::from_str(value).expect("header values are ASCII");
        headers.insert(name, value);
    };
    put("content-type", "application/json");
    put("accept", "application/json");
    put(
        "repeatability-request-id",
        &repeatability.request_id.to_string(),
    );
    put("repeatability-first-sent", &repeatability.first_sent);
    put("x-ms-client-request-id", &Uuid::new_v4().to_string());
    headers
}

#[cfg(test)]
mod tests {
    use url::Position;

    use super::*;
    use crate::acs::connection_string::ConnectionString;
    use crate::acs::signing;

    fn make_client(endpoint: &str) -> AcsClient {
        let config = crate::config::Config::embedded();
        let connection = ConnectionString::new(Url::parse(endpoint).unwrap(), vec![b'0'; 32]);
        AcsClient::new(
            &config.acs,
            AcsAuth::Key(connection),
            Url::parse("https://app.contoso.com/callback").unwrap(),
            reqwest::Client::new(),
            Metrics::new(),
        )
    }

    #[test]
    fn url_matches_the_sdk_path() {
        let client = make_client("http://127.0.0.1:18555/");
        let url = client.remove_participant_url("18dea47f-b081-4107-9a5c-4300819d2c6c");
        assert_eq!(
            &url[Position::BeforePath..],
            "/calling/callConnections/18dea47f-b081-4107-9a5c-4300819d2c6c/participants:remove?api-version=2024-09-15"
        );
        let client = make_client("https://res.communication.azure.com/prefix/");
        let url = client.remove_participant_url("a/b");
        assert_eq!(
            url.as_str(),
            "https://res.communication.azure.com/prefix/calling/callConnections/a%2Fb/participants:remove?api-version=2024-09-15"
        );
    }

    #[test]
    fn reads_use_the_sdk_paths_with_ids_escaped() {
        let client = make_client("https://res.communication.azure.com/");
        let url = client.read_url("c/1", Some("4:+14255550123"));
        assert_eq!(
            &url[Position::BeforePath..],
            "/calling/callConnections/c%2F1/participants/4%3A%2B14255550123?api-version=2024-09-15"
        );
        let url = client.read_url("c1", None);
        assert_eq!(
            &url[Position::BeforePath..],
            "/calling/callConnections/c1?api-version=2024-09-15"
        );
    }

    #[test]
    fn body_matches_the_sdk_body() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/sdk-requests/acs_remove_participant.python-sdk-1.6.0.json"
        ))
        .unwrap();
        let want = &fixture["requests"]["communicationUser"]["body"];
        let participant = CommunicationIdentifier::communication_user("8:acs:abc_def");
        let body = serde_json::to_value(RemoveParticipantRequestOut {
            participant_to_remove: &participant,
            operation_context: "ctx-1",
            operation_callback_uri: "https://app.contoso.com/callback",
        })
        .unwrap();
        assert_eq!(&body, want);
    }

    #[tokio::test]
    async fn signed_headers_carry_host_with_port_and_repeatability() {
        let client = make_client("http://127.0.0.1:18555/");
        let url = client.remove_participant_url("c1");
        let repeatability = Repeatability::new();
        let mut headers = request_headers(&repeatability);
        let token = client
            .auth
            .authorize(&mut headers, &url, b"{}")
            .await
            .unwrap();
        assert!(token.is_none());
        assert_eq!(headers["x-ms-return-client-request-id"], "true");
        let date = headers["x-ms-date"].to_str().unwrap();
        let want = signing::sign(
            &[b'0'; 32],
            "POST",
            "/calling/callConnections/c1/participants:remove?api-version=2024-09-15",
            "127.0.0.1:18555",
            date,
            b"{}",
        );
        assert_eq!(headers["authorization"], want.authorization.as_str());
        assert_eq!(
            headers["repeatability-request-id"],
            repeatability.request_id.to_string().as_str()
        );
        assert!(
            httpdate::parse_http_date(headers["repeatability-first-sent"].to_str().unwrap())
                .is_ok()
        );
    }
}
