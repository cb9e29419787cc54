//! The change log on a shared store, and this replica's copy of it. Every transition that
//! changes operations appends their change-feed rows and the webhook deliveries they cause
//! to one stream (`log.lua`, in the same script as the change), numbered by an `INCR`;
//! documents are also kept whole in a hash. Each replica loads the hash and the stream at
//! start and tails the stream (`XREAD BLOCK`) into its [`Feed`] and [`Outbox`], so every
//! replica streams every change and sees every delivery. Which replica sends a delivery is
//! decided by a lease ([`RedisStore::lease_delivery`]).

use std::time::Duration;

use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::keys::Partition;
use super::{RedisStore, RedisStoreError};
use crate::config::{StreamConfig, WebhooksConfig};
use crate::operation::Operation;
use crate::store::feed::{self, Feed};
use crate::store::journal::Document;
use crate::store::outbox::{self, Delivery, Outbox};
use crate::store::tracker::unix_millis;

/// This replica's copy of the change log.
pub(in crate::store) struct Mirror {
    pub feed: Feed,
    pub outbox: Outbox,
    /// The stream is trimmed to about this many entries.
    cap: usize,
    /// The stream entry the tail starts after, per partition.
    start: Vec<String>,
}

/// Entries read from the stream at a time.
const READ_COUNT: usize = 512;

impl RedisStore {
    /// Loads the documents and the change log, and keeps them from then on (with
    /// [`RedisStore::run_log`]). Once; later calls do nothing.
    pub async fn open_mirror(
        &self,
        stream: &StreamConfig,
        webhooks: &WebhooksConfig,
    ) -> Result<(), RedisStoreError> {
        let keys = &self.inner.keys;
        let feed = Feed::new(
            Duration::from_secs(stream.retention_secs),
            stream.max_changes,
        );
        let outbox = Outbox::new(Duration::from_secs(webhooks.retry_total_secs));
        let mut connection = self.inner.connection.clone();
        let mut rows = Vec::new();
        let mut start = Vec::new();
        let mut last_number = 0;
        let mut documents: Vec<(String, Vec<u8>)> = Vec::new();
        for p in keys.each() {
            let range: StreamRangeReply = self
                .bounded(
                    redis::cmd("XRANGE")
                        .arg(keys.log(p))
                        .arg("-")
                        .arg("+")
                        .query_async(&mut connection),
                )
                .await?;
            if keys.partitions() == 1 {
                let last_seq: Option<u64> = self
                    .bounded(
                        redis::cmd("GET")
                            .arg(keys.log_seq(p))
                            .query_async(&mut connection),
                    )
                    .await?;
                last_number = last_number.max(last_seq.unwrap_or(0));
            }
            let mut kept: Vec<(String, Vec<u8>)> = self
                .bounded(
                    redis::cmd("HGETALL")
                        .arg(keys.documents(p))
                        .query_async(&mut connection),
                )
                .await?;
            documents.append(&mut kept);
            start.push(
                range
                    .ids
                    .last()
                    .map_or_else(|| "0-0".to_owned(), |entry| entry.id.clone()),
            );
            rows.extend(range.ids.iter().filter_map(change_row));
        }
        outbox.restore(
            documents
                .into_iter()
                .filter_map(|(field, body)| {
                    let (kind, id) = field.split_once(':')?;
                    Some((kind.to_owned(), id.to_owned(), body))
                })
                .collect(),
        );
        // Several partitions' logs, merged in number order.
        rows.sort_unstable_by_key(|row| row.0);
        last_number = last_number.max(rows.last().map_or(0, |row| row.0));
        feed.restore(rows, last_number);
        // Document entries share the stream: room for them beside the changes.
        let cap = stream.max_changes.saturating_mul(2).max(1000);
        let _ = self.inner.mirror.set(Mirror {
            feed,
            outbox,
            cap: (cap / usize::from(keys.partitions())).max(1000),
            start,
        });
        Ok(())
    }

    pub(in crate::store) fn mirror(&self) -> Option<&Mirror> {
        self.inner.mirror.get()
    }

