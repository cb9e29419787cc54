//! The HTTP side of the client: requests to the callops API, its error body turned into a
//! typed error, long polls looped past the server's cap. Never shows the API key.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

/// The server caps one long poll at `operations.max_wait_secs` (60): longer waits loop.
const MAX_POLL_SECS: u64 = 60;
/// Slack over a long poll's own wait before the request counts as hung.
const POLL_SLACK: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// For requests that do not wait on the server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a command could not get its answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not an http(s) URL (--url, CALLOPS_URL)")]
    InvalidUrl(String),
    #[error("the API key is not a valid header value (--api-key, CALLOPS_API_KEY)")]
    InvalidApiKey,
    #[error("cannot build an HTTP client: {0}")]
    Build(String),
    #[error("cannot reach {url}: {cause}")]
    Connect { url: String, cause: String },
    /// The API's own error body.
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// An error status without the API's error body (a proxy, another service).
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("unexpected answer from {url}: {cause}")]
    Decode { url: String, cause: String },
}

/// A client of one callops service.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
}

impl Client {
    /// A client of the service at `base`, sending `api-key` when one is given.
    pub fn new(base: &str, api_key: Option<&SecretString>) -> Result<Self, ClientError> {
        let base = Url::parse(base)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
            .ok_or_else(|| ClientError::InvalidUrl(base.to_owned()))?;
        let mut headers = HeaderMap::new();
        if let Some(key) = api_key {
            let mut value = HeaderValue::from_str(key.expose_secret().trim())
                .map_err(|_| ClientError::InvalidApiKey)?;
            value.set_sensitive(true);
            headers.insert("api-key", value);
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("callops-cli/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|error| ClientError::Build(error.to_string()))?;
        Ok(Self { http, base })
    }

    /// The URL of `segments` under the base (each segment percent-encoded), with `query`.
    pub fn endpoint(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(name, value)| (*name, value.as_str())));
        }
        url
    }

    /// A `nextLink` (a path from the server's root, or a whole URL) as a URL under the base,
    /// so a base behind a path prefix keeps its prefix.
    pub fn follow(&self, link: &str) -> Result<Url, ClientError> {
        if let Ok(url) = Url::parse(link) {
            return Ok(url);
        }
        let text = format!("{}{link}", self.base.as_str().trim_end_matches('/'));
        Url::parse(&text).map_err(|error| ClientError::Decode {
            url: shown(&self.base),
            cause: format!("nextLink {link:?}: {error}"),
        })
    }

    /// Sends a JSON request and returns the answer's JSON (`Null` for an empty 2xx).
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let mut request = self.http.request(method, url.clone()).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|error| connect_error(&url, &error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| connect_error(&url, &error))?;
        if !status.is_success() {
            return Err(api_error(&url, status, &bytes));
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|error| ClientError::Decode {
            url: shown(&url),
            cause: error.to_string(),
        })
    }

    pub async fn get(&self, url: Url) -> Result<Value, ClientError> {
        self.send(Method::GET, url, None, REQUEST_TIMEOUT).await
    }

    pub async fn post(&self, url: Url, body: &Value) -> Result<Value, ClientError> {
        self.send(Method::POST, url, Some(body), REQUEST_TIMEOUT)
            .await
    }

    pub async fn delete(&self, url: Url) -> Result<Value, ClientError> {
        self.send(Method::DELETE, url, None, REQUEST_TIMEOUT).await
    }

    /// `GET /v1/operations/{id}`, long-polled until it settles or `total` has passed
    /// (in polls of at most the server's cap).
    pub async fn wait(&self, id: &str, total: Duration) -> Result<Value, ClientError> {
        let deadline = Instant::now() + total;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Whole seconds, rounded up, so a wait never ends early by a fraction.
            let secs = (left.as_millis().div_ceil(1000) as u64).min(MAX_POLL_SECS);
            let url = self.endpoint(&["v1", "operations", id], &[("wait", secs.to_string())]);
            let operation = self
                .send(
                    Method::GET,
                    url,
                    None,
                    Duration::from_secs(secs) + POLL_SLACK,
                )
                .await?;
            if is_settled(&operation) || secs == 0 || Instant::now() >= deadline {
                return Ok(operation);
            }
        }
    }

    /// Opens the change stream at `url`, after `last_event_id` when given.
    pub async fn stream(
        &self,
        url: Url,
        last_event_id: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self
            .http
            .get(url.clone())
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request
            .send()
            .await
            .map_err(|error| connect_error(&url, &error))?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.unwrap_or_default();
            return Err(api_error(&url, status, &bytes));
        }
        Ok(response)
    }

    /// The base URL as shown in messages.
    pub fn base(&self) -> String {
        shown(&self.base)
    }
}

