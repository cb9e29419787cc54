//! The emulator's callback tokens: ACS and Graph put a bearer JWT (RS256) on every
//! callback, signed with a key published through an OpenID configuration. The emulator
//! does the same with its own development keys (compiled in: they sign only emulated
//! callbacks, so they are not secrets), so callops runs with verification on against it.
//!
//! Two keys exist; the key set publishes the first until [`CallbackSigner::rotate`] makes
//! the second the signing key and publishes both, as a real key rotation does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::routing::{get, post};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// The issuer ACS puts on its callback tokens.
pub const ACS_ISSUER: &str = "https://acscallautomation.communication.azure.com";
/// The issuer of Graph's notification tokens (Graph also uses `https://graph.microsoft.com`).
pub const GRAPH_ISSUER: &str = "https://api.botframework.com";
/// Where the emulator serves its ACS OpenID configuration (the path ACS uses).
pub const ACS_OPENID_PATH: &str = "/calling/.well-known/acsopenidconfiguration";
const ACS_KEYS_PATH: &str = "/calling/keys";
/// Where the emulator serves its Graph OpenID configuration (the path Skype's uses).
pub const GRAPH_OPENID_PATH: &str = "/v1/.well-known/OpenIdConfiguration";
const GRAPH_KEYS_PATH: &str = "/v1/.well-known/keys";

/// Lifetime of a callback token (ACS's are valid for five minutes).
const TOKEN_LIFETIME_SECS: i64 = 300;

const DEV_KEYS: [(&str, &str); 2] = [
    (
        include_str!("keys/dev-signing-key-1.pem"),
        include_str!("keys/dev-signing-key-1.jwk.json"),
    ),
    (
        include_str!("keys/dev-signing-key-2.pem"),
        include_str!("keys/dev-signing-key-2.jwk.json"),
    ),
];

/// Signs the emulator's callbacks and serves the keys that verify them.
#[derive(Clone)]
pub struct CallbackSigner {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Vec<DevKey>,
    /// Index of the signing key; the key set publishes keys `0..=active`.
    active: AtomicUsize,
    acs_audience: String,
    graph_audience: String,
    tenant_id: String,
    key_fetches: AtomicUsize,
    /// The most recent tokens put on callbacks, for tests that look for leaks.
    issued: Mutex<Vec<String>>,
}

/// How many issued tokens are remembered.
const ISSUED_KEPT: usize = 256;

struct DevKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

/// Who the emulator's tokens are for.
#[derive(Debug, Clone)]
pub struct SignerSettings {
    /// The emulated ACS resource's immutable id.
    pub acs_audience: String,
    /// The emulated bot's app id.
    pub graph_audience: String,
    /// The emulated tenant (`tid` of Graph tokens).
    pub tenant_id: String,
}

