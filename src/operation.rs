//! The operation domain: identifiers, the operation record and its state machine.
//!
//! Everything here is pure and synchronous: no I/O, no clocks read except through the
//! arguments, no knowledge of HTTP or of upstream wire formats. The state machine only moves
//! forward (`NotStarted → Running → Succeeded | Failed | Canceled`); a transition that would
//! move a settled operation is refused with [`TransitionError`], and the caller records the
//! event without changing the state.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

/// Server-generated operation id. UUID v7, so ids sort in creation order (the list endpoint
/// relies on it for "newest first" paging).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct OperationId(Uuid);

impl OperationId {
    /// A new, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// A new, time-ordered id for an operation on `call`: its last 16 bits are the call's
    /// [`call_hash`], so a store partitioned by call finds the partition from the id alone.
    pub fn for_call(call: &CallRef) -> Self {
        let mut bytes = *Uuid::now_v7().as_bytes();
        bytes[14..16].copy_from_slice(&call_hash(call).to_be_bytes());
        Self(Uuid::from_bytes(bytes))
    }

    /// The call hash the id carries ([`OperationId::for_call`]).
    pub fn call_hash(&self) -> u16 {
        let bytes = self.0.as_bytes();
        u16::from_be_bytes([bytes[14], bytes[15]])
    }

    /// Parses the textual form; `None` when it is not a UUID.
    pub fn parse(text: &str) -> Option<Self> {
        Uuid::try_parse(text).ok().map(Self)
    }
}

/// 16 bits of SHA-256 over the call's platform and id: which partition of a partitioned
/// store holds the call (and, through [`OperationId::for_call`], its operations).
pub fn call_hash(call: &CallRef) -> u16 {
    let mut hasher = crate::crypto::Sha256::new();
    let (tag, id): (&[u8], &str) = match call {
        CallRef::CallConnection(id) => (b"acs", id),
        CallRef::Call(id) => (b"graph", id),
    };
    hasher.update(tag);
    hasher.update(&[0]);
    hasher.update(id.as_bytes());
    let digest = hasher.finish();
    u16::from_be_bytes([digest[0], digest[1]])
}

impl Default for OperationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// What an operation does. Observed operations (reported by callbacks but not issued by us)
/// carry the upstream's own name, e.g. `play` or `recognize`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OperationKind {
    RemoveParticipant,
    CancelMediaProcessing,
    Observed(Box<str>),
}

impl OperationKind {
    /// The wire name (`removeParticipant`, ...).
    pub fn as_str(&self) -> &str {
        match self {
            Self::RemoveParticipant => "removeParticipant",
            Self::CancelMediaProcessing => "cancelMediaProcessing",
            Self::Observed(name) => name,
        }
    }

    /// The inverse of [`OperationKind::as_str`].
    pub fn from_name(name: &str) -> Self {
        match name {
            "removeParticipant" => Self::RemoveParticipant,
            "cancelMediaProcessing" => Self::CancelMediaProcessing,
            other => Self::Observed(other.into()),
        }
    }

    /// True for operations this service issued itself.
    pub fn is_issued(&self) -> bool {
        !matches!(self, Self::Observed(_))
    }
}

impl Serialize for OperationKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for OperationKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(Self::from_name(&name))
    }
}

/// Azure status-monitor statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum OperationStatus {
    NotStarted,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl OperationStatus {
    /// Settled statuses never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }

    /// Parses the wire name case-insensitively.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::NotStarted,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Canceled,
        ]
        .into_iter()
        .find(|status| status.as_str().eq_ignore_ascii_case(text))
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "NotStarted",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Canceled => "Canceled",
        }
    }
}

/// The call an operation acts on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum CallRef {
    /// An ACS call connection id.
    #[serde(rename = "callConnectionId")]
    CallConnection(String),
    /// A Microsoft Graph call id.
    #[serde(rename = "callId")]
    Call(String),
}

impl CallRef {
    /// The id, whichever platform it belongs to.
    pub fn id(&self) -> &str {
        match self {
            Self::CallConnection(id) | Self::Call(id) => id,
        }
    }
}

/// The upstream's own account of how an operation ended (ACS `resultInformation`, Graph
/// `resultInfo` and `completionReason`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Graph's `completionReason`, e.g. `operationCanceled`, `stopToneDetected`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_reason: Option<String>,
    /// ACS: the SIP response behind the outcome, when the call leg gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_details: Option<Box<ResultDetails>>,
    /// ACS: the Q.850 cause behind the outcome, when the network gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q850_details: Option<Box<ResultDetails>>,
}

