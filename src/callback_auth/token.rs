//! What a callback token must be: pure checks over a JWT and a key.
//!
//! The header is read first (RS256 and a `kid`, or refused before any key is looked up);
//! the signature is checked with the key parsed when its set was loaded
//! ([`super::keys::VerifyingKey`]) over the exact `header.payload` bytes; only then is the
//! payload parsed, once, into the few claims looked at, and checked by hand: `exp`
//! (required), `nbf`, `iss`, `aud` and, for Graph, `tid`.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::{Deserialize, Deserializer};

use super::AuthError;
use super::keys::VerifyingKey;

/// Longest token looked at; Microsoft's are about 1–2 KB.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest RS256 signature: that of an 8192-bit key.
const MAX_SIGNATURE_LEN: usize = 8192 / 8;

/// The rules one platform's tokens must meet.
#[derive(Debug, Clone)]
pub struct TokenRules {
    issuers: Vec<String>,
    audience: String,
    leeway_secs: i64,
    /// The longest lifetime accepted: `exp − iat`, or `exp − now` without `iat`.
    max_lifetime_secs: i64,
    /// Graph tokens carry the tenant id (`tid`).
    require_tenant: bool,
}

/// A token whose header passed (RS256, a key id), split into its parts; nothing in it is
/// trusted yet.
#[derive(Debug)]
pub struct UnverifiedToken<'a> {
    /// `header.payload`: the bytes the signature covers.
    signed: &'a str,
    payload: &'a str,
    signature: &'a str,
    kid: String,
}

impl UnverifiedToken<'_> {
    /// The key id the header names.
    pub fn key_id(&self) -> &str {
        &self.kid
    }
}

/// The header members looked at. Others are ignored; a repeated `alg` or `kid` makes the
/// header malformed.
#[derive(Deserialize)]
struct Header<'a> {
    /// An algorithm jsonwebtoken does not know (`none` among them) is malformed.
    alg: Algorithm,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
}

/// The claims looked at; others are ignored, a repeated one makes the token malformed.
#[derive(Deserialize)]
struct Claims<'a> {
    #[serde(default)]
    exp: Option<NumericDate>,
    #[serde(default)]
    nbf: Option<NumericDate>,
    #[serde(default)]
    iat: Option<NumericDate>,
    #[serde(borrow, default)]
    iss: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    aud: Option<Audience<'a>>,
    #[serde(borrow, default)]
    tid: Option<Cow<'a, str>>,
}

/// `aud` is one string or a list of them (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

impl Audience<'_> {
    fn names(&self, audience: &str) -> bool {
        match self {
            Self::One(one) => one == audience,
            Self::Many(many) => many.iter().any(|one| one == audience),
        }
    }
}

/// Seconds since the epoch (RFC 7519 NumericDate: any JSON number). Fractions are kept as
/// bounds: `floor` and `ceil` of the value.
#[derive(Debug, Clone, Copy)]
struct NumericDate {
    floor: i64,
    ceil: i64,
}

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = serde_json::Number::deserialize(deserializer)?;
        if let Some(whole) = number.as_i64() {
            return Ok(Self {
                floor: whole,
                ceil: whole,
            });
        }
        if number.as_u64().is_some() {
            // Beyond i64: far in the future.
            return Ok(Self {
                floor: i64::MAX,
                ceil: i64::MAX,
            });
        }
        let value = number
            .as_f64()
            .filter(|value| value.is_finite())
            .ok_or_else(|| serde::de::Error::custom("NumericDate must be a finite number"))?;
        // `as` saturates at the bounds of i64.
        Ok(Self {
            floor: value.floor() as i64,
            ceil: value.ceil() as i64,
        })
    }
}

