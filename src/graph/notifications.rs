//! Decoding Graph `commsNotifications` into platform-neutral events.
//!
//! Tolerant of every variant seen in Microsoft's docs and SDK tests: `resourceUrl` or the
//! legacy `resource` (`/communications/calls/…` or `/app/calls/…`), `resourceData` as an
//! object or an array, a missing `@odata.type` (envelope or data), `code`/`subcode` as
//! numbers or strings, duplicate keys (the last wins), status values in any case, and ids
//! in either GUID spelling ([`super::ids`]). Malformed means: not JSON, or not shaped like
//! notifications at all; anything else is decoded as far as it goes and kept.
//!
//! Graph notifications carry no id, and a redelivery repeats the same bytes: each
//! notification's dedupe id is a digest of its own JSON text.

use std::fmt::Write;

use crate::crypto::sha256;
use serde_json::Value;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::correlation::{GENERIC_KIND, IncomingEvent, UpstreamId};
use crate::graph::ids::canonical;
use crate::operation::{CallRef, OperationError, OperationKind, ResultInfo, Transition};

/// Graph's sub-code for "the operation was cancelled".
const CANCELLED_SUBCODE: i64 = 8508;

/// One decoded notification item (or one element of an array `resourceData`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphEvent {
    pub incoming: IncomingEvent,
    /// Set when the event says the call is over (state `terminated`, or the call resource
    /// `deleted`): the call's own account of why.
    pub call_ended: Option<Option<ResultInfo>>,
}

/// A body that is not a `commsNotifications` payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the body is not valid JSON: {0}")]
    Json(String),
    #[error(
        "expected a commsNotifications object {{\"value\": [...]}}, a notification, or an array of notifications"
    )]
    Shape,
    #[error("value[{0}] is not a notification object")]
    Item(usize),
}

/// Decodes a delivery received at `received`.
pub fn decode(body: &[u8], received: OffsetDateTime) -> Result<Vec<GraphEvent>, DecodeError> {
    // Graph was seen declaring `charset=Windows-1252`: a body that is not UTF-8 is read with
    // its odd bytes replaced (they can only sit in free text such as display names; ids and
    // contexts are ASCII), rather than refused and redelivered forever. A BOM is skipped.
    let text = String::from_utf8_lossy(body);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let items = split(text)?;
    let mut events = Vec::with_capacity(items.len());
    for (index, raw) in items.iter().enumerate() {
        let item: Value = serde_json::from_str(raw.get())
            .map_err(|error| DecodeError::Json(error.to_string()))?;
        let Value::Object(_) = item else {
            return Err(DecodeError::Item(index));
        };
        let digest = digest(raw.get().as_bytes());
        decode_item(&item, &digest, received, &mut events);
    }
    Ok(events)
}

/// The notification items of a body, as raw JSON.
fn split(text: &str) -> Result<Vec<&RawValue>, DecodeError> {
    let json = |error: serde_json::Error| DecodeError::Json(error.to_string());
    // One pass over the body: the first character says which shape to read.
    match text.trim_start().chars().next() {
        Some('[') => serde_json::from_str(text).map_err(json),
        Some('{') => {
            #[derive(serde::Deserialize)]
            struct Envelope<'a> {
                #[serde(borrow)]
                value: Option<&'a RawValue>,
                #[serde(rename = "changeType")]
                change_type: Option<&'a RawValue>,
                #[serde(rename = "resourceData")]
                resource_data: Option<&'a RawValue>,
            }
            let envelope: Envelope<'_> = serde_json::from_str(text).map_err(json)?;
            match envelope.value {
                Some(value) => serde_json::from_str(value.get()).map_err(|_| DecodeError::Shape),
                // A single notification, not wrapped (rare: read again as a whole).
                None if envelope.change_type.is_some() || envelope.resource_data.is_some() => {
                    Ok(vec![serde_json::from_str(text).map_err(json)?])
                }
                None => Err(DecodeError::Shape),
            }
        }
        // Not an object or an array: still say whether it is JSON at all.
        _ => match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => Err(DecodeError::Shape),
            Err(error) => Err(json(error)),
        },
    }
}

