//! Hostile input on every route: oversized, mistyped, malformed, deeply nested and
//! slow requests get the right 4xx with the error body (or, for a client that never finishes
//! its headers, a closed connection), never a 5xx, a panic or a stuck connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{SOON, TestApp, silent, within};

const REMOVE: &str = "/v1/acs/callConnections/call-hostile/participants:remove";
const CANCEL: &str = "/v1/graph/calls/call-hostile/cancelMediaProcessing";
const CALLBACKS: [&str; 2] = ["/callbacks/acs", "/callbacks/graph"];
/// The embedded `http.body_limit_bytes`.
const LIMIT: usize = 256 * 1024;
const UNKNOWN_ID: &str = "0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d";

/// Checks `status` and the Azure error shape; returns the body.
async fn error_of(response: reqwest::Response, status: u16) -> Value {
    let what = format!("{} {}", response.url(), response.status());
    assert_eq!(response.status(), status, "{what}");
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {text}"));
    check_error_shape(&body, &what);
    body
}

fn check_error_shape(body: &Value, what: &str) {
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {body}"));
    assert!(error["code"].is_string(), "{what}: {body}");
    assert!(
        !error["message"].as_str().unwrap_or_default().is_empty(),
        "{what}: {body}"
    );
}

/// A 400 whose message names `field`.
async fn bad_request(response: reqwest::Response, field: &str) -> Value {
    let body = error_of(response, 400).await;
    assert_eq!(body["error"]["code"], "InvalidRequest");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(field), "{field}: {message}");
    body
}

