//! Reconciliation: what callops concludes about an operation whose callback never came,
//! from what the platform says when asked at the deadline. Pure: the service asks the
//! platform (`OperationService::run_reconciler`), the store decides when and applies it.

use std::time::Duration;

use crate::operation::{
    CALL_ENDED, CALLBACK_TIMEOUT, CallRef, Operation, OperationError, OperationId, OperationKind,
    SettleReason, Transition,
};

/// An operation past its deadline that the platform is to be asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileJob {
    pub id: OperationId,
    pub kind: OperationKind,
    pub call: CallRef,
    /// Removals: the participant's raw id.
    pub participant: Option<Box<str>>,
}

/// What the platform said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// ACS no longer lists the participant on the call.
    ParticipantGone,
    /// ACS still lists the participant on the call.
    ParticipantPresent,
    /// The platform no longer knows the call.
    CallGone,
    /// Graph still knows the call.
    CallPresent,
    /// The platform could not be asked (network, 5xx, throttling past the retry budget, an
    /// unexpected answer).
    Unreachable,
}

/// What a reading does to the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conclusion {
    pub transition: Transition,
    /// Settled from the reading (`reconciled` on the operation) rather than timed out.
    pub reconciled: bool,
    /// The `outcome` label of `callops_reconciliations_total`.
    pub outcome: &'static str,
}

/// The `outcome` labels of `callops_reconciliations_total`, each present from the start.
pub const OUTCOMES: [&str; 6] = [
    "succeeded",
    "still_pending",
    "call_ended",
    "call_terminated",
    "unreachable",
    "superseded",
];

/// What the sweep does with an unsettled operation whose time has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtDeadline {
    /// Fail it with `CallbackTimeout`, as without reconciliation.
    TimeOut,
    /// Ask the platform first (and time out if no answer is applied in time).
    Reconcile,
    /// Its call ended and the grace period is over: fail it with `CallEnded`.
    EndCall,
}

/// What to do with `op` at its time: a reconciliation is tried once per operation, for the
/// kinds callops issues, when `enabled`.
pub fn at_deadline(op: &Operation, enabled: bool) -> AtDeadline {
    match op.settle_reason() {
        Some(SettleReason::CallEnded) => AtDeadline::EndCall,
        Some(SettleReason::Reconciling) => AtDeadline::TimeOut,
        None => {
            let askable = match op.kind {
                OperationKind::RemoveParticipant => op.participant.is_some(),
                OperationKind::CancelMediaProcessing => true,
                OperationKind::Observed(_) => false,
            };
            if enabled && askable {
                AtDeadline::Reconcile
            } else {
                AtDeadline::TimeOut
            }
        }
    }
}

/// The job for `op`.
pub fn job(op: &Operation) -> ReconcileJob {
    ReconcileJob {
        id: op.id,
        kind: op.kind.clone(),
        call: op.call.clone(),
        participant: op.participant.clone(),
    }
}

/// The provisional `CallbackTimeout` failure after `timeout`, with why it is still open.
pub fn timed_out(timeout: Duration, why: &str) -> Transition {
    Transition::Failed {
        result: None,
        error: OperationError {
            code: CALLBACK_TIMEOUT.to_owned(),
            message: format!(
                "no final callback arrived within {} s{why}; a later one still settles the operation (marked late)",
                timeout.as_secs()
            ),
        },
    }
}

/// The failure of an operation whose call ended before its outcome was heard.
pub fn call_ended(message: &str) -> Transition {
    Transition::Failed {
        result: None,
        error: OperationError {
            code: CALL_ENDED.to_owned(),
            message: message.to_owned(),
        },
    }
}

