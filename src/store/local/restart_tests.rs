//! Property test of the local store on SQLite across restarts: random steps (operations
//! created, callbacks delivered, upstream answers recorded) with random "restarts" between
//! them, each a SIGKILL as far as the store can tell: the store is dropped (after closing
//! its journal, or without: the writer is gone either way) and a new one is opened on the
//! same file, so what was committed is all it sees.
//!
//! # What is generated
//!
//! - Up to [`MAX_OPS`] removal operations on [`CALLS`] calls, each with its own context,
//!   created (as the service creates them: with the request still owed in `pending`) at
//!   any point, at most once each.
//! - Deliveries of 1 to 3 events each: the final event of an operation
//!   (`RemoveParticipantSucceeded` or `RemoveParticipantFailed`, a new id every time, so an
//!   operation may hear both, and more than its timeline keeps), before or after the
//!   operation exists (parked until it does); a removal event whose context no operation
//!   has (parked for good); a call-level event without a context; and another copy of any
//!   event delivered before (also one delivered before a restart).
//! - Upstream answers (`record_answer`): accepted (202) or refused for good (`Failed`), also
//!   twice, also after the operation settled.
//! - Restarts, with or without closing the journal first.
//!
//! The park TTL and the duplicate window are far longer than a case runs and no sweep
//! runs, so nothing expires: the model needs no clock. Each case picks whether event ids
//! are restored from the operations' snapshots (retention at least the duplicate window)
//! or from rows of their own; the timeline is bounded small (first 1, last 2), so events
//! are evicted from it and their ids must be remembered elsewhere.
//!
//! # Properties, checked after every step and every restart
//!
//! 1. Every operation that `create` acknowledged is there, with the status its events and
//!    answers dictate (the first that can move it wins; a settled operation never moves),
//!    its timeline (the events it heard, each once, with the effect each had, bounded as
//!    configured) and nothing regresses (its status never goes back).
//! 2. Every delivery answers as the model says: `Duplicate` for an id acknowledged before,
//!    also across restarts (after each restart every acknowledged event is delivered again,
//!    and each must be a duplicate); `Parked` before its operation exists; `Matched`
//!    `applied` or `ignored` after.
//! 3. `pending` is set exactly on the operations whose answer was never recorded and that
//!    no event moved, and holds the request as created (same repeatability pair).
//! 4. After a restart, `claim_unsent` hands out exactly those operations, once.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::json;
use time::OffsetDateTime;

use super::LocalStore;
use crate::acs::client::Repeatability;
use crate::acs::events::AcsEvent;
use crate::config::Config;
use crate::correlation::{Delivery, IncomingEvent};
use crate::metrics::Metrics;
use crate::operation::{
    CallRef, EventEffect, Operation, OperationError, OperationId, OperationKind, OperationStatus,
    PendingRequest, ResultInfo, Transition, next_status,
};
use crate::store::seam::{Delivered, Inbound};

const MAX_OPS: usize = 5;
const CALLS: usize = 2;
const EVENTS_FIRST: usize = 1;
const EVENTS_LAST: usize = 2;

/// One event of a delivery.
#[derive(Debug, Clone)]
enum Ev {
    /// A final event of operation `op`.
    Final { op: usize, succeeded: bool },
    /// A removal event whose context no operation has: parked, never applied.
    Ghost { call: usize },
    /// An event without a context: kept on its call's timeline.
    CallLevel { call: usize },
    /// Another copy of an event delivered before (none yet: skipped).
    Copy(Index),
}

#[derive(Debug, Clone)]
enum Step {
    Create(usize),
    /// The upstream's answer: accepted, or refused for good.
    Answer {
        op: usize,
        accepted: bool,
    },
    Deliver(Vec<Ev>),
    /// Drop the store (closing its journal first, or not) and open the file again.
    Restart {
        close: bool,
    },
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        5 => (0..MAX_OPS, any::<bool>()).prop_map(|(op, succeeded)| Ev::Final { op, succeeded }),
        1 => (0..CALLS).prop_map(|call| Ev::Ghost { call }),
        1 => (0..CALLS).prop_map(|call| Ev::CallLevel { call }),
        3 => any::<Index>().prop_map(Ev::Copy),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..MAX_OPS).prop_map(Step::Create),
        2 => (0..MAX_OPS, proptest::bool::weighted(0.8))
            .prop_map(|(op, accepted)| Step::Answer { op, accepted }),
        4 => vec(event(), 1..=3).prop_map(Step::Deliver),
        2 => any::<bool>().prop_map(|close| Step::Restart { close }),
    ]
}

