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
use crate::correlation::IncomingEvent;
use crate::graph::client::{CancelAnswer, GraphClient, GraphError};
use crate::graph::ids;
use crate::graph::notifications::GraphEvent;
use crate::journal::{JournalError, JournalStats};
use crate::metrics::{self, EventOutcome, Metrics};
use crate::operation::{
    CallRef, Operation, OperationError, OperationId, OperationKind, ResultInfo, Transition,
};
use crate::persistence::{Changes, Recorder};
use crate::store::{ContextInUse, Delivery, ListFilter, OperationStore, SweepReport};
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
    store: OperationStore,
    recorder: Recorder,
    acs: AcsClient,
    graph: GraphClient,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    metrics: Metrics,
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
    Store(#[from] JournalError),
}

/// A callback delivery whose effects could not be made durable (the sender should retry).
#[derive(Debug, thiserror::Error)]
#[error("the callback could not be stored: {0}")]
pub struct DeliveryError(#[from] JournalError);

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
        store: OperationStore,
        recorder: Recorder,
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

    /// The store, for reads.
    pub fn store(&self) -> &OperationStore {
        &self.store
    }

    /// Whether the store can commit now, within `timeout`.
    pub async fn store_ready(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.recorder.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
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
        let operation = self.create(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection(call_connection_id.clone()),
            &context,
        )?;
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

    /// Creates the record (before anything is sent upstream) and names it in the span.
    fn create(
        &self,
        kind: OperationKind,
        call: CallRef,
        context: &str,
    ) -> Result<Operation, StartError> {
        let operation = Operation::new(kind, call, context.to_owned(), OffsetDateTime::now_utc());
        let operation = self.store.create(operation)?;
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
            Err(_) => Err(JournalError::Closed.into()),
        }
    }

    /// Writes what an upstream answer changed (nobody waits on it: a failure is logged).
    async fn record(&self, id: OperationId) {
        let mut changes = self.recorder.changes();
        changes.operation(id);
        if let Err(error) = self.recorder.commit(&self.store, changes).await {
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
        self.store
            .transition(id, transition, OffsetDateTime::now_utc());
        self.record(id).await;
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
        let operation = self.create(
            OperationKind::CancelMediaProcessing,
            CallRef::Call(ids::canonical(&call_id).into_owned()),
            &context,
        )?;
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
        let transition = match answer {
            Ok(answer) => {
                let upstream_ids: Vec<_> = [&answer.operation_id, &answer.location_id]
                    .into_iter()
                    .flatten()
                    .map(|upstream_id| ids::canonical(upstream_id))
                    .collect();
                let upstream_ids: Vec<&str> = upstream_ids.iter().map(AsRef::as_ref).collect();
                self.store
                    .record_upstream(id, &upstream_ids, answer.status.as_deref());
                tracing::info!(
                    upstream.operation_id = answer.operation_id.as_deref().unwrap_or(""),
                    upstream.status = answer.status.as_deref().unwrap_or(""),
                    "Graph took cancelMediaProcessing"
                );
                cancel_answer_transition(answer)
            }
            Err(error) => {
                tracing::warn!(error = %error, "cancelMediaProcessing failed upstream");
                graph_failure_transition(&error)
            }
        };
        self.store
            .transition(id, transition, OffsetDateTime::now_utc());
        self.record(id).await;
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
        let delivery = self
            .store
            .deliver_noting(incoming, now, &mut |event| changes.parked(event));
        metrics::count_event(
            &counters,
            match delivery {
                Delivery::Matched { .. } => EventOutcome::Matched,
                Delivery::Duplicate => EventOutcome::Duplicate,
                Delivery::Parked => EventOutcome::Parked,
                Delivery::Observed { .. } => EventOutcome::Observed,
                Delivery::Unmatched => EventOutcome::Unmatched,
                Delivery::CallEvent => EventOutcome::Call,
            },
        );
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

    /// Applies one Graph notification delivery; returns once its effects are durable.
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
            let delivery = self.deliver("graph", incoming, now, &mut changes);
            summary.count(delivery);
            if let (Some((call, result)), false) = (ended, delivery == Delivery::Duplicate) {
                let error = OperationError {
                    code: "CallTerminated".to_owned(),
                    message: "the call ended before the operation finished".to_owned(),
                };
                let failed = self
                    .store
                    .end_call(&call, result, &error, OffsetDateTime::now_utc());
                tracing::info!(
                    call.id = call.id(),
                    operations = failed.len(),
                    "call terminated; its unsettled operations failed"
                );
                changes.operations(failed);
            }
        }
        self.metrics.callbacks_delivered("graph", &summary);
        self.recorder.commit(&self.store, changes).await?;
        Ok(summary)
    }

    /// Applies one ACS callback delivery; returns once its effects are durable.
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
            summary.count(self.deliver("acs", incoming, now, &mut changes));
        }
        self.metrics.callbacks_delivered("acs", &summary);
        self.recorder.commit(&self.store, changes).await?;
        Ok(summary)
    }

    pub fn get(&self, id: OperationId) -> Option<Operation> {
        self.store.get(id)
    }

    /// Waits for the operation to settle, at most `timeout`; shutdown ends the wait early
    /// so that long polls never hold up a graceful stop.
    pub async fn wait(&self, id: OperationId, timeout: Duration) -> Option<Operation> {
        tokio::select! {
            operation = self.store.wait_settled(id, timeout) => operation,
            _ = self.shutdown.cancelled() => self.store.get(id),
        }
    }

    pub fn list(&self, filter: &ListFilter, limit: usize) -> (Vec<Operation>, bool) {
        self.store.list(filter, limit)
    }
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
        for event in &report.expired {
            tracing::warn!(
                event.id = event.id.as_deref().unwrap_or(""),
                event.r#type = %event.event_type,
                call.id = event.call.as_ref().map(CallRef::id).unwrap_or(""),
                operation.context = event.context.as_deref().unwrap_or(""),
                "parked callback expired: no operation with its context appeared; kept on the call's events"
            );
        }
        for id in &report.timed_out {
            tracing::warn!(operation.id = %id, "no final callback in time: operation failed with CallbackTimeout");
        }
        if !report.removed_operations.is_empty() {
            tracing::debug!(
                count = report.removed_operations.len(),
                "retired settled operations"
            );
        }
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
