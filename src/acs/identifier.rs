//! `CommunicationIdentifierModel`: who a participant is.
//!
//! Clients may send any valid form (a `rawId` alone, a typed member alone, both, with or
//! without `kind`); [`CommunicationIdentifier::normalize`] turns it into what the official
//! SDK sends: `rawId` plus the typed member, no `kind` for the known kinds (those of the
//! 2025-06-30 common models, `teamsExtensionUser` included). Kinds this service does not know
//! pass through unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The identifier model. Unknown members are kept so that new kinds pass through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommunicationIdentifier {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::error::optional_object"
    )]
    pub communication_user: Option<CommunicationUser>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::error::optional_object"
    )]
    pub phone_number: Option<PhoneNumber>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::error::optional_object"
    )]
    pub microsoft_teams_user: Option<MicrosoftTeamsUser>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::error::optional_object"
    )]
    pub microsoft_teams_app: Option<MicrosoftTeamsApp>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::error::optional_object"
    )]
    pub teams_extension_user: Option<TeamsExtensionUser>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommunicationUser {
    #[schema(
        pattern = r"^8:[^:\s]+:\S.*$",
        max_length = 1024,
        example = "8:acs:resource_user"
    )]
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhoneNumber {
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicrosoftTeamsUser {
    pub user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_anonymous: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicrosoftTeamsApp {
    pub app_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
}

/// A Teams Phone user extended through a Communication Services resource. Its raw id is
/// `8:acs:` (`8:dod-acs:`, `8:gcch-acs:` by cloud) then `{resourceId}_{tenantId}_{userId}`,
/// as the SDKs build it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamsExtensionUser {
    pub user_id: String,
    pub tenant_id: String,
    pub resource_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
}

/// The schema says what [`CommunicationIdentifier::normalize`] accepts: a `rawId` alone or
/// exactly one typed member, each value not blank and at most 1024 characters. Written by
/// hand because a derived schema cannot say "one of" for optional members.
impl utoipa::PartialSchema for CommunicationIdentifier {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let text = |pattern: &str, example: &str| {
            serde_json::json!({
                "type": "string", "pattern": pattern, "maxLength": MAX_ID_LEN, "example": example
            })
        };
        let word = |example: &str| text(r"\S", example);
        // An extensible enum in the SDKs: passed on as given.
        let cloud = serde_json::json!({
            "type": ["string", "null"], "maxLength": MAX_ID_LEN, "example": "public",
            "description": "public, dod or gcch"
        });
        let only = |member: &str, properties: Value, required: &[&str]| {
            serde_json::json!({
                "type": "object",
                "title": member,
                "required": [member],
                "additionalProperties": false,
                "properties": {
                    member: {
                        "type": "object",
                        "required": required,
                        "additionalProperties": false,
                        "properties": properties
                    }
                }
            })
        };
        let schema = serde_json::json!({
            "description": "Who a participant is: a rawId alone, or exactly one typed member (the SDK's CommunicationIdentifierModel).",
            "oneOf": [
                {
                    "type": "object",
                    "title": "rawId",
                    "required": ["rawId"],
                    "additionalProperties": false,
                    "properties": {
                        "rawId": text(r"^(4|28|8:[^:]+):.*\S", "8:acs:resource_user")
                    }
                },
                only(
                    "communicationUser",
                    serde_json::json!({"id": text(r"^8:[^:]+:.*\S", "8:acs:resource_user")}),
                    &["id"]
                ),
                only("phoneNumber", serde_json::json!({"value": word("+14255550123")}), &["value"]),
                only(
                    "microsoftTeamsUser",
                    serde_json::json!({
                        "userId": word("a3b4c5d6-0000-0000-0000-000000000000"),
                        "isAnonymous": {"type": ["boolean", "null"]},
                        "cloud": cloud
                    }),
                    &["userId"]
                ),
                only(
                    "microsoftTeamsApp",
                    serde_json::json!({
                        "appId": word("b4c5d6e7-0000-0000-0000-000000000000"),
                        "cloud": cloud
                    }),
                    &["appId"]
                ),
                only(
                    "teamsExtensionUser",
                    serde_json::json!({
                        "userId": word("c5d6e7f8-0000-0000-0000-000000000000"),
                        "tenantId": word("d6e7f8a9-0000-0000-0000-000000000000"),
                        "resourceId": word("e7f8a9b0-0000-0000-0000-000000000000"),
                        "cloud": cloud
                    }),
                    &["userId", "tenantId", "resourceId"]
                )
            ]
        });
        serde_json::from_value(schema).expect("the identifier schema is a valid schema")
    }
}

