//! The Microsoft Graph emulator: stands in for Entra ID's token endpoint and Graph's
//! cloud-communications media operations (`playPrompt`, `recordResponse`,
//! `cancelMediaProcessing`), then POSTs `commsNotifications` the way Graph does.
//!
//! Its token endpoint is the Entra ID emulator's ([`IdentityEmulator`]), and the Graph routes
//! accept only the tokens that one issued for Graph. `playPrompt` and `recordResponse` queue a media operation on the call;
//! `cancelMediaProcessing` drains that queue, answers with a `cancelMediaProcessingOperation`
//! and sends one `deleted` notification per cancelled operation (carrying that operation's own
//! `clientContext`), plus one for the cancel itself when it was not finished in the response.
//! What happens per call is scriptable through `PUT /emulator/graph/calls/{callId}`; every
//! Graph and token request is listed, secrets redacted, at `GET /emulator/graph/requests`.
//!
//! It must not log secrets or tokens, and it never panics on request data.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

use crate::emulator::callback_signing::CallbackSigner;
use crate::emulator::identity::{Audience, IdentityEmulator, IdentitySettings};
use crate::emulator::{RecordedRequest, Reject};
use crate::graph::ids::canonical;

/// Requests remembered, at most (as the ACS emulator).
const MAX_RECORDED: usize = 10_000;

/// Queued media operations kept per call, at most; the oldest go first.
const MAX_QUEUED_PER_CALL: usize = 1_000;

/// Calls with queued operations, at most.
const MAX_CALLS: usize = 10_000;

/// Graph's limit on `clientContext`.
const MAX_CLIENT_CONTEXT: usize = 256;

/// Largest request body read.
const MAX_BODY: usize = 1 << 20;

/// What Graph's calling platform sends as `User-Agent` on notifications.
const NOTIFICATION_USER_AGENT: &str = "Microsoft-Skype/3.0,(Calling/1.0)";

/// The token route; its form body is recorded field by field, credentials redacted.
const TOKEN_ROUTE_SUFFIX: &str = "/oauth2/v2.0/token";

/// How the emulator is set up.
#[derive(Clone)]
pub struct GraphEmulatorSettings {
    /// The only tenant the token endpoint knows (compared case-insensitively).
    pub tenant_id: String,
    /// The only app it issues tokens to (compared case-insensitively).
    pub client_id: String,
    /// That app's secret; never logged, redacted from `Debug` and the request log.
    pub client_secret: String,
    /// `expires_in` of issued tokens; they are refused after it.
    pub token_lifetime: Duration,
    /// Default target of notifications (callops' `/callbacks/graph`).
    pub callback_url: Option<Url>,
    /// Default delay between the cancel's answer and its notifications.
    pub notification_delay: Duration,
    /// Signs notifications with a bearer token (none: unsigned).
    pub signer: Option<CallbackSigner>,
}

impl fmt::Debug for GraphEmulatorSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GraphEmulatorSettings")
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("token_lifetime", &self.token_lifetime)
            .field("callback_url", &self.callback_url)
            .field("notification_delay", &self.notification_delay)
            .field("signed", &self.signer.is_some())
            .finish()
    }
}

/// What the emulator does for one call. Every field is optional in JSON; the default answers
/// the cancel `completed` and notifies at once (after the default delay).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GraphScript {
    /// Status of the `cancelMediaProcessingOperation` in the answer.
    pub cancel_status: CancelStatus,
    /// Overrides the default delay before notifications.
    pub notification_delay_ms: Option<u64>,
    /// Extra deliveries of every notification (identical bytes).
    pub duplicates: u32,
    /// Deliver the notifications, awaited, before answering the cancel.
    pub notifications_before_response: bool,
    /// Answer, and never notify.
    pub no_notifications: bool,
    /// Statuses answered to the first cancel attempts (e.g. `[429, 503]`).
    pub fail_first: Vec<u16>,
    /// `Retry-After` sent with those statuses, fractions as given (e.g. `0.128`).
    pub retry_after_secs: Option<f64>,
    /// Refuse the cancel for good with this status and Graph error.
    pub reject: Option<Reject>,
    /// Answer `202 Accepted` with only a `Location` header, as an early beta did. The status
    /// is then unknown to the client, so the cancel's own notification follows too.
    pub empty_body: bool,
    /// Where this call's notifications go instead of the default callback URL.
    pub callback_uri: Option<String>,
    /// The call has ended: `GET /communications/calls/{id}` answers 404.
    pub call_ended: bool,
    /// `GET /communications/calls/{id}` answers this status (e.g. 503) instead.
    pub read_status: Option<u16>,
    /// The cancel's own notification carries no `clientContext`: it names the cancel by
    /// Graph's operation id alone.
    pub notification_without_context: bool,
}

