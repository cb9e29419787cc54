//! The bridge between the in-memory store (the hot index) and the journal (the durable
//! record): it turns what a request changed into one journal batch (operation snapshots
//! with their revisions, event ids seen, parked events), and the journal's contents back
//! into a store at start.
//!
//! Callers collect a [`Changes`] while they work on the store, then [`Recorder::commit`]
//! it and answer only once that returned: an operation is durable before its 202, a
//! callback before its 2xx. With the memory store, nothing is collected or written.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::correlation::IncomingEvent;
use crate::metrics::Metrics;
use crate::operation::{Operation, OperationId};
use crate::store::journal::{Batch, Journal, JournalError, Loaded};
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
    removed: Vec<OperationId>,
    seen: Vec<(String, i64)>,
    parked: Vec<(u64, Vec<u8>, i64)>,
    unparked: Vec<u64>,
    seen_expired_before: Option<i64>,
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

    /// What the store handed over while it worked: a parked event to keep, or an event
    /// dropped from a bounded timeline (its id is then remembered on its own, and no
    /// longer parked if it was).
    pub fn noted(&mut self, noted: Noted<'_>) {
        match noted {
            Noted::Parked(event) => self.parked(event),
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
        let mut written_revisions = Vec::with_capacity(changes.operations.len());
        let mut batch = Batch {
            removed_operations: changes.removed.iter().map(ToString::to_string).collect(),
            seen: changes.seen,
            seen_expired_before: changes.seen_expired_before,
            parked: changes.parked,
            unparked: changes.unparked,
            ..Batch::default()
        };
        batch.operations.reserve_exact(changes.operations.len());
        for id in changes.operations {
            // Serialized under the entry's read lock: no copy of the operation.
            let capacity = (self.snapshot_size.load(Ordering::Relaxed) + SNAPSHOT_SLACK)
                .max(MIN_SNAPSHOT_CAPACITY);
            let snapshot = store.read(id, |operation| {
                let mut json = Vec::with_capacity(capacity);
                serde_json::to_writer(&mut json, operation).map(|()| (json, revision(operation)))
            });
            match snapshot {
                Some(Ok((json, revision))) => {
                    self.snapshot_size.store(json.len(), Ordering::Relaxed);
                    written_revisions.push((id, revision));
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
        let written = self.journal.write(batch).await;
        self.metrics.store_commit(records, started.elapsed());
        match &written {
            Ok(()) => {
                for (id, revision) in written_revisions {
                    store.mark_durable(id, u64::try_from(revision).unwrap_or_default());
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
                unwritten.extend(written_revisions.into_iter().map(|(id, _)| id));
                self.unwritten.any.store(true, Ordering::Release);
            }
        }
        written
    }
}

/// The journal's contents as the store takes them; unreadable rows are logged and skipped.
pub fn restored(loaded: Loaded) -> Restored {
    let mut restored = Restored::default();
    for (id, json, revision) in loaded.operations {
        match serde_json::from_slice::<Operation>(&json) {
            Ok(mut operation) => {
                operation.revision = u64::try_from(revision).unwrap_or_default();
                operation.durable = operation.revision + 1;
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
    let digest = Sha256::digest(id.as_bytes());
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
    use crate::correlation::Delivery;
    use crate::operation::{CallRef, OperationKind, OperationStatus, Transition};
    use crate::store::journal::SqliteOptions;

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
            fresh.restore(restored(loaded), Instant::now(), now);
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
        let restored = restored(reopened.load().unwrap());
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
        assert!(fresh.restore(restored, Instant::now(), now).is_empty());
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
