//! The common delivery on the shared store: an event whose (call, context) names an
//! existing operation, with nothing parked under it. Cheaper than the general transition
//! (no scratch store, no JSON plan): [`correlation::apply`] (the state machine every path
//! runs) changes the operation as this replica last knew it, and `event_commit.lua` writes
//! it only if Redis still holds it at that revision under that context; else the script
//! answers what Redis holds, and the event is applied to that instead. So a callback for an
//! operation this replica started or last changed is one round trip; one for an operation
//! it has not seen reads it first (`event_read.lua`). Anything else (no holder, parked
//! events, Graph ids, cancels, a call's end) is left to the general transition.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use time::OffsetDateTime;

use super::keys::{Keys, Partition, context_name};
use super::plan::{Kept, Lifetimes, kept, millis};
use super::{MAX_ATTEMPTS, RedisStore, RedisStoreError, parse_operation};
use crate::correlation::{self, Delivery, IncomingEvent, upstream_key};
use crate::operation::{Announced, Operation};
use crate::store::tracker::unix_millis;

/// The operations this replica last wrote or read, by context name, while they run: the
/// common delivery's first guess. Bounded; a wrong or missing guess costs a round trip,
/// never a wrong write (the commit compares the revision).
pub(super) struct Known {
    cache: Option<quick_cache::sync::Cache<String, Arc<Operation>>>,
}

impl Known {
    /// Up to `capacity` operations; none with 0.
    pub fn new(capacity: usize) -> Self {
        Self {
            cache: (capacity > 0).then(|| quick_cache::sync::Cache::new(capacity)),
        }
    }

    /// Remembers `operation` as written at its revision (forgets it once settled).
    pub fn remember(&self, operation: Operation) {
        if self.cache.is_some() {
            let name = context_name(&operation.call, &operation.context);
            self.remember_as(name, operation);
        }
    }

    /// As [`Self::remember`], under its context's `name` when the caller has it already
    /// (a hash to compute, on the callback path).
    fn remember_as(&self, name: String, operation: Operation) {
        let Some(cache) = &self.cache else { return };
        if operation.status.is_terminal() {
            cache.remove(&name);
        } else {
            cache.insert(name, Arc::new(as_stored(operation)));
        }
    }

    /// A copy of the operation last known under the context `name`.
    fn guess(&self, name: &str) -> Option<Box<Operation>> {
        let known = self.cache.as_ref()?.get(name)?;
        Some(Box::new(Operation::clone(&known)))
    }

    fn forget(&self, name: &str) {
        if let Some(cache) = &self.cache {
            cache.remove(name);
        }
    }
}

/// `operation` as a read of its document gives it: without what only a replica's memory
/// holds (journal and feed bookkeeping).
fn as_stored(mut operation: Operation) -> Operation {
    operation.durable = 0;
    operation.events_written = 0;
    operation.announced = Announced::default();
    operation
}

/// What the read found.
#[derive(Debug)]
pub enum EventRead {
    /// The event id was seen.
    Duplicate,
    /// Not the common case.
    Other,
    /// The operation the context names, its revision as stored.
    Found(Box<Operation>),
}

/// How a commit of the common delivery ended.
#[derive(Debug)]
pub enum EventCommitted {
    Written,
    /// The event id was seen: nothing written.
    Duplicate,
    /// No longer the common case: nothing written.
    Other,
    /// The operation changed, or the context names another: nothing written; what Redis
    /// holds now.
    Changed(Box<Operation>),
}

/// Whether `incoming` may take the common path: it names (call, context), carries no
/// upstream id (the upstream index finds operations first), is no cancel (those are linked
/// to the call's cancels) and ends no call.
pub fn is_common(incoming: &IncomingEvent, ends_call: bool) -> bool {
    !ends_call
        && !incoming.cancelled
        && incoming.upstream_id.is_none()
        && incoming.names().is_some()
}

/// The keys the common delivery of one event reads.
#[derive(Debug)]
pub struct EventKeys {
    /// The context's name (the cache's key).
    pub name: String,
    pub context: String,
    pub parked: String,
    pub seen: Option<String>,
    /// The partition of the event's call.
    pub partition: Partition,
}

