//! Managed identity: the App Service / Container Apps endpoint (`IDENTITY_ENDPOINT` with the
//! `X-IDENTITY-HEADER` secret, api-version 2019-08-01) and the Instance Metadata Service
//! (`Metadata: true`, api-version 2018-02-01), as the Azure SDKs call them.

use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::identity::TokenError;
use crate::identity::entra;
use crate::identity::provider::AccessToken;

/// The App Service protocol's api-version.
pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";
/// The IMDS api-version the Azure SDKs use.
pub const IMDS_API_VERSION: &str = "2018-02-01";
/// IMDS's token path below its address.
pub const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// The IMDS token URL below `base` (`http://169.254.169.254` on Azure).
pub fn imds_token_url(base: &Url) -> Url {
    let mut url = base.clone();
    let path = format!("{}{IMDS_TOKEN_PATH}", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

/// `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=..[&client_id=..]`.
pub(super) async fn app_service(
    http: &reqwest::Client,
    endpoint: &Url,
    header: &SecretString,
    resource: &str,
    client_id: Option<&str>,
) -> Result<AccessToken, TokenError> {
    let url = with_query(endpoint, APP_SERVICE_API_VERSION, resource, client_id);
    let mut secret = HeaderValue::from_str(header.expose_secret())
        .map_err(|_| TokenError::Credential("IDENTITY_HEADER is not a header value".into()))?;
    secret.set_sensitive(true);
    let response = http
        .get(url)
        .header("x-identity-header", secret)
        .send()
        .await;
    entra::answer(response).await
}

/// `GET {imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=..` with
/// `Metadata: true`.
pub(super) async fn imds(
    http: &reqwest::Client,
    endpoint: &Url,
    resource: &str,
    client_id: Option<&str>,
) -> Result<AccessToken, TokenError> {
    let url = with_query(endpoint, IMDS_API_VERSION, resource, client_id);
    let response = http.get(url).header("metadata", "true").send().await;
    entra::answer(response).await
}

fn with_query(endpoint: &Url, api_version: &str, resource: &str, client_id: Option<&str>) -> Url {
    let mut url = endpoint.clone();
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("api-version", api_version)
            .append_pair("resource", resource);
        if let Some(client_id) = client_id {
            query.append_pair("client_id", client_id);
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_sdk_query() {
        let base = Url::parse("http://169.254.169.254").unwrap();
        let imds = imds_token_url(&base);
        assert_eq!(
            imds.as_str(),
            "http://169.254.169.254/metadata/identity/oauth2/token"
        );
        assert_eq!(
            with_query(&imds, IMDS_API_VERSION, "https://graph.microsoft.com", None).as_str(),
            "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fgraph.microsoft.com"
        );
        let endpoint = Url::parse("http://localhost:42356/msi/token").unwrap();
        assert_eq!(
            with_query(
                &endpoint,
                APP_SERVICE_API_VERSION,
                "https://communication.azure.com/",
                Some("c1")
            )
            .as_str(),
            "http://localhost:42356/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fcommunication.azure.com%2F&client_id=c1"
        );
    }
}