fn digest(bytes: &[u8]) -> String {
    let hash = sha256(bytes);
    let mut text = String::with_capacity(7 + 32);
    text.push_str("sha256:");
    for byte in &hash[..16] {
        // Writing to a String cannot fail.
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Where a `resourceUrl` points.
#[derive(Debug, Default, PartialEq, Eq)]
struct Resource {
    call: Option<String>,
    operation: Option<String>,
    /// The collection or sub-resource after the call (`operations`, `participants`, ...).
    child: Option<String>,
}

fn parse_resource(url: &str) -> Resource {
    let mut segments = url.split(['/', '?']).filter(|s| !s.is_empty());
    let mut resource = Resource::default();
    while let Some(segment) = segments.next() {
        if segment.eq_ignore_ascii_case("calls") {
            resource.call = segments.next().map(|id| canonical(id).into_owned());
            resource.child = segments.next().map(str::to_owned);
            if resource
                .child
                .as_deref()
                .is_some_and(|child| child.eq_ignore_ascii_case("operations"))
            {
                resource.operation = segments.next().map(|id| canonical(id).into_owned());
            }
            break;
        }
    }
    resource
}

fn decode_item(item: &Value, digest: &str, received: OffsetDateTime, out: &mut Vec<GraphEvent>) {
    let change = item
        .get("changeType")
        .and_then(Value::as_str)
        .unwrap_or("notified");
    let url = item
        .get("resourceUrl")
        .and_then(Value::as_str)
        .or_else(|| item.get("resource").and_then(Value::as_str))
        .unwrap_or("");
    let resource = parse_resource(url);
    match item.get("resourceData") {
        Some(Value::Array(elements)) => {
            for (index, data) in elements.iter().enumerate() {
                let id = format!("{digest}:{index}");
                out.push(decode_data(data, &resource, change, id, received));
            }
        }
        Some(data) => out.push(decode_data(
            data,
            &resource,
            change,
            digest.to_owned(),
            received,
        )),
        None => out.push(decode_data(
            &Value::Null,
            &resource,
            change,
            digest.to_owned(),
            received,
        )),
    }
}

fn decode_data(
    data: &Value,
    resource: &Resource,
    change: &str,
    id: String,
    received: OffsetDateTime,
) -> GraphEvent {
    let text = |name: &str| {
        data.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let type_name = text("@odata.type")
        .map(|t| {
            t.trim_start_matches('#')
                .trim_start_matches("microsoft.graph.")
        })
        .or_else(|| {
            // No type: infer from where the resource points.
            match (&resource.operation, resource.child.as_deref()) {
                (Some(_), _) => Some(GENERIC_KIND),
                (None, Some(child)) if child.eq_ignore_ascii_case("participants") => {
                    Some("participant")
                }
                (None, None) if resource.call.is_some() => Some("call"),
                _ => None,
            }
        })
        .unwrap_or("unknown")
        .to_owned();
    let call = resource.call.clone().map(CallRef::Call);
    let mut incoming = IncomingEvent {
        id: Some(id),
        event_type: format!("{type_name}.{change}"),
        call,
        context: None,
        kind: OperationKind::Observed(type_name.as_str().into()),
        upstream_id: None,
        cancelled: false,
        upstream_status: None,
        transition: None,
        received,
    };
    let is_operation = type_name.ends_with("Operation") || type_name == GENERIC_KIND;
    if !is_operation {
        let call_ended = (type_name == "call"
            && (text("state").is_some_and(|s| s.eq_ignore_ascii_case("terminated"))
                || (change.eq_ignore_ascii_case("deleted") && resource.child.is_none())))
        .then(|| result_info(data));
        return GraphEvent {
            incoming,
            call_ended,
        };
    }

    let kind = kind_of(&type_name);
    let result = result_info(data);
    let cancelled = result.as_ref().is_some_and(is_cancellation);
    incoming.upstream_status = text("status").map(str::to_owned);
    let status = text("status").map(str::to_ascii_lowercase);
    incoming.transition = match status.as_deref() {
        Some("completed") => Some(Transition::Succeeded { result }),
        Some("failed") => {
            let message = result
                .as_ref()
                .and_then(|r| r.message.clone())
                .unwrap_or_else(|| "Graph reported the operation failed".to_owned());
            let code = if cancelled {
                "OperationCanceled".to_owned()
            } else {
                failed_code(&kind)
            };
            Some(Transition::Failed {
                result,
                error: OperationError { code, message },
            })
        }
        Some("running" | "notstarted") => Some(Transition::Started),
        // Unknown statuses are kept on the timeline and change nothing.
        _ => None,
    };
    incoming.kind = kind;
    incoming.cancelled = cancelled;
    incoming.context = text("clientContext").map(str::to_owned);
    incoming.upstream_id = text("id")
        .map(|id| UpstreamId::new(&canonical(id)))
        .or_else(|| resource.operation.as_deref().map(UpstreamId::new));
    GraphEvent {
        incoming,
        call_ended: None,
    }
}

/// The operation kind a Graph type reports on: `playPromptOperation` → `playPrompt`,
/// `recordOperation` → `recordResponse` (the action that starts it), our own
/// `cancelMediaProcessing`, and the generic `commsOperation` as is.
fn kind_of(type_name: &str) -> OperationKind {
    match type_name {
        "cancelMediaProcessingOperation" => OperationKind::CancelMediaProcessing,
        "recordOperation" => OperationKind::Observed("recordResponse".into()),
        GENERIC_KIND => OperationKind::Observed(GENERIC_KIND.into()),
        other => OperationKind::Observed(
            other
                .strip_suffix("Operation")
                .filter(|stem| !stem.is_empty())
                .unwrap_or(other)
                .into(),
        ),
    }
}

/// `PlayPromptFailed`, `CancelMediaProcessingFailed`, ...
fn failed_code(kind: &OperationKind) -> String {
    let name = kind.as_str();
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => format!("{}{}Failed", first.to_ascii_uppercase(), chars.as_str()),
        None => "OperationFailed".to_owned(),
    }
}

/// True for the marks Graph puts on an operation that a cancel stopped.
fn is_cancellation(result: &ResultInfo) -> bool {
    result.completion_reason.as_deref().is_some_and(|reason| {
        reason.eq_ignore_ascii_case("operationCanceled")
            || reason.eq_ignore_ascii_case("mediaOperationCanceled")
    }) || (result.code == Some(400) && result.sub_code == Some(CANCELLED_SUBCODE))
}

/// `resultInfo` (numbers or numeric strings) and `completionReason`, when either is there.
pub(crate) fn result_info(data: &Value) -> Option<ResultInfo> {
    let info = data.get("resultInfo").filter(|v| v.is_object());
    let number = |name: &str| {
        info.and_then(|info| info.get(name))
            .and_then(|value| match value {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            })
    };
    let result = ResultInfo {
        code: number("code"),
        sub_code: number("subcode").or_else(|| number("subCode")),
        message: info
            .and_then(|info| info.get("message"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        completion_reason: data
            .get("completionReason")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        ..ResultInfo::default()
    };
    (result != ResultInfo::default()).then_some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::operation::OperationStatus;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/graph/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn one(name: &str) -> GraphEvent {
        let mut events = decode(&fixture(name), OffsetDateTime::UNIX_EPOCH).unwrap();
        assert_eq!(events.len(), 1, "{name}");
        events.remove(0)
    }

    const CALL: &str = "57dab8b1-894c-409a-b240-bd8beae78896";

    #[test]
    fn a_cancelled_recording_names_its_call_operation_and_context() {
        let event = one("v1_cancelmediaprocessing_notification_record_canceled.json").incoming;
        assert_eq!(event.call, Some(CallRef::Call(CALL.into())));
        assert_eq!(event.kind.as_str(), "recordResponse");
        assert_eq!(
            event.context.as_deref(),
            Some("d45324c1-fcb5-430a-902c-f20af696537c")
        );
        assert_eq!(
            event.upstream_id.as_ref().map(UpstreamId::shown),
            Some("0fe0623f-d628-42ed-b4bd-8ac290072cc5")
        );
        assert!(event.cancelled);
        assert_eq!(event.event_type, "recordOperation.deleted");
        let Some(Transition::Failed { result, error }) = event.transition else {
            panic!("{:?}", event.transition);
        };
        assert_eq!(error.code, "OperationCanceled");
        let result = result.unwrap();
        assert_eq!((result.code, result.sub_code), (Some(400), Some(8508)));
        assert_eq!(
            result.completion_reason.as_deref(),
            Some("operationCanceled")
        );
    }

    #[test]
    fn duplicate_keys_and_legacy_resource_are_tolerated() {
        let event = one(
            "HISTORICAL_beta_cancelmediaprocessing_notification_record_canceled_DUPLICATE_subcode_key.json",
        )
        .incoming;
        assert!(event.cancelled);
        assert_eq!(
            event.context.as_deref(),
            Some("55178b4b-3b9f-4f71-9976-e1e031e386e1")
        );
        let event =
            one("beta_legacy_playprompt_notification_completed_resource_only.json").incoming;
        assert_eq!(event.call, Some(CallRef::Call(CALL.into())));
        assert_eq!(event.kind.as_str(), "playPrompt");
        // No `id` in the data: the operation id comes from the resource path.
        assert_eq!(
            event.upstream_id.as_ref().map(UpstreamId::shown),
            Some("0fe0623f-d628-42ed-b4bd-8ac290072cc5")
        );
        assert_eq!(
            event.transition,
            Some(Transition::Succeeded { result: None })
        );
    }

    #[test]
    fn a_generic_comms_operation_without_envelope_type_applies_to_any_kind() {
        let event = one(
            "HISTORICAL_beta_cancelmediaprocessing_notification_commsOperation_completed_no_envelope_type.json",
        )
        .incoming;
        assert_eq!(event.kind.as_str(), GENERIC_KIND);
        assert_eq!(
            event.upstream_id.as_ref().map(UpstreamId::shown),
            Some("0fe0623f-d628-42ed-b4bd-8ac290072cc5")
        );
        let mut op = crate::operation::Operation::new(
            OperationKind::CancelMediaProcessing,
            CallRef::Call(CALL.into()),
            "x".into(),
            OffsetDateTime::UNIX_EPOCH,
        );
        crate::correlation::apply(
            &mut op,
            &event,
            crate::operation::EventBound { first: 1, last: 1 },
        );
        assert_eq!(op.status, OperationStatus::Succeeded);
    }

    #[test]
    fn call_state_and_termination() {
        let ended = one("v1_delete_notification_terminated.json");
        assert_eq!(ended.incoming.call, Some(CallRef::Call(CALL.into())));
        assert_eq!(ended.incoming.event_type, "call.deleted");
        let result = ended.call_ended.clone().unwrap().unwrap();
        // Codes given as strings.
        assert_eq!((result.code, result.sub_code), (Some(200), Some(5001)));
        assert_eq!(ended.incoming.context, None);
        let established = one("v1_answer_notification_established.json");
        assert_eq!(established.call_ended, None);
        assert_eq!(established.incoming.call, Some(CallRef::Call(CALL.into())));
        assert_eq!(
            one("v1_delete_notification_terminating.json").call_ended,
            None
        );
    }

    #[test]
    fn an_array_resource_data_gives_one_event_per_element() {
        let events = decode(
            &fixture("v1_invite_notification_participants_roster_updated.json"),
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(events.len(), 1);
        let events = decode(
            &fixture("HISTORICAL_beta_commsnotification_example_participants_collection.json"),
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(events.len(), 2);
        assert_ne!(events[0].incoming.id, events[1].incoming.id);
        assert_eq!(events[0].incoming.event_type, "participant.created");
        assert_eq!(
            events[0].incoming.call,
            Some(CallRef::Call("1d6de2d4-cd51-4309-8daa-70768651088e".into()))
        );
    }

    #[test]
    fn every_notification_fixture_decodes() {
        let dir = format!("{}/tests/fixtures/graph", env!("CARGO_MANIFEST_DIR"));
        let mut decoded = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let body = std::fs::read(&path).unwrap();
            let is_notification = serde_json::from_slice::<Value>(&body)
                .ok()
                .is_some_and(|v| v.get("value").is_some());
            if is_notification {
                let events = decode(&body, OffsetDateTime::UNIX_EPOCH)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!events.is_empty(), "{}", path.display());
                assert!(
                    events.iter().all(|e| e.incoming.call.is_some()),
                    "{}",
                    path.display()
                );
                decoded += 1;
            }
        }
        assert!(decoded >= 15, "{decoded}");
    }

    #[test]
    fn same_bytes_same_id_other_bytes_other_id() {
        let body = fixture("v1_playprompt_notification_completed.json");
        let a = decode(&body, OffsetDateTime::UNIX_EPOCH).unwrap();
        let b = decode(&body, OffsetDateTime::UNIX_EPOCH).unwrap();
        assert_eq!(a[0].incoming.id, b[0].incoming.id);
        let other = decode(
            &fixture("v1_recordresponse_notification_completed.json"),
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_ne!(a[0].incoming.id, other[0].incoming.id);
    }

    #[test]
    fn status_in_any_case_and_unknown_statuses() {
        let body = |status: &str| {
            format!(
                r##"{{"value":[{{"changeType":"deleted","resourceUrl":"/communications/calls/c1/operations/o1","resourceData":{{"@odata.type":"#microsoft.graph.playPromptOperation","status":"{status}","clientContext":"x"}}}}]}}"##
            )
        };
        let transition = |status: &str| {
            decode(body(status).as_bytes(), OffsetDateTime::UNIX_EPOCH).unwrap()[0]
                .incoming
                .transition
                .clone()
        };
        assert_eq!(
            transition("Completed"),
            Some(Transition::Succeeded { result: None })
        );
        assert_eq!(transition("Running"), Some(Transition::Started));
        assert_eq!(transition("paused"), None);
        let event =
            &decode(body("paused").as_bytes(), OffsetDateTime::UNIX_EPOCH).unwrap()[0].incoming;
        assert_eq!(event.upstream_status.as_deref(), Some("paused"));
        assert!(
            matches!(transition("FAILED"), Some(Transition::Failed { error, .. }) if error.code == "PlayPromptFailed")
        );
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for body in [
            &b"not json"[..],
            b"42",
            b"\"text\"",
            b"{}",
            b"{\"value\": 3}",
            b"{\"value\": [3]}",
            b"[1]",
            &[0xff, 0xfe],
        ] {
            assert!(
                decode(body, OffsetDateTime::UNIX_EPOCH).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // An empty list is a valid (if pointless) delivery.
        assert_eq!(
            decode(b"{\"value\": []}", OffsetDateTime::UNIX_EPOCH).unwrap(),
            vec![]
        );
    }

    #[test]
    fn windows_1252_bytes_and_a_bom_are_tolerated() {
        // "Müller" as Windows-1252 writes it: not UTF-8.
        let mut body = b"\xef\xbb\xbf".to_vec();
        body.extend_from_slice(
            br##"{"value":[{"changeType":"created","resourceUrl":"/communications/calls/c1","resourceData":{"@odata.type":"#microsoft.graph.call","state":"incoming","source":{"identity":{"user":{"displayName":"M"##,
        );
        body.push(0xfc);
        body.extend_from_slice(br#"ller"}}}}}]}"#);
        let events = decode(&body, OffsetDateTime::UNIX_EPOCH).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].incoming.call, Some(CallRef::Call("c1".into())));
    }

    #[test]
    fn a_bare_notification_or_an_array_of_them_is_read_too() {
        let body = fixture("v1_playprompt_notification_completed.json");
        let wrapped: Value = serde_json::from_slice(&body).unwrap();
        let item = &wrapped["value"][0];
        let want = decode(&body, OffsetDateTime::UNIX_EPOCH).unwrap();
        let bare = decode(item.to_string().as_bytes(), OffsetDateTime::UNIX_EPOCH).unwrap();
        let array = decode(
            Value::Array(vec![item.clone(), item.clone()])
                .to_string()
                .as_bytes(),
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(bare.len(), 1);
        assert_eq!(array.len(), 2);
        for event in bare.iter().chain(&array) {
            assert_eq!(event.incoming.context, want[0].incoming.context);
            assert_eq!(event.incoming.transition, want[0].incoming.transition);
        }
    }

    #[test]
    fn resource_paths() {
        let r = parse_resource(
            "/app/calls/57DAB8B1894C409AB240BD8BEAE78896/operations/0FE0623FD62842EDB4BD8AC290072CC5",
        );
        assert_eq!(r.call.as_deref(), Some(CALL));
        assert_eq!(
            r.operation.as_deref(),
            Some("0fe0623f-d628-42ed-b4bd-8ac290072cc5")
        );
        assert_eq!(
            parse_resource("/communications/calls/abc").call.as_deref(),
            Some("abc")
        );
        assert_eq!(parse_resource(""), Resource::default());
    }
}