/// A protocol-level cause in an ACS `resultInformation` (`sipDetails`, `q850Details`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResultDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The error code of an operation that heard no final callback in time. Unlike every
/// other failure it is provisional: a final callback that arrives later still wins.
pub const CALLBACK_TIMEOUT: &str = "CallbackTimeout";

/// Why an unsettled operation is due at a time of its own rather than at its callback
/// deadline. Kept with the operation (never shown), so every store and every replica sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleBy {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub reason: SettleReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SettleReason {
    /// Past its deadline, the platform is being asked how it ended; if no answer is applied
    /// by `at`, it times out as it would have without asking.
    Reconciling,
    /// Its call ended (ACS `CallDisconnected`); unless its own event comes first, it fails
    /// with [`CALL_ENDED`] at `at`.
    CallEnded,
}

/// The error code of an operation whose call ended before its outcome was heard.
pub const CALL_ENDED: &str = "CallEnded";

/// A media operation that a `cancelMediaProcessing` operation cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelledOperation {
    /// Our id of the cancelled operation (usually an observed one).
    pub id: OperationId,
    /// `removeParticipant`, `cancelMediaProcessing`, or an observed operation's upstream name.
    #[schema(value_type = String, example = "removeParticipant")]
    pub kind: OperationKind,
    pub context: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub upstream_operation_id: Option<Box<str>>,
}

/// Why an operation failed, with a stable machine-readable `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OperationError {
    pub code: String,
    pub message: String,
}

/// One callback event as kept on an operation's (or a call's) timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// Upstream event type, e.g. `Microsoft.Communication.RemoveParticipantSucceeded`.
    /// The names callops knows are kept as static strings ([`event_type`]), not one copy
    /// per event.
    #[serde(rename = "type", deserialize_with = "deserialize_event_type")]
    #[schema(value_type = String)]
    pub event_type: Cow<'static, str>,
    /// Upstream event id (the CloudEvent `id`), when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_date_time: OffsetDateTime,
    /// How the event affected the operation: `applied`, `ignored` (the operation had
    /// already settled), `recorded` (informational), or `unmatched` (on a call's timeline:
    /// it named an operation that never appeared).
    pub effect: EventEffect,
}

/// Event types seen often enough to be kept once: ACS's call-automation events and
/// Graph's `{resource}.{change}` names for the operations and call resources.
const KNOWN_EVENT_TYPES: &[&str] = &[
    "Microsoft.Communication.RemoveParticipantSucceeded",
    "Microsoft.Communication.RemoveParticipantFailed",
    "Microsoft.Communication.AddParticipantSucceeded",
    "Microsoft.Communication.AddParticipantFailed",
    "Microsoft.Communication.CancelAddParticipantSucceeded",
    "Microsoft.Communication.CancelAddParticipantFailed",
    "Microsoft.Communication.CallConnected",
    "Microsoft.Communication.CallDisconnected",
    "Microsoft.Communication.CallTransferAccepted",
    "Microsoft.Communication.CallTransferFailed",
    "Microsoft.Communication.ParticipantsUpdated",
    "Microsoft.Communication.PlayStarted",
    "Microsoft.Communication.PlayCompleted",
    "Microsoft.Communication.PlayFailed",
    "Microsoft.Communication.PlayCanceled",
    "Microsoft.Communication.RecognizeCompleted",
    "Microsoft.Communication.RecognizeFailed",
    "Microsoft.Communication.RecognizeCanceled",
    "Microsoft.Communication.SendDtmfTonesCompleted",
    "Microsoft.Communication.SendDtmfTonesFailed",
    "Microsoft.Communication.ContinuousDtmfRecognitionToneReceived",
    "Microsoft.Communication.ContinuousDtmfRecognitionStopped",
    "Microsoft.Communication.ContinuousDtmfRecognitionToneFailed",
    "cancelMediaProcessingOperation.updated",
    "cancelMediaProcessingOperation.deleted",
    "playPromptOperation.updated",
    "playPromptOperation.deleted",
    "recordOperation.updated",
    "recordOperation.deleted",
    "commsOperation.updated",
    "commsOperation.deleted",
    "call.created",
    "call.updated",
    "call.deleted",
    "participant.created",
    "participant.updated",
    "participant.deleted",
];

/// `name` as a static string when callops knows it, otherwise a copy.
pub fn event_type(name: &str) -> Cow<'static, str> {
    KNOWN_EVENT_TYPES
        .iter()
        .find(|known| **known == name)
        .map_or_else(
            || Cow::Owned(name.to_owned()),
            |known| Cow::Borrowed(*known),
        )
}

