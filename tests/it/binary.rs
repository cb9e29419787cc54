//! The `callops` binary itself: `serve` configured from the environment alone, `emulator` as
//! a separate process, and a clean exit on SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use callops::emulator::callback_signing;
use serde_json::{Value, json};

use crate::support::{follow, within};

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn callops(args: &[&str], env: &[(&str, String)]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_callops"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        // Unless a test names a store file, nothing is written to the working directory.
        .env("CALLOPS_STORE", "memory")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    Process(command.spawn().unwrap())
}

pub async fn until_up(http: &reqwest::Client, url: &str) {
    within(async {
        while http.get(url).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn serve_and_emulator_run_as_separate_processes_and_stop_on_sigterm() {
    let http = reqwest::Client::new();
    let emulator_port = free_port();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _emulator = callops(
        &[
            "emulator",
            "--listen",
            &format!("127.0.0.1:{emulator_port}"),
        ],
        // Where the emulator sends Graph notifications.
        &[("CALLOPS_PUBLIC_URL", base.clone())],
    );
    let emulator = format!("http://127.0.0.1:{emulator_port}");
    until_up(&http, &format!("{emulator}/emulator/requests")).await;

    let config = callops::config::Config::embedded();
    let data = tempfile::tempdir().unwrap();
    let mut server = callops(
        &[],
        &[
            ("CALLOPS_LISTEN", format!("127.0.0.1:{port}")),
            (
                "CALLOPS_STORE",
                data.path().join("callops.db").display().to_string(),
            ),
            ("CALLOPS_PUBLIC_URL", base.clone()),
            (
                "CALLOPS_ACS_CONNECTION_STRING",
                format!(
                    "endpoint={emulator}/;accesskey={}",
                    config.emulator.access_key
                ),
            ),
            ("CALLOPS_GRAPH_BASE_URL", format!("{emulator}/v1.0")),
            ("CALLOPS_GRAPH_AUTHORITY", emulator.clone()),
            (
                "CALLOPS_GRAPH_TENANT_ID",
                config.emulator.graph_tenant_id.clone(),
            ),
            (
                "CALLOPS_GRAPH_CLIENT_ID",
                config.emulator.graph_client_id.clone(),
            ),
            (
                "CALLOPS_GRAPH_CLIENT_SECRET",
                config.emulator.graph_client_secret.clone(),
            ),
            // Callbacks are verified against the emulator's keys, as `callops emulator`
            // says to configure.
            (
                "CALLOPS_ACS_CALLBACK_OPENID_URL",
                format!("{emulator}{}", callback_signing::ACS_OPENID_PATH),
            ),
            (
                "CALLOPS_ACS_CALLBACK_AUDIENCE",
                config.emulator.acs_resource_id.clone(),
            ),
            (
                "CALLOPS_GRAPH_CALLBACK_OPENID_URL",
                format!("{emulator}{}", callback_signing::GRAPH_OPENID_PATH),
            ),
            ("CALLOPS_EMULATOR__ENABLED", "false".to_owned()),
            ("CALLOPS_LOG_FORMAT", "json".to_owned()),
        ],
    );
    until_up(&http, &format!("{base}/healthz")).await;

    // Script the standalone emulator over HTTP: this call's removal fails.
    let scripted = http
        .put(format!("{emulator}/emulator/scripts/call-bin"))
        .json(&json!({"outcome": "fail", "callbackDelayMs": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(scripted.status(), 204);

    let response = http
        .post(format!(
            "{base}/v1/acs/callConnections/call-bin/participants:remove"
        ))
        .json(&json!({"participantToRemove": {"rawId": "4:+14255550123"}}))
        .send()
        .await
        .unwrap();
    let operation = follow(&http, &base, response).await;
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_eq!(operation["error"]["code"], "RemoveParticipantFailed");

    let requests: Vec<Value> = http
        .get(format!("{emulator}/emulator/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0]["body"]["participantToRemove"],
        json!({"rawId": "4:+14255550123", "phoneNumber": {"value": "+14255550123"}})
    );

    // Graph through the standalone emulator: the SDK's request, and the notification back.
    let response = http
        .post(format!(
            "{base}/v1/graph/calls/57dab8b1-894c-409a-b240-bd8beae78896/cancelMediaProcessing"
        ))
        .json(&json!({"clientContext": "cc-1"}))
        .send()
        .await
        .unwrap();
    let operation = follow(&http, &base, response).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    let requests: Vec<Value> = http
        .get(format!("{emulator}/emulator/graph/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths: Vec<&str> = requests
        .iter()
        .map(|r| r["pathAndQuery"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/emulator-tenant/oauth2/v2.0/token",
            "/v1.0/communications/calls/57dab8b1-894c-409a-b240-bd8beae78896/cancelMediaProcessing"
        ]
    );
    assert_eq!(requests[1]["body"], json!({"clientContext": "cc-1"}));

    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = within(async {
        loop {
            if let Some(status) = server.0.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(status.success(), "{status}");
}

#[test]
fn an_invalid_configuration_stops_the_start_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_callops"))
        .env(
            "CALLOPS_ACS_CONNECTION_STRING",
            "accesskey=c2VjcmV0LWtleQ==",
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CALLOPS_ACS_CONNECTION_STRING"), "{stderr}");
    assert!(stderr.contains("endpoint="), "{stderr}");
    assert!(!stderr.contains("c2VjcmV0LWtleQ"), "{stderr}");
}

/// A container on Azure Container Apps with a managed identity: configured by the platform's
/// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` and `CALLOPS_*` names alone, no secret.
#[tokio::test]
async fn a_managed_identity_from_the_platforms_variables_removes_and_cancels() {
    let http = reqwest::Client::new();
    let (emulator_port, port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{port}");
    let emulator = format!("http://127.0.0.1:{emulator_port}");
    let _emulator = callops(
        &[
            "emulator",
            "--listen",
            &format!("127.0.0.1:{emulator_port}"),
        ],
        &[("CALLOPS_PUBLIC_URL", base.clone())],
    );
    until_up(&http, &format!("{emulator}/emulator/requests")).await;
    let config = callops::config::Config::embedded();
    let _server = callops(
        &[],
        &[
            ("CALLOPS_LISTEN", format!("127.0.0.1:{port}")),
            ("CALLOPS_PUBLIC_URL", base.clone()),
            ("IDENTITY_ENDPOINT", format!("{emulator}/msi/token")),
            ("IDENTITY_HEADER", config.emulator.identity_header.clone()),
            ("CALLOPS_ACS_ENDPOINT", format!("{emulator}/")),
            ("CALLOPS_ACS_CREDENTIAL", "managed-identity".to_owned()),
            ("CALLOPS_GRAPH_CREDENTIAL", "managed-identity".to_owned()),
            ("CALLOPS_GRAPH_BASE_URL", format!("{emulator}/v1.0")),
            (
                "CALLOPS_ACS_CALLBACK_OPENID_URL",
                format!("{emulator}{}", callback_signing::ACS_OPENID_PATH),
            ),
            (
                "CALLOPS_ACS_CALLBACK_AUDIENCE",
                config.emulator.acs_resource_id.clone(),
            ),
            (
                "CALLOPS_GRAPH_CALLBACK_OPENID_URL",
                format!("{emulator}{}", callback_signing::GRAPH_OPENID_PATH),
            ),
            (
                "CALLOPS_GRAPH_CALLBACK_AUDIENCE",
                config.emulator.graph_client_id.clone(),
            ),
            ("CALLOPS_EMULATOR__ENABLED", "false".to_owned()),
        ],
    );
    until_up(&http, &format!("{base}/healthz")).await;
    let response = http
        .post(format!(
            "{base}/v1/acs/callConnections/call-mi/participants:remove"
        ))
        .json(&json!({"participantToRemove": {"rawId": "8:acs:abc_def"}}))
        .send()
        .await
        .unwrap();
    let operation = follow(&http, &base, response).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    let response = http
        .post(format!(
            "{base}/v1/graph/calls/call-mi/cancelMediaProcessing"
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let operation = follow(&http, &base, response).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    let grants: Value = http
        .get(format!("{emulator}/emulator/identity/grants"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let grants: Vec<(&str, &str)> = grants
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["by"].as_str().unwrap(), g["audience"].as_str().unwrap()))
        .collect();
    assert_eq!(grants, [("appService", "acs"), ("appService", "graph")]);
}

#[test]
fn an_endpoint_without_a_credential_stops_the_start_naming_both() {
    let output = Command::new(env!("CARGO_BIN_EXE_callops"))
        .env("CALLOPS_ACS_ENDPOINT", "https://r.communication.azure.com/")
        .env("CALLOPS_STORE", "memory")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CALLOPS_ACS_ENDPOINT")
            && stderr.contains("CALLOPS_ACS_CREDENTIAL")
            && stderr.contains("managed-identity"),
        "{stderr}"
    );
}

#[tokio::test]
async fn api_keys_from_the_environment_guard_the_client_api() {
    let http = reqwest::Client::new();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // A key of digits only, leading zero included, is taken as it is.
    let digits = "0123456789012345678";
    let other = "rotated-key-abcdefghij";
    let _server = callops(
        &[],
        &[
            ("CALLOPS_LISTEN", format!("127.0.0.1:{port}")),
            ("CALLOPS_PUBLIC_URL", base.clone()),
            ("CALLOPS_EMULATOR__LISTEN", "127.0.0.1:0".to_owned()),
            ("CALLOPS_API_KEYS", format!("{digits}, {other}")),
        ],
    );
    until_up(&http, &format!("{base}/healthz")).await;
    let operations = format!("{base}/v1/operations");
    let anonymous = http.get(&operations).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    for key in [digits, other] {
        let keyed = http.get(&operations).bearer_auth(key).send().await.unwrap();
        assert_eq!(keyed.status(), 200, "{key}");
    }
}

#[test]
fn a_short_api_key_stops_the_start_without_showing_it() {
    let short = "tooshort-123";
    let output = Command::new(env!("CARGO_BIN_EXE_callops"))
        .env(
            "CALLOPS_API_KEYS",
            format!("long-enough-key-0123456789,{short}"),
        )
        .env("CALLOPS_EMULATOR__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CALLOPS_API_KEYS"), "{stderr}");
    assert!(stderr.contains("key 2"), "{stderr}");
    assert!(!stderr.contains(short), "{stderr}");
    assert!(!stderr.contains("long-enough-key"), "{stderr}");
}

/// `callops migrate` on the environment's store (`CALLOPS_STORE`), with `args`.
fn migrate(store: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_callops"))
        .arg("migrate")
        .args(args)
        .env("CALLOPS_STORE", store)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn user_version(path: &std::path::Path) -> i64 {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    rusqlite::Connection::open_with_flags(path, flags)
        .unwrap()
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap()
}

/// `migrate --check` on a copy of the previous release's SQLite file says what it would do
/// and changes nothing; `migrate` then migrates it, with a backup beside it.
#[test]
fn migrate_check_reports_a_v1_sqlite_file_and_migrate_applies_it_with_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("callops.db");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/upgrade/v1-sqlite/callops.db"
        ),
        &db,
    )
    .unwrap();

    let (ok, stdout, stderr) = migrate(&db, &["--check"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("store version: 1\n"), "{stdout}");
    assert!(stdout.contains("this build's version: 3\n"), "{stdout}");
    assert!(stdout.contains("would migrate:\n  1 -> 2: "), "{stdout}");
    assert_eq!(user_version(&db), 1);
    let backups = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("callops.db.v1-backup-"))
            .collect()
    };
    assert!(backups(dir.path()).is_empty());

    let (ok, stdout, stderr) = migrate(&db, &[]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("migrated:\n  1 -> 2: "), "{stdout}");
    assert!(stdout.contains("\n  2 -> 3: "), "{stdout}");
    assert_eq!(user_version(&db), 3);
    let found = backups(dir.path());
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        stdout.contains(&found[0]),
        "the backup is not logged: {stdout}"
    );
    assert_eq!(user_version(&dir.path().join(&found[0])), 1);

    let (ok, stdout, _) = migrate(&db, &["--check"]);
    assert!(ok && stdout.contains("up to date"), "{stdout}");
}

/// A file from a newer build: `--check` exits 1 saying so, `migrate` refuses it naming both
/// versions; the file is left as it is.
#[test]
fn migrate_refuses_a_store_newer_than_this_build() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("callops.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 7)
        .unwrap();
    let (ok, stdout, _) = migrate(&db, &["--check"]);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("store version: 7"), "{stdout}");
    assert!(
        stdout.contains("newer than this build: refused"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = migrate(&db, &[]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("schema version 7"), "{stderr}");
    assert!(stderr.contains("newer than version 3"), "{stderr}");
    assert_eq!(user_version(&db), 7);

    let (ok, stdout, _) = migrate(std::path::Path::new("memory"), &["--check"]);
    assert!(ok && stdout.contains("nothing to migrate"), "{stdout}");
}

/// The resident memory of process `pid`, in kB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn bodies_dripped_a_byte_at_a_time_hold_little_memory() {
    use tokio::io::AsyncWriteExt;
    const CONNECTIONS: usize = 100;
    const BYTES: usize = 200;
    let port = free_port();
    let server = callops(
        &["serve"],
        &[("CALLOPS_LISTEN", format!("127.0.0.1:{port}"))],
    );
    let http = reqwest::Client::new();
    until_up(&http, &format!("http://127.0.0.1:{port}/healthz")).await;
    let pid = server.0.id();
    let before = rss_kb(pid);
    let mut drips = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        drips.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let head = "POST /v1/acs/callConnections/x/participants:remove HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 262144\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            for _ in 0..BYTES {
                stream.write_all(b" ").await.unwrap();
                stream.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Held open, body unfinished, until the measurement is taken.
            stream
        });
    }
    let mut open = Vec::new();
    while let Some(stream) = within(drips.join_next()).await {
        open.push(stream.unwrap());
    }
    let during = rss_kb(pid);
    drop(open);
    let grown_mb = during.saturating_sub(before) / 1024;
    // A pinned read buffer per byte would be tens of megabytes here (about 4 KB a byte).
    assert!(
        grown_mb < 24,
        "{CONNECTIONS} connections dripping {BYTES} bytes each grew the server by {grown_mb} MB ({before} kB → {during} kB)"
    );
}
