//! The storage wing: every backend behind one seam, [`Storage`]. The service asks it to
//! create, record an upstream answer, deliver events, read, wait, list and probe, and never
//! learns which backend it has.
//!
//! Backends: `local` (the in-process [`OperationStore`] with its journal, in memory or on
//! SQLite) and `redis` (the store shared by every replica). A new backend is one module
//! here and one [`Backend`] variant. The commit rule for all of them: a change is durable
//! before anyone (a client's 2xx, a long poll, a read) sees it.

pub mod feed;
pub mod journal;
mod local;
pub mod outbox;
pub mod redis;
pub mod schema;
mod seam;
mod tracker;

use std::time::Duration;

use anyhow::Context;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, StoreLocation};
use crate::metrics::Metrics;
use crate::operation::{CallRef, EventRecord, Operation, OperationId, Transition};
use crate::reconcile::Conclusion;
use feed::Feed;
use journal::{Document, JournalStats};
use local::LocalStore;
use outbox::Outbox;
use redis::RedisStore;
use schema::SchemaStatus;

pub use local::restored;
pub use seam::{
    CallEnd, CreateError, Delivered, Inbound, ReconcileQueue, StoreError, UpstreamAnswer,
};
pub use tracker::{ContextInUse, ListFilter, OperationStore, Restored, StoreStats, SweepReport};

/// Asked of a shared store opened without its change log (`callops migrate`).
const NO_MIRROR: StoreError =
    StoreError::Unsupported("the change log of the shared store is not loaded in this process");

/// Where the service keeps its state. A cheap handle.
#[derive(Clone)]
pub struct Storage {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    /// This process's memory, with a journal (none, or SQLite) behind it.
    Local(LocalStore),
    /// Redis, shared by every replica of a deployment.
    Shared(RedisStore),
}

impl Storage {
    /// Opens the store `config.store` names, restoring what it holds.
    pub async fn open(config: &Config, metrics: Metrics) -> anyhow::Result<Self> {
        let backend = match config.store.location()? {
            StoreLocation::Redis(url) => {
                let shared = RedisStore::connect(&url, &config.store, &config.operations, metrics)
                    .await
                    .with_context(|| format!("connecting to Redis at {url} (CALLOPS_STORE)"))?;
                shared
                    .open_mirror(&config.stream, &config.webhooks)
                    .await
                    .with_context(|| format!("loading the change log from Redis at {url}"))?;
                tracing::info!(store.url = %url, "shared store (Redis) connected: replicas on the same store serve one deployment");
                Backend::Shared(shared)
            }
            StoreLocation::Memory => {
                tracing::warn!(
                    "the store is in memory (CALLOPS_STORE=memory): operations and callbacks are lost at every restart"
                );
                Backend::Local(LocalStore::memory(config, metrics))
            }
            StoreLocation::Sqlite(path) => {
                Backend::Local(LocalStore::open_sqlite(path, config, metrics).await?)
            }
        };
        Ok(Self { backend })
    }

    /// The layout version of the store `config.store` names beside this build's, and the
    /// steps a start would run; reads only: nothing is migrated, created or locked (a
    /// running server may hold the store). `None` for a store in memory.
    pub async fn schema_status(config: &Config) -> anyhow::Result<Option<SchemaStatus>> {
        match config.store.location()? {
            StoreLocation::Memory => Ok(None),
            StoreLocation::Sqlite(path) => {
                let status = tokio::task::spawn_blocking(move || {
                    journal::Journal::sqlite_status(&path)
                        .with_context(|| format!("reading the store at {}", path.display()))
                })
                .await
                .context("reading the store")??;
                Ok(Some(status))
            }
            StoreLocation::Redis(url) => {
                let shared = RedisStore::connect_unmigrated(
                    &url,
                    &config.store,
                    &config.operations,
                    Metrics::new(),
                )
                .await
                .with_context(|| format!("connecting to Redis at {url} (CALLOPS_STORE)"))?;
                let status = shared
                    .layout_status()
                    .await
                    .with_context(|| format!("reading the layout version at {url}"))?;
                Ok(Some(status))
            }
        }
    }

