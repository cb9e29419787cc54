//! The request bodies the benchmark sends: a `participants:remove` request and the
//! RemoveParticipantSucceeded CloudEvent delivery ACS sends for it (the shape of
//! `tests/fixtures/acs/java_RemoveParticipantSucceeded.json` and of the emulator's own
//! callbacks, about 700 bytes).

use serde_json::json;

/// The emulated ACS resource id in participant raw ids (any fixed GUID does).
const RESOURCE: &str = "5e1d4d5a-0d3c-4b57-9c0e-ca11095e0a7b";

/// One operation of a run: which call it is on, its context and the participant removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpSpec {
    pub call: String,
    pub context: String,
    pub raw_id: String,
}

impl OpSpec {
    /// Operation `index` of a run named `prefix`, on one of `calls` call connections.
    pub fn new(prefix: &str, index: usize, calls: usize) -> Self {
        let call = index % calls.max(1);
        Self {
            call: format!("{prefix}-call-{call:06}"),
            context: format!("{prefix}-ctx-{index:08}"),
            raw_id: format!(
                "8:acs:{RESOURCE}_0000002a-{:04x}-{:04x}",
                index >> 16,
                index & 0xffff
            ),
        }
    }

    /// The API path that starts the removal.
    pub fn remove_path(&self) -> String {
        format!("/v1/acs/callConnections/{}/participants:remove", self.call)
    }

    /// The body of `POST …participants:remove`.
    pub fn remove_body(&self) -> String {
        json!({
            "participantToRemove": { "rawId": self.raw_id },
            "operationContext": self.context,
        })
        .to_string()
    }

    /// The RemoveParticipantSucceeded delivery (a one-element CloudEvent array) for this
    /// operation, with CloudEvent id `event_id`.
    pub fn succeeded_body(&self, event_id: &str) -> String {
        let event_type = "Microsoft.Communication.RemoveParticipantSucceeded";
        let source = format!("calling/callConnections/{}", self.call);
        json!([{
            "id": event_id,
            "source": source,
            "type": event_type,
            "data": {
                "operationContext": self.context,
                "participant": { "rawId": self.raw_id },
                "resultInformation": {
                    "code": 200,
                    "subCode": 0,
                    "message": "Success",
                },
                "callConnectionId": self.call,
                "serverCallId": "aHR0cHM6Ly9hcGkuZmxpZ2h0cHJveHkuc2t5cGUuY29tL2NvbnYvYmVuY2g",
                "correlationId": "b880bd5a-1916-470a-b43d-aabf3caff91c",
            },
            "time": "2026-11-23T07:25:18.1234567+00:00",
            "specversion": "1.0",
            "datacontenttype": "application/json",
            "subject": source,
        }])
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_is_a_realistic_size_and_names_its_operation() {
        let op = OpSpec::new("ingest-durable-jwt", 123_456, 1000);
        assert_eq!(op.call, "ingest-durable-jwt-call-000456");
        let body = op.succeeded_body("c3220fa3-79bd-473e-96a2-3ecb5be7d71f");
        assert!((650..=750).contains(&body.len()), "{} bytes", body.len());
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        let data = &value[0]["data"];
        assert_eq!(data["callConnectionId"], op.call);
        assert_eq!(data["operationContext"], op.context);
        assert_eq!(data["participant"]["rawId"], op.raw_id);
        assert_eq!(value[0]["id"], "c3220fa3-79bd-473e-96a2-3ecb5be7d71f");
    }

    #[test]
    fn operations_of_a_run_have_distinct_contexts_and_participants() {
        let a = OpSpec::new("p", 1, 10);
        let b = OpSpec::new("p", 11, 10);
        assert_eq!(a.call, b.call);
        assert_ne!(a.context, b.context);
        assert_ne!(a.raw_id, b.raw_id);
        let body: serde_json::Value = serde_json::from_str(&a.remove_body()).unwrap();
        assert_eq!(body["participantToRemove"]["rawId"], a.raw_id);
    }
}
