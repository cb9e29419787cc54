//! Client API keys (`CALLOPS_API_KEYS`): a middleware on the `/v1` router that lets a request
//! through only when it presents one of the configured keys, as `Authorization: Bearer <key>`
//! or `api-key: <key>`. With no keys configured the client API is open. `/healthz` and
//! `/callbacks/*` are outside the `/v1` router and never take a key.
//!
//! Keys are kept only as SHA-256 digests. A presented key is hashed once and compared with
//! every configured digest in constant time, without stopping at a match, so neither the
//! time taken nor the answer says which key matched or how much of one did. Refusals never
//! repeat what was presented.

use std::fmt;
use std::sync::Arc;

use crate::crypto::sha256;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use subtle::{Choice, ConstantTimeEq};

use crate::error::error_response;

/// The Azure-style key header.
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// The configured keys, as SHA-256 digests. Empty: every request is let through.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<[[u8; 32]]>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.digests.len())
            .finish()
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` nor `api-key` header.
    Missing,
    /// A key was presented and none of the configured keys is it.
    Invalid,
}

impl ApiKeys {
    pub fn new(keys: &[SecretString]) -> Self {
        let digests = keys
            .iter()
            .map(|key| sha256(key.expose_secret().as_bytes()))
            .collect();
        Self { digests }
    }

    /// True when no key is configured (the client API is open).
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// Checks the credentials a request presents. Every presented key is compared with
    /// every configured key.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.is_open() {
            return Ok(());
        }
        let mut presented = false;
        let mut matched = Choice::from(0);
        for key in presented_keys(headers) {
            presented = true;
            matched |= self.matches(key);
        }
        match (presented, bool::from(matched)) {
            (_, true) => Ok(()),
            (false, false) => Err(Refusal::Missing),
            (true, false) => Err(Refusal::Invalid),
        }
    }

    /// Whether `key` is one of the configured keys, in time independent of which one.
    fn matches(&self, key: &[u8]) -> Choice {
        let digest = sha256(key);
        self.digests
            .iter()
            .fold(Choice::from(0), |matched, configured| {
                matched | configured.ct_eq(&digest)
            })
    }
}

/// The keys a request presents: each `api-key` value and each `Authorization: Bearer`
/// token (scheme case-insensitive), trimmed.
fn presented_keys(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    let api_keys = headers.get_all(API_KEY).iter().map(HeaderValue::as_bytes);
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|value| bearer_token(value.as_bytes()));
    api_keys.chain(bearer).map(<[u8]>::trim_ascii)
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii_start();
    let (scheme, rest) = value.split_at_checked(6)?;
    let separated = rest.first().is_some_and(|b| *b == b' ' || *b == b'\t');
    (scheme.eq_ignore_ascii_case(b"bearer") && separated).then_some(rest)
}

/// The middleware: `401` with the Azure error body and `WWW-Authenticate: Bearer` unless the
/// request presents a configured key.
pub async fn require_api_key(
    State(keys): State<ApiKeys>,
    request: Request,
    next: Next,
) -> Response {
    match keys.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => unauthorized(refusal),
    }
}

fn unauthorized(refusal: Refusal) -> Response {
    let (message, challenge) = match refusal {
        Refusal::Missing => (
            "an API key is required: send Authorization: Bearer <key> or api-key: <key>",
            "Bearer",
        ),
        Refusal::Invalid => ("the API key is not valid", "Bearer error=\"invalid_token\""),
    };
    let mut response = error_response(StatusCode::UNAUTHORIZED, "Unauthorized", message.to_owned());
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    const FIRST: &str = "first-key-0123456789";
    const SECOND: &str = "second-key-abcdefghij";

    fn keys() -> ApiKeys {
        ApiKeys::new(&[SecretString::from(FIRST), SecretString::from(SECOND)])
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn any_configured_key_is_accepted_in_either_header() {
        let keys = keys();
        for key in [FIRST, SECOND] {
            let bearer = format!("Bearer {key}");
            assert_eq!(keys.check(&headers(&[("authorization", &bearer)])), Ok(()));
            assert_eq!(keys.check(&headers(&[("api-key", key)])), Ok(()));
        }
        // Scheme case and extra blanks do not matter.
        let bearer = format!("bEaReR   {FIRST} ");
        assert_eq!(keys.check(&headers(&[("authorization", &bearer)])), Ok(()));
    }

    #[test]
    fn missing_and_wrong_keys_are_refused() {
        let keys = keys();
        assert_eq!(keys.check(&HeaderMap::new()), Err(Refusal::Missing));
        // Another scheme is not a key.
        let basic = format!("Basic {FIRST}");
        assert_eq!(
            keys.check(&headers(&[("authorization", &basic)])),
            Err(Refusal::Missing)
        );
        assert_eq!(
            keys.check(&headers(&[("authorization", "Bearer")])),
            Err(Refusal::Missing)
        );
        for wrong in [
            "",
            "first-key-012345678",
            "first-key-01234567890",
            "FIRST-KEY-0123456789",
        ] {
            assert_eq!(
                keys.check(&headers(&[("api-key", wrong)])),
                Err(Refusal::Invalid),
                "{wrong:?}"
            );
        }
        // The key itself must not be a scheme-less Authorization value.
        assert_eq!(
            keys.check(&headers(&[("authorization", FIRST)])),
            Err(Refusal::Missing)
        );
    }

    #[test]
    fn one_right_key_among_several_presented_is_enough() {
        let keys = keys();
        let bearer = format!("Bearer {SECOND}");
        let presented = headers(&[
            ("api-key", "nope-nope-nope-nope"),
            ("authorization", &bearer),
        ]);
        assert_eq!(keys.check(&presented), Ok(()));
    }

    #[test]
    fn no_keys_means_open_and_debug_shows_no_key() {
        assert!(ApiKeys::default().is_open());
        assert_eq!(ApiKeys::default().check(&HeaderMap::new()), Ok(()));
        let shown = format!("{:?}", keys());
        assert_eq!(shown, "ApiKeys { keys: 2 }");
    }

    #[tokio::test]
    async fn the_middleware_answers_401_with_a_challenge_and_no_echo() {
        let app = Router::new().route("/v1/x", get(|| async { "ok" })).layer(
            axum::middleware::from_fn_with_state(keys(), require_api_key),
        );
        let call = |header: Option<(&'static str, String)>| {
            let app = app.clone();
            async move {
                let mut request = Request::get("/v1/x");
                if let Some((name, value)) = header {
                    request = request.header(name, value);
                }
                app.oneshot(request.body(Body::empty()).unwrap())
                    .await
                    .unwrap()
            }
        };
        let ok = call(Some(("api-key", FIRST.to_owned()))).await;
        assert_eq!(ok.status(), StatusCode::OK);

        let presented = "a-wrong-key-that-must-not-echo";
        for (header, challenge) in [
            (None, "Bearer"),
            (
                Some(("authorization", format!("Bearer {presented}"))),
                "Bearer error=\"invalid_token\"",
            ),
        ] {
            let response = call(header).await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], challenge);
            let body = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"]["code"], "Unauthorized");
            let message = json["error"]["message"].as_str().unwrap();
            assert!(!message.contains(presented), "{message}");
        }
    }
}