fn config(ids_on_operations: bool) -> Config {
    let mut config = Config::embedded();
    let operations = &mut config.operations;
    // Nothing expires while a case runs (no sweep runs either).
    operations.park_ttl_ms = 600_000;
    operations.dedupe_ttl_secs = 3_600;
    // At least the duplicate window: ids are restored from the operations' snapshots;
    // shorter: from rows of their own.
    operations.retention_secs = if ids_on_operations { 86_400 } else { 60 };
    operations.events_first = EVENTS_FIRST;
    operations.events_last = EVENTS_LAST;
    // A process crash, not a power loss: NORMAL keeps every commit.
    config.store.synchronous_full = false;
    config
}

fn call_name(call: usize) -> String {
    format!("restart-call-{call}")
}

fn call_of(op: usize) -> usize {
    op % CALLS
}

fn context_of(op: usize) -> String {
    format!("ctx-{op}")
}

/// What the model knows of one operation.
#[derive(Debug)]
struct ModelOp {
    id: OperationId,
    status: OperationStatus,
    /// No answer recorded, and no event moved it.
    pending: bool,
    request: PendingRequest,
    /// Every event it heard, with its effect, in arrival order.
    events: Vec<(String, EventEffect)>,
}

impl ModelOp {
    /// Applies `transition` as the state machine does: whether it moved the operation.
    fn apply(&mut self, transition: &Transition) -> bool {
        match next_status(self.status, transition) {
            Ok(next) => {
                self.status = next;
                true
            }
            Err(_) => false,
        }
    }

    /// Hears `event`, as a callback for it does.
    fn hear(&mut self, event: &IncomingEvent) -> EventEffect {
        let transition = event.transition.as_ref().expect("a final event");
        let effect = if self.apply(transition) {
            self.pending = false;
            EventEffect::Applied
        } else {
            EventEffect::Ignored
        };
        self.events.push((event.id.clone().expect("an id"), effect));
        effect
    }

    /// The timeline as the bounded store keeps it, and how many were dropped.
    fn kept_events(&self) -> (Vec<(String, EventEffect)>, u64) {
        let kept = EVENTS_FIRST + EVENTS_LAST;
        if self.events.len() <= kept {
            return (self.events.clone(), 0);
        }
        let mut events = self.events[..EVENTS_FIRST].to_vec();
        events.extend_from_slice(&self.events[self.events.len() - EVENTS_LAST..]);
        (events, (self.events.len() - kept) as u64)
    }
}

#[derive(Default)]
struct Model {
    ops: Vec<Option<ModelOp>>,
    /// Events waiting for operation `i`, in arrival order.
    parked: Vec<Vec<IncomingEvent>>,
    /// The first copy of every event acknowledged, in arrival order.
    delivered: Vec<IncomingEvent>,
    seen: HashSet<String>,
    /// Events made so far (for ids and received times).
    made: i64,
    /// The status each operation was last read with (nothing regresses).
    last_read: Vec<Option<OperationStatus>>,
}

fn rank(status: OperationStatus) -> u8 {
    match status {
        OperationStatus::NotStarted => 0,
        OperationStatus::Running => 1,
        _ => 2,
    }
}

/// Opens the store at `path`, failing the case with the reason when it cannot.
async fn open(path: &Path, config: &Config) -> LocalStore {
    LocalStore::open_sqlite(path.to_owned(), config, Metrics::new())
        .await
        .unwrap_or_else(|error| {
            panic!(
                "the store did not open again at {}: {error:#}",
                path.display()
            )
        })
}

struct Run {
    model: Model,
    config: Config,
    base: OffsetDateTime,
}

impl Run {
    /// A new event, received after every earlier one.
    fn make(&mut self, ev: &Ev) -> Option<(IncomingEvent, Option<usize>)> {
        let n = self.model.made;
        let (call, context, name, code, op) = match *ev {
            Ev::Final { op, succeeded } => {
                let name = if succeeded {
                    "RemoveParticipantSucceeded"
                } else {
                    "RemoveParticipantFailed"
                };
                let code = if succeeded { 200 } else { 400 };
                (call_of(op), Some(context_of(op)), name, code, Some(op))
            }
            Ev::Ghost { call } => (
                call,
                Some(format!("ghost-{n}")),
                "RemoveParticipantSucceeded",
                200,
                None,
            ),
            Ev::CallLevel { call } => (call, None, "ParticipantsUpdated", 200, None),
            Ev::Copy(index) => {
                if self.model.delivered.is_empty() {
                    return None;
                }
                let copy = index.get(&self.model.delivered).clone();
                return Some((copy, None));
            }
        };
        self.model.made += 1;
        let event = AcsEvent {
            id: Some(format!("evt-{n}")),
            event_type: format!("Microsoft.Communication.{name}"),
            call_connection_id: Some(call_name(call)),
            operation_context: context,
            result: Some(ResultInfo {
                code: Some(code),
                sub_code: Some(n),
                message: Some(format!("event {n}")),
                ..ResultInfo::default()
            }),
            participant: None,
        }
        .into_incoming(self.base + time::Duration::milliseconds(n));
        Some((event, op))
    }

