//! How ACS requests are authenticated, as the official SDKs decide it: with the connection
//! string's access key every request is signed (HMAC, [`signing`]); with an endpoint and a
//! token credential it carries `Authorization: Bearer <Entra ID token>` for the
//! Communication Services scope, and nothing of the HMAC scheme.

use std::sync::Arc;

use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use url::{Position, Url};

use crate::acs::connection_string::ConnectionString;
use crate::acs::signing;
use crate::identity::{TokenError, TokenProvider};

/// The credential of every ACS request.
#[derive(Clone)]
pub enum AcsAuth {
    /// The resource's access key (a connection string).
    Key(ConnectionString),
    /// Entra ID: tokens for [`crate::identity::ACS_SCOPE`].
    Entra {
        endpoint: Url,
        tokens: Arc<TokenProvider>,
    },
}

impl AcsAuth {
    /// The resource endpoint, ending with `/`.
    pub fn endpoint(&self) -> &Url {
        match self {
            Self::Key(connection) => &connection.endpoint,
            Self::Entra { endpoint, .. } => endpoint,
        }
    }

    /// What authenticates requests, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Key(_) => "access key",
            Self::Entra { tokens, .. } => tokens.credential().kind(),
        }
    }

    /// The token source, with Entra ID.
    pub fn tokens(&self) -> Option<&TokenProvider> {
        match self {
            Self::Key(_) => None,
            Self::Entra { tokens, .. } => Some(tokens),
        }
    }

    /// Adds the authentication headers of one attempt of `POST url` with `body`; returns the
    /// token used, if any (to drop it when ACS refuses it).
    pub async fn authorize(
        &self,
        headers: &mut HeaderMap,
        url: &Url,
        body: &[u8],
    ) -> Result<Option<SecretString>, TokenError> {
        self.authorize_request("POST", headers, url, body).await
    }

    /// As [`AcsAuth::authorize`], for a request with `method` (the HMAC signs it).
    pub async fn authorize_request(
        &self,
        method: &str,
        headers: &mut HeaderMap,
        url: &Url,
        body: &[u8],
    ) -> Result<Option<SecretString>, TokenError> {
        match self {
            Self::Key(connection) => {
                let host = match url.port() {
                    Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
                    None => url.host_str().unwrap_or_default().to_owned(),
                };
                let date = httpdate::fmt_http_date(std::time::SystemTime::now());
                let signed = signing::sign(
                    connection.access_key(),
                    method,
                    &url[Position::BeforePath..],
                    &host,
                    &date,
                    body,
                );
                let mut put = |name: &'static str, value: &str| {
                    let value = HeaderValue::from_str(value).expect("header values are ASCII");
                    headers.insert(name, value);
                };
                put("x-ms-date", &signed.date);
                put("x-ms-content-sha256", &signed.content_sha256);
                put("authorization", &signed.authorization);
                // The SDK's HMAC policy asks for the request id back; its bearer policy not.
                put("x-ms-return-client-request-id", "true");
                Ok(None)
            }
            Self::Entra { tokens, .. } => {
                let token = tokens.token().await?;
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                    .map_err(|_| TokenError::Malformed)?;
                value.set_sensitive(true);
                headers.insert("authorization", value);
                Ok(Some(token))
            }
        }
    }

    /// ACS refused `token` (401): it is dropped, so the next attempt fetches another.
    pub fn refused(&self, token: &SecretString) {
        if let Self::Entra { tokens, .. } = self {
            tokens.invalidate(token);
        }
    }
}

impl std::fmt::Debug for AcsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcsAuth")
            .field("endpoint", &self.endpoint().as_str())
            .field("kind", &self.kind())
            .finish()
    }
}