impl EventKeys {
    /// `None` unless the event names (call, context).
    pub fn new(keys: &Keys, incoming: &IncomingEvent) -> Option<Self> {
        let (call, context) = incoming.names()?;
        let name = context_name(call, context);
        let p = keys.of_call(call);
        Some(Self {
            context: keys.context(p, &name),
            parked: keys.parked(p, &name),
            seen: incoming.id.as_deref().map(|id| keys.seen(p, id)),
            name,
            partition: p,
        })
    }
}

/// The write of the common delivery: `event_commit.lua`'s keys and arguments.
#[derive(Debug)]
pub struct EventWrite {
    pub keys: Vec<String>,
    pub args: Vec<Vec<u8>>,
    pub settled: bool,
}

impl EventWrite {
    /// Writes `operation` (known at revision `base`, then changed by the event) and
    /// remembers the event id, at `now`.
    pub fn new(
        keys: &Keys,
        lifetimes: &Lifetimes,
        read: &EventKeys,
        base: u64,
        operation: &Operation,
        now: OffsetDateTime,
    ) -> Result<Self, serde_json::Error> {
        let Kept {
            ttl,
            deadline,
            settled,
        } = kept(lifetimes, operation, now);
        let mut doc = Vec::with_capacity(1024);
        serde_json::to_writer(&mut doc, operation)?;
        let mut write_keys = Vec::with_capacity(7);
        write_keys.push(keys.operation(operation.id));
        write_keys.push(read.context.clone());
        write_keys.push(read.parked.clone());
        let p = read.partition;
        write_keys.push(keys.expiries(p));
        write_keys.push(keys.deadlines(p));
        write_keys.extend(read.seen.iter().cloned());
        if let Some(shown) = &operation.upstream_operation_id {
            write_keys.push(keys.upstream(p, &upstream_key(shown)));
        }
        let expiry = unix_millis(now).saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX));
        let args = vec![
            operation.id.to_string().into_bytes(),
            base.to_string().into_bytes(),
            operation.revision.to_string().into_bytes(),
            doc,
            ttl.to_string().into_bytes(),
            expiry.to_string().into_bytes(),
            deadline.to_string().into_bytes(),
            if settled {
                keys.settled_channel().into_bytes()
            } else {
                Vec::new()
            },
            if read.seen.is_some() {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
            millis(lifetimes.dedupe).to_string().into_bytes(),
            keys.operation_prefix(p).into_bytes(),
        ];
        Ok(Self {
            keys: write_keys,
            args,
            settled,
        })
    }
}

impl RedisStore {
    /// Delivers `incoming` by the common path; `None` when it is not the common case (the
    /// caller runs the general transition). Reruns on a conflict.
    pub(super) async fn deliver_common(
        &self,
        incoming: &IncomingEvent,
    ) -> Result<Option<Delivery>, RedisStoreError> {
        let inner = &self.inner;
        let Some(event_keys) = EventKeys::new(&inner.keys, incoming) else {
            return Ok(None);
        };
        let (mut operation, mut guessed) = match inner.known.guess(&event_keys.name) {
            Some(known) => (known, true),
            None => match self.read_event(&event_keys).await? {
                EventRead::Duplicate => return Ok(Some(Delivery::Duplicate)),
                EventRead::Other => return Ok(None),
                EventRead::Found(operation) => (operation, false),
            },
        };
        for attempt in 0..MAX_ATTEMPTS {
            let base = operation.revision;
            let was_settled = operation.status.is_terminal();
            let (effect, _evicted) =
                correlation::apply(&mut operation, incoming, inner.operations.event_bound());
            // The evicted event's id stays remembered: Redis keeps every seen id on its own.
            let write = EventWrite::new(
                &inner.keys,
                &inner.lifetimes,
                &event_keys,
                base,
                &operation,
                OffsetDateTime::now_utc(),
            )
            .map_err(|error| RedisStoreError::Unexpected(error.to_string()))?;
            let log = self.log_args(
                event_keys.partition,
                std::iter::once(&*operation),
                OffsetDateTime::now_utc(),
            );
            match self.commit_event(&write, log).await? {
                EventCommitted::Written => {
                    self.count_one(Some(&(base, was_settled)), &operation);
                    let id = operation.id;
                    // The context names it: the commit checked its holder.
                    inner.known.remember_as(event_keys.name, *operation);
                    if write.settled {
                        self.wake(id);
                    }
                    return Ok(Some(Delivery::Matched { id, effect }));
                }
                EventCommitted::Duplicate => return Ok(Some(Delivery::Duplicate)),
                EventCommitted::Other => {
                    inner.known.forget(&event_keys.name);
                    return Ok(None);
                }
                EventCommitted::Changed(current) => {
                    // A guess from the cache that was out of date is no contention.
                    if !guessed {
                        self.conflicted(attempt + 1).await;
                    }
                    guessed = false;
                    operation = current;
                }
            }
        }
        Err(RedisStoreError::Contended(MAX_ATTEMPTS))
    }