    /// Brings the store `config.store` names to this build's version (as a start would,
    /// backups included) and closes it; the status it had before. `None` for memory.
    pub async fn migrate(config: &Config) -> anyhow::Result<Option<SchemaStatus>> {
        let Some(before) = Self::schema_status(config).await? else {
            return Ok(None);
        };
        match config.store.location()? {
            StoreLocation::Memory => {}
            StoreLocation::Sqlite(path) => {
                let options = journal::SqliteOptions {
                    max_batch_records: config.store.max_batch_records,
                    synchronous_full: config.store.synchronous_full,
                };
                let journal = tokio::task::spawn_blocking(move || {
                    journal::Journal::open_sqlite(&path, options)
                        .with_context(|| format!("migrating the store at {}", path.display()))
                })
                .await
                .context("migrating the store")??;
                journal.close().await;
            }
            StoreLocation::Redis(url) => {
                RedisStore::connect(&url, &config.store, &config.operations, Metrics::new())
                    .await
                    .with_context(|| format!("migrating the shared store at {url}"))?;
            }
        }
        Ok(Some(before))
    }

    /// Adds `operation` (claiming its call and context) and makes it durable.
    pub async fn create(&self, operation: Operation) -> Result<Operation, CreateError> {
        match &self.backend {
            Backend::Local(local) => local.create(operation).await,
            Backend::Shared(shared) => shared.create(operation).await,
        }
    }