/// The status a cancel is answered with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelStatus {
    /// Finished in the answer: only the cancelled operations are notified.
    #[default]
    Completed,
    /// Still running: the cancel's own `completed` notification follows the others.
    Running,
}

/// The Graph emulator: a cheap handle to shared state.
#[derive(Clone)]
pub struct GraphEmulator {
    inner: Arc<Inner>,
}

struct Inner {
    settings: GraphEmulatorSettings,
    callback_url: RwLock<Option<Url>>,
    /// The directory: the token endpoint and the tokens it issued.
    identity: IdentityEmulator,
    scripts: DashMap<String, GraphScript>,
    /// Cancel attempts per call, for `failFirst`.
    attempts: DashMap<String, usize>,
    /// Media operations queued per call, oldest first.
    queues: DashMap<String, Vec<MediaOperation>>,
    requests: Mutex<Vec<RecordedRequest>>,
    delivered: AtomicUsize,
    http: reqwest::Client,
}

/// A queued `playPrompt` or `recordResponse`.
#[derive(Debug, Clone)]
struct MediaOperation {
    id: Uuid,
    kind: MediaKind,
    client_context: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MediaKind {
    PlayPrompt,
    Record,
}

impl MediaKind {
    fn odata_type(self) -> &'static str {
        match self {
            Self::PlayPrompt => "#microsoft.graph.playPromptOperation",
            Self::Record => "#microsoft.graph.recordOperation",
        }
    }
}

/// The body of `playPrompt`, `recordResponse` and `cancelMediaProcessing`: only
/// `clientContext` matters here (prompts and recording options are accepted and ignored).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationIn {
    client_context: Option<String>,
}

impl GraphEmulator {
    /// An emulator that knows one app (`settings`) and no tokens yet.
    pub fn new(settings: GraphEmulatorSettings) -> Self {
        let identity = IdentityEmulator::new(IdentitySettings {
            tenant_id: settings.tenant_id.clone(),
            client_id: settings.client_id.clone(),
            client_secret: settings.client_secret.clone(),
            certificate: None,
            managed_identity_client_id: String::new(),
            identity_header: String::new(),
            token_lifetime: settings.token_lifetime,
        });
        Self::with_identity(settings, identity)
    }

    /// An emulator whose tokens come from `identity` (shared with the ACS emulator).
    pub fn with_identity(settings: GraphEmulatorSettings, identity: IdentityEmulator) -> Self {
        Self {
            inner: Arc::new(Inner {
                callback_url: RwLock::new(settings.callback_url.clone()),
                settings,
                identity,
                scripts: DashMap::new(),
                attempts: DashMap::new(),
                queues: DashMap::new(),
                requests: Mutex::new(Vec::new()),
                delivered: AtomicUsize::new(0),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("a default reqwest client builds"),
            }),
        }
    }

    /// Sets the default notification target (callops knows its URL only once bound).
    pub fn set_callback_url(&self, url: Url) {
        *self
            .inner
            .callback_url
            .write()
            .expect("the callback URL lock is never poisoned") = Some(url);
    }

