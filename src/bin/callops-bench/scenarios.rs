//! The scenarios: callback ingest (bare axum and four callops configurations), end to end,
//! long-poll wake latency, memory per operation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use callops::config::{Config, EmulatorConfig};
use callops::emulator::{Emulator, Script, callback_signing};
use callops::operation::OperationStatus;
use callops::store::journal::{Journal, SqliteOptions};

use crate::child::{Child, Server};
use crate::events::OpSpec;
use crate::loadgen::{self, Conn, Shots};
use crate::report::{self, Row};

/// Connections used to set operations up (not measured).
const SETUP_CONNECTIONS: usize = 64;
/// Distinct callback tokens a run rotates through.
const TOKENS: usize = 256;
/// `?wait=` of the long polls.
const WAIT_SECS: u64 = 10;
const MIB: f64 = 1024.0 * 1024.0;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    pub pool: usize,
    pub calls: usize,
    pub memory_ops: usize,
    pub memory_calls: usize,
    pub settle: bool,
    pub wake_samples: usize,
    pub wake_parallel: usize,
    /// Samples of the long-poll wake across replicas (Redis store).
    pub redis_wake_samples: usize,
    /// ACS requests carry an Entra ID token from the emulator's managed-identity endpoint
    /// instead of the HMAC signature.
    pub acs_managed_identity: bool,
    /// Each shard of the sharded Redis Cluster rows limited to this share of a core (a
    /// Linux cgroup), as if each had a small machine of its own.
    pub shard_cpu_percent: Option<u32>,
}

/// The parent's side of every scenario: the in-process emulator (ACS and Graph for the
/// children), a work directory, the options.
pub struct Bench {
    pub options: Options,
    emulator: Emulator,
    emulator_config: EmulatorConfig,
    emulator_addr: SocketAddr,
    workdir: PathBuf,
    shutdown: CancellationToken,
}

impl Bench {
    /// Starts the emulator on 127.0.0.1:0; callbacks (where it makes them) come at once.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let mut emulator_config = Config::embedded().emulator;
        emulator_config.callback_delay_ms = 0;
        emulator_config.listen = "127.0.0.1:0".parse()?;
        let emulator = Emulator::new(&emulator_config);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let emulator_addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        tokio::spawn(emulator.clone().serve(listener, shutdown.clone()));
        let workdir = std::env::temp_dir().join(format!("callops-bench-{}", std::process::id()));
        std::fs::create_dir_all(&workdir)?;
        Ok(Self {
            options,
            emulator,
            emulator_config,
            emulator_addr,
            workdir,
            shutdown,
        })
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    pub fn finish(self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.workdir);
    }

    /// A callops configuration file: ACS and Graph are the emulator (configured as real
    /// upstreams are, so the child starts no emulator of its own), callback tokens are
    /// verified against the emulator's keys (`jwt`) or not at all, nothing expires during
    /// a run.
    fn callops_config(
        &self,
        name: &str,
        store: &str,
        store_settings: &str,
        jwt: bool,
        extra: &str,
    ) -> anyhow::Result<PathBuf> {
        let e = &self.emulator_config;
        let emu = format!("http://{}", self.emulator_addr);
        let q = |text: &str| serde_json::to_string(text).expect("a string is JSON");
        let text = format!(
            r#"[http]
listen = "127.0.0.1:0"

[store]
location = {store}
{store_settings}

[operations]
retention_secs = 604800

[operations.callback_timeouts]
remove_participant_secs = 604800

{acs}

[graph]
base_url = {graph_base}
authority = {authority}
tenant_id = {tenant}
client_id = {client}
client_secret = {secret}

[callbacks]
auth = {auth}

[callbacks.acs]
openid_url = {acs_openid}
audience = {audience}

[callbacks.graph]
openid_url = {graph_openid}

[emulator]
enabled = false
{extra}
"#,
            store = q(store),
            acs = if self.options.acs_managed_identity {
                format!(
                    "[acs]\nendpoint = {}\ncredential = \"managed-identity\"\n\n[identity]\nendpoint = {}\nheader = {}\n",
                    q(&format!("{emu}/")),
                    q(&format!("{emu}/msi/token")),
                    q(&e.identity_header)
                )
            } else {
                format!(
                    "[acs]\nconnection_string = {}\n",
                    q(&format!("endpoint={emu}/;accesskey={}", e.access_key))
                )
            },
            graph_base = q(&format!("{emu}/v1.0")),
            authority = q(&emu),
            tenant = q(&e.graph_tenant_id),
            client = q(&e.graph_client_id),
            secret = q(&e.graph_client_secret),
            auth = q(if jwt { "jwt" } else { "none" }),
            acs_openid = q(&format!("{emu}{}", callback_signing::ACS_OPENID_PATH)),
            audience = q(&e.acs_resource_id),
            graph_openid = q(&format!("{emu}{}", callback_signing::GRAPH_OPENID_PATH)),
        );
        let path = self.workdir.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    pub async fn start_callops(&self, name: &str, store: &str, jwt: bool) -> anyhow::Result<Child> {
        self.start_callops_with(name, store, jwt, "").await
    }

    /// As [`Bench::start_callops`], with `extra` TOML sections.
    pub async fn start_callops_with(
        &self,
        name: &str,
        store: &str,
        jwt: bool,
        extra: &str,
    ) -> anyhow::Result<Child> {
        let config = self.callops_config(name, store, "", jwt, extra)?;
        Child::start(Server::Callops(&config), &self.workdir, name).await
    }

    /// As [`Bench::start_callops`] (JWT off), with `settings` (TOML lines) in `[store]`.
    pub async fn start_callops_on(
        &self,
        name: &str,
        store: &str,
        settings: &str,
    ) -> anyhow::Result<Child> {
        let config = self.callops_config(name, store, settings, false, "")?;
        Child::start(Server::Callops(&config), &self.workdir, name).await
    }

    /// `count` distinct valid ACS callback tokens (`Bearer …`), as the emulator signs them.
    pub fn tokens(&self, count: usize) -> Vec<HeaderValue> {
        let signer = self.emulator.signer();
        (0..count)
            .map(|_| {
                let mut claims = signer.acs_claims();
                claims["jti"] = json!(Uuid::new_v4().to_string());
                HeaderValue::from_str(&format!("Bearer {}", signer.sign(&claims)))
                    .expect("a JWT is a header value")
            })
            .collect()
    }

    /// Scripts the calls of run `prefix` to be accepted and never called back.
    pub fn silence_calls(&self, prefix: &str, calls: usize) {
        let silent = Script {
            no_callback: true,
            ..Script::default()
        };
        for call in 0..calls {
            self.emulator
                .set_script(&OpSpec::new(prefix, call, calls).call, silent.clone());
        }
    }
}

