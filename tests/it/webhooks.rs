//! Webhooks: subscriptions and their secrets, per-operation `notify`, signed deliveries
//! that survive receiver outages (503, timeouts, refused connections), the attempt log,
//! dead-lettering, redelivery, disabling.

use std::collections::BTreeSet;
use std::time::Duration;

use callops::config::Config;
use callops::emulator::Script;
use callops::emulator::graph::GraphScript;
use serde_json::{Value, json};

use crate::receiver::{Mode, Receiver};
use crate::support::{SOON, TestApp, within};

/// Test-friendly webhook settings: loopback receivers, quick retries and timeouts.
pub fn quick_webhooks(config: &mut Config) {
    config.webhooks.allow_private_targets = true;
    config.webhooks.initial_delay_ms = 20;
    config.webhooks.max_delay_ms = 200;
    config.webhooks.request_timeout_ms = 300;
}

async fn subscribe(app: &TestApp, url: &str, body: Value) -> Value {
    let mut body = body;
    body["url"] = json!(url);
    let response = app.post_json("/v1/subscriptions", &body).await;
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    within(async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_subscription_shows_its_secret_once_and_can_rotate_it() {
    let app = TestApp::spawn_with(quick_webhooks).await;
    let created = subscribe(
        &app,
        "https://hooks.example.com/callops",
        json!({"eventTypes": ["operation.settled"], "filter": {"kind": "removeParticipant", "contextPrefix": "job-"}}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{created}");
    assert_eq!(created["status"], "enabled");
    let read = app.get_json(&format!("/v1/subscriptions/{id}")).await;
    assert!(read.get("secret").is_none(), "{read}");
    assert_eq!(read["filter"]["contextPrefix"], "job-");
    let listed = app.get_json("/v1/subscriptions").await;
    assert_eq!(listed["value"].as_array().unwrap().len(), 1);
    assert!(listed["value"][0].get("secret").is_none());
    let rotated: Value = app
        .post_json(&format!("/v1/subscriptions/{id}:rotateSecret"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let new_secret = rotated["secret"].as_str().unwrap();
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    let deleted = app
        .http
        .delete(app.url(&format!("/v1/subscriptions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        app.get(&format!("/v1/subscriptions/{id}")).await.status(),
        404
    );
}

#[tokio::test]
async fn bad_subscriptions_and_notify_members_are_refused_with_the_field_named() {
    let app = TestApp::spawn().await;
    let check = |body: Value, field: &'static str| {
        let app = &app;
        async move {
            let response = app.post_json("/v1/subscriptions", &body).await;
            assert_eq!(response.status(), 400, "{body}");
            let error: Value = response.json().await.unwrap();
            let message = error["error"]["message"].as_str().unwrap().to_owned();
            assert!(message.contains(field), "{message}");
        }
    };
    // Outbound safety: https only, no private addresses (not allowed by default).
    check(
        json!({"url": "http://hooks.example.com/", "eventTypes": ["operation.settled"]}),
        "url",
    )
    .await;
    check(
        json!({"url": "https://10.0.0.8/", "eventTypes": ["operation.settled"]}),
        "url",
    )
    .await;
    check(
        json!({"url": "https://169.254.169.254/", "eventTypes": ["operation.settled"]}),
        "url",
    )
    .await;
    check(
        json!({"url": "https://hooks.example.com/", "eventTypes": ["operation.exploded"]}),
        "eventTypes",
    )
    .await;
    check(
        json!({"url": "https://hooks.example.com/", "eventTypes": []}),
        "eventTypes",
    )
    .await;
    check(json!({"url": "https://hooks.example.com/", "eventTypes": ["operation.settled"], "filter": {"color": "red"}}), "color").await;
    for notify in [
        json!({"url": "http://127.0.0.1:9/"}),
        json!({"url": "https://hooks.example.com/", "secret": "hunter2"}),
        json!({"subscriptionId": "sub_nope"}),
        json!({}),
    ] {
        let response = app
            .post_json(
                "/v1/acs/callConnections/bad-notify/participants:remove",
                &json!({"participantToRemove": {"rawId": "8:acs:x"}, "notify": notify}),
            )
            .await;
        assert_eq!(response.status(), 400, "{notify}");
        let error: Value = response.json().await.unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("notify"),
            "{error}"
        );
    }
    assert_eq!(
        app.get("/v1/subscriptions/sub_nope/deliveries")
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("/v1/subscriptions/not%20an%20id").await.status(),
        400
    );
    let unknown_verb = app
        .post_json("/v1/subscriptions/sub_x:explode", &json!({}))
        .await;
    assert_eq!(unknown_verb.status(), 405);
    assert_eq!(unknown_verb.headers()["allow"], "GET,HEAD,DELETE");
}

/// Every settled removal and cancel reaches the subscription exactly once per webhook-id,
/// signed, though the receiver answers 503, then hangs past the timeout, then refuses
/// connections, before it recovers.
#[tokio::test]
async fn every_settled_operation_is_delivered_signed_through_receiver_outages() {
    let receiver = Receiver::start(Mode::Status(503)).await;
    let app = TestApp::spawn_with(quick_webhooks).await;
    let subscription = subscribe(
        &app,
        &receiver.url(),
        json!({"eventTypes": ["operation.settled"]}),
    )
    .await;
    receiver.trust(subscription["secret"].as_str().unwrap());
    let mut expected = BTreeSet::new();
    for n in 0..4 {
        let removal = app
            .remove(&format!("wh-call-{n}"), Script::default(), None)
            .await;
        expected.insert(removal["id"].as_str().unwrap().to_owned());
    }
    for n in 0..2 {
        let call = format!("3fa85f64-5717-4562-b3fc-2c963f66af{n:02}");
        let cancel = app.cancel(&call, GraphScript::default(), None).await;
        expected.insert(cancel["id"].as_str().unwrap().to_owned());
    }
    // 503s first, then timeouts, then refused connections.
    wait_for(|| receiver.received().len() >= 6).await;
    receiver.set_mode(Mode::Hang);
    tokio::time::sleep(Duration::from_millis(700)).await;
    receiver.down();
    receiver.set_mode(Mode::Accept);
    tokio::time::sleep(Duration::from_millis(500)).await;
    receiver.up().await;
    receiver.until_delivered(&expected).await;
    // Give any stray retry time to show up, then check: one webhook-id per operation,
    // every request signed and verified, the body the operation as GET shows it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids_per_operation = receiver.one_signed_id_per_operation();
    assert_eq!(
        ids_per_operation.keys().cloned().collect::<BTreeSet<_>>(),
        expected
    );
    assert!(
        receiver
            .received()
            .iter()
            .all(|r| r.body["type"] == "operation.settled")
    );
    for (id, received) in receiver.deduplicated() {
        let operation_id = received.body["data"]["id"].as_str().unwrap();
        let shown = app
            .get_json(&format!("/v1/operations/{operation_id}"))
            .await;
        assert_eq!(received.body["data"], shown, "{id}");
    }
    // The attempt log shows the failures before the success.
    let sub_id = subscription["id"].as_str().unwrap();
    let log = app
        .get_json(&format!("/v1/subscriptions/{sub_id}/deliveries"))
        .await;
    let deliveries = log["value"].as_array().unwrap();
    assert_eq!(deliveries.len(), expected.len());
    assert!(
        deliveries.iter().all(|d| d["status"] == "delivered"),
        "{log}"
    );
    let errors: Vec<&str> = deliveries
        .iter()
        .flat_map(|d| d["attempts"].as_array().unwrap())
        .filter_map(|a| a["error"].as_str())
        .collect();
    assert!(errors.iter().any(|e| e.contains("503")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("timed out")), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("connection")),
        "{errors:?}"
    );
    // Metrics count the outcomes.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("callops_webhook_deliveries_total{outcome=\"delivered\"} 6"),
        "{metrics}"
    );
    assert!(metrics.contains("callops_webhook_pending 0"), "{metrics}");
}

#[tokio::test]
async fn notify_posts_the_settled_operation_signed_with_its_own_secret() {
    let receiver = Receiver::start(Mode::Accept).await;
    let app = TestApp::spawn_with(quick_webhooks).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    receiver.trust(secret);
    app.emulator.set_script("notify-call", Script::default());
    let response = app
        .post_json(
            "/v1/acs/callConnections/notify-call/participants:remove",
            &json!({
                "participantToRemove": {"rawId": "8:acs:abc"},
                "notify": {"url": receiver.url(), "secret": secret},
            }),
        )
        .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert!(
        accepted.get("notify").is_none(),
        "the secret is never shown: {accepted}"
    );
    let id = accepted["id"].as_str().unwrap();
    wait_for(|| !receiver.received().is_empty()).await;
    let shown = app.wait_operation(id, 5).await;
    let received = receiver.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].verified, Some(true));
    assert_eq!(received[0].body["type"], "operation.settled");
    assert_eq!(received[0].body["data"], shown);
    assert!(shown.get("notify").is_none());

    // A cancel naming a subscription goes to that subscription's URL, whatever its filter.
    let subscription = subscribe(
        &app,
        &format!("{}/sub", receiver.url()),
        json!({"eventTypes": ["operation.settled"], "filter": {"kind": "somethingElse"}}),
    )
    .await;
    receiver.trust(subscription["secret"].as_str().unwrap());
    let response = app
        .post_json(
            "/v1/graph/calls/3fa85f64-5717-4562-b3fc-2c963f66afa7/cancelMediaProcessing",
            &json!({"notify": {"subscriptionId": subscription["id"]}}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let cancel: Value = response.json().await.unwrap();
    wait_for(|| receiver.received().len() == 2).await;
    let last = receiver.received().pop().unwrap();
    assert_eq!(last.verified, Some(true));
    assert_eq!(last.body["data"]["id"], cancel["id"]);
}

#[tokio::test]
async fn a_delivery_past_its_window_is_dead_lettered_redelivered_on_request_and_the_subscription_disabled()
 {
    let receiver = Receiver::start(Mode::Status(500)).await;
    let app = TestApp::spawn_with(|config| {
        quick_webhooks(config);
        config.webhooks.retry_total_secs = 1;
        // Disabled at its second failure.
        config.webhooks.disable_after_secs = 0;
    })
    .await;
    let subscription = subscribe(
        &app,
        &receiver.url(),
        json!({"eventTypes": ["operation.settled"]}),
    )
    .await;
    let sub_id = subscription["id"].as_str().unwrap().to_owned();
    app.remove("dead-call", Script::default(), None).await;
    let log_path = format!("/v1/subscriptions/{sub_id}/deliveries");
    let dead = within(async {
        loop {
            let log = app.get_json(&log_path).await;
            if log["value"][0]["status"] == "failed" {
                return log["value"][0].clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(dead["attemptCount"].as_u64().unwrap() >= 2, "{dead}");
    assert_eq!(dead["attempts"][0]["statusCode"], 500, "{dead}");
    assert!(dead["lastError"].as_str().is_some(), "{dead}");
    let shown = app.get_json(&format!("/v1/subscriptions/{sub_id}")).await;
    assert_eq!(shown["status"], "disabled", "{shown}");
    assert!(shown["disabledReason"].as_str().is_some());

    // Enabled again and redelivered: the same webhook-id arrives and is accepted.
    receiver.set_mode(Mode::Accept);
    let enabled = app
        .post_json(&format!("/v1/subscriptions/{sub_id}:enable"), &json!({}))
        .await;
    assert_eq!(enabled.status(), 200);
    let delivery_id = dead["id"].as_str().unwrap();
    let queued = app
        .post_json(&format!("{log_path}/{delivery_id}:redeliver"), &json!({}))
        .await;
    assert_eq!(queued.status(), 202);
    wait_for(|| receiver.deduplicated().contains_key(delivery_id)).await;
    let log = within(async {
        loop {
            let one = app.get_json(&format!("{log_path}/{delivery_id}")).await;
            if one["status"] == "delivered" {
                return one;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(log["attempts"].as_array().unwrap().last().unwrap()["statusCode"] == 204);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("callops_webhook_deliveries_total{outcome=\"failed\"} 1"),
        "{metrics}"
    );
    let _ = SOON;
}
