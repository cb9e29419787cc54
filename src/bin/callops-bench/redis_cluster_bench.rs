//! The Redis Cluster rows: callback ingest with callops on a cluster (`redis+cluster://`).
//! First three masters with a replica each and every key in one slot, without and with
//! `store.redis_wait_replicas = 1` (the Redis CPU counted is that slot's master and its
//! replica). Then the deployment in 64 partitions on one and on three masters (no
//! replicas), each master its own process, to show what a shard carries.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::redis_bench::{RedisServer, Shared, ingest};
use crate::report::Row;
use crate::scenarios::{self, Bench};

/// Partitions of the sharded rows.
const PARTITIONS: u16 = 64;

/// The rows, pushed onto `rows`. An error when an acknowledged callback was lost.
pub async fn run(bench: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    eprintln!("== shared store on a Redis Cluster");
    let mut problems = Vec::new();
    let Some(nodes) = start_cluster(bench, "cluster", 3, 1).await? else {
        return Ok(());
    };
    let (master, replica) = slot_holders(&nodes, "{callops}").await?;
    let (master, replica) = (&nodes[master], &nodes[replica]);
    for wait in [0, 1] {
        let shared = Shared {
            name: if wait == 0 {
                "Redis Cluster, one slot".to_owned()
            } else {
                "Redis Cluster, one slot, WAIT 1 replica".to_owned()
            },
            tag: if wait == 0 { "cluster" } else { "cluster-wait" },
            url: url(&nodes),
            settings: format!("redis_wait_replicas = {wait}"),
            node: master,
            nodes: vec![master],
            pids: vec![master.pid(), replica.pid()],
            strict: false,
        };
        measure(bench, &shared, rows, &mut problems).await?;
        master.flush().await?;
    }
    drop(nodes);
    for masters in [1, 3] {
        let tag = if masters == 1 { "shard1" } else { "shard3" };
        let Some(nodes) = start_cluster(bench, tag, masters, 0).await? else {
            return Ok(());
        };
        let quota = match bench.options.shard_cpu_percent {
            Some(percent) => {
                let limits: Vec<CpuLimit> = nodes
                    .iter()
                    .enumerate()
                    .map(|(index, node)| {
                        CpuLimit::apply(&format!("{tag}-{index}"), node.pid(), percent)
                    })
                    .collect::<anyhow::Result<_>>()?;
                Some((percent, limits))
            }
            None => None,
        };
        let shared = Shared {
            name: format!(
                "Redis Cluster, {masters} shard{}{}, {PARTITIONS} partitions",
                if masters == 1 { "" } else { "s" },
                quota
                    .as_ref()
                    .map_or_else(String::new, |(percent, _)| format!(
                        " of {percent} % of a core each"
                    ))
            ),
            tag,
            url: url(&nodes),
            settings: format!("redis_partitions = {PARTITIONS}"),
            node: &nodes[0],
            nodes: nodes.iter().collect(),
            pids: nodes.iter().map(RedisServer::pid).collect(),
            strict: false,
        };
        measure(bench, &shared, rows, &mut problems).await?;
        // The shards go first: a cgroup can be removed once empty.
        drop(shared);
        drop(nodes);
        drop(quota);
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

async fn measure(
    bench: &Bench,
    shared: &Shared<'_>,
    rows: &mut Vec<Row>,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let bare = scenarios::ingest_bare(bench).await?.1;
    let (row, sound) = ingest(bench, shared, 1, bare).await?;
    if !sound {
        problems.push(format!("{}: {}", row.scenario, row.other));
    }
    rows.push(row);
    Ok(())
}

/// A process held to a share of one core by a cgroup v1 `cpu` quota; the group is removed
/// when this is dropped (after the process is gone).
struct CpuLimit {
    dir: std::path::PathBuf,
}

impl CpuLimit {
    fn apply(name: &str, pid: u32, percent: u32) -> anyhow::Result<Self> {
        let dir = std::path::Path::new("/sys/fs/cgroup/cpu").join(format!("callops-bench-{name}"));
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "creating {} (--shard-cpu-percent needs a writable cgroup v1 cpu controller)",
                dir.display()
            )
        })?;
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000")?;
        std::fs::write(dir.join("cpu.cfs_quota_us"), (percent * 1000).to_string())?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        Ok(Self { dir })
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // Only an empty group can go: its shard has been killed by then, or it stays.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn url(nodes: &[RedisServer]) -> String {
    let seeds: Vec<String> = nodes
        .iter()
        .map(|node| format!("127.0.0.1:{}", node.port()))
        .collect();
    format!("redis+cluster://{}", seeds.join(","))
}

