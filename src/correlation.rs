//! Correlation: what a callback event does to the operation it names. Pure; the store runs
//! these decisions under its per-entry locks.
//!
//! An event names an operation by (call, context). When that operation is known, the event
//! is recorded on its timeline and, if it reports on the operation's own kind, moves its
//! state (forward only). When it is not known, an event about a kind this service issues is
//! parked until the operation appears (it may overtake our own bookkeeping, or come from
//! before a restart); any other event becomes an *observed* operation so it can be queried.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::operation::{
    CallRef, EventBound, EventEffect, EventRecord, Operation, OperationId, OperationKind,
    Transition,
};

/// The kind of an event that reports on "an operation" without saying which kind (Graph's
/// generic `commsOperation`): it applies to whatever operation it names.
pub const GENERIC_KIND: &str = "commsOperation";

/// A callback event, platform-independent. Its JSON form is how a parked event is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IncomingEvent {
    /// Upstream event id, the deduplication key.
    pub id: Option<String>,
    pub event_type: String,
    /// The call the event is about, if it says.
    pub call: Option<CallRef>,
    /// The operationContext / clientContext it carries.
    pub context: Option<String>,
    /// The kind of operation it reports on ([`GENERIC_KIND`] when the upstream did not say).
    pub kind: OperationKind,
    /// The upstream's own id of the operation (Graph), in canonical form: a second way to
    /// find the operation, for notifications that carry no context.
    pub upstream_id: Option<UpstreamId>,
    /// True when it reports an operation cancelled by a `cancelMediaProcessing`.
    pub cancelled: bool,
    /// The status as the upstream wrote it (Graph), kept even when callops does not know it.
    pub upstream_status: Option<String>,
    /// The state change it reports, if any.
    pub transition: Option<Transition>,
    #[serde(with = "time::serde::rfc3339")]
    pub received: OffsetDateTime,
}

/// The form in which upstream operation ids are compared: lower-case without hyphens, since
/// Graph writes the same id `0fe0623f-d628-…` in `id` fields and `0FE0623FD628…` in
/// `resourceUrl`.
pub fn upstream_key(id: &str) -> Box<str> {
    id.chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// An upstream operation id as shown, with its comparison key ([`upstream_key`]) derived
/// once, where the event is decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamId {
    shown: Box<str>,
    key: Box<str>,
}

impl UpstreamId {
    pub fn new(shown: &str) -> Self {
        Self {
            shown: shown.into(),
            key: upstream_key(shown),
        }
    }

    /// The id as the upstream spelled it (canonical form for GUIDs).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The key it is compared by.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl IncomingEvent {
    /// The (call, context) naming the operation (an operation's context is unique per
    /// call), or `None` for call-level events (no call or no context).
    pub fn names(&self) -> Option<(&CallRef, &str)> {
        Some((self.call.as_ref()?, self.context.as_deref()?))
    }

    /// The timeline entry for this event, with `effect`.
    pub fn record(&self, effect: EventEffect) -> EventRecord {
        EventRecord {
            event_type: crate::operation::event_type(&self.event_type),
            id: self.id.clone(),
            received_date_time: self.received,
            effect,
        }
    }

    /// True when the event reports on `operation`'s kind, so its transition applies.
    pub fn reports_on(&self, operation: &Operation) -> bool {
        self.kind == operation.kind
            || matches!(&self.kind, OperationKind::Observed(name) if &**name == GENERIC_KIND)
    }

    /// True when an unknown operation should wait for this event rather than be observed.
    pub fn should_park(&self) -> bool {
        self.kind.is_issued()
    }

    /// A new observed operation built from this event.
    pub fn observed_operation(&self, call: &CallRef, context: &str) -> Operation {
        let mut operation = Operation::new(
            self.kind.clone(),
            call.clone(),
            context.to_owned(),
            self.received,
        );
        operation.upstream_operation_id = self.upstream_id.as_ref().map(|id| id.shown().into());
        // An observed operation is running from its first sign of life.
        let _ = operation.apply(Transition::Started, self.received);
        // The first event on an empty timeline: no bound drops anything.
        apply(&mut operation, self, EventBound { first: 0, last: 1 });
        operation
    }
}

/// Records `event` on `operation` (within `bound`) and applies it when it reports on the
/// operation's kind. Returns its effect, and the event dropped from the timeline to make room
/// ([`Operation::record`]).
pub fn apply(
    operation: &mut Operation,
    event: &IncomingEvent,
    bound: EventBound,
) -> (EventEffect, Option<EventRecord>) {
    let effect = match &event.transition {
        Some(transition) if event.reports_on(operation) => {
            match operation.apply(transition.clone(), event.received) {
                Ok(_) => EventEffect::Applied,
                Err(_) => EventEffect::Ignored,
            }
        }
        _ => EventEffect::Recorded,
    };
    // The upstream's own status word follows the events that move (or only describe) the
    // operation, never one that came after it settled.
    let describes = effect == EventEffect::Applied
        || (event.transition.is_none() && event.reports_on(operation));
    if let (Some(status), true) = (&event.upstream_status, describes) {
        operation.upstream_status = Some(status.as_str().into());
    }
    let evicted = operation.record(event.record(effect), bound);
    (effect, evicted)
}