    /// The token endpoint, the Graph routes and the scripting API, state applied.
    pub fn router(&self) -> Router {
        // Only upstream routes are recorded: the layer wraps the routes added before it.
        Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(issue_token))
            .route(
                "/v1.0/communications/calls/{callId}/playPrompt",
                post(play_prompt),
            )
            .route(
                "/v1.0/communications/calls/{callId}/recordResponse",
                post(record_response),
            )
            .route(
                "/v1.0/communications/calls/{callId}/cancelMediaProcessing",
                post(cancel_media_processing),
            )
            .route("/v1.0/communications/calls/{callId}", get(get_call))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                record_request,
            ))
            .route("/emulator/graph/calls/{callId}", put(put_script))
            .route("/emulator/graph/requests", get(get_requests))
            .route("/emulator/graph/tokens:expire", post(expire_tokens))
            .with_state(self.clone())
    }

    /// Sets the script for one call and resets its attempt counter.
    pub fn set_script(&self, call_id: &str, script: GraphScript) {
        let call_id = canonical(call_id);
        self.inner.attempts.remove(call_id.as_ref());
        self.inner.scripts.insert(call_id.into_owned(), script);
    }

    /// Token requests answered 200 so far.
    pub fn token_requests(&self) -> usize {
        self.inner.identity.token_requests()
    }

    /// The directory behind the token endpoint.
    pub fn identity(&self) -> &IdentityEmulator {
        &self.inner.identity
    }

    /// Every recorded request (token requests too), secrets redacted.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .expect("the request log is never poisoned")
            .clone()
    }

    /// Notification POSTs the receiver answered 2xx so far.
    pub fn notifications_delivered(&self) -> usize {
        self.inner.delivered.load(Ordering::Relaxed)
    }

    /// The tokens issued and still valid (so that tests can look for them where they must
    /// not be, e.g. in logs).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.identity.issued_tokens()
    }

    /// Makes every token issued so far invalid (to test refresh-on-401).
    pub fn expire_tokens(&self) {
        self.inner.identity.expire_tokens();
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

    fn script(&self, call_id: &str) -> GraphScript {
        self.inner
            .scripts
            .get(call_id)
            .map(|script| script.clone())
            .unwrap_or_default()
    }

    /// Accepts only `Bearer <a token the directory issued for Graph, still valid>`.
    fn check_bearer(&self, headers: &HeaderMap) -> Result<(), GraphFault> {
        self.inner
            .identity
            .check_bearer(headers, Audience::Graph)
            .map_err(GraphFault::Unauthorized)
    }

    /// Queues a media operation on `call_id`.
    fn enqueue(&self, call_id: &str, operation: MediaOperation) {
        let queues = &self.inner.queues;
        if queues.len() >= MAX_CALLS && !queues.contains_key(call_id) {
            queues.clear();
        }
        let mut queue = queues.entry(call_id.to_owned()).or_default();
        if queue.len() >= MAX_QUEUED_PER_CALL {
            queue.remove(0);
        }
        queue.push(operation);
    }

    fn notification_target(&self, script: &GraphScript) -> Option<String> {
        match &script.callback_uri {
            Some(uri) => Some(uri.clone()),
            None => self
                .inner
                .callback_url
                .read()
                .expect("the callback URL lock is never poisoned")
                .as_ref()
                .map(Url::to_string),
        }
    }

    /// Sends `notifications` as `script` says: to its target, after its delay in a task of
    /// their own, or awaited before the answer.
    async fn notify(&self, call_id: &str, script: &GraphScript, notifications: Vec<Value>) {
        if notifications.is_empty() {
            return;
        }
        let Some(uri) = self.notification_target(script) else {
            tracing::warn!(
                call.id = %call_id,
                "graph emulator has no callback URL; notifications dropped"
            );
            return;
        };
        // Serialized once, so that duplicates are the same bytes.
        let bodies = notifications
            .iter()
            .map(|notification| serde_json::to_vec(notification).expect("a JSON value serializes"))
            .collect::<Vec<_>>();
        let times = 1 + script.duplicates as usize;
        if script.notifications_before_response {
            self.deliver(&uri, &bodies, times).await;
            return;
        }
        let delay = script.notification_delay_ms.map_or(
            self.inner.settings.notification_delay,
            Duration::from_millis,
        );
        let emulator = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            emulator.deliver(&uri, &bodies, times).await;
        });
    }

    /// POSTs each notification `times` times, in order; failures are logged, not retried.
    async fn deliver(&self, uri: &str, notifications: &[Vec<u8>], times: usize) {
        for body in notifications {
            // A redelivery carries the same message id, as a duplicate from Graph does.
            let message_id = Uuid::new_v4().to_string();
            for _ in 0..times {
                let mut request = self.inner.http.post(uri);
                if let Some(signer) = &self.inner.settings.signer {
                    request = request.bearer_auth(signer.graph_token());
                }
                let sent = request
                    .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
                    .header(header::USER_AGENT, NOTIFICATION_USER_AGENT)
                    .header(header::ACCEPT, "application/json")
                    .header("x-microsoft-skype-message-id", &message_id)
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => {
                        self.inner.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => tracing::warn!(
                        status = %response.status(),
                        "graph emulator notification refused"
                    ),
                    Err(error) => {
                        tracing::warn!(error = %error, "graph emulator notification failed")
                    }
                }
            }
        }
    }
}

