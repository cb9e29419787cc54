//! `OperationStore`: the concurrent operation tracker.
//!
//! Owns every operation, the (call, context) index, parked callbacks, the duplicate filter,
//! per-call timelines and long-poll waiters. It hands out owned snapshots only and runs
//! mutations as short closures under one DashMap entry lock, so no guard ever escapes or
//! lives across an `.await`. It does no I/O and no logging: what expires is returned to the
//! caller ([`SweepReport`]), which logs and counts it.
//!
//! Lock order: an `index` entry may be held while an `operations` entry is taken (create,
//! observe), never the reverse. Every other access holds a single entry at a time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::OperationsConfig;
use crate::correlation::{self, ContextKey, IncomingEvent};
use crate::operation::{
    CallRef, EventEffect, EventRecord, Operation, OperationId, OperationKind, OperationStatus,
    Transition,
};

/// A cheap handle to the shared tracker.
#[derive(Clone)]
pub struct OperationStore {
    inner: Arc<Inner>,
}

struct Inner {
    operations: DashMap<OperationId, Operation>,
    index: DashMap<ContextKey, Slot>,
    /// Event ids seen, and when.
    seen: DashMap<Box<str>, Instant>,
    calls: DashMap<CallRef, CallTimeline>,
    waiters: DashMap<OperationId, Arc<Notify>>,
    parked: AtomicUsize,
    /// Long polls currently waiting.
    waiting: AtomicUsize,
    parked_expired: AtomicU64,
    parked_overflow: AtomicU64,
    limits: Limits,
}

struct Limits {
    park_ttl: Duration,
    park_max: usize,
    dedupe_ttl: Duration,
    retention: Duration,
    call_events_max: usize,
}

/// What an index key points at: the operation, or the callbacks waiting for it.
enum Slot {
    Operation(OperationId),
    Parked(Vec<ParkedEvent>),
}

struct ParkedEvent {
    event: IncomingEvent,
    at: Instant,
}

struct CallTimeline {
    events: VecDeque<EventRecord>,
    updated: OffsetDateTime,
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

/// A client-supplied context already names a running operation on the same call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("operation {0} with the same context is still running on this call")]
pub struct ContextInUse(pub OperationId);

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Parked events whose operation never appeared; they were moved to their call's timeline.
    pub expired: Vec<IncomingEvent>,
    /// Settled operations past retention.
    pub removed_operations: usize,
}

/// Filters of the list endpoint.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub context: Option<String>,
    pub call_connection_id: Option<String>,
    pub call_id: Option<String>,
    pub status: Option<OperationStatus>,
    pub kind: Option<OperationKind>,
    /// Only operations older than this id (the paging cursor).
    pub before: Option<OperationId>,
}

/// Counters for health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub operations: usize,
    pub parked: usize,
    pub waiting: usize,
    pub parked_expired: u64,
    pub parked_overflow: u64,
}

impl Slot {
    fn operation_id(&self) -> Option<OperationId> {
        match self {
            Self::Operation(id) => Some(*id),
            Self::Parked(_) => None,
        }
    }
}

impl OperationStore {
    /// An empty store bounded by `config`.
    pub fn new(config: &OperationsConfig) -> Self {
        let limits = Limits {
            park_ttl: Duration::from_millis(config.park_ttl_ms),
            park_max: config.park_max,
            dedupe_ttl: Duration::from_secs(config.dedupe_ttl_secs),
            retention: Duration::from_secs(config.retention_secs),
            call_events_max: config.call_events_max.max(1),
        };
        Self {
            inner: Arc::new(Inner {
                operations: DashMap::new(),
                index: DashMap::new(),
                seen: DashMap::new(),
                calls: DashMap::new(),
                waiters: DashMap::new(),
                parked: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                parked_expired: AtomicU64::new(0),
                parked_overflow: AtomicU64::new(0),
                limits,
            }),
        }
    }