/// What `reading` means for an operation of `kind` that timed out after `timeout`.
pub fn conclude(kind: &OperationKind, reading: Reading, timeout: Duration) -> Conclusion {
    let graph = *kind == OperationKind::CancelMediaProcessing;
    let reconciled = |transition, outcome| Conclusion {
        transition,
        reconciled: true,
        outcome,
    };
    let plain = |why: &str, outcome| Conclusion {
        transition: timed_out(timeout, why),
        reconciled: false,
        outcome,
    };
    match reading {
        Reading::ParticipantGone if !graph => reconciled(
            Transition::Succeeded { result: None },
            OUTCOMES[0],
        ),
        Reading::CallGone if graph => reconciled(
            Transition::Failed {
                result: None,
                error: OperationError {
                    code: "CallTerminated".to_owned(),
                    message: "Graph no longer knows the call: it ended before the cancel's outcome was heard".to_owned(),
                },
            },
            OUTCOMES[3],
        ),
        Reading::CallGone => reconciled(
            call_ended("ACS no longer knows the call: it ended before the removal's outcome was heard"),
            OUTCOMES[2],
        ),
        Reading::ParticipantPresent => plain(" and ACS still lists the participant on the call", OUTCOMES[1]),
        Reading::Unreachable => plain(" and the platform could not be asked", OUTCOMES[4]),
        Reading::CallPresent | Reading::ParticipantGone => plain("", OUTCOMES[1]),
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::operation::OperationStatus;

    const TIMEOUT: Duration = Duration::from_secs(240);

    fn removal() -> Operation {
        let mut op = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("c".into()),
            "ctx".into(),
            OffsetDateTime::UNIX_EPOCH,
        );
        op.participant = Some("8:acs:bob".into());
        op
    }

    fn error_code(conclusion: &Conclusion) -> Option<&str> {
        match &conclusion.transition {
            Transition::Failed { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    #[test]
    fn each_reading_of_a_removal_concludes_as_documented() {
        let kind = OperationKind::RemoveParticipant;
        let gone = conclude(&kind, Reading::ParticipantGone, TIMEOUT);
        assert_eq!(gone.transition, Transition::Succeeded { result: None });
        assert!(gone.reconciled);
        let present = conclude(&kind, Reading::ParticipantPresent, TIMEOUT);
        assert_eq!(error_code(&present), Some(CALLBACK_TIMEOUT));
        assert!(!present.reconciled);
        let ended = conclude(&kind, Reading::CallGone, TIMEOUT);
        assert_eq!(error_code(&ended), Some(CALL_ENDED));
        assert!(ended.reconciled);
        let unreachable = conclude(&kind, Reading::Unreachable, TIMEOUT);
        assert_eq!(error_code(&unreachable), Some(CALLBACK_TIMEOUT));
        assert_eq!(unreachable.outcome, "unreachable");
    }

    #[test]
    fn a_cancel_is_settled_only_when_its_call_is_gone() {
        let kind = OperationKind::CancelMediaProcessing;
        let gone = conclude(&kind, Reading::CallGone, TIMEOUT);
        assert_eq!(error_code(&gone), Some("CallTerminated"));
        assert!(gone.reconciled);
        for reading in [Reading::CallPresent, Reading::Unreachable] {
            let conclusion = conclude(&kind, reading, TIMEOUT);
            assert_eq!(error_code(&conclusion), Some(CALLBACK_TIMEOUT));
            assert!(!conclusion.reconciled);
        }
        assert!(OUTCOMES.contains(&gone.outcome));
    }

    #[test]
    fn the_platform_is_asked_once_then_the_operation_times_out() {
        let mut op = removal();
        assert_eq!(at_deadline(&op, true), AtDeadline::Reconcile);
        assert_eq!(at_deadline(&op, false), AtDeadline::TimeOut);
        op.settle_by(OffsetDateTime::UNIX_EPOCH, SettleReason::Reconciling);
        assert_eq!(at_deadline(&op, true), AtDeadline::TimeOut);
        op.settle_by(OffsetDateTime::UNIX_EPOCH, SettleReason::CallEnded);
        assert_eq!(at_deadline(&op, true), AtDeadline::EndCall);
        // A removal stored without its participant cannot be asked about.
        let mut unnamed = removal();
        unnamed.participant = None;
        assert_eq!(at_deadline(&unnamed, true), AtDeadline::TimeOut);
        let observed = Operation::new(
            OperationKind::Observed("play".into()),
            CallRef::CallConnection("c".into()),
            "p".into(),
            OffsetDateTime::UNIX_EPOCH,
        );
        assert_eq!(at_deadline(&observed, true), AtDeadline::TimeOut);
    }

    #[test]
    fn a_reconciled_outcome_is_replaced_by_a_later_callback() {
        let mut op = removal();
        let now = OffsetDateTime::UNIX_EPOCH;
        op.apply(Transition::Accepted, now).unwrap();
        op.apply_reconciled(call_ended("gone"), now).unwrap();
        assert!(op.reconciled && op.provisional());
        op.apply(Transition::Succeeded { result: None }, now)
            .unwrap();
        assert_eq!(op.status, OperationStatus::Succeeded);
        assert!(op.late && !op.reconciled && op.error.is_none());
        // Once replaced, it is final.
        assert!(
            op.apply(Transition::Succeeded { result: None }, now)
                .is_err()
        );
    }
}
