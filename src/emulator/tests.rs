use super::*;

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

use crate::config::Config;
use crate::emulator::script::{Reject, Script};

const HOST: &str = "127.0.0.1:8090";
const PATH: &str = "/calling/callConnections/c1/participants:remove?api-version=2024-09-15";

fn emulator() -> Emulator {
    Emulator::new(&Config::embedded().emulator)
}

fn key() -> Vec<u8> {
    decode_key(&Config::embedded().emulator.access_key).unwrap()
}

/// A request signed as the client signs it; `tamper` may change it afterwards.
fn signed(path: &str, body: &Value, tamper: impl FnOnce(&mut HeaderMap)) -> Request<Body> {
    let body = serde_json::to_vec(body).unwrap();
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let signed = signing::sign(&key(), "POST", path, HOST, &date, &body);
    let mut headers = HeaderMap::new();
    headers.insert("host", HOST.parse().unwrap());
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("x-ms-date", signed.date.parse().unwrap());
    headers.insert(
        "x-ms-content-sha256",
        signed.content_sha256.parse().unwrap(),
    );
    headers.insert("authorization", signed.authorization.parse().unwrap());
    headers.insert(
        "repeatability-request-id",
        "618d5cae-3dd0-46bd-ba6f-924c8c6b3396".parse().unwrap(),
    );
    headers.insert("repeatability-first-sent", date.parse().unwrap());
    tamper(&mut headers);
    let mut request = Request::post(path).body(Body::from(body)).unwrap();
    *request.headers_mut() = headers;
    request
}

fn call_not_found() -> Script {
    Script {
        reject: Some(Reject {
            status: 404,
            code: "8522".into(),
            message: "Call not found".into(),
        }),
        ..Script::default()
    }
}

fn body() -> Value {
    json!({"participantToRemove": {"rawId": "8:acs:x", "communicationUser": {"id": "8:acs:x"}}, "operationContext": "ctx"})
}

async fn send(emulator: &Emulator, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = emulator.router().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Asserts an ACS-shaped error with `status`.
async fn refused(emulator: &Emulator, request: Request<Body>, status: StatusCode) -> Value {
    let (got, _, body) = send(emulator, request).await;
    assert_eq!(got, status, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    body
}

#[tokio::test]
async fn a_signed_request_is_accepted() {
    let emulator = emulator();
    let (status, _, body) = send(&emulator, signed(PATH, &body(), |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"operationContext": "ctx"}));
    let requests = emulator.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, 202);
    assert_eq!(requests[0].path_and_query, PATH);
    assert_eq!(requests[0].body, self::body());
}