    /// Adds a new operation, claims its (call, context) and applies the callbacks parked
    /// for it. Fails when the context names a running operation on the same call.
    pub fn create(&self, operation: Operation) -> Result<Operation, ContextInUse> {
        let inner = &self.inner;
        let id = operation.id;
        let key = ContextKey {
            call: operation.call.clone(),
            context: operation.context.as_str().into(),
        };
        // Inserted before the index points at it, so whoever finds the id finds the record.
        inner.operations.insert(id, operation);
        let parked = match inner.index.entry(key) {
            Entry::Vacant(vacant) => {
                vacant.insert(Slot::Operation(id));
                Vec::new()
            }
            Entry::Occupied(mut occupied) => match occupied.get() {
                Slot::Operation(existing) => {
                    let running = inner
                        .operations
                        .get(existing)
                        .is_some_and(|op| !op.status.is_terminal());
                    if running {
                        let existing = *existing;
                        drop(occupied);
                        inner.operations.remove(&id);
                        return Err(ContextInUse(existing));
                    }
                    occupied.insert(Slot::Operation(id));
                    Vec::new()
                }
                Slot::Parked(_) => match occupied.insert(Slot::Operation(id)) {
                    Slot::Parked(events) => events,
                    Slot::Operation(_) => unreachable!("the slot was parked"),
                },
            },
        };
        inner.parked.fetch_sub(parked.len(), Ordering::Relaxed);
        let snapshot = {
            let mut op = inner.operations.get_mut(&id).expect("inserted above");
            for parked in &parked {
                correlation::apply(&mut op, &parked.event);
            }
            op.clone()
        };
        if snapshot.status.is_terminal() {
            self.wake(id);
        }
        Ok(snapshot)
    }

    /// Applies an upstream answer (accepted, rejected) to an operation.
    pub fn transition(
        &self,
        id: OperationId,
        transition: Transition,
        now: OffsetDateTime,
    ) -> Option<Operation> {
        let snapshot = {
            let mut op = self.inner.operations.get_mut(&id)?;
            // A refused transition (the callback settled it first) leaves it as it is.
            let _ = op.apply(transition, now);
            op.clone()
        };
        if snapshot.status.is_terminal() {
            self.wake(id);
        }
        Some(snapshot)
    }

    /// Delivers one callback event: drops duplicates, then applies, parks or observes it.
    pub fn deliver(&self, event: IncomingEvent, now: Instant) -> Delivery {
        let inner = &self.inner;
        if let Some(event_id) = &event.id {
            match inner.seen.entry(event_id.as_str().into()) {
                Entry::Occupied(_) => return Delivery::Duplicate,
                Entry::Vacant(vacant) => {
                    vacant.insert(now);
                }
            }
        }
        let Some(key) = event.key() else {
            if event.call.is_none() {
                // Neither call nor context: nothing to keep it on; the caller logs it.
                return Delivery::Unmatched;
            }
            self.push_call_event(&event, EventEffect::Recorded);
            return Delivery::CallEvent;
        };
        // Fast path: a shared read of the index, then one operation entry.
        let known = inner.index.get(&key).and_then(|slot| slot.operation_id());
        if let Some(id) = known {
            if let Some(delivery) = self.apply_to(id, &event) {
                return delivery;
            }
        }
        match inner.index.entry(key) {
            Entry::Occupied(mut occupied) => match occupied.get_mut() {
                Slot::Operation(id) => {
                    let id = *id;
                    if inner.operations.contains_key(&id) {
                        drop(occupied);
                        // Created between the read above and this entry: apply it there.
                        return self.apply_to(id, &event).unwrap_or(Delivery::Unmatched);
                    }
                    // The operation was retired; the context is free again.
                    let key = occupied.key().clone();
                    match self.settle_unknown(&key, &event, now) {
                        Ok(slot) => {
                            let delivery = slot_delivery(&slot);
                            occupied.insert(slot);
                            delivery
                        }
                        Err(delivery) => {
                            occupied.remove();
                            delivery
                        }
                    }
                }
                // While callbacks wait under this key, every event for it waits with them,
                // so that they are applied in arrival order when the operation appears.
                Slot::Parked(events) => {
                    if !self.reserve_park(&event) {
                        return Delivery::Unmatched;
                    }
                    events.push(ParkedEvent { event, at: now });
                    Delivery::Parked
                }
            },
            Entry::Vacant(vacant) => {
                let key = vacant.key().clone();
                match self.settle_unknown(&key, &event, now) {
                    Ok(slot) => {
                        let delivery = slot_delivery(&slot);
                        vacant.insert(slot);
                        delivery
                    }
                    Err(delivery) => delivery,
                }
            }
        }
    }