    /// `event_read.lua`.
    pub(super) async fn read_event(&self, read: &EventKeys) -> Result<EventRead, RedisStoreError> {
        let inner = &self.inner;
        let mut invocation = inner.event_reader.key(&read.context);
        invocation.key(&read.parked);
        if let Some(seen) = &read.seen {
            invocation.key(seen);
        }
        invocation.arg(inner.keys.operation_prefix(read.partition));
        let mut connection = inner.connection.clone();
        let answer: redis::Value =
            match tokio::time::timeout(inner.timeout, invocation.invoke_async(&mut connection))
                .await
            {
                Ok(answer) => answer?,
                Err(_) => return Err(RedisStoreError::Timeout(self.timeout_ms())),
            };
        parse_event_read(answer)
    }

    /// `event_commit.lua`.
    pub(super) async fn commit_event(
        &self,
        write: &EventWrite,
        log: Vec<Vec<u8>>,
    ) -> Result<EventCommitted, RedisStoreError> {
        let inner = &self.inner;
        let started = std::time::Instant::now();
        let mut invocation = inner.event_writer.prepare_invoke();
        for key in &write.keys {
            invocation.key(key);
        }
        for arg in &write.args {
            invocation.arg(arg.as_slice());
        }
        for arg in &log {
            invocation.arg(arg.as_slice());
        }
        let mut connection = inner.connection.clone();
        let answer: redis::Value =
            match tokio::time::timeout(inner.timeout, invocation.invoke_async(&mut connection))
                .await
            {
                Ok(answer) => answer?,
                Err(_) => return Err(RedisStoreError::Timeout(self.timeout_ms())),
            };
        if text_is(&answer, "ok") {
            self.replicated(&mut connection, &write.keys[0]).await?;
        }
        inner.metrics.store_commit(1, started.elapsed());
        match answer {
            answer @ redis::Value::Array(_) => Ok(match parse_event_read(answer)? {
                EventRead::Found(current) => EventCommitted::Changed(current),
                EventRead::Other | EventRead::Duplicate => EventCommitted::Other,
            }),
            answer => match text(answer).as_deref() {
                Some("ok") => Ok(EventCommitted::Written),
                Some("dup") => Ok(EventCommitted::Duplicate),
                Some("other") => Ok(EventCommitted::Other),
                Some(unexpected) => Err(RedisStoreError::Unexpected(unexpected.to_owned())),
                None => Err(RedisStoreError::Unexpected("event commit".to_owned())),
            },
        }
    }

    /// Counts a rerun and waits a little, spreading replicas retrying the same records.
    pub(super) async fn conflicted(&self, attempt: u32) {
        self.inner
            .counters
            .conflicts
            .fetch_add(1, Ordering::Relaxed);
        let jitter = rand::random_range(0..=u64::from(attempt.min(8)) * 500);
        tokio::time::sleep(std::time::Duration::from_micros(jitter)).await;
    }
}

/// A script's answer as text.
fn text_is(value: &redis::Value, expected: &str) -> bool {
    match value {
        redis::Value::BulkString(bytes) => bytes == expected.as_bytes(),
        redis::Value::SimpleString(text) => text == expected,
        _ => false,
    }
}