/// Records every upstream request with the status answered; secrets never reach the log.
async fn record_request(
    State(emulator): State<GraphEmulator>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let value = value.to_str().unwrap_or("");
            let value = if *name == header::AUTHORIZATION {
                redact_authorization(value)
            } else {
                value.to_owned()
            };
            (name.as_str().to_owned(), value)
        })
        .collect::<BTreeMap<_, _>>();
    let method = parts.method.to_string();
    let (bytes, response) = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => {
            let request = Request::from_parts(parts, Body::from(bytes.clone()));
            (bytes, next.run(request).await)
        }
        Err(_) => (
            Bytes::new(),
            graph_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                "The request body is too large.",
            ),
        ),
    };
    let body = if path_and_query
        .split('?')
        .next()
        .is_some_and(|path| path.ends_with(TOKEN_ROUTE_SUFFIX))
    {
        redacted_form(&bytes)
    } else {
        recorded_body(&bytes)
    };
    emulator.record(RecordedRequest {
        method,
        path_and_query,
        headers,
        body,
        status: response.status().as_u16(),
        repeat: false,
    });
    response
}

/// `Bearer abc` → `Bearer <redacted>`: the scheme stays, the credential goes.
fn redact_authorization(value: &str) -> String {
    match value.trim().split_once(' ') {
        Some((scheme, _)) => format!("{scheme} <redacted>"),
        None => "<redacted>".to_owned(),
    }
}

/// The form fields as a JSON object, `client_secret` and `client_assertion` redacted.
fn redacted_form(bytes: &[u8]) -> Value {
    let fields = url::form_urlencoded::parse(bytes)
        .map(|(name, value)| {
            let value = if name == "client_secret" || name == "client_assertion" {
                "<redacted>".to_owned()
            } else {
                value.into_owned()
            };
            (name.into_owned(), Value::String(value))
        })
        .collect::<serde_json::Map<_, _>>();
    Value::Object(fields)
}