impl utoipa::ToSchema for CommunicationIdentifier {}

/// Why an identifier cannot be sent.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    #[error(
        "give a rawId or one typed member (communicationUser, phoneNumber, microsoftTeamsUser, microsoftTeamsApp, teamsExtensionUser)"
    )]
    Empty,
    #[error("give at most one typed member; found {0}")]
    SeveralMembers(String),
    #[error("{0} must not be empty")]
    EmptyValue(&'static str),
    #[error("{0} is longer than {MAX_ID_LEN} characters")]
    TooLong(&'static str),
    #[error("participantToRemove: its other members take more than {MAX_OTHER_LEN} bytes of JSON")]
    OtherTooLarge,
    #[error(
        "{0} is not a Communication Services identifier (8:acs:…, 8:orgid:…, 8:teamsvisitor:…, 4:+1…, 28:…)"
    )]
    Malformed(&'static str),
}

const MAX_ID_LEN: usize = 1024;

/// The most JSON the members this service does not know may take (they are passed through).
const MAX_OTHER_LEN: usize = 4096;

const KNOWN_KINDS: [&str; 5] = [
    "communicationUser",
    "phoneNumber",
    "microsoftTeamsUser",
    "microsoftTeamsApp",
    "teamsExtensionUser",
];

/// Raw id prefixes of Communication Services users, by cloud; a Teams extension user shares
/// them.
const ACS_PREFIXES: [(&str, &str); 3] = [
    ("8:acs:", "public"),
    ("8:dod-acs:", "dod"),
    ("8:gcch-acs:", "gcch"),
];

/// The shapes of a raw id: `4:<phone>`, `8:<scope>:<id>` (ACS users, Teams users and
/// visitors), `28:<id>` or `28:<cloud>:<id>` (Teams apps).
fn is_raw_id(raw_id: &str) -> bool {
    match raw_id.split_once(':') {
        Some(("4" | "28", rest)) => !rest.trim().is_empty(),
        Some(("8", rest)) => rest
            .split_once(':')
            .is_some_and(|(scope, id)| !scope.is_empty() && !id.trim().is_empty()),
        _ => false,
    }
}

impl CommunicationIdentifier {
    /// A `communicationUser` identifier for `id` (an `8:acs:...` id).
    pub fn communication_user(id: &str) -> Self {
        Self {
            raw_id: Some(id.to_owned()),
            communication_user: Some(CommunicationUser { id: id.to_owned() }),
            ..Self::default()
        }
    }

    /// Validates and completes the identifier into the form the official SDK sends.
    pub fn normalize(mut self) -> Result<Self, IdentifierError> {
        let typed = [
            ("communicationUser", self.communication_user.is_some()),
            ("phoneNumber", self.phone_number.is_some()),
            ("microsoftTeamsUser", self.microsoft_teams_user.is_some()),
            ("microsoftTeamsApp", self.microsoft_teams_app.is_some()),
            ("teamsExtensionUser", self.teams_extension_user.is_some()),
        ];
        let present: Vec<&str> = typed.iter().filter(|(_, p)| *p).map(|(n, _)| *n).collect();
        if present.len() > 1 {
            return Err(IdentifierError::SeveralMembers(present.join(", ")));
        }
        self.check_lengths()?;
        let unknown_kind = self
            .kind
            .as_deref()
            .is_some_and(|kind| !KNOWN_KINDS.contains(&kind));
        if unknown_kind {
            // An open kind: pass it through as given, it must at least say who.
            if self.raw_id.is_none() && self.other.is_empty() {
                return Err(IdentifierError::Empty);
            }
            return Ok(self);
        }
        if let Some(raw_id) = &self.raw_id
            && !is_raw_id(raw_id)
        {
            return Err(IdentifierError::Malformed("participantToRemove.rawId"));
        }
        if let Some(user) = &self.communication_user
            && !(user.id.starts_with("8:") && is_raw_id(&user.id))
        {
            return Err(IdentifierError::Malformed(
                "participantToRemove.communicationUser.id",
            ));
        }
        if present.is_empty() {
            let raw_id = self.raw_id.clone().ok_or(IdentifierError::Empty)?;
            self.fill_member_from_raw_id(&raw_id);
        }
        if self.raw_id.is_none() {
            self.raw_id = Some(self.raw_id_from_member());
        }
        // The SDK sends no `kind` for the kinds it knows; the typed member says it.
        self.kind = None;
        Ok(self)
    }