fn text(value: redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        redis::Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// `event_read.lua`'s answer.
fn parse_event_read(answer: redis::Value) -> Result<EventRead, RedisStoreError> {
    match answer {
        redis::Value::Array(items) if items.len() == 3 => {
            let mut items = items.into_iter().map(text);
            let (Some(Some(id)), Some(Some(revision)), Some(Some(doc))) =
                (items.next(), items.next(), items.next())
            else {
                return Err(RedisStoreError::Unexpected("event read".to_owned()));
            };
            Ok(match parse_operation(&id, &revision, &doc) {
                Some(operation) => EventRead::Found(Box::new(operation)),
                // Unreadable (logged): the general transition skips it as well.
                None => EventRead::Other,
            })
        }
        other => match text(other).as_deref() {
            Some("dup") => Ok(EventRead::Duplicate),
            Some("other") => Ok(EventRead::Other),
            Some(unexpected) => Err(RedisStoreError::Unexpected(unexpected.to_owned())),
            None => Err(RedisStoreError::Unexpected("event read".to_owned())),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, StoreLocation};
    use crate::correlation::UpstreamId;
    use crate::metrics::Metrics;
    use crate::operation::{CallRef, EventEffect, OperationKind, OperationStatus, Transition};
    use crate::store::seam::Inbound;

    fn event(id: &str, context: &str, transition: Option<Transition>) -> IncomingEvent {
        IncomingEvent {
            id: Some(id.into()),
            event_type: "Microsoft.Communication.RemoveParticipantSucceeded".into(),
            call: Some(CallRef::CallConnection("call-1".into())),
            context: Some(context.into()),
            kind: OperationKind::RemoveParticipant,
            upstream_id: None,
            cancelled: false,
            upstream_status: None,
            transition,
            received: OffsetDateTime::now_utc(),
        }
    }

    fn succeeded() -> Option<Transition> {
        Some(Transition::Succeeded { result: None })
    }

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            retention: Duration::from_secs(3600),
            dedupe: Duration::from_secs(600),
            park: Duration::from_secs(5),
            timeouts: Config::embedded().operations.callback_timeouts,
            timeline_max: 100,
        }
    }

    #[test]
    fn only_events_naming_an_operation_by_context_alone_are_common() {
        let plain = event("e", "ctx", succeeded());
        assert!(is_common(&plain, false));
        assert!(!is_common(&plain, true), "a call's end");
        let mut cancelled = plain.clone();
        cancelled.cancelled = true;
        assert!(!is_common(&cancelled, false));
        let mut graph = plain.clone();
        graph.upstream_id = Some(UpstreamId::new("op-1"));
        assert!(!is_common(&graph, false));
        let mut call_level = plain;
        call_level.context = None;
        assert!(!is_common(&call_level, false));
    }

    #[test]
    fn the_write_names_every_key_it_touches_and_settles_only_settled_operations() {
        let keys = Keys::new("t", 1);
        let incoming = event("e", "ctx", succeeded());
        let read = EventKeys::new(&keys, &incoming).unwrap();
        let mut op = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("call-1".into()),
            "ctx".into(),
            OffsetDateTime::now_utc(),
        );
        let now = OffsetDateTime::now_utc();
        let running = EventWrite::new(&keys, &lifetimes(), &read, 0, &op, now).unwrap();
        assert!(!running.settled);
        assert_eq!(
            running.keys,
            vec![
                keys.operation(op.id),
                read.context.clone(),
                read.parked.clone(),
                keys.expiries(0),
                keys.deadlines(0),
                keys.seen(0, "e"),
            ]
        );
        assert!(running.args[6] != b"0", "a deadline while running");
        assert!(running.args[7].is_empty(), "nothing published");
        assert_eq!(running.args[8], b"1");
        assert_eq!(running.args[9], b"600000");
        assert_eq!(running.args[10], keys.operation_prefix(0).as_bytes());

        let base = op.revision;
        correlation::apply(
            &mut op,
            &incoming,
            Config::embedded().operations.event_bound(),
        );
        op.upstream_operation_id = Some("Op-1".into());
        let settled = EventWrite::new(&keys, &lifetimes(), &read, base, &op, now).unwrap();
        assert!(settled.settled);
        assert_eq!(settled.keys[6], keys.upstream(0, &upstream_key("Op-1")));
        assert_eq!(settled.args[1], base.to_string().as_bytes());
        assert_eq!(settled.args[2], op.revision.to_string().as_bytes());
        assert_eq!(
            settled.args[4], b"3600000",
            "kept for its retention once settled"
        );
        assert_eq!(settled.args[6], b"0");
        assert_eq!(settled.args[7], keys.settled_channel().as_bytes());
        let doc: Operation = serde_json::from_slice(&settled.args[3]).unwrap();
        assert_eq!(doc.status, OperationStatus::Succeeded);

        // An event without an id remembers none.
        let mut anonymous = incoming;
        anonymous.id = None;
        let read = EventKeys::new(&keys, &anonymous).unwrap();
        let write = EventWrite::new(&keys, &lifetimes(), &read, base, &op, now).unwrap();
        assert_eq!(write.keys.len(), 6, "no seen key, the upstream name");
        assert_eq!(write.args[8], b"0");
    }

    /// A throw-away `redis-server` (no persistence) on a free port; killed on drop.
    struct Server {
        child: Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// `None` (the test is skipped) without `redis-server`, a failure under `CI`.
    async fn server() -> Option<Server> {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) => {
                assert!(std::env::var_os("CI").is_none(), "redis-server: {error}");
                eprintln!("SKIPPED: redis-server cannot run here ({error})");
                return None;
            }
        };
        let url = format!("redis://127.0.0.1:{port}");
        let server = Server {
            child,
            url,
            _dir: dir,
        };
        let client = redis::Client::open(server.url.as_str()).unwrap();
        for _ in 0..250 {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return Some(server);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not answer on {}", server.url);
    }

    async fn store(server: &Server) -> RedisStore {
        let mut config = Config::embedded();
        config.store.location = server.url.clone();
        let StoreLocation::Redis(url) = config.store.location().unwrap() else {
            unreachable!("a redis URL")
        };
        RedisStore::connect(&url, &config.store, &config.operations, Metrics::new())
            .await
            .unwrap()
    }

    async fn created(store: &RedisStore, context: &str) -> Operation {
        let mut operation = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("call-1".into()),
            context.into(),
            OffsetDateTime::now_utc(),
        );
        operation
            .apply(Transition::Accepted, OffsetDateTime::now_utc())
            .unwrap();
        store.create(operation).await.unwrap()
    }

    async fn deliver_one(store: &RedisStore, incoming: IncomingEvent) -> Delivery {
        let mut delivered = None;
        store
            .deliver(
                vec![Inbound {
                    incoming,
                    ended: None,
                }],
                &mut |_, done| delivered = Some(done.delivery),
            )
            .await
            .unwrap();
        delivered.unwrap()
    }

    fn event_ids(operation: &Operation) -> Vec<&str> {
        operation
            .events
            .iter()
            .filter_map(|record| record.id.as_deref())
            .collect()
    }

    /// Reads and applies `incoming` as the common path does, without writing.
    async fn prepared(store: &RedisStore, incoming: &IncomingEvent) -> EventWrite {
        let inner = &store.inner;
        let read = EventKeys::new(&inner.keys, incoming).unwrap();
        let EventRead::Found(mut operation) = store.read_event(&read).await.unwrap() else {
            panic!("the common case");
        };
        let base = operation.revision;
        correlation::apply(&mut operation, incoming, inner.operations.event_bound());
        let now = OffsetDateTime::now_utc();
        EventWrite::new(&inner.keys, &inner.lifetimes, &read, base, &operation, now).unwrap()
    }

    #[tokio::test]
    async fn an_operation_changed_between_read_and_write_is_read_again_never_lost_or_applied_twice()
    {
        let Some(server) = server().await else { return };
        let store = store(&server).await;
        let op = created(&store, "ctx").await;
        let late = event("e-late", "ctx", succeeded());
        let write = prepared(&store, &late).await;
        // Another replica delivers an event to the same operation meanwhile.
        let started = event("e-other", "ctx", Some(Transition::Accepted));
        assert!(matches!(
            deliver_one(&store, started).await,
            Delivery::Matched { .. }
        ));
        // Nothing written; the answer is the operation as it is now.
        let EventCommitted::Changed(current) =
            store.commit_event(&write, Vec::new()).await.unwrap()
        else {
            panic!("changed");
        };
        assert_eq!(event_ids(&current), ["e-other"]);
        let stored = store.get(op.id).await.unwrap().unwrap();
        assert_eq!(event_ids(&stored), ["e-other"], "nothing written");
        assert_eq!(current.revision, stored.revision);
        assert_eq!(stored.status, OperationStatus::Running);

        // Delivered again (as the loop does after a conflict): applied once, on top.
        assert_eq!(
            deliver_one(&store, late.clone()).await,
            Delivery::Matched {
                id: op.id,
                effect: EventEffect::Applied
            }
        );
        assert_eq!(deliver_one(&store, late).await, Delivery::Duplicate);
        let stored = store.get(op.id).await.unwrap().unwrap();
        assert_eq!(event_ids(&stored), ["e-other", "e-late"]);
        assert_eq!(stored.status, OperationStatus::Succeeded);
    }

    #[tokio::test]
    async fn a_write_whose_context_names_another_operation_or_whose_id_was_seen_writes_nothing() {
        let Some(server) = server().await else { return };
        let store = store(&server).await;
        let op = created(&store, "ctx").await;
        let incoming = event("e1", "ctx", succeeded());
        let write = prepared(&store, &incoming).await;
        let context = write.keys[1].clone();
        let mut connection = store.inner.connection.clone();
        let () = redis::cmd("SET")
            .arg(&context)
            .arg("someone-else")
            .query_async(&mut connection)
            .await
            .unwrap();
        // Named by an operation that does not exist: no longer the common case.
        assert!(matches!(
            store.commit_event(&write, Vec::new()).await.unwrap(),
            EventCommitted::Other
        ));
        let () = redis::cmd("SET")
            .arg(&context)
            .arg(op.id.to_string())
            .query_async(&mut connection)
            .await
            .unwrap();
        // The id seen meanwhile (another replica wrote the same event).
        let () = redis::cmd("SET")
            .arg(store.inner.keys.seen(0, "e1"))
            .arg("1")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(matches!(
            store.commit_event(&write, Vec::new()).await.unwrap(),
            EventCommitted::Duplicate
        ));
        let stored = store.get(op.id).await.unwrap().unwrap();
        assert!(stored.events.is_empty());
        assert_eq!(stored.revision, op.revision);
        assert_eq!(deliver_one(&store, incoming).await, Delivery::Duplicate);
    }

    #[tokio::test]
    async fn the_common_path_writes_what_the_general_transition_writes() {
        let Some(server) = server().await else { return };
        let store = store(&server).await;
        let a = created(&store, "a").await;
        let b = created(&store, "b").await;
        let received = OffsetDateTime::now_utc();
        let mut to_a = event("ea", "a", succeeded());
        to_a.upstream_status = Some("completed".into());
        to_a.received = received;
        let mut to_b = to_a.clone();
        to_b.context = Some("b".into());
        to_b.id = Some("eb".into());
        let common = store.deliver_common(&to_a).await.unwrap();
        let general = store.deliver_general(to_b, None).await.unwrap();
        let applied = |id| Delivery::Matched {
            id,
            effect: EventEffect::Applied,
        };
        assert_eq!(common, Some(applied(a.id)));
        assert_eq!(general.delivery, applied(b.id));
        let mut a = store.get(a.id).await.unwrap().unwrap();
        let b = store.get(b.id).await.unwrap().unwrap();
        a.id = b.id;
        a.context = b.context.clone();
        a.created_date_time = b.created_date_time;
        a.events[0].id = b.events[0].id.clone();
        assert_eq!(a, b);
        // Both left the deadlines index once settled.
        let mut connection = store.inner.connection.clone();
        let deadlines: usize = redis::cmd("ZCARD")
            .arg(store.inner.keys.deadlines(0))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(deadlines, 0);
    }

    #[tokio::test]
    async fn an_event_whose_operation_is_unknown_is_left_to_the_general_transition() {
        let Some(server) = server().await else { return };
        let store = store(&server).await;
        let early = event("e1", "later", succeeded());
        assert_eq!(store.deliver_common(&early).await.unwrap(), None);
        assert_eq!(deliver_one(&store, early.clone()).await, Delivery::Parked);
        // Created now, it takes what was parked; a redelivery is a duplicate.
        let op = created(&store, "later").await;
        assert_eq!(op.status, OperationStatus::Succeeded);
        assert_eq!(deliver_one(&store, early).await, Delivery::Duplicate);
    }

    /// Script calls Redis has run since it started (`INFO commandstats`).
    async fn script_calls(store: &RedisStore) -> u64 {
        let mut connection = store.inner.connection.clone();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .unwrap();
        info.lines()
            .filter(|line| {
                line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:")
            })
            .filter_map(|line| {
                line.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    #[tokio::test]
    async fn a_callback_for_an_operation_this_replica_wrote_is_one_script_call() {
        let Some(server) = server().await else { return };
        let store = store(&server).await;
        // Redis learns the script on its first use (NOSCRIPT, then a second call).
        created(&store, "warm").await;
        let warm = event("e0", "warm", succeeded());
        assert!(store.deliver_common(&warm).await.unwrap().is_some());
        let op = created(&store, "ctx").await;
        let before = script_calls(&store).await;
        let started = event("e1", "ctx", Some(Transition::Accepted));
        assert!(matches!(
            store.deliver_common(&started).await.unwrap(),
            Some(Delivery::Matched { .. })
        ));
        assert_eq!(script_calls(&store).await - before, 1, "one round trip");
        // Again, from the copy that write left; and a duplicate is one call as well.
        let done = event("e2", "ctx", succeeded());
        assert!(store.deliver_common(&done).await.unwrap().is_some());
        assert_eq!(script_calls(&store).await - before, 2);
        let stored = store.get(op.id).await.unwrap().unwrap();
        assert_eq!(event_ids(&stored), ["e1", "e2"]);
        assert_eq!(stored.status, OperationStatus::Succeeded);
        // Settled: forgotten, so a late callback reads first.
        assert!(
            store
                .inner
                .known
                .guess(&EventKeys::new(&store.inner.keys, &done).unwrap().name)
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_stale_copy_costs_a_round_trip_and_the_event_lands_on_what_redis_holds() {
        let Some(server) = server().await else { return };
        let (a, b) = (store(&server).await, store(&server).await);
        for store in [&a, &b] {
            let context = format!("warm-{}", script_calls(store).await);
            created(store, &context).await;
            let warm = event(&context, &context, succeeded());
            assert!(store.deliver_common(&warm).await.unwrap().is_some());
        }
        let op = created(&a, "ctx").await;
        // Replica B changes the operation; A's copy is now a revision behind.
        assert!(matches!(
            deliver_one(&b, event("e1", "ctx", Some(Transition::Accepted))).await,
            Delivery::Matched { .. }
        ));
        let before = script_calls(&a).await;
        assert_eq!(
            deliver_one(&a, event("e2", "ctx", succeeded())).await,
            Delivery::Matched {
                id: op.id,
                effect: EventEffect::Applied
            }
        );
        assert_eq!(
            script_calls(&a).await - before,
            2,
            "the stale guess, then the write"
        );
        assert_eq!(
            a.inner.counters.conflicts.load(Ordering::Relaxed),
            0,
            "no contention"
        );
        let stored = a.get(op.id).await.unwrap().unwrap();
        assert_eq!(
            event_ids(&stored),
            ["e1", "e2"],
            "neither lost nor applied twice"
        );
        assert_eq!(stored.status, OperationStatus::Succeeded);
        // A duplicate of B's event sent to A (its copy is of a settled operation: none).
        assert_eq!(
            deliver_one(&a, event("e1", "ctx", Some(Transition::Accepted))).await,
            Delivery::Duplicate
        );
    }

    #[test]
    fn a_remembered_operation_is_what_a_read_of_its_document_gives() {
        let mut op = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("call-1".into()),
            "ctx".into(),
            OffsetDateTime::now_utc(),
        );
        op.apply(Transition::Accepted, OffsetDateTime::now_utc())
            .unwrap();
        op.revision = 7;
        op.durable = 5;
        op.events_written = 3;
        op.announced.change = 8;
        let doc = serde_json::to_string(&op).unwrap();
        let read = parse_operation(&op.id.to_string(), "7", &doc).unwrap();
        assert_eq!(format!("{:?}", as_stored(op)), format!("{read:?}"));
    }
}