/// JSON when it parses, else the text, else null.
fn recorded_body(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

async fn issue_token(
    State(emulator): State<GraphEmulator>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    emulator.inner.identity.token_endpoint(&tenant, host, &body)
}

async fn play_prompt(
    State(emulator): State<GraphEmulator>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call_id = canonical(&call_id);
    start_media_operation(&emulator, &call_id, MediaKind::PlayPrompt, &headers, &body)
}

async fn record_response(
    State(emulator): State<GraphEmulator>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call_id = canonical(&call_id);
    start_media_operation(&emulator, &call_id, MediaKind::Record, &headers, &body)
}

fn start_media_operation(
    emulator: &GraphEmulator,
    call_id: &str,
    kind: MediaKind,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if let Err(fault) = emulator.check_bearer(headers) {
        return fault.into_response();
    }
    let client_context = match parse_operation(body) {
        Ok(client_context) => client_context.unwrap_or_else(|| Uuid::new_v4().to_string()),
        Err(fault) => return fault.into_response(),
    };
    let operation = MediaOperation {
        id: Uuid::new_v4(),
        kind,
        client_context,
    };
    let mut out = json!({
        "@odata.type": kind.odata_type(),
        "id": operation.id,
        "status": "running",
        "clientContext": operation.client_context,
    });
    if kind == MediaKind::Record {
        out["resultInfo"] = Value::Null;
        out["recordingLocation"] = Value::Null;
    }
    let location = operation_location(headers, call_id, &operation.id);
    emulator.enqueue(call_id, operation);
    with_location(axum::Json(out).into_response(), &location)
}

async fn cancel_media_processing(
    State(emulator): State<GraphEmulator>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(fault) = emulator.check_bearer(&headers) {
        return fault.into_response();
    }
    // A call's queue, script and attempts are found whichever way its id is spelled.
    let call_id = canonical(&call_id).into_owned();
    let client_context = match parse_operation(&body) {
        Ok(client_context) => client_context,
        Err(fault) => return fault.into_response(),
    };
    let script = emulator.script(&call_id);
    let attempt = {
        let mut attempts = emulator.inner.attempts.entry(call_id.clone()).or_insert(0);
        *attempts += 1;
        *attempts
    };
    if let Some(status) = script.fail_first.get(attempt - 1) {
        return transient_error(*status, script.retry_after_secs);
    }
    if let Some(reject) = &script.reject {
        let status = StatusCode::from_u16(reject.status).unwrap_or(StatusCode::BAD_REQUEST);
        return graph_error(status, &reject.code, &reject.message);
    }

    let cancelled = emulator
        .inner
        .queues
        .remove(&call_id)
        .map(|(_, queue)| queue)
        .unwrap_or_default();
    let cancel_id = Uuid::new_v4();
    let status = match script.cancel_status {
        CancelStatus::Completed => "completed",
        CancelStatus::Running => "running",
    };
    let location = operation_location(&headers, &call_id, &cancel_id);

    if !script.no_notifications {
        let mut notifications = cancelled
            .iter()
            .map(|operation| cancelled_notification(&call_id, operation))
            .collect::<Vec<_>>();
        // Without a status in the answer the client waits for the cancel's own notification.
        if script.cancel_status == CancelStatus::Running || script.empty_body {
            let named = client_context
                .as_deref()
                .filter(|_| !script.notification_without_context);
            notifications.push(cancel_notification(&call_id, &cancel_id, named));
        }
        emulator.notify(&call_id, &script, notifications).await;
    }

    if script.empty_body {
        return with_location(StatusCode::ACCEPTED.into_response(), &location);
    }
    let out = json!({
        "@odata.type": "#microsoft.graph.cancelMediaProcessingOperation",
        "status": status,
        "clientContext": client_context,
        "id": cancel_id,
    });
    with_location(axum::Json(out).into_response(), &location)
}

/// `GET /communications/calls/{id}`: the call, unless scripted ended (404).
async fn get_call(
    State(emulator): State<GraphEmulator>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(fault) = emulator.check_bearer(&headers) {
        return fault.into_response();
    }
    let call_id = canonical(&call_id).into_owned();
    let script = emulator.script(&call_id);
    if let Some(status) = script.read_status {
        return transient_error(status, None);
    }
    if script.call_ended {
        return graph_error(StatusCode::NOT_FOUND, "8522", "Call not found.");
    }
    axum::Json(json!({
        "@odata.type": "#microsoft.graph.call",
        "id": call_id,
        "state": "established",
        "direction": "incoming",
    }))
    .into_response()
}

/// The `clientContext` of an operation request; a Graph 400 when the body is not a JSON
/// object or the context is too long.
fn parse_operation(body: &[u8]) -> Result<Option<String>, GraphFault> {
    let request: OperationIn = serde_json::from_slice(body).map_err(|error| {
        GraphFault::BadRequest(format!(
            "The request body is not a valid JSON object: {error}"
        ))
    })?;
    match request.client_context {
        Some(context) if context.chars().count() > MAX_CLIENT_CONTEXT => {
            Err(GraphFault::BadRequest(format!(
                "clientContext must be at most {MAX_CLIENT_CONTEXT} characters long."
            )))
        }
        context => Ok(context),
    }
}

/// The `deleted` notification of a cancelled media operation, in Graph's shape.
fn cancelled_notification(call_id: &str, operation: &MediaOperation) -> Value {
    let resource_url = resource_url(call_id, &operation.id);
    let mut data = json!({
        "@odata.type": operation.kind.odata_type(),
        "@odata.id": resource_url,
        "@odata.etag": etag(),
        "id": operation.id,
        "clientContext": operation.client_context,
        "status": "failed",
        "resultInfo": {
            "@odata.type": "#microsoft.graph.resultInfo",
            "code": 400,
            "subcode": 8508,
            "message": "Action failed, the operation was cancelled.",
        },
        "completionReason": "operationCanceled",
    });
    if operation.kind == MediaKind::Record {
        data["recordingLocation"] = json!("");
        data["recordingAccessToken"] = json!("");
    }
    notification(&resource_url, data)
}

/// The notification that a running cancel completed.
fn cancel_notification(call_id: &str, cancel_id: &Uuid, client_context: Option<&str>) -> Value {
    let resource_url = resource_url(call_id, cancel_id);
    let data = json!({
        "@odata.type": "#microsoft.graph.cancelMediaProcessingOperation",
        "@odata.id": resource_url,
        "@odata.etag": etag(),
        "id": cancel_id,
        "clientContext": client_context,
        "status": "completed",
        "resultInfo": {
            "@odata.type": "#microsoft.graph.resultInfo",
            "code": 200,
            "subcode": 0,
            "message": "Action completed successfully.",
        },
    });
    notification(&resource_url, data)
}

fn notification(resource_url: &str, resource_data: Value) -> Value {
    json!({
        "@odata.type": "#microsoft.graph.commsNotifications",
        "value": [{
            "@odata.type": "#microsoft.graph.commsNotification",
            "changeType": "deleted",
            "resourceUrl": resource_url,
            "resourceData": resource_data,
        }],
    })
}

/// `/communications/calls/{CALL}/operations/{OP}` with ids written as Graph writes them there:
/// UUIDs upper-case without hyphens, anything else as given.
fn resource_url(call_id: &str, operation_id: &Uuid) -> String {
    format!(
        "/communications/calls/{}/operations/{}",
        resource_id(call_id),
        resource_id(&operation_id.to_string())
    )
}

fn resource_id(id: &str) -> String {
    match Uuid::try_parse(id) {
        Ok(uuid) => uuid.simple().to_string().to_uppercase(),
        Err(_) => id.to_owned(),
    }
}

fn etag() -> String {
    format!("W/\"{}\"", rand::random_range(1..100_000u32))
}

/// Where Graph says an operation lives: absolute when the request named its host.
fn operation_location(headers: &HeaderMap, call_id: &str, operation_id: &Uuid) -> String {
    let path = format!("/v1.0/communications/calls/{call_id}/operations/{operation_id}");
    match headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
    {
        Some(host) if !host.is_empty() => format!("http://{host}{path}"),
        _ => path,
    }
}

fn with_location(mut response: Response, location: &str) -> Response {
    // A call id with bytes a header cannot carry gets no Location rather than a panic.
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A scripted transient failure, shaped like Graph's 429 sample.
fn transient_error(status: u16, retry_after_secs: Option<f64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let code = match status {
        StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
        StatusCode::SERVICE_UNAVAILABLE => "serviceNotAvailable",
        StatusCode::GATEWAY_TIMEOUT => "gatewayTimeout",
        _ => "generalException",
    };
    let body = json!({
        "error": {
            "code": code,
            "message": "Please retry again later.",
            "innerError": {
                "code": status.as_str(),
                "date": graph_date(),
                "message": "Please retry after",
                "request-id": Uuid::new_v4(),
                "status": status.as_str(),
            },
        },
    });
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(seconds) = retry_after_secs
        && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Graph's error shape.
fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "request-id": Uuid::new_v4(),
                "date": graph_date(),
            },
        },
    });
    (status, axum::Json(body)).into_response()
}

