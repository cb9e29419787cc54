//! Graph ids in one form. Graph writes the same GUID in two ways: `id` fields lower-case with
//! hyphens (`57dab8b1-894c-409a-b240-bd8beae78896`), `resourceUrl` segments upper-case
//! without them (`57DAB8B1894C409AB240BD8BEAE78896`). Every call and operation id callops
//! keeps or compares goes through [`canonical`] first.

use std::borrow::Cow;

use uuid::Uuid;

/// A GUID in any of its spellings becomes lower-case hyphenated; anything else is kept
/// as given.
pub fn canonical(id: &str) -> Cow<'_, str> {
    let looks_like_guid =
        matches!(id.len(), 32 | 36) && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    match looks_like_guid.then(|| Uuid::try_parse(id).ok()).flatten() {
        Some(uuid) => {
            let mut buffer = Uuid::encode_buffer();
            let text = uuid.hyphenated().encode_lower(&mut buffer);
            if text == id {
                Cow::Borrowed(id)
            } else {
                Cow::Owned(text.to_owned())
            }
        }
        None => Cow::Borrowed(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_of_a_guid_meet() {
        let from_url = canonical("57DAB8B1894C409AB240BD8BEAE78896");
        let from_field = canonical("57dab8b1-894c-409a-b240-bd8beae78896");
        assert_eq!(from_url, from_field);
        assert_eq!(from_url, "57dab8b1-894c-409a-b240-bd8beae78896");
        assert!(matches!(from_field, Cow::Borrowed(_)));
        assert_eq!(
            canonical("1D6DE2D4-CD51-4309-8DAA-70768651088E"),
            "1d6de2d4-cd51-4309-8daa-70768651088e"
        );
    }

    #[test]
    fn other_ids_are_kept_as_given() {
        for id in [
            "call-1",
            "Call-1",
            "",
            "urn:uuid:57dab8b1-894c-409a-b240-bd8beae78896",
            "{57dab8b1-894c-409a-b240-bd8beae78896}",
        ] {
            assert_eq!(canonical(id), id);
        }
        // 32 characters that are not all hex.
        assert_eq!(
            canonical("zzDAB8B1894C409AB240BD8BEAE78896"),
            "zzDAB8B1894C409AB240BD8BEAE78896"
        );
    }
}
