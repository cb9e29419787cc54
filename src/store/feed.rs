//! The change feed: every committed change of an operation, numbered by the store in the
//! transaction that wrote it, kept for a window (time and count) for the live stream to
//! replay from. The journal hands committed rows over in number order ([`Feed::push`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::operation::{CallRef, Operation, OperationId, OperationKind, OperationStatus};
use crate::store::tracker::ListFilter;

/// One change as the journal stores it (the row's body).
#[derive(Serialize, Deserialize)]
pub(crate) struct ChangeRow<'a> {
    pub revision: u64,
    /// The change settled the operation (or changed its outcome).
    pub settled: bool,
    #[serde(borrow)]
    pub operation: &'a serde_json::value::RawValue,
}

/// A change of an operation, as readers of the feed get it.
#[derive(Debug)]
pub struct Change {
    /// Monotonically increasing across the store.
    pub id: u64,
    pub at: OffsetDateTime,
    pub settled: bool,
    /// What filters match on (id, kind, status, call, context) of the operation after the
    /// change; nothing else of it is kept here.
    pub operation: Operation,
    /// The operation as `GET /v1/operations/{id}` shows it, as JSON.
    pub json: Bytes,
}

/// What a reader gets after a change id.
#[derive(Debug)]
pub enum Since {
    /// Changes after the id were dropped (older than the window): the reader missed some.
    Gap { oldest: u64 },
    /// The changes after the id matching the filter (at most the limit), and the newest id
    /// looked at (the reader's next position).
    Changes(Vec<Arc<Change>>, u64),
}

/// A cheap handle.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

struct Inner {
    ring: Mutex<Ring>,
    head: watch::Sender<u64>,
    retention: Duration,
    max: usize,
}

#[derive(Default)]
struct Ring {
    changes: VecDeque<Arc<Change>>,
    /// The highest change id dropped from the window (0: none).
    expired_through: u64,
    /// Per operation in the window: the revision and id of its latest change. A row for an
    /// older revision that reaches the journal after a newer one (concurrent commits) is
    /// not shown.
    latest: HashMap<OperationId, (u64, u64)>,
}

impl Feed {
    pub fn new(retention: Duration, max: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                ring: Mutex::default(),
                head: watch::Sender::new(0),
                retention,
                max: max.max(1),
            }),
        }
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Rows as the journal loaded them; `last` is the highest number it ever gave (rows up
    /// to it that are missing were dropped).
    pub fn restore(&self, rows: Vec<(u64, i64, Vec<u8>)>, last: u64) {
        let first = rows.first().map_or(last + 1, |(id, ..)| *id);
        self.push(rows);
        let mut ring = self.ring();
        ring.expired_through = ring.expired_through.max(first.saturating_sub(1));
    }

    /// Committed rows, in number order. Unreadable rows are logged and skipped.
    pub fn push(&self, rows: Vec<(u64, i64, Vec<u8>)>) {
        let mut head = None;
        {
            let mut ring = self.ring();
            for (id, at_ms, body) in rows {
                let Some(change) = parse(id, at_ms, &body) else {
                    continue;
                };
                let revision = change.1;
                let change = change.0;
                let latest = ring.latest.get(&change.operation.id).copied();
                if latest.is_some_and(|(newest, _)| newest >= revision) {
                    continue;
                }
                ring.latest.insert(change.operation.id, (revision, id));
                ring.changes.push_back(Arc::new(change));
                head = Some(id);
            }
            self.trim(&mut ring, OffsetDateTime::now_utc());
        }
        if let Some(id) = head {
            self.inner.head.send_replace(id);
        }
    }

    /// Drops changes past the window; the highest id dropped so far.
    pub fn expire(&self, now: OffsetDateTime) -> u64 {
        let mut ring = self.ring();
        self.trim(&mut ring, now);
        ring.expired_through
    }

    fn trim(&self, ring: &mut Ring, now: OffsetDateTime) {
        let cutoff = now - self.inner.retention;
        while let Some(front) = ring.changes.front() {
            if ring.changes.len() <= self.inner.max && front.at >= cutoff {
                break;
            }
            let (id, operation) = (front.id, front.operation.id);
            ring.changes.pop_front();
            ring.expired_through = id;
            if ring
                .latest
                .get(&operation)
                .is_some_and(|(_, last)| *last == id)
            {
                ring.latest.remove(&operation);
            }
        }
    }

    /// The newest change id (0: none yet).
    pub fn head(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// How many kept changes come after `after` (numbers need not be dense: a partitioned
    /// shared store numbers them by time).
    pub fn count_after(&self, after: u64) -> u64 {
        let ring = self.ring();
        let start = ring.changes.partition_point(|change| change.id <= after);
        (ring.changes.len() - start) as u64
    }

    /// Woken whenever a change is added.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    /// Changes after `after` matching `filter`, at most `limit`.
    pub fn since(&self, after: u64, filter: &ListFilter, limit: usize) -> Since {
        let ring = self.ring();
        if after < ring.expired_through {
            return Since::Gap {
                oldest: ring
                    .changes
                    .front()
                    .map_or(ring.expired_through + 1, |c| c.id),
            };
        }
        let start = ring.changes.partition_point(|change| change.id <= after);
        let mut found = Vec::new();
        let mut position = after;
        for change in ring.changes.range(start..) {
            if found.len() == limit {
                break;
            }
            position = change.id;
            if filter.matches(&change.operation) {
                found.push(Arc::clone(change));
            }
        }
        Since::Changes(found, position)
    }
}

/// What a change's filters look at (the rest of the operation is skipped, not built).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    id: OperationId,
    kind: OperationKind,
    status: OperationStatus,
    context: String,
    call_connection_id: Option<String>,
    call_id: Option<String>,
}