    /// Tails the change log into the mirror until `stop`, on a connection of its own (a
    /// blocking read would hold up the shared one); reconnects with backoff.
    pub async fn run_log(self, stop: CancellationToken) {
        let Some(mirror) = self.mirror() else {
            return;
        };
        if self.inner.keys.partitions() > 1 {
            return self.run_partitioned_log(stop).await;
        }
        let log = self.inner.keys.log(0);
        let mut last = mirror.start[0].clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let connection = tokio::select! {
                () = stop.cancelled() => return,
                connection = self.inner.connector.dedicated() => connection,
            };
            let mut connection = match connection {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::warn!(%error, "change log: cannot connect; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                let mut command = redis::cmd("XREAD");
                command
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&log)
                    .arg(&last);
                let read = command.query_async::<Option<StreamReadReply>>(&mut connection);
                let reply = tokio::select! {
                    () = stop.cancelled() => return,
                    reply = read => reply,
                };
                match reply {
                    Ok(Some(reply)) => {
                        for key in reply.keys {
                            if let Some(newest) = key.ids.last() {
                                last.clone_from(&newest.id);
                            }
                            apply(mirror, &key.ids);
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%error, "change log: read failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }

    /// Tails every partition's log (several partitions). Each round reads, per partition,
    /// the entries after its cursor together with Redis's clock there (`tail.lua`, one
    /// atomic read): every later entry of that partition is numbered from that time on. The
    /// entries below the smallest such bound are complete, and go to the mirror in number
    /// order, so every replica shows every change in one order and `Last-Event-ID` resumes
    /// on any of them.
    async fn run_partitioned_log(self, stop: CancellationToken) {
        let Some(mirror) = self.mirror() else {
            return;
        };
        let keys = &self.inner.keys;
        let mut cursors = mirror.start.clone();
        let mut pending: std::collections::BTreeMap<u64, StreamId> = Default::default();
        let mut failing = false;
        loop {
            let connection = &self.inner.connection;
            let reads = keys.each().map(|p| {
                let mut invocation = self.inner.tail.key(keys.log(p));
                invocation.arg(&cursors[usize::from(p)]).arg(READ_COUNT);
                let mut connection = connection.clone();
                async move {
                    invocation
                        .invoke_async::<(u64, StreamRangeReply)>(&mut connection)
                        .await
                }
            });
            let round = tokio::select! {
                () = stop.cancelled() => return,
                round = self.bounded_all(futures_util::future::join_all(reads)) => round,
            };
            let mut bound = u64::MAX;
            let mut read_any = false;
            match round {
                Ok(answers) => {
                    if failing {
                        failing = false;
                        tracing::info!("change log: reading again");
                    }
                    for (p, answer) in answers.into_iter().enumerate() {
                        let (now_ms, range) = match answer {
                            Ok(answer) => answer,
                            Err(error) => {
                                bound = 0;
                                if !failing {
                                    tracing::warn!(%error, "change log: a partition's read failed; retrying");
                                }
                                failing = true;
                                continue;
                            }
                        };
                        bound = bound.min(now_ms << NUMBER_SHIFT);
                        if let Some(newest) = range.ids.last() {
                            cursors[p].clone_from(&newest.id);
                        }
                        read_any |= range.ids.len() == READ_COUNT;
                        for entry in range.ids {
                            if let Some(number) = entry_number(&entry.id) {
                                pending.insert(number, entry);
                            }
                        }
                    }
                }
                Err(error) => {
                    bound = 0;
                    if !failing {
                        tracing::warn!(%error, "change log: read failed; retrying");
                    }
                    failing = true;
                }
            }
            // What is below every partition's bound is complete: to the mirror, in order.
            let rest = pending.split_off(&bound);
            let ready: Vec<StreamId> = std::mem::replace(&mut pending, rest)
                .into_values()
                .collect();
            if !ready.is_empty() {
                apply(mirror, &ready);
            }
            if !read_any {
                let pause = if failing { POLL_FAILING } else { POLL_IDLE };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// `futures`, within the configured timeout.
    async fn bounded_all<T>(
        &self,
        futures: impl std::future::Future<Output = T>,
    ) -> Result<T, RedisStoreError> {
        tokio::time::timeout(self.inner.timeout, futures)
            .await
            .map_err(|_| RedisStoreError::Timeout(self.timeout_ms()))
    }

    /// The arguments `log.lua` takes for `operations` of partition `p` as a transition
    /// writes them: a change row each and the deliveries each causes. Empty without a
    /// mirror.
    pub(super) fn log_args<'a>(
        &self,
        p: Partition,
        operations: impl Iterator<Item = &'a Operation>,
        now: OffsetDateTime,
    ) -> Vec<Vec<u8>> {
        let Some(mirror) = self.mirror() else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        let mut deliveries: Vec<Delivery> = Vec::new();
        for operation in operations {
            // A copy freshly read from Redis: a settle recorded on it happened in this
            // transition.
            let settled = operation.announced.settled_revision > 0;
            let notify = operation.notify.clone();
            let public = operation.clone().public();
            let Ok(json) = serde_json::to_string(&public) else {
                continue;
            };
            changes.push(feed::row(public.revision, settled, &json));
            deliveries.extend(mirror.outbox.deliveries_for(
                &public,
                notify.as_deref(),
                settled,
                &json,
                now,
            ));
        }
        let documents = deliveries.iter().map(Delivery::document).collect();
        self.document_args(p, changes, documents, now)
    }

    fn document_args(
        &self,
        p: Partition,
        changes: Vec<Vec<u8>>,
        documents: Vec<Document>,
        now: OffsetDateTime,
    ) -> Vec<Vec<u8>> {
        let Some(mirror) = self.mirror() else {
            return Vec::new();
        };
        if changes.is_empty() && documents.is_empty() {
            return Vec::new();
        }
        let keys = &self.inner.keys;
        let mut args = vec![
            keys.log(p).into_bytes(),
            keys.log_seq(p).into_bytes(),
            keys.documents(p).into_bytes(),
            mirror.cap.to_string().into_bytes(),
            unix_millis(now).to_string().into_bytes(),
            // One partition numbers its entries by INCR; several by Redis's clock.
            if keys.partitions() == 1 {
                Vec::new()
            } else {
                p.to_string().into_bytes()
            },
            changes.len().to_string().into_bytes(),
        ];
        args.extend(changes);
        for document in documents {
            args.push(format!("{}:{}", document.kind, document.id).into_bytes());
            args.push(document.body.unwrap_or_default());
        }
        args
    }

    /// Writes `documents` (and logs them for every replica); this replica's mirror has
    /// them when this returns.
    pub async fn write_documents(&self, documents: Vec<Document>) -> Result<(), RedisStoreError> {
        let Some(mirror) = self.mirror() else {
            return Ok(());
        };
        let keys = &self.inner.keys;
        let mut by_partition: std::collections::BTreeMap<Partition, Vec<Document>> =
            Default::default();
        for document in &documents {
            match self.document_partition(document) {
                Some(p) => by_partition.entry(p).or_default().push(document.clone()),
                // A delivery deleted: wherever it is.
                None => {
                    for p in keys.each() {
                        by_partition.entry(p).or_default().push(document.clone());
                    }
                }
            }
        }
        for (p, documents) in by_partition {
            let args = self.document_args(p, Vec::new(), documents, OffsetDateTime::now_utc());
            if args.is_empty() {
                continue;
            }
            let route = keys.log(p);
            let mut invocation = self.inner.documents.key(&route);
            for arg in &args {
                invocation.arg(arg.as_slice());
            }
            let mut connection = self.inner.connection.clone();
            let _: String = self
                .bounded(invocation.invoke_async(&mut connection))
                .await?;
            self.replicated(&mut connection, &route).await?;
        }
        // The tail applies them again, in log order, with whatever came between.
        mirror.outbox.apply(documents);
        Ok(())
    }

    /// The partition a document lives in: subscriptions in partition 0, a delivery in its
    /// operation's (`None`: a deleted delivery, whose operation is not known here).
    fn document_partition(&self, document: &Document) -> Option<Partition> {
        let keys = &self.inner.keys;
        if keys.partitions() == 1 || document.kind != outbox::DELIVERY {
            return Some(0);
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Owner {
            operation_id: crate::operation::OperationId,
        }
        let body = document.body.as_deref()?;
        let owner: Owner = serde_json::from_slice(body).ok()?;
        Some(keys.of(owner.operation_id))
    }

    /// True when this replica may attempt delivery `id` now: no other holds it (`SET NX`
    /// with an expiry of `ttl`).
    pub async fn lease_delivery(&self, id: &str, ttl: Duration) -> Result<bool, RedisStoreError> {
        let mut connection = self.inner.connection.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let taken: Option<String> = self
            .bounded(
                redis::cmd("SET")
                    .arg(self.inner.keys.delivery_lease(id))
                    .arg("1")
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut connection),
            )
            .await?;
        Ok(taken.is_some())
    }

    /// Gives up delivery `id`'s lease (its attempt's outcome is stored).
    pub async fn release_delivery(&self, id: &str) -> Result<(), RedisStoreError> {
        let mut connection = self.inner.connection.clone();
        let _: i64 = self
            .bounded(
                redis::cmd("DEL")
                    .arg(self.inner.keys.delivery_lease(id))
                    .query_async(&mut connection),
            )
            .await?;
        Ok(())
    }

    /// `future`, within the configured timeout.
    async fn bounded<T>(
        &self,
        future: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisStoreError> {
        match tokio::time::timeout(self.inner.timeout, future).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisStoreError::Timeout(self.timeout_ms())),
        }
    }
}

/// Bits below a partitioned log entry's millisecond in its number: 10 for the partition,
/// 12 for the entries within one millisecond.
const NUMBER_SHIFT: u32 = 22;
/// Entry ids below this millisecond are a single partition's `INCR` numbers.
const FIRST_CLOCK_MS: u64 = 1_000_000_000_000;
/// How long a partitioned tail waits after a round that found nothing new.
const POLL_IDLE: Duration = Duration::from_millis(20);
const POLL_FAILING: Duration = Duration::from_millis(500);

/// A log entry's change number: its `INCR` number (`n-0`, one partition), or its
/// millisecond and the partition's count within it (`ms-x`, several).
fn entry_number(id: &str) -> Option<u64> {
    let (high, low) = id.split_once('-')?;
    let high: u64 = high.parse().ok()?;
    let low: u64 = low.parse().ok()?;
    if high < FIRST_CLOCK_MS {
        return Some(high);
    }
    Some((high << NUMBER_SHIFT) | (low & ((1 << NUMBER_SHIFT) - 1)))
}

/// A change row from a log entry: (number, unix ms, body); `None` for a document entry.
fn change_row(entry: &StreamId) -> Option<(u64, i64, Vec<u8>)> {
    if entry.get::<String>("t").as_deref() != Some("c") {
        return None;
    }
    let number = entry_number(&entry.id)?;
    let at_ms = entry.get::<i64>("at").unwrap_or(0);
    Some((number, at_ms, entry.get::<Vec<u8>>("b")?))
}

/// Applies log entries, in order, to the mirror.
fn apply(mirror: &Mirror, entries: &[StreamId]) {
    let mut rows = Vec::new();
    let mut documents = Vec::new();
    for entry in entries {
        if let Some(row) = change_row(entry) {
            rows.push(row);
            continue;
        }
        let Some(field) = entry.get::<String>("k") else {
            continue;
        };
        let Some((kind, id)) = field.split_once(':') else {
            continue;
        };
        let Some(kind) = [outbox::SUBSCRIPTION, outbox::DELIVERY]
            .into_iter()
            .find(|known| *known == kind)
        else {
            continue;
        };
        let body = entry.get::<Vec<u8>>("b").filter(|body| !body.is_empty());
        documents.push(Document {
            kind,
            id: id.to_owned(),
            body,
        });
    }
    mirror.outbox.apply(documents);
    // Rows come in number order; one below what the feed shows already (a Redis clock that
    // stepped back) would break that order, and is left out.
    let head = mirror.feed.head();
    rows.retain(|row| row.0 > head);
    mirror.feed.push(rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_numbers_keep_one_order_across_both_numberings() {
        // One partition: the INCR number as it is.
        assert_eq!(entry_number("5-0"), Some(5));
        // Several: the millisecond, then the partition and the count within it.
        let ms = 1_796_545_348_000_u64;
        let first = entry_number(&format!("{ms}-{}", 3 * 4096)).unwrap();
        let second = entry_number(&format!("{ms}-{}", 3 * 4096 + 1)).unwrap();
        let other_partition = entry_number(&format!("{ms}-{}", 7 * 4096)).unwrap();
        let next_ms = entry_number(&format!("{}-0", ms + 1)).unwrap();
        assert!(5 < first && first < second && second < other_partition);
        assert!(other_partition < next_ms);
        assert_eq!(first >> NUMBER_SHIFT, ms);
        assert_eq!(entry_number("x-1"), None);
    }
}
