//! The ACS emulator: product code that stands in for Azure Communication Services.
//!
//! It serves `participants:remove` the way ACS does: it checks the HMAC signature (with the
//! same [`crate::acs::signing`] functions the client uses), or a bearer token its Entra ID
//! emulator ([`identity`]) issued for ACS, and the repeatability headers,
//! answers `202 {"operationContext": ...}`, then POSTs a realistic CloudEvent array to the
//! request's `operationCallbackUri`. It answers reads of a call and of its participants
//! (`GET …/callConnections/{id}[/participants/{rawId}]`): every participant is on the call
//! until a removal of it succeeds. What happens per call is scriptable through
//! `PUT /emulator/scripts/{callConnectionId}`; every request it received is listed at
//! `GET /emulator/requests`. Run it with `callops emulator`, or in-process (the default
//! configuration does so when no ACS connection string is set).

pub mod callback_signing;
pub mod graph;
pub mod identity;
mod script;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::acs::signing;
use crate::config::{EmulatedOutcome, EmulatorConfig, decode_key};
use crate::emulator::callback_signing::{CallbackSigner, SignerSettings};
use crate::emulator::identity::{Audience, IdentityEmulator, IdentitySettings};

pub use script::{Outcome, Reject, ResultInformation, Script};

/// Requests (and accepted repeatability ids) remembered, at most.
const MAX_RECORDED: usize = 10_000;

/// Largest clock skew accepted in `x-ms-date`, as ACS allows.
const MAX_DATE_SKEW: Duration = Duration::from_secs(15 * 60);

/// Shared emulator state: key, scripts, the request log.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

struct Inner {
    access_key: Vec<u8>,
    default_script: Script,
    scripts: DashMap<String, Script>,
    attempts: DashMap<String, usize>,
    /// Repeatability ids of accepted requests: a retry of one is answered 202 again and
    /// triggers no second callback, as ACS does.
    accepted: DashMap<Uuid, String>,
    /// (call connection, raw id) of participants removed by an accepted, successful removal.
    removed: DashMap<(String, String), ()>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Callback deliveries answered 2xx so far.
    delivered: AtomicUsize,
    http: reqwest::Client,
    /// The Graph half, served on the same listener.
    graph: graph::GraphEmulator,
    /// Signs callbacks; serves the OpenID configurations and keys.
    signer: CallbackSigner,
}

/// One request the emulator received, as the test API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRequest {
    pub method: String,
    pub path_and_query: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    /// What the emulator answered.
    pub status: u16,
    /// A repeat of a request already accepted (same repeatability id): answered as the first
    /// was, and not acted on again, as ACS does.
    pub repeat: bool,
}

/// Marks the answer to a repeat of an accepted request.
#[derive(Clone, Copy)]
struct Repeat;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RemoveParticipantIn {
    participant_to_remove: Option<Value>,
    operation_context: Option<String>,
    operation_callback_uri: Option<String>,
}

impl Emulator {
    /// An emulator with `config`'s key and default script.
    pub fn new(config: &EmulatorConfig) -> Self {
        let access_key = decode_key(&config.access_key).expect("validated at load");
        let default_script = Script {
            outcome: match config.outcome {
                EmulatedOutcome::Succeed => Outcome::Succeed,
                EmulatedOutcome::Fail => Outcome::Fail,
            },
            callback_delay_ms: config.callback_delay_ms,
            ..Script::default()
        };
        let signer = CallbackSigner::new(SignerSettings {
            acs_audience: config.acs_resource_id.clone(),
            graph_audience: config.graph_client_id.clone(),
            tenant_id: config.graph_tenant_id.clone(),
        });
        let identity = IdentityEmulator::new(IdentitySettings {
            tenant_id: config.graph_tenant_id.clone(),
            client_id: config.graph_client_id.clone(),
            client_secret: config.graph_client_secret.clone(),
            certificate: Some(registered_certificate(&config.client_certificate_path)),
            managed_identity_client_id: config.managed_identity_client_id.clone(),
            identity_header: config.identity_header.clone(),
            token_lifetime: Duration::from_secs(config.graph_token_lifetime_secs),
        });
        let graph = graph::GraphEmulator::with_identity(
            graph::GraphEmulatorSettings {
                signer: Some(signer.clone()),
                tenant_id: config.graph_tenant_id.clone(),
                client_id: config.graph_client_id.clone(),
                client_secret: config.graph_client_secret.clone(),
                token_lifetime: Duration::from_secs(config.graph_token_lifetime_secs),
                callback_url: None,
                notification_delay: Duration::from_millis(config.callback_delay_ms),
            },
            identity,
        );
        Self {
            inner: Arc::new(Inner {
                graph,
                signer,
                access_key,
                default_script,
                scripts: DashMap::new(),
                attempts: DashMap::new(),
                accepted: DashMap::new(),
                removed: DashMap::new(),
                requests: Mutex::new(Vec::new()),
                delivered: AtomicUsize::new(0),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("a default reqwest client builds"),
            }),
        }
    }