    /// A snapshot of one operation.
    pub fn get(&self, id: OperationId) -> Option<Operation> {
        self.inner.operations.get(&id).map(|op| op.clone())
    }

    /// Waits until the operation settles or `timeout` passes; woken by the settling
    /// callback itself. `None` when the operation is unknown.
    pub async fn wait_settled(&self, id: OperationId, timeout: Duration) -> Option<Operation> {
        let notify = self.inner.waiters.entry(id).or_default().clone();
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before the check, so a settle between the check and the await wakes us.
        notified.as_mut().enable();
        let operation = self.get(id)?;
        if operation.status.is_terminal() || timeout.is_zero() {
            return Some(operation);
        }
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        // Decrements however the wait ends, including when the caller drops this future.
        let _waiting = scopeguard(&self.inner.waiting);
        let _ = tokio::time::timeout(timeout, notified).await;
        self.get(id)
    }

    /// Operations matching `filter`, newest first, at most `limit`, and whether more follow.
    pub fn list(&self, filter: &ListFilter, limit: usize) -> (Vec<Operation>, bool) {
        let mut ids: Vec<OperationId> = self
            .inner
            .operations
            .iter()
            .filter(|entry| filter.matches(entry.value()))
            .map(|entry| *entry.key())
            .collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let more = ids.len() > limit;
        let operations = ids
            .into_iter()
            .take(limit)
            .filter_map(|id| self.get(id))
            .collect();
        (operations, more)
    }

    /// The events kept for a call (those naming no operation, and expired parked ones).
    pub fn call_events(&self, call: &CallRef) -> Option<Vec<EventRecord>> {
        self.inner
            .calls
            .get(call)
            .map(|timeline| timeline.events.iter().cloned().collect())
    }

    /// Current counters.
    pub fn stats(&self) -> StoreStats {
        let inner = &self.inner;
        StoreStats {
            operations: inner.operations.len(),
            parked: inner.parked.load(Ordering::Relaxed),
            waiting: inner.waiting.load(Ordering::Relaxed),
            parked_expired: inner.parked_expired.load(Ordering::Relaxed),
            parked_overflow: inner.parked_overflow.load(Ordering::Relaxed),
        }
    }

    /// Expires parked events, duplicate-filter entries, settled operations past retention
    /// and idle call timelines.
    pub fn sweep(&self, now: Instant, wall_now: OffsetDateTime) -> SweepReport {
        let inner = &self.inner;
        let limits = &inner.limits;
        let mut report = SweepReport::default();

        inner.index.retain(|_, slot| match slot {
            Slot::Operation(_) => true,
            Slot::Parked(events) => {
                events.retain(|parked| {
                    let keep = now.duration_since(parked.at) < limits.park_ttl;
                    if !keep {
                        report.expired.push(parked.event.clone());
                    }
                    keep
                });
                !events.is_empty()
            }
        });
        let expired = report.expired.len();
        inner.parked.fetch_sub(expired, Ordering::Relaxed);
        inner
            .parked_expired
            .fetch_add(expired as u64, Ordering::Relaxed);
        for event in &report.expired {
            self.push_call_event(event, EventEffect::Unmatched);
        }

        inner
            .seen
            .retain(|_, at| now.duration_since(*at) < limits.dedupe_ttl);

        let cutoff = wall_now - limits.retention;
        let old = |op: &Operation| op.status.is_terminal() && op.last_updated_date_time < cutoff;
        let retired: Vec<OperationId> = inner
            .operations
            .iter()
            .filter(|entry| old(entry.value()))
            .map(|entry| *entry.key())
            .collect();
        for id in retired {
            let Some((_, op)) = inner.operations.remove_if(&id, |_, op| old(op)) else {
                continue;
            };
            let key = ContextKey {
                call: op.call,
                context: op.context.into(),
            };
            inner
                .index
                .remove_if(&key, |_, slot| slot.operation_id() == Some(id));
            report.removed_operations += 1;
        }
        inner.calls.retain(|_, timeline| timeline.updated >= cutoff);
        inner
            .waiters
            .retain(|id, _| inner.operations.contains_key(id));
        report
    }

