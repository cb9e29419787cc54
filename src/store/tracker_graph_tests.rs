//! Store behaviour that Graph needs: operations found by their upstream id, cancelled
//! operations linked to the cancel, a call's end, and callback timeouts.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::*;
use crate::operation::{CALLBACK_TIMEOUT, ResultInfo};

/// A store that times operations out at their deadline (reconciliation is tested in
/// `tracker.rs`).
fn store() -> OperationStore {
    let mut config = crate::config::Config::embedded().operations;
    config.reconcile = false;
    OperationStore::new(&config)
}

fn call() -> CallRef {
    CallRef::Call("c".into())
}

fn cancel_op(context: &str, at: OffsetDateTime) -> Operation {
    Operation::new(
        OperationKind::CancelMediaProcessing,
        call(),
        context.into(),
        at,
    )
}

fn play() -> OperationKind {
    OperationKind::Observed("playPrompt".into())
}

/// A Graph operation notification.
fn notification(
    id: &str,
    kind: OperationKind,
    context: Option<&str>,
    upstream_id: Option<&str>,
    transition: Option<Transition>,
    received: OffsetDateTime,
) -> IncomingEvent {
    IncomingEvent {
        id: Some(id.into()),
        event_type: "playPromptOperation.deleted".into(),
        call: Some(call()),
        context: context.map(Into::into),
        kind,
        upstream_id: upstream_id.map(UpstreamId::new),
        cancelled: false,
        upstream_status: None,
        transition,
        received,
    }
}

fn cancelled_by_cancel(
    id: &str,
    context: &str,
    upstream_id: &str,
    received: OffsetDateTime,
) -> IncomingEvent {
    IncomingEvent {
        cancelled: true,
        ..notification(
            id,
            play(),
            Some(context),
            Some(upstream_id),
            Some(Transition::Failed {
                result: Some(ResultInfo {
                    code: Some(400),
                    sub_code: Some(8508),
                    completion_reason: Some("operationCanceled".into()),
                    ..ResultInfo::default()
                }),
                error: OperationError {
                    code: "OperationCanceled".into(),
                    message: "cancelled".into(),
                },
            }),
            received,
        )
    }
}

fn succeeded() -> Option<Transition> {
    Some(Transition::Succeeded { result: None })
}

#[test]
fn a_notification_naming_only_the_upstream_id_finds_the_operation() {
    let store = store();
    let now = OffsetDateTime::now_utc();
    let op = store.create(cancel_op("mine", now)).unwrap();
    store.record_upstream(op.id, &["u-1", "Location-Id"], Some("Running"));
    assert_eq!(
        store.get(op.id).unwrap().upstream_operation_id.as_deref(),
        Some("u-1")
    );
    // Graph's generic commsOperation, no clientContext.
    let generic = OperationKind::Observed(crate::correlation::GENERIC_KIND.into());
    let delivery = store.deliver(
        notification("e1", generic, None, Some("u-1"), succeeded(), now),
        Instant::now(),
    );
    assert_eq!(
        delivery,
        Delivery::Matched {
            id: op.id,
            effect: EventEffect::Applied
        }
    );
    assert_eq!(store.get(op.id).unwrap().status, OperationStatus::Succeeded);
    // The other name, in another case and without hyphens, finds it too.
    let delivery = store.deliver(
        notification("e2", play(), None, Some("LOCATIONID"), None, now),
        Instant::now(),
    );
    assert_eq!(
        delivery,
        Delivery::Matched {
            id: op.id,
            effect: EventEffect::Recorded
        }
    );
}

#[test]
fn an_unknown_upstream_id_without_context_is_observed_once() {
    let store = store();
    let now = OffsetDateTime::now_utc();
    let running = Some(Transition::Started);
    let Delivery::Observed { id } = store.deliver(
        notification("e1", play(), None, Some("u-2"), running, now),
        Instant::now(),
    ) else {
        panic!("not observed");
    };
    let observed = store.get(id).unwrap();
    assert_eq!(observed.context, "");
    assert_eq!(observed.upstream_operation_id.as_deref(), Some("u-2"));
    let delivery = store.deliver(
        notification("e2", play(), None, Some("u-2"), succeeded(), now),
        Instant::now(),
    );
    assert_eq!(
        delivery,
        Delivery::Matched {
            id,
            effect: EventEffect::Applied
        }
    );
    assert_eq!(store.stats().operations, 1);
}

