//! The bridge between the in-memory store (the hot index) and the journal (the durable
//! record): it turns what a request changed into one journal batch (operation snapshots
//! with their revisions but without their events, the events that arrived since the last
//! commit, event ids seen, parked events, call events), and the journal's contents back
//! into a store at start.
//!
//! Callers collect a [`Changes`] while they work on the store, then [`Recorder::commit`]
//! it and answer only once that returned: an operation is durable before its 202, a
//! callback before its 2xx. With the memory store, nothing is collected or written.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::crypto::sha256;
use time::OffsetDateTime;

use crate::correlation::IncomingEvent;
use crate::metrics::Metrics;
use crate::operation::{CallRef, EventBound, EventRecord, Operation, OperationId};
use crate::store::journal::{Batch, Journal, JournalError, Loaded, OperationEvents};
use crate::store::tracker::{Noted, OperationStore, Restored};

/// Writes changes to the journal (or nowhere, for the memory store).
#[derive(Clone, Debug)]
pub struct Recorder {
    journal: Journal,
    durable: bool,
    metrics: Metrics,
    /// The size of the last snapshot serialized, shared by every clone: the next one's
    /// buffer starts that large (plus some slack), so it is allocated once, not grown.
    snapshot_size: Arc<AtomicUsize>,
    /// Operations whose last commit failed: written again with every commit until one
    /// succeeds, so a later acknowledgement (a redelivered duplicate's) covers them too.
    unwritten: Arc<Unwritten>,
    /// Event ids recorded on an operation are not written as separate `seen` rows: the
    /// operation's snapshot lists them, and [`restored`] rebuilds the duplicate filter from
    /// it. True unless operations may be retired before their event ids expire.
    ids_on_operations: bool,
}

#[derive(Debug, Default)]
struct Unwritten {
    any: AtomicBool,
    operations: Mutex<BTreeSet<OperationId>>,
}

impl Unwritten {
    fn ids(&self) -> MutexGuard<'_, BTreeSet<OperationId>> {
        self.operations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The buffer a snapshot is serialized into starts at least this large.
const MIN_SNAPSHOT_CAPACITY: usize = 512;
/// Room for a snapshot to grow past the last one's size without a reallocation.
const SNAPSHOT_SLACK: usize = 256;

/// What one request (or one sweep) changed, to be written together.
#[derive(Debug, Default)]
pub struct Changes {
    durable: bool,
    ids_on_operations: bool,
    operations: BTreeSet<OperationId>,
    /// Operations whose stored events are all written again (renumbered at start).
    replace_events: BTreeSet<OperationId>,
    removed: Vec<OperationId>,
    seen: Vec<(String, i64)>,
    parked: Vec<(u64, Vec<u8>, i64)>,
    unparked: Vec<u64>,
    seen_expired_before: Option<i64>,
    call_events: Vec<(String, u64, Vec<u8>)>,
    call_events_kept_from: Vec<(String, u64)>,
    retired_calls: Vec<(String, u64)>,
}

impl Changes {
    /// An operation changed: its snapshot is written at commit.
    pub fn operation(&mut self, id: OperationId) {
        if self.durable {
            self.operations.insert(id);
        }
    }

    /// Operations changed.
    pub fn operations(&mut self, ids: impl IntoIterator<Item = OperationId>) {
        if self.durable {
            self.operations.extend(ids);
        }
    }

    /// Operations whose stored events do not match their timeline (written under another
    /// bound, or unreadable): all their events are written again, and no others kept.
    pub fn replace_events(&mut self, ids: impl IntoIterator<Item = OperationId>) {
        if self.durable {
            for id in ids {
                self.operations.insert(id);
                self.replace_events.insert(id);
            }
        }
    }

    /// An event was added to `call`'s timeline as `seq`, which now keeps the events from
    /// `kept_from` on.
    pub fn call_event(&mut self, call: &CallRef, seq: u64, kept_from: u64, record: &EventRecord) {
        if !self.durable {
            return;
        }
        match serde_json::to_vec(record) {
            Ok(json) => {
                let key = call_key(call);
                self.call_events_kept_from.push((key.clone(), kept_from));
                self.call_events.push((key, seq, json));
            }
            Err(error) => tracing::error!(%error, "a call event could not be serialized"),
        }
    }

