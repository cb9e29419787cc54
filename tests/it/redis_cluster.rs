//! A Redis Cluster as the shared store (`redis+cluster://`): three masters and a replica
//! each, AOF with `appendfsync always`. A master killed under load loses nothing callops
//! acknowledged once its replica takes over (`store.redis_wait_replicas` = 1), and until a
//! replica can confirm writes again (the old master back as the new one's), requests answer
//! 503, never a 2xx. A store on one Redis moves into a cluster with `redis-cli --cluster
//! import`. (The whole end-to-end suite also runs on a cluster:
//! `scripts/test-on-redis-cluster.sh`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use callops::emulator::Script;

use crate::redis::{RedisServer, redis_server_available};
use crate::stream::{SseClient, SseEvent};
use crate::support::{SOON, TestApp, remove_event, silent};

/// Six nodes, three of them masters, in a directory of their own.
struct RedisCluster {
    nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    async fn start() -> Option<Self> {
        if !redis_server_available() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..6 {
            let port = cluster_port();
            let node_dir = dir.path().join(i.to_string());
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
                "--cluster-config-file",
            ]
            .iter()
            .map(|arg| (*arg).to_owned())
            .chain([node_dir.join("nodes.conf").display().to_string()])
            .collect();
            nodes.push(RedisServer::start_with(&node_dir, port, extra).await);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let created = tokio::task::spawn_blocking(move || {
            std::process::Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addresses)
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .output()
                .expect("redis-cli")
        })
        .await
        .unwrap();
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self { nodes, _dir: dir };
        cluster.until_ok("the new cluster").await;
        // A replica that never synced would not take over: wait for every link.
        cluster.until_synced().await;
        Some(cluster)
    }

    /// Waits until every replica's link to its master is up.
    async fn until_synced(&self) {
        let cluster = self;
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let mut synced = 0;
                for node in &cluster.nodes {
                    let info = node
                        .command(&["INFO", "replication"])
                        .await
                        .unwrap_or_default();
                    if info.contains("role:master") || info.contains("master_link_status:up") {
                        synced += 1;
                    }
                }
                if synced == cluster.nodes.len() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the replicas never synced with their masters");
    }

    fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Waits until every running node says the cluster is ok (every slot has a master).
    async fn until_ok(&self, what: &str) {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let mut all_ok = true;
                for node in &self.nodes {
                    if node.is_running() {
                        let info = node.command(&["CLUSTER", "INFO"]).await;
                        all_ok &= info.is_some_and(|info| info.contains("cluster_state:ok"));
                    }
                }
                if all_ok {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: the cluster never reported cluster_state:ok"));
    }

    /// A node still running.
    fn any_running(&self) -> &RedisServer {
        self.nodes.iter().find(|node| node.is_running()).unwrap()
    }

    /// The index of the master serving `key`'s slot, as a running node sees it (`None`
    /// while the one it knows is failing).
    async fn master_of(&self, key: &str) -> Option<usize> {
        let slot: u16 = self
            .any_running()
            .command(&["CLUSTER", "KEYSLOT", key])
            .await
            .unwrap()
            .trim_start_matches(':')
            .parse()
            .unwrap();
        let nodes = self
            .any_running()
            .command(&["CLUSTER", "NODES"])
            .await
            .unwrap();
        // A bulk reply: `$len ` before the text.
        let nodes = nodes.split_once(' ').map_or("", |(_, text)| text);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(low), Ok(high)) if low <= slot && slot <= high)
            });
            if serves {
                let port: u16 = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                return self.nodes.iter().position(|node| node.port() == port);
            }
        }
        None
    }
}

/// A free port whose cluster bus port (10 000 higher) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = crate::binary::free_port();
        if port <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

