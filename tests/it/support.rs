//! `TestApp`: the real server on 127.0.0.1:0 with the emulator (also on port 0) as its ACS
//! and Graph upstream, configured as real upstreams would be, plus helpers to talk to both.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use callops::config::Config;
use callops::emulator::callback_signing;
use callops::emulator::graph::GraphScript;
use callops::emulator::{Emulator, Script};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An emulator of its own on 127.0.0.1:0, for tests that run `callops` as a child process:
/// the emulator, its URL, and a guard that stops it when dropped.
pub async fn serve_emulator(config: &Config) -> (Emulator, String, tokio_util::sync::DropGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let emulator = Emulator::new(&config.emulator);
    let stop = CancellationToken::new();
    tokio::spawn(emulator.clone().serve(listener, stop.clone()));
    (emulator, url, stop.drop_guard())
}

/// Generous bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(10);

pub struct TestApp {
    pub address: SocketAddr,
    pub emulator: Emulator,
    emulator_address: String,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Starts the emulator and the server with test-friendly defaults.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// As [`TestApp::spawn`], with `adjust` applied to the configuration last (the
    /// emulator is built from the adjusted `emulator` section too).
    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        callops::telemetry::init_for_test();
        let mut config = Config::embedded();
        let shutdown = CancellationToken::new();

        let emulator_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let emulator_address = emulator_listener.local_addr().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        config.http.public_url = format!("http://{address}").parse().unwrap();
        config.acs.connection_string = format!(
            "endpoint=http://{emulator_address}/;accesskey={}",
            config.emulator.access_key
        )
        .into();
        config.acs.retry.initial_delay_ms = 10;
        config.acs.retry.max_delay_ms = 100;
        // Graph: the same emulator, as a real app registration would be configured.
        config.graph.base_url = format!("http://{emulator_address}/v1.0").parse().unwrap();
        config.graph.authority = format!("http://{emulator_address}").parse().unwrap();
        config.graph.tenant_id = config.emulator.graph_tenant_id.clone();
        config.graph.client_id = config.emulator.graph_client_id.clone();
        config.graph.client_secret = config.emulator.graph_client_secret.clone().into();
        config.graph.retry.initial_delay_ms = 10;
        config.graph.retry.max_delay_ms = 100;
        config.emulator.listen = "127.0.0.1:0".parse().unwrap();
        config.store.location = "memory".to_owned();
        // `CALLOPS_TEST_REDIS=redis://…` runs every in-process test on a shared store (each
        // app under its own key prefix), as `.ci/run` does a second time.
        if let Ok(url) = std::env::var("CALLOPS_TEST_REDIS") {
            config.store.location = url;
            config.store.redis_prefix = format!("test-{}", uuid::Uuid::new_v4());
            // `CALLOPS_TEST_REDIS_PARTITIONS=8`: the store's keys in that many partitions.
            if let Ok(partitions) = std::env::var("CALLOPS_TEST_REDIS_PARTITIONS") {
                config.store.redis_partitions = partitions.parse().unwrap();
            }
        }
        // Callback tokens: verified against the emulator's keys, as against ACS's and Graph's.
        config.callbacks.acs.openid_url = format!(
            "http://{emulator_address}{}",
            callback_signing::ACS_OPENID_PATH
        )
        .parse()
        .unwrap();
        config.callbacks.acs.audience = config.emulator.acs_resource_id.clone();
        config.callbacks.graph.openid_url = format!(
            "http://{emulator_address}{}",
            callback_signing::GRAPH_OPENID_PATH
        )
        .parse()
        .unwrap();
        adjust(&mut config);