    /// What the store must answer to `event` (about operation `op`, when it is one's), and
    /// the model after it.
    fn expect(&mut self, event: &IncomingEvent, op: Option<usize>) -> Delivery {
        let id = event.id.clone().expect("every generated event has an id");
        if !self.model.seen.insert(id) {
            return Delivery::Duplicate;
        }
        self.model.delivered.push(event.clone());
        match op {
            Some(op) => match self.model.ops[op].as_mut() {
                Some(model) => Delivery::Matched {
                    id: model.id,
                    effect: model.hear(event),
                },
                None => {
                    self.model.parked[op].push(event.clone());
                    Delivery::Parked
                }
            },
            None if event.context.is_some() => Delivery::Parked,
            None => Delivery::CallEvent,
        }
    }

    async fn create(&mut self, store: &LocalStore, op: usize) {
        if self.model.ops[op].is_some() {
            return;
        }
        let repeatability = Repeatability::new();
        let request = PendingRequest::RemoveParticipant {
            participant: json!({"rawId": format!("8:acs:p{op}")}),
            repeatability_request_id: repeatability.request_id,
            repeatability_first_sent: repeatability.first_sent,
        };
        let mut operation = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection(call_name(call_of(op))),
            context_of(op),
            OffsetDateTime::now_utc(),
        );
        operation.pending = Some(Box::new(request.clone()));
        let mut model = ModelOp {
            id: operation.id,
            status: OperationStatus::NotStarted,
            pending: true,
            request,
            events: Vec::new(),
        };
        // Parked events are applied at creation, in arrival order.
        for event in std::mem::take(&mut self.model.parked[op]) {
            model.hear(&event);
        }
        let created = store
            .create(operation)
            .await
            .unwrap_or_else(|error| panic!("operation #{op} was not created: {error}"));
        check_op(op, &model, &created, "as created");
        self.model.ops[op] = Some(model);
    }

    async fn answer(&mut self, store: &LocalStore, op: usize, accepted: bool) {
        let Some(model) = self.model.ops[op].as_mut() else {
            return;
        };
        let transition = if accepted {
            Transition::Accepted
        } else {
            Transition::Failed {
                result: None,
                error: OperationError {
                    code: "UpstreamRejected".to_owned(),
                    message: "ACS answered 403".to_owned(),
                },
            }
        };
        store
            .record_answer(
                model.id,
                None,
                transition.clone(),
                OffsetDateTime::now_utc(),
            )
            .await
            .unwrap_or_else(|error| {
                panic!("the answer to operation #{op} was not stored: {error}")
            });
        model.pending = false;
        model.apply(&transition);
    }

    async fn deliver(&mut self, store: &LocalStore, events: &[Ev]) {
        let mut inbound = Vec::new();
        let mut expected = Vec::new();
        for ev in events {
            if let Some((event, op)) = self.make(ev) {
                expected.push(self.expect(&event, op));
                inbound.push(Inbound {
                    incoming: event,
                    ended: None,
                });
            }
        }
        if inbound.is_empty() {
            return;
        }
        let names: Vec<String> = inbound
            .iter()
            .map(|event| format!("{:?}", event.incoming.id))
            .collect();
        let got = deliver(store, inbound).await;
        assert_eq!(got, expected, "deliveries of {names:?}");
    }

    /// After a restart: every acknowledged event is a duplicate.
    async fn redeliver_all(&self, store: &LocalStore) {
        if self.model.delivered.is_empty() {
            return;
        }
        let inbound = self
            .model
            .delivered
            .iter()
            .map(|event| Inbound {
                incoming: event.clone(),
                ended: None,
            })
            .collect();
        let got = deliver(store, inbound).await;
        for (event, delivery) in self.model.delivered.iter().zip(got) {
            assert_eq!(
                delivery,
                Delivery::Duplicate,
                "event {:?}, acknowledged before the restart, was not a duplicate after it",
                event.id
            );
        }
    }

    /// Every operation created is there as the model says, and none went back.
    async fn check(&mut self, store: &LocalStore, after: &str) {
        for (op, model) in self.model.ops.iter().enumerate() {
            let Some(model) = model else { continue };
            let stored = store.get(model.id).await.expect("read").unwrap_or_else(|| {
                panic!(
                    "operation #{op} ({}), acknowledged, is gone {after}",
                    model.id
                )
            });
            check_op(op, model, &stored, after);
            if let Some(before) = self.model.last_read[op] {
                assert!(
                    rank(stored.status) >= rank(before),
                    "operation #{op} went back from {before:?} to {:?} {after}",
                    stored.status
                );
            }
            self.model.last_read[op] = Some(stored.status);
        }
    }
}