/// Whether an operation's `status` is final.
pub fn is_settled(operation: &Value) -> bool {
    matches!(
        operation["status"].as_str(),
        Some("Succeeded" | "Failed" | "Canceled")
    )
}

/// An error answer: the API's `{"error": {"code", "message"}}` when it is one.
pub fn api_error(url: &Url, status: StatusCode, body: &[u8]) -> ClientError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().map(|body| &body["error"]);
    match error.and_then(|error| Some((error["code"].as_str()?, error["message"].as_str()?))) {
        Some((code, message)) => ClientError::Api {
            status: status.as_u16(),
            code: code.to_owned(),
            message: message.to_owned(),
        },
        None => ClientError::Status {
            url: shown(url),
            status: status.as_u16(),
        },
    }
}

/// A transport error, naming the URL (without a password or query) and the cause chain.
fn connect_error(url: &Url, error: &reqwest::Error) -> ClientError {
    let mut cause = if error.is_timeout() {
        "timed out".to_owned()
    } else {
        String::new()
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(inner) = source {
        let text = inner.to_string();
        if !cause.contains(&text) {
            if !cause.is_empty() {
                cause.push_str(": ");
            }
            cause.push_str(&text);
        }
        source = inner.source();
    }
    if cause.is_empty() {
        cause = "request failed".to_owned();
    }
    ClientError::Connect {
        url: shown(url),
        cause: cause.replace('\n', " "),
    }
}

/// `url` without its password and query, for messages.
fn shown(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_password(None);
    url.set_query(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_under_the_base_and_next_links_keep_its_prefix() {
        let client = Client::new("http://127.0.0.1:8080/callops/", None).unwrap();
        let url = client.endpoint(
            &[
                "v1",
                "acs",
                "callConnections",
                "a/b c",
                "participants:remove",
            ],
            &[],
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/callops/v1/acs/callConnections/a%2Fb%20c/participants:remove"
        );
        let url = client.endpoint(&["v1", "operations"], &[("status", "Failed".to_owned())]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/callops/v1/operations?status=Failed"
        );
        assert_eq!(
            client
                .follow("/v1/operations?skipToken=x")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/callops/v1/operations?skipToken=x"
        );
    }

    #[test]
    fn bad_settings_are_refused_without_echoing_the_key() {
        assert!(matches!(
            Client::new("127.0.0.1:8080", None),
            Err(ClientError::InvalidUrl(_))
        ));
        let key = SecretString::from("bad\nkey-0123456789");
        let error = Client::new("http://localhost", Some(&key)).err().unwrap();
        assert!(!error.to_string().contains("key-0123"), "{error}");
    }

    #[test]
    fn error_bodies_become_their_code_and_message() {
        let url = Url::parse("http://u:pw@h/v1/operations/x?wait=1").unwrap();
        let body = br#"{"error":{"code":"NotFound","message":"no such operation"}}"#;
        let error = api_error(&url, StatusCode::NOT_FOUND, body);
        assert_eq!(error.to_string(), "NotFound: no such operation");
        let error = api_error(&url, StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(error.to_string(), "http://u@h/v1/operations/x answered 502");
    }
}