#[tokio::test]
async fn bad_signatures_are_401() {
    let emulator = emulator();
    let unauthorized = StatusCode::UNAUTHORIZED;
    let wrong_signature = signed(PATH, &body(), |h| {
        h.insert(
            "authorization",
            "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=AAAA"
                .parse()
                .unwrap(),
        );
    });
    refused(&emulator, wrong_signature, unauthorized).await;
    let other_host = signed(PATH, &body(), |h| {
        h.insert("host", "127.0.0.1:9999".parse().unwrap());
    });
    refused(&emulator, other_host, unauthorized).await;
    let no_auth = signed(PATH, &body(), |h| {
        h.remove("authorization");
    });
    refused(&emulator, no_auth, unauthorized).await;
    // The signature covers the hash, but the body is not the one hashed.
    let mut swapped = signed(PATH, &body(), |_| {});
    *swapped.body_mut() = Body::from(r#"{"participantToRemove": {"rawId": "8:acs:y"}}"#);
    refused(&emulator, swapped, unauthorized).await;
    let stale = signed(PATH, &body(), |h| {
        h.insert(
            "x-ms-date",
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
    });
    refused(&emulator, stale, unauthorized).await;
    assert!(emulator.requests().iter().all(|r| r.status == 401));
}

#[tokio::test]
async fn repeatability_headers_and_api_version_are_checked() {
    let emulator = emulator();
    let bad = StatusCode::BAD_REQUEST;
    let only_one = signed(PATH, &body(), |h| {
        h.remove("repeatability-first-sent");
    });
    refused(&emulator, only_one, bad).await;
    let not_uuid = signed(PATH, &body(), |h| {
        h.insert("repeatability-request-id", "not-a-uuid".parse().unwrap());
    });
    refused(&emulator, not_uuid, bad).await;
    let not_a_date = signed(PATH, &body(), |h| {
        h.insert("repeatability-first-sent", "yesterday".parse().unwrap());
    });
    refused(&emulator, not_a_date, bad).await;
    let path = "/calling/callConnections/c1/participants:remove";
    let body = refused(&emulator, signed(path, &self::body(), |_| {}), bad).await;
    assert_eq!(body["error"]["code"], "MissingApiVersionParameter");
    let no_participant = signed(PATH, &json!({"operationContext": "x"}), |_| {});
    refused(&emulator, no_participant, bad).await;
    // Neither header is fine: the SDKs may omit both.
    let neither = signed(PATH, &self::body(), |h| {
        h.remove("repeatability-request-id");
        h.remove("repeatability-first-sent");
    });
    assert_eq!(send(&emulator, neither).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn scripts_throttle_then_accept_and_retries_of_accepted_requests_are_202() {
    let emulator = emulator();
    emulator.set_script(
        "c1",
        Script {
            fail_first: vec![429],
            retry_after_secs: Some(1.0),
            ..Script::default()
        },
    );
    let (status, headers, _) = send(&emulator, signed(PATH, &body(), |_| {})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    let (status, _, _) = send(&emulator, signed(PATH, &body(), |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Same repeatability id again: accepted again, whatever the script says now.
    emulator.set_script("c1", call_not_found());
    let (status, _, _) = send(&emulator, signed(PATH, &body(), |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let statuses: Vec<u16> = emulator.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 202, 202]);
}

#[tokio::test]
async fn a_rejecting_script_answers_the_acs_error() {
    let emulator = emulator();
    emulator.set_script("c1", call_not_found());
    let (status, _, body) = send(&emulator, signed(PATH, &body(), |_| {})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": {"code": "8522", "message": "Call not found"}})
    );
}

#[tokio::test]
async fn the_callback_is_a_realistic_cloud_event_delivered_as_scripted() {
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let receiver = Router::new().route(
        "/callbacks/acs",
        post(move |axum::Json(body): axum::Json<Value>| {
            let sender = sender.clone();
            async move {
                let _ = sender.send(body);
                StatusCode::OK
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let emulator = emulator();
    emulator.set_script(
        "c7",
        Script {
            duplicates: 1,
            ..Script::default()
        },
    );
    let path = "/calling/callConnections/c7/participants:remove?api-version=2024-09-15";
    let mut request_body = body();
    request_body["operationCallbackUri"] = json!(format!("http://{address}/callbacks/acs"));
    let (status, _, _) = send(&emulator, signed(path, &request_body, |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let mut deliveries = Vec::new();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), received.recv())
            .await
            .expect("a delivery arrives")
            .unwrap();
        deliveries.push(delivery);
    }
    assert_eq!(
        deliveries[0], deliveries[1],
        "a duplicate is the same event"
    );
    let events = deliveries[0].as_array().unwrap();
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert!(Uuid::try_parse(event["id"].as_str().unwrap()).is_ok());
    assert_eq!(
        event["type"],
        "Microsoft.Communication.RemoveParticipantSucceeded"
    );
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["source"], "calling/callConnections/c7");
    assert_eq!(event["subject"], "calling/callConnections/c7");
    let data = &event["data"];
    assert_eq!(data["operationContext"], "ctx");
    assert_eq!(data["callConnectionId"], "c7");
    assert_eq!(data["resultInformation"]["code"], 200);
    assert_eq!(data["version"], "2024-09-15");
    assert_eq!(data["publicEventType"], event["type"]);
    assert_eq!(data["participant"], request_body["participantToRemove"]);
    // And the service's own decoder reads it.
    let decoded = crate::acs::events::decode(&serde_json::to_vec(&deliveries[0]).unwrap()).unwrap();
    assert_eq!(decoded[0].operation_context.as_deref(), Some("ctx"));
    assert_eq!(decoded[0].call_connection_id.as_deref(), Some("c7"));
}
