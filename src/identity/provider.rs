//! [`TokenProvider`]: the token of one credential for one scope, cached until shortly before
//! it expires and fetched once for any number of concurrent callers.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::identity::{Credential, TokenError};

/// Longest a token is used before its expiry is near: refresh this much before it ends,
/// or a quarter of its lifetime for short-lived tokens.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// A token and how long it is valid from now.
pub struct AccessToken {
    pub token: SecretString,
    pub lifetime: Duration,
}

struct Cached {
    token: SecretString,
    refresh_at: Instant,
}

/// Fetches and caches tokens of one credential for one scope.
pub struct TokenProvider {
    http: reqwest::Client,
    credential: Credential,
    scope: &'static str,
    /// Who the tokens are for, in logs (`ACS`, `Graph`).
    upstream: &'static str,
    cached: RwLock<Option<Cached>>,
    /// Held while fetching: concurrent callers wait for that fetch instead of starting one.
    refresh: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

impl TokenProvider {
    /// A provider of `credential`'s tokens for `scope`.
    pub fn new(
        http: reqwest::Client,
        credential: Credential,
        scope: &'static str,
        upstream: &'static str,
    ) -> Self {
        Self {
            http,
            credential,
            scope,
            upstream,
            cached: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        }
    }

    /// The credential (for what it says about itself in logs).
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// How many tokens were fetched so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// A valid token: the cached one, or a new one fetched once for all waiting callers.
    pub async fn token(&self) -> Result<SecretString, TokenError> {
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let _fetching = self.refresh.lock().await;
        // Someone else may have fetched it while we waited.
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let AccessToken { token, lifetime } = self.credential.fetch(&self.http, self.scope).await?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            expires_in = lifetime.as_secs(),
            credential = self.credential.kind(),
            "{} access token acquired",
            self.upstream
        );
        let margin = REFRESH_MARGIN.min(lifetime / 4);
        *self
            .cached
            .write()
            .expect("the token cache is never poisoned") = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(margin),
        });
        Ok(token)
    }

    /// Forgets `token` (the upstream refused it: revoked or expired early), unless a newer
    /// one has replaced it already.
    pub fn invalidate(&self, token: &SecretString) {
        let mut cached = self
            .cached
            .write()
            .expect("the token cache is never poisoned");
        if cached
            .as_ref()
            .is_some_and(|c| c.token.expose_secret() == token.expose_secret())
        {
            *cached = None;
        }
    }

    fn fresh(&self) -> Option<SecretString> {
        let cached = self
            .cached
            .read()
            .expect("the token cache is never poisoned");
        cached
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("upstream", &self.upstream)
            .field("scope", &self.scope)
            .field("credential", &self.credential)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use url::Url;

    use super::*;
    use crate::identity::{CredentialSettings, GRAPH_SCOPE};

    /// A token endpoint on 127.0.0.1:0 that counts requests and answers slowly, so that
    /// concurrent callers overlap.
    async fn token_server(answer: &'static str, status: u16) -> (Url, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/{tenant}/oauth2/v2.0/token",
            axum::routing::post(move |body: String| {
                let counter = counter.clone();
                async move {
                    assert!(body.contains("grant_type=client_credentials"), "{body}");
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/json")],
                        answer,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (Url::parse(&format!("http://{address}")).unwrap(), hits)
    }

    fn provider(authority: &Url) -> Arc<TokenProvider> {
        let credential = Credential::new(CredentialSettings::ClientSecret {
            authority: authority.clone(),
            tenant_id: "tenant".into(),
            client_id: "app".into(),
            secret: SecretString::from("s3cr3t"),
        })
        .unwrap();
        Arc::new(TokenProvider::new(
            reqwest::Client::new(),
            credential,
            GRAPH_SCOPE,
            "Graph",
        ))
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_the_cache() {
        let (authority, hits) = token_server(
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"tok-1"}"#,
            200,
        )
        .await;
        let provider = provider(&authority);
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let provider = provider.clone();
                tokio::spawn(async move { provider.token().await })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap().expose_secret(), "tok-1");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(provider.fetches(), 1);
        // Cached.
        provider.token().await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // Refused upstream: dropped, fetched again once.
        let token = provider.token().await.unwrap();
        provider.invalidate(&token);
        provider.token().await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // Invalidating a token that is no longer cached changes nothing.
        provider.invalidate(&SecretString::from("old"));
        provider.token().await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        let shown = format!("{provider:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("tok-1"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn refusals_and_outages_are_told_apart() {
        let (authority, _) = token_server(
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#,
            401,
        )
        .await;
        let error = provider(&authority).token().await.unwrap_err();
        assert!(
            matches!(&error, TokenError::Rejected { code: Some(code), .. } if code == "invalid_client"),
            "{error:?}"
        );
        assert!(!error.is_transient());
        let (authority, _) = token_server("{}", 503).await;
        assert!(
            provider(&authority)
                .token()
                .await
                .unwrap_err()
                .is_transient()
        );
        let (authority, _) = token_server("not json", 200).await;
        assert!(matches!(
            provider(&authority).token().await.unwrap_err(),
            TokenError::Malformed
        ));
    }
}
