//! The single-process backend: the in-memory [`OperationStore`] is the hot index, and the
//! journal (none, or SQLite) behind the [`Recorder`] is the record. Every change is noted in
//! a [`Changes`] while the store is worked on and committed before the caller answers.

mod recorder;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::feed::Feed;
use super::journal::{
    Committed, Document, Journal, JournalError, JournalStats, Sink, SqliteOptions,
};
use super::outbox::Outbox;
use super::seam::{
    CallEnd, CreateError, Delivered, Inbound, ReconcileQueue, StoreError, UpstreamAnswer,
    call_terminated, queue_reconciliations, report_sweep,
};
use super::tracker::{ListFilter, OperationStore, StoreStats, SweepReport};
use crate::config::{Config, DEFAULT_DATA_DIR};
use crate::correlation::{Delivery, IncomingEvent};
use crate::metrics::Metrics;
use crate::operation::{CallRef, EventRecord, Operation, OperationError, OperationId, Transition};
use crate::reconcile::Conclusion;
pub use recorder::restored;
use recorder::{Changes, Recorder};

/// A cheap handle: the tracker and its recorder.
#[derive(Clone)]
pub(super) struct LocalStore {
    store: OperationStore,
    recorder: Recorder,
    dedupe_ttl: Duration,
    /// Operations loaded at start whose request no upstream answered; handed out once.
    unsent: Arc<Mutex<Vec<Operation>>>,
    /// Woken after every commit: readers of a change not yet durable wait for it.
    committed: Arc<Notify>,
    metrics: Metrics,
    feed: Feed,
    outbox: Outbox,
}

/// The longest a reader waits for a change it would see to become durable.
const DURABLE_WAIT: Duration = Duration::from_secs(5);

impl LocalStore {
    /// Keeps nothing across restarts.
    pub(super) fn memory(config: &Config, metrics: Metrics) -> Self {
        Self::new(
            OperationStore::new(&config.operations),
            Recorder::memory(),
            config,
            metrics,
            Stored::default(),
        )
    }

    fn new(
        store: OperationStore,
        recorder: Recorder,
        config: &Config,
        metrics: Metrics,
        stored: Stored,
    ) -> Self {
        let operations = &config.operations;
        let feed = Feed::new(
            Duration::from_secs(config.stream.retention_secs),
            config.stream.max_changes,
        );
        feed.restore(stored.changes, stored.last_change);
        let outbox = Outbox::new(Duration::from_secs(config.webhooks.retry_total_secs));
        outbox.restore(stored.documents);
        let recorder = recorder
            .with_metrics(metrics.clone())
            .with_retention(
                Duration::from_secs(operations.retention_secs),
                Duration::from_secs(operations.dedupe_ttl_secs),
            )
            .with_outbox(outbox.clone());
        let sink: Sink = {
            let (feed, outbox) = (feed.clone(), outbox.clone());
            Arc::new(move |committed: Committed| {
                outbox.apply(committed.documents);
                feed.push(committed.changes);
            })
        };
        recorder.journal().set_sink(sink, stored.last_change + 1);
        Self {
            store,
            recorder,
            dedupe_ttl: Duration::from_secs(operations.dedupe_ttl_secs),
            unsent: Arc::default(),
            committed: Arc::default(),
            metrics,
            feed,
            outbox,
        }
    }

