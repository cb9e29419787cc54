//! What the emulator does for one call connection.

use serde::{Deserialize, Serialize};

/// A scripted behaviour. Every field is optional in JSON; the default is an immediate
/// success.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Script {
    /// Which event follows the 202.
    pub outcome: Outcome,
    /// `resultInformation` of that event (a realistic default otherwise).
    pub result_information: Option<ResultInformation>,
    /// Delay between the 202 and the callback.
    pub callback_delay_ms: u64,
    /// Extra deliveries of the same event (same CloudEvent id).
    pub duplicates: u32,
    /// Deliver the callback before answering 202.
    pub callback_before_response: bool,
    /// Answer 202 and never call back.
    pub no_callback: bool,
    /// Statuses answered to the first attempts before accepting (e.g. `[429, 503]`).
    pub fail_first: Vec<u16>,
    /// `Retry-After` sent with those statuses.
    pub retry_after_secs: Option<f64>,
    /// Refuse for good with this status and ACS error.
    pub reject: Option<Reject>,
    /// The call has ended: reads of it and its participants answer 404 (8522).
    pub call_ended: bool,
    /// Reads of the call and its participants answer this status (e.g. 503) instead.
    pub read_status: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    #[default]
    Succeed,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultInformation {
    pub code: i64,
    pub sub_code: i64,
    pub message: String,
}

/// A final refusal, e.g. `{"status": 404, "code": "8522", "message": "Call not found"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub status: u16,
    pub code: String,
    pub message: String,
}
