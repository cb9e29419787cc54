//! The webhook outbox's records: subscriptions and deliveries (pure data and matching), and
//! the in-memory registry of both that the journal's commits keep current. A delivery is
//! created in the commit of the change that caused it; `webhooks` sends it.

use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Notify;
use utoipa::ToSchema;

use crate::operation::{
    CallRef, NotifyTarget, Operation, OperationId, OperationKind, OperationStatus,
};
use crate::store::journal::Document;

/// Document kinds in the journal.
pub const SUBSCRIPTION: &str = "subscription";
pub const DELIVERY: &str = "delivery";

/// Every change of an operation.
pub const OPERATION_CHANGED: &str = "operation.changed";
/// An operation settled, or a late callback changed its outcome.
pub const OPERATION_SETTLED: &str = "operation.settled";
/// The event types a subscription may name.
pub const EVENT_TYPES: [&str; 2] = [OPERATION_SETTLED, OPERATION_CHANGED];

/// Which operations a subscription hears of; every member given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscriptionFilter {
    /// E.g. `removeParticipant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 64)]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<OperationStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 256)]
    pub call_connection_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 256)]
    pub call_id: Option<String>,
    /// Operations whose context starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 512)]
    pub context_prefix: Option<String>,
}

impl SubscriptionFilter {
    pub fn matches(&self, operation: &Operation) -> bool {
        self.kind
            .as_deref()
            .is_none_or(|kind| OperationKind::from_name(kind) == operation.kind)
            && self.status.is_none_or(|status| status == operation.status)
            && self.call_connection_id.as_deref().is_none_or(
                |id| matches!(&operation.call, CallRef::CallConnection(call) if call == id),
            )
            && self
                .call_id
                .as_deref()
                .is_none_or(|id| matches!(&operation.call, CallRef::Call(call) if call == id))
            && self
                .context_prefix
                .as_deref()
                .is_none_or(|prefix| operation.context.starts_with(prefix))
    }
}

/// A webhook subscription as stored (its secret included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: String,
    pub url: String,
    #[serde(default)]
    pub filter: SubscriptionFilter,
    pub event_types: Vec<String>,
    /// `whsec_` and the base64 of the signing key.
    pub secret: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_date_time: OffsetDateTime,
    /// Off after its endpoint kept failing (`disabled_reason` says since when).
    #[serde(default)]
    pub disabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// The first failure since the last success.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub failing_since: Option<OffsetDateTime>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeliveryStatus {
    /// Waiting for its next attempt.
    Pending,
    /// A 2xx answered it.
    Delivered,
    /// Dead-lettered: refused for good, or retried past `webhooks.retry_total_secs`.
    Failed,
}

/// One attempt to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    #[serde(with = "time::serde::rfc3339")]
    pub date_time: OffsetDateTime,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A message to one endpoint, retried until delivered or dead-lettered. Its id is the
/// `webhook-id` of every attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: String,
    /// The subscription it is for (its URL and secret are used), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
    /// A per-operation `notify` URL and its secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub event_type: String,
    pub operation_id: OperationId,
    /// The body sent: `{"type", "timestamp", "data": <the operation>}`.
    pub payload: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_date_time: OffsetDateTime,
    pub status: DeliveryStatus,
    /// The last attempts (at most [`KEPT_ATTEMPTS`]); `attempt_count` counts them all.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    #[serde(default)]
    pub attempt_count: u32,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_attempt_date_time: Option<OffsetDateTime>,
    /// When the attempts run out: `created_date_time` + the retry window (a redelivery
    /// starts a new window).
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
}

/// Attempts kept per delivery in the log.
pub const KEPT_ATTEMPTS: usize = 20;

impl Delivery {
    /// Notes an attempt, keeping the last [`KEPT_ATTEMPTS`].
    pub fn record(&mut self, attempt: Attempt) {
        if self.attempts.len() >= KEPT_ATTEMPTS {
            self.attempts.remove(0);
        }
        self.attempts.push(attempt);
        self.attempt_count = self.attempt_count.saturating_add(1);
    }

    pub fn document(&self) -> Document {
        Document {
            kind: DELIVERY,
            id: self.id.clone(),
            body: serde_json::to_vec(self).ok(),
        }
    }
}

impl Subscription {
    pub fn document(&self) -> Document {
        Document {
            kind: SUBSCRIPTION,
            id: self.id.clone(),
            body: serde_json::to_vec(self).ok(),
        }
    }
}

/// The subscriptions and deliveries, as committed. A cheap handle.
#[derive(Clone, Default)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("subscriptions", &self.inner.subscriptions.len())
            .field("deliveries", &self.inner.deliveries.len())
            .finish()
    }
}

#[derive(Default)]
struct Inner {
    subscriptions: DashMap<String, Subscription>,
    deliveries: DashMap<String, Delivery>,
    /// Ids of the pending deliveries: the sender's passes look at these, not at the log.
    pending: dashmap::DashSet<String>,
    /// Woken when a delivery is committed.
    added: Notify,
    /// The retry window new deliveries get.
    retry_total: std::sync::OnceLock<time::Duration>,
}

