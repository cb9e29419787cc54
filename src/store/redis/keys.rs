//! Key names of the shared store. Every key starts with `{prefix}:` (a hash tag: on a
//! cluster they all live in one slot, so one script may touch any of them). Names made
//! from outside text (contexts, call ids, event ids, upstream ids) are hashed: fixed length,
//! whatever a callback carries.

use crate::crypto::Sha256;

use crate::operation::{CallRef, OperationId, call_hash};

/// Key names under one prefix, in its partitions. Partition 0's tag is `{prefix}` (so one
/// partition is the layout of an unpartitioned store); partition p's is `{prefix-pP}`. The
/// deployment's own keys (layout version, partition count, subscriptions) are partition 0's.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{prefix}:`, `{prefix-p1}:`, …: one per partition.
    heads: Vec<String>,
}

/// A partition's index.
pub type Partition = u16;

impl Keys {
    pub fn new(prefix: &str, partitions: u16) -> Self {
        let heads = (0..partitions.max(1))
            .map(|p| {
                if p == 0 {
                    format!("{{{prefix}}}:")
                } else {
                    format!("{{{prefix}-p{p}}}:")
                }
            })
            .collect();
        Self { heads }
    }

    /// How many partitions there are.
    pub fn partitions(&self) -> Partition {
        self.heads.len() as Partition
    }

    /// Every partition, in order.
    pub fn each(&self) -> impl Iterator<Item = Partition> + use<> {
        0..self.partitions()
    }

    /// The partition holding `call`'s keys.
    pub fn of_call(&self, call: &CallRef) -> Partition {
        // One partition: no hash on the callback path.
        if self.heads.len() == 1 {
            return 0;
        }
        call_hash(call) % self.partitions()
    }

    /// The partition holding operation `id` (its id carries its call's hash).
    pub fn of(&self, id: OperationId) -> Partition {
        id.call_hash() % self.partitions()
    }

    fn key(&self, p: Partition, kind: &str, name: &str) -> String {
        let head = &self.heads[usize::from(p)];
        let mut key = String::with_capacity(head.len() + kind.len() + name.len() + 1);
        key.push_str(head);
        key.push_str(kind);
        key.push(':');
        key.push_str(name);
        key
    }

    /// A hash: `rev` (the revision) and `doc` (the operation's JSON).
    pub fn operation(&self, id: OperationId) -> String {
        self.key(self.of(id), "op", &id.to_string())
    }

    /// What [`Keys::operation`] puts before the id, in partition `p`.
    pub fn operation_prefix(&self, p: Partition) -> String {
        self.key(p, "op", "")
    }

    /// The operation holding (call, context): its id.
    pub fn context(&self, p: Partition, name: &str) -> String {
        self.key(p, "ctx", name)
    }

    /// Events parked under (call, context), oldest first.
    pub fn parked(&self, p: Partition, name: &str) -> String {
        self.key(p, "parked", name)
    }

    /// The operation Graph knows by this id (in `upstream_key` form).
    pub fn upstream(&self, p: Partition, upstream_key: &str) -> String {
        self.key(p, "up", &hashed(&[upstream_key.as_bytes()]))
    }

    /// Present while the event id is remembered.
    pub fn seen(&self, p: Partition, event_id: &str) -> String {
        self.key(p, "seen", &hashed(&[event_id.as_bytes()]))
    }

    /// The set of operations on a call.
    pub fn call(&self, call: &CallRef) -> String {
        self.key(self.of_call(call), "call", &call_name(call))
    }

    /// The call's own events (and callbacks that never found their operation).
    pub fn timeline(&self, call: &CallRef) -> String {
        self.key(self.of_call(call), "events", &call_name(call))
    }

    /// Every operation id of partition `p` (a sorted set, score 0: ordered by id, so by
    /// creation time).
    pub fn all(&self, p: Partition) -> String {
        self.key(p, "index", "all")
    }

    /// Every operation id by when its record expires (unix ms).
    pub fn expiries(&self, p: Partition) -> String {
        self.key(p, "index", "expiries")
    }

    /// Unsettled operations by callback deadline (unix ms).
    pub fn deadlines(&self, p: Partition) -> String {
        self.key(p, "index", "deadlines")
    }

    /// Operations whose request no upstream answered yet, by creation time (unix ms).
    pub fn unsent(&self, p: Partition) -> String {
        self.key(p, "index", "unsent")
    }

    /// Present while a replica is sending the operation's request.
    pub fn lease(&self, id: OperationId) -> String {
        self.key(self.of(id), "lease", &id.to_string())
    }

    /// Names of (call, context) with parked events, by when they expire (unix ms).
    pub fn park_due(&self, p: Partition) -> String {
        self.key(p, "index", "parked")
    }

    /// The store's layout version (absent in the layout of version 1).
    pub fn schema(&self) -> String {
        format!("{}schema", self.heads[0])
    }

    /// The number of partitions the store was created with (absent: 1).
    pub fn partition_count(&self) -> String {
        format!("{}partitions", self.heads[0])
    }

