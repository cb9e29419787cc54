//! The seam's changes as shared-store transitions: each reads what it may touch, runs the
//! same tracker code on a scratch store, and commits what changed (see [`RedisStore::transact`]).

use std::time::Duration;

use time::OffsetDateTime;

use super::keys::upstream_park_name;
use super::{Committed, RedisStore, RedisStoreError, Want, event};
use crate::correlation::{Delivery, IncomingEvent, upstream_key};
use crate::operation::{Operation, OperationId, Transition};
use crate::store::tracker::{Noted, unix_millis};

/// Most unsent operations one claim looks at.
const CLAIM_BATCH: usize = 100;
use crate::reconcile::Conclusion;
use crate::store::seam::{
    CallEnd, CreateError, Delivered, Inbound, StoreError, UpstreamAnswer, call_terminated,
};

impl RedisStore {
    /// Adds `operation`, claiming its context in Redis.
    pub(crate) async fn create(&self, operation: Operation) -> Result<Operation, CreateError> {
        let want = Want::context(&operation.call, &operation.context);
        // Listed before it exists, so a replica dying after the commit leaves it findable;
        // an entry whose creation failed is dropped by the claim.
        if operation.pending.is_some() {
            let keys = &self.inner.keys;
            let _: () = self
                .query({
                    let mut pipe = redis::pipe();
                    pipe.cmd("ZADD")
                        .arg(keys.unsent(keys.of(operation.id)))
                        .arg(unix_millis(operation.created_date_time))
                        .arg(operation.id.to_string())
                        .ignore();
                    pipe
                })
                .await?;
        }
        let created = self
            .transact(&want, |scratch, _| scratch.create(operation.clone()))
            .await?;
        match created {
            Committed::Done(created) => Ok(created?),
            // A new operation carries no event id.
            Committed::Duplicate => Err(RedisStoreError::Unexpected("dup".to_owned()).into()),
        }
    }

    pub(crate) async fn record_answer(
        &self,
        id: OperationId,
        upstream: Option<UpstreamAnswer>,
        transition: Transition,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut want = Want::operation(id);
        // Notifications that named it by one of these ids before the answer came.
        let parks: Vec<String> = upstream
            .iter()
            .flat_map(|upstream| &upstream.ids)
            .map(|upstream_id| upstream_park_name(&upstream_key(upstream_id)))
            .collect();
        want.contexts.extend(parks.iter().cloned());
        self.transact(&want, |scratch, outcome| {
            if let Some(upstream) = &upstream {
                let ids: Vec<&str> = upstream.ids.iter().map(String::as_str).collect();
                scratch.record_upstream(id, &ids, upstream.status.as_deref());
                outcome.parks_applied.clone_from(&parks);
                // Every name Graph gave it finds it (the first is on the operation).
                outcome.upstream_ids.extend(
                    upstream
                        .ids
                        .iter()
                        .skip(1)
                        .map(|upstream_id| (upstream_key(upstream_id).into(), id)),
                );
            }
            scratch.answered(id);
            scratch.transition(id, transition.clone(), now);
        })
        .await?;
        self.forget_unsent(&[id]).await?;
        Ok(())
    }

    /// Applies a reconciliation's conclusion, if the operation is still reconciling (the
    /// commit checks its revision: a callback applied meanwhile wins).
    pub(crate) async fn reconciled(
        &self,
        id: OperationId,
        conclusion: &Conclusion,
        now: OffsetDateTime,
    ) -> Result<bool, RedisStoreError> {
        let committed = self
            .transact(&Want::operation(id), |scratch, _| {
                scratch.reconciled(id, conclusion, now) == Some(true)
            })
            .await?;
        Ok(committed == Committed::Done(true))
    }

