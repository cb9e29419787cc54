//! A client certificate (a PEM file with an RSA private key and its certificate) and the
//! assertion it signs for the client-credentials grant: a JWT (RS256) whose header names the
//! certificate by thumbprint (`x5t`, SHA-1, and `x5t#S256`, SHA-256), with `aud` the token
//! endpoint, `iss` = `sub` = the client id, a fresh `jti`, `nbf` and a 10-minute `exp`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RsaKeyPair, UnparsedPublicKey,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::SecretString;
use serde_json::json;

use crate::identity::TokenError;

/// How long an assertion is valid (as MSAL makes them).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// Why a certificate file cannot be used. Never shows key material.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: String },
    #[error("{0} has no CERTIFICATE block")]
    NoCertificate(String),
    #[error("{0} has no private key block (PRIVATE KEY or RSA PRIVATE KEY)")]
    NoKey(String),
    #[error("the private key in {0} is not an RSA key of 2048 bits or more")]
    NotRsa(String),
    #[error("the private key in {0} does not belong to its (first) certificate")]
    Mismatch(String),
    #[error("the certificate in {0} cannot be parsed")]
    BadCertificate(String),
}

/// A loaded client certificate.
pub struct ClientCertificate {
    key: RsaKeyPair,
    x5t: String,
    x5t_s256: String,
}

/// `x5t` and `x5t#S256` of a DER certificate: base64url SHA-1 and SHA-256 of it.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    (
        URL_SAFE_NO_PAD.encode(digest(&SHA1_FOR_LEGACY_USE_ONLY, der)),
        URL_SAFE_NO_PAD.encode(digest(&SHA256, der)),
    )
}

/// The SubjectPublicKeyInfo of a DER certificate.
pub fn public_key_info(der: &[u8]) -> Option<Vec<u8>> {
    let der = CertificateDer::from(der);
    let certificate = webpki::EndEntityCert::try_from(&der).ok()?;
    Some(certificate.subject_public_key_info().as_ref().to_vec())
}

/// True when `signature` is an RS256 signature of `message` by the key of `spki`.
pub fn verify_rs256(spki: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, spki)
        .verify(message, signature)
        .is_ok()
}

impl ClientCertificate {
    /// Reads `path`: the first certificate and the private key, which must match.
    pub fn load(path: &Path) -> Result<Self, CertificateError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|error| CertificateError::Read {
            path: shown.clone(),
            error: error.to_string(),
        })?;
        Self::from_pem(&pem, &shown)
    }

    /// Parses PEM text (`name` is used in errors).
    pub fn from_pem(pem: &[u8], name: &str) -> Result<Self, CertificateError> {
        let certificate = CertificateDer::pem_slice_iter(pem)
            .find_map(Result::ok)
            .ok_or_else(|| CertificateError::NoCertificate(name.to_owned()))?;
        let key = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|_| CertificateError::NoKey(name.to_owned()))?;
        let key = match &key {
            PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
            _ => return Err(CertificateError::NotRsa(name.to_owned())),
        }
        .map_err(|_| CertificateError::NotRsa(name.to_owned()))?;
        let spki = public_key_info(&certificate)
            .ok_or_else(|| CertificateError::BadCertificate(name.to_owned()))?;
        // The key must be the certificate's: sign something and check it with the latter.
        let probe = b"callops certificate check";
        let mut signature = vec![0; key.public_modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            probe,
            &mut signature,
        )
        .map_err(|_| CertificateError::NotRsa(name.to_owned()))?;
        if !verify_rs256(&spki, probe, &signature) {
            return Err(CertificateError::Mismatch(name.to_owned()));
        }
        let (x5t, x5t_s256) = thumbprints(&certificate);
        Ok(Self { key, x5t, x5t_s256 })
    }

    /// The SHA-1 thumbprint (`x5t`), base64url.
    pub fn x5t(&self) -> &str {
        &self.x5t
    }

    /// A signed assertion for `client_id` at the token endpoint `audience`.
    pub fn assertion(&self, client_id: &str, audience: &str) -> Result<SecretString, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let header = json!({
            "alg": "RS256",
            "typ": "JWT",
            "x5t": self.x5t,
            "x5t#S256": self.x5t_s256,
        });
        let claims = json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid::Uuid::new_v4(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| TokenError::Credential("the certificate's key could not sign".into()))?;
        Ok(SecretString::from(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t", &self.x5t)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    /// The emulator's development certificate: a private key, then its certificate.
    const DEV_PEM: &str = include_str!("../emulator/keys/dev-client-certificate.pem");
    /// Another RSA key.
    const OTHER_KEY: &str = include_str!("../emulator/keys/dev-signing-key-1.pem");

    fn test_pem() -> (String, Vec<u8>) {
        let der = CertificateDer::pem_slice_iter(DEV_PEM.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        (DEV_PEM.to_owned(), der.to_vec())
    }

    #[test]
    fn an_assertion_is_signed_by_the_certificate_and_names_it() {
        let (pem, der) = test_pem();
        let certificate = ClientCertificate::from_pem(pem.as_bytes(), "test.pem").unwrap();
        let assertion = certificate
            .assertion("app-id", "https://login.example/t/oauth2/v2.0/token")
            .unwrap();
        let parts: Vec<&str> = assertion.expose_secret().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let (x5t, x5t_s256) = thumbprints(&der);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["x5t"], x5t.as_str());
        assert_eq!(header["x5t#S256"], x5t_s256.as_str());
        assert_eq!(claims["aud"], "https://login.example/t/oauth2/v2.0/token");
        assert_eq!(claims["iss"], "app-id");
        assert_eq!(claims["sub"], "app-id");
        assert!(claims["jti"].is_string());
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap(),
            600
        );
        let spki = public_key_info(&der).unwrap();
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        assert!(verify_rs256(&spki, signed.as_bytes(), &signature));
        assert!(!verify_rs256(&spki, b"something else", &signature));
        assert!(!format!("{certificate:?}").contains("PRIVATE"));
    }

    #[test]
    fn unusable_files_are_refused_by_name() {
        let (pem, _) = test_pem();
        let certificate_only = &pem[pem.find("-----BEGIN CERTIFICATE").unwrap()..];
        let key_only = &pem[..pem.find("-----BEGIN CERTIFICATE").unwrap()];
        let error = |text: &str| {
            ClientCertificate::from_pem(text.as_bytes(), "c.pem")
                .unwrap_err()
                .to_string()
        };
        assert!(error(certificate_only).contains("private key"));
        assert!(error(key_only).contains("CERTIFICATE"));
        // The key of one certificate with another certificate.
        let mixed = format!("{OTHER_KEY}{certificate_only}");
        assert!(error(&mixed).contains("does not belong"));
        let missing = ClientCertificate::load(Path::new("/nonexistent/c.pem")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/c.pem"));
    }
}
