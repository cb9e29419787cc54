//! What passes through the storage seam whatever the backend: its errors, what goes in
//! and what comes out, and how a sweep's report is logged.

use crate::correlation::{Delivery, IncomingEvent};
use crate::metrics::Metrics;
use crate::operation::{CallRef, OperationError, OperationId, ResultInfo};
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

/// One event to deliver; for a Graph notification saying its call ended, the call and the
/// result to fail the call's unsettled operations with.
pub struct Inbound {
    pub incoming: IncomingEvent,
    pub ended: Option<(CallRef, Option<ResultInfo>)>,
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
    if !report.removed_operations.is_empty() {
        tracing::debug!(
            count = report.removed_operations.len(),
            "retired settled operations"
        );
    }
}