fn deserialize_event_type<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Cow<'static, str>, D::Error> {
    let name = <Cow<'de, str>>::deserialize(deserializer)?;
    Ok(event_type(&name))
}

/// What an event did to the operation it was recorded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum EventEffect {
    Applied,
    Ignored,
    Recorded,
    Unmatched,
}

/// What callops sends upstream for an operation it issued, as much as a restart needs to
/// send it again: the same request, so the upstream can tell it is a repeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "request")]
pub enum PendingRequest {
    /// ACS Remove Participant; ACS recognises a repeat by the repeatability pair.
    #[serde(rename_all = "camelCase")]
    RemoveParticipant {
        /// The CommunicationIdentifierModel sent.
        participant: serde_json::Value,
        repeatability_request_id: Uuid,
        /// IMF-fixdate of the first attempt.
        repeatability_first_sent: String,
    },
    /// Graph cancelMediaProcessing; the call id as the client gave it.
    #[serde(rename_all = "camelCase")]
    CancelMediaProcessing { call_id: String },
}

/// An operation: what was asked, of which call, and how far it has got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub id: OperationId,
    /// `removeParticipant`, `cancelMediaProcessing`, or an observed operation's upstream name.
    #[schema(value_type = String, example = "removeParticipant")]
    pub kind: OperationKind,
    pub status: OperationStatus,
    /// The operationContext / clientContext sent upstream; unique per call among running
    /// operations.
    pub context: String,
    #[serde(flatten)]
    pub call: CallRef,
    #[serde(with = "time::serde::rfc3339")]
    pub created_date_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_updated_date_time: OffsetDateTime,
    /// The request still owed to the upstream, kept in the record (never shown by the API)
    /// until the upstream answers, so a restart sends it again as the same request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub pending: Option<Box<PendingRequest>>,
    /// Boxed, like `error`: most operations in memory have neither yet, and inline they
    /// would make every operation 120 bytes larger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<ResultInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Box<OperationError>>,
    /// The upstream's own id of the operation (Graph's operation id), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_operation_id: Option<Box<str>>,
    /// The operation's status as the upstream last wrote it (Graph: `running`,
    /// `completed`, ... in any case, unknown values included), when it reports one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<Box<str>>,
    /// True when the final callback arrived after the operation had timed out
    /// ([`CALLBACK_TIMEOUT`]) or been reconciled, and replaced that provisional outcome.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
    /// True when callops settled the operation without its callback: from what the
    /// platform said when asked at the deadline (the participant is gone, the call is gone),
    /// or because its call ended. Provisional: a final callback that arrives later still
    /// wins (and marks it `late`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconciled: bool,
    /// Removals: the participant's raw id, to ask ACS about it at the deadline. Kept for
    /// the store alone, like `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub participant: Option<Box<str>>,
    /// When it is due instead of at its callback deadline, and why. Store only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub settle_by: Option<Box<SettleBy>>,
    /// For `cancelMediaProcessing`: the media operations it cancelled, as their
    /// notifications arrived.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancelled_operations: Vec<CancelledOperation>,
    /// The callback events that arrived for this operation, in arrival order: the first
    /// and the last ones ([`EventBound`]), `eventsOmitted` more between them.
    pub events: Vec<EventRecord>,
    /// How many events arrived between the first and the last ones kept in `events`, and
    /// were dropped.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub events_omitted: u64,
    /// Bumped by every change: the durable store keeps the snapshot with the highest
    /// revision, whatever order concurrent writers reach it in. Not part of the API.
    #[serde(skip)]
    pub revision: u64,
    /// One more than the highest revision known to be durable (0: none yet): readers of
    /// a journaled store show the operation only once this passes `revision`.
    #[serde(skip)]
    pub durable: u64,
    /// How many of the events that arrived ([`Operation::events_total`]) the durable store
    /// has written: a commit writes only those after. Not part of the API.
    #[serde(skip)]
    pub events_written: u64,
    /// Where the client asked to be told when the operation settles; kept in the record,
    /// never shown (its secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub notify: Option<Box<NotifyTarget>>,
    /// What the change feed has announced of it. Not part of the API.
    #[serde(skip)]
    pub announced: Announced,
}

/// The change feed's bookkeeping on an operation; not its state: two operations in the
/// same state are equal whatever the feed has announced of them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Announced {
    /// The revision at which the operation last settled or changed its outcome (0: never).
    pub settled_revision: u64,
    /// The last `settled_revision` announced.
    pub settle: u64,
    /// One more than the last revision announced (0: none).
    pub change: u64,
}

