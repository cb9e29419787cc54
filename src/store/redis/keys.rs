//! Key names of the shared store. Every key starts with `{prefix}:` (a hash tag: on a
//! cluster they all live in one slot, so one script may touch any of them). Names made
//! from outside text (contexts, call ids, event ids, upstream ids) are hashed: fixed length,
//! whatever a callback carries.

use crate::crypto::Sha256;

use crate::operation::{CallRef, OperationId};

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{prefix}:`
    head: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            head: format!("{{{prefix}}}:"),
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        let mut key = String::with_capacity(self.head.len() + kind.len() + name.len() + 1);
        key.push_str(&self.head);
        key.push_str(kind);
        key.push(':');
        key.push_str(name);
        key
    }

    /// A hash: `rev` (the revision) and `doc` (the operation's JSON).
    pub fn operation(&self, id: OperationId) -> String {
        self.key("op", &id.to_string())
    }

    /// What [`Keys::operation`] puts before the id.
    pub fn operation_prefix(&self) -> String {
        self.key("op", "")
    }

    /// The operation holding (call, context): its id.
    pub fn context(&self, name: &str) -> String {
        self.key("ctx", name)
    }

    /// Events parked under (call, context), oldest first.
    pub fn parked(&self, name: &str) -> String {
        self.key("parked", name)
    }

    /// The operation Graph knows by this id (in `upstream_key` form).
    pub fn upstream(&self, upstream_key: &str) -> String {
        self.key("up", &hashed(&[upstream_key.as_bytes()]))
    }

    /// Present while the event id is remembered.
    pub fn seen(&self, event_id: &str) -> String {
        self.key("seen", &hashed(&[event_id.as_bytes()]))
    }

    /// The set of operations on a call.
    pub fn call(&self, call: &CallRef) -> String {
        self.key("call", &call_name(call))
    }

    /// The call's own events (and callbacks that never found their operation).
    pub fn timeline(&self, call: &CallRef) -> String {
        self.key("events", &call_name(call))
    }

    /// Every operation id (a sorted set, score 0: ordered by id, so by creation time).
    pub fn all(&self) -> String {
        self.key("index", "all")
    }

    /// Every operation id by when its record expires (unix ms).
    pub fn expiries(&self) -> String {
        self.key("index", "expiries")
    }

    /// Unsettled operations by callback deadline (unix ms).
    pub fn deadlines(&self) -> String {
        self.key("index", "deadlines")
    }

    /// Operations whose request no upstream answered yet, by creation time (unix ms).
    pub fn unsent(&self) -> String {
        self.key("index", "unsent")
    }

    /// Present while a replica is sending the operation's request.
    pub fn lease(&self, id: OperationId) -> String {
        self.key("lease", &id.to_string())
    }

    /// Names of (call, context) with parked events, by when they expire (unix ms).
    pub fn park_due(&self) -> String {
        self.key("index", "parked")
    }

    /// The store's layout version (absent in the layout of version 1).
    pub fn schema(&self) -> String {
        format!("{}schema", self.head)
    }

    /// Held (a random token, with an expiry) by the replica migrating the store.
    pub fn migrating(&self) -> String {
        format!("{}migrating", self.head)
    }

    /// The change log: a stream of change-feed rows and document writes, numbered by
    /// [`Keys::log_seq`], that every replica tails into its feed and outbox.
    pub fn log(&self) -> String {
        format!("{}log", self.head)
    }

    /// The last number given to a change-log entry.
    pub fn log_seq(&self) -> String {
        format!("{}log:seq", self.head)
    }

    /// A hash of documents (subscriptions, webhook deliveries): `<kind>:<id>` → JSON.
    pub fn documents(&self) -> String {
        format!("{}documents", self.head)
    }

    /// Present while a replica attempts the webhook delivery `id`.
    pub fn delivery_lease(&self, id: &str) -> String {
        self.key("lease", &format!("delivery:{id}"))
    }

    /// The pub/sub channel carrying the ids of operations that settled.
    pub fn settled_channel(&self) -> String {
        self.key("settled", "")
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
        let keys = Keys::new("callops");
        let call = CallRef::CallConnection("c1".into());
        let name = context_name(&call, "a context with spaces and {braces}");
        assert_eq!(name.len(), 32);
        for key in [
            keys.context(&name),
            keys.parked(&name),
            keys.seen("x"),
            keys.upstream("abc"),
            keys.call(&call),
            keys.all(),
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
}