    /// Sets the script for one call connection.
    pub fn set_script(&self, call_connection_id: &str, script: Script) {
        self.inner.attempts.remove(call_connection_id);
        self.inner
            .scripts
            .insert(call_connection_id.to_owned(), script);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .expect("the request log is never poisoned")
            .clone()
    }

    /// How many callback deliveries the receiver acknowledged so far.
    pub fn callbacks_delivered(&self) -> usize {
        self.inner.delivered.load(Ordering::Relaxed)
    }

    /// The Graph half: token endpoint, media operations, notifications.
    pub fn signer(&self) -> &CallbackSigner {
        &self.inner.signer
    }

    /// The Graph half.
    pub fn graph(&self) -> &graph::GraphEmulator {
        &self.inner.graph
    }

    /// The Entra ID half: token endpoint, managed identity, issued tokens.
    pub fn identity(&self) -> &IdentityEmulator {
        self.inner.graph.identity()
    }

    /// The emulator's routes: ACS's `participants:remove`, Graph's (see [`graph`]) and the
    /// scripting API.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/calling/callConnections/{callConnectionId}/participants:remove",
                post(remove_participant),
            )
            .route(
                "/calling/callConnections/{callConnectionId}",
                get(get_call_connection),
            )
            .route(
                "/calling/callConnections/{callConnectionId}/participants/{participantRawId}",
                get(get_participant),
            )
            .route("/emulator/scripts/{callConnectionId}", put(put_script))
            .route("/emulator/requests", get(get_requests))
            .with_state(self.clone())
            .merge(self.inner.graph.router())
            .merge(self.identity().router())
            .merge(self.inner.signer.router())
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }

    fn record(&self, request: RecordedRequest) {
        let mut requests = self
            .inner
            .requests
            .lock()
            .expect("the request log is never poisoned");
        // A long-running in-process emulator keeps only the recent past.
        if requests.len() >= MAX_RECORDED {
            requests.drain(..MAX_RECORDED / 2);
        }
        requests.push(request);
    }
}

async fn put_script(
    State(emulator): State<Emulator>,
    Path(call_connection_id): Path<String>,
    body: Result<axum::Json<Script>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(script)) => {
            emulator.set_script(&call_connection_id, script);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(rejection) => acs_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &rejection.body_text(),
        ),
    }
}

async fn get_requests(State(emulator): State<Emulator>) -> axum::Json<Vec<RecordedRequest>> {
    axum::Json(emulator.requests())
}

async fn remove_participant(
    State(emulator): State<Emulator>,
    Path(call_connection_id): Path<String>,
    RawQuery(query): RawQuery,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path_and_query = uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    let response = handle_remove(
        &emulator,
        &call_connection_id,
        query.as_deref(),
        &path_and_query,
        &headers,
        &body,
    )
    .await;
    emulator.record(RecordedRequest {
        method: "POST".to_owned(),
        path_and_query,
        headers: headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    value.to_str().unwrap_or("").to_owned(),
                )
            })
            .collect(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        status: response.status().as_u16(),
        repeat: response.extensions().get::<Repeat>().is_some(),
    });
    response
}

