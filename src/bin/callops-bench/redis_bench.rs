//! The shared-store rows: callback ingest with callops on Redis (one replica, then two
//! replicas on the same Redis), and a long poll on one replica woken by a callback sent to
//! the other. Redis is a `redis-server` child on a free loopback port (append-only file,
//! fsync every second, no snapshots), killed when the scenario ends.
//!
//! After each ingest row the callops children are SIGKILLed and Redis itself is asked
//! whether every acknowledged callback's operation is `Succeeded`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::child::Child;
use crate::loadgen::Conn;
use crate::report::{self, Row};
use crate::scenarios::{self, Bench, WakeResult, WakeTargets};

/// The `redis_prefix` callops uses (the default): keys are `{callops}:…`.
const PREFIX: &str = "callops";
/// The program started, unless `CALLOPS_BENCH_REDIS_SERVER` names another.
const REDIS_SERVER: &str = "redis-server";
/// Operations read back per pipelined round trip when checking.
const CHECK_CHUNK: usize = 1000;

/// The program to start: `CALLOPS_BENCH_REDIS_SERVER`, or `redis-server` on the `PATH`.
fn program() -> String {
    std::env::var("CALLOPS_BENCH_REDIS_SERVER").unwrap_or_else(|_| REDIS_SERVER.into())
}

/// A `redis-server` child; SIGKILLed when dropped.
pub struct RedisServer {
    process: std::process::Child,
    pub url: String,
    log: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port with its files under `workdir/redis`,
    /// and waits until it answers PING. `None` when the program is not installed.
    pub async fn start(workdir: &Path) -> anyhow::Result<Option<Self>> {
        Self::start_with(workdir, "redis", |_, _| Vec::new()).await
    }

    /// As [`RedisServer::start`], its files under `workdir/name`, with the options
    /// `extra(dir, port)` gives beyond the defaults.
    pub async fn start_with(
        workdir: &Path,
        name: &str,
        extra: impl Fn(&Path, u16) -> Vec<String>,
    ) -> anyhow::Result<Option<Self>> {
        let program = program();
        let dir = workdir.join(name);
        std::fs::create_dir_all(&dir)?;
        // The port is free when chosen; another process could take it before redis-server
        // binds it, so a start that fails is tried again on another port.
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            let log = workdir.join(format!("redis-{port}.log"));
            let output = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let spawned = Command::new(&program)
                .arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                .arg("--dir")
                .arg(&dir)
                .args(extra(&dir, port))
                .stdin(Stdio::null())
                .stdout(Stdio::from(output.try_clone()?))
                .stderr(Stdio::from(output))
                .spawn();
            let process = match spawned {
                Ok(process) => process,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(error).with_context(|| format!("starting {program}")),
            };
            eprintln!("  redis-server log: {}", log.display());
            let mut server = Self {
                process,
                url: format!("redis://127.0.0.1:{port}"),
                log,
            };
            match server.wait_ping().await {
                Ok(()) => return Ok(Some(server)),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("three attempts")).context("starting redis-server")
    }

    async fn wait_ping(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.process.try_wait()? {
                bail!(
                    "redis-server exited at start ({status}): {}",
                    std::fs::read_to_string(&self.log)
                        .unwrap_or_default()
                        .trim()
                );
            }
            match self.ping().await {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() > deadline => {
                    return Err(error).context("redis-server did not answer PING within 10 s");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str())?;
        // Emptying or reading back a few hundred thousand operations takes longer than the
        // client's default response timeout.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_secs(120)));
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    async fn ping(&self) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        let pong: String = redis::cmd("PING").query_async(&mut connection).await?;
        if pong != "PONG" {
            bail!("PING answered {pong:?}");
        }
        Ok(())
    }

    /// Empties Redis between rows (every callops child on it is gone by then).
    pub async fn flush(&self) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        let () = redis::cmd("FLUSHALL").query_async(&mut connection).await?;
        Ok(())
    }

    /// How many of the operations `ids` Redis holds as `Succeeded` (`HGET {callops}:op:<id>
    /// doc`, its `status`).
    async fn count_succeeded(&self, ids: &[&String]) -> anyhow::Result<usize> {
        let mut connection = self.connection().await?;
        let mut succeeded = 0;
        for chunk in ids.chunks(CHECK_CHUNK) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HGET")
                    .arg(format!("{{{PREFIX}}}:op:{id}"))
                    .arg("doc");
            }
            let docs: Vec<Option<String>> = pipe.query_async(&mut connection).await?;
            succeeded += docs
                .iter()
                .flatten()
                .filter(|doc| {
                    serde_json::from_str::<Value>(doc)
                        .is_ok_and(|doc| doc["status"].as_str() == Some("Succeeded"))
                })
                .count();
        }
        Ok(succeeded)
    }

    /// Zeroes Redis's per-command statistics.
    async fn reset_stats(&self) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut connection)
            .await?;
        Ok(())
    }

    /// The commands Redis ran since the last [`Self::reset_stats`], most time first:
    /// (command, calls, µs in all).
    async fn command_stats(&self) -> anyhow::Result<Vec<(String, u64, u64)>> {
        let mut connection = self.connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await?;
        Ok(parse_command_stats(&info))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or(0)
    }

    /// One command's answer, on a connection of its own.
    pub async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> anyhow::Result<T> {
        let mut connection = self.connection().await?;
        Ok(command.query_async(&mut connection).await?)
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// How many append-only file rewrites (a fork, competing for the cores) Redis has
    /// started so far, from its log.
    fn aof_rewrites(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("Background append only file rewriting started"))
            .count()
    }
}