    /// For an event naming an unknown operation: the slot to put in the index (parked
    /// events or a new observed operation), or the delivery when nothing is stored.
    fn settle_unknown(
        &self,
        key: &ContextKey,
        event: &IncomingEvent,
        now: Instant,
    ) -> Result<Slot, Delivery> {
        if event.should_park() {
            if !self.reserve_park(event) {
                return Err(Delivery::Unmatched);
            }
            return Ok(Slot::Parked(vec![ParkedEvent {
                event: event.clone(),
                at: now,
            }]));
        }
        let operation = event.observed_operation(key);
        let id = operation.id;
        self.inner.operations.insert(id, operation);
        Ok(Slot::Operation(id))
    }

    /// Takes a place in the park, or records the event on its call when the park is full.
    fn reserve_park(&self, event: &IncomingEvent) -> bool {
        let inner = &self.inner;
        if inner.parked.fetch_add(1, Ordering::Relaxed) >= inner.limits.park_max {
            inner.parked.fetch_sub(1, Ordering::Relaxed);
            inner.parked_overflow.fetch_add(1, Ordering::Relaxed);
            self.push_call_event(event, EventEffect::Unmatched);
            return false;
        }
        true
    }

    fn apply_to(&self, id: OperationId, event: &IncomingEvent) -> Option<Delivery> {
        let (effect, settled) = {
            let mut op = self.inner.operations.get_mut(&id)?;
            let effect = correlation::apply(&mut op, event);
            (
                effect,
                effect == EventEffect::Applied && op.status.is_terminal(),
            )
        };
        if settled {
            self.wake(id);
        }
        Some(Delivery::Matched { id, effect })
    }

    fn push_call_event(&self, event: &IncomingEvent, effect: EventEffect) {
        let Some(call) = &event.call else {
            return;
        };
        let max = self.inner.limits.call_events_max;
        let mut timeline = self
            .inner
            .calls
            .entry(call.clone())
            .or_insert_with(|| CallTimeline {
                events: VecDeque::new(),
                updated: event.received,
            });
        if timeline.events.len() >= max {
            timeline.events.pop_front();
        }
        timeline.events.push_back(event.record(effect));
        timeline.updated = event.received;
    }

    fn wake(&self, id: OperationId) {
        if let Some((_, notify)) = self.inner.waiters.remove(&id) {
            notify.notify_waiters();
        }
    }
}

/// Decrements `counter` when dropped.
struct CounterGuard<'a>(&'a AtomicUsize);

impl Drop for CounterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn scopeguard(counter: &AtomicUsize) -> CounterGuard<'_> {
    CounterGuard(counter)
}

fn slot_delivery(slot: &Slot) -> Delivery {
    match slot {
        Slot::Operation(id) => Delivery::Observed { id: *id },
        Slot::Parked(_) => Delivery::Parked,
    }
}

