//! What the container image relies on (see `Dockerfile`, `docs/deploy.md`): the
//! `healthcheck` subcommand, a start from environment variables alone in an empty working
//! directory, nothing written outside the data directory, and a clear failure when the store
//! cannot be written.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::json;

use crate::binary::{Process, callops, free_port, until_up};
use crate::support::{follow, within};

/// `callops healthcheck ARGS` with `env` (and nothing else from this process's environment).
async fn healthcheck(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callops"));
    command.arg("healthcheck").args(args).env_clear();
    for (name, value) in env {
        command.env(name, value);
    }
    within(command.output()).await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn healthcheck_exits_0_when_the_service_answers_and_1_with_a_reason_when_not() {
    let http = reqwest::Client::new();
    let port = free_port();
    // Listening on every interface, as in the image: the check goes to loopback.
    let listen = ("CALLOPS_LISTEN", format!("0.0.0.0:{port}"));
    let _server = callops(
        &[],
        &[
            listen.clone(),
            ("CALLOPS_PUBLIC_URL", format!("http://127.0.0.1:{port}")),
            ("CALLOPS_EMULATOR__LISTEN", "127.0.0.1:0".to_owned()),
        ],
    );
    until_up(&http, &format!("http://127.0.0.1:{port}/healthz")).await;

    let healthy = healthcheck(&[], std::slice::from_ref(&listen)).await;
    assert!(healthy.status.success(), "{healthy:?}");
    let line = text(&healthy.stdout);
    assert_eq!(
        line.trim(),
        format!("healthy: GET http://127.0.0.1:{port}/healthz answered 200 OK")
    );

    let missing = healthcheck(&["--path", "/nope"], std::slice::from_ref(&listen)).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    let line = text(&missing.stderr);
    assert!(line.contains("unhealthy"), "{line}");
    assert!(line.contains("/nope answered 404"), "{line}");
    assert_eq!(line.trim().lines().count(), 1, "{line}");

    // --url overrides the listener entirely.
    let url = format!("http://127.0.0.1:{port}/healthz");
    let overridden = healthcheck(&["--url", &url, "--timeout", "2"], &[]).await;
    assert!(overridden.status.success(), "{overridden:?}");
}

#[tokio::test]
async fn healthcheck_against_a_dead_port_exits_1_with_a_message() {
    let port = free_port();
    let dead = healthcheck(&[], &[("CALLOPS_LISTEN", format!("127.0.0.1:{port}"))]).await;
    assert_eq!(dead.status.code(), Some(1), "{dead:?}");
    let line = text(&dead.stderr);
    assert!(
        line.starts_with(&format!(
            "unhealthy: GET http://127.0.0.1:{port}/healthz failed"
        )),
        "{line}"
    );
    assert_eq!(line.trim().lines().count(), 1, "{line}");
    assert!(dead.stdout.is_empty());

    // An invalid configuration is a reason too, not a panic.
    let invalid = healthcheck(&[], &[("CALLOPS_LISTEN", "nowhere".to_owned())]).await;
    assert_eq!(invalid.status.code(), Some(1), "{invalid:?}");
    let line = text(&invalid.stderr);
    assert!(line.contains("CALLOPS_LISTEN"), "{line}");
    assert!(!line.contains("panicked"), "{line}");
}

/// `callops` (serve) started in `cwd` from `env` alone, as a container runtime would.
fn start_in(cwd: &Path, env: &[(&str, String)]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_callops"));
    command
        .current_dir(cwd)
        .env_clear()
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    Process(command.spawn().unwrap())
}

/// The environment of a container start on `port` with the store at `store`: the
/// in-process emulator stands in for ACS and Graph.
fn container_env(port: u16, store: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("CALLOPS_LISTEN", format!("127.0.0.1:{port}")),
        ("CALLOPS_PUBLIC_URL", format!("http://127.0.0.1:{port}")),
        ("CALLOPS_STORE", store.display().to_string()),
        ("CALLOPS_EMULATOR__LISTEN", "127.0.0.1:0".to_owned()),
        ("CALLOPS_LOG_FORMAT", "json".to_owned()),
    ]
}