/// `cmdstat_evalsha:calls=10,usec=250,…` lines of `INFO commandstats`, most time first.
fn parse_command_stats(info: &str) -> Vec<(String, u64, u64)> {
    let mut stats: Vec<(String, u64, u64)> = info
        .lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |wanted: &str| {
                fields.split(',').find_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    (key == wanted).then(|| value.parse::<u64>().ok()).flatten()
                })
            };
            Some((name.to_owned(), field("calls")?, field("usec")?))
        })
        .collect();
    stats.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    stats
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A free loopback port whose cluster bus port (10 000 higher) is free too.
fn free_port() -> anyhow::Result<u16> {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if port <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

/// The Redis rows, pushed onto `rows` as they are measured. An error when Redis lost an
/// acknowledged callback (the row says so too) or a wake failed.
pub async fn run(bench: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    eprintln!("== shared store on Redis");
    let Some(server) = RedisServer::start(bench.workdir()).await? else {
        eprintln!(
            "  !!! {} not found (install redis-server or set CALLOPS_BENCH_REDIS_SERVER): the Redis rows are skipped",
            program()
        );
        return Ok(());
    };
    let mut problems = Vec::new();
    let shared = Shared {
        name: "Redis store".to_owned(),
        tag: "redis",
        url: server.url.clone(),
        settings: String::new(),
        node: &server,
        nodes: vec![&server],
        pids: vec![server.pid()],
        strict: true,
    };
    for replicas in [1, 2] {
        // The limit, measured again just before (as for the other ingest rows).
        let bare = scenarios::ingest_bare(bench).await?.1;
        // A missed target shows in the Met column; a lost acknowledgement or an error fails.
        let (row, sound) = ingest(bench, &shared, replicas, bare).await?;
        if !sound {
            problems.push(format!("{}: {}", row.scenario, row.other));
        }
        rows.push(row);
        server.flush().await?;
    }
    let row = wake(bench, &server).await?;
    if row.met == Some(false) {
        problems.push(format!("{}: {}", row.scenario, row.other));
    }
    rows.push(row);
    drop(server);
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// What an ingest row runs on: the store URL and `[store]` settings callops is given, the
/// Redis node holding its keys (statistics, the check after SIGKILL), and the Redis
/// processes whose CPU counts.
pub struct Shared<'a> {
    pub name: String,
    /// Names the row's operations.
    pub tag: &'static str,
    pub url: String,
    pub settings: String,
    pub node: &'a RedisServer,
    /// Every master holding keys (statistics).
    pub nodes: Vec<&'a RedisServer>,
    pub pids: Vec<u32>,
    /// Held to the single-Redis targets.
    pub strict: bool,
}

fn replicas_name(replicas: usize) -> String {
    match replicas {
        1 => "1 replica".to_owned(),
        n => format!("{n} replicas"),
    }
}

/// A replica's name: `a`, `b`, …
fn replica(index: usize) -> char {
    char::from(b'a' + (index % 26) as u8)
}

/// One ingest row: operations created through replica A, the callbacks spread over every
/// replica (connection `i` to replica `i % replicas`), then SIGKILL and a check in Redis.
pub async fn ingest(
    bench: &Bench,
    shared: &Shared<'_>,
    replicas: usize,
    bare: f64,
) -> anyhow::Result<(Row, bool)> {
    let server = shared.node;
    let label = format!(
        "Callback ingest: callops, {} ({}), JWT off",
        shared.name,
        replicas_name(replicas)
    );
    eprintln!("== {label}");
    let options = &bench.options;
    let prefix = format!("ingest-{}{replicas}", shared.tag);
    let mut children: Vec<Child> = Vec::new();
    for index in 0..replicas {
        let name = format!("{prefix}-{}", replica(index));
        children.push(
            bench
                .start_callops_on(&name, &shared.url, &shared.settings)
                .await?,
        );
    }
    bench.silence_calls(&prefix, options.calls);
    let count = options.pool;
    let first = children[0].addr;
    let ids =
        scenarios::create_operations(first, &prefix, count, options.calls, |_, _| true).await?;
    scenarios::wait_running(
        first,
        (count.saturating_sub(64)..count).filter_map(|i| ids.get(&i)),
    )
    .await?;
    let shots = scenarios::ingest_shots(bench, &prefix, count, false);
    let addrs: Vec<SocketAddr> = children.iter().map(|child| child.addr).collect();
    let mut pids: Vec<u32> = children.iter().map(Child::pid).collect();
    pids.extend(&shared.pids);
    for node in &shared.nodes {
        node.reset_stats().await?;
    }
    let rewrites_before = server.aof_rewrites();
    let conflicts_before = conflicts(&children).await?;
    let (result, parent, cpus) = scenarios::measure_over(bench, &addrs, &pids, shots).await?;
    scenarios::print_errors(&label, &result);
    let requests = (result.acknowledged.len() as u64 + result.errors).max(1) as f64;
    let per_request = |seconds: f64| seconds * 1e6 / requests;
    let callops_cpu = per_request(cpus[..replicas].iter().sum());
    let redis_cpu = per_request(cpus[replicas..].iter().sum());
    let each_redis: Vec<String> = cpus[replicas..]
        .iter()
        .map(|seconds| format!("{:.0}", per_request(*seconds)))
        .collect();
    let cpu = format!(
        "CPU/req: callops {callops_cpu:.0} µs{}, redis-server {:.0} µs{}, load generator {:.0} µs",
        if replicas > 1 {
            format!(" ({replicas} replicas summed)")
        } else {
            String::new()
        },
        redis_cpu,
        if shared.pids.len() > 1 {
            format!(
                " ({} processes summed: {} µs)",
                shared.pids.len(),
                each_redis.join(" + ")
            )
        } else {
            String::new()
        },
        per_request(parent)
    );
    // Where Redis spent its time during the run (stderr only: a diagnostic).
    match server.command_stats().await {
        Ok(stats) => {
            let top: Vec<String> = stats
                .iter()
                .take(8)
                .map(|(name, calls, usec)| {
                    format!(
                        "{name} {:.2}/req {:.1} µs/call",
                        *calls as f64 / requests,
                        *usec as f64 / (*calls).max(1) as f64
                    )
                })
                .collect();
            eprintln!("  redis commands (per request): {}", top.join(", "));
        }
        Err(error) => eprintln!("  (INFO commandstats failed: {error:#})"),
    }
    let rewrites = server.aof_rewrites() - rewrites_before;
    if rewrites > 0 {
        eprintln!("  redis-server started {rewrites} append-only file rewrite(s) during the run");
    }
    let rate = result.rate();
    let exhausted = scenarios::exhausted_note(&result, count);
    eprintln!("  {} req/s, {cpu}{exhausted}", report::rate(rate));
    let conflicts = match (conflicts_before, conflicts(&children).await?) {
        (Some(before), Some(after)) => {
            format!("; store conflicts (transitions rerun) {}", after - before)
        }
        _ => String::new(),
    };
    for child in &mut children {
        child.kill();
    }
    let acknowledged: Vec<&String> = result
        .acknowledged
        .iter()
        .filter_map(|index| ids.get(index))
        .collect();
    let stored = if let Some(nodes) = callops::config::cluster_nodes(&shared.url) {
        count_succeeded_on_cluster(nodes, &shared.settings, &acknowledged).await?
    } else {
        server.count_succeeded(&acknowledged).await?
    };
    eprintln!(
        "  after SIGKILL: acknowledged {}, stored (Succeeded in Redis) {stored}",
        acknowledged.len()
    );
    let sound = result.errors == 0 && result.unmatched == 0 && stored == acknowledged.len();
    let split = if replicas > 1 {
        format!(
            "operations created through replica A, callbacks over {replicas} replicas ({} connections each); ",
            options.connections.div_ceil(replicas)
        )
    } else {
        String::new()
    };
    let row = Row {
        rate: Some((rate, "req/s")),
        ratio: Some(rate / bare),
        other: format!(
            "acknowledged {}, stored {stored}; {split}errors {}, unmatched {}{conflicts}; {cpu}{exhausted}",
            acknowledged.len(),
            result.errors,
            result.unmatched
        ),
        target: if replicas == 1 && shared.strict {
            "≥ 20 000 req/s, CPU/req ≤ 35 µs callops and ≤ 40 µs Redis, every ack stored".to_owned()
        } else {
            "every ack stored, no errors".to_owned()
        },
        met: Some(
            sound
                && (replicas > 1
                    || !shared.strict
                    || (rate >= 20_000.0 && callops_cpu <= 35.0 && redis_cpu <= 40.0)),
        ),
        ..Row::new(label)
    }
    .latencies(&result.latencies);
    Ok((row, sound))
}

/// As [`RedisServer::count_succeeded`], on a cluster whose store has the partitions
/// `settings` names (`redis_partitions = N`, else 1): each operation read where it lives.
async fn count_succeeded_on_cluster(
    nodes: Vec<String>,
    settings: &str,
    ids: &[&String],
) -> anyhow::Result<usize> {
    let partitions: u16 = settings
        .lines()
        .find_map(|line| line.strip_prefix("redis_partitions = "))
        .map_or(Ok(1), str::parse)?;
    let keys = callops::store::redis::Keys::new(PREFIX, partitions);
    let client = redis::cluster::ClusterClientBuilder::new(nodes)
        .response_timeout(Duration::from_secs(120))
        .build()?;
    let connection = client.get_async_connection().await?;
    let mut succeeded = 0;
    for chunk in ids.chunks(CHECK_CHUNK) {
        let reads = chunk.iter().map(|id| {
            let mut connection = connection.clone();
            let key = callops::operation::OperationId::parse(id).map(|id| keys.operation(id));
            async move {
                match key {
                    Some(key) => {
                        redis::cmd("HGET")
                            .arg(key)
                            .arg("doc")
                            .query_async::<Option<String>>(&mut connection)
                            .await
                    }
                    None => Ok(None),
                }
            }
        });
        for doc in futures_util::future::join_all(reads).await {
            if doc?.is_some_and(|doc| {
                serde_json::from_str::<Value>(&doc)
                    .is_ok_and(|doc| doc["status"].as_str() == Some("Succeeded"))
            }) {
                succeeded += 1;
            }
        }
    }
    Ok(succeeded)
}

/// The transitions the replicas reran on a conflict (`storeConflicts` on `/healthz`,
/// summed), if they count them.
async fn conflicts(children: &[Child]) -> anyhow::Result<Option<u64>> {
    let mut sum = Some(0);
    for child in children {
        let health = Conn::open(child.addr).await?.get_json("/healthz").await?;
        sum = sum
            .zip(health["storeConflicts"].as_u64())
            .map(|(a, b)| a + b);
    }
    Ok(sum)
}

/// Long-poll wake across replicas: each operation created and long-polled on replica A,
/// its settling callback sent to replica B; from the callback's send to the poll's answer.
async fn wake(bench: &Bench, server: &RedisServer) -> anyhow::Result<Row> {
    eprintln!("== long-poll wake across replicas (Redis store)");
    let prefix = "wake-redis";
    let a = bench
        .start_callops(&format!("{prefix}-a"), &server.url, false)
        .await?;
    let b = bench
        .start_callops(&format!("{prefix}-b"), &server.url, false)
        .await?;
    bench.silence_calls(prefix, bench.options.calls);
    let targets = WakeTargets {
        create: a.addr,
        poll: a.addr,
        callback: b.addr,
    };
    let count = bench.options.redis_wake_samples.max(1);
    let WakeResult {
        after_ack,
        after_send,
        before_ack,
        samples,
        failures,
        parallel,
    } = scenarios::wake_samples(bench, prefix, targets, Vec::new(), count).await?;
    let p50 = after_send.value_at_quantile(0.5);
    let p99 = after_send.value_at_quantile(0.99);
    eprintln!(
        "  p50 {} p99 {} from the callback's send; {failures} failures",
        report::latency(p50),
        report::latency(p99)
    );
    Ok(Row {
        other: format!(
            "{samples} samples, {parallel} at a time, JWT off; after the callback's 2xx: p50 {}, p99 {}; answers before the ack {before_ack}; failures {failures}",
            report::latency(after_ack.value_at_quantile(0.5)),
            report::latency(after_ack.value_at_quantile(0.99)),
        ),
        target: if failures == 0 {
            String::new()
        } else {
            "no failures".to_owned()
        },
        met: if failures == 0 { None } else { Some(false) },
        ..Row::new(
            "Long-poll wake across replicas (Redis): callback sent to B → GET ?wait= answer on A",
        )
    }
    .latencies(&after_send))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_named() {
        assert_eq!(replicas_name(1), "1 replica");
        assert_eq!(replicas_name(2), "2 replicas");
        assert_eq!(replica(0), 'a');
        assert_eq!(replica(1), 'b');
    }

    #[test]
    fn reads_command_stats() {
        let info = "# Commandstats\r\ncmdstat_hmget:calls=10,usec=30,usec_per_call=3.00,rejected_calls=0,failed_calls=0\r\ncmdstat_evalsha:calls=5,usec=100,usec_per_call=20.00\r\n";
        assert_eq!(
            parse_command_stats(info),
            vec![("evalsha".to_owned(), 5, 100), ("hmget".to_owned(), 10, 30)]
        );
    }
}