#[test]
fn an_id_learned_from_a_context_match_finds_the_operation_later() {
    let store = store();
    let now = OffsetDateTime::now_utc();
    let Delivery::Observed { id } = store.deliver(
        notification(
            "e1",
            play(),
            Some("p"),
            Some("u-3"),
            Some(Transition::Started),
            now,
        ),
        Instant::now(),
    ) else {
        panic!("not observed");
    };
    let delivery = store.deliver(
        notification("e2", play(), None, Some("u-3"), succeeded(), now),
        Instant::now(),
    );
    assert_eq!(
        delivery,
        Delivery::Matched {
            id,
            effect: EventEffect::Applied
        }
    );
}

#[test]
fn cancelled_operations_are_linked_to_the_latest_cancel_sent_before_once() {
    let store = store();
    let t0 = OffsetDateTime::now_utc();
    let second = Duration::from_secs(1);
    // Cancelled before any cancel was sent: not linked.
    store.deliver(cancelled_by_cancel("e0", "p0", "u0", t0), Instant::now());
    let first = store.create(cancel_op("first", t0 + second)).unwrap();
    let latest = store.create(cancel_op("latest", t0 + 3 * second)).unwrap();
    // Between the two cancels: the first one's; after both: the latest one's.
    store.deliver(
        cancelled_by_cancel("e1", "p1", "u1", t0 + 2 * second),
        Instant::now(),
    );
    store.deliver(
        cancelled_by_cancel("e2", "p2", "u2", t0 + 4 * second),
        Instant::now(),
    );
    // The same operation reported again (another delivery): still listed once.
    store.deliver(
        cancelled_by_cancel("e3", "p2", "u2", t0 + 5 * second),
        Instant::now(),
    );

    let contexts = |id| {
        store
            .get(id)
            .unwrap()
            .cancelled_operations
            .iter()
            .map(|c| {
                (
                    c.context.clone(),
                    c.kind.as_str().to_owned(),
                    c.upstream_operation_id.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        contexts(first.id),
        [("p1".into(), "playPrompt".into(), Some("u1".into()))]
    );
    assert_eq!(
        contexts(latest.id),
        [("p2".into(), "playPrompt".into(), Some("u2".into()))]
    );
    // The cancelled operation itself settled as failed.
    let p2 = store
        .list(
            &ListFilter {
                context: Some("p2".into()),
                ..ListFilter::default()
            },
            10,
        )
        .0;
    assert_eq!(p2[0].status, OperationStatus::Failed);
    assert_eq!(p2[0].events.len(), 2);
}

#[test]
fn a_cancel_graph_refused_gets_no_links() {
    let store = store();
    let t0 = OffsetDateTime::now_utc();
    let second = Duration::from_secs(1);
    let accepted = store.create(cancel_op("accepted", t0)).unwrap();
    let refused = store.create(cancel_op("refused", t0 + second)).unwrap();
    let rejected = Transition::Failed {
        result: None,
        error: OperationError {
            code: "UpstreamRejected".into(),
            message: "Graph answered 403".into(),
        },
    };
    store.transition(refused.id, rejected, t0 + second);
    store.deliver(
        cancelled_by_cancel("e1", "p1", "u1", t0 + 2 * second),
        Instant::now(),
    );
    assert!(
        store
            .get(refused.id)
            .unwrap()
            .cancelled_operations
            .is_empty()
    );
    assert_eq!(
        store.get(accepted.id).unwrap().cancelled_operations.len(),
        1
    );
}

#[test]
fn the_end_of_a_call_fails_only_its_unsettled_operations() {
    let store = store();
    let now = OffsetDateTime::now_utc();
    let running = store.create(cancel_op("running", now)).unwrap();
    let settled = store.create(cancel_op("settled", now)).unwrap();
    store.transition(settled.id, Transition::Succeeded { result: None }, now);
    let elsewhere = store
        .create(Operation::new(
            OperationKind::CancelMediaProcessing,
            CallRef::Call("other".into()),
            "x".into(),
            now,
        ))
        .unwrap();
    let error = OperationError {
        code: "CallTerminated".into(),
        message: "ended".into(),
    };
    let ended = store.end_call(&call(), None, &error, now);
    assert_eq!(ended, [running.id]);
    assert_eq!(
        store.get(running.id).unwrap().error.as_deref(),
        Some(&error)
    );
    assert_eq!(
        store.get(settled.id).unwrap().status,
        OperationStatus::Succeeded
    );
    assert_eq!(
        store.get(elsewhere.id).unwrap().status,
        OperationStatus::NotStarted
    );
}

#[tokio::test]
async fn a_timeout_fails_and_wakes_and_a_late_outcome_still_wins() {
    let store = store();
    let now = OffsetDateTime::now_utc();
    let op = store.create(cancel_op("slow", now)).unwrap();
    store.transition(op.id, Transition::Accepted, now);
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_settled(op.id, Duration::from_secs(3600)).await })
    };
    // Not yet due.
    let report = store.sweep(Instant::now(), now + Duration::from_secs(239));
    assert!(report.timed_out.is_empty());
    let report = store.sweep(Instant::now(), now + Duration::from_secs(241));
    assert_eq!(report.timed_out, [op.id]);
    let woken = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter was woken")
        .unwrap()
        .unwrap();
    assert_eq!(woken.error.unwrap().code, CALLBACK_TIMEOUT);
    // Swept again: nothing more happens to it.
    let report = store.sweep(Instant::now(), now + Duration::from_secs(300));
    assert!(report.timed_out.is_empty());

    let delivery = store.deliver(
        notification(
            "late",
            OperationKind::CancelMediaProcessing,
            Some("slow"),
            None,
            succeeded(),
            now,
        ),
        Instant::now(),
    );
    assert_eq!(
        delivery,
        Delivery::Matched {
            id: op.id,
            effect: EventEffect::Applied
        }
    );
    let done = store.get(op.id).unwrap();
    assert_eq!(done.status, OperationStatus::Succeeded);
    assert!(done.late);
}

