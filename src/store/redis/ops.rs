//! The seam's changes as shared-store transitions: each reads what it may touch, runs the
//! same tracker code on a scratch store, and commits what changed (see [`RedisStore::transact`]).

use time::OffsetDateTime;

use super::{Committed, RedisStore, RedisStoreError, Want};
use crate::correlation::{Delivery, upstream_key};
use crate::operation::{Operation, OperationId, Transition};
use crate::store::seam::{
    CreateError, Delivered, Inbound, StoreError, UpstreamAnswer, call_terminated,
};

impl RedisStore {
    /// Adds `operation`, claiming its context in Redis.
    pub(crate) async fn create(&self, operation: Operation) -> Result<Operation, CreateError> {
        let want = Want::context(&operation.call, &operation.context);
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
        self.transact(&Want::operation(id), |scratch, outcome| {
            if let Some(upstream) = &upstream {
                let ids: Vec<&str> = upstream.ids.iter().map(String::as_str).collect();
                scratch.record_upstream(id, &ids, upstream.status.as_deref());
                // Every name Graph gave it finds it (the first is on the operation).
                outcome.upstream_ids.extend(
                    upstream
                        .ids
                        .iter()
                        .skip(1)
                        .map(|upstream_id| (upstream_key(upstream_id).into(), id)),
                );
            }
            scratch.transition(id, transition.clone(), now);
        })
        .await?;
        Ok(())
    }

    /// One transition per event, each written before the next, so a redelivered event is
    /// a duplicate alone and a failure part-way leaves the rest to the redelivery.
    pub(crate) async fn deliver(
        &self,
        events: Vec<Inbound>,
        observe: &mut (dyn FnMut(usize, &Delivered) + Send),
    ) -> Result<(), StoreError> {
        for (index, Inbound { incoming, ended }) in events.into_iter().enumerate() {
            let want = Want::event(&incoming, incoming.cancelled || ended.is_some());
            let now = tokio::time::Instant::now();
            let committed = self
                .transact(&want, |scratch, outcome| {
                    outcome.seen.extend(incoming.id.clone());
                    let delivery = scratch.deliver_noting(incoming.clone(), now, &mut |event| {
                        outcome.parked.push(event.clone());
                    });
                    let failed = match &ended {
                        Some((call, result)) => scratch.end_call(
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
            let delivered = match committed {
                Committed::Done(done) => done,
                Committed::Duplicate => Delivered {
                    delivery: Delivery::Duplicate,
                    failed: Vec::new(),
                },
            };
            observe(index, &delivered);
        }
        Ok(())
    }
}
