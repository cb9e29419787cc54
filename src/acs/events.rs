//! Decoding of ACS callback CloudEvents into [`AcsEvent`], and what each event means.
//!
//! Tolerant by design: a delivery is a JSON array of events or a single event object; every
//! field may be missing or null; unknown fields are ignored; `resultInformation` codes may be
//! numbers or numeric strings. Only JSON that is not an event at all is refused. The call id
//! comes from `data.callConnectionId`, falling back to `source` when `data` lacks it.

use serde::Deserialize;
use serde::de::{self, Deserializer};

use time::OffsetDateTime;

use crate::acs::identifier::{CommunicationIdentifier, TeamsExtensionUser};
use crate::correlation::IncomingEvent;
use crate::operation::{
    CallRef, OperationError, OperationKind, ResultDetails, ResultInfo, Transition,
};

const TYPE_PREFIX: &str = "Microsoft.Communication.";

/// One decoded callback event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcsEvent {
    /// CloudEvent `id`, the deduplication key.
    pub id: Option<String>,
    /// CloudEvent `type`, e.g. `Microsoft.Communication.RemoveParticipantSucceeded`.
    pub event_type: String,
    pub call_connection_id: Option<String>,
    pub operation_context: Option<String>,
    pub result: Option<ResultInfo>,
    /// `data.participant`'s raw id: given, or built from its typed member (a kind callops
    /// does not know keeps its `rawId` only); never a reason to refuse the event.
    pub participant: Option<String>,
}

/// Why a delivery could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the body is empty; expected a CloudEvent or a JSON array of CloudEvents")]
    Empty,
    #[error("expected a CloudEvent object or a JSON array of CloudEvents")]
    NotEvents,
    #[error("invalid CloudEvent JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Decodes a callback body.
pub fn decode(body: &[u8]) -> Result<Vec<AcsEvent>, DecodeError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let events = match first {
        None => return Err(DecodeError::Empty),
        Some(b'[') => serde_json::from_slice::<Vec<CloudEventIn>>(body)?,
        Some(b'{') => vec![serde_json::from_slice::<CloudEventIn>(body)?],
        Some(_) => return Err(DecodeError::NotEvents),
    };
    Ok(events.into_iter().map(CloudEventIn::into_event).collect())
}

impl AcsEvent {
    /// The event name without the `Microsoft.Communication.` prefix.
    pub fn name(&self) -> &str {
        self.event_type
            .strip_prefix(TYPE_PREFIX)
            .unwrap_or(&self.event_type)
    }

    /// The platform-neutral event the store correlates, received at `received`, with the
    /// kind and transition its name reports (see [`meaning_of`]).
    pub fn into_incoming(mut self, received: OffsetDateTime) -> IncomingEvent {
        let result = self.result.take();
        let (kind, transition) = meaning_of(self.name(), result);
        IncomingEvent {
            id: self.id,
            event_type: self.event_type,
            call: self.call_connection_id.map(CallRef::CallConnection),
            context: self.operation_context,
            kind,
            upstream_id: None,
            cancelled: false,
            upstream_status: None,
            transition,
            received,
        }
    }
}

/// Which operation kind an event name reports on, and how it moves it.
///
/// `<Stem>Succeeded|Completed|Accepted` settle as succeeded, `<Stem>Failed` as failed,
/// `<Stem>Canceled` as canceled, `<Stem>Started` marks it running; the kind is the stem in
/// camelCase (`RemoveParticipant` → `removeParticipant`, `Play` → `play`). Other events
/// (`CallConnected`, `ParticipantsUpdated`, ...) carry no transition.
fn meaning_of(name: &str, result: Option<ResultInfo>) -> (OperationKind, Option<Transition>) {
    const SUFFIXES: [&str; 6] = [
        "Succeeded",
        "Completed",
        "Accepted",
        "Failed",
        "Canceled",
        "Started",
    ];
    let split = SUFFIXES.iter().find_map(|suffix| {
        name.strip_suffix(suffix)
            .filter(|stem| !stem.is_empty())
            .map(|stem| (stem, *suffix))
    });
    let Some((stem, suffix)) = split else {
        return (OperationKind::from_name(&lower_camel(name)), None);
    };
    let transition = match suffix {
        "Succeeded" | "Completed" | "Accepted" => Transition::Succeeded { result },
        "Canceled" => Transition::Canceled { result },
        "Started" => Transition::Started,
        _ => {
            let message = result
                .as_ref()
                .and_then(|r| r.message.clone())
                .unwrap_or_else(|| format!("ACS reported {name}"));
            Transition::Failed {
                result,
                error: OperationError {
                    code: name.to_owned(),
                    message,
                },
            }
        }
    };
    (
        OperationKind::from_name(&lower_camel(stem)),
        Some(transition),
    )
}

