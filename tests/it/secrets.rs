//! Secrets never reach the logs: a full flow (ACS removal, Graph cancel with a token renewal,
//! signed callbacks, a refused callback, a callback secret, client API keys) with everything logged at TRACE
//! from every crate, then a search of the logs for each secret.

use callops::emulator::Script;
use callops::emulator::graph::GraphScript;
use serde_json::Value;

use crate::support::{TestApp, capture_logs, remove_event};

fn status(operation: &Value) -> &str {
    operation["status"].as_str().unwrap()
}

#[tokio::test]
async fn no_secret_reaches_the_logs_in_a_full_flow() {
    let (captured, _guard) = capture_logs();

    let client_secret = "Zx8Q~app-password-0123456789";
    let callback_secret = "callback-secret-7d3f9a";
    let api_key = "client-api-key-5b0c2e9d41";
    let mut access_key = String::new();
    let app = TestApp::spawn_with(|config| {
        config.http.api_keys = api_key.to_owned().into();
        config.emulator.graph_client_secret = client_secret.to_owned();
        config.graph.client_secret = client_secret.to_owned().into();
        config.callbacks.secret = callback_secret.to_owned().into();
        access_key = config.emulator.access_key.clone();
    })
    .await
    .authenticated(api_key);

    // ACS: a removal signed with the access key, called back with a token and the secret.
    let started = app.remove("call-secrets", Script::default(), None).await;
    let done = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(status(&done), "Succeeded", "{done}");
    // Graph: a throttled cancel, then a refused token and a new one.
    let script = GraphScript {
        fail_first: vec![429],
        retry_after_secs: Some(0.01),
        ..GraphScript::default()
    };
    let call = "57dab8b1-894c-409a-b240-bd8beae78896";
    let accepted = app.cancel(call, script, None).await;
    let id = accepted["id"].as_str().unwrap();
    app.operation_until(id, |op| status(op) == "Succeeded")
        .await;
    app.emulator.graph().expire_tokens();
    let accepted = app.cancel("call-2", GraphScript::default(), None).await;
    let id = accepted["id"].as_str().unwrap();
    app.operation_until(id, |op| status(op) == "Succeeded")
        .await;
    // A refused callback: right token, wrong secret.
    let refused_token = app.emulator.signer().acs_token();
    let response = app
        .http
        .post(app.url("/callbacks/acs?secret=not-the-secret"))
        .bearer_auth(&refused_token)
        .json(&remove_event("evt-refused", "call-x", "ctx", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // A refused client: a wrong key, and the right key as a bearer token.
    let wrong_key = "client-api-key-wrong-00000";
    let response = reqwest::Client::new()
        .get(app.url("/v1/operations"))
        .header("api-key", wrong_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = reqwest::Client::new()
        .get(app.url("/v1/operations"))
        .bearer_auth(api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let logs = captured.text();
    assert!(
        logs.contains("Graph access token acquired") && logs.contains("callback refused"),
        "the capture works"
    );
    let mut secrets = vec![
        ("Graph client secret", client_secret.to_owned()),
        ("callback secret", callback_secret.to_owned()),
        ("ACS access key", access_key),
        ("client API key", api_key.to_owned()),
        ("refused API key", wrong_key.to_owned()),
    ];
    let graph_tokens = app.emulator.graph().issued_tokens();
    let callback_tokens = app.emulator.signer().issued_tokens();
    assert!(!graph_tokens.is_empty() && callback_tokens.len() >= 2);
    secrets.extend(graph_tokens.into_iter().map(|t| ("Graph access token", t)));
    secrets.extend(callback_tokens.into_iter().map(|t| ("callback token", t)));
    for (what, secret) in secrets {
        assert!(!logs.contains(&secret), "the {what} was logged");
        // Nor the signature part of a JWT alone.
        if let Some(signature) = secret.rsplit('.').next().filter(|s| s.len() > 40) {
            assert!(!logs.contains(signature), "part of the {what} was logged");
        }
    }
}