    /// Claims, for `lease`, operations listed as unsent for longer than `lease`.
    pub(crate) async fn claim_unsent(
        &self,
        lease: Duration,
    ) -> Result<Vec<Operation>, RedisStoreError> {
        let keys = &self.inner.keys;
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let before = unix_millis(OffsetDateTime::now_utc()).saturating_sub(lease_ms);
        let listed: Vec<Vec<String>> = self
            .query_each(
                keys.each()
                    .map(|p| {
                        let mut command = redis::cmd("ZRANGEBYSCORE");
                        command
                            .arg(keys.unsent(p))
                            .arg("-inf")
                            .arg(before)
                            .arg("LIMIT")
                            .arg(0)
                            .arg(CLAIM_BATCH);
                        command
                    })
                    .collect(),
            )
            .await?;
        let ids: Vec<OperationId> = listed
            .iter()
            .flatten()
            .filter_map(|id| OperationId::parse(id))
            .take(CLAIM_BATCH)
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let claimed: Vec<Option<String>> = self
            .query_each(
                ids.iter()
                    .map(|id| {
                        let mut command = redis::cmd("SET");
                        command
                            .arg(keys.lease(*id))
                            .arg(1)
                            .arg("NX")
                            .arg("PX")
                            .arg(lease_ms.max(1));
                        command
                    })
                    .collect(),
            )
            .await?;
        let claimed: Vec<OperationId> = ids
            .into_iter()
            .zip(claimed)
            .filter_map(|(id, won)| won.map(|_| id))
            .collect();
        let mut owed = Vec::new();
        let mut done = Vec::new();
        for (id, operation) in claimed.iter().zip(self.operations(&claimed).await?) {
            match operation {
                Some(operation) if operation.pending.is_some() => owed.push(operation),
                _ => done.push(*id),
            }
        }
        self.forget_unsent(&done).await?;
        Ok(owed)
    }

    async fn forget_unsent(&self, ids: &[OperationId]) -> Result<(), RedisStoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let keys = &self.inner.keys;
        let _: Vec<u64> = self
            .query_each(
                ids.iter()
                    .map(|id| {
                        let mut command = redis::cmd("ZREM");
                        command.arg(keys.unsent(keys.of(*id))).arg(id.to_string());
                        command
                    })
                    .collect(),
            )
            .await?;
        Ok(())
    }

    /// One transition per event, each written before the next, so a redelivered event is
    /// a duplicate alone and a failure part-way leaves the rest to the redelivery. An event
    /// for a known operation takes the common path (`event.rs`); anything else, or what
    /// that path finds is not the common case, the general transition.
    pub(crate) async fn deliver(
        &self,
        events: Vec<Inbound>,
        observe: &mut (dyn FnMut(usize, &Delivered) + Send),
    ) -> Result<(), StoreError> {
        for (index, Inbound { incoming, ended }) in events.into_iter().enumerate() {
            let common = if event::is_common(&incoming, ended.is_some()) {
                self.deliver_common(&incoming).await?
            } else {
                None
            };
            let delivered = match common {
                Some(delivery) => Delivered {
                    delivery,
                    failed: Vec::new(),
                },
                None => self.deliver_general(incoming, ended).await?,
            };
            observe(index, &delivered);
        }
        Ok(())
    }

    /// Delivers one event by the general transition (on a scratch store).
    pub(super) async fn deliver_general(
        &self,
        incoming: IncomingEvent,
        ended: Option<CallEnd>,
    ) -> Result<Delivered, RedisStoreError> {
        let want = Want::event(&incoming, incoming.cancelled || ended.is_some());
        let now = tokio::time::Instant::now();
        let committed = self
            .transact(&want, |scratch, outcome| {
                outcome.seen.extend(incoming.id.clone());
                let delivery = scratch.deliver_noting(incoming.clone(), now, &mut |noted| {
                    // Evicted ids stay remembered: Redis keeps every seen id on its own.
                    if let Noted::Parked(event) = noted {
                        outcome.parked.push(event.clone());
                    }
                });
                let failed = match &ended {
                    Some(CallEnd {
                        call, grace: true, ..
                    }) => {
                        scratch.end_call_after_grace(call, OffsetDateTime::now_utc());
                        Vec::new()
                    }
                    Some(CallEnd { call, result, .. }) => scratch.end_call(
                        call,
                        result.clone(),
                        &call_terminated(),
                        OffsetDateTime::now_utc(),
                    ),
                    None => Vec::new(),
                };
                Delivered { delivery, failed }
            })
            .await?;
        Ok(match committed {
            Committed::Done(done) => done,
            Committed::Duplicate => Delivered {
                delivery: Delivery::Duplicate,
                failed: Vec::new(),
            },
        })
    }
}