async fn handle_remove(
    emulator: &Emulator,
    call_connection_id: &str,
    query: Option<&str>,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if let Err(response) = authenticate(emulator, "POST", path_and_query, headers, body) {
        return response.into_response();
    }
    let has_api_version = query
        .into_iter()
        .flat_map(|q| url::form_urlencoded::parse(q.as_bytes()))
        .any(|(name, value)| name == "api-version" && !value.is_empty());
    if !has_api_version {
        return acs_error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    let repeatability = match check_repeatability(headers) {
        Ok(repeatability) => repeatability,
        Err(response) => return response.into_response(),
    };
    let request: RemoveParticipantIn = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(error) => {
            return acs_error(
                StatusCode::BAD_REQUEST,
                "8523",
                &format!("Invalid request body: {error}"),
            );
        }
    };
    let Some(participant) = request.participant_to_remove else {
        return acs_error(
            StatusCode::BAD_REQUEST,
            "8523",
            "participantToRemove is required.",
        );
    };
    let context = request.operation_context.unwrap_or_default();
    if let Some(request_id) = repeatability
        && emulator.inner.accepted.contains_key(&request_id)
    {
        // A retry of an accepted request: same answer, no second callback.
        let mut response = accepted(&context);
        response.extensions_mut().insert(Repeat);
        return response;
    }

    let script = emulator
        .inner
        .scripts
        .get(call_connection_id)
        .map(|script| script.clone())
        .unwrap_or_else(|| emulator.inner.default_script.clone());
    let attempt = {
        let mut attempts = emulator
            .inner
            .attempts
            .entry(call_connection_id.to_owned())
            .or_insert(0);
        *attempts += 1;
        *attempts
    };
    if let Some(status) = script.fail_first.get(attempt - 1) {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut response = acs_error(status, "ServiceUnavailable", "Scripted transient failure.");
        if let Some(seconds) = script.retry_after_secs {
            response.headers_mut().insert(
                "retry-after",
                seconds
                    .to_string()
                    .parse()
                    .expect("a number is a header value"),
            );
        }
        return response;
    }
    if let Some(reject) = &script.reject {
        let status = StatusCode::from_u16(reject.status).unwrap_or(StatusCode::BAD_REQUEST);
        return acs_error(status, &reject.code, &reject.message);
    }
    if let Some(request_id) = repeatability {
        if emulator.inner.accepted.len() >= MAX_RECORDED {
            emulator.inner.accepted.clear();
        }
        emulator.inner.accepted.insert(request_id, context.clone());
    }
    if let (Outcome::Succeed, Some(raw_id)) = (
        script.outcome,
        participant.get("rawId").and_then(Value::as_str),
    ) {
        if emulator.inner.removed.len() >= MAX_RECORDED {
            emulator.inner.removed.clear();
        }
        emulator
            .inner
            .removed
            .insert((call_connection_id.to_owned(), raw_id.to_owned()), ());
    }

    let callback = match (&request.operation_callback_uri, script.no_callback) {
        (Some(uri), false) => Some((
            uri.clone(),
            build_event(call_connection_id, &context, participant, &script),
        )),
        _ => None,
    };
    if let Some((uri, event)) = callback {
        let emulator = emulator.clone();
        let deliveries = 1 + script.duplicates as usize;
        let delay = Duration::from_millis(script.callback_delay_ms);
        if script.callback_before_response {
            emulator.deliver(&uri, &event, deliveries).await;
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                emulator.deliver(&uri, &event, deliveries).await;
            });
        }
    }
    accepted(&context)
}