        let emulator = Emulator::new(&config.emulator);
        emulator
            .graph()
            .set_callback_url(config.graph_callback_url().expose().clone());
        tokio::spawn(emulator.clone().serve(emulator_listener, shutdown.clone()));
        let server = tokio::spawn(callops::run(listener, config, shutdown.clone()));
        Self {
            address,
            emulator,
            emulator_address: format!("http://{emulator_address}"),
            http: reqwest::Client::new(),
            shutdown,
            server,
        }
    }

    /// The app with `http` sending `api-key: key` on every request (for a server started
    /// with `http.api_keys`), so every helper below works against a keyed API.
    pub fn authenticated(mut self, key: &str) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("api-key", key.parse().unwrap());
        self.http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap();
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Starts a removal on `call` with `script` and returns the 202's body.
    pub async fn remove(&self, call: &str, script: Script, context: Option<&str>) -> Value {
        self.emulator.set_script(call, script);
        let mut body = json!({ "participantToRemove": { "rawId": "8:acs:abc_def" } });
        if let Some(context) = context {
            body["operationContext"] = json!(context);
        }
        let response = self
            .post_json(
                &format!("/v1/acs/callConnections/{call}/participants:remove"),
                &body,
            )
            .await;
        accepted(response).await
    }

    /// POSTs JSON; a callback carries a genuine token, as from ACS or Graph.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.signed(self.http.post(self.url(path)), path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `request` with the emulator's bearer token when `path` is a callback route.
    pub fn signed(&self, request: reqwest::RequestBuilder, path: &str) -> reqwest::RequestBuilder {
        if path.starts_with("/callbacks/acs") {
            request.bearer_auth(self.emulator.signer().acs_token())
        } else if path.starts_with("/callbacks/graph") {
            request.bearer_auth(self.emulator.signer().graph_token())
        } else {
            request
        }
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.signed(self.http.post(self.url(path)), path)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// `GET path` answered 200, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// Delivers `events` to `/callbacks/acs`; returns the delivery summary.
    pub async fn callback(&self, events: &Value) -> Value {
        let response = self.post_json("/callbacks/acs", events).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// `GET /v1/operations/{id}?wait=N`, as JSON.
    pub async fn wait_operation(&self, id: &str, seconds: u64) -> Value {
        let response = within(self.get(&format!("/v1/operations/{id}?wait={seconds}"))).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Polls `GET /v1/operations/{id}` until `done` holds (bounded by [`SOON`]).
    pub async fn operation_until(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        within(async {
            loop {
                let operation: Value = self
                    .get(&format!("/v1/operations/{id}?wait=1"))
                    .await
                    .json()
                    .await
                    .unwrap();
                if done(&operation) {
                    return operation;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    /// Waits until the emulator has received `count` requests for `call`.
    pub async fn emulator_requests(
        &self,
        call: &str,
        count: usize,
    ) -> Vec<callops::emulator::RecordedRequest> {
        let path = format!("/calling/callConnections/{call}/participants:remove");
        within(async {
            loop {
                let requests: Vec<_> = self
                    .emulator
                    .requests()
                    .into_iter()
                    .filter(|r| r.path_and_query.starts_with(&path))
                    .collect();
                if requests.len() >= count {
                    return requests;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

/// Graph helpers.
impl TestApp {
    /// Queues a media operation (`playPrompt` or `recordResponse`) with `context` on the
    /// emulated Graph call, through the emulator's Graph API, as a bot would.
    pub async fn queue_media(&self, call: &str, action: &str, context: &str) -> Value {
        let emulator = self.emulator_url();
        let token = emulator_graph_token(&self.http, &emulator).await;
        let response = self
            .http
            .post(format!(
                "{emulator}/v1.0/communications/calls/{call}/{action}"
            ))
            .bearer_auth(token)
            .json(&json!({ "clientContext": context, "prompts": [] }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// The emulator's base URL (from the Graph configuration the server was given).
    pub fn emulator_url(&self) -> String {
        self.emulator_address.clone()
    }

    /// Starts a cancelMediaProcessing on `call` with `script`; returns the 202's body.
    pub async fn cancel(&self, call: &str, script: GraphScript, context: Option<&str>) -> Value {
        self.emulator.graph().set_script(call, script);
        let body = match context {
            Some(context) => json!({ "clientContext": context }),
            None => json!({}),
        };
        let response = self
            .post_json(
                &format!("/v1/graph/calls/{call}/cancelMediaProcessing"),
                &body,
            )
            .await;
        accepted(response).await
    }

    /// Delivers a body to `/callbacks/graph`; returns the status and summary.
    pub async fn notify(&self, content_type: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self.post_raw("/callbacks/graph", content_type, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The operations listed for `query` (e.g. `context=x`).
    pub async fn list(&self, query: &str) -> Vec<Value> {
        let page = self.get_json(&format!("/v1/operations?{query}")).await;
        page["value"].as_array().unwrap().clone()
    }
}

impl TestApp {
    /// Starts `GET /v1/operations/{id}?wait=50` and returns once the server is waiting on it.
    pub async fn start_long_poll(&self, id: &str) -> JoinHandle<reqwest::Response> {
        let before = self.long_polls().await;
        let url = self.url(&format!("/v1/operations/{id}?wait=50"));
        let http = self.http.clone();
        let waiter = tokio::spawn(async move { http.get(url).send().await.unwrap() });
        within(async {
            while self.long_polls().await <= before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        waiter
    }

    async fn long_polls(&self) -> u64 {
        let health: Value = self.get("/healthz").await.json().await.unwrap();
        health["longPolls"].as_u64().unwrap()
    }
}

/// A script whose removal is accepted but never called back: the test delivers callbacks.
pub fn silent() -> Script {
    Script {
        no_callback: true,
        ..Script::default()
    }
}

/// Checks a `202 Accepted` for a new operation (`Operation-Location` naming it, `Retry-After`
/// only while it has not settled) and returns its body.
pub async fn accepted(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let location = response.headers()["operation-location"]
        .to_str()
        .unwrap()
        .to_owned();
    let retry_after = response.headers().get("retry-after").cloned();
    let operation: Value = response.json().await.unwrap();
    let settled =
        ["Succeeded", "Failed", "Canceled"].contains(&operation["status"].as_str().unwrap());
    assert_eq!(
        retry_after.is_none(),
        settled,
        "Retry-After only while unsettled"
    );
    assert_eq!(
        location,
        format!("/v1/operations/{}", operation["id"].as_str().unwrap())
    );
    operation
}

/// Fails the test when `future` takes longer than [`SOON`].
pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(SOON, future).await.expect("timed out")
}

/// Answers a `participants:remove` 202 by long-polling its `Operation-Location` on `base`.
pub async fn follow(http: &reqwest::Client, base: &str, accepted: reqwest::Response) -> Value {
    assert_eq!(accepted.status(), 202);
    let location = accepted.headers()["operation-location"].to_str().unwrap();
    let url = format!("{base}{location}?wait=5");
    within(async { http.get(url).send().await.unwrap().json().await.unwrap() }).await
}

/// A fixture file's bytes.
pub fn fixture(path: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A RemoveParticipant CloudEvent delivery, as ACS sends it.
pub fn remove_event(id: &str, call: &str, context: &str, succeeded: bool) -> Value {
    let event_type = if succeeded {
        "Microsoft.Communication.RemoveParticipantSucceeded"
    } else {
        "Microsoft.Communication.RemoveParticipantFailed"
    };
    json!([{
        "id": id,
        "source": format!("calling/callConnections/{call}"),
        "subject": format!("calling/callConnections/{call}"),
        "type": event_type,
        "time": "2026-11-22T07:25:18.1234567+00:00",
        "specversion": "1.0",
        "datacontenttype": "application/json",
        "data": {
            "version": "2024-09-15",
            "operationContext": context,
            "callConnectionId": call,
            "serverCallId": "c2VydmVy",
            "correlationId": "b880bd5a-1916-470a-b43d-aabf3caff91c",
            "resultInformation": { "code": if succeeded { 200 } else { 400 }, "subCode": if succeeded { 0 } else { 8523 }, "message": "m" },
            "participant": { "rawId": "8:acs:abc_def", "communicationUser": { "id": "8:acs:abc_def" } },
            "publicEventType": event_type
        }
    }])
}

/// Everything logged, at TRACE from every crate, on the current thread (the runtime's only
/// one in a `#[tokio::test]`) while the guard lives.
pub fn capture_logs() -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
    let captured = CapturedLogs::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// A `MakeWriter` that keeps everything written.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Graph access token from the emulator at `emulator`, for its default app.
pub async fn emulator_graph_token(http: &reqwest::Client, emulator: &str) -> String {
    let config = Config::embedded().emulator;
    let token: Value = http
        .post(format!(
            "{emulator}/{}/oauth2/v2.0/token",
            config.graph_tenant_id
        ))
        .form(&[
            ("client_id", config.graph_client_id.as_str()),
            ("client_secret", config.graph_client_secret.as_str()),
            ("scope", "https://graph.microsoft.com/.default"),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    token["access_token"].as_str().unwrap().to_owned()
}
