//! The shared store: every replica of a deployment keeps operations, the (call, context)
//! index, parked callbacks, event ids seen and call timelines in one Redis (`CALLOPS_STORE=
//! redis://…` or `rediss://…`). Redis is the truth; a replica keeps nothing between
//! requests but long-poll waiters.
//!
//! Every change is a *transition* ([`RedisStore::transact`]): read what it needs (a few
//! pipelined commands), load that into a [`OperationStore::scratch`], run the same store
//! code as the in-memory backend on it, and write back what changed with one script
//! (`commit.lua`) that first checks nothing it read has changed since (revisions, index
//! entries, parks) and that no event id in it was seen meanwhile. A conflict reruns the
//! transition on fresh reads; a seen event id makes it a duplicate. So two replicas given
//! the same callback apply it once, and racing callbacks never regress an operation.
//!
//! Settling publishes the operation's id; every replica subscribes and wakes its long polls
//! ([`RedisStore::run_notices`]). Pub/sub keeps nothing for a disconnected subscriber, so
//! long polls also re-read every `store.redis_poll_ms` and after the subscription comes
//! back. [`RedisStore::run_sweeper`] times out operations past their callback deadline and
//! moves expired parked callbacks to their call's events; retention is Redis's own expiry.
//!
//! Hand-written rather than an ORM or a generic cache crate: the compare-and-set spans
//! several keys chosen by the domain (context, park, upstream id, event id), which only a
//! script can check and write atomically.

mod connection;
pub use keys::Keys;
pub mod error;
mod event;
mod keys;
mod mirror;
mod ops;
mod plan;
mod schema;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{OperationsConfig, RedisUrl, StoreConfig};
use crate::correlation::IncomingEvent;
use crate::metrics::Metrics;
use crate::operation::{
    CallRef, EventEffect, EventRecord, FINAL_STATUSES, ISSUED_KINDS, Operation, OperationId,
    call_hash,
};
use crate::store::seam::{ReconcileQueue, queue_reconciliations, report_sweep};
use crate::store::tracker::{
    ListFilter, OperationStore, Restored, StoreStats, SweepReport, unix_millis,
};
pub use error::RedisStoreError;

use connection::{Connection, Connector};
use keys::Partition;
pub(crate) use keys::context_name;
pub(crate) use plan::Outcome;
use plan::{ContextRead, Lifetimes, Read};
pub use schema::LAYOUT_VERSION;

/// How often a transition is rerun when what it read keeps changing under it.
const MAX_ATTEMPTS: u32 = 32;
/// Most operations (or parks) one sweep tick handles; the rest wait for the next tick.
const SWEEP_BATCH: isize = 200;
/// Most ids one list request looks at (expired ones and filtered-out ones included).
const LIST_SCAN_MAX: usize = 10_000;

/// How a transition ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed<T> {
    /// Written (or nothing to write); the work's result.
    Done(T),
    /// An event id in it had been seen: nothing was written.
    Duplicate,
}

/// What a transition reads before it runs.
#[derive(Debug, Default, Clone)]
pub struct Want {
    pub operations: Vec<OperationId>,
    /// (call, context) names ([`context_name`]): their holder and parked events.
    pub contexts: Vec<String>,
    /// Upstream ids, in `upstream_key` form.
    pub upstream: Vec<Box<str>>,
    /// Calls whose every operation is read (cancels, a call's end).
    pub calls: Vec<CallRef>,
    /// The [`call_hash`] of the call it is about, when known from a call rather than an
    /// operation id: everything one transition touches is in that call's partition.
    pub call_hash: Option<u16>,
    /// The partition, when known otherwise (a sweep's).
    pub partition: Option<Partition>,
}

impl Want {
    pub fn operation(id: OperationId) -> Self {
        Self {
            operations: vec![id],
            ..Self::default()
        }
    }

    pub fn context(call: &CallRef, context: &str) -> Self {
        Self {
            contexts: vec![context_name(call, context)],
            call_hash: Some(call_hash(call)),
            ..Self::default()
        }
    }

    /// The partition everything it names is in.
    pub fn partition(&self, keys: &Keys) -> Partition {
        if let Some(p) = self.partition {
            return p;
        }
        if let Some(hash) = self.call_hash {
            return hash % keys.partitions();
        }
        if let Some(id) = self.operations.first() {
            return keys.of(*id);
        }
        self.calls.first().map_or(0, |call| keys.of_call(call))
    }

