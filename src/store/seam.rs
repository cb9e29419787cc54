//! What passes through the storage seam whatever the backend: its errors, what goes in
//! and what comes out, and how a sweep's report is logged.

use crate::correlation::{Delivery, IncomingEvent};
use crate::metrics::Metrics;
use crate::operation::{CallRef, OperationError, OperationId, ResultInfo};
use crate::reconcile::ReconcileJob;
use crate::store::journal::JournalError;
use crate::store::redis::error::RedisStoreError;
use crate::store::tracker::{ContextInUse, SweepReport};

/// The store could not take or give a record now (the client or sender should retry).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Shared(#[from] RedisStoreError),
    /// A change the reader would see has not reached the journal in time.
    #[error("the latest change is not yet durable; try again")]
    NotDurable,
    /// This backend does not offer it.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Why an operation could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Conflict(#[from] ContextInUse),
    /// The record could not be made durable; nothing was sent upstream.
    #[error("the operation could not be stored: {0}")]
    Store(#[from] StoreError),
}

impl From<JournalError> for CreateError {
    fn from(error: JournalError) -> Self {
        Self::Store(error.into())
    }
}

impl From<RedisStoreError> for CreateError {
    fn from(error: RedisStoreError) -> Self {
        Self::Store(error.into())
    }
}

/// One event to deliver, and the call it says ended, if it does.
pub struct Inbound {
    pub incoming: IncomingEvent,
    pub ended: Option<CallEnd>,
}

/// A call that ended, as an event says.
pub struct CallEnd {
    pub call: CallRef,
    /// The call's own account, given to the operations it fails.
    pub result: Option<ResultInfo>,
    /// ACS `CallDisconnected`: the call's unsettled removals get a grace period for their
    /// own events before they fail (`CallEnded`). Graph's terminated call fails its
    /// operations at once (`CallTerminated`).
    pub grace: bool,
}

/// What became of one [`Inbound`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub delivery: Delivery,
    /// Operations failed because the event said their call ended.
    pub failed: Vec<OperationId>,
}

/// What an upstream said of an operation besides its transition (Graph): every id it gave
/// the operation, the first shown on it, and its status.
#[derive(Debug, Clone)]
pub struct UpstreamAnswer {
    pub ids: Vec<String>,
    pub status: Option<String>,
}

/// Where a sweep hands the operations to reconcile: to the service, which asks the platform
/// and gives the answer back ([`crate::store::Storage::reconciled`]). A full queue drops the
/// job: that operation then times out as it would have without asking.
pub type ReconcileQueue = tokio::sync::mpsc::Sender<ReconcileJob>;

/// Hands the sweep's jobs to the service.
pub(crate) fn queue_reconciliations(report: &mut SweepReport, queue: &ReconcileQueue) {
    for job in report.reconcile.drain(..) {
        let id = job.id;
        if queue.try_send(job).is_err() {
            tracing::warn!(operation.id = %id, "too many reconciliations waiting; this operation will time out unasked");
        }
    }
}

/// Why the operations of an ended call failed.
pub(crate) fn call_terminated() -> OperationError {
    OperationError {
        code: "CallTerminated".to_owned(),
        message: "the call ended before the operation finished".to_owned(),
    }
}

/// Logs and counts what a sweep did (whichever store it swept): expired parked callbacks
/// (counted as unmatched) and timed-out operations as warnings, retired operations at debug.
pub(crate) fn report_sweep(report: &SweepReport, metrics: &Metrics) {
    for event in &report.expired {
        metrics.parked_expired(event);
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
    for job in &report.reconcile {
        tracing::info!(operation.id = %job.id, "no final callback in time: asking the platform how the operation ended");
    }
    for id in &report.call_ended {
        tracing::warn!(operation.id = %id, "the call ended and no outcome followed within the grace period: operation failed with CallEnded");
    }
    if !report.removed_operations.is_empty() {
        tracing::debug!(
            count = report.removed_operations.len(),
            "retired settled operations"
        );
    }
}