impl ListFilter {
    fn matches(&self, op: &Operation) -> bool {
        let call_matches = match &op.call {
            CallRef::CallConnection(id) => {
                self.call_id.is_none()
                    && self
                        .call_connection_id
                        .as_ref()
                        .is_none_or(|want| want == id)
            }
            CallRef::Call(id) => {
                self.call_connection_id.is_none()
                    && self.call_id.as_ref().is_none_or(|want| want == id)
            }
        };
        call_matches
            && self.context.as_ref().is_none_or(|want| *want == op.context)
            && self.status.is_none_or(|want| want == op.status)
            && self.kind.as_ref().is_none_or(|want| *want == op.kind)
            && self.before.is_none_or(|before| op.id < before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::operation::{OperationError, ResultInfo};

    fn config() -> OperationsConfig {
        crate::config::Config::embedded().operations
    }

    fn store() -> OperationStore {
        OperationStore::new(&config())
    }

    fn call(id: &str) -> CallRef {
        CallRef::CallConnection(id.into())
    }

    fn removal(call_id: &str, context: &str) -> Operation {
        Operation::new(
            OperationKind::RemoveParticipant,
            call(call_id),
            context.into(),
            OffsetDateTime::now_utc(),
        )
    }

    fn succeeded() -> Option<Transition> {
        Some(Transition::Succeeded {
            result: Some(ResultInfo {
                code: Some(200),
                sub_code: Some(0),
                message: None,
            }),
        })
    }

    fn failed() -> Option<Transition> {
        Some(Transition::Failed {
            result: None,
            error: OperationError {
                code: "RemoveParticipantFailed".into(),
                message: "no".into(),
            },
        })
    }

    fn event(
        id: &str,
        call_id: &str,
        context: Option<&str>,
        transition: Option<Transition>,
    ) -> IncomingEvent {
        IncomingEvent {
            id: Some(id.into()),
            event_type: "Microsoft.Communication.RemoveParticipantSucceeded".into(),
            call: Some(call(call_id)),
            context: context.map(Into::into),
            kind: OperationKind::RemoveParticipant,
            transition,
            received: OffsetDateTime::now_utc(),
        }
    }

    #[test]
    fn a_running_context_is_claimed_once_per_call() {
        let store = store();
        let first = store.create(removal("c1", "ctx")).unwrap();
        let clash = removal("c1", "ctx");
        let clash_id = clash.id;
        assert_eq!(store.create(clash), Err(ContextInUse(first.id)));
        assert_eq!(
            store.get(clash_id),
            None,
            "the refused operation is not kept"
        );
        store.create(removal("c2", "ctx")).unwrap();
        // Once the first settles, its context is free again.
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), Instant::now());
        let second = store.create(removal("c1", "ctx")).unwrap();
        let matched = store.deliver(event("e2", "c1", Some("ctx"), failed()), Instant::now());
        assert_eq!(
            matched,
            Delivery::Matched {
                id: second.id,
                effect: EventEffect::Applied
            }
        );
        assert_eq!(
            store.get(first.id).unwrap().status,
            OperationStatus::Succeeded
        );
    }