#[tokio::test]
async fn a_master_killed_under_load_loses_nothing_acknowledged_and_answers_503_meanwhile() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let prefix = format!("failover-{}", uuid::Uuid::new_v4());
    let url = cluster.url();
    let app = Arc::new(
        TestApp::spawn_with(|config| {
            config.store.location = url;
            config.store.redis_prefix = prefix.clone();
            config.store.redis_wait_replicas = 1;
            config.store.redis_timeout_ms = 500;
            // Spread over the shards: the killed master holds some of the calls.
            config.store.redis_partitions = 16;
        })
        .await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..6 {
        let app = Arc::clone(&app);
        let stop = Arc::clone(&stop);
        load.spawn(async move {
            let mut answers = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let call = format!("call-failover-{worker}-{n}");
                let response = app
                    .http
                    .post(app.url(&format!(
                        "/v1/acs/callConnections/{call}/participants:remove"
                    )))
                    .json(&json!({ "participantToRemove": { "rawId": "8:acs:abc_def" } }))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let at = Instant::now();
                let id = if status == 202 {
                    let body: serde_json::Value = response.json().await.unwrap();
                    Some(body["id"].as_str().unwrap().to_owned())
                } else {
                    None
                };
                answers.push((at, status, id));
            }
            answers
        });
    }
    // Some operations before the kill.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let key = format!("{{{prefix}}}:x");
    let victim = cluster.master_of(&key).await.unwrap();
    let killed_at = Instant::now();
    cluster.nodes[victim].kill();
    // The replica takes over once the others agree the master failed (node timeout 1 s).
    tokio::time::timeout(Duration::from_secs(30), async {
        while cluster
            .master_of(&key)
            .await
            .is_none_or(|master| master == victim)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no replica took over the killed master's slots");
    cluster.until_ok("after the failover").await;
    // Writes need a replica to confirm them: the old master comes back as the new one's.
    cluster.nodes[victim].restart().await;
    cluster.until_synced().await;
    let recovered_at = Instant::now();
    // And some after the replica took over.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    while let Some(worker) = load.join_next().await {
        answers.extend(worker.unwrap());
    }

    let statuses: std::collections::BTreeSet<u16> = answers.iter().map(|a| a.1).collect();
    assert!(
        statuses.iter().all(|status| [202, 503].contains(status)),
        "only 202 or 503: {statuses:?}"
    );
    let unavailable = answers
        .iter()
        .filter(|(at, status, _)| *status == 503 && *at >= killed_at && *at <= recovered_at)
        .count();
    assert!(unavailable > 0, "no 503 while the slot had no master");
    let acknowledged: Vec<&String> = answers.iter().filter_map(|a| a.2.as_ref()).collect();
    let after = answers
        .iter()
        .filter(|(at, status, _)| *status == 202 && *at > recovered_at)
        .count();
    assert!(after > 0, "no removal accepted after the failover");
    // Every acknowledged removal is there, on the promoted replica.
    for id in &acknowledged {
        let response = tokio::time::timeout(SOON, app.get(&format!("/v1/operations/{id}")))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "acknowledged removal {id} was lost");
    }
    eprintln!(
        "{} removals acknowledged, {unavailable} answered 503 during the failover ({:?})",
        acknowledged.len(),
        recovered_at - killed_at
    );
}

#[tokio::test]
async fn a_store_on_one_redis_moves_into_a_cluster_with_redis_cli_import() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let single_dir = tempfile::tempdir().unwrap();
    let single = RedisServer::start(single_dir.path()).await.unwrap();
    let prefix = format!("moved-{}", uuid::Uuid::new_v4());
    let on = |url: String| {
        let prefix = prefix.clone();
        move |config: &mut callops::config::Config| {
            config.store.location = url;
            config.store.redis_prefix = prefix;
        }
    };
    // Written on one Redis: a settled removal, one still waiting, a subscription.
    let before = TestApp::spawn_with(on(single.url())).await;
    let settled = before.remove("call-moved-1", Script::default(), None).await;
    let settled_id = settled["id"].as_str().unwrap().to_owned();
    before
        .operation_until(&settled_id, |op| op["status"] == "Succeeded")
        .await;
    let waiting = before
        .remove("call-moved-2", silent(), Some("ctx-moved"))
        .await;
    let waiting_id = waiting["id"].as_str().unwrap().to_owned();
    let subscription = before
        .post_json(
            "/v1/subscriptions",
            &json!({ "url": "https://hooks.example.com/callops", "eventTypes": ["operation.settled"] }),
        )
        .await;
    assert_eq!(subscription.status(), 201);
    before.shutdown.cancel();

    // Copied into the cluster, keys and all (one hash tag: they land in one slot).
    let import = {
        let seed = format!("127.0.0.1:{}", cluster.nodes[0].port());
        let from = format!("127.0.0.1:{}", single.port());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("redis-cli")
                .args(["--cluster", "import", &seed, "--cluster-from", &from])
                .args(["--cluster-copy", "--cluster-replace"])
                .output()
                .expect("redis-cli")
        })
        .await
        .unwrap()
    };
    assert!(
        import.status.success(),
        "redis-cli --cluster import: {}",
        String::from_utf8_lossy(&import.stdout)
    );

    let after = TestApp::spawn_with(on(cluster.url())).await;
    let read = after
        .get_json(&format!("/v1/operations/{settled_id}"))
        .await;
    assert_eq!(read["status"], "Succeeded", "{read}");
    // The waiting one settles on its callback, delivered to the moved deployment.
    let delivered = after
        .callback(&remove_event("ev-moved", "call-moved-2", "ctx-moved", true))
        .await;
    assert_eq!(delivered["matched"], 1, "{delivered}");
    let done = after
        .get_json(&format!("/v1/operations/{waiting_id}"))
        .await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    let subscriptions = after.get_json("/v1/subscriptions").await;
    assert_eq!(
        subscriptions["value"].as_array().map(Vec::len),
        Some(1),
        "{subscriptions}"
    );
}