/// Starts operations `0..count` of run `prefix` through the API; returns the ids of those
/// for which `keep(index)` holds.
pub async fn create_operations(
    addr: SocketAddr,
    prefix: &str,
    count: usize,
    calls: usize,
    keep: fn(usize, usize) -> bool,
) -> anyhow::Result<HashMap<usize, String>> {
    let started = Instant::now();
    let prefix: Arc<str> = Arc::from(prefix);
    let created = loadgen::for_each(addr, SETUP_CONNECTIONS, count, move |index, mut conn| {
        let prefix = prefix.clone();
        async move {
            let op = OpSpec::new(&prefix, index, calls);
            let answer = start_removal(&mut conn, &op)
                .await
                .with_context(|| format!("creating operation {index}"))?;
            let id = if keep(index, count) {
                Some(operation_id(&answer)?)
            } else {
                None
            };
            Ok((conn, id))
        }
    })
    .await?;
    let elapsed = started.elapsed();
    eprintln!(
        "  created {count} running operations in {:.1} s ({} ops/s)",
        elapsed.as_secs_f64(),
        report::rate(count as f64 / elapsed.as_secs_f64())
    );
    Ok(created
        .into_iter()
        .filter_map(|(index, id)| id.map(|id| (index, id)))
        .collect())
}

/// Waits until each of `ids` is `Running` (its upstream request answered), so no
/// set-up work is left in the server when measuring.
pub async fn wait_running<'a>(
    addr: SocketAddr,
    ids: impl IntoIterator<Item = &'a String>,
) -> anyhow::Result<()> {
    let mut conn = Conn::open(addr).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in ids {
        loop {
            let operation = conn.get_json(&format!("/v1/operations/{id}")).await?;
            match operation["status"].as_str() {
                Some("Running") => break,
                Some("NotStarted") if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => bail!("operation {id} is {other:?}, not Running"),
            }
        }
    }
    Ok(())
}

/// One callback ingest configuration.
#[derive(Debug, Clone, Copy)]
pub struct IngestConfig {
    pub name: &'static str,
    pub durable: bool,
    pub jwt: bool,
}

pub const INGEST_CONFIGS: [IngestConfig; 4] = [
    IngestConfig {
        name: "memory",
        durable: false,
        jwt: false,
    },
    IngestConfig {
        name: "memory-jwt",
        durable: false,
        jwt: true,
    },
    IngestConfig {
        name: "durable",
        durable: true,
        jwt: false,
    },
    IngestConfig {
        name: "durable-jwt",
        durable: true,
        jwt: true,
    },
];

