//! callops: performs call-control operations on Azure Communication Services, receives the
//! callbacks the platform POSTs back, correlates each with its operation, and lets clients
//! poll the outcome.
//!
//! Modules in reading order: [`config`] → [`operation`] (pure domain) → [`correlation`]
//! (pure) → [`store`] (the concurrent tracker) → [`acs`] (wire formats, signing, client) →
//! [`service`] (the only code using both client and store) → [`callback_auth`] and [`http`]
//! (the edge) → [`emulator`] (a stand-in for ACS). [`run`] wires them together; it never
//! binds or reads the environment, so tests run it on port 0.

pub mod acs;
pub mod callback_auth;
pub mod cli;
pub mod config;
pub mod correlation;
pub mod crypto;
pub mod emulator;
pub mod error;
pub mod graph;
pub mod healthcheck;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod migrate;
pub mod operation;
pub mod reconcile;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod trace_context;
pub mod upstream;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acs::auth::AcsAuth;
use crate::acs::client::AcsClient;
use crate::acs::connection_string::ConnectionString;
use crate::callback_auth::{CallbackAuthenticator, IssuerSettings};
use crate::config::{AcsUpstream, CallbackAuth, CallbackIssuerConfig, Config};
use crate::emulator::Emulator;
use crate::emulator::callback_signing;
use crate::graph::client::GraphClient;
use crate::http::{ApiLimits, AppState};
use crate::identity::{Credential, CredentialSettings, TokenProvider};
use crate::metrics::Metrics;
use crate::service::OperationService;
use crate::store::Storage;

/// How long background work (upstream requests in flight) may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves the API on `listener` until `shutdown` is cancelled, then drains.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    let metrics = Metrics::new();
    let acs_upstream = config.acs_upstream()?;
    let acs_emulated = acs_upstream.is_none();
    let emulator = if acs_emulated || !config.graph.is_configured() {
        Some(start_emulator(&config, &tasks, &shutdown).await?)
    } else {
        None
    };
    let callback_auth =
        callback_authenticator(&config, emulator.as_ref(), acs_emulated, metrics.clone())?;
    if config.callbacks.auth == CallbackAuth::None {
        tracing::warn!(
            "CALLBACK AUTHENTICATION IS OFF (CALLOPS_CALLBACK_AUTH=none): anyone who can reach /callbacks/* can settle operations; use this only for local experiments"
        );
    } else {
        let loading = callback_auth.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = loading.load_keys() => {}
                () = stop.cancelled() => {}
            }
        });
    }
    // One client per upstream: each has its own per-attempt deadline (and connection pool).
    let http_client = |timeout| {
        reqwest::Client::builder()
            .user_agent(concat!("callops/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .build()
            .context("building an HTTP client")
    };
    let graph_http = http_client(Duration::from_millis(config.graph.request_timeout_ms))?;
    let graph = graph_client(&config, emulator.as_ref(), graph_http, metrics.clone())?;
    let acs_http = http_client(config.acs.request_timeout())?;
    let acs_auth = acs_auth(&config, acs_upstream, emulator.as_ref(), &acs_http)?;
    let storage = Storage::open(&config, metrics.clone()).await?;
    let acs = AcsClient::new(
        &config.acs,
        acs_auth,
        config.acs_callback_url().expose().clone(),
        acs_http,
        metrics.clone(),
    );
    tracing::info!(acs.endpoint = %acs.endpoint(), acs.auth = acs.auth().kind(), acs.token_url = acs.auth().tokens().map(|t| t.credential().endpoint().as_str()), callback.url = %config.acs_callback_url(), "ACS client ready");
    tracing::info!(graph.base_url = %graph.base_url(), graph.auth = graph.tokens().credential().kind(), graph.token_url = %graph.tokens().credential().endpoint(), "Graph client ready");
    let service = OperationService::new(
        storage.clone(),
        dispatch_budget(&config),
        &config.operations,
        acs,
        graph,
        tasks.clone(),
        shutdown.clone(),
        metrics.clone(),
    );
    let sweep_interval = Duration::from_millis(config.operations.sweep_interval_ms.max(10));
    let (reconcile_queue, reconcile_jobs) = tokio::sync::mpsc::channel(RECONCILE_QUEUE);
    storage.spawn_background(&tasks, sweep_interval, &shutdown, reconcile_queue);
    tasks.spawn(service.clone().run_reconciler(reconcile_jobs));
    tasks.spawn(
        service
            .clone()
            .run_redispatch(sweep_interval.max(Duration::from_millis(250))),
    );
    let webhooks = webhooks::Webhooks::new(storage.clone(), &config.webhooks, metrics.clone())?;
    tasks.spawn(webhooks.clone().run(tasks.clone(), shutdown.clone()));
    let stream = http::stream::StreamHub::new(&config.stream, shutdown.clone(), metrics.clone());
    let state = AppState {
        service,
        callback_auth,
        webhooks,
        stream,
        metrics,
        limits: ApiLimits {
            max_wait: Duration::from_secs(config.operations.max_wait_secs),
            retry_after_secs: config.operations.retry_after_secs,
            page_size: config.operations.page_size,
            page_size_max: config.operations.page_size_max,
        },
    };
    let app = http::router(state, &config.http, config.log.access)?;
    let listen = listener.local_addr()?;
    if emulator.is_some() && !reaches(&config.http.public_url, listen) {
        tracing::warn!(
            public_url = %config.http.public_url,
            %listen,
            "the emulator calls back CALLOPS_PUBLIC_URL, which does not look like this listener; set CALLOPS_PUBLIC_URL=http://{listen}"
        );
    }
    tracing::info!(%listen, "callops listening");
    http::serve::serve(
        listener,
        app,
        config.http.header_read_timeout(),
        shutdown.clone(),
    )
    .await
    .context("serving HTTP")?;
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background work did not finish within the shutdown grace period");
    }
    // Everything acknowledged is already committed; this waits for the last writes.
    storage.close().await;
    tracing::info!("callops stopped");
    Ok(())
}