impl Outbox {
    pub fn new(retry_total: std::time::Duration) -> Self {
        let outbox = Self::default();
        let _ = outbox
            .inner
            .retry_total
            .set(time::Duration::try_from(retry_total).unwrap_or(time::Duration::DAY));
        outbox
    }

    /// Takes committed (or loaded) documents.
    pub fn apply(&self, documents: impl IntoIterator<Item = Document>) {
        let mut added = false;
        for document in documents {
            match (document.kind, document.body) {
                (SUBSCRIPTION, Some(body)) => match serde_json::from_slice::<Subscription>(&body) {
                    Ok(subscription) => {
                        self.inner
                            .subscriptions
                            .insert(subscription.id.clone(), subscription);
                    }
                    Err(error) => {
                        tracing::error!(%error, "a stored subscription could not be read")
                    }
                },
                (SUBSCRIPTION, None) => {
                    self.inner.subscriptions.remove(&document.id);
                }
                (DELIVERY, Some(body)) => match serde_json::from_slice::<Delivery>(&body) {
                    Ok(delivery) => {
                        if delivery.status == DeliveryStatus::Pending {
                            added = true;
                            self.inner.pending.insert(delivery.id.clone());
                        } else {
                            self.inner.pending.remove(&delivery.id);
                        }
                        self.inner.deliveries.insert(delivery.id.clone(), delivery);
                    }
                    Err(error) => tracing::error!(%error, "a stored delivery could not be read"),
                },
                (DELIVERY, None) => {
                    self.inner.pending.remove(&document.id);
                    self.inner.deliveries.remove(&document.id);
                }
                (kind, _) => tracing::warn!(document.kind = kind, "unknown document kind ignored"),
            }
        }
        if added {
            self.inner.added.notify_one();
        }
    }

    /// Loaded rows: (kind, id, body).
    pub fn restore(&self, rows: Vec<(String, String, Vec<u8>)>) {
        let documents = rows.into_iter().filter_map(|(kind, id, body)| {
            let kind = [SUBSCRIPTION, DELIVERY].into_iter().find(|k| *k == kind)?;
            Some(Document {
                kind,
                id,
                body: Some(body),
            })
        });
        self.apply(documents);
    }

    /// Waits until a delivery is committed (or was since the last wait).
    pub async fn added(&self) {
        self.inner.added.notified().await;
    }

    pub fn subscription(&self, id: &str) -> Option<Subscription> {
        self.inner.subscriptions.get(id).map(|entry| entry.clone())
    }

