//! Webhook delivery: a receiver in this process subscribed to `operation.settled`; removals
//! started (their calls silenced) and settled by callbacks this process sends. Throughput:
//! settled removals delivered per second with the callbacks sent as fast as the
//! connections go; latency: from a callback's 2xx to its delivery's arrival.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use hyper::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::events::OpSpec;
use crate::loadgen::{self, Conn};
use crate::report::{self, Row};
use crate::scenarios::{Bench, create_operations};

/// Sequential samples of the settle → delivery latency.
const LATENCY_SAMPLES: usize = 300;

pub async fn run(bench: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    eprintln!("== webhook delivery: callback 2xx -> signed POST at a receiver");
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(String, Instant)>();
    let receiver = Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let arrivals = arrivals.clone();
            async move {
                let at = Instant::now();
                let message: Value = serde_json::from_slice(&body).unwrap_or_default();
                if let Some(id) = message["data"]["id"].as_str() {
                    let _ = arrivals.send((id.to_owned(), at));
                }
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let child = bench
        .start_callops_with(
            "webhooks",
            "memory",
            false,
            "[webhooks]\nallow_private_targets = true\nper_endpoint_concurrency = 32\n",
        )
        .await?;
    let mut control = Conn::open(child.addr).await?;
    let subscribe = json!({"url": hook, "eventTypes": ["operation.settled"]}).to_string();
    let answer = control
        .send(
            Method::POST,
            "/v1/subscriptions",
            None,
            Bytes::from(subscribe),
        )
        .await?;
    if answer.status != StatusCode::CREATED {
        bail!("subscribing: {}", answer.status);
    }
    let options = &bench.options;
    let calls = options.calls;

    // Latency: one removal at a time, so nothing queues behind it.
    let prefix = "whlat";
    bench.silence_calls(prefix, calls);
    let ids = create_operations(child.addr, prefix, LATENCY_SAMPLES, calls, |_, _| true).await?;
    let mut post = Conn::open(child.addr).await?;
    let mut latencies = report::histogram();
    for index in 0..LATENCY_SAMPLES {
        let op = OpSpec::new(prefix, index, calls);
        let body = Bytes::from(op.succeeded_body(&Uuid::new_v4().to_string()));
        let answer = post
            .send(Method::POST, "/callbacks/acs", None, body)
            .await?;
        if !answer.status.is_success() {
            bail!("callback: {}", answer.status);
        }
        let id = ids.get(&index).context("a created operation")?;
        let at = wait_for(&mut arrived, id).await?;
        report::record(&mut latencies, at.saturating_duration_since(answer.head_at));
    }
    eprintln!(
        "  settle -> delivery p50 {} p99 {}",
        report::latency(latencies.value_at_quantile(0.5)),
        report::latency(latencies.value_at_quantile(0.99))
    );
    rows.push(
        Row {
            other: format!("{LATENCY_SAMPLES} samples, one at a time; receiver in the bench process, memory store"),
            ..Row::new("Webhook: callback 2xx → signed delivery at the receiver")
        }
        .latencies(&latencies),
    );

    // Throughput: every callback sent as fast as the connections go.
    let prefix = "whrate";
    let count = (options.pool / 10).clamp(2_000, 20_000);
    bench.silence_calls(prefix, calls);
    let ids = create_operations(child.addr, prefix, count, calls, |_, _| true).await?;
    let wanted: Arc<HashMap<String, ()>> =
        Arc::new(ids.values().map(|id| (id.clone(), ())).collect());
    let (parent_before, child_before) = (
        loadgen::cpu_seconds(None).unwrap_or(0.0),
        loadgen::cpu_seconds(Some(child.pid())).unwrap_or(0.0),
    );
    let started = Instant::now();
    let prefix_owned: Arc<str> = Arc::from(prefix);
    let sending = tokio::spawn(loadgen::for_each(
        child.addr,
        options.connections,
        count,
        move |index, mut conn| {
            let prefix = prefix_owned.clone();
            async move {
                let op = OpSpec::new(&prefix, index, calls);
                let body = Bytes::from(op.succeeded_body(&Uuid::new_v4().to_string()));
                let answer = conn
                    .send(Method::POST, "/callbacks/acs", None, body)
                    .await?;
                if !answer.status.is_success() {
                    bail!("callback: {}", answer.status);
                }
                Ok((conn, ()))
            }
        },
    ));
    let mut delivered = 0usize;
    let deadline = started + Duration::from_secs(120);
    while delivered < count {
        let next = tokio::time::timeout_at(deadline.into(), arrived.recv())
            .await
            .context("deliveries did not all arrive within 120 s")?
            .context("the receiver stopped")?;
        if wanted.contains_key(&next.0) {
            delivered += 1;
        }
    }
    let elapsed = started.elapsed();
    sending.await??;
    let server = loadgen::cpu_seconds(Some(child.pid())).unwrap_or(0.0) - child_before;
    let parent = loadgen::cpu_seconds(None).unwrap_or(0.0) - parent_before;
    let rate = count as f64 / elapsed.as_secs_f64();
    eprintln!("  {} deliveries/s", report::rate(rate));
    rows.push(Row {
        rate: Some((rate, "deliveries/s")),
        other: format!(
            "{count} removals settled by callbacks on {} connections, each delivered once, signed; CPU/delivery: server {:.0} µs, bench process {:.0} µs",
            options.connections,
            server * 1e6 / count as f64,
            parent * 1e6 / count as f64
        ),
        ..Row::new("Webhook delivery throughput: callback → settle → signed POST (memory)")
    });
    drop(child);
    Ok(())
}

/// Waits for the delivery of operation `id` (earlier arrivals are dropped).
async fn wait_for(
    arrived: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    id: &str,
) -> anyhow::Result<Instant> {
    loop {
        let (found, at) = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
            .await
            .with_context(|| format!("no delivery for {id} within 10 s"))?
            .context("the receiver stopped")?;
        if found == id {
            return Ok(at);
        }
    }
}
