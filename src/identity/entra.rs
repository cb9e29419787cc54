//! The token answers of Entra ID and the managed-identity endpoints: one form POST to
//! `{authority}/{tenant}/oauth2/v2.0/token`, and the parsing of every token response shape.

use std::time::Duration;

use reqwest::StatusCode;
use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use crate::identity::TokenError;
use crate::identity::provider::AccessToken;

/// Assumed lifetime when an answer gives none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    /// Seconds from now: a number (Entra), or a numeric string (IMDS).
    expires_in: Option<serde_json::Value>,
    /// Unix seconds: a numeric string (App Service, IMDS) or a number.
    expires_on: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: Option<serde_json::Value>,
}

/// POSTs `form` to the token endpoint.
pub(super) async fn request(
    http: &reqwest::Client,
    token_url: &Url,
    form: &[(&str, &str)],
) -> Result<AccessToken, TokenError> {
    let response = http.post(token_url.clone()).form(form).send().await;
    answer(response).await
}

/// Reads a token endpoint's answer: a token, a refusal, or an outage.
pub(super) async fn answer(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<AccessToken, TokenError> {
    // Without the URL's query or any body: reqwest errors name only the URL.
    let response =
        response.map_err(|error| TokenError::Unavailable(error.without_url().to_string()))?;
    let status = response.status();
    // As the Azure SDKs retry token requests (this module imports nothing of the service's,
    // so that configuration can name its types): 408, 429, 5xx, and IMDS's 404 while the
    // identity is being set up and 410 while it restarts.
    if status.is_server_error() || matches!(status.as_u16(), 404 | 408 | 410 | 429) {
        return Err(TokenError::Unavailable(format!("answered {status}")));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|error| TokenError::Unavailable(error.without_url().to_string()))?;
    if !status.is_success() {
        return Err(refusal(status, &bytes));
    }
    parse(&bytes)
}

fn refusal(status: StatusCode, bytes: &[u8]) -> TokenError {
    // `error` is a string (OAuth) or an object `{code, message}` (App Service).
    let code = serde_json::from_slice::<OAuthError>(bytes)
        .ok()
        .and_then(|e| e.error)
        .and_then(|error| match error {
            serde_json::Value::String(code) => Some(code),
            serde_json::Value::Object(object) => object
                .get("code")
                .and_then(|code| code.as_str())
                .map(str::to_owned),
            _ => None,
        });
    TokenError::Rejected { status, code }
}

/// A token response: the token and how long it lasts (`expires_in`, else `expires_on`).
pub(super) fn parse(bytes: &[u8]) -> Result<AccessToken, TokenError> {
    let body: TokenResponse = serde_json::from_slice(bytes).map_err(|_| TokenError::Malformed)?;
    let number = |value: &Option<serde_json::Value>| match value {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    let lifetime = match (number(&body.expires_in), number(&body.expires_on)) {
        (Some(seconds), _) => Duration::from_secs(seconds),
        (None, Some(unix)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Duration::from_secs(unix.saturating_sub(now))
        }
        (None, None) => DEFAULT_LIFETIME,
    };
    Ok(AccessToken {
        token: body.access_token,
        lifetime,
    })
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn every_token_response_shape_parses() {
        // Entra ID (v2 endpoint): a number of seconds.
        let token =
            parse(br#"{"token_type":"Bearer","expires_in":3599,"access_token":"a"}"#).unwrap();
        assert_eq!(token.token.expose_secret(), "a");
        assert_eq!(token.lifetime, Duration::from_secs(3599));
        // IMDS: numeric strings.
        let token = parse(br#"{"access_token":"b","refresh_token":"","expires_in":"86399","expires_on":"1506484173","not_before":"1506397773","resource":"https://graph.microsoft.com","token_type":"Bearer"}"#).unwrap();
        assert_eq!(token.lifetime, Duration::from_secs(86399));
        // App Service 2019-08-01: only expires_on, in Unix seconds.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let body = format!(
            r#"{{"access_token":"c","expires_on":"{}","resource":"https://communication.azure.com/","token_type":"Bearer","client_id":"x"}}"#,
            now + 600
        );
        let token = parse(body.as_bytes()).unwrap();
        assert!(
            token.lifetime <= Duration::from_secs(600)
                && token.lifetime >= Duration::from_secs(590)
        );
        assert!(parse(b"{}").is_err());
    }

    #[test]
    fn refusals_keep_the_code_of_both_error_shapes() {
        let oauth = refusal(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        );
        assert!(
            matches!(oauth, TokenError::Rejected { code: Some(ref c), .. } if c == "invalid_request")
        );
        let app_service = refusal(
            StatusCode::UNAUTHORIZED,
            br#"{"error":{"code":"Unauthorized","message":"m"}}"#,
        );
        assert!(
            matches!(app_service, TokenError::Rejected { code: Some(ref c), .. } if c == "Unauthorized")
        );
    }
}
