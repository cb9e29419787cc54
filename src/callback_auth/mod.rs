//! Callback authentication: the one place a callback request is checked, from its headers
//! and query, before its body is even read. Only [`CallbackAuthenticator::verify`] builds a
//! [`Verified`], only a `Verified` makes a [`VerifiedBody`], and the callback decoders only
//! take a `VerifiedBody`, so unverified bytes cannot reach the service.
//!
//! With `callbacks.auth = "jwt"` every callback must carry `Authorization: Bearer <JWT>`:
//! RS256, signed by a key the platform publishes ([`keys`]), with the configured issuer and
//! audience and a valid lifetime ([`token`]). With a callback secret configured, it must
//! also carry `?secret=<value>` (compared in constant time). A refused callback changes
//! nothing, is counted, and is logged with the reason, never with the token.

pub mod keys;
pub mod token;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::crypto::sha256;
use axum::http::{HeaderMap, header};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;
use url::Url;

use crate::config::{CallbackAuth, CallbacksConfig, SECRET_PARAMETER};
use crate::metrics::Metrics;
use crate::telemetry::LogBudget;
use keys::KeyCache;
use token::TokenRules;

/// Which platform a callback claims to come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackSource {
    Acs,
    Graph,
}

impl CallbackSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acs => "acs",
            Self::Graph => "graph",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Acs => 0,
            Self::Graph => 1,
        }
    }
}

/// Proof that a callback request passed authentication.
#[derive(Debug)]
pub struct Verified(());

impl Verified {
    /// The body of the request that was verified.
    pub fn body(self, bytes: &[u8]) -> VerifiedBody<'_> {
        VerifiedBody(bytes)
    }
}

/// A callback body whose request passed authentication.
#[derive(Debug)]
pub struct VerifiedBody<'a>(&'a [u8]);

impl<'a> VerifiedBody<'a> {
    /// The raw bytes, for the decoder.
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }
}

/// Why a callback was refused. Messages name the rule broken, never the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: callbacks must carry Authorization: Bearer <JWT>")]
    MissingToken,
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    #[error("the token is not signed with RS256")]
    Algorithm,
    #[error("the token names no signing key (kid)")]
    NoKeyId,
    #[error("the token's signing key is not one the issuer publishes")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's lifetime is longer than callbacks.max_token_lifetime_secs")]
    LifetimeTooLong,
    #[error("the token's issuer is not an accepted issuer")]
    Issuer,
    #[error("the token's audience is not the configured audience")]
    Audience,
    #[error("the token lacks the {0} claim")]
    MissingClaim(&'static str),
    #[error("the callback URL's secret parameter is missing or wrong")]
    Secret,
    /// Not the sender's fault: answered 503 so the platform retries.
    #[error("the signing keys could not be loaded yet; retry later")]
    KeysUnavailable,
}

impl AuthError {
    /// True when the sender should retry rather than give up.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::KeysUnavailable)
    }
}

/// Where one platform's keys are and what its tokens must say.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub openid_url: Url,
    pub issuers: Vec<String>,
    pub audience: String,
}

/// Checks callback requests according to the configured mode.
#[derive(Clone)]
pub struct CallbackAuthenticator {
    inner: Arc<Inner>,
}

struct Inner {
    mode: CallbackAuth,
    /// Indexed by [`CallbackSource::index`].
    verifiers: [Verifier; 2],
    /// SHA-256 of the required secret, when one is configured.
    secret: Option<[u8; 32]>,
    rejected: [AtomicU64; 2],
    metrics: Metrics,
    /// Bounds the warnings a flood of bad callbacks can write.
    warnings: LogBudget,
}

struct Verifier {
    keys: KeyCache,
    rules: TokenRules,
}

impl CallbackAuthenticator {
    /// An authenticator for `config`'s mode and secret, trusting `acs` and `graph`; `http`
    /// fetches the keys.
    pub fn new(
        config: &CallbacksConfig,
        acs: IssuerSettings,
        graph: IssuerSettings,
        http: reqwest::Client,
        metrics: Metrics,
    ) -> Self {
        let verifier = |settings: IssuerSettings, require_tenant| Verifier {
            keys: KeyCache::new(
                settings.openid_url,
                http.clone(),
                Duration::from_secs(config.key_refresh_min_interval_secs),
                Duration::from_secs(config.key_max_age_secs),
            ),
            rules: TokenRules::new(
                &settings.issuers,
                &settings.audience,
                config.leeway_secs,
                config.max_token_lifetime_secs,
                require_tenant,
            ),
        };
        let secret = config.secret.expose_secret();
        Self {
            inner: Arc::new(Inner {
                mode: config.auth,
                verifiers: [verifier(acs, false), verifier(graph, true)],
                secret: (!secret.is_empty()).then(|| sha256(secret.as_bytes())),
                rejected: [AtomicU64::new(0), AtomicU64::new(0)],
                metrics,
                warnings: LogBudget::default(),
            }),
        }
    }