/// A change and its revision, from a journal row.
fn parse(id: u64, at_ms: i64, body: &[u8]) -> Option<(Change, u64)> {
    let row: ChangeRow<'_> = match serde_json::from_slice(body) {
        Ok(row) => row,
        Err(error) => {
            tracing::error!(change.id = id, %error, "a change row could not be read; skipped");
            return None;
        }
    };
    let meta: Meta = match serde_json::from_str(row.operation.get()) {
        Ok(meta) => meta,
        Err(error) => {
            tracing::error!(change.id = id, %error, "a change row's operation could not be read; skipped");
            return None;
        }
    };
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let call = match (meta.call_connection_id, meta.call_id) {
        (Some(id), _) => CallRef::CallConnection(id),
        (None, Some(id)) => CallRef::Call(id),
        (None, None) => CallRef::CallConnection(String::new()),
    };
    let mut operation = Operation::new(meta.kind, call, meta.context, at);
    operation.id = meta.id;
    operation.status = meta.status;
    let change = Change {
        id,
        at,
        settled: row.settled,
        operation,
        json: Bytes::copy_from_slice(row.operation.get().as_bytes()),
    };
    Some((change, row.revision))
}

/// A change row's body.
pub(crate) fn row(revision: u64, settled: bool, operation_json: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(operation_json.len() + 48);
    body.extend_from_slice(b"{\"revision\":");
    body.extend_from_slice(revision.to_string().as_bytes());
    body.extend_from_slice(b",\"settled\":");
    body.extend_from_slice(if settled { b"true" } else { b"false" });
    body.extend_from_slice(b",\"operation\":");
    body.extend_from_slice(operation_json.as_bytes());
    body.push(b'}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op_json(operation: &Operation) -> String {
        serde_json::to_string(operation).expect("json")
    }

    fn operation(call: &str) -> Operation {
        Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection(call.into()),
            "ctx".into(),
            OffsetDateTime::now_utc(),
        )
    }

    fn now_ms() -> i64 {
        (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
    }

    #[test]
    fn readers_get_changes_after_their_id_in_order_and_filtered() {
        let feed = Feed::new(Duration::from_secs(60), 100);
        let (a, b) = (operation("a"), operation("b"));
        feed.push(vec![
            (1, now_ms(), row(1, false, &op_json(&a))),
            (2, now_ms(), row(1, false, &op_json(&b))),
            (3, now_ms(), row(2, true, &op_json(&a))),
        ]);
        assert_eq!(feed.head(), 3);
        let Since::Changes(all, position) = feed.since(0, &ListFilter::default(), 10) else {
            panic!("no gap expected");
        };
        assert_eq!(all.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(position, 3);
        let only_a = ListFilter {
            call_connection_id: Some("a".into()),
            ..ListFilter::default()
        };
        let Since::Changes(found, position) = feed.since(1, &only_a, 10) else {
            panic!("no gap expected");
        };
        assert_eq!(found.iter().map(|c| c.id).collect::<Vec<_>>(), [3]);
        assert!(found[0].settled);
        assert_eq!(position, 3);
    }

    #[test]
    fn an_older_revision_arriving_late_is_not_shown() {
        let feed = Feed::new(Duration::from_secs(60), 100);
        let mut a = operation("a");
        a.status = OperationStatus::Succeeded;
        feed.push(vec![(1, now_ms(), row(5, true, &op_json(&a)))]);
        a.status = OperationStatus::Running;
        feed.push(vec![(2, now_ms(), row(4, false, &op_json(&a)))]);
        let Since::Changes(found, _) = feed.since(0, &ListFilter::default(), 10) else {
            panic!("no gap expected");
        };
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].operation.status, OperationStatus::Succeeded);
    }

    #[test]
    fn an_id_older_than_the_window_is_a_gap() {
        let feed = Feed::new(Duration::from_secs(60), 2);
        let rows = (1..=4)
            .map(|id| {
                (
                    id,
                    now_ms(),
                    row(1, false, &op_json(&operation(&id.to_string()))),
                )
            })
            .collect();
        feed.push(rows);
        assert!(matches!(
            feed.since(1, &ListFilter::default(), 10),
            Since::Gap { oldest: 3 }
        ));
        assert!(
            matches!(feed.since(2, &ListFilter::default(), 10), Since::Changes(ref c, 4) if c.len() == 2)
        );
        // Restored with rows from 10 on: the ids before were dropped.
        let restored = Feed::new(Duration::from_secs(60), 100);
        restored.restore(
            vec![(10, now_ms(), row(1, false, &op_json(&operation("x"))))],
            10,
        );
        assert!(matches!(
            restored.since(5, &ListFilter::default(), 10),
            Since::Gap { .. }
        ));
        assert!(
            matches!(restored.since(9, &ListFilter::default(), 10), Since::Changes(ref c, 10) if c.len() == 1)
        );
    }
}
