//! What one transition writes to the shared store, and what it checks first: built from
//! what the transition read ([`Read`]) and what the scratch store holds afterwards
//! ([`Outcome`]), executed by `commit.lua` as one atomic script. Pure: no I/O.
//!
//! The checks make every transition a compare-and-set: each operation written must still
//! be at the revision read (or absent, if new), each name claimed must still name what it
//! named, each park cleared must still hold the events read, and no event id may have been
//! seen meanwhile. Otherwise nothing is written and the transition runs again on fresh
//! reads.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use super::keys::{Keys, Partition, context_name, park_name};
use crate::config::CallbackTimeouts;
use crate::correlation::{IncomingEvent, upstream_key};
use crate::operation::{CallRef, EventRecord, Operation, OperationId};
use crate::store::tracker::unix_millis;

/// What a transition read from the shared store.
#[derive(Debug, Default)]
pub struct Read {
    /// Operations read: revision, and whether they had settled.
    pub operations: HashMap<OperationId, (u64, bool)>,
    /// (call, context) names read: the holder's id (if any) and how many events were parked.
    pub contexts: HashMap<String, ContextRead>,
    /// Upstream ids read (in `upstream_key` form): the operation they named, if any.
    pub upstream: HashMap<String, Option<String>>,
    /// The partition all of it is in (and all the transition writes).
    pub partition: Partition,
}

#[derive(Debug, Default, Clone)]
pub struct ContextRead {
    pub holder: Option<String>,
    pub parked: usize,
}

/// What the scratch store holds after the transition, and what it did besides.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every operation in the scratch store (unchanged ones are skipped).
    pub operations: Vec<Operation>,
    /// Event ids delivered.
    pub seen: Vec<String>,
    /// Events parked by this transition.
    pub parked: Vec<IncomingEvent>,
    /// (call, context) names whose parked events expired (moved to their call's events).
    pub parks_expired: Vec<String>,
    /// Park names whose events were applied to the operation they waited for (Graph's
    /// answer named it): cleared, and nothing else may have parked there since the read.
    pub parks_applied: Vec<String>,
    /// Events added to calls' timelines.
    pub timelines: Vec<(CallRef, Vec<EventRecord>)>,
    /// More upstream ids of an operation than the one it shows (Graph's `Location`).
    pub upstream_ids: Vec<(String, OperationId)>,
}

/// How long things are kept.
#[derive(Debug, Clone)]
pub struct Lifetimes {
    pub retention: Duration,
    pub dedupe: Duration,
    pub park: Duration,
    pub timeouts: CallbackTimeouts,
    pub timeline_max: usize,
}

impl Lifetimes {
    /// How long a call's operation set and timeline live after their last change: as long
    /// as an operation created now could (its deadline, then its retention).
    fn call(&self) -> Duration {
        let longest = [
            self.timeouts.remove_participant_secs,
            self.timeouts.cancel_media_processing_secs,
            self.timeouts.observed_secs,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        self.retention + Duration::from_secs(longest)
    }
}

/// The script's argument.
#[derive(Debug, Serialize)]
pub struct Plan {
    seen: Vec<String>,
    seen_ttl: u64,
    ops: Vec<OpWrite>,
    claims: Vec<Claim>,
    parked: Vec<ParkWrite>,
    timelines: Vec<TimelineWrite>,
    timeline_max: usize,
    call_ttl: u64,
    park_keep: u64,
    all: String,
    /// Every operation id by when its record expires (unix ms): the sweep drops expired
    /// ids from `all`.
    expiries: String,
    now: i64,
    deadlines: String,
    park_due: String,
    channel: String,
}

#[derive(Debug, Serialize)]
struct OpWrite {
    key: String,
    id: String,
    #[serde(skip)]
    operation: OperationId,
    /// The revision read, as text; empty for a new operation (it must not exist).
    base: String,
    rev: String,
    /// Its JSON is the script's argument at this index (not inside the plan: no escaping).
    doc: usize,
    #[serde(skip)]
    json: Vec<u8>,
    ttl: u64,
    /// Keys naming it (context, upstream id) whose expiry follows its own.
    names: Vec<String>,
    new: bool,
    /// The call's operation set (added to when new).
    call: String,
    /// Callback deadline (unix ms) while unsettled, else 0.
    deadline: i64,
    /// Settled (or changed while settled): published, so long polls elsewhere wake.
    settled: bool,
}

#[derive(Debug, Serialize)]
struct Claim {
    key: String,
    /// When `check`: the id it must still hold (empty: none).
    check: bool,
    expect: String,
    /// Written when not empty.
    set: String,
    ttl: u64,
}

#[derive(Debug, Serialize)]
struct ParkWrite {
    key: String,
    name: String,
    /// The length it must still have, or -1.
    expect: i64,
    clear: bool,
    push: Vec<String>,
    due: i64,
}

#[derive(Debug, Serialize)]
struct TimelineWrite {
    key: String,
    push: Vec<String>,
}

impl Plan {
    /// True when the transition changed nothing (no script needed).
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
            && self.ops.is_empty()
            && self.claims.is_empty()
            && self.parked.is_empty()
            && self.timelines.is_empty()
    }