    /// Loads both key sets (at start, so the first callback does not wait), when tokens
    /// are verified at all.
    pub async fn load_keys(&self) {
        if self.inner.mode == CallbackAuth::Jwt {
            let [acs, graph] = &self.inner.verifiers;
            tokio::join!(acs.keys.refresh(), graph.keys.refresh());
        }
    }

    /// Whether callbacks from `source` can be verified: keys loaded, or loadable now.
    /// Always true when tokens are not verified.
    pub async fn ready(&self, source: CallbackSource) -> bool {
        match self.inner.mode {
            CallbackAuth::None => true,
            CallbackAuth::Jwt => self.keys(source).ensure_loaded().await,
        }
    }

    /// The key cache of `source` (for readiness and tests).
    pub fn keys(&self, source: CallbackSource) -> &KeyCache {
        &self.inner.verifiers[source.index()].keys
    }

    /// How many callbacks from `source` were refused.
    pub fn rejected(&self, source: CallbackSource) -> u64 {
        self.inner.rejected[source.index()].load(Ordering::Relaxed)
    }

    /// Authenticates a callback request from its headers and query, before the body is
    /// read. A refusal is counted and logged here.
    pub async fn verify(
        &self,
        source: CallbackSource,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Verified, AuthError> {
        match self.check(source, headers, query).await {
            Ok(()) => Ok(Verified(())),
            Err(error) => {
                self.inner.rejected[source.index()].fetch_add(1, Ordering::Relaxed);
                self.inner.metrics.callback_refused(source.as_str());
                if self.inner.warnings.allow() {
                    tracing::warn!(callback.source = source.as_str(), reason = %error, "callback refused");
                } else {
                    tracing::debug!(callback.source = source.as_str(), reason = %error, "callback refused");
                }
                Err(error)
            }
        }
    }

    async fn check(
        &self,
        source: CallbackSource,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(), AuthError> {
        if let Some(expected) = &self.inner.secret {
            check_secret(expected, query)?;
        }
        match self.inner.mode {
            // Local experiments only; `lib::run` logs a warning at start.
            CallbackAuth::None => Ok(()),
            CallbackAuth::Jwt => {
                let verifier = &self.inner.verifiers[source.index()];
                let token = token::bearer(
                    headers
                        .get(header::AUTHORIZATION)
                        .map(|value| value.as_bytes()),
                )?;
                let token = token::parse(token)?;
                let kid = token.key_id();
                if let Some(checked) = verifier
                    .keys
                    .with_known_key(kid, |key| verifier.rules.check_parsed(&token, key))
                {
                    return checked;
                }
                let keys = verifier.keys.for_key_id(kid).await;
                let Some(key) = keys.get(kid) else {
                    return Err(if keys.is_loaded() {
                        AuthError::UnknownKey
                    } else {
                        AuthError::KeysUnavailable
                    });
                };
                verifier.rules.check_parsed(&token, key)
            }
        }
    }
}

/// Compares the `secret` query parameter with the expected digest in constant time.
fn check_secret(expected: &[u8; 32], query: Option<&str>) -> Result<(), AuthError> {
    let presented = query.and_then(|query| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == SECRET_PARAMETER)
            .map(|(_, value)| value)
    });
    let Some(presented) = presented else {
        return Err(AuthError::Secret);
    };
    let digest = sha256(presented.as_bytes());
    if bool::from(digest.ct_eq(expected)) {
        Ok(())
    } else {
        Err(AuthError::Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_must_match_exactly() {
        let expected = sha256(b"s3cr3t value");
        assert!(check_secret(&expected, Some("secret=s3cr3t+value")).is_ok());
        assert!(check_secret(&expected, Some("a=1&secret=s3cr3t%20value")).is_ok());
        for bad in [
            None,
            Some(""),
            Some("secret="),
            Some("secret=s3cr3t"),
            Some("other=s3cr3t+value"),
        ] {
            assert!(
                matches!(check_secret(&expected, bad), Err(AuthError::Secret)),
                "{bad:?}"
            );
        }
    }
}
