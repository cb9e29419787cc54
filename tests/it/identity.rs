//! Entra ID end to end, with no secret configured: removals (ACS) and cancels (Graph) through
//! the emulator with a managed identity (App Service protocol and IMDS), a workload identity
//! (its token file rotated) and a certificate; the bearer request equals the SDK's; one token
//! fetch for concurrent requests; nothing secret in the logs; bad settings refuse to start.

use std::collections::BTreeSet;

use callops::config::Config;
use callops::emulator::DEV_CLIENT_CERTIFICATE;
use callops::emulator::Script;
use callops::emulator::graph::GraphScript;
use callops::emulator::identity::{Audience, Grant};
use serde_json::Value;

use crate::support::{TestApp, capture_logs, fixture, within};

/// The emulator's base URL, as the harness configured Graph with it.
fn emulator_base(config: &Config) -> String {
    config
        .graph
        .authority
        .as_str()
        .trim_end_matches('/')
        .to_owned()
}

/// No access key, no client secret: ACS from its endpoint, Graph with no secret.
fn without_secrets(config: &mut Config, acs: &str, graph: &str) {
    let emulator = emulator_base(config);
    config.acs.connection_string = String::new().into();
    config.acs.endpoint = format!("{emulator}/");
    config.acs.credential = acs.to_owned();
    config.graph.credential = graph.to_owned();
    config.graph.client_secret = String::new().into();
    config.graph.tenant_id = String::new();
    config.graph.client_id = String::new();
    // The bot's app id, which an empty client id no longer provides.
    config.callbacks.graph.audience = config.emulator.graph_client_id.clone();
}

/// The managed-identity request azure-identity 1.27.0 sent, by name (see the fixture).
fn sdk_identity_request(name: &str) -> Value {
    let fixture: Value = serde_json::from_slice(&fixture(
        "sdk-requests/managed_identity.azure-identity-1.27.0.json",
    ))
    .unwrap();
    fixture["requests"][name].clone()
}

/// The path and the decoded query pairs (the SDK leaves `:` and `/` unencoded, we do not).
fn path_and_pairs(path_and_query: &str) -> (String, BTreeSet<(String, String)>) {
    let url = url::Url::parse(&format!("http://h{path_and_query}")).unwrap();
    let pairs = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    (url.path().to_owned(), pairs)
}

fn status(operation: &Value) -> &str {
    operation["status"].as_str().unwrap()
}

async fn removal_succeeds(app: &TestApp, call: &str) {
    let started = app.remove(call, Script::default(), None).await;
    let done = app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    assert_eq!(status(&done), "Succeeded", "{done}");
}

async fn cancel_succeeds(app: &TestApp, call: &str) {
    let accepted = app.cancel(call, GraphScript::default(), None).await;
    let done = app
        .operation_until(accepted["id"].as_str().unwrap(), |op| {
            status(op) != "Running" && status(op) != "NotStarted"
        })
        .await;
    assert_eq!(status(&done), "Succeeded", "{done}");
}

fn grants_for(app: &TestApp, audience: Audience) -> Vec<Grant> {
    app.emulator
        .identity()
        .grants()
        .into_iter()
        .filter(|grant| grant.audience == audience)
        .collect()
}