#[tokio::test]
async fn partitions_spread_a_deployment_over_the_shards_and_its_stream_resumes_on_any_replica() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let prefix = format!("spread-{}", uuid::Uuid::new_v4());
    let url = cluster.url();
    let on = || {
        let (url, prefix) = (url.clone(), prefix.clone());
        move |config: &mut callops::config::Config| {
            config.store.location = url;
            config.store.redis_prefix = prefix;
            config.store.redis_partitions = 16;
        }
    };
    let a = TestApp::spawn_with(on()).await;
    let b = TestApp::spawn_with(on()).await;
    let mut stream = SseClient::open(&a.http, &a.url("/v1/operations:stream"), None).await;
    // Removals on 24 calls, half through each replica, each settled by its callback.
    let mut ids = Vec::new();
    for n in 0..24 {
        let app = if n % 2 == 0 { &a } else { &b };
        let started = app
            .remove(&format!("call-spread-{n}"), Script::default(), None)
            .await;
        ids.push(started["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        a.operation_until(id, |op| op["status"] == "Succeeded")
            .await;
    }
    // Every shard holds some of them.
    for (index, node) in cluster.nodes.iter().enumerate() {
        let role = node.command(&["ROLE"]).await.unwrap_or_default();
        if !role.contains("master") {
            continue;
        }
        let size = node.command(&["DBSIZE"]).await.unwrap();
        let keys: u64 = size.trim_start_matches(':').parse().unwrap();
        assert!(
            keys > 0,
            "master {index} holds none of the deployment's keys"
        );
    }
    // Replica A's stream shows every change, the other replica's included.
    let settled: std::collections::BTreeSet<String> = ids.iter().cloned().collect();
    let events = stream
        .until(|events| {
            let done: std::collections::BTreeSet<String> = events
                .iter()
                .filter(|event| event.event == "operation.settled")
                .filter_map(|event| event.json()["id"].as_str().map(str::to_owned))
                .collect();
            done.is_superset(&settled)
        })
        .await;
    let numbers: Vec<u64> = events
        .iter()
        .map(|event| event.id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|pair| pair[0] < pair[1]),
        "{numbers:?}"
    );
    // Resumed on replica B after A's fifth event: the same events, in the same order.
    let after = events[4].id.clone().unwrap();
    let mut resumed = SseClient::open(&b.http, &b.url("/v1/operations:stream"), Some(&after)).await;
    let wanted = events.len() - 5;
    let again = resumed.until(|seen| seen.len() >= wanted).await;
    let ids_of = |events: &[SseEvent]| -> Vec<String> {
        events
            .iter()
            .map(|event| event.id.clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(ids_of(&again[..wanted]), ids_of(&events[5..]));
}

#[tokio::test]
async fn a_store_refuses_replicas_that_split_it_another_way() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let prefix = format!("split-{}", uuid::Uuid::new_v4());
    let url = cluster.url();
    let with = |partitions: u16| {
        let (url, prefix) = (url.clone(), prefix.clone());
        move |config: &mut callops::config::Config| {
            config.store.location = url;
            config.store.redis_prefix = prefix;
            config.store.redis_partitions = partitions;
        }
    };
    let first = TestApp::spawn_with(with(8)).await;
    first.remove("call-split", silent(), None).await;
    let mut config = callops::config::Config::embedded();
    with(4)(&mut config);
    let refused = callops::store::Storage::open(&config, callops::metrics::Metrics::new())
        .await
        .err()
        .expect("a replica with another partition count is refused");
    let message = format!("{refused:#}");
    assert!(
        message.contains("made with 8 partition(s)") && message.contains("is 4"),
        "{message}"
    );
}
