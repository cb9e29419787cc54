//! Parsing of ACS connection strings (`endpoint=https://<res>.communication.azure.com/;accesskey=<base64>`).
//!
//! Split on `;`, then on the first `=`; keys are case-insensitive and the key's value keeps
//! its trailing `=` padding. The access key never appears in `Debug` output or errors.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretSlice};
use url::Url;

/// A parsed connection string: the resource endpoint and the decoded HMAC key.
#[derive(Clone)]
pub struct ConnectionString {
    /// Resource endpoint, always ending with `/`.
    pub endpoint: Url,
    access_key: SecretSlice<u8>,
}

/// What is wrong with a connection string. Messages name the expected form and never echo
/// the key.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error(
        "{0} is missing; expected `endpoint=https://<resource>.communication.azure.com/;accesskey=<base64 key>`"
    )]
    Missing(&'static str),
    #[error(
        "`{0}` is not a `key=value` pair; expected `endpoint=https://<resource>.communication.azure.com/;accesskey=<base64 key>`"
    )]
    NotAPair(String),
    #[error("the endpoint is not an http(s) URL: {0}")]
    BadEndpoint(String),
    #[error("the accesskey is not valid base64 (its value is not shown)")]
    BadKey,
}

impl ConnectionString {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, ConnectionStringError> {
        let mut endpoint = None;
        let mut access_key = None;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = part.split_once('=') else {
                // Only the key name is echoed: the part could be a misplaced secret.
                let shown: String = part.chars().take(12).collect();
                return Err(ConnectionStringError::NotAPair(format!("{shown}...")));
            };
            match key.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(value.trim()),
                "accesskey" => access_key = Some(value.trim()),
                _ => {}
            }
        }
        let endpoint = endpoint.ok_or(ConnectionStringError::Missing("endpoint"))?;
        let access_key = access_key.ok_or(ConnectionStringError::Missing("accesskey"))?;
        let mut endpoint = Url::parse(endpoint)
            .map_err(|e| ConnectionStringError::BadEndpoint(format!("{endpoint}: {e}")))?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host().is_none() {
            return Err(ConnectionStringError::BadEndpoint(endpoint.to_string()));
        }
        if !endpoint.path().ends_with('/') {
            let path = format!("{}/", endpoint.path());
            endpoint.set_path(&path);
        }
        let key = STANDARD
            .decode(access_key)
            .map_err(|_| ConnectionStringError::BadKey)?;
        if key.is_empty() {
            return Err(ConnectionStringError::BadKey);
        }
        Ok(Self {
            endpoint,
            access_key: key.into(),
        })
    }

    /// Builds a connection string from parts (used for the in-process emulator).
    pub fn new(endpoint: Url, access_key: Vec<u8>) -> Self {
        Self {
            endpoint,
            access_key: access_key.into(),
        }
    }

    /// The decoded HMAC key.
    pub fn access_key(&self) -> &[u8] {
        self.access_key.expose_secret()
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("endpoint", &self.endpoint.as_str())
            .field("access_key", &"[redacted]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA=";

    #[test]
    fn parses_the_documented_form() {
        let cs = ConnectionString::parse(&format!(
            "endpoint=https://res.communication.azure.com/;accesskey={KEY}"
        ))
        .unwrap();
        assert_eq!(cs.endpoint.as_str(), "https://res.communication.azure.com/");
        assert_eq!(cs.access_key(), [b'0'; 32]);
    }

    #[test]
    fn keys_are_case_insensitive_and_endpoint_gets_a_slash() {
        let cs = ConnectionString::parse(&format!(
            "AccessKey={KEY}; Endpoint=http://127.0.0.1:18555;"
        ))
        .unwrap();
        assert_eq!(cs.endpoint.as_str(), "http://127.0.0.1:18555/");
        assert_eq!(cs.access_key().len(), 32);
    }

    #[test]
    fn errors_name_the_form_and_hide_the_key() {
        let check = |text: &str, want: ConnectionStringError| {
            let err = ConnectionString::parse(text).unwrap_err();
            assert_eq!(err, want, "{text}");
            assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        };
        check(
            "accesskey=c2VjcmV0",
            ConnectionStringError::Missing("endpoint"),
        );
        check(
            "endpoint=https://x.communication.azure.com/",
            ConnectionStringError::Missing("accesskey"),
        );
        check(
            "endpoint=https://x/;accesskey=not base64!c2VjcmV0",
            ConnectionStringError::BadKey,
        );
        check(
            "endpoint=ftp://x/;accesskey=c2VjcmV0",
            ConnectionStringError::BadEndpoint("ftp://x/".into()),
        );
        let err = ConnectionString::parse("c2VjcmV0c2VjcmV0c2VjcmV0").unwrap_err();
        assert!(err.to_string().contains("endpoint=https://"));
        assert!(!err.to_string().contains("c2VjcmV0c2VjcmV0c2VjcmV0"));
    }

    #[test]
    fn debug_hides_the_key() {
        let cs = ConnectionString::parse(&format!("endpoint=https://x/;accesskey={KEY}")).unwrap();
        let shown = format!("{cs:?}");
        assert!(
            !shown.contains(KEY) && shown.contains("redacted"),
            "{shown}"
        );
    }
}