#[test]
fn retired_operations_leave_the_upstream_index() {
    let store = store();
    let long_ago = OffsetDateTime::now_utc() - Duration::from_secs(3 * 86_400);
    let op = store.create(cancel_op("old", long_ago)).unwrap();
    store.record_upstream(op.id, &["u-old"], None);
    store.transition(op.id, Transition::Succeeded { result: None }, long_ago);
    let report = store.sweep(Instant::now(), OffsetDateTime::now_utc());
    assert_eq!(report.removed_operations.len(), 1);
    let delivery = store.deliver(
        notification(
            "e",
            play(),
            None,
            Some("u-old"),
            succeeded(),
            OffsetDateTime::now_utc(),
        ),
        Instant::now(),
    );
    assert!(
        matches!(delivery, Delivery::Observed { id } if id != op.id),
        "{delivery:?}"
    );
}

/// Many calls, each with a cancel and two cancelled prompts whose notifications arrive three
/// times each (twice as the same delivery, once as a different one), from 8 threads in
/// interleaved orders: every prompt is observed once, settled once, and linked once to its
/// call's cancel.
#[test]
fn racing_duplicate_notifications_link_each_prompt_once() {
    let store = store();
    let sent = OffsetDateTime::now_utc();
    let calls = 200;
    let mut cancels = Vec::new();
    let mut events = Vec::new();
    for n in 0..calls {
        let call = CallRef::Call(format!("call-{n}"));
        let cancel = Operation::new(
            OperationKind::CancelMediaProcessing,
            call.clone(),
            "cancel".into(),
            sent,
        );
        cancels.push(store.create(cancel).unwrap().id);
        for prompt in 0..2 {
            for copy in 0..3 {
                // Two copies are the same delivery (same id); the third is a redelivery
                // that differs (another id): recorded, but linked only once.
                let id = if copy == 2 {
                    format!("e-{n}-{prompt}-again")
                } else {
                    format!("e-{n}-{prompt}")
                };
                let mut event = cancelled_by_cancel(
                    &id,
                    &format!("p{prompt}"),
                    &format!("u-{n}-{prompt}"),
                    sent + Duration::from_millis(1),
                );
                event.call = Some(call.clone());
                events.push((copy, event));
            }
        }
    }
    let events = std::sync::Arc::new(events);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            let events = events.clone();
            std::thread::spawn(move || {
                // Each thread walks the list from its own offset, some backwards.
                let len = events.len();
                for i in 0..len {
                    let index = if t % 2 == 0 {
                        (i + t * 97) % len
                    } else {
                        len - 1 - (i + t * 89) % len
                    };
                    store.deliver(events[index].1.clone(), Instant::now());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for (n, cancel) in cancels.iter().enumerate() {
        let cancel = store.get(*cancel).unwrap();
        let mut linked: Vec<_> = cancel
            .cancelled_operations
            .iter()
            .map(|c| c.context.clone())
            .collect();
        linked.sort_unstable();
        assert_eq!(linked, ["p0", "p1"], "call-{n}");
    }
    // 200 cancels + 400 prompts, each prompt with one event.
    assert_eq!(store.stats().operations, calls * 3);
    let (prompts, _) = store.list(
        &ListFilter {
            kind: Some(play()),
            ..ListFilter::default()
        },
        10_000,
    );
    assert_eq!(prompts.len(), calls * 2);
    assert!(
        prompts
            .iter()
            .all(|p| p.status == OperationStatus::Failed && p.events.len() == 2)
    );
}

/// Context-less notifications naming one new upstream id, from 8 threads at once: one
/// observed operation, every event on it.
#[test]
fn racing_context_less_notifications_observe_one_operation() {
    for round in 0..200 {
        let store = store();
        let now = OffsetDateTime::now_utc();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let event = notification(
                        &format!("e{t}"),
                        play(),
                        None,
                        Some("u-race"),
                        Some(Transition::Started),
                        now,
                    );
                    barrier.wait();
                    store.deliver(event, Instant::now())
                })
            })
            .collect();
        let deliveries: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let observed = deliveries
            .iter()
            .filter(|d| matches!(d, Delivery::Observed { .. }))
            .count();
        assert_eq!(observed, 1, "round {round}: {deliveries:?}");
        assert_eq!(store.stats().operations, 1, "round {round}");
        let (ops, _) = store.list(&ListFilter::default(), 10);
        assert_eq!(ops[0].events.len(), 8, "round {round}");
    }
}

