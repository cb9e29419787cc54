//! Property tests of the store: random interleavings of duplicate, early, late and
//! out-of-order callbacks for many operations.
//!
//! Each case generates a world (operations on a few calls, the callbacks their upstream
//! sends, noise that names no operation), scatters every delivery over a timeline, and
//! replays it against one store the way [`crate::service`] drives it: `create` when the
//! operation starts, the upstream's answer a little later (ACS: `transition(Accepted)`;
//! Graph: `record_upstream` with the ids of Graph's answer, then `transition(Accepted)`, in
//! the same millisecond but possibly with a notification between them), `deliver` for
//! every copy of every callback, and `sweep` every sweep interval. The store takes its `Instant`s and
//! wall-clock times as arguments; here they are `base + t` for a timeline position `t` in
//! milliseconds, so nothing reads a clock or sleeps.
//!
//! # What is generated
//!
//! - 1 to 40 operations on 1 to 4 calls, each with its own context; contexts repeat
//!   across calls (`ctx0` on two calls is two operations).
//! - For each operation, up to 3 progress events (`Started`, or an event of its kind that
//!   reports no transition) and exactly one final event (`Succeeded` or `Failed`). Each
//!   event has its own id (Graph: its own bytes) and is delivered 1 to 3 times, sometimes
//!   up to 10 times.
//! - Each copy lands in one of four windows, relative to its operation: before the
//!   operation exists (by less than the park TTL: early, parked), between its creation
//!   and the upstream's 202, after the 202, or after its callback timeout has passed (so
//!   after the sweep that fails it with `CallbackTimeout`, or just before that sweep). A
//!   quarter of the operations get every copy of their final event in the last window.
//!   Events and copies are therefore out of order: the final event may come first and a
//!   progress event after it; a duplicate may come before or after its operation exists.
//! - Noise: an event of our kind for a context no operation uses, one on a call that has
//!   no operation (with a context that operations on other calls use), a call-level event
//!   without a context, and an event of another kind (which becomes an observed operation).
//! - The sweep runs every 1 to 8 s of the timeline, and once more at its end, a park
//!   TTL after the last delivery.
//!
//! Graph notifications name the cancel by clientContext, by Graph's operation id (in the
//! `id` field or only in `resourceUrl`, in either GUID spelling), or both, and are typed
//! `cancelMediaProcessingOperation` or the generic `commsOperation`. Two orders are not
//! generated, because the store cannot tell which operation such a notification names:
//!
//! - A generic `commsOperation` before the operation exists: an unknown context of a kind
//!   we do not issue is observed as an operation of its own, by design (`correlation`).
//!   The service cannot see it: the record is created before the request is sent.
//! - A notification naming the cancel only by Graph's id (no clientContext) before the
//!   answer told us that id. This one can happen (the notification overtakes the answer),
//!   and the store does not handle it: typed, it goes to the call's timeline (`recorded`);
//!   generic, it becomes an observed operation of its own; neither is applied to the
//!   cancel when its id becomes known, which then fails with `CallbackTimeout` although
//!   Graph reported it done. A known gap, not a property of the store: callops always
//!   sends a clientContext and Graph echoes it, so only context-less notifications (the
//!   earliest beta's shape) that overtake the answer are affected.
//!
//! The store's limits are set so that the generated world stays inside them ([`config`],
//! and the `const` assertions below): the park TTL exceeds every early delivery's lead,
//! the park holds more than all events together, the duplicate filter outlives the
//! timeline, call timelines hold more than all the noise. Past those limits the store
//! gives up on purpose (expired or overflowing callbacks go to the call's timeline,
//! counted).
//!
//! # Properties
//!
//! 1. **Outcome.** Every operation ends with the status, `result` and `error` that the
//!    transition of its (unique) final event dictates, whatever came before or after it.
//! 2. **Late.** `late` is true exactly when the first copy of the final event was delivered
//!    after the sweep that timed the operation out (the first sweep at or past
//!    `created + timeout`); the operation appears in a sweep's `timed_out` exactly then,
//!    and once.
//! 3. **Once each, nothing lost.** An operation's timeline holds each of its distinct event
//!    ids exactly once, in the order of their first delivery (parked ones included), and
//!    nothing else; the final event's entry is `applied`. No operation's event ends up on a
//!    call timeline; after the last sweep nothing is parked, and the park never overflowed.
//! 4. **Forward only.** An operation's status only moves forward (`NotStarted` →
//!    `Running` → settled); a settled status never changes, except that a
//!    `CallbackTimeout` failure is replaced, once, by the final outcome, which sets `late`
//!    (and `late` is never cleared). Checked after every step for the operation the step
//!    is about, and for every operation after each sweep and each noise delivery (steps
//!    that concern no operation, or many).
//! 5. **Every step as specified.** Each step answers as a reference model of the documented
//!    behaviour says: a delivery is `Duplicate` for an id seen before, `Parked` before its
//!    operation exists, otherwise `Matched` with effect `applied` (the operation moved),
//!    `ignored` (it had settled) or `recorded` (no transition); `create` applies the parked
//!    events in arrival order; the 202 moves only an unsettled operation; a sweep times out
//!    exactly the unsettled operations past their timeout and expires exactly the parked
//!    events older than the TTL (only noise).
//! 6. **Noise accounted.** Each noise event is kept exactly once where it belongs: on its
//!    call's timeline (`unmatched` once expired from the park, `recorded` for call-level
//!    events), or as the single event of its own observed operation.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::time::Instant;

