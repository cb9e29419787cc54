//! The client subcommands (`callops get`, `list`, `watch`, …) run as the real binary against
//! the real server: their output, `--json`, exit codes, and the API key kept secret.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use assert_cmd::assert::Assert;
use callops::emulator::graph::GraphScript;
use callops::emulator::{Outcome, ResultInformation, Script};
use predicates::prelude::*;
use serde_json::Value;

use crate::binary::{Process, free_port};
use crate::support::{SOON, TestApp, silent};

/// `callops args…` with `env`, on a blocking thread so the in-process server keeps running;
/// the inherited client settings are removed so only the test's count.
async fn callops(args: &[&str], env: &[(&str, &str)]) -> Assert {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut command = assert_cmd::Command::new(env!("CARGO_BIN_EXE_callops"));
        command
            .args(&args)
            .env_remove("CALLOPS_URL")
            .env_remove("CALLOPS_API_KEY")
            .envs(env)
            .timeout(SOON * 2);
        command.assert()
    })
    .await
    .unwrap()
}

/// The service's URL for `--url`.
fn base(app: &TestApp) -> String {
    format!("http://{}", app.address)
}

fn stdout_json(assert: &Assert) -> Value {
    let output = assert.get_output();
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "{error}: {}",
            String::from_utf8_lossy(&output.stdout).into_owned()
        )
    })
}

#[tokio::test]
async fn remove_participant_with_wait_prints_the_succeeded_operation_and_exits_0() {
    let app = TestApp::spawn().await;
    app.emulator.set_script("call-cli-ok", Script::default());
    let url = base(&app);
    let assert = callops(
        &[
            "remove-participant",
            "--call",
            "call-cli-ok",
            "--participant",
            "8:acs:abc_def",
            "--context",
            "ctx-ok",
            "--wait",
            "10",
            "--json",
            "--url",
            &url,
        ],
        &[],
    )
    .await
    .code(0);
    let operation = stdout_json(&assert);
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    assert_eq!(operation["context"], "ctx-ok");
    assert_eq!(operation["callConnectionId"], "call-cli-ok");
    let id = operation["id"].as_str().unwrap();
    let stored = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(stored["status"], "Succeeded");
    // The participant sent upstream is the one given.
    let requests = app.emulator_requests("call-cli-ok", 1).await;
    assert_eq!(
        requests[0].body["participantToRemove"]["rawId"],
        "8:acs:abc_def"
    );

    // `get` of it, as a person reads it (CALLOPS_URL instead of --url).
    callops(&["get", id], &[("CALLOPS_URL", &url)])
        .await
        .code(0)
        .stdout(
            predicate::str::contains(id)
                .and(predicate::str::is_match("status +Succeeded").unwrap()),
        );
}

#[tokio::test]
async fn a_removal_the_platform_fails_exits_1_with_its_error() {
    let app = TestApp::spawn().await;
    app.emulator.set_script(
        "call-cli-fail",
        Script {
            outcome: Outcome::Fail,
            result_information: Some(ResultInformation {
                code: 400,
                sub_code: 8523,
                message: "Participant not in call.".into(),
            }),
            ..Script::default()
        },
    );
    let url = base(&app);
    callops(
        &[
            "remove-participant",
            "--call",
            "call-cli-fail",
            "--participant",
            "8:acs:abc_def",
            "--wait",
            "10",
            "--url",
            &url,
        ],
        &[],
    )
    .await
    .code(1)
    .stdout(
        predicate::str::is_match("status +Failed")
            .unwrap()
            .and(predicate::str::contains(
                "RemoveParticipantFailed: Participant not in call.",
            )),
    );
}

#[tokio::test]
async fn a_removal_still_running_when_the_wait_runs_out_exits_3_and_without_wait_0() {
    let app = TestApp::spawn().await;
    let url = base(&app);
    app.emulator.set_script(
        "call-cli-slow",
        Script {
            callback_delay_ms: 30_000,
            ..Script::default()
        },
    );
    let remove = |call: &'static str, wait: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut args = vec![
                "remove-participant",
                "--call",
                call,
                "--participant",
                "8:acs:abc_def",
                "--json",
                "--url",
                &url,
            ];
            if let Some(wait) = wait {
                args.extend(["--wait", wait]);
            }
            callops(&args, &[]).await
        }
    };
    let assert = remove("call-cli-slow", Some("1")).await.code(3);
    let operation = stdout_json(&assert);
    assert_eq!(operation["status"], "Running", "{operation}");

    // Accepted and not waited for: started, so a success.
    app.emulator.set_script("call-cli-nowait", silent());
    let assert = remove("call-cli-nowait", None).await.code(0);
    let operation = stdout_json(&assert);
    assert!(
        ["NotStarted", "Running"].contains(&operation["status"].as_str().unwrap()),
        "{operation}"
    );
}