    fn check_lengths(&self) -> Result<(), IdentifierError> {
        let fields = [
            ("participantToRemove.rawId", self.raw_id.as_deref()),
            (
                "participantToRemove.communicationUser.id",
                self.communication_user.as_ref().map(|u| u.id.as_str()),
            ),
            (
                "participantToRemove.phoneNumber.value",
                self.phone_number.as_ref().map(|p| p.value.as_str()),
            ),
            (
                "participantToRemove.microsoftTeamsUser.userId",
                self.microsoft_teams_user
                    .as_ref()
                    .map(|u| u.user_id.as_str()),
            ),
            (
                "participantToRemove.microsoftTeamsApp.appId",
                self.microsoft_teams_app.as_ref().map(|a| a.app_id.as_str()),
            ),
            (
                "participantToRemove.teamsExtensionUser.userId",
                self.teams_extension_user
                    .as_ref()
                    .map(|u| u.user_id.as_str()),
            ),
            (
                "participantToRemove.teamsExtensionUser.tenantId",
                self.teams_extension_user
                    .as_ref()
                    .map(|u| u.tenant_id.as_str()),
            ),
            (
                "participantToRemove.teamsExtensionUser.resourceId",
                self.teams_extension_user
                    .as_ref()
                    .map(|u| u.resource_id.as_str()),
            ),
        ];
        for (name, value) in fields {
            match value {
                Some(v) if v.trim().is_empty() => return Err(IdentifierError::EmptyValue(name)),
                Some(v) if v.chars().count() > MAX_ID_LEN => {
                    return Err(IdentifierError::TooLong(name));
                }
                _ => {}
            }
        }
        // Free-form fields are passed upstream and kept: bounded too.
        let free = [
            ("participantToRemove.kind", self.kind.as_deref()),
            (
                "participantToRemove.microsoftTeamsUser.cloud",
                self.microsoft_teams_user
                    .as_ref()
                    .and_then(|u| u.cloud.as_deref()),
            ),
            (
                "participantToRemove.microsoftTeamsApp.cloud",
                self.microsoft_teams_app
                    .as_ref()
                    .and_then(|a| a.cloud.as_deref()),
            ),
            (
                "participantToRemove.teamsExtensionUser.cloud",
                self.teams_extension_user
                    .as_ref()
                    .and_then(|u| u.cloud.as_deref()),
            ),
        ];
        for (name, value) in free {
            if value.is_some_and(|v| v.chars().count() > MAX_ID_LEN) {
                return Err(IdentifierError::TooLong(name));
            }
        }
        if !self.other.is_empty()
            && serde_json::to_string(&self.other).map_or(0, |json| json.len()) > MAX_OTHER_LEN
        {
            return Err(IdentifierError::OtherTooLarge);
        }
        Ok(())
    }

    /// Infers the typed member from a raw id, as the SDKs' `identifier_from_raw_id` does.
    /// `raw_id` has passed [`is_raw_id`].
    fn fill_member_from_raw_id(&mut self, raw_id: &str) {
        if let Some(user) = teams_extension_user_from_raw_id(raw_id) {
            self.teams_extension_user = Some(user);
            return;
        }
        if let Some(value) = raw_id.strip_prefix("4:") {
            self.phone_number = Some(PhoneNumber {
                value: value.to_owned(),
            });
            return;
        }
        let (prefix, rest) = match raw_id.split_once(':') {
            Some(("8", rest)) => match rest.split_once(':') {
                Some((scope, id)) => (format!("8:{scope}:"), id),
                None => (String::new(), raw_id),
            },
            Some(("28", rest)) => match rest.split_once(':') {
                Some((cloud, id)) if matches!(cloud, "orgid" | "dod" | "gcch") => {
                    (format!("28:{cloud}:"), id)
                }
                _ => ("28:".to_owned(), rest),
            },
            _ => (String::new(), raw_id),
        };
        let teams_user = |is_anonymous: bool, cloud: &str| MicrosoftTeamsUser {
            user_id: rest.to_owned(),
            is_anonymous: Some(is_anonymous),
            cloud: Some(cloud.to_owned()),
        };
        let teams_app = |cloud: &str| MicrosoftTeamsApp {
            app_id: rest.to_owned(),
            cloud: Some(cloud.to_owned()),
        };
        match prefix.as_str() {
            "8:teamsvisitor:" => self.microsoft_teams_user = Some(teams_user(true, "public")),
            "8:orgid:" => self.microsoft_teams_user = Some(teams_user(false, "public")),
            "8:dod:" => self.microsoft_teams_user = Some(teams_user(false, "dod")),
            "8:gcch:" => self.microsoft_teams_user = Some(teams_user(false, "gcch")),
            "28:orgid:" | "28:" => self.microsoft_teams_app = Some(teams_app("public")),
            "28:dod:" => self.microsoft_teams_app = Some(teams_app("dod")),
            "28:gcch:" => self.microsoft_teams_app = Some(teams_app("gcch")),
            // `8:acs:`, `8:spool:`, `8:dod-acs:`, `8:gcch-acs:` and anything unrecognised are
            // communication users, as in the SDKs.
            _ => {
                self.communication_user = Some(CommunicationUser {
                    id: raw_id.to_owned(),
                })
            }
        }
    }

