//! Nothing acknowledged is lost: the `callops` binary on a SQLite store, killed with SIGKILL
//! at the worst moments, restarted on the same file.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;

use std::time::Duration;

use callops::config::Config;
use callops::emulator::{Emulator, RecordedRequest, Script};
use serde_json::{Value, json};

use crate::binary::{Process, callops, free_port, until_up};
use crate::support::{SOON, remove_event, serve_emulator, silent, within};

/// An emulator in this process and a `callops` child process on a SQLite file.
struct Deployment {
    emulator: Emulator,
    emulator_url: String,
    port: u16,
    db: PathBuf,
    http: reqwest::Client,
    _stop_emulator: tokio_util::sync::DropGuard,
}

impl Deployment {
    async fn new(name: &str) -> Self {
        let config = Config::embedded();
        let (emulator, emulator_url, stop_emulator) = serve_emulator(&config).await;
        let dir = std::env::temp_dir().join(format!(
            "callops-durability-{name}-{}",
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            emulator,
            emulator_url,
            port: free_port(),
            db: dir.join("callops.db"),
            http: reqwest::Client::new(),
            _stop_emulator: stop_emulator,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts callops on the store file and waits until it answers.
    async fn start(&self) -> Process {
        self.start_with(&[]).await
    }

    /// As [`Deployment::start`], with more environment variables.
    async fn start_with(&self, more: &[(&str, String)]) -> Process {
        let mut env = self.env(self.port);
        env.extend_from_slice(more);
        let process = callops(&[], &env);
        until_up(&self.http, &format!("{}/healthz", self.base())).await;
        process
    }

    /// The environment of a callops on the store file, listening on `port`.
    fn env(&self, port: u16) -> Vec<(&'static str, String)> {
        let config = Config::embedded();
        let emulator = &self.emulator_url;
        vec![
            ("CALLOPS_LISTEN", format!("127.0.0.1:{port}")),
            ("CALLOPS_PUBLIC_URL", format!("http://127.0.0.1:{port}")),
            ("CALLOPS_STORE", format!("sqlite://{}", self.db.display())),
            (
                "CALLOPS_ACS_CONNECTION_STRING",
                format!(
                    "endpoint={emulator}/;accesskey={}",
                    config.emulator.access_key
                ),
            ),
            (
                "CALLOPS_ACS_CALLBACK_OPENID_URL",
                format!(
                    "{emulator}{}",
                    callops::emulator::callback_signing::ACS_OPENID_PATH
                ),
            ),
            (
                "CALLOPS_ACS_CALLBACK_AUDIENCE",
                config.emulator.acs_resource_id.clone(),
            ),
            ("CALLOPS_EMULATOR__LISTEN", "127.0.0.1:0".to_owned()),
        ]
    }

    async fn remove(&self, call: &str, context: &str) -> String {
        self.remove_scripted(call, context, silent()).await
    }

    /// Starts a removal on `call` that the emulator answers as `script` says; returns its id.
    async fn remove_scripted(&self, call: &str, context: &str, script: Script) -> String {
        self.emulator.set_script(call, script);
        let response = self
            .http
            .post(format!(
                "{}/v1/acs/callConnections/{call}/participants:remove",
                self.base()
            ))
            .json(&json!({"participantToRemove": {"rawId": "8:acs:bob"}, "operationContext": context}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let operation: Value = response.json().await.unwrap();
        assert_not_pending(&operation);
        operation["id"].as_str().unwrap().to_owned()
    }

    /// `GET /v1/operations/{id}`, answered 200 (and never showing the request still owed).
    async fn operation(&self, id: &str) -> Value {
        let response = self
            .http
            .get(format!("{}/v1/operations/{id}", self.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "operation {id}");
        let operation = response.json().await.unwrap();
        assert_not_pending(&operation);
        operation
    }

    /// The removal requests the emulator has received for `call`, in arrival order.
    fn requests(&self, call: &str) -> Vec<RecordedRequest> {
        let path = format!("/calling/callConnections/{call}/participants:remove");
        self.emulator
            .requests()
            .into_iter()
            .filter(|request| request.path_and_query.starts_with(&path))
            .collect()
    }

    /// Waits (bounded) until the emulator has received `count` removal requests for `call`.
    async fn until_requests(&self, call: &str, count: usize) -> Vec<RecordedRequest> {
        soon(
            &format!("the emulator receiving {count} removal request(s) for {call}"),
            async {
                loop {
                    let requests = self.requests(call);
                    if requests.len() >= count {
                        return requests;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await
    }

    /// Delivers a signed callback; returns the delivery summary.
    async fn callback(&self, event: &Value) -> Value {
        let response = self
            .http
            .post(format!("{}/callbacks/acs", self.base()))
            .bearer_auth(self.emulator.signer().acs_token())
            .json(event)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Polls `GET path` until it answers `status` (bounded).
    /// `/readyz` once it answers 200, its store check `ok`.
    async fn ready(&self) -> Value {
        let ready: Value = self
            .until_answered("/readyz", 200)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(ready["checks"]["store"], "ok", "{ready}");
        ready
    }

    async fn until_answered(&self, path: &str, status: u16) -> reqwest::Response {
        within(async {
            loop {
                let response = self
                    .http
                    .get(format!("{}{path}", self.base()))
                    .send()
                    .await
                    .unwrap();
                if response.status() == status {
                    return response;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
    }

    async fn until_status(&self, id: &str, status: &str) -> Value {
        let last = std::sync::Mutex::new(Value::Null);
        let found = tokio::time::timeout(SOON, async {
            loop {
                let operation = self.operation(id).await;
                if operation["status"] == status {
                    return operation;
                }
                *last.lock().unwrap() = operation;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "operation {id} did not become {status} within {SOON:?}; last seen {}",
                last.lock().unwrap()
            )
        })
    }
}

/// The API never shows the request an operation still owes the upstream.
fn assert_not_pending(operation: &Value) {
    assert!(
        operation.get("pending").is_none(),
        "the API showed the request still owed (`pending`): {operation}"
    );
}

/// As [`within`], naming what did not happen in time.
async fn soon<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(SOON, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {SOON:?} waiting for {what}"))
}

/// A request's `Repeatability-Request-ID` and `Repeatability-First-Sent`.
fn repeatability(request: &RecordedRequest) -> (String, String) {
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("a removal request without {name}: {request:?}"))
            .clone()
    };
    (
        header("repeatability-request-id"),
        header("repeatability-first-sent"),
    )
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(dir) = self.db.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// SIGKILL, then wait until the process is gone.
fn kill(mut process: Process) {
    process.0.kill().unwrap();
    process.0.wait().unwrap();
}

#[tokio::test]
async fn an_operation_sent_upstream_survives_sigkill_and_its_callback_settles_it_after_restart() {
    let deployment = Deployment::new("sent").await;
    let server = deployment.start().await;
    // Ready: the store commits and the callback keys are loaded.
    let ready = deployment.ready().await;
    assert_eq!(ready["checks"]["callbackKeys"]["acs"], "ok", "{ready}");
    let id = deployment.remove("call-kill-1", "ctx-kill-1").await;
    // ACS accepted it: it is Running, and its callback has not come yet.
    deployment.until_status(&id, "Running").await;
    kill(server);

    let _server = deployment.start().await;
    let operation = deployment.operation(&id).await;
    assert_eq!(operation["status"], "Running", "{operation}");
    let event = remove_event("evt-after-restart", "call-kill-1", "ctx-kill-1", true);
    let summary = deployment.callback(&event).await;
    assert_eq!(summary["matched"], 1, "{summary}");
    let operation = deployment.operation(&id).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
}

#[tokio::test]
async fn an_acknowledged_callback_survives_sigkill_and_stays_a_duplicate() {
    let deployment = Deployment::new("acked").await;
    let server = deployment.start().await;
    let id = deployment.remove("call-kill-2", "ctx-kill-2").await;
    deployment.until_status(&id, "Running").await;
    let event = remove_event("evt-acked", "call-kill-2", "ctx-kill-2", false);
    deployment.callback(&event).await;
    // Killed right after the 200: the callback was durable before it.
    kill(server);

    let _server = deployment.start().await;
    let operation = deployment.operation(&id).await;
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_eq!(operation["events"].as_array().unwrap().len(), 1);
    let summary = deployment.callback(&event).await;
    assert_eq!(summary["duplicates"], 1, "{summary}");
}

#[tokio::test]
async fn a_parked_callback_survives_sigkill_and_settles_its_operation_when_it_appears() {
    let deployment = Deployment::new("parked").await;
    let server = deployment.start().await;
    // The callback comes before the operation exists (it may overtake our own record).
    let event = remove_event("evt-early", "call-kill-3", "ctx-kill-3", true);
    let summary = deployment.callback(&event).await;
    assert_eq!(summary["parked"], 1, "{summary}");
    kill(server);

    let _server = deployment.start().await;
    let id = deployment.remove("call-kill-3", "ctx-kill-3").await;
    let operation = deployment.until_status(&id, "Succeeded").await;
    assert_eq!(operation["events"][0]["id"], "evt-early", "{operation}");
}

/// SIGTERM, as a container platform sends it.
fn terminate(process: &Process) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &process.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (bounded) for the process to exit; returns whether it exited cleanly.
async fn exited(mut process: Process) -> bool {
    within(async {
        loop {
            if let Some(status) = process.0.try_wait().unwrap() {
                return status.success();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn on_sigterm_a_request_in_flight_completes_and_the_store_is_closed_cleanly() {
    let deployment = Deployment::new("sigterm").await;
    let server = deployment.start().await;
    let id = deployment.remove("call-term", "ctx-term").await;
    deployment.until_status(&id, "Running").await;
    // A long poll is in flight when SIGTERM arrives.
    let poll = deployment
        .http
        .get(format!("{}/v1/operations/{id}?wait=30", deployment.base()));
    let in_flight = tokio::spawn(async move { poll.send().await });
    within(async {
        loop {
            let health: Value = deployment
                .http
                .get(format!("{}/healthz", deployment.base()))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if health["longPolls"] == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    terminate(&server);
    let answered = within(in_flight).await.unwrap().unwrap();
    assert_eq!(answered.status(), 200);
    assert!(
        exited(server).await,
        "callops did not exit cleanly on SIGTERM"
    );

    let _server = deployment.start().await;
    let operation = deployment.operation(&id).await;
    assert_eq!(operation["status"], "Running", "{operation}");
}

#[tokio::test]
async fn retired_operations_leave_the_disk_too() {
    let deployment = Deployment::new("retention").await;
    let env = [("CALLOPS_OPERATIONS__RETENTION_SECS", "1".to_owned())];
    let server = deployment.start_with(&env).await;
    let id = deployment.remove("call-old", "ctx-old").await;
    deployment.until_status(&id, "Running").await;
    deployment
        .callback(&remove_event("evt-old", "call-old", "ctx-old", true))
        .await;
    // Retired from memory by a sweep, a second after it settled.
    deployment
        .until_answered(&format!("/v1/operations/{id}"), 404)
        .await;
    terminate(&server);
    assert!(exited(server).await);
    // Not loaded again after a restart (with the default retention, which would keep it).
    let _server = deployment.start().await;
    let response = deployment
        .http
        .get(format!("{}/v1/operations/{id}", deployment.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn a_second_process_on_the_same_file_is_refused_and_a_sigkilled_holder_leaves_no_lock() {
    let deployment = Deployment::new("lock").await;
    let first = deployment.start().await;
    let holder = first.0.id();
    let id = deployment.remove("call-lock", "ctx-lock").await;
    deployment.until_status(&id, "Running").await;

    // Another port, the same file: it must stop at once, naming the file and the holder.
    let second = within(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_callops"))
            .envs(deployment.env(free_port()))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{}: {stderr}", second.status);
    assert!(
        stderr.contains(&format!(
            "the store file {} is in use by another callops process (pid {holder})",
            deployment.db.display()
        )),
        "{stderr}"
    );
    // The holder still serves, and its store still commits.
    deployment.ready().await;
    deployment.until_status(&id, "Running").await;

    // The OS released the lock with the killed process: a restart on the file works.
    kill(first);
    let _restarted = deployment.start().await;
    deployment.ready().await;
    let operation = deployment.operation(&id).await;
    assert_eq!(operation["status"], "Running", "{operation}");
}

/// A removal that ACS answers 503 (with `Retry-After: 1`) three times, then accepts.
fn unavailable_three_times() -> Script {
    Script {
        fail_first: vec![503, 503, 503],
        retry_after_secs: Some(1.0),
        ..Script::default()
    }
}

#[tokio::test]
async fn a_removal_killed_while_retrying_is_sent_again_after_restart_as_the_same_request() {
    let deployment = Deployment::new("resend").await;
    let server = deployment.start().await;
    deployment.until_answered("/readyz", 200).await;
    let call = "call-resend";
    let id = deployment
        .remove_scripted(call, "ctx-resend", unavailable_three_times())
        .await;
    // ACS answered the first attempt 503: callops waits a second before the next.
    let first = deployment.until_requests(call, 1).await.remove(0);
    assert_eq!(first.status, 503, "the first attempt was not answered 503");
    let operation = deployment.operation(&id).await;
    assert_eq!(
        operation["status"], "NotStarted",
        "the removal was not still unanswered when callops was killed: {operation}"
    );
    kill(server);
    let before_restart = deployment.requests(call);
    assert!(
        before_restart.iter().all(|request| request.status == 503),
        "ACS accepted the removal before callops was killed: not mid-retry"
    );

    let _server = deployment.start().await;
    let operation = deployment.until_status(&id, "Succeeded").await;
    let requests = deployment.requests(call);
    assert!(
        requests.len() > before_restart.len(),
        "the restarted callops did not send the removal again ({} request(s) in all)",
        requests.len()
    );
    assert_eq!(
        requests
            .iter()
            .filter(|request| request.status == 202)
            .count(),
        1,
        "ACS did not accept the removal exactly once: {requests:?}"
    );
    for (n, request) in requests.iter().enumerate() {
        assert_eq!(
            repeatability(request),
            repeatability(&first),
            "attempt {n} was not sent with the first attempt's repeatability pair"
        );
        assert_eq!(
            request.body, first.body,
            "attempt {n} was not the same request as the first"
        );
    }
    assert_eq!(
        operation["events"][0]["type"], "Microsoft.Communication.RemoveParticipantSucceeded",
        "the operation was not settled by the emulator's callback: {operation}"
    );
}

#[tokio::test]
async fn removals_each_killed_right_after_their_202_are_all_sent_and_settle_after_restart() {
    const N: usize = 10;
    let deployment = Deployment::new("batch").await;
    let call = |i: usize| format!("call-batch-{i}");
    // While callops is killed and restarted, ACS answers every attempt 503: nothing is
    // answered before the last restart.
    let unavailable = Script {
        fail_first: vec![503; 64],
        retry_after_secs: Some(2.0),
        ..Script::default()
    };
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        let server = deployment.start().await;
        ids.push(
            deployment
                .remove_scripted(&call(i), &format!("ctx-batch-{i}"), unavailable.clone())
                .await,
        );
        kill(server);
    }
    let answered: Vec<RecordedRequest> = deployment
        .emulator
        .requests()
        .into_iter()
        .filter(|request| request.status != 503)
        .collect();
    assert!(
        answered.is_empty(),
        "ACS answered removals before the last restart: {answered:?}"
    );
    // ACS is back: the next attempt of each is accepted and called back.
    let sent_before: Vec<Vec<RecordedRequest>> =
        (0..N).map(|i| deployment.requests(&call(i))).collect();
    for i in 0..N {
        deployment.emulator.set_script(&call(i), Script::default());
    }

    let _server = deployment.start().await;
    for (i, id) in ids.iter().enumerate() {
        let operation = deployment.until_status(id, "Succeeded").await;
        let requests = deployment.requests(&call(i));
        // ACS acts on it once: any further 202 is a repeat it recognised by the pair.
        let accepted: Vec<&RecordedRequest> = requests
            .iter()
            .filter(|request| request.status == 202 && !request.repeat)
            .collect();
        assert_eq!(
            accepted.len(),
            1,
            "removal #{i} was not accepted by ACS exactly once after the restart: {requests:?}"
        );
        let pairs: BTreeSet<(String, String)> = requests.iter().map(repeatability).collect();
        assert_eq!(
            pairs.len(),
            1,
            "removal #{i} was not sent with one repeatability pair throughout: {pairs:?}"
        );
        assert!(
            requests.len() > sent_before[i].len(),
            "removal #{i} was not sent again after the restart"
        );
        assert_eq!(
            operation["events"][0]["type"], "Microsoft.Communication.RemoveParticipantSucceeded",
            "removal #{i} was not settled by the emulator's callback: {operation}"
        );
    }
    // The list never shows the request owed, and nothing is left unstarted.
    let page: Value = deployment
        .http
        .get(format!(
            "{}/v1/operations?maxpagesize=100",
            deployment.base()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = page["value"].as_array().expect("a page of operations");
    assert_eq!(
        listed.len(),
        N,
        "the list did not show every removal: {page}"
    );
    for operation in listed {
        assert_not_pending(operation);
        assert_ne!(
            operation["status"], "NotStarted",
            "an operation was left NotStarted: {operation}"
        );
    }
}

#[tokio::test]
async fn a_parked_callback_that_expired_while_callops_was_down_is_kept_on_its_call() {
    let deployment = Deployment::new("park-expired").await;
    let env = [
        ("CALLOPS_OPERATIONS__PARK_TTL_MS", "300".to_owned()),
        // No sweep while it runs: the park expires while callops is down.
        ("CALLOPS_OPERATIONS__SWEEP_INTERVAL_MS", "600000".to_owned()),
    ];
    let server = deployment.start_with(&env).await;
    let event = remove_event("evt-orphan", "call-orphan", "ctx-orphan", true);
    let summary = deployment.callback(&event).await;
    assert_eq!(summary["parked"], 1, "{summary}");
    kill(server);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;

    let call_events = async || -> Value {
        let response = deployment
            .http
            .get(format!(
                "{}/v1/acs/callConnections/call-orphan/events",
                deployment.base()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["value"].clone()
    };
    let expired_total = async || -> String {
        let metrics = deployment
            .http
            .get(format!("{}/metrics", deployment.base()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("callops_parked_callbacks_expired_total "))
            .unwrap_or_else(|| panic!("no expired count in\n{metrics}"))
            .to_owned()
    };
    let server = deployment.start_with(&env).await;
    let events = call_events().await;
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    assert_eq!(events[0]["id"], "evt-orphan", "{events}");
    assert_eq!(events[0]["effect"], "unmatched", "{events}");
    assert_eq!(expired_total().await, "1");
    kill(server);

    // Recorded as a call event, no longer parked: the next start finds it there, and
    // expires nothing again.
    let _server = deployment.start_with(&env).await;
    let events = call_events().await;
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    assert_eq!(events[0]["id"], "evt-orphan", "{events}");
    assert_eq!(expired_total().await, "0");
}

/// A subscription's deliveries survive a SIGKILL while attempts are in flight: after the
/// restart every settled removal reaches the receiver, signed, each under the one
/// webhook-id it was first sent with.
#[tokio::test]
async fn webhook_deliveries_survive_sigkill_mid_delivery_under_the_same_webhook_id() {
    use crate::receiver::{Mode, Receiver};
    let receiver = Receiver::start(Mode::Hang).await;
    let deployment = Deployment::new("webhooks").await;
    let env = [
        ("CALLOPS_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true".to_owned()),
        ("CALLOPS_WEBHOOKS__REQUEST_TIMEOUT_MS", "5000".to_owned()),
        ("CALLOPS_WEBHOOKS__INITIAL_DELAY_MS", "50".to_owned()),
        ("CALLOPS_WEBHOOKS__MAX_DELAY_MS", "200".to_owned()),
    ];
    let server = deployment.start_with(&env).await;
    let response = deployment
        .http
        .post(format!("{}/v1/subscriptions", deployment.base()))
        .json(&json!({"url": receiver.url(), "eventTypes": ["operation.settled"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let subscription: Value = response.json().await.unwrap();
    receiver.trust(subscription["secret"].as_str().unwrap());
    let mut expected = BTreeSet::new();
    for n in 0..5 {
        let (call, context) = (format!("call-wh-{n}"), format!("ctx-wh-{n}"));
        let id = deployment.remove(&call, &context).await;
        deployment.until_status(&id, "Running").await;
        let event = remove_event(&format!("evt-wh-{n}"), &call, &context, true);
        deployment.callback(&event).await;
        expected.insert(id);
    }
    // Attempts are in flight (the receiver holds them) when callops is killed.
    soon("attempts reaching the receiver", async {
        while receiver.received().len() < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let before: BTreeSet<String> = receiver.received().into_iter().map(|r| r.id).collect();
    kill(server);
    receiver.set_mode(Mode::Accept);
    let _server = deployment.start_with(&env).await;
    soon("every settled removal delivered after the restart", async {
        loop {
            let delivered: BTreeSet<String> = receiver
                .deduplicated()
                .values()
                .map(|r| r.body["data"]["id"].as_str().unwrap().to_owned())
                .collect();
            if delivered == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut ids_per_operation: std::collections::BTreeMap<String, BTreeSet<String>> =
        std::collections::BTreeMap::new();
    for received in receiver.received() {
        assert_eq!(received.verified, Some(true), "{received:?}");
        ids_per_operation
            .entry(received.body["data"]["id"].as_str().unwrap().to_owned())
            .or_default()
            .insert(received.id);
    }
    assert!(
        ids_per_operation.values().all(|ids| ids.len() == 1),
        "{ids_per_operation:?}"
    );
    let after: BTreeSet<String> = receiver.deduplicated().keys().cloned().collect();
    assert!(
        before.is_subset(&after),
        "a message was sent again under another id"
    );
}
