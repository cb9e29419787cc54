//! The signing keys of one platform, from its OpenID configuration's `jwks_uri`.
//!
//! Reads are lock-free (an `ArcSwap` of the whole set), so verifying a callback touches no
//! shared lock. The set is loaded at start. Fetches are single-flight: a token naming an
//! unknown key id waits for at most one fetch, and such fetches happen at most once per
//! `min_interval` (once per second while nothing was ever loaded), so made-up key ids cannot
//! hammer the key server. A failed fetch keeps the keys already loaded. A set older than
//! `max_age` is refetched in the background on its next use.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

/// While no key set was ever loaded, fetches are retried this often at most.
const UNLOADED_RETRY: Duration = Duration::from_secs(1);

/// One platform's published keys.
#[derive(Clone)]
pub struct KeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    openid_url: Url,
    http: reqwest::Client,
    min_interval: Duration,
    max_age: Duration,
    keys: ArcSwap<KeySet>,
    /// When the last fetch for an unknown key id started; held while any fetch runs
    /// (single flight).
    last_attempt: Mutex<Option<Instant>>,
    stale_refresh_running: AtomicBool,
    fetches: AtomicU64,
}

/// RSA key sizes accepted, in bits: those RS256 verification accepts (and jsonwebtoken did).
const MODULUS_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// An RS256 verification key, parsed once when its key set is loaded: verifying a token
/// reuses it (and the Montgomery constants AWS-LC caches in it after the first use)
/// instead of rebuilding the key from `n` and `e` every time.
#[derive(Clone)]
pub struct VerifyingKey(ParsedPublicKey);

impl VerifyingKey {
    /// A key from the big-endian modulus and exponent, when they make an RSA public key
    /// RS256 may use (2048 to 8192 bits).
    pub fn from_components(n: &[u8], e: &[u8]) -> Option<Self> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        let bits = n.first().map_or(0, |top| {
            n.len() * 8 - usize::try_from(top.leading_zeros()).unwrap_or(0)
        });
        if !MODULUS_BITS.contains(&bits) || e.is_empty() {
            return None;
        }
        RsaPublicKeyComponents { n, e }
            .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256)
            .ok()
            .map(Self)
    }

    /// Whether `signature` is this key's RSASSA-PKCS1-v1_5 SHA-256 signature (RS256) of
    /// `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        self.0.verify_sig(message, signature).is_ok()
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&byte| byte != 0)
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// The usable keys by key id, and when they were loaded (`None`: never).
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
    loaded_at: Option<Instant>,
}

impl KeySet {
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded_at.is_some()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Why keys could not be fetched (logged; the keys already loaded stay).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("requesting {what} failed: {source}")]
    Http {
        what: &'static str,
        source: reqwest::Error,
    },
    #[error("{what} answered {status}")]
    Status {
        what: &'static str,
        status: reqwest::StatusCode,
    },
    #[error("the OpenID configuration's jwks_uri is not an http(s) URL")]
    JwksUri,
    #[error("the key set holds no usable RS256 signing key with a key id")]
    NoUsableKey,
}

#[derive(Deserialize)]
struct OpenIdConfiguration {
    jwks_uri: Url,
}

/// Keys are parsed one by one, so a key of a type we do not use cannot spoil the set.
#[derive(Deserialize)]
struct RawKeySet {
    keys: Vec<serde_json::Value>,
}