impl CallbackSigner {
    pub fn new(settings: SignerSettings) -> Self {
        let keys = DEV_KEYS
            .iter()
            .map(|(pem, jwk)| {
                let jwk: Value = serde_json::from_str(jwk).expect("the compiled-in JWK is JSON");
                DevKey {
                    kid: jwk["kid"].as_str().expect("the JWK has a kid").to_owned(),
                    encoding: EncodingKey::from_rsa_pem(pem.as_bytes())
                        .expect("the compiled-in key is an RSA PEM"),
                    jwk,
                }
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                keys,
                active: AtomicUsize::new(0),
                acs_audience: settings.acs_audience,
                graph_audience: settings.graph_audience,
                tenant_id: settings.tenant_id,
                key_fetches: AtomicUsize::new(0),
                issued: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The claims of an ACS callback token issued now.
    pub fn acs_claims(&self) -> Value {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        json!({
            "iss": ACS_ISSUER,
            "aud": self.inner.acs_audience,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME_SECS,
        })
    }

    /// The claims of a Graph notification token issued now.
    pub fn graph_claims(&self) -> Value {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        json!({
            "iss": GRAPH_ISSUER,
            "aud": self.inner.graph_audience,
            "tid": self.inner.tenant_id,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME_SECS,
        })
    }

    /// A fresh token for one ACS callback.
    pub fn acs_token(&self) -> String {
        self.issue(self.sign(&self.acs_claims()))
    }

    /// A fresh token for one Graph notification.
    pub fn graph_token(&self) -> String {
        self.issue(self.sign(&self.graph_claims()))
    }

    /// The most recent tokens [`CallbackSigner::acs_token`] and
    /// [`CallbackSigner::graph_token`] gave out.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner
            .issued
            .lock()
            .expect("the token log is never poisoned")
            .clone()
    }

    fn issue(&self, token: String) -> String {
        let mut issued = self
            .inner
            .issued
            .lock()
            .expect("the token log is never poisoned");
        if issued.len() >= ISSUED_KEPT {
            issued.drain(..ISSUED_KEPT / 2);
        }
        issued.push(token.clone());
        token
    }

    /// `claims` signed with the current key (tests use it to forge bad claims).
    pub fn sign(&self, claims: &Value) -> String {
        let key = &self.inner.keys[self.inner.active.load(Ordering::Acquire)];
        sign_with(key, &key.kid, claims)
    }

    /// `claims` signed with the second key under `kid`, whether or not that key is
    /// published yet (tests use it for tokens from an unknown key).
    pub fn sign_with_second_key(&self, kid: &str, claims: &Value) -> String {
        sign_with(&self.inner.keys[1], kid, claims)
    }

    /// Makes the second key the signing key and publishes it beside the first. Returns
    /// the new key id.
    pub fn rotate(&self) -> String {
        self.inner.active.store(1, Ordering::Release);
        self.inner.keys[1].kid.clone()
    }

    /// The published key set.
    pub fn jwks(&self) -> Value {
        let published = self.inner.active.load(Ordering::Acquire) + 1;
        let keys: Vec<&Value> = self.inner.keys[..published]
            .iter()
            .map(|key| &key.jwk)
            .collect();
        json!({ "keys": keys })
    }

    /// How many times a key set was fetched.
    pub fn key_fetches(&self) -> usize {
        self.inner.key_fetches.load(Ordering::Relaxed)
    }

    /// The OpenID configurations, the key sets and `POST /emulator/keys:rotate`.
    pub fn router(&self) -> Router {
        Router::new()
            .route(ACS_OPENID_PATH, get(acs_openid_configuration))
            .route(GRAPH_OPENID_PATH, get(graph_openid_configuration))
            .route(ACS_KEYS_PATH, get(key_set))
            .route(GRAPH_KEYS_PATH, get(key_set))
            .route("/emulator/keys:rotate", post(rotate_keys))
            .with_state(self.clone())
    }
}

#[cfg(test)]
impl CallbackSigner {
    /// A signer for unit tests: ACS audience `resource`, Graph audience `bot`, tenant
    /// `tenant`.
    pub(crate) fn for_tests() -> Self {
        Self::new(SignerSettings {
            acs_audience: "resource".to_owned(),
            graph_audience: "bot".to_owned(),
            tenant_id: "tenant".to_owned(),
        })
    }
}

fn sign_with(key: &DevKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding).expect("RS256 signing of JSON claims")
}

async fn acs_openid_configuration(headers: HeaderMap) -> axum::Json<Value> {
    axum::Json(openid_configuration(&headers, ACS_ISSUER, ACS_KEYS_PATH))
}

async fn graph_openid_configuration(headers: HeaderMap) -> axum::Json<Value> {
    axum::Json(openid_configuration(
        &headers,
        GRAPH_ISSUER,
        GRAPH_KEYS_PATH,
    ))
}

/// The metadata document, its `jwks_uri` on the host the request named.
fn openid_configuration(headers: &HeaderMap, issuer: &str, keys_path: &str) -> Value {
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or("127.0.0.1");
    json!({
        "issuer": issuer,
        "jwks_uri": format!("http://{host}{keys_path}"),
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    })
}

async fn key_set(State(signer): State<CallbackSigner>) -> axum::Json<Value> {
    signer.inner.key_fetches.fetch_add(1, Ordering::Relaxed);
    axum::Json(signer.jwks())
}

async fn rotate_keys(State(signer): State<CallbackSigner>) -> axum::Json<Value> {
    axum::Json(json!({ "kid": signer.rotate() }))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{DecodingKey, Validation};

    use super::*;

    fn signer() -> CallbackSigner {
        CallbackSigner::for_tests()
    }

    fn verify(token: &str, jwks: &Value, issuer: &str, audience: &str) -> Value {
        let set: JwkSet = serde_json::from_value(jwks.clone()).unwrap();
        let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
        let key = DecodingKey::from_jwk(set.find(&kid).unwrap()).unwrap();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        jsonwebtoken::decode::<Value>(token, &key, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn each_compiled_in_key_pair_matches_its_published_jwk() {
        let signer = signer();
        let claims = verify(&signer.acs_token(), &signer.jwks(), ACS_ISSUER, "resource");
        assert_eq!(claims["aud"], "resource");
        signer.rotate();
        let claims = verify(&signer.graph_token(), &signer.jwks(), GRAPH_ISSUER, "bot");
        assert_eq!(claims["tid"], "tenant");
        assert_eq!(signer.jwks()["keys"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_second_key_is_unpublished_until_rotation() {
        let signer = signer();
        let token = signer.sign_with_second_key("callops-emulator-2", &signer.acs_claims());
        let set: JwkSet = serde_json::from_value(signer.jwks()).unwrap();
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        assert!(set.find(&kid).is_none());
    }
}