    /// Calls' idle timelines were dropped, each with the last sequence number it used.
    pub fn retired_calls<'a>(&mut self, calls: impl IntoIterator<Item = &'a (CallRef, u64)>) {
        if self.durable {
            self.retired_calls.extend(
                calls
                    .into_iter()
                    .map(|(call, last)| (call_key(call), *last)),
            );
        }
    }

    /// Settled operations past retention were removed.
    pub fn removed(&mut self, ids: impl IntoIterator<Item = OperationId>) {
        if self.durable {
            self.removed.extend(ids);
        }
    }

    /// An event id was seen for the first time, at `received`.
    pub fn seen(&mut self, id: String, received: OffsetDateTime) {
        if self.durable {
            self.seen.push((id, unix_ms(received)));
        }
    }

    /// An event id was seen for the first time, at `received`, and is recorded on an
    /// operation whose snapshot is in these changes: written as its own row only when
    /// operations may be retired before their event ids expire (see [`restored`]).
    pub fn seen_on_operation(&mut self, id: String, received: OffsetDateTime) {
        if !self.ids_on_operations {
            self.seen(id, received);
        }
    }

    /// Event ids seen before `before` were forgotten.
    pub fn seen_expired_before(&mut self, before: OffsetDateTime) {
        if self.durable {
            self.seen_expired_before = Some(unix_ms(before));
        }
    }

    /// True when changes are kept at all (a durable store): the caller then hands copies of
    /// what it needs (a parked event, an event id) to these methods.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// `event` was parked (its operation is not known yet). Events without an id cannot be
    /// told apart and are not kept.
    pub fn parked(&mut self, event: &IncomingEvent) {
        let (true, Some(key)) = (self.durable, parked_key(event)) else {
            return;
        };
        match serde_json::to_vec(event) {
            Ok(json) => self.parked.push((key, json, unix_ms(event.received))),
            Err(error) => tracing::error!(%error, "a parked event could not be serialized"),
        }
    }

    /// What the store handed over while it worked: a parked event to keep, an event
    /// dropped from a bounded timeline (its id is then remembered on its own, and no
    /// longer parked if it was), or an event added to a call's timeline.
    pub fn noted(&mut self, noted: Noted<'_>) {
        match noted {
            Noted::Parked(event) => self.parked(event),
            Noted::CallEvent {
                call,
                seq,
                kept_from,
                record,
            } => self.call_event(call, seq, kept_from, record),
            Noted::Evicted { record, .. } => {
                if let Some(id) = record.id {
                    self.unparked([Some(id.as_str())]);
                    self.seen(id, record.received_date_time);
                }
            }
        }
    }

    /// Parked events were applied or expired.
    pub fn unparked<'a>(&mut self, events: impl IntoIterator<Item = Option<&'a str>>) {
        if self.durable {
            self.unparked
                .extend(events.into_iter().flatten().map(key_of_event_id));
        }
    }
}

impl Recorder {
    /// Keeps nothing.
    pub fn memory() -> Self {
        Self {
            journal: Journal::memory(),
            durable: false,
            metrics: Metrics::new(),
            snapshot_size: Arc::default(),
            unwritten: Arc::default(),
            ids_on_operations: false,
        }
    }

    /// Writes to `journal`.
    pub fn durable(journal: Journal) -> Self {
        Self {
            journal,
            durable: true,
            metrics: Metrics::new(),
            snapshot_size: Arc::default(),
            unwritten: Arc::default(),
            ids_on_operations: false,
        }
    }

    /// True when commits reach a journal (and readers wait for them).
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// With `retention` (of settled operations) at least `dedupe_ttl` (of event ids), an
    /// event id recorded on an operation is restored from the operation's snapshot, so it
    /// needs no row of its own: one B-tree page less to write per callback.
    pub fn with_retention(mut self, retention: Duration, dedupe_ttl: Duration) -> Self {
        self.ids_on_operations = retention >= dedupe_ttl;
        self
    }

    /// The recorder, timing its commits into `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Whether the store can commit now (always, in memory).
    pub async fn probe(&self) -> Result<(), JournalError> {
        self.journal.probe().await
    }

    /// An empty change set for one request.
    pub fn changes(&self) -> Changes {
        Changes {
            durable: self.durable,
            ids_on_operations: self.ids_on_operations,
            ..Changes::default()
        }
    }