/// A refusal of a Graph request, answered in Graph's error shape.
#[derive(Debug)]
enum GraphFault {
    /// 401 `InvalidAuthenticationToken`, with the challenge Graph sends.
    Unauthorized(&'static str),
    /// 400 `BadRequest`.
    BadRequest(String),
}

impl IntoResponse for GraphFault {
    fn into_response(self) -> Response {
        match self {
            Self::Unauthorized(message) => {
                let mut response = graph_error(
                    StatusCode::UNAUTHORIZED,
                    "InvalidAuthenticationToken",
                    message,
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"",
                    ),
                );
                response
            }
            Self::BadRequest(message) => {
                graph_error(StatusCode::BAD_REQUEST, "BadRequest", &message)
            }
        }
    }
}

/// `innerError.date` as Graph writes it (UTC, no offset).
fn graph_date() -> String {
    OffsetDateTime::now_utc()
        .format(&time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]"
        ))
        .unwrap_or_default()
}

async fn put_script(
    State(emulator): State<GraphEmulator>,
    Path(call_id): Path<String>,
    body: Result<axum::Json<GraphScript>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(script)) => {
            emulator.set_script(&call_id, script);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(rejection) => graph_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &rejection.body_text(),
        ),
    }
}

async fn get_requests(State(emulator): State<GraphEmulator>) -> axum::Json<Vec<RecordedRequest>> {
    axum::Json(emulator.requests())
}

async fn expire_tokens(State(emulator): State<GraphEmulator>) -> StatusCode {
    emulator.expire_tokens();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
#[path = "graph_tests.rs"]
mod tests;