#[tokio::test]
async fn cancel_media_with_wait_succeeds() {
    let app = TestApp::spawn().await;
    let call = "57dab8b1-894c-409a-b240-bd8beae78896";
    app.emulator
        .graph()
        .set_script(call, GraphScript::default());
    let url = base(&app);
    let assert = callops(
        &[
            "cancel-media",
            "--call",
            call,
            "--context",
            "stop-cli",
            "--wait",
            "10",
            "--json",
            "--url",
            &url,
        ],
        &[],
    )
    .await
    .code(0);
    let operation = stdout_json(&assert);
    assert_eq!(operation["kind"], "cancelMediaProcessing");
    assert_eq!(operation["callId"], call);
    assert_eq!(operation["context"], "stop-cli");
    assert_eq!(operation["status"], "Succeeded", "{operation}");
}

#[tokio::test]
async fn errors_exit_2_api_errors_with_their_code_connections_with_the_url() {
    let app = TestApp::spawn().await;
    let url = base(&app);
    callops(
        &["get", "0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d", "--url", &url],
        &[],
    )
    .await
    .code(2)
    .stdout("")
    .stderr(predicate::str::starts_with("error: NotFound: "));

    let closed = format!("http://127.0.0.1:{}", free_port());
    callops(&["list", "--url", &closed], &[])
        .await
        .code(2)
        .stderr(predicate::str::contains(format!(
            "cannot reach {closed}/v1/operations"
        )));

    // Usage: a required option missing.
    callops(&["remove-participant", "--call", "x", "--url", &url], &[])
        .await
        .code(2)
        .stderr(predicate::str::contains("--participant"));
}

#[tokio::test]
async fn list_shows_a_table_and_its_filters_narrow_it() {
    let app = TestApp::spawn().await;
    let url = base(&app);
    let a = app.remove("call-list-1", silent(), Some("ctx-a")).await;
    let b = app.remove("call-list-1", silent(), Some("ctx-b")).await;
    let c = app.remove("call-list-2", silent(), Some("ctx-c")).await;
    let id = |operation: &Value| operation["id"].as_str().unwrap().to_owned();

    let all = stdout_json(
        &callops(&["list", "--json", "--url", &url], &[])
            .await
            .code(0),
    );
    let ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["id"].as_str().unwrap())
        .collect();
    // Newest first.
    assert_eq!(ids, [id(&c), id(&b), id(&a)]);

    let on_call = stdout_json(
        &callops(
            &[
                "list",
                "--call-connection-id",
                "call-list-1",
                "--json",
                "--url",
                &url,
            ],
            &[],
        )
        .await
        .code(0),
    );
    let ids: Vec<&str> = on_call
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id(&b), id(&a)]);

    let by_context = stdout_json(
        &callops(
            &["list", "--context", "ctx-a", "--json", "--url", &url],
            &[],
        )
        .await
        .code(0),
    );
    assert_eq!(by_context.as_array().unwrap().len(), 1, "{by_context}");
    assert_eq!(by_context[0]["id"], a["id"]);

    let limited = stdout_json(
        &callops(&["list", "--max", "2", "--json", "--url", &url], &[])
            .await
            .code(0),
    );
    assert_eq!(limited.as_array().unwrap().len(), 2, "{limited}");
    // Pages smaller than --max: nextLink is followed, in order, up to --max.
    for (max, page_size, expected) in [
        ("3", "1", vec![id(&c), id(&b), id(&a)]),
        ("2", "1", vec![id(&c), id(&b)]),
        ("10", "2", vec![id(&c), id(&b), id(&a)]),
    ] {
        let paged = stdout_json(
            &callops(
                &[
                    "list",
                    "--max",
                    max,
                    "--page-size",
                    page_size,
                    "--json",
                    "--url",
                    &url,
                ],
                &[],
            )
            .await
            .code(0),
        );
        let ids: Vec<String> = paged
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, expected, "--max {max} --page-size {page_size}");
    }

    // The table: a header, then a row per operation, without colour in a pipe.
    let assert = callops(
        &["list", "--call-connection-id", "call-list-2", "--url", &url],
        &[],
    )
    .await
    .code(0);
    let text = String::from_utf8(assert.get_output().stdout.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("ID "), "{text}");
    assert!(lines[1].starts_with(&id(&c)), "{text}");
    assert!(
        lines[1].contains("removeParticipant") && lines[1].contains("ctx-c"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "{text:?}");
}

