//! The `callops` binary: `serve` (the default) runs the service, `emulator` runs the ACS
//! emulator alone, `healthcheck` probes a running service (for container health checks),
//! `migrate [--check]` brings the store to this build's layout (or says what it would do);
//! the client commands (`get`, `list`, `watch`, …) talk to a running service (docs/cli.md).
//! Only wiring: configuration, logging, binding, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use callops::config::Config;
use callops::emulator::Emulator;
use callops::emulator::callback_signing;
use callops::healthcheck::{self, HealthcheckArgs};
use callops::migrate::{self, MigrateArgs};

#[derive(Parser)]
#[command(
    version,
    about = "Call-control operations on ACS, correlated with their callbacks"
)]
struct Cli {
    /// A TOML file layered over the embedded defaults (environment variables override both).
    #[arg(long, global = true, env = "CALLOPS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Run the emulator (ACS and Graph) alone; Graph notifications go to CALLOPS_PUBLIC_URL.
    Emulator {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
    },
    /// GET the running service's /healthz (on CALLOPS_LISTEN) once: exit 0 on a 2xx, 1
    /// otherwise, with a one-line reason. For container health checks.
    Healthcheck(HealthcheckArgs),
    /// Migrate the configured store (CALLOPS_STORE) to this build's layout version, then
    /// exit; with --check, only print its version, this build's and the steps that would
    /// run (read-only; works while a server runs).
    Migrate(MigrateArgs),
    /// The client: operations and subscriptions of a running service (CALLOPS_URL).
    #[command(flatten)]
    Client(callops::cli::Command),
}

/// mimalloc rather than the system allocator: glibc's malloc was a quarter of the callback
/// path's CPU under load (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // The client needs no service configuration.
    let command = match cli.command {
        Some(Command::Client(command)) => return Ok(callops::cli::main(command).await),
        command => command.unwrap_or(Command::Serve),
    };
    let config = Config::load(cli.config.as_deref());
    if let Command::Healthcheck(args) = &command {
        let listen = config.map(|config| config.http.listen);
        return Ok(healthcheck::main(args, listen).await);
    }
    let config = config.context("invalid configuration")?;
    callops::telemetry::init(config.log.format);
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .collect();
    for name in callops::config::unknown_env(names.iter().map(String::as_str)) {
        tracing::warn!(
            variable = name,
            "not a callops setting; ignored (see docs/configuration.md)"
        );
    }
    if let Command::Migrate(args) = &command {
        return Ok(migrate::main(args, &config).await);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match command {
        Command::Serve => {
            let listener = TcpListener::bind(config.http.listen)
                .await
                .with_context(|| {
                    format!(
                        "binding {} (CALLOPS_LISTEN, http.listen; set it to a free address, e.g. CALLOPS_LISTEN=127.0.0.1:8081)",
                        config.http.listen
                    )
                })?;
            callops::run(listener, config, shutdown).await?;
        }
        Command::Emulator { listen } => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let address = listener.local_addr()?;
            tracing::info!(
                "ACS emulator listening; point callops at it with CALLOPS_ACS_CONNECTION_STRING='endpoint=http://{address}/;accesskey={}'",
                config.emulator.access_key
            );
            tracing::info!(
                "Graph emulator listening; point callops at it with CALLOPS_GRAPH_BASE_URL=http://{address}/v1.0 CALLOPS_GRAPH_AUTHORITY=http://{address} CALLOPS_GRAPH_TENANT_ID={} CALLOPS_GRAPH_CLIENT_ID={} CALLOPS_GRAPH_CLIENT_SECRET=<emulator.graph_client_secret>; it notifies {}",
                config.emulator.graph_tenant_id,
                config.emulator.graph_client_id,
                config.graph_callback_url()
            );
            tracing::info!(
                "The emulator signs its callbacks; verify them with CALLOPS_ACS_CALLBACK_OPENID_URL=http://{address}{} CALLOPS_ACS_CALLBACK_AUDIENCE={} CALLOPS_GRAPH_CALLBACK_OPENID_URL=http://{address}{} CALLOPS_GRAPH_CALLBACK_ISSUERS={}",
                callback_signing::ACS_OPENID_PATH,
                config.emulator.acs_resource_id,
                callback_signing::GRAPH_OPENID_PATH,
                callback_signing::GRAPH_ISSUER,
            );
            tracing::info!(
                "Without secrets: a managed identity with IDENTITY_ENDPOINT=http://{address}/msi/token IDENTITY_HEADER={} (or IMDS with CALLOPS_IDENTITY__IMDS_ENDPOINT=http://{address}), then CALLOPS_ACS_ENDPOINT=http://{address}/ CALLOPS_ACS_CREDENTIAL=managed-identity and CALLOPS_GRAPH_CREDENTIAL=managed-identity CALLOPS_GRAPH_CALLBACK_AUDIENCE={}",
                config.emulator.identity_header,
                config.emulator.graph_client_id,
            );
            let emulator = Emulator::new(&config.emulator);
            emulator
                .graph()
                .set_callback_url(config.graph_callback_url().expose().clone());
            emulator
                .serve(listener, shutdown)
                .await
                .context("serving the emulator")?;
        }
        Command::Healthcheck(_) | Command::Migrate(_) | Command::Client(_) => {
            unreachable!("answered above")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
