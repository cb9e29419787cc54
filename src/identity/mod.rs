//! Entra ID access tokens for the upstreams (ACS and Graph alike): one seam,
//! [`TokenProvider`] (a cache with single-flight refresh), over every way callops proves who
//! it is ([`Credential`]: client secret, client certificate, workload identity, managed
//! identity by the App Service protocol or IMDS).
//!
//! Hand-written rather than the official `azure_identity` crate (1.0.0; 1.1 is in beta): its
//! IMDS address is fixed (tests could not point it at the emulator), its certificate
//! credential needs OpenSSL (`openssl-sys`, which `deny.toml` bans) and a PKCS#12 file (we read
//! PEM and sign with aws-lc-rs, already our crypto), and it brings its own HTTP pipeline
//! (`azure_core`, `typespec_client_core`: about 180 crates in all, by `cargo tree`). What is
//! left is a few form POSTs and GETs, which share our client, timeouts and error mapping.
//! Tokens, secrets and the identity header are [`SecretString`]s and never reach a log.

mod certificate;
mod credential;
mod entra;
pub mod managed;
mod provider;

use std::path::PathBuf;

use reqwest::StatusCode;
use secrecy::SecretString;
use url::Url;

pub use certificate::{
    CertificateError, ClientCertificate, public_key_info, thumbprints, verify_rs256,
};
pub use credential::Credential;
pub use provider::TokenProvider;

/// The scope of Graph app-only tokens.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// The scope of Communication Services tokens, verbatim as the official SDKs ask for it
/// (the double slash included).
pub const ACS_SCOPE: &str = "https://communication.azure.com//.default";

/// `client_assertion_type` of a signed assertion (certificate or federated token).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The `resource` a managed-identity endpoint takes for `scope` (the scope without
/// `/.default`, as the Azure SDKs derive it).
pub fn resource_of(scope: &str) -> &str {
    scope.strip_suffix("/.default").unwrap_or(scope)
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The authority refused the credentials or the request (wrong tenant, id, secret,
    /// certificate, federated token, or an identity not assigned).
    #[error("the token endpoint refused the credentials ({status}): {}", .code.as_deref().unwrap_or("no error code"))]
    Rejected {
        status: StatusCode,
        /// The OAuth `error` code, e.g. `invalid_client` (the description may echo input,
        /// so it is not kept).
        code: Option<String>,
    },
    /// The authority could not be reached or failed, or a local input (the federated token
    /// file) could not be read: worth retrying.
    #[error("the token endpoint is unavailable: {0}")]
    Unavailable(String),
    /// The answer was not a token response.
    #[error("the token endpoint answered something that is not a token")]
    Malformed,
    /// The credential could not be used (the certificate's key cannot sign).
    #[error("the credential cannot be used: {0}")]
    Credential(String),
}

impl TokenError {
    /// True when a later attempt may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// What a credential is made of, as configured (pure data; [`Credential::new`] loads files).
#[derive(Clone)]
pub enum CredentialSettings {
    /// An app registration's client secret (client-credentials grant).
    ClientSecret {
        authority: Url,
        tenant_id: String,
        client_id: String,
        secret: SecretString,
    },
    /// An app registration's certificate: a PEM file with the private key and the
    /// certificate (assertion grant).
    Certificate {
        authority: Url,
        tenant_id: String,
        client_id: String,
        path: PathBuf,
    },
    /// A federated token in a file (AKS workload identity), exchanged by the assertion grant;
    /// the file is read again for every token, as the platform rotates it.
    WorkloadIdentity {
        authority: Url,
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
    },
    /// The managed identity of the host: the App Service / Container Apps endpoint when
    /// given, else IMDS. `client_id` picks a user-assigned identity.
    ManagedIdentity {
        app_service: Option<(Url, SecretString)>,
        imds: Url,
        client_id: Option<String>,
    },
}

impl CredentialSettings {
    /// The kind, as configured (`managed-identity`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ClientSecret { .. } => "secret",
            Self::Certificate { .. } => "certificate",
            Self::WorkloadIdentity { .. } => "workload-identity",
            Self::ManagedIdentity { .. } => "managed-identity",
        }
    }
}

impl std::fmt::Debug for CredentialSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClientSecret {
                authority,
                tenant_id,
                client_id,
                ..
            } => f
                .debug_struct("ClientSecret")
                .field("authority", &authority.as_str())
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("secret", &"[redacted]")
                .finish(),
            Self::Certificate {
                authority,
                tenant_id,
                client_id,
                path,
            } => f
                .debug_struct("Certificate")
                .field("authority", &authority.as_str())
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("path", path)
                .finish(),
            Self::WorkloadIdentity {
                authority,
                tenant_id,
                client_id,
                token_file,
            } => f
                .debug_struct("WorkloadIdentity")
                .field("authority", &authority.as_str())
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("token_file", token_file)
                .finish(),
            Self::ManagedIdentity {
                app_service,
                imds,
                client_id,
            } => f
                .debug_struct("ManagedIdentity")
                .field(
                    "app_service",
                    &app_service.as_ref().map(|(url, _)| url.as_str()),
                )
                .field("imds", &imds.as_str())
                .field("client_id", client_id)
                .finish(),
        }
    }
}

/// `{authority}/{tenant}/oauth2/v2.0/token`.
pub fn token_url(authority: &Url, tenant_id: &str) -> Url {
    let mut url = authority.clone();
    url.path_segments_mut()
        .expect("the authority is an http(s) URL")
        .pop_if_empty()
        .extend([tenant_id, "oauth2", "v2.0", "token"]);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_scopes_without_default() {
        assert_eq!(resource_of(ACS_SCOPE), "https://communication.azure.com/");
        assert_eq!(resource_of(GRAPH_SCOPE), "https://graph.microsoft.com");
    }

    #[test]
    fn the_token_url_follows_the_authority_and_tenant() {
        let url = token_url(
            &Url::parse("https://login.microsoftonline.com").unwrap(),
            "contoso.onmicrosoft.com",
        );
        assert_eq!(
            url.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let settings = CredentialSettings::ClientSecret {
            authority: Url::parse("https://login.microsoftonline.com").unwrap(),
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: SecretString::from("s3cr3t-value"),
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        let settings = CredentialSettings::ManagedIdentity {
            app_service: Some((
                Url::parse("http://localhost:42356/msi/token").unwrap(),
                SecretString::from("identity-header-value"),
            )),
            imds: Url::parse("http://169.254.169.254").unwrap(),
            client_id: None,
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("identity-header-value"), "{shown}");
    }
}
