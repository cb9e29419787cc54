//! The Entra ID emulator: the token endpoint's client-credentials grant (a client secret, a
//! certificate assertion verified against the registered certificate, or a federated token
//! this emulator issued), the managed-identity endpoints (the App Service / Container Apps
//! protocol and IMDS), and the registry of the opaque access tokens it issued, each for one
//! audience (Graph or ACS), which the Graph and ACS routes check.
//!
//! Secrets (client secret, assertions, the identity header, tokens) never reach a log or
//! the request log.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::time::Instant;
use uuid::Uuid;

use crate::emulator::RecordedRequest;
use crate::identity::managed::{APP_SERVICE_API_VERSION, IMDS_API_VERSION, IMDS_TOKEN_PATH};
use crate::identity::{
    ACS_SCOPE, GRAPH_SCOPE, JWT_BEARER, public_key_info, thumbprints, verify_rs256,
};

/// The App Service / Container Apps managed-identity route (`IDENTITY_ENDPOINT`).
pub const APP_SERVICE_PATH: &str = "/msi/token";

/// Issued tokens (and federated tokens) remembered, at most; expired ones are swept first.
const MAX_TOKENS: usize = 10_000;

/// Requests remembered, at most.
const MAX_RECORDED: usize = 10_000;

/// Clock skew allowed on an assertion's `nbf` and `exp`.
const LEEWAY: u64 = 300;

/// Who a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Audience {
    Graph,
    Acs,
}

impl Audience {
    fn of_scope(scope: &str) -> Option<Self> {
        match scope {
            GRAPH_SCOPE => Some(Self::Graph),
            ACS_SCOPE => Some(Self::Acs),
            _ => None,
        }
    }

    /// A managed-identity `resource` (trailing slash or not).
    fn of_resource(resource: &str) -> Option<Self> {
        match resource.trim_end_matches('/') {
            "https://graph.microsoft.com" => Some(Self::Graph),
            "https://communication.azure.com" => Some(Self::Acs),
            _ => None,
        }
    }
}

/// How the emulated directory is set up.
#[derive(Clone)]
pub struct IdentitySettings {
    /// The only tenant the token endpoint knows (compared case-insensitively).
    pub tenant_id: String,
    /// The app registration (compared case-insensitively) and its secret.
    pub client_id: String,
    pub client_secret: String,
    /// The app's registered certificate (DER), if any: certificate assertions are verified
    /// against it.
    pub certificate: Option<Vec<u8>>,
    /// The user-assigned managed identity the host has (besides its system-assigned one).
    pub managed_identity_client_id: String,
    /// The `X-IDENTITY-HEADER` the App Service endpoint requires (`IDENTITY_HEADER`).
    pub identity_header: String,
    /// Lifetime of issued tokens; they are refused after it.
    pub token_lifetime: Duration,
}

/// A federated token as a test writes it to the workload's token file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FederatedToken {
    /// Not secret: names the token in [`IdentityEmulator::grants`].
    pub id: String,
    pub token: String,
}

/// One token granted, as the test API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// `secret`, `certificate`, `federated`, `appService`, `imds`.
    pub by: &'static str,
    pub audience: Audience,
    /// The app or identity the token is for (`system` for a system-assigned identity).
    pub client_id: String,
    /// With `federated`: the id of the federated token presented.
    pub federated_token: Option<String>,
}

struct Registered {
    spki: Vec<u8>,
    x5t: String,
    x5t_s256: String,
}

/// The emulated directory: a cheap handle to shared state.
#[derive(Clone)]
pub struct IdentityEmulator {
    inner: Arc<Inner>,
}

struct Inner {
    settings: IdentitySettings,
    certificate: Option<Registered>,
    tokens: DashMap<String, (Audience, Instant)>,
    /// Federated tokens issued: (id, client id, expiry).
    federated: DashMap<String, (String, String, Instant)>,
    federated_issued: AtomicUsize,
    token_requests: AtomicUsize,
    grants: Mutex<Vec<Grant>>,
    requests: Mutex<Vec<RecordedRequest>>,
}