use super::*;
use crate::acs::events::AcsEvent;
use crate::graph::ids::canonical;
use crate::graph::notifications;

const PARK_TTL_MS: u64 = 5_000;
const PARK_MAX: usize = 1_000;
const DEDUPE_TTL_SECS: u64 = 3_600;
const CALL_EVENTS_MAX: usize = 200;
const TIMEOUT_SECS: u64 = 30;
const TIMEOUT_MS: u64 = TIMEOUT_SECS * 1_000;

const MAX_OPS: usize = 40;
const MAX_CALLS: usize = 4;
const MAX_PROGRESS: usize = 3;
const MAX_COPIES: usize = 10;
const MAX_NOISE: usize = 12;
/// Operations are created within this span (after one park TTL, so that early deliveries
/// stay on the timeline).
const CREATE_SPREAD_MS: u64 = 20_000;
/// The upstream's 202 comes 1 ms to this long after the creation.
const ACCEPT_MAX_MS: u64 = 3_000;
const AFTER_ACCEPT_MS: u64 = 20_000;
const AFTER_TIMEOUT_MS: u64 = 15_000;
/// No delivery happens later than this.
const HORIZON_MS: u64 = PARK_TTL_MS + CREATE_SPREAD_MS + TIMEOUT_MS + AFTER_TIMEOUT_MS;

// The generated world stays inside the store's deliberate limits: every distinct event
// fits in the park at once; a call's timeline holds all the noise; the duplicate filter
// remembers every id until the last sweep; no delivery falls after `HORIZON_MS` (those
// after the 202 included).
const _: () = assert!(MAX_OPS * (MAX_PROGRESS + 1) + MAX_NOISE < PARK_MAX);
const _: () = assert!(MAX_NOISE < CALL_EVENTS_MAX);
const _: () = assert!(HORIZON_MS + PARK_TTL_MS < DEDUPE_TTL_SECS * 1_000);
const _: () = assert!(ACCEPT_MAX_MS + 1 + AFTER_ACCEPT_MS <= TIMEOUT_MS + AFTER_TIMEOUT_MS);

/// Wall-clock time at timeline position 0.
const WALL0: OffsetDateTime = datetime!(2030-01-01 0:00 UTC);

fn config() -> OperationsConfig {
    let mut config = crate::config::Config::embedded().operations;
    config.park_ttl_ms = PARK_TTL_MS;
    config.park_max = PARK_MAX;
    config.dedupe_ttl_secs = DEDUPE_TTL_SECS;
    config.retention_secs = 86_400;
    config.call_events_max = CALL_EVENTS_MAX;
    config.callback_timeouts.remove_participant_secs = TIMEOUT_SECS;
    config.callback_timeouts.cancel_media_processing_secs = TIMEOUT_SECS;
    // The model times operations out at their deadline; reconciliation has tests of its own.
    config.reconcile = false;
    config
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Platform {
    Acs,
    Graph,
}

/// What an event says about its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Says {
    Started,
    /// An event of the operation's kind with no transition (Graph: a status callops does
    /// not know).
    NoTransition,
    Succeeded,
    Failed,
}

/// When one copy of an event arrives, relative to its operation.
#[derive(Debug, Clone, Copy)]
enum When {
    /// This many ms (less than the park TTL) before the operation is created.
    Early(u64),
    /// Between the creation (excluded) and the 202 (included), at this ‰ of the way.
    BeforeAccept(u64),
    /// This many ms after the 202, plus one.
    AfterAccept(u64),
    /// This many ms after the operation's callback timeout has passed.
    AfterTimeout(u64),
}

#[derive(Debug, Clone, Copy)]
struct Arrival {
    when: When,
    /// Orders deliveries that fall on the same millisecond.
    tie: u32,
}

/// How a Graph notification names its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    Both,
    ContextOnly,
    IdOnly,
}

#[derive(Debug, Clone)]
struct EventPlan {
    says: Says,
    /// One per copy delivered.
    arrivals: Vec<Arrival>,
    /// Graph only: how it names the operation, whether it is the generic
    /// `commsOperation`, whether its `resourceUrl` spells ids upper-case without hyphens.
    naming: Naming,
    generic: bool,
    shouty: bool,
}

