//! [`Credential`]: how a token is obtained, one variant per kind of credential.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::identity::provider::AccessToken;
use crate::identity::{
    CertificateError, ClientCertificate, CredentialSettings, JWT_BEARER, TokenError, entra,
    managed, resource_of, token_url,
};

/// A credential, ready to fetch tokens (its certificate, if any, loaded).
pub enum Credential {
    ClientSecret {
        token_url: Url,
        client_id: String,
        secret: SecretString,
    },
    Certificate {
        token_url: Url,
        client_id: String,
        certificate: ClientCertificate,
    },
    WorkloadIdentity {
        token_url: Url,
        client_id: String,
        token_file: PathBuf,
    },
    AppServiceIdentity {
        endpoint: Url,
        header: SecretString,
        client_id: Option<String>,
    },
    ImdsIdentity {
        endpoint: Url,
        client_id: Option<String>,
    },
}

impl Credential {
    /// The credential `settings` describe; a certificate file is read and checked now.
    pub fn new(settings: CredentialSettings) -> Result<Self, CertificateError> {
        Ok(match settings {
            CredentialSettings::ClientSecret {
                authority,
                tenant_id,
                client_id,
                secret,
            } => Self::ClientSecret {
                token_url: token_url(&authority, &tenant_id),
                client_id,
                secret,
            },
            CredentialSettings::Certificate {
                authority,
                tenant_id,
                client_id,
                path,
            } => Self::Certificate {
                token_url: token_url(&authority, &tenant_id),
                client_id,
                certificate: ClientCertificate::load(&path)?,
            },
            CredentialSettings::WorkloadIdentity {
                authority,
                tenant_id,
                client_id,
                token_file,
            } => Self::WorkloadIdentity {
                token_url: token_url(&authority, &tenant_id),
                client_id,
                token_file,
            },
            CredentialSettings::ManagedIdentity {
                app_service: Some((endpoint, header)),
                client_id,
                ..
            } => Self::AppServiceIdentity {
                endpoint,
                header,
                client_id,
            },
            CredentialSettings::ManagedIdentity {
                app_service: None,
                imds,
                client_id,
            } => Self::ImdsIdentity {
                endpoint: managed::imds_token_url(&imds),
                client_id,
            },
        })
    }

    /// What kind of credential this is, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ClientSecret { .. } => "secret",
            Self::Certificate { .. } => "certificate",
            Self::WorkloadIdentity { .. } => "workload-identity",
            Self::AppServiceIdentity { .. } => "managed-identity (App Service endpoint)",
            Self::ImdsIdentity { .. } => "managed-identity (IMDS)",
        }
    }

    /// Where tokens come from (no secret in it), for logs.
    pub fn endpoint(&self) -> &Url {
        match self {
            Self::ClientSecret { token_url, .. }
            | Self::Certificate { token_url, .. }
            | Self::WorkloadIdentity { token_url, .. } => token_url,
            Self::AppServiceIdentity { endpoint, .. } | Self::ImdsIdentity { endpoint, .. } => {
                endpoint
            }
        }
    }

    /// Fetches a new token for `scope`.
    pub(crate) async fn fetch(
        &self,
        http: &reqwest::Client,
        scope: &str,
    ) -> Result<AccessToken, TokenError> {
        match self {
            Self::ClientSecret {
                token_url,
                client_id,
                secret,
            } => {
                let form = [
                    ("client_id", client_id.as_str()),
                    ("client_secret", secret.expose_secret()),
                    ("scope", scope),
                    ("grant_type", "client_credentials"),
                ];
                entra::request(http, token_url, &form).await
            }
            Self::Certificate {
                token_url,
                client_id,
                certificate,
            } => {
                let assertion = certificate.assertion(client_id, token_url.as_str())?;
                assertion_grant(http, token_url, client_id, &assertion, scope).await
            }
            Self::WorkloadIdentity {
                token_url,
                client_id,
                token_file,
            } => {
                // Read for every token: the platform replaces the file before it expires.
                let assertion = tokio::fs::read_to_string(token_file)
                    .await
                    .map_err(|error| {
                        TokenError::Unavailable(format!(
                            "cannot read the federated token file {}: {error}",
                            token_file.display()
                        ))
                    })?;
                let assertion = SecretString::from(assertion.trim().to_owned());
                assertion_grant(http, token_url, client_id, &assertion, scope).await
            }
            Self::AppServiceIdentity {
                endpoint,
                header,
                client_id,
            } => {
                managed::app_service(
                    http,
                    endpoint,
                    header,
                    resource_of(scope),
                    client_id.as_deref(),
                )
                .await
            }
            Self::ImdsIdentity {
                endpoint,
                client_id,
            } => managed::imds(http, endpoint, resource_of(scope), client_id.as_deref()).await,
        }
    }
}

/// The client-credentials grant with a signed assertion instead of a secret.
async fn assertion_grant(
    http: &reqwest::Client,
    token_url: &Url,
    client_id: &str,
    assertion: &SecretString,
    scope: &str,
) -> Result<AccessToken, TokenError> {
    let form = [
        ("client_id", client_id),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion.expose_secret()),
        ("scope", scope),
        ("grant_type", "client_credentials"),
    ];
    entra::request(http, token_url, &form).await
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind())
            .field("endpoint", &self.endpoint().as_str())
            .finish_non_exhaustive()
    }
}