impl PartialEq for Announced {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Announced {}

/// A per-operation completion webhook: a URL (with the secret to sign for it), or a
/// subscription whose URL and secret are used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NotifyTarget {
    Url {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    Subscription(String),
}

impl Operation {
    /// True when every change to it is durable.
    pub fn is_durable(&self) -> bool {
        self.durable > self.revision
    }

    /// The operation as the API shows it: without what is kept for the store alone.
    pub fn public(mut self) -> Self {
        self.pending = None;
        self.notify = None;
        self.participant = None;
        self.settle_by = None;
        self
    }

    /// When the sweep looks at it if nothing settles it: its own time ([`SettleBy`]), else
    /// `timeout` after its creation.
    pub fn deadline(&self, timeout: std::time::Duration) -> OffsetDateTime {
        match &self.settle_by {
            Some(settle_by) => settle_by.at,
            None => self.created_date_time + timeout,
        }
    }

    /// Why it is due at a time of its own, if it is.
    pub fn settle_reason(&self) -> Option<SettleReason> {
        self.settle_by.as_ref().map(|settle_by| settle_by.reason)
    }

    /// Makes it due at `at` for `reason` (a change: the revision moves).
    pub fn settle_by(&mut self, at: OffsetDateTime, reason: SettleReason) {
        self.settle_by = Some(Box::new(SettleBy { at, reason }));
        self.revision += 1;
    }

    /// Applies a final `transition` that callops inferred rather than heard (see
    /// `reconciled`); refused like any transition once the operation has settled.
    pub fn apply_reconciled(
        &mut self,
        transition: Transition,
        now: OffsetDateTime,
    ) -> Result<OperationStatus, TransitionError> {
        let status = self.apply(transition, now)?;
        self.reconciled = true;
        Ok(status)
    }

    /// True while its outcome is provisional: a timeout or a reconciliation, which a final
    /// callback still replaces.
    pub fn provisional(&self) -> bool {
        self.timed_out() || (self.reconciled && self.status.is_terminal())
    }

    /// A new operation in `NotStarted`, created before anything is sent upstream.
    pub fn new(kind: OperationKind, call: CallRef, context: String, now: OffsetDateTime) -> Self {
        Self {
            id: OperationId::for_call(&call),
            kind,
            status: OperationStatus::NotStarted,
            context,
            call,
            created_date_time: now,
            last_updated_date_time: now,
            pending: None,
            result: None,
            error: None,
            upstream_operation_id: None,
            upstream_status: None,
            late: false,
            reconciled: false,
            participant: None,
            settle_by: None,
            cancelled_operations: Vec::new(),
            events: Vec::new(),
            events_omitted: 0,
            revision: 0,
            durable: 0,
            events_written: 0,
            notify: None,
            announced: Announced::default(),
        }
    }

    /// Every event that arrived: those kept and those omitted.
    pub fn events_total(&self) -> u64 {
        self.events.len() as u64 + self.events_omitted
    }

    /// The place in the operation's whole history (from 0) of the kept event at `index`,
    /// for a timeline kept under `bound`: the first ones are where they arrived, the others
    /// come after those omitted. Stable while the event is kept, whatever arrives later.
    pub fn event_ordinal(&self, index: usize, bound: EventBound) -> u64 {
        if index < bound.first {
            index as u64
        } else {
            index as u64 + self.events_omitted
        }
    }

    /// The operation as the journal keeps it: everything but its events (listed empty),
    /// which are kept one by one. Serializes from `self` without a copy.
    pub fn without_events(&self) -> impl Serialize + '_ {
        // No `..`: a new field on `Operation` must be placed here too.
        let Self {
            id,
            kind,
            status,
            context,
            call,
            created_date_time,
            last_updated_date_time,
            pending,
            result,
            error,
            upstream_operation_id,
            upstream_status,
            late,
            reconciled,
            participant,
            settle_by,
            cancelled_operations,
            events: _,
            events_omitted,
            revision: _,
            durable: _,
            events_written: _,
            notify,
            announced: _,
        } = self;
        WithoutEvents {
            id,
            kind,
            status,
            context,
            call,
            created_date_time: *created_date_time,
            last_updated_date_time: *last_updated_date_time,
            pending: pending.as_deref(),
            result: result.as_deref(),
            error: error.as_deref(),
            upstream_operation_id: upstream_operation_id.as_deref(),
            upstream_status: upstream_status.as_deref(),
            late: *late,
            reconciled: *reconciled,
            participant: participant.as_deref(),
            settle_by: settle_by.as_deref(),
            cancelled_operations,
            events: &[],
            events_omitted: *events_omitted,
            notify: notify.as_deref(),
        }
    }

