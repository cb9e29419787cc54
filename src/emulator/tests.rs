use super::*;

use axum::body::Body;
use axum::http::Request;
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::config::Config;
use crate::emulator::script::{Reject, Script};

const HOST: &str = "127.0.0.1:8090";
const PATH: &str = "/calling/callConnections/c1/participants:remove?api-version=2024-09-15";
const REQUEST_ID: &str = "618d5cae-3dd0-46bd-ba6f-924c8c6b3396";

fn emulator() -> Emulator {
    Emulator::new(&Config::embedded().emulator)
}

fn key() -> Vec<u8> {
    decode_key(&Config::embedded().emulator.access_key).unwrap()
}

fn remove_path(call_connection_id: &str) -> String {
    format!(
        "/calling/callConnections/{call_connection_id}/participants:remove?api-version=2024-09-15"
    )
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
    headers.insert("repeatability-request-id", REQUEST_ID.parse().unwrap());
    headers.insert("repeatability-first-sent", date.parse().unwrap());
    tamper(&mut headers);
    let mut request = Request::post(path).body(Body::from(body)).unwrap();
    *request.headers_mut() = headers;
    request
}

/// A signed request with its own repeatability id.
fn fresh(path: &str, body: &Value) -> Request<Body> {
    signed(path, body, |h| {
        h.insert(
            "repeatability-request-id",
            Uuid::new_v4().to_string().parse().unwrap(),
        );
    })
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

/// `body()` asking for its callback at `uri`.
fn body_calling_back(uri: &str) -> Value {
    let mut body = body();
    body["operationCallbackUri"] = json!(uri);
    body
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

async fn status_of(emulator: &Emulator, request: Request<Body>) -> StatusCode {
    send(emulator, request).await.0
}

/// Asserts an ACS-shaped error with `status`.
async fn refused(emulator: &Emulator, request: Request<Body>, status: StatusCode) -> Value {
    let (got, _, body) = send(emulator, request).await;
    assert_eq!(got, status, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    body
}

fn statuses(emulator: &Emulator) -> Vec<u16> {
    emulator.requests().iter().map(|r| r.status).collect()
}

/// A callback receiver on a loopback port: its URI and the bodies it received.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    let (sender, received) = mpsc::unbounded_channel::<Value>();
    let app = Router::new().route(
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
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/callbacks/acs"), received)
}

async fn next_delivery(received: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .expect("a delivery arrives")
        .expect("the receiver is running")
}

/// The single CloudEvent of a delivery.
fn only_event(delivery: &Value) -> &Value {
    let events = delivery.as_array().expect("a JSON array");
    assert_eq!(events.len(), 1, "{delivery}");
    &events[0]
}

#[tokio::test]
async fn a_signed_request_is_accepted() {
    let emulator = emulator();
    let (status, _, body) = send(&emulator, signed(PATH, &body(), |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"operationContext": "ctx"}));
    let requests = emulator.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].status, 202);
    assert_eq!(requests[0].path_and_query, PATH);
    assert_eq!(requests[0].body, self::body());
    assert_eq!(requests[0].headers["host"], HOST);
    assert_eq!(requests[0].headers["repeatability-request-id"], REQUEST_ID);
    assert!(requests[0].headers["authorization"].starts_with("HMAC-SHA256 "));
    assert_eq!(
        emulator.callbacks_delivered(),
        0,
        "no callback was asked for"
    );
}