/// A cluster of `masters` masters with `replicas` replicas each, ready (every slot served,
/// every replica synced); `None` when `redis-server` is missing.
async fn start_cluster(
    bench: &Bench,
    tag: &str,
    masters: usize,
    replicas: usize,
) -> anyhow::Result<Option<Vec<RedisServer>>> {
    let mut nodes = Vec::new();
    for index in 0..masters * (1 + replicas) {
        let started =
            RedisServer::start_with(bench.workdir(), &format!("{tag}-{index}"), |dir, _| {
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-config-file",
                ]
                .iter()
                .map(|arg| (*arg).to_owned())
                .chain([dir.join("nodes.conf").display().to_string()])
                .collect()
            })
            .await?;
        let Some(node) = started else {
            eprintln!("  !!! redis-server not found: the Redis Cluster rows are skipped");
            return Ok(None);
        };
        nodes.push(node);
    }
    if masters == 1 {
        // `redis-cli --cluster create` wants three masters: one node takes every slot.
        let () = nodes[0]
            .query(redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(16383))
            .await?;
    } else {
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let create = tokio::task::spawn_blocking(move || {
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addresses)
                .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
                .output()
        })
        .await?
        .context("running redis-cli --cluster create")?;
        if !create.status.success() {
            bail!(
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&create.stdout)
            );
        }
    }
    until_ready(&nodes).await?;
    Ok(Some(nodes))
}

/// Waits until every node says the cluster is ok and every replica has synced.
async fn until_ready(nodes: &[RedisServer]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ready = 0;
        for node in nodes {
            let info: String = node.query(redis::cmd("CLUSTER").arg("INFO")).await?;
            let replication: String = node.query(redis::cmd("INFO").arg("replication")).await?;
            if info.contains("cluster_state:ok")
                && (replication.contains("role:master")
                    || replication.contains("master_link_status:up"))
            {
                ready += 1;
            }
        }
        if ready == nodes.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the Redis Cluster was not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The indexes of the master serving `key`'s slot and of a replica of it.
async fn slot_holders(nodes: &[RedisServer], key: &str) -> anyhow::Result<(usize, usize)> {
    let slot: u16 = nodes[0]
        .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
        .await?;
    let text: String = nodes[0].query(redis::cmd("CLUSTER").arg("NODES")).await?;
    let lines: Vec<Vec<&str>> = text.lines().map(|line| line.split(' ').collect()).collect();
    let port_of = |fields: &[&str]| -> Option<usize> {
        let port: u16 = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
        nodes.iter().position(|node| node.port() == port)
    };
    let master = lines
        .iter()
        .find(|fields| {
            fields.len() > 8
                && fields[2].contains("master")
                && fields[8..].iter().any(|range| {
                    let (low, high) = range.split_once('-').unwrap_or((range, range));
                    matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(low), Ok(high)) if low <= slot && slot <= high)
                })
        })
        .with_context(|| format!("no master serves slot {slot}"))?;
    let replica = lines
        .iter()
        .find(|fields| fields.len() > 3 && fields[3] == master[0])
        .with_context(|| format!("the master of slot {slot} has no replica"))?;
    Ok((
        port_of(master).context("the master is not ours")?,
        port_of(replica).context("the replica is not ours")?,
    ))
}