    /// Held (a random token, with an expiry) by the replica migrating the store.
    pub fn migrating(&self) -> String {
        format!("{}migrating", self.heads[0])
    }

    /// Partition `p`'s change log: a stream of change-feed rows and document writes that
    /// every replica tails into its feed and outbox.
    pub fn log(&self, p: Partition) -> String {
        format!("{}log", self.heads[usize::from(p)])
    }

    /// Partition `p`'s change-log clock: the last number given (one partition), or the last
    /// `ms n` (several).
    pub fn log_seq(&self, p: Partition) -> String {
        format!("{}log:seq", self.heads[usize::from(p)])
    }

    /// A hash of documents (subscriptions in partition 0, webhook deliveries in their
    /// operation's): `<kind>:<id>` → JSON.
    pub fn documents(&self, p: Partition) -> String {
        format!("{}documents", self.heads[usize::from(p)])
    }

    /// Present while a replica attempts the webhook delivery `id`.
    pub fn delivery_lease(&self, id: &str) -> String {
        self.key(0, "lease", &format!("delivery:{id}"))
    }

    /// The pub/sub channel carrying the ids of operations that settled.
    pub fn settled_channel(&self) -> String {
        self.key(0, "settled", "")
    }
}

/// The hashed name under which events naming their operation by upstream id alone (`key`,
/// in `upstream_key` form) wait for it; never a (call, context)'s name.
pub fn upstream_park_name(key: &str) -> String {
    hashed(&[b"upstream-park", key.as_bytes()])
}

/// The name `event` parks under when its operation is unknown (as the tracker parks it).
pub fn park_name(event: &crate::correlation::IncomingEvent) -> Option<String> {
    if let Some((call, context)) = event.names() {
        return Some(context_name(call, context));
    }
    let upstream_id = event.upstream_id.as_ref()?;
    (event.call.is_some() && event.should_park()).then(|| upstream_park_name(upstream_id.key()))
}

/// The hashed name of (call, context), used for its index and park keys.
pub fn context_name(call: &CallRef, context: &str) -> String {
    hashed(&[call_tag(call), call.id().as_bytes(), context.as_bytes()])
}

fn call_name(call: &CallRef) -> String {
    hashed(&[call_tag(call), call.id().as_bytes()])
}

fn call_tag(call: &CallRef) -> &'static [u8] {
    match call {
        CallRef::CallConnection(_) => b"acs",
        CallRef::Call(_) => b"graph",
    }
}

/// The first 128 bits of SHA-256 over the parts (each length-prefixed), in hex.
fn hashed(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finish();
    let mut name = String::with_capacity(32);
    for byte in &digest[..16] {
        use std::fmt::Write;
        let _ = write!(name, "{byte:02x}");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag_and_outside_text_is_hashed() {
        let keys = Keys::new("callops", 1);
        let call = CallRef::CallConnection("c1".into());
        let name = context_name(&call, "a context with spaces and {braces}");
        assert_eq!(name.len(), 32);
        for key in [
            keys.context(0, &name),
            keys.parked(0, &name),
            keys.seen(0, "x"),
            keys.upstream(0, "abc"),
            keys.call(&call),
            keys.all(0),
            keys.schema(),
        ] {
            assert!(key.starts_with("{callops}:"), "{key}");
        }
        assert_eq!(keys.schema(), "{callops}:schema");
        assert_eq!(keys.migrating(), "{callops}:migrating");
        // The same strings on another kind of call, or split differently, are other names.
        let graph = CallRef::Call("c1".into());
        assert_ne!(context_name(&graph, "x"), context_name(&call, "x"));
        assert_ne!(
            context_name(&CallRef::Call("ab".into()), "c"),
            context_name(&CallRef::Call("a".into()), "bc")
        );
    }

    #[test]
    fn a_call_and_its_operations_share_a_partition_and_one_partition_is_the_plain_layout() {
        let one = Keys::new("callops", 1);
        let call = CallRef::CallConnection("call-1".into());
        let id = OperationId::for_call(&call);
        assert_eq!(one.operation(id), format!("{{callops}}:op:{id}"));
        assert_eq!(one.all(0), "{callops}:index:all");
        let many = Keys::new("callops", 16);
        let p = many.of_call(&call);
        assert_eq!(many.of(id), p);
        let tag = if p == 0 {
            "{callops}:".to_owned()
        } else {
            format!("{{callops-p{p}}}:")
        };
        for key in [
            many.operation(id),
            many.call(&call),
            many.timeline(&call),
            many.all(p),
            many.log(p),
            many.lease(id),
        ] {
            assert!(key.starts_with(&tag), "{key}");
        }
        // The deployment's own keys stay in partition 0.
        assert_eq!(many.schema(), "{callops}:schema");
        assert_eq!(many.partition_count(), "{callops}:partitions");
        // Calls spread over the partitions.
        let used: std::collections::BTreeSet<Partition> = (0..400)
            .map(|n| many.of_call(&CallRef::Call(format!("call-{n}"))))
            .collect();
        assert_eq!(used.len(), 16);
    }
}
