//! Callback tokens: reading `Authorization: Bearer …` and checking a token never panics,
//! whatever the header holds; a token signed with the dev key over arbitrary payload bytes
//! reaches the claims checks and passes only when its claims are the ones configured.

#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use callops::callback_auth::keys::VerifyingKey;
use callops::callback_auth::token::{self, TokenRules};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

const KID: &str = "dev-signing-key-1";
const ISSUER: &str = "https://acscallautomation.communication.azure.com";
const AUDIENCE: &str = "00000000-0000-0000-0000-000000000000";

static SIGNING: LazyLock<EncodingKey> = LazyLock::new(|| {
    EncodingKey::from_rsa_pem(include_bytes!("../../src/emulator/keys/dev-signing-key-1.pem"))
        .expect("the dev signing key")
});

static VERIFYING: LazyLock<VerifyingKey> = LazyLock::new(|| {
    let jwk: serde_json::Value =
        serde_json::from_slice(include_bytes!("../../src/emulator/keys/dev-signing-key-1.jwk.json"))
            .expect("the dev key's JWK");
    let part = |name: &str| {
        URL_SAFE_NO_PAD
            .decode(jwk[name].as_str().expect("an RSA JWK member"))
            .expect("base64url")
    };
    VerifyingKey::from_components(&part("n"), &part("e")).expect("an RS256 key")
});

static RULES: LazyLock<TokenRules> =
    LazyLock::new(|| TokenRules::new(&[ISSUER.to_owned()], AUDIENCE, 300, 86_400, false));

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        // Anything in the header: read, parse and check without a panic.
        if let Ok(found) = token::bearer(Some(rest)) {
            let _ = token::key_id(found);
            let _ = RULES.check(found, &VERIFYING);
        }
        return;
    }
    // A genuine signature over arbitrary payload bytes: the claims decoder sees them all.
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"RS256","kid":"{KID}","typ":"JWT"}}"#));
    let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(rest));
    let signature = jsonwebtoken::crypto::sign(signed.as_bytes(), &SIGNING, Algorithm::RS256)
        .expect("RS256 signing");
    let token = format!("{signed}.{signature}");
    if RULES.check(&token, &VERIFYING).is_ok() {
        let claims: serde_json::Value =
            serde_json::from_slice(rest).expect("accepted claims are JSON");
        assert_eq!(claims["iss"], ISSUER, "{claims}");
        assert!(
            claims["aud"] == AUDIENCE
                || claims["aud"].as_array().is_some_and(|all| all.iter().any(|a| a == AUDIENCE)),
            "{claims}"
        );
    }
});