impl KeyCache {
    pub fn new(
        openid_url: Url,
        http: reqwest::Client,
        min_interval: Duration,
        max_age: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                openid_url,
                http,
                min_interval,
                max_age,
                keys: ArcSwap::from_pointee(KeySet::default()),
                last_attempt: Mutex::new(None),
                stale_refresh_running: AtomicBool::new(false),
                fetches: AtomicU64::new(0),
            }),
        }
    }

    /// Where the keys come from.
    pub fn openid_url(&self) -> &Url {
        &self.inner.openid_url
    }

    /// The current set, refetched first when it lacks `kid`: at most once per interval
    /// for all unknown key ids together, and never while another fetch is in flight.
    pub async fn for_key_id(&self, kid: &str) -> Arc<KeySet> {
        let set = self.inner.keys.load_full();
        if set.get(kid).is_some() {
            self.refresh_if_stale(&set);
            return set;
        }
        let mut last_attempt = self.inner.last_attempt.lock().await;
        // A fetch that finished while this one waited may have brought the key.
        let set = self.inner.keys.load_full();
        let interval = if set.is_loaded() {
            self.inner.min_interval
        } else {
            UNLOADED_RETRY
        };
        if set.get(kid).is_some() || last_attempt.is_some_and(|at| at.elapsed() < interval) {
            return set;
        }
        *last_attempt = Some(Instant::now());
        self.fetch_and_store().await;
        self.inner.keys.load_full()
    }

    /// True when keys are loaded; when none ever were, tries to load them first (at most
    /// once a second, like any fetch for an unknown key).
    pub async fn ensure_loaded(&self) -> bool {
        if self.inner.keys.load().is_loaded() {
            return true;
        }
        self.for_key_id("").await.is_loaded()
    }

    /// Runs `verify` with the key `kid` names when the current set holds it: the fast path
    /// of every genuine callback (no lock, no reference count touched, no fetch). `None`
    /// when the set lacks `kid`; then [`KeyCache::for_key_id`] decides whether to fetch.
    pub fn with_known_key<R>(
        &self,
        kid: &str,
        verify: impl FnOnce(&VerifyingKey) -> R,
    ) -> Option<R> {
        let set = self.inner.keys.load();
        let key = set.get(kid)?;
        self.refresh_if_stale(&set);
        Some(verify(key))
    }

    /// The current set, without fetching.
    pub fn current(&self) -> Arc<KeySet> {
        self.inner.keys.load_full()
    }

    /// How many fetches were attempted.
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// Fetches the keys now (at start, and when they are old), after any fetch in flight.
    pub async fn refresh(&self) {
        let _single_flight = self.inner.last_attempt.lock().await;
        self.fetch_and_store().await;
    }

    async fn fetch_and_store(&self) {
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        match self.fetch().await {
            Ok(set) => {
                tracing::info!(openid.url = %self.inner.openid_url, keys = set.len(), "callback signing keys loaded");
                self.inner.keys.store(Arc::new(set));
            }
            Err(error) => {
                let kept = self.inner.keys.load().len();
                tracing::warn!(openid.url = %self.inner.openid_url, %error, kept, "fetching callback signing keys failed; keeping the keys already loaded");
            }
        }
    }

    fn refresh_if_stale(&self, set: &KeySet) {
        let stale = set
            .loaded_at
            .is_some_and(|at| at.elapsed() >= self.inner.max_age);
        if stale
            && !self
                .inner
                .stale_refresh_running
                .swap(true, Ordering::AcqRel)
        {
            let cache = self.clone();
            tokio::spawn(async move {
                cache.refresh().await;
                cache
                    .inner
                    .stale_refresh_running
                    .store(false, Ordering::Release);
            });
        }
    }

    async fn fetch(&self) -> Result<KeySet, FetchError> {
        let configuration: OpenIdConfiguration = self
            .get_json(self.inner.openid_url.clone(), "the OpenID configuration")
            .await?;
        let jwks_uri = configuration.jwks_uri;
        if !matches!(jwks_uri.scheme(), "http" | "https") {
            return Err(FetchError::JwksUri);
        }
        let raw: RawKeySet = self.get_json(jwks_uri, "the key set").await?;
        let keys: HashMap<String, VerifyingKey> =
            raw.keys.into_iter().filter_map(usable_key).collect();
        if keys.is_empty() {
            return Err(FetchError::NoUsableKey);
        }
        Ok(KeySet {
            keys,
            loaded_at: Some(Instant::now()),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: Url,
        what: &'static str,
    ) -> Result<T, FetchError> {
        let response = self
            .inner
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|source| FetchError::Http { what, source })?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status { what, status });
        }
        response
            .json()
            .await
            .map_err(|source| FetchError::Http { what, source })
    }
}