    /// Builds the raw id from the typed member, as the SDKs do.
    fn raw_id_from_member(&self) -> String {
        if let Some(user) = &self.communication_user {
            return user.id.clone();
        }
        if let Some(phone) = &self.phone_number {
            return format!("4:{}", phone.value);
        }
        if let Some(user) = &self.microsoft_teams_user {
            if user.is_anonymous == Some(true) {
                return format!("8:teamsvisitor:{}", user.user_id);
            }
            let prefix = match user.cloud.as_deref() {
                Some("dod") => "8:dod:",
                Some("gcch") => "8:gcch:",
                _ => "8:orgid:",
            };
            return format!("{prefix}{}", user.user_id);
        }
        if let Some(app) = &self.microsoft_teams_app {
            let prefix = match app.cloud.as_deref() {
                Some("dod") => "28:dod:",
                Some("gcch") => "28:gcch:",
                _ => "28:orgid:",
            };
            return format!("{prefix}{}", app.app_id);
        }
        if let Some(user) = &self.teams_extension_user {
            let cloud = user.cloud.as_deref().unwrap_or("public");
            let prefix = ACS_PREFIXES
                .iter()
                .find(|(_, known)| *known == cloud)
                .map_or("8:acs:", |(prefix, _)| prefix);
            return format!(
                "{prefix}{}_{}_{}",
                user.resource_id, user.tenant_id, user.user_id
            );
        }
        String::new()
    }
}