    /// What delivering `event` may touch; `whole_call` adds every operation of its call.
    pub fn event(event: &IncomingEvent, whole_call: bool) -> Self {
        let mut want = Self {
            call_hash: event.call.as_ref().map(call_hash),
            ..Self::default()
        };
        want.contexts.extend(keys::park_name(event));
        if let Some(upstream_id) = &event.upstream_id {
            want.upstream.push(upstream_id.key().into());
        }
        if let (true, Some(call)) = (whole_call, &event.call) {
            want.calls.push(call.clone());
        }
        want
    }
}

/// A cheap handle to the shared store.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    connection: Connection,
    /// `store.redis_wait_replicas`.
    wait_replicas: u32,
    keys: Keys,
    lifetimes: Lifetimes,
    operations: OperationsConfig,
    script: redis::Script,
    reader: redis::Script,
    /// The common delivery's read and write (`event.rs`).
    event_reader: redis::Script,
    event_writer: redis::Script,
    /// The common delivery's guesses (`event.rs`).
    known: event::Known,
    timeout: Duration,
    poll: Duration,
    metrics: Metrics,
    waiters: DashMap<OperationId, Arc<Notify>>,
    counters: Counters,
    /// Writes documents alone (`log.lua`).
    documents: redis::Script,
    /// Reads a partition's change log with Redis's clock (`tail.lua`, several partitions).
    tail: redis::Script,
    /// This replica's copy of the change log (`mirror.rs`), once opened.
    mirror: std::sync::OnceLock<mirror::Mirror>,
}

/// A script with `log.lua`'s `append_log` before it.
fn with_log(script: &str) -> String {
    format!("{}\n{script}", include_str!("log.lua"))
}

#[derive(Default)]
struct Counters {
    waiting: AtomicUsize,
    /// Last counted by the sweep.
    operations: AtomicUsize,
    parked: AtomicUsize,
    parked_expired: AtomicU64,
    started: [AtomicU64; 2],
    settled: [[AtomicU64; 3]; 2],
    conflicts: AtomicU64,
}

impl RedisStore {
    /// Connects (failing if Redis cannot be reached within the timeout) and brings the
    /// store's layout to this build's: returns once it is (see [`schema`]), so nothing is
    /// served meanwhile.
    pub async fn connect(
        url: &RedisUrl,
        store: &StoreConfig,
        operations: &OperationsConfig,
        metrics: Metrics,
    ) -> Result<Self, RedisStoreError> {
        let connected = Self::connect_unmigrated(url, store, operations, metrics).await?;
        connected.migrate_layout().await?;
        connected.check_partitions().await?;
        Ok(connected)
    }

    /// Connects without looking at the layout version (for `callops migrate --check`).
    pub async fn connect_unmigrated(
        url: &RedisUrl,
        store: &StoreConfig,
        operations: &OperationsConfig,
        metrics: Metrics,
    ) -> Result<Self, RedisStoreError> {
        let root_cert = if store.redis_ca_file.is_empty() {
            None
        } else {
            Some(
                tokio::fs::read(&store.redis_ca_file)
                    .await
                    .map_err(|error| RedisStoreError::CaFile {
                        path: store.redis_ca_file.clone(),
                        error: Arc::new(error),
                    })?,
            )
        };
        let timeout = Duration::from_millis(store.redis_timeout_ms);
        let connector = Connector::new(url.expose(), root_cert, timeout)?;
        let connection = connector.shared(timeout).await?;
        let store = Self {
            inner: Arc::new(Inner {
                connector,
                wait_replicas: store.redis_wait_replicas,
                connection,
                keys: Keys::new(&store.redis_prefix, store.redis_partitions),
                lifetimes: Lifetimes {
                    retention: Duration::from_secs(operations.retention_secs),
                    dedupe: Duration::from_secs(operations.dedupe_ttl_secs),
                    park: Duration::from_millis(operations.park_ttl_ms),
                    timeouts: operations.callback_timeouts.clone(),
                    timeline_max: operations.call_events_max,
                },
                operations: operations.clone(),
                script: redis::Script::new(&with_log(include_str!("commit.lua"))),
                reader: redis::Script::new(include_str!("read.lua")),
                event_reader: redis::Script::new(include_str!("event_read.lua")),
                event_writer: redis::Script::new(&with_log(include_str!("event_commit.lua"))),
                known: event::Known::new(store.redis_cached_operations),
                documents: redis::Script::new(&with_log("append_log(1)\nreturn 'ok'")),
                tail: redis::Script::new(include_str!("tail.lua")),
                mirror: std::sync::OnceLock::new(),
                timeout,
                poll: Duration::from_millis(store.redis_poll_ms),
                metrics,
                waiters: DashMap::new(),
                counters: Counters::default(),
            }),
        };
        store.probe().await?;
        Ok(store)
    }