/// An RSA signing key with a key id that may be used with RS256, or `None`.
pub(crate) fn usable_key(value: serde_json::Value) -> Option<(String, VerifyingKey)> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    let kid = jwk.common.key_id.clone()?;
    let for_signing = matches!(
        jwk.common.public_key_use,
        None | Some(PublicKeyUse::Signature)
    );
    let rs256 = matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256));
    let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
        return None;
    };
    if !for_signing || !rs256 {
        return None;
    }
    let n = URL_SAFE_NO_PAD.decode(&rsa.n).ok()?;
    let e = URL_SAFE_NO_PAD.decode(&rsa.e).ok()?;
    let key = VerifyingKey::from_components(&n, &e)?;
    Some((kid, key))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use axum::Router;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::get;
    use serde_json::json;

    use super::*;
    use crate::emulator::callback_signing::CallbackSigner;

    /// A key server whose key set answers 500 while `failing` is set.
    async fn key_server(failing: Arc<AtomicBool>) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let signer = CallbackSigner::for_tests();
        let app = Router::new()
            .route(
                "/openid",
                get(move || async move {
                    axum::Json(json!({ "jwks_uri": format!("http://{address}/keys") }))
                }),
            )
            .route(
                "/keys",
                get(move || async move {
                    if failing.load(Ordering::SeqCst) {
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    } else {
                        axum::Json(signer.jwks()).into_response()
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}/openid").parse().unwrap()
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_keys_and_unknown_ids_fetch_once_per_interval() {
        let failing = Arc::new(AtomicBool::new(true));
        let url = key_server(failing.clone()).await;
        let cache = KeyCache::new(
            url,
            reqwest::Client::new(),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        // Nothing loadable yet: the set stays unloaded.
        let set = cache.for_key_id("callops-emulator-1").await;
        assert!(!set.is_loaded());
        assert_eq!(cache.fetches(), 1);

        failing.store(false, Ordering::SeqCst);
        cache.refresh().await;
        assert!(cache.current().get("callops-emulator-1").is_some());

        // The key server fails: the keys already loaded stay.
        failing.store(true, Ordering::SeqCst);
        cache.refresh().await;
        assert_eq!(cache.fetches(), 3);
        assert!(cache.current().get("callops-emulator-1").is_some());

        // Unknown ids: the first unknown id fetched (above), so within the interval none
        // fetches again, however many arrive.
        failing.store(false, Ordering::SeqCst);
        for n in 0..50 {
            let set = cache.for_key_id(&format!("made-up-{n}")).await;
            assert!(set.get(&format!("made-up-{n}")).is_none());
        }
        assert_eq!(cache.fetches(), 3);
        // A known id never fetches.
        cache.for_key_id("callops-emulator-1").await;
        assert_eq!(cache.fetches(), 3);
    }

    #[test]
    fn only_rsa_signing_keys_with_an_id_are_kept() {
        let published = CallbackSigner::for_tests().jwks()["keys"][0].clone();
        let rsa = json!({"kty": "RSA", "kid": "a", "n": published["n"], "e": "AQAB"});
        assert!(usable_key(rsa.clone()).is_some());
        // Microsoft's key sets carry extra members (x5c, endorsements, issuer).
        let mut extra = rsa.clone();
        extra["endorsements"] = json!(["msteams"]);
        extra["x5t"] = json!("abc");
        assert!(usable_key(extra).is_some());
        let mut no_kid = rsa.clone();
        no_kid.as_object_mut().unwrap().remove("kid");
        assert!(usable_key(no_kid).is_none());
        let mut encryption = rsa.clone();
        encryption["use"] = json!("enc");
        assert!(usable_key(encryption).is_none());
        let mut other_alg = rsa.clone();
        other_alg["alg"] = json!("RS512");
        assert!(usable_key(other_alg).is_none());
        let ec = json!({"kty": "EC", "kid": "b", "crv": "P-256", "x": "AA", "y": "AA"});
        assert!(usable_key(ec).is_none());
        assert!(usable_key(json!({"kty": "OKP?", "kid": "c"})).is_none());
        assert!(usable_key(json!("not a key")).is_none());
        // Keys RS256 may not use, or not keys at all.
        let mut small = rsa.clone();
        small["n"] = json!("sXch");
        assert!(usable_key(small).is_none(), "a 24-bit modulus");
        let mut not_base64 = rsa.clone();
        not_base64["n"] = json!("s+ch");
        assert!(usable_key(not_base64).is_none());
        let mut no_exponent = rsa;
        no_exponent["e"] = json!("");
        assert!(usable_key(no_exponent).is_none());
    }

    #[test]
    fn modulus_sizes_outside_2048_to_8192_bits_are_refused() {
        let e = [1, 0, 1];
        let with_bits = |bits: usize| {
            let mut n = vec![0xff_u8; bits.div_ceil(8)];
            if !bits.is_multiple_of(8) {
                n[0] = 0xff >> (8 - bits % 8);
            }
            n[bits.div_ceil(8) - 1] |= 1;
            n
        };
        assert!(VerifyingKey::from_components(&with_bits(2047), &e).is_none());
        assert!(VerifyingKey::from_components(&with_bits(2048), &e).is_some());
        assert!(VerifyingKey::from_components(&with_bits(8192), &e).is_some());
        assert!(VerifyingKey::from_components(&with_bits(8193), &e).is_none());
        // Leading zero bytes do not count.
        let mut padded = vec![0, 0];
        padded.extend(with_bits(2047));
        assert!(VerifyingKey::from_components(&padded, &e).is_none());
        let mut padded = vec![0];
        padded.extend(with_bits(2048));
        assert!(VerifyingKey::from_components(&padded, &[0, 1, 0, 1]).is_some());
    }
}