    /// Writes `changes` (operations as they are in `store` now, so with every change up to
    /// this moment; the journal keeps the highest revision) and returns once they are
    /// durable.
    pub async fn commit(
        &self,
        store: &OperationStore,
        mut changes: Changes,
    ) -> Result<(), JournalError> {
        if !self.durable {
            return Ok(());
        }
        let retried: Vec<OperationId> = if self.unwritten.any.load(Ordering::Acquire) {
            self.unwritten.ids().iter().copied().collect()
        } else {
            Vec::new()
        };
        changes.operations.extend(retried.iter().copied());
        let mut batch = Batch {
            removed_operations: changes.removed.iter().map(ToString::to_string).collect(),
            seen: changes.seen,
            seen_expired_before: changes.seen_expired_before,
            parked: changes.parked,
            unparked: changes.unparked,
            call_events: changes.call_events,
            call_events_kept_from: changes.call_events_kept_from,
            retired_calls: changes.retired_calls,
            ..Batch::default()
        };
        batch.operations.reserve_exact(changes.operations.len());
        let bound = store.event_bound();
        // (operation, revision, events total) to note as durable once committed.
        let mut written = Vec::with_capacity(changes.operations.len());
        for id in changes.operations {
            // Serialized under the entry's read lock: no copy of the operation.
            let capacity = (self.snapshot_size.load(Ordering::Relaxed) + SNAPSHOT_SLACK)
                .max(MIN_SNAPSHOT_CAPACITY);
            let replace = changes.replace_events.contains(&id);
            let snapshot = store.read(id, |operation| {
                let mut json = Vec::with_capacity(capacity);
                serde_json::to_writer(&mut json, &operation.without_events())?;
                let events = new_events(operation, bound, replace)?;
                Ok::<_, serde_json::Error>((json, revision(operation), events))
            });
            match snapshot {
                Some(Ok((json, revision, events))) => {
                    self.snapshot_size.store(json.len(), Ordering::Relaxed);
                    let events_total = events.map(|(events, total)| {
                        batch.events.push(OperationEvents { revision, ..events });
                        total
                    });
                    written.push((id, revision, events_total));
                    batch.operations.push((id.to_string(), json, revision));
                }
                Some(Err(error)) => {
                    tracing::error!(operation.id = %id, %error, "an operation could not be serialized");
                }
                None => {}
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let (records, started) = (batch.len(), std::time::Instant::now());
        let result = self.journal.write(batch).await;
        self.metrics.store_commit(records, started.elapsed());
        match &result {
            Ok(()) => {
                for (id, revision, events_total) in written {
                    let revision = u64::try_from(revision).unwrap_or_default();
                    store.mark_durable(id, revision, events_total);
                }
                if !retried.is_empty() {
                    let mut unwritten = self.unwritten.ids();
                    for id in &retried {
                        unwritten.remove(id);
                    }
                    self.unwritten
                        .any
                        .store(!unwritten.is_empty(), Ordering::Release);
                }
            }
            Err(_) => {
                let mut unwritten = self.unwritten.ids();
                unwritten.extend(written.into_iter().map(|(id, _, _)| id));
                self.unwritten.any.store(true, Ordering::Release);
            }
        }
        result
    }
}

/// The events of `operation` the journal does not have yet (all of them when `replace`),
/// with the range of those dropped from the middle, and the events total they bring the
/// record to; `None` when there are none.
fn new_events(
    operation: &Operation,
    bound: EventBound,
    replace: bool,
) -> serde_json::Result<Option<(OperationEvents, u64)>> {
    let written = if replace { 0 } else { operation.events_written };
    let total = operation.events_total();
    if total <= written && !replace {
        return Ok(None);
    }
    let mut added = Vec::new();
    for (index, event) in operation.events.iter().enumerate().rev() {
        let ordinal = operation.event_ordinal(index, bound);
        if ordinal < written {
            break;
        }
        added.push((ordinal, serde_json::to_vec(event)?));
    }
    added.reverse();
    let first = bound.first as u64;
    let evicted = (operation.events_omitted > 0).then(|| (first, first + operation.events_omitted));
    let events = OperationEvents {
        operation: operation.id.to_string(),
        revision: 0,
        replace,
        added,
        evicted,
    };
    Ok(Some((events, total)))
}

/// A call as the journal names it.
fn call_key(call: &CallRef) -> String {
    match call {
        CallRef::CallConnection(id) => format!("acs:{id}"),
        CallRef::Call(id) => format!("graph:{id}"),
    }
}

fn call_of_key(key: &str) -> Option<CallRef> {
    if let Some(id) = key.strip_prefix("acs:") {
        Some(CallRef::CallConnection(id.to_owned()))
    } else {
        key.strip_prefix("graph:")
            .map(|id| CallRef::Call(id.to_owned()))
    }
}

/// The journal's contents as the store takes them; unreadable rows are logged and skipped.
///
/// Each operation gets its events back in order. One whose stored ordinals are not those
/// its timeline has under `bound` (written under another bound, by schema version 1, or
/// with an unreadable event) is restored with `events_written` below its events total:
/// the caller has its events written again ([`Changes::replace_events`]).
pub fn restored(loaded: Loaded, bound: EventBound) -> Restored {
    let mut restored = Restored::default();
    let mut events = loaded.events.into_iter().peekable();
    for (id, json, revision) in loaded.operations {
        // Both are in id order; rows of an operation that is not stored are skipped.
        while events.next_if(|(of, ..)| *of < id).is_some() {}
        let mut rows = Vec::new();
        while let Some((_, ordinal, body)) = events.next_if(|(of, ..)| *of == id) {
            rows.push((ordinal, body));
        }
        match serde_json::from_slice::<Operation>(&json) {
            Ok(mut operation) => {
                operation.revision = u64::try_from(revision).unwrap_or_default();
                operation.durable = operation.revision + 1;
                let mut numbered = true;
                for (ordinal, body) in rows {
                    match serde_json::from_slice::<EventRecord>(&body) {
                        Ok(event) => {
                            let index = operation.events.len();
                            numbered &= operation.event_ordinal(index, bound) == ordinal;
                            operation.events.push(event);
                        }
                        Err(error) => {
                            numbered = false;
                            tracing::error!(operation.id = %id, %error, "a stored event could not be read; skipped");
                        }
                    }
                }
                operation.events_written = if numbered {
                    operation.events_total()
                } else {
                    0
                };
                restored.operations.push(operation);
            }
            Err(error) => {
                tracing::error!(operation.id = %id, %error, "a stored operation could not be read; skipped")
            }
        }
    }
    restored.seen = loaded
        .seen
        .into_iter()
        .map(|(id, at)| (id, from_unix_ms(at)))
        .collect();
    // Event ids recorded on operations have no row of their own (`Changes::seen_on_operation`).
    restored
        .seen
        .extend(restored.operations.iter().flat_map(|operation| {
            operation
                .events
                .iter()
                .filter_map(|event| Some((event.id.clone()?, event.received_date_time)))
        }));
    let mut parked: Vec<(IncomingEvent, OffsetDateTime)> = Vec::new();
    for (_, json, at) in loaded.parked {
        match serde_json::from_slice::<IncomingEvent>(&json) {
            Ok(event) => parked.push((event, from_unix_ms(at))),
            Err(error) => {
                tracing::error!(%error, "a stored parked event could not be read; skipped")
            }
        }
    }
    // Arrival order.
    parked.sort_by_key(|(event, _)| event.received);
    restored.parked = parked;
    let mut calls: BTreeMap<String, Vec<(u64, EventRecord)>> = BTreeMap::new();
    for (key, seq, json) in loaded.call_events {
        match serde_json::from_slice::<EventRecord>(&json) {
            Ok(event) => calls.entry(key).or_default().push((seq, event)),
            Err(error) => {
                tracing::error!(call = key, %error, "a stored call event could not be read; skipped")
            }
        }
    }
    restored.call_events = calls
        .into_iter()
        .filter_map(|(key, events)| match call_of_key(&key) {
            Some(call) => Some((call, events)),
            None => {
                tracing::error!(
                    call = key,
                    "stored call events name no known platform; skipped"
                );
                None
            }
        })
        .collect();
    restored
}

fn revision(operation: &Operation) -> i64 {
    i64::try_from(operation.revision).unwrap_or(i64::MAX)
}

/// The journal key of a parked event: derived from its event id.
fn parked_key(event: &IncomingEvent) -> Option<u64> {
    event.id.as_deref().map(key_of_event_id)
}

fn key_of_event_id(id: &str) -> u64 {
    let digest = sha256(id.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // SQLite integers are signed: keep the key positive, and off the probe's.
    (u64::from_be_bytes(bytes) >> 1).max(crate::store::journal::PROBE_SEQ + 1)
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_unix_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use tokio::time::Instant;

    use super::*;
    use crate::config::Config;
    use crate::config::OperationsConfig;
    use crate::correlation::Delivery;
    use crate::operation::{CallRef, OperationKind, OperationStatus, Transition};
    use crate::store::journal::SqliteOptions;

    /// Commits without waiting for the disk: these tests commit thousands of times.
    const FAST: SqliteOptions = SqliteOptions {
        max_batch_records: 4096,
        synchronous_full: false,
    };

    /// Delivers `events` and commits what they changed, as the local store does.
    async fn deliver(store: &OperationStore, recorder: &Recorder, events: Vec<IncomingEvent>) {
        let mut changes = recorder.changes();
        for event in events {
            let delivery =
                store.deliver_noting(event, Instant::now(), &mut |noted| changes.noted(noted));
            if let Delivery::Matched { id, .. } | Delivery::Observed { id } = delivery {
                changes.operation(id);
            }
        }
        recorder.commit(store, changes).await.unwrap();
    }

    /// A store restored from the journal at `path` as `open_sqlite` does it (events stored
    /// under another numbering written again), with its recorder.
    async fn reopen(
        path: &std::path::Path,
        config: &OperationsConfig,
    ) -> (OperationStore, Recorder) {
        let journal = Journal::open_sqlite(path, FAST).unwrap();
        let restored = restored(journal.load().unwrap(), config.event_bound());
        let renumbered: Vec<OperationId> = restored
            .operations
            .iter()
            .filter(|op| op.events_written < op.events_total())
            .map(|op| op.id)
            .collect();
        let store = OperationStore::new(config);
        store.restore(restored, Instant::now(), OffsetDateTime::now_utc());
        let recorder = Recorder::durable(journal);
        let mut changes = recorder.changes();
        changes.replace_events(renumbered);
        recorder.commit(&store, changes).await.unwrap();
        (store, recorder)
    }

    fn count(path: &std::path::Path, sql: &str) -> i64 {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row(sql, [], |row| row.get(0)).unwrap()
    }

    fn call_event(id: &str, call: &str, received: OffsetDateTime) -> IncomingEvent {
        IncomingEvent {
            context: None,
            event_type: "Microsoft.Communication.CallConnected".to_owned(),
            kind: OperationKind::Observed("call".into()),
            transition: None,
            ..event(id, call, "", received)
        }
    }

    fn removal(call: &str, context: &str, now: OffsetDateTime) -> Operation {
        Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection(call.to_owned()),
            context.to_owned(),
            now,
        )
    }

    fn event(id: &str, call: &str, context: &str, received: OffsetDateTime) -> IncomingEvent {
        IncomingEvent {
            id: Some(id.to_owned()),
            event_type: "Microsoft.Communication.RemoveParticipantSucceeded".to_owned(),
            call: Some(CallRef::CallConnection(call.to_owned())),
            context: Some(context.to_owned()),
            kind: OperationKind::RemoveParticipant,
            upstream_id: None,
            cancelled: false,
            upstream_status: None,
            transition: Some(Transition::Succeeded { result: None }),
            received,
        }
    }

    /// With retention at least the dedupe window, an event recorded on an operation has no
    /// `seen` row, and the duplicate filter is rebuilt from the operation; otherwise it has.
    #[tokio::test]
    async fn event_ids_on_operations_are_restored_from_them() {
        for (retention, rows) in [(3600, 0), (60, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("callops.db");
            let config = Config::embedded().operations;
            let journal = Journal::open_sqlite(&path, SqliteOptions::default()).unwrap();
            let recorder = Recorder::durable(journal.clone()).with_retention(
                Duration::from_secs(retention),
                Duration::from_secs(config.dedupe_ttl_secs),
            );
            let store = OperationStore::new(&config);
            let now = OffsetDateTime::now_utc();
            let created = store.create(removal("c1", "ctx", now)).unwrap();
            store.deliver(event("e1", "c1", "ctx", now), Instant::now());
            let mut changes = recorder.changes();
            changes.operation(created.id);
            changes.seen_on_operation("e1".to_owned(), now);
            recorder.commit(&store, changes).await.unwrap();
            journal.close().await;

            let loaded = Journal::open_sqlite(&path, SqliteOptions::default())
                .unwrap()
                .load()
                .unwrap();
            assert_eq!(loaded.seen.len(), rows, "retention {retention}");
            let fresh = OperationStore::new(&config);
            fresh.restore(restored(loaded, config.event_bound()), Instant::now(), now);
            assert_eq!(
                fresh.deliver(event("e1", "c1", "ctx", now), Instant::now()),
                Delivery::Duplicate,
                "retention {retention}"
            );
        }
    }

    #[tokio::test]
    async fn what_is_committed_is_what_a_new_store_restores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callops.db");
        let config = Config::embedded().operations;
        let journal = Journal::open_sqlite(&path, SqliteOptions::default()).unwrap();
        let recorder = Recorder::durable(journal.clone());
        let store = OperationStore::new(&config);
        let now = OffsetDateTime::now_utc();

        let created = store.create(removal("c1", "ctx", now)).unwrap();
        let mut changes = recorder.changes();
        changes.operation(created.id);
        recorder.commit(&store, changes).await.unwrap();
        // A callback settles it, another is parked.
        let mut changes = recorder.changes();
        store.deliver(event("e1", "c1", "ctx", now), Instant::now());
        changes.operation(created.id);
        changes.seen("e1".to_owned(), now);
        let early = event("e2", "c2", "early", now);
        store.deliver(early.clone(), Instant::now());
        changes.parked(&early);
        changes.seen("e2".to_owned(), now);
        recorder.commit(&store, changes).await.unwrap();
        journal.close().await;

        let reopened = Journal::open_sqlite(&path, SqliteOptions::default()).unwrap();
        let restored = restored(reopened.load().unwrap(), config.event_bound());
        assert_eq!(restored.operations.len(), 1);
        assert_eq!(restored.operations[0], store.get(created.id).unwrap());
        assert_eq!(restored.operations[0].status, OperationStatus::Succeeded);
        // e1 twice (its own row, written by `seen`, and on its operation), e2 once.
        let seen: BTreeSet<&str> = restored.seen.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(seen, BTreeSet::from(["e1", "e2"]));
        assert_eq!(restored.parked.len(), 1);
        assert_eq!(restored.parked[0].0, early);

        // Applying the parked event at creation unparks it in the record.
        let fresh = OperationStore::new(&config);
        assert!(
            fresh
                .restore(restored, Instant::now(), now)
                .unparked
                .is_empty()
        );
        let second = fresh.create(removal("c2", "early", now)).unwrap();
        assert_eq!(second.status, OperationStatus::Succeeded);
        let recorder = Recorder::durable(reopened.clone());
        let mut changes = recorder.changes();
        changes.operation(second.id);
        changes.unparked(second.events.iter().map(|event| event.id.as_deref()));
        recorder.commit(&fresh, changes).await.unwrap();
        assert!(reopened.load().unwrap().parked.is_empty());
        reopened.close().await;
    }

    /// Each event is written once, as it arrives; those dropped from the middle of the
    /// timeline are deleted; a restart gives back the same operation and call events, and
    /// carries on numbering where the record left off.
    #[tokio::test]
    async fn events_are_appended_and_a_restart_gives_back_the_same_timelines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callops.db");
        let config = Config::embedded().operations;
        let bound = config.event_bound();
        let recorder = Recorder::durable(Journal::open_sqlite(&path, FAST).unwrap());
        let store = OperationStore::new(&config);
        let now = OffsetDateTime::now_utc();
        let created = store.create(removal("c1", "ctx", now)).unwrap();
        let mut changes = recorder.changes();
        changes.operation(created.id);
        recorder.commit(&store, changes).await.unwrap();
        for n in 0..70 {
            deliver(
                &store,
                &recorder,
                vec![event(&format!("e{n}"), "c1", "ctx", now)],
            )
            .await;
        }
        // Several events in one commit, one of them for the call alone.
        let mut events: Vec<_> = (70..75)
            .map(|n| event(&format!("e{n}"), "c1", "ctx", now))
            .collect();
        events.push(call_event("call-1", "c1", now));
        deliver(&store, &recorder, events).await;
        let call = CallRef::CallConnection("c1".to_owned());
        let before = store.get(created.id).unwrap();
        assert_eq!(before.events_omitted, 75 - bound.kept() as u64);
        assert_eq!(
            count(&path, "SELECT count(*) FROM events"),
            bound.kept() as i64
        );
        assert_eq!(count(&path, "SELECT count(*) FROM call_events"), 1);
        recorder.journal().close().await;

        let (after, recorder) = reopen(&path, &config).await;
        assert_eq!(after.get(created.id).as_ref(), Some(&before));
        assert_eq!(after.call_events(&call), store.call_events(&call));
        // And again after more events, on the restored store.
        for n in 75..80 {
            deliver(
                &after,
                &recorder,
                vec![event(&format!("e{n}"), "c1", "ctx", now)],
            )
            .await;
        }
        deliver(&after, &recorder, vec![call_event("call-2", "c1", now)]).await;
        let before = after.get(created.id).unwrap();
        recorder.journal().close().await;
        let (again, recorder) = reopen(&path, &config).await;
        let restored = again.get(created.id).unwrap();
        assert_eq!(restored, before);
        let ids = |op: &Operation| -> Vec<String> {
            op.events.iter().filter_map(|e| e.id.clone()).collect()
        };
        let expected: Vec<String> = (0..bound.first)
            .chain(80 - bound.last..80)
            .map(|n| format!("e{n}"))
            .collect();
        assert_eq!(ids(&restored), expected);
        let on_call: Vec<_> = again.call_events(&call).unwrap();
        assert_eq!(on_call.len(), 2);
        assert_eq!(on_call[1].id.as_deref(), Some("call-2"));
        // The body lists no events.
        let body = recorder.journal().load().unwrap().operations[0].1.clone();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["events"], serde_json::json!([]));
        recorder.journal().close().await;
    }

