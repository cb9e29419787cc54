//! Client API keys (`http.api_keys`): everything under `/v1` needs one of them, in
//! `Authorization: Bearer` or `api-key`; health and callbacks never do.

use serde_json::{Value, json};

use callops::emulator::Script;

use crate::support::{TestApp, capture_logs, remove_event, silent};

const FIRST: &str = "first-key-0123456789abcdef";
const SECOND: &str = "second-key-ZYXWVUTSRQPONM";
const WRONG: &str = "wrong-key-presented-by-mallory";

async fn keyed() -> TestApp {
    TestApp::spawn_with(|config| {
        config.http.api_keys = format!("{FIRST}, {SECOND}").into();
    })
    .await
}

/// Checks a 401: the challenge, the Azure error body, and that `presented` is not echoed.
async fn assert_unauthorized(response: reqwest::Response, presented: Option<&str>) {
    let what = format!("{} {}", response.status(), response.url());
    assert_eq!(response.status(), 401, "{what}");
    let challenge = response.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    if let Some(presented) = presented {
        assert!(!challenge.contains(presented), "{challenge}");
    }
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], "Unauthorized", "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    if let Some(presented) = presented {
        assert!(
            !text.contains(presented),
            "{what}: the key was echoed: {text}"
        );
    }
}

fn removal_body() -> Value {
    json!({"participantToRemove": {"rawId": "8:acs:abc_def"}})
}

#[tokio::test]
async fn without_a_key_nothing_under_v1_answers() {
    let app = keyed().await;
    let anonymous = reqwest::Client::new();
    let requests = [
        anonymous.get(app.url("/v1/operations")),
        anonymous.get(app.url("/v1/operations/0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d?wait=1")),
        anonymous
            .post(app.url("/v1/acs/callConnections/call-anon/participants:remove"))
            .json(&removal_body()),
        anonymous
            .post(app.url("/v1/graph/calls/call-anon/cancelMediaProcessing"))
            .json(&json!({})),
        anonymous.get(app.url("/v1/acs/callConnections/call-anon/events")),
        // Not even whether a route exists, or which methods it takes.
        anonymous.get(app.url("/v1/no-such-route")),
        anonymous.delete(app.url("/v1/operations")),
        // A scheme other than Bearer is no key.
        anonymous
            .get(app.url("/v1/operations"))
            .basic_auth("user", Some(FIRST)),
    ];
    for request in requests {
        assert_unauthorized(request.send().await.unwrap(), None).await;
    }
    // Nothing was started.
    let keyed = reqwest::Client::new();
    let page: Value = keyed
        .get(app.url("/v1/operations"))
        .bearer_auth(FIRST)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["value"], json!([]), "{page}");
}

#[tokio::test]
async fn a_wrong_key_is_refused_in_either_header_and_never_echoed() {
    let app = keyed().await;
    let http = reqwest::Client::new();
    let path = "/v1/acs/callConnections/call-wrong/participants:remove";
    for wrong in [
        WRONG,
        // One character short, one too many, another case: no partial credit.
        &FIRST[..FIRST.len() - 1],
        &format!("{FIRST}x"),
        &FIRST.to_ascii_uppercase(),
        // Both keys glued together, the list as configured.
        &format!("{FIRST}{SECOND}"),
        &format!("{FIRST},{SECOND}"),
    ] {
        let bearer = http
            .post(app.url(path))
            .bearer_auth(wrong)
            .json(&removal_body());
        assert_unauthorized(bearer.send().await.unwrap(), Some(wrong)).await;
        let api_key = http.get(app.url("/v1/operations")).header("api-key", wrong);
        assert_unauthorized(api_key.send().await.unwrap(), Some(wrong)).await;
    }
}

#[tokio::test]
async fn each_configured_key_works_in_either_header_so_keys_can_be_rotated() {
    let app = keyed().await;
    app.emulator.set_script("call-rotate", silent());
    let http = reqwest::Client::new();
    let mut started = Vec::new();
    for key in [FIRST, SECOND] {
        let forms = [
            http.get(app.url("/v1/operations")).bearer_auth(key),
            http.get(app.url("/v1/operations")).header("api-key", key),
            http.get(app.url("/v1/operations"))
                .header("authorization", format!("bearer  {key}")),
        ];
        for request in forms {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200, "{key}");
        }
        for with_bearer in [true, false] {
            let request = http
                .post(app.url("/v1/acs/callConnections/call-rotate/participants:remove"))
                .json(&removal_body());
            let request = if with_bearer {
                request.bearer_auth(key)
            } else {
                request.header("api-key", key)
            };
            let operation = crate::support::accepted(request.send().await.unwrap()).await;
            started.push(operation["id"].as_str().unwrap().to_owned());
        }
    }
    // Each operation is readable with either key.
    for (n, id) in started.iter().enumerate() {
        let key = if n % 2 == 0 { SECOND } else { FIRST };
        let response = http
            .get(app.url(&format!("/v1/operations/{id}")))
            .header("api-key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // With a key, the API's own 404 and 405 answer.
    let app = app.authenticated(FIRST);
    let response = app.get("/v1/no-such-route").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NotFound");
    let response = app
        .http
        .delete(app.url("/v1/operations"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "MethodNotAllowed");
}

#[tokio::test]
async fn health_and_callbacks_take_no_key() {
    let app = keyed().await.authenticated(SECOND);
    let anonymous = reqwest::Client::new();
    let health = anonymous.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // The emulator calls /callbacks/acs back without any key, and the removal settles.
    let started = app.remove("call-keyed", Script::default(), None).await;
    let id = started["id"].as_str().unwrap();
    let done = app.wait_operation(id, 5).await;
    assert_eq!(done["status"], "Succeeded", "{done}");

    // Callbacks sent by hand (with their callback token), without a key, or with a wrong one:
    // not looked at.
    let started = app
        .remove("call-keyed-2", silent(), Some("ctx-keyed"))
        .await;
    let id = started["id"].as_str().unwrap();
    let response = app
        .signed(anonymous.post(app.url("/callbacks/acs")), "/callbacks/acs")
        .header("api-key", WRONG)
        .json(&remove_event("ev-keyed", "call-keyed-2", "ctx-keyed", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let done = app.wait_operation(id, 5).await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    let response = app
        .signed(
            anonymous.post(app.url("/callbacks/graph")),
            "/callbacks/graph",
        )
        .json(&json!({"value": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[tokio::test]
async fn keys_never_reach_the_logs() {
    let (captured, _guard) = capture_logs();

    let app = keyed().await.authenticated(FIRST);
    let started = app.remove("call-logs", silent(), None).await;
    app.wait_operation(started["id"].as_str().unwrap(), 1).await;
    let http = reqwest::Client::new();
    for request in [
        http.get(app.url("/v1/operations")).bearer_auth(SECOND),
        http.get(app.url("/v1/operations")).bearer_auth(WRONG),
        http.get(app.url("/v1/operations")).header("api-key", WRONG),
    ] {
        request.send().await.unwrap();
    }

    let logs = captured.text();
    assert!(
        logs.contains("requires an API key"),
        "the capture works: {logs}"
    );
    for key in [FIRST, SECOND, WRONG] {
        assert!(!logs.contains(key), "a key was logged");
    }
}