/// `stored` is operation #`op` as `model` says.
fn check_op(op: usize, model: &ModelOp, stored: &Operation, after: &str) {
    assert_eq!(
        stored.status, model.status,
        "operation #{op} did not have the status its events and answers dictate {after}: {stored:?}"
    );
    assert_eq!(
        stored.pending.as_deref(),
        model.pending.then_some(&model.request),
        "operation #{op}'s pending request was not {} {after}",
        if model.pending {
            "kept as created"
        } else {
            "cleared (answered, or moved by an event)"
        }
    );
    let (kept, omitted) = model.kept_events();
    let timeline: Vec<(String, EventEffect)> = stored
        .events
        .iter()
        .map(|record| (record.id.clone().unwrap_or_default(), record.effect))
        .collect();
    assert_eq!(
        timeline, kept,
        "operation #{op}'s timeline did not keep the events it heard {after}"
    );
    assert_eq!(
        stored.events_omitted, omitted,
        "operation #{op} did not count the events dropped from its timeline {after}"
    );
}

async fn deliver(store: &LocalStore, inbound: Vec<Inbound>) -> Vec<Delivery> {
    let mut got: Vec<Option<Delivery>> = vec![None; inbound.len()];
    store
        .deliver(inbound, &mut |index, delivered: &Delivered| {
            got[index] = Some(delivered.delivery);
        })
        .await
        .unwrap_or_else(|error| panic!("a delivery was not stored: {error}"));
    got.into_iter()
        .enumerate()
        .map(|(index, delivery)| {
            delivery.unwrap_or_else(|| panic!("event {index} of a delivery had no fate"))
        })
        .collect()
}

async fn run_case(steps: Vec<Step>, ids_on_operations: bool) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("callops.db");
    let mut run = Run {
        model: Model {
            ops: (0..MAX_OPS).map(|_| None).collect(),
            parked: vec![Vec::new(); MAX_OPS],
            last_read: vec![None; MAX_OPS],
            ..Model::default()
        },
        config: config(ids_on_operations),
        base: OffsetDateTime::now_utc(),
    };
    let mut store = open(&path, &run.config).await;
    assert!(
        store.claim_unsent().is_empty(),
        "a new store handed out operations to send"
    );
    for (n, step) in steps.iter().enumerate() {
        let after = format!("after step {n} ({step:?})");
        match step {
            Step::Create(op) => run.create(&store, *op).await,
            Step::Answer { op, accepted } => run.answer(&store, *op, *accepted).await,
            Step::Deliver(events) => run.deliver(&store, events).await,
            Step::Restart { close } => {
                if *close {
                    store.close().await;
                }
                drop(store);
                store = open(&path, &run.config).await;
                let owed: BTreeSet<OperationId> = run
                    .model
                    .ops
                    .iter()
                    .flatten()
                    .filter(|model| model.pending)
                    .map(|model| model.id)
                    .collect();
                let claimed = store.claim_unsent();
                let handed: BTreeSet<OperationId> = claimed.iter().map(|op| op.id).collect();
                assert_eq!(
                    handed, owed,
                    "the operations handed out to send again {after} were not those whose answer was never recorded"
                );
                assert_eq!(
                    handed.len(),
                    claimed.len(),
                    "an operation was handed out twice {after}"
                );
                for operation in &claimed {
                    let model = run
                        .model
                        .ops
                        .iter()
                        .flatten()
                        .find(|model| model.id == operation.id)
                        .expect("only known operations are owed");
                    assert_eq!(
                        operation.pending.as_deref(),
                        Some(&model.request),
                        "operation {} was not handed out with its request as created {after}",
                        operation.id
                    );
                }
                assert!(
                    store.claim_unsent().is_empty(),
                    "operations were handed out a second time {after}"
                );
                run.check(&store, &after).await;
                run.redeliver_all(&store).await;
            }
        }
        run.check(&store, &after).await;
    }
    store.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn what_was_acknowledged_survives_restarts_and_only_unanswered_requests_are_owed(
        steps in vec(step(), 1..=40),
        ids_on_operations in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(run_case(steps, ids_on_operations));
    }
}