    /// True while the operation has failed only provisionally, for want of a callback.
    pub fn timed_out(&self) -> bool {
        self.status == OperationStatus::Failed
            && self
                .error
                .as_ref()
                .is_some_and(|error| error.code == CALLBACK_TIMEOUT)
    }

    /// Applies `transition` at `now`: moves the state forward, or leaves the operation
    /// untouched and says why not.
    pub fn apply(
        &mut self,
        transition: Transition,
        now: OffsetDateTime,
    ) -> Result<OperationStatus, TransitionError> {
        // A final outcome that arrives after a callback timeout or a reconciliation still
        // wins, marked late.
        let reopened = self.provisional() && transition.is_final();
        let from = if reopened {
            OperationStatus::Running
        } else {
            self.status
        };
        let next = next_status(from, &transition)?;
        if reopened {
            self.late = true;
            self.reconciled = false;
            self.error = None;
        }
        let outcome_changed = next.is_terminal() && (next != self.status || reopened);
        if next.is_terminal() {
            // Only an unsettled removal is ever reconciled.
            self.settle_by = None;
            self.participant = None;
        }
        self.status = next;
        self.last_updated_date_time = now;

        self.revision += 1;
        if outcome_changed {
            self.announced.settled_revision = self.revision;
        }
        match transition {
            Transition::Accepted | Transition::Started => {}
            Transition::Succeeded { result } | Transition::Canceled { result } => {
                self.result = result.map(Box::new);
            }
            Transition::Failed { result, error } => {
                self.result = result.map(Box::new);
                self.error = Some(Box::new(error));
            }
        }
        // Any other move means the request reached the upstream (or never will); a
        // timeout only says no callback came, so the request is still owed.
        if !self.timed_out() {
            self.pending = None;
        }
        Ok(next)
    }

    /// Adds `event` to the timeline. When the timeline is full (`bound`), the oldest of the
    /// last events is dropped, counted in `events_omitted` and returned: its id is no longer
    /// listed here, so a caller that rebuilds the duplicate filter from the timeline must keep
    /// it elsewhere. At most one event is dropped per call, so a timeline kept under a larger
    /// bound does not shrink, but does not grow either.
    pub fn record(&mut self, event: EventRecord, bound: EventBound) -> Option<EventRecord> {
        self.last_updated_date_time = event.received_date_time;
        self.revision += 1;
        // Most operations hear one event: the first takes one place rather than Vec's
        // default first step of four.
        if self.events.capacity() == 0 {
            self.events.reserve_exact(1);
        }
        let evicted = (self.events.len() >= bound.kept()).then(|| {
            self.events_omitted += 1;
            // Shifts the last events down one place: O(`bound.last`), a few dozen moves.
            self.events.remove(bound.first)
        });
        self.events.push(event);
        evicted
    }
}

/// [`Operation`]'s serialized form with its events left out ([`Operation::without_events`]).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WithoutEvents<'a> {
    id: &'a OperationId,
    kind: &'a OperationKind,
    status: &'a OperationStatus,
    context: &'a str,
    #[serde(flatten)]
    call: &'a CallRef,
    #[serde(with = "time::serde::rfc3339")]
    created_date_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    last_updated_date_time: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pending: Option<&'a PendingRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a ResultInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a OperationError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_operation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_status: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    late: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    reconciled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    participant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settle_by: Option<&'a SettleBy>,
    #[serde(skip_serializing_if = "is_empty")]
    cancelled_operations: &'a [CancelledOperation],
    events: &'a [EventRecord],
    #[serde(skip_serializing_if = "is_zero")]
    events_omitted: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    notify: Option<&'a NotifyTarget>,
}

/// How many events an operation's timeline keeps: the `first` that arrived and the `last`
/// (at least one, the newest); those between are counted, not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBound {
    pub first: usize,
    pub last: usize,
}

impl EventBound {
    /// The most events kept.
    pub fn kept(self) -> usize {
        self.first.saturating_add(self.last.max(1))
    }
}