/// A refusal in the shape of the endpoint that refused.
type Refusal = Box<Response>;

impl IdentityEmulator {
    pub fn new(settings: IdentitySettings) -> Self {
        let certificate = settings.certificate.as_ref().and_then(|der| {
            let (x5t, x5t_s256) = thumbprints(der);
            Some(Registered {
                spki: public_key_info(der)?,
                x5t,
                x5t_s256,
            })
        });
        Self {
            inner: Arc::new(Inner {
                settings,
                certificate,
                tokens: DashMap::new(),
                federated: DashMap::new(),
                federated_issued: AtomicUsize::new(0),
                token_requests: AtomicUsize::new(0),
                grants: Mutex::new(Vec::new()),
                requests: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The managed-identity routes and the scripting API (the token endpoint is served with
    /// the Graph routes, see [`crate::emulator::graph`]).
    pub fn router(&self) -> Router {
        Router::new()
            .route(APP_SERVICE_PATH, get(app_service_token))
            .route(IMDS_TOKEN_PATH, get(imds_token))
            .route(
                "/emulator/identity/federatedTokens",
                post(post_federated_token),
            )
            .route("/emulator/identity/grants", get(get_grants))
            .route("/emulator/identity/requests", get(get_requests))
            .with_state(self.clone())
    }

    /// Token requests answered 200 so far (every grant and protocol).
    pub fn token_requests(&self) -> usize {
        self.inner.token_requests.load(Ordering::Relaxed)
    }

    /// Every token granted so far, oldest first.
    pub fn grants(&self) -> Vec<Grant> {
        self.inner
            .grants
            .lock()
            .expect("the grant log is never poisoned")
            .clone()
    }

    /// The managed-identity requests received, the identity header redacted.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .expect("the request log is never poisoned")
            .clone()
    }

    /// The access tokens issued and still valid.
    pub fn issued_tokens(&self) -> Vec<String> {
        let now = Instant::now();
        self.inner
            .tokens
            .iter()
            .filter(|entry| entry.value().1 > now)
            .map(|entry| entry.key().clone())
            .collect()
    }

    /// Makes every access token issued so far invalid.
    pub fn expire_tokens(&self) {
        self.inner.tokens.clear();
    }

    /// A federated token for `client_id` (the app's by default), valid for an hour, as the
    /// platform's OIDC issuer would project it into a pod.
    pub fn issue_federated_token(&self, client_id: Option<&str>) -> FederatedToken {
        let number = self.inner.federated_issued.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("federated-{number}");
        let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let client_id = client_id.unwrap_or(&self.inner.settings.client_id);
        let federated = &self.inner.federated;
        if federated.len() >= MAX_TOKENS {
            federated.clear();
        }
        federated.insert(
            token.clone(),
            (
                id.clone(),
                client_id.to_owned(),
                Instant::now() + Duration::from_secs(3600),
            ),
        );
        FederatedToken { id, token }
    }

    /// Refuses `token` from now on (as when the federated credential is removed).
    pub fn revoke_federated_token(&self, token: &str) {
        self.inner.federated.remove(token);
    }

    /// Accepts only `Bearer <a token issued for audience and still valid>`; the refusal's
    /// message otherwise.
    pub fn check_bearer(
        &self,
        headers: &HeaderMap,
        audience: Audience,
    ) -> Result<(), &'static str> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .trim();
        if authorization.is_empty() {
            return Err("Access token is empty.");
        }
        let token = match authorization.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err("Access token has expired or is not yet valid."),
        };
        match self.inner.tokens.get(token).map(|entry| *entry.value()) {
            Some((issued_for, expiry)) if issued_for == audience && Instant::now() < expiry => {
                Ok(())
            }
            Some((issued_for, _)) if issued_for != audience => {
                Err("Invalid audience: the token was issued for another resource.")
            }
            _ => Err("Access token has expired or is not yet valid."),
        }
    }

    /// Answers `POST /{tenant}/oauth2/v2.0/token` (form `body`, `host` as the client sent it).
    pub fn token_endpoint(&self, tenant: &str, host: &str, body: &[u8]) -> Response {
        match self.grant_client_credentials(tenant, host, body) {
            Ok((audience, grant)) => {
                let (token, lifetime) = self.issue(audience, grant);
                let expires_in = lifetime.as_secs();
                axum::Json(json!({
                    "token_type": "Bearer",
                    "expires_in": expires_in,
                    "ext_expires_in": expires_in,
                    "access_token": token,
                }))
                .into_response()
            }
            Err(refusal) => *refusal,
        }
    }

    fn grant_client_credentials(
        &self,
        tenant: &str,
        host: &str,
        body: &[u8],
    ) -> Result<(Audience, Grant), Refusal> {
        let fields: BTreeMap<String, String> = url::form_urlencoded::parse(body)
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect();
        let field = |name: &str| fields.get(name).map(String::as_str).unwrap_or("");
        let settings = &self.inner.settings;
        if !tenant.eq_ignore_ascii_case(&settings.tenant_id) {
            return Err(aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                90002,
                &format!("AADSTS90002: Tenant '{tenant}' not found."),
            ));
        }
        if field("grant_type") != "client_credentials" {
            return Err(aad_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                "AADSTS70003: The app requested an unsupported grant type.",
            ));
        }
        let client_id = field("client_id");
        let (by, federated_token) = if fields.contains_key("client_assertion")
            || fields.contains_key("client_assertion_type")
        {
            if fields.contains_key("client_secret") {
                return Err(aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    50027,
                    "AADSTS50027: Only one client credential (secret or assertion) may be presented.",
                ));
            }
            if field("client_assertion_type") != JWT_BEARER {
                return Err(aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    700010,
                    "AADSTS700010: client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
                ));
            }
            let assertion = field("client_assertion");
            let expected_audience = format!("http://{host}/{tenant}/oauth2/v2.0/token");
            match self.federated(assertion, client_id) {
                Some(result) => ("federated", Some(result?)),
                None => {
                    self.check_certificate_assertion(assertion, client_id, &expected_audience)?;
                    ("certificate", None)
                }
            }
        } else {
            if !client_id.eq_ignore_ascii_case(&settings.client_id) {
                return Err(unknown_app(client_id, tenant));
            }
            let secret_matches = field("client_secret")
                .as_bytes()
                .ct_eq(settings.client_secret.as_bytes())
                .unwrap_u8()
                == 1;
            if !secret_matches {
                return Err(aad_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000215,
                    &format!(
                        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                        settings.client_id
                    ),
                ));
            }
            ("secret", None)
        };
        let Some(audience) = Audience::of_scope(field("scope")) else {
            return Err(aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                1002012,
                &format!(
                    "AADSTS1002012: The provided value for scope {} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
                    field("scope")
                ),
            ));
        };
        Ok((
            audience,
            Grant {
                by,
                audience,
                client_id: client_id.to_ascii_lowercase(),
                federated_token,
            },
        ))
    }

    /// `None` when `assertion` is not a federated token this emulator issued; else whether
    /// it is valid for `client_id`, and its id.
    fn federated(&self, assertion: &str, client_id: &str) -> Option<Result<String, Refusal>> {
        let (id, bound_to, expiry) = self.inner.federated.get(assertion)?.value().clone();
        Some(if Instant::now() >= expiry {
            Err(aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                700024,
                "AADSTS700024: Client assertion is not within its valid time range.",
            ))
        } else if !bound_to.eq_ignore_ascii_case(client_id) {
            Err(aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                700213,
                &format!(
                    "AADSTS700213: No matching federated identity record found for presented assertion subject for app '{client_id}'."
                ),
            ))
        } else {
            Ok(id)
        })
    }

    /// Checks a certificate assertion as Entra ID does: RS256 by the registered certificate
    /// (named by `x5t` or `x5t#S256`), `aud` the token endpoint, `iss` = `sub` = the client,
    /// a `jti`, and `nbf` ≤ now < `exp`.
    fn check_certificate_assertion(
        &self,
        assertion: &str,
        client_id: &str,
        expected_audience: &str,
    ) -> Result<(), Refusal> {
        let invalid = |code: u32, text: &str| {
            aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                code,
                &format!("AADSTS{code}: {text}"),
            )
        };
        if !client_id.eq_ignore_ascii_case(&self.inner.settings.client_id) {
            return Err(unknown_app(client_id, &self.inner.settings.tenant_id));
        }
        let Some(registered) = &self.inner.certificate else {
            return Err(invalid(
                700027,
                "Client assertion failed signature validation: no certificate is registered for the app.",
            ));
        };
        let parts: Vec<&str> = assertion.split('.').collect();
        let decode = |part: &str| -> Option<Value> {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
        };
        let (Some(header), Some(claims), Some(signature)) = (
            parts.first().and_then(|p| decode(p)),
            parts.get(1).and_then(|p| decode(p)),
            parts.get(2).and_then(|p| URL_SAFE_NO_PAD.decode(p).ok()),
        ) else {
            return Err(invalid(
                50027,
                "JWT token is invalid or malformed (or the federated token is unknown).",
            ));
        };
        if parts.len() != 3 || header["alg"] != "RS256" {
            return Err(invalid(50027, "JWT token is invalid or malformed."));
        }
        let x5t = header["x5t"].as_str();
        let x5t_s256 = header["x5t#S256"].as_str();
        let names_registered = (x5t.is_some() || x5t_s256.is_some())
            && x5t.is_none_or(|t| t == registered.x5t)
            && x5t_s256.is_none_or(|t| t == registered.x5t_s256);
        if !names_registered {
            return Err(invalid(
                700027,
                "Client assertion failed signature validation: the key (x5t) was not found.",
            ));
        }
        let signed = format!("{}.{}", parts[0], parts[1]);
        if !verify_rs256(&registered.spki, signed.as_bytes(), &signature) {
            return Err(invalid(
                700027,
                "Client assertion failed signature validation.",
            ));
        }
        if claims["aud"] != expected_audience {
            return Err(invalid(
                700212,
                "The client assertion's audience claim does not match the token endpoint.",
            ));
        }
        if claims["iss"] != client_id || claims["sub"] != client_id {
            return Err(invalid(
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            ));
        }
        if !claims["jti"].is_string() {
            return Err(invalid(50027, "The client assertion has no jti."));
        }
        let now = unix_now();
        let (Some(nbf), Some(exp)) = (claims["nbf"].as_u64(), claims["exp"].as_u64()) else {
            return Err(invalid(50027, "The client assertion has no nbf or exp."));
        };
        if nbf > now + LEEWAY || exp + LEEWAY <= now {
            return Err(invalid(
                700024,
                "Client assertion is not within its valid time range.",
            ));
        }
        Ok(())
    }

    /// Remembers a new token for `audience` valid for the configured lifetime.
    fn issue(&self, audience: Audience, grant: Grant) -> (String, Duration) {
        let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let tokens = &self.inner.tokens;
        if tokens.len() >= MAX_TOKENS {
            tokens.retain(|_, (_, expiry)| *expiry > now);
        }
        if tokens.len() >= MAX_TOKENS {
            // All still valid: the oldest goes, as its holder will refresh soonest anyway.
            let oldest = tokens
                .iter()
                .min_by_key(|entry| entry.value().1)
                .map(|entry| entry.key().clone());
            if let Some(oldest) = oldest {
                tokens.remove(&oldest);
            }
        }
        let lifetime = self.inner.settings.token_lifetime;
        tokens.insert(token.clone(), (audience, now + lifetime));
        self.inner.token_requests.fetch_add(1, Ordering::Relaxed);
        let mut grants = self
            .inner
            .grants
            .lock()
            .expect("the grant log is never poisoned");
        if grants.len() >= MAX_RECORDED {
            grants.drain(..MAX_RECORDED / 2);
        }
        grants.push(grant);
        (token, lifetime)
    }

    /// The identity a managed-identity request names: the user-assigned one by `client_id`,
    /// else the system-assigned one.
    fn managed_identity(&self, query: &ManagedIdentityQuery) -> Result<(Audience, String), String> {
        let resource = query.resource.as_deref().unwrap_or("");
        let audience = Audience::of_resource(resource)
            .ok_or_else(|| format!("The resource '{resource}' is not known."))?;
        let client_id = match query.client_id.as_deref() {
            None | Some("") => "system".to_owned(),
            Some(id)
                if id.eq_ignore_ascii_case(&self.inner.settings.managed_identity_client_id) =>
            {
                id.to_ascii_lowercase()
            }
            Some(id) => {
                return Err(format!(
                    "Identity not found: no identity with client_id '{id}' is assigned."
                ));
            }
        };
        Ok((audience, client_id))
    }

    fn record(&self, uri: &Uri, headers: &HeaderMap, status: StatusCode) {
        let headers = headers
            .iter()
            .map(|(name, value)| {
                let value = if name.as_str() == "x-identity-header" {
                    "<redacted>".to_owned()
                } else {
                    value.to_str().unwrap_or("").to_owned()
                };
                (name.as_str().to_owned(), value)
            })
            .collect();
        let mut requests = self
            .inner
            .requests
            .lock()
            .expect("the request log is never poisoned");
        if requests.len() >= MAX_RECORDED {
            requests.drain(..MAX_RECORDED / 2);
        }
        requests.push(RecordedRequest {
            method: "GET".to_owned(),
            path_and_query: uri
                .path_and_query()
                .map(|pq| pq.as_str().to_owned())
                .unwrap_or_default(),
            headers,
            body: Value::Null,
            status: status.as_u16(),
            repeat: false,
        });
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn unknown_app(client_id: &str, tenant: &str) -> Refusal {
    aad_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        700016,
        &format!(
            "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'."
        ),
    )
}

