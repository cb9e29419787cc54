//! Callback token verifications per second through the real entry point,
//! `CallbackAuthenticator::verify`, on one thread.
//!
//! ```sh
//! cargo run --release --example jwt_bench -- [verifications] [rounds]
//! ```
//! `verifications` (per round and platform) defaults to 20000, `rounds` to 5; the best
//! round is reported, timed as the benchmark thread's on-CPU time where Linux reports it
//! (the machine may be shared). The emulator's `CallbackSigner` mints genuine ACS and
//! Graph tokens and serves its key set on a local port, from which the authenticator
//! loads its keys before the clock starts. The RS256 signature check alone is then timed
//! both ways: the key parsed once (as verified now) and jsonwebtoken 9 (as before).

use std::error::Error;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use callops::callback_auth::keys::VerifyingKey;
use callops::callback_auth::{CallbackAuthenticator, CallbackSource, IssuerSettings};
use callops::config::{CallbackAuth, CallbackIssuerConfig, CallbacksConfig, StringList};
use callops::emulator::callback_signing::{
    ACS_ISSUER, ACS_OPENID_PATH, CallbackSigner, GRAPH_ISSUER, GRAPH_OPENID_PATH, SignerSettings,
};
use callops::metrics::Metrics;
use url::Url;

const DEFAULT_VERIFICATIONS: u32 = 20_000;
const DEFAULT_ROUNDS: u32 = 5;

/// Time this thread spent on a CPU (from `/proc/thread-self/schedstat`), so other work on
/// a shared machine counts less; wall-clock time where that file is missing.
enum Clock {
    OnCpu(Duration),
    Wall(Instant),
}

impl Clock {
    fn start() -> Self {
        on_cpu().map_or_else(|| Self::Wall(Instant::now()), Self::OnCpu)
    }

    fn elapsed(&self) -> Duration {
        match self {
            Self::OnCpu(start) => on_cpu().map_or(Duration::MAX, |now| now.saturating_sub(*start)),
            Self::Wall(start) => start.elapsed(),
        }
    }
}

fn on_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

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
        max_token_lifetime_secs: 86_400,
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
            let started = Clock::start();
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
    signature_only(&signer, verifications, rounds)
}

/// The RS256 signature check alone, interleaved so both see the same machine load: the
/// key parsed once (`VerifyingKey`, what the authenticator uses) against jsonwebtoken's
/// `crypto::verify` with a `DecodingKey` (ring, the key rebuilt from n and e each time).
fn signature_only(
    signer: &CallbackSigner,
    verifications: u32,
    rounds: u32,
) -> Result<(), Box<dyn Error>> {
    let jwk = &signer.jwks()["keys"][0];
    let component = |name: &str| -> Result<Vec<u8>, Box<dyn Error>> {
        let text = jwk[name].as_str().ok_or("a JWK member")?;
        Ok(URL_SAFE_NO_PAD.decode(text)?)
    };
    let parsed =
        VerifyingKey::from_components(&component("n")?, &component("e")?).ok_or("a usable key")?;
    let decoding = jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk.clone())?)?;
    let token = signer.acs_token();
    let (signed, signature) = token.rsplit_once('.').ok_or("a JWT")?;
    let raw_signature = URL_SAFE_NO_PAD.decode(signature)?;

    let (mut best_parsed, mut best_jsonwebtoken) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        let started = Clock::start();
        for _ in 0..verifications {
            // The signature's base64url decoding is part of both.
            let raw = URL_SAFE_NO_PAD.decode(signature)?;
            std::hint::black_box(parsed.verifies(signed.as_bytes(), &raw));
        }
        best_parsed = best_parsed.min(started.elapsed());
        let started = Clock::start();
        for _ in 0..verifications {
            let ok = jsonwebtoken::crypto::verify(
                signature,
                signed.as_bytes(),
                &decoding,
                jsonwebtoken::Algorithm::RS256,
            );
            std::hint::black_box(ok.is_ok());
        }
        best_jsonwebtoken = best_jsonwebtoken.min(started.elapsed());
    }
    if !parsed.verifies(signed.as_bytes(), &raw_signature) {
        return Err("the parsed key refused a genuine signature".into());
    }
    for (what, best) in [
        ("signature only, key parsed once (aws-lc-rs)", best_parsed),
        ("signature only, jsonwebtoken 9 (ring)", best_jsonwebtoken),
    ] {
        let micros = best.as_secs_f64() * 1e6 / f64::from(verifications);
        println!("{what}: {micros:.2} µs per verification");
    }
    Ok(())
}