#[tokio::test]
async fn a_request_without_context_is_accepted_with_an_empty_one() {
    let emulator = emulator();
    let body = json!({"participantToRemove": {"rawId": "8:acs:x"}});
    let (status, _, answer) = send(&emulator, signed(PATH, &body, |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(answer, json!({"operationContext": ""}));
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
    let body = refused(&emulator, wrong_signature, unauthorized).await;
    assert_eq!(body["error"]["code"], "Unauthorized");
    let other_host = signed(PATH, &self::body(), |h| {
        h.insert("host", "127.0.0.1:9999".parse().unwrap());
    });
    refused(&emulator, other_host, unauthorized).await;
    let no_auth = signed(PATH, &self::body(), |h| {
        h.remove("authorization");
    });
    refused(&emulator, no_auth, unauthorized).await;
    let no_hash = signed(PATH, &self::body(), |h| {
        h.remove("x-ms-content-sha256");
    });
    refused(&emulator, no_hash, unauthorized).await;
    let other_scheme = signed(PATH, &self::body(), |h| {
        h.insert("authorization", "Bearer token".parse().unwrap());
    });
    refused(&emulator, other_scheme, unauthorized).await;
    // The signature covers the hash, but the body is not the one hashed.
    let mut swapped = signed(PATH, &self::body(), |_| {});
    *swapped.body_mut() = Body::from(r#"{"participantToRemove": {"rawId": "8:acs:y"}}"#);
    let body = refused(&emulator, swapped, unauthorized).await;
    assert_eq!(
        body["error"]["message"],
        "x-ms-content-sha256 does not match the body."
    );
    // Signed for another path (the query is signed too).
    let mut elsewhere = signed(PATH, &self::body(), |_| {});
    *elsewhere.uri_mut() = remove_path("c2").parse().unwrap();
    refused(&emulator, elsewhere, unauthorized).await;
    let stale = signed(PATH, &self::body(), |h| {
        h.insert(
            "x-ms-date",
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
    });
    refused(&emulator, stale, unauthorized).await;
    let not_a_date = signed(PATH, &self::body(), |h| {
        h.insert("x-ms-date", "yesterday".parse().unwrap());
    });
    refused(&emulator, not_a_date, unauthorized).await;
    // Signed with another key.
    let request_body = serde_json::to_vec(&self::body()).unwrap();
    let other_key = signing::sign(
        b"not the emulator's key",
        "POST",
        PATH,
        HOST,
        &httpdate::fmt_http_date(std::time::SystemTime::now()),
        &request_body,
    );
    let foreign = signed(PATH, &self::body(), |h| {
        h.insert("x-ms-date", other_key.date.parse().unwrap());
        h.insert("authorization", other_key.authorization.parse().unwrap());
    });
    refused(&emulator, foreign, unauthorized).await;
    let requests = emulator.requests();
    assert_eq!(requests.len(), 10);
    assert!(requests.iter().all(|r| r.status == 401));
}

#[tokio::test]
async fn the_signature_is_checked_before_anything_else() {
    let emulator = emulator();
    // No api-version, no participant, a bad repeatability id: still 401 first.
    let path = "/calling/callConnections/c1/participants:remove";
    let request = signed(path, &json!({}), |h| {
        h.insert("repeatability-request-id", "nope".parse().unwrap());
        h.insert("authorization", "HMAC-SHA256 x".parse().unwrap());
    });
    refused(&emulator, request, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn repeatability_headers_and_api_version_are_checked() {
    let emulator = emulator();
    let bad = StatusCode::BAD_REQUEST;
    let only_id = signed(PATH, &body(), |h| {
        h.remove("repeatability-first-sent");
    });
    refused(&emulator, only_id, bad).await;
    let only_first_sent = signed(PATH, &body(), |h| {
        h.remove("repeatability-request-id");
    });
    refused(&emulator, only_first_sent, bad).await;
    let not_uuid = signed(PATH, &body(), |h| {
        h.insert("repeatability-request-id", "not-a-uuid".parse().unwrap());
    });
    let answer = refused(&emulator, not_uuid, bad).await;
    assert_eq!(
        answer["error"]["message"],
        "Repeatability-Request-ID must be a UUID."
    );
    let not_a_date = signed(PATH, &body(), |h| {
        h.insert("repeatability-first-sent", "yesterday".parse().unwrap());
    });
    refused(&emulator, not_a_date, bad).await;

    let no_version = "/calling/callConnections/c1/participants:remove";
    let answer = refused(&emulator, signed(no_version, &body(), |_| {}), bad).await;
    assert_eq!(answer["error"]["code"], "MissingApiVersionParameter");
    let empty_version = "/calling/callConnections/c1/participants:remove?api-version=";
    let answer = refused(&emulator, signed(empty_version, &body(), |_| {}), bad).await;
    assert_eq!(answer["error"]["code"], "MissingApiVersionParameter");

    let no_participant = signed(PATH, &json!({"operationContext": "x"}), |_| {});
    let answer = refused(&emulator, no_participant, bad).await;
    assert_eq!(answer["error"]["code"], "8523");
    let null_participant = signed(PATH, &json!({"participantToRemove": null}), |_| {});
    refused(&emulator, null_participant, bad).await;
    let not_an_object = signed(PATH, &json!(["participantToRemove"]), |_| {});
    refused(&emulator, not_an_object, bad).await;
    assert!(statuses(&emulator).iter().all(|s| *s == 400));

    // Neither header is fine: the SDKs may omit both.
    let neither = signed(PATH, &body(), |h| {
        h.remove("repeatability-request-id");
        h.remove("repeatability-first-sent");
    });
    assert_eq!(status_of(&emulator, neither).await, StatusCode::ACCEPTED);
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
    let (status, headers, body) = send(&emulator, signed(PATH, &body(), |_| {})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    assert!(body["error"]["code"].is_string(), "{body}");
    // The client's retry: same repeatability id, accepted this time.
    let (status, headers, body) = send(&emulator, signed(PATH, &self::body(), |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(headers.get("retry-after").is_none());
    assert_eq!(body, json!({"operationContext": "ctx"}));
    // Same repeatability id again: accepted again, whatever the script says now.
    emulator.set_script("c1", call_not_found());
    let (status, _, body) = send(&emulator, signed(PATH, &self::body(), |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"operationContext": "ctx"}));
    // A new request is not a retry: the script answers it.
    assert_eq!(
        status_of(&emulator, fresh(PATH, &self::body())).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(statuses(&emulator), [429, 202, 202, 404]);
}

#[tokio::test]
async fn failures_follow_the_script_in_order_and_only_for_its_call() {
    let emulator = emulator();
    emulator.set_script(
        "c1",
        Script {
            fail_first: vec![503, 500],
            ..Script::default()
        },
    );
    let (status, headers, _) = send(&emulator, fresh(PATH, &body())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.get("retry-after").is_none(), "none was scripted");
    assert_eq!(
        status_of(&emulator, fresh(&remove_path("c2"), &body())).await,
        StatusCode::ACCEPTED,
        "other calls keep the default script"
    );
    assert_eq!(
        status_of(&emulator, fresh(PATH, &body())).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        status_of(&emulator, fresh(PATH, &body())).await,
        StatusCode::ACCEPTED
    );
    // Setting the script again starts its count over.
    emulator.set_script(
        "c1",
        Script {
            fail_first: vec![429],
            retry_after_secs: Some(0.5),
            ..Script::default()
        },
    );
    let (status, headers, _) = send(&emulator, fresh(PATH, &body())).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "0.5");
    assert_eq!(statuses(&emulator), [503, 202, 500, 202, 429]);
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
    // A refused request is not remembered: its retry is answered afresh.
    emulator.set_script("c1", Script::default());
    assert_eq!(
        status_of(&emulator, signed(PATH, &self::body(), |_| {})).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(statuses(&emulator), [404, 202]);
}

#[tokio::test]
async fn scripts_and_the_request_log_are_served_over_http() {
    let emulator = emulator();
    let put = |path: &str, body: &str| {
        Request::put(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let script = r#"{"reject": {"status": 404, "code": "8522", "message": "Call not found"}}"#;
    let (status, _, _) = send(&emulator, put("/emulator/scripts/c1", script)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, body) = send(&emulator, signed(PATH, &body(), |_| {})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "8522");

    // Unknown fields are refused, so a typo does not silently script nothing.
    let typo = put("/emulator/scripts/c1", r#"{"rejectt": {}}"#);
    refused(&emulator, typo, StatusCode::BAD_REQUEST).await;
    let not_json = put("/emulator/scripts/c1", "{");
    refused(&emulator, not_json, StatusCode::BAD_REQUEST).await;
    // The earlier script still holds.
    assert_eq!(
        status_of(&emulator, fresh(PATH, &self::body())).await,
        StatusCode::NOT_FOUND
    );

    let list = Request::get("/emulator/requests")
        .body(Body::empty())
        .unwrap();
    let (status, _, log) = send(&emulator, list).await;
    assert_eq!(status, StatusCode::OK);
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 2, "only participants:remove requests are logged");
    assert_eq!(log[0]["method"], "POST");
    assert_eq!(log[0]["pathAndQuery"], PATH);
    assert_eq!(log[0]["status"], 404);
    assert_eq!(log[0]["body"], self::body());
    assert_eq!(log[0]["headers"]["host"], HOST);
}

#[tokio::test]
async fn the_callback_is_a_realistic_cloud_event_delivered_as_scripted() {
    let (uri, mut received) = receiver().await;
    let emulator = emulator();
    emulator.set_script(
        "c7",
        Script {
            duplicates: 1,
            ..Script::default()
        },
    );
    let request_body = body_calling_back(&uri);
    let (status, _, _) = send(&emulator, signed(&remove_path("c7"), &request_body, |_| {})).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let deliveries = [
        next_delivery(&mut received).await,
        next_delivery(&mut received).await,
    ];
    assert_eq!(
        deliveries[0], deliveries[1],
        "a duplicate is the same event"
    );
    let event = only_event(&deliveries[0]);
    assert_eq!(only_event(&deliveries[1])["id"], event["id"]);
    assert!(Uuid::try_parse(event["id"].as_str().unwrap()).is_ok());
    assert_eq!(
        event["type"],
        "Microsoft.Communication.RemoveParticipantSucceeded"
    );
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["source"], "calling/callConnections/c7");
    assert_eq!(event["subject"], "calling/callConnections/c7");
    assert_eq!(event["datacontenttype"], "application/json");
    assert!(event["time"].is_string());
    let data = &event["data"];
    assert_eq!(data["operationContext"], "ctx");
    assert_eq!(data["callConnectionId"], "c7");
    assert_eq!(data["resultInformation"]["code"], 200);
    assert_eq!(data["resultInformation"]["subCode"], 0);
    assert_eq!(data["version"], "2024-09-15");
    assert_eq!(data["publicEventType"], event["type"]);
    assert_eq!(data["participant"], request_body["participantToRemove"]);
    assert!(data["serverCallId"].is_string());
    assert!(data["correlationId"].is_string());
    // And the service's own decoder reads it.
    let decoded = crate::acs::events::decode(&serde_json::to_vec(&deliveries[0]).unwrap()).unwrap();
    assert_eq!(decoded[0].operation_context.as_deref(), Some("ctx"));
    assert_eq!(decoded[0].call_connection_id.as_deref(), Some("c7"));
}

#[tokio::test]
async fn a_failing_script_calls_back_with_the_failure() {
    let (uri, mut received) = receiver().await;
    let emulator = emulator();
    emulator.set_script(
        "c1",
        Script {
            outcome: Outcome::Fail,
            ..Script::default()
        },
    );
    let status = status_of(&emulator, fresh(PATH, &body_calling_back(&uri))).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the failure comes by callback"
    );
    let delivery = next_delivery(&mut received).await;
    let event = only_event(&delivery);
    assert_eq!(
        event["type"],
        "Microsoft.Communication.RemoveParticipantFailed"
    );
    assert_eq!(event["data"]["publicEventType"], event["type"]);
    assert_eq!(event["data"]["resultInformation"]["code"], 400);
    assert_eq!(event["data"]["resultInformation"]["subCode"], 8523);

    // The result information can be scripted too.
    emulator.set_script(
        "c1",
        Script {
            outcome: Outcome::Fail,
            result_information: Some(ResultInformation {
                code: 403,
                sub_code: 7000,
                message: "scripted".into(),
            }),
            ..Script::default()
        },
    );
    status_of(&emulator, fresh(PATH, &body_calling_back(&uri))).await;
    let delivery = next_delivery(&mut received).await;
    assert_eq!(
        only_event(&delivery)["data"]["resultInformation"],
        json!({"code": 403, "subCode": 7000, "message": "scripted"})
    );
}

#[tokio::test]
async fn a_retry_of_an_accepted_request_calls_back_only_once() {
    let (uri, mut received) = receiver().await;
    let emulator = emulator();
    // Delivered before the 202, so once a request is answered its callback is done.
    emulator.set_script(
        "c1",
        Script {
            callback_before_response: true,
            ..Script::default()
        },
    );
    let body = body_calling_back(&uri);
    assert_eq!(
        status_of(&emulator, signed(PATH, &body, |_| {})).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(emulator.callbacks_delivered(), 1);
    let first = next_delivery(&mut received).await;
    assert_eq!(
        status_of(&emulator, signed(PATH, &body, |_| {})).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        emulator.callbacks_delivered(),
        1,
        "the retry calls back no more"
    );
    assert!(received.try_recv().is_err());
    let repeats: Vec<bool> = emulator.requests().iter().map(|r| r.repeat).collect();
    assert_eq!(
        repeats,
        [false, true],
        "only the retry is recorded as a repeat"
    );
    // Another request is another operation, with its own event.
    assert_eq!(
        status_of(&emulator, fresh(PATH, &body)).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(emulator.callbacks_delivered(), 2);
    let second = next_delivery(&mut received).await;
    assert_ne!(only_event(&first)["id"], only_event(&second)["id"]);
}

#[tokio::test]
async fn no_callback_and_refused_requests_call_nobody() {
    let (uri, mut received) = receiver().await;
    let emulator = emulator();
    let body = body_calling_back(&uri);
    emulator.set_script(
        "c1",
        Script {
            no_callback: true,
            callback_before_response: true,
            ..Script::default()
        },
    );
    assert_eq!(
        status_of(&emulator, fresh(PATH, &body)).await,
        StatusCode::ACCEPTED
    );
    emulator.set_script(
        "c1",
        Script {
            callback_before_response: true,
            ..call_not_found()
        },
    );
    assert_eq!(
        status_of(&emulator, fresh(PATH, &body)).await,
        StatusCode::NOT_FOUND
    );
    emulator.set_script(
        "c1",
        Script {
            callback_before_response: true,
            fail_first: vec![503],
            ..Script::default()
        },
    );
    assert_eq!(
        status_of(&emulator, fresh(PATH, &body)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Nothing was spawned for them, so nothing can arrive later.
    assert_eq!(emulator.callbacks_delivered(), 0);
    assert!(received.try_recv().is_err());
}