/// The query of both managed-identity protocols.
#[derive(Deserialize)]
struct ManagedIdentityQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
    resource: Option<String>,
    client_id: Option<String>,
}

/// `GET /msi/token`: the App Service / Container Apps protocol.
async fn app_service_token(
    State(emulator): State<IdentityEmulator>,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<ManagedIdentityQuery>, QueryRejection>,
) -> Response {
    let response = app_service_answer(&emulator, &headers, query.ok().map(|Query(q)| q));
    emulator.record(&uri, &headers, response.status());
    response
}

fn app_service_answer(
    emulator: &IdentityEmulator,
    headers: &HeaderMap,
    query: Option<ManagedIdentityQuery>,
) -> Response {
    let refuse = |status: StatusCode, message: &str| {
        (
            status,
            axum::Json(
                json!({ "error": { "code": status.canonical_reason(), "message": message } }),
            ),
        )
            .into_response()
    };
    let expected = emulator.inner.settings.identity_header.as_bytes();
    let presented = headers
        .get("x-identity-header")
        .map(|value| value.as_bytes())
        .unwrap_or_default();
    if presented.is_empty() || presented.ct_eq(expected).unwrap_u8() != 1 {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "The X-IDENTITY-HEADER header is missing or not valid.",
        );
    }
    let Some(query) = query else {
        return refuse(StatusCode::BAD_REQUEST, "The query is not valid.");
    };
    if query.api_version.as_deref() != Some(APP_SERVICE_API_VERSION) {
        return refuse(StatusCode::BAD_REQUEST, "api-version must be 2019-08-01.");
    }
    match emulator.managed_identity(&query) {
        Ok((audience, client_id)) => {
            let grant = Grant {
                by: "appService",
                audience,
                client_id: client_id.clone(),
                federated_token: None,
            };
            let (token, lifetime) = emulator.issue(audience, grant);
            axum::Json(json!({
                "access_token": token,
                "expires_on": (unix_now() + lifetime.as_secs()).to_string(),
                "resource": query.resource,
                "token_type": "Bearer",
                "client_id": client_id,
            }))
            .into_response()
        }
        Err(message) => refuse(StatusCode::BAD_REQUEST, &message),
    }
}

