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

use crate::acs::client::{
    AcsClient, AcsError, ParticipantReading, RemoveParticipant, Repeatability,
};
use crate::acs::events::AcsEvent;
use crate::acs::identifier::{CommunicationIdentifier, IdentifierError};
use crate::config::{CallbackTimeouts, OperationsConfig};
use crate::correlation::{Delivery, DeliverySummary, IncomingEvent};
use crate::graph::client::{CancelAnswer, GraphClient, GraphError};
use crate::graph::ids;
use crate::graph::notifications::GraphEvent;
use crate::metrics::{self, EventOutcome, Metrics};
use crate::operation::{
    CallRef, NotifyTarget, Operation, OperationError, OperationId, OperationKind, PendingRequest,
    ResultInfo, Transition,
};
use crate::reconcile::{self, Reading, ReconcileJob};
use crate::store::journal::JournalStats;
use crate::store::{
    CallEnd, ContextInUse, CreateError, Delivered, Inbound, ListFilter, Storage, StoreError,
    StoreStats, UpstreamAnswer,
};
use crate::telemetry::LogBudget;
use crate::trace_context::TraceParent;
use crate::upstream::TransientError;

/// The longest operationContext accepted from a client.
pub const MAX_CONTEXT_LEN: usize = 512;

/// The longest clientContext Graph accepts.
pub const MAX_CLIENT_CONTEXT_LEN: usize = 256;

/// Platform reads of reconciliations in flight at once.
const RECONCILE_CONCURRENCY: usize = 32;

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
    storage: Storage,
    /// The longest an upstream request (with its retries) may take: how long a replica
    /// holds a request it is sending before another may send it again.
    dispatch_budget: Duration,
    /// Named in the `CallbackTimeout` message of a reconciliation.
    callback_timeouts: CallbackTimeouts,
    /// `operations.reconcile`: removals keep their participant to be asked about.
    reconcile: bool,
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
    Store(#[from] StoreError),
}

impl From<CreateError> for StartError {
    fn from(error: CreateError) -> Self {
        match error {
            CreateError::Conflict(conflict) => Self::Conflict(conflict),
            CreateError::Store(error) => Self::Store(error),
        }
    }
}