    /// Applies what the upstream answered (`upstream`, then `transition`) and writes it.
    pub async fn record_answer(
        &self,
        id: OperationId,
        upstream: Option<UpstreamAnswer>,
        transition: Transition,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(local) => local.record_answer(id, upstream, transition, now).await,
            Backend::Shared(shared) => shared.record_answer(id, upstream, transition, now).await,
        }
    }

    /// Applies what the platform said of an operation a sweep handed out to be reconciled,
    /// by compare-and-set like every other change: not if something settled it meanwhile.
    /// `Ok(true)` when applied.
    pub async fn reconciled(
        &self,
        id: OperationId,
        conclusion: &Conclusion,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Local(local) => local.reconciled(id, conclusion, now).await,
            Backend::Shared(shared) => Ok(shared.reconciled(id, conclusion, now).await?),
        }
    }

    /// Delivers `events` in order and returns once their effects are durable; `observe`
    /// hears each one's fate (by its index) as it is known.
    pub async fn deliver(
        &self,
        events: Vec<Inbound>,
        observe: &mut (dyn FnMut(usize, &Delivered) + Send),
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(local) => local.deliver(events, observe).await,
            Backend::Shared(shared) => shared.deliver(events, observe).await,
        }
    }

    /// Operations acknowledged to a client whose request no upstream has answered, and
    /// that no other process is sending now: the caller sends each again. On a shared
    /// store, one replica claims each for `lease` (whoever created it holds it that long
    /// from its creation).
    pub async fn claim_unsent(&self, lease: Duration) -> Result<Vec<Operation>, StoreError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.claim_unsent()),
            Backend::Shared(shared) => Ok(shared.claim_unsent(lease).await?),
        }
    }

    pub async fn get(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        match &self.backend {
            Backend::Local(local) => local.get(id).await,
            Backend::Shared(shared) => Ok(shared.get(id).await?),
        }
    }

    /// Waits for the operation to settle, at most `timeout` or until `shutdown`.
    pub async fn wait(
        &self,
        id: OperationId,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Option<Operation>, StoreError> {
        match &self.backend {
            Backend::Local(local) => local.wait(id, timeout, shutdown).await,
            Backend::Shared(shared) => Ok(shared.wait_settled(id, timeout, shutdown).await?),
        }
    }

    /// Operations matching `filter`, newest first, at most `limit`, and where the next
    /// page starts when more may follow.
    pub async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<(Vec<Operation>, Option<OperationId>), StoreError> {
        match &self.backend {
            Backend::Local(local) => local.list(filter, limit).await,
            Backend::Shared(shared) => Ok(shared.list(filter, limit).await?),
        }
    }

    /// The change feed: every committed change of an operation, numbered, kept for the
    /// stream's window (on a shared store, this replica's copy of the shared log).
    pub fn feed(&self) -> Result<&Feed, StoreError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.feed()),
            Backend::Shared(shared) => Ok(&shared.mirror().ok_or(NO_MIRROR)?.feed),
        }
    }

    /// The webhook subscriptions and deliveries, as committed.
    pub fn outbox(&self) -> Result<&Outbox, StoreError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.outbox()),
            Backend::Shared(shared) => Ok(&shared.mirror().ok_or(NO_MIRROR)?.outbox),
        }
    }

    /// Writes subscriptions or delivery updates; returns once they are durable (and in
    /// [`Storage::outbox`]).
    pub async fn write_documents(&self, documents: Vec<Document>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(local) => local.write_documents(documents).await,
            Backend::Shared(shared) => Ok(shared.write_documents(documents).await?),
        }
    }

    /// True when this process may attempt webhook delivery `id` now: on a shared store, one
    /// replica holds it for `ttl`; locally, always (one process per store).
    pub async fn lease_delivery(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Local(_) => Ok(true),
            Backend::Shared(shared) => Ok(shared.lease_delivery(id, ttl).await?),
        }
    }

    /// Gives up the lease [`Storage::lease_delivery`] took, once the attempt's outcome is
    /// stored (the lease's expiry covers a process that dies first).
    pub async fn release_delivery(&self, id: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(_) => Ok(()),
            Backend::Shared(shared) => Ok(shared.release_delivery(id).await?),
        }
    }

    /// The events kept for a call.
    pub async fn call_events(&self, call: &CallRef) -> Result<Vec<EventRecord>, StoreError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.call_events(call)),
            Backend::Shared(shared) => Ok(shared.call_events(call).await?),
        }
    }

    /// Succeeds when the store can commit now.
    pub async fn probe(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.probe().await?),
            Backend::Shared(shared) => Ok(shared.probe().await?),
        }
    }

    /// The store's counters (on a shared store: this replica's, and its sizes as last
    /// counted).
    pub fn stats(&self) -> StoreStats {
        match &self.backend {
            Backend::Local(local) => local.stats(),
            Backend::Shared(shared) => shared.stats(),
        }
    }

    /// The journal's totals (zero where there is none).
    pub fn journal_stats(&self) -> JournalStats {
        match &self.backend {
            Backend::Local(local) => local.journal_stats(),
            Backend::Shared(_) => JournalStats::default(),
        }
    }

    /// Transitions that lost a race and were rerun (a shared store only).
    pub fn conflicts(&self) -> Option<u64> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Shared(shared) => Some(shared.conflicts()),
        }
    }

    /// Starts the store's own work (sweeps, and for a shared store its notices) on `tasks`;
    /// operations to reconcile go to `reconcile` (on a shared store, each from the one
    /// replica whose sweep marked it).
    pub fn spawn_background(
        &self,
        tasks: &TaskTracker,
        interval: Duration,
        shutdown: &CancellationToken,
        reconcile: ReconcileQueue,
    ) {
        match &self.backend {
            Backend::Local(local) => {
                tasks.spawn(
                    local
                        .clone()
                        .run_sweeper(interval, shutdown.clone(), reconcile),
                );
            }
            Backend::Shared(shared) => {
                tasks.spawn(shared.clone().run_log(shutdown.clone()));
                tasks.spawn(shared.clone().run_notices(shutdown.clone()));
                tasks.spawn(
                    shared
                        .clone()
                        .run_sweeper(interval, shutdown.clone(), reconcile),
                );
            }
        }
    }

    /// Waits for the last writes (everything acknowledged is already committed).
    pub async fn close(&self) {
        if let Backend::Local(local) = &self.backend {
            local.close().await;
        }
    }
}
