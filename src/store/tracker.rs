//! `OperationStore`: the concurrent operation tracker.
//!
//! Owns every operation, the (call, context) index, parked callbacks, the duplicate filter,
//! per-call timelines and long-poll waiters. It hands out owned snapshots only and runs
//! mutations as short closures under one DashMap entry lock, so no guard ever escapes or
//! lives across an `.await`. It does no I/O and no logging: what expires is returned to the
//! caller ([`SweepReport`]), which logs and counts it.
//!
//! Lock order: an `index` or `upstream` entry may be held while an `operations` or `calls`
//! entry is taken (create, observe), and the sweep reads `operations` while it retains
//! `waiters` and while it holds its agenda (which nothing else locks); never the reverse. Every other access holds a single
//! entry at a time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{CallbackTimeouts, OperationsConfig};
use crate::correlation::{self, Delivery, IncomingEvent, UpstreamId, upstream_key};
use crate::operation::{
    CallRef, CancelledOperation, EventBound, EventEffect, EventRecord, FINAL_STATUSES,
    ISSUED_KINDS, NotifyTarget, Operation, OperationError, OperationId, OperationKind,
    OperationStatus, ResultInfo, SettleReason, Transition,
};
use crate::reconcile::{self, AtDeadline, Conclusion, ReconcileJob};

/// A cheap handle to the shared tracker.
#[derive(Clone)]
pub struct OperationStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Boxed: a map's buckets are sized for its values, and a grown table is up to half
    /// empty, so inline operations would cost twice their size.
    operations: DashMap<OperationId, Box<Operation>>,
    /// By the [`Digest`] of (call, context): the strings stay on the operation alone.
    index: DashMap<Digest, Slot>,
    /// Digests of the event ids seen, and when.
    seen: DashMap<Digest, Instant>,
    digests: Digests,
    calls: DashMap<CallRef, CallTimeline>,
    /// Upstream operation ids ([`upstream_key`] form) of known operations: Graph
    /// notifications name an operation by its id when they carry no clientContext.
    upstream: DashMap<Box<str>, OperationId>,
    /// `cancelMediaProcessing` operations per call, oldest first, with when they were sent:
    /// the operations they cancelled are linked to them.
    cancels: DashMap<CallRef, Vec<(OperationId, OffsetDateTime)>>,
    waiters: DashMap<OperationId, Arc<Notify>>,
    /// New operations for the [`Agenda`], sent without a lock from any request.
    schedule: mpsc::Sender<Due>,
    /// Locked by the sweep alone.
    agenda: Mutex<Agenda>,
    parked: AtomicUsize,
    /// Long polls currently waiting.
    waiting: AtomicUsize,
    parked_expired: AtomicU64,
    parked_overflow: AtomicU64,
    /// The next call event's sequence number, for every call: a timeline dropped by the
    /// sweep and started again never reuses one, so the record tells them apart.
    call_event_seq: AtomicU64,
    /// Operations created, by [`ISSUED_KINDS`] index.
    started: [AtomicU64; 2],
    /// Operations settled, by [`ISSUED_KINDS`] and [`FINAL_STATUSES`] index.
    settled: [[AtomicU64; 3]; 2],
    limits: Limits,
}

struct Limits {
    park_ttl: Duration,
    park_max: usize,
    dedupe_ttl: Duration,
    retention: Duration,
    call_events_max: usize,
    events: EventBound,
    timeouts: CallbackTimeouts,
    reconcile: bool,
    reconcile_timeout: Duration,
    call_end_grace: Duration,
    /// A scratch store (`scratch`) leaves expired parked events to the shared store's own
    /// sweep: at `restore` it drops them instead of moving them to their call's timeline.
    scratch: bool,
}

/// A 128-bit keyed digest standing in for a string key: two SipHashes under this process's
/// random keys. Collisions (about 2^-64 for a billion keys) are not a practical concern,
/// and an attacker cannot aim for one without the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Digest([u64; 2]);

/// The keys of [`Digest`].
struct Digests([std::hash::RandomState; 2]);

impl Digests {
    fn new() -> Self {
        Self([std::hash::RandomState::new(), std::hash::RandomState::new()])
    }

    fn of(&self, value: impl std::hash::Hash + Copy) -> Digest {
        use std::hash::BuildHasher;
        Digest(self.0.each_ref().map(|keys| keys.hash_one(value)))
    }

    /// The index key of `context` on `call`.
    fn context(&self, call: &CallRef, context: &str) -> Digest {
        self.of((call, context))
    }

    /// The key of an operation's (call, context).
    fn operation(&self, op: &Operation) -> Digest {
        self.context(&op.call, &op.context)
    }

    /// The index key an event names, if it names one.
    fn event(&self, event: &IncomingEvent) -> Option<Digest> {
        let (call, context) = event.names()?;
        Some(self.context(call, context))
    }

    /// The index key under which events naming an operation by its upstream id alone wait
    /// for it (a different tuple from a context's, so the two never meet).
    fn upstream_park(&self, key: &str) -> Digest {
        self.of(("upstream-park", key))
    }

    /// Where `event` waits when its operation is unknown: under its (call, context), else,
    /// for a kind callops issues named only by upstream id, under that id.
    fn park(&self, event: &IncomingEvent) -> Option<Digest> {
        self.event(event).or_else(|| {
            let upstream_id = event.upstream_id.as_ref()?;
            (event.call.is_some() && event.should_park())
                .then(|| self.upstream_park(upstream_id.key()))
        })
    }
}

/// When to look at an operation again (Unix milliseconds), and which.
type Due = (i64, OperationId);

/// When the sweep looks at each operation again: at its callback deadline while it runs, at
/// the end of its retention once it has settled. Every operation has one entry, so a sweep
/// touches only the operations that are due instead of scanning them all.
struct Agenda {
    incoming: mpsc::Receiver<Due>,
    due: BinaryHeap<Reverse<Due>>,
}

/// `at` in Unix milliseconds, rounded up (an entry is never due before its time).
pub fn unix_millis(at: OffsetDateTime) -> i64 {
    let nanos = at.unix_timestamp_nanos();
    i64::try_from(nanos.div_euclid(1_000_000) + i128::from(nanos.rem_euclid(1_000_000) != 0))
        .unwrap_or(i64::MAX)
}

/// The index of an issued kind in [`ISSUED_KINDS`].
fn issued_index(kind: &OperationKind) -> Option<usize> {
    ISSUED_KINDS.iter().position(|issued| issued == kind)
}

/// What an index key points at: the operation, or the callbacks waiting for it.
enum Slot {
    Operation(OperationId),
    /// Boxed: rare, and inline it would make every slot (one per operation) larger.
    #[expect(clippy::box_collection, reason = "keeps the common slot 24 bytes")]
    Parked(Box<Vec<ParkedEvent>>),
}

struct ParkedEvent {
    event: IncomingEvent,
    at: Instant,
}

/// What is kept per call: events naming no operation, and the call's operations that were
/// created unsettled (so that a call's end does not scan every operation). The list is
/// append-only on the request path; the sweep drops settled ones, so settling an operation
/// never touches it.
struct CallTimeline {
    /// With their sequence numbers.
    events: VecDeque<(u64, EventRecord)>,
    open: Vec<OperationId>,
    updated: OffsetDateTime,
}

impl CallTimeline {
    fn new(at: OffsetDateTime) -> Self {
        Self {
            events: VecDeque::new(),
            open: Vec::new(),
            updated: at,
        }
    }
}

/// What a delivery or a creation hands to its caller as it happens, besides its answer, so
/// that the caller can keep a durable copy without copying every event.
#[derive(Debug)]
pub enum Noted<'a> {
    /// The event was parked.
    Parked(&'a IncomingEvent),
    /// This earlier event was dropped from `operation`'s timeline to make room
    /// ([`EventBound`]): the operation no longer lists its id.
    Evicted {
        operation: OperationId,
        record: EventRecord,
    },
    /// `record` was added to `call`'s timeline under sequence number `seq`; the timeline
    /// now keeps the events from `kept_from` on.
    CallEvent {
        call: &'a CallRef,
        seq: u64,
        kept_from: u64,
        record: &'a EventRecord,
    },
}

/// An event added to a call's timeline, as [`Noted::CallEvent`] tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEventAdded {
    pub call: CallRef,
    pub seq: u64,
    pub kept_from: u64,
    pub record: EventRecord,
}

impl CallEventAdded {
    fn from_noted(noted: Noted<'_>) -> Option<Self> {
        match noted {
            Noted::CallEvent {
                call,
                seq,
                kept_from,
                record,
            } => Some(Self {
                call: call.clone(),
                seq,
                kept_from,
                record: record.clone(),
            }),
            Noted::Parked(_) | Noted::Evicted { .. } => None,
        }
    }
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
    pub removed_operations: Vec<OperationId>,
    /// Operations that heard no final callback in time and failed with `CallbackTimeout`.
    pub timed_out: Vec<OperationId>,
    /// Operations past their deadline that the platform is to be asked about now (marked
    /// reconciling until `operations.reconcile_timeout_ms` from now).
    pub reconcile: Vec<ReconcileJob>,
    /// Operations whose call ended and that heard nothing within the grace period: failed
    /// with `CallEnded`.
    pub call_ended: Vec<OperationId>,
    /// What the expired parked events became on their calls' timelines.
    pub call_events: Vec<CallEventAdded>,
    /// Idle call timelines dropped, each with the last sequence number it had used.
    pub retired_calls: Vec<(CallRef, u64)>,
}

/// What a restarted store starts from: the durable record.
#[derive(Debug, Default)]
pub struct Restored {
    /// Every operation kept, with its revision.
    pub operations: Vec<Operation>,
    /// Event ids seen, and when.
    pub seen: Vec<(String, OffsetDateTime)>,
    /// Parked events and when they were parked, in arrival order.
    pub parked: Vec<(IncomingEvent, OffsetDateTime)>,
    /// More names of operations by upstream id ([`upstream_key`] form) than the one each
    /// shows (Graph's `Location` id), where the record keeps them.
    pub upstream: Vec<(String, OperationId)>,
    /// Calls' timelines: their events with their sequence numbers, oldest first.
    pub call_events: Vec<(CallRef, Vec<(u64, EventRecord)>)>,
}

