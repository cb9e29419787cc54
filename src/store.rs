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
}
