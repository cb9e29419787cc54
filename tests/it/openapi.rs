//! `GET /openapi.json`: the OpenAPI 3 document, open even when the client API needs a key,
//! listing every route the router serves (and only those).

use serde_json::Value;

use crate::support::TestApp;

const KEY: &str = "openapi-key-0123456789abcdef";

/// Every route the router serves: method, documented path, and a concrete path to call.
const ROUTES: [(&str, &str, &str); 25] = [
    (
        "post",
        "/v1/acs/callConnections/{callConnectionId}/participants:remove",
        "/v1/acs/callConnections/call-1/participants:remove",
    ),
    (
        "get",
        "/v1/acs/callConnections/{callConnectionId}/events",
        "/v1/acs/callConnections/call-1/events",
    ),
    (
        "post",
        "/v1/graph/calls/{callId}/cancelMediaProcessing",
        "/v1/graph/calls/call-1/cancelMediaProcessing",
    ),
    (
        "get",
        "/v1/graph/calls/{callId}/events",
        "/v1/graph/calls/call-1/events",
    ),
    ("get", "/v1/operations", "/v1/operations"),
    (
        "get",
        "/v1/operations/{id}",
        "/v1/operations/0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d",
    ),
    ("get", "/v1/operations:stream", "/v1/operations:stream"),
    ("post", "/v1/subscriptions", "/v1/subscriptions"),
    ("get", "/v1/subscriptions", "/v1/subscriptions"),
    ("get", "/v1/subscriptions/{id}", "/v1/subscriptions/sub_1"),
    (
        "delete",
        "/v1/subscriptions/{id}",
        "/v1/subscriptions/sub_1",
    ),
    (
        "post",
        "/v1/subscriptions/{id}:rotateSecret",
        "/v1/subscriptions/sub_1:rotateSecret",
    ),
    (
        "post",
        "/v1/subscriptions/{id}:enable",
        "/v1/subscriptions/sub_1:enable",
    ),
    (
        "get",
        "/v1/subscriptions/{id}/deliveries",
        "/v1/subscriptions/sub_1/deliveries",
    ),
    (
        "get",
        "/v1/subscriptions/{id}/deliveries/{deliveryId}",
        "/v1/subscriptions/sub_1/deliveries/msg_1",
    ),
    (
        "post",
        "/v1/subscriptions/{id}/deliveries/{deliveryId}:redeliver",
        "/v1/subscriptions/sub_1/deliveries/msg_1:redeliver",
    ),
    ("post", "/callbacks/acs", "/callbacks/acs"),
    ("post", "/callbacks/graph", "/callbacks/graph"),
    ("get", "/healthz", "/healthz"),
    ("get", "/readyz", "/readyz"),
    ("get", "/metrics", "/metrics"),
    ("get", "/openapi.json", "/openapi.json"),
    ("get", "/", "/"),
    ("get", "/ui", "/ui"),
    ("get", "/ui/{file}", "/ui/app.js"),
];

#[tokio::test]
async fn the_document_is_open_and_lists_every_route() {
    let app = TestApp::spawn_with(|config| config.http.api_keys = KEY.to_owned().into()).await;
    let anonymous = reqwest::Client::new();
    let response = anonymous
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "no key needed");
    assert_eq!(response.headers()["content-type"], "application/json");
    let document: Value = response.json().await.unwrap();
    let version = document["openapi"].as_str().unwrap();
    assert!(version.starts_with("3."), "{version}");

    let paths = document["paths"].as_object().unwrap();
    for (method, path, _) in ROUTES {
        assert!(
            paths.get(path).and_then(|item| item.get(method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    let documented: usize = paths
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "documented but not in the list: {paths:?}"
    );

    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["apiKey"]["name"], "api-key");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["callbackJwt"]["bearerFormat"], "JWT");
    let schemas = &document["components"]["schemas"];
    for model in [
        "Operation",
        "OperationStatus",
        "EventRecord",
        "ResultInfo",
        "CancelledOperation",
        "CommunicationIdentifier",
        "RemoveParticipantIn",
        "CancelMediaProcessingIn",
        "DeliverySummary",
        "ErrorBody",
        "SubscriptionIn",
        "SubscriptionOut",
        "DeliveryOut",
        "NotifyIn",
    ] {
        assert!(
            schemas.get(model).is_some(),
            "{model} is not in the document"
        );
    }
    let remove = &paths[ROUTES[0].1]["post"];
    for status in ["202", "400", "401", "409", "413", "415", "503"] {
        assert!(remove["responses"].get(status).is_some(), "{status}");
    }
}