/// `GET /metadata/identity/oauth2/token`: the Instance Metadata Service.
async fn imds_token(
    State(emulator): State<IdentityEmulator>,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<ManagedIdentityQuery>, QueryRejection>,
) -> Response {
    let response = imds_answer(&emulator, &headers, query.ok().map(|Query(q)| q));
    emulator.record(&uri, &headers, response.status());
    response
}

fn imds_answer(
    emulator: &IdentityEmulator,
    headers: &HeaderMap,
    query: Option<ManagedIdentityQuery>,
) -> Response {
    let refuse = |error: &str, description: &str| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": error, "error_description": description })),
        )
            .into_response()
    };
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return refuse("invalid_request", "Required metadata header not specified");
    }
    let Some(query) = query else {
        return refuse("invalid_request", "The query is not valid.");
    };
    if query.api_version.as_deref() != Some(IMDS_API_VERSION) {
        return refuse(
            "invalid_request",
            "Invalid API version: 2018-02-01 expected.",
        );
    }
    match emulator.managed_identity(&query) {
        Ok((audience, client_id)) => {
            let grant = Grant {
                by: "imds",
                audience,
                client_id,
                federated_token: None,
            };
            let (token, lifetime) = emulator.issue(audience, grant);
            let now = unix_now();
            axum::Json(json!({
                "access_token": token,
                "refresh_token": "",
                "expires_in": lifetime.as_secs().to_string(),
                "expires_on": (now + lifetime.as_secs()).to_string(),
                "ext_expires_in": lifetime.as_secs().to_string(),
                "not_before": now.to_string(),
                "resource": query.resource,
                "token_type": "Bearer",
            }))
            .into_response()
        }
        Err(message) => refuse("invalid_request", &message),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FederatedTokenIn {
    client_id: Option<String>,
}

async fn post_federated_token(State(emulator): State<IdentityEmulator>, body: Bytes) -> Response {
    let request: FederatedTokenIn = if body.is_empty() {
        FederatedTokenIn::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(
                        json!({ "error": { "code": "BadRequest", "message": error.to_string() } }),
                    ),
                )
                    .into_response();
            }
        }
    };
    axum::Json(emulator.issue_federated_token(request.client_id.as_deref())).into_response()
}

async fn get_grants(State(emulator): State<IdentityEmulator>) -> axum::Json<Vec<Grant>> {
    axum::Json(emulator.grants())
}

async fn get_requests(
    State(emulator): State<IdentityEmulator>,
) -> axum::Json<Vec<RecordedRequest>> {
    axum::Json(emulator.requests())
}

/// Entra ID's error shape.
pub(crate) fn aad_error(
    status: StatusCode,
    error: &str,
    aadsts: u32,
    description: &str,
) -> Refusal {
    let trace_id = Uuid::new_v4();
    let correlation_id = Uuid::new_v4();
    let timestamp = OffsetDateTime::now_utc()
        .format(&time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second]Z"
        ))
        .unwrap_or_default();
    let body = json!({
        "error": error,
        "error_description": format!(
            "{description}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
        ),
        "error_codes": [aadsts],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}"),
    });
    Box::new((status, axum::Json(body)).into_response())
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
