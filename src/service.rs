//! `OperationService`: the only code that uses both the upstream clients and the store.
//!
//! Starting an operation creates its record first (so a fast callback finds it), then sends
//! the upstream request on a tracked background task, so the client's 202 never waits on
//! ACS and a client that disconnects cannot cancel a half-sent request. Callbacks are turned
//! into platform-neutral [`IncomingEvent`]s and handed to the store.
//!
//! Durability: every change is also written to the journal through the [`Recorder`]
//! before the client hears of it (a new operation before its 202, a callback before its
//! 2xx); upstream answers and sweeps are written as they happen.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::acs::client::{AcsClient, AcsError, RemoveParticipant, Repeatability};
use crate::acs::events::AcsEvent;
use crate::acs::identifier::{CommunicationIdentifier, IdentifierError};
use crate::correlation::{IncomingEvent, upstream_key};
use crate::graph::client::{CancelAnswer, GraphClient, GraphError};
use crate::graph::ids;
use crate::graph::notifications::GraphEvent;
use crate::journal::{JournalError, JournalStats};
use crate::metrics::{self, EventOutcome, Metrics};
use crate::operation::{
    CallRef, Operation, OperationError, OperationId, OperationKind, ResultInfo, Transition,
};
use crate::persistence::{Changes, Recorder};
use crate::redis_store::{Committed, RedisStore, RedisStoreError, Want};
use crate::store::{ContextInUse, Delivery, ListFilter, OperationStore, StoreStats, SweepReport};
use crate::trace_context::TraceParent;
use crate::upstream::TransientError;

/// The longest operationContext accepted from a client.
pub const MAX_CONTEXT_LEN: usize = 512;

/// The longest clientContext Graph accepts.
pub const MAX_CLIENT_CONTEXT_LEN: usize = 256;

/// Starts operations and applies callbacks. A cheap handle: handlers get a copy per
/// request, so it is one reference count, not one per part.
#[derive(Clone)]
pub struct OperationService {
    parts: Arc<ServiceParts>,
}

impl std::ops::Deref for OperationService {
    type Target = ServiceParts;

    fn deref(&self) -> &ServiceParts {
        &self.parts
    }
}

/// What an [`OperationService`] is made of.
pub struct ServiceParts {
    /// The in-memory store (and its journal); unused when `shared` is set.
    store: OperationStore,
    recorder: Recorder,
    /// The store shared by every replica (Redis): the truth when set.
    shared: Option<RedisStore>,
    acs: AcsClient,
    graph: GraphClient,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    metrics: Metrics,
}

/// Where the service keeps state: the in-memory store and its journal, or (when `shared` is
/// set) the store shared by every replica.
pub struct Storage {
    pub store: OperationStore,
    pub recorder: Recorder,
    pub shared: Option<RedisStore>,
}