#[derive(Debug, Clone)]
struct OpPlan {
    call: usize,
    create_at: u64,
    accept_after: u64,
    create_tie: u32,
    /// Graph: where its answer's ids are recorded and where the 202 is applied fall at the
    /// same millisecond (`dispatch_cancel` does one right after the other), ordered by
    /// these, so that a notification may come between them.
    answer_tie: u32,
    accept_tie: u32,
    /// Progress events, then the final one.
    events: Vec<EventPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoiseKind {
    /// Our kind, a context no operation uses: parked, then expired.
    UnknownContext,
    /// Our kind, on a call without operations, with a context used on other calls.
    OtherCall,
    /// No context: kept on the call's timeline.
    CallLevel,
    /// Another kind (a prompt played): becomes an observed operation.
    OtherKind,
}

#[derive(Debug, Clone)]
struct NoisePlan {
    kind: NoiseKind,
    call: usize,
    /// (timeline position, tie) of each copy.
    arrivals: Vec<(u64, u32)>,
}

#[derive(Debug, Clone)]
struct Scenario {
    calls: usize,
    ops: Vec<OpPlan>,
    noise: Vec<NoisePlan>,
    sweep_every: u64,
    /// Where the first sweep falls, in ‰ of `sweep_every`.
    sweep_phase: u64,
}

fn when(late_only: bool) -> BoxedStrategy<When> {
    if late_only {
        return (0..AFTER_TIMEOUT_MS).prop_map(When::AfterTimeout).boxed();
    }
    prop_oneof![
        2 => (1..PARK_TTL_MS).prop_map(When::Early),
        2 => (0..=1_000u64).prop_map(When::BeforeAccept),
        4 => (0..AFTER_ACCEPT_MS).prop_map(When::AfterAccept),
        2 => (0..AFTER_TIMEOUT_MS).prop_map(When::AfterTimeout),
    ]
    .boxed()
}

fn arrivals(late_only: bool) -> impl Strategy<Value = Vec<Arrival>> {
    let arrival = (when(late_only), any::<u32>()).prop_map(|(when, tie)| Arrival { when, tie });
    prop_oneof![
        9 => vec(arrival.clone(), 1..=3),
        1 => vec(arrival, 4..=MAX_COPIES),
    ]
}

/// Moves the copies of a Graph notification out of the windows where the store cannot
/// know its operation (see the module's documentation).
fn graph_legal(when: When, naming: Naming, generic: bool) -> When {
    match when {
        When::Early(lead) | When::BeforeAccept(lead) if naming == Naming::IdOnly => {
            When::AfterAccept(lead)
        }
        When::Early(lead) if generic => When::BeforeAccept(lead % 1_001),
        other => other,
    }
}

fn event_plan(
    platform: Platform,
    says: impl Strategy<Value = Says>,
    late_only: bool,
) -> impl Strategy<Value = EventPlan> {
    let naming = prop_oneof![
        2 => Just(Naming::Both),
        1 => Just(Naming::ContextOnly),
        1 => Just(Naming::IdOnly),
    ];
    (
        says,
        arrivals(late_only),
        naming,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(says, mut arrivals, naming, generic, shouty)| {
            if platform == Platform::Acs {
                return EventPlan {
                    says,
                    arrivals,
                    naming: Naming::Both,
                    generic: false,
                    shouty: false,
                };
            }
            for arrival in &mut arrivals {
                arrival.when = graph_legal(arrival.when, naming, generic);
            }
            EventPlan {
                says,
                arrivals,
                naming,
                generic,
                shouty,
            }
        })
}

fn op_plan(platform: Platform) -> impl Strategy<Value = OpPlan> {
    let progress = prop_oneof![Just(Says::Started), Just(Says::NoTransition)];
    let outcome = prop_oneof![Just(Says::Succeeded), Just(Says::Failed)];
    let last = prop_oneof![
        3 => event_plan(platform, outcome.clone(), false),
        1 => event_plan(platform, outcome, true),
    ];
    (
        0..MAX_CALLS,
        0..CREATE_SPREAD_MS,
        1..=ACCEPT_MAX_MS,
        any::<(u32, u32, u32)>(),
        vec(event_plan(platform, progress, false), 0..=MAX_PROGRESS),
        last,
    )
        .prop_map(|(call, create_at, accept_after, ties, mut events, last)| {
            let (create_tie, answer_tie, accept_tie) = ties;
            events.push(last);
            OpPlan {
                call,
                create_at,
                accept_after,
                create_tie,
                answer_tie: answer_tie.min(accept_tie),
                accept_tie: answer_tie.max(accept_tie),
                events,
            }
        })
}

fn noise_plan() -> impl Strategy<Value = NoisePlan> {
    let kind = prop_oneof![
        Just(NoiseKind::UnknownContext),
        Just(NoiseKind::OtherCall),
        Just(NoiseKind::CallLevel),
        Just(NoiseKind::OtherKind),
    ];
    (
        kind,
        0..MAX_CALLS,
        vec((0..HORIZON_MS, any::<u32>()), 1..=3),
    )
        .prop_map(|(kind, call, arrivals)| NoisePlan {
            kind,
            call,
            arrivals,
        })
}

fn scenario(platform: Platform) -> impl Strategy<Value = Scenario> {
    (
        1..=MAX_CALLS,
        vec(op_plan(platform), 1..=MAX_OPS),
        vec(noise_plan(), 0..=MAX_NOISE),
        1_000..=8_000u64,
        0..1_000u64,
    )
        .prop_map(|(calls, ops, noise, sweep_every, sweep_phase)| Scenario {
            calls,
            ops,
            noise,
            sweep_every,
            sweep_phase,
        })
}

impl OpPlan {
    /// Timeline position of the creation (one park TTL in, so early copies fit before it).
    fn created(&self) -> u64 {
        PARK_TTL_MS + self.create_at
    }

    fn accepted(&self) -> u64 {
        self.created() + self.accept_after
    }

    fn due(&self) -> u64 {
        self.created() + TIMEOUT_MS
    }