/// Reconciliations waiting for the service: past this many, the sweep's surplus jobs are
/// dropped and those operations time out as they would have without asking.
const RECONCILE_QUEUE: usize = 10_000;

/// The longest one upstream request may take with its retries, and a margin.
fn dispatch_budget(config: &Config) -> Duration {
    // An attempt may fetch a token first (Graph; ACS with Entra ID), under the same timeout.
    let acs =
        config.acs.retry.total_timeout_ms + 2 * config.acs.request_timeout().as_millis() as u64;
    let graph = config.graph.retry.total_timeout_ms + 2 * config.graph.request_timeout_ms;
    Duration::from_millis(acs.max(graph)) + Duration::from_secs(5)
}

/// True unless `public_url` is plainly a loopback URL on another port than `listen` (then
/// the in-process emulator's callbacks would go nowhere).
fn reaches(public_url: &url::Url, listen: std::net::SocketAddr) -> bool {
    let loopback = match public_url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    !loopback || public_url.port_or_known_default() == Some(listen.port())
}

/// How ACS requests are authenticated: the configured access key or Entra ID credential, or
/// the in-process emulator's key (at `emulator`) when none is configured.
fn acs_auth(
    config: &Config,
    upstream: Option<AcsUpstream>,
    emulator: Option<&url::Url>,
    http: &reqwest::Client,
) -> anyhow::Result<AcsAuth> {
    Ok(match (upstream, emulator) {
        (Some(AcsUpstream::Key(connection)), _) => AcsAuth::Key(connection),
        (
            Some(AcsUpstream::Entra {
                endpoint,
                credential,
            }),
            _,
        ) => {
            let credential = Credential::new(credential)
                .context("CALLOPS_ACS_CLIENT_CERTIFICATE_PATH (acs.certificate_path)")?;
            AcsAuth::Entra {
                endpoint,
                tokens: Arc::new(TokenProvider::new(
                    http.clone(),
                    credential,
                    identity::ACS_SCOPE,
                    "ACS",
                )),
            }
        }
        (None, Some(endpoint)) => {
            tracing::info!(emulator.endpoint = %endpoint, "ACS is not configured: ACS requests go to the in-process emulator");
            let key = config::decode_key(&config.emulator.access_key)
                .context("emulator.access_key is not base64")?;
            AcsAuth::Key(ConnectionString::new(endpoint.clone(), key))
        }
        (None, None) => unreachable!("the emulator starts when ACS is not configured"),
    })
}