/// Why an operation could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("participantToRemove: {0}")]
    Participant(#[from] IdentifierError),
    #[error("operationContext must be 1 to {MAX_CONTEXT_LEN} characters")]
    Context,
    #[error("clientContext must be 1 to {MAX_CLIENT_CONTEXT_LEN} characters")]
    ClientContext,
    #[error(transparent)]
    Conflict(#[from] ContextInUse),
    /// The record could not be made durable; nothing was sent upstream.
    #[error("the operation could not be stored: {0}")]
    Store(#[from] StoreError),
}

/// The store could not take or give a record now (the client or sender should retry).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Shared(#[from] RedisStoreError),
}

impl From<JournalError> for StartError {
    fn from(error: JournalError) -> Self {
        Self::Store(error.into())
    }
}

impl From<RedisStoreError> for StartError {
    fn from(error: RedisStoreError) -> Self {
        Self::Store(error.into())
    }
}

/// A callback delivery whose effects could not be made durable (the sender should retry).
#[derive(Debug, thiserror::Error)]
#[error("the callback could not be stored: {0}")]
pub struct DeliveryError(#[from] StoreError);

impl From<JournalError> for DeliveryError {
    fn from(error: JournalError) -> Self {
        Self(error.into())
    }
}

impl From<RedisStoreError> for DeliveryError {
    fn from(error: RedisStoreError) -> Self {
        Self(error.into())
    }
}

/// How many events of a delivery ended which way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct DeliverySummary {
    pub received: usize,
    pub matched: usize,
    pub duplicates: usize,
    pub parked: usize,
    pub observed: usize,
    pub unmatched: usize,
}

impl OperationService {
    pub fn new(
        Storage {
            store,
            recorder,
            shared,
        }: Storage,
        acs: AcsClient,
        graph: GraphClient,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        Self {
            parts: Arc::new(ServiceParts {
                store,
                recorder,
                shared,
                acs,
                graph,
                tasks,
                shutdown,
                metrics,
            }),
        }
    }

    /// The journal's totals (zero in memory).
    pub fn journal_stats(&self) -> JournalStats {
        self.recorder.journal().stats()
    }

    /// How many Graph access tokens were requested.
    pub fn graph_token_fetches(&self) -> u64 {
        self.graph.tokens().fetches()
    }

    /// The store's counters (for a shared store: this replica's, and the store's sizes as
    /// last counted).
    pub fn store_stats(&self) -> StoreStats {
        match &self.shared {
            Some(shared) => shared.stats(),
            None => self.store.stats(),
        }
    }

    /// The shared store, when there is one.
    pub fn shared_store(&self) -> Option<&RedisStore> {
        self.shared.as_ref()
    }

    /// The events kept for a call.
    pub async fn call_events(
        &self,
        call: &CallRef,
    ) -> Result<Vec<crate::operation::EventRecord>, StoreError> {
        match &self.shared {
            Some(shared) => Ok(shared.call_events(call).await?),
            None => Ok(self.store.call_events(call).unwrap_or_default()),
        }
    }

    /// Whether the store can commit now, within `timeout`.
    pub async fn store_ready(&self, timeout: Duration) -> Result<(), String> {
        let probe = async {
            match &self.shared {
                Some(shared) => shared.probe().await.map_err(|error| error.to_string()),
                None => self
                    .recorder
                    .probe()
                    .await
                    .map_err(|error| error.to_string()),
            }
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(format!(
                "the store did not commit within {} ms",
                timeout.as_millis()
            )),
        }
    }

    /// Creates a Remove Participant operation and sends it to ACS in the background.
    #[tracing::instrument(skip_all, fields(call.connection_id = %call_connection_id, operation.id))]
    pub async fn start_remove_participant(
        &self,
        call_connection_id: String,
        participant: CommunicationIdentifier,
        operation_context: Option<String>,
        traceparent: Option<TraceParent>,
    ) -> Result<Operation, StartError> {
        let participant = participant.normalize()?;
        let context =
            context_or_generated(operation_context, MAX_CONTEXT_LEN).ok_or(StartError::Context)?;
        let operation = self
            .create(
                OperationKind::RemoveParticipant,
                CallRef::CallConnection(call_connection_id.clone()),
                &context,
            )
            .await?;
        let id = operation.id;
        let request = RemoveParticipant {
            call_connection_id,
            participant,
            operation_context: context,
            repeatability: Repeatability::new(),
            traceparent,
        };
        self.launch(operation, move |service| async move {
            service.dispatch(id, request).await;
        })
        .await
    }

    /// Creates the record (before anything is sent upstream) and names it in the span. In
    /// a shared store it is written here (claiming its context there); in memory,
    /// [`OperationService::launch`] writes it.
    async fn create(
        &self,
        kind: OperationKind,
        call: CallRef,
        context: &str,
    ) -> Result<Operation, StartError> {
        let operation = Operation::new(kind, call, context.to_owned(), OffsetDateTime::now_utc());
        let operation = match &self.shared {
            Some(shared) => {
                let want = Want::context(&operation.call, &operation.context);
                let created = shared
                    .transact(&want, |scratch, _| scratch.create(operation.clone()))
                    .await?;
                match created {
                    Committed::Done(created) => created?,
                    // A new operation carries no event id.
                    Committed::Duplicate => {
                        return Err(RedisStoreError::Unexpected("dup".to_owned()).into());
                    }
                }
            }
            None => self.store.create(operation)?,
        };
        tracing::Span::current().record("operation.id", tracing::field::display(operation.id));
        Ok(operation)
    }

    /// Makes the new record durable, then sends it upstream (`dispatch`), on one tracked
    /// task: the caller's `202` waits for the commit only, and a client that goes away
    /// meanwhile cannot leave a stored operation unsent. If the commit fails, the operation
    /// fails in memory too (so its context is free again) and nothing is sent.
    async fn launch<F, Fut>(
        &self,
        operation: Operation,
        dispatch: F,
    ) -> Result<Operation, StartError>
    where
        F: FnOnce(OperationService) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if self.shared.is_some() {
            // Already written by `create`.
            self.tasks.spawn(dispatch(self.clone()));
            tracing::info!("operation created");
            return Ok(operation);
        }
        let id = operation.id;
        let mut changes = self.recorder.changes();
        changes.operation(id);
        // Callbacks parked for it were applied: they are no longer parked.
        changes.unparked(operation.events.iter().map(|event| event.id.as_deref()));
        let (committed, outcome) = tokio::sync::oneshot::channel();
        let service = self.clone();
        let span = tracing::Span::current();
        self.tasks.spawn(async move {
            let result = service.recorder.commit(&service.store, changes).await;
            let stored = result.is_ok();
            if let Err(error) = &result {
                let _entered = span.enter();
                tracing::error!(%error, "the new operation could not be stored; not sent");
                let failed = Transition::Failed {
                    result: None,
                    error: OperationError {
                        code: "StoreUnavailable".to_owned(),
                        message: format!("the operation could not be stored: {error}"),
                    },
                };
                service
                    .store
                    .transition(id, failed, OffsetDateTime::now_utc());
            }
            let _ = committed.send(result);
            if stored {
                dispatch(service).await;
            }
        });
        match outcome.await {
            Ok(Ok(())) => {
                tracing::info!("operation created");
                Ok(operation)
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(StartError::from(JournalError::Closed)),
        }
    }

    /// Applies an upstream answer: what it said of the operation (Graph: its ids, the
    /// first shown, and status), then `transition`; writes it (nobody waits on it: a
    /// failure is logged).
    async fn apply_answer(
        &self,
        id: OperationId,
        upstream: Option<(Vec<String>, Option<String>)>,
        transition: Transition,
    ) {
        let apply = |store: &OperationStore| {
            if let Some((upstream_ids, status)) = &upstream {
                let upstream_ids: Vec<&str> = upstream_ids.iter().map(String::as_str).collect();
                store.record_upstream(id, &upstream_ids, status.as_deref());
            }
            store.transition(id, transition.clone(), OffsetDateTime::now_utc());
        };
        let stored = match &self.shared {
            Some(shared) => shared
                .transact(&Want::operation(id), |scratch, outcome| {
                    apply(scratch);
                    // Every name Graph gave it finds it (the first is on the operation).
                    if let Some((upstream_ids, _)) = &upstream {
                        outcome.upstream_ids.extend(
                            upstream_ids
                                .iter()
                                .skip(1)
                                .map(|upstream_id| (upstream_key(upstream_id).into(), id)),
                        );
                    }
                })
                .await
                .map(drop)
                .map_err(StoreError::from),
            None => {
                apply(&self.store);
                let mut changes = self.recorder.changes();
                changes.operation(id);
                self.recorder
                    .commit(&self.store, changes)
                    .await
                    .map_err(StoreError::from)
            }
        };
        if let Err(error) = stored {
            tracing::error!(operation.id = %id, %error, "an upstream answer could not be stored");
        }
    }

    #[tracing::instrument(skip_all, fields(operation.id = %id))]
    async fn dispatch(&self, id: OperationId, request: RemoveParticipant) {
        let transition = match self.acs.remove_participant(&request).await {
            Ok(()) => Transition::Accepted,
            Err(error) => {
                tracing::warn!(error = %error, "remove participant failed upstream");
                failure_transition(&error)
            }
        };
        self.apply_answer(id, None, transition).await;
    }

    /// Creates a cancelMediaProcessing operation and sends it to Graph in the background.
    /// `call_id` is sent upstream as given and kept in canonical form.
    #[tracing::instrument(skip_all, fields(call.id = %call_id, operation.id))]
    pub async fn start_cancel_media_processing(
        &self,
        call_id: String,
        client_context: Option<String>,
        traceparent: Option<TraceParent>,
    ) -> Result<Operation, StartError> {
        let context = context_or_generated(client_context, MAX_CLIENT_CONTEXT_LEN)
            .ok_or(StartError::ClientContext)?;
        let operation = self
            .create(
                OperationKind::CancelMediaProcessing,
                CallRef::Call(ids::canonical(&call_id).into_owned()),
                &context,
            )
            .await?;
        let id = operation.id;
        self.launch(operation, move |service| async move {
            service
                .dispatch_cancel(id, call_id, context, traceparent)
                .await;
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(operation.id = %id))]
    async fn dispatch_cancel(
        &self,
        id: OperationId,
        call_id: String,
        context: String,
        traceparent: Option<TraceParent>,
    ) {
        let answer = self
            .graph
            .cancel_media_processing(&call_id, &context, traceparent.as_ref())
            .await;
        let (upstream, transition) = match answer {
            Ok(answer) => {
                let upstream_ids: Vec<String> = [&answer.operation_id, &answer.location_id]
                    .into_iter()
                    .flatten()
                    .map(|upstream_id| ids::canonical(upstream_id).into_owned())
                    .collect();
                tracing::info!(
                    upstream.operation_id = answer.operation_id.as_deref().unwrap_or(""),
                    upstream.status = answer.status.as_deref().unwrap_or(""),
                    "Graph took cancelMediaProcessing"
                );
                let upstream = Some((upstream_ids, answer.status.clone()));
                (upstream, cancel_answer_transition(answer))
            }
            Err(error) => {
                tracing::warn!(error = %error, "cancelMediaProcessing failed upstream");
                (None, graph_failure_transition(&error))
            }
        };
        self.apply_answer(id, upstream, transition).await;
    }

    /// Hands `incoming` to the store and notes what it changed.
    fn deliver(
        &self,
        source: &'static str,
        incoming: IncomingEvent,
        now: tokio::time::Instant,
        changes: &mut Changes,
    ) -> Delivery {
        let counters = self.metrics.event_counters(source, &incoming.event_type);
        let call = incoming.cancelled.then(|| incoming.call.clone()).flatten();
        let seen = changes
            .is_durable()
            .then(|| (incoming.id.clone(), incoming.received));
        // A parked event is written from the store's hands, so nothing is copied otherwise.
        let delivery = self.store.deliver_noting(incoming, now, &mut |noted| {
            if let crate::store::Noted::Parked(event) = noted {
                changes.parked(event);
            }
        });
        metrics::count_event(&counters, event_outcome(delivery));
        match (seen, delivery) {
            (Some((Some(id), received)), Delivery::Matched { .. } | Delivery::Observed { .. }) => {
                changes.seen_on_operation(id, received);
            }
            (
                Some((Some(id), received)),
                Delivery::Parked | Delivery::CallEvent | Delivery::Unmatched,
            ) => {
                changes.seen(id, received);
            }
            _ => {}
        }
        match delivery {
            Delivery::Matched { id, .. } | Delivery::Observed { id } => changes.operation(id),
            Delivery::Parked | Delivery::Duplicate | Delivery::CallEvent | Delivery::Unmatched => {}
        }
        // A cancelled operation is listed on a cancel of its call.
        if let (Some(call), Delivery::Matched { .. } | Delivery::Observed { .. }) = (call, delivery)
        {
            changes.operations(self.store.cancels_on(&call));
        }
        delivery
    }

    /// Applies one Graph notification delivery; returns once its effects are durable. On a
    /// shared store each event is its own transition (so a redelivered event is a
    /// duplicate alone), written before the next; otherwise all are committed together.
    pub async fn deliver_graph(
        &self,
        events: Vec<GraphEvent>,
    ) -> Result<DeliverySummary, DeliveryError> {
        let now = tokio::time::Instant::now();
        let mut summary = DeliverySummary::default();
        let mut changes = self.recorder.changes();
        for GraphEvent {
            incoming,
            call_ended,
        } in events
        {
            summary.received += 1;
            let Some(call) = &incoming.call else {
                summary.unmatched += 1;
                tracing::warn!(
                    event.r#type = %incoming.event_type,
                    "notification names no call (no resourceUrl or resource); not kept"
                );
                continue;
            };
            // Only a call's end needs the call after the event is handed over.
            let ended = call_ended.map(|result| (call.clone(), result));
            let (delivery, failed) = match &self.shared {
                Some(shared) => {
                    self.deliver_shared(shared, "graph", incoming, ended.clone())
                        .await?
                }
                None => {
                    let delivery = self.deliver("graph", incoming, now, &mut changes);
                    let failed = match &ended {
                        Some((call, result)) if delivery != Delivery::Duplicate => {
                            self.store.end_call(
                                call,
                                result.clone(),
                                &call_terminated(),
                                OffsetDateTime::now_utc(),
                            )
                        }
                        _ => Vec::new(),
                    };
                    changes.operations(failed.iter().copied());
                    (delivery, failed)
                }
            };
            summary.count(delivery);
            if let Some((call, _)) = ended.filter(|_| delivery != Delivery::Duplicate) {
                log_call_ended(&call, &failed);
            }
        }
        self.metrics.callbacks_delivered("graph", &summary);
        self.recorder.commit(&self.store, changes).await?;
        Ok(summary)
    }

    /// Applies one ACS callback delivery; returns once its effects are durable (as
    /// [`OperationService::deliver_graph`]).
    pub async fn deliver_acs(
        &self,
        events: Vec<AcsEvent>,
    ) -> Result<DeliverySummary, DeliveryError> {
        let now = tokio::time::Instant::now();
        let received = OffsetDateTime::now_utc();
        let mut summary = DeliverySummary::default();
        let mut changes = self.recorder.changes();
        for event in events {
            let incoming = event.into_incoming(received);
            summary.received += 1;
            if incoming.call.is_none() {
                summary.unmatched += 1;
                tracing::warn!(
                    event.id = incoming.id.as_deref().unwrap_or(""),
                    event.r#type = %incoming.event_type,
                    "callback names no call connection (no data.callConnectionId, no source); not kept"
                );
                continue;
            }
            let delivery = match &self.shared {
                Some(shared) => self.deliver_shared(shared, "acs", incoming, None).await?.0,
                None => self.deliver("acs", incoming, now, &mut changes),
            };
            summary.count(delivery);
        }
        self.metrics.callbacks_delivered("acs", &summary);
        self.recorder.commit(&self.store, changes).await?;
        Ok(summary)
    }

    /// One event as one transition of the shared store: read what it may touch (its
    /// context, its upstream id, and for a cancel or a call's end every operation of the
    /// call), deliver it there, write back what changed unless its id was seen.
    async fn deliver_shared(
        &self,
        shared: &RedisStore,
        source: &'static str,
        incoming: IncomingEvent,
        ended: Option<(CallRef, Option<ResultInfo>)>,
    ) -> Result<(Delivery, Vec<OperationId>), DeliveryError> {
        let counters = self.metrics.event_counters(source, &incoming.event_type);
        let want = Want::event(&incoming, incoming.cancelled || ended.is_some());
        let now = tokio::time::Instant::now();
        let committed = shared
            .transact(&want, |scratch, outcome| {
                outcome.seen.extend(incoming.id.clone());
                let delivery = scratch.deliver_noting(incoming.clone(), now, &mut |noted| {
                    if let crate::store::Noted::Parked(event) = noted {
                        outcome.parked.push(event.clone());
                    }
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
                (delivery, failed)
            })
            .await?;
        let (delivery, failed) = match committed {
            Committed::Done(done) => done,
            Committed::Duplicate => (Delivery::Duplicate, Vec::new()),
        };
        metrics::count_event(&counters, event_outcome(delivery));
        Ok((delivery, failed))
    }

    pub async fn get(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        match &self.shared {
            Some(shared) => Ok(shared.get(id).await?),
            None => Ok(self.store.get(id)),
        }
    }

    /// Waits for the operation to settle, at most `timeout`; shutdown ends the wait early
    /// so that long polls never hold up a graceful stop.
    pub async fn wait(
        &self,
        id: OperationId,
        timeout: Duration,
    ) -> Result<Option<Operation>, StoreError> {
        if let Some(shared) = &self.shared {
            return Ok(shared.wait_settled(id, timeout, &self.shutdown).await?);
        }
        Ok(tokio::select! {
            operation = self.store.wait_settled(id, timeout) => operation,
            _ = self.shutdown.cancelled() => self.store.get(id),
        })
    }

    /// Operations matching `filter`, newest first, at most `limit`, and where the next page
    /// starts (before that id) when more may follow.
    pub async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<(Vec<Operation>, Option<OperationId>), StoreError> {
        match &self.shared {
            Some(shared) => Ok(shared.list(filter, limit).await?),
            None => {
                let (operations, more) = self.store.list(filter, limit);
                let next = operations.last().filter(|_| more).map(|last| last.id);
                Ok((operations, next))
            }
        }
    }
}

/// How a delivery is counted in the metrics.
fn event_outcome(delivery: Delivery) -> EventOutcome {
    match delivery {
        Delivery::Matched { .. } => EventOutcome::Matched,
        Delivery::Duplicate => EventOutcome::Duplicate,
        Delivery::Parked => EventOutcome::Parked,
        Delivery::Observed { .. } => EventOutcome::Observed,
        Delivery::Unmatched => EventOutcome::Unmatched,
        Delivery::CallEvent => EventOutcome::Call,
    }
}

/// Why the operations of an ended call failed.
fn call_terminated() -> OperationError {
    OperationError {
        code: "CallTerminated".to_owned(),
        message: "the call ended before the operation finished".to_owned(),
    }
}

fn log_call_ended(call: &CallRef, failed: &[OperationId]) {
    tracing::info!(
        call.id = call.id(),
        operations = failed.len(),
        "call terminated; its unsettled operations failed"
    );
}

/// The client's context when it has 1 to `max` characters, a new UUID when it gave none,
/// `None` otherwise.
fn context_or_generated(given: Option<String>, max: usize) -> Option<String> {
    match given {
        Some(context) if context.is_empty() || context.chars().count() > max => None,
        Some(context) => Some(context),
        None => Some(Uuid::new_v4().to_string()),
    }
}

impl DeliverySummary {
    fn count(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Duplicate => self.duplicates += 1,
            Delivery::Matched { id, effect } => {
                self.matched += 1;
                tracing::debug!(operation.id = %id, ?effect, "callback matched");
            }
            Delivery::Parked => self.parked += 1,
            Delivery::Observed { .. } => self.observed += 1,
            Delivery::CallEvent => {}
            Delivery::Unmatched => {
                self.unmatched += 1;
                tracing::warn!(
                    "park full: a callback for an unknown operation was kept on its call's events only"
                );
            }
        }
    }
}

/// How Graph's answer to a cancel moves the operation: `completed` and `failed` settle it
/// (no notification follows), anything else (`notStarted`, `running`, none, unknown)
/// leaves it running until the notification.
fn cancel_answer_transition(answer: CancelAnswer) -> Transition {
    let status = answer.status.as_deref().map(str::to_ascii_lowercase);
    match status.as_deref() {
        Some("completed") => Transition::Succeeded {
            result: answer.result,
        },
        Some("failed") => {
            let message = answer
                .result
                .as_ref()
                .and_then(|r| r.message.clone())
                .unwrap_or_else(|| "Graph reported the cancel failed".to_owned());
            Transition::Failed {
                result: answer.result,
                error: OperationError {
                    code: "CancelMediaProcessingFailed".to_owned(),
                    message,
                },
            }
        }
        _ => Transition::Accepted,
    }
}

/// How a Graph failure settles the operation.
fn graph_failure_transition(error: &GraphError) -> Transition {
    match error {
        GraphError::Rejected {
            status,
            code,
            message,
        } => rejected("Graph", *status, code.as_deref(), message.as_deref()),
        GraphError::Token(error) => Transition::Failed {
            result: None,
            error: OperationError {
                code: "UpstreamAuthFailed".to_owned(),
                message: format!("no Graph access token: {error}"),
            },
        },
        GraphError::Unavailable { attempts, last } => unavailable("Graph", *attempts, last),
    }
}

/// How an ACS failure settles the operation.
fn failure_transition(error: &AcsError) -> Transition {
    match error {
        AcsError::Rejected {
            status,
            code,
            message,
        } => rejected("ACS", *status, code.as_deref(), message.as_deref()),
        AcsError::Unavailable { attempts, last } => unavailable("ACS", *attempts, last),
    }
}

/// `UpstreamRejected`, with the upstream's status, code and message in `result`.
fn rejected(
    upstream: &str,
    status: reqwest::StatusCode,
    code: Option<&str>,
    message: Option<&str>,
) -> Transition {
    let detail = message.unwrap_or("no message");
    let code_text = code.unwrap_or("no code");
    Transition::Failed {
        result: Some(ResultInfo {
            code: Some(i64::from(status.as_u16())),
            sub_code: code.and_then(|code| code.parse().ok()),
            message: message.map(str::to_owned),
            ..ResultInfo::default()
        }),
        error: OperationError {
            code: "UpstreamRejected".to_owned(),
            message: format!(
                "{upstream} answered {} ({code_text}): {detail}",
                status.as_u16()
            ),
        },
    }
}

/// `UpstreamUnavailable`: retries ran out.
fn unavailable(upstream: &str, attempts: u32, last: &TransientError) -> Transition {
    Transition::Failed {
        result: None,
        error: OperationError {
            code: "UpstreamUnavailable".to_owned(),
            message: format!(
                "{upstream} did not accept the request after {attempts} attempt(s): {last}"
            ),
        },
    }
}

/// Expires parked callbacks, duplicate records and old operations until `shutdown`.
pub async fn run_sweeper(
    store: OperationStore,
    recorder: Recorder,
    dedupe_ttl: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let wall_now = OffsetDateTime::now_utc();
        let report = store.sweep(tokio::time::Instant::now(), wall_now);
        let changes = sweep_changes(&recorder, &report, wall_now - dedupe_ttl);
        if let Err(error) = recorder.commit(&store, changes).await {
            tracing::error!(%error, "the sweep's changes could not be stored; the next sweep retries what is still due");
        }
        crate::telemetry::log_sweep(&report);
    }
}

/// What a sweep changed: timed-out operations, retired ones, expired parked events, and
/// event ids past the dedupe window.
fn sweep_changes(
    recorder: &Recorder,
    report: &SweepReport,
    seen_before: OffsetDateTime,
) -> Changes {
    let mut changes = recorder.changes();
    changes.operations(report.timed_out.iter().copied());
    changes.removed(report.removed_operations.iter().copied());
    changes.unparked(report.expired.iter().map(|event| event.id.as_deref()));
    changes.seen_expired_before(seen_before);
    changes
}