/// The list above is what the router serves: each route answers something other than the
/// router's own "no such route".
#[tokio::test]
async fn every_listed_route_is_served() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    for (method, _, path) in ROUTES {
        let request = match method {
            "get" => http.get(app.url(path)),
            "delete" => http.delete(app.url(path)),
            _ => http.post(app.url(path)).json(&serde_json::json!({})),
        };
        let response = request.send().await.unwrap();
        let status = response.status();
        if path.ends_with(":stream") {
            // An event stream does not end: its 200 is enough.
            assert_eq!(status, 200, "{method} {path}");
            continue;
        }
        let body = response.text().await.unwrap();
        assert!(
            !(status == 404 && body.contains("no such route")),
            "{method} {path}: {status} {body}"
        );
        assert_ne!(status, 405, "{method} {path}");
    }
}

/// The reconciliation mark, the ACS cause details and the Teams extension user are in the
/// models as the API shows them, and nothing kept for the store alone is.
#[tokio::test]
async fn the_operation_schema_shows_reconciled_and_the_result_details() {
    let app = TestApp::spawn().await;
    let document: Value = app.get_json("/openapi.json").await;
    let schemas = &document["components"]["schemas"];
    // The call (`callConnectionId` or `callId`) is flattened in: the rest is the second part.
    let operation = &schemas["Operation"]["allOf"][1]["properties"];
    assert_eq!(operation["reconciled"]["type"], "boolean", "{operation}");
    for hidden in ["participant", "settleBy", "pending"] {
        assert!(operation.get(hidden).is_none(), "{hidden} is not API");
    }
    let result = &schemas["ResultInfo"]["properties"];
    assert!(result.get("sipDetails").is_some(), "{result}");
    assert!(result.get("q850Details").is_some(), "{result}");
    let details = &schemas["ResultDetails"]["properties"];
    assert!(
        details.get("code").is_some() && details.get("message").is_some(),
        "{details}"
    );
    // A participant is a rawId alone or exactly one typed member: a oneOf of those forms.
    let forms = schemas["CommunicationIdentifier"]["oneOf"]
        .as_array()
        .expect("the identifier is a oneOf");
    let titles: Vec<&str> = forms.iter().filter_map(|f| f["title"].as_str()).collect();
    assert_eq!(
        titles,
        [
            "rawId",
            "communicationUser",
            "phoneNumber",
            "microsoftTeamsUser",
            "microsoftTeamsApp",
            "teamsExtensionUser"
        ],
        "{forms:?}"
    );
    for form in forms {
        assert_eq!(form["additionalProperties"], false, "{form}");
        assert_eq!(form["required"].as_array().map(Vec::len), Some(1), "{form}");
    }
    let user = &forms[5]["properties"]["teamsExtensionUser"]["required"];
    assert_eq!(
        user,
        &serde_json::json!(["userId", "tenantId", "resourceId"]),
        "{user}"
    );
}

/// A webhook target is a URL (with an optional secret) or a subscription, never both; the
/// URL and secret carry the shapes the API checks, and a subscription names its event types.
#[tokio::test]
async fn webhook_targets_are_described_as_the_api_checks_them() {
    let app = TestApp::spawn().await;
    let document: Value = app.get_json("/openapi.json").await;
    let schemas = &document["components"]["schemas"];
    let forms = schemas["NotifyIn"]["oneOf"]
        .as_array()
        .expect("notify is a oneOf");
    let titles: Vec<&str> = forms.iter().filter_map(|f| f["title"].as_str()).collect();
    assert_eq!(titles, ["url", "subscriptionId"]);
    let url = &forms[0]["properties"]["url"];
    assert!(
        url["pattern"].as_str().unwrap().starts_with("^https://"),
        "{url}"
    );
    let secret = forms[0]["properties"]["secret"]["pattern"]
        .as_str()
        .unwrap();
    assert!(secret.starts_with("^whsec_"), "{secret}");
    let subscription = &schemas["SubscriptionIn"]["properties"];
    assert_eq!(subscription["url"]["pattern"], url["pattern"]);
    assert_eq!(subscription["eventTypes"]["minItems"], 1);
    assert_eq!(
        subscription["eventTypes"]["items"]["enum"],
        serde_json::json!(["operation.settled", "operation.changed"])
    );
}
