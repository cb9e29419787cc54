//! `POST /callbacks/acs`: fixtures, duplicates, early callbacks, observed operations.

use serde_json::Value;

use crate::support::{TestApp, fixture, remove_event, silent};

#[tokio::test]
async fn every_acs_fixture_is_accepted() {
    let app = TestApp::spawn().await;
    let dir = format!("{}/tests/fixtures/acs", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".json") && !name.starts_with("spec_"))
        .collect();
    names.sort();
    assert!(names.len() >= 13);
    for name in names {
        let response = app
            .post_raw(
                "/callbacks/acs",
                "application/json; charset=utf-8",
                fixture(&format!("acs/{name}")),
            )
            .await;
        assert_eq!(response.status(), 200, "{name}");
        let summary: Value = response.json().await.unwrap();
        assert_eq!(summary["received"], 1, "{name}: {summary}");
    }
}

#[tokio::test]
async fn other_operations_become_observed_and_call_events_are_kept() {
    let app = TestApp::spawn().await;
    let response = app
        .post_raw(
            "/callbacks/acs",
            "application/json",
            fixture("acs/java_RecognizeCompleted_dtmf.json"),
        )
        .await;
    let summary: Value = response.json().await.unwrap();
    assert_eq!(summary["observed"], 1, "{summary}");

    let page: Value = app
        .get_json("/v1/operations?context=OperationalContextValue-1118-1049")
        .await;
    let operations = page["value"].as_array().unwrap();
    assert_eq!(operations.len(), 1, "{page}");
    assert_eq!(operations[0]["kind"], "recognize");
    assert_eq!(operations[0]["status"], "Succeeded");
    assert_eq!(
        operations[0]["callConnectionId"],
        "401f7000-c1c0-41e2-962d-85d0dc1d6f01"
    );
    assert_eq!(operations[0]["result"]["subCode"], 8533);

    // No operationContext: kept on the call's timeline.
    app.post_raw(
        "/callbacks/acs",
        "application/json",
        fixture("acs/python_recorded_CallConnected.json"),
    )
    .await;
    let events: Value = app
        .get_json("/v1/acs/callConnections/411f0b00-360b-49d4-8323-c08b3b9d4043/events")
        .await;
    assert_eq!(
        events["value"][0]["type"], "Microsoft.Communication.CallConnected",
        "{events}"
    );
    assert_eq!(
        events["value"][0]["id"],
        "73d0f11a-a023-43a5-82aa-4a961b591445"
    );
}

#[tokio::test]
async fn a_redelivered_event_is_a_duplicate() {
    let app = TestApp::spawn().await;
    let script = silent();
    let started = app.remove("call-redeliver", script, Some("ctx-r")).await;
    let id = started["id"].as_str().unwrap();
    let event = remove_event("ev-r", "call-redeliver", "ctx-r", true);
    let first: Value = app.callback(&event).await;
    assert_eq!(
        (first["matched"].as_u64(), first["duplicates"].as_u64()),
        (Some(1), Some(0)),
        "{first}"
    );
    let second: Value = app.callback(&event).await;
    assert_eq!(
        (second["matched"].as_u64(), second["duplicates"].as_u64()),
        (Some(0), Some(1)),
        "{second}"
    );
    let health: Value = app.get_json("/healthz").await;
    assert_eq!(
        health["callbacksDuplicate"],
        serde_json::json!({"acs": 1, "graph": 0}),
        "{health}"
    );
    // A different event id with the opposite outcome is recorded but cannot move it.
    let late = remove_event("ev-r2", "call-redeliver", "ctx-r", false);
    app.post_json("/callbacks/acs", &late).await;
    let operation: Value = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(operation["status"], "Succeeded");
    let effects: Vec<&str> = operation["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["effect"].as_str().unwrap())
        .collect();
    assert_eq!(effects, ["applied", "ignored"]);
}

#[tokio::test]
async fn a_callback_for_an_operation_not_yet_known_is_parked_then_applied() {
    let app = TestApp::spawn().await;
    let event = remove_event("ev-park", "call-park", "ctx-park", false);
    let summary: Value = app.callback(&event).await;
    assert_eq!(summary["parked"], 1, "{summary}");

    let script = silent();
    let started = app.remove("call-park", script, Some("ctx-park")).await;
    assert_eq!(
        started["status"], "Failed",
        "the parked callback settles it at creation: {started}"
    );
    assert_eq!(started["error"]["code"], "RemoveParticipantFailed");
}

#[tokio::test]
async fn parked_callbacks_expire_onto_the_call_timeline() {
    let app = TestApp::spawn_with(|config| {
        config.operations.park_ttl_ms = 50;
        config.operations.sweep_interval_ms = 20;
    })
    .await;
    let event = remove_event("ev-orphan", "call-orphan", "nobody", true);
    let summary: Value = app.callback(&event).await;
    assert_eq!(summary["parked"], 1);
    let events = crate::support::within(async {
        loop {
            let events: Value = app
                .get_json("/v1/acs/callConnections/call-orphan/events")
                .await;
            if !events["value"].as_array().unwrap().is_empty() {
                return events;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(events["value"][0]["effect"], "unmatched");
    assert_eq!(events["value"][0]["id"], "ev-orphan");
    let health: Value = app.get_json("/healthz").await;
    assert_eq!(health["parkedCallbacks"], 0);
}

#[tokio::test]
async fn malformed_callbacks_are_refused_with_400() {
    let app = TestApp::spawn().await;
    for body in [
        "",
        "not json",
        "[1, 2]",
        "{\"id\": 7}",
        "[{\"data\": \"x\"}]",
    ] {
        let response = app
            .post_raw("/callbacks/acs", "application/json", body)
            .await;
        assert_eq!(response.status(), 400, "{body:?}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "InvalidRequest", "{body:?}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }
    let huge = vec![b' '; 300 * 1024];
    let response = app
        .post_raw("/callbacks/acs", "application/json", huge)
        .await;
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn a_chatty_operation_keeps_its_first_and_last_events_and_still_drops_duplicates() {
    let app = TestApp::spawn().await;
    let (call, context) = ("call-chatty", "ctx-chatty");
    let started = app.remove(call, silent(), Some(context)).await;
    let id = started["id"].as_str().unwrap();
    let ids: Vec<String> = (0..200).map(|n| format!("ev-chatty-{n}")).collect();
    for batch in ids.chunks(20) {
        let events: Vec<Value> = batch
            .iter()
            .map(|event_id| remove_event(event_id, call, context, true)[0].clone())
            .collect();
        let summary = app.callback(&Value::Array(events)).await;
        assert_eq!(summary["matched"], 20, "{summary}");
    }
    let operation = app.get_json(&format!("/v1/operations/{id}")).await;
    let listed = |operation: &Value| -> Vec<String> {
        operation["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let expected: Vec<String> = [&ids[..10], &ids[160..]].concat();
    assert_eq!(listed(&operation), expected);
    assert_eq!(operation["eventsOmitted"], 150, "{operation}");
    assert_eq!(operation["events"][0]["effect"], "applied");

    // An event no longer on the timeline is still remembered.
    let again = app
        .callback(&remove_event(&ids[100], call, context, true))
        .await;
    assert_eq!(again["duplicates"], 1, "{again}");
    let unchanged = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(unchanged["eventsOmitted"], 150, "{unchanged}");
    assert_eq!(listed(&unchanged), expected);
}
