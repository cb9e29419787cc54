//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{webhook-id}.{webhook-timestamp}.{body}">`, keyed with the base64-decoded part of the
//! secret after `whsec_`. HMAC from aws-lc-rs (`crate::crypto`); the secret format is the
//! specification's.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The prefix of every secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Random bytes in a generated secret (the specification asks for 24 to 64).
const SECRET_BYTES: usize = 32;

/// A secret is not `whsec_` and base64 of 24 to 64 bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a webhook secret is whsec_ followed by the base64 of 24 to 64 random bytes")]
pub struct BadSecret;

/// A secret ready to sign with: its decoded key.
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// From `whsec_<base64>`.
    pub fn parse(secret: &str) -> Result<Self, BadSecret> {
        let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or(BadSecret)?;
        let key = STANDARD.decode(encoded).map_err(|_| BadSecret)?;
        if !(24..=64).contains(&key.len()) {
            return Err(BadSecret);
        }
        Ok(Self(key))
    }

    /// The `webhook-signature` value for a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let timestamp = timestamp.to_string();
        let parts = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
        format!(
            "v1,{}",
            STANDARD.encode(crate::crypto::hmac_sha256(&self.0, parts))
        )
    }
}

/// A secret's shape in the OpenAPI document: `whsec_` and the canonical, padded base64 of 24
/// to 64 bytes, as [`SigningKey::parse`] takes it.
pub fn secret_schema() -> serde_json::Value {
    serde_json::json!({
        "type": ["string", "null"],
        "description": "`whsec_` + base64 of 24 to 64 bytes; the deliveries are unsigned without it.",
        "pattern": "^whsec_(?:(?:[A-Za-z0-9+/]{4}){8,21}(?:[A-Za-z0-9+/][AQgw]==)?|(?:[A-Za-z0-9+/]{4}){8,20}[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$",
        "maxLength": 94
    })
}

/// A new random secret, `whsec_<base64>`.
pub fn generate_secret() -> String {
    let mut key = [0_u8; SECRET_BYTES];
    aws_lc_rs::rand::fill(&mut key).expect("the system random source works");
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's published test vector (standard-webhooks, libraries' tests).
    #[test]
    fn matches_the_published_test_vector() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let signature = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn the_standardwebhooks_crate_verifies_what_we_sign() {
        let secret = generate_secret();
        let key = SigningKey::parse(&secret).expect("a generated secret parses");
        let body = br#"{"type":"operation.settled","data":{"id":"x"}}"#;
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let signature = key.sign("msg_1", timestamp, body);
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().unwrap());
        headers.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
        headers.insert("webhook-signature", signature.parse().unwrap());
        let verifier = standardwebhooks::Webhook::new(&secret).expect("the crate takes the secret");
        verifier
            .verify(body, &headers)
            .expect("the crate verifies our signature");
        let mut tampered = body.to_vec();
        tampered[0] = b' ';
        assert!(verifier.verify(&tampered, &headers).is_err());
    }

    #[test]
    fn malformed_secrets_are_refused() {
        for secret in [
            "",
            "whsec_",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!",
            "whsec_AAAA",
        ] {
            assert_eq!(SigningKey::parse(secret).err(), Some(BadSecret), "{secret}");
        }
    }
}