/// What happened to a delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Its id was seen before; nothing changed.
    Duplicate,
    /// It reached a known operation.
    Matched {
        id: OperationId,
        effect: EventEffect,
    },
    /// Its operation is not known yet; it waits (bounded in time and count).
    Parked,
    /// It created an observed operation.
    Observed { id: OperationId },
    /// It names no operation; it was kept on its call's timeline.
    CallEvent,
    /// The park was full (it was kept on its call's timeline), or the event names no call
    /// at all (the caller logs it).
    Unmatched,
}

/// How many events of a delivery ended which way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct DeliverySummary {
    pub received: usize,
    pub matched: usize,
    pub duplicates: usize,
    pub parked: usize,
    pub observed: usize,
    pub unmatched: usize,
}

impl DeliverySummary {
    pub fn count(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Duplicate => self.duplicates += 1,
            Delivery::Matched { .. } => self.matched += 1,
            Delivery::Parked => self.parked += 1,
            Delivery::Observed { .. } => self.observed += 1,
            Delivery::CallEvent => {}
            Delivery::Unmatched => self.unmatched += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::operation::{OperationError, OperationStatus, ResultInfo};

    const BOUND: EventBound = EventBound {
        first: 10,
        last: 40,
    };

    fn operation() -> Operation {
        Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("call".into()),
            "ctx".into(),
            OffsetDateTime::UNIX_EPOCH,
        )
    }

    fn event(kind: OperationKind, transition: Option<Transition>) -> IncomingEvent {
        IncomingEvent {
            id: Some("e1".into()),
            event_type: "Microsoft.Communication.X".into(),
            call: Some(CallRef::CallConnection("call".into())),
            context: Some("ctx".into()),
            kind,
            upstream_id: None,
            cancelled: false,
            upstream_status: None,
            transition,
            received: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(5),
        }
    }

    fn failed() -> Transition {
        Transition::Failed {
            result: Some(ResultInfo {
                code: Some(400),
                sub_code: Some(8523),
                message: Some("nope".into()),
                ..ResultInfo::default()
            }),
            error: OperationError {
                code: "RemoveParticipantFailed".into(),
                message: "nope".into(),
            },
        }
    }

    #[test]
    fn upstream_ids_match_ignoring_case_and_hyphens() {
        assert_eq!(
            upstream_key("0FE0623FD62842EDB4BD8AC290072CC5"),
            upstream_key("0fe0623f-d628-42ed-b4bd-8ac290072cc5")
        );
        assert_eq!(&*upstream_key("Op-1"), "op1");
    }

    #[test]
    fn own_kind_events_settle_and_are_recorded() {
        let mut op = operation();
        let (effect, _) = apply(
            &mut op,
            &event(OperationKind::RemoveParticipant, Some(failed())),
            BOUND,
        );
        assert_eq!(effect, EventEffect::Applied);
        assert_eq!(op.status, OperationStatus::Failed);
        assert_eq!(op.events.len(), 1);
        assert_eq!(op.events[0].effect, EventEffect::Applied);
        assert_eq!(op.result.as_ref().unwrap().sub_code, Some(8523));
    }

    #[test]
    fn a_second_outcome_is_recorded_but_ignored() {
        let mut op = operation();
        apply(
            &mut op,
            &event(OperationKind::RemoveParticipant, Some(failed())),
            BOUND,
        );
        let (effect, _) = apply(
            &mut op,
            &event(
                OperationKind::RemoveParticipant,
                Some(Transition::Succeeded { result: None }),
            ),
            BOUND,
        );
        assert_eq!(effect, EventEffect::Ignored);
        assert_eq!(op.status, OperationStatus::Failed);
        assert_eq!(op.events.len(), 2);
    }

    #[test]
    fn other_kinds_are_only_recorded() {
        let mut op = operation();
        let play = OperationKind::Observed("play".into());
        let (effect, _) = apply(
            &mut op,
            &event(play, Some(Transition::Succeeded { result: None })),
            BOUND,
        );
        assert_eq!(effect, EventEffect::Recorded);
        assert_eq!(op.status, OperationStatus::NotStarted);
        assert_eq!(op.events.len(), 1);
    }

    #[test]
    fn unknown_operations_park_or_are_observed() {
        let remove = event(OperationKind::RemoveParticipant, None);
        assert!(remove.should_park());
        let play = event(
            OperationKind::Observed("play".into()),
            Some(Transition::Succeeded { result: None }),
        );
        assert!(!play.should_park());
        let (call, context) = play.names().unwrap();
        let observed = play.observed_operation(call, context);
        assert_eq!(observed.status, OperationStatus::Succeeded);
        assert_eq!(observed.kind.as_str(), "play");
        assert_eq!(observed.context, "ctx");
        assert_eq!(observed.events.len(), 1);
        let started = event(
            OperationKind::Observed("play".into()),
            Some(Transition::Started),
        );
        assert_eq!(
            started.observed_operation(call, context).status,
            OperationStatus::Running
        );
    }

    #[test]
    fn call_level_events_name_no_operation() {
        let mut e = event(OperationKind::Observed("callConnected".into()), None);
        assert_eq!(
            e.names(),
            Some((&CallRef::CallConnection("call".into()), "ctx"))
        );
        e.context = None;
        assert_eq!(e.names(), None);
        e.context = Some("ctx".into());
        e.call = None;
        assert_eq!(e.names(), None);
    }
}
