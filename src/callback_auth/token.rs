//! What a callback token must be: pure checks over a JWT and a key, with jsonwebtoken
//! doing the cryptography and the standard claims.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::AuthError;

/// Longest token looked at; Microsoft's are about 1–2 KB.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The rules one platform's tokens must meet.
#[derive(Debug, Clone)]
pub struct TokenRules {
    validation: Validation,
    /// Graph tokens carry the tenant id (`tid`).
    require_tenant: bool,
}

/// The claims looked at beyond the standard ones.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    tid: Option<String>,
}

impl TokenRules {
    /// RS256 only; `iss` one of `issuers`, `aud` = `audience`, `exp` and `nbf` checked
    /// with `leeway_secs` of clock skew.
    pub fn new(issuers: &[String], audience: &str, leeway_secs: u64, require_tenant: bool) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(issuers);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = leeway_secs;
        Self {
            validation,
            require_tenant,
        }
    }

    /// Checks the signature with `key`, then the claims.
    pub fn check(&self, token: &str, key: &DecodingKey) -> Result<(), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|error| AuthError::from_jwt(&error))?;
        if self.require_tenant && data.claims.tid.is_none_or(|tid| tid.trim().is_empty()) {
            return Err(AuthError::MissingClaim("tid"));
        }
        Ok(())
    }
}

/// The token in `Authorization: Bearer <token>`.
pub fn bearer(value: Option<&[u8]>) -> Result<&str, AuthError> {
    let value = value.ok_or(AuthError::MissingToken)?;
    let value = std::str::from_utf8(value).map_err(|_| AuthError::MissingToken)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::MissingToken)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// The key id a token names, once its header shows it is an RS256 JWT.
