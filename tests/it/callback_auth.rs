//! Only genuine callbacks count: every way a callback token can be wrong gets 401 and leaves
//! the operation as it was; key rotation, made-up key ids, the callback secret, `none`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use callops::emulator::callback_signing::CallbackSigner;
use serde_json::{Value, json};

use crate::support::{TestApp, fixture, remove_event, silent, within};

const PROMPT_CALL: &str = "57dab8b1-894c-409a-b240-bd8beae78896";

/// `claims` with `field` replaced (or removed when `value` is null).
fn with(mut claims: Value, field: &str, value: Value) -> Value {
    if value.is_null() {
        claims.as_object_mut().unwrap().remove(field);
    } else {
        claims[field] = value;
    }
    claims
}

/// Every bad `Authorization` header value for a platform whose genuine claims are `claims`.
fn bad_authorizations(signer: &CallbackSigner, claims: &Value) -> Vec<(&'static str, String)> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let genuine = signer.sign(claims);
    let payload = genuine.split('.').nth(1).unwrap().to_owned();
    let header = |json: &str| URL_SAFE_NO_PAD.encode(json);
    let bearer = |token: String| format!("Bearer {token}");
    vec![
        ("wrong scheme", format!("Basic {genuine}")),
        ("empty bearer", "Bearer ".to_owned()),
        ("garbage", bearer("not-a-jwt".to_owned())),
        (
            "wrong issuer",
            bearer(signer.sign(&with(claims.clone(), "iss", json!("https://evil.example")))),
        ),
        (
            "wrong audience",
            bearer(signer.sign(&with(claims.clone(), "aud", json!("someone-else")))),
        ),
        (
            "expired",
            bearer(signer.sign(&with(claims.clone(), "exp", json!(now - 3600)))),
        ),
        (
            "not yet valid",
            bearer(signer.sign(&with(claims.clone(), "nbf", json!(now + 3600)))),
        ),
        (
            "no expiry",
            bearer(signer.sign(&with(claims.clone(), "exp", Value::Null))),
        ),
        (
            "valid for ever",
            bearer(signer.sign(&with(claims.clone(), "exp", json!(1e30)))),
        ),
        (
            "unknown key",
            bearer(signer.sign_with_second_key("callops-emulator-2", claims)),
        ),
        (
            "forged under a published kid",
            bearer(signer.sign_with_second_key("callops-emulator-1", claims)),
        ),
        (
            "alg none",
            bearer(format!(
                "{}.{payload}.",
                header(r#"{"alg":"none","typ":"JWT","kid":"callops-emulator-1"}"#)
            )),
        ),
        (
            "HS256",
            bearer(format!(
                "{}.{payload}.{}",
                header(r#"{"alg":"HS256","typ":"JWT","kid":"callops-emulator-1"}"#),
                genuine.split('.').nth(2).unwrap()
            )),
        ),
        (
            "no kid",
            bearer(format!(
                "{}.{payload}.{}",
                header(r#"{"alg":"RS256","typ":"JWT"}"#),
                genuine.split('.').nth(2).unwrap()
            )),
        ),
    ]
}

async fn post_with(
    app: &TestApp,
    path: &str,
    authorization: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url(path))
        .header("content-type", "application/json")
        .body(body);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    request.send().await.unwrap()
}

async fn assert_refused(response: reqwest::Response, case: &str) {
    assert_eq!(response.status(), 401, "{case}");
    assert_eq!(response.headers()["www-authenticate"], "Bearer", "{case}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Unauthorized", "{case}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.is_empty(), "{case}");
}

#[tokio::test]
async fn acs_callbacks_without_a_genuine_token_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let started = app.remove("call-auth", silent(), Some("ctx-auth")).await;
    let id = started["id"].as_str().unwrap();
    app.operation_until(id, |op| op["status"] == "Running")
        .await;
    let event =
        serde_json::to_vec(&remove_event("evt-auth", "call-auth", "ctx-auth", true)).unwrap();

    let signer = app.emulator.signer();
    let mut cases = bad_authorizations(signer, &signer.acs_claims());
    // A Graph token is not an ACS token.
    cases.push(("graph token", format!("Bearer {}", signer.graph_token())));
    let response = post_with(&app, "/callbacks/acs", None, event.clone()).await;
    assert_refused(response, "no token").await;
    for (case, authorization) in &cases {
        let response = post_with(&app, "/callbacks/acs", Some(authorization), event.clone()).await;
        assert_refused(response, case).await;
    }
    let operation = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(operation["status"], "Running", "{operation}");
    assert_eq!(operation["events"], json!([]), "{operation}");
    let health = app.get_json("/healthz").await;
    assert_eq!(
        health["callbacksRefused"]["acs"],
        cases.len() + 1,
        "{health}"
    );

    // The same event with a genuine token settles it.
    let genuine = format!("Bearer {}", signer.acs_token());
    let response = post_with(&app, "/callbacks/acs", Some(&genuine), event).await;
    assert_eq!(response.status(), 200);
    let operation = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
}

#[tokio::test]
async fn graph_notifications_without_a_genuine_token_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let body = fixture("graph/v1_playprompt_notification_completed.json");
    let signer = app.emulator.signer();
    let mut cases = bad_authorizations(signer, &signer.graph_claims());
    cases.push((
        "no tenant",
        format!(
            "Bearer {}",
            signer.sign(&with(signer.graph_claims(), "tid", Value::Null))
        ),
    ));
    cases.push(("ACS token", format!("Bearer {}", signer.acs_token())));
    for (case, authorization) in &cases {
        let response = post_with(&app, "/callbacks/graph", Some(authorization), body.clone()).await;
        assert_refused(response, case).await;
    }
    assert!(app.list(&format!("callId={PROMPT_CALL}")).await.is_empty());

    // Graph's other issuer is accepted too.
    let other_issuer = with(
        signer.graph_claims(),
        "iss",
        json!("https://graph.microsoft.com"),
    );
    let authorization = format!("Bearer {}", signer.sign(&other_issuer));
    let response = post_with(&app, "/callbacks/graph", Some(&authorization), body).await;
    assert_eq!(response.status(), 202);
    let observed = app.list(&format!("callId={PROMPT_CALL}")).await;
    assert_eq!(observed.len(), 1, "{observed:?}");
    assert_eq!(observed[0]["status"], "Succeeded");
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_made_up_key_ids_cannot_hammer_the_key_server() {
    let app = TestApp::spawn().await;
    let signer = app.emulator.signer();
    // Both key sets (ACS and Graph, the same emulator) are loaded at start.
    within(async {
        while signer.key_fetches() < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    app.callback(&remove_event("evt-rot-0", "call-rot", "ctx-0", true))
        .await;
    let fetches = signer.key_fetches();
    assert_eq!(fetches, 2);

    // Rotation: the new kid is unknown, so callops refetches once and accepts it.
    signer.rotate();
    let event = serde_json::to_vec(&remove_event("evt-rot-1", "call-rot", "ctx-1", true)).unwrap();
    let authorization = format!("Bearer {}", signer.acs_token());
    let response = post_with(&app, "/callbacks/acs", Some(&authorization), event).await;
    assert_eq!(response.status(), 200);
    assert_eq!(signer.key_fetches(), fetches + 1);

    // Made-up kids, all at once: refused, and no more fetches within the refresh interval.
    let mut requests = tokio::task::JoinSet::new();
    for n in 0..20 {
        let token = signer.sign_with_second_key(&format!("made-up-{n}"), &signer.acs_claims());
        let event = remove_event(&format!("evt-x{n}"), "call-rot", "x", true);
        let request = app
            .http
            .post(app.url("/callbacks/acs"))
            .bearer_auth(token)
            .json(&event);
        requests.spawn(async move { request.send().await.unwrap().status() });
    }
    for status in within(requests.join_all()).await {
        assert_eq!(status, 401);
    }
    assert_eq!(signer.key_fetches(), fetches + 1);
}

#[tokio::test]
async fn with_a_callback_secret_both_the_token_and_the_secret_are_required() {
    let secret = "callback-secret-Zq81";
    let app = TestApp::spawn_with(|config| {
        config.callbacks.secret = secret.to_owned().into();
    })
    .await;
    // callops puts the secret in the callback URI it gives ACS, so the flow settles.
    let started = app
        .remove("call-secret", callops::emulator::Script::default(), None)
        .await;
    let done = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    let sent = app.emulator_requests("call-secret", 1).await;
    let uri = sent[0].body["operationCallbackUri"].as_str().unwrap();
    assert!(
        uri.ends_with(&format!("/callbacks/acs?secret={secret}")),
        "{uri}"
    );

    // A genuine token without the secret, or with a wrong one, is refused.
    let event = serde_json::to_vec(&remove_event("evt-s", "call-s", "ctx-s", true)).unwrap();
    let authorization = format!("Bearer {}", app.emulator.signer().acs_token());
    for path in ["/callbacks/acs", "/callbacks/acs?secret=wrong"] {
        let response = post_with(&app, path, Some(&authorization), event.clone()).await;
        assert_refused(response, path).await;
    }
    let path = format!("/callbacks/acs?secret={secret}");
    let response = post_with(&app, &path, Some(&authorization), event.clone()).await;
    assert_eq!(response.status(), 200);
    // The secret alone is not enough while tokens are verified.
    let path = format!("/callbacks/acs?secret={secret}&again=1");
    let response = post_with(&app, &path, None, event).await;
    assert_refused(response, "secret without token").await;
}

#[tokio::test]
async fn with_auth_none_unsigned_callbacks_are_accepted() {
    let app = TestApp::spawn_with(|config| {
        config.callbacks.auth = callops::config::CallbackAuth::None;
    })
    .await;
    let started = app.remove("call-none", silent(), Some("ctx-none")).await;
    let id = started["id"].as_str().unwrap();
    let event =
        serde_json::to_vec(&remove_event("evt-none", "call-none", "ctx-none", false)).unwrap();
    let response = post_with(&app, "/callbacks/acs", None, event).await;
    assert_eq!(response.status(), 200);
    let done = app.wait_operation(id, 5).await;
    assert_eq!(done["status"], "Failed", "{done}");
}

#[tokio::test]
async fn while_no_keys_can_be_loaded_callbacks_are_answered_503_so_they_are_retried() {
    let (captured, _guard) = crate::support::capture_logs();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = TestApp::spawn_with(|config| {
        config.callbacks.acs.openid_url = format!("http://{dead}/openid").parse().unwrap();
    })
    .await;
    let event = serde_json::to_vec(&remove_event("evt-503", "call-503", "ctx", true)).unwrap();
    let authorization = format!("Bearer {}", app.emulator.signer().acs_token());
    let response = post_with(&app, "/callbacks/acs", Some(&authorization), event).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ServiceUnavailable", "{body}");
    // Not ready, and /readyz says why.
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NotReady", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ACS callback signing keys"), "{message}");
    assert_eq!(body["checks"]["callbackKeys"]["graph"], "ok", "{body}");
    assert_eq!(body["checks"]["store"], "ok", "{body}");
    // Not being ready is no server error: no ERROR line for the 503s.
    let logs = captured.text();
    assert!(
        !logs
            .lines()
            .any(|line| line.contains(" ERROR ") && line.contains("503")),
        "{logs}"
    );
    // Graph's keys load fine: its callbacks are unaffected.
    let (status, _) = app
        .notify(
            "application/json",
            fixture("graph/v1_playprompt_notification_completed.json"),
        )
        .await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn an_unauthenticated_callback_is_refused_before_its_body_is_read() {
    let app = TestApp::spawn().await;
    // Larger than the body limit: refused for its missing token, not for its size.
    let huge = vec![b'['; 1024 * 1024];
    let response = post_with(&app, "/callbacks/acs", None, huge.clone()).await;
    assert_refused(response, "huge body without a token").await;
    // With a genuine token the same body is too large.
    let authorization = format!("Bearer {}", app.emulator.signer().acs_token());
    let response = post_with(&app, "/callbacks/acs", Some(&authorization), huge).await;
    assert_eq!(response.status(), 413);
}