impl IngestConfig {
    fn label(&self) -> String {
        format!(
            "Callback ingest: callops, {} store, JWT {}",
            if self.durable {
                "durable (SQLite)"
            } else {
                "memory"
            },
            if self.jwt { "on" } else { "off" }
        )
    }
}

/// "; pool of N ran out after S s" when the row ended early, else nothing.
pub fn exhausted_note(result: &loadgen::RunResult, count: usize) -> String {
    if result.exhausted {
        format!(
            "; pool of {count} ran out after {:.1} s",
            result.window.as_secs_f64()
        )
    } else {
        String::new()
    }
}

pub fn print_errors(what: &str, result: &loadgen::RunResult) {
    if result.errors > 0 || result.unmatched > 0 {
        eprintln!(
            "  !!! {what}: {} FAILED requests, {} answers that matched no operation; first ones:",
            result.errors, result.unmatched
        );
        for error in &result.first_errors {
            eprintln!("  !!!   {error}");
        }
    }
}

pub fn cpu_note(result: &loadgen::RunResult, parent: f64, child: f64) -> String {
    let requests = (result.acknowledged.len() as u64 + result.errors).max(1) as f64;
    format!(
        "CPU/req: server {:.0} µs, load generator {:.0} µs",
        child * 1e6 / requests,
        parent * 1e6 / requests
    )
}

/// Runs `shots` against `child` and measures both processes' CPU.
async fn measure(
    bench: &Bench,
    child: &Child,
    shots: Shots,
) -> anyhow::Result<(loadgen::RunResult, String)> {
    let (result, parent, servers) =
        measure_over(bench, &[child.addr], &[child.pid()], shots).await?;
    let note = cpu_note(&result, parent, servers[0]);
    Ok((result, note))
}

/// Runs `shots` against `addrs` (connections assigned round-robin) and measures the CPU
/// seconds of this process and of each of `pids` (the servers) over the run.
pub async fn measure_over(
    bench: &Bench,
    addrs: &[SocketAddr],
    pids: &[u32],
    shots: Shots,
) -> anyhow::Result<(loadgen::RunResult, f64, Vec<f64>)> {
    let parent_before = loadgen::cpu_seconds(None).unwrap_or(0.0);
    let before: Vec<f64> = pids
        .iter()
        .map(|pid| loadgen::cpu_seconds(Some(*pid)).unwrap_or(0.0))
        .collect();
    let result = loadgen::closed_loop_over(
        addrs,
        bench.options.connections,
        Arc::new(shots),
        bench.options.warmup,
        bench.options.duration,
    )
    .await?;
    let parent = loadgen::cpu_seconds(None).unwrap_or(0.0) - parent_before;
    let servers = pids
        .iter()
        .zip(before)
        .map(|(pid, before)| loadgen::cpu_seconds(Some(*pid)).unwrap_or(0.0) - before)
        .collect();
    Ok((result, parent, servers))
}