    /// Opens the SQLite journal at `path` and loads what it holds.
    pub(super) async fn open_sqlite(
        path: PathBuf,
        config: &Config,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let options = SqliteOptions {
            max_batch_records: config.store.max_batch_records,
            synchronous_full: config.store.synchronous_full,
        };
        let opened = path.clone();
        let (journal, loaded) = tokio::task::spawn_blocking(move || {
            // A mistyped directory is refused rather than created; only the default is made.
            if let Some(parent) = opened.parent().filter(|parent| {
                !parent.as_os_str().is_empty()
                    && *parent != Path::new(DEFAULT_DATA_DIR)
                    && !parent.exists()
            }) {
                anyhow::bail!(
                    "the directory {} does not exist; create it, or choose another CALLOPS_STORE (only the default {DEFAULT_DATA_DIR}/ is created)",
                    parent.display()
                );
            }
            let journal = Journal::open_sqlite(&opened, options)?;
            let loaded = journal.load()?;
            anyhow::Ok((journal, loaded))
        })
        .await
        .context("opening the store")?
        .with_context(|| format!("opening the store at {} (CALLOPS_STORE)", path.display()))?;
        let mut loaded = loaded;
        let stored = Stored {
            changes: std::mem::take(&mut loaded.changes),
            documents: std::mem::take(&mut loaded.documents),
            last_change: loaded.last_change,
        };
        let restored = restored(loaded, config.operations.event_bound());
        tracing::info!(
            store.path = %path.display(),
            operations = restored.operations.len(),
            seen = restored.seen.len(),
            parked = restored.parked.len(),
            "durable store opened"
        );
        // One process per file, so nothing else is sending these now.
        let unsent: Vec<Operation> = restored
            .operations
            .iter()
            .filter(|operation| operation.pending.is_some())
            .cloned()
            .collect();
        let renumbered: Vec<OperationId> = restored
            .operations
            .iter()
            .filter(|operation| operation.events_written < operation.events_total())
            .map(|operation| operation.id)
            .collect();
        let store = OperationStore::new(&config.operations);
        let report = store.restore(
            restored,
            tokio::time::Instant::now(),
            OffsetDateTime::now_utc(),
        );
        let local = Self::new(store, Recorder::durable(journal), config, metrics, stored);
        // A parked callback applied at restore may have moved one already.
        let unsent = unsent
            .into_iter()
            .filter(|owed| {
                local
                    .store
                    .read(owed.id, |operation| operation.pending.is_some())
                    .unwrap_or(false)
            })
            .collect();
        *local.unsent.lock().unwrap_or_else(PoisonError::into_inner) = unsent;
        // Parked events that expired while callops was down (now on their calls' timelines),
        // or were applied at load; events stored under another numbering.
        let mut changes = local.recorder.changes();
        changes.unparked(report.unparked.iter().map(|id| Some(id.as_str())));
        changes.replace_events(renumbered);
        for added in &report.swept.call_events {
            changes.call_event(&added.call, added.seq, added.kept_from, &added.record);
        }
        local
            .commit(changes)
            .await
            .context("cleaning up the store")?;
        report_sweep(&report.swept, &local.metrics);
        Ok(local)
    }

    async fn commit(&self, changes: Changes) -> Result<(), JournalError> {
        let committed = self.recorder.commit(&self.store, changes).await;
        self.committed.notify_waiters();
        committed
    }

    /// What `read` gives once every change it shows is durable: a reader never sees what
    /// a crash could take back.
    async fn durable<T>(
        &self,
        read: impl Fn() -> T,
        is_durable: impl Fn(&T) -> bool,
    ) -> Result<T, StoreError> {
        if !self.recorder.is_durable() {
            return Ok(read());
        }
        let deadline = tokio::time::Instant::now() + DURABLE_WAIT;
        loop {
            let notified = self.committed.notified();
            tokio::pin!(notified);
            // Registered before the read, so a commit between the two is not missed.
            notified.as_mut().enable();
            let value = read();
            if is_durable(&value) {
                return Ok(value);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(StoreError::NotDurable);
            }
        }
    }

    /// Adds `operation` and commits it. If the commit fails, the operation fails in memory
    /// too (so its context is free again).
    pub(super) async fn create(&self, operation: Operation) -> Result<Operation, CreateError> {
        let mut changes = self.recorder.changes();
        let operation = self
            .store
            .create_noting(operation, &mut |noted| changes.noted(noted))?;
        let id = operation.id;
        changes.operation(id);
        // Callbacks parked for it were applied: they are no longer parked.
        changes.unparked(operation.events.iter().map(|event| event.id.as_deref()));
        if let Err(error) = self.commit(changes).await {
            let failed = Transition::Failed {
                result: None,
                error: OperationError {
                    code: "StoreUnavailable".to_owned(),
                    message: format!("the operation could not be stored: {error}"),
                },
            };
            self.store.transition(id, failed, OffsetDateTime::now_utc());
            return Err(error.into());
        }
        Ok(operation)
    }

    pub(super) async fn record_answer(
        &self,
        id: OperationId,
        upstream: Option<UpstreamAnswer>,
        transition: Transition,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut changes = self.recorder.changes();
        if let Some(upstream) = &upstream {
            let ids: Vec<&str> = upstream.ids.iter().map(String::as_str).collect();
            let unparked = self
                .store
                .record_upstream(id, &ids, upstream.status.as_deref());
            changes.unparked(unparked.iter().map(Option::as_deref));
        }
        self.store.answered(id);
        self.store.transition(id, transition, now);
        changes.operation(id);
        Ok(self.commit(changes).await?)
    }