/// Starts callops in `cwd` with its store in `data`, checks /healthz, and removes a
/// participant through the in-process emulator.
async fn start_and_remove(cwd: &Path, data: &Path) -> Process {
    let http = reqwest::Client::new();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = start_in(cwd, &container_env(port, &data.join("callops.db")));
    until_up(&http, &format!("{base}/healthz")).await;
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let response = http
        .post(format!(
            "{base}/v1/acs/callConnections/call-container/participants:remove"
        ))
        .json(&json!({"participantToRemove": {"rawId": "8:acs:abc_def"}, "operationContext": "remove-bob"}))
        .send()
        .await
        .unwrap();
    let operation = follow(&http, &base, response).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    server
}

/// Every path under `dir`, relative to it.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            found.insert(path.strip_prefix(dir).unwrap().to_path_buf());
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    found
}

/// Only the SQLite database and its WAL files are in `data`.
fn assert_only_the_store_in(data: &Path) {
    let names = files(data);
    assert!(names.contains(Path::new("callops.db")), "{names:?}");
    for name in &names {
        let name = name.to_string_lossy();
        assert!(
            name.starts_with("callops.db"),
            "unexpected {name} in {data:?}"
        );
    }
}

#[tokio::test]
async fn starts_from_the_environment_alone_in_an_empty_working_directory() {
    let cwd = tempfile::tempdir().unwrap();
    // An empty volume: its mount point exists.
    let data = tempfile::tempdir().unwrap();
    let data = data.path().to_owned();
    let mut server = start_and_remove(cwd.path(), &data).await;
    let _ = server.0.kill();
    let _ = server.0.wait();
    assert_only_the_store_in(&data);
    assert!(files(cwd.path()).is_empty(), "{:?}", files(cwd.path()));
}

#[tokio::test]
async fn nothing_is_written_outside_the_data_directory() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path().join("read-only");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::write(cwd.join("existing"), "left alone").unwrap();
    let data = tempfile::tempdir().unwrap();
    let before = files(&cwd);
    // A read-only working directory, as the image's root filesystem may be. Root (the
    // tests here often run as root) ignores the mode; the snapshot below checks anyway.
    set_mode(&cwd, 0o555);
    let privileged = std::fs::write(cwd.join("probe"), "").is_ok();
    if privileged {
        std::fs::remove_file(cwd.join("probe")).unwrap();
    }
    let mut server = start_and_remove(&cwd, data.path()).await;
    let _ = server.0.kill();
    let _ = server.0.wait();
    set_mode(&cwd, 0o755);
    assert_eq!(
        files(&cwd),
        before,
        "read-only mode enforced: {}",
        !privileged
    );
    assert_only_the_store_in(data.path());
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn an_unwritable_store_location_stops_the_start_with_a_clear_message() {
    let cwd = tempfile::tempdir().unwrap();
    // The store's directory would have to be created under a regular file.
    let blocker = cwd.path().join("not-a-directory");
    std::fs::write(&blocker, "").unwrap();
    let store = blocker.join("data").join("callops.db");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callops"));
    command
        .current_dir(cwd.path())
        .env_clear()
        .env("RUST_BACKTRACE", "1");
    for (name, value) in container_env(free_port(), &store) {
        command.env(name, value);
    }
    let output = within(command.output()).await.unwrap();
    assert!(!output.status.success(), "{output:?}");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&blocker.display().to_string()) && stderr.contains("CALLOPS_STORE"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn a_store_in_a_missing_directory_or_a_mistyped_store_stops_the_start() {
    let cwd = tempfile::tempdir().unwrap();
    let missing = cwd.path().join("no-such-dir");
    for (store, expected) in [
        (
            missing.join("callops.db").display().to_string(),
            missing.display().to_string(),
        ),
        ("memroy".to_owned(), "redis://".to_owned()),
        (
            "redis:/127.0.0.1:6379".to_owned(),
            "sqlite://PATH".to_owned(),
        ),
    ] {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callops"));
        command.current_dir(cwd.path()).env_clear();
        for (name, value) in container_env(free_port(), Path::new(&store)) {
            command.env(name, value);
        }
        let output = within(command.output()).await.unwrap();
        assert_eq!(output.status.code(), Some(1), "{store}: {output:?}");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains(&expected) && stderr.contains("CALLOPS_STORE"),
            "{store}: {stderr}"
        );
    }
    assert!(!missing.exists(), "the missing directory was created");
    assert!(files(cwd.path()).is_empty(), "{:?}", files(cwd.path()));
}