/// `GET /calling/callConnections/{id}`: the call, unless scripted ended (404).
async fn get_call_connection(
    State(emulator): State<Emulator>,
    Path(call_connection_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    emulator.read(&call_connection_id, None, &uri, &headers)
}

/// `GET …/participants/{rawId}`: the participant, unless removed or the call ended (404).
async fn get_participant(
    State(emulator): State<Emulator>,
    Path((call_connection_id, raw_id)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    emulator.read(&call_connection_id, Some(&raw_id), &uri, &headers)
}

impl Emulator {
    /// Answers a read of a call (or of one of its participants) as ACS does, and logs it.
    fn read(
        &self,
        call_connection_id: &str,
        raw_id: Option<&str>,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Response {
        let path_and_query = uri
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_default();
        let script = self
            .inner
            .scripts
            .get(call_connection_id)
            .map(|script| script.clone())
            .unwrap_or_else(|| self.inner.default_script.clone());
        let not_found =
            |what: &str| acs_error(StatusCode::NOT_FOUND, "8522", &format!("{what} not found."));
        let response = if let Err(fault) = authenticate(self, "GET", &path_and_query, headers, b"")
        {
            fault.into_response()
        } else if let Some(status) = script.read_status {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            acs_error(status, "ServiceUnavailable", "Scripted read failure.")
        } else if script.call_ended {
            not_found("Call")
        } else {
            match raw_id {
                None => (
                    StatusCode::OK,
                    axum::Json(json!({
                        "callConnectionId": call_connection_id,
                        "callConnectionState": "connected",
                        "serverCallId": STANDARD.encode(format!("emulator:{call_connection_id}")),
                    })),
                )
                    .into_response(),
                Some(raw_id)
                    if self
                        .inner
                        .removed
                        .contains_key(&(call_connection_id.to_owned(), raw_id.to_owned())) =>
                {
                    not_found("Participant")
                }
                Some(raw_id) => (
                    StatusCode::OK,
                    axum::Json(json!({
                        "identifier": {"rawId": raw_id},
                        "isMuted": false,
                        "isOnHold": false,
                    })),
                )
                    .into_response(),
            }
        };
        self.record(RecordedRequest {
            method: "GET".to_owned(),
            path_and_query,
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_owned(),
                        value.to_str().unwrap_or("").to_owned(),
                    )
                })
                .collect(),
            body: Value::Null,
            status: response.status().as_u16(),
            repeat: false,
        });
        response
    }
}

fn accepted(context: &str) -> Response {
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "operationContext": context })),
    )
        .into_response()
}

impl Emulator {
    /// POSTs `event` (a one-element array) `times` times, retrying each a few times on
    /// failure, as ACS retries deliveries.
    async fn deliver(&self, uri: &str, event: &Value, times: usize) {
        let body = json!([event]);
        for _ in 0..times {
            for attempt in 0..3u64 {
                // A new token per delivery, as ACS does.
                let sent = self
                    .inner
                    .http
                    .post(uri)
                    .bearer_auth(self.inner.signer.acs_token())
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => {
                        self.inner.delivered.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(response) => {
                        tracing::warn!(status = %response.status(), "emulator callback refused")
                    }
                    Err(error) => tracing::warn!(error = %error, "emulator callback failed"),
                }
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
            }
        }
    }
}

fn build_event(
    call_connection_id: &str,
    context: &str,
    participant: Value,
    script: &Script,
) -> Value {
    let (event_type, default_result) = match script.outcome {
        Outcome::Succeed => (
            "Microsoft.Communication.RemoveParticipantSucceeded",
            ResultInformation {
                code: 200,
                sub_code: 0,
                message: "The participant was removed from the call.".to_owned(),
            },
        ),
        Outcome::Fail => (
            "Microsoft.Communication.RemoveParticipantFailed",
            ResultInformation {
                code: 400,
                sub_code: 8523,
                message: "The participant could not be removed.".to_owned(),
            },
        ),
    };
    let result = script.result_information.clone().unwrap_or(default_result);
    let source = format!("calling/callConnections/{call_connection_id}");
    let time = OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("now formats");
    json!({
        "id": Uuid::new_v4(),
        "source": source,
        "type": event_type,
        "data": {
            "version": "2024-09-15",
            "operationContext": context,
            "participant": participant,
            "resultInformation": result,
            "callConnectionId": call_connection_id,
            "serverCallId": STANDARD.encode(format!("emulator:{call_connection_id}")),
            "correlationId": Uuid::new_v4(),
            "publicEventType": event_type,
        },
        "time": time,
        "specversion": "1.0",
        "datacontenttype": "application/json",
        "subject": source,
    })
}

/// The compiled-in development certificate of the emulated app (key included, so that a
/// local try of `CALLOPS_GRAPH_CREDENTIAL=certificate` has a file to point at).
pub const DEV_CLIENT_CERTIFICATE: &str = include_str!("keys/dev-client-certificate.pem");