    /// A timeline written under one bound and restored under another is renumbered, and
    /// carries on from there, through further restarts.
    #[tokio::test]
    async fn events_written_under_another_bound_are_renumbered() {
        for (first, last) in [(5, 20), (20, 60), (0, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("callops.db");
            let config = Config::embedded().operations;
            let recorder = Recorder::durable(Journal::open_sqlite(&path, FAST).unwrap());
            let store = OperationStore::new(&config);
            let now = OffsetDateTime::now_utc();
            let created = store.create(removal("c1", "ctx", now)).unwrap();
            for n in 0..60 {
                deliver(
                    &store,
                    &recorder,
                    vec![event(&format!("e{n}"), "c1", "ctx", now)],
                )
                .await;
            }
            let before = store.get(created.id).unwrap();
            recorder.journal().close().await;

            let mut other = config.clone();
            other.events_first = first;
            other.events_last = last;
            let (after, recorder) = reopen(&path, &other).await;
            assert_eq!(
                after.get(created.id).as_ref(),
                Some(&before),
                "{first}/{last}"
            );
            for n in 60..130 {
                deliver(
                    &after,
                    &recorder,
                    vec![event(&format!("e{n}"), "c1", "ctx", now)],
                )
                .await;
            }
            let before = after.get(created.id).unwrap();
            recorder.journal().close().await;
            let (again, recorder) = reopen(&path, &other).await;
            assert_eq!(again.get(created.id), Some(before), "{first}/{last}");
            recorder.journal().close().await;
        }
    }

    /// A file written by schema version 1 (events inside the operation's body, no events
    /// tables) is migrated at open, and gives back everything it held.
    #[tokio::test]
    async fn a_version_1_file_is_migrated_at_open() {
        const V1_SCHEMA: &str = "
            CREATE TABLE operations (id TEXT PRIMARY KEY, body BLOB NOT NULL, revision INTEGER NOT NULL);
            CREATE TABLE seen (event_id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL) WITHOUT ROWID;
            CREATE INDEX seen_at_ms ON seen (at_ms);
            CREATE TABLE parked (seq INTEGER PRIMARY KEY, body BLOB NOT NULL, at_ms INTEGER NOT NULL);
            PRAGMA user_version = 1;
        ";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callops.db");
        let config = Config::embedded().operations;
        // Operations as version 1 kept them: one with a few events, one with a timeline
        // that dropped events from its middle.
        let store = OperationStore::new(&config);
        let now = OffsetDateTime::now_utc();
        let few = store.create(removal("c1", "few", now)).unwrap();
        let many = store.create(removal("c1", "many", now)).unwrap();
        for n in 0..3 {
            store.deliver(event(&format!("f{n}"), "c1", "few", now), Instant::now());
        }
        for n in 0..80 {
            store.deliver(event(&format!("m{n}"), "c1", "many", now), Instant::now());
        }
        let early = event("p1", "c2", "early", now);
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(V1_SCHEMA).unwrap();
            for id in [few.id, many.id] {
                let op = store.get(id).unwrap();
                conn.execute(
                    "INSERT INTO operations (id, body, revision) VALUES (?1, ?2, ?3)",
                    rusqlite::params![
                        id.to_string(),
                        serde_json::to_vec(&op).unwrap(),
                        revision(&op)
                    ],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO seen (event_id, at_ms) VALUES ('p1', ?1)",
                [unix_ms(now)],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO parked (seq, body, at_ms) VALUES (?1, ?2, ?3)",
                rusqlite::params![
                    parked_key(&early).unwrap() as i64,
                    serde_json::to_vec(&early).unwrap(),
                    unix_ms(now)
                ],
            )
            .unwrap();
        }

        let (after, recorder) = reopen(&path, &config).await;
        for id in [few.id, many.id] {
            let mut expected = store.get(id).unwrap();
            expected.events_written = expected.events_total();
            expected.durable = expected.revision + 1;
            assert_eq!(after.get(id), Some(expected));
        }
        assert_eq!(after.stats().parked, 1);
        assert_eq!(
            after.deliver(event("f1", "c1", "few", now), Instant::now()),
            Delivery::Duplicate
        );
        assert_eq!(count(&path, "PRAGMA user_version"), 2);
        assert_eq!(count(&path, "SELECT count(*) FROM events"), 3 + 50);
        recorder.journal().close().await;
        // And once more, now as version 2.
        let (again, recorder) = reopen(&path, &config).await;
        assert_eq!(again.get(many.id), after.get(many.id));
        recorder.journal().close().await;
    }