#[tokio::test]
async fn the_default_data_directory_is_created_when_missing() {
    let cwd = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut env = container_env(port, Path::new("data/callops.db"));
    env.retain(|(name, _)| *name != "CALLOPS_STORE");
    let mut server = start_in(cwd.path(), &env);
    until_up(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/healthz"),
    )
    .await;
    let _ = server.0.kill();
    let _ = server.0.wait();
    assert!(cwd.path().join("data").join("callops.db").exists());
}

#[tokio::test]
async fn logs_into_a_pipe_have_no_colours_and_name_an_invalid_rust_log_and_unknown_variables() {
    let cwd = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callops"));
    command
        .current_dir(cwd.path())
        .env_clear()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in container_env(port, Path::new("memory")) {
        command.env(name, value);
    }
    command
        .env("CALLOPS_LOG_FORMAT", "text")
        .env("RUST_LOG", "callops=loud")
        .env("CALLOPS_LISTENN", "127.0.0.1:1");
    let child = command.spawn().unwrap();
    until_up(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/healthz"),
    )
    .await;
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let output = within(child.wait_with_output()).await.unwrap();
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("RUST_LOG is not a valid filter"),
        "{stdout}"
    );
    assert!(!stdout.contains('\u{1b}'), "colours in a pipe: {stdout:?}");
    assert!(
        stdout.contains("CALLOPS_LISTENN") && stdout.contains("not a callops setting"),
        "{stdout}"
    );
}

/// The `ENV` settings of the image's final stage, as the Dockerfile gives them.
fn image_env() -> Vec<(String, String)> {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let mut env = Vec::new();
    let lines = dockerfile
        .lines()
        .skip_while(|line| !line.starts_with("ENV "));
    for line in lines {
        let setting = line
            .trim_start_matches("ENV ")
            .trim()
            .trim_end_matches('\\')
            .trim();
        let (name, value) = setting.split_once('=').unwrap();
        env.push((name.to_owned(), value.to_owned()));
        if !line.trim_end().ends_with('\\') {
            break;
        }
    }
    env
}

#[tokio::test]
async fn the_image_refuses_to_start_without_azure_settings_unless_the_emulator_is_asked_for() {
    let env = image_env();
    assert!(
        env.contains(&("CALLOPS_EMULATOR__ENABLED".to_owned(), "false".to_owned())),
        "{env:?}"
    );
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let start = |emulator: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callops"));
        command
            .current_dir(data.path())
            .env_clear()
            .kill_on_drop(true);
        for (name, value) in &env {
            command.env(name, value);
        }
        command
            .env("CALLOPS_LISTEN", format!("127.0.0.1:{port}"))
            .env("CALLOPS_PUBLIC_URL", format!("http://127.0.0.1:{port}"))
            .env("CALLOPS_STORE", data.path().join("callops.db"))
            .env("CALLOPS_EMULATOR__LISTEN", "127.0.0.1:0");
        if let Some(enabled) = emulator {
            command.env("CALLOPS_EMULATOR__ENABLED", enabled);
        }
        command
    };
    let output = within(start(None).output()).await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("CALLOPS_ACS_CONNECTION_STRING")
            && stderr.contains("CALLOPS_EMULATOR__ENABLED=true"),
        "{stderr}"
    );
    let mut server = start(Some("true")).spawn().unwrap();
    until_up(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/healthz"),
    )
    .await;
    server.kill().await.unwrap();
}