/// The DER certificate in the PEM file at `path`, or the development one. Configuration
/// validation has checked the file exists; one that cannot be used stops the emulator.
fn registered_certificate(path: &str) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = if path.trim().is_empty() {
        DEV_CLIENT_CERTIFICATE.as_bytes().to_vec()
    } else {
        std::fs::read(path.trim())
            .unwrap_or_else(|error| panic!("emulator.client_certificate_path {path}: {error}"))
    };
    CertificateDer::pem_slice_iter(&pem)
        .find_map(Result::ok)
        .map(|der| der.to_vec())
        .unwrap_or_else(|| panic!("emulator.client_certificate_path {path}: no CERTIFICATE"))
}

/// A bearer token issued for ACS, or else the HMAC signature, as ACS accepts either.
fn authenticate(
    emulator: &Emulator,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), AcsFault> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
    if bearer {
        return emulator
            .identity()
            .check_bearer(headers, Audience::Acs)
            .map_err(|message| AcsFault {
                status: StatusCode::UNAUTHORIZED,
                code: "Unauthorized",
                message,
            });
    }
    verify_signature(
        &emulator.inner.access_key,
        method,
        path_and_query,
        headers,
        body,
    )
}

/// Checks the HMAC signature the way ACS does; a 401 in ACS's error shape when wrong.
fn verify_signature(
    key: &[u8],
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), AcsFault> {
    let unauthorized = |message| AcsFault {
        status: StatusCode::UNAUTHORIZED,
        code: "Unauthorized",
        message,
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(date), Some(content_hash), Some(host), Some(authorization)) = (
        header("x-ms-date"),
        header("x-ms-content-sha256"),
        header("host"),
        header("authorization"),
    ) else {
        return Err(unauthorized(
            "Missing x-ms-date, x-ms-content-sha256, host or Authorization header.",
        ));
    };
    if signing::content_hash(body)
        .as_bytes()
        .ct_eq(content_hash.as_bytes())
        .unwrap_u8()
        != 1
    {
        return Err(unauthorized("x-ms-content-sha256 does not match the body."));
    }
    let Ok(sent) = httpdate::parse_http_date(date) else {
        return Err(unauthorized("x-ms-date is not an RFC 1123 date."));
    };
    let now = std::time::SystemTime::now();
    let skew = now
        .duration_since(sent)
        .or_else(|_| sent.duration_since(now))
        .unwrap_or_default();
    if skew > MAX_DATE_SKEW {
        return Err(unauthorized("x-ms-date is too far from the current time."));
    }
    let Some(signature) = authorization
        .strip_prefix("HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=")
    else {
        return Err(unauthorized(
            "Authorization must be HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=<signature>.",
        ));
    };
    let expected = signing::signature(key, method, path_and_query, date, host, content_hash);
    if expected.as_bytes().ct_eq(signature.as_bytes()).unwrap_u8() != 1 {
        return Err(unauthorized("The signature does not match."));
    }
    Ok(())
}

/// Both repeatability headers or neither; a UUID and an IMF-fixdate.
fn check_repeatability(headers: &HeaderMap) -> Result<Option<Uuid>, AcsFault> {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    let bad = |message| AcsFault {
        status: StatusCode::BAD_REQUEST,
        code: "BadRequest",
        message,
    };
    match (
        header("repeatability-request-id"),
        header("repeatability-first-sent"),
    ) {
        (None, None) => Ok(None),
        (Some(id), Some(first_sent)) => {
            let id =
                Uuid::try_parse(id).map_err(|_| bad("Repeatability-Request-ID must be a UUID."))?;
            httpdate::parse_http_date(first_sent)
                .map_err(|_| bad("Repeatability-First-Sent must be an IMF-fixdate."))?;
            Ok(Some(id))
        }
        _ => Err(bad(
            "Repeatability-Request-ID and Repeatability-First-Sent must be sent together.",
        )),
    }
}

/// A refusal in ACS's error shape.
struct AcsFault {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

impl IntoResponse for AcsFault {
    fn into_response(self) -> Response {
        acs_error(self.status, self.code, self.message)
    }
}

/// ACS's error shape.
fn acs_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

#[cfg(test)]
mod tests;