pub fn key_id(token: &str) -> Result<String, AuthError> {
    // `alg: none` and unknown algorithms fail here: jsonwebtoken has no such algorithm.
    let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
    if header.alg != Algorithm::RS256 {
        return Err(AuthError::Algorithm);
    }
    header.kid.ok_or(AuthError::NoKeyId)
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::jwk::Jwk;
    use serde_json::{Value, json};

    use super::*;
    use crate::emulator::callback_signing::CallbackSigner;

    fn signer() -> CallbackSigner {
        CallbackSigner::for_tests()
    }

    fn key(signer: &CallbackSigner) -> DecodingKey {
        let jwk: Jwk = serde_json::from_value(signer.jwks()["keys"][0].clone()).unwrap();
        DecodingKey::from_jwk(&jwk).unwrap()
    }

    fn acs_rules() -> TokenRules {
        TokenRules::new(
            &["https://acscallautomation.communication.azure.com".to_owned()],
            "resource",
            30,
            false,
        )
    }

    fn graph_rules() -> TokenRules {
        TokenRules::new(
            &[
                "https://graph.microsoft.com".to_owned(),
                "https://api.botframework.com".to_owned(),
            ],
            "bot",
            30,
            true,
        )
    }

    fn with(mut claims: Value, field: &str, value: Value) -> Value {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(field);
        } else {
            claims[field] = value;
        }
        claims
    }

    #[test]
    fn genuine_tokens_pass() {
        let signer = signer();
        assert!(
            acs_rules()
                .check(&signer.acs_token(), &key(&signer))
                .is_ok()
        );
        assert!(
            graph_rules()
                .check(&signer.graph_token(), &key(&signer))
                .is_ok()
        );
        let other_issuer = with(
            signer.graph_claims(),
            "iss",
            json!("https://graph.microsoft.com"),
        );
        assert!(
            graph_rules()
                .check(&signer.sign(&other_issuer), &key(&signer))
                .is_ok()
        );
    }

    #[test]
    fn the_claims_graph_documents_pass_with_its_bot_as_audience() {
        // Microsoft's example of a notification token's claims, with a lifetime around now.
        let text =
            include_str!("../../tests/fixtures/graph/notification_auth_token_claims_example.json");
        let mut claims: Value = serde_json::from_str(text).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        claims["iat"] = json!(now);
        claims["nbf"] = json!(now);
        claims["exp"] = json!(now + 3900);
        let signer = signer();
        let rules = TokenRules::new(
            &[
                "https://graph.microsoft.com".to_owned(),
                "https://api.botframework.com".to_owned(),
            ],
            "0efc74f7-41c3-47a4-8775-7259bfef4241",
            30,
            true,
        );
        assert!(rules.check(&signer.sign(&claims), &key(&signer)).is_ok());
    }

    #[test]
    fn each_wrong_claim_is_named() {
        let signer = signer();
        let key = key(&signer);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let acs = signer.acs_claims();
        let cases = [
            (with(acs.clone(), "iss", json!("https://evil")), "issuer"),
            (
                with(acs.clone(), "aud", json!("another-resource")),
                "audience",
            ),
            (with(acs.clone(), "exp", json!(now - 120)), "expired"),
            (with(acs.clone(), "nbf", json!(now + 120)), "not valid yet"),
            (with(acs.clone(), "exp", Value::Null), "exp"),
            (with(acs.clone(), "aud", Value::Null), "aud"),
            (with(acs.clone(), "iss", Value::Null), "iss"),
        ];
        for (claims, reason) in cases {
            let error = acs_rules().check(&signer.sign(&claims), &key).unwrap_err();
            assert!(error.to_string().contains(reason), "{error} for {claims}");
        }
        // Within the leeway, an expired token still passes.
        let recent = with(acs, "exp", json!(now - 10));
        assert!(acs_rules().check(&signer.sign(&recent), &key).is_ok());
        let no_tenant = with(signer.graph_claims(), "tid", Value::Null);
        let error = graph_rules()
            .check(&signer.sign(&no_tenant), &key)
            .unwrap_err();
        assert!(error.to_string().contains("tid"), "{error}");
    }

    #[test]
    fn forged_signatures_and_algorithms_are_refused() {
        let signer = signer();
        let key = key(&signer);
        // Signed by another key under the published kid.
        let forged = signer.sign_with_second_key("callops-emulator-1", &signer.acs_claims());
        assert!(matches!(
            acs_rules().check(&forged, &key),
            Err(AuthError::Signature)
        ));
        // Claims altered after signing.
        let token = signer.acs_token();
        let parts: Vec<&str> = token.split('.').collect();
        let tampered_claims = with(signer.acs_claims(), "aud", json!("resource2"));
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(tampered_claims.to_string()),
            parts[2]
        );
        assert!(acs_rules().check(&tampered, &key).is_err());
        // alg: none, and HS256 with the public key as the secret.
        let none_header =
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"callops-emulator-1"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(matches!(key_id(&unsigned), Err(AuthError::Malformed)));
        assert!(acs_rules().check(&unsigned, &key).is_err());
        let hs_header =
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT","kid":"callops-emulator-1"}"#);
        let hs = format!("{hs_header}.{}.{}", parts[1], parts[2]);
        assert!(matches!(key_id(&hs), Err(AuthError::Algorithm)));
        assert!(acs_rules().check(&hs, &key).is_err());
        for garbage in ["", "a.b", "a.b.c", "...", "e30.e30.e30"] {
            assert!(key_id(garbage).is_err(), "{garbage}");
            assert!(acs_rules().check(garbage, &key).is_err(), "{garbage}");
        }
    }

    #[test]
    fn bearer_takes_only_a_bearer_token() {
        assert_eq!(bearer(Some(b"Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer(Some(b"bearer  abc ")).unwrap(), "abc");
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer ",
            b"abc",
            b"\xff\xfe",
        ] {
            assert!(matches!(bearer(Some(bad)), Err(AuthError::MissingToken)));
        }
        assert!(matches!(bearer(None), Err(AuthError::MissingToken)));
        let huge = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert!(matches!(
            bearer(Some(huge.as_bytes())),
            Err(AuthError::Malformed)
        ));
    }
}