    /// One command, bounded by the configured timeout.
    async fn query<T: redis::FromRedisValue>(
        &self,
        pipeline: redis::Pipeline,
    ) -> Result<T, RedisStoreError> {
        let mut connection = self.inner.connection.clone();
        match tokio::time::timeout(
            self.inner.timeout,
            pipeline.query_async::<T>(&mut connection),
        )
        .await
        {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisStoreError::Timeout(self.timeout_ms())),
        }
    }

    /// `commands`, whose keys may be in different partitions, and their answers in order:
    /// one pipeline in one partition, else each on its own at once (a cluster refuses a
    /// pipeline across slots).
    async fn query_each<T: redis::FromRedisValue>(
        &self,
        commands: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, RedisStoreError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        if self.inner.keys.partitions() == 1 {
            let mut pipe = redis::pipe();
            for command in commands {
                pipe.add_command(command);
            }
            return self.query(pipe).await;
        }
        let connection = self.inner.connection.clone();
        let each = commands.into_iter().map(|command| {
            let mut connection = connection.clone();
            async move { command.query_async::<T>(&mut connection).await }
        });
        match tokio::time::timeout(self.inner.timeout, futures_util::future::join_all(each)).await {
            Ok(answers) => answers
                .into_iter()
                .map(|answer| answer.map_err(RedisStoreError::from))
                .collect(),
            Err(_) => Err(RedisStoreError::Timeout(self.timeout_ms())),
        }
    }

    fn timeout_ms(&self) -> u64 {
        u64::try_from(self.inner.timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether Redis answers now: a read of a key of this store, so on a cluster it is the
    /// master of the store's slot that answers.
    pub async fn probe(&self) -> Result<(), RedisStoreError> {
        let _exists: (u8,) = self
            .query({
                let mut pipe = redis::pipe();
                pipe.cmd("EXISTS").arg(self.inner.keys.schema());
                pipe
            })
            .await?;
        Ok(())
    }

    /// Runs `work` on a scratch store holding what `want` names, as Redis has it now, and
    /// writes back what it changed, atomically; reruns it (on fresh reads) while something
    /// it read changes under it. `work` notes what the scratch store cannot tell (event ids
    /// delivered, events parked) in the [`Outcome`].
    pub async fn transact<T>(
        &self,
        want: &Want,
        mut work: impl FnMut(&OperationStore, &mut Outcome) -> T,
    ) -> Result<Committed<T>, RedisStoreError> {
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                self.conflicted(attempt).await;
            }
            let (read, restored) = self.read(want).await?;
            let now = OffsetDateTime::now_utc();
            let scratch = OperationStore::scratch(&self.inner.operations);
            scratch.restore(restored, tokio::time::Instant::now(), now);
            let mut outcome = Outcome::default();
            let value = work(&scratch, &mut outcome);
            outcome.operations = scratch.snapshots();
            outcome.timelines = scratch.timelines();
            match self.commit(&read, &outcome, now).await? {
                Verdict::Written => {
                    for operation in outcome.operations {
                        self.inner.known.remember(operation);
                    }
                    return Ok(Committed::Done(value));
                }
                Verdict::Duplicate => return Ok(Committed::Duplicate),
                Verdict::Conflict => {}
            }
        }
        Err(RedisStoreError::Contended(MAX_ATTEMPTS))
    }

    /// Writes `outcome` if nothing in `read` changed since.
    async fn commit(
        &self,
        read: &Read,
        outcome: &Outcome,
        now: OffsetDateTime,
    ) -> Result<Verdict, RedisStoreError> {
        let inner = &self.inner;
        let plan = plan::plan(&inner.keys, &inner.lifetimes, read, outcome, now)?;
        if plan.is_empty() {
            return Ok(Verdict::Written);
        }
        let argument = plan.to_json();
        let started = std::time::Instant::now();
        let mut connection = inner.connection.clone();
        let route = inner.keys.all(read.partition);
        let mut invocation = inner.script.key(&route);
        invocation.arg(&argument);
        for document in plan.documents() {
            invocation.arg(document);
        }
        let written: Vec<OperationId> = plan.written().collect();
        let logged = outcome
            .operations
            .iter()
            .filter(|op| written.contains(&op.id));
        for arg in self.log_args(read.partition, logged, now) {
            invocation.arg(arg);
        }
        let answer: String =
            match tokio::time::timeout(inner.timeout, invocation.invoke_async(&mut connection))
                .await
            {
                Ok(answer) => answer?,
                Err(_) => return Err(RedisStoreError::Timeout(self.timeout_ms())),
            };
        if answer == "ok" {
            self.replicated(&mut connection, &route).await?;
        }
        inner.metrics.store_commit(1, started.elapsed());
        match answer.as_str() {
            "ok" => {
                self.count(read, outcome);
                for id in plan.settled() {
                    self.wake(id);
                }
                Ok(Verdict::Written)
            }
            "dup" => Ok(Verdict::Duplicate),
            "conflict" => Ok(Verdict::Conflict),
            _ => Err(RedisStoreError::Unexpected(answer)),
        }
    }

    /// After a write on `connection` to the node holding `key`: with
    /// `store.redis_wait_replicas`, waits until that many replicas have it. Fewer in time is
    /// an error (a 503): the write may not survive a failover, so the caller must retry.
    pub(super) async fn replicated(
        &self,
        connection: &mut Connection,
        key: &str,
    ) -> Result<(), RedisStoreError> {
        let wanted = self.inner.wait_replicas;
        if wanted == 0 {
            return Ok(());
        }
        // Half the budget, so WAIT answers before the request's own timeout.
        let budget = self.inner.timeout / 2;
        let got = match tokio::time::timeout(
            self.inner.timeout,
            connection.wait_replicas(key, wanted, budget),
        )
        .await
        {
            Ok(got) => got?,
            Err(_) => return Err(RedisStoreError::Timeout(self.timeout_ms())),
        };
        if got < wanted {
            return Err(RedisStoreError::NotReplicated { wanted, got });
        }
        Ok(())
    }

    /// Counts operations started and settled by this replica.
    fn count(&self, read: &Read, outcome: &Outcome) {
        for op in &outcome.operations {
            self.count_one(read.operations.get(&op.id), op);
        }
    }

    /// Counts `op` as written, given what was read of it (revision, settled).
    fn count_one(&self, before: Option<&(u64, bool)>, op: &Operation) {
        let counters = &self.inner.counters;
        if before.is_none() {
            // Until the sweep counts the store again.
            counters.operations.fetch_add(1, Ordering::Relaxed);
        }
        let Some(kind) = ISSUED_KINDS.iter().position(|k| *k == op.kind) else {
            return;
        };
        if before.is_none() {
            counters.started[kind].fetch_add(1, Ordering::Relaxed);
        }
        let was_settled = before.is_some_and(|(_, settled)| *settled);
        if let (false, Some(status)) = (
            was_settled,
            FINAL_STATUSES.iter().position(|s| *s == op.status),
        ) {
            counters.settled[kind][status].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads what `want` names, in one round trip (`read.lua`).
    async fn read(&self, want: &Want) -> Result<(Read, Restored), RedisStoreError> {
        let inner = &self.inner;
        let keys = &inner.keys;
        let p = want.partition(keys);
        let argument = serde_json::json!({
            "ctx": want
                .contexts
                .iter()
                .map(|name| [keys.context(p, name), keys.parked(p, name)])
                .collect::<Vec<_>>(),
            "up": want.upstream.iter().map(|key| keys.upstream(p, key)).collect::<Vec<_>>(),
            "calls": want.calls.iter().map(|call| keys.call(call)).collect::<Vec<_>>(),
            "ops": want.operations.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "op": keys.operation_prefix(p),
        })
        .to_string();
        let mut connection = inner.connection.clone();
        let mut invocation = inner.reader.key(keys.all(p));
        invocation.arg(&argument);
        type Answer = (
            Vec<Option<String>>,
            Vec<Vec<String>>,
            Vec<Option<String>>,
            Vec<(String, String, String)>,
        );
        let (holders, parks, upstream, operations): Answer =
            match tokio::time::timeout(inner.timeout, invocation.invoke_async(&mut connection))
                .await
            {
                Ok(answer) => answer?,
                Err(_) => return Err(RedisStoreError::Timeout(self.timeout_ms())),
            };
        let mut read = Read {
            partition: p,
            ..Read::default()
        };
        let mut restored = Restored::default();
        let wall_now = OffsetDateTime::now_utc();
        for ((name, holder), parked) in want.contexts.iter().zip(holders).zip(parks) {
            read.contexts.insert(
                name.clone(),
                ContextRead {
                    holder,
                    parked: parked.len(),
                },
            );
            for json in parked {
                match serde_json::from_str::<IncomingEvent>(&json) {
                    // Parked "now": the sweep expires parks, not the scratch store.
                    Ok(event) => restored.parked.push((event, wall_now)),
                    Err(error) => {
                        tracing::error!(%error, "a parked callback in Redis is unreadable; skipped")
                    }
                }
            }
        }
        for (key, holder) in want.upstream.iter().zip(upstream) {
            // The name may be one the operation does not show (Graph's `Location` id).
            if let Some(id) = holder.as_deref().and_then(OperationId::parse) {
                restored.upstream.push((key.to_string(), id));
            }
            read.upstream.insert(key.to_string(), holder);
        }
        for (id, revision, doc) in operations {
            if let Some(operation) = parse_operation(&id, &revision, &doc) {
                read.operations.insert(
                    operation.id,
                    (operation.revision, operation.status.is_terminal()),
                );
                restored.operations.push(operation);
            }
        }
        Ok((read, restored))
    }

    /// The operations with these ids, as stored (`None` for those that are not).
    async fn operations(
        &self,
        ids: &[OperationId],
    ) -> Result<Vec<Option<Operation>>, RedisStoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &self.inner.keys;
        let answers: Vec<(Option<String>, Option<String>)> = self
            .query_each(
                ids.iter()
                    .map(|id| {
                        let mut command = redis::cmd("HMGET");
                        command.arg(keys.operation(*id)).arg("rev").arg("doc");
                        command
                    })
                    .collect(),
            )
            .await?;
        Ok(answers
            .into_iter()
            .zip(ids)
            .map(|((revision, doc), id)| parse_operation(&id.to_string(), &revision?, &doc?))
            .collect())
    }

    /// One operation as stored.
    pub async fn get(&self, id: OperationId) -> Result<Option<Operation>, RedisStoreError> {
        Ok(self.operations(&[id]).await?.pop().flatten())
    }

    /// Waits until the operation settles (woken by the settle notice, re-reading every
    /// `redis_poll_ms` in case a notice was lost), `timeout` passes or `stop` is cancelled.
    pub async fn wait_settled(
        &self,
        id: OperationId,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<Operation>, RedisStoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let waiting = Waiting::new(self, id);
        loop {
            let notified = waiting.notify().notified();
            tokio::pin!(notified);
            // Registered before the read, so a notice between the read and the wait counts.
            notified.as_mut().enable();
            let operation = self.get(id).await?;
            let settled = operation.as_ref().is_none_or(|op| op.status.is_terminal());
            if settled || tokio::time::Instant::now() >= deadline || stop.is_cancelled() {
                return Ok(operation);
            }
            let next_read = (tokio::time::Instant::now() + self.inner.poll).min(deadline);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(next_read) => {}
                () = stop.cancelled() => {}
            }
        }
    }

    fn wake(&self, id: OperationId) {
        if let Some(notify) = self.inner.waiters.get(&id) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for entry in &self.inner.waiters {
            entry.value().notify_waiters();
        }
    }

    /// Operations matching `filter`, newest first, at most `limit`, and where the next page
    /// starts (before this id), if anything may follow. Filtered by call, the call's own set
    /// is read (exact, whatever the store holds); otherwise the list index is scanned, at
    /// most [`LIST_SCAN_MAX`] ids per page: a page that filters most of them out may come
    /// back short (even empty), with the next page's start after the ids it looked at.
    pub async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<(Vec<Operation>, Option<OperationId>), RedisStoreError> {
        let keys = &self.inner.keys;
        let call = match (&filter.call_connection_id, &filter.call_id) {
            (Some(id), _) => Some(CallRef::CallConnection(id.clone())),
            (None, Some(id)) => Some(CallRef::Call(id.clone())),
            (None, None) => None,
        };
        let mut candidates: Option<std::vec::IntoIter<OperationId>> = None;
        if let Some(call) = &call {
            let (members,): (Vec<String>,) = self
                .query({
                    let mut pipe = redis::pipe();
                    pipe.cmd("SMEMBERS").arg(keys.call(call));
                    pipe
                })
                .await?;
            let mut ids: Vec<OperationId> = members
                .iter()
                .filter_map(|id| OperationId::parse(id))
                .filter(|id| filter.before.is_none_or(|before| *id < before))
                .collect();
            ids.sort_unstable_by(|a, b| b.cmp(a));
            candidates = Some(ids.into_iter());
        }
        let mut upper = match filter.before {
            Some(before) => format!("({before}"),
            None => "+".to_owned(),
        };
        let mut found = Vec::new();
        let mut scanned = 0;
        let mut last_scanned = None;
        let batch = (limit + 1).clamp(16, 500);
        loop {
            let ids: Vec<OperationId> = match &mut candidates {
                Some(candidates) => candidates.by_ref().take(batch).collect(),
                None if scanned >= LIST_SCAN_MAX => {
                    // Looked at enough for one page: the next one goes on from here.
                    found.truncate(limit);
                    return Ok((found, last_scanned));
                }
                None => {
                    // The newest `batch` of every partition, merged: the newest `batch` of all.
                    let pages: Vec<Vec<String>> = self
                        .query_each(
                            keys.each()
                                .map(|p| {
                                    let mut command = redis::cmd("ZREVRANGEBYLEX");
                                    command
                                        .arg(keys.all(p))
                                        .arg(&upper)
                                        .arg("-")
                                        .arg("LIMIT")
                                        .arg(0)
                                        .arg(batch);
                                    command
                                })
                                .collect(),
                        )
                        .await?;
                    let mut ids: Vec<OperationId> = pages
                        .iter()
                        .flatten()
                        .filter_map(|id| OperationId::parse(id))
                        .collect();
                    ids.sort_unstable_by(|a, b| b.cmp(a));
                    ids.truncate(batch);
                    if let Some(last) = ids.last() {
                        upper = format!("({last}");
                    }
                    ids
                }
            };
            let Some(&last) = ids.last() else { break };
            scanned += ids.len();
            last_scanned = Some(last);
            let operations = self.operations(&ids).await?;
            let mut expired = Vec::new();
            for (id, operation) in ids.iter().zip(operations) {
                match operation {
                    Some(operation) if filter.matches(&operation) => found.push(operation),
                    Some(_) => {}
                    None => expired.push(id.to_string()),
                }
                if found.len() > limit {
                    break;
                }
            }
            if call.is_none() {
                self.forget_ids(expired).await;
            }
            if found.len() > limit || ids.len() < batch {
                break;
            }
        }
        let more = found.len() > limit;
        found.truncate(limit);
        let next = found.last().filter(|_| more).map(|last| last.id);
        Ok((found, next))
    }

    /// Drops ids of expired operations from the list index (best effort).
    async fn forget_ids(&self, expired: Vec<String>) {
        if expired.is_empty() {
            return;
        }
        let keys = &self.inner.keys;
        let removed: Result<Vec<u64>, _> = self
            .query_each(
                expired
                    .iter()
                    .flat_map(|id| {
                        let p = OperationId::parse(id).map_or(0, |id| keys.of(id));
                        [keys.all(p), keys.expiries(p)].map(|index| {
                            let mut command = redis::cmd("ZREM");
                            command.arg(index).arg(id);
                            command
                        })
                    })
                    .collect(),
            )
            .await;
        if let Err(error) = removed {
            tracing::debug!(%error, "expired ids stay in the list index until the next try");
        }
    }

    /// The events kept for a call.
    pub async fn call_events(&self, call: &CallRef) -> Result<Vec<EventRecord>, RedisStoreError> {
        let key = self.inner.keys.timeline(call);
        let (events,): (Vec<String>,) = self
            .query({
                let mut pipe = redis::pipe();
                pipe.cmd("LRANGE").arg(&key).arg(0).arg(-1);
                pipe
            })
            .await?;
        Ok(events
            .iter()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }

    /// This replica's counters (operations and parks: the whole store, as last counted).
    pub fn stats(&self) -> StoreStats {
        let counters = &self.inner.counters;
        StoreStats {
            operations: counters.operations.load(Ordering::Relaxed),
            parked: counters.parked.load(Ordering::Relaxed),
            waiting: counters.waiting.load(Ordering::Relaxed),
            parked_expired: counters.parked_expired.load(Ordering::Relaxed),
            parked_overflow: 0,
            started: counters
                .started
                .each_ref()
                .map(|n| n.load(Ordering::Relaxed)),
            settled: counters
                .settled
                .each_ref()
                .map(|row| row.each_ref().map(|n| n.load(Ordering::Relaxed))),
        }
    }

    /// Transitions rerun because what they read changed meanwhile.
    pub fn conflicts(&self) -> u64 {
        self.inner.counters.conflicts.load(Ordering::Relaxed)
    }

    /// Listens for settle notices until `stop`, waking long polls; reconnects with backoff,
    /// and wakes every long poll after a reconnect (they re-read what they missed).
    pub async fn run_notices(self, stop: CancellationToken) {
        let channel = self.inner.keys.settled_channel();
        let mut backoff = Duration::from_millis(100);
        let mut was_down = false;
        loop {
            let subscribed = self.inner.connector.subscribe(&channel, self.inner.timeout);
            let mut subscription = tokio::select! {
                () = stop.cancelled() => return,
                subscribed = subscribed => match subscribed {
                    Ok(subscription) => subscription,
                    Err(error) => {
                        if !was_down {
                            tracing::warn!(%error, "settle notices: cannot subscribe; long polls re-read every redis_poll_ms until it is back");
                        }
                        was_down = true;
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            if was_down {
                tracing::info!("settle notices: subscribed again");
            }
            backoff = Duration::from_millis(100);
            // Whatever settled while we were not listening.
            self.wake_all();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    payload = subscription.next() => match payload {
                        Some(id) => {
                            if let Some(id) = OperationId::parse(&id) {
                                self.wake(id);
                            }
                        }
                        None => break,
                    },
                }
            }
            tracing::warn!("settle notices: the subscription dropped; reconnecting");
            was_down = true;
        }
    }

    /// Every `interval` until `stop`: times out operations past their callback deadline,
    /// expires parked callbacks, drops ids of expired operations from the list index and
    /// counts what is stored. Every replica sweeps; the transitions make that safe.
    pub async fn run_sweeper(
        self,
        interval: Duration,
        stop: CancellationToken,
        reconcile: ReconcileQueue,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.sweep(&reconcile).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("the sweep reaches Redis again");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::error!(%error, "the sweep cannot reach Redis; it retries every tick");
                }
                Err(_) => {}
            }
        }
    }

    /// One sweep tick, over every partition.
    pub async fn sweep(&self, reconcile: &ReconcileQueue) -> Result<(), RedisStoreError> {
        let keys = &self.inner.keys;
        for p in keys.each() {
            self.sweep_partition(p, reconcile).await?;
        }
        // Counted in one round after the work, so a creation meanwhile is not lost.
        let counts: Vec<usize> = self
            .query_each(
                keys.each()
                    .flat_map(|p| {
                        [keys.all(p), keys.park_due(p)].map(|index| {
                            let mut command = redis::cmd("ZCARD");
                            command.arg(index);
                            command
                        })
                    })
                    .collect(),
            )
            .await?;
        let operations = counts.iter().step_by(2).sum();
        let parked = counts.iter().skip(1).step_by(2).sum();
        let counters = &self.inner.counters;
        counters.operations.store(operations, Ordering::Relaxed);
        counters.parked.store(parked, Ordering::Relaxed);
        Ok(())
    }

    /// One sweep tick of partition `p`.
    async fn sweep_partition(
        &self,
        p: Partition,
        reconcile: &ReconcileQueue,
    ) -> Result<(), RedisStoreError> {
        let keys = &self.inner.keys;
        let now_ms = unix_millis(OffsetDateTime::now_utc());
        let (due, parks, expired): (Vec<String>, Vec<String>, Vec<String>) = self
            .query({
                let mut pipe = redis::pipe();
                for index in [keys.deadlines(p), keys.park_due(p), keys.expiries(p)] {
                    pipe.cmd("ZRANGEBYSCORE")
                        .arg(index)
                        .arg("-inf")
                        .arg(now_ms)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(SWEEP_BATCH);
                }
                pipe
            })
            .await?;
        for id in due.iter().filter_map(|id| OperationId::parse(id)) {
            self.time_out(id, reconcile).await?;
        }
        for name in &parks {
            self.expire_park(p, name).await?;
        }
        // Operations past their expiry leave the list index once Redis has dropped them
        // (one rewritten since has a later expiry, and is looked at again then). An id
        // never comes back, so one gone now stays gone.
        if !expired.is_empty() {
            let exists: Vec<bool> = self
                .query({
                    let mut pipe = redis::pipe();
                    for id in &expired {
                        pipe.cmd("EXISTS")
                            .arg(format!("{}{id}", keys.operation_prefix(p)));
                    }
                    pipe
                })
                .await?;
            let gone = expired
                .into_iter()
                .zip(exists)
                .filter_map(|(id, exists)| (!exists).then_some(id))
                .collect();
            self.forget_ids(gone).await;
        }
        Ok(())
    }

    /// Fails `id` with `CallbackTimeout` (or `CallEnded`) if it is past its time and still
    /// unsettled, or marks it reconciling and hands it to `reconcile`: the commit checks the
    /// revision read, so of the replicas sweeping it, only the one whose commit wins asks.
    async fn time_out(
        &self,
        id: OperationId,
        reconcile: &ReconcileQueue,
    ) -> Result<(), RedisStoreError> {
        let committed = self
            .transact(&Want::operation(id), |scratch, _| {
                let known = scratch.get(id).is_some();
                let report = scratch.sweep(tokio::time::Instant::now(), OffsetDateTime::now_utc());
                (known, report)
            })
            .await?;
        match committed {
            Committed::Done((true, mut report)) => {
                report_sweep(&report, &self.inner.metrics);
                queue_reconciliations(&mut report, reconcile);
            }
            Committed::Done((false, _)) => {
                // Expired (or never stored): nothing to time out.
                let key = self.inner.keys.deadlines(self.inner.keys.of(id));
                let _: () = self
                    .query({
                        let mut pipe = redis::pipe();
                        pipe.cmd("ZREM").arg(&key).arg(id.to_string()).ignore();
                        pipe
                    })
                    .await?;
            }
            Committed::Duplicate => {}
        }
        Ok(())
    }

    /// Moves the events parked under `name` (past the park window) to their call's events.
    async fn expire_park(&self, p: Partition, name: &str) -> Result<(), RedisStoreError> {
        let want = Want {
            contexts: vec![name.to_owned()],
            partition: Some(p),
            ..Want::default()
        };
        for _ in 0..MAX_ATTEMPTS {
            let (read, restored) = self.read(&want).await?;
            let mut outcome = Outcome {
                parks_expired: vec![name.to_owned()],
                ..Outcome::default()
            };
            let mut by_call: Vec<(CallRef, Vec<EventRecord>)> = Vec::new();
            for (event, _) in &restored.parked {
                let Some(call) = &event.call else { continue };
                let record = event.record(EventEffect::Unmatched);
                match by_call.iter_mut().find(|(known, _)| known == call) {
                    Some((_, records)) => records.push(record),
                    None => by_call.push((call.clone(), vec![record])),
                }
            }
            outcome.timelines = by_call;
            match self
                .commit(&read, &outcome, OffsetDateTime::now_utc())
                .await?
            {
                Verdict::Written => {
                    let counters = &self.inner.counters;
                    counters
                        .parked_expired
                        .fetch_add(restored.parked.len() as u64, Ordering::Relaxed);
                    // Gone from the gauge at once; the sweep's count after its work agrees.
                    let _ = counters.parked.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |parked| Some(parked.saturating_sub(1)),
                    );
                    // Logged once written, as the in-memory sweep logs them.
                    let expired = restored.parked.into_iter().map(|(event, _)| event);
                    report_sweep(
                        &SweepReport {
                            expired: expired.collect(),
                            ..SweepReport::default()
                        },
                        &self.inner.metrics,
                    );
                    return Ok(());
                }
                Verdict::Duplicate | Verdict::Conflict => {}
            }
        }
        Err(RedisStoreError::Contended(MAX_ATTEMPTS))
    }
}