/// Starts `op`'s removal through the API: its `202` answer.
pub async fn start_removal(conn: &mut Conn, op: &OpSpec) -> anyhow::Result<loadgen::Answer> {
    let answer = conn
        .send(
            Method::POST,
            &op.remove_path(),
            None,
            Bytes::from(op.remove_body()),
        )
        .await?;
    if answer.status != StatusCode::ACCEPTED {
        bail!(
            "starting a removal: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
    }
    Ok(answer)
}

/// The operation id in a `202` answer.
pub fn operation_id(answer: &loadgen::Answer) -> anyhow::Result<String> {
    let body: Value = serde_json::from_slice(&answer.body)?;
    body["id"]
        .as_str()
        .map(str::to_owned)
        .context("no operation id in the 202")
}

/// The bare axum row: the same bodies and headers as the callops rows, cycled.
pub async fn ingest_bare(bench: &Bench) -> anyhow::Result<(Row, f64)> {
    eprintln!("== callback ingest: bare axum (read and parse the body)");
    let child = Child::start(Server::Bare, &bench.workdir, "bare").await?;
    let count = bench.options.pool.clamp(1, 50_000);
    let bodies = (0..count)
        .map(|index| {
            let op = OpSpec::new("bare", index, bench.options.calls);
            Bytes::from(op.succeeded_body(&Uuid::new_v4().to_string()))
        })
        .collect();
    let shots = Shots {
        path: "/callbacks/acs".to_owned(),
        bodies,
        tokens: bench.tokens(TOKENS),
        cycle: true,
        expect_matched: false,
    };
    let (result, cpu) = measure(bench, &child, shots).await?;
    print_errors("bare axum", &result);
    let rate = result.rate();
    eprintln!("  {} req/s, {cpu}", report::rate(rate));
    let row = Row {
        rate: Some((rate, "req/s")),
        ratio: Some(1.0),
        other: format!("errors {}; {cpu}", result.errors),
        ..Row::new("Callback ingest: bare axum, parse only (the limit)")
    }
    .latencies(&result.latencies);
    Ok((row, rate))
}

/// One callops ingest row.
pub async fn ingest(bench: &Bench, config: IngestConfig, bare: Option<f64>) -> anyhow::Result<Row> {
    eprintln!("== {}", config.label());
    let options = &bench.options;
    let prefix = format!("ingest-{}", config.name);
    let db = bench.workdir.join(format!("{prefix}.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let store = if config.durable {
        db.display().to_string()
    } else {
        "memory".to_owned()
    };
    let mut child = bench.start_callops(&prefix, &store, config.jwt).await?;
    bench.silence_calls(&prefix, options.calls);
    let count = options.pool;
    let ids = create_operations(child.addr, &prefix, count, options.calls, |_, _| true).await?;
    wait_running(
        child.addr,
        (count.saturating_sub(64)..count).filter_map(|i| ids.get(&i)),
    )
    .await?;
    let shots = ingest_shots(bench, &prefix, count, config.jwt);
    let commits_before = JournalCounters::read(child.addr).await?;
    let (result, cpu) = measure(bench, &child, shots).await?;
    let commits = JournalCounters::read(child.addr)
        .await?
        .since(&commits_before, &result);
    print_errors(&config.label(), &result);
    let rate = result.rate();
    let ratio = bare.map(|bare| rate / bare);
    let p99 = result.latencies.value_at_quantile(0.99);
    let exhausted = exhausted_note(&result, count);
    eprintln!("  {} req/s, {cpu}{exhausted}", report::rate(rate));
    let clean = result.errors == 0 && result.unmatched == 0;
    let mut other = format!(
        "errors {}, unmatched {}; {cpu}{exhausted}",
        result.errors, result.unmatched
    );
    let (target, mut met) = match (config.durable, config.jwt) {
        (false, false) => (
            "≥ 0.85, p99 ≤ 3 ms".to_owned(),
            ratio.map(|r| r >= 0.85 && p99 <= 3000),
        ),
        (false, true) => ("≥ 0.45 (JWT on)".to_owned(), ratio.map(|r| r >= 0.45)),
        (true, false) => (
            "≥ 0.6, p99 ≤ 5 ms, every ack durable".to_owned(),
            ratio.map(|r| r >= 0.6 && p99 <= 5000),
        ),
        (true, true) => ("every ack durable".to_owned(), Some(true)),
    };
    if config.durable {
        child.kill();
        let acknowledged: Vec<&String> = result
            .acknowledged
            .iter()
            .filter_map(|index| ids.get(index))
            .collect();
        let durable = count_durable(&db, &acknowledged).await?;
        eprintln!(
            "  after SIGKILL: acknowledged {}, durable {durable}",
            acknowledged.len()
        );
        other = format!(
            "acknowledged {}, durable {durable}; {commits}{other}",
            acknowledged.len()
        );
        met = met.map(|met| met && durable == acknowledged.len());
    }
    Ok(Row {
        rate: Some((rate, "req/s")),
        ratio,
        other,
        target,
        met: met.map(|met| met && clean),
        ..Row::new(config.label())
    }
    .latencies(&result.latencies))
}

/// One settling callback for each of operations `0..count` of run `prefix`, sent once each
/// (signed when `jwt`).
pub fn ingest_shots(bench: &Bench, prefix: &str, count: usize, jwt: bool) -> Shots {
    let bodies: Vec<Bytes> = (0..count)
        .map(|index| {
            let op = OpSpec::new(prefix, index, bench.options.calls);
            Bytes::from(op.succeeded_body(&Uuid::new_v4().to_string()))
        })
        .collect();
    Shots {
        path: "/callbacks/acs".to_owned(),
        bodies,
        tokens: if jwt {
            bench.tokens(TOKENS)
        } else {
            Vec::new()
        },
        cycle: false,
        expect_matched: true,
    }
}

/// How many of `ids` the SQLite store at `db` holds as `Succeeded`.
async fn count_durable(db: &Path, ids: &[&String]) -> anyhow::Result<usize> {
    let db = db.to_owned();
    let ids: Vec<String> = ids.iter().map(|id| (*id).clone()).collect();
    tokio::task::spawn_blocking(move || {
        let journal = Journal::open_sqlite(&db, SqliteOptions::default())
            .with_context(|| format!("opening {}", db.display()))?;
        let loaded = journal.load()?;
        let restored =
            callops::store::restored(loaded, Config::embedded().operations.event_bound());
        let statuses: HashMap<String, OperationStatus> = restored
            .operations
            .iter()
            .map(|operation| (operation.id.to_string(), operation.status))
            .collect();
        Ok(ids
            .iter()
            .filter(|id| statuses.get(*id) == Some(&OperationStatus::Succeeded))
            .count())
    })
    .await?
}

/// End to end: `POST participants:remove`, the emulator calls back at once (signed), the
/// client long-polls the outcome.
pub async fn end_to_end(bench: &Bench) -> anyhow::Result<Row> {
    eprintln!("== end to end: POST participants:remove -> emulator callback -> GET ?wait=");
    let options = &bench.options;
    let child = bench.start_callops("e2e", "memory", true).await?;
    let (parent_before, child_before) = (
        loadgen::cpu_seconds(None).unwrap_or(0.0),
        loadgen::cpu_seconds(Some(child.pid())).unwrap_or(0.0),
    );
    let start = Instant::now();
    let measured_from = start + options.warmup;
    let end = measured_from + options.duration;
    let mut workers = Vec::new();
    for worker in 0..options.connections {
        let mut conn = Conn::open(child.addr).await?;
        workers.push(tokio::spawn(async move {
            let prefix = format!("e2e-w{worker:02}");
            let mut latencies = report::histogram();
            let (mut ok, mut all, mut errors, mut first_error, mut last) =
                (0u64, 0u64, 0u64, None, None);
            for index in 0.. {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let op = OpSpec::new(&prefix, index, 50);
                let outcome = async {
                    let id = operation_id(&start_removal(&mut conn, &op).await?)?;
                    let operation = conn
                        .get_json(&format!("/v1/operations/{id}?wait={WAIT_SECS}"))
                        .await?;
                    match operation["status"].as_str() {
                        Some("Succeeded") => Ok(()),
                        other => bail!("operation {id} is {other:?}, not Succeeded"),
                    }
                }
                .await;
                let done = Instant::now();
                all += 1;
                match outcome {
                    Ok(()) if started >= measured_from => {
                        report::record(&mut latencies, done - started);
                        ok += 1;
                        last = Some(done);
                    }
                    Ok(()) => {}
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            (latencies, ok, all, errors, first_error, last)
        }));
    }
    let mut latencies = report::histogram();
    let (mut ok, mut all, mut errors, mut last) = (0, 0, 0, measured_from);
    for worker in workers {
        let (histogram, n, a, e, first_error, at) = worker.await?;
        all += a;
        latencies.add(&histogram)?;
        ok += n;
        errors += e;
        if let Some(error) = first_error {
            eprintln!("  !!! end to end failure: {error}");
        }
        if let Some(at) = at {
            last = last.max(at);
        }
    }
    let parent = loadgen::cpu_seconds(None).unwrap_or(0.0) - parent_before;
    let server = loadgen::cpu_seconds(Some(child.pid())).unwrap_or(0.0) - child_before;
    drop(child);
    let rate = ok as f64 / last.duration_since(measured_from).as_secs_f64().max(1e-9);
    // CPU is read around the whole run, warm-up included.
    let total = all.max(1) as f64;
    let cpu = format!(
        "CPU/op: server {:.0} µs, bench process (clients + emulator, which signs each callback) {:.0} µs",
        server * 1e6 / total,
        parent * 1e6 / total
    );
    eprintln!("  {} ops/s, {errors} errors; {cpu}", report::rate(rate));
    Ok(Row {
        rate: Some((rate, "ops/s")),
        other: format!("errors {errors}; {} clients; {cpu}", options.connections),
        met: if errors == 0 { None } else { Some(false) },
        target: if errors == 0 {
            String::new()
        } else {
            "no errors".to_owned()
        },
        ..Row::new("End to end: POST remove → callback → long-poll answer (memory, JWT on)")
    }
    .latencies(&latencies))
}

/// Long-poll wake latency: from the callback's 2xx to the waiting `GET ?wait=` answer.
pub async fn wake(bench: &Bench) -> anyhow::Result<Row> {
    eprintln!("== long-poll wake latency");
    let options = &bench.options;
    let prefix = "wake";
    let child = bench.start_callops(prefix, "memory", true).await?;
    bench.silence_calls(prefix, options.calls);
    let tokens = bench.tokens(TOKENS);
    let targets = WakeTargets {
        create: child.addr,
        poll: child.addr,
        callback: child.addr,
    };
    let woken = wake_samples(bench, prefix, targets, tokens, options.wake_samples).await?;
    let WakeResult {
        after_ack,
        after_send,
        before_ack,
        samples,
        failures,
        parallel,
    } = woken;
    let p99 = after_ack.value_at_quantile(0.99);
    eprintln!(
        "  p50 {} p99 {} after the ack; {before_ack} answers before the ack",
        report::latency(after_ack.value_at_quantile(0.5)),
        report::latency(p99)
    );
    Ok(Row {
        other: format!(
            "{samples} samples, {parallel} at a time; answers before the ack {before_ack}; from callback sent: p50 {}, p99 {}; failures {failures}",
            report::latency(after_send.value_at_quantile(0.5)),
            report::latency(after_send.value_at_quantile(0.99)),
        ),
        target: "p99 < 1 ms".to_owned(),
        met: Some(p99 < 1000 && failures == 0),
        ..Row::new("Long-poll wake: callback 2xx → GET ?wait= answer (max(0, answer − ack))")
    }
    .latencies(&after_ack))
}

/// Where wake samples go: operations are started on `create`, long-polled on `poll` (whose
/// `/healthz` counts the waiting polls) and called back on `callback`.
pub struct WakeTargets {
    pub create: SocketAddr,
    pub poll: SocketAddr,
    pub callback: SocketAddr,
}

/// What [`wake_samples`] measured (µs histograms).
pub struct WakeResult {
    /// max(0, long-poll answer − callback ack).
    pub after_ack: hdrhistogram::Histogram<u64>,
    /// Long-poll answer − callback sent.
    pub after_send: hdrhistogram::Histogram<u64>,
    pub before_ack: u64,
    pub samples: usize,
    pub failures: u64,
    pub parallel: usize,
}

/// Takes `count` wake samples of run `prefix` (its calls silenced by the caller).
///
/// Samples are taken in batches of `wake_parallel`: create the operations (their calls
/// never called back), start a long poll on each, wait until `/healthz` counts every one
/// of them as waiting (so each poll is registered, not in flight), then deliver the
/// callbacks (signed with `tokens` unless it is empty), each on its own connection, and
/// time both answers.
pub async fn wake_samples(
    bench: &Bench,
    prefix: &str,
    targets: WakeTargets,
    tokens: Vec<HeaderValue>,
    count: usize,
) -> anyhow::Result<WakeResult> {
    let options = &bench.options;
    let calls = options.calls;
    let tokens = Arc::new(tokens);
    let parallel = options.wake_parallel.max(1);
    let (mut makers, mut gets, mut posts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..parallel {
        makers.push(Conn::open(targets.create).await?);
        gets.push(Conn::open(targets.poll).await?);
        posts.push(Conn::open(targets.callback).await?);
    }
    let mut control = Conn::open(targets.poll).await?;
    let mut after_ack = report::histogram();
    let mut after_send = report::histogram();
    let (mut before_ack, mut samples, mut failures) = (0u64, 0usize, 0u64);
    let mut next = 0usize;
    while samples + (failures as usize) < count {
        let batch = parallel.min(count - samples - failures as usize);
        // Create the operations.
        let mut tasks = Vec::new();
        for slot in 0..batch {
            let mut maker = makers.pop().context("a connection per slot")?;
            let op = OpSpec::new(prefix, next + slot, calls);
            tasks.push(tokio::spawn(async move {
                let id = operation_id(&start_removal(&mut maker, &op).await?)?;
                anyhow::Ok((maker, op, id))
            }));
        }
        next += batch;
        let mut created = Vec::new();
        for task in tasks {
            let (maker, op, id) = task.await??;
            makers.push(maker);
            created.push((op, id));
        }
        // Start the long polls.
        let mut polls = Vec::new();
        for (_, id) in &created {
            let mut get = gets.pop().context("a connection per slot")?;
            let path = format!("/v1/operations/{id}?wait={WAIT_SECS}");
            polls.push(tokio::spawn(async move {
                let answer = get.get(&path).await;
                (get, answer)
            }));
        }
        // Wait until the server counts all of them as waiting (nothing else waits).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let health = control.get_json("/healthz").await?;
            if health["longPolls"].as_u64().unwrap_or(0) >= batch as u64 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the long polls did not register within 10 s: {health}");
            }
            tokio::task::yield_now().await;
        }
        // Deliver the callbacks, each on its own connection.
        let mut delivered = Vec::new();
        for (slot, (op, _)) in created.into_iter().enumerate() {
            let mut post = posts.pop().context("a connection per slot")?;
            let token = match tokens.len() {
                0 => None,
                n => Some(tokens[(next + slot) % n].clone()),
            };
            delivered.push(tokio::spawn(async move {
                let body = Bytes::from(op.succeeded_body(&Uuid::new_v4().to_string()));
                let sent = Instant::now();
                let answer = post
                    .send(Method::POST, "/callbacks/acs", token.as_ref(), body)
                    .await?;
                if !answer.status.is_success() {
                    bail!(
                        "callback: {} {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    );
                }
                anyhow::Ok((post, sent, answer.head_at))
            }));
        }
        let mut times = Vec::new();
        for task in delivered {
            let (post, sent, ack) = task.await??;
            posts.push(post);
            times.push((sent, ack));
        }
        // Time the answers.
        for ((sent, ack), poll) in times.into_iter().zip(polls) {
            let (get, answer) = poll.await?;
            gets.push(get);
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) => {
                    failures += 1;
                    eprintln!("  !!! long poll failed: {error:#}");
                    continue;
                }
            };
            let status: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            if status["status"] != "Succeeded" {
                failures += 1;
                if failures <= 3 {
                    eprintln!("  !!! long poll answered {}: {status}", answer.status);
                }
                continue;
            }
            if answer.head_at < ack {
                before_ack += 1;
            }
            report::record(
                &mut after_ack,
                answer.head_at.saturating_duration_since(ack),
            );
            report::record(&mut after_send, answer.head_at - sent);
            samples += 1;
        }
    }
    Ok(WakeResult {
        after_ack,
        after_send,
        before_ack,
        samples,
        failures,
        parallel,
    })
}

/// Memory: RSS of a callops child (memory store) before and after `memory_ops` running
/// operations, then (optionally) after settling them all with callbacks.
pub async fn memory(bench: &Bench) -> anyhow::Result<Vec<Row>> {
    eprintln!("== memory per tracked operation");
    let options = &bench.options;
    let prefix = "mem";
    let count = options.memory_ops.max(1);
    let calls = options.memory_calls.clamp(1, count);
    let child = bench.start_callops(prefix, "memory", false).await?;
    bench.silence_calls(prefix, calls);
    let mut control = Conn::open(child.addr).await?;
    control.get_json("/healthz").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, _) = child.rss()?;
    let ids = create_operations(child.addr, prefix, count, calls, |index, count| {
        index + 64 >= count
    })
    .await?;
    wait_running(child.addr, ids.values()).await?;
    let health = control.get_json("/healthz").await?;
    let tracked = health["operations"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (after, peak) = child.rss()?;
    let per_op = after.saturating_sub(before) as f64 / count as f64;
    eprintln!(
        "  RSS {:.0} MiB -> {:.0} MiB: {per_op:.0} bytes per running operation ({tracked} tracked)",
        before as f64 / MIB,
        after as f64 / MIB
    );
    let mut rows = vec![Row {
        other: format!(
            "**{per_op:.0} B/op**; RSS {:.0} MiB before, {:.0} MiB after (peak {:.0} MiB); {tracked} in the store",
            before as f64 / MIB,
            after as f64 / MIB,
            peak as f64 / MIB
        ),
        target: "≤ 600 B/op".to_owned(),
        met: Some(per_op <= 600.0 && tracked >= count as u64),
        ..Row::new(format!("Memory: {count} running operations tracked"))
    }];
    if options.settle {
        let (mut settled, mut errors, mut unmatched) = (0usize, 0u64, 0u64);
        let started = Instant::now();
        const CHUNK: usize = 100_000;
        for chunk in (0..count).step_by(CHUNK) {
            let bodies = (chunk..(chunk + CHUNK).min(count))
                .map(|index| {
                    let op = OpSpec::new(prefix, index, calls);
                    Bytes::from(op.succeeded_body(&Uuid::new_v4().to_string()))
                })
                .collect();
            let shots = Shots {
                path: "/callbacks/acs".to_owned(),
                bodies,
                tokens: Vec::new(),
                cycle: false,
                expect_matched: true,
            };
            let result = loadgen::closed_loop(
                child.addr,
                options.connections,
                Arc::new(shots),
                Duration::ZERO,
                Duration::from_secs(3600),
            )
            .await?;
            print_errors("settling", &result);
            settled += result.acknowledged.len();
            errors += result.errors;
            unmatched += result.unmatched;
        }
        let rate = settled as f64 / started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (settled_rss, peak) = child.rss()?;
        let per_settled = settled_rss.saturating_sub(before) as f64 / count as f64;
        eprintln!(
            "  settled {settled} ({} req/s): RSS {:.0} MiB, {per_settled:.0} bytes per settled operation",
            report::rate(rate),
            settled_rss as f64 / MIB
        );
        rows.push(Row {
            rate: Some((rate, "req/s")),
            other: format!(
                "**{per_settled:.0} B/op** (with the event ids kept for deduplication); RSS {:.0} MiB (peak {:.0} MiB); settled {settled}, errors {errors}, unmatched {unmatched}",
                settled_rss as f64 / MIB,
                peak as f64 / MIB
            ),
            ..Row::new(format!("Memory: the same {count} operations settled by callbacks"))
        });
    }
    Ok(rows)
}

/// The journal's commit counters (`/metrics`), for fsyncs per second and callbacks per fsync:
/// each committed transaction is one fsync of the write-ahead log (`synchronous=FULL`).
pub struct JournalCounters {
    transactions: f64,
    at: std::time::Instant,
}

impl JournalCounters {
    pub async fn read(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut conn = Conn::open(addr).await?;
        let answer = conn.get("/metrics").await?;
        let text = String::from_utf8_lossy(&answer.body);
        let transactions = text
            .lines()
            .find_map(|line| line.strip_prefix("callops_store_transactions_total "))
            .and_then(|value| value.trim().parse().ok())
            .context("no callops_store_transactions_total in /metrics")?;
        Ok(Self {
            transactions,
            at: std::time::Instant::now(),
        })
    }

    /// "fsyncs N/s, callbacks per fsync M; " over the run since `before`.
    pub fn since(&self, before: &Self, result: &loadgen::RunResult) -> String {
        let fsyncs = (self.transactions - before.transactions).max(1.0);
        let seconds = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let acknowledged = result.acknowledged.len() as f64;
        format!(
            "fsyncs {:.0}/s, {:.1} callbacks per fsync; ",
            fsyncs / seconds,
            acknowledged / fsyncs
        )
    }
}

/// How many events the one operation of the many-events row holds before it is measured.
pub const PRIOR_EVENTS: usize = 10_000;

/// Callback ingest on a durable store into one operation that already holds
/// [`PRIOR_EVENTS`] events: each callback is another distinct event for the same call and
/// context, so a cost that grows with the events an operation holds shows here.
pub async fn ingest_many_events(bench: &Bench, bare: f64) -> anyhow::Result<Row> {
    let label = format!(
        "Callback ingest: callops, durable (SQLite) store, one operation already holding {PRIOR_EVENTS} events, JWT off"
    );
    eprintln!("== {label}");
    let prefix = "ingest-events";
    let db = bench.workdir.join(format!("{prefix}.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let mut child = bench
        .start_callops(prefix, &db.display().to_string(), false)
        .await?;
    bench.silence_calls(prefix, 1);
    let ids = create_operations(child.addr, prefix, 1, 1, |_, _| true).await?;
    wait_running(child.addr, ids.get(&0)).await?;
    let op = OpSpec::new(prefix, 0, 1);
    let shots = |count: usize| Shots {
        path: "/callbacks/acs".to_owned(),
        bodies: (0..count)
            .map(|_| Bytes::from(op.succeeded_body(&Uuid::new_v4().to_string())))
            .collect(),
        tokens: Vec::new(),
        cycle: false,
        expect_matched: false,
    };
    let prior = loadgen::closed_loop_over(
        &[child.addr],
        bench.options.connections,
        Arc::new(shots(PRIOR_EVENTS)),
        Duration::ZERO,
        Duration::from_secs(600),
    )
    .await?;
    if prior.errors > 0 || prior.acknowledged.len() != PRIOR_EVENTS {
        bail!(
            "the {PRIOR_EVENTS} prior events were not all acknowledged ({} of them, {} errors)",
            prior.acknowledged.len(),
            prior.errors
        );
    }
    let count = bench.options.pool;
    let commits_before = JournalCounters::read(child.addr).await?;
    let (result, cpu) = measure(bench, &child, shots(count)).await?;
    let commits = JournalCounters::read(child.addr)
        .await?
        .since(&commits_before, &result);
    print_errors(&label, &result);
    child.kill();
    let id = ids.get(&0).context("the operation's id")?;
    let durable = count_durable(&db, &[id]).await?;
    let rate = result.rate();
    let ratio = rate / bare;
    let p99 = result.latencies.value_at_quantile(0.99);
    let exhausted = exhausted_note(&result, count);
    eprintln!("  {} req/s, {commits}{cpu}{exhausted}", report::rate(rate));
    Ok(Row {
        rate: Some((rate, "req/s")),
        ratio: Some(ratio),
        other: format!(
            "acknowledged {} (+{PRIOR_EVENTS} before), operation durable: {}; {commits}errors {}; {cpu}{exhausted}",
            result.acknowledged.len(),
            if durable == 1 { "yes" } else { "no" },
            result.errors
        ),
        target: "≥ 0.6, p99 ≤ 5 ms, as with few events".to_owned(),
        met: Some(result.errors == 0 && durable == 1 && ratio >= 0.6 && p99 <= 5000),
        ..Row::new(label)
    }
    .latencies(&result.latencies))
}