impl TokenRules {
    /// RS256 only; `iss` one of `issuers`, `aud` = `audience`, `exp` and `nbf` checked
    /// with `leeway_secs` of clock skew, a lifetime of at most `max_lifetime_secs`.
    pub fn new(
        issuers: &[String],
        audience: &str,
        leeway_secs: u64,
        max_lifetime_secs: u64,
        require_tenant: bool,
    ) -> Self {
        Self {
            issuers: issuers.to_vec(),
            audience: audience.to_owned(),
            leeway_secs: i64::try_from(leeway_secs).unwrap_or(i64::MAX),
            max_lifetime_secs: i64::try_from(max_lifetime_secs).unwrap_or(i64::MAX),
            require_tenant,
        }
    }

    /// Checks the header, then the signature with `key`, then the claims.
    pub fn check(&self, token: &str, key: &VerifyingKey) -> Result<(), AuthError> {
        self.check_parsed(&parse(token)?, key)
    }

    /// Checks the signature of a token whose header passed with `key`, then its claims.
    pub fn check_parsed(
        &self,
        token: &UnverifiedToken<'_>,
        key: &VerifyingKey,
    ) -> Result<(), AuthError> {
        let mut signature = [0_u8; MAX_SIGNATURE_LEN];
        let length = URL_SAFE_NO_PAD
            .decode_slice(token.signature, &mut signature)
            .map_err(|error| match error {
                base64::DecodeSliceError::OutputSliceTooSmall => AuthError::Signature,
                base64::DecodeSliceError::DecodeError(_) => AuthError::Malformed,
            })?;
        if !key.verifies(token.signed.as_bytes(), &signature[..length]) {
            return Err(AuthError::Signature);
        }
        let payload = URL_SAFE_NO_PAD
            .decode(token.payload)
            .map_err(|_| AuthError::Malformed)?;
        let claims: Claims<'_> = json_object(&payload)?;
        self.check_claims(&claims, unix_now())
    }

    fn check_claims(&self, claims: &Claims<'_>, now: i64) -> Result<(), AuthError> {
        let exp = claims.exp.ok_or(AuthError::MissingClaim("exp"))?;
        let iss = claims
            .iss
            .as_deref()
            .ok_or(AuthError::MissingClaim("iss"))?;
        let aud = claims.aud.as_ref().ok_or(AuthError::MissingClaim("aud"))?;
        if exp.floor < now.saturating_sub(self.leeway_secs) {
            return Err(AuthError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf.ceil > now.saturating_add(self.leeway_secs))
        {
            return Err(AuthError::NotYetValid);
        }
        // A stolen token that never expires is refused however well it is signed.
        let start = claims.iat.map_or(now, |iat| iat.floor);
        if exp.floor.saturating_sub(start) > self.max_lifetime_secs.saturating_add(self.leeway_secs)
        {
            return Err(AuthError::LifetimeTooLong);
        }
        if !self.issuers.iter().any(|issuer| issuer == iss) {
            return Err(AuthError::Issuer);
        }
        if !aud.names(&self.audience) {
            return Err(AuthError::Audience);
        }
        if self.require_tenant
            && claims
                .tid
                .as_deref()
                .is_none_or(|tid| tid.trim().is_empty())
        {
            return Err(AuthError::MissingClaim("tid"));
        }
        Ok(())
    }
}

/// A JOSE header or claims set: a JSON object (serde would also take a list for a struct).
fn json_object<'a, T: Deserialize<'a>>(json: &'a [u8]) -> Result<T, AuthError> {
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(AuthError::Malformed);
    }
    serde_json::from_slice(json).map_err(|_| AuthError::Malformed)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
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

/// The token split into its three parts, once its header shows it is an RS256 JWT with a
/// key id.
pub fn parse(token: &str) -> Result<UnverifiedToken<'_>, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed);
    }
    let (signed, signature) = token.rsplit_once('.').ok_or(AuthError::Malformed)?;
    let (header, payload) = signed.split_once('.').ok_or(AuthError::Malformed)?;
    if payload.contains('.') {
        return Err(AuthError::Malformed);
    }
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    // `alg: none` and unknown algorithms fail here: jsonwebtoken has no such algorithm.
    let header: Header<'_> = json_object(&header)?;
    if header.alg != Algorithm::RS256 {
        return Err(AuthError::Algorithm);
    }
    let kid = header.kid.ok_or(AuthError::NoKeyId)?.into_owned();
    Ok(UnverifiedToken {
        signed,
        payload,
        signature,
        kid,
    })
}

