//! Remove Participant end to end, through the emulator.

use callops::emulator::{Outcome, Reject, ResultInformation, Script};
use serde_json::json;

use crate::support::{TestApp, emulator_graph_token, follow, silent, within};

#[tokio::test]
async fn a_removal_succeeds_and_the_long_poll_returns_the_outcome() {
    let app = TestApp::spawn().await;
    let started = app.remove("call-ok", Script::default(), None).await;
    assert_eq!(started["kind"], "removeParticipant");
    assert_eq!(started["status"], "NotStarted");
    assert_eq!(started["callConnectionId"], "call-ok");
    let context = started["context"].as_str().unwrap();
    assert!(!context.is_empty(), "a context is generated");

    let id = started["id"].as_str().unwrap();
    let settled = app.wait_operation(id, 5).await;
    assert_eq!(settled["status"], "Succeeded", "{settled}");
    assert_eq!(settled["result"]["code"], 200);
    assert_eq!(
        settled["events"][0]["type"],
        "Microsoft.Communication.RemoveParticipantSucceeded"
    );
    assert_eq!(settled["events"][0]["effect"], "applied");
    assert!(settled.get("error").is_none());

    // The request ACS received is the one the official SDK sends.
    let requests = app.emulator_requests("call-ok", 1).await;
    let request = &requests[0];
    assert_eq!(
        request.path_and_query,
        "/calling/callConnections/call-ok/participants:remove?api-version=2024-09-15"
    );
    assert_eq!(
        request.body,
        json!({
            "participantToRemove": { "rawId": "8:acs:abc_def", "communicationUser": { "id": "8:acs:abc_def" } },
            "operationContext": context,
            "operationCallbackUri": app.url("/callbacks/acs"),
        })
    );
    assert_eq!(request.status, 202);
    // Every header the official SDK sends is there (transport details aside).
    let sdk: serde_json::Value = serde_json::from_slice(&crate::support::fixture(
        "sdk-requests/acs_remove_participant.python-sdk-1.6.0.json",
    ))
    .unwrap();
    let sdk_headers = sdk["requests"]["communicationUser"]["headers"]
        .as_object()
        .unwrap();
    for name in sdk_headers.keys().map(|name| name.to_ascii_lowercase()) {
        if ["user-agent", "accept-encoding", "connection"].contains(&name.as_str()) {
            continue;
        }
        assert!(request.headers.contains_key(&name), "missing header {name}");
    }
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.headers["x-ms-return-client-request-id"], "true");
    assert!(uuid::Uuid::try_parse(&request.headers["repeatability-request-id"]).is_ok());
    assert!(httpdate::parse_http_date(&request.headers["repeatability-first-sent"]).is_ok());
    assert!(
        request.headers["authorization"]
            .starts_with("HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=")
    );
}

#[tokio::test]
async fn a_failed_callback_fails_the_operation_with_its_result() {
    let app = TestApp::spawn().await;
    let script = Script {
        outcome: Outcome::Fail,
        result_information: Some(ResultInformation {
            code: 400,
            sub_code: 8523,
            message: "Participant not in call.".into(),
        }),
        ..Script::default()
    };
    let started = app.remove("call-fail", script, Some("ctx-fail")).await;
    assert_eq!(started["context"], "ctx-fail");
    let settled = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(settled["status"], "Failed", "{settled}");
    assert_eq!(settled["error"]["code"], "RemoveParticipantFailed");
    assert_eq!(settled["error"]["message"], "Participant not in call.");
    assert_eq!(
        settled["result"],
        json!({"code": 400, "subCode": 8523, "message": "Participant not in call."})
    );
}

