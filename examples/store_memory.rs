//! Bytes per tracked operation in the in-memory store: creates N running operations the way
//! the service does (spread over calls), then settles each with its callback event, and
//! prints the resident-set growth per operation after each step.
//!
//! `cargo run --release --example store_memory -- [N]` (default 1,000,000).

use std::time::Instant as StdInstant;

use callops::config::Config;
use callops::operation::{CallRef, Operation, OperationKind, Transition};
use callops::store::OperationStore;
use time::OffsetDateTime;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(1_000_000);
    let calls = (n / 10).max(1);
    eprintln!(
        "sizes: Operation {} EventRecord {} CallRef {} OffsetDateTime {} IncomingEvent {}",
        std::mem::size_of::<Operation>(),
        std::mem::size_of::<callops::operation::EventRecord>(),
        std::mem::size_of::<CallRef>(),
        std::mem::size_of::<OffsetDateTime>(),
        std::mem::size_of::<callops::correlation::IncomingEvent>(),
    );
    let mut config = Config::embedded();
    config.operations.retention_secs = 86_400;
    let store = OperationStore::new(&config.operations);
    let call_ids: Vec<String> = (0..calls)
        .map(|i| format!("{i:08x}-b081-4107-9a5c-4300819d2c6c"))
        .collect();
    let before = rss_bytes();
    let started = StdInstant::now();
    let now = OffsetDateTime::now_utc();
    for i in 0..n {
        let call = CallRef::CallConnection(call_ids[i % calls].clone());
        let op = Operation::new(
            OperationKind::RemoveParticipant,
            call,
            format!("remove-{i:08}"),
            now,
        );
        let op = store.create(op).expect("fresh context");
        store.transition(op.id, Transition::Accepted, now);
    }
    // As the service's sweeper does every second (nothing is due yet).
    store.sweep(tokio::time::Instant::now(), OffsetDateTime::now_utc());
    let running = rss_bytes();
    println!(
        "{n} running operations: RSS {:.1} MB, {:.0} B/op ({:.1} s)",
        running as f64 / 1e6,
        (running - before) as f64 / n as f64,
        started.elapsed().as_secs_f64()
    );
    let tick = tokio::time::Instant::now();
    for i in 0..n {
        let body = format!(
            r#"[{{"id":"{:08x}-2d1a-4e1c-9a7e-0d0f5b1c2d3e","source":"calling/callConnections/{call}","type":"Microsoft.Communication.RemoveParticipantSucceeded","data":{{"operationContext":"remove-{i:08}","resultInformation":{{"code":200,"subCode":0,"message":"The participant was removed."}},"callConnectionId":"{call}","serverCallId":"x","correlationId":"y"}},"time":"2026-11-23T10:00:00Z","specversion":"1.0","datacontenttype":"application/json","subject":"calling/callConnections/{call}"}}]"#,
            i,
            call = call_ids[i % calls]
        );
        for event in callops::acs::events::decode(body.as_bytes()).unwrap() {
            store.deliver(event.into_incoming(now), tick);
        }
    }
    let settled = rss_bytes();
    println!(
        "{n} settled operations: RSS {:.1} MB, {:.0} B/op",
        settled as f64 / 1e6,
        (settled - before) as f64 / n as f64
    );
    assert_eq!(store.stats().operations, n);
}