#[tokio::test]
async fn managed_identity_by_the_app_service_protocol_removes_and_cancels() {
    let app = TestApp::spawn_with(|config| {
        without_secrets(config, "managed-identity", "managed-identity");
        config.identity.endpoint = format!("{}/msi/token", emulator_base(config));
        config.identity.header = config.emulator.identity_header.clone().into();
    })
    .await;
    // Twenty removals at once before any token exists: one token fetch serves them all.
    let removals: Vec<_> = (0..20)
        .map(|n| {
            let app = &app;
            async move { removal_succeeds(app, &format!("call-mi-{n}")).await }
        })
        .collect();
    futures_util::future::join_all(removals).await;
    cancel_succeeds(&app, "57dab8b1-894c-409a-b240-bd8beae78896").await;
    let acs = grants_for(&app, Audience::Acs);
    assert_eq!(acs.len(), 1, "{acs:?}");
    assert_eq!(
        (acs[0].by, acs[0].client_id.as_str()),
        ("appService", "system")
    );
    assert_eq!(grants_for(&app, Audience::Graph)[0].by, "appService");
    // The endpoint was asked as the SDK asks it: path, api-version, resource, the header.
    let sdk = sdk_identity_request("appServiceAcs");
    let asked = app.emulator.identity().requests();
    assert!(
        asked
            .iter()
            .any(|request| path_and_pairs(&request.path_and_query)
                == path_and_pairs(sdk["path"].as_str().unwrap())
                && request.headers["x-identity-header"] == "<redacted>"),
        "{asked:?}"
    );
    assert!(
        asked.iter().any(|request| request.path_and_query
            == "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fgraph.microsoft.com"),
        "{asked:?}"
    );
    // A token ACS no longer accepts is dropped and replaced once.
    app.emulator.identity().expire_tokens();
    removal_succeeds(&app, "call-mi-after-expiry").await;
    assert_eq!(grants_for(&app, Audience::Acs).len(), 2);
    let requests = app.emulator_requests("call-mi-after-expiry", 2).await;
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [401, 202]
    );
}

#[tokio::test]
async fn managed_identity_by_imds_with_a_user_assigned_identity() {
    let app = TestApp::spawn_with(|config| {
        without_secrets(config, "managed_identity", "MANAGED-IDENTITY");
        config.identity.imds_endpoint = emulator_base(config).parse().unwrap();
        config.acs.client_id = config.emulator.managed_identity_client_id.clone();
    })
    .await;
    removal_succeeds(&app, "call-imds").await;
    cancel_succeeds(&app, "call-imds-graph").await;
    let acs = grants_for(&app, Audience::Acs);
    assert_eq!(acs[0].by, "imds");
    assert_eq!(
        acs[0].client_id,
        Config::embedded().emulator.managed_identity_client_id
    );
    assert_eq!(grants_for(&app, Audience::Graph)[0].client_id, "system");
    // As the SDK asks IMDS, with the user-assigned identity's client id besides.
    let sdk = sdk_identity_request("imdsAcs");
    let asked = app.emulator.identity().requests();
    let acs = asked
        .iter()
        .find(|request| request.path_and_query.contains("communication"))
        .unwrap();
    assert_eq!(
        acs.headers["metadata"],
        sdk["headers"]["Metadata"].as_str().unwrap()
    );
    let (path, mut pairs) = path_and_pairs(&acs.path_and_query);
    assert!(pairs.remove(&(
        "client_id".to_owned(),
        Config::embedded().emulator.managed_identity_client_id
    )));
    assert_eq!((path, pairs), path_and_pairs(sdk["path"].as_str().unwrap()));
}

