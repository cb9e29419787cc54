//! Two in-process replicas on one Redis (one key prefix), driven with seeded random
//! interleavings of creations and callbacks: duplicates delivered to both replicas, callbacks
//! that overtake their operation's creation (parked on one replica, claimed by a creation on
//! the other), and the upstream's own answer racing them. Every operation must end as its
//! final callback says, list that callback once, and be listed once.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

use crate::redis::RedisServer;
use crate::support::{TestApp, remove_event, silent, within};

const OPERATIONS: usize = 24;

async fn replicas(url: &str) -> [Arc<TestApp>; 2] {
    let prefix = format!("races-{}", uuid::Uuid::new_v4());
    let spawn = || {
        TestApp::spawn_with(|config| {
            config.store.location = url.to_owned();
            config.store.redis_prefix = prefix.clone();
        })
    };
    [Arc::new(spawn().await), Arc::new(spawn().await)]
}

#[tokio::test]
async fn random_interleavings_over_two_replicas_settle_every_operation_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = RedisServer::start(dir.path()).await else {
        return;
    };
    // `CALLOPS_RACE_SEEDS=FIRST..LAST` runs more interleavings than the default three.
    let seeds = std::env::var("CALLOPS_RACE_SEEDS")
        .ok()
        .and_then(|range| {
            let (first, last) = range.split_once("..")?;
            Some(first.parse::<u64>().ok()?..last.parse::<u64>().ok()?)
        })
        .unwrap_or(1..4);
    for seed in seeds {
        let apps = replicas(&redis.url()).await;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tasks = Vec::new();
        let mut expected = Vec::new();
        for i in 0..OPERATIONS {
            let call = format!("call-race-{seed}-{}", i % 4);
            let context = format!("ctx-race-{seed}-{i}");
            let succeeded = rng.random_bool(0.5);
            let event = remove_event(&format!("ev-race-{seed}-{i}"), &call, &context, succeeded);
            expected.push((call.clone(), context.clone(), succeeded));
            // The creation, on either replica, after 0–6 ms.
            let creator = Arc::clone(&apps[rng.random_range(0..2)]);
            let delay = Duration::from_micros(rng.random_range(0..6000));
            let (create_call, create_context) = (call.clone(), context.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let created = creator
                    .remove(&create_call, silent(), Some(&create_context))
                    .await;
                assert_eq!(created["context"], create_context.as_str(), "{created}");
            }));
            // The callback, 1–3 times, to either replica, each after 0–8 ms: before or after
            // the creation (then parked), sometimes at the same moment on both.
            for _ in 0..rng.random_range(1..=3) {
                let app = Arc::clone(&apps[rng.random_range(0..2)]);
                let delay = Duration::from_micros(rng.random_range(0..8000));
                let event = event.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let summary = app.callback(&event).await;
                    let counted: u64 = ["matched", "duplicates", "parked"]
                        .iter()
                        .map(|field| summary[*field].as_u64().unwrap())
                        .sum();
                    assert_eq!(counted, 1, "{summary}");
                }));
            }
        }
        within(async {
            for task in tasks {
                task.await.unwrap();
            }
        })
        .await;
        for (call, context, succeeded) in &expected {
            let wanted = if *succeeded { "Succeeded" } else { "Failed" };
            // Listed once, whichever replica is asked; settled as its callback said, with
            // the callback recorded once.
            for app in &apps {
                let listed = app
                    .list(&format!("callConnectionId={call}&context={context}"))
                    .await;
                assert_eq!(listed.len(), 1, "seed {seed} {context}: {listed:?}");
                let operation = app
                    .operation_until(listed[0]["id"].as_str().unwrap(), |op| {
                        op["status"] != "Running" && op["status"] != "NotStarted"
                    })
                    .await;
                assert_eq!(operation["status"], wanted, "seed {seed}: {operation}");
                let applied: Vec<&Value> = operation["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|event| event["id"].as_str().unwrap().starts_with("ev-race"))
                    .collect();
                assert_eq!(applied.len(), 1, "seed {seed}: {operation}");
                assert_eq!(
                    applied[0]["effect"],
                    json!("applied"),
                    "seed {seed}: {operation}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_graph_cancel_on_a_is_settled_by_notifications_delivered_twice_to_b() {
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = RedisServer::start(dir.path()).await else {
        return;
    };
    let [a, b] = replicas(&redis.url()).await;
    // A's Graph (its emulator) notifies B; both trust the same development signing keys.
    a.emulator.graph().set_callback_url(
        format!("http://{}/callbacks/graph", b.address)
            .parse()
            .unwrap(),
    );
    let call = "4f1e0a00-6a1b-4c2d-8e3f-0123456789ab";
    a.queue_media(call, "playPrompt", "welcome").await;
    a.queue_media(call, "recordResponse", "voicemail").await;
    // Graph answers "running": the cancel settles on its own notification, on B.
    let script = callops::emulator::graph::GraphScript {
        cancel_status: callops::emulator::graph::CancelStatus::Running,
        duplicates: 1,
        ..Default::default()
    };
    let accepted = a.cancel(call, script, Some("stop")).await;
    let id = accepted["id"].as_str().unwrap();
    let cancel = a
        .operation_until(id, |op| {
            op["status"] == "Succeeded"
                && op["cancelledOperations"]
                    .as_array()
                    .is_some_and(|c| c.len() == 2)
        })
        .await;
    // Each notification was applied once (its redelivery is a duplicate).
    let applied = cancel["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["effect"] == "applied")
        .count();
    assert_eq!(applied, 1, "{cancel}");
    for (replica, context) in [(&a, "welcome"), (&b, "voicemail")] {
        let prompts = replica.list(&format!("context={context}")).await;
        assert_eq!(prompts.len(), 1, "{prompts:?}");
        assert_eq!(prompts[0]["status"], "Failed", "{prompts:?}");
        assert_eq!(prompts[0]["error"]["code"], "OperationCanceled");
        assert_eq!(prompts[0]["events"].as_array().unwrap().len(), 1);
    }
    assert_eq!(b.list(&format!("callId={call}")).await.len(), 3);
    // Every notification reached B (twice), none A: A read what B wrote.
    let (on_a, on_b) = (graph_events(&a).await, graph_events(&b).await);
    assert_eq!(on_a, (0, 0), "graph events on A");
    assert!(
        on_b.0 >= 3 && on_b.1 == on_b.0,
        "graph events on B (applied, duplicates): {on_b:?}"
    );
}

/// Graph notification events a replica took, from its `/metrics`: (first deliveries,
/// duplicates).
async fn graph_events(app: &TestApp) -> (u64, u64) {
    let text = app.get("/metrics").await.text().await.unwrap();
    let (mut first, mut duplicates) = (0, 0);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("callops_callbacks_total{source=\"graph\",outcome=\"")
        else {
            continue;
        };
        let (outcome, value) = rest.split_once("\"} ").unwrap();
        let value: u64 = value.trim().parse().unwrap();
        match outcome {
            "duplicate" => duplicates += value,
            "refused" => {}
            _ => first += value,
        }
    }
    (first, duplicates)
}

#[tokio::test]
async fn an_operation_whose_replica_stopped_is_timed_out_by_another_and_a_late_callback_still_wins()
{
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = RedisServer::start(dir.path()).await else {
        return;
    };
    let url = redis.url();
    let prefix = format!("timeout-{}", uuid::Uuid::new_v4());
    let spawn = || {
        TestApp::spawn_with(|config| {
            config.store.location = url.clone();
            config.store.redis_prefix = prefix.clone();
            config.operations.callback_timeouts.remove_participant_secs = 1;
            config.operations.sweep_interval_ms = 50;
        })
    };
    let (a, b) = (spawn().await, spawn().await);
    let started = a
        .remove("call-orphaned", silent(), Some("ctx-orphaned"))
        .await;
    let id = started["id"].as_str().unwrap().to_owned();
    // A stops (its sweeper with it) before the deadline.
    a.shutdown.cancel();
    let timed_out = b.operation_until(&id, |op| op["status"] == "Failed").await;
    assert_eq!(timed_out["error"]["code"], "CallbackTimeout", "{timed_out}");
    let late = remove_event("ev-late", "call-orphaned", "ctx-orphaned", true);
    assert_eq!(b.callback(&late).await["matched"], 1);
    let settled = b.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(settled["status"], "Succeeded", "{settled}");
    assert_eq!(settled["late"], true, "{settled}");
}