/// The cancel's own notification, naming it by Graph's operation id alone, can come before
/// Graph's answer: it waits under that id, is applied when the answer names the operation,
/// survives a restart while it waits, and expires onto the call's timeline if no answer
/// ever names it.
#[test]
fn a_cancel_notification_named_by_upstream_id_waits_for_the_answer() {
    let now = OffsetDateTime::now_utc();
    let done = |id: &str, upstream_id: &str| IncomingEvent {
        event_type: "cancelMediaProcessingOperation.deleted".into(),
        ..notification(
            id,
            OperationKind::CancelMediaProcessing,
            None,
            Some(upstream_id),
            succeeded(),
            now,
        )
    };
    let first = store();
    let op = first.create(cancel_op("mine", now)).unwrap();
    let delivery = first.deliver(done("e-early", "AB-12"), Instant::now());
    assert_eq!(delivery, Delivery::Parked);
    assert_eq!(first.stats().parked, 1);
    assert_eq!(
        first.get(op.id).unwrap().status,
        OperationStatus::NotStarted
    );
    assert!(
        first
            .call_events(&call())
            .is_none_or(|events| events.is_empty())
    );

    let unparked = first.record_upstream(op.id, &["ab12"], Some("running"));
    assert_eq!(unparked, [Some("e-early".to_owned())]);
    assert_eq!(first.stats().parked, 0);
    first.transition(op.id, Transition::Accepted, now);
    let settled = first.get(op.id).unwrap();
    assert_eq!(settled.status, OperationStatus::Succeeded);
    assert_eq!(settled.events[0].effect, EventEffect::Applied);

    // Across a restart: parked, then applied when the restored operation's answer comes.
    let before = store();
    let waiting = before.create(cancel_op("later", now)).unwrap();
    let restored = Restored {
        operations: vec![waiting.clone()],
        parked: vec![(done("e-restored", "cd-34"), now)],
        ..Restored::default()
    };
    let after = store();
    let report = after.restore(restored, Instant::now(), now);
    assert!(report.unparked.is_empty());
    assert_eq!(after.stats().parked, 1);
    after.record_upstream(waiting.id, &["CD-34"], None);
    assert_eq!(
        after.get(waiting.id).unwrap().status,
        OperationStatus::Succeeded
    );

    // Never named by an answer: it expires onto its call's timeline, unmatched.
    let alone = store();
    alone.deliver(done("e-orphan", "ef-56"), Instant::now());
    let report = alone.sweep(
        Instant::now() + Duration::from_secs(3600),
        OffsetDateTime::now_utc(),
    );
    assert_eq!(report.expired.len(), 1);
    let timeline = alone.call_events(&call()).unwrap();
    assert_eq!(timeline[0].effect, EventEffect::Unmatched);
}