#[tokio::test]
async fn workload_identity_reads_its_token_file_for_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("azure-identity-token");
    let mut tenant = String::new();
    let app = TestApp::spawn_with(|config| {
        without_secrets(config, "workload-identity", "workload-identity");
        // As the AKS webhook sets them: AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID,
        // AZURE_TENANT_ID, AZURE_AUTHORITY_HOST.
        config.identity.federated_token_file = token_file.display().to_string();
        config.identity.client_id = config.emulator.graph_client_id.clone();
        config.identity.tenant_id = config.emulator.graph_tenant_id.clone();
        config.identity.authority_host = emulator_base(config);
        tenant = config.emulator.graph_tenant_id.clone();
    })
    .await;
    let identity = app.emulator.identity();
    let first = identity.issue_federated_token(None);
    std::fs::write(&token_file, format!("{}\n", first.token)).unwrap();
    removal_succeeds(&app, "call-wi-1").await;
    cancel_succeeds(&app, "call-wi-graph-1").await;
    // The platform rotates the file; the old token stops working.
    let second = identity.issue_federated_token(None);
    std::fs::write(&token_file, &second.token).unwrap();
    identity.revoke_federated_token(&first.token);
    identity.expire_tokens();
    removal_succeeds(&app, "call-wi-2").await;
    cancel_succeeds(&app, "call-wi-graph-2").await;
    let used: Vec<(Audience, Option<String>)> = identity
        .grants()
        .into_iter()
        .map(|grant| {
            assert_eq!(grant.by, "federated");
            (grant.audience, grant.federated_token)
        })
        .collect();
    assert!(
        used.contains(&(Audience::Acs, Some(first.id.clone()))),
        "{used:?}"
    );
    assert!(
        used.contains(&(Audience::Acs, Some(second.id.clone()))),
        "{used:?}"
    );
    assert!(
        used.contains(&(Audience::Graph, Some(second.id.clone()))),
        "{used:?}"
    );
    // The token requests carried the grant the SDKs send.
    let token_request = app
        .emulator
        .graph()
        .requests()
        .into_iter()
        .find(|request| request.path_and_query == format!("/{tenant}/oauth2/v2.0/token"))
        .unwrap();
    assert_eq!(
        token_request.body["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert_eq!(token_request.body["client_assertion"], "<redacted>");
    assert_eq!(token_request.body["grant_type"], "client_credentials");
    assert!(token_request.body.get("client_secret").is_none());
}

#[tokio::test]
async fn a_client_certificate_authenticates_graph_and_acs() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("callops.pem");
    std::fs::write(&pem, DEV_CLIENT_CERTIFICATE).unwrap();
    let app = TestApp::spawn_with(|config| {
        let emulator = emulator_base(config);
        without_secrets(config, "certificate", "certificate");
        config.graph.tenant_id = config.emulator.graph_tenant_id.clone();
        config.graph.client_id = config.emulator.graph_client_id.clone();
        config.graph.certificate_path = pem.display().to_string();
        config.acs.authority = emulator.parse().unwrap();
        config.acs.tenant_id = config.emulator.graph_tenant_id.clone();
        config.acs.client_id = config.emulator.graph_client_id.clone();
        config.acs.certificate_path = pem.display().to_string();
    })
    .await;
    cancel_succeeds(&app, "call-cert-graph").await;
    removal_succeeds(&app, "call-cert").await;
    for audience in [Audience::Graph, Audience::Acs] {
        assert_eq!(grants_for(&app, audience)[0].by, "certificate");
    }
}

#[tokio::test]
async fn the_bearer_request_is_the_sdks() {
    let app = TestApp::spawn_with(|config| {
        without_secrets(config, "managed-identity", "managed-identity");
        config.identity.imds_endpoint = emulator_base(config).parse().unwrap();
        config.acs.api_version = "2026-03-12".to_owned();
    })
    .await;
    let call = "18dea47f-b081-4107-9a5c-4300819d2c6c";
    let started = app.remove(call, Script::default(), Some("ctx-1")).await;
    app.wait_operation(started["id"].as_str().unwrap(), 5).await;
    let sent = &app.emulator_requests(call, 1).await[0];
    let fixture: Value = serde_json::from_slice(&fixture(
        "sdk-requests/acs_remove_participant_bearer.python-sdk-1.6.0.json",
    ))
    .unwrap();
    assert_eq!(fixture["scopes"][0][0], callops::identity::ACS_SCOPE);
    let want = &fixture["requests"]["communicationUser"];
    assert_eq!(sent.path_and_query, want["path"].as_str().unwrap());
    // The body, but for the callback URI (ours, not the capture's).
    let mut body = sent.body.clone();
    body["operationCallbackUri"] = want["body"]["operationCallbackUri"].clone();
    assert_eq!(body, want["body"]);
    // The same headers, but for those that change with every request or client.
    let volatile = [
        "host",
        "user-agent",
        "accept-encoding",
        "connection",
        "content-length",
    ];
    let names = |names: Vec<String>| -> BTreeSet<String> {
        names
            .into_iter()
            .map(|name| name.to_ascii_lowercase())
            .filter(|name| !volatile.contains(&name.as_str()))
            .collect()
    };
    let want_headers = want["headers"].as_object().unwrap();
    assert_eq!(
        names(sent.headers.keys().cloned().collect()),
        names(want_headers.keys().cloned().collect())
    );
    for name in ["Accept", "Content-Type"] {
        assert_eq!(
            sent.headers[&name.to_ascii_lowercase()],
            want_headers[name].as_str().unwrap()
        );
    }
    let token = sent.headers["authorization"]
        .strip_prefix("Bearer ")
        .unwrap();
    assert!(
        app.emulator
            .identity()
            .issued_tokens()
            .contains(&token.to_owned())
    );
    for hmac in [
        "x-ms-date",
        "x-ms-content-sha256",
        "x-ms-return-client-request-id",
    ] {
        assert!(!sent.headers.contains_key(hmac), "{hmac} sent");
    }
}

