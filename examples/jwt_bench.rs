//! Callback token verifications per second through the real entry point,
//! `CallbackAuthenticator::verify`, on one thread.
//!
//! ```sh
//! cargo run --release --example jwt_bench -- [verifications] [rounds]
//! ```
//! `verifications` (per round and platform) defaults to 20000, `rounds` to 5; the best
//! round is reported. The emulator's `CallbackSigner` mints genuine ACS and Graph tokens
//! and serves its key set on a local port, from which the authenticator loads its keys
//! before the clock starts.

use std::error::Error;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use callops::callback_auth::{CallbackAuthenticator, CallbackSource, IssuerSettings};
use callops::config::{CallbackAuth, CallbackIssuerConfig, CallbacksConfig, StringList};
use callops::emulator::callback_signing::{
    ACS_ISSUER, ACS_OPENID_PATH, CallbackSigner, GRAPH_ISSUER, GRAPH_OPENID_PATH, SignerSettings,
};
use callops::metrics::Metrics;
use url::Url;

const DEFAULT_VERIFICATIONS: u32 = 20_000;
const DEFAULT_ROUNDS: u32 = 5;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let verifications = match args.next() {
        Some(n) => n.parse()?,
        None => DEFAULT_VERIFICATIONS,
    };
    let rounds = match args.next() {
        Some(n) => n.parse()?,
        None => DEFAULT_ROUNDS,
    };

    let signer = CallbackSigner::new(SignerSettings {
        acs_audience: "resource".to_owned(),
        graph_audience: "bot".to_owned(),
        tenant_id: "tenant".to_owned(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let router = signer.router();
    tokio::spawn(async move { axum::serve(listener, router).await });

    let issuer = |openid_path: &str, issuer: &str, audience: &str| -> IssuerSettings {
        IssuerSettings {
            openid_url: Url::parse(&format!("http://{address}{openid_path}")).expect("a URL"),
            issuers: vec![issuer.to_owned()],
            audience: audience.to_owned(),
        }
    };
    let acs = issuer(ACS_OPENID_PATH, ACS_ISSUER, "resource");
    let graph = issuer(GRAPH_OPENID_PATH, GRAPH_ISSUER, "bot");
    let config = CallbacksConfig {
        auth: CallbackAuth::Jwt,
        leeway_secs: 30,
        key_refresh_min_interval_secs: 300,
        key_max_age_secs: 86_400,
        key_fetch_timeout_ms: 5_000,
        secret: String::new().into(),
        acs: CallbackIssuerConfig {
            openid_url: acs.openid_url.clone(),
            issuer: StringList(acs.issuers.clone()),
            audience: acs.audience.clone(),
        },
        graph: CallbackIssuerConfig {
            openid_url: graph.openid_url.clone(),
            issuer: StringList(graph.issuers.clone()),
            audience: graph.audience.clone(),
        },
    };
    let authenticator =
        CallbackAuthenticator::new(&config, acs, graph, reqwest::Client::new(), Metrics::new());
    authenticator.load_keys().await;

    for (source, token) in [
        (CallbackSource::Acs, signer.acs_token()),
        (CallbackSource::Graph, signer.graph_token()),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        // A genuine token passes and a tampered one does not, or the numbers mean nothing.
        authenticator.verify(source, &headers, None).await?;
        let mut tampered = headers.clone();
        // One character in the middle of the signature changed.
        let mut bad = format!("Bearer {token}");
        let at = bad.len() - 20;
        let changed = if &bad[at..=at] == "A" { "B" } else { "A" };
        bad.replace_range(at..=at, changed);
        tampered.insert(header::AUTHORIZATION, HeaderValue::from_str(&bad)?);
        if authenticator.verify(source, &tampered, None).await.is_ok() {
            return Err("a tampered token verified".into());
        }

        let mut best = Duration::MAX;
        for _ in 0..rounds {
            let started = Instant::now();
            for _ in 0..verifications {
                let verified = authenticator.verify(source, &headers, None).await;
                std::hint::black_box(verified.is_ok());
            }
            best = best.min(started.elapsed());
        }
        let micros = best.as_secs_f64() * 1e6 / f64::from(verifications);
        println!(
            "{:<5} token {} bytes: {micros:.2} µs per verification, {:.0} verifications/s (best of {rounds} × {verifications})",
            source.as_str(),
            token.len(),
            1e6 / micros,
        );
    }
    Ok(())
}
