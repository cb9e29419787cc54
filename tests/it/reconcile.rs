//! Reconciliation end to end: the emulator sends no callback, and at the deadline callops
//! asks it (ACS: the participant, then the call; Graph: the call) before failing.

use callops::emulator::Outcome;
use callops::emulator::Script;
use callops::emulator::graph::{CancelStatus, GraphScript};
use serde_json::Value;
use serde_json::json;

use crate::support::{TestApp, remove_event, silent};

/// A server whose operations time out after 1 s and whose sweep runs every 50 ms.
async fn app(adjust: impl FnOnce(&mut callops::config::Config)) -> TestApp {
    TestApp::spawn_with(|config| {
        config.operations.callback_timeouts.remove_participant_secs = 1;
        config
            .operations
            .callback_timeouts
            .cancel_media_processing_secs = 1;
        config.operations.sweep_interval_ms = 50;
        config.operations.call_end_grace_ms = 300;
        adjust(config);
    })
    .await
}

fn settled(operation: &Value) -> bool {
    ["Succeeded", "Failed", "Canceled"].contains(&operation["status"].as_str().unwrap_or(""))
}

/// The value of the reconciliation counter for (kind, outcome).
async fn reconciliations(app: &TestApp, kind: &str, outcome: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    let series = format!("callops_reconciliations_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// Starts a silent removal on `call` scripted with `script` and waits for it to settle.
async fn removal_settled(app: &TestApp, call: &str, script: Script) -> Value {
    let started = app.remove(call, script, Some("ctx-r")).await;
    app.operation_until(started["id"].as_str().unwrap(), settled)
        .await
}

#[tokio::test]
async fn every_reconciliation_series_is_there_from_the_start() {
    let app = app(|_| {}).await;
    for kind in ["removeParticipant", "cancelMediaProcessing"] {
        for outcome in [
            "succeeded",
            "still_pending",
            "call_ended",
            "call_terminated",
            "unreachable",
            "superseded",
        ] {
            assert_eq!(reconciliations(&app, kind, outcome).await, 0.0);
        }
    }
}

#[tokio::test]
async fn a_participant_gone_from_the_call_is_a_reconciled_success() {
    let app = app(|_| {}).await;
    let operation = removal_settled(&app, "call-gone-participant", silent()).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    assert_eq!(operation["reconciled"], true, "{operation}");
    assert!(operation.get("error").is_none(), "{operation}");
    assert!(
        operation.get("participant").is_none(),
        "kept for the store only"
    );
    assert_eq!(
        reconciliations(&app, "removeParticipant", "succeeded").await,
        1.0
    );
    // ACS was asked as the SDK's get_participant asks: the raw id escaped in the path.
    let asked: Vec<_> = app
        .emulator
        .requests()
        .into_iter()
        .filter(|request| request.method == "GET")
        .map(|request| (request.path_and_query, request.status))
        .collect();
    assert_eq!(
        asked,
        [
            (
                "/calling/callConnections/call-gone-participant/participants/8%3Aacs%3Aabc_def?api-version=2024-09-15".to_owned(),
                404
            ),
            (
                "/calling/callConnections/call-gone-participant?api-version=2024-09-15".to_owned(),
                200
            ),
        ]
    );

    // The real callback, late, still wins.
    let delivered = app
        .callback(&remove_event(
            "evt-late",
            "call-gone-participant",
            "ctx-r",
            false,
        ))
        .await;
    assert_eq!(delivered["matched"], 1, "{delivered}");
    let id = operation["id"].as_str().unwrap();
    let after = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(after["status"], "Failed", "{after}");
    assert_eq!(after["error"]["code"], "RemoveParticipantFailed");
    assert_eq!(after["late"], true);
    assert!(after.get("reconciled").is_none(), "{after}");
}

#[tokio::test]
async fn a_participant_still_on_the_call_times_out() {
    let app = app(|_| {}).await;
    let script = Script {
        outcome: Outcome::Fail,
        ..silent()
    };
    let operation = removal_settled(&app, "call-still-there", script).await;
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_eq!(operation["error"]["code"], "CallbackTimeout");
    let message = operation["error"]["message"].as_str().unwrap();
    assert!(message.contains("still lists the participant"), "{message}");
    assert!(operation.get("reconciled").is_none(), "{operation}");
    assert_eq!(
        reconciliations(&app, "removeParticipant", "still_pending").await,
        1.0
    );
}

#[tokio::test]
async fn a_call_gone_ends_the_removal_with_call_ended() {
    let app = app(|_| {}).await;
    let script = Script {
        call_ended: true,
        ..silent()
    };
    let operation = removal_settled(&app, "call-ended", script).await;
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_eq!(operation["error"]["code"], "CallEnded");
    assert_eq!(operation["reconciled"], true);
    assert_eq!(
        reconciliations(&app, "removeParticipant", "call_ended").await,
        1.0
    );
    // A late success still wins.
    app.callback(&remove_event("evt-late-ok", "call-ended", "ctx-r", true))
        .await;
    let id = operation["id"].as_str().unwrap();
    let after = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(after["status"], "Succeeded", "{after}");
    assert_eq!(after["late"], true);
}

#[tokio::test]
async fn a_platform_that_cannot_be_asked_leaves_the_plain_timeout() {
    let app = app(|_| {}).await;
    let script = Script {
        read_status: Some(503),
        ..silent()
    };
    let operation = removal_settled(&app, "call-unreachable", script).await;
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_eq!(operation["error"]["code"], "CallbackTimeout");
    assert!(operation.get("reconciled").is_none(), "{operation}");
    assert_eq!(
        reconciliations(&app, "removeParticipant", "unreachable").await,
        1.0
    );
}

#[tokio::test]
async fn with_reconciliation_off_the_platform_is_not_asked() {
    let app = app(|config| config.operations.reconcile = false).await;
    let operation = removal_settled(&app, "call-not-asked", silent()).await;
    assert_eq!(operation["error"]["code"], "CallbackTimeout", "{operation}");
    assert!(
        app.emulator
            .requests()
            .iter()
            .all(|request| request.method != "GET")
    );
}

#[tokio::test]
async fn a_cancel_whose_call_is_gone_fails_with_call_terminated() {
    let app = app(|_| {}).await;
    let call = "6b000000-0000-4000-8000-00000000c0de";
    let script = GraphScript {
        cancel_status: CancelStatus::Running,
        no_notifications: true,
        call_ended: true,
        ..GraphScript::default()
    };
    let started = app.cancel(call, script, Some("stop-it")).await;
    let operation = app
        .operation_until(started["id"].as_str().unwrap(), settled)
        .await;
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_eq!(operation["error"]["code"], "CallTerminated");
    assert_eq!(operation["reconciled"], true);
    assert_eq!(
        reconciliations(&app, "cancelMediaProcessing", "call_terminated").await,
        1.0
    );
}

#[tokio::test]
async fn a_cancel_whose_call_is_still_there_times_out() {
    let app = app(|_| {}).await;
    let call = "6b000000-0000-4000-8000-00000000c0df";
    let script = GraphScript {
        cancel_status: CancelStatus::Running,
        no_notifications: true,
        ..GraphScript::default()
    };
    let started = app.cancel(call, script, Some("stop-it")).await;
    let operation = app
        .operation_until(started["id"].as_str().unwrap(), settled)
        .await;
    assert_eq!(operation["error"]["code"], "CallbackTimeout", "{operation}");
    assert!(operation.get("reconciled").is_none());
    assert_eq!(
        reconciliations(&app, "cancelMediaProcessing", "still_pending").await,
        1.0
    );
}

/// A `CallDisconnected` event for the call of a removal still waiting.
fn call_disconnected(id: &str, call: &str) -> Value {
    json!([{
        "id": id,
        "source": format!("calling/callConnections/{call}"),
        "type": "Microsoft.Communication.CallDisconnected",
        "time": "2026-11-22T07:25:18.1234567+00:00",
        "specversion": "1.0",
        "datacontenttype": "application/json",
        "data": {"callConnectionId": call, "serverCallId": "c2VydmVy", "correlationId": "c"}
    }])
}

#[tokio::test]
async fn a_disconnected_call_settles_its_waiting_removals_after_the_grace_period() {
    // The callback deadline is far away: only the call's end can settle it.
    let app = app(|config| config.operations.callback_timeouts.remove_participant_secs = 240).await;
    let started = app.remove("call-hung-up", silent(), Some("ctx-h")).await;
    let id = started["id"].as_str().unwrap();
    app.operation_until(id, |op| op["status"] == "Running")
        .await;
    app.callback(&call_disconnected("evt-bye", "call-hung-up"))
        .await;
    let operation = app.operation_until(id, settled).await;
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_eq!(operation["error"]["code"], "CallEnded");
    assert_eq!(operation["reconciled"], true);
}

#[tokio::test]
async fn a_removal_event_within_the_grace_period_wins_over_the_call_end() {
    let app = app(|config| {
        config.operations.callback_timeouts.remove_participant_secs = 240;
        config.operations.call_end_grace_ms = 2_000;
    })
    .await;
    let started = app.remove("call-hung-up-2", silent(), Some("ctx-g")).await;
    let id = started["id"].as_str().unwrap();
    app.operation_until(id, |op| op["status"] == "Running")
        .await;
    app.callback(&call_disconnected("evt-bye-2", "call-hung-up-2"))
        .await;
    app.callback(&remove_event("evt-ok-2", "call-hung-up-2", "ctx-g", true))
        .await;
    let operation = app.operation_until(id, settled).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    assert!(operation.get("reconciled").is_none(), "{operation}");
    assert!(operation.get("late").is_none(), "{operation}");
}

/// Graph's notification about the cancel names it only by Graph's operation id and comes
/// before Graph's answer: it waits under that id and settles the cancel once the answer
/// names it.
#[tokio::test]
async fn a_cancel_notification_before_graphs_answer_waits_for_the_answer() {
    let app = TestApp::spawn().await;
    let call = "6b000000-0000-4000-8000-0000000000ea";
    let script = GraphScript {
        cancel_status: CancelStatus::Running,
        notifications_before_response: true,
        notification_without_context: true,
        ..GraphScript::default()
    };
    let started = app.cancel(call, script, Some("early-bird")).await;
    let id = started["id"].as_str().unwrap();
    let operation = app.operation_until(id, settled).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    assert!(operation.get("reconciled").is_none());
    let events = operation["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{operation}");
    assert_eq!(events[0]["type"], "cancelMediaProcessingOperation.deleted");
    assert_eq!(events[0]["effect"], "applied");
    // It went nowhere else: no observed operation, nothing on the call's timeline.
    assert_eq!(
        app.list("callId=6b000000-0000-4000-8000-0000000000ea")
            .await
            .len(),
        1
    );
}
