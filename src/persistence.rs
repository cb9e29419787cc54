//! The bridge between the in-memory store (the hot index) and the journal (the durable
//! record): it turns what a request changed into one journal batch (operation snapshots
//! with their revisions, event ids seen, parked events), and the journal's contents back
//! into a store at start.
//!
//! Callers collect a [`Changes`] while they work on the store, then [`Recorder::commit`]
//! it and answer only once that returned: an operation is durable before its 202, a
//! callback before its 2xx. With the memory store, nothing is collected or written.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::correlation::IncomingEvent;
use crate::journal::{Batch, Journal, JournalError, Loaded};
use crate::operation::{Operation, OperationId};
use crate::store::{OperationStore, Restored};

/// Writes changes to the journal (or nowhere, for the memory store).
#[derive(Clone, Debug)]
pub struct Recorder {
    journal: Journal,
    durable: bool,
}

/// What one request (or one sweep) changed, to be written together.
#[derive(Debug, Default)]
pub struct Changes {
    durable: bool,
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

    /// An event id was seen for the first time.
    pub fn seen(&mut self, event: &IncomingEvent) {
        if let (true, Some(id)) = (self.durable, &event.id) {
            self.seen.push((id.clone(), unix_ms(event.received)));
        }
    }

    /// Event ids seen before `before` were forgotten.
    pub fn seen_expired_before(&mut self, before: OffsetDateTime) {
        if self.durable {
            self.seen_expired_before = Some(unix_ms(before));
        }
    }

    /// True when a parked event must be kept: the caller then hands a copy to [`Changes::parked`].
    pub fn keeps_parked(&self) -> bool {
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
        }
    }

    /// Writes to `journal`.
    pub fn durable(journal: Journal) -> Self {
        Self {
            journal,
            durable: true,
        }
    }

    pub fn is_durable(&self) -> bool {
        self.durable
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// An empty change set for one request.
    pub fn changes(&self) -> Changes {
        Changes {
            durable: self.durable,
            ..Changes::default()
        }
    }

    /// Writes `changes` (operations as they are in `store` now, so with every change up to
    /// this moment; the journal keeps the highest revision) and returns once they are
    /// durable.
    pub async fn commit(
        &self,
        store: &OperationStore,
        changes: Changes,
    ) -> Result<(), JournalError> {
        if !self.durable {
            return Ok(());
        }
        let mut batch = Batch {
            removed_operations: changes.removed.iter().map(ToString::to_string).collect(),
            seen: changes.seen,
            seen_expired_before: changes.seen_expired_before,
            parked: changes.parked,
            unparked: changes.unparked,
            ..Batch::default()
        };
        for id in changes.operations {
            let Some(operation) = store.get(id) else {
                continue;
            };
            match serde_json::to_vec(&operation) {
                Ok(json) => batch
                    .operations
                    .push((id.to_string(), json, revision(&operation))),
                Err(error) => {
                    tracing::error!(operation.id = %id, %error, "an operation could not be serialized");
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.journal.write(batch).await
    }
}

/// The journal's contents as the store takes them; unreadable rows are logged and skipped.
pub fn restored(loaded: Loaded) -> Restored {
    let mut restored = Restored::default();
    for (id, json, revision) in loaded.operations {
        match serde_json::from_slice::<Operation>(&json) {
            Ok(mut operation) => {
                operation.revision = u64::try_from(revision).unwrap_or_default();
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
    // SQLite integers are signed: keep the key positive.
    u64::from_be_bytes(bytes) >> 1
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_unix_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
