//! SHA-256 and HMAC-SHA256 over aws-lc-rs, the crate's one crypto stack (TLS and RS256 use it
//! too), so that no second implementation is compiled in.

use aws_lc_rs::{digest, hmac};

/// The SHA-256 digest of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = digest::digest(&digest::SHA256, bytes);
    digest
        .as_ref()
        .try_into()
        .expect("a SHA-256 digest is 32 bytes")
}

/// An incremental SHA-256, for input that comes in parts.
pub struct Sha256(digest::Context);

impl Sha256 {
    pub fn new() -> Self {
        Self(digest::Context::new(&digest::SHA256))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0
            .finish()
            .as_ref()
            .try_into()
            .expect("a SHA-256 digest is 32 bytes")
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

/// HMAC-SHA256 of the concatenated `parts` under `key` (a key of any length).
pub fn hmac_sha256<'a>(key: &[u8], parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut context = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
    for part in parts {
        context.update(part);
    }
    context
        .sign()
        .as_ref()
        .try_into()
        .expect("an HMAC-SHA256 tag is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_matches_the_standard_vector() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut parts = Sha256::new();
        parts.update(b"a");
        parts.update(b"bc");
        assert_eq!(parts.finish(), sha256(b"abc"));
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231_case_2() {
        let tag = hmac_sha256(b"Jefe", [b"what do ya want ".as_slice(), b"for nothing?"]);
        assert_eq!(
            hex(&tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