    fn at(&self, when: When) -> u64 {
        match when {
            When::Early(lead) => self.created() - lead,
            When::BeforeAccept(permille) => {
                self.created() + 1 + (self.accept_after - 1) * permille / 1_000
            }
            When::AfterAccept(after) => self.accepted() + 1 + after,
            When::AfterTimeout(after) => self.due() + after,
        }
    }
}

/// What happens at one point of the timeline.
#[derive(Debug, Clone, Copy)]
enum Step {
    Create(usize),
    /// Graph: `record_upstream` with the ids of Graph's answer.
    Answer(usize),
    /// The upstream's 202: `transition(Accepted)`.
    Accept(usize),
    Deliver {
        op: usize,
        event: usize,
    },
    Noise(usize),
    Sweep,
}

/// Every step, in the order it happens: by time, then by tie (a sweep's is 0).
fn timeline(platform: Platform, scenario: &Scenario) -> Vec<(u64, Step)> {
    let mut steps: Vec<(u64, u32, Step)> = Vec::new();
    for (i, op) in scenario.ops.iter().enumerate() {
        steps.push((op.created(), op.create_tie, Step::Create(i)));
        if platform == Platform::Graph {
            steps.push((op.accepted(), op.answer_tie, Step::Answer(i)));
        }
        steps.push((op.accepted(), op.accept_tie, Step::Accept(i)));
        for (j, event) in op.events.iter().enumerate() {
            for arrival in &event.arrivals {
                let step = Step::Deliver { op: i, event: j };
                steps.push((op.at(arrival.when), arrival.tie, step));
            }
        }
    }
    for (n, noise) in scenario.noise.iter().enumerate() {
        for &(at, tie) in &noise.arrivals {
            steps.push((at, tie, Step::Noise(n)));
        }
    }
    let last = steps.iter().map(|(at, _, _)| *at).max().unwrap_or(0);
    let mut sweep = scenario.sweep_every * scenario.sweep_phase / 1_000;
    while sweep <= last {
        steps.push((sweep, 0, Step::Sweep));
        sweep += scenario.sweep_every;
    }
    // The last sweep: every parked event has expired by then.
    steps.push((last + PARK_TTL_MS, 0, Step::Sweep));
    // Stable: at equal (time, tie) a sweep, pushed last, still comes after the others;
    // ties of 0 are rare and harmless either way.
    steps.sort_by_key(|(at, tie, _)| (*at, *tie));
    steps.into_iter().map(|(at, _, step)| (at, step)).collect()
}

/// The operations, their events and the noise, built once per case. Events are
/// prototypes: each copy is delivered with its own `received` time.
struct World {
    operations: Vec<Operation>,
    events: Vec<Vec<IncomingEvent>>,
    /// Graph's id of each operation (Graph only).
    upstream_ids: Vec<String>,
    noise: Vec<IncomingEvent>,
    /// The call each noise event is kept on, when it is kept on a call's timeline.
    noise_calls: Vec<CallRef>,
}

fn acs_call(n: usize) -> String {
    format!("acs-call-{n}")
}

fn graph_call(n: usize) -> String {
    format!("ca11ca11-0000-4000-8000-{n:012x}")
}

/// A GUID spelled as `resourceUrl` segments spell it: upper-case, no hyphens.
fn shout(guid: &str) -> String {
    guid.replace('-', "").to_ascii_uppercase()
}

fn result_of(op: usize, event: usize, says: Says) -> Option<ResultInfo> {
    let code = match says {
        Says::Succeeded => 200,
        Says::Failed => 403,
        Says::Started | Says::NoTransition => return None,
    };
    Some(ResultInfo {
        code: Some(code),
        sub_code: Some(i64::try_from(op * 100 + event).unwrap()),
        message: Some(format!("operation {op}, event {event}")),
        ..ResultInfo::default()
    })
}

fn acs_event(
    id: String,
    name: &str,
    call: String,
    context: Option<String>,
    result: Option<ResultInfo>,
) -> IncomingEvent {
    AcsEvent {
        id: Some(id),
        event_type: format!("Microsoft.Communication.{name}"),
        call_connection_id: Some(call),
        operation_context: context,
        result,
        participant: None,
    }
    .into_incoming(WALL0)
}

/// One Graph notification about an operation, decoded as the callback endpoint decodes it.
struct GraphNotification<'a> {
    call: &'a str,
    type_name: &'a str,
    status: &'a str,
    context: Option<&'a str>,
    /// Graph's operation id, in the `id` field and in `resourceUrl`.
    id_field: Option<&'a str>,
    id_in_url: Option<&'a str>,
    result: Option<ResultInfo>,
    shouty: bool,
    /// Makes distinct notifications distinct bytes (an unknown field, ignored).
    serial: String,
}

