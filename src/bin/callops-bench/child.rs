//! The servers under test, each a child process: this binary re-executed with a hidden
//! subcommand (`serve-bare` or `serve-callops`), so each runs on its own default
//! multi-thread tokio runtime, as the `callops` binary does, apart from the load generator.
//! The child binds 127.0.0.1:0 and writes its port to a file the parent reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use callops::config::Config;

use crate::loadgen::Conn;

/// Which server a child runs.
pub enum Server<'a> {
    /// `POST /callbacks/acs` reads and parses the body, and answers 200.
    Bare,
    /// callops with the configuration file at this path.
    Callops(&'a Path),
}

/// A running child server; killed (SIGKILL) when dropped.
pub struct Child {
    process: std::process::Child,
    pub addr: SocketAddr,
}

impl Child {
    /// Starts `server`, waits for its port and (callops) for `/readyz`.
    pub async fn start(server: Server<'_>, workdir: &Path, name: &str) -> anyhow::Result<Self> {
        let port_file = workdir.join(format!("{name}.port"));
        let _ = std::fs::remove_file(&port_file);
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut command = Command::new(exe);
        match server {
            Server::Bare => {
                command.arg("serve-bare");
            }
            Server::Callops(config) => {
                command.arg("serve-callops").arg("--config").arg(config);
            }
        }
        // The server logs as deployed (the default filter, `callops=info`: one line per
        // operation created, a span per request) into a file beside its port file, so the
        // cost of logging is measured and the table on stdout stays clean.
        let log_path = workdir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        eprintln!("  {name} server log: {}", log_path.display());
        command
            .arg("--port-file")
            .arg(&port_file)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let process = command.spawn().context("starting a child server")?;
        let mut child = Self {
            process,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Some(status) = child.process.try_wait()? {
                bail!("the {name} server exited at start: {status}");
            }
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Ok(port) = text.trim().parse()
            {
                break port;
            }
            if Instant::now() > deadline {
                bail!("the {name} server did not report its port within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        child.addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Server::Callops(_) = server {
            child.wait_ready(deadline).await?;
        }
        Ok(child)
    }

    /// Waits until `/readyz` answers 200 (the store commits, the callback keys are loaded).
    async fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let mut conn = Conn::open(self.addr).await?;
        loop {
            let answer = conn.get("/readyz").await?;
            if answer.status == StatusCode::OK {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "callops was not ready within 30 s: {} {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// `VmRSS` (and `VmHWM`, the peak) of the child, in bytes.
    pub fn rss(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|line| line.starts_with(name))
                .with_context(|| format!("no {name} in /proc/PID/status"))?;
            let kib: u64 = line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()?;
            Ok(kib * 1024)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Binds 127.0.0.1:0 and writes the port to `port_file` (atomically: write, then rename).
async fn bind(port_file: &Path) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let partial = port_file.with_extension("partial");
    std::fs::write(&partial, addr.port().to_string())?;
    std::fs::rename(&partial, port_file)?;
    Ok((listener, addr))
}

/// The child side of `serve-bare`: the limit callops is compared with. A plain
/// `axum::serve` whose only route reads the body and parses it as JSON.
pub async fn serve_bare(port_file: PathBuf) -> anyhow::Result<()> {
    let (listener, _) = bind(&port_file).await?;
    let app = Router::new().route("/callbacks/acs", post(parse_only));
    axum::serve(listener, app).await?;
    Ok(())
}

async fn parse_only(body: Bytes) -> StatusCode {
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// The child side of `serve-callops`: what `callops serve` does (configuration from the
/// embedded defaults, the file and the environment; logging; `callops::run`), except that
/// it listens on 127.0.0.1:0 and is called back there.
pub async fn serve_callops(port_file: PathBuf, config: PathBuf) -> anyhow::Result<()> {
    let mut config = Config::load(Some(&config)).context("invalid configuration")?;
    callops::telemetry::init(config.log.format);
    let (listener, addr) = bind(&port_file).await?;
    config.http.public_url = format!("http://{addr}").parse()?;
    callops::run(listener, config, CancellationToken::new()).await
}