    /// Operations this plan settles (for waking long polls here without waiting for
    /// the published notice).
    pub fn settled(&self) -> impl Iterator<Item = OperationId> + '_ {
        self.ops
            .iter()
            .filter(|op| op.settled)
            .map(|op| op.operation)
    }

    /// Operations this plan writes.
    pub fn written(&self) -> impl Iterator<Item = OperationId> + '_ {
        self.ops.iter().map(|op| op.operation)
    }

    /// The script's first argument.
    pub fn to_json(&self) -> String {
        // Plain strings, numbers and booleans: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The script's other arguments: the operations' JSON, in the order `doc` names them.
    pub fn documents(&self) -> impl Iterator<Item = &[u8]> {
        self.ops.iter().map(|op| op.json.as_slice())
    }
}

pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// How long an operation's record is kept from `now`, and its callback deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// Its record's time to live (ms): its deadline while unsettled, then its retention.
    pub ttl: u64,
    /// Callback deadline (unix ms) while unsettled, else 0.
    pub deadline: i64,
    pub settled: bool,
}

/// How long `op` (as it is after a transition at `now`) is kept.
pub fn kept(lifetimes: &Lifetimes, op: &Operation, now: OffsetDateTime) -> Kept {
    let retention = millis(lifetimes.retention);
    let settled = op.status.is_terminal();
    let deadline = op.deadline(lifetimes.timeouts.for_kind(&op.kind));
    if settled {
        Kept {
            ttl: retention,
            deadline: 0,
            settled,
        }
    } else {
        Kept {
            ttl: millis(Duration::try_from(deadline - now).unwrap_or(Duration::ZERO)) + retention,
            deadline: unix_millis(deadline),
            settled,
        }
    }
}