    pub(super) async fn reconciled(
        &self,
        id: OperationId,
        conclusion: &Conclusion,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let applied = self.store.reconciled(id, conclusion, now) == Some(true);
        if applied {
            let mut changes = self.recorder.changes();
            changes.operation(id);
            self.commit(changes).await?;
        }
        Ok(applied)
    }

    /// Delivers every event, then commits them together.
    pub(super) async fn deliver(
        &self,
        events: Vec<Inbound>,
        observe: &mut (dyn FnMut(usize, &Delivered) + Send),
    ) -> Result<(), StoreError> {
        let now = tokio::time::Instant::now();
        let mut changes = self.recorder.changes();
        for (index, Inbound { incoming, ended }) in events.into_iter().enumerate() {
            let delivery = self.deliver_one(incoming, now, &mut changes);
            let failed = match &ended {
                Some(CallEnd {
                    call, grace: true, ..
                }) if delivery != Delivery::Duplicate => {
                    let marked = self
                        .store
                        .end_call_after_grace(call, OffsetDateTime::now_utc());
                    changes.operations(marked);
                    Vec::new()
                }
                Some(CallEnd { call, result, .. }) if delivery != Delivery::Duplicate => {
                    self.store.end_call(
                        call,
                        result.clone(),
                        &call_terminated(),
                        OffsetDateTime::now_utc(),
                    )
                }
                _ => Vec::new(),
            };
            changes.operations(failed.iter().copied());
            observe(index, &Delivered { delivery, failed });
        }
        Ok(self.commit(changes).await?)
    }

    /// Hands `incoming` to the store and notes what it changed.
    fn deliver_one(
        &self,
        incoming: IncomingEvent,
        now: tokio::time::Instant,
        changes: &mut Changes,
    ) -> Delivery {
        let call = incoming.cancelled.then(|| incoming.call.clone()).flatten();
        let seen = changes
            .is_durable()
            .then(|| (incoming.id.clone(), incoming.received));
        // A parked event is written from the store's hands, so nothing is copied otherwise.
        let delivery = self
            .store
            .deliver_noting(incoming, now, &mut |noted| changes.noted(noted));
        match (seen, delivery) {
            (Some((Some(id), received)), Delivery::Matched { .. } | Delivery::Observed { .. }) => {
                changes.seen_on_operation(id, received);
            }
            (
                Some((Some(id), received)),
                Delivery::Parked | Delivery::CallEvent | Delivery::Unmatched,
            ) => {
                changes.seen(id, received);
            }
            _ => {}
        }
        match delivery {
            Delivery::Matched { id, .. } | Delivery::Observed { id } => changes.operation(id),
            Delivery::Parked | Delivery::Duplicate | Delivery::CallEvent | Delivery::Unmatched => {}
        }
        // A cancelled operation is listed on a cancel of its call.
        if let (Some(call), Delivery::Matched { .. } | Delivery::Observed { .. }) = (call, delivery)
        {
            changes.operations(self.store.cancels_on(&call));
        }
        delivery
    }

    pub(super) fn feed(&self) -> &Feed {
        &self.feed
    }

    pub(super) fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Writes `documents` (subscriptions, delivery updates) and returns once durable.
    pub(super) async fn write_documents(&self, documents: Vec<Document>) -> Result<(), StoreError> {
        let mut changes = self.recorder.changes();
        changes.documents(documents);
        Ok(self.commit(changes).await?)
    }

