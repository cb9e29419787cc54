//! App-only access tokens for Graph: the OAuth 2.0 client-credentials grant, cached until
//! shortly before expiry, fetched once for any number of concurrent requests.
//!
//! Hand-written because it is one form POST and a cache: the generic OAuth crates bring an
//! HTTP stack of their own and none offers single-flight refresh with our retry policy.
//! The token and the client secret are [`SecretString`]s and never reach a log.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use crate::upstream;

/// The scope of Graph app-only tokens.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// Longest a token is used before its expiry is near: refresh this much before it ends,
/// or a quarter of its lifetime for short-lived tokens.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The authority refused the credentials or the request (wrong tenant, id, secret).
    #[error("the token endpoint refused the credentials ({status}): {}", .code.as_deref().unwrap_or("no error code"))]
    Rejected {
        status: StatusCode,
        /// The OAuth `error` code, e.g. `invalid_client` (the description may echo input,
        /// so it is not kept).
        code: Option<String>,
    },
    /// The authority could not be reached or failed (worth retrying).
    #[error("the token endpoint is unavailable: {0}")]
    Unavailable(String),
    /// The answer was not a token response.
    #[error("the token endpoint answered something that is not a token")]
    Malformed,
}

impl TokenError {
    /// True when a later attempt may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

struct Cached {
    token: SecretString,
    refresh_at: Instant,
}

/// Fetches and caches tokens for one app registration.
pub struct TokenProvider {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    client_secret: SecretString,
    cached: RwLock<Option<Cached>>,
    /// Held while fetching: concurrent callers wait for that fetch instead of starting one.
    refresh: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
}

impl TokenProvider {
    /// A provider for `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn new(
        http: reqwest::Client,
        authority: &Url,
        tenant_id: &str,
        client_id: String,
        client_secret: SecretString,
    ) -> Self {
        let mut token_url = authority.clone();
        token_url
            .path_segments_mut()
            .expect("the authority is an http(s) URL")
            .pop_if_empty()
            .extend([tenant_id, "oauth2", "v2.0", "token"]);
        Self {
            http,
            token_url,
            client_id,
            client_secret,
            cached: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        }
    }

    /// Where tokens come from.
    pub fn token_url(&self) -> &Url {
        &self.token_url
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
        let (token, lifetime) = self.fetch().await?;
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

    /// Forgets `token` (Graph refused it: revoked or expired early), unless a newer one
    /// has replaced it already.
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

    async fn fetch(&self) -> Result<(SecretString, Duration), TokenError> {
        let form = [
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
            ("scope", GRAPH_SCOPE),
            ("grant_type", "client_credentials"),
        ];
        let response = self
            .http
            .post(self.token_url.clone())
            .form(&form)
            .send()
            .await
            // Without the URL's query or any body: reqwest errors name only the URL.
            .map_err(|error| TokenError::Unavailable(error.without_url().to_string()))?;
        let status = response.status();
        if upstream::is_transient(status) {
            return Err(TokenError::Unavailable(format!("answered {status}")));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|error| TokenError::Unavailable(error.without_url().to_string()))?;
        if !status.is_success() {
            let code = serde_json::from_slice::<OAuthError>(&bytes)
                .ok()
                .and_then(|e| e.error);
            return Err(TokenError::Rejected { status, code });
        }
        let body: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
        // `expires_in` is a number, sometimes a numeric string (older endpoints).
        let seconds = match body.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(300);
        self.fetches.fetch_add(1, Ordering::Relaxed);
        tracing::info!(expires_in = seconds, "Graph access token acquired");
        Ok((body.access_token, Duration::from_secs(seconds)))
    }
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

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
        Arc::new(TokenProvider::new(
            reqwest::Client::new(),
            authority,
            "tenant",
            "app".into(),
            SecretString::from("s3cr3t"),
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
        // Refused by Graph: dropped, fetched again once.
        let token = provider.token().await.unwrap();
        provider.invalidate(&token);
        provider.token().await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // Invalidating a token that is no longer cached changes nothing.
        provider.invalidate(&SecretString::from("old"));
        provider.token().await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
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

    #[test]
    fn the_token_url_follows_the_authority_and_tenant() {
        let provider = TokenProvider::new(
            reqwest::Client::new(),
            &Url::parse("https://login.microsoftonline.com").unwrap(),
            "contoso.onmicrosoft.com",
            "app".into(),
            SecretString::from("s3cr3t"),
        );
        assert_eq!(
            provider.token_url().as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        let debug = format!("{provider:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
    }
}