#[tokio::test]
async fn duplicate_deliveries_change_nothing() {
    let app = TestApp::spawn().await;
    let script = Script {
        duplicates: 2,
        ..Script::default()
    };
    let started = app.remove("call-dup", script, None).await;
    let id = started["id"].as_str().unwrap();
    let settled = app.wait_operation(id, 5).await;
    assert_eq!(settled["status"], "Succeeded");
    within(async {
        while app.emulator.callbacks_delivered() < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let after: serde_json::Value = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(after["events"].as_array().unwrap().len(), 1, "{after}");
    assert_eq!(after["status"], "Succeeded");
}

#[tokio::test]
async fn a_callback_that_overtakes_the_202_settles_the_operation() {
    let app = TestApp::spawn().await;
    let script = Script {
        callback_before_response: true,
        ..Script::default()
    };
    let started = app.remove("call-early", script, None).await;
    let id = started["id"].as_str().unwrap();
    let settled = app.wait_operation(id, 5).await;
    assert_eq!(settled["status"], "Succeeded");
    // The 202 that follows does not move it back to Running.
    app.emulator_requests("call-early", 1).await;
    let after: serde_json::Value = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(after["status"], "Succeeded");
    assert_eq!(after["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn throttling_and_5xx_are_retried_with_the_same_repeatability_pair() {
    let app = TestApp::spawn().await;
    let script = Script {
        fail_first: vec![429, 503],
        retry_after_secs: Some(0.05),
        ..Script::default()
    };
    let started = app.remove("call-retry", script, None).await;
    let settled = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(settled["status"], "Succeeded", "{settled}");

    let requests = app.emulator_requests("call-retry", 3).await;
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 503, 202]);
    for header in ["repeatability-request-id", "repeatability-first-sent"] {
        assert!(
            requests
                .iter()
                .all(|r| r.headers[header] == requests[0].headers[header]),
            "{header} changed between attempts"
        );
    }
    assert!(requests.iter().all(|r| r.body == requests[0].body));
}

#[tokio::test]
async fn a_final_upstream_refusal_fails_the_operation_with_acs_error() {
    let app = TestApp::spawn().await;
    let script = Script {
        reject: Some(Reject {
            status: 404,
            code: "8522".into(),
            message: "Call not found.".into(),
        }),
        ..Script::default()
    };
    let started = app.remove("call-gone", script, None).await;
    let settled = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(settled["status"], "Failed", "{settled}");
    assert_eq!(settled["error"]["code"], "UpstreamRejected");
    let message = settled["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("404") && message.contains("8522") && message.contains("Call not found."),
        "{message}"
    );
    assert_eq!(
        settled["result"],
        json!({"code": 404, "subCode": 8522, "message": "Call not found."})
    );
    // A refusal is final: one attempt only.
    assert_eq!(app.emulator_requests("call-gone", 1).await.len(), 1);
}

#[tokio::test]
async fn an_upstream_that_never_accepts_fails_after_bounded_retries() {
    let app = TestApp::spawn_with(|config| config.acs.retry.max_attempts = 3).await;
    let script = Script {
        fail_first: vec![503; 10],
        ..Script::default()
    };
    let started = app.remove("call-down", script, None).await;
    let settled = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(settled["status"], "Failed", "{settled}");
    assert_eq!(settled["error"]["code"], "UpstreamUnavailable");
    assert_eq!(app.emulator.requests().len(), 3);
}

#[tokio::test]
async fn the_long_poll_is_woken_by_the_callback() {
    let app = TestApp::spawn().await;
    let script = silent();
    let started = app.remove("call-wake", script, Some("ctx-wake")).await;
    let id = started["id"].as_str().unwrap().to_owned();
    app.emulator_requests("call-wake", 1).await;

    let running = app
        .operation_until(&id, |op| op["status"] == "Running")
        .await;
    assert_eq!(running["status"], "Running");
    // A waiter asks for 50 s; the callback below must end its wait, far sooner.
    let waiter = app.start_long_poll(&id).await;
    let response = app
        .post_json(
            "/callbacks/acs",
            &crate::support::remove_event("ev-wake", "call-wake", "ctx-wake", true),
        )
        .await;
    assert_eq!(response.status(), 200);
    let answered = within(waiter).await.unwrap();
    assert!(answered.headers().get("retry-after").is_none());
    let operation: serde_json::Value = answered.json().await.unwrap();
    assert_eq!(operation["status"], "Succeeded");
}

#[tokio::test]
async fn the_in_process_emulator_is_the_default_upstream() {
    // The embedded defaults alone, as `cargo run` starts them (callbacks verified against the
    // emulator's keys), but on free ports.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let emulator_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = callops::config::Config::embedded();
    config.http.public_url = format!("http://{address}").parse().unwrap();
    config.emulator.listen = format!("127.0.0.1:{emulator_port}").parse().unwrap();
    // The default durable store, in a directory of its own.
    let data = tempfile::tempdir().unwrap();
    config.store.location = data.path().join("callops.db").display().to_string();
    assert!(config.acs.connection().unwrap().is_none());
    assert!(!config.graph.is_configured());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(callops::run(listener, config, shutdown.clone()));
    let base = format!("http://{address}");

    let http = reqwest::Client::new();
    within(async {
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let response = http
        .post(format!(
            "{base}/v1/acs/callConnections/quickstart/participants:remove"
        ))
        .json(&json!({"participantToRemove": {"phoneNumber": {"value": "+14255550123"}}}))
        .send()
        .await
        .unwrap();
    let operation = follow(&http, &base, response).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");

    // Graph: a prompt queued on the emulated call is cancelled, and its signed notification
    // is accepted and listed on the cancel.
    let graph = format!("http://127.0.0.1:{emulator_port}");
    let token = emulator_graph_token(&http, &graph).await;
    let call = "57dab8b1-894c-409a-b240-bd8beae78896";
    let queued = http
        .post(format!(
            "{graph}/v1.0/communications/calls/{call}/playPrompt"
        ))
        .bearer_auth(token)
        .json(&json!({"clientContext": "welcome", "prompts": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 200);
    let response = http
        .post(format!(
            "{base}/v1/graph/calls/{call}/cancelMediaProcessing"
        ))
        .json(&json!({"clientContext": "stop"}))
        .send()
        .await
        .unwrap();
    let cancel = follow(&http, &base, response).await;
    assert_eq!(cancel["status"], "Succeeded", "{cancel}");
    let prompt = within(async {
        loop {
            let page: serde_json::Value = http
                .get(format!("{base}/v1/operations?context=welcome"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(prompt) = page["value"].get(0) {
                return prompt.clone();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(prompt["error"]["code"], "OperationCanceled", "{prompt}");
    let health: serde_json::Value = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["callbacksRefused"], json!({"acs": 0, "graph": 0}));
    shutdown.cancel();
    within(server).await.unwrap().unwrap();
}

#[tokio::test]
async fn connection_errors_are_retried_then_reported() {
    // A port with nothing listening: every attempt is refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = TestApp::spawn_with(|config| {
        config.acs.connection_string = format!(
            "endpoint=http://{dead}/;accesskey={}",
            config.emulator.access_key
        )
        .into();
        config.acs.retry.max_attempts = 3;
    })
    .await;
    let started = app.remove("call-refused", Script::default(), None).await;
    let settled = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(settled["status"], "Failed", "{settled}");
    assert_eq!(settled["error"]["code"], "UpstreamUnavailable");
    let message = settled["error"]["message"].as_str().unwrap();
    assert!(message.contains("3 attempt(s)"), "{message}");
}

#[tokio::test]
async fn a_wrong_access_key_is_refused_by_the_emulator_signature_check() {
    let app = TestApp::spawn_with(|config| {
        let endpoint = config.acs.connection().unwrap().unwrap().endpoint;
        // Same endpoint, another key.
        config.acs.connection_string = format!("endpoint={endpoint};accesskey=d3Jvbmcta2V5").into();
    })
    .await;
    let started = app.remove("call-badkey", Script::default(), None).await;
    let settled = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(settled["status"], "Failed", "{settled}");
    assert_eq!(settled["error"]["code"], "UpstreamRejected");
    assert_eq!(settled["result"]["code"], 401);
}

#[tokio::test]
async fn a_retry_after_beyond_the_time_budget_ends_the_retries() {
    let app = TestApp::spawn_with(|config| config.acs.retry.total_timeout_ms = 1000).await;
    let script = Script {
        fail_first: vec![429; 10],
        retry_after_secs: Some(30.0),
        ..Script::default()
    };
    let started = app.remove("call-throttled", script, None).await;
    let settled = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(settled["status"], "Failed", "{settled}");
    assert_eq!(settled["error"]["code"], "UpstreamUnavailable");
    assert!(
        settled["error"]["message"]
            .as_str()
            .unwrap()
            .contains("429")
    );
    assert_eq!(
        app.emulator.requests().len(),
        1,
        "no attempt after a Retry-After past the budget"
    );
}

#[tokio::test]
async fn a_well_formed_traceparent_is_passed_on_to_acs_and_graph() {
    let app = TestApp::spawn().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (call, sent) in [("call-traced", traceparent), ("call-untraced", "garbage")] {
        app.emulator.set_script(call, silent());
        let response = app
            .http
            .post(app.url(&format!(
                "/v1/acs/callConnections/{call}/participants:remove"
            )))
            .header("traceparent", sent)
            .json(&json!({"participantToRemove": {"rawId": "8:acs:abc_def"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let traced = app.emulator_requests("call-traced", 1).await;
    assert_eq!(traced[0].headers["traceparent"], traceparent);
    let untraced = app.emulator_requests("call-untraced", 1).await;
    assert!(!untraced[0].headers.contains_key("traceparent"));

    let graph_call = "57dab8b1-894c-409a-b240-bd8beae78896";
    let response = app
        .http
        .post(app.url(&format!(
            "/v1/graph/calls/{graph_call}/cancelMediaProcessing"
        )))
        .header("traceparent", traceparent)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let operation = follow(&app.http, &app.url(""), response).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    let requests = app.emulator.graph().requests();
    let cancel = requests
        .iter()
        .find(|r| r.path_and_query.ends_with("/cancelMediaProcessing"))
        .unwrap();
    assert_eq!(cancel.headers["traceparent"], traceparent);
}

/// With api-version 2026-03-12 (the Python SDK 1.6.0's default) the request ACS receives is
/// the SDK's: same path and query, same body, same headers (values that are per request or
/// per transport aside).
#[tokio::test]
async fn the_2026_03_12_request_equals_the_python_sdk_1_6_0_request() {
    let sdk: serde_json::Value = serde_json::from_slice(&crate::support::fixture(
        "sdk-requests/acs_remove_participant.python-sdk-1.6.0.json",
    ))
    .unwrap();
    let want = &sdk["requests"]["communicationUser"];
    let app = TestApp::spawn_with(|config| config.acs.api_version = "2026-03-12".to_owned()).await;
    let call = "18dea47f-b081-4107-9a5c-4300819d2c6c";
    app.emulator.set_script(call, Script::default());
    let response = app
        .post_json(
            &format!("/v1/acs/callConnections/{call}/participants:remove"),
            &json!({"participantToRemove": {"rawId": "8:acs:abc_def"}, "operationContext": "ctx-1"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let request = &app.emulator_requests(call, 1).await[0];
    assert_eq!(request.path_and_query, want["path"].as_str().unwrap());
    let mut body = want["body"].clone();
    // The SDK was pointed at a fixed callback URI; callops gives its own.
    body["operationCallbackUri"] = json!(app.url("/callbacks/acs"));
    assert_eq!(request.body, body);
    let mut sdk_names: Vec<String> = want["headers"]
        .as_object()
        .unwrap()
        .keys()
        .map(|name| name.to_ascii_lowercase())
        .filter(|name| !["user-agent", "accept-encoding", "connection"].contains(&name.as_str()))
        .collect();
    sdk_names.sort();
    let mut ours: Vec<String> = request
        .headers
        .keys()
        .filter(|name| {
            !["user-agent", "accept-encoding", "connection", "traceparent"].contains(&name.as_str())
        })
        .cloned()
        .collect();
    ours.sort();
    assert_eq!(ours, sdk_names);
    for name in ["accept", "content-type", "x-ms-return-client-request-id"] {
        let sdk_value = want["headers"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str().unwrap())
            .unwrap();
        assert_eq!(request.headers[name], sdk_value, "{name}");
    }
}

/// A Teams extension user (2025-06-30 common models) is sent as the SDK sends it, whichever
/// form the client gave.
#[tokio::test]
async fn a_teams_extension_user_is_removed_in_the_sdk_form() {
    let app = TestApp::spawn().await;
    let call = "call-teams-extension";
    app.emulator.set_script(call, Script::default());
    let response = app
        .post_json(
            &format!("/v1/acs/callConnections/{call}/participants:remove"),
            &json!({"participantToRemove": {"kind": "teamsExtensionUser", "teamsExtensionUser": {
                "userId": "u1", "tenantId": "t1", "resourceId": "r1", "cloud": "public"}}}),
        )
        .await;
    let started = crate::support::accepted(response).await;
    let settled = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(settled["status"], "Succeeded", "{settled}");
    let request = &app.emulator_requests(call, 1).await[0];
    assert_eq!(
        request.body["participantToRemove"],
        json!({"rawId": "8:acs:r1_t1_u1", "teamsExtensionUser": {
            "userId": "u1", "tenantId": "t1", "resourceId": "r1", "cloud": "public"}})
    );
}