/// What the commit script answered.
enum Verdict {
    Written,
    Duplicate,
    Conflict,
}

/// A long poll's place among the waiters: counted in while it lives, and its entry dropped
/// when it was the last one waiting on the operation.
struct Waiting<'a> {
    store: &'a RedisStore,
    id: OperationId,
    notify: Option<Arc<Notify>>,
}

impl<'a> Waiting<'a> {
    fn new(store: &'a RedisStore, id: OperationId) -> Self {
        let notify = store.inner.waiters.entry(id).or_default().clone();
        store.inner.counters.waiting.fetch_add(1, Ordering::Relaxed);
        Self {
            store,
            id,
            notify: Some(notify),
        }
    }

    fn notify(&self) -> &Notify {
        self.notify
            .as_deref()
            .unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let inner = &self.store.inner;
        inner.counters.waiting.fetch_sub(1, Ordering::Relaxed);
        drop(self.notify.take());
        inner
            .waiters
            .remove_if(&self.id, |_, notify| Arc::strong_count(notify) == 1);
    }
}

/// An operation as stored: its JSON, and its revision beside it.
fn parse_operation(id: &str, revision: &str, doc: &str) -> Option<Operation> {
    match serde_json::from_str::<Operation>(doc) {
        Ok(mut operation) => {
            operation.revision = revision.parse().unwrap_or(0);
            Some(operation)
        }
        Err(error) => {
            tracing::error!(operation.id = %id, %error, "an operation in Redis is unreadable; skipped");
            None
        }
    }
}