impl GraphNotification<'_> {
    fn decode(&self) -> IncomingEvent {
        let spell = |guid: &str| {
            if self.shouty {
                shout(guid)
            } else {
                guid.to_owned()
            }
        };
        // Written out rather than built with `json!` (twice as fast unoptimised); every
        // value is plain ASCII.
        let mut data = format!(
            r##""@odata.type":"#microsoft.graph.{}","status":"{}","serial":"{}""##,
            self.type_name, self.status, self.serial
        );
        if let Some(context) = self.context {
            data += &format!(r#","clientContext":"{context}""#);
        }
        if let Some(id) = self.id_field {
            data += &format!(r#","id":"{id}""#);
        }
        if let Some(result) = &self.result {
            let (code, subcode) = (result.code.unwrap(), result.sub_code.unwrap());
            let message = result.message.as_deref().unwrap();
            data += &format!(
                r#","resultInfo":{{"code":{code},"subcode":{subcode},"message":"{message}"}}"#
            );
        }
        let mut url = format!("/communications/calls/{}", spell(self.call));
        if let Some(id) = self.id_in_url {
            url = format!("{url}/operations/{}", spell(id));
        }
        let body = format!(
            r#"{{"value":[{{"changeType":"updated","resourceUrl":"{url}","resourceData":{{{data}}}}}]}}"#
        );
        let mut events = notifications::decode(body.as_bytes(), WALL0).unwrap();
        assert_eq!(events.len(), 1);
        events.pop().unwrap().incoming
    }
}

impl World {
    fn build(platform: Platform, scenario: &Scenario) -> Self {
        let call_of = |op: &OpPlan| op.call % scenario.calls;
        // Contexts are numbered per call, so they repeat across calls.
        let mut per_call = [0; MAX_CALLS];
        let contexts: Vec<String> = scenario
            .ops
            .iter()
            .map(|op| {
                let n = &mut per_call[call_of(op)];
                *n += 1;
                format!("ctx{}", *n - 1)
            })
            .collect();
        let upstream_ids: Vec<String> = (0..scenario.ops.len())
            .map(|i| format!("0fe0623f-d628-42ed-b4bd-{i:012x}"))
            .collect();
        let mut operations = Vec::new();
        let mut events = Vec::new();
        for (i, op) in scenario.ops.iter().enumerate() {
            let (kind, call) = match platform {
                Platform::Acs => (
                    OperationKind::RemoveParticipant,
                    CallRef::CallConnection(acs_call(call_of(op))),
                ),
                Platform::Graph => (
                    OperationKind::CancelMediaProcessing,
                    CallRef::Call(graph_call(call_of(op))),
                ),
            };
            let context = &contexts[i];
            let created = WALL0 + Duration::from_millis(op.created());
            operations.push(Operation::new(kind, call, context.clone(), created));
            let built = op
                .events
                .iter()
                .enumerate()
                .map(|(j, plan)| {
                    let result = result_of(i, j, plan.says);
                    match platform {
                        Platform::Acs => {
                            let name = match plan.says {
                                Says::Started => "RemoveParticipantStarted",
                                Says::NoTransition => "RemoveParticipant",
                                Says::Succeeded => "RemoveParticipantSucceeded",
                                Says::Failed => "RemoveParticipantFailed",
                            };
                            let call = acs_call(call_of(op));
                            acs_event(
                                format!("e{i}.{j}"),
                                name,
                                call,
                                Some(context.clone()),
                                result,
                            )
                        }
                        Platform::Graph => {
                            let upstream = upstream_ids[i].as_str();
                            let named_by_id = plan.naming != Naming::ContextOnly;
                            GraphNotification {
                                call: &graph_call(call_of(op)),
                                type_name: if plan.generic {
                                    "commsOperation"
                                } else {
                                    "cancelMediaProcessingOperation"
                                },
                                status: match plan.says {
                                    Says::Started => "running",
                                    Says::NoTransition => "unknownFutureValue",
                                    Says::Succeeded => "completed",
                                    Says::Failed => "failed",
                                },
                                context: (plan.naming != Naming::IdOnly)
                                    .then_some(context.as_str()),
                                // Only in `resourceUrl` when the URL is shouted.
                                id_field: (named_by_id && !plan.shouty).then_some(upstream),
                                id_in_url: named_by_id.then_some(upstream),
                                result,
                                shouty: plan.shouty,
                                serial: format!("{i}.{j}"),
                            }
                            .decode()
                        }
                    }
                })
                .collect();
            events.push(built);
        }
        let mut noise = Vec::new();
        let mut noise_calls = Vec::new();
        for (n, plan) in scenario.noise.iter().enumerate() {
            let real_call = plan.call % scenario.calls;
            let (event, call) = match platform {
                Platform::Acs => {
                    let on = |call: String, name: &str, context: Option<String>| {
                        let result = result_of(1_000 + n, 0, Says::Succeeded);
                        let event = acs_event(format!("n{n}"), name, call.clone(), context, result);
                        (event, CallRef::CallConnection(call))
                    };
                    match plan.kind {
                        NoiseKind::UnknownContext => on(
                            acs_call(real_call),
                            "RemoveParticipantSucceeded",
                            Some(format!("ghost{n}")),
                        ),
                        NoiseKind::OtherCall => on(
                            format!("acs-elsewhere-{n}"),
                            "RemoveParticipantFailed",
                            Some("ctx0".into()),
                        ),
                        NoiseKind::CallLevel => {
                            on(acs_call(real_call), "ParticipantsUpdated", None)
                        }
                        NoiseKind::OtherKind => on(
                            acs_call(real_call),
                            "PlayCompleted",
                            Some(format!("play{n}")),
                        ),
                    }
                }
                Platform::Graph => {
                    let ghost_id = format!("deadbeef-0000-4000-8000-{n:012x}");
                    let on = |call: String, type_name: &str, context: Option<String>| {
                        let event = GraphNotification {
                            call: &call,
                            type_name,
                            status: "completed",
                            context: context.as_deref(),
                            id_field: (type_name != "call").then_some(ghost_id.as_str()),
                            id_in_url: (type_name != "call").then_some(ghost_id.as_str()),
                            result: result_of(1_000 + n, 0, Says::Succeeded),
                            shouty: false,
                            serial: format!("n{n}"),
                        }
                        .decode();
                        (event, CallRef::Call(call))
                    };
                    match plan.kind {
                        NoiseKind::UnknownContext => on(
                            graph_call(real_call),
                            "cancelMediaProcessingOperation",
                            Some(format!("ghost{n}")),
                        ),
                        NoiseKind::OtherCall => on(
                            graph_call(100 + n),
                            "cancelMediaProcessingOperation",
                            Some("ctx0".into()),
                        ),
                        NoiseKind::CallLevel => on(graph_call(real_call), "call", None),
                        NoiseKind::OtherKind => on(
                            graph_call(real_call),
                            "playPromptOperation",
                            Some(format!("play{n}")),
                        ),
                    }
                }
            };
            noise.push(event);
            noise_calls.push(call);
        }
        Self {
            operations,
            events,
            upstream_ids,
            noise,
            noise_calls,
        }
    }
}

/// The reference model of one operation: what the documented behaviour makes of it.
#[derive(Debug, Clone)]
struct ModelOp {
    created: bool,
    status: OperationStatus,
    timed_out: bool,
    late: bool,
    /// Events delivered before the operation existed, in arrival order.
    parked: Vec<usize>,
    /// (event id, effect), in arrival order.
    timeline: Vec<(String, EventEffect)>,
}

impl ModelOp {
    fn new() -> Self {
        Self {
            created: false,
            status: OperationStatus::NotStarted,
            timed_out: false,
            late: false,
            parked: Vec::new(),
            timeline: Vec::new(),
        }
    }

    fn apply(&mut self, id: &str, says: Says) -> EventEffect {
        let open = !self.status.is_terminal();
        let effect = match says {
            Says::NoTransition => EventEffect::Recorded,
            Says::Started if open => {
                self.status = OperationStatus::Running;
                EventEffect::Applied
            }
            Says::Succeeded | Says::Failed if open || self.timed_out => {
                // A final outcome replaces the CallbackTimeout failure, once.
                self.late |= self.timed_out;
                self.timed_out = false;
                self.status = if says == Says::Succeeded {
                    OperationStatus::Succeeded
                } else {
                    OperationStatus::Failed
                };
                EventEffect::Applied
            }
            Says::Started | Says::Succeeded | Says::Failed => EventEffect::Ignored,
        };
        self.timeline.push((id.to_owned(), effect));
        effect
    }
}

/// (status, late, timed out) of an operation as the store has it, read in place.
type Peek = (OperationStatus, bool, bool);

fn peek(store: &OperationStore, id: OperationId) -> Option<Peek> {
    let op = store.inner.operations.get(&id)?;
    Some((op.status, op.late, op.timed_out()))
}

fn rank(status: OperationStatus) -> u8 {
    match status {
        OperationStatus::NotStarted => 0,
        OperationStatus::Running => 1,
        OperationStatus::Succeeded | OperationStatus::Failed | OperationStatus::Canceled => 2,
    }
}

/// Property 4: `after` is `before` or a forward move from it.
fn moved_forward(before: Peek, after: Peek) -> bool {
    let (status, late, timed_out) = before;
    if before == after {
        return true;
    }
    if status.is_terminal() {
        // Only the CallbackTimeout failure gives way, to a final outcome, marked late.
        return timed_out && !late && after.0.is_terminal() && after.1 && !after.2;
    }
    rank(after.0) >= rank(status) && after.1 == late
}

/// (event id, effect) of each timeline entry, in order.
fn entries(events: &[EventRecord]) -> Vec<(String, EventEffect)> {
    events
        .iter()
        .map(|e| (e.id.clone().unwrap_or_default(), e.effect))
        .collect()
}

/// The status, `result` and `error` a final event dictates.
fn dictated(
    event: &IncomingEvent,
) -> (OperationStatus, Option<ResultInfo>, Option<OperationError>) {
    match &event.transition {
        Some(Transition::Succeeded { result }) => {
            (OperationStatus::Succeeded, result.clone(), None)
        }
        Some(Transition::Failed { result, error }) => {
            (OperationStatus::Failed, result.clone(), Some(error.clone()))
        }
        other => panic!("not a final event: {other:?}"),
    }
}

/// Replays `scenario` against a fresh store, checking properties 4 and 5 at every step and
/// 1, 2, 3 and 6 at the end.
fn replay(platform: Platform, scenario: &Scenario) -> Result<(), TestCaseError> {
    let world = World::build(platform, scenario);
    let store = OperationStore::new(&config());
    let base = Instant::now();
    let instant = |at: u64| base + Duration::from_millis(at);
    let wall = |at: u64| WALL0 + Duration::from_millis(at);
    let ids: Vec<OperationId> = world.operations.iter().map(|op| op.id).collect();
    let count = ids.len();

    let mut model = vec![ModelOp::new(); count];
    let mut seen: HashSet<String> = HashSet::new();
    // Step index of the first delivery of each event of each operation.
    let mut first: Vec<Vec<Option<usize>>> = scenario
        .ops
        .iter()
        .map(|op| vec![None; op.events.len()])
        .collect();
    // Step index of the first sweep at or past each operation's timeout.
    let mut due_sweep: Vec<Option<usize>> = vec![None; count];
    let mut timed_out_reports = vec![0usize; count];
    let mut last_peek: Vec<Option<Peek>> = vec![None; count];
    // Noise parked, with when; noise expired; observed operations of noise.
    let mut parked_noise: Vec<(usize, u64)> = Vec::new();
    let mut expired_noise: Vec<usize> = Vec::new();
    let mut observed: HashMap<usize, OperationId> = HashMap::new();

    let steps = timeline(platform, scenario);
    for (index, &(at, step)) in steps.iter().enumerate() {
        let here = || format!("step {index} at {at} ms: {step:?}");
        match step {
            Step::Create(i) => {
                let created = store.create(world.operations[i].clone());
                prop_assert!(created.is_ok(), "{}: {:?}", here(), created);
                let created = created.unwrap();
                let op = &mut model[i];
                op.created = true;
                for j in std::mem::take(&mut op.parked) {
                    let event = &world.events[i][j];
                    op.apply(event.id.as_deref().unwrap(), scenario.ops[i].events[j].says);
                }
                prop_assert_eq!(entries(&created.events), op.timeline.clone(), "{}", here());
                prop_assert_eq!(created.status, op.status, "{}", here());
            }
            Step::Answer(i) => {
                // As `dispatch_cancel`: the ids of Graph's answer (body and Location, in
                // canonical form) and its status.
                let location = canonical(&shout(&world.upstream_ids[i])).into_owned();
                let named = [world.upstream_ids[i].as_str(), location.as_str()];
                store.record_upstream(ids[i], &named, Some("running"));
            }
            Step::Accept(i) => {
                let after = store.transition(ids[i], Transition::Accepted, wall(at));
                let op = &mut model[i];
                if !op.status.is_terminal() {
                    op.status = OperationStatus::Running;
                }
                prop_assert_eq!(after.map(|op| op.status), Some(op.status), "{}", here());
            }
            Step::Deliver { op: i, event: j } => {
                let mut event = world.events[i][j].clone();
                event.received = wall(at);
                let event_id = event.id.clone().unwrap();
                let got = store.deliver(event, instant(at));
                let want = if !seen.insert(event_id.clone()) {
                    Delivery::Duplicate
                } else {
                    first[i][j] = Some(index);
                    let op = &mut model[i];
                    if op.created {
                        let effect = op.apply(&event_id, scenario.ops[i].events[j].says);
                        Delivery::Matched { id: ids[i], effect }
                    } else {
                        op.parked.push(j);
                        Delivery::Parked
                    }
                };
                prop_assert_eq!(got, want, "{}", here());
            }
            Step::Noise(n) => {
                let mut event = world.noise[n].clone();
                event.received = wall(at);
                let event_id = event.id.clone().unwrap();
                let got = store.deliver(event, instant(at));
                if !seen.insert(event_id) {
                    prop_assert_eq!(got, Delivery::Duplicate, "{}", here());
                } else {
                    match scenario.noise[n].kind {
                        NoiseKind::UnknownContext | NoiseKind::OtherCall => {
                            prop_assert_eq!(got, Delivery::Parked, "{}", here());
                            parked_noise.push((n, at));
                        }
                        NoiseKind::CallLevel => {
                            prop_assert_eq!(got, Delivery::CallEvent, "{}", here());
                        }
                        NoiseKind::OtherKind => {
                            let Delivery::Observed { id } = got else {
                                return Err(TestCaseError::fail(format!("{}: {got:?}", here())));
                            };
                            prop_assert!(!ids.contains(&id), "{}", here());
                            observed.insert(n, id);
                        }
                    }
                }
            }
            Step::Sweep => {
                let report = store.sweep(instant(at), wall(at));
                let mut want_timed_out = Vec::new();
                for (i, plan) in scenario.ops.iter().enumerate() {
                    if plan.due() <= at && due_sweep[i].is_none() {
                        due_sweep[i] = Some(index);
                    }
                    let op = &mut model[i];
                    if op.created && !op.status.is_terminal() && plan.due() <= at {
                        op.status = OperationStatus::Failed;
                        op.timed_out = true;
                        want_timed_out.push(ids[i]);
                    }
                }
                let mut timed_out = report.timed_out.clone();
                timed_out.sort_unstable();
                want_timed_out.sort_unstable();
                prop_assert_eq!(&timed_out, &want_timed_out, "{}", here());
                for id in &timed_out {
                    let i = ids.iter().position(|known| known == id).unwrap();
                    timed_out_reports[i] += 1;
                }
                let (expired, kept): (Vec<_>, Vec<_>) = parked_noise
                    .iter()
                    .partition(|(_, parked_at)| at - parked_at >= PARK_TTL_MS);
                parked_noise = kept;
                let mut want_expired: Vec<String> = expired
                    .iter()
                    .map(|(n, _)| world.noise[*n].id.clone().unwrap())
                    .collect();
                expired_noise.extend(expired.iter().map(|(n, _)| *n));
                let mut got_expired: Vec<String> = report
                    .expired
                    .iter()
                    .map(|event| event.id.clone().unwrap_or_default())
                    .collect();
                want_expired.sort_unstable();
                got_expired.sort_unstable();
                prop_assert_eq!(got_expired, want_expired, "{}", here());
                prop_assert_eq!(report.removed_operations.len(), 0, "{}", here());
            }
        }

        // Property 4, and property 5 for the state: for the operation the step is about,
        // or for every operation after a sweep (the only step that touches many). An
        // operation that a step changed without saying so is caught there, or at the end.
        let checked = match step {
            Step::Create(i) | Step::Answer(i) | Step::Accept(i) | Step::Deliver { op: i, .. } => {
                i..i + 1
            }
            Step::Noise(_) | Step::Sweep => 0..count,
        };
        for i in checked {
            let now = peek(&store, ids[i]);
            prop_assert_eq!(
                now.is_some(),
                model[i].created,
                "{}: operation {}",
                here(),
                i
            );
            let Some(now) = now else { continue };
            if let Some(before) = last_peek[i] {
                prop_assert!(
                    moved_forward(before, now),
                    "{}: operation {} went from {:?} to {:?}",
                    here(),
                    i,
                    before,
                    now
                );
            }
            let op = &model[i];
            prop_assert_eq!(
                now,
                (op.status, op.late, op.timed_out),
                "{}: operation {}",
                here(),
                i
            );
            last_peek[i] = Some(now);
        }
    }

    for i in 0..count {
        let op = store.get(ids[i]).unwrap();
        let events = &world.events[i];
        let here = || format!("operation {i} ({})", op.context);

        // 1. Outcome.
        let (status, result, error) = dictated(events.last().unwrap());
        prop_assert_eq!(op.status, status, "{}", here());
        prop_assert_eq!(op.result.as_deref(), result.as_ref(), "{}", here());
        prop_assert_eq!(op.error.as_deref(), error.as_ref(), "{}", here());

        // 2. Late.
        let final_first = first[i].last().unwrap().unwrap();
        let late = due_sweep[i].is_some_and(|sweep| sweep < final_first);
        prop_assert_eq!(op.late, late, "{}", here());
        prop_assert_eq!(timed_out_reports[i], usize::from(late), "{}", here());

        // 3. Once each, in the order of their first delivery, nothing else.
        let mut delivered: Vec<(usize, String)> = first[i]
            .iter()
            .zip(events)
            .map(|(step, event)| (step.unwrap(), event.id.clone().unwrap()))
            .collect();
        delivered.sort_unstable();
        let delivered: Vec<String> = delivered.into_iter().map(|(_, id)| id).collect();
        let recorded: Vec<String> = op.events.iter().map(|e| e.id.clone().unwrap()).collect();
        prop_assert_eq!(&recorded, &delivered, "{}", here());
        let final_id = events.last().unwrap().id.as_deref();
        let final_entry = op.events.iter().find(|e| e.id.as_deref() == final_id);
        prop_assert_eq!(
            final_entry.map(|e| e.effect),
            Some(EventEffect::Applied),
            "{}",
            here()
        );
        // 5, in full: every effect as the model says.
        prop_assert_eq!(entries(&op.events), model[i].timeline.clone(), "{}", here());
        if platform == Platform::Graph {
            prop_assert_eq!(
                op.upstream_operation_id.as_deref(),
                Some(world.upstream_ids[i].as_str()),
                "{}",
                here()
            );
        }
    }

    // 3 and 6: nothing parked, nothing overflowed, every noise event where it belongs and
    // no operation's event on a call's timeline.
    let stats = store.stats();
    prop_assert_eq!(stats.parked, 0);
    prop_assert_eq!(stats.parked_overflow, 0);
    let expired_count = u64::try_from(expired_noise.len()).unwrap();
    prop_assert_eq!(stats.parked_expired, expired_count);
    prop_assert_eq!(stats.operations, count + observed.len());
    let mut want_on_calls: HashMap<CallRef, Vec<(String, EventEffect)>> = HashMap::new();
    for (n, plan) in scenario.noise.iter().enumerate() {
        let id = world.noise[n].id.clone().unwrap();
        match plan.kind {
            NoiseKind::UnknownContext | NoiseKind::OtherCall => {
                prop_assert!(expired_noise.contains(&n), "noise {n} never expired");
                want_on_calls
                    .entry(world.noise_calls[n].clone())
                    .or_default()
                    .push((id, EventEffect::Unmatched));
            }
            NoiseKind::CallLevel => want_on_calls
                .entry(world.noise_calls[n].clone())
                .or_default()
                .push((id, EventEffect::Recorded)),
            NoiseKind::OtherKind => {
                let op = store.get(observed[&n]).unwrap();
                prop_assert_eq!(entries(&op.events), [(id, EventEffect::Applied)]);
                prop_assert_eq!(op.status, OperationStatus::Succeeded);
            }
        }
    }
    let mut calls: HashSet<CallRef> = world.operations.iter().map(|op| op.call.clone()).collect();
    calls.extend(world.noise_calls.iter().cloned());
    for call in calls {
        let mut got = entries(&store.call_events(&call).unwrap_or_default());
        let mut want = want_on_calls.remove(&call).unwrap_or_default();
        got.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        want.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(got, want, "timeline of {:?}", call);
    }
    Ok(())
}

/// 256 cases unless `PROPTEST_CASES` says otherwise. The XorShift generator: the default
/// (ChaCha), unoptimised in test builds, took half the time.
fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config())]

    /// ACS Remove Participant: properties 1 to 6 (see the module's documentation).
    #[test]
    fn acs_callbacks_in_any_interleaving_settle_each_operation_as_its_final_event_says(
        scenario in scenario(Platform::Acs)
    ) {
        replay(Platform::Acs, &scenario)?;
    }

    /// Graph cancelMediaProcessing, notifications matched by clientContext and/or Graph's
    /// operation id: properties 1 to 6, and each operation keeps Graph's id.
    #[test]
    fn graph_notifications_in_any_interleaving_settle_each_cancel_as_its_final_one_says(
        scenario in scenario(Platform::Graph)
    ) {
        replay(Platform::Graph, &scenario)?;
    }
}