fn is_empty<T>(items: &&[T]) -> bool {
    items.is_empty()
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Something that happened to an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Transition {
    /// The upstream accepted the request (ACS 202).
    Accepted,
    /// An observed operation reported progress (e.g. `PlayStarted`).
    Started,
    /// The upstream reported success.
    Succeeded { result: Option<ResultInfo> },
    /// The upstream reported failure, or rejected the request for good.
    Failed {
        result: Option<ResultInfo>,
        error: OperationError,
    },
    /// The upstream reported the operation cancelled.
    Canceled { result: Option<ResultInfo> },
}

impl Transition {
    /// True for outcomes (success, failure, cancellation), false for progress.
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Accepted | Self::Started)
    }
}

/// Why a transition was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The operation has settled; nothing moves it again.
    #[error("the operation has already settled as {0:?}")]
    AlreadySettled(OperationStatus),
}

/// The state machine: where `status` goes on `transition`.
pub fn next_status(
    status: OperationStatus,
    transition: &Transition,
) -> Result<OperationStatus, TransitionError> {
    if status.is_terminal() {
        return Err(TransitionError::AlreadySettled(status));
    }
    Ok(match transition {
        // A callback can overtake the upstream's answer; `Accepted` after a settle is refused
        // above, and `Accepted` on `Running` (a retried request) keeps it running.
        Transition::Accepted | Transition::Started => OperationStatus::Running,
        Transition::Succeeded { .. } => OperationStatus::Succeeded,
        Transition::Failed { .. } => OperationStatus::Failed,
        Transition::Canceled { .. } => OperationStatus::Canceled,
    })
}

/// The kinds callops issues, in the order of the store's `started` and `settled` counts.
pub const ISSUED_KINDS: [OperationKind; 2] = [
    OperationKind::RemoveParticipant,
    OperationKind::CancelMediaProcessing,
];

/// The final statuses, in the order of the store's `settled` rows.
pub const FINAL_STATUSES: [OperationStatus; 3] = [
    OperationStatus::Succeeded,
    OperationStatus::Failed,
    OperationStatus::Canceled,
];