/// A line-by-line reader of a child's pipe, on its own thread.
fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// The next line from `receiver` for which `wanted` holds, within [`SOON`]; every line read.
async fn until_line(
    receiver: mpsc::Receiver<String>,
    wanted: impl Fn(&str) -> bool + Send + 'static,
) -> (mpsc::Receiver<String>, Vec<String>) {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + SOON;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match receiver.recv_timeout(left) {
                Ok(line) => {
                    let done = wanted(&line);
                    seen.push(line);
                    if done {
                        return (receiver, seen);
                    }
                }
                Err(error) => panic!("no such line ({error}); read: {seen:?}"),
            }
        }
    })
    .await
    .unwrap()
}

/// `callops watch args…` as a child with `env`, once it says it is connected (the stream
/// starts at the newest change, so what follows is seen): its stdout and stderr lines.
async fn watch(
    args: &[&str],
    env: &[(&str, &str)],
) -> (mpsc::Receiver<String>, mpsc::Receiver<String>, Process) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_callops"));
    command
        .arg("watch")
        .args(args)
        .env_remove("CALLOPS_URL")
        .env_remove("CALLOPS_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let stdout = lines(child.stdout.take().unwrap());
    let stderr = lines(child.stderr.take().unwrap());
    let process = Process(child);
    let (stderr, _) = until_line(stderr, |line| line.starts_with("watching ")).await;
    (stdout, stderr, process)
}

#[tokio::test]
async fn watch_prints_changes_made_after_it_started_within_its_filter() {
    let app = TestApp::spawn().await;
    let url = base(&app);
    let (stdout, _stderr, _watch) = watch(
        &["--call-connection-id", "call-watched", "--url", &url],
        &[],
    )
    .await;

    let other = app.remove("call-unwatched", Script::default(), None).await;
    let watched = app
        .remove("call-watched", Script::default(), Some("ctx-w"))
        .await;
    let id = watched["id"].as_str().unwrap().to_owned();
    let wanted = id.clone();
    let (_, seen) = until_line(stdout, move |line| {
        line.contains(&wanted) && line.contains("operation.settled") && line.contains("Succeeded")
    })
    .await;
    let settled = seen.last().unwrap();
    assert!(
        settled.ends_with(" removeParticipant Succeeded call-watched context=ctx-w"),
        "{settled}"
    );
    let other = other["id"].as_str().unwrap();
    assert!(seen.iter().all(|line| !line.contains(other)), "{seen:?}");
}

#[tokio::test]
async fn watch_json_prints_one_operation_per_line() {
    let app = TestApp::spawn().await;
    let url = base(&app);
    let (stdout, _stderr, _watch) = watch(
        &["--json", "--status", "Succeeded"],
        &[("CALLOPS_URL", &url)],
    )
    .await;

    let started = app.remove("call-watch-json", Script::default(), None).await;
    let (_, seen) = until_line(stdout, |_| true).await;
    let operation: Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(operation["id"], started["id"]);
    assert_eq!(operation["status"], "Succeeded");
}

#[tokio::test]
async fn subscriptions_are_created_listed_and_deleted() {
    let app = TestApp::spawn_with(|config| {
        config.webhooks.allow_private_targets = true;
    })
    .await;
    let url = base(&app);
    // A closed loopback port: nothing is ever delivered anywhere.
    let hook = format!("https://127.0.0.1:{}/hook", free_port());
    let assert = callops(
        &[
            "subscriptions",
            "create",
            "--endpoint",
            &hook,
            "--event-type",
            "operation.settled",
            "--event-type",
            "operation.changed",
            "--kind",
            "removeParticipant",
            "--context-prefix",
            "job-",
            "--json",
        ],
        &[("CALLOPS_URL", &url)],
    )
    .await
    .code(0);
    let created = stdout_json(&assert);
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sub_"), "{created}");
    assert!(
        created["secret"].as_str().unwrap().starts_with("whsec_"),
        "{created}"
    );
    assert_eq!(created["url"], hook.as_str());
    assert_eq!(
        created["eventTypes"],
        serde_json::json!(["operation.settled", "operation.changed"])
    );
    assert_eq!(created["filter"]["contextPrefix"], "job-");

    let listed = stdout_json(
        &callops(&["subscriptions", "list", "--json", "--url", &url], &[])
            .await
            .code(0),
    );
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0].get("secret").is_none(), "{listed}");
    callops(&["subscriptions", "list", "--url", &url], &[])
        .await
        .code(0)
        .stdout(predicate::str::contains(&id).and(predicate::str::contains("contextPrefix=job-")));

    callops(&["subscriptions", "delete", &id, "--url", &url], &[])
        .await
        .code(0)
        .stdout(format!("deleted {id}\n"));
    let listed = stdout_json(
        &callops(&["subscriptions", "list", "--json", "--url", &url], &[])
            .await
            .code(0),
    );
    assert_eq!(listed, serde_json::json!([]));
    callops(&["subscriptions", "delete", &id, "--url", &url], &[])
        .await
        .code(2)
        .stderr(predicate::str::starts_with("error: NotFound: "));
}