    #[test]
    fn a_matching_event_settles_and_a_duplicate_changes_nothing() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let now = Instant::now();
        let delivery = store.deliver(event("e1", "c1", Some("ctx"), succeeded()), now);
        assert_eq!(
            delivery,
            Delivery::Matched {
                id: op.id,
                effect: EventEffect::Applied
            }
        );
        let settled = store.get(op.id).unwrap();
        assert_eq!(settled.status, OperationStatus::Succeeded);
        assert_eq!(settled.result.as_ref().unwrap().code, Some(200));
        assert_eq!(
            store.deliver(event("e1", "c1", Some("ctx"), failed()), now),
            Delivery::Duplicate
        );
        assert_eq!(store.get(op.id).unwrap(), settled);
    }

    #[test]
    fn the_upstream_answer_never_regresses_a_settled_operation() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let now = OffsetDateTime::now_utc();
        let running = store.transition(op.id, Transition::Accepted, now).unwrap();
        assert_eq!(running.status, OperationStatus::Running);
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), Instant::now());
        let after = store.transition(op.id, Transition::Accepted, now).unwrap();
        assert_eq!(after.status, OperationStatus::Succeeded);
        assert_eq!(
            store.transition(OperationId::new(), Transition::Accepted, now),
            None
        );
    }

    #[test]
    fn an_early_event_is_parked_and_applied_at_creation() {
        let store = store();
        let now = Instant::now();
        assert_eq!(
            store.deliver(event("e1", "c1", Some("ctx"), failed()), now),
            Delivery::Parked
        );
        assert_eq!(store.stats().parked, 1);
        let created = store.create(removal("c1", "ctx")).unwrap();
        assert_eq!(created.status, OperationStatus::Failed);
        assert_eq!(created.events.len(), 1);
        assert_eq!(store.stats().parked, 0);
    }

    #[test]
    fn parked_events_expire_onto_the_call_timeline() {
        let store = store();
        let t0 = Instant::now();
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), t0);
        let report = store.sweep(t0 + Duration::from_millis(100), OffsetDateTime::now_utc());
        assert!(report.expired.is_empty(), "not yet");
        let report = store.sweep(t0 + Duration::from_secs(10), OffsetDateTime::now_utc());
        assert_eq!(report.expired.len(), 1);
        let stats = store.stats();
        assert_eq!((stats.parked, stats.parked_expired), (0, 1));
        let events = store.call_events(&call("c1")).unwrap();
        assert_eq!(events[0].effect, EventEffect::Unmatched);
        // The operation that comes later starts clean.
        let created = store.create(removal("c1", "ctx")).unwrap();
        assert_eq!(created.status, OperationStatus::NotStarted);
    }

    #[test]
    fn the_park_is_bounded() {
        let mut config = config();
        config.park_max = 2;
        let store = OperationStore::new(&config);
        let now = Instant::now();
        for n in 0..2 {
            let delivery = store.deliver(
                event(&format!("e{n}"), "c1", Some(&format!("x{n}")), succeeded()),
                now,
            );
            assert_eq!(delivery, Delivery::Parked);
        }
        assert_eq!(
            store.deliver(event("e9", "c1", Some("x9"), succeeded()), now),
            Delivery::Unmatched
        );
        let stats = store.stats();
        assert_eq!((stats.parked, stats.parked_overflow), (2, 1));
        assert_eq!(store.call_events(&call("c1")).unwrap().len(), 1);
    }

    #[test]
    fn other_kinds_become_observed_operations() {
        let store = store();
        let mut play = event("e1", "c1", Some("p"), Some(Transition::Started));
        play.kind = OperationKind::Observed("play".into());
        let Delivery::Observed { id } = store.deliver(play.clone(), Instant::now()) else {
            panic!("not observed");
        };
        assert_eq!(store.get(id).unwrap().status, OperationStatus::Running);
        play.id = Some("e2".into());
        play.transition = succeeded();
        assert_eq!(
            store.deliver(play, Instant::now()),
            Delivery::Matched {
                id,
                effect: EventEffect::Applied
            }
        );
        let observed = store.get(id).unwrap();
        assert_eq!(observed.status, OperationStatus::Succeeded);
        assert_eq!(observed.kind.as_str(), "play");
        assert_eq!(observed.events.len(), 2);
    }

    #[test]
    fn call_events_are_kept_newest_last_and_capped() {
        let mut config = config();
        config.call_events_max = 3;
        let store = OperationStore::new(&config);
        for n in 0..5 {
            let delivery = store.deliver(event(&format!("e{n}"), "c1", None, None), Instant::now());
            assert_eq!(delivery, Delivery::CallEvent);
        }
        let ids: Vec<_> = store
            .call_events(&call("c1"))
            .unwrap()
            .into_iter()
            .map(|e| e.id.unwrap())
            .collect();
        assert_eq!(ids, ["e2", "e3", "e4"]);
        let mut nowhere = event("e9", "c1", Some("x"), None);
        nowhere.call = None;
        assert_eq!(store.deliver(nowhere, Instant::now()), Delivery::Unmatched);
    }

    #[test]
    fn retention_retires_settled_operations_and_frees_their_context() {
        let store = store();
        let op = store.create(removal("c1", "old")).unwrap();
        let running = store.create(removal("c1", "running")).unwrap();
        let long_ago = OffsetDateTime::now_utc() - time::Duration::days(2);
        store.transition(op.id, Transition::Succeeded { result: None }, long_ago);
        let report = store.sweep(Instant::now(), OffsetDateTime::now_utc());
        assert_eq!(report.removed_operations, 1);
        assert_eq!(store.get(op.id), None);
        assert!(store.get(running.id).is_some(), "running operations stay");
        store.create(removal("c1", "old")).unwrap();
    }

    #[test]
    fn list_filters_and_pages_newest_first() {
        let store = store();
        let ids: Vec<OperationId> = (0..4)
            .map(|n| store.create(removal("c1", &format!("ctx{n}"))).unwrap().id)
            .collect();
        store.create(removal("c2", "ctx0")).unwrap();
        let by_call = ListFilter {
            call_connection_id: Some("c1".into()),
            ..ListFilter::default()
        };
        let (page, more) = store.list(&by_call, 3);
        let got: Vec<_> = page.iter().map(|op| op.id).collect();
        assert_eq!(got, [ids[3], ids[2], ids[1]]);
        assert!(more);
        let rest = ListFilter {
            before: Some(ids[1]),
            ..by_call.clone()
        };
        let (page, more) = store.list(&rest, 3);
        assert_eq!(page.iter().map(|op| op.id).collect::<Vec<_>>(), [ids[0]]);
        assert!(!more);
        let by_context = ListFilter {
            context: Some("ctx0".into()),
            ..ListFilter::default()
        };
        assert_eq!(store.list(&by_context, 10).0.len(), 2);
        let running = ListFilter {
            status: Some(OperationStatus::Running),
            ..ListFilter::default()
        };
        assert!(store.list(&running, 10).0.is_empty());
        let graph = ListFilter {
            call_id: Some("c1".into()),
            ..ListFilter::default()
        };
        assert!(store.list(&graph, 10).0.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_or_is_woken_by_the_settling_event() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let still = store
            .wait_settled(op.id, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(still.status, OperationStatus::NotStarted);
        assert_eq!(
            store
                .wait_settled(OperationId::new(), Duration::from_secs(5))
                .await,
            None
        );

        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait_settled(op.id, Duration::from_secs(3600)).await })
        };
        while store.stats().waiting == 0 {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), Instant::now());
        let woken = waiter.await.unwrap().unwrap();
        assert_eq!(woken.status, OperationStatus::Succeeded);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "woken, not timed out"
        );
        assert_eq!(store.stats().waiting, 0);
        // A settled operation answers at once.
        let again = store
            .wait_settled(op.id, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(again.status, OperationStatus::Succeeded);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_duplicate_deliveries_apply_each_event_once() {
        let store = store();
        let ops: Vec<Operation> = (0..200)
            .map(|n| {
                store
                    .create(removal(&format!("c{}", n % 7), &format!("ctx{n}")))
                    .unwrap()
            })
            .collect();
        let events: Vec<IncomingEvent> = (0..200)
            .map(|n| {
                let outcome = if n % 3 == 0 { failed() } else { succeeded() };
                event(
                    &format!("e{n}"),
                    &format!("c{}", n % 7),
                    Some(&format!("ctx{n}")),
                    outcome,
                )
            })
            .collect();
        let tasks: Vec<_> = (0..8)
            .map(|task| {
                let store = store.clone();
                let mut events = events.clone();
                // Each task delivers in its own order.
                events.rotate_left(task * 25);
                if task % 2 == 1 {
                    events.reverse();
                }
                tokio::spawn(async move {
                    for event in events {
                        store.deliver(event, Instant::now());
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        for (n, op) in ops.iter().enumerate() {
            let op = store.get(op.id).unwrap();
            let want = if n % 3 == 0 {
                OperationStatus::Failed
            } else {
                OperationStatus::Succeeded
            };
            assert_eq!(op.status, want, "operation {n}");
            assert_eq!(
                op.events.len(),
                1,
                "operation {n}: duplicates must be dropped"
            );
            assert_eq!(op.events[0].effect, EventEffect::Applied);
        }
    }
}
