//! `callops-bench`: measures callops in one run on one machine and prints a Markdown table.
//!
//! The servers under test are child processes (this binary re-executed with a hidden
//! `serve-bare` or `serve-callops` subcommand); this process runs the load generator and
//! the emulator that stands in for ACS and Graph. See `--help`.

mod child;
mod events;
mod loadgen;
mod redis_bench;
mod redis_cluster_bench;
mod report;
mod scenarios;
mod webhooks_bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::scenarios::{Bench, INGEST_CONFIGS, Options};

#[derive(Parser)]
#[command(
    version,
    about = "Benchmarks callops: callback ingest (against a bare axum server), the shared store on Redis, end to end, long-poll wake latency, memory per operation, webhook delivery"
)]
struct Cli {
    /// Seconds each throughput measurement lasts (after the warm-up) [default: 10; --quick: 3].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of warm-up before each measurement [default: 2; --quick: 0.5].
    #[arg(long)]
    warmup: Option<f64>,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Scenarios to run (comma-separated) [default: all].
    #[arg(long, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Running operations created for each callops ingest configuration; a measurement
    /// ends early when they are all settled [default: 250000; --quick: 50000].
    #[arg(long)]
    pool: Option<usize>,
    /// Call connections the ingest and wake operations are spread over.
    #[arg(long, default_value_t = 1000)]
    calls: usize,
    /// Operations tracked for the memory figure [default: 1000000; --quick: 100000].
    #[arg(long)]
    memory_ops: Option<usize>,
    /// Call connections the memory operations are spread over [default: memory-ops / 10].
    #[arg(long)]
    memory_calls: Option<usize>,
    /// Skip settling the memory operations (and the RSS figure after it).
    #[arg(long)]
    no_settle: bool,
    /// Long-poll wake samples [default: 2000; --quick: 400].
    #[arg(long)]
    wake_samples: Option<usize>,
    /// Samples of the long-poll wake across replicas on Redis [default: 500; --quick: 100].
    #[arg(long)]
    redis_wake_samples: Option<usize>,
    /// Long polls woken at a time.
    #[arg(long, default_value_t = 16)]
    wake_parallel: usize,
    /// Short durations and 100 000 memory operations: a fast sanity run.
    #[arg(long)]
    quick: bool,
    /// ACS requests authenticated by a managed identity (an Entra ID token from the
    /// emulator) instead of the access key.
    #[arg(long)]
    acs_managed_identity: bool,
    /// Limit each shard of the sharded Redis Cluster rows to this percentage of one core
    /// (a cgroup v1 `cpu` quota; needs root), so the shards, not the two cores, bound the
    /// throughput: each shard then stands for a machine of its own.
    #[arg(long, value_parser = clap::value_parser!(u32).range(5..=100))]
    shard_cpu_percent: Option<u32>,
    #[command(subcommand)]
    command: Option<Child>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Callback ingest: bare axum and the four callops configurations.
    Ingest,
    /// Callops on a Redis store (a `redis-server` child): ingest with one and two replicas,
    /// long-poll wake across replicas.
    Redis,
    /// Callops on a Redis Cluster (three masters, a replica each): ingest, without and with
    /// `WAIT` for a replica.
    RedisCluster,
    /// End to end through the emulator.
    E2e,
    /// Long-poll wake latency.
    Wake,
    /// Bytes per tracked operation.
    Memory,
    /// Webhook delivery throughput and settle → delivery latency.
    Webhooks,
}

/// The servers under test (run by the benchmark itself).
#[derive(Subcommand)]
enum Child {
    #[command(hide = true)]
    ServeBare {
        #[arg(long)]
        port_file: PathBuf,
    },
    #[command(hide = true)]
    ServeCallops {
        #[arg(long)]
        port_file: PathBuf,
        #[arg(long)]
        config: PathBuf,
    },
}