#[tokio::test]
async fn a_port_in_use_names_the_setting_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cwd = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callops"));
    command.current_dir(cwd.path()).env_clear();
    for (name, value) in container_env(port, Path::new("memory")) {
        command.env(name, value);
    }
    let output = within(command.output()).await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("CALLOPS_LISTEN") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
}

/// Runs callops in a private mount namespace (`unshare -rm`) whose `dir` is a 64 KiB tmpfs
/// with `fill_kib` of it taken; `None` where unprivileged namespaces are not allowed.
async fn start_on_a_full_disk(dir: &Path, fill_kib: u32) -> Option<Output> {
    let script = format!(
        "mount -t tmpfs -o size=64k tmpfs '{dir}' || exit 97; \
         dd if=/dev/zero of='{dir}/fill' bs=1k count={fill_kib} 2>/dev/null; \
         exec \"$0\"",
        dir = dir.display()
    );
    let mut command = tokio::process::Command::new("unshare");
    command
        .args(["-rm", "sh", "-c", &script, env!("CARGO_BIN_EXE_callops")])
        .env_clear();
    for (name, value) in container_env(free_port(), &dir.join("callops.db")) {
        command.env(name, value);
    }
    let output = within(command.output()).await.ok()?;
    (output.status.code() != Some(97)).then_some(output)
}

#[tokio::test]
async fn a_full_disk_at_start_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    // With the lock file written but no room for the database, and with room for its first
    // pages but not its shared-memory file (SQLite's "disk I/O error").
    for fill_kib in [60, 52] {
        let Some(output) = start_on_a_full_disk(dir.path(), fill_kib).await else {
            eprintln!("skipped: unprivileged mount namespaces (unshare -rm) are not allowed here");
            return;
        };
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("no space left on the device holding")
                && stderr.contains("CALLOPS_STORE"),
            "{fill_kib} KiB taken: {stderr}"
        );
    }
}

/// The environment of the README's `VAR='value' … cargo run` snippet that follows `intro`,
/// its placeholders filled with well-formed values.
fn readme_snippet(intro: &str) -> Vec<(String, String)> {
    let readme = include_str!("../../README.md");
    let after = &readme[readme
        .find(intro)
        .expect("the README introduces the snippet")..];
    let block = after
        .split("```sh\n")
        .nth(1)
        .expect("a shell block follows");
    let block = &block[..block.find("```").expect("the block ends")];
    assert!(block.contains("cargo run"), "{block}");
    let filled = block
        .replace("<resource>", "example")
        .replace("<base64 key>", "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=")
        .replace(
            "<immutable resource id>",
            "5e1d4d5a-0d3c-4b57-9c0e-ca11095e0a7b",
        )
        .replace("<tenant id>", "6c1a9f2e-54a8-4b5b-9a4e-0d5f0f3e2a11")
        .replace("<app id>", "0b9e4a33-3c3a-4d6e-8c1f-2b8d1f0a9e77")
        .replace("<secret>", "a-client-secret");
    assert!(!filled.contains('<'), "an unfilled placeholder: {filled}");
    filled
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter(|(name, _)| name.starts_with("CALLOPS_"))
        .map(|(name, value)| (name.to_owned(), value.trim_matches('\'').to_owned()))
        .collect()
}

#[tokio::test]
async fn the_readme_real_azure_snippets_start_the_service() {
    for intro in [
        "To use a real ACS resource instead",
        "To use Graph for real",
    ] {
        let snippet = readme_snippet(intro);
        assert!(snippet.len() >= 2, "{intro}: {snippet:?}");
        let port = free_port();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callops"));
        command
            .env_clear()
            .env("CALLOPS_STORE", "memory")
            .env("CALLOPS_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "CALLOPS_EMULATOR__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in &snippet {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/healthz");
        let up = within(async {
            loop {
                if http.get(&url).send().await.is_ok() {
                    break true;
                }
                if child.try_wait().unwrap().is_some() {
                    break false;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        if !up {
            let output = child.wait_with_output().await.unwrap();
            panic!(
                "{intro}: the snippet does not start: {}",
                text(&output.stderr)
            );
        }
    }
}