fn removal(participant: Value) -> Value {
    json!({ "participantToRemove": participant })
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_objects(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

/// One raw HTTP/1.1 exchange (`Connection: close`): sends `head` and then `body`, in
/// chunked encoding when `chunked`, while reading the answer (a server may answer before
/// the body is all sent). Returns the status and the body parsed as JSON.
async fn raw_exchange(
    address: SocketAddr,
    head: &str,
    body: Vec<u8>,
    chunked: bool,
) -> (u16, Value) {
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let mut request = head.as_bytes().to_vec();
    let writing = tokio::spawn(async move {
        if chunked {
            writer.write_all(&request).await?;
            for chunk in body.chunks(16 * 1024) {
                writer
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                writer.write_all(chunk).await?;
                writer.write_all(b"\r\n").await?;
            }
            writer.write_all(b"0\r\n\r\n").await
        } else {
            request.extend_from_slice(&body);
            writer.write_all(&request).await
        }
    });
    let mut answer = Vec::new();
    // The connection may be reset once the answer is in: keep what arrived.
    let _ = within(reader.read_to_end(&mut answer)).await;
    writing.abort();
    parse_answer(&answer)
}

fn parse_answer(answer: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, body)
}

fn post_head(path: &str, content_type: &str, framing: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: callops\r\nContent-Type: {content_type}\r\n{framing}\r\nConnection: close\r\n\r\n"
    )
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_with_or_without_content_length() {
    let app = TestApp::spawn().await;
    app.emulator.set_script("call-hostile", silent());
    // Valid JSON all the way, so only the size is wrong.
    let padding = "x".repeat(LIMIT + 1024);
    let oversized = serde_json::to_vec(&json!({"clientContext": padding})).unwrap();
    for path in [REMOVE, CANCEL].into_iter().chain(CALLBACKS) {
        // Declared in Content-Length: refused before it is read.
        let response = app
            .post_raw(path, "application/json", oversized.clone())
            .await;
        let body = error_of(response, 413).await;
        assert_eq!(body["error"]["code"], "PayloadTooLarge", "{path}");

        // Chunked, no Content-Length: refused once the limit is passed (callbacks carry
        // their token: without one they are refused before the body is read).
        let framing = match path {
            "/callbacks/acs" => format!(
                "Transfer-Encoding: chunked\r\nAuthorization: Bearer {}",
                app.emulator.signer().acs_token()
            ),
            "/callbacks/graph" => format!(
                "Transfer-Encoding: chunked\r\nAuthorization: Bearer {}",
                app.emulator.signer().graph_token()
            ),
            _ => "Transfer-Encoding: chunked".to_owned(),
        };
        let head = post_head(path, "application/json", &framing);
        let (status, body) = raw_exchange(app.address, &head, oversized.clone(), true).await;
        assert_eq!(status, 413, "{path} chunked: {body}");
        check_error_shape(&body, path);
        assert_eq!(body["error"]["code"], "PayloadTooLarge", "{path}");
    }
    // A chunked body within the limit is read whole.
    let body = serde_json::to_vec(&json!({"clientContext": "chunked"})).unwrap();
    let head = post_head(CANCEL, "application/json", "Transfer-Encoding: chunked");
    let (status, operation) = raw_exchange(app.address, &head, body, true).await;
    assert_eq!(status, 202, "{operation}");
    assert_eq!(operation["context"], "chunked");
}

#[tokio::test]
async fn json_routes_want_json_and_callbacks_take_any_content_type() {
    let app = TestApp::spawn().await;
    app.emulator.set_script("call-hostile", silent());
    let bodies = [
        (REMOVE, removal(json!({"rawId": "8:acs:x"}))),
        (CANCEL, json!({"clientContext": "media-type"})),
    ];
    for (path, body) in &bodies {
        let text = body.to_string();
        for content_type in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "application/xml",
        ] {
            let response = app.post_raw(path, content_type, text.clone()).await;
            let error = error_of(response, 415).await;
            assert_eq!(
                error["error"]["code"], "UnsupportedMediaType",
                "{content_type}"
            );
        }
        // No Content-Type at all.
        let response = app
            .http
            .post(app.url(path))
            .body(text.clone())
            .send()
            .await
            .unwrap();
        error_of(response, 415).await;
    }
    // A charset parameter is fine.
    let response = app
        .post_raw(
            REMOVE,
            "application/json; charset=utf-8",
            removal(json!({"rawId": "8:acs:x"})).to_string(),
        )
        .await;
    assert_eq!(response.status(), 202);
    // Callbacks do not gate on Content-Type (upstreams send odd ones).
    for content_type in [
        "text/plain",
        "application/octet-stream",
        "application/json; charset=Windows-1252",
    ] {
        let (status, _) = app.notify(content_type, r#"{"value": []}"#).await;
        assert_eq!(status, 202, "{content_type}");
        let response = app.post_raw(CALLBACKS[0], content_type, r#"[]"#).await;
        assert_eq!(response.status(), 200, "{content_type}");
    }
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400_naming_the_problem() {
    let app = TestApp::spawn().await;
    let cases: [(&str, &str, &str); 19] = [
        // Members that are objects refuse arrays (serde would take one field by field).
        (
            REMOVE,
            r#"{"participantToRemove": ["8:acs:x"]}"#,
            "participantToRemove",
        ),
        (
            REMOVE,
            r#"{"participantToRemove": {"communicationUser": ["8:acs:x"]}}"#,
            "communicationUser",
        ),
        (
            REMOVE,
            r#"{"participantToRemove": {"rawId": "8:acs:x"}, "notify": ["https://a.example"]}"#,
            "notify",
        ),
        (
            CANCEL,
            r#"{"notify": ["https://a.example", null, null]}"#,
            "notify",
        ),
        (
            "/v1/subscriptions",
            r#"{"url": "https://a.example", "eventTypes": ["operation.settled"], "filter": [null]}"#,
            "filter",
        ),
        (REMOVE, "{", "EOF"),
        (REMOVE, "", "EOF"),
        (REMOVE, "null", "invalid type"),
        (REMOVE, "[]", "must be a JSON object"),
        (
            REMOVE,
            r#"{"participantToRemove": {"rawId": "8:acs:x"}} trailing"#,
            "trailing",
        ),
        (REMOVE, r#"{"participantToRemove": {"rawId": 5}}"#, "rawId"),
        (
            REMOVE,
            r#"{"participantToRemove": {"rawId": "8:acs:x"}, "operationContext": 5}"#,
            "operationContext",
        ),
        (
            REMOVE,
            r#"{"participantToRemove": {"communicationUser": {"id": ["8:acs:x"]}}}"#,
            "communicationUser",
        ),
        (
            REMOVE,
            r#"{"participantToRemove": {"rawId": "8:acs:x"}, "operationContext": "\ud800"}"#,
            "operationContext",
        ),
        (CANCEL, "{", "EOF"),
        (CANCEL, r#"{"clientContext": 5}"#, "clientContext"),
        (CANCEL, r#"{"clientContext": {"a": 1}}"#, "clientContext"),
        (CANCEL, r#"{"clientContext": ""}"#, "clientContext"),
        (
            CANCEL,
            r#"{"clientcontext": "wrong case"}"#,
            "clientcontext",
        ),
    ];
    for (path, body, field) in cases {
        let response = app.post_raw(path, "application/json", body).await;
        bad_request(response, field).await;
    }
    // Bytes that are not UTF-8.
    let response = app
        .post_raw(
            CANCEL,
            "application/json",
            b"{\"clientContext\": \"\xff\xfe\"}".to_vec(),
        )
        .await;
    error_of(response, 400).await;
}

#[tokio::test]
async fn huge_strings_are_400_and_never_echoed_whole() {
    let app = TestApp::spawn().await;
    let huge = "h".repeat(200 * 1024);
    let cases = [
        (
            REMOVE,
            json!({"participantToRemove": {"rawId": "8:acs:x"}, "operationContext": huge}),
            "operationContext",
        ),
        (REMOVE, removal(json!({"rawId": huge})), "rawId"),
        (
            REMOVE,
            removal(json!({"communicationUser": {"id": huge}})),
            "communicationUser.id",
        ),
        (
            REMOVE,
            removal(json!({"rawId": "8:acs:x", "kind": huge})),
            "kind",
        ),
        // Members callops does not know are passed upstream: bounded too.
        (
            REMOVE,
            removal(
                json!({"kind": "teamsExtensionUser", "rawId": "8:acs:x", "teamsExtensionUser": {"userId": huge}}),
            ),
            "participantToRemove",
        ),
        // A huge string where an object belongs, a huge unknown field name.
        (REMOVE, removal(json!(huge)), "participantToRemove"),
        (
            REMOVE,
            json!({ huge.clone(): 1, "participantToRemove": {"rawId": "8:acs:x"} }),
            "Failed to deserialize",
        ),
        (CANCEL, json!({"clientContext": huge}), "clientContext"),
    ];
    for (path, body, field) in cases {
        let response = app.post_json(path, &body).await;
        let error = bad_request(response, field).await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.len() < 2048,
            "{field}: a {} byte message",
            message.len()
        );
    }
    // Nothing was created.
    assert!(app.list("").await.is_empty());
}

#[tokio::test]
async fn deep_nesting_is_400_without_overflowing_the_stack() {
    let app = TestApp::spawn().await;
    for deep in [nested_arrays(10_000), nested_objects(10_000)] {
        let bodies = [
            (REMOVE, deep.clone()),
            (REMOVE, format!(r#"{{"participantToRemove": {deep}}}"#)),
            (
                REMOVE,
                format!(r#"{{"participantToRemove": {{"rawId": "8:acs:x", "extra": {deep}}}}}"#),
            ),
            (CANCEL, deep.clone()),
            (CANCEL, format!(r#"{{"clientContext": {deep}}}"#)),
            ("/callbacks/graph", deep.clone()),
            (
                "/callbacks/graph",
                format!(r#"{{"value": [{{"changeType": "updated", "resourceData": {deep}}}]}}"#),
            ),
        ];
        for (path, body) in bodies {
            let response = app.post_raw(path, "application/json", body).await;
            let error = error_of(response, 400).await;
            assert_eq!(error["error"]["code"], "InvalidRequest", "{path}");
        }
        // The callback decoders are tolerant: deep nesting where they skip unknown fields
        // is skipped without recursion, elsewhere it is a 400; never a 5xx.
        let skipped = [
            ("/callbacks/acs", deep.clone()),
            (
                "/callbacks/acs",
                format!(r#"[{{"id": "e1", "data": {deep}}}]"#),
            ),
            (
                "/callbacks/acs",
                format!(r#"[{{"id": "e2", "ignored": {deep}}}]"#),
            ),
            (
                "/callbacks/graph",
                format!(r#"{{"value": [], "ignored": {deep}}}"#),
            ),
        ];
        for (path, body) in skipped {
            let response = app.post_raw(path, "application/json", body).await;
            let status = response.status().as_u16();
            assert!((200..500).contains(&status), "{path}: {status}");
        }
    }
    // Nested arrays are no CloudEvents.
    let response = app
        .post_raw("/callbacks/acs", "application/json", nested_arrays(10_000))
        .await;
    error_of(response, 400).await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn garbage_callbacks_are_400() {
    let app = TestApp::spawn().await;
    let garbage: [&[u8]; 12] = [
        b"",
        b"   \r\n\t ",
        b"\0\0\0\0",
        b"\xff\xfe\xfd binary \x00\x01",
        b"\xef\xbb\xbfnot json",
        b"null",
        b"true",
        b"42",
        b"\"a string\"",
        b"{",
        b"[{]",
        b"[1, 2, 3]",
    ];
    // Any object is an ACS event (every field may be missing), not a Graph notification.
    let not_notifications: [&[u8]; 3] = [b"{\"value\": 7}", b"{\"value\": [1]}", b"{}"];
    let cases = CALLBACKS
        .iter()
        .flat_map(|path| garbage.iter().map(move |body| (*path, *body)))
        .chain(
            not_notifications
                .iter()
                .map(|body| ("/callbacks/graph", *body)),
        );
    for (path, body) in cases {
        let response = app.post_raw(path, "text/plain", body.to_vec()).await;
        let error = error_of(response, 400).await;
        assert_eq!(error["error"]["code"], "InvalidRequest", "{path}: {body:?}");
    }
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn invalid_ids_in_paths_are_400_naming_the_id() {
    let app = TestApp::spawn().await;
    let long = "x".repeat(257);
    let bad_call_ids = [
        "bad%20id",
        "a%2Fb",
        "..%2F..%2Fetc",
        "nul%00",
        "caf%C3%A9",
        "%FF%FE",
        "semi%3Bcolon",
        "quote%22",
        long.as_str(),
    ];
    let body = removal(json!({"rawId": "8:acs:x"}));
    for id in bad_call_ids {
        let remove = format!("/v1/acs/callConnections/{id}/participants:remove");
        bad_request(app.post_json(&remove, &body).await, "callConnectionId").await;
        let events = format!("/v1/acs/callConnections/{id}/events");
        bad_request(app.get(&events).await, "callConnectionId").await;
        let cancel = format!("/v1/graph/calls/{id}/cancelMediaProcessing");
        bad_request(app.post_json(&cancel, &json!({})).await, "callId").await;
        let events = format!("/v1/graph/calls/{id}/events");
        bad_request(app.get(&events).await, "callId").await;
    }
    // An empty segment is an empty id.
    let remove = "/v1/acs/callConnections//participants:remove";
    bad_request(app.post_json(remove, &body).await, "callConnectionId").await;
    // The longest call id is fine.
    let longest = "y".repeat(256);
    let response = app
        .get(&format!("/v1/acs/callConnections/{longest}/events"))
        .await;
    assert_eq!(response.status(), 200);

    // Operation ids are this service's: hyphenated UUIDs.
    let bad_operation_ids = [
        "not-an-id",
        "0190b3c27a537c1e9a0e5a0f1f1b2c3d",
        "%7B0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d%7D",
        "urn:uuid:0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d",
        "0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3g",
        "%FF",
        long.as_str(),
    ];
    for id in bad_operation_ids {
        bad_request(app.get(&format!("/v1/operations/{id}")).await, "id").await;
    }
    // Well-formed but unknown: 404, in either case.
    for id in [UNKNOWN_ID, &UNKNOWN_ID.to_ascii_uppercase()] {
        let error = error_of(app.get(&format!("/v1/operations/{id}")).await, 404).await;
        assert_eq!(error["error"]["code"], "NotFound");
    }
}

#[tokio::test]
async fn invalid_query_parameters_are_400() {
    let app = TestApp::spawn().await;
    let one = format!("/v1/operations/{UNKNOWN_ID}");
    let long_context = "c".repeat(513);
    let long_call = "x".repeat(257);
    let cases = [
        (format!("{one}?wait=soon"), "wait"),
        (format!("{one}?wait=-1"), "wait"),
        (format!("{one}?wait=1.5"), "wait"),
        (format!("{one}?wait=99999999999999999999999"), "wait"),
        (format!("{one}?wait=1&wait=2"), "wait"),
        (format!("{one}?surprise=1"), "surprise"),
        ("/v1/operations?status=Finished".to_owned(), "status"),
        ("/v1/operations?maxpagesize=0".to_owned(), "maxpagesize"),
        ("/v1/operations?maxpagesize=-5".to_owned(), "maxpagesize"),
        ("/v1/operations?maxpagesize=many".to_owned(), "maxpagesize"),
        ("/v1/operations?skipToken=garbage".to_owned(), "skipToken"),
        (
            "/v1/operations?callConnectionId=a%2Fb".to_owned(),
            "callConnectionId",
        ),
        (
            format!("/v1/operations?callConnectionId={long_call}"),
            "callConnectionId",
        ),
        (format!("/v1/operations?callId={long_call}"), "callId"),
        ("/v1/operations?callId=".to_owned(), "callId"),
        (format!("/v1/operations?context={long_context}"), "context"),
        ("/v1/operations?kind=%3Cscript%3E".to_owned(), "kind"),
        ("/v1/operations?kind=".to_owned(), "kind"),
        ("/v1/operations?nonsense=1".to_owned(), "nonsense"),
    ];
    for (path, field) in cases {
        bad_request(app.get(&path).await, field).await;
    }
    // The largest wait (2^32 - 1, as the schema says) is capped, not overflowed; one more is
    // 400; an empty context is a filter.
    let response = app.get(&format!("{one}?wait=4294967295")).await;
    error_of(response, 404).await;
    bad_request(app.get(&format!("{one}?wait=4294967296")).await, "wait").await;
    assert_eq!(app.get("/v1/operations?context=").await.status(), 200);
    // Likewise the largest page size.
    let response = app.get("/v1/operations?maxpagesize=4294967295").await;
    assert_eq!(response.status(), 200);
    let response = app.get("/v1/operations?maxpagesize=4294967296").await;
    bad_request(response, "maxpagesize").await;
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_with_the_error_body() {
    let app = TestApp::spawn().await;
    for path in [
        "/nothing",
        "/ui/",
        "/ui/app.js/extra",
        "/v1",
        "/v1/",
        "/v2/operations",
        "/v1/operations/0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d/extra",
        "/callbacks",
        "/callbacks/unknown",
        "/healthz/extra",
        "/%FF",
    ] {
        let error = error_of(app.get(path).await, 404).await;
        assert_eq!(error["error"]["code"], "NotFound", "{path}");
    }
    let one = format!("/v1/operations/{UNKNOWN_ID}");
    let wrong = [
        (reqwest::Method::GET, "/callbacks/acs"),
        (reqwest::Method::GET, "/callbacks/graph"),
        (reqwest::Method::POST, "/healthz"),
        (reqwest::Method::POST, "/"),
        (reqwest::Method::DELETE, "/ui"),
        (reqwest::Method::DELETE, REMOVE),
        (reqwest::Method::GET, CANCEL),
        (reqwest::Method::PUT, one.as_str()),
        (reqwest::Method::POST, one.as_str()),
        (reqwest::Method::PATCH, "/v1/operations"),
        (reqwest::Method::OPTIONS, "/v1/operations"),
    ];
    for (method, path) in wrong {
        let response = app
            .http
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        let error = error_of(response, 405).await;
        assert_eq!(
            error["error"]["code"], "MethodNotAllowed",
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn only_sane_client_request_ids_are_kept() {
    let app = TestApp::spawn().await;
    let echoed = |id: String| {
        let app = &app;
        async move {
            let response = app
                .http
                .get(app.url("/healthz"))
                .header("x-ms-request-id", id)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.headers()["x-ms-request-id"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(
        echoed("client-id_1.2:3".to_owned()).await,
        "client-id_1.2:3"
    );
    for unusable in [
        "r".repeat(4096),
        "with space".to_owned(),
        "quote\"".to_owned(),
    ] {
        let id = echoed(unusable.clone()).await;
        assert_ne!(id, unusable);
        assert_eq!(id.len(), 36, "a fresh UUID: {id}");
    }
}

#[tokio::test]
async fn the_client_request_id_is_echoed_when_sane() {
    let app = TestApp::spawn().await;
    let echoed = |id: String| {
        let app = &app;
        async move {
            let response = app
                .http
                .get(app.url("/v1/operations/00000000-0000-0000-0000-000000000000"))
                .header("x-ms-client-request-id", id)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 404);
            assert!(response.headers().contains_key("x-ms-request-id"));
            response
                .headers()
                .get("x-ms-client-request-id")
                .map(|id| id.to_str().unwrap().to_owned())
        }
    };
    let id = "9c1b2a4e-client-request";
    assert_eq!(echoed(id.to_owned()).await.as_deref(), Some(id));
    assert_eq!(echoed("with space".to_owned()).await, None);
    assert_eq!(echoed("r".repeat(4096)).await, None);
}

#[tokio::test]
async fn requests_the_http_layer_cannot_parse_are_4xx() {
    let app = TestApp::spawn().await;
    let mut too_many = reqwest::header::HeaderMap::new();
    for n in 0..101 {
        too_many.insert(
            reqwest::header::HeaderName::from_bytes(format!("x-h{n}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    let response = app
        .http
        .get(app.url("/healthz"))
        .headers(too_many)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    let huge_header = "v".repeat(500 * 1024);
    let response = app
        .http
        .get(app.url("/healthz"))
        .header("x-huge", huge_header)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    // Sent raw: clients refuse to send these at all.
    let long_uri = format!("/v1/operations?context={}", "c".repeat(70 * 1024));
    let raw = [
        (
            format!("GET {long_uri} HTTP/1.1\r\nHost: callops\r\n\r\n"),
            "414",
        ),
        ("GARBAGE\r\n\r\n".to_owned(), "400"),
    ];
    for (request, status) in raw {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = until_closed(&mut stream).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer:.200}"
        );
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
}

/// Reads until the server closes the connection (or answers); `None` if it does not within
/// [`SOON`].
async fn until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut answer = Vec::new();
    match tokio::time::timeout(SOON, stream.read_to_end(&mut answer)).await {
        Ok(_) => Some(answer),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_client_that_does_not_finish_its_headers_is_disconnected() {
    let app = TestApp::spawn_with(|config| config.http.header_read_timeout_secs = 1).await;
    // A partial header, then nothing (slowloris), and a connection that never says a word.
    let mut partial = TcpStream::connect(app.address).await.unwrap();
    let started = Instant::now();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: callops\r\nX-Slow: ")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(app.address).await.unwrap();
    let (partial_answer, silent_answer) =
        tokio::join!(until_closed(&mut partial), until_closed(&mut silent));
    let elapsed = started.elapsed();
    for answer in [partial_answer, silent_answer] {
        let answer = answer.expect("the connection is still open after the header timeout");
        // Closed without an answer, or with a 408.
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}, before the timeout"
    );
    // Whole requests are still served.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_body_that_never_finishes_is_408_with_the_error_body() {
    let app = TestApp::spawn_with(|config| {
        config.operations.max_wait_secs = 1;
        config.http.request_timeout_secs = 2;
    })
    .await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(
            format!(
                "POST {CANCEL} HTTP/1.1\r\nHost: callops\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"clientCo"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = until_closed(&mut stream)
        .await
        .expect("no answer within the request timeout");
    let (status, body) = parse_answer(&answer);
    assert_eq!(status, 408, "{body}");
    check_error_shape(&body, "slow body");
    assert_eq!(body["error"]["code"], "RequestTimeout");
    assert!(started.elapsed() >= Duration::from_millis(1900));
}

#[tokio::test]
async fn a_flood_of_nameless_events_costs_a_few_log_lines() {
    let (captured, _guard) = crate::support::capture_logs();
    let app = TestApp::spawn().await;
    let events = 20_000;
    let acs = format!("[{}]", vec!["{}"; events].join(","));
    let summary = app.callback(&serde_json::from_str(&acs).unwrap()).await;
    assert_eq!(summary["unmatched"], events, "{summary}");
    let graph = format!(r#"{{"value":[{}]}}"#, vec!["{}"; events].join(","));
    let (status, summary) = app.notify("application/json", graph).await;
    assert_eq!(status, 202, "{summary}");
    assert_eq!(summary["unmatched"], events, "{summary}");
    let logs = captured.text();
    let warnings = logs.lines().filter(|line| line.contains("WARN")).count();
    assert!(
        (1..=4).contains(&warnings),
        "{warnings} warning lines for two requests:\n{}",
        logs.lines()
            .filter(|line| line.contains("WARN"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn a_participant_that_is_no_identifier_is_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let path = "/v1/acs/callConnections/call-raw/participants:remove";
    let response = app
        .post_json(path, &removal(json!({"rawId": "hello"})))
        .await;
    bad_request(response, "participantToRemove.rawId").await;
    let response = app
        .post_json(path, &removal(json!({"communicationUser": {"id": "bob"}})))
        .await;
    bad_request(response, "participantToRemove.communicationUser.id").await;
    let listed = app.list("").await;
    assert!(listed.is_empty(), "a refused removal was kept: {listed:?}");
}

/// Sends a POST head announcing 100 body bytes and the first few of them.
async fn partial_body(address: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!(
                "POST {CANCEL} HTTP/1.1\r\nHost: callops\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"clientCo"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn a_body_dripped_past_the_body_deadline_is_408_long_before_the_request_deadline() {
    let app = TestApp::spawn_with(|config| config.http.body_read_timeout_secs = 1).await;
    let started = Instant::now();
    let mut stream = partial_body(app.address).await;
    // A byte every 100 ms would take 9 s more to finish the body.
    let (mut reader, mut writer) = stream.split();
    let drip = async {
        for _ in 0..90 {
            if writer.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut answer = Vec::new();
    tokio::select! {
        _ = drip => panic!("the whole body was accepted past the body deadline"),
        read = tokio::time::timeout(SOON, reader.read_to_end(&mut answer)) => {
            read.expect("no answer").ok();
        }
    }
    let (status, body) = parse_answer(&answer);
    assert_eq!(status, 408, "{body}");
    check_error_shape(&body, "dripped body");
    assert_eq!(body["error"]["code"], "RequestTimeout");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("body"),
        "{body}"
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[tokio::test]
async fn slow_bodies_beyond_the_cap_are_503_while_whole_requests_are_served() {
    let app = TestApp::spawn_with(|config| config.http.max_slow_bodies = 2).await;
    let _held = [
        partial_body(app.address).await,
        partial_body(app.address).await,
    ];
    // Once both hold their place, a third slow body is refused at once.
    let refused = within(async {
        loop {
            let mut third = partial_body(app.address).await;
            let mut answer = Vec::new();
            let read = third.read_to_end(&mut answer);
            if tokio::time::timeout(Duration::from_millis(300), read)
                .await
                .is_ok()
            {
                break parse_answer(&answer);
            }
        }
    })
    .await;
    assert_eq!(refused.0, 503, "{}", refused.1);
    check_error_shape(&refused.1, "slow body over the cap");
    assert_eq!(refused.1["error"]["code"], "ServiceUnavailable");
    // A body that arrives with its head needs no place.
    let (status, body) = raw_exchange(
        app.address,
        &post_head(CANCEL, "application/json", "Content-Length: 5\r\n"),
        b"{\"a\":".to_vec(),
        false,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    drop(_held);
    // The places are given back: a slow body that then finishes is answered as usual.
    let answered = within(async {
        loop {
            let mut stream = partial_body(app.address).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let rest = format!("{:91}", "\"");
            if stream.write_all(rest.as_bytes()).await.is_err() {
                continue;
            }
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            let (status, body) = parse_answer(&answer);
            if status != 503 {
                break (status, body);
            }
        }
    })
    .await;
    assert_eq!(answered.0, 400, "{}", answered.1);
}