#[cfg(test)]
mod serde_tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn known_event_types_are_kept_once() {
        let known = event_type("Microsoft.Communication.RemoveParticipantSucceeded");
        assert!(matches!(known, Cow::Borrowed(_)));
        assert!(matches!(event_type("Contoso.Custom"), Cow::Owned(_)));
        let record: EventRecord = serde_json::from_str(
            r#"{"type":"call.deleted","receivedDateTime":"2026-11-23T10:00:00Z","effect":"recorded"}"#,
        )
        .unwrap();
        assert!(matches!(record.event_type, Cow::Borrowed("call.deleted")));
    }

    /// The API representation carries the whole state, so it can be stored and read back
    /// (the durable store relies on it).
    #[test]
    fn an_operation_survives_its_json_unchanged() {
        let at = datetime!(2026-11-23 10:00:00.123456789 UTC);
        let mut cancel = Operation::new(
            OperationKind::CancelMediaProcessing,
            CallRef::Call("57dab8b1-894c-409a-b240-bd8beae78896".to_owned()),
            "stop".to_owned(),
            at,
        );
        cancel.status = OperationStatus::Failed;
        cancel.result = Some(Box::new(ResultInfo {
            code: Some(400),
            sub_code: Some(8508),
            message: Some("canceled".to_owned()),
            completion_reason: Some("operationCanceled".to_owned()),
            sip_details: Some(Box::new(ResultDetails {
                code: Some(487),
                message: Some("Request Terminated".to_owned()),
            })),
            q850_details: None,
        }));
        cancel.error = Some(Box::new(OperationError {
            code: "OperationCanceled".to_owned(),
            message: "m".to_owned(),
        }));
        cancel.upstream_operation_id = Some("0FE0623FD62842EDB4BD8AC290072CC5".into());
        cancel.upstream_status = Some("Running".into());
        cancel.late = true;
        cancel.reconciled = true;
        cancel.cancelled_operations.push(CancelledOperation {
            id: OperationId::new(),
            kind: OperationKind::Observed("playPrompt".into()),
            context: "welcome".to_owned(),
            upstream_operation_id: None,
        });
        cancel.record(
            EventRecord {
                event_type: "cancelMediaProcessingOperation.deleted".into(),
                id: Some("sha256:abc".to_owned()),
                received_date_time: at,
                effect: EventEffect::Applied,
            },
            EventBound { first: 1, last: 1 },
        );
        cancel.events_omitted = 3;
        let mut removal = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("18dea47f".to_owned()),
            String::new(),
            at,
        );
        removal.pending = Some(Box::new(PendingRequest::RemoveParticipant {
            participant: serde_json::json!({"rawId": "8:acs:bob"}),
            repeatability_request_id: Uuid::nil(),
            repeatability_first_sent: "Mon, 23 Nov 2026 10:00:00 GMT".to_owned(),
        }));
        removal.participant = Some("8:acs:bob".into());
        removal.settle_by(at, SettleReason::CallEnded);
        for operation in [cancel, removal] {
            let json = serde_json::to_vec(&operation).unwrap();
            let mut back: Operation = serde_json::from_slice(&json).unwrap();
            // The revision is stored beside the JSON.
            assert_eq!(back.revision, 0);
            back.revision = operation.revision;
            assert_eq!(back, operation);
            // The journal's form: the same, with the events kept apart.
            let json = serde_json::to_vec(&operation.without_events()).unwrap();
            let mut back: Operation = serde_json::from_slice(&json).unwrap();
            assert!(back.events.is_empty());
            back.events.clone_from(&operation.events);
            back.revision = operation.revision;
            assert_eq!(back, operation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use OperationStatus::*;

    fn error() -> OperationError {
        OperationError {
            code: "RemoveParticipantFailed".into(),
            message: "gone".into(),
        }
    }

    fn all_transitions() -> Vec<Transition> {
        vec![
            Transition::Accepted,
            Transition::Started,
            Transition::Succeeded { result: None },
            Transition::Failed {
                result: None,
                error: error(),
            },
            Transition::Canceled { result: None },
        ]
    }

    #[test]
    fn forward_moves() {
        let check = |from, transition: Transition, to| {
            assert_eq!(
                next_status(from, &transition),
                Ok(to),
                "{from:?} on {transition:?}"
            );
        };
        check(NotStarted, Transition::Accepted, Running);
        check(Running, Transition::Accepted, Running);
        check(Running, Transition::Started, Running);
        check(Running, Transition::Succeeded { result: None }, Succeeded);
        check(
            Running,
            Transition::Failed {
                result: None,
                error: error(),
            },
            Failed,
        );
        check(Running, Transition::Canceled { result: None }, Canceled);
        // A callback that overtakes the upstream's 202 settles a NotStarted operation.
        check(
            NotStarted,
            Transition::Succeeded { result: None },
            Succeeded,
        );
        check(
            NotStarted,
            Transition::Failed {
                result: None,
                error: error(),
            },
            Failed,
        );
    }

    #[test]
    fn settled_operations_never_move() {
        for from in [Succeeded, Failed, Canceled] {
            for transition in all_transitions() {
                assert_eq!(
                    next_status(from, &transition),
                    Err(TransitionError::AlreadySettled(from)),
                    "{from:?} on {transition:?}"
                );
            }
        }
    }

    #[test]
    fn apply_keeps_result_and_error() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let t1 = t0 + time::Duration::seconds(1);
        let mut op = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("c".into()),
            "ctx".into(),
            t0,
        );
        let result = ResultInfo {
            code: Some(400),
            sub_code: Some(8523),
            message: Some("bad".into()),
            ..ResultInfo::default()
        };
        let failed = Transition::Failed {
            result: Some(result.clone()),
            error: error(),
        };
        assert_eq!(op.apply(failed, t1), Ok(Failed));
        assert_eq!(op.result.as_deref(), Some(&result));
        assert_eq!(op.error.as_deref(), Some(&error()));
        assert_eq!(op.last_updated_date_time, t1);
        // The late 202 does not resurrect it, and leaves the record untouched.
        let before = op.clone();
        assert!(op.apply(Transition::Accepted, t1).is_err());
        assert_eq!(op, before);
    }

    #[test]
    fn a_final_outcome_after_a_callback_timeout_wins_and_is_marked_late() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let mut op = Operation::new(
            OperationKind::CancelMediaProcessing,
            CallRef::Call("c".into()),
            "ctx".into(),
            t0,
        );
        let timeout = Transition::Failed {
            result: None,
            error: OperationError {
                code: CALLBACK_TIMEOUT.into(),
                message: "no callback".into(),
            },
        };
        assert_eq!(op.apply(timeout, t0), Ok(Failed));
        assert!(op.timed_out());
        // Progress does not reopen it; an outcome does, once.
        assert!(op.apply(Transition::Started, t0).is_err());
        assert_eq!(
            op.apply(Transition::Succeeded { result: None }, t0),
            Ok(Succeeded)
        );
        assert!(op.late);
        assert_eq!(op.error, None);
        assert!(op.apply(Transition::Canceled { result: None }, t0).is_err());
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(json["late"], true);
        // Any other failure is final.
        let mut other = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("c".into()),
            "ctx".into(),
            t0,
        );
        other
            .apply(
                Transition::Failed {
                    result: None,
                    error: error(),
                },
                t0,
            )
            .unwrap();
        assert!(
            other
                .apply(Transition::Succeeded { result: None }, t0)
                .is_err()
        );
        assert!(!other.late);
    }

    #[test]
    fn status_parses_case_insensitively() {
        assert_eq!(OperationStatus::parse("succeeded"), Some(Succeeded));
        assert_eq!(OperationStatus::parse("NotStarted"), Some(NotStarted));
        assert_eq!(OperationStatus::parse("done"), None);
    }

    #[test]
    fn operation_serialises_as_the_status_monitor() {
        let op = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection("call-1".into()),
            "ctx".into(),
            OffsetDateTime::UNIX_EPOCH,
        );
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(json["kind"], "removeParticipant");
        assert_eq!(json["status"], "NotStarted");
        assert_eq!(json["callConnectionId"], "call-1");
        assert_eq!(json["createdDateTime"], "1970-01-01T00:00:00Z");
        assert!(json.get("error").is_none());
        assert!(json.get("late").is_none());
        assert!(json.get("cancelledOperations").is_none());
        assert!(json.get("eventsOmitted").is_none());
        let back: Operation = serde_json::from_value(json).unwrap();
        assert_eq!(back, op);
    }

    fn numbered(n: usize) -> EventRecord {
        EventRecord {
            event_type: event_type("Microsoft.Communication.PlayStarted"),
            id: Some(format!("e{n}")),
            received_date_time: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(n as i64),
            effect: EventEffect::Recorded,
        }
    }

    fn ids(events: &[EventRecord]) -> Vec<&str> {
        events.iter().filter_map(|e| e.id.as_deref()).collect()
    }

    fn observed() -> Operation {
        Operation::new(
            OperationKind::Observed("play".into()),
            CallRef::CallConnection("c".into()),
            "ctx".into(),
            OffsetDateTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn the_first_and_last_events_are_kept_and_those_between_counted() {
        let bound = EventBound { first: 2, last: 3 };
        let mut op = observed();
        let evicted: Vec<EventRecord> = (0..10)
            .filter_map(|n| op.record(numbered(n), bound))
            .collect();
        assert_eq!(ids(&op.events), ["e0", "e1", "e7", "e8", "e9"]);
        assert_eq!(op.events_omitted, 5);
        assert_eq!(ids(&evicted), ["e2", "e3", "e4", "e5", "e6"]);
        assert_eq!(op.revision, 10);
        assert_eq!(op.last_updated_date_time, numbered(9).received_date_time);
        // The first event still takes one place only.
        let mut one = observed();
        assert_eq!(one.record(numbered(0), bound), None);
        assert_eq!(one.events.capacity(), 1);
    }

    #[test]
    fn no_first_events_keeps_the_last_and_no_last_keeps_the_newest() {
        let mut op = observed();
        for n in 0..5 {
            op.record(numbered(n), EventBound { first: 0, last: 2 });
        }
        assert_eq!(ids(&op.events), ["e3", "e4"]);
        assert_eq!(op.events_omitted, 3);
        let mut op = observed();
        for n in 0..5 {
            op.record(numbered(n), EventBound { first: 1, last: 0 });
        }
        assert_eq!(ids(&op.events), ["e0", "e4"]);
        assert_eq!(op.events_omitted, 3);
    }

    #[test]
    fn a_timeline_kept_under_a_larger_bound_does_not_grow() {
        let mut op = observed();
        for n in 0..6 {
            op.record(numbered(n), EventBound { first: 3, last: 3 });
        }
        let evicted = op.record(numbered(6), EventBound { first: 1, last: 1 });
        assert_eq!(evicted.as_ref().and_then(|e| e.id.as_deref()), Some("e1"));
        assert_eq!(ids(&op.events), ["e0", "e2", "e3", "e4", "e5", "e6"]);
        assert_eq!(op.events_omitted, 1);
    }

    #[test]
    fn events_omitted_is_shown_only_when_some_were() {
        let mut op = observed();
        let bound = EventBound { first: 1, last: 1 };
        op.record(numbered(0), bound);
        op.record(numbered(1), bound);
        assert!(
            serde_json::to_value(&op)
                .unwrap()
                .get("eventsOmitted")
                .is_none()
        );
        op.record(numbered(2), bound);
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(json["eventsOmitted"], 1);
        assert_eq!(json["events"].as_array().unwrap().len(), 2);
        let mut back: Operation = serde_json::from_value(json).unwrap();
        back.revision = op.revision;
        assert_eq!(back, op);
    }
}
