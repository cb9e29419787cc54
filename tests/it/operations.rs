//! The client API's reads, listing and its errors.

use serde_json::{Value, json};

use crate::support::{TestApp, silent};

async fn error_of(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    body
}

#[tokio::test]
async fn unknown_operations_are_404() {
    let app = TestApp::spawn().await;
    let body = error_of(
        app.get("/v1/operations/0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d")
            .await,
        404,
    )
    .await;
    assert_eq!(body["error"]["code"], "NotFound");
    // Not an operation id at all: malformed, not unknown.
    let body = error_of(app.get("/v1/operations/not-an-id").await, 400).await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("id"),
        "{body}"
    );
    error_of(app.get("/v1/nothing-here").await, 404).await;
}

#[tokio::test]
async fn malformed_requests_are_4xx_with_an_error_body() {
    let app = TestApp::spawn().await;
    let path = "/v1/acs/callConnections/call-bad/participants:remove";
    let check = |body: &'static str, status: u16, mentions: &'static str| {
        let app = &app;
        async move {
            let response = app.post_raw(path, "application/json", body).await;
            let error = error_of(response, status).await;
            let message = error["error"]["message"].as_str().unwrap();
            assert!(message.contains(mentions), "{body}: {message}");
        }
    };
    check("{", 400, "").await;
    check("{}", 400, "participantToRemove").await;
    check(r#"{"participantToRemove": {}}"#, 400, "participantToRemove").await;
    check(r#"{"participantToRemove": 5}"#, 400, "participantToRemove").await;
    check(
        r#"{"participantToRemove": {"rawId": "8:acs:x"}, "operationContext": ""}"#,
        400,
        "operationContext",
    )
    .await;
    check(
        r#"{"participantToRemove": {"rawId": "8:acs:x"}, "surprise": 1}"#,
        400,
        "surprise",
    )
    .await;
    check(
        r#"{"participantToRemove": {"communicationUser": {"id": "8:acs:x"}, "phoneNumber": {"value": "+1"}}}"#,
        400,
        "at most one",
    )
    .await;
    let long_context =
        json!({"participantToRemove": {"rawId": "8:acs:x"}, "operationContext": "c".repeat(600)});
    error_of(app.post_json(path, &long_context).await, 400).await;

    let error = error_of(
        app.post_raw(
            path,
            "text/plain",
            r#"{"participantToRemove": {"rawId": "8:acs:x"}}"#,
        )
        .await,
        415,
    )
    .await;
    assert_eq!(error["error"]["code"], "UnsupportedMediaType");
    let body = json!({"participantToRemove": {"rawId": "8:acs:x"}});
    error_of(
        app.post_json(
            "/v1/acs/callConnections/bad%20id/participants:remove",
            &body,
        )
        .await,
        400,
    )
    .await;
    let long_id = "x".repeat(300);
    error_of(
        app.post_json(
            &format!("/v1/acs/callConnections/{long_id}/participants:remove"),
            &body,
        )
        .await,
        400,
    )
    .await;
    error_of(
        app.get("/v1/operations/0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d?wait=soon")
            .await,
        400,
    )
    .await;
    error_of(app.get("/v1/operations?status=Finished").await, 400).await;
    error_of(app.get("/v1/operations?skipToken=garbage").await, 400).await;
    error_of(app.get("/v1/operations?maxpagesize=0").await, 400).await;
    error_of(
        app.http
            .delete(app.url("/v1/operations"))
            .send()
            .await
            .unwrap(),
        405,
    )
    .await;
    let big = json!({"participantToRemove": {"rawId": "x".repeat(300 * 1024)}});
    error_of(app.post_json(path, &big).await, 413).await;
}

#[tokio::test]
async fn a_context_in_use_by_a_running_operation_is_409() {
    let app = TestApp::spawn().await;
    let script = silent();
    app.remove("call-409", script.clone(), Some("same")).await;
    let body = json!({"participantToRemove": {"rawId": "8:acs:x"}, "operationContext": "same"});
    let error = error_of(
        app.post_json(
            "/v1/acs/callConnections/call-409/participants:remove",
            &body,
        )
        .await,
        409,
    )
    .await;
    assert_eq!(error["error"]["code"], "Conflict");
    // The same context on another call is fine.
    app.remove("call-409-other", script, Some("same")).await;
}

#[tokio::test]
async fn a_running_operation_carries_retry_after() {
    let app = TestApp::spawn().await;
    let script = silent();
    let started = app.remove("call-ra", script, None).await;
    let response = app
        .get(&format!(
            "/v1/operations/{}",
            started["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test]
async fn operations_list_newest_first_with_filters_and_paging() {
    let app = TestApp::spawn().await;
    let script = silent();
    let mut ids = Vec::new();
    for n in 0..5 {
        let op = app
            .remove("call-list", script.clone(), Some(&format!("ctx-{n}")))
            .await;
        ids.push(op["id"].as_str().unwrap().to_owned());
    }
    app.remove("call-other", script, None).await;
    ids.reverse();

    let mut seen = Vec::new();
    let mut next = Some("/v1/operations?callConnectionId=call-list&maxpagesize=2".to_owned());
    let mut pages = 0;
    while let Some(link) = next {
        let page: Value = app.get_json(&link).await;
        pages += 1;
        for op in page["value"].as_array().unwrap() {
            assert_eq!(op["callConnectionId"], "call-list");
            seen.push(op["id"].as_str().unwrap().to_owned());
        }
        next = page["nextLink"].as_str().map(str::to_owned);
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    let page: Value = app
        .get_json("/v1/operations?context=ctx-3&kind=removeParticipant")
        .await;
    assert_eq!(page["value"].as_array().unwrap().len(), 1);
    assert_eq!(page["value"][0]["context"], "ctx-3");
    let page: Value = app.get_json("/v1/operations?status=Succeeded").await;
    assert!(page["value"].as_array().unwrap().is_empty());
    assert!(page.get("nextLink").is_none());
    let page: Value = app.get_json("/v1/operations?callId=anything").await;
    assert!(page["value"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn health_answers() {
    let app = TestApp::spawn().await;
    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-ms-request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn settled_operations_past_retention_leave_reads_lists_and_counts() {
    let app = TestApp::spawn_with(|config| {
        config.operations.retention_secs = 1;
        config.operations.sweep_interval_ms = 50;
    })
    .await;
    let started = app
        .remove("call-retired", silent(), Some("ctx-retired"))
        .await;
    let id = started["id"].as_str().unwrap().to_owned();
    let event = crate::support::remove_event("ev-retired", "call-retired", "ctx-retired", true);
    let summary = app.callback(&event).await;
    assert_eq!(summary["matched"], 1, "{summary}");
    assert_eq!(
        app.get_json(&format!("/v1/operations/{id}")).await["status"],
        "Succeeded"
    );
    // The sweep alone (no list request meanwhile) retires it and its count.
    crate::support::within(async {
        loop {
            let gone = app.get(&format!("/v1/operations/{id}")).await.status() == 404;
            let health: Value = app.get_json("/healthz").await;
            if gone && health["operations"] == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(app.list("callConnectionId=call-retired").await.is_empty());
}