/// A Teams extension user's raw id (`8:acs:{resourceId}_{tenantId}_{userId}`, or the dod and
/// gcch prefixes): exactly three `_`-separated parts, as the SDKs' `identifierFromRawId`
/// tells them from Communication Services users (`8:acs:{resourceId}_{id}`).
fn teams_extension_user_from_raw_id(raw_id: &str) -> Option<TeamsExtensionUser> {
    let (rest, cloud) = ACS_PREFIXES
        .iter()
        .find_map(|(prefix, cloud)| raw_id.strip_prefix(prefix).map(|rest| (rest, *cloud)))?;
    let mut parts = rest.split('_');
    let (Some(resource_id), Some(tenant_id), Some(user_id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some(TeamsExtensionUser {
        user_id: user_id.to_owned(),
        tenant_id: tenant_id.to_owned(),
        resource_id: resource_id.to_owned(),
        cloud: Some(cloud.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!(
        "../../tests/fixtures/sdk-requests/acs_remove_participant.python-sdk-1.6.0.json"
    );

    fn sdk_participant(name: &str) -> Value {
        let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
        fixture["requests"][name]["body"]["participantToRemove"].clone()
    }

    fn normalized(json: Value) -> Value {
        let id: CommunicationIdentifier = serde_json::from_value(json).unwrap();
        serde_json::to_value(id.normalize().unwrap()).unwrap()
    }

    #[test]
    fn every_input_form_serialises_like_the_sdk() {
        let user = sdk_participant("communicationUser");
        let phone = sdk_participant("phoneNumber");
        let check =
            |input: Value, want: &Value| assert_eq!(&normalized(input.clone()), want, "{input}");
        check(serde_json::json!({"rawId": "8:acs:abc_def"}), &user);
        check(
            serde_json::json!({"communicationUser": {"id": "8:acs:abc_def"}}),
            &user,
        );
        check(
            serde_json::json!({"kind": "communicationUser", "communicationUser": {"id": "8:acs:abc_def"}}),
            &user,
        );
        check(user.clone(), &user);
        check(serde_json::json!({"rawId": "4:+14255550123"}), &phone);
        check(
            serde_json::json!({"phoneNumber": {"value": "+14255550123"}}),
            &phone,
        );
        check(phone.clone(), &phone);
    }

    #[test]
    fn teams_identifiers_round_trip() {
        let got = normalized(serde_json::json!({"rawId": "8:orgid:u1"}));
        assert_eq!(
            got,
            serde_json::json!({"rawId": "8:orgid:u1", "microsoftTeamsUser": {"userId": "u1", "isAnonymous": false, "cloud": "public"}})
        );
        let got =
            normalized(serde_json::json!({"microsoftTeamsApp": {"appId": "a1", "cloud": "gcch"}}));
        assert_eq!(got["rawId"], "28:gcch:a1");
    }

    #[test]
    fn teams_extension_users_take_the_sdk_form() {
        let want = serde_json::json!({
            "rawId": "8:acs:res_ten_usr",
            "teamsExtensionUser": {"userId": "usr", "tenantId": "ten", "resourceId": "res", "cloud": "public"}
        });
        assert_eq!(
            normalized(serde_json::json!({"rawId": "8:acs:res_ten_usr"})),
            want
        );
        assert_eq!(
            normalized(serde_json::json!({
                "kind": "teamsExtensionUser",
                "teamsExtensionUser": {"userId": "usr", "tenantId": "ten", "resourceId": "res", "cloud": "public"}
            })),
            want
        );
        let gcch = normalized(serde_json::json!({
            "teamsExtensionUser": {"userId": "u", "tenantId": "t", "resourceId": "r", "cloud": "gcch"}
        }));
        assert_eq!(gcch["rawId"], "8:gcch-acs:r_t_u");
        assert_eq!(
            normalized(serde_json::json!({"rawId": "8:dod-acs:r_t_u"}))["teamsExtensionUser"]["cloud"],
            "dod"
        );
        // Two parts: a Communication Services user, as in the SDKs.
        assert!(
            normalized(serde_json::json!({"rawId": "8:acs:r_u"}))["communicationUser"].is_object()
        );
    }

    #[test]
    fn unknown_kinds_pass_through() {
        let input = serde_json::json!({"kind": "futureUser", "rawId": "8:acs:r_x", "futureUser": {"userId": "u"}});
        assert_eq!(normalized(input.clone()), input);
    }

    #[test]
    fn invalid_identifiers_are_refused() {
        let check = |input: Value, want: IdentifierError| {
            let id: CommunicationIdentifier = serde_json::from_value(input).unwrap();
            assert_eq!(id.normalize().unwrap_err(), want);
        };
        check(serde_json::json!({}), IdentifierError::Empty);
        check(
            serde_json::json!({"communicationUser": {"id": "8:acs:x"}, "phoneNumber": {"value": "+1"}}),
            IdentifierError::SeveralMembers("communicationUser, phoneNumber".into()),
        );
        check(
            serde_json::json!({"rawId": " "}),
            IdentifierError::EmptyValue("participantToRemove.rawId"),
        );
        check(
            serde_json::json!({"rawId": "x".repeat(2000)}),
            IdentifierError::TooLong("participantToRemove.rawId"),
        );
        // Free-form and passed-through members are bounded too.
        check(
            serde_json::json!({"kind": "k".repeat(2000), "rawId": "8:acs:x"}),
            IdentifierError::TooLong("participantToRemove.kind"),
        );
        check(
            serde_json::json!({"microsoftTeamsApp": {"appId": "a", "cloud": "c".repeat(2000)}}),
            IdentifierError::TooLong("participantToRemove.microsoftTeamsApp.cloud"),
        );
        check(
            serde_json::json!({"kind": "futureUser", "futureUser": {"userId": "u".repeat(5000)}}),
            IdentifierError::OtherTooLarge,
        );
        for raw_id in [
            "hello", "8:acs", "8::x", "8:acs: ", "4:", "28:", "9:acs:x", ":x",
        ] {
            check(
                serde_json::json!({ "rawId": raw_id }),
                IdentifierError::Malformed("participantToRemove.rawId"),
            );
        }
        check(
            serde_json::json!({"communicationUser": {"id": "bob"}}),
            IdentifierError::Malformed("participantToRemove.communicationUser.id"),
        );
        for raw_id in [
            "8:acs:r_x",
            "4:+14255550123",
            "8:teamsvisitor:v",
            "28:orgid:app",
            "28:app",
        ] {
            let id: CommunicationIdentifier =
                serde_json::from_value(serde_json::json!({ "rawId": raw_id })).unwrap();
            assert!(id.normalize().is_ok(), "{raw_id}");
        }
    }
}