/// The key id a token names, once its header shows it is an RS256 JWT.
pub fn key_id(token: &str) -> Result<String, AuthError> {
    parse(token).map(|token| token.kid)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::emulator::callback_signing::CallbackSigner;

    fn signer() -> CallbackSigner {
        CallbackSigner::for_tests()
    }

    fn key(signer: &CallbackSigner) -> VerifyingKey {
        super::super::keys::usable_key(signer.jwks()["keys"][0].clone())
            .unwrap()
            .1
    }

    fn acs_rules() -> TokenRules {
        TokenRules::new(
            &["https://acscallautomation.communication.azure.com".to_owned()],
            "resource",
            30,
            86_400,
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
            86_400,
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
            86_400,
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
            (with(acs.clone(), "exp", json!(1e30)), "lifetime"),
            (
                with(
                    with(acs.clone(), "iat", json!(now - 90_000)),
                    "exp",
                    json!(now + 60),
                ),
                "lifetime",
            ),
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

    /// `header` and `payload` (raw JSON) signed RS256 with the signer's first key.
    fn sign_raw(header: &str, payload: &str) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!(
            "../emulator/keys/dev-signing-key-1.pem"
        ))
        .unwrap();
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature =
            jsonwebtoken::crypto::sign(signed.as_bytes(), &key, Algorithm::RS256).unwrap();
        format!("{signed}.{signature}")
    }

    const RS256: &str = r#"{"alg":"RS256","typ":"JWT","kid":"callops-emulator-1"}"#;

    #[test]
    fn the_signature_covers_the_exact_header_and_payload() {
        let signer = signer();
        let key = key(&signer);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = format!(
            r#"{{"iss":"https://acscallautomation.communication.azure.com","aud":"resource","exp":{}}}"#,
            now + 60
        );
        let genuine = sign_raw(RS256, &claims);
        assert!(acs_rules().check(&genuine, &key).is_ok());
        let parts: Vec<&str> = genuine.split('.').collect();
        // The signature is genuine, but the header's alg was changed afterwards.
        for alg in ["RS384", "RS512", "PS256", "ES256", "HS256"] {
            let header = URL_SAFE_NO_PAD.encode(RS256.replace("RS256", alg));
            let altered = format!("{header}.{}.{}", parts[1], parts[2]);
            assert!(
                matches!(acs_rules().check(&altered, &key), Err(AuthError::Algorithm)),
                "{alg}"
            );
        }
        // Still RS256, but any other change to the header breaks the signature.
        let header = URL_SAFE_NO_PAD.encode(RS256.replace("JWT", "jwt"));
        let altered = format!("{header}.{}.{}", parts[1], parts[2]);
        assert!(matches!(
            acs_rules().check(&altered, &key),
            Err(AuthError::Signature)
        ));
        // The same JSON, encoded differently (padding), is not the signed text.
        let padded = format!("{}=.{}.{}", parts[0], parts[1], parts[2]);
        assert!(acs_rules().check(&padded, &key).is_err());
        // A fourth part, an oversized, truncated or non-base64url signature.
        for bad in [
            format!("{genuine}.{}", parts[2]),
            format!("{}.{}.{}", parts[0], parts[1], "A".repeat(4096)),
            format!("{}.{}.{}", parts[0], parts[1], &parts[2][..300]),
            format!("{}.{}.{}", parts[0], parts[1], parts[2].replace('-', "+")),
            format!("{}.{}.", parts[0], parts[1]),
        ] {
            assert!(acs_rules().check(&bad, &key).is_err(), "{bad}");
        }
        // A signature by another key under this key's id.
        let other = signer.sign_with_second_key("callops-emulator-1", &signer.acs_claims());
        let other_signature = other.rsplit('.').next().unwrap();
        let swapped = format!("{}.{}.{other_signature}", parts[0], parts[1]);
        assert!(matches!(
            acs_rules().check(&swapped, &key),
            Err(AuthError::Signature)
        ));
    }

    #[test]
    fn claims_are_read_strictly() {
        let signer = signer();
        let key = key(&signer);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let iss = r#""iss":"https://acscallautomation.communication.azure.com""#;
        let exp = format!(r#""exp":{}"#, now + 60);
        let check = |claims: String| acs_rules().check(&sign_raw(RS256, &claims), &key);
        // An audience list naming us, fractional dates.
        assert!(check(format!(r#"{{{iss},"aud":["other","resource"],{exp}}}"#)).is_ok());
        assert!(
            check(format!(
                r#"{{{iss},"aud":"resource","exp":{}.5}}"#,
                now + 60
            ))
            .is_ok()
        );
        assert!(
            check(format!(
                r#"{{{iss},"aud":"resource",{exp},"nbf":{}.5}}"#,
                now - 5
            ))
            .is_ok()
        );
        assert!(check(format!(r#"{{{iss},"aud":"res\u006furce",{exp}}}"#)).is_ok());
        let refused = [
            // A list not naming us.
            (format!(r#"{{{iss},"aud":["other"],{exp}}}"#), "audience"),
            (format!(r#"{{{iss},"aud":[],{exp}}}"#), "audience"),
            // A repeated claim is ambiguous.
            (
                format!(r#"{{{iss},"aud":"other","aud":"resource",{exp}}}"#),
                "well-formed",
            ),
            (
                format!(r#"{{"iss":"https://evil",{iss},"aud":"resource",{exp}}}"#),
                "well-formed",
            ),
            // Claims of the wrong type.
            (
                format!(r#"{{{iss},"aud":"resource","exp":"{}"}}"#, now + 60),
                "well-formed",
            ),
            (
                format!(r#"{{{iss},"aud":"resource",{exp},"nbf":"{}"}}"#, now + 600),
                "well-formed",
            ),
            (
                format!(
                    r#"{{"iss":["https://acscallautomation.communication.azure.com"],"aud":"resource",{exp}}}"#
                ),
                "well-formed",
            ),
            (format!(r#"{{{iss},"aud":"resource","exp":null}}"#), "exp"),
            (format!(r#"{{{iss},"aud":"resource","exp":-1}}"#), "expired"),
            (
                format!(r#"{{{iss},"aud":"resource",{exp},"nbf":1e300}}"#),
                "not valid yet",
            ),
            (
                format!(r#"{{{iss},"aud":"resource","exp":{}.5}}"#, now - 31),
                "expired",
            ),
            ("[]".to_owned(), "well-formed"),
            ("null".to_owned(), "well-formed"),
        ];
        for (claims, reason) in refused {
            let error = check(claims.clone()).unwrap_err();
            assert!(error.to_string().contains(reason), "{error} for {claims}");
        }
        // A far future expiry is read (not an overflow), and refused as too long a lifetime.
        assert!(matches!(
            check(format!(
                r#"{{{iss},"aud":"resource","exp":18446744073709551615}}"#
            )),
            Err(AuthError::LifetimeTooLong)
        ));
        // The header, too: a repeated alg, a kid that is not a string.
        let repeated_alg = r#"{"alg":"RS256","alg":"none","kid":"callops-emulator-1"}"#;
        let numeric_kid = r#"{"alg":"RS256","kid":1}"#;
        let list = r#"["RS256","callops-emulator-1"]"#;
        for header in [repeated_alg, numeric_kid, list] {
            let token = sign_raw(header, &format!(r#"{{{iss},"aud":"resource",{exp}}}"#));
            assert!(
                matches!(key_id(&token), Err(AuthError::Malformed)),
                "{header}"
            );
        }
        let no_kid = sign_raw(
            r#"{"alg":"RS256"}"#,
            &format!(r#"{{{iss},"aud":"resource",{exp}}}"#),
        );
        assert!(matches!(key_id(&no_kid), Err(AuthError::NoKeyId)));
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
