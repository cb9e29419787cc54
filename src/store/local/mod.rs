//! The single-process backend: the in-memory [`OperationStore`] is the hot index, and the
//! journal (none, or SQLite) behind the [`Recorder`] is the record. Every change is noted in
//! a [`Changes`] while the store is worked on and committed before the caller answers.

mod recorder;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::journal::{Journal, JournalError, JournalStats, SqliteOptions};
use super::seam::{
    CreateError, Delivered, Inbound, StoreError, UpstreamAnswer, call_terminated, log_sweep,
};
use super::tracker::{ListFilter, OperationStore, StoreStats, SweepReport};
use crate::config::Config;
use crate::correlation::{Delivery, IncomingEvent};
use crate::metrics::Metrics;
use crate::operation::{CallRef, EventRecord, Operation, OperationError, OperationId, Transition};
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
}

impl LocalStore {
    /// Keeps nothing across restarts.
    pub(super) fn memory(config: &Config, metrics: Metrics) -> Self {
        Self::new(
            OperationStore::new(&config.operations),
            Recorder::memory(),
            config,
            metrics,
        )
    }

    fn new(store: OperationStore, recorder: Recorder, config: &Config, metrics: Metrics) -> Self {
        let operations = &config.operations;
        let recorder = recorder.with_metrics(metrics).with_retention(
            Duration::from_secs(operations.retention_secs),
            Duration::from_secs(operations.dedupe_ttl_secs),
        );
        Self {
            store,
            recorder,
            dedupe_ttl: Duration::from_secs(operations.dedupe_ttl_secs),
            unsent: Arc::default(),
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
            let journal = Journal::open_sqlite(&opened, options)?;
            let loaded = journal.load()?;
            anyhow::Ok((journal, loaded))
        })
        .await
        .context("opening the store")?
        .with_context(|| format!("opening the store at {} (CALLOPS_STORE)", path.display()))?;
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
        let local = Self::new(store, Recorder::durable(journal), config, metrics);
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
        log_sweep(&report.swept);
        Ok(local)
    }

    async fn commit(&self, changes: Changes) -> Result<(), JournalError> {
        self.recorder.commit(&self.store, changes).await
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
        if let Some(upstream) = &upstream {
            let ids: Vec<&str> = upstream.ids.iter().map(String::as_str).collect();
            self.store
                .record_upstream(id, &ids, upstream.status.as_deref());
        }
        self.store.answered(id);
        self.store.transition(id, transition, now);
        let mut changes = self.recorder.changes();
        changes.operation(id);
        Ok(self.commit(changes).await?)
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
                Some((call, result)) if delivery != Delivery::Duplicate => self.store.end_call(
                    call,
                    result.clone(),
                    &call_terminated(),
                    OffsetDateTime::now_utc(),
                ),
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

    pub(super) fn claim_unsent(&self) -> Vec<Operation> {
        std::mem::take(&mut *self.unsent.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn get(&self, id: OperationId) -> Option<Operation> {
        self.store.get(id)
    }

    pub(super) async fn wait(
        &self,
        id: OperationId,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Option<Operation> {
        tokio::select! {
            operation = self.store.wait_settled(id, timeout) => operation,
            _ = shutdown.cancelled() => self.store.get(id),
        }
    }

    pub(super) fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
    ) -> (Vec<Operation>, Option<OperationId>) {
        let (operations, more) = self.store.list(filter, limit);
        let next = operations.last().filter(|_| more).map(|last| last.id);
        (operations, next)
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
    pub(super) async fn run_sweeper(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let wall_now = OffsetDateTime::now_utc();
            let report = self.store.sweep(tokio::time::Instant::now(), wall_now);
            let changes = self.sweep_changes(&report, wall_now - self.dedupe_ttl);
            if let Err(error) = self.commit(changes).await {
                tracing::error!(%error, "the sweep's changes could not be stored; the next sweep retries what is still due");
            }
            log_sweep(&report);
        }
    }

    /// What a sweep changed: timed-out operations, retired ones, expired parked events (now
    /// call events), retired call timelines, and event ids past the dedupe window.
    fn sweep_changes(&self, report: &SweepReport, seen_before: OffsetDateTime) -> Changes {
        let mut changes = self.recorder.changes();
        changes.operations(report.timed_out.iter().copied());
        changes.removed(report.removed_operations.iter().copied());
        changes.unparked(report.expired.iter().map(|event| event.id.as_deref()));
        for added in &report.call_events {
            changes.call_event(&added.call, added.seq, added.kept_from, &added.record);
        }
        changes.retired_calls(&report.retired_calls);
        changes.seen_expired_before(seen_before);
        changes
    }
}