/// What [`OperationStore::restore`] changed in what it was given.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Ids of the parked events no longer parked (applied to their operation, or expired).
    pub unparked: Vec<String>,
    /// Parked events that expired while nothing ran, moved to their call's timeline (and
    /// counted) as the sweep does: `expired` and `call_events` are set.
    pub swept: SweepReport,
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
    /// Operations created since start, by [`ISSUED_KINDS`] index.
    pub started: [u64; 2],
    /// Operations of an issued kind that reached a final status since start (the first
    /// time: a late outcome replacing a callback timeout is not counted again), by
    /// [`ISSUED_KINDS`] index, then [`FINAL_STATUSES`] index.
    pub settled: [[u64; 3]; 2],
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
        Self::with_shards(config, SHARDS, false)
    }

    /// A small store for one transition of a shared store (`redis_store`): loaded with the
    /// few records a request touches, changed by the same code as the hot store, then
    /// read back ([`OperationStore::snapshots`]) and dropped. Few shards: it is built per
    /// request.
    pub(in crate::store) fn scratch(config: &OperationsConfig) -> Self {
        Self::with_shards(config, 2, true)
    }

    fn with_shards(config: &OperationsConfig, shards: usize, scratch: bool) -> Self {
        let limits = Limits {
            park_ttl: Duration::from_millis(config.park_ttl_ms),
            park_max: config.park_max,
            dedupe_ttl: Duration::from_secs(config.dedupe_ttl_secs),
            retention: Duration::from_secs(config.retention_secs),
            call_events_max: config.call_events_max.max(1),
            events: config.event_bound(),
            timeouts: config.callback_timeouts.clone(),
            reconcile: config.reconcile,
            reconcile_timeout: Duration::from_millis(config.reconcile_timeout_ms),
            call_end_grace: Duration::from_millis(config.call_end_grace_ms),
            scratch,
        };
        let (schedule, incoming) = mpsc::channel();
        Self {
            inner: Arc::new(Inner {
                schedule,
                agenda: Mutex::new(Agenda {
                    incoming,
                    due: BinaryHeap::new(),
                }),
                operations: DashMap::with_shard_amount(shards),
                index: DashMap::with_shard_amount(shards),
                seen: DashMap::with_shard_amount(shards),
                digests: Digests::new(),
                calls: DashMap::with_shard_amount(shards),
                upstream: DashMap::with_shard_amount(shards),
                cancels: DashMap::with_shard_amount(shards.min(8)),
                waiters: DashMap::with_shard_amount(shards.min(8)),
                parked: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                parked_expired: AtomicU64::new(0),
                parked_overflow: AtomicU64::new(0),
                call_event_seq: AtomicU64::new(0),
                started: Default::default(),
                settled: Default::default(),
                limits,
            }),
        }
    }

    /// Adds a new operation, claims its (call, context) and applies the callbacks parked
    /// for it. Fails when the context names a running operation on the same call.
    pub fn create(&self, operation: Operation) -> Result<Operation, ContextInUse> {
        self.create_noting(operation, &mut |_| {})
    }

    /// As [`OperationStore::create`], and hands to `note` the parked callbacks that did not
    /// stay on the operation's timeline ([`Noted::Evicted`]): they are no longer parked
    /// either.
    pub fn create_noting(
        &self,
        mut operation: Operation,
        note: &mut dyn FnMut(Noted<'_>),
    ) -> Result<Operation, ContextInUse> {
        let inner = &self.inner;
        let mut evicted = Vec::new();
        let id = operation.id;
        let key = inner.digests.operation(&operation);
        // Everything happens under the key's index entry: a callback for this key waits for
        // it, so parked callbacks are applied first and in arrival order, and a refused
        // operation is never visible. (Lock order: index, then operations.)
        match inner.index.entry(key) {
            Entry::Vacant(vacant) => {
                self.insert_operation(operation.clone());
                vacant.insert(Slot::Operation(id));
            }
            Entry::Occupied(mut occupied) => {
                if let Slot::Operation(existing) = occupied.get() {
                    let running = inner
                        .operations
                        .get(existing)
                        .is_some_and(|op| !op.status.is_terminal());
                    if running {
                        return Err(ContextInUse(*existing));
                    }
                }
                if let Slot::Parked(parked) = occupied.insert(Slot::Operation(id)) {
                    inner.parked.fetch_sub(parked.len(), Ordering::Relaxed);
                    let before = operation.status;
                    for parked in parked.iter() {
                        let (_, dropped) =
                            correlation::apply(&mut operation, &parked.event, inner.limits.events);
                        evicted.extend(dropped);
                    }
                    self.count_settled(&operation.kind, before, operation.status);
                }
                self.insert_operation(operation.clone());
            }
        }
        if let Some(kind) = issued_index(&operation.kind) {
            inner.started[kind].fetch_add(1, Ordering::Relaxed);
        }
        self.add_to_call(&operation);
        if operation.kind == OperationKind::CancelMediaProcessing {
            inner
                .cancels
                .entry(operation.call.clone())
                .or_default()
                .push((id, operation.created_date_time));
        }
        for record in evicted {
            note(Noted::Evicted {
                operation: id,
                record,
            });
        }
        // Nobody can wait on an id that was unknown until now: no one to wake.
        Ok(operation)
    }

    /// Loads the durable record into an empty store at start: operations (with their index
    /// entries, upstream ids, cancels and open lists), the duplicate filter and the parked
    /// events that have not expired (`now` / `wall_now` convert their ages).
    ///
    /// Parked events past the park window are moved to their call's timeline (effect
    /// `unmatched`) and counted, as the sweep does, except in a scratch store, which drops
    /// them. The report says which parked events are no longer parked and which expired,
    /// for the caller to record and log.
    pub fn restore(
        &self,
        restored: Restored,
        now: Instant,
        wall_now: OffsetDateTime,
    ) -> RestoreReport {
        let mut report = RestoreReport::default();
        let unparked = &mut report.unparked;
        let inner = &self.inner;
        let limits = &inner.limits;
        let mut next_seq = 0;
        for (call, events) in restored.call_events {
            let Some(updated) = events.last().map(|(_, record)| record.received_date_time) else {
                continue;
            };
            let skip = events.len().saturating_sub(limits.call_events_max);
            next_seq = events
                .iter()
                .fold(next_seq, |next, (seq, _)| next.max(seq + 1));
            let mut timeline = CallTimeline::new(updated);
            timeline.events = events.into_iter().skip(skip).collect();
            inner.calls.insert(call, timeline);
        }
        inner.call_event_seq.fetch_max(next_seq, Ordering::Relaxed);
        let mut operations = restored.operations;
        // Oldest first (ids are time-ordered): a later operation takes its context's index
        // entry unless an earlier one is still running there.
        operations.sort_by_key(|op| op.id);
        for operation in operations {
            let id = operation.id;
            match inner.index.entry(inner.digests.operation(&operation)) {
                Entry::Vacant(vacant) => {
                    vacant.insert(Slot::Operation(id));
                }
                Entry::Occupied(mut occupied) => {
                    let holder_running = occupied.get().operation_id().is_some_and(|held| {
                        inner
                            .operations
                            .get(&held)
                            .is_some_and(|op| !op.status.is_terminal())
                    });
                    if !holder_running {
                        occupied.insert(Slot::Operation(id));
                    }
                }
            }
            if let Some(upstream_id) = &operation.upstream_operation_id {
                inner.upstream.insert(upstream_key(upstream_id), id);
            }
            if operation.kind == OperationKind::CancelMediaProcessing {
                inner
                    .cancels
                    .entry(operation.call.clone())
                    .or_default()
                    .push((id, operation.created_date_time));
            }
            self.add_to_call(&operation);
            self.insert_operation(operation);
        }
        for (upstream_id, id) in restored.upstream {
            if inner.operations.contains_key(&id) {
                inner.upstream.insert(upstream_id.into(), id);
            }
        }
        let age = |at: OffsetDateTime| Duration::try_from(wall_now - at).unwrap_or(Duration::ZERO);
        let since = |age: Duration| now.checked_sub(age).unwrap_or(now);
        for (event_id, at) in restored.seen {
            let age = age(at);
            if age < limits.dedupe_ttl {
                inner
                    .seen
                    .insert(inner.digests.of(event_id.as_str()), since(age));
            }
        }
        for (event, at) in restored.parked {
            let age = age(at);
            let Some(key) = inner.digests.park(&event) else {
                unparked.extend(event.id);
                continue;
            };
            // Parked under an upstream id that its operation has since been given.
            let named = event
                .names()
                .is_none()
                .then_some(event.upstream_id.as_ref())
                .flatten()
                .and_then(|upstream_id| inner.upstream.get(upstream_id.key()).map(|id| *id));
            if let Some(id) = named {
                let listed = inner.operations.get(&id).is_some_and(|op| {
                    event.id.is_some() && op.events.iter().any(|record| record.id == event.id)
                });
                if !listed {
                    self.apply_to(id, &event, &mut |_| {});
                }
                unparked.extend(event.id);
                continue;
            }
            if age >= limits.park_ttl {
                unparked.extend(event.id.clone());
                if !limits.scratch {
                    let swept = &mut report.swept;
                    self.push_call_event(&event, EventEffect::Unmatched, &mut |noted| {
                        swept.call_events.extend(CallEventAdded::from_noted(noted));
                    });
                    swept.expired.push(event);
                }
                continue;
            }
            match inner.index.entry(key) {
                Entry::Occupied(mut occupied) => match occupied.get_mut() {
                    Slot::Operation(id) => {
                        // Its operation was recorded before it was: apply it, unless the
                        // operation already lists it.
                        let id = *id;
                        drop(occupied);
                        let listed = inner.operations.get(&id).is_some_and(|op| {
                            event.id.is_some()
                                && op.events.iter().any(|record| record.id == event.id)
                        });
                        if !listed {
                            self.apply_to(id, &event, &mut |_| {});
                        }
                        unparked.extend(event.id);
                    }
                    Slot::Parked(events) => {
                        inner.parked.fetch_add(1, Ordering::Relaxed);
                        events.push(ParkedEvent {
                            event,
                            at: since(age),
                        });
                    }
                },
                Entry::Vacant(vacant) => {
                    inner.parked.fetch_add(1, Ordering::Relaxed);
                    vacant.insert(Slot::Parked(Box::new(vec![ParkedEvent {
                        event,
                        at: since(age),
                    }])));
                }
            }
        }
        inner
            .parked_expired
            .fetch_add(report.swept.expired.len() as u64, Ordering::Relaxed);
        report
    }

    /// How many events an operation's timeline keeps.
    pub fn event_bound(&self) -> EventBound {
        self.inner.limits.events
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
            let before = op.status;
            let _ = op.apply(transition, now);
            self.count_settled(&op.kind, before, op.status);
            Operation::clone(&op)
        };
        if snapshot.status.is_terminal() {
            self.wake(id);
        }
        Some(snapshot)
    }

    /// Records what the upstream's answer said of an operation: its own id (the first of
    /// `upstream_ids`, shown; every one of them finds the operation — Graph's answer may name
    /// it differently in its body and its `Location`), and its status as written (unless a
    /// notification has already settled the operation). Notifications that named it by one
    /// of those ids before the answer came (parked) are applied now, in arrival order; their
    /// ids are returned (no longer parked).
    pub fn record_upstream(
        &self,
        id: OperationId,
        upstream_ids: &[&str],
        status: Option<&str>,
    ) -> Vec<Option<String>> {
        let inner = &self.inner;
        let Some(mut op) = inner.operations.get_mut(&id) else {
            return Vec::new();
        };
        if let Some(shown) = upstream_ids.first() {
            op.upstream_operation_id = Some((*shown).into());
        }
        if let (Some(status), false) = (status, op.status.is_terminal()) {
            op.upstream_status = Some(status.into());
        }
        op.revision += 1;
        drop(op);
        let mut unparked = Vec::new();
        for upstream_id in upstream_ids {
            let key = upstream_key(upstream_id);
            // Known before the park is looked at: a notification parking now either sees
            // the id or is in the park taken below (`park_by_upstream_id` holds the park's
            // entry while it looks).
            let digest = inner.digests.upstream_park(&key);
            inner.upstream.insert(key, id);
            let Some((_, Slot::Parked(events))) = inner.index.remove(&digest) else {
                continue;
            };
            inner.parked.fetch_sub(events.len(), Ordering::Relaxed);
            for parked in events.into_iter() {
                self.apply_to(id, &parked.event, &mut |_| {});
                unparked.push(parked.event.id);
            }
        }
        unparked
    }

    /// Revision `revision` of the operation is durable, and with it `events_total` of its
    /// events when the commit wrote events (never lowered: commits may finish out of order).
    pub fn mark_durable(&self, id: OperationId, revision: u64, events_total: Option<u64>) {
        if let Some(mut op) = self.inner.operations.get_mut(&id) {
            op.durable = op.durable.max(revision + 1);
            if let Some(total) = events_total {
                op.events_written = op.events_written.max(total);
            }
        }
    }

    /// The operation's state for the change feed, if it changed since the feed last took
    /// it: `work` gets it as the API shows it (under its entry lock), its `notify`, its
    /// revision and whether it settled (or changed its outcome) since; returns what `work`
    /// made and the settle announced before (for [`OperationStore::unclaim_change`]).
    /// Marks both as announced, so concurrent commits announce each once.
    pub fn claim_change<T>(
        &self,
        id: OperationId,
        work: impl FnOnce(&Operation, Option<&NotifyTarget>, u64, bool) -> T,
    ) -> Option<(T, u64)> {
        let mut op = self.inner.operations.get_mut(&id)?;
        let revision = op.revision;
        let announced = &mut op.announced;
        if announced.change > revision {
            return None;
        }
        announced.change = revision + 1;
        let settled = announced.settled_revision > announced.settle;
        let settle_before = announced.settle;
        announced.settle = announced.settled_revision;
        // Shown as the API shows it, without a copy: what it never shows is set aside.
        // What `Operation::public` clears, set aside and put back.
        let pending = op.pending.take();
        let notify = op.notify.take();
        let participant = op.participant.take();
        let settle_by = op.settle_by.take();
        let out = work(&op, notify.as_deref(), revision, settled);
        op.pending = pending;
        op.notify = notify;
        op.participant = participant;
        op.settle_by = settle_by;
        Some((out, settle_before))
    }

    /// A commit that announced the operation's change failed: the next commit announces
    /// it again (and its settle, when that commit announced one: `settle_before` is what
    /// had been announced before it).
    pub fn unclaim_change(&self, id: OperationId, settle_before: u64) {
        if let Some(mut op) = self.inner.operations.get_mut(&id) {
            op.announced.change = 0;
            op.announced.settle = op.announced.settle.min(settle_before);
        }
    }

    /// The upstream answered the operation's request: it is no longer owed.
    pub fn answered(&self, id: OperationId) {
        if let Some(mut op) = self.inner.operations.get_mut(&id)
            && op.pending.take().is_some()
        {
            op.revision += 1;
        }
    }

    /// The call ended: every operation on it that has not settled fails with `error`
    /// (and `result`, the call's own account). Returns their ids.
    pub fn end_call(
        &self,
        call: &CallRef,
        result: Option<ResultInfo>,
        error: &OperationError,
        now: OffsetDateTime,
    ) -> Vec<OperationId> {
        let listed = self
            .inner
            .calls
            .get(call)
            .map(|timeline| timeline.open.clone())
            .unwrap_or_default();
        let open: Vec<OperationId> = listed
            .into_iter()
            .filter(|id| {
                self.inner
                    .operations
                    .get(id)
                    .is_some_and(|op| !op.status.is_terminal())
            })
            .collect();
        let mut ended = Vec::with_capacity(open.len());
        for id in open {
            let failed = Transition::Failed {
                result: result.clone(),
                error: error.clone(),
            };
            let applied = self.inner.operations.get_mut(&id).is_some_and(|mut op| {
                let before = op.status;
                let applied = op.apply(failed, now).is_ok();
                self.count_settled(&op.kind, before, op.status);
                applied
            });
            if applied {
                self.wake(id);
                ended.push(id);
            }
        }
        ended
    }

    /// The call ended (ACS `CallDisconnected`) at `now`: its unsettled removals fail with
    /// `CallEnded` after the grace period unless their own events come first (the sweep
    /// does it). Returns their ids.
    pub fn end_call_after_grace(&self, call: &CallRef, now: OffsetDateTime) -> Vec<OperationId> {
        let at = now + self.inner.limits.call_end_grace;
        let listed = self
            .inner
            .calls
            .get(call)
            .map(|timeline| timeline.open.clone())
            .unwrap_or_default();
        let mut marked = Vec::new();
        for id in listed {
            let due = self.inner.operations.get_mut(&id).and_then(|mut op| {
                let waiting = !op.status.is_terminal()
                    && op.kind == OperationKind::RemoveParticipant
                    && op.settle_by.is_none();
                waiting.then(|| {
                    op.settle_by(at, SettleReason::CallEnded);
                    self.next_look(&op, now)
                })
            });
            if let Some(due) = due {
                // The sweep looks at it then (its entry at the old deadline stays, harmless).
                let _ = self.inner.schedule.send((due, id));
                marked.push(id);
            }
        }
        marked
    }

    /// Applies what the platform said of an operation the sweep handed out to be
    /// reconciled ([`SweepReport::reconcile`]), unless something settled it meanwhile (a
    /// callback, or the reconciliation's own timeout). `None` when the operation is gone;
    /// else whether it was applied.
    pub fn reconciled(
        &self,
        id: OperationId,
        conclusion: &Conclusion,
        now: OffsetDateTime,
    ) -> Option<bool> {
        let applied = {
            let mut op = self.inner.operations.get_mut(&id)?;
            let open =
                !op.status.is_terminal() && op.settle_reason() == Some(SettleReason::Reconciling);
            if !open {
                return Some(false);
            }
            let before = op.status;
            let transition = conclusion.transition.clone();
            let applied = if conclusion.reconciled {
                op.apply_reconciled(transition, now)
            } else {
                op.apply(transition, now)
            };
            self.count_settled(&op.kind, before, op.status);
            applied.is_ok()
        };
        if applied {
            self.wake(id);
        }
        Some(applied)
    }

    /// Delivers one callback event: drops duplicates, then applies, parks or observes it.
    pub fn deliver(&self, event: IncomingEvent, now: Instant) -> Delivery {
        self.deliver_noting(event, now, &mut |_| {})
    }

    /// As [`OperationStore::deliver`], and hands `note` the event when it is parked, and
    /// the event its operation's timeline dropped to make room for it, if any.
    pub fn deliver_noting(
        &self,
        event: IncomingEvent,
        now: Instant,
        note: &mut dyn FnMut(Noted<'_>),
    ) -> Delivery {
        let inner = &self.inner;
        if let Some(event_id) = &event.id {
            match inner.seen.entry(inner.digests.of(event_id.as_str())) {
                Entry::Occupied(_) => return Delivery::Duplicate,
                Entry::Vacant(vacant) => {
                    vacant.insert(now);
                }
            }
        }
        let cancelled_at = event
            .cancelled
            .then(|| event.call.clone().map(|call| (call, event.received)))
            .flatten();
        let known = event
            .upstream_id
            .as_ref()
            .and_then(|upstream_id| inner.upstream.get(upstream_id.key()).map(|id| *id));
        let delivery = match known.and_then(|id| self.apply_to(id, &event, note)) {
            Some(delivery) => delivery,
            None => self.deliver_by_context(event, now, note),
        };
        if let Some((call, at)) = cancelled_at
            && let Delivery::Matched { id, .. } | Delivery::Observed { id } = delivery
        {
            self.link_cancelled(id, &call, at);
        }
        delivery
    }

    fn deliver_by_context(
        &self,
        event: IncomingEvent,
        now: Instant,
        note: &mut dyn FnMut(Noted<'_>),
    ) -> Delivery {
        let inner = &self.inner;
        let Some(digest) = inner.digests.event(&event) else {
            let Some(call) = &event.call else {
                // Neither call nor context: nothing to keep it on; the caller logs it.
                return Delivery::Unmatched;
            };
            match (&event.upstream_id, event.should_park()) {
                (Some(upstream_id), false) => {
                    return self.observe_by_upstream_id(call, upstream_id, &event, note);
                }
                (Some(upstream_id), true) => {
                    let key = upstream_id.key().to_owned();
                    return self.park_by_upstream_id(&key, event, now, note);
                }
                (None, _) => {}
            }
            self.push_call_event(&event, EventEffect::Recorded, note);
            return Delivery::CallEvent;
        };
        // Fast path: a shared read of the index, then one operation entry.
        let known = inner
            .index
            .get(&digest)
            .and_then(|slot| slot.operation_id());
        if let Some(id) = known
            && let Some(delivery) = self.apply_to(id, &event, note)
        {
            return delivery;
        }
        match inner.index.entry(digest) {
            Entry::Occupied(mut occupied) => match occupied.get_mut() {
                Slot::Operation(id) => {
                    let id = *id;
                    if inner.operations.contains_key(&id) {
                        drop(occupied);
                        // Created between the read above and this entry: apply it there.
                        return self
                            .apply_to(id, &event, note)
                            .unwrap_or(Delivery::Unmatched);
                    }
                    // The operation was retired; the context is free again.
                    match self.settle_unknown(&event, now, note) {
                        Ok((slot, delivery)) => {
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
                    if !self.reserve_park(&event, note) {
                        return Delivery::Unmatched;
                    }
                    note(Noted::Parked(&event));
                    events.push(ParkedEvent { event, at: now });
                    Delivery::Parked
                }
            },
            Entry::Vacant(vacant) => match self.settle_unknown(&event, now, note) {
                Ok((slot, delivery)) => {
                    vacant.insert(slot);
                    delivery
                }
                Err(delivery) => delivery,
            },
        }
    }

    /// `f` applied to the operation as it is now, under its entry's read lock (no copy).
    pub fn read<T>(&self, id: OperationId, f: impl FnOnce(&Operation) -> T) -> Option<T> {
        self.inner.operations.get(&id).map(|op| f(&op))
    }

    /// A snapshot of one operation.
    pub fn get(&self, id: OperationId) -> Option<Operation> {
        self.inner
            .operations
            .get(&id)
            .map(|op| Operation::clone(&op))
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

    /// Every operation, with its revision (for a scratch store: what to write back).
    pub(in crate::store) fn snapshots(&self) -> Vec<Operation> {
        self.inner
            .operations
            .iter()
            .map(|entry| Operation::clone(entry.value()))
            .collect()
    }

    /// Every call's kept events (for a scratch store: those this transition added).
    pub(in crate::store) fn timelines(&self) -> Vec<(CallRef, Vec<EventRecord>)> {
        self.inner
            .calls
            .iter()
            .filter(|entry| !entry.events.is_empty())
            .map(|entry| {
                let events = entry.events.iter().map(|(_, record)| record.clone());
                (entry.key().clone(), events.collect())
            })
            .collect()
    }

    /// The events kept for a call (those naming no operation, and expired parked ones).
    pub fn call_events(&self, call: &CallRef) -> Option<Vec<EventRecord>> {
        self.inner.calls.get(call).map(|timeline| {
            timeline
                .events
                .iter()
                .map(|(_, record)| record.clone())
                .collect()
        })
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
            started: inner.started.each_ref().map(|n| n.load(Ordering::Relaxed)),
            settled: inner
                .settled
                .each_ref()
                .map(|row| row.each_ref().map(|n| n.load(Ordering::Relaxed))),
        }
    }

    /// Counts an operation of an issued kind that went from `before` to a final `after`.
    fn count_settled(&self, kind: &OperationKind, before: OperationStatus, after: OperationStatus) {
        if before.is_terminal() {
            return;
        }
        let status = FINAL_STATUSES.iter().position(|s| *s == after);
        if let (Some(kind), Some(status)) = (issued_index(kind), status) {
            self.inner.settled[kind][status].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Expires parked events, duplicate-filter entries, settled operations past retention
    /// and idle call timelines.
    pub fn sweep(&self, now: Instant, wall_now: OffsetDateTime) -> SweepReport {
        let inner = &self.inner;
        let limits = &inner.limits;
        let mut report = SweepReport::default();

        // Parked events are rare: the index is only walked while some wait.
        if inner.parked.load(Ordering::Relaxed) > 0 {
            self.expire_parked(now, &mut report);
        }
        let expired = report.expired.len();
        inner.parked.fetch_sub(expired, Ordering::Relaxed);
        inner
            .parked_expired
            .fetch_add(expired as u64, Ordering::Relaxed);
        let mut call_events = Vec::new();
        for event in &report.expired {
            self.push_call_event(event, EventEffect::Unmatched, &mut |noted| {
                call_events.extend(CallEventAdded::from_noted(noted));
            });
        }
        report.call_events = call_events;

        inner
            .seen
            .retain(|_, at| now.duration_since(*at) < limits.dedupe_ttl);

        let overdue = |op: &Operation| {
            !op.status.is_terminal() && op.deadline(limits.timeouts.for_kind(&op.kind)) <= wall_now
        };
        let cutoff = wall_now - limits.retention;
        let old = |op: &Operation| op.status.is_terminal() && op.last_updated_date_time < cutoff;
        let now_millis = unix_millis(wall_now);
        let mut agenda = inner
            .agenda
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Agenda { incoming, due } = &mut *agenda;
        due.extend(incoming.try_iter().map(Reverse));
        // Operations due again are pushed back after the loop, so each is looked at once.
        let mut later = Vec::new();
        while let Some(&Reverse((at, id))) = due.peek()
            && at <= now_millis
        {
            due.pop();
            let looked = inner.operations.get_mut(&id).and_then(|mut op| {
                if !overdue(&op) {
                    return None;
                }
                let timeout = limits.timeouts.for_kind(&op.kind);
                let at_deadline = reconcile::at_deadline(&op, limits.reconcile);
                let before = op.status;
                let applied = match at_deadline {
                    AtDeadline::Reconcile => {
                        // Asked outside the store; the answer comes back by `reconciled`.
                        op.settle_by(wall_now + limits.reconcile_timeout, SettleReason::Reconciling);
                        report.reconcile.push(reconcile::job(&op));
                        return None;
                    }
                    AtDeadline::TimeOut => op.apply(reconcile::timed_out(timeout, ""), wall_now),
                    AtDeadline::EndCall => op.apply_reconciled(
                        reconcile::call_ended(
                            "the call ended (CallDisconnected) and no outcome arrived within the grace period",
                        ),
                        wall_now,
                    ),
                };
                self.count_settled(&op.kind, before, op.status);
                applied.is_ok().then_some(at_deadline)
            });
            match looked {
                Some(AtDeadline::EndCall) => {
                    self.wake(id);
                    report.call_ended.push(id);
                }
                Some(_) => {
                    self.wake(id);
                    report.timed_out.push(id);
                }
                None => {}
            }
            match inner.operations.remove_if(&id, |_, op| old(op)) {
                Some((_, op)) => {
                    self.forget(*op);
                    report.removed_operations.push(id);
                }
                None => {
                    if let Some(next) = inner
                        .operations
                        .get(&id)
                        .map(|op| self.next_look(&op, wall_now))
                    {
                        later.push(Reverse((next.max(now_millis + 1), id)));
                    }
                }
            }
        }
        due.extend(later);
        drop(agenda);
        inner.calls.retain(|call, timeline| {
            let keep = timeline.updated >= cutoff || !timeline.open.is_empty();
            if let (false, Some((last, _))) = (keep, timeline.events.back()) {
                report.retired_calls.push((call.clone(), *last));
            }
            keep
        });
        inner
            .waiters
            .retain(|id, _| inner.operations.contains_key(id));
        report
    }

    /// For an event naming an unknown operation: the slot to put in the index (parked
    /// events, handed to `note` too, or a new observed operation) with its delivery, or
    /// the delivery when nothing is stored.
    fn settle_unknown(
        &self,
        event: &IncomingEvent,
        now: Instant,
        note: &mut dyn FnMut(Noted<'_>),
    ) -> Result<(Slot, Delivery), Delivery> {
        let (call, context) = event.names().ok_or(Delivery::Unmatched)?;
        if event.should_park() {
            if !self.reserve_park(event, note) {
                return Err(Delivery::Unmatched);
            }
            note(Noted::Parked(event));
            let slot = Slot::Parked(Box::new(vec![ParkedEvent {
                event: event.clone(),
                at: now,
            }]));
            return Ok((slot, Delivery::Parked));
        }
        let operation = event.observed_operation(call, context);
        let id = operation.id;
        self.add_to_call(&operation);
        self.insert_operation(operation);
        if let Some(upstream_id) = &event.upstream_id {
            self.inner.upstream.insert(upstream_id.key().into(), id);
        }
        Ok((Slot::Operation(id), Delivery::Observed { id }))
    }

    /// An operation event with an upstream id but no context: the operation is found, or
    /// observed, by that id alone (its context stays empty).
    fn observe_by_upstream_id(
        &self,
        call: &CallRef,
        upstream_id: &UpstreamId,
        event: &IncomingEvent,
        note: &mut dyn FnMut(Noted<'_>),
    ) -> Delivery {
        let inner = &self.inner;
        // Lock order: an `upstream` entry, then an `operations` entry.
        match inner.upstream.entry(upstream_id.key().into()) {
            Entry::Occupied(occupied) => {
                let id = *occupied.get();
                drop(occupied);
                self.apply_to(id, event, note)
                    .unwrap_or(Delivery::Unmatched)
            }
            Entry::Vacant(vacant) => {
                let operation = event.observed_operation(call, "");
                let id = operation.id;
                self.add_to_call(&operation);
                self.insert_operation(operation);
                vacant.insert(id);
                Delivery::Observed { id }
            }
        }
    }

    /// A notification about a kind callops issues that names its operation only by an
    /// upstream id nobody knows yet (Graph's answer to the cancel has not come): it waits
    /// under that id for the answer ([`OperationStore::record_upstream`]).
    fn park_by_upstream_id(
        &self,
        key: &str,
        event: IncomingEvent,
        now: Instant,
        note: &mut dyn FnMut(Noted<'_>),
    ) -> Delivery {
        let inner = &self.inner;
        // Lock order: the park's `index` entry, then `upstream`.
        let entry = inner.index.entry(inner.digests.upstream_park(key));
        if let Some(id) = inner.upstream.get(key).map(|id| *id) {
            drop(entry);
            return self
                .apply_to(id, &event, note)
                .unwrap_or(Delivery::Unmatched);
        }
        if !self.reserve_park(&event, note) {
            return Delivery::Unmatched;
        }
        note(Noted::Parked(&event));
        let parked = ParkedEvent { event, at: now };
        match entry {
            Entry::Occupied(mut occupied) => match occupied.get_mut() {
                Slot::Parked(events) => events.push(parked),
                // Never an operation under this key; make it a park.
                Slot::Operation(_) => {
                    occupied.insert(Slot::Parked(Box::new(vec![parked])));
                }
            },
            Entry::Vacant(vacant) => {
                vacant.insert(Slot::Parked(Box::new(vec![parked])));
            }
        }
        Delivery::Parked
    }

    /// Takes a place in the park, or records the event on its call when the park is full.
    fn reserve_park(&self, event: &IncomingEvent, note: &mut dyn FnMut(Noted<'_>)) -> bool {
        let inner = &self.inner;
        if inner.parked.fetch_add(1, Ordering::Relaxed) >= inner.limits.park_max {
            inner.parked.fetch_sub(1, Ordering::Relaxed);
            inner.parked_overflow.fetch_add(1, Ordering::Relaxed);
            self.push_call_event(event, EventEffect::Unmatched, note);
            return false;
        }
        true
    }

    fn apply_to(
        &self,
        id: OperationId,
        event: &IncomingEvent,
        note: &mut dyn FnMut(Noted<'_>),
    ) -> Option<Delivery> {
        let (effect, evicted, settled, learned_id) = {
            let mut op = self.inner.operations.get_mut(&id)?;
            let before = op.status;
            let (effect, evicted) = correlation::apply(&mut op, event, self.inner.limits.events);
            self.count_settled(&op.kind, before, op.status);
            // Found by context, the event tells the operation's upstream id: keep it, so
            // later notifications naming only the id find the operation too.
            let learned_id = match (&op.upstream_operation_id, &event.upstream_id) {
                (None, Some(upstream_id)) if event.reports_on(&op) => {
                    op.upstream_operation_id = Some(upstream_id.shown().into());
                    Some(upstream_id.key())
                }
                _ => None,
            };
            (
                effect,
                evicted,
                effect == EventEffect::Applied && op.status.is_terminal(),
                learned_id,
            )
        };
        if let Some(record) = evicted {
            note(Noted::Evicted {
                operation: id,
                record,
            });
        }
        if let Some(key) = learned_id {
            self.inner.upstream.insert(key.into(), id);
        }
        if settled {
            self.wake(id);
        }
        Some(Delivery::Matched { id, effect })
    }

    /// Lists operation `cancelled` (reported cancelled at `at`) on the latest
    /// `cancelMediaProcessing` sent on `call` before `at`, once.
    fn link_cancelled(&self, cancelled: OperationId, call: &CallRef, at: OffsetDateTime) {
        let inner = &self.inner;
        let candidates: Vec<OperationId> = inner
            .cancels
            .get(call)
            .map(|cancels| {
                cancels
                    .iter()
                    .rev()
                    .filter(|(id, sent)| *sent <= at && *id != cancelled)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        // The latest cancel that Graph did not refuse (a refused one cancelled nothing).
        let cancel = candidates.into_iter().find(|id| {
            inner.operations.get(id).is_some_and(|op| {
                !op.error
                    .as_ref()
                    .is_some_and(|error| error.code.starts_with(UPSTREAM_FAILURE_PREFIX))
            })
        });
        let Some(cancel) = cancel else {
            return;
        };
        let Some(link) = inner.operations.get(&cancelled).and_then(|op| {
            (op.kind != OperationKind::CancelMediaProcessing).then(|| CancelledOperation {
                id: cancelled,
                kind: op.kind.clone(),
                context: op.context.clone(),
                upstream_operation_id: op.upstream_operation_id.clone(),
            })
        }) else {
            return;
        };
        if let Some(mut op) = inner.operations.get_mut(&cancel)
            && !op.cancelled_operations.iter().any(|c| c.id == cancelled)
        {
            op.cancelled_operations.push(link);
            op.revision += 1;
        }
    }

    /// The `cancelMediaProcessing` operations on `call` (a cancelled-operation
    /// notification may have changed one of them).
    pub fn cancels_on(&self, call: &CallRef) -> Vec<OperationId> {
        self.inner
            .cancels
            .get(call)
            .map(|cancels| cancels.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default()
    }

    /// Adds `event` to its call's timeline and tells `note` (under the timeline's entry, so
    /// the notes of one call come in sequence order).
    fn push_call_event(
        &self,
        event: &IncomingEvent,
        effect: EventEffect,
        note: &mut dyn FnMut(Noted<'_>),
    ) {
        let Some(call) = &event.call else {
            return;
        };
        let max = self.inner.limits.call_events_max;
        let mut timeline = self
            .inner
            .calls
            .entry(call.clone())
            .or_insert_with(|| CallTimeline::new(event.received));
        if timeline.events.len() >= max {
            timeline.events.pop_front();
        }
        let seq = self.inner.call_event_seq.fetch_add(1, Ordering::Relaxed);
        let record = event.record(effect);
        let kept_from = timeline.events.front().map_or(seq, |(first, _)| *first);
        note(Noted::CallEvent {
            call,
            seq,
            kept_from,
            record: &record,
        });
        timeline.events.push_back((seq, record));
        timeline.updated = event.received;
    }

    /// Lists `operation` under its call when it has not settled.
    fn add_to_call(&self, operation: &Operation) {
        if operation.status.is_terminal() {
            return;
        }
        let at = operation.created_date_time;
        let mut timeline = self
            .inner
            .calls
            .entry(operation.call.clone())
            .or_insert_with(|| CallTimeline::new(at));
        timeline.open.push(operation.id);
        timeline.updated = timeline.updated.max(at);
    }

    /// Moves parked events older than the park window to `report`.
    fn expire_parked(&self, now: Instant, report: &mut SweepReport) {
        let park_ttl = self.inner.limits.park_ttl;
        self.inner.index.retain(|_, slot| match slot {
            Slot::Operation(_) => true,
            Slot::Parked(events) => {
                events.retain(|parked| {
                    let keep = now.duration_since(parked.at) < park_ttl;
                    if !keep {
                        report.expired.push(parked.event.clone());
                    }
                    keep
                });
                !events.is_empty()
            }
        });
    }

    /// Drops what points at a retired operation: its index entry, upstream id, place in
    /// its call's open list and among the call's cancels.
    fn forget(&self, op: Operation) {
        let inner = &self.inner;
        let id = op.id;
        if let Some(mut timeline) = inner.calls.get_mut(&op.call) {
            timeline.open.retain(|open| *open != id);
        }
        if op.kind == OperationKind::CancelMediaProcessing {
            inner.cancels.remove_if_mut(&op.call, |_, cancels| {
                cancels.retain(|(cancel, _)| *cancel != id);
                cancels.is_empty()
            });
        }
        if let Some(upstream_id) = &op.upstream_operation_id {
            inner
                .upstream
                .remove_if(&upstream_key(upstream_id), |_, known| *known == id);
        }
        inner
            .index
            .remove_if(&inner.digests.operation(&op), |_, slot| {
                slot.operation_id() == Some(id)
            });
    }

    /// Adds `operation` to the map and to the sweep's agenda.
    fn insert_operation(&self, operation: Operation) {
        let due = (
            self.next_look(&operation, operation.last_updated_date_time),
            operation.id,
        );
        self.inner
            .operations
            .insert(operation.id, Box::new(operation));
        // The receiver lives as long as the store: sending cannot fail.
        let _ = self.inner.schedule.send(due);
    }

    /// When the sweep should look at `op` next (`now` is the latest look): the end of its
    /// retention once it has settled; while it runs, its callback deadline, or a retention
    /// from now if that comes first (it may settle and be due for retirement before its
    /// deadline when retention is the shorter).
    fn next_look(&self, op: &Operation, now: OffsetDateTime) -> i64 {
        let limits = &self.inner.limits;
        unix_millis(if op.status.is_terminal() {
            op.last_updated_date_time + limits.retention
        } else {
            let deadline = op.deadline(limits.timeouts.for_kind(&op.kind));
            deadline.min(op.last_updated_date_time.max(now) + limits.retention)
        })
    }

    fn wake(&self, id: OperationId) {
        if let Some((_, notify)) = self.inner.waiters.remove(&id) {
            notify.notify_waiters();
        }
    }
}

/// Error codes of requests the upstream never took (`UpstreamRejected`, ...).
const UPSTREAM_FAILURE_PREFIX: &str = "Upstream";

/// Shards per map. DashMap's default (4 × cores, 8 on a 2-core machine) makes each shard
/// large, and a shard that grows rehashes all its entries under its write lock: with
/// hundreds of thousands of operations that stalls every request hashing to it for
/// milliseconds. More, smaller shards keep those stalls short.
const SHARDS: usize = 128;

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

impl ListFilter {
    /// Whether `op` passes the filter (and the paging cursor).
    pub fn matches(&self, op: &Operation) -> bool {
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

    /// A store with the embedded defaults changed by `change`.
    fn store_with(change: impl FnOnce(&mut OperationsConfig)) -> OperationStore {
        let mut config = config();
        change(&mut config);
        OperationStore::new(&config)
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

    fn play() -> OperationKind {
        OperationKind::Observed("play".into())
    }

    fn succeeded() -> Option<Transition> {
        Some(Transition::Succeeded {
            result: Some(ResultInfo {
                code: Some(200),
                sub_code: Some(0),
                message: None,
                ..ResultInfo::default()
            }),
        })
    }

    fn failure() -> Transition {
        Transition::Failed {
            result: None,
            error: OperationError {
                code: "RemoveParticipantFailed".into(),
                message: "no".into(),
            },
        }
    }

    fn failed() -> Option<Transition> {
        Some(failure())
    }

    /// A removeParticipant callback with id `id` about (`call_id`, `context`).
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
            upstream_id: None,
            cancelled: false,
            upstream_status: None,
            transition,
            received: OffsetDateTime::now_utc(),
        }
    }

    /// The same, reporting on an operation of `kind`.
    fn event_of(
        kind: OperationKind,
        id: &str,
        context: &str,
        t: Option<Transition>,
    ) -> IncomingEvent {
        IncomingEvent {
            kind,
            event_type: "Microsoft.Communication.PlayCompleted".into(),
            ..event(id, "c1", Some(context), t)
        }
    }

    fn matched(id: OperationId, effect: EventEffect) -> Delivery {
        Delivery::Matched { id, effect }
    }

    /// (event id, effect) of each timeline entry, in order.
    fn timeline(events: &[EventRecord]) -> Vec<(String, EventEffect)> {
        events
            .iter()
            .map(|e| (e.id.clone().unwrap_or_default(), e.effect))
            .collect()
    }

    fn ids(operations: &[Operation]) -> Vec<OperationId> {
        operations.iter().map(|op| op.id).collect()
    }

    fn days_ago(days: i64) -> OffsetDateTime {
        OffsetDateTime::now_utc() - time::Duration::days(days)
    }

    #[test]
    fn a_created_operation_reads_back_as_created() {
        let store = store();
        let op = removal("c1", "ctx");
        let created = store.create(op.clone()).unwrap();
        assert_eq!(created, op);
        assert_eq!(created.status, OperationStatus::NotStarted);
        assert!(created.events.is_empty());
        assert_eq!(store.get(op.id), Some(op));
        assert_eq!(store.get(OperationId::new()), None);
        assert_eq!(store.stats().operations, 1);
    }

    #[test]
    fn a_running_context_is_claimed_once_per_call() {
        let store = store();
        let first = store.create(removal("c1", "ctx")).unwrap();
        let running = store
            .transition(first.id, Transition::Accepted, OffsetDateTime::now_utc())
            .unwrap();
        assert_eq!(running.status, OperationStatus::Running);

        let clash = removal("c1", "ctx");
        let clash_id = clash.id;
        assert_eq!(store.create(clash), Err(ContextInUse(first.id)));
        assert_eq!(
            store.get(clash_id),
            None,
            "the refused operation is not kept"
        );
        assert_eq!(store.stats().operations, 1);
        assert_eq!(store.get(first.id), Some(running), "the first is untouched");

        // The same context on another call is another operation.
        store.create(removal("c2", "ctx")).unwrap();
        // Once the first settles, its context is free again.
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), Instant::now());
        let second = store.create(removal("c1", "ctx")).unwrap();
        assert_eq!(
            store.deliver(event("e2", "c1", Some("ctx"), failed()), Instant::now()),
            matched(second.id, EventEffect::Applied)
        );
        assert_eq!(
            store.get(first.id).unwrap().status,
            OperationStatus::Succeeded
        );
        assert_eq!(
            store.get(second.id).unwrap().status,
            OperationStatus::Failed
        );
        assert_eq!(store.stats().operations, 3);
    }

    #[test]
    fn a_not_yet_accepted_operation_also_holds_its_context() {
        let store = store();
        let first = store.create(removal("c1", "ctx")).unwrap();
        assert_eq!(
            store.create(removal("c1", "ctx")),
            Err(ContextInUse(first.id))
        );
    }

    #[test]
    fn a_matching_event_settles_and_a_duplicate_changes_nothing() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let now = Instant::now();
        assert_eq!(
            store.deliver(event("e1", "c1", Some("ctx"), succeeded()), now),
            matched(op.id, EventEffect::Applied)
        );
        let settled = store.get(op.id).unwrap();
        assert_eq!(settled.status, OperationStatus::Succeeded);
        assert_eq!(settled.result.as_ref().unwrap().code, Some(200));
        assert_eq!(
            timeline(&settled.events),
            [("e1".into(), EventEffect::Applied)]
        );

        // Same id, whatever it says: dropped before it reaches the operation.
        assert_eq!(
            store.deliver(event("e1", "c1", Some("ctx"), failed()), now),
            Delivery::Duplicate
        );
        let after = store.get(op.id).unwrap();
        assert_eq!(
            after.events.len(),
            1,
            "the duplicate is not on the timeline"
        );
        assert_eq!(after, settled);
    }

    #[test]
    fn operations_are_counted_when_created_and_the_first_time_they_settle() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let other = store.create(removal("c2", "ctx")).unwrap();
        let now = Instant::now();
        assert_eq!(store.stats().started, [2, 0]);
        assert_eq!(store.stats().settled, [[0; 3]; 2]);
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), now);
        // The late upstream answer and a contradicting callback change nothing.
        store.transition(op.id, Transition::Accepted, OffsetDateTime::now_utc());
        store.deliver(event("e2", "c1", Some("ctx"), failed()), now);
        store.transition(
            other.id,
            Transition::Failed {
                result: None,
                error: OperationError {
                    code: "UpstreamRejected".into(),
                    message: "no".into(),
                },
            },
            OffsetDateTime::now_utc(),
        );
        let stats = store.stats();
        assert_eq!(stats.settled[0], [1, 1, 0], "{stats:?}");
        assert_eq!(stats.settled[1], [0, 0, 0]);
        // Observed operations are not ours: not counted.
        store.deliver(event_of(play(), "p1", "other", succeeded()), now);
        assert_eq!(store.stats().started, [2, 0]);
        assert_eq!(store.stats().settled, stats.settled);
    }

    #[test]
    fn later_outcomes_and_other_kinds_are_recorded_but_change_nothing() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let now = Instant::now();
        // A play event with the same context reports on another operation.
        assert_eq!(
            store.deliver(event_of(play(), "p1", "ctx", succeeded()), now),
            matched(op.id, EventEffect::Recorded)
        );
        assert_eq!(
            store.get(op.id).unwrap().status,
            OperationStatus::NotStarted
        );
        store.deliver(event("e1", "c1", Some("ctx"), failed()), now);
        // A second outcome with another id is kept, but the first one stands.
        assert_eq!(
            store.deliver(event("e2", "c1", Some("ctx"), succeeded()), now),
            matched(op.id, EventEffect::Ignored)
        );
        let op = store.get(op.id).unwrap();
        assert_eq!(op.status, OperationStatus::Failed);
        assert_eq!(
            timeline(&op.events),
            [
                ("p1".into(), EventEffect::Recorded),
                ("e1".into(), EventEffect::Applied),
                ("e2".into(), EventEffect::Ignored),
            ]
        );
    }

    #[test]
    fn the_upstream_answer_never_regresses_a_settled_operation() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let now = OffsetDateTime::now_utc();
        let running = store.transition(op.id, Transition::Accepted, now).unwrap();
        assert_eq!(running.status, OperationStatus::Running);
        // A retried request accepted again keeps it running.
        let again = store.transition(op.id, Transition::Accepted, now).unwrap();
        assert_eq!(again.status, OperationStatus::Running);
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), Instant::now());
        // The 202 arrives after the callback: the operation stays settled.
        let after = store.transition(op.id, Transition::Accepted, now).unwrap();
        assert_eq!(after.status, OperationStatus::Succeeded);
        assert_eq!(store.get(op.id), Some(after));
        assert_eq!(
            store.transition(OperationId::new(), Transition::Accepted, now),
            None
        );
    }

    #[test]
    fn a_callback_overtaking_the_accept_settles_a_not_started_operation() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), Instant::now());
        let late = store
            .transition(op.id, Transition::Accepted, OffsetDateTime::now_utc())
            .unwrap();
        assert_eq!(late.status, OperationStatus::Succeeded);
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
        assert_eq!(store.stats().operations, 0, "parking creates nothing");
        // A duplicate of a parked event is still a duplicate.
        assert_eq!(
            store.deliver(event("e1", "c1", Some("ctx"), failed()), now),
            Delivery::Duplicate
        );
        assert_eq!(store.stats().parked, 1);

        let created = store.create(removal("c1", "ctx")).unwrap();
        assert_eq!(
            created.status,
            OperationStatus::Failed,
            "settled on creation"
        );
        assert_eq!(
            timeline(&created.events),
            [("e1".into(), EventEffect::Applied)]
        );
        assert_eq!(store.get(created.id), Some(created.clone()));
        assert_eq!(store.stats().parked, 0);
        // The 202 that follows does not move it.
        let after = store
            .transition(created.id, Transition::Accepted, OffsetDateTime::now_utc())
            .unwrap();
        assert_eq!(after.status, OperationStatus::Failed);
    }

    #[test]
    fn parked_events_are_applied_in_arrival_order() {
        let store = store();
        let now = Instant::now();
        // Once a key is parked, even a play event under it waits with the others.
        let parked = [
            store.deliver(event("e1", "c1", Some("ctx"), failed()), now),
            store.deliver(
                event_of(play(), "p1", "ctx", Some(Transition::Started)),
                now,
            ),
            store.deliver(event("e2", "c1", Some("ctx"), succeeded()), now),
        ];
        assert_eq!(parked, [Delivery::Parked; 3]);
        assert_eq!(store.stats().parked, 3);
        let created = store.create(removal("c1", "ctx")).unwrap();
        assert_eq!(created.status, OperationStatus::Failed);
        assert_eq!(
            timeline(&created.events),
            [
                ("e1".into(), EventEffect::Applied),
                ("p1".into(), EventEffect::Recorded),
                ("e2".into(), EventEffect::Ignored),
            ]
        );
        assert_eq!(store.stats().parked, 0);
    }

    #[test]
    fn parked_events_expire_onto_the_call_timeline() {
        let store = store();
        let t0 = Instant::now();
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), t0);
        let report = store.sweep(t0 + Duration::from_millis(100), OffsetDateTime::now_utc());
        assert!(report.expired.is_empty(), "not yet");
        assert_eq!(store.stats().parked, 1);
        assert_eq!(store.call_events(&call("c1")), None);

        let report = store.sweep(t0 + Duration::from_secs(10), OffsetDateTime::now_utc());
        assert_eq!(report.expired.len(), 1);
        assert_eq!(report.expired[0].id.as_deref(), Some("e1"));
        let stats = store.stats();
        assert_eq!((stats.parked, stats.parked_expired), (0, 1));
        let events = store.call_events(&call("c1")).unwrap();
        assert_eq!(timeline(&events), [("e1".into(), EventEffect::Unmatched)]);
        // A redelivery of the expired event is still recognised.
        assert_eq!(
            store.deliver(
                event("e1", "c1", Some("ctx"), succeeded()),
                t0 + Duration::from_secs(11)
            ),
            Delivery::Duplicate
        );
        // The operation that comes later starts clean.
        let created = store.create(removal("c1", "ctx")).unwrap();
        assert_eq!(created.status, OperationStatus::NotStarted);
        assert!(created.events.is_empty());
        // Sweeping again expires nothing more.
        let report = store.sweep(t0 + Duration::from_secs(20), OffsetDateTime::now_utc());
        assert!(report.expired.is_empty());
        assert_eq!(store.stats().parked_expired, 1);
    }

    #[test]
    fn the_park_is_bounded() {
        let store = store_with(|c| c.park_max = 2);
        let now = Instant::now();
        for n in 0..2 {
            let delivery = store.deliver(
                event(&format!("e{n}"), "c1", Some(&format!("x{n}")), succeeded()),
                now,
            );
            assert_eq!(delivery, Delivery::Parked);
        }
        // Full: neither a new key nor one already parked takes more.
        assert_eq!(
            store.deliver(event("e8", "c1", Some("x8"), succeeded()), now),
            Delivery::Unmatched
        );
        assert_eq!(
            store.deliver(event("e9", "c1", Some("x0"), failed()), now),
            Delivery::Unmatched
        );
        let stats = store.stats();
        assert_eq!((stats.parked, stats.parked_overflow), (2, 2));
        // The overflow is kept on the call, not lost.
        let events = store.call_events(&call("c1")).unwrap();
        assert_eq!(
            timeline(&events),
            [
                ("e8".into(), EventEffect::Unmatched),
                ("e9".into(), EventEffect::Unmatched),
            ]
        );
        // The refused event did not join the parked ones.
        let created = store.create(removal("c1", "x0")).unwrap();
        assert_eq!(created.status, OperationStatus::Succeeded);
        assert_eq!(created.events.len(), 1);
        // Creation freed a place.
        assert_eq!(
            store.deliver(event("e10", "c1", Some("x10"), succeeded()), now),
            Delivery::Parked
        );
    }

    #[test]
    fn other_kinds_become_observed_operations() {
        let store = store();
        let started = event_of(play(), "e1", "p", Some(Transition::Started));
        let Delivery::Observed { id } = store.deliver(started.clone(), Instant::now()) else {
            panic!("not observed");
        };
        let observed = store.get(id).unwrap();
        assert_eq!(observed.status, OperationStatus::Running);
        assert_eq!(observed.kind, play());
        assert_eq!(observed.context, "p");
        assert_eq!(observed.call, call("c1"));
        assert_eq!(store.stats().parked, 0);

        let completed = IncomingEvent {
            id: Some("e2".into()),
            transition: succeeded(),
            ..started
        };
        assert_eq!(
            store.deliver(completed, Instant::now()),
            matched(id, EventEffect::Applied)
        );
        let observed = store.get(id).unwrap();
        assert_eq!(observed.status, OperationStatus::Succeeded);
        assert_eq!(observed.kind.as_str(), "play");
        assert_eq!(
            timeline(&observed.events),
            [
                ("e1".into(), EventEffect::Applied),
                ("e2".into(), EventEffect::Applied),
            ]
        );
    }

    #[test]
    fn an_observed_operation_takes_the_status_its_first_event_reports() {
        let store = store();
        let cases = [
            ("a", None, OperationStatus::Running),
            ("b", Some(Transition::Started), OperationStatus::Running),
            ("c", succeeded(), OperationStatus::Succeeded),
            ("d", failed(), OperationStatus::Failed),
            (
                "e",
                Some(Transition::Canceled { result: None }),
                OperationStatus::Canceled,
            ),
        ];
        for (context, transition, want) in cases {
            let delivery = store.deliver(
                event_of(play(), context, context, transition),
                Instant::now(),
            );
            let Delivery::Observed { id } = delivery else {
                panic!("{context}: {delivery:?}");
            };
            assert_eq!(store.get(id).unwrap().status, want, "{context}");
        }
    }

    #[test]
    fn call_events_are_kept_newest_last_and_capped() {
        let store = store_with(|c| c.call_events_max = 3);
        assert_eq!(store.call_events(&call("c1")), None);
        for n in 0..5 {
            let delivery = store.deliver(event(&format!("e{n}"), "c1", None, None), Instant::now());
            assert_eq!(delivery, Delivery::CallEvent);
        }
        store.deliver(event("other", "c2", None, None), Instant::now());
        let events = store.call_events(&call("c1")).unwrap();
        assert_eq!(
            timeline(&events),
            [
                ("e2".into(), EventEffect::Recorded),
                ("e3".into(), EventEffect::Recorded),
                ("e4".into(), EventEffect::Recorded),
            ]
        );
        assert_eq!(store.call_events(&call("c2")).unwrap().len(), 1);
        assert_eq!(store.stats().operations, 0);
        // Neither call nor context: nowhere to keep it.
        let mut nowhere = event("e9", "c1", Some("x"), None);
        nowhere.call = None;
        assert_eq!(store.deliver(nowhere, Instant::now()), Delivery::Unmatched);
        assert_eq!(store.call_events(&call("c1")).unwrap().len(), 3);
    }

    #[test]
    fn event_ids_are_forgotten_after_the_dedupe_ttl() {
        let store = store_with(|c| c.dedupe_ttl_secs = 1);
        let t0 = Instant::now();
        let wall = OffsetDateTime::now_utc();
        assert_eq!(
            store.deliver(event("e1", "c1", None, None), t0),
            Delivery::CallEvent
        );
        store.sweep(t0 + Duration::from_millis(500), wall);
        assert_eq!(
            store.deliver(event("e1", "c1", None, None), t0),
            Delivery::Duplicate
        );
        store.sweep(t0 + Duration::from_secs(2), wall);
        assert_eq!(
            store.deliver(event("e1", "c1", None, None), t0),
            Delivery::CallEvent
        );
        // Events without an id are never taken for duplicates.
        let mut anonymous = event("x", "c1", None, None);
        anonymous.id = None;
        assert_eq!(store.deliver(anonymous.clone(), t0), Delivery::CallEvent);
        assert_eq!(store.deliver(anonymous, t0), Delivery::CallEvent);
    }

    #[test]
    fn retention_retires_settled_operations_and_frees_their_context() {
        let store = store();
        let long_ago = days_ago(2);
        // Settled two days ago (past the one-day retention).
        let mut old = removal("c1", "old");
        old.apply(Transition::Succeeded { result: None }, long_ago)
            .unwrap();
        let old = store.create(old).unwrap();
        // Created two days ago, still running: never retired.
        let mut stuck = Operation::new(
            OperationKind::RemoveParticipant,
            call("c1"),
            "stuck".into(),
            long_ago,
        );
        stuck.apply(Transition::Accepted, long_ago).unwrap();
        let stuck = store.create(stuck).unwrap();
        // Settled just now.
        let recent = store.create(removal("c1", "recent")).unwrap();
        store.deliver(event("e1", "c1", Some("recent"), failed()), Instant::now());

        let report = store.sweep(Instant::now(), OffsetDateTime::now_utc());
        assert_eq!(report.removed_operations.len(), 1);
        assert!(report.expired.is_empty());
        assert_eq!(store.get(old.id), None);
        assert!(store.get(stuck.id).is_some(), "running operations stay");
        assert!(store.get(recent.id).is_some(), "recent ones stay");
        assert_eq!(store.stats().operations, 2);

        // Its context is free: a new operation takes it, and its callback finds it.
        let new = store.create(removal("c1", "old")).unwrap();
        assert_eq!(
            store.deliver(event("e2", "c1", Some("old"), succeeded()), Instant::now()),
            matched(new.id, EventEffect::Applied)
        );
        // Nothing left to retire.
        assert_eq!(
            store
                .sweep(Instant::now(), OffsetDateTime::now_utc())
                .removed_operations
                .len(),
            0
        );
    }

    /// The sweep looks at operations when they are due, not by scanning: a settled one is
    /// retired when its retention ends even if that is long before its callback deadline,
    /// and a running one times out at its deadline, once, then is retired in its turn.
    #[test]
    fn the_sweep_retires_and_times_out_each_operation_when_it_is_due() {
        let store = store_with(|config| {
            config.retention_secs = 10;
            config.callback_timeouts.remove_participant_secs = 240;
        });
        let t0 = OffsetDateTime::now_utc();
        let at = |secs: i64| t0 + time::Duration::seconds(secs);
        let settled = store.create(removal("c1", "settled")).unwrap();
        store.deliver(
            event("e1", "c1", Some("settled"), succeeded()),
            Instant::now(),
        );
        let running = store.create(removal("c1", "running")).unwrap();
        store.transition(running.id, Transition::Accepted, t0);

        let report = store.sweep(Instant::now(), at(5));
        assert!(report.removed_operations.is_empty() && report.timed_out.is_empty());
        let report = store.sweep(Instant::now(), at(11));
        assert_eq!(
            report.removed_operations,
            vec![settled.id],
            "retention ended"
        );
        assert!(report.timed_out.is_empty());
        assert!(store.get(running.id).is_some());

        let report = store.sweep(Instant::now(), at(241));
        assert_eq!(report.timed_out, vec![running.id], "its deadline");
        assert!(report.removed_operations.is_empty());
        for secs in [242, 245, 250] {
            let report = store.sweep(Instant::now(), at(secs));
            assert!(report.timed_out.is_empty(), "timed out once");
            assert!(report.removed_operations.is_empty());
        }
        let report = store.sweep(Instant::now(), at(252));
        assert_eq!(report.removed_operations, vec![running.id]);
        assert_eq!(store.stats().operations, 0);
        // Its context and call are free again.
        assert!(store.create(removal("c1", "running")).is_ok());
    }

    /// At its deadline a removal is handed out to be reconciled once, stays running while
    /// the platform is asked, and takes the conclusion only while still reconciling.
    #[test]
    fn a_removal_is_reconciled_once_and_only_while_it_waits_for_the_answer() {
        let store = store_with(|config| config.reconcile_timeout_ms = 30_000);
        let t0 = OffsetDateTime::now_utc();
        let at = |secs: i64| t0 + time::Duration::seconds(secs);
        let mut asked = removal("c1", "asked");
        asked.participant = Some("8:acs:bob".into());
        let asked = store.create(asked).unwrap();
        store.transition(asked.id, Transition::Accepted, t0);

        let report = store.sweep(Instant::now(), at(241));
        assert!(report.timed_out.is_empty());
        assert_eq!(report.reconcile.len(), 1);
        assert_eq!(
            report.reconcile[0].participant.as_deref(),
            Some("8:acs:bob")
        );
        let waiting = store.get(asked.id).unwrap();
        assert_eq!(waiting.status, OperationStatus::Running);
        assert_eq!(waiting.settle_reason(), Some(SettleReason::Reconciling));
        let report = store.sweep(Instant::now(), at(250));
        assert!(
            report.reconcile.is_empty() && report.timed_out.is_empty(),
            "asked once"
        );

        let gone = reconcile::conclude(
            &OperationKind::RemoveParticipant,
            reconcile::Reading::ParticipantGone,
            Duration::from_secs(240),
        );
        assert_eq!(store.reconciled(asked.id, &gone, at(251)), Some(true));
        let settled = store.get(asked.id).unwrap();
        assert_eq!(settled.status, OperationStatus::Succeeded);
        assert!(settled.reconciled && settled.settle_by.is_none());
        assert_eq!(
            store.reconciled(asked.id, &gone, at(252)),
            Some(false),
            "once"
        );
    }

    #[test]
    fn an_unanswered_reconciliation_times_out_and_a_callback_beats_an_answer() {
        let store = store_with(|config| config.reconcile_timeout_ms = 30_000);
        let t0 = OffsetDateTime::now_utc();
        let at = |secs: i64| t0 + time::Duration::seconds(secs);
        let mut slow = removal("c1", "slow");
        slow.participant = Some("8:acs:bob".into());
        let slow = store.create(slow).unwrap();
        let mut beaten = removal("c1", "beaten");
        beaten.participant = Some("8:acs:eve".into());
        let beaten = store.create(beaten).unwrap();
        assert_eq!(store.sweep(Instant::now(), at(241)).reconcile.len(), 2);

        let report = store.sweep(Instant::now(), at(272));
        assert_eq!(report.timed_out.len(), 2, "the answer did not come in time");
        assert!(store.get(slow.id).unwrap().timed_out());
        let gone = reconcile::conclude(
            &OperationKind::RemoveParticipant,
            reconcile::Reading::ParticipantGone,
            Duration::from_secs(240),
        );
        assert_eq!(store.reconciled(slow.id, &gone, at(273)), Some(false));
        assert!(store.get(slow.id).unwrap().timed_out());

        // A real callback settles the other; a late answer changes nothing.
        store.deliver(
            event("e-real", "c1", Some("beaten"), failed()),
            Instant::now(),
        );
        assert_eq!(store.reconciled(beaten.id, &gone, at(274)), Some(false));
        let beaten = store.get(beaten.id).unwrap();
        assert_eq!(beaten.status, OperationStatus::Failed);
        assert!(beaten.late && !beaten.reconciled);
    }

    #[test]
    fn a_call_end_settles_its_waiting_removals_after_the_grace_period() {
        let store = store_with(|config| config.call_end_grace_ms = 5_000);
        let t0 = OffsetDateTime::now_utc();
        let at = |millis: i64| t0 + time::Duration::milliseconds(millis);
        let waiting = store.create(removal("c1", "waiting")).unwrap();
        let answered = store.create(removal("c1", "answered")).unwrap();
        let elsewhere = store.create(removal("c2", "elsewhere")).unwrap();
        let marked = store.end_call_after_grace(&call("c1"), t0);
        assert_eq!(marked.len(), 2);
        assert!(store.sweep(Instant::now(), at(4_900)).call_ended.is_empty());
        store.deliver(
            event("e-ok", "c1", Some("answered"), succeeded()),
            Instant::now(),
        );
        let report = store.sweep(Instant::now(), at(5_100));
        assert_eq!(report.call_ended, vec![waiting.id]);
        let ended = store.get(waiting.id).unwrap();
        assert_eq!(ended.error.as_ref().unwrap().code, "CallEnded");
        assert!(ended.reconciled);
        let answered = store.get(answered.id).unwrap();
        assert_eq!(answered.status, OperationStatus::Succeeded);
        assert!(!answered.reconciled);
        assert_eq!(
            store.get(elsewhere.id).unwrap().status,
            OperationStatus::NotStarted
        );
    }

    #[test]
    fn a_callback_for_a_retired_operation_parks_like_any_unknown_one() {
        let store = store();
        let mut old = removal("c1", "old");
        old.apply(Transition::Succeeded { result: None }, days_ago(2))
            .unwrap();
        store.create(old).unwrap();
        store.sweep(Instant::now(), OffsetDateTime::now_utc());
        assert_eq!(
            store.deliver(
                event("late", "c1", Some("old"), succeeded()),
                Instant::now()
            ),
            Delivery::Parked
        );
    }

    #[test]
    fn idle_call_timelines_are_retired_with_the_operations() {
        let store = store();
        let mut stale = event("e1", "c1", None, None);
        stale.received = days_ago(2);
        store.deliver(stale, Instant::now());
        store.deliver(event("e2", "c2", None, None), Instant::now());
        store.sweep(Instant::now(), OffsetDateTime::now_utc());
        assert_eq!(store.call_events(&call("c1")), None);
        assert_eq!(store.call_events(&call("c2")).unwrap().len(), 1);
    }

    #[test]
    fn list_filters_and_pages_newest_first() {
        let store = store();
        let removals: Vec<OperationId> = (0..4)
            .map(|n| store.create(removal("c1", &format!("ctx{n}"))).unwrap().id)
            .collect();
        let other_call = store.create(removal("c2", "ctx0")).unwrap().id;
        let Delivery::Observed { id: played } =
            store.deliver(event_of(play(), "p", "ctx9", succeeded()), Instant::now())
        else {
            panic!("not observed");
        };
        store.deliver(event("e1", "c1", Some("ctx1"), succeeded()), Instant::now());
        store.transition(removals[2], Transition::Accepted, OffsetDateTime::now_utc());

        let everything = store.list(&ListFilter::default(), 100);
        assert_eq!(everything.0.len(), 6);
        assert!(!everything.1);
        assert_eq!(everything.0[0].id, played, "newest first");

        let by_call = ListFilter {
            call_connection_id: Some("c1".into()),
            ..ListFilter::default()
        };
        let (page, more) = store.list(&by_call, 3);
        // The observed play is on c1 too, and the newest.
        assert_eq!(ids(&page), [played, removals[3], removals[2]]);
        assert!(more);
        let rest = ListFilter {
            before: Some(removals[2]),
            ..by_call.clone()
        };
        let (page, more) = store.list(&rest, 3);
        assert_eq!(ids(&page), [removals[1], removals[0]]);
        assert!(!more);
        // Exactly `limit` left: no more.
        let (page, more) = store.list(&rest, 2);
        assert_eq!(page.len(), 2);
        assert!(!more);

        let by_context = ListFilter {
            context: Some("ctx0".into()),
            ..ListFilter::default()
        };
        assert_eq!(
            ids(&store.list(&by_context, 10).0),
            [other_call, removals[0]]
        );

        let status = |status| ListFilter {
            status: Some(status),
            ..ListFilter::default()
        };
        assert_eq!(
            ids(&store.list(&status(OperationStatus::Running), 10).0),
            [removals[2]]
        );
        assert_eq!(
            ids(&store.list(&status(OperationStatus::Succeeded), 10).0),
            [played, removals[1]]
        );
        assert!(
            store
                .list(&status(OperationStatus::Canceled), 10)
                .0
                .is_empty()
        );

        let kind = |kind| ListFilter {
            kind: Some(kind),
            ..ListFilter::default()
        };
        assert_eq!(ids(&store.list(&kind(play()), 10).0), [played]);
        assert_eq!(
            store
                .list(&kind(OperationKind::RemoveParticipant), 10)
                .0
                .len(),
            5
        );
        assert!(
            store
                .list(&kind(OperationKind::CancelMediaProcessing), 10)
                .0
                .is_empty()
        );

        let combined = ListFilter {
            call_connection_id: Some("c1".into()),
            kind: Some(OperationKind::RemoveParticipant),
            status: Some(OperationStatus::NotStarted),
            ..ListFilter::default()
        };
        assert_eq!(
            ids(&store.list(&combined, 10).0),
            [removals[3], removals[0]]
        );

        // Graph call ids never match ACS call connections.
        let graph = ListFilter {
            call_id: Some("c1".into()),
            ..ListFilter::default()
        };
        assert!(store.list(&graph, 10).0.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_on_a_settled_operation_returns_at_once() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), Instant::now());
        let started = Instant::now();
        let settled = store
            .wait_settled(op.id, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(settled.status, OperationStatus::Succeeded);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(
            store
                .wait_settled(OperationId::new(), Duration::from_secs(5))
                .await,
            None,
            "unknown operations are not waited for"
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_on_a_running_operation_times_out() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        store.transition(op.id, Transition::Accepted, OffsetDateTime::now_utc());
        let started = Instant::now();
        let still = store
            .wait_settled(op.id, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(still.status, OperationStatus::Running);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(store.stats().waiting, 0);
        // A zero timeout is a plain read.
        let read = store.wait_settled(op.id, Duration::ZERO).await.unwrap();
        assert_eq!(read.status, OperationStatus::Running);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    /// Spawns a task that waits for a long poll to start, then delivers `event`.
    fn deliver_once_waited_on(
        store: &OperationStore,
        event: IncomingEvent,
    ) -> tokio::task::JoinHandle<Delivery> {
        let store = store.clone();
        tokio::spawn(async move {
            while store.stats().waiting == 0 {
                tokio::task::yield_now().await;
            }
            store.deliver(event, Instant::now())
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_woken_by_the_settling_callback() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let settler = deliver_once_waited_on(&store, event("e1", "c1", Some("ctx"), succeeded()));
        let started = Instant::now();
        let woken = tokio::time::timeout(
            Duration::from_secs(60),
            store.wait_settled(op.id, Duration::from_secs(3600)),
        )
        .await
        .expect("woken long before its timeout")
        .unwrap();
        assert_eq!(woken.status, OperationStatus::Succeeded);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(settler.await.unwrap(), matched(op.id, EventEffect::Applied));
        assert_eq!(store.stats().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_woken_by_an_upstream_rejection() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let rejecter = {
            let store = store.clone();
            tokio::spawn(async move {
                while store.stats().waiting == 0 {
                    tokio::task::yield_now().await;
                }
                store.transition(op.id, failure(), OffsetDateTime::now_utc())
            })
        };
        let started = Instant::now();
        let woken = store
            .wait_settled(op.id, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(woken.status, OperationStatus::Failed);
        assert!(started.elapsed() < Duration::from_secs(1));
        rejecter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn every_waiter_is_woken_and_the_count_follows_them() {
        let store = store();
        let op = store.create(removal("c1", "ctx")).unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.wait_settled(op.id, Duration::from_secs(3600)).await },
                )
            })
            .collect();
        while store.stats().waiting < 3 {
            tokio::task::yield_now().await;
        }
        // A long poll whose client went away is no longer counted.
        let abandoned = tokio::time::timeout(
            Duration::from_secs(1),
            store.wait_settled(op.id, Duration::from_secs(3600)),
        )
        .await;
        assert!(abandoned.is_err());
        assert_eq!(store.stats().waiting, 3);

        let started = Instant::now();
        store.deliver(event("e1", "c1", Some("ctx"), failed()), Instant::now());
        for waiter in waiters {
            let woken = waiter.await.unwrap().unwrap();
            assert_eq!(woken.status, OperationStatus::Failed);
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(store.stats().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_woken_when_a_parked_callback_settles_the_new_operation() {
        let store = store();
        let op = removal("c1", "ctx");
        let id = op.id;
        // The operation does not exist yet: waiting on it answers None...
        assert_eq!(store.wait_settled(id, Duration::from_secs(5)).await, None);
        store.deliver(event("e1", "c1", Some("ctx"), succeeded()), Instant::now());
        // ...and once created from a parked callback it is already settled.
        let created = store.create(op).unwrap();
        assert_eq!(created.status, OperationStatus::Succeeded);
        let started = Instant::now();
        let settled = store
            .wait_settled(id, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(settled.status, OperationStatus::Succeeded);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// 200 operations on 7 calls; every third fails. Returns (operations, their events).
    fn many() -> (Vec<Operation>, Vec<IncomingEvent>) {
        let ops = (0..200)
            .map(|n| removal(&format!("c{}", n % 7), &format!("ctx{n}")))
            .collect();
        let events = (0..200)
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
        (ops, events)
    }

    /// Each of 8 tasks delivers `events` in its own order.
    fn deliver_from_8_tasks(
        store: &OperationStore,
        events: &[IncomingEvent],
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..8)
            .map(|task| {
                let store = store.clone();
                let mut events = events.to_vec();
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
            .collect()
    }

    /// Every operation settled as its event says, with exactly one event, applied.
    fn assert_each_settled_once(store: &OperationStore, ops: &[Operation]) {
        for (n, op) in ops.iter().enumerate() {
            let op = store.get(op.id).unwrap();
            let want = if n % 3 == 0 {
                OperationStatus::Failed
            } else {
                OperationStatus::Succeeded
            };
            assert_eq!(op.status, want, "operation {n}");
            assert_eq!(
                timeline(&op.events),
                [(format!("e{n}"), EventEffect::Applied)],
                "operation {n}: duplicates must be dropped"
            );
        }
        let stats = store.stats();
        assert_eq!((stats.operations, stats.parked), (ops.len(), 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_duplicate_deliveries_apply_each_event_once() {
        let store = store();
        let (ops, events) = many();
        for op in &ops {
            store.create(op.clone()).unwrap();
        }
        for task in deliver_from_8_tasks(&store, &events) {
            task.await.unwrap();
        }
        assert_each_settled_once(&store, &ops);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn deliveries_racing_creation_are_parked_or_applied_never_lost() {
        let store = store();
        let (ops, events) = many();
        let deliverers = deliver_from_8_tasks(&store, &events);
        let creator = {
            let store = store.clone();
            let ops = ops.clone();
            tokio::spawn(async move {
                for op in ops {
                    let created = store.create(op).unwrap();
                    assert!(created.events.len() <= 1);
                    tokio::task::yield_now().await;
                }
            })
        };
        for task in deliverers {
            task.await.unwrap();
        }
        creator.await.unwrap();
        assert_each_settled_once(&store, &ops);
    }

    /// A callback parked before `create` is applied before any callback that races the
    /// creation: the older outcome wins, every time.
    #[test]
    fn parked_callbacks_apply_before_a_racing_one() {
        let store = store();
        let (ids, racing) = std::sync::mpsc::channel::<(OperationId, String)>();
        let racer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for (id, context) in racing {
                    while store.get(id).is_none() {
                        std::hint::spin_loop();
                    }
                    let racing = event(&format!("b-{context}"), "c1", Some(&context), succeeded());
                    store.deliver(racing, Instant::now());
                }
            })
        };
        let mut created = Vec::new();
        for round in 0..20_000 {
            let context = format!("ctx{round}");
            let parked = event(&format!("a-{context}"), "c1", Some(&context), failed());
            store.deliver(parked, Instant::now());
            let operation = removal("c1", &context);
            created.push(operation.id);
            ids.send((operation.id, context)).unwrap();
            store.create(operation).unwrap();
        }
        drop(ids);
        racer.join().unwrap();
        for (round, id) in created.into_iter().enumerate() {
            let settled = store.get(id).unwrap();
            assert_eq!(settled.status, OperationStatus::Failed, "round {round}");
        }
    }

    #[test]
    fn a_restored_store_carries_on_where_the_record_left_off() {
        let before = store();
        let now = Instant::now();
        let wall = OffsetDateTime::now_utc();
        // A running removal, a settled one, an observed play, a parked early callback.
        let running = before.create(removal("c1", "ctx-run")).unwrap();
        let settled = before.create(removal("c1", "ctx-done")).unwrap();
        before.deliver(event("e-done", "c1", Some("ctx-done"), succeeded()), now);
        before.deliver(event_of(play(), "e-play", "ctx-play", succeeded()), now);
        let early = event("e-early", "c2", Some("ctx-early"), succeeded());
        assert_eq!(before.deliver(early.clone(), now), Delivery::Parked);
        before.record_upstream(running.id, &["UP-1"], Some("running"));

        let operations: Vec<Operation> = [running.id, settled.id]
            .into_iter()
            .chain(
                before
                    .list(&ListFilter::default(), 100)
                    .0
                    .iter()
                    .map(|op| op.id),
            )
            .filter_map(|id| before.get(id))
            .collect();
        let after = store();
        let kept_call = CallRef::CallConnection("c4".to_owned());
        let kept_event = event("e-call", "c4", None, None).record(EventEffect::Recorded);
        let report = after.restore(
            Restored {
                operations: operations.clone(),
                seen: vec![
                    ("e-done".to_owned(), wall),
                    ("e-play".to_owned(), wall),
                    ("e-early".to_owned(), wall),
                    ("e-forgotten".to_owned(), wall - time::Duration::days(30)),
                ],
                parked: vec![
                    (early, wall),
                    (
                        event("e-stale", "c3", Some("ctx-stale"), succeeded()),
                        wall - time::Duration::hours(1),
                    ),
                ],
                // A second name the operation does not show (Graph's `Location` id).
                upstream: vec![("location2".to_owned(), running.id)],
                call_events: vec![(kept_call.clone(), vec![(7, kept_event.clone())])],
            },
            now,
            wall,
        );
        assert_eq!(after.call_events(&kept_call), Some(vec![kept_event]));
        // The stale parked event is moved to its call's timeline as the sweep would, counted,
        // and reported so the record moves it too; call event numbers carry on.
        assert_eq!(report.unparked, ["e-stale"]);
        let stale_call = CallRef::CallConnection("c3".to_owned());
        let on_call = after.call_events(&stale_call).unwrap();
        assert_eq!(on_call.len(), 1);
        assert_eq!(on_call[0].id.as_deref(), Some("e-stale"));
        assert_eq!(on_call[0].effect, EventEffect::Unmatched);
        assert_eq!(report.swept.expired.len(), 1);
        assert_eq!(
            report.swept.call_events,
            [CallEventAdded {
                call: stale_call,
                seq: 8,
                kept_from: 8,
                record: on_call[0].clone(),
            }]
        );
        assert_eq!(after.stats().parked_expired, 1);
        for op in &operations {
            assert_eq!(after.get(op.id).as_ref(), Some(op), "{op:?}");
        }
        // Redeliveries are duplicates; a long-forgotten id is not.
        let again = event("e-done", "c1", Some("ctx-done"), succeeded());
        assert_eq!(after.deliver(again, now), Delivery::Duplicate);
        let old = event("e-forgotten", "c9", None, None);
        assert_eq!(after.deliver(old, now), Delivery::CallEvent);
        // The running context is still claimed; the settled one is free again.
        assert_eq!(
            after.create(removal("c1", "ctx-run")).unwrap_err(),
            ContextInUse(running.id)
        );
        assert!(after.create(removal("c1", "ctx-done")).is_ok());
        // The upstream id still finds the running operation.
        let by_id = IncomingEvent {
            upstream_id: Some(UpstreamId::new("up-1")),
            ..event("e-up", "c1", None, succeeded())
        };
        assert!(matches!(
            after.deliver(by_id, now),
            Delivery::Matched { id, .. } if id == running.id
        ));
        let by_location = IncomingEvent {
            upstream_id: Some(UpstreamId::new("LOCATION-2")),
            ..event("e-location", "c1", None, succeeded())
        };
        assert!(matches!(
            after.deliver(by_location, now),
            Delivery::Matched { id, .. } if id == running.id
        ));
        // The parked callback settles its operation when it appears.
        let created = after.create(removal("c2", "ctx-early")).unwrap();
        assert_eq!(created.status, OperationStatus::Succeeded);
        assert_eq!(after.stats().parked, 0);
    }

    #[test]
    fn only_parked_events_are_handed_to_the_caller() {
        let store = store();
        let mut noted = Vec::new();
        let now = Instant::now();
        let mut note = |noted_now: Noted<'_>| {
            if let Noted::Parked(e) = noted_now {
                noted.push(e.id.clone().unwrap());
            }
        };
        for event in [
            event("p1", "c1", Some("later"), succeeded()),
            event("p2", "c1", Some("later"), failed()),
        ] {
            let delivery = store.deliver_noting(event, now, &mut note);
            assert_eq!(delivery, Delivery::Parked);
        }
        let op = store.create(removal("c1", "now")).unwrap();
        let delivery =
            store.deliver_noting(event("m1", "c1", Some("now"), succeeded()), now, &mut note);
        assert!(matches!(delivery, Delivery::Matched { id, .. } if id == op.id));
        assert_eq!(noted, ["p1", "p2"]);
    }

    /// A chatty upstream: 10 000 distinct events on one operation's context, the first 60
    /// parked before it exists.
    #[test]
    fn an_operation_keeps_its_first_and_last_events_and_hands_over_the_rest() {
        let config = config();
        let bound = config.event_bound();
        let store = OperationStore::new(&config);
        let now = Instant::now();
        let ids: Vec<String> = (0..10_000).map(|n| format!("e{n}")).collect();
        let mut evicted = Vec::new();
        let mut note = |noted: Noted<'_>| match noted {
            Noted::Evicted { record, .. } => evicted.push(record.id.unwrap()),
            Noted::Parked(_) | Noted::CallEvent { .. } => {}
        };
        for id in &ids[..60] {
            let parked = store.deliver_noting(event(id, "c1", Some("ctx"), None), now, &mut note);
            assert_eq!(parked, Delivery::Parked);
        }
        let op = store
            .create_noting(removal("c1", "ctx"), &mut note)
            .unwrap();
        assert_eq!(op.events.len(), bound.first + bound.last);
        for id in &ids[60..] {
            let delivery = store.deliver_noting(event(id, "c1", Some("ctx"), None), now, &mut note);
            assert!(matches!(delivery, Delivery::Matched { id, .. } if id == op.id));
        }
        let op = store.get(op.id).unwrap();
        let kept = bound.first + bound.last;
        assert_eq!(op.events.len(), kept);
        assert_eq!(op.events_omitted, (ids.len() - kept) as u64);
        let listed: Vec<&str> = op.events.iter().filter_map(|e| e.id.as_deref()).collect();
        assert_eq!(listed[..bound.first], ids[..bound.first]);
        assert_eq!(listed[bound.first..], ids[ids.len() - bound.last..]);
        // Every other id was handed over, once, in arrival order.
        assert_eq!(evicted, ids[bound.first..ids.len() - bound.last]);
        // The duplicate filter is not the timeline.
        assert_eq!(
            store.deliver(event("e500", "c1", Some("ctx"), None), now),
            Delivery::Duplicate
        );
    }
}

#[cfg(test)]
#[path = "tracker_graph_tests.rs"]
mod graph_tests;

#[cfg(test)]
#[path = "tracker_prop_tests.rs"]
mod prop_tests;