/// A callback delivery whose effects could not be made durable (the sender should retry).
#[derive(Debug, thiserror::Error)]
#[error("the callback could not be stored: {0}")]
pub struct DeliveryError(#[from] StoreError);

impl OperationService {
    #[expect(
        clippy::too_many_arguments,
        reason = "each part is wired once, in `run`"
    )]
    pub fn new(
        storage: Storage,
        dispatch_budget: Duration,
        operations: &OperationsConfig,
        acs: AcsClient,
        graph: GraphClient,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        Self {
            parts: Arc::new(ServiceParts {
                storage,
                dispatch_budget,
                callback_timeouts: operations.callback_timeouts.clone(),
                reconcile: operations.reconcile,
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
        self.storage.journal_stats()
    }

    /// How many Graph access tokens were requested.
    pub fn graph_token_fetches(&self) -> u64 {
        self.graph.tokens().fetches()
    }

    /// The store's counters (for a shared store: this replica's, and the store's sizes as
    /// last counted).
    pub fn store_stats(&self) -> StoreStats {
        self.storage.stats()
    }

    /// Transitions of a shared store that lost a race and were rerun.
    pub fn store_conflicts(&self) -> Option<u64> {
        self.storage.conflicts()
    }

    /// The events kept for a call.
    pub async fn call_events(
        &self,
        call: &CallRef,
    ) -> Result<Vec<crate::operation::EventRecord>, StoreError> {
        self.storage.call_events(call).await
    }

    /// Whether the store can commit now, within `timeout`.
    pub async fn store_ready(&self, timeout: Duration) -> Result<(), String> {
        let probe = async {
            self.storage
                .probe()
                .await
                .map_err(|error| error.to_string())
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

    /// The store's change feed.
    pub fn feed(&self) -> Result<&crate::store::feed::Feed, crate::store::StoreError> {
        self.storage.feed()
    }

    /// Creates a Remove Participant operation and sends it to ACS in the background.
    #[tracing::instrument(skip_all, fields(call.connection_id = %call_connection_id, operation.id))]
    pub async fn start_remove_participant(
        &self,
        call_connection_id: String,
        participant: CommunicationIdentifier,
        operation_context: Option<String>,
        traceparent: Option<TraceParent>,
        notify: Option<NotifyTarget>,
    ) -> Result<Operation, StartError> {
        let participant = participant.normalize()?;
        let context =
            context_or_generated(operation_context, MAX_CONTEXT_LEN).ok_or(StartError::Context)?;
        let mut operation = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection(call_connection_id.clone()),
            context.clone(),
            OffsetDateTime::now_utc(),
        );
        operation.notify = notify.map(Box::new);
        let id = operation.id;
        // Kept only to be asked about at the deadline (about 80 bytes per running removal).
        if self.reconcile {
            operation.participant = participant.raw_id.as_deref().map(Into::into);
        }
        let repeatability = Repeatability::new();
        operation.pending = Some(Box::new(PendingRequest::RemoveParticipant {
            participant: serde_json::to_value(&participant).unwrap_or_default(),
            repeatability_request_id: repeatability.request_id,
            repeatability_first_sent: repeatability.first_sent.clone(),
        }));
        let request = RemoveParticipant {
            call_connection_id,
            participant,
            operation_context: context,
            repeatability,
            traceparent,
        };
        self.launch(operation, move |service| async move {
            service.dispatch(id, request).await;
        })
        .await
    }

    /// Creates the record (durable before anything is sent upstream), then sends it
    /// (`dispatch`), on one tracked task: the caller's `202` waits for the commit only,
    /// and a client that goes away meanwhile cannot leave a stored operation unsent.
    async fn launch<F, Fut>(
        &self,
        operation: Operation,
        dispatch: F,
    ) -> Result<Operation, StartError>
    where
        F: FnOnce(OperationService) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        tracing::Span::current().record("operation.id", tracing::field::display(operation.id));
        let (created, outcome) = tokio::sync::oneshot::channel();
        let service = self.clone();
        let span = tracing::Span::current();
        self.tasks.spawn(async move {
            let result = service.storage.create(operation).await;
            let stored = result.is_ok();
            if let Err(CreateError::Store(error)) = &result {
                let _entered = span.enter();
                tracing::error!(%error, "the new operation could not be stored; not sent");
            }
            let _ = created.send(result);
            if stored {
                dispatch(service).await;
            }
        });
        match outcome.await {
            Ok(Ok(operation)) => {
                tracing::info!("operation created");
                Ok(operation.public())
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(StartError::Store(StoreError::Journal(
                crate::store::journal::JournalError::Closed,
            ))),
        }
    }

    /// Applies an upstream answer and writes it (nobody waits on it: a failure is logged).
    async fn apply_answer(
        &self,
        id: OperationId,
        upstream: Option<UpstreamAnswer>,
        transition: Transition,
    ) {
        let stored = self
            .storage
            .record_answer(id, upstream, transition, OffsetDateTime::now_utc())
            .await;
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
        notify: Option<NotifyTarget>,
    ) -> Result<Operation, StartError> {
        let context = context_or_generated(client_context, MAX_CLIENT_CONTEXT_LEN)
            .ok_or(StartError::ClientContext)?;
        let mut operation = Operation::new(
            OperationKind::CancelMediaProcessing,
            CallRef::Call(ids::canonical(&call_id).into_owned()),
            context.clone(),
            OffsetDateTime::now_utc(),
        );
        operation.pending = Some(Box::new(PendingRequest::CancelMediaProcessing {
            call_id: call_id.clone(),
        }));
        operation.notify = notify.map(Box::new);
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
                let upstream = Some(UpstreamAnswer {
                    ids: upstream_ids,
                    status: answer.status.clone(),
                });
                (upstream, cancel_answer_transition(answer))
            }
            Err(error) => {
                tracing::warn!(error = %error, "cancelMediaProcessing failed upstream");
                (None, graph_failure_transition(&error))
            }
        };
        self.apply_answer(id, upstream, transition).await;
    }

    /// Applies one Graph notification delivery; returns once its effects are durable.
    pub async fn deliver_graph(
        &self,
        events: Vec<GraphEvent>,
    ) -> Result<DeliverySummary, DeliveryError> {
        let mut summary = DeliverySummary::default();
        let mut inbound = Vec::with_capacity(events.len());
        let mut nameless = Nameless::default();
        for GraphEvent {
            incoming,
            call_ended,
        } in events
        {
            summary.received += 1;
            let Some(call) = &incoming.call else {
                summary.unmatched += 1;
                nameless.note(&incoming);
                continue;
            };
            // Only a call's end needs the call after the event is handed over.
            let ended = call_ended.map(|result| CallEnd {
                call: call.clone(),
                result,
                grace: false,
            });
            inbound.push(Inbound { incoming, ended });
        }
        nameless.log("notifications name no call (no resourceUrl or resource); not kept");
        self.deliver("graph", inbound, &mut summary).await?;
        Ok(summary)
    }

    /// Applies one ACS callback delivery; returns once its effects are durable.
    pub async fn deliver_acs(
        &self,
        events: Vec<AcsEvent>,
    ) -> Result<DeliverySummary, DeliveryError> {
        let received = OffsetDateTime::now_utc();
        let mut summary = DeliverySummary::default();
        let mut inbound = Vec::with_capacity(events.len());
        let mut nameless = Nameless::default();
        for event in events {
            let disconnected = event.name() == CALL_DISCONNECTED;
            let incoming = event.into_incoming(received);
            summary.received += 1;
            let Some(call) = &incoming.call else {
                summary.unmatched += 1;
                nameless.note(&incoming);
                continue;
            };
            // The call's removals still waiting get a grace period for their own events.
            let ended = disconnected.then(|| CallEnd {
                call: call.clone(),
                result: None,
                grace: true,
            });
            inbound.push(Inbound { incoming, ended });
        }
        nameless.log(
            "callback events name no call connection (no data.callConnectionId, no source); not kept",
        );
        self.deliver("acs", inbound, &mut summary).await?;
        Ok(summary)
    }

    /// Hands `inbound` to the store, counting what became of each event as it is known.
    async fn deliver(
        &self,
        source: &'static str,
        inbound: Vec<Inbound>,
        summary: &mut DeliverySummary,
    ) -> Result<(), StoreError> {
        // Events naming no call were counted unmatched already, and logged by the caller.
        let unnamed = summary.unmatched;
        let counted: Vec<_> = inbound
            .iter()
            .map(|event| {
                let counters = self
                    .metrics
                    .event_counters(source, &event.incoming.event_type);
                let ended = event
                    .ended
                    .as_ref()
                    .map(|ended| (ended.call.clone(), ended.grace));
                (counters, ended)
            })
            .collect();
        let delivered = self
            .storage
            .deliver(inbound, &mut |index, delivered: &Delivered| {
                let (counters, ended) = &counted[index];
                metrics::count_event(counters, event_outcome(delivered.delivery));
                summary.count(delivered.delivery);
                if let Delivery::Matched { id, effect } = delivered.delivery {
                    tracing::debug!(operation.id = %id, ?effect, "callback matched");
                }
                if let (Some((call, grace)), false) =
                    (ended, delivered.delivery == Delivery::Duplicate)
                {
                    log_call_ended(call, *grace, &delivered.failed);
                }
            })
            .await;
        self.metrics.callbacks_delivered(source, summary);
        let full = summary.unmatched - unnamed;
        if full > 0 && WARNINGS.allow() {
            tracing::warn!(
                events = full,
                "park full: callbacks for unknown operations were kept on their call's events only"
            );
        }
        delivered
    }

    pub async fn get(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        Ok(self.storage.get(id).await?.map(Operation::public))
    }

    /// Waits for the operation to settle, at most `timeout`; shutdown ends the wait early
    /// so that long polls never hold up a graceful stop.
    pub async fn wait(
        &self,
        id: OperationId,
        timeout: Duration,
    ) -> Result<Option<Operation>, StoreError> {
        let operation = self.storage.wait(id, timeout, &self.shutdown).await?;
        Ok(operation.map(Operation::public))
    }

    /// Operations matching `filter`, newest first, at most `limit`, and where the next page
    /// starts (before that id) when more may follow.
    pub async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<(Vec<Operation>, Option<OperationId>), StoreError> {
        let (operations, next) = self.storage.list(filter, limit).await?;
        Ok((
            operations.into_iter().map(Operation::public).collect(),
            next,
        ))
    }

    /// Sends again, every `interval` until shutdown, the requests of operations that were
    /// acknowledged but never answered (a process that stopped while sending them), as the
    /// same requests.
    pub async fn run_redispatch(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lease = self.dispatch_budget;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.storage.claim_unsent(lease).await {
                Ok(owed) => {
                    for operation in owed {
                        self.redispatch(operation);
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "unsent operations could not be read; retried next tick");
                }
            }
        }
    }

    /// Asks the platform about each operation the store's sweep hands over (past its
    /// deadline with no final callback), at most [`RECONCILE_CONCURRENCY`] at a time, and
    /// gives the conclusion back to the store, until shutdown.
    pub async fn run_reconciler(self, mut jobs: tokio::sync::mpsc::Receiver<ReconcileJob>) {
        let limit = Arc::new(tokio::sync::Semaphore::new(RECONCILE_CONCURRENCY));
        loop {
            let job = tokio::select! {
                () = self.shutdown.cancelled() => return,
                job = jobs.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let service = self.clone();
            self.tasks.spawn(async move {
                service.reconcile(job).await;
                drop(permit);
            });
        }
    }

    /// Asks the platform how `job`'s operation ended, outside any store lock, and applies
    /// the conclusion by compare-and-set (a callback that came meanwhile wins).
    #[tracing::instrument(skip_all, fields(operation.id = %job.id))]
    async fn reconcile(&self, job: ReconcileJob) {
        let reading = self.read_platform(&job).await;
        let timeout = self.callback_timeouts.for_kind(&job.kind);
        let conclusion = reconcile::conclude(&job.kind, reading, timeout);
        let applied = self
            .storage
            .reconciled(job.id, &conclusion, OffsetDateTime::now_utc())
            .await;
        let outcome = match applied {
            Ok(true) => conclusion.outcome,
            Ok(false) => "superseded",
            Err(error) => {
                // Still marked reconciling: it times out when that mark expires.
                tracing::error!(%error, "a reconciliation could not be stored; the operation will time out");
                return;
            }
        };
        self.metrics.reconciliation(job.kind.as_str(), outcome);
        tracing::info!(?reading, outcome, "operation reconciled with the platform");
    }

    /// What the platform says of `job`'s operation.
    async fn read_platform(&self, job: &ReconcileJob) -> Reading {
        match (&job.call, job.participant.as_deref()) {
            (CallRef::CallConnection(call_connection_id), Some(participant)) => {
                match self.acs.participant(call_connection_id, participant).await {
                    Ok(ParticipantReading::Present) => Reading::ParticipantPresent,
                    Ok(ParticipantReading::Gone) => Reading::ParticipantGone,
                    Ok(ParticipantReading::CallGone) => Reading::CallGone,
                    Err(error) => {
                        tracing::warn!(%error, "ACS could not be asked about the participant");
                        Reading::Unreachable
                    }
                }
            }
            (CallRef::Call(call_id), _) => match self.graph.call_exists(call_id).await {
                Ok(true) => Reading::CallPresent,
                Ok(false) => Reading::CallGone,
                Err(error) => {
                    tracing::warn!(%error, "Graph could not be asked about the call");
                    Reading::Unreachable
                }
            },
            (CallRef::CallConnection(_), None) => Reading::Unreachable,
        }
    }

    /// Sends `operation`'s pending request again on a tracked task.
    fn redispatch(&self, operation: Operation) {
        let Some(pending) = operation.pending else {
            return;
        };
        let id = operation.id;
        tracing::info!(operation.id = %id, "sending again a request acknowledged but never answered");
        let service = self.clone();
        match *pending {
            PendingRequest::RemoveParticipant {
                participant,
                repeatability_request_id,
                repeatability_first_sent,
            } => {
                let (CallRef::CallConnection(call_connection_id), Ok(participant)) = (
                    operation.call,
                    serde_json::from_value::<CommunicationIdentifier>(participant),
                ) else {
                    tracing::error!(operation.id = %id, "a stored request could not be read; not sent again");
                    return;
                };
                let request = RemoveParticipant {
                    call_connection_id,
                    participant,
                    operation_context: operation.context,
                    repeatability: Repeatability {
                        request_id: repeatability_request_id,
                        first_sent: repeatability_first_sent,
                    },
                    traceparent: None,
                };
                self.tasks
                    .spawn(async move { service.dispatch(id, request).await });
            }
            PendingRequest::CancelMediaProcessing { call_id } => {
                let context = operation.context;
                self.tasks.spawn(async move {
                    service.dispatch_cancel(id, call_id, context, None).await;
                });
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

/// Warnings a flood of callbacks could multiply: at most [`LogBudget::PER_SECOND`] a second
/// for all requests, and one line per request whatever it holds.
static WARNINGS: LogBudget = LogBudget::new();

/// Events of one request that name no call: counted, logged once with the first one's
/// type and id.
#[derive(Default)]
struct Nameless {
    count: usize,
    first: Option<(String, Option<String>)>,
}

impl Nameless {
    fn note(&mut self, incoming: &IncomingEvent) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some((incoming.event_type.clone(), incoming.id.clone()));
        }
    }

    fn log(self, what: &'static str) {
        let Some((event_type, id)) = self.first else {
            return;
        };
        if WARNINGS.allow() {
            tracing::warn!(
                events = self.count,
                first.r#type = %event_type,
                first.id = id.as_deref().unwrap_or(""),
                "{what}"
            );
        }
    }
}

fn log_call_ended(call: &CallRef, grace: bool, failed: &[OperationId]) {
    if grace {
        tracing::info!(
            call.id = call.id(),
            "call disconnected; its unsettled removals fail with CallEnded unless their events follow within the grace period"
        );
        return;
    }
    tracing::info!(
        call.id = call.id(),
        operations = failed.len(),
        "call terminated; its unsettled operations failed"
    );
}

/// ACS's event for a call that ended.
const CALL_DISCONNECTED: &str = "CallDisconnected";

/// The client's context when it has 1 to `max` characters, a new UUID when it gave none,
/// `None` otherwise.
fn context_or_generated(given: Option<String>, max: usize) -> Option<String> {
    match given {
        Some(context) if context.is_empty() || context.chars().count() > max => None,
        Some(context) => Some(context),
        None => Some(Uuid::new_v4().to_string()),
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
        AcsError::Token(error) => Transition::Failed {
            result: None,
            error: OperationError {
                code: "UpstreamAuthFailed".to_owned(),
                message: format!("no ACS access token: {error}"),
            },
        },
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
