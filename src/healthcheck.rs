//! `callops healthcheck`: one GET of the running service's health endpoint, for container
//! health checks (the runtime image has no shell and no curl). Healthy means a `2xx`
//! within the timeout; anything else (refused, timed out, another status, a redirect) is
//! not, and the one-line reason says which.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use url::Url;

use crate::config::ConfigError;

/// `callops healthcheck` options.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthcheckArgs {
    /// The path to GET on the configured listener (CALLOPS_LISTEN; an unspecified address
    /// such as 0.0.0.0 is reached on loopback).
    #[arg(long, default_value = "/healthz")]
    pub path: String,
    /// The whole URL to GET instead (then CALLOPS_LISTEN and --path are not used).
    #[arg(long)]
    pub url: Option<Url>,
    /// Seconds to wait for the whole answer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

/// Runs the check, prints its one-line outcome (stdout when healthy, stderr when not) and
/// returns the exit code: 0 healthy, 1 not. `listen` is the configured listener, or why
/// the configuration could not be read.
pub async fn main(args: &HealthcheckArgs, listen: Result<SocketAddr, ConfigError>) -> ExitCode {
    match check(args, listen).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(line) => {
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}

/// The check itself: `Ok(reason)` when healthy, `Err(reason)` when not.
pub async fn check(
    args: &HealthcheckArgs,
    listen: Result<SocketAddr, ConfigError>,
) -> Result<String, String> {
    let url = match (&args.url, listen) {
        (Some(url), _) => url.clone(),
        (None, Ok(listen)) => target(listen, &args.path)?,
        (None, Err(error)) => {
            return Err(format!("unhealthy: invalid configuration: {error}"));
        }
    };
    probe(&url, Duration::from_secs(args.timeout)).await
}

/// The URL for `path` on the listener `listen`; an unspecified address (`0.0.0.0`, `::`)
/// becomes the loopback address of its family.
pub fn target(listen: SocketAddr, path: &str) -> Result<Url, String> {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let address = SocketAddr::new(ip, listen.port());
    let slash = if path.starts_with('/') { "" } else { "/" };
    let text = format!("http://{address}{slash}{path}");
    Url::parse(&text).map_err(|error| format!("unhealthy: {text:?} is not a URL: {error}"))
}

/// One GET of `url`, without proxies or redirects.
pub async fn probe(url: &Url, timeout: Duration) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .user_agent(concat!("callops-healthcheck/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|error| format!("unhealthy: cannot build an HTTP client: {error}"))?;
    match client.get(url.clone()).send().await {
        Ok(response) if response.status().is_success() => {
            Ok(format!("healthy: GET {url} answered {}", response.status()))
        }
        Ok(response) => Err(format!(
            "unhealthy: GET {url} answered {}",
            response.status()
        )),
        Err(error) if error.is_timeout() => Err(format!(
            "unhealthy: GET {url} got no answer within {}s",
            timeout.as_secs()
        )),
        Err(error) => Err(format!("unhealthy: GET {url} failed: {}", chain(&error))),
    }
}

/// An error and its causes on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_listener_reached_on_loopback() {
        let url = |listen: &str, path: &str| {
            target(listen.parse().unwrap(), path)
                .unwrap()
                .as_str()
                .to_owned()
        };
        assert_eq!(
            url("0.0.0.0:8080", "/healthz"),
            "http://127.0.0.1:8080/healthz"
        );
        assert_eq!(url("[::]:8080", "/readyz"), "http://[::1]:8080/readyz");
        assert_eq!(
            url("10.1.2.3:9000", "healthz"),
            "http://10.1.2.3:9000/healthz"
        );
        assert_eq!(
            url("[fe80::1]:9000", "/healthz?x=1"),
            "http://[fe80::1]:9000/healthz?x=1"
        );
    }

    #[tokio::test]
    async fn an_invalid_configuration_is_unhealthy_unless_a_url_is_given() {
        let args = HealthcheckArgs {
            path: "/healthz".to_owned(),
            url: None,
            timeout: 1,
        };
        let error = check(&args, Err(ConfigError::Store("redis://x".to_owned())))
            .await
            .unwrap_err();
        assert!(
            error.starts_with("unhealthy: invalid configuration: CALLOPS_STORE"),
            "{error}"
        );
        assert!(!error.contains('\n'), "{error}");

        // With --url the configuration is not needed: the probe itself decides.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args = HealthcheckArgs {
            url: Some(format!("http://127.0.0.1:{port}/healthz").parse().unwrap()),
            ..args
        };
        let error = check(&args, Err(ConfigError::Store("redis://x".to_owned())))
            .await
            .unwrap_err();
        assert!(
            error.starts_with("unhealthy: GET http://127.0.0.1:"),
            "{error}"
        );
        assert!(error.contains("failed"), "{error}");
    }
}
