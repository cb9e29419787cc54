//! The Redis Cluster rows: callback ingest with callops on a cluster of three masters and a
//! replica each (`redis+cluster://`, every key of a deployment in one slot), without and with
//! `store.redis_wait_replicas = 1`. The Redis CPU counted is the slot's master and its
//! replica; the others hold no key of callops's.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::redis_bench::{RedisServer, Shared, ingest};
use crate::report::Row;
use crate::scenarios::{self, Bench};

/// The rows, pushed onto `rows`. An error when an acknowledged callback was lost.
pub async fn run(bench: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    eprintln!("== shared store on a Redis Cluster (3 masters, a replica each)");
    let mut nodes = Vec::new();
    for index in 0..6 {
        let started =
            RedisServer::start_with(bench.workdir(), &format!("cluster-{index}"), |dir, _| {
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
            return Ok(());
        };
        nodes.push(node);
    }
    let addresses: Vec<String> = nodes
        .iter()
        .map(|node| format!("127.0.0.1:{}", node.port()))
        .collect();
    let create = {
        let addresses = addresses.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addresses)
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .output()
        })
        .await?
        .context("running redis-cli --cluster create")?
    };
    if !create.status.success() {
        bail!(
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&create.stdout)
        );
    }
    until_ready(&nodes).await?;
    let (master, replica) = slot_holders(&nodes, "{callops}").await?;
    let (master, replica) = (&nodes[master], &nodes[replica]);
    let url = format!("redis+cluster://{}", addresses.join(","));
    let mut problems = Vec::new();
    for wait in [0, 1] {
        let shared = Shared {
            name: if wait == 0 {
                "Redis Cluster, one slot".to_owned()
            } else {
                "Redis Cluster, one slot, WAIT 1 replica".to_owned()
            },
            tag: if wait == 0 { "cluster" } else { "cluster-wait" },
            url: url.clone(),
            settings: format!("redis_wait_replicas = {wait}"),
            node: master,
            pids: vec![master.pid(), replica.pid()],
            strict: false,
        };
        let bare = scenarios::ingest_bare(bench).await?.1;
        let (row, sound) = ingest(bench, &shared, 1, bare).await?;
        if !sound {
            problems.push(format!("{}: {}", row.scenario, row.other));
        }
        rows.push(row);
        master.flush().await?;
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
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
