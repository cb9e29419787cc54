//! ACS connection strings: `ConnectionString::parse` never panics, a parsed endpoint is an
//! http(s) URL ending with `/` and a parsed key is not empty, and neither the `Debug` output
//! of the result nor the text of an error shows the access key.

#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use callops::acs::connection_string::{ConnectionString, ConnectionStringError};
use libfuzzer_sys::fuzz_target;

/// Shorter keys could match other text by chance.
const MIN_KEY_LEN: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let shown = match ConnectionString::parse(text) {
        Ok(parsed) => {
            assert!(matches!(parsed.endpoint.scheme(), "http" | "https"));
            assert!(parsed.endpoint.host().is_some());
            assert!(parsed.endpoint.path().ends_with('/'));
            assert!(!parsed.access_key().is_empty());
            let shown = format!("{parsed:?}");
            assert!(shown.contains("[redacted]"), "{shown}");
            // The decoded key, spelled as base64, is not in the output either.
            let encoded = STANDARD.encode(parsed.access_key());
            if encoded.len() >= MIN_KEY_LEN && !parsed.endpoint.as_str().contains(&encoded) {
                assert!(!shown.contains(&encoded), "{shown}");
            }
            shown
        }
        Err(error) => format!("{error}\n{error:?}"),
    };
    if let Some(key) = access_key(text) {
        let allowed = allowed_text(text);
        let key = key.to_ascii_lowercase();
        assert!(
            allowed.contains(&key) || !shown.to_ascii_lowercase().contains(&key),
            "the access key is shown: {shown}"
        );
    }
});

/// The access key as written (the last `accesskey=` part wins, like the parser), when it is
/// long enough and plain base64 (so no escaping in `Debug` output can hide or forge it).
fn access_key(text: &str) -> Option<&str> {
    let key = parts(text)
        .filter_map(|(name, value)| name.eq_ignore_ascii_case("accesskey").then_some(value))
        .last()?;
    let base64 = key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    (base64 && key.len() >= MIN_KEY_LEN).then_some(key)
}

/// Text that may legitimately appear in the output, lower-cased: everything in the input but
/// the access-key parts, the endpoint as the URL parser rewrites it (and its error), and the
/// fixed wording of the messages.
fn allowed_text(text: &str) -> String {
    let mut allowed = String::new();
    let mut endpoint = None;
    for part in text.split(';') {
        // As written, and as `Debug` escapes it.
        let written = format!("{part}\n{part:?}");
        match part.split_once('=') {
            Some((name, _)) if name.trim().eq_ignore_ascii_case("accesskey") => {}
            Some((name, value)) => {
                if name.trim().eq_ignore_ascii_case("endpoint") {
                    endpoint = Some(value.trim());
                }
                allowed.push_str(&written);
            }
            None => allowed.push_str(&written),
        }
        allowed.push('\n');
    }
    if let Some(endpoint) = endpoint {
        match url::Url::parse(endpoint) {
            Ok(url) => allowed.push_str(&format!("{url}\n{:?}", url.as_str())),
            Err(error) => allowed.push_str(&error.to_string()),
        }
        allowed.push('\n');
    }
    for error in [
        ConnectionStringError::Missing("endpoint"),
        ConnectionStringError::Missing("accesskey"),
        ConnectionStringError::NotAPair(String::new()),
        ConnectionStringError::BadEndpoint(String::new()),
        ConnectionStringError::BadKey,
    ] {
        allowed.push_str(&format!("{error}\n{error:?}\n"));
    }
    let example = url::Url::parse("http://x/").expect("a valid URL");
    allowed.push_str(&format!("{:?}", ConnectionString::new(example, vec![1])));
    allowed.to_ascii_lowercase()
}

fn parts(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split(';')
        .filter_map(|part| part.trim().split_once('='))
        .map(|(name, value)| (name.trim(), value.trim()))
}