    pub fn subscriptions(&self) -> Vec<Subscription> {
        let mut all: Vec<Subscription> = self
            .inner
            .subscriptions
            .iter()
            .map(|entry| entry.clone())
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub fn subscription_count(&self) -> usize {
        self.inner.subscriptions.len()
    }

    pub fn delivery(&self, id: &str) -> Option<Delivery> {
        self.inner.deliveries.get(id).map(|entry| entry.clone())
    }

    /// A subscription's deliveries, newest first, at most `limit`.
    pub fn deliveries_of(&self, subscription: &str, limit: usize) -> Vec<Delivery> {
        let mut found: Vec<Delivery> = self
            .inner
            .deliveries
            .iter()
            .filter(|entry| entry.subscription.as_deref() == Some(subscription))
            .map(|entry| entry.clone())
            .collect();
        found.sort_by(|a, b| b.id.cmp(&a.id));
        found.truncate(limit);
        found
    }

    /// `look` at every pending delivery, found through the pending index (nothing copied).
    fn each_pending(&self, mut look: impl FnMut(&Delivery)) {
        for id in self.inner.pending.iter() {
            if let Some(delivery) = self.inner.deliveries.get(id.key())
                && delivery.status == DeliveryStatus::Pending
            {
                look(&delivery);
            }
        }
    }

    /// Pending deliveries due by `now`, oldest first, at most `limit`.
    pub fn due(&self, now: OffsetDateTime, limit: usize) -> Vec<Delivery> {
        let mut due_ids = Vec::new();
        self.each_pending(|delivery| {
            if delivery.next_attempt_date_time.is_none_or(|at| at <= now) {
                due_ids.push(delivery.id.clone());
            }
        });
        due_ids.sort();
        due_ids.truncate(limit);
        due_ids.iter().filter_map(|id| self.delivery(id)).collect()
    }

    /// Pending deliveries, and the creation time of the oldest.
    pub fn pending(&self) -> (usize, Option<OffsetDateTime>) {
        let (mut count, mut oldest) = (0, None::<OffsetDateTime>);
        self.each_pending(|delivery| {
            count += 1;
            let created = delivery.created_date_time;
            oldest = Some(oldest.map_or(created, |o| o.min(created)));
        });
        (count, oldest)
    }

    /// The earliest next attempt of a pending delivery.
    pub fn next_due(&self) -> Option<OffsetDateTime> {
        let mut next = None::<OffsetDateTime>;
        self.each_pending(|delivery| {
            if let Some(at) = delivery.next_attempt_date_time {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        });
        next
    }

    /// Finished deliveries older than `before`, to forget.
    pub fn finished_before(&self, before: OffsetDateTime) -> Vec<String> {
        self.inner
            .deliveries
            .iter()
            .filter(|entry| {
                entry.status != DeliveryStatus::Pending
                    && entry
                        .attempts
                        .last()
                        .map_or(entry.created_date_time, |a| a.date_time)
                        < before
            })
            .map(|entry| entry.id.clone())
            .collect()
    }

    /// The deliveries a change of `operation` (its public JSON `json`) causes: one per
    /// enabled subscription that matches, and its own `notify` when it settled.
    pub fn deliveries_for(
        &self,
        operation: &Operation,
        notify: Option<&NotifyTarget>,
        settled: bool,
        json: &str,
        now: OffsetDateTime,
    ) -> Vec<Delivery> {
        let mut deliveries = Vec::new();
        let deadline = now
            + self
                .inner
                .retry_total
                .get()
                .copied()
                .unwrap_or(time::Duration::DAY);
        let new = |event_type: &str,
                   subscription: Option<String>,
                   url: Option<String>,
                   secret: Option<String>| Delivery {
            id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
            subscription,
            url,
            secret,
            event_type: event_type.to_owned(),
            operation_id: operation.id,
            payload: payload(event_type, now, json),
            created_date_time: now,
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
            attempt_count: 0,
            next_attempt_date_time: None,
            deadline,
        };
        for subscription in self.inner.subscriptions.iter() {
            if subscription.disabled || !subscription.filter.matches(operation) {
                continue;
            }
            for event_type in EVENT_TYPES {
                let wanted = subscription.event_types.iter().any(|t| t == event_type);
                if wanted && (settled || event_type == OPERATION_CHANGED) {
                    deliveries.push(new(event_type, Some(subscription.id.clone()), None, None));
                }
            }
        }
        if settled {
            match notify {
                Some(NotifyTarget::Url { url, secret }) => {
                    deliveries.push(new(
                        OPERATION_SETTLED,
                        None,
                        Some(url.clone()),
                        secret.clone(),
                    ));
                }
                Some(NotifyTarget::Subscription(id)) => {
                    deliveries.push(new(OPERATION_SETTLED, Some(id.clone()), None, None));
                }
                None => {}
            }
        }
        deliveries
    }
}

/// A delivery's body, per the Standard Webhooks payload structure.
fn payload(event_type: &str, now: OffsetDateTime, json: &str) -> String {
    let timestamp = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(r#"{{"type":"{event_type}","timestamp":"{timestamp}","data":{json}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(id: &str, filter: SubscriptionFilter, types: &[&str]) -> Subscription {
        Subscription {
            id: id.into(),
            url: "https://example.com/hook".into(),
            filter,
            event_types: types.iter().map(|t| (*t).to_owned()).collect(),
            secret: "whsec_AAAA".into(),
            created_date_time: OffsetDateTime::now_utc(),
            disabled: false,
            disabled_reason: None,
            failing_since: None,
        }
    }

    #[test]
    fn a_change_becomes_one_delivery_per_matching_subscription_and_event_type() {
        let outbox = Outbox::new(std::time::Duration::from_secs(60));
        let calls_a = SubscriptionFilter {
            call_connection_id: Some("a".into()),
            context_prefix: Some("job-".into()),
            ..SubscriptionFilter::default()
        };
        outbox.apply([
            subscription("sub_1", calls_a, &[OPERATION_SETTLED]).document(),
            subscription("sub_2", SubscriptionFilter::default(), &EVENT_TYPES).document(),
        ]);
        let mut operation = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("a".into()),
            "job-7".into(),
            OffsetDateTime::now_utc(),
        );
        let now = OffsetDateTime::now_utc();
        let running = outbox.deliveries_for(&operation, None, false, "{}", now);
        assert_eq!(running.len(), 1, "only sub_2 hears every change");
        assert_eq!(running[0].event_type, OPERATION_CHANGED);
        operation.status = OperationStatus::Succeeded;
        let notify = NotifyTarget::Url {
            url: "https://example.com/op".into(),
            secret: None,
        };
        let settled = outbox.deliveries_for(&operation, Some(&notify), true, "{\"id\":1}", now);
        let mut kinds: Vec<(Option<&str>, &str)> = settled
            .iter()
            .map(|d| (d.subscription.as_deref(), d.event_type.as_str()))
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                (None, OPERATION_SETTLED),
                (Some("sub_1"), OPERATION_SETTLED),
                (Some("sub_2"), OPERATION_CHANGED),
                (Some("sub_2"), OPERATION_SETTLED),
            ]
        );
        assert!(settled[0].payload.ends_with(r#""data":{"id":1}}"#));
        let other_context = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("a".into()),
            "other".into(),
            now,
        );
        assert!(
            !outbox
                .deliveries_for(&other_context, None, true, "{}", now)
                .iter()
                .any(|d| d.subscription.as_deref() == Some("sub_1"))
        );
    }
}
