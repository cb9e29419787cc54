//! Per-callback latency (delivery and its commit) on a SQLite store, for a callback to an
//! operation that has already heard many events against one to a fresh operation: with
//! events stored one row each, the first should cost what the second does.
//!
//! ```sh
//! cargo run --release --example event_history -- [events] [normal]
//! ```
//! `events` (default 10 000) callbacks go to one operation's context, one at a time; then as
//! many callbacks (at most 1000) each go to a new operation. `normal` commits with
//! `synchronous=NORMAL` instead of `FULL`. The database is a fresh file in the system
//! temporary directory (set `TMPDIR` to measure another disk), removed afterwards.

use std::error::Error;
use std::time::{Duration, Instant};

use callops::config::Config;
use callops::correlation::IncomingEvent;
use callops::metrics::Metrics;
use callops::operation::{CallRef, Operation, OperationKind, Transition};
use callops::store::{Inbound, Storage};
use time::OffsetDateTime;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().map_or(Ok(10_000), |n| n.parse())?;
    let synchronous_full = args.next().as_deref() != Some("normal");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("callops.db");
    let mut config = Config::embedded();
    config.store.location = path.display().to_string();
    config.store.synchronous_full = synchronous_full;
    let storage = Storage::open(&config, Metrics::new()).await?;
    println!(
        "synchronous={}, events kept per operation: first {} + last {}",
        if synchronous_full { "FULL" } else { "NORMAL" },
        config.operations.events_first,
        config.operations.events_last
    );

    let call = CallRef::CallConnection("call-history".to_owned());
    storage.create(removal(&call, "one-context")).await?;
    let mut one = Vec::with_capacity(events);
    for n in 0..events {
        let event = callback(&call, "one-context", &format!("one-{n}"));
        one.push(deliver(&storage, event).await?);
    }
    let window = 100.min(events);
    report("one context, first callbacks", &one[..window]);
    report("one context, last callbacks", &one[events - window..]);

    let fresh_count = events.min(1000);
    let mut fresh = Vec::with_capacity(fresh_count);
    for n in 0..fresh_count {
        let context = format!("fresh-{n}");
        storage.create(removal(&call, &context)).await?;
        fresh.push(deliver(&storage, callback(&call, &context, &format!("fresh-{n}"))).await?);
    }
    report("fresh operation, one callback each", &fresh);
    storage.close().await;
    let size = std::fs::metadata(&path)?.len()
        + std::fs::metadata(path.with_extension("db-wal")).map_or(0, |m| m.len());
    println!("database and WAL: {} KiB", size / 1024);
    Ok(())
}

fn removal(call: &CallRef, context: &str) -> Operation {
    Operation::new(
        OperationKind::RemoveParticipant,
        call.clone(),
        context.to_owned(),
        OffsetDateTime::now_utc(),
    )
}

/// A distinct progress callback (the operation keeps running, so every one is recorded).
fn callback(call: &CallRef, context: &str, id: &str) -> IncomingEvent {
    IncomingEvent {
        id: Some(id.to_owned()),
        event_type: "Microsoft.Communication.ParticipantsUpdated".to_owned(),
        call: Some(call.clone()),
        context: Some(context.to_owned()),
        kind: OperationKind::RemoveParticipant,
        upstream_id: None,
        cancelled: false,
        upstream_status: None,
        transition: Some(Transition::Started),
        received: OffsetDateTime::now_utc(),
    }
}

async fn deliver(storage: &Storage, incoming: IncomingEvent) -> Result<Duration, Box<dyn Error>> {
    let started = Instant::now();
    storage
        .deliver(
            vec![Inbound {
                incoming,
                ended: None,
            }],
            &mut |_, _| {},
        )
        .await?;
    Ok(started.elapsed())
}

fn report(what: &str, latencies: &[Duration]) {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
    println!(
        "{what} ({}): mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms",
        sorted.len(),
        mean.as_secs_f64() * 1e3,
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
}