/// The plan for `outcome`, given what was `read`, at `now`.
pub fn plan(
    keys: &Keys,
    lifetimes: &Lifetimes,
    read: &Read,
    outcome: &Outcome,
    now: OffsetDateTime,
) -> Result<Plan, serde_json::Error> {
    let p = read.partition;
    let retention = millis(lifetimes.retention);
    let call_ttl = millis(lifetimes.call());
    let mut claims: BTreeMap<String, Claim> = BTreeMap::new();
    let mut parked: BTreeMap<String, ParkWrite> = BTreeMap::new();
    let mut ops = Vec::new();
    for op in &outcome.operations {
        let base = read.operations.get(&op.id);
        if base.is_some_and(|(revision, _)| *revision == op.revision) {
            continue;
        }
        let new = base.is_none();
        let id = op.id.to_string();
        let Kept {
            ttl,
            deadline,
            settled,
        } = kept(lifetimes, op, now);
        let mut names = Vec::new();
        if !op.context.is_empty() {
            let name = context_name(&op.call, &op.context);
            let key = keys.context(p, &name);
            if new {
                let seen = read.contexts.get(&name).cloned().unwrap_or_default();
                claims.insert(
                    key.clone(),
                    Claim {
                        key: key.clone(),
                        check: true,
                        expect: seen.holder.unwrap_or_default(),
                        set: id.clone(),
                        ttl,
                    },
                );
                // The events parked under it were applied to it: they are cleared, and
                // there must be no others (even when none were read: one parked since
                // would otherwise be orphaned).
                parked.insert(
                    name.clone(),
                    ParkWrite {
                        key: keys.parked(p, &name),
                        name: name.clone(),
                        expect: i64::try_from(seen.parked).unwrap_or(i64::MAX),
                        clear: true,
                        push: Vec::new(),
                        due: 0,
                    },
                );
            }
            names.push(key);
        }
        if let Some(shown) = &op.upstream_operation_id {
            let upstream = upstream_key(shown);
            let key = keys.upstream(p, &upstream);
            let was = read.upstream.get(&*upstream);
            claims.entry(key.clone()).or_insert(Claim {
                key: key.clone(),
                // A new operation found by this id alone must not race another replica
                // observing the same id.
                check: new,
                expect: was.cloned().flatten().unwrap_or_default(),
                set: id.clone(),
                ttl,
            });
            names.push(key);
        }
        let mut doc = Vec::with_capacity(512);
        serde_json::to_writer(&mut doc, op)?;
        ops.push(OpWrite {
            key: keys.operation(op.id),
            base: base
                .map(|(revision, _)| revision.to_string())
                .unwrap_or_default(),
            rev: op.revision.to_string(),
            // ARGV[1] is the plan; documents follow.
            doc: ops.len() + 2,
            json: doc,
            ttl,
            names,
            new,
            call: keys.call(&op.call),
            deadline,
            settled,
            id,
            operation: op.id,
        });
    }
    for (upstream, id) in &outcome.upstream_ids {
        let key = keys.upstream(p, upstream);
        claims.entry(key.clone()).or_insert(Claim {
            key,
            check: false,
            expect: String::new(),
            set: id.to_string(),
            ttl: retention + call_ttl,
        });
    }
    let park_due = unix_millis(now) + i64::try_from(millis(lifetimes.park)).unwrap_or(i64::MAX);
    for event in &outcome.parked {
        let Some(name) = park_name(event) else {
            continue;
        };
        // Parked only while nothing holds the name (the context, or for an event named by
        // upstream id alone, that id): it must still be so.
        let (key, holder) = match (event.names(), &event.upstream_id) {
            (None, Some(upstream_id)) => (
                keys.upstream(p, upstream_id.key()),
                read.upstream
                    .get(upstream_id.key())
                    .cloned()
                    .flatten()
                    .unwrap_or_default(),
            ),
            _ => (
                keys.context(p, &name),
                read.contexts
                    .get(&name)
                    .and_then(|seen| seen.holder.clone())
                    .unwrap_or_default(),
            ),
        };
        claims.entry(key.clone()).or_insert(Claim {
            key,
            check: true,
            expect: holder,
            set: String::new(),
            ttl: 0,
        });
        parked
            .entry(name.clone())
            .or_insert_with(|| ParkWrite {
                key: keys.parked(p, &name),
                name: name.clone(),
                expect: -1,
                clear: false,
                push: Vec::new(),
                due: park_due,
            })
            .push
            .push(serde_json::to_string(event)?);
    }
    for name in outcome.parks_expired.iter().chain(&outcome.parks_applied) {
        let seen = read.contexts.get(name).map_or(0, |seen| seen.parked);
        parked.entry(name.clone()).or_insert_with(|| ParkWrite {
            key: keys.parked(p, name),
            name: name.clone(),
            expect: i64::try_from(seen).unwrap_or(i64::MAX),
            clear: true,
            push: Vec::new(),
            due: 0,
        });
    }
    let mut timelines = Vec::new();
    for (call, events) in &outcome.timelines {
        let push = events
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        timelines.push(TimelineWrite {
            key: keys.timeline(call),
            push,
        });
    }
    Ok(Plan {
        seen: outcome.seen.iter().map(|id| keys.seen(p, id)).collect(),
        seen_ttl: millis(lifetimes.dedupe),
        ops,
        claims: claims.into_values().collect(),
        parked: parked.into_values().collect(),
        timelines,
        timeline_max: lifetimes.timeline_max.max(1),
        call_ttl,
        // Long enough for a sweep to move expired events to their call's timeline.
        park_keep: millis(lifetimes.park) * 2 + 60_000,
        all: keys.all(p),
        expiries: keys.expiries(p),
        now: unix_millis(now),
        deadlines: keys.deadlines(p),
        park_due: keys.park_due(p),
        channel: keys.settled_channel(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::operation::{OperationKind, Transition};

    fn lifetimes() -> Lifetimes {
        let config = Config::embedded();
        Lifetimes {
            retention: Duration::from_secs(3600),
            dedupe: Duration::from_secs(600),
            park: Duration::from_secs(30),
            timeouts: config.operations.callback_timeouts,
            timeline_max: 100,
        }
    }

    fn plan_now(keys: &Keys, read: &Read, outcome: &Outcome) -> Plan {
        plan(keys, &lifetimes(), read, outcome, OffsetDateTime::now_utc()).unwrap()
    }

    fn removal(context: &str) -> Operation {
        Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("call-1".into()),
            context.into(),
            OffsetDateTime::now_utc(),
        )
    }

    #[test]
    fn a_new_operation_claims_its_context_and_clears_what_was_parked_for_it() {
        let keys = Keys::new("t", 1);
        let op = removal("ctx");
        let name = context_name(&op.call, "ctx");
        let mut read = Read::default();
        read.contexts.insert(
            name.clone(),
            ContextRead {
                holder: Some("old".into()),
                parked: 2,
            },
        );
        let outcome = Outcome {
            operations: vec![op.clone()],
            ..Outcome::default()
        };
        let plan = plan_now(&keys, &read, &outcome);
        assert_eq!(plan.ops.len(), 1);
        assert!(plan.ops[0].new && plan.ops[0].base.is_empty() && !plan.ops[0].settled);
        assert!(plan.ops[0].deadline > 0);
        let claim = &plan.claims[0];
        assert_eq!(claim.key, keys.context(0, &name));
        assert!(claim.check);
        assert_eq!(claim.expect, "old");
        assert_eq!(claim.set, op.id.to_string());
        assert_eq!(plan.parked.len(), 1);
        assert!(plan.parked[0].clear);
        assert_eq!(plan.parked[0].expect, 2);

        // Nothing parked when read: the park must still be empty at the commit.
        read.contexts.insert(name.clone(), ContextRead::default());
        let plan = plan_now(&keys, &read, &outcome);
        assert_eq!(plan.parked.len(), 1);
        assert_eq!(plan.parked[0].expect, 0);
    }

    #[test]
    fn unchanged_operations_are_not_written_and_changed_ones_compare_their_revision() {
        let keys = Keys::new("t", 1);
        let mut unchanged = removal("a");
        unchanged.revision = 4;
        let mut changed = removal("b");
        changed.revision = 7;
        let mut read = Read::default();
        read.operations.insert(unchanged.id, (4, false));
        read.operations.insert(changed.id, (6, false));
        changed
            .apply(
                Transition::Succeeded { result: None },
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        let outcome = Outcome {
            operations: vec![unchanged, changed.clone()],
            seen: vec!["event-1".into()],
            ..Outcome::default()
        };
        let plan = plan_now(&keys, &read, &outcome);
        assert_eq!(plan.ops.len(), 1);
        let op = &plan.ops[0];
        assert_eq!(op.base, "6");
        assert_eq!(op.rev, changed.revision.to_string());
        assert!(op.settled && !op.new);
        assert_eq!(op.deadline, 0);
        assert_eq!(op.ttl, 3_600_000);
        // An existing operation claims nothing: its revision guards it.
        assert!(plan.claims.is_empty());
        assert_eq!(plan.seen, vec![keys.seen(0, "event-1")]);
        assert_eq!(plan.settled().collect::<Vec<_>>(), vec![changed.id]);
        let json: serde_json::Value = serde_json::from_str(&plan.to_json()).unwrap();
        assert_eq!(json["ops"][0]["base"], "6");
        // The document travels as its own argument (ARGV[2]), not escaped in the plan.
        assert_eq!(json["ops"][0]["doc"], 2);
        let document: Operation = serde_json::from_slice(plan.documents().next().unwrap()).unwrap();
        assert_eq!(document.status, changed.status);
    }

    #[test]
    fn a_parked_event_checks_that_its_context_is_still_free() {
        let keys = Keys::new("t", 1);
        let event = IncomingEvent {
            id: Some("e".into()),
            event_type: "RemoveParticipantSucceeded".into(),
            call: Some(CallRef::CallConnection("call-1".into())),
            context: Some("ctx".into()),
            kind: OperationKind::RemoveParticipant,
            upstream_id: None,
            cancelled: false,
            upstream_status: None,
            transition: Some(Transition::Succeeded { result: None }),
            received: OffsetDateTime::now_utc(),
        };
        let outcome = Outcome {
            parked: vec![event.clone()],
            seen: vec!["e".into()],
            ..Outcome::default()
        };
        let plan = plan_now(&keys, &Read::default(), &outcome);
        let name = context_name(event.call.as_ref().unwrap(), "ctx");
        assert_eq!(plan.claims.len(), 1);
        assert!(plan.claims[0].check && plan.claims[0].expect.is_empty());
        assert!(plan.claims[0].set.is_empty());
        assert_eq!(plan.parked[0].key, keys.parked(0, &name));
        assert_eq!(plan.parked[0].expect, -1);
        let back: IncomingEvent = serde_json::from_str(&plan.parked[0].push[0]).unwrap();
        assert_eq!(back, event);
        assert!(!plan.is_empty());
    }
}