fn lower_camel(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_ascii_lowercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

#[derive(Deserialize)]
struct CloudEventIn {
    id: Option<String>,
    source: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    data: Option<EventDataIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventDataIn {
    call_connection_id: Option<String>,
    operation_context: Option<String>,
    result_information: Option<ResultInformationIn>,
    #[serde(default, deserialize_with = "lenient_participant")]
    participant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultInformationIn {
    #[serde(default, deserialize_with = "lenient_int")]
    code: Option<i64>,
    #[serde(default, deserialize_with = "lenient_int")]
    sub_code: Option<i64>,
    message: Option<String>,
    #[serde(default, deserialize_with = "lenient_details")]
    sip_details: Option<ResultDetails>,
    #[serde(default, deserialize_with = "lenient_details")]
    q850_details: Option<ResultDetails>,
}

/// `sipDetails` / `q850Details`: `{code, message}`, codes lenient as above.
#[derive(Deserialize)]
struct DetailsIn {
    #[serde(default, deserialize_with = "lenient_int")]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

/// A `sipDetails` or `q850Details` object; anything else (null, a wrong type) is `None`.
fn lenient_details<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<ResultDetails>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        Details(DetailsIn),
        Other(de::IgnoredAny),
    }
    Ok(match Option::<Lenient>::deserialize(deserializer)? {
        Some(Lenient::Details(DetailsIn { code, message }))
            if code.is_some() || message.is_some() =>
        {
            Some(ResultDetails { code, message })
        }
        _ => None,
    })
}

/// A participant's raw id: `rawId`, else built from its typed member the way the SDKs build
/// it; unknown kinds and odd shapes never refuse the event. Read by a visitor rather than an
/// untagged enum, so the callback path buffers nothing: members after a `rawId` are skipped.
fn lenient_participant<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    deserializer.deserialize_any(ParticipantVisitor)
}

/// The members of a `CommunicationIdentifierModel` that give its raw id.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
enum Member {
    RawId,
    CommunicationUser,
    PhoneNumber,
    TeamsExtensionUser,
    #[serde(other)]
    Other,
}

struct ParticipantVisitor;

impl<'de> de::Visitor<'de> for ParticipantVisitor {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a communication identifier")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut raw_id: Option<String> = None;
        let mut built: Option<String> = None;
        while let Some(member) = map.next_key::<Member>()? {
            match member {
                Member::RawId if raw_id.is_none() => {
                    raw_id = map
                        .next_value::<Text>()?
                        .0
                        .filter(|raw_id| !raw_id.is_empty());
                }
                Member::CommunicationUser | Member::PhoneNumber | Member::TeamsExtensionUser
                    if raw_id.is_none() && built.is_none() =>
                {
                    let fields = map.next_value::<TextFields>()?.0;
                    built = raw_id_of(&member, &fields);
                }
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(raw_id.or(built))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// The raw id a typed member gives, from its string fields.
fn raw_id_of(member: &Member, fields: &[(String, String)]) -> Option<String> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    match member {
        Member::CommunicationUser => field("id"),
        Member::PhoneNumber => field("value").map(|value| format!("4:{value}")),
        Member::TeamsExtensionUser => {
            let identifier = CommunicationIdentifier {
                teams_extension_user: Some(TeamsExtensionUser {
                    user_id: field("userId")?,
                    tenant_id: field("tenantId")?,
                    resource_id: field("resourceId")?,
                    cloud: field("cloud"),
                }),
                ..CommunicationIdentifier::default()
            };
            identifier.normalize().ok()?.raw_id
        }
        Member::RawId | Member::Other => None,
    }
}

/// A string, or `None` for any other JSON value (skipped).
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> de::Visitor<'de> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Text, E> {
                Ok(Text(Some(text.to_owned())))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Text, E> {
                Ok(Text(Some(text)))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Text(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
                Ok(Text(None))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// The string fields of an object (anything else, or a non-object, gives none).
struct TextFields(Vec<(String, String)>);

impl<'de> Deserialize<'de> for TextFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> de::Visitor<'de> for FieldsVisitor {
            type Value = TextFields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<TextFields, A::Error> {
                let mut fields = Vec::new();
                while let Some((key, Text(value))) = map.next_entry::<String, Text>()? {
                    fields.extend(value.map(|value| (key, value)));
                }
                Ok(TextFields(fields))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<TextFields, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(TextFields(Vec::new()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TextFields, E> {
                Ok(TextFields(Vec::new()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<TextFields, E> {
                Ok(TextFields(Vec::new()))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<TextFields, E> {
                Ok(TextFields(Vec::new()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<TextFields, E> {
                Ok(TextFields(Vec::new()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<TextFields, E> {
                Ok(TextFields(Vec::new()))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<TextFields, E> {
                Ok(TextFields(Vec::new()))
            }
        }
        deserializer.deserialize_any(FieldsVisitor)
    }
}

impl CloudEventIn {
    fn into_event(self) -> AcsEvent {
        let data = self.data.unwrap_or(EventDataIn {
            call_connection_id: None,
            operation_context: None,
            result_information: None,
            participant: None,
        });
        let call_connection_id = data
            .call_connection_id
            .filter(|id| !id.is_empty())
            .or_else(|| self.source.as_deref().and_then(call_id_from_source));
        AcsEvent {
            id: self.id.filter(|id| !id.is_empty()),
            event_type: self.event_type.unwrap_or_else(|| "unknown".to_owned()),
            call_connection_id,
            operation_context: data.operation_context.filter(|c| !c.is_empty()),
            result: data.result_information.map(|r| ResultInfo {
                code: r.code,
                sub_code: r.sub_code,
                message: r.message,
                sip_details: r.sip_details.map(Box::new),
                q850_details: r.q850_details.map(Box::new),
                ..ResultInfo::default()
            }),
            participant: data.participant,
        }
    }
}

/// `calling/callConnections/{id}[/...]` → `{id}`.
fn call_id_from_source(source: &str) -> Option<String> {
    let rest = source.split("callConnections/").nth(1)?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then(|| id.to_owned())
}

/// An integer given as a JSON number or a numeric string; anything else is `None`.
fn lenient_int<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        Int(i64),
        Float(f64),
        Text(String),
        Other(de::IgnoredAny),
    }
    Ok(match Option::<Lenient>::deserialize(deserializer)? {
        Some(Lenient::Int(n)) => Some(n),
        Some(Lenient::Float(f)) if f.fract() == 0.0 && f.abs() < 9e15 => Some(f as i64),
        Some(Lenient::Text(text)) => text.trim().parse().ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::operation::OperationKind::*;

    /// The kind and transition an event reports.
    fn meaning(event: AcsEvent) -> (OperationKind, Option<Transition>) {
        let incoming = event.into_incoming(OffsetDateTime::UNIX_EPOCH);
        (incoming.kind, incoming.transition)
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/acs/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn every_fixture_decodes() {
        let dir = format!("{}/tests/fixtures/acs", env!("CARGO_MANIFEST_DIR"));
        let mut count = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if !name.ends_with(".json") || name.starts_with("spec_") {
                continue;
            }
            let events =
                decode(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(events.len(), 1, "{name}");
            assert!(events[0].call_connection_id.is_some(), "{name}");
            assert!(events[0].id.is_some(), "{name}");
            count += 1;
        }
        assert!(count >= 13, "only {count} fixtures");
    }

    #[test]
    fn remove_participant_events_settle() {
        let events = decode(&fixture("java_RemoveParticipantSucceeded.json")).unwrap();
        let event = &events[0];
        assert_eq!(
            event.call_connection_id.as_deref(),
            Some("callConnectionId")
        );
        assert_eq!(event.operation_context.as_deref(), Some("context"));
        assert_eq!(
            meaning(event.clone()),
            (
                RemoveParticipant,
                Some(Transition::Succeeded { result: None })
            )
        );
        let events = decode(&fixture("java_RemoveParticipantFailed.json")).unwrap();
        let (kind, transition) = meaning(events[0].clone());
        assert_eq!(kind, RemoveParticipant);
        let Some(Transition::Failed { error, .. }) = transition else {
            panic!("{transition:?}");
        };
        assert_eq!(error.code, "RemoveParticipantFailed");
    }

    #[test]
    fn other_events_name_their_kind() {
        let check = |name: &str, kind: &str, transition: Option<&str>| {
            let (got_kind, got_transition) = meaning(decode(&fixture(name)).unwrap().remove(0));
            assert_eq!(got_kind.as_str(), kind, "{name}");
            let got = got_transition.map(|t| match t {
                Transition::Succeeded { .. } => "succeeded",
                Transition::Failed { .. } => "failed",
                Transition::Canceled { .. } => "canceled",
                Transition::Started | Transition::Accepted => "running",
            });
            assert_eq!(got, transition, "{name}");
        };
        check("java_PlayCompleted.json", "play", Some("succeeded"));
        check("java_PlayFailed.json", "play", Some("failed"));
        check(
            "java_RecognizeCompleted_dtmf.json",
            "recognize",
            Some("succeeded"),
        );
        check(
            "java_CallTransferAccepted.json",
            "callTransfer",
            Some("succeeded"),
        );
        check(
            "java_CancelAddParticipantSucceeded.json",
            "cancelAddParticipant",
            Some("succeeded"),
        );
        check("python_recorded_CallConnected.json", "callConnected", None);
        check("java_ParticipantsUpdated.json", "participantsUpdated", None);
    }

    #[test]
    fn result_information_is_kept_and_lenient() {
        let events = decode(&fixture("java_PlayFailed.json")).unwrap();
        let result = events[0].result.clone().unwrap();
        assert_eq!((result.code, result.sub_code), (Some(400), Some(8536)));
        let body = br#"{"type":"Microsoft.Communication.RemoveParticipantFailed","data":{"resultInformation":{"code":"404","subCode":8522.0,"message":null}}}"#;
        let event = &decode(body).unwrap()[0];
        let result = event.result.clone().unwrap();
        assert_eq!(
            (result.code, result.sub_code, result.message),
            (Some(404), Some(8522), None)
        );
    }

    #[test]
    fn sip_and_q850_details_are_kept() {
        let body = br#"{"type":"Microsoft.Communication.RemoveParticipantFailed","data":{"resultInformation":{"code":487,"subCode":0,"message":"m","sipDetails":{"code":"487","message":"Request Terminated"},"q850Details":{"code":31,"message":"Normal, unspecified"}}}}"#;
        let result = decode(body).unwrap()[0].result.clone().unwrap();
        assert_eq!(
            result.sip_details.as_deref(),
            Some(&ResultDetails {
                code: Some(487),
                message: Some("Request Terminated".to_owned())
            })
        );
        assert_eq!(result.q850_details.unwrap().code, Some(31));
        // Odd shapes are dropped, not refused.
        let body = br#"{"type":"x","data":{"resultInformation":{"code":200,"sipDetails":"487","q850Details":null}}}"#;
        let result = decode(body).unwrap()[0].result.clone().unwrap();
        assert_eq!((result.sip_details, result.q850_details), (None, None));
    }

    #[test]
    fn participants_of_any_kind_are_kept_by_raw_id() {
        let participant = |json: &str| {
            let body = format!(
                r#"{{"id":"e","type":"Microsoft.Communication.RemoveParticipantSucceeded","data":{{"callConnectionId":"c","participant":{json}}}}}"#
            );
            decode(body.as_bytes()).unwrap().remove(0).participant
        };
        let teams_extension = r#"{"kind":"teamsExtensionUser","teamsExtensionUser":{"userId":"u","tenantId":"t","resourceId":"r","cloud":"gcch"}}"#;
        assert_eq!(
            participant(teams_extension).as_deref(),
            Some("8:gcch-acs:r_t_u")
        );
        assert_eq!(
            participant(r#"{"rawId":"8:acs:r_t_u","kind":"teamsExtensionUser","teamsExtensionUser":{"userId":"u","tenantId":"t","resourceId":"r","cloud":"public"}}"#).as_deref(),
            Some("8:acs:r_t_u")
        );
        // A kind from the future: its rawId is kept, its member ignored.
        assert_eq!(
            participant(
                r#"{"kind":"holographicUser","rawId":"99:holo:x","holographicUser":{"x":[1]}}"#
            )
            .as_deref(),
            Some("99:holo:x")
        );
        assert_eq!(participant(r#"{"kind":"holographicUser"}"#), None);
        assert_eq!(participant("42"), None);
        assert_eq!(participant(r#"{"communicationUser":{"id":5}}"#), None);
    }

    /// `version` and `publicEventType` are SDK model fields, not the REST spec's.
    #[test]
    fn version_and_public_event_type_are_not_required() {
        let body = br#"[{"id":"e1","source":"calling/callConnections/c","type":"Microsoft.Communication.RemoveParticipantSucceeded","data":{"callConnectionId":"c","operationContext":"ctx","resultInformation":{"code":200,"subCode":0,"message":"ok"}}}]"#;
        let events = decode(body).unwrap();
        assert_eq!(events[0].operation_context.as_deref(), Some("ctx"));
        let (kind, transition) = meaning(events[0].clone());
        assert_eq!(kind, RemoveParticipant);
        assert!(matches!(transition, Some(Transition::Succeeded { .. })));
    }

    #[test]
    fn missing_fields_are_tolerated_and_source_is_a_fallback() {
        let event = &decode(br#"[{"source":"calling/callConnections/abc/ParticipantsUpdated","data":null,"extra":1}]"#).unwrap()[0];
        assert_eq!(event.call_connection_id.as_deref(), Some("abc"));
        assert_eq!(event.event_type, "unknown");
        assert_eq!(event.id, None);
        assert!(decode(b"[]").unwrap().is_empty());
    }

    #[test]
    fn non_events_are_refused() {
        for body in [
            &b""[..],
            b"  ",
            b"42",
            b"\"x\"",
            b"[1]",
            b"{",
            b"[{\"id\": 5}]",
            b"{\"data\": []}",
        ] {
            assert!(decode(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