/// mimalloc, as in the `callops` binary: the callops children run this binary. The bare axum
/// child has it too, so the limit is measured with the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Child::ServeBare { port_file }) => {
            child::serve_bare(port_file).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Child::ServeCallops { port_file, config }) => {
            child::serve_callops(port_file, config).await?;
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    // The emulator's warnings (e.g. a refused callback), on stderr beside the progress.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .try_init();
    let quick = cli.quick;
    let pick = |given: Option<f64>, full: f64, short: f64| {
        Duration::from_secs_f64(given.unwrap_or(if quick { short } else { full }))
    };
    let memory_ops = cli
        .memory_ops
        .unwrap_or(if quick { 100_000 } else { 1_000_000 });
    let options = Options {
        duration: pick(cli.duration, 10.0, 3.0),
        warmup: pick(cli.warmup, 2.0, 0.5),
        connections: cli.connections.max(1),
        pool: cli.pool.unwrap_or(if quick { 50_000 } else { 250_000 }),
        calls: cli.calls.max(1),
        memory_ops,
        memory_calls: cli.memory_calls.unwrap_or(memory_ops / 10),
        settle: !cli.no_settle,
        wake_samples: cli.wake_samples.unwrap_or(if quick { 400 } else { 2000 }),
        wake_parallel: cli.wake_parallel,
        redis_wake_samples: cli
            .redis_wake_samples
            .unwrap_or(if quick { 100 } else { 500 }),
        acs_managed_identity: cli.acs_managed_identity,
        shard_cpu_percent: cli.shard_cpu_percent,
    };
    let only = if cli.only.is_empty() {
        vec![
            Scenario::Ingest,
            Scenario::Redis,
            Scenario::RedisCluster,
            Scenario::E2e,
            Scenario::Wake,
            Scenario::Memory,
            Scenario::Webhooks,
        ]
    } else {
        cli.only
    };
    eprintln!("callops-bench: {options:?}");
    let bench = Bench::start(options).await?;
    let mut rows = Vec::new();
    let mut failed = false;
    let mut note = |result: anyhow::Result<()>, what: &str| {
        if let Err(error) = result {
            failed = true;
            eprintln!("!!! {what} failed: {error:#}");
        }
    };
    if only.contains(&Scenario::Ingest) {
        let result = async {
            // The limit is measured again before each callops row, and each ratio is to the
            // measurement just before it: the machine's load drifts over a run.
            let (row, mut bare) = scenarios::ingest_bare(&bench).await?;
            let bare_row = rows.len();
            rows.push(row);
            let mut limits = vec![bare];
            for (index, config) in INGEST_CONFIGS.into_iter().enumerate() {
                if index > 0 {
                    bare = scenarios::ingest_bare(&bench).await?.1;
                    limits.push(bare);
                }
                rows.push(scenarios::ingest(&bench, config, Some(bare)).await?);
            }
            bare = scenarios::ingest_bare(&bench).await?.1;
            limits.push(bare);
            rows.push(scenarios::ingest_many_events(&bench, bare).await?);
            let (low, high) = limits
                .iter()
                .fold((f64::MAX, f64::MIN), |(low, high), rate| {
                    (low.min(*rate), high.max(*rate))
                });
            rows[bare_row].other.push_str(&format!(
                "; measured before each callops row ({} to {} req/s), each ratio is to the one just before it",
                report::rate(low),
                report::rate(high)
            ));
            anyhow::Ok(())
        }
        .await;
        note(result, "callback ingest");
    }
    if only.contains(&Scenario::Redis) {
        let result = redis_bench::run(&bench, &mut rows).await;
        note(result, "Redis store");
    }
    if only.contains(&Scenario::RedisCluster) {
        let result = redis_cluster_bench::run(&bench, &mut rows).await;
        note(result, "Redis Cluster");
    }
    if only.contains(&Scenario::E2e) {
        let result = scenarios::end_to_end(&bench)
            .await
            .map(|row| rows.push(row));
        note(result, "end to end");
    }
    if only.contains(&Scenario::Wake) {
        let result = scenarios::wake(&bench).await.map(|row| rows.push(row));
        note(result, "long-poll wake");
    }
    if only.contains(&Scenario::Memory) {
        let result = scenarios::memory(&bench)
            .await
            .map(|more| rows.extend(more));
        note(result, "memory");
    }
    if only.contains(&Scenario::Webhooks) {
        let result = webhooks_bench::run(&bench, &mut rows).await;
        note(result, "webhooks");
    }
    let options = bench.options.clone();
    bench.finish();
    println!("## callops benchmark\n");
    println!("{}", report::machine());
    println!(
        "Load generator and emulator in one process, each server under test in a child process; {} connections, {:.1} s warm-up, {:.1} s measured per throughput row.\n",
        options.connections,
        options.warmup.as_secs_f64(),
        options.duration.as_secs_f64()
    );
    print!("{}", report::table(&rows));
    if rows.iter().any(|row| row.met == Some(false)) {
        eprintln!("some targets were not met (see the Met column)");
    }
    if failed {
        eprintln!("!!! some scenarios failed (see above)");
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