#[tokio::test]
async fn no_token_or_identity_secret_reaches_the_logs() {
    let (captured, _guard) = capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("callops.pem");
    std::fs::write(&pem, DEV_CLIENT_CERTIFICATE).unwrap();
    let token_file = dir.path().join("token");
    let identity_header = "identity-header-4f1d2c9e8b7a";
    let app = TestApp::spawn_with(|config| {
        without_secrets(config, "managed-identity", "certificate");
        config.emulator.identity_header = identity_header.to_owned();
        config.identity.endpoint = format!("{}/msi/token", emulator_base(config));
        config.identity.header = identity_header.to_owned().into();
        config.graph.tenant_id = config.emulator.graph_tenant_id.clone();
        config.graph.client_id = config.emulator.graph_client_id.clone();
        config.graph.certificate_path = pem.display().to_string();
        config.identity.federated_token_file = token_file.display().to_string();
    })
    .await;
    removal_succeeds(&app, "call-logs").await;
    cancel_succeeds(&app, "call-logs-graph").await;
    // Every token issued: those refused later (a renewal) too.
    let mut secrets = app.emulator.identity().issued_tokens();
    assert_eq!(secrets.len(), 2);
    app.emulator.identity().expire_tokens();
    removal_succeeds(&app, "call-logs-2").await;
    secrets.extend(app.emulator.identity().issued_tokens());
    secrets.push(identity_header.to_owned());
    let logs = captured.text();
    assert!(
        logs.contains("ACS access token acquired"),
        "the capture works"
    );
    assert!(
        logs.contains("Graph access token acquired"),
        "the capture works"
    );
    let key_line = DEV_CLIENT_CERTIFICATE.lines().nth(1).unwrap().to_owned();
    secrets.push(key_line);
    for secret in secrets {
        assert!(!logs.contains(&secret), "a secret was logged");
    }
    assert!(
        !logs.contains("Bearer "),
        "an Authorization header was logged"
    );
}

#[tokio::test]
async fn a_certificate_that_cannot_be_read_stops_the_start() {
    let mut config = Config::embedded();
    config.store.location = "memory".to_owned();
    config.graph.credential = "certificate".to_owned();
    config.graph.tenant_id = "t".to_owned();
    config.graph.client_id = "c".to_owned();
    config.graph.certificate_path = "/nonexistent/callops.pem".to_owned();
    config.emulator.listen = "127.0.0.1:0".parse().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = within(callops::run(
        listener,
        config,
        tokio_util::sync::CancellationToken::new(),
    ))
    .await
    .unwrap_err();
    let shown = format!("{error:#}");
    assert!(
        shown.contains("CALLOPS_GRAPH_CLIENT_CERTIFICATE_PATH"),
        "{shown}"
    );
    assert!(shown.contains("/nonexistent/callops.pem"), "{shown}");
}
