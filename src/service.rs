//! `OperationService`: the only code that uses both the upstream clients and the store.
//!
//! Starting an operation creates its record first (so a fast callback finds it), then sends
//! the upstream request on a tracked background task, so the client's 202 never waits on
//! ACS and a client that disconnects cannot cancel a half-sent request. Callbacks are turned
//! into platform-neutral [`IncomingEvent`]s and handed to the store.

use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::acs::client::{AcsClient, AcsError, RemoveParticipant, Repeatability};
use crate::acs::events::AcsEvent;
use crate::acs::identifier::{CommunicationIdentifier, IdentifierError};
use crate::operation::{
    CallRef, Operation, OperationError, OperationId, OperationKind, ResultInfo, Transition,
};
use crate::store::{ContextInUse, Delivery, ListFilter, OperationStore};

/// The longest operationContext accepted from a client.
pub const MAX_CONTEXT_LEN: usize = 512;

/// Starts operations and applies callbacks.
#[derive(Clone)]
pub struct OperationService {
    store: OperationStore,
    acs: AcsClient,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Why an operation could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("participantToRemove: {0}")]
    Participant(#[from] IdentifierError),
    #[error("operationContext must be 1 to {MAX_CONTEXT_LEN} characters")]
    Context,
    #[error(transparent)]
    Conflict(#[from] ContextInUse),
}

/// How many events of a delivery ended which way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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
        acs: AcsClient,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            acs,
            tasks,
            shutdown,
        }
    }

    /// The store, for reads.
    pub fn store(&self) -> &OperationStore {
        &self.store
    }

    /// Creates a Remove Participant operation and sends it to ACS in the background.
    #[tracing::instrument(skip_all, fields(call.connection_id = %call_connection_id, operation.id))]
    pub fn start_remove_participant(
        &self,
        call_connection_id: String,
        participant: CommunicationIdentifier,
        operation_context: Option<String>,
    ) -> Result<Operation, StartError> {
        let participant = participant.normalize()?;
        let context = match operation_context {
            Some(context) if context.is_empty() || context.chars().count() > MAX_CONTEXT_LEN => {
                return Err(StartError::Context);
            }
            Some(context) => context,
            None => Uuid::new_v4().to_string(),
        };
        let operation = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection(call_connection_id.clone()),
            context.clone(),
            OffsetDateTime::now_utc(),
        );
        let operation = self.store.create(operation)?;
        let id = operation.id;
        tracing::Span::current().record("operation.id", tracing::field::display(id));
        tracing::info!("operation created");
        let request = RemoveParticipant {
            call_connection_id,
            participant,
            operation_context: context,
            repeatability: Repeatability::new(),
        };
        let service = self.clone();
        self.tasks
            .spawn(async move { service.dispatch(id, request).await });
        Ok(operation)
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
    }

    /// Applies one ACS callback delivery.
    pub fn deliver_acs(&self, events: Vec<AcsEvent>) -> DeliverySummary {
        let now = tokio::time::Instant::now();
        let received = OffsetDateTime::now_utc();
        let mut summary = DeliverySummary::default();
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
            let delivery = self.store.deliver(incoming, now);
            match delivery {
                Delivery::Duplicate => summary.duplicates += 1,
                Delivery::Matched { .. } => summary.matched += 1,
                Delivery::Parked => summary.parked += 1,
                Delivery::Observed { .. } => summary.observed += 1,
                Delivery::CallEvent => {}
                Delivery::Unmatched => {
                    summary.unmatched += 1;
                    tracing::warn!(
                        "park full: a callback for an unknown operation was kept on its call's events only"
                    );
                }
            }
            if let Delivery::Matched { id, effect } = delivery {
                tracing::debug!(operation.id = %id, ?effect, "callback matched");
            }
        }
        summary
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

/// How an upstream failure settles the operation.
fn failure_transition(error: &AcsError) -> Transition {
    match error {
        AcsError::Rejected {
            status,
            code,
            message,
        } => {
            let detail = message.as_deref().unwrap_or("no message");
            let code_text = code.as_deref().unwrap_or("no code");
            Transition::Failed {
                result: Some(ResultInfo {
                    code: Some(i64::from(status.as_u16())),
                    sub_code: code.as_deref().and_then(|code| code.parse().ok()),
                    message: message.clone(),
                }),
                error: OperationError {
                    code: "UpstreamRejected".to_owned(),
                    message: format!("ACS answered {} ({code_text}): {detail}", status.as_u16()),
                },
            }
        }
        AcsError::Unavailable { attempts, last } => Transition::Failed {
            result: None,
            error: OperationError {
                code: "UpstreamUnavailable".to_owned(),
                message: format!(
                    "ACS did not accept the request after {attempts} attempt(s): {last}"
                ),
            },
        },
    }
}

/// Expires parked callbacks, duplicate records and old operations until `shutdown`.
pub async fn run_sweeper(store: OperationStore, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let report = store.sweep(tokio::time::Instant::now(), OffsetDateTime::now_utc());
        for event in &report.expired {
            tracing::warn!(
                event.id = event.id.as_deref().unwrap_or(""),
                event.r#type = %event.event_type,
                call.id = event.call.as_ref().map(CallRef::id).unwrap_or(""),
                operation.context = event.context.as_deref().unwrap_or(""),
                "parked callback expired: no operation with its context appeared; kept on the call's events"
            );
        }
        if report.removed_operations > 0 {
            tracing::debug!(
                count = report.removed_operations,
                "retired settled operations"
            );
        }
    }
}