#[tokio::test]
async fn a_wrong_api_key_exits_2_unauthorized_and_is_never_shown() {
    const RIGHT: &str = "right-key-0123456789abcdef";
    const WRONG: &str = "wrong-key-presented-by-mallory";
    let app = TestApp::spawn_with(|config| {
        config.http.api_keys = RIGHT.to_owned().into();
    })
    .await;
    let url = base(&app);
    for (args, env) in [
        (vec!["list", "--api-key", WRONG, "--url", &url], vec![]),
        (
            vec!["list", "--url", &url],
            vec![("CALLOPS_API_KEY", WRONG)],
        ),
        (
            vec![
                "get",
                "0190b3c2-7a53-7c1e-9a0e-5a0f1f1b2c3d",
                "--wait",
                "1",
                "--url",
                &url,
            ],
            vec![("CALLOPS_API_KEY", WRONG)],
        ),
    ] {
        let assert = callops(&args, &env).await.code(2);
        let output = assert.get_output();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("error: Unauthorized: "), "{stderr}");
        for text in [&output.stdout, &output.stderr] {
            assert!(!String::from_utf8_lossy(text).contains(WRONG), "{stderr}");
        }
    }
    // The right key, from the environment, is sent.
    callops(
        &["list", "--json", "--url", &url],
        &[("CALLOPS_API_KEY", RIGHT)],
    )
    .await
    .code(0)
    .stdout("[]\n");
    // --help names the variable but never shows its value.
    callops(&["list", "--help"], &[("CALLOPS_API_KEY", WRONG)])
        .await
        .code(0)
        .stdout(
            predicate::str::contains("CALLOPS_API_KEY").and(predicate::str::contains(WRONG).not()),
        );
}

#[tokio::test]
async fn get_with_wait_polls_again_past_the_servers_cap() {
    // The server answers a long poll after a second at most: the client asks again.
    let app = TestApp::spawn_with(|config| config.operations.max_wait_secs = 1).await;
    let url = base(&app);
    let script = Script {
        callback_delay_ms: 2_500,
        ..Script::default()
    };
    let started = app.remove("call-cli-later", script, None).await;
    let id = started["id"].as_str().unwrap();
    let assert = callops(&["get", id, "--wait", "10", "--json", "--url", &url], &[])
        .await
        .code(0);
    let operation = stdout_json(&assert);
    assert_eq!(operation["id"], id);
    assert_eq!(operation["status"], "Succeeded");
}

/// A TCP proxy to `target` on 127.0.0.1:0 whose connections [`CutProxy::cut`] breaks
/// mid-stream, as a network fault or a restarting load balancer would.
struct CutProxy {
    address: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
}

impl CutProxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let held = std::sync::Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                held.lock().unwrap().spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            address,
            connections,
        }
    }

    /// Breaks every connection open now.
    fn cut(&self) {
        self.connections.lock().unwrap().abort_all();
    }
}

#[tokio::test]
async fn watch_reconnects_after_a_break_and_misses_nothing() {
    let app = TestApp::spawn().await;
    let proxy = CutProxy::start(app.address).await;
    let url = format!("http://{}", proxy.address);
    let (stdout, stderr, _watch) =
        watch(&["--call-connection-id", "call-cut", "--url", &url], &[]).await;
    let first = app.remove("call-cut", silent(), Some("ctx-1")).await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    let wanted = first_id.clone();
    let (stdout, _) = until_line(stdout, move |line| line.contains(&wanted)).await;

    proxy.cut();
    let (_, said) = until_line(stderr, |line| line.starts_with("reconnecting after change")).await;
    assert!(
        said.iter().any(|line| line.starts_with("the stream broke")),
        "{said:?}"
    );
    // A change made while it was away is shown after the reconnection (Last-Event-ID).
    let second = app.remove("call-cut", silent(), Some("ctx-2")).await;
    let second_id = second["id"].as_str().unwrap().to_owned();
    let wanted = second_id.clone();
    let (_, seen) = until_line(stdout, move |line| line.contains(&wanted)).await;
    assert!(
        seen.iter().any(|line| line.contains(&second_id)),
        "{seen:?}"
    );
}