    pub(super) fn claim_unsent(&self) -> Vec<Operation> {
        std::mem::take(&mut *self.unsent.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) async fn get(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        self.durable(|| self.store.get(id), all_durable).await
    }

    pub(super) async fn wait(
        &self,
        id: OperationId,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Option<Operation>, StoreError> {
        tokio::select! {
            _ = self.store.wait_settled(id, timeout) => {}
            _ = shutdown.cancelled() => {}
        }
        self.get(id).await
    }

    pub(super) async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<(Vec<Operation>, Option<OperationId>), StoreError> {
        let (operations, more) = self
            .durable(
                || self.store.list(filter, limit),
                |(operations, _)| operations.iter().all(Operation::is_durable),
            )
            .await?;
        let next = operations.last().filter(|_| more).map(|last| last.id);
        Ok((operations, next))
    }

    pub(super) fn call_events(&self, call: &CallRef) -> Vec<EventRecord> {
        self.store.call_events(call).unwrap_or_default()
    }

    pub(super) async fn probe(&self) -> Result<(), JournalError> {
        self.recorder.probe().await
    }

    pub(super) fn stats(&self) -> StoreStats {
        self.store.stats()
    }

    pub(super) fn journal_stats(&self) -> JournalStats {
        self.recorder.journal().stats()
    }

    pub(super) async fn close(&self) {
        self.recorder.journal().close().await;
    }

    /// Expires parked callbacks, duplicate records and old operations until `shutdown`.
    pub(super) async fn run_sweeper(
        self,
        interval: Duration,
        shutdown: CancellationToken,
        reconcile: ReconcileQueue,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let wall_now = OffsetDateTime::now_utc();
            let mut report = self.store.sweep(tokio::time::Instant::now(), wall_now);
            let changes = self.sweep_changes(&report, wall_now - self.dedupe_ttl);
            if let Err(error) = self.commit(changes).await {
                tracing::error!(%error, "the sweep's changes could not be stored; the next sweep retries what is still due");
            }
            report_sweep(&report, &self.metrics);
            queue_reconciliations(&mut report, &reconcile);
        }
    }

    /// What a sweep changed: timed-out operations, retired ones, expired parked events (now
    /// call events), retired call timelines, and event ids past the dedupe window.
    fn sweep_changes(&self, report: &SweepReport, seen_before: OffsetDateTime) -> Changes {
        let mut changes = self.recorder.changes();
        changes.operations(report.timed_out.iter().copied());
        changes.operations(report.call_ended.iter().copied());
        changes.operations(report.reconcile.iter().map(|job| job.id));
        changes.removed(report.removed_operations.iter().copied());
        changes.unparked(report.expired.iter().map(|event| event.id.as_deref()));
        for added in &report.call_events {
            changes.call_event(&added.call, added.seq, added.kept_from, &added.record);
        }
        changes.retired_calls(&report.retired_calls);
        changes.seen_expired_before(seen_before);
        changes.changes_expired_through(self.feed.expire(OffsetDateTime::now_utc()));
        changes
    }
}

/// What the journal held of the change feed and the documents at start.
#[derive(Default)]
struct Stored {
    changes: Vec<(u64, i64, Vec<u8>)>,
    documents: Vec<(String, String, Vec<u8>)>,
    last_change: u64,
}

fn all_durable(operation: &Option<Operation>) -> bool {
    operation.as_ref().is_none_or(Operation::is_durable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::{OperationKind, OperationStatus};

    async fn open(dir: &tempfile::TempDir) -> LocalStore {
        let config = Config::embedded();
        LocalStore::open_sqlite(dir.path().join("callops.db"), &config, Metrics::new())
            .await
            .expect("open the store")
    }

    #[tokio::test]
    async fn a_reader_sees_a_change_only_once_it_is_committed() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let local = open(&dir).await;
        let operation = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("call".into()),
            "ctx".into(),
            OffsetDateTime::now_utc(),
        );
        let id = local.create(operation).await.expect("created").id;
        // Changed in memory, not yet committed.
        local
            .store
            .transition(id, Transition::Accepted, OffsetDateTime::now_utc());
        let reader = tokio::spawn({
            let local = local.clone();
            async move { local.get(id).await }
        });
        let listed = {
            let local = local.clone();
            tokio::spawn(async move { local.list(&ListFilter::default(), 10).await })
        };
        tokio::task::yield_now().await;
        assert!(
            !reader.is_finished() && !listed.is_finished(),
            "a change not yet durable was shown"
        );
        let mut changes = local.recorder.changes();
        changes.operation(id);
        local.commit(changes).await.expect("committed");
        let read = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the reader answers once the change is committed")
            .expect("reader task")
            .expect("read")
            .expect("the operation");
        assert_eq!(read.status, OperationStatus::Running);
        let (listed, _) = tokio::time::timeout(Duration::from_secs(5), listed)
            .await
            .expect("the list answers once the change is committed")
            .expect("list task")
            .expect("list");
        assert_eq!(listed[0].status, OperationStatus::Running);
        // What was committed is what a restart finds.
        local.close().await;
        let reopened = open(&dir).await;
        let restored = reopened.get(id).await.expect("read").expect("restored");
        assert_eq!(restored.status, OperationStatus::Running);
    }
}

#[cfg(test)]
mod restart_tests;