/// The Graph client: for the configured credential, or for the in-process emulator (at
/// `emulator`) when none is configured.
fn graph_client(
    config: &Config,
    emulator: Option<&url::Url>,
    http: reqwest::Client,
    metrics: Metrics,
) -> anyhow::Result<GraphClient> {
    let graph = &config.graph;
    let (base_url, settings) = match emulator {
        Some(endpoint) if !graph.is_configured() => {
            tracing::info!(emulator.endpoint = %endpoint, "no Graph credential configured: Graph requests go to the in-process emulator");
            let emulator_config = &config.emulator;
            (
                endpoint.join("v1.0")?,
                CredentialSettings::ClientSecret {
                    authority: endpoint.clone(),
                    tenant_id: emulator_config.graph_tenant_id.clone(),
                    client_id: emulator_config.graph_client_id.clone(),
                    secret: SecretString::from(emulator_config.graph_client_secret.clone()),
                },
            )
        }
        _ => (
            graph.base_url.clone(),
            config
                .graph_credential()?
                .context("Graph has no credential (validated at load)")?,
        ),
    };
    let credential = Credential::new(settings)
        .context("CALLOPS_GRAPH_CLIENT_CERTIFICATE_PATH (graph.certificate_path)")?;
    let tokens = TokenProvider::new(http.clone(), credential, identity::GRAPH_SCOPE, "Graph");
    Ok(GraphClient::new(
        http,
        base_url,
        Arc::new(tokens),
        graph.retry.clone(),
        metrics,
    ))
}

/// The callback authenticator: the configured issuers, or the in-process emulator's for
/// each platform it stands in for.
fn callback_authenticator(
    config: &Config,
    emulator: Option<&url::Url>,
    acs_emulated: bool,
    metrics: Metrics,
) -> anyhow::Result<CallbackAuthenticator> {
    let callbacks = &config.callbacks;
    let configured = |issuer: &CallbackIssuerConfig, audience: &str| IssuerSettings {
        openid_url: issuer.openid_url.clone(),
        issuers: issuer.issuer.0.clone(),
        audience: audience.trim().to_owned(),
    };
    let emulated = |endpoint: &url::Url, path: &str, issuer: &str, audience: &str| {
        anyhow::Ok(IssuerSettings {
            openid_url: endpoint.join(path.trim_start_matches('/'))?,
            issuers: vec![issuer.to_owned()],
            audience: audience.to_owned(),
        })
    };
    let acs = match emulator {
        Some(endpoint) if acs_emulated => emulated(
            endpoint,
            callback_signing::ACS_OPENID_PATH,
            callback_signing::ACS_ISSUER,
            &config.emulator.acs_resource_id,
        )?,
        _ => configured(&callbacks.acs, &callbacks.acs.audience),
    };
    let graph = match emulator {
        Some(endpoint) if !config.graph.is_configured() => emulated(
            endpoint,
            callback_signing::GRAPH_OPENID_PATH,
            callback_signing::GRAPH_ISSUER,
            &config.emulator.graph_client_id,
        )?,
        // The bot's app id is the audience unless one is configured.
        _ if callbacks.graph.audience.trim().is_empty() => {
            configured(&callbacks.graph, config.graph_app_id())
        }
        _ => configured(&callbacks.graph, &callbacks.graph.audience),
    };
    if callbacks.auth == CallbackAuth::Jwt {
        tracing::info!(acs.openid = %acs.openid_url, acs.audience = %acs.audience, graph.openid = %graph.openid_url, graph.audience = %graph.audience, "callbacks are verified (JWT)");
    }
    let http = reqwest::Client::builder()
        .user_agent(concat!("callops/", env!("CARGO_PKG_VERSION")))
        .timeout(Duration::from_millis(callbacks.key_fetch_timeout_ms))
        .build()
        .context("building an HTTP client")?;
    Ok(CallbackAuthenticator::new(
        callbacks, acs, graph, http, metrics,
    ))
}

/// Starts the in-process emulator (ACS and Graph) and returns its endpoint.
async fn start_emulator(
    config: &Config,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<url::Url> {
    let listener = TcpListener::bind(config.emulator.listen)
        .await
        .with_context(|| {
            format!(
                "binding the emulator to {} (CALLOPS_EMULATOR__LISTEN, emulator.listen)",
                config.emulator.listen
            )
        })?;
    let address = listener.local_addr()?;
    let endpoint = url::Url::parse(&format!("http://{address}/"))?;
    let emulator = Emulator::new(&config.emulator);
    emulator
        .graph()
        .set_callback_url(config.graph_callback_url().expose().clone());
    tracing::info!(emulator.endpoint = %endpoint, "emulator running in-process");
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(error) = emulator.serve(listener, shutdown).await {
            tracing::error!(error = %error, "the in-process emulator stopped");
        }
    });
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_public_url_on_another_port_is_noticed() {
        let listen = "127.0.0.1:8080".parse().unwrap();
        let url = |text: &str| url::Url::parse(text).unwrap();
        assert!(reaches(&url("http://127.0.0.1:8080"), listen));
        assert!(reaches(&url("http://localhost:8080/base/"), listen));
        assert!(reaches(&url("https://callops.example.com"), listen));
        assert!(!reaches(&url("http://127.0.0.1:9000"), listen));
        assert!(!reaches(&url("http://[::1]"), listen));
    }
}