    /// The cost of a callback does not grow with its operation's history: after 10 000
    /// events the operation's row is as small as after the first few, and the events table
    /// holds only the first and last events.
    #[tokio::test]
    async fn ten_thousand_events_on_one_operation_keep_its_row_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callops.db");
        let config = Config::embedded().operations;
        let bound = config.event_bound();
        let recorder = Recorder::durable(Journal::open_sqlite(&path, FAST).unwrap());
        let store = OperationStore::new(&config);
        let now = OffsetDateTime::now_utc();
        let created = store.create(removal("c1", "ctx", now)).unwrap();
        let body_size = || count(&path, "SELECT length(body) FROM operations");
        let mut sizes = Vec::new();
        for n in 0..10_000 {
            deliver(
                &store,
                &recorder,
                vec![event(&format!("e{n}"), "c1", "ctx", now)],
            )
            .await;
            if [0, 99, 9_999].contains(&n) {
                sizes.push(body_size());
            }
        }
        // The size differs only by the digits of `eventsOmitted`.
        assert!(sizes.iter().all(|size| *size < 600), "{sizes:?}");
        assert!(sizes[2] - sizes[0] <= 24, "{sizes:?}");
        assert_eq!(
            count(&path, "SELECT count(*) FROM events"),
            bound.kept() as i64
        );
        let op = store.get(created.id).unwrap();
        assert_eq!(op.events_omitted, 10_000 - bound.kept() as u64);
        recorder.journal().close().await;
        let (after, recorder) = reopen(&path, &config).await;
        assert_eq!(after.get(created.id), Some(op));
        recorder.journal().close().await;
    }

    #[test]
    fn the_memory_recorder_keeps_nothing() {
        let recorder = Recorder::memory();
        let mut changes = recorder.changes();
        changes.seen("e".to_owned(), OffsetDateTime::now_utc());
        changes.operation(OperationId::new());
        assert!(!changes.is_durable());
        assert!(changes.seen.is_empty() && changes.operations.is_empty());
    }
}
