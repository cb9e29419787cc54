//! Graph end to end: cancelMediaProcessing through the API, the emulator as Graph (token
//! endpoint, media queues, notifications), `/callbacks/graph`.

use callops::emulator::Reject;
use callops::emulator::graph::{CancelStatus, GraphScript};
use serde_json::{Value, json};

use crate::support::{TestApp, accepted, fixture, within};

const CALL: &str = "57dab8b1-894c-409a-b240-bd8beae78896";
/// The same call as Graph writes it in `resourceUrl`.
const CALL_IN_URL: &str = "57DAB8B1894C409AB240BD8BEAE78896";

fn status(operation: &Value) -> &str {
    operation["status"].as_str().unwrap()
}

fn cancelled(operation: &Value) -> usize {
    operation["cancelledOperations"]
        .as_array()
        .map_or(0, Vec::len)
}

fn event_types(operation: &Value) -> Vec<(String, String)> {
    operation["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["effect"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_completed_cancel_lists_the_prompts_it_cancelled() {
    let app = TestApp::spawn().await;
    let first = app.queue_media(CALL, "playPrompt", "welcome").await;
    // Queued under the other spelling of the same call id.
    let second = app
        .queue_media(CALL_IN_URL, "recordResponse", "voicemail")
        .await;
    let accepted = app.cancel(CALL, GraphScript::default(), Some("stop")).await;
    assert_eq!(accepted["kind"], "cancelMediaProcessing");
    assert_eq!(accepted["callId"], CALL);
    assert_eq!(accepted["context"], "stop");
    let id = accepted["id"].as_str().unwrap();

    let cancel = app
        .operation_until(id, |op| status(op) == "Succeeded" && cancelled(op) == 2)
        .await;
    assert!(cancel["upstreamOperationId"].is_string(), "{cancel}");
    let links = cancel["cancelledOperations"].as_array().unwrap();
    let mut contexts: Vec<&str> = links
        .iter()
        .map(|l| l["context"].as_str().unwrap())
        .collect();
    contexts.sort_unstable();
    assert_eq!(contexts, ["voicemail", "welcome"]);
    let welcome = links.iter().find(|l| l["context"] == "welcome").unwrap();
    assert_eq!(welcome["kind"], "playPrompt");
    assert_eq!(welcome["upstreamOperationId"], first["id"]);
    let voicemail = links.iter().find(|l| l["context"] == "voicemail").unwrap();
    assert_eq!(voicemail["kind"], "recordResponse");
    assert_eq!(voicemail["upstreamOperationId"], second["id"]);

    // Each prompt is an observed operation of its own, queryable by its context.
    let prompts = app.list("context=welcome").await;
    assert_eq!(prompts.len(), 1);
    let prompt = &prompts[0];
    assert_eq!(prompt["id"], welcome["id"]);
    assert_eq!(status(prompt), "Failed");
    assert_eq!(prompt["callId"], CALL);
    assert_eq!(prompt["result"]["completionReason"], "operationCanceled");
    assert_eq!(prompt["result"]["code"], 400);
    assert_eq!(prompt["result"]["subCode"], 8508);
    assert_eq!(prompt["error"]["code"], "OperationCanceled");

    // The call id in either spelling finds all three.
    assert_eq!(app.list(&format!("callId={CALL_IN_URL}")).await.len(), 3);
    assert_eq!(app.list(&format!("callId={CALL}")).await.len(), 3);
    assert_eq!(app.list("kind=playPrompt").await.len(), 1);
}

#[tokio::test]
async fn a_running_cancel_settles_on_its_notification() {
    let app = TestApp::spawn().await;
    app.queue_media(CALL, "playPrompt", "p1").await;
    let script = GraphScript {
        cancel_status: CancelStatus::Running,
        notification_delay_ms: Some(1500),
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, None).await;
    let id = accepted["id"].as_str().unwrap();
    // A context was generated.
    assert!(!accepted["context"].as_str().unwrap().is_empty());
    // Graph answered "running": the operation runs until the notification, 1.5 s later.
    let running = within(async {
        loop {
            let op = app.get_json(&format!("/v1/operations/{id}")).await;
            if status(&op) != "NotStarted" {
                return op;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(status(&running), "Running", "{running}");
    assert_eq!(running["upstreamStatus"], "running");

    let done = app
        .operation_until(id, |op| status(op) == "Succeeded")
        .await;
    assert_eq!(done["upstreamStatus"], "completed");
    assert_eq!(
        event_types(&done),
        [(
            "cancelMediaProcessingOperation.deleted".to_owned(),
            "applied".to_owned()
        )]
    );
    assert_eq!(cancelled(&done), 1);
}

#[tokio::test]
async fn a_notification_that_overtakes_the_answer_settles_the_cancel() {
    let app = TestApp::spawn().await;
    app.queue_media(CALL, "playPrompt", "p1").await;
    let script = GraphScript {
        cancel_status: CancelStatus::Running,
        notifications_before_response: true,
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, Some("early")).await;
    let id = accepted["id"].as_str().unwrap();
    let done = app
        .operation_until(id, |op| status(op) == "Succeeded" && cancelled(op) == 1)
        .await;
    // The later "running" answer did not reopen it.
    let again = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(status(&again), "Succeeded");
    assert_eq!(done["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn duplicate_notifications_count_once() {
    let app = TestApp::spawn().await;
    app.queue_media(CALL, "playPrompt", "dup").await;
    let script = GraphScript {
        duplicates: 2,
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, None).await;
    let id = accepted["id"].as_str().unwrap();
    let done = app.operation_until(id, |op| cancelled(op) == 1).await;
    assert_eq!(status(&done), "Succeeded");
    // Three deliveries of the same notification: all acknowledged, applied once.
    within(async {
        while app.emulator.graph().notifications_delivered() < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let prompt = &app.list("context=dup").await[0];
    assert_eq!(prompt["events"].as_array().unwrap().len(), 1, "{prompt}");
    let (code, summary) = app
        .notify(
            "application/json",
            fixture("graph/v1_playprompt_notification_completed.json"),
        )
        .await;
    assert_eq!((code, summary["matched"].as_u64()), (202, Some(0)));
    let (_, summary) = app
        .notify(
            "application/json",
            fixture("graph/v1_playprompt_notification_completed.json"),
        )
        .await;
    assert_eq!(summary["duplicates"], 1);
}

#[tokio::test]
async fn the_token_is_reused_and_renewed_when_graph_refuses_it() {
    let app = TestApp::spawn().await;
    let graph = app.emulator.graph();
    for call in ["call-a", "call-b", "call-c"] {
        let accepted = app.cancel(call, GraphScript::default(), None).await;
        let id = accepted["id"].as_str().unwrap();
        app.operation_until(id, |op| status(op) == "Succeeded")
            .await;
    }
    assert_eq!(graph.token_requests(), 1);

    // Revoked: Graph answers 401, the client fetches a new token and retries once.
    graph.expire_tokens();
    let accepted = app.cancel("call-d", GraphScript::default(), None).await;
    let id = accepted["id"].as_str().unwrap();
    let done = app
        .operation_until(id, |op| {
            status(op) != "NotStarted" && status(op) != "Running"
        })
        .await;
    assert_eq!(status(&done), "Succeeded", "{done}");
    assert_eq!(graph.token_requests(), 2);
    let attempts: Vec<u16> = graph
        .requests()
        .iter()
        .filter(|r| r.path_and_query.contains("/calls/call-d/"))
        .map(|r| r.status)
        .collect();
    assert_eq!(attempts, [401, 200]);
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    let app = TestApp::spawn_with(|config| config.emulator.graph_token_lifetime_secs = 2).await;
    let graph = app.emulator.graph();
    // Keep cancelling until a second token was fetched: the first one's lifetime ran out.
    within(async {
        let mut n = 0;
        while graph.token_requests() < 2 {
            n += 1;
            let accepted = app
                .cancel(&format!("call-{n}"), GraphScript::default(), None)
                .await;
            let id = accepted["id"].as_str().unwrap();
            let done = app
                .operation_until(id, |op| status(op) == "Succeeded" || status(op) == "Failed")
                .await;
            assert_eq!(status(&done), "Succeeded", "{done}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    // No request was ever refused: the client renewed ahead of expiry.
    assert!(graph.requests().iter().all(|r| r.status != 401));
}

#[tokio::test]
async fn a_401_from_graph_fails_the_operation() {
    let app = TestApp::spawn().await;
    let script = GraphScript {
        reject: Some(Reject {
            status: 401,
            code: "InvalidAuthenticationToken".into(),
            message: "Access token validation failure.".into(),
        }),
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, None).await;
    let id = accepted["id"].as_str().unwrap();
    let done = app.operation_until(id, |op| status(op) == "Failed").await;
    assert_eq!(done["error"]["code"], "UpstreamRejected");
    assert_eq!(done["result"]["code"], 401);
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("InvalidAuthenticationToken"), "{message}");
    // Refused twice: once with the cached token, once with a fresh one; then given up.
    let graph = app.emulator.graph();
    let attempts: Vec<u16> = graph
        .requests()
        .iter()
        .filter(|r| r.path_and_query.ends_with("/cancelMediaProcessing"))
        .map(|r| r.status)
        .collect();
    assert_eq!(attempts, [401, 401]);
    assert_eq!(graph.token_requests(), 2);
}

#[tokio::test]
async fn wrong_app_credentials_fail_the_operation_without_leaking_the_secret() {
    let app = TestApp::spawn_with(|config| {
        config.graph.client_secret = "definitely-wrong-secret".to_owned().into();
    })
    .await;
    let accepted = app.cancel(CALL, GraphScript::default(), None).await;
    let id = accepted["id"].as_str().unwrap();
    let done = app.operation_until(id, |op| status(op) == "Failed").await;
    assert_eq!(done["error"]["code"], "UpstreamAuthFailed", "{done}");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid_client")
    );
    assert!(!done.to_string().contains("definitely-wrong-secret"));
}

#[tokio::test]
async fn throttling_is_retried_with_a_fractional_retry_after() {
    let app = TestApp::spawn().await;
    let script = GraphScript {
        fail_first: vec![429, 503],
        retry_after_secs: Some(0.128),
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, None).await;
    let id = accepted["id"].as_str().unwrap();
    let done = app
        .operation_until(id, |op| status(op) == "Succeeded" || status(op) == "Failed")
        .await;
    assert_eq!(status(&done), "Succeeded", "{done}");
    let attempts: Vec<u16> = app
        .emulator
        .graph()
        .requests()
        .iter()
        .filter(|r| r.path_and_query.ends_with("/cancelMediaProcessing"))
        .map(|r| r.status)
        .collect();
    assert_eq!(attempts, [429, 503, 200]);
}

#[tokio::test]
async fn an_answer_without_a_body_takes_the_id_from_location() {
    let app = TestApp::spawn().await;
    let script = GraphScript {
        empty_body: true,
        no_notifications: true,
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, Some("bodiless")).await;
    let id = accepted["id"].as_str().unwrap();
    // An empty 202 says nothing of the status: running, with the id from Location.
    let running = within(async {
        loop {
            let op = app.get_json(&format!("/v1/operations/{id}")).await;
            if op.get("upstreamOperationId").is_some() {
                return op;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(status(&running), "Running", "{running}");
    let answered = app
        .emulator
        .graph()
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.ends_with("/cancelMediaProcessing"))
        .unwrap();
    assert_eq!(answered.status, 202);

    // A notification naming the operation only by that id, spelled as in resourceUrl, with
    // no clientContext and no type (the earliest beta's shape), settles it.
    let upstream_id = running["upstreamOperationId"].as_str().unwrap();
    let in_url = upstream_id.replace('-', "").to_uppercase();
    let notification = json!({"value": [{
        "changeType": "deleted",
        "resource": format!("/app/calls/{CALL_IN_URL}/operations/{in_url}"),
        "resourceData": {"status": "completed"}
    }]});
    let (code, summary) = app
        .notify("application/json", notification.to_string())
        .await;
    assert_eq!(
        (code, summary["matched"].as_u64()),
        (202, Some(1)),
        "{summary}"
    );
    let done = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(status(&done), "Succeeded", "{done}");
}

#[tokio::test]
async fn a_late_notification_after_the_timeout_is_still_recorded_and_wins() {
    let app = TestApp::spawn_with(|config| {
        config
            .operations
            .callback_timeouts
            .cancel_media_processing_secs = 1;
        config.operations.sweep_interval_ms = 50;
    })
    .await;
    let script = GraphScript {
        cancel_status: CancelStatus::Running,
        notification_delay_ms: Some(3000),
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, Some("slow")).await;
    let id = accepted["id"].as_str().unwrap();
    let timed_out = app.operation_until(id, |op| status(op) == "Failed").await;
    assert_eq!(timed_out["error"]["code"], "CallbackTimeout", "{timed_out}");
    let done = app
        .operation_until(id, |op| status(op) == "Succeeded")
        .await;
    assert_eq!(done["late"], true, "{done}");
    assert!(done.get("error").is_none(), "{done}");
    assert_eq!(
        event_types(&done),
        [(
            "cancelMediaProcessingOperation.deleted".to_owned(),
            "applied".to_owned()
        )]
    );
}

#[tokio::test]
async fn a_terminated_call_fails_its_unsettled_operations() {
    let app = TestApp::spawn().await;
    let script = GraphScript {
        cancel_status: CancelStatus::Running,
        no_notifications: true,
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, None).await;
    let id = accepted["id"].as_str().unwrap();
    app.operation_until(id, |op| status(op) == "Running").await;
    // Graph's own "terminated" notification for this call (codes as strings).
    let (code, _) = app
        .notify(
            "application/json",
            fixture("graph/v1_delete_notification_terminated.json"),
        )
        .await;
    assert_eq!(code, 202);
    let done = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(status(&done), "Failed");
    assert_eq!(done["error"]["code"], "CallTerminated");
    assert_eq!(done["result"]["subCode"], 5001);
    // The call's state notifications are kept on the call.
    let events = app
        .get_json(&format!("/v1/graph/calls/{CALL_IN_URL}/events"))
        .await;
    let types: Vec<&str> = events["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["call.deleted"]);
}

#[tokio::test]
async fn every_notification_fixture_is_accepted() {
    let app = TestApp::spawn().await;
    let dir = format!("{}/tests/fixtures/graph", env!("CARGO_MANIFEST_DIR"));
    let mut accepted = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let body = std::fs::read(&path).unwrap();
        let is_notification = serde_json::from_slice::<Value>(&body)
            .ok()
            .is_some_and(|v| v.get("value").is_some());
        if !is_notification {
            continue;
        }
        // The charset Graph was seen sending.
        let (code, summary) = app
            .notify("application/json; charset=Windows-1252", body)
            .await;
        assert_eq!(code, 202, "{}: {summary}", path.display());
        assert!(
            summary["received"].as_u64().unwrap() >= 1,
            "{}",
            path.display()
        );
        assert_eq!(summary["unmatched"], 0, "{}: {summary}", path.display());
        accepted += 1;
    }
    assert!(accepted >= 15, "{accepted}");
    // The cancelled recording became an observed operation, found by its context.
    let recordings = app
        .list("context=55178b4b-3b9f-4f71-9976-e1e031e386e1")
        .await;
    assert_eq!(recordings.len(), 1);
    assert_eq!(recordings[0]["kind"], "recordResponse");
    assert_eq!(recordings[0]["status"], "Failed");
}

#[tokio::test]
async fn bad_requests_and_bodies_are_refused_clearly() {
    let app = TestApp::spawn().await;
    let long = "x".repeat(257);
    let response = app
        .post_json(
            &format!("/v1/graph/calls/{CALL}/cancelMediaProcessing"),
            &json!({ "clientContext": long }),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("clientContext")
    );
    let ok = "y".repeat(256);
    let response = app
        .post_json(
            &format!("/v1/graph/calls/{CALL}/cancelMediaProcessing"),
            &json!({ "clientContext": ok }),
        )
        .await;
    assert_eq!(response.status(), 202);
    let response = app
        .post_json("/v1/graph/calls/bad%20id/cancelMediaProcessing", &json!({}))
        .await;
    assert_eq!(response.status(), 400);
    let response = app
        .post_raw(
            &format!("/v1/graph/calls/{CALL}/cancelMediaProcessing"),
            "text/plain",
            "{}",
        )
        .await;
    assert_eq!(response.status(), 415);

    for body in ["not json", "{}", "{\"value\": 1}", "[1, 2]"] {
        let (code, answer) = app.notify("application/json", body).await;
        assert_eq!(code, 400, "{body}");
        assert!(answer["error"]["message"].is_string(), "{body}");
    }
}

#[tokio::test]
async fn the_request_is_the_one_the_official_sdk_sends() {
    let app = TestApp::spawn().await;
    let sample: Value = serde_json::from_slice(&fixture(
        "sdk-requests/graph_cancel_media_processing.msgraph-sdk-1.65.0.json",
    ))
    .unwrap();
    let want = &sample["request"];
    let accepted = app.cancel(CALL, GraphScript::default(), Some("cc-1")).await;
    let id = accepted["id"].as_str().unwrap();
    app.operation_until(id, |op| status(op) == "Succeeded")
        .await;
    let requests = app.emulator.graph().requests();
    let sent = requests
        .iter()
        .find(|r| r.path_and_query.ends_with("/cancelMediaProcessing"))
        .unwrap();
    assert_eq!(sent.method, want["method"]);
    assert_eq!(sent.path_and_query, want["path"].as_str().unwrap());
    assert_eq!(sent.body, want["body"]);
    for name in ["accept", "content-type"] {
        assert_eq!(
            sent.headers[name],
            want["headers"][name].as_str().unwrap(),
            "{name}"
        );
    }
    // The emulator redacts the token it saw; the scheme is the SDK's.
    assert!(sent.headers["authorization"].starts_with("Bearer "));
    let token_request = requests
        .iter()
        .find(|r| r.path_and_query.ends_with("/oauth2/v2.0/token"))
        .unwrap();
    assert_eq!(token_request.body["grant_type"], "client_credentials");
    assert_eq!(
        token_request.body["scope"],
        "https://graph.microsoft.com/.default"
    );
}

#[tokio::test]
async fn concurrent_cancels_share_one_token_and_each_lists_its_own_prompts() {
    let app = TestApp::spawn().await;
    let calls: Vec<String> = (0..20).map(|n| format!("call-{n}")).collect();
    for call in &calls {
        for prompt in ["a", "b"] {
            app.queue_media(call, "playPrompt", &format!("{call}-{prompt}"))
                .await;
        }
    }
    let graph = app.emulator.graph();
    let seeded = graph.token_requests();
    // Twenty cancels at once, before callops has any token.
    let mut tasks = tokio::task::JoinSet::new();
    for call in &calls {
        let http = app.http.clone();
        let url = app.url(&format!("/v1/graph/calls/{call}/cancelMediaProcessing"));
        let call = call.clone();
        tasks.spawn(async move {
            let response = http.post(url).json(&json!({})).send().await.unwrap();
            (call, accepted(response).await)
        });
    }
    let started = within(tasks.join_all()).await;
    for (call, operation) in started {
        let id = operation["id"].as_str().unwrap();
        let done = app
            .operation_until(id, |op| status(op) == "Succeeded" && cancelled(op) == 2)
            .await;
        let mut contexts: Vec<&str> = done["cancelledOperations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["context"].as_str().unwrap())
            .collect();
        contexts.sort_unstable();
        assert_eq!(contexts, [format!("{call}-a"), format!("{call}-b")]);
    }
    // All twenty went out on one token, fetched once.
    assert_eq!(graph.token_requests(), seeded + 1);
}

#[tokio::test]
async fn a_graph_that_does_not_answer_in_time_is_retried_then_given_up() {
    let app = TestApp::spawn_with(|config| {
        config.graph.request_timeout_ms = 200;
        config.graph.retry.max_attempts = 2;
    })
    .await;
    // The emulator answers only after delivering its notifications (a running cancel always
    // has one), to a listener that accepts and never answers: Graph's answer never comes in
    // time, on any attempt.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = black_hole.local_addr().unwrap();
    let script = GraphScript {
        cancel_status: CancelStatus::Running,
        notifications_before_response: true,
        callback_uri: Some(format!("http://{address}/")),
        ..GraphScript::default()
    };
    let accepted = app.cancel(CALL, script, None).await;
    let id = accepted["id"].as_str().unwrap();
    let done = app.operation_until(id, |op| status(op) == "Failed").await;
    assert_eq!(done["error"]["code"], "UpstreamUnavailable", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("2 attempt(s)"), "{message}");
    drop(black_hole);
}

#[tokio::test]
async fn connection_errors_are_retried_then_given_up() {
    // A port nothing listens on (bound, then released).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = TestApp::spawn_with(|config| {
        config.graph.base_url = format!("http://{closed}/v1.0").parse().unwrap();
        config.graph.retry.max_attempts = 3;
    })
    .await;
    let accepted = app.cancel(CALL, GraphScript::default(), None).await;
    let id = accepted["id"].as_str().unwrap();
    let done = app.operation_until(id, |op| status(op) == "Failed").await;
    assert_eq!(done["error"]["code"], "UpstreamUnavailable", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("3 attempt(s)"), "{message}");
}
