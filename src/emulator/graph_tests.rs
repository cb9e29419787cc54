use super::*;

use tokio::time::Instant;

use crate::identity::GRAPH_SCOPE;

/// Graph's message for an unknown, expired or revoked token.
const TOKEN_INVALID: &str = "Access token has expired or is not yet valid.";

use axum::http::Method;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::ServiceExt;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "278405a3-f568-4b3e-b684-009193463064";
const SECRET: &str = "Zx8Q~emulator-secret-value";
const HOST: &str = "127.0.0.1:8091";
/// The call id of the docs' samples (its resource URLs carry it as `57DAB8B1...`).
const CALL: &str = "57dab8b1-894c-409a-b240-bd8beae78896";

fn settings() -> GraphEmulatorSettings {
    GraphEmulatorSettings {
        tenant_id: TENANT.to_owned(),
        client_id: CLIENT_ID.to_owned(),
        client_secret: SECRET.to_owned(),
        token_lifetime: Duration::from_secs(3599),
        callback_url: None,
        notification_delay: Duration::ZERO,
        signer: None,
    }
}

fn emulator() -> GraphEmulator {
    GraphEmulator::new(settings())
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/graph/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Asserts that `got` has exactly the keys of `expected`, recursively, with the same JSON
/// types (a `null` in the sample stands for anything).
fn assert_same_shape(got: &Value, expected: &Value, at: &str) {
    match (got, expected) {
        (Value::Object(got), Value::Object(expected)) => {
            let got_keys = got.keys().collect::<Vec<_>>();
            let expected_keys = expected.keys().collect::<Vec<_>>();
            assert_eq!(got_keys, expected_keys, "keys at {at}");
            for (key, value) in expected {
                assert_same_shape(&got[key], value, &format!("{at}.{key}"));
            }
        }
        (Value::Array(got), Value::Array(expected)) => {
            assert_eq!(got.len(), expected.len(), "length at {at}");
            for (index, (got, expected)) in got.iter().zip(expected).enumerate() {
                assert_same_shape(got, expected, &format!("{at}[{index}]"));
            }
        }
        (_, Value::Null) => {}
        (got, expected) => assert_eq!(
            std::mem::discriminant(got),
            std::mem::discriminant(expected),
            "type at {at}: {got} vs {expected}"
        ),
    }
}

async fn send(emulator: &GraphEmulator, request: Request) -> (StatusCode, HeaderMap, Value) {
    let response = emulator.router().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body = match bytes.is_empty() {
        true => Value::Null,
        false => serde_json::from_slice(&bytes).unwrap(),
    };
    (status, headers, body)
}

fn form(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

fn token_request(tenant: &str, body: String) -> Request {
    Request::post(format!("/{tenant}/oauth2/v2.0/token"))
        .header(header::HOST, "login.example")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap()
}

/// The form callops' client sends, with `field` replaced by `value`.
fn credentials_with(field: &str, value: &str) -> String {
    let mut fields = vec![
        ("client_id", CLIENT_ID),
        ("client_secret", SECRET),
        ("scope", GRAPH_SCOPE),
        ("grant_type", "client_credentials"),
    ];
    for pair in &mut fields {
        if pair.0 == field {
            pair.1 = value;
        }
    }
    form(&fields)
}

async fn token(emulator: &GraphEmulator) -> String {
    let (status, _, body) = send(emulator, token_request(TENANT, credentials_with("", ""))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn graph_post(path: &str, token: Option<&str>, body: &Value) -> Request {
    let mut request = Request::post(path)
        .header(header::HOST, HOST)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    request
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn call_path(call_id: &str, action: &str) -> String {
    format!("/v1.0/communications/calls/{call_id}/{action}")
}

async fn play_prompt(emulator: &GraphEmulator, token: &str, context: &str) -> Value {
    let body = json!({"clientContext": context, "prompts": [{"@odata.type": "#microsoft.graph.mediaPrompt"}]});
    let request = graph_post(&call_path(CALL, "playPrompt"), Some(token), &body);
    let (status, _, body) = send(emulator, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn record_response(emulator: &GraphEmulator, token: &str, context: &str) -> Value {
    let body = json!({"clientContext": context, "maxRecordDurationInSeconds": 10});
    let request = graph_post(&call_path(CALL, "recordResponse"), Some(token), &body);
    let (status, _, body) = send(emulator, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn cancel(
    emulator: &GraphEmulator,
    token: &str,
    context: &str,
) -> (StatusCode, HeaderMap, Value) {
    let request = graph_post(
        &call_path(CALL, "cancelMediaProcessing"),
        Some(token),
        &json!({"clientContext": context}),
    );
    send(emulator, request).await
}

/// Asserts a Graph-shaped error with `status` and `code`.
fn assert_graph_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(
        body["error"]["innerError"]["request-id"].is_string(),
        "{body}"
    );
    assert!(body["error"]["innerError"]["date"].is_string(), "{body}");
}

/// One notification POST as the receiver saw it.
struct Delivery {
    headers: HeaderMap,
    bytes: Bytes,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap()
    }

    /// The resource data of the single notification.
    fn data(&self) -> Value {
        let body = self.json();
        assert_eq!(body["value"].as_array().map(Vec::len), Some(1), "{body}");
        body["value"][0]["resourceData"].clone()
    }
}

/// A notification receiver on a loopback port: its URL and what it received.
async fn receiver() -> (Url, mpsc::UnboundedReceiver<Delivery>) {
    let (sender, received) = mpsc::unbounded_channel::<Delivery>();
    let app = Router::new().route(
        "/callbacks/graph",
        post(move |headers: HeaderMap, bytes: Bytes| {
            let sender = sender.clone();
            async move {
                let _ = sender.send(Delivery { headers, bytes });
                StatusCode::ACCEPTED
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = Url::parse(&format!("http://{address}/callbacks/graph")).unwrap();
    (url, received)
}

async fn next_delivery(received: &mut mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .expect("a notification arrives")
        .expect("the receiver is running")
}

/// An emulator notifying a fresh receiver, and a token for it.
async fn notifying() -> (GraphEmulator, mpsc::UnboundedReceiver<Delivery>, String) {
    let emulator = emulator();
    let (url, received) = receiver().await;
    emulator.set_callback_url(url);
    let token = token(&emulator).await;
    (emulator, received, token)
}

fn script_delivering_first() -> GraphScript {
    GraphScript {
        notifications_before_response: true,
        ..GraphScript::default()
    }
}

#[tokio::test]
async fn token_is_issued_in_aad_shape_and_accepted() {
    let emulator = emulator();
    let (status, _, body) = send(&emulator, token_request(TENANT, credentials_with("", ""))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_same_shape(
        &body,
        &fixture("aad_client_credentials_token_response.json"),
        "$",
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    assert_eq!(emulator.token_requests(), 1);

    let token = body["access_token"].as_str().unwrap();
    assert!(token.len() >= 32, "{token}");
    play_prompt(&emulator, token, "cc-1").await;
    // Tenant and client id are GUIDs, compared case-insensitively as Entra does.
    let upper = token_request(
        &TENANT.to_uppercase(),
        credentials_with("client_id", &CLIENT_ID.to_uppercase()),
    );
    assert_eq!(send(&emulator, upper).await.0, StatusCode::OK);
    assert_ne!(token, self::token(&emulator).await, "every token is new");
}

#[tokio::test]
async fn token_refusals_have_aad_shape_and_never_echo_the_secret() {
    let emulator = emulator();
    let cases = [
        (
            TENANT,
            credentials_with("client_secret", "wrong"),
            401,
            "invalid_client",
            "AADSTS7000215",
        ),
        (
            TENANT,
            credentials_with("client_id", "someone-else"),
            401,
            "invalid_client",
            "AADSTS700016",
        ),
        (
            "other-tenant",
            credentials_with("", ""),
            401,
            "invalid_client",
            "AADSTS90002",
        ),
        (
            TENANT,
            credentials_with("scope", "https://graph.microsoft.com/User.Read"),
            400,
            "invalid_scope",
            "AADSTS1002012",
        ),
        (
            TENANT,
            credentials_with("grant_type", "password"),
            400,
            "unsupported_grant_type",
            "AADSTS70003",
        ),
        (
            TENANT,
            String::new(),
            400,
            "unsupported_grant_type",
            "AADSTS70003",
        ),
        (
            TENANT,
            "%%%&&&===".to_owned(),
            400,
            "unsupported_grant_type",
            "AADSTS70003",
        ),
    ];
    for (tenant, form, status, error, aadsts) in cases {
        let (got, _, body) = send(&emulator, token_request(tenant, form.clone())).await;
        assert_eq!(got.as_u16(), status, "{form}: {body}");
        assert_eq!(body["error"], error, "{form}: {body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(description.starts_with(aadsts), "{description}");
        assert!(body["error_codes"].is_array(), "{body}");
        assert!(!body.to_string().contains(SECRET), "{body}");
    }
    assert_eq!(emulator.token_requests(), 0);

    let log = serde_json::to_string(&emulator.requests()).unwrap();
    assert!(!log.contains(SECRET), "{log}");
    let first = &emulator.requests()[0];
    assert_eq!(first.status, 401);
    assert_eq!(first.body["client_secret"], "<redacted>");
    assert_eq!(first.body["client_id"], CLIENT_ID);
    assert_eq!(first.body["scope"], GRAPH_SCOPE);
}

#[test]
fn settings_debug_hides_the_secret() {
    let debug = format!("{:?}", settings());
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
}

#[tokio::test]
async fn graph_routes_need_a_valid_bearer_token() {
    let emulator = emulator();
    let body = json!({"clientContext": "cc"});
    for action in ["playPrompt", "recordResponse", "cancelMediaProcessing"] {
        let path = call_path(CALL, action);
        let (status, headers, answer) = send(&emulator, graph_post(&path, None, &body)).await;
        assert_graph_error(
            status,
            &answer,
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
        );
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));

        for authorization in ["Bearer garbage", "Basic dXNlcjpwYXNz", "Bearer", "bearer  "] {
            let mut request = graph_post(&path, None, &body);
            request.headers_mut().insert(
                header::AUTHORIZATION,
                HeaderValue::from_static(authorization),
            );
            let (status, _, answer) = send(&emulator, request).await;
            assert_graph_error(
                status,
                &answer,
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
            );
            assert_eq!(answer["error"]["message"], TOKEN_INVALID);
        }
    }
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let short_lived = GraphEmulator::new(GraphEmulatorSettings {
        token_lifetime: Duration::ZERO,
        ..settings()
    });
    let token = token(&short_lived).await;
    let request = graph_post(&call_path(CALL, "playPrompt"), Some(&token), &json!({}));
    let (status, _, body) = send(&short_lived, request).await;
    assert_graph_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        "InvalidAuthenticationToken",
    );
    assert_eq!(body["error"]["message"], TOKEN_INVALID);

    let emulator = emulator();
    let token = self::token(&emulator).await;
    play_prompt(&emulator, &token, "before").await;
    emulator.expire_tokens();
    let request = graph_post(&call_path(CALL, "playPrompt"), Some(&token), &json!({}));
    let (status, _, body) = send(&emulator, request).await;
    assert_graph_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        "InvalidAuthenticationToken",
    );
    // A refreshed token works again, until the test API expires it too.
    let fresh = self::token(&emulator).await;
    play_prompt(&emulator, &fresh, "after").await;
    let expire = Request::post("/emulator/graph/tokens:expire")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&emulator, expire).await.0, StatusCode::NO_CONTENT);
    let request = graph_post(
        &call_path(CALL, "cancelMediaProcessing"),
        Some(&fresh),
        &json!({}),
    );
    assert_eq!(send(&emulator, request).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(emulator.token_requests(), 2);
}

#[tokio::test]
async fn media_operations_answer_running_with_location() {
    let emulator = emulator();
    let token = token(&emulator).await;
    let request = graph_post(
        &call_path(CALL, "playPrompt"),
        Some(&token),
        &json!({"clientContext": "d45324c1-fcb5-430a-902c-f20af696537c"}),
    );
    let (status, headers, body) = send(&emulator, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_same_shape(&body, &fixture("v1_playprompt_response_running.json"), "$");
    assert_eq!(body["@odata.type"], "#microsoft.graph.playPromptOperation");
    assert_eq!(body["status"], "running");
    assert_eq!(
        body["clientContext"],
        "d45324c1-fcb5-430a-902c-f20af696537c"
    );
    let id = body["id"].as_str().unwrap();
    assert_eq!(Uuid::parse_str(id).unwrap().get_version_num(), 4);
    assert_eq!(
        headers[header::LOCATION],
        format!("http://{HOST}/v1.0/communications/calls/{CALL}/operations/{id}").as_str()
    );

    // No clientContext: one is generated.
    let request = graph_post(&call_path(CALL, "recordResponse"), Some(&token), &json!({}));
    let (status, headers, body) = send(&emulator, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_same_shape(
        &body,
        &fixture("v1_recordresponse_response_running.json"),
        "$",
    );
    assert_eq!(body["@odata.type"], "#microsoft.graph.recordOperation");
    assert!(
        Uuid::parse_str(body["clientContext"].as_str().unwrap()).is_ok(),
        "{body}"
    );
    let location = headers[header::LOCATION].to_str().unwrap();
    assert!(
        location.ends_with(body["id"].as_str().unwrap()),
        "{location}"
    );
}

#[tokio::test]
async fn bad_operation_bodies_are_400() {
    let emulator = emulator();
    let token = token(&emulator).await;
    let too_long = "x".repeat(MAX_CLIENT_CONTEXT + 1);
    let bodies = [
        json!({"clientContext": too_long}),
        json!({"clientContext": 42}),
        json!([1, 2]),
        json!("text"),
    ];
    for action in ["playPrompt", "recordResponse", "cancelMediaProcessing"] {
        for body in &bodies {
            let request = graph_post(&call_path(CALL, action), Some(&token), body);
            let (status, _, answer) = send(&emulator, request).await;
            assert_graph_error(status, &answer, StatusCode::BAD_REQUEST, "BadRequest");
        }
        for raw in ["", "{", "\u{0}"] {
            let request = Request::post(call_path(CALL, action))
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::from(raw))
                .unwrap();
            let (status, _, answer) = send(&emulator, request).await;
            assert_graph_error(status, &answer, StatusCode::BAD_REQUEST, "BadRequest");
        }
    }
    // Exactly 256 characters (not bytes) is allowed.
    let longest = "é".repeat(MAX_CLIENT_CONTEXT);
    let (status, _, body) = cancel(&emulator, &token, &longest).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["clientContext"], longest.as_str());
}

#[tokio::test]
async fn cancel_completed_notifies_each_cancelled_operation_with_its_own_context() {
    let (emulator, mut received, token) = notifying().await;
    let play = play_prompt(&emulator, &token, "play-ctx").await;
    let record = record_response(&emulator, &token, "record-ctx").await;

    let (status, headers, body) = cancel(&emulator, &token, "cancel-ctx").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_same_shape(
        &body,
        &fixture("v1_cancelmediaprocessing_response_200.json"),
        "$",
    );
    assert_eq!(
        body["@odata.type"],
        "#microsoft.graph.cancelMediaProcessingOperation"
    );
    assert_eq!(body["status"], "completed");
    assert_eq!(body["clientContext"], "cancel-ctx");
    let cancel_id = body["id"].as_str().unwrap();
    assert_ne!(cancel_id, play["id"]);
    assert_eq!(
        headers[header::LOCATION],
        format!("http://{HOST}/v1.0/communications/calls/{CALL}/operations/{cancel_id}").as_str()
    );

    let call_in_url = "57DAB8B1894C409AB240BD8BEAE78896";
    let deliveries = [
        next_delivery(&mut received).await,
        next_delivery(&mut received).await,
    ];
    for (delivery, operation, context) in [
        (&deliveries[0], &play, "play-ctx"),
        (&deliveries[1], &record, "record-ctx"),
    ] {
        assert_eq!(
            delivery.headers[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
        assert_eq!(
            delivery.headers[header::USER_AGENT],
            NOTIFICATION_USER_AGENT
        );
        let body = delivery.json();
        assert_eq!(body["@odata.type"], "#microsoft.graph.commsNotifications");
        let notification = &body["value"][0];
        assert_eq!(notification["changeType"], "deleted");
        let id = operation["id"].as_str().unwrap();
        let id_in_url = id.replace('-', "").to_uppercase();
        let resource_url = format!("/communications/calls/{call_in_url}/operations/{id_in_url}");
        assert_eq!(notification["resourceUrl"], resource_url.as_str());
        let data = delivery.data();
        assert_eq!(data["@odata.type"], operation["@odata.type"]);
        assert_eq!(data["@odata.id"], resource_url.as_str());
        assert_eq!(data["id"], id);
        assert_eq!(data["clientContext"], context);
        assert_eq!(data["status"], "failed");
        assert_eq!(data["resultInfo"]["code"], 400);
        assert_eq!(data["resultInfo"]["subcode"], 8508);
        assert_eq!(data["completionReason"], "operationCanceled");
    }
    // The record one has exactly the documented shape; the prompt one lacks recording fields.
    assert_same_shape(
        &deliveries[1].json(),
        &fixture("v1_cancelmediaprocessing_notification_record_canceled.json"),
        "$",
    );
    assert!(deliveries[0].data().get("recordingLocation").is_none());
    assert_eq!(deliveries[1].data()["recordingLocation"], "");

    // The queue was drained: a second cancel cancels nothing.
    emulator.set_script(CALL, script_delivering_first());
    let (status, _, _) = cancel(&emulator, &token, "again").await;
    assert_eq!(status, StatusCode::OK);
    assert!(received.try_recv().is_err(), "nothing left to cancel");
}

#[tokio::test]
async fn cancel_running_notifies_the_cancel_itself_last() {
    let (emulator, mut received, token) = notifying().await;
    emulator.set_script(
        CALL,
        GraphScript {
            cancel_status: CancelStatus::Running,
            ..GraphScript::default()
        },
    );
    let play = play_prompt(&emulator, &token, "play-ctx").await;
    let (status, _, body) = cancel(&emulator, &token, "cancel-ctx").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "running");

    assert_eq!(next_delivery(&mut received).await.data()["id"], play["id"]);
    let last = next_delivery(&mut received).await;
    let data = last.data();
    assert_eq!(
        data["@odata.type"],
        "#microsoft.graph.cancelMediaProcessingOperation"
    );
    assert_eq!(data["id"], body["id"]);
    assert_eq!(data["clientContext"], "cancel-ctx");
    assert_eq!(data["status"], "completed");
    assert_eq!(data["resultInfo"]["code"], 200);
    assert_eq!(data["resultInfo"]["subcode"], 0);
    let id_in_url = body["id"].as_str().unwrap().replace('-', "").to_uppercase();
    assert!(
        last.json()["value"][0]["resourceUrl"]
            .as_str()
            .unwrap()
            .ends_with(&id_in_url)
    );
}

#[tokio::test]
async fn fail_first_answers_throttling_with_fractional_retry_after() {
    let (emulator, mut received, token) = notifying().await;
    emulator.set_script(
        CALL,
        GraphScript {
            fail_first: vec![429, 503],
            retry_after_secs: Some(0.128),
            ..script_delivering_first()
        },
    );
    play_prompt(&emulator, &token, "play-ctx").await;

    let (status, headers, body) = cancel(&emulator, &token, "c").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "0.128");
    let sample = "graph_error_429_throttling_sample.http";
    let path = format!(
        "{}/tests/fixtures/graph/{sample}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).unwrap();
    let sample: Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_same_shape(&body, &sample, "$");
    assert_eq!(body["error"]["code"], "TooManyRequests");

    let (status, headers, body) = cancel(&emulator, &token, "c").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "0.128");
    assert!(
        received.try_recv().is_err(),
        "a refused cancel cancels nothing"
    );

    let (status, _, body) = cancel(&emulator, &token, "c").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        received.try_recv().unwrap().data()["clientContext"],
        "play-ctx"
    );

    // A new script starts counting again.
    emulator.set_script(
        CALL,
        GraphScript {
            fail_first: vec![429],
            ..GraphScript::default()
        },
    );
    let (status, headers, _) = cancel(&emulator, &token, "c").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(!headers.contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn reject_refuses_in_graph_shape_and_keeps_the_queue() {
    let (emulator, mut received, token) = notifying().await;
    emulator.set_script(
        CALL,
        GraphScript {
            reject: Some(Reject {
                status: 404,
                code: "itemNotFound".to_owned(),
                message: "Call not found".to_owned(),
            }),
            ..script_delivering_first()
        },
    );
    play_prompt(&emulator, &token, "play-ctx").await;
    for _ in 0..2 {
        let (status, _, body) = cancel(&emulator, &token, "c").await;
        assert_graph_error(status, &body, StatusCode::NOT_FOUND, "itemNotFound");
        assert_eq!(body["error"]["message"], "Call not found");
    }
    assert!(received.try_recv().is_err());
    emulator.set_script(CALL, script_delivering_first());
    assert_eq!(cancel(&emulator, &token, "c").await.0, StatusCode::OK);
    assert_eq!(
        received.try_recv().unwrap().data()["clientContext"],
        "play-ctx"
    );
}

#[tokio::test]
async fn empty_body_answers_202_with_location_and_notifies_the_cancel() {
    let (emulator, mut received, token) = notifying().await;
    emulator.set_script(
        CALL,
        GraphScript {
            empty_body: true,
            ..script_delivering_first()
        },
    );
    play_prompt(&emulator, &token, "play-ctx").await;
    let request = graph_post(
        &call_path(CALL, "cancelMediaProcessing"),
        Some(&token),
        &json!({"clientContext": "cancel-ctx"}),
    );
    let response = emulator.router().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = axum::body::to_bytes(response.into_body(), 1024)
        .await
        .unwrap();
    assert!(bytes.is_empty());

    assert_eq!(
        received.try_recv().unwrap().data()["clientContext"],
        "play-ctx"
    );
    let data = received.try_recv().unwrap().data();
    assert_eq!(
        data["@odata.type"],
        "#microsoft.graph.cancelMediaProcessingOperation"
    );
    assert_eq!(data["clientContext"], "cancel-ctx");
    let id = data["id"].as_str().unwrap();
    assert_eq!(location.rsplit('/').next(), Some(id), "{location}");
}

#[tokio::test]
async fn duplicates_are_identical_bytes() {
    let (emulator, mut received, token) = notifying().await;
    emulator.set_script(
        CALL,
        GraphScript {
            duplicates: 2,
            ..GraphScript::default()
        },
    );
    play_prompt(&emulator, &token, "play-ctx").await;
    record_response(&emulator, &token, "record-ctx").await;
    assert_eq!(cancel(&emulator, &token, "c").await.0, StatusCode::OK);

    let mut deliveries = Vec::new();
    for _ in 0..6 {
        deliveries.push(next_delivery(&mut received).await);
    }
    for group in deliveries.chunks(3) {
        assert!(group.iter().all(|d| d.bytes == group[0].bytes));
        let message_id = &group[0].headers["x-microsoft-skype-message-id"];
        assert!(
            group
                .iter()
                .all(|d| d.headers["x-microsoft-skype-message-id"] == message_id)
        );
    }
    assert_eq!(deliveries[0].data()["clientContext"], "play-ctx");
    assert_eq!(deliveries[3].data()["clientContext"], "record-ctx");
}

#[tokio::test]
async fn notifications_wait_for_the_delay() {
    let emulator = GraphEmulator::new(GraphEmulatorSettings {
        notification_delay: Duration::from_millis(300),
        signer: None,
        ..settings()
    });
    let (url, mut received) = receiver().await;
    emulator.set_callback_url(url);
    let token = token(&emulator).await;
    play_prompt(&emulator, &token, "play-ctx").await;
    let started = Instant::now();
    assert_eq!(cancel(&emulator, &token, "c").await.0, StatusCode::OK);
    next_delivery(&mut received).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn the_scripted_delay_wins_over_the_default() {
    // Far longer than `next_delivery` waits.
    let emulator = GraphEmulator::new(GraphEmulatorSettings {
        notification_delay: Duration::from_secs(3600),
        signer: None,
        ..settings()
    });
    let (url, mut received) = receiver().await;
    emulator.set_callback_url(url);
    emulator.set_script(
        CALL,
        GraphScript {
            notification_delay_ms: Some(20),
            ..GraphScript::default()
        },
    );
    let token = token(&emulator).await;
    play_prompt(&emulator, &token, "play-ctx").await;
    let started = Instant::now();
    assert_eq!(cancel(&emulator, &token, "c").await.0, StatusCode::OK);
    next_delivery(&mut received).await;
    assert!(started.elapsed() >= Duration::from_millis(20));
}

#[tokio::test]
async fn notifications_before_response_are_delivered_and_counted_first() {
    let (emulator, mut received, token) = notifying().await;
    emulator.set_script(
        CALL,
        GraphScript {
            duplicates: 1,
            // A long delay would only show if it applied before the response.
            notification_delay_ms: Some(60_000),
            ..script_delivering_first()
        },
    );
    play_prompt(&emulator, &token, "play-ctx").await;
    let answered = tokio::time::timeout(Duration::from_secs(10), cancel(&emulator, &token, "c"))
        .await
        .expect("answered without waiting for the delay");
    assert_eq!(answered.0, StatusCode::OK);
    assert_eq!(emulator.notifications_delivered(), 2);
    assert_eq!(
        received.try_recv().unwrap().data()["clientContext"],
        "play-ctx"
    );
    assert_eq!(
        received.try_recv().unwrap().data()["clientContext"],
        "play-ctx"
    );
    assert!(received.try_recv().is_err());
}

#[tokio::test]
async fn notifications_go_to_the_scripted_uri_or_nowhere() {
    let (emulator, mut default_received, token) = notifying().await;
    let (scripted, mut scripted_received) = receiver().await;
    emulator.set_script(
        CALL,
        GraphScript {
            callback_uri: Some(scripted.to_string()),
            ..script_delivering_first()
        },
    );
    play_prompt(&emulator, &token, "play-ctx").await;
    assert_eq!(cancel(&emulator, &token, "c").await.0, StatusCode::OK);
    assert_eq!(
        scripted_received.try_recv().unwrap().data()["clientContext"],
        "play-ctx"
    );
    assert!(default_received.try_recv().is_err());

    emulator.set_script(
        CALL,
        GraphScript {
            no_notifications: true,
            cancel_status: CancelStatus::Running,
            ..script_delivering_first()
        },
    );
    play_prompt(&emulator, &token, "play-ctx").await;
    assert_eq!(cancel(&emulator, &token, "c").await.0, StatusCode::OK);
    assert!(default_received.try_recv().is_err());
    assert_eq!(emulator.notifications_delivered(), 1);

    // No callback URL anywhere: the cancel still succeeds.
    let lonely = self::emulator();
    let token = self::token(&lonely).await;
    play_prompt(&lonely, &token, "play-ctx").await;
    assert_eq!(cancel(&lonely, &token, "c").await.0, StatusCode::OK);
}

#[tokio::test]
async fn delivery_failures_are_not_counted_nor_fatal() {
    let emulator = emulator();
    // A port nobody listens on: bind, note it, close.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    emulator.set_callback_url(Url::parse(&format!("http://{address}/callbacks/graph")).unwrap());
    emulator.set_script(CALL, script_delivering_first());
    let token = token(&emulator).await;
    play_prompt(&emulator, &token, "play-ctx").await;
    assert_eq!(cancel(&emulator, &token, "c").await.0, StatusCode::OK);
    assert_eq!(emulator.notifications_delivered(), 0);
}

#[tokio::test]
async fn scripts_are_set_over_http() {
    let (emulator, mut received, token) = notifying().await;
    let put = |body: &str| {
        Request::put(format!("/emulator/graph/calls/{CALL}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let script = r#"{"cancelStatus": "running", "notificationsBeforeResponse": true, "retryAfterSecs": 0.5, "failFirst": [429]}"#;
    assert_eq!(send(&emulator, put(script)).await.0, StatusCode::NO_CONTENT);
    for bad in [
        r#"{"cancelStatus": "sideways"}"#,
        r#"{"unknownField": 1}"#,
        "{",
    ] {
        let (status, _, body) = send(&emulator, put(bad)).await;
        assert_graph_error(status, &body, StatusCode::BAD_REQUEST, "BadRequest");
    }
    let (status, headers, _) = cancel(&emulator, &token, "c").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "0.5");
    let (status, _, body) = cancel(&emulator, &token, "c").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "running");
    assert_eq!(received.try_recv().unwrap().data()["id"], body["id"]);
}

#[tokio::test]
async fn requests_are_recorded_with_credentials_redacted() {
    let emulator = emulator();
    let token = token(&emulator).await;
    play_prompt(&emulator, &token, "play-ctx").await;
    let request = graph_post(
        &call_path(CALL, "cancelMediaProcessing"),
        Some("nope"),
        &json!({}),
    );
    assert_eq!(send(&emulator, request).await.0, StatusCode::UNAUTHORIZED);

    let requests = emulator.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    let log = serde_json::to_string(&requests).unwrap();
    assert!(!log.contains(SECRET) && !log.contains(&token), "{log}");
    assert_eq!(
        requests[0].path_and_query,
        format!("/{TENANT}/oauth2/v2.0/token")
    );
    assert_eq!(requests[0].body["client_secret"], "<redacted>");
    assert_eq!(requests[0].status, 200);
    assert_eq!(requests[1].method, "POST");
    assert_eq!(requests[1].headers["authorization"], "Bearer <redacted>");
    assert_eq!(requests[1].headers["content-type"], "application/json");
    assert_eq!(requests[1].body["clientContext"], "play-ctx");
    assert_eq!(requests[1].status, 200);
    assert_eq!(requests[2].status, 401);

    let list = Request::get("/emulator/graph/requests")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&emulator, list).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body.as_array().map(Vec::len),
        Some(3),
        "the test API is not recorded"
    );
    assert_eq!(redact_authorization("Basic dXNlcg=="), "Basic <redacted>");
    assert_eq!(redact_authorization("tok"), "<redacted>");
}

#[tokio::test]
async fn the_sdk_request_is_accepted() {
    let path = format!(
        "{}/tests/fixtures/sdk-requests/graph_cancel_media_processing.msgraph-sdk-1.65.0.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let sample: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let emulator = emulator();
    let token = token(&emulator).await;
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(sample["request"]["path"].as_str().unwrap());
    for (name, value) in sample["request"]["headers"].as_object().unwrap() {
        let value = match name.as_str() {
            "authorization" => format!("Bearer {token}"),
            _ => value.as_str().unwrap().to_owned(),
        };
        if name != "Content-Length" {
            request = request.header(name.as_str(), value);
        }
    }
    let body = serde_json::to_vec(&sample["request"]["body"]).unwrap();
    let (status, headers, answer) = send(&emulator, request.body(Body::from(body)).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["clientContext"], "cc-1");
    let location = headers[header::LOCATION].to_str().unwrap();
    assert!(location.starts_with("http://127.0.0.1:18556/v1.0/communications/calls/57dab8b1-"));
}

#[tokio::test]
async fn the_acs_emulator_serves_the_graph_routes_with_the_configured_app() {
    let config = crate::config::Config::embedded().emulator;
    let acs = crate::emulator::Emulator::new(&config);
    let router = acs.router();
    let form = format!(
        "client_id={}&client_secret={}&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default&grant_type=client_credentials",
        config.graph_client_id, config.graph_client_secret
    );
    let response = router
        .clone()
        .oneshot(token_request(&config.graph_tenant_id, form))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let acs_requests = Request::get("/emulator/requests")
        .body(Body::empty())
        .unwrap();
    let response = router.oneshot(acs_requests).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(acs.graph().token_requests(), 1);
}

#[test]
fn resource_ids_are_upper_case_without_hyphens_when_uuids() {
    let op = Uuid::parse_str("0fe0623f-d628-42ed-b4bd-8ac290072cc5").unwrap();
    assert_eq!(
        resource_url(CALL, &op),
        "/communications/calls/57DAB8B1894C409AB240BD8BEAE78896/operations/0FE0623FD62842EDB4BD8AC290072CC5"
    );
    assert_eq!(
        resource_url("call-one", &op),
        "/communications/calls/call-one/operations/0FE0623FD62842EDB4BD8AC290072CC5"
    );
}
