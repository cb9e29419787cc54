//! Outbound safety: which URLs a webhook may be sent to. `https` to public addresses only,
//! unless the configuration allows `http` and private ranges (development). The check runs
//! when a URL is given and again on every address a host name resolves to at send time
//! ([`PublicResolver`]), so a name pointing inside the network is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use url::Url;

/// The longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// A webhook URL's shape in the OpenAPI document: absolute `https` with a host name. The
/// API also takes IP addresses that are public (and `http` and private ones where allowed),
/// which a pattern cannot tell apart.
pub const URL_PATTERN: &str =
    r"^https://([A-Za-z0-9-]+\.)*[A-Za-z][A-Za-z0-9-]*(:[0-9]{1,4})?([/?#][!-~]*)?$";

/// The schema of a webhook URL.
pub fn url_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "string",
        "description": "Absolute `https` URL (`http` and private addresses only where `webhooks.allow_private_targets` is set).",
        "pattern": URL_PATTERN,
        "maxLength": MAX_URL_LEN,
        "example": "https://hooks.example.com/callops"
    })
}

/// [`url_schema`] for a derived schema's `schema_with`.
pub fn url_schema_object() -> utoipa::openapi::Object {
    serde_json::from_value(url_schema()).expect("the URL schema is a valid schema")
}

/// Why a URL is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("url: not an absolute URL")]
    Malformed,
    #[error("url: longer than {MAX_URL_LEN} characters")]
    TooLong,
    #[error("url: must be https (http only where webhooks.allow_private_targets is set)")]
    Scheme,
    #[error("url: must not carry a user name or password")]
    Credentials,
    #[error(
        "url: {0} is a private, loopback or link-local address (allowed only with webhooks.allow_private_targets)"
    )]
    Private(IpAddr),
}

/// Checks a webhook URL against the policy.
pub fn check_url(text: &str, allow_private: bool) -> Result<Url, TargetError> {
    if text.len() > MAX_URL_LEN {
        return Err(TargetError::TooLong);
    }
    let url = Url::parse(text).map_err(|_| TargetError::Malformed)?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        _ => return Err(TargetError::Scheme),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Credentials);
    }
    let ip = match url.host() {
        None => return Err(TargetError::Malformed),
        Some(url::Host::Domain(name)) if !is_host_name(name) => return Err(TargetError::Malformed),
        Some(url::Host::Domain(_)) => None,
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
    };
    if let Some(ip) = ip
        && !allow_private
        && !is_public(ip)
    {
        return Err(TargetError::Private(ip));
    }
    Ok(url)
}

/// Letters, digits, `-` and `.` (a name in its ASCII form), the last label starting with a
/// letter as a top-level domain does.
fn is_host_name(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or_default();
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && last.starts_with(|c: char| c.is_ascii_alphabetic())
}

/// True for addresses on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // Carrier-grade NAT 100.64.0.0/10, benchmarking 198.18.0.0/15, reserved 240/4.
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local fc00::/7, link-local fe80::/10, documentation 2001:db8::/32.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first == 0x2001 && ip.segments()[1] == 0x0db8))
}

/// A DNS resolver that drops every non-public address a name resolves to (and fails when
/// none is left): used for webhook requests unless private targets are allowed.
#[derive(Debug, Clone, Copy)]
pub struct PublicResolver;

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|address| is_public(address.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            let addresses: reqwest::dns::Addrs = Box::new(found.into_iter());
            Ok(addresses)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_to_public_addresses_unless_allowed() {
        assert!(check_url("https://hooks.example.com/x", false).is_ok());
        assert!(check_url("https://93.184.216.34/x", false).is_ok());
        assert_eq!(
            check_url("http://hooks.example.com/x", false),
            Err(TargetError::Scheme)
        );
        assert_eq!(
            check_url("ftp://hooks.example.com/x", true),
            Err(TargetError::Scheme)
        );
        assert_eq!(check_url("not a url", false), Err(TargetError::Malformed));
        // A host name is letters, digits, '-' and '.', ending in a label that starts with a
        // letter (a top-level domain), as the schema's pattern says.
        for odd in [
            "https://hooks.example.co*/",
            "https://a.1com/",
            "https://a.b./",
        ] {
            assert_eq!(check_url(odd, false), Err(TargetError::Malformed), "{odd}");
        }
        assert!(check_url("https://1hooks.example-2.com:8443/x?y#z", false).is_ok());
        assert!(
            check_url("https://bücher.example/", false).is_ok(),
            "IDNA, as xn--"
        );
        assert_eq!(
            check_url("https://user:pw@hooks.example.com/", false),
            Err(TargetError::Credentials)
        );
        for private in [
            "https://127.0.0.1/",
            "https://10.1.2.3/",
            "https://192.168.0.1/",
            "https://172.16.5.5/",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:10.0.0.1]/",
        ] {
            assert!(
                matches!(check_url(private, false), Err(TargetError::Private(_))),
                "{private}"
            );
        }
        assert!(check_url("http://127.0.0.1:9000/hook", true).is_ok());
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(check_url(&long, false), Err(TargetError::TooLong));
    }
}
