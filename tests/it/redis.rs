//! The shared Redis store: several `callops` child processes on one `redis-server` (AOF,
//! `appendfsync always`), one in-test emulator, callbacks delivered to whichever replica,
//! replicas and Redis itself killed with SIGKILL at the worst moments.
//!
//! Needs `redis-server` on `PATH`: without it these tests are skipped (with a message on
//! stderr), or fail when `CI` is set.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use callops::config::Config;
use callops::emulator::Emulator;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::binary::{Process, free_port};
use crate::support::{SOON, remove_event, serve_emulator, silent, within};

/// Whether `redis-server` can run here: when it cannot, fails under `CI` and otherwise says
/// the test is skipped.
pub(crate) fn redis_server_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is required: apt-get install -y redis-server"
        );
        eprintln!(
            "SKIPPED: redis-server is not on PATH (apt-get install -y redis-server); \
             set CI=1 to make this a failure"
        );
    }
    found
}

/// A `redis-server` on a free loopback port, its AOF in a directory of its own; SIGKILLed on
/// drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Options beyond the defaults (e.g. a cluster node's).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one in `dir` and waits until it answers PING; `None` when `redis-server` is
    /// missing and the test is to be skipped.
    pub async fn start(dir: &Path) -> Option<Self> {
        if !redis_server_available() {
            return None;
        }
        Some(Self::start_with(dir, free_port(), Vec::new()).await)
    }

    /// As [`RedisServer::start`] on `port`, with `extra` options; `redis-server` must exist.
    pub async fn start_with(dir: &Path, port: u16, extra: Vec<String>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut server = Self {
            port,
            dir: dir.to_owned(),
            child: None,
            extra,
        };
        server.restart().await;
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and directory, and waits until its data is loaded
    /// (PING answers `+PONG`, not `-LOADING`).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        soon(
            &format!("redis-server on port {} answering PING", self.port),
            async {
                loop {
                    if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                        panic!("redis-server on port {} exited: {status}", self.port);
                    }
                    if self.command(&["PING"]).await.as_deref() == Some("+PONG") {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await;
    }

    /// SIGKILL, then wait until the process is gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("redis-server is not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// One command over RESP on a fresh connection; its reply's first line (and a bulk
    /// string's content on the same line, after a space), or `None` when it cannot connect.
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()?;
            let mut request = format!("*{}\r\n", args.len());
            for arg in args {
                request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
            }
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut reply = Vec::new();
            let mut buffer = [0u8; 4096];
            loop {
                let read = stream.read(&mut buffer).await.ok()?;
                if read == 0 {
                    return None;
                }
                reply.extend_from_slice(&buffer[..read]);
                if let Some(parsed) = parse_reply(&reply) {
                    return Some(parsed);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .ok()
            .flatten()
    }
}

impl RedisServer {
    /// How many connections are subscribed to something (channels, patterns or shard
    /// channels), from `CLIENT LIST`.
    pub async fn subscribed_clients(&self) -> usize {
        let Some(list) = self.command(&["CLIENT", "LIST"]).await else {
            return 0;
        };
        list.lines()
            .filter(|client| {
                client.split(' ').any(|field| {
                    ["sub=", "psub=", "ssub="].iter().any(|name| {
                        field
                            .strip_prefix(name)
                            .is_some_and(|count| count.parse::<u64>().is_ok_and(|n| n > 0))
                    })
                })
            })
            .count()
    }
}

/// A complete simple reply (`+`, `-`, `:`) as its line; a bulk string as `$len content`
/// (`$-1` for nil); `None` while incomplete.
fn parse_reply(reply: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(reply);
    let (first, rest) = text.split_once("\r\n")?;
    if let Some(len) = first.strip_prefix('$') {
        let len: i64 = len.parse().ok()?;
        if len < 0 {
            return Some(first.to_owned());
        }
        let content = rest.get(..len as usize)?;
        rest.get(len as usize..)?.strip_prefix("\r\n")?;
        return Some(format!("{first} {content}"));
    }
    Some(first.to_owned())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `callops` child process; its output goes to `log`.
struct Replica {
    name: &'static str,
    port: u16,
    log: PathBuf,
    process: Option<Process>,
}

impl Replica {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// An emulator in this process, a `redis-server`, and `callops` replicas sharing it. On a
/// failing test, prints the tail of every replica's log and keeps the directory.
struct Cluster {
    emulator: Emulator,
    emulator_url: String,
    redis: RedisServer,
    replicas: Vec<Replica>,
    http: reqwest::Client,
    dir: Option<tempfile::TempDir>,
    _stop_emulator: tokio_util::sync::DropGuard,
}

impl Cluster {
    /// Replicas `a` and `b` (more env for both from `env`), or `None` to skip.
    async fn start(env: &[(&str, &str)]) -> Option<Self> {
        Self::start_each([env, env]).await
    }

    /// Replicas `a` and `b`, each with its own extra env, or `None` to skip.
    async fn start_each(envs: [&[(&str, &str)]; 2]) -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("callops-redis-")
            .tempdir()
            .unwrap();
        let redis = RedisServer::start(&dir.path().join("redis")).await?;
        let config = Config::embedded();
        let (emulator, emulator_url, stop_emulator) = serve_emulator(&config).await;
        let mut cluster = Self {
            emulator,
            emulator_url,
            redis,
            replicas: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(40))
                .build()
                .unwrap(),
            dir: Some(dir),
            _stop_emulator: stop_emulator,
        };
        for (name, env) in ["a", "b"].into_iter().zip(envs) {
            let port = free_port();
            let log = cluster.dir().join(format!("callops-{name}.log"));
            cluster.replicas.push(Replica {
                name,
                port,
                log,
                process: None,
            });
            let index = cluster.replicas.len() - 1;
            cluster.spawn(index, env);
        }
        for index in 0..cluster.replicas.len() {
            cluster.until_up(index).await;
            cluster.until_ready(index, 200).await;
        }
        Some(cluster)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Starts replica `index` as durability.rs starts callops, on the shared Redis.
    fn spawn(&mut self, index: usize, more: &[(&str, &str)]) {
        let config = Config::embedded();
        let emulator = &self.emulator_url;
        let replica = &self.replicas[index];
        let base = replica.base();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&replica.log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_callops"));
        command
            .env("RUST_LOG", "callops=info")
            .env("NO_COLOR", "1")
            .env("CALLOPS_LISTEN", format!("127.0.0.1:{}", replica.port))
            .env("CALLOPS_PUBLIC_URL", &base)
            .env("CALLOPS_STORE", self.redis.url())
            .env(
                "CALLOPS_ACS_CONNECTION_STRING",
                format!(
                    "endpoint={emulator}/;accesskey={}",
                    config.emulator.access_key
                ),
            )
            .env(
                "CALLOPS_ACS_CALLBACK_OPENID_URL",
                format!(
                    "{emulator}{}",
                    callops::emulator::callback_signing::ACS_OPENID_PATH
                ),
            )
            .env(
                "CALLOPS_ACS_CALLBACK_AUDIENCE",
                &config.emulator.acs_resource_id,
            )
            .env("CALLOPS_EMULATOR__LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (name, value) in more {
            command.env(name, value);
        }
        self.replicas[index].process = Some(Process(command.spawn().unwrap()));
    }

    fn base(&self, replica: usize) -> String {
        self.replicas[replica].base()
    }

    /// SIGKILLs replica `index` and waits until it is gone.
    fn kill(&mut self, index: usize) {
        let mut process = self.replicas[index].process.take().unwrap();
        process.0.kill().unwrap();
        process.0.wait().unwrap();
    }

    /// Waits until replica `index` answers `/healthz`; fails at once if it exits.
    async fn until_up(&mut self, index: usize) {
        let url = format!("{}/healthz", self.base(index));
        let http = self.http.clone();
        let replica = &mut self.replicas[index];
        soon(
            &format!("callops {} answering /healthz", replica.name),
            async {
                while http.get(&url).send().await.is_err() {
                    let process = replica.process.as_mut().unwrap();
                    if let Some(status) = process.0.try_wait().unwrap() {
                        panic!("callops {} exited at start: {status}", replica.name);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await;
    }

    /// Polls `/readyz` on replica `index` until it answers `status`; returns its body.
    async fn until_ready(&self, index: usize, status: u16) -> Value {
        let url = format!("{}/readyz", self.base(index));
        soon(
            &format!(
                "/readyz on {} answering {status}",
                self.replicas[index].name
            ),
            async {
                loop {
                    if let Ok(response) = self.http.get(&url).send().await
                        && response.status() == status
                    {
                        return response.json().await.unwrap_or(Value::Null);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await
    }

    /// Starts a silent removal on replica `index`; checks the 202 and returns the id.
    async fn remove(&self, index: usize, call: &str, context: &str) -> String {
        self.remove_scripted(index, call, context, silent()).await
    }

    /// Starts a removal on replica `index` that the emulator answers as `script` says;
    /// checks the 202 and returns the id.
    async fn remove_scripted(
        &self,
        index: usize,
        call: &str,
        context: &str,
        script: callops::emulator::Script,
    ) -> String {
        self.emulator.set_script(call, script);
        let response = self
            .http
            .post(format!(
                "{}/v1/acs/callConnections/{call}/participants:remove",
                self.base(index)
            ))
            .json(&json!({"participantToRemove": {"rawId": "8:acs:bob"}, "operationContext": context}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(
            status, 202,
            "create on {}: {body}",
            self.replicas[index].name
        );
        let operation: Value = serde_json::from_str(&body).unwrap();
        operation["id"].as_str().unwrap().to_owned()
    }

    /// `GET /v1/operations/{id}` on replica `index`, answered 200.
    async fn operation(&self, index: usize, id: &str) -> Value {
        let response = self
            .http
            .get(format!("{}/v1/operations/{id}", self.base(index)))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(
            status, 200,
            "operation {id} on {}: {body}",
            self.replicas[index].name
        );
        serde_json::from_str(&body).unwrap()
    }

    /// Polls the operation on replica `index` until `done` holds (bounded).
    async fn operation_until(
        &self,
        index: usize,
        id: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let last = std::sync::Mutex::new(Value::Null);
        let found = tokio::time::timeout(SOON, async {
            loop {
                let operation = self.operation(index, id).await;
                if done(&operation) {
                    return operation;
                }
                *last.lock().unwrap() = operation;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "operation {id} on {}: timed out; last seen {}",
                self.replicas[index].name,
                last.lock().unwrap()
            )
        })
    }

    async fn until_status(&self, index: usize, id: &str, status: &str) -> Value {
        self.operation_until(index, id, |operation| operation["status"] == status)
            .await
    }

    /// A signed callback delivery to replica `index`: its status (and summary), or the
    /// connection error.
    async fn deliver(&self, index: usize, event: &Value) -> Result<(u16, Value), reqwest::Error> {
        deliver(&self.http, &self.emulator, &self.base(index), event).await
    }

    /// A signed callback delivery to replica `index`, answered 200; its summary.
    async fn callback(&self, index: usize, event: &Value) -> Value {
        let (status, summary) = self.deliver(index, event).await.unwrap();
        assert_eq!(
            status, 200,
            "callback on {}: {summary}",
            self.replicas[index].name
        );
        summary
    }

    /// The number of long polls waiting on replica `index` (from `/healthz`).
    async fn long_polls(&self, index: usize) -> u64 {
        let health: Value = self
            .http
            .get(format!("{}/healthz", self.base(index)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        health["longPolls"].as_u64().unwrap()
    }
}

/// POSTs `event` to `{base}/callbacks/acs` with the emulator's ACS token.
async fn deliver(
    http: &reqwest::Client,
    emulator: &Emulator,
    base: &str,
    event: &Value,
) -> Result<(u16, Value), reqwest::Error> {
    let response = http
        .post(format!("{base}/callbacks/acs"))
        .bearer_auth(emulator.signer().acs_token())
        .json(event)
        .send()
        .await?;
    let status = response.status().as_u16();
    let body = response.text().await?;
    Ok((
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    ))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for replica in &mut self.replicas {
            if let Some(mut process) = replica.process.take() {
                let _ = process.0.kill();
                let _ = process.0.wait();
            }
        }
        if !std::thread::panicking() {
            return;
        }
        // Keep everything for a look, and show the end of each replica's log.
        let dir = self.dir.take().unwrap().keep();
        let mut stderr = std::io::stderr().lock();
        for replica in &self.replicas {
            let text = std::fs::read_to_string(&replica.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            let _ = writeln!(
                stderr,
                "---- callops {} (port {}), last {} lines of {}",
                replica.name,
                replica.port,
                tail.len(),
                replica.log.display()
            );
            for line in tail {
                let _ = writeln!(stderr, "{line}");
            }
        }
        let _ = writeln!(stderr, "---- kept {}", dir.display());
    }
}

/// As [`within`], naming what did not happen in time.
async fn soon<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(SOON, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {SOON:?} waiting for {what}"))
}

/// The status an ACS RemoveParticipant event settles an operation as.
fn settles_as(succeeded: bool) -> &'static str {
    if succeeded { "Succeeded" } else { "Failed" }
}

/// The ids of the events listed on `operation`.
fn event_ids(operation: &Value) -> Vec<String> {
    operation["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn the_redis_harness_restarts_on_the_same_port_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut redis) = RedisServer::start(dir.path()).await else {
        return;
    };
    assert_eq!(
        redis.command(&["SET", "k", "v1"]).await.as_deref(),
        Some("+OK")
    );
    redis.kill();
    assert_eq!(redis.command(&["PING"]).await, None, "still answering");
    redis.restart().await;
    // Acknowledged before the SIGKILL: in the AOF (appendfsync always).
    assert_eq!(redis.command(&["GET", "k"]).await.as_deref(), Some("$2 v1"));
    assert_eq!(
        redis.command(&["GET", "missing"]).await.as_deref(),
        Some("$-1")
    );
    assert_eq!(redis.subscribed_clients().await, 0);
    let mut subscriber = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
        .await
        .unwrap();
    subscriber
        .write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n")
        .await
        .unwrap();
    soon("the harness's SUBSCRIBE showing in CLIENT LIST", async {
        while redis.subscribed_clients().await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

impl Cluster {
    /// Creates a removal on A, starts a long poll on it there, delivers its callback to B,
    /// and checks the poll answers, settled, within 5 s of the callback's 200.
    async fn long_poll_on_a_woken_from_b(&self, call: &str, context: &str, event_id: &str) {
        // Both replicas listen for settle notices (again, after a Redis restart).
        soon(
            "both replicas subscribed to settle notices (CLIENT LIST)",
            async {
                while self.redis.subscribed_clients().await < self.replicas.len() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await;
        let id = self.remove(0, call, context).await;
        // Running before the poll starts: the upstream's answer cannot be what wakes it.
        self.until_status(0, &id, "Running").await;
        // B reads what A created.
        let on_b = self.operation(1, &id).await;
        assert_eq!(on_b["status"], "Running", "{on_b}");

        let before = self.long_polls(0).await;
        let poll = self
            .http
            .get(format!("{}/v1/operations/{id}?wait=30", self.base(0)));
        let waiting = tokio::spawn(async move { poll.send().await });
        soon("the long poll on A counted in /healthz longPolls", async {
            while self.long_polls(0).await <= before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        // Waiting, and still waiting: nothing has settled it.
        assert!(!waiting.is_finished());

        let summary = self
            .callback(1, &remove_event(event_id, call, context, true))
            .await;
        assert_eq!(summary["matched"], 1, "{summary}");
        let delivered = Instant::now();
        let answered = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the long poll on A was not woken within 5 s of the callback on B")
            .unwrap()
            .unwrap();
        assert!(delivered.elapsed() < Duration::from_secs(5));
        assert_eq!(answered.status(), 200);
        let operation: Value = answered.json().await.unwrap();
        assert_eq!(operation["status"], "Succeeded", "{operation}");
        assert_eq!(event_ids(&operation), [event_id], "{operation}");
    }
}

#[tokio::test]
async fn a_long_poll_on_a_is_woken_by_a_callback_that_reaches_b() {
    // The periodic re-read is a minute away: only the settle notice can wake the poll.
    let Some(cluster) = Cluster::start(&[("CALLOPS_STORE__REDIS_POLL_MS", "60000")]).await else {
        return;
    };
    cluster
        .long_poll_on_a_woken_from_b("call-wake", "ctx-wake", "evt-wake")
        .await;
}

#[tokio::test]
async fn after_redis_restarts_a_long_poll_on_a_is_still_woken_by_a_callback_on_b() {
    let env = [
        ("CALLOPS_STORE__REDIS_POLL_MS", "60000"),
        ("CALLOPS_STORE__REDIS_TIMEOUT_MS", "500"),
    ];
    let Some(mut cluster) = Cluster::start(&env).await else {
        return;
    };
    cluster.redis.kill();
    for replica in [0, 1] {
        cluster.until_ready(replica, 503).await;
    }
    cluster.redis.restart().await;
    for replica in [0, 1] {
        cluster.until_ready(replica, 200).await;
    }
    // The settle notices flow again (both replicas are subscribed again).
    cluster
        .long_poll_on_a_woken_from_b("call-rewake", "ctx-rewake", "evt-rewake")
        .await;
}

#[tokio::test]
async fn a_duplicate_delivered_to_a_and_b_at_once_is_applied_once() {
    let Some(cluster) = Cluster::start(&[]).await else {
        return;
    };
    for i in 0..20 {
        let (call, context) = (format!("call-dup-{i}"), format!("ctx-dup-{i}"));
        let id = cluster.remove(i % 2, &call, &context).await;
        let succeeded = i % 3 != 0;
        let event = remove_event(&format!("evt-dup-{i}"), &call, &context, succeeded);
        let (a, b) = tokio::join!(cluster.callback(0, &event), cluster.callback(1, &event));
        let matched = a["matched"].as_u64().unwrap() + b["matched"].as_u64().unwrap();
        let duplicates = a["duplicates"].as_u64().unwrap() + b["duplicates"].as_u64().unwrap();
        assert_eq!((matched, duplicates), (1, 1), "#{i}: A {a}, B {b}");
        for replica in [0, 1] {
            let operation = cluster.operation(replica, &id).await;
            assert_eq!(
                operation["status"],
                settles_as(succeeded),
                "#{i}: {operation}"
            );
            assert_eq!(
                event_ids(&operation),
                [format!("evt-dup-{i}")],
                "#{i}: {operation}"
            );
        }
    }
}

#[tokio::test]
async fn racing_callbacks_and_the_upstream_answer_on_a_and_b_never_regress_an_operation() {
    let Some(cluster) = Cluster::start(&[]).await else {
        return;
    };
    let mut settled = Vec::new();
    for i in 0..20 {
        let (call, context) = (format!("call-race-{i}"), format!("ctx-race-{i}"));
        // Created on A, which sends it to ACS and marks it Running meanwhile; the callback
        // reaches B right after the 202, and a different (also final) one reaches A.
        let id = cluster.remove(0, &call, &context).await;
        let success = remove_event(&format!("evt-race-s-{i}"), &call, &context, true);
        let failure = remove_event(&format!("evt-race-f-{i}"), &call, &context, false);
        let (b, a) = tokio::join!(cluster.callback(1, &success), cluster.callback(0, &failure));
        let matched = a["matched"].as_u64().unwrap() + b["matched"].as_u64().unwrap();
        assert!(matched >= 1, "#{i}: A {a}, B {b}");
        settled.push((i, call, id));
    }
    for (i, call, id) in &settled {
        // ACS has answered A: its "Running" has been (or is being) written.
        cluster.emulator_requests(call).await;
        let operation = cluster
            .operation_until(1, id, |operation| operation["status"] != "Running")
            .await;
        check_one_applied(*i, &operation);
    }
    // Nothing moves them afterwards, whichever replica reads them.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        for (i, _, id) in &settled {
            for replica in [0, 1] {
                check_one_applied(*i, &cluster.operation(replica, id).await);
            }
        }
    }
}

/// Both final events are listed, exactly one applied, and the status is the applied one's.
fn check_one_applied(i: usize, operation: &Value) {
    let events = operation["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "#{i}: {operation}");
    let applied: Vec<&Value> = events
        .iter()
        .filter(|event| event["effect"] == "applied")
        .collect();
    assert_eq!(applied.len(), 1, "#{i}: {operation}");
    let succeeded = applied[0]["type"] == "Microsoft.Communication.RemoveParticipantSucceeded";
    assert_eq!(
        operation["status"],
        settles_as(succeeded),
        "#{i}: {operation}"
    );
    let other = events
        .iter()
        .find(|event| event["effect"] != "applied")
        .unwrap();
    assert_eq!(other["effect"], "ignored", "#{i}: {operation}");
}

/// A removal started through the API, the callback that settles it, and whether that
/// callback says it succeeded.
type Removal = (String, Value, bool);

impl Cluster {
    /// `count` removals `call-{tag}-{i}` / `ctx-{tag}-{i}`, started on A and B in turn, each
    /// with its callback (`evt-{tag}-{i}`, succeeded when `succeeds(i)`).
    async fn removals(
        &self,
        tag: &str,
        count: usize,
        succeeds: impl Fn(usize) -> bool,
    ) -> Vec<Removal> {
        let mut removals = Vec::with_capacity(count);
        for i in 0..count {
            let (call, context) = (format!("call-{tag}-{i}"), format!("ctx-{tag}-{i}"));
            let id = self.remove(i % 2, &call, &context).await;
            let event = remove_event(&format!("evt-{tag}-{i}"), &call, &context, succeeds(i));
            removals.push((id, event, succeeds(i)));
        }
        removals
    }

    /// Asserts that replica `index` reads removal #`i` settled as its callback says, with
    /// that callback listed once.
    async fn settled_once(&self, index: usize, i: usize, (id, event, succeeded): &Removal) {
        let operation = self.operation(index, id).await;
        assert_eq!(
            operation["status"],
            settles_as(*succeeded),
            "#{i}: {operation}"
        );
        assert_eq!(
            event_ids(&operation),
            [event[0]["id"].as_str().unwrap()],
            "#{i}: {operation}"
        );
    }

    /// Waits until the emulator has received the removal for `call`.
    async fn emulator_requests(&self, call: &str) {
        let path = format!("/calling/callConnections/{call}/participants:remove");
        soon(
            &format!("the emulator receiving the removal for {call}"),
            async {
                while !self
                    .emulator
                    .requests()
                    .iter()
                    .any(|request| request.path_and_query.starts_with(&path))
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await;
    }
}

#[tokio::test]
async fn a_replica_killed_mid_flight_loses_nothing_acknowledged() {
    let Some(mut cluster) = Cluster::start(&[]).await else {
        return;
    };
    const OPERATIONS: usize = 50;
    let operations = cluster.removals("kill", OPERATIONS, |i| i % 4 != 0).await;

    // Callbacks to A and B on four streams, and more operations created on A, while A is
    // SIGKILLed.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for stream in 0..4 {
        let http = cluster.http.clone();
        let emulator = cluster.emulator.clone();
        let bases = [cluster.base(0), cluster.base(1)];
        let events: Vec<(usize, Value)> = operations
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 4 == stream)
            .map(|(i, (_, event, _))| (i, event.clone()))
            .collect();
        let acknowledged = acknowledged.clone();
        streams.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for (i, event) in events {
                // Alternate replicas (A gets half of each stream's callbacks).
                let outcome = deliver(&http, &emulator, &bases[(i / 4) % 2], &event).await;
                if matches!(outcome, Ok((200, _))) {
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                outcomes.push((i, outcome.map(|(status, _)| status).ok()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            outcomes
        }));
    }
    let creating = {
        let http = cluster.http.clone();
        let base = cluster.base(0);
        let emulator = cluster.emulator.clone();
        tokio::spawn(async move {
            let mut created = Vec::new();
            for i in 0..30 {
                let call = format!("call-kill-late-{i}");
                emulator.set_script(&call, silent());
                let response = http
                    .post(format!(
                        "{base}/v1/acs/callConnections/{call}/participants:remove"
                    ))
                    .json(&json!({"participantToRemove": {"rawId": "8:acs:bob"}}))
                    .send()
                    .await;
                let Ok(response) = response else { break };
                if response.status() == 202
                    && let Ok(operation) = response.json::<Value>().await
                {
                    created.push(operation["id"].as_str().unwrap().to_owned());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            created
        })
    };
    soon(
        "a third of the callbacks acknowledged before A is killed",
        async {
            while acknowledged.load(Ordering::SeqCst) < OPERATIONS / 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        },
    )
    .await;
    cluster.kill(0);

    let mut outcomes = Vec::new();
    for stream in streams {
        outcomes.extend(within(stream).await.unwrap());
    }
    let created = within(creating).await.unwrap();
    let failed_on_a = outcomes
        .iter()
        .filter(|(_, status)| *status != Some(200))
        .count();
    assert!(
        failed_on_a > 0,
        "A was killed after every callback had been answered: not mid-flight"
    );
    assert!(!created.is_empty());
    // Every operation answered 202 is readable on B, whichever replica created it.
    for id in operations.iter().map(|(id, _, _)| id).chain(&created) {
        cluster.operation(1, id).await;
    }
    // Every acknowledged callback has settled its operation, once.
    for (i, status) in &outcomes {
        if *status == Some(200) {
            cluster.settled_once(1, *i, &operations[*i]).await;
        }
    }
    // The platform retries the rest, on B: everything settles, each event listed once.
    for (i, status) in &outcomes {
        if *status != Some(200) {
            let (_, event, _) = &operations[*i];
            let summary = cluster.callback(1, event).await;
            assert_eq!(
                summary["matched"].as_u64().unwrap() + summary["duplicates"].as_u64().unwrap(),
                1,
                "#{i}: {summary}"
            );
        }
    }
    for (i, removal) in operations.iter().enumerate() {
        cluster.settled_once(1, i, removal).await;
    }
}

#[tokio::test]
async fn while_redis_is_down_callbacks_get_503_and_readyz_503_then_both_recover() {
    let Some(mut cluster) = Cluster::start(&[("CALLOPS_STORE__REDIS_TIMEOUT_MS", "500")]).await
    else {
        return;
    };
    let id = cluster.remove(0, "call-down", "ctx-down").await;
    cluster.until_status(0, &id, "Running").await;
    let event = remove_event("evt-down", "call-down", "ctx-down", true);

    cluster.redis.kill();
    for replica in [0, 1] {
        let ready = cluster.until_ready(replica, 503).await;
        assert_eq!(ready["checks"]["callbackKeys"]["acs"], "ok", "{ready}");
        assert_ne!(ready["checks"]["store"], "ok", "{ready}");
    }
    // Never acknowledged while Redis is down, on either replica, however often retried.
    for attempt in 0..3 {
        for replica in [0, 1] {
            let (status, body) = cluster.deliver(replica, &event).await.unwrap();
            assert_eq!(status, 503, "attempt {attempt} on {replica}: {body}");
        }
    }

    // Back on the same port, with the same AOF; the replicas carry on without a restart.
    cluster.redis.restart().await;
    for replica in [0, 1] {
        let ready = cluster.until_ready(replica, 200).await;
        assert_eq!(ready["checks"]["store"], "ok", "{ready}");
    }
    let summary = soon("a callback accepted by B after Redis came back", async {
        loop {
            match cluster.deliver(1, &event).await {
                Ok((200, summary)) => return summary,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    // The 503s left nothing behind: this is its first (and only) application.
    assert_eq!(summary["matched"], 1, "{summary}");
    for replica in [0, 1] {
        let operation = cluster.operation(replica, &id).await;
        assert_eq!(operation["status"], "Succeeded", "{operation}");
        assert_eq!(event_ids(&operation), ["evt-down"], "{operation}");
    }
}

#[tokio::test]
async fn redis_sigkilled_and_restarted_mid_run_loses_nothing_acknowledged() {
    let Some(mut cluster) = Cluster::start(&[("CALLOPS_STORE__REDIS_TIMEOUT_MS", "500")]).await
    else {
        return;
    };
    const OPERATIONS: usize = 40;
    let operations = cluster.removals("aof", OPERATIONS, |i| i % 3 != 0).await;

    // Each callback goes to A or B, and is retried there until it is acknowledged.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let delivering = {
        let http = cluster.http.clone();
        let emulator = cluster.emulator.clone();
        let bases = [cluster.base(0), cluster.base(1)];
        let events: Vec<Value> = operations.iter().map(|(_, e, _)| e.clone()).collect();
        let (acknowledged, refused) = (acknowledged.clone(), refused.clone());
        tokio::spawn(async move {
            for (i, event) in events.iter().enumerate() {
                loop {
                    match deliver(&http, &emulator, &bases[i % 2], event).await {
                        Ok((200, _)) => break,
                        Ok((status, _)) => {
                            assert!(status >= 500, "#{i}: {status}");
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                acknowledged.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    soon(
        "a third of the callbacks acknowledged before Redis is killed",
        async {
            while acknowledged.load(Ordering::SeqCst) < OPERATIONS / 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        },
    )
    .await;
    cluster.redis.kill();
    // Down long enough that deliveries are refused, then back on the same port and AOF.
    soon("a delivery refused while Redis is down", async {
        while refused.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let acknowledged_while_down = acknowledged.load(Ordering::SeqCst);
    cluster.redis.restart().await;
    tokio::time::timeout(Duration::from_secs(25), delivering)
        .await
        .expect("the callbacks were not all acknowledged after Redis came back")
        .unwrap();
    assert!(acknowledged_while_down < OPERATIONS, "not mid-run");

    for (i, removal) in operations.iter().enumerate() {
        for replica in [0, 1] {
            cluster.settled_once(replica, i, removal).await;
        }
    }
}

#[tokio::test]
async fn a_callback_parked_on_b_settles_the_operation_later_created_on_a() {
    let Some(cluster) = Cluster::start(&[]).await else {
        return;
    };
    let event = remove_event("evt-early", "call-early", "ctx-early", false);
    let summary = cluster.callback(1, &event).await;
    assert_eq!(summary["parked"], 1, "{summary}");

    let id = cluster.remove(0, "call-early", "ctx-early").await;
    for replica in [0, 1] {
        let operation = cluster.until_status(replica, &id, "Failed").await;
        assert_eq!(event_ids(&operation), ["evt-early"], "{operation}");
    }
    // Applied: delivered again, to either replica, it is a duplicate.
    let summary = cluster.callback(0, &event).await;
    assert_eq!(summary["duplicates"], 1, "{summary}");
    let operation = cluster.operation(1, &id).await;
    assert_eq!(event_ids(&operation), ["evt-early"], "{operation}");
}

#[tokio::test]
async fn deployments_under_different_prefixes_share_a_redis_without_seeing_each_other() {
    let Some(cluster) = Cluster::start_each([
        &[("CALLOPS_STORE__REDIS_PREFIX", "deploy-x1")],
        &[("CALLOPS_STORE__REDIS_PREFIX", "deploy-y2")],
    ])
    .await
    else {
        return;
    };
    let id = cluster.remove(0, "call-prefix", "ctx-prefix").await;
    cluster.until_status(0, &id, "Running").await;
    let other = cluster
        .http
        .get(format!("{}/v1/operations/{id}", cluster.base(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    // Its callback, delivered to the other deployment, finds nothing there to settle.
    let event = remove_event("evt-prefix", "call-prefix", "ctx-prefix", true);
    let summary = cluster.callback(1, &event).await;
    assert_eq!(summary["matched"], 0, "{summary}");
    let operation = cluster.operation(0, &id).await;
    assert_eq!(operation["status"], "Running", "{operation}");
    // Every key is under one of the two prefixes (a `{…}` hash tag allowed).
    let keys = cluster
        .redis
        .command(&[
            "EVAL",
            "return table.concat(redis.call('KEYS', '*'), ' ')",
            "0",
        ])
        .await
        .unwrap();
    let keys: Vec<&str> = keys.split(' ').skip(1).collect();
    assert!(!keys.is_empty());
    for key in &keys {
        let key = key.trim_start_matches('{');
        assert!(
            key.starts_with("deploy-x1") || key.starts_with("deploy-y2"),
            "{key} in {keys:?}"
        );
    }
    assert!(keys.iter().any(|key| key.contains("deploy-x1")), "{keys:?}");
    // Its own deployment settles it.
    let summary = cluster.callback(0, &event).await;
    assert_eq!(summary["matched"], 1, "{summary}");
    cluster.until_status(0, &id, "Succeeded").await;
}

/// Upstream retries and per-attempt deadlines small enough that the dispatch budget (the
/// longest a replica may take to send a request, retries included, plus 5 s) is 7 s.
const SMALL_BUDGET: &[(&str, &str)] = &[
    ("CALLOPS_ACS__RETRY__TOTAL_TIMEOUT_MS", "1500"),
    ("CALLOPS_ACS__REQUEST_TIMEOUT_MS", "500"),
    ("CALLOPS_GRAPH__RETRY__TOTAL_TIMEOUT_MS", "1500"),
    ("CALLOPS_GRAPH__REQUEST_TIMEOUT_MS", "500"),
];
const BUDGET: Duration = Duration::from_secs(7);

impl Cluster {
    /// The removal requests the emulator has received for `call`, in arrival order.
    fn removal_requests(&self, call: &str) -> Vec<callops::emulator::RecordedRequest> {
        let path = format!("/calling/callConnections/{call}/participants:remove");
        self.emulator
            .requests()
            .into_iter()
            .filter(|request| request.path_and_query.starts_with(&path))
            .collect()
    }

    /// Waits until the emulator has received `count` removal requests for `call`, at most
    /// `limit`.
    async fn until_removal_requests(
        &self,
        call: &str,
        count: usize,
        limit: Duration,
    ) -> Vec<callops::emulator::RecordedRequest> {
        tokio::time::timeout(limit, async {
            loop {
                let requests = self.removal_requests(call);
                if requests.len() >= count {
                    return requests;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the emulator did not receive {count} removal request(s) for {call} within {limit:?}; it got {}",
                self.removal_requests(call).len()
            )
        })
    }

    /// How many operations the shared store lists as still owed to the upstream.
    async fn unsent(&self) -> String {
        self.redis
            .command(&["ZCARD", "{callops}:index:unsent"])
            .await
            .expect("Redis answering ZCARD")
    }
}

/// A request's `Repeatability-Request-ID` and `Repeatability-First-Sent`.
fn repeatability(request: &callops::emulator::RecordedRequest) -> (String, String) {
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

#[tokio::test]
async fn a_removal_whose_replica_died_while_retrying_is_sent_again_once_by_another() {
    let Some(mut cluster) = Cluster::start(SMALL_BUDGET).await else {
        return;
    };
    let call = "call-orphan";
    // ACS answers the first attempt 503 and asks for a second's wait: A is killed in it.
    let script = callops::emulator::Script {
        fail_first: vec![503],
        retry_after_secs: Some(1.0),
        ..Default::default()
    };
    let id = cluster.remove_scripted(0, call, "ctx-orphan", script).await;
    let created = Instant::now();
    let first = cluster
        .until_removal_requests(call, 1, SOON)
        .await
        .remove(0);
    assert_eq!(first.status, 503, "the first attempt was not answered 503");
    cluster.kill(0);
    assert_eq!(
        cluster.removal_requests(call).len(),
        1,
        "A sent its retry before it was killed: not mid-retry"
    );
    let operation = cluster.operation(1, &id).await;
    assert_eq!(
        operation["status"], "NotStarted",
        "the removal was answered before A was killed: {operation}"
    );
    assert!(
        operation.get("pending").is_none(),
        "the API showed the request still owed: {operation}"
    );
    // A comes back at once: two replicas may now claim the orphan.
    cluster.spawn(0, SMALL_BUDGET);
    cluster.until_up(0).await;

    let requests = cluster.until_removal_requests(call, 2, BUDGET + SOON).await;
    assert!(
        created.elapsed() >= BUDGET - Duration::from_secs(1),
        "the removal was sent again {:?} after its creation, before the dispatch budget ({BUDGET:?}) passed",
        created.elapsed()
    );
    assert_eq!(
        requests[1].status, 202,
        "the removal sent again was not accepted"
    );
    assert_eq!(
        repeatability(&requests[1]),
        repeatability(&first),
        "the removal was not sent again with its repeatability pair"
    );
    // Each test replica has its own callback URL; behind one public URL they would agree.
    let without_callback = |body: &serde_json::Value| {
        let mut body = body.clone();
        body.as_object_mut()
            .map(|body| body.remove("operationCallbackUri"));
        body
    };
    assert_eq!(
        without_callback(&requests[1].body),
        without_callback(&first.body),
        "the removal sent again was not the same request"
    );
    for replica in [0, 1] {
        let operation = cluster.until_status(replica, &id, "Succeeded").await;
        assert!(
            operation.get("pending").is_none(),
            "the API showed the request still owed: {operation}"
        );
    }
    // Answered: nothing is left to send, and it was sent again once (not once per replica).
    soon("the answered removal leaving index:unsent", async {
        while cluster.unsent().await != ":0" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let requests = cluster.removal_requests(call);
    assert_eq!(
        requests.len(),
        2,
        "the removal was not sent again exactly once: {requests:?}"
    );
}

#[tokio::test]
async fn with_both_replicas_alive_a_removal_is_never_sent_again() {
    let Some(cluster) = Cluster::start(SMALL_BUDGET).await else {
        return;
    };
    // One removal on each replica, accepted without a callback (the test delivers it, once
    // the answer is recorded); A's is first answered 503, and retried by A itself a second
    // later, while B looks for orphans four times a second.
    let retried = callops::emulator::Script {
        fail_first: vec![503],
        retry_after_secs: Some(1.0),
        ..silent()
    };
    let removals = [
        (0, "call-alive-a", "ctx-alive-a", retried, 2),
        (1, "call-alive-b", "ctx-alive-b", silent(), 1),
    ];
    let mut ids = Vec::new();
    for (replica, call, context, script, _) in removals.clone() {
        ids.push(
            cluster
                .remove_scripted(replica, call, context, script)
                .await,
        );
    }
    let created = Instant::now();
    for id in &ids {
        cluster.until_status(0, id, "Running").await;
        cluster.until_status(1, id, "Running").await;
    }
    // Answered: no longer listed as owed (the entry goes right after the answer's commit).
    tokio::time::timeout(Duration::from_secs(2), async {
        while cluster.unsent().await != ":0" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("answered removals were still listed as owed (index:unsent)"));
    for (id, (replica, call, context, _, _)) in ids.iter().zip(removals.clone()) {
        let event = remove_event(&format!("evt-{call}"), call, context, true);
        let summary = cluster.callback(1 - replica, &event).await;
        assert_eq!(
            summary["matched"], 1,
            "the callback for {call} did not match: {summary}"
        );
        cluster.until_status(replica, id, "Succeeded").await;
    }
    // Past the dispatch budget, with a few claim rounds on both replicas: nobody sent
    // anything again. (This wait proves a negative: nothing more may happen.)
    tokio::time::sleep_until((created + BUDGET + Duration::from_secs(1)).into()).await;
    for (_, call, _, _, sent) in removals {
        let requests = cluster.removal_requests(call);
        assert_eq!(
            requests.len(),
            sent,
            "the removal on {call} was not sent exactly {sent} time(s): {requests:?}"
        );
        let pairs: std::collections::BTreeSet<(String, String)> =
            requests.iter().map(repeatability).collect();
        assert_eq!(
            pairs.len(),
            1,
            "the removal on {call} was sent with more than one repeatability pair"
        );
    }
}

/// On a shared store, a subscription made on A hears every removal settled on either
/// replica, each once per webhook-id (one replica attempts a delivery at a time, though
/// both see it), signed; a stream open on A sees the changes made on B.
#[tokio::test]
async fn webhooks_and_the_stream_span_replicas() {
    use crate::receiver::{Mode, Receiver};
    use crate::stream::SseClient;
    let env = [
        ("CALLOPS_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true"),
        ("CALLOPS_WEBHOOKS__INITIAL_DELAY_MS", "20"),
        ("CALLOPS_WEBHOOKS__MAX_DELAY_MS", "200"),
        ("CALLOPS_WEBHOOKS__REQUEST_TIMEOUT_MS", "1000"),
    ];
    let Some(cluster) = Cluster::start(&env).await else {
        return;
    };
    let receiver = Receiver::start(Mode::Status(503)).await;
    let response = cluster
        .http
        .post(format!("{}/v1/subscriptions", cluster.base(0)))
        .json(&json!({"url": receiver.url(), "eventTypes": ["operation.settled"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let subscription: Value = response.json().await.unwrap();
    receiver.trust(subscription["secret"].as_str().unwrap());
    let mut stream = SseClient::open(
        &cluster.http,
        &format!("{}/v1/operations:stream?status=Succeeded", cluster.base(0)),
        None,
    )
    .await;
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..8 {
        let (call, context) = (format!("call-wh-{i}"), format!("ctx-wh-{i}"));
        let id = cluster.remove(i % 2, &call, &context).await;
        cluster.until_status(i % 2, &id, "Running").await;
        cluster
            .callback(
                1 - i % 2,
                &remove_event(&format!("evt-wh-{i}"), &call, &context, true),
            )
            .await;
        expected.insert(id);
    }
    soon("failed attempts at the receiver", async {
        while receiver.received().len() < 8 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    receiver.set_mode(Mode::Accept);
    receiver.until_delivered(&expected).await;
    receiver.one_signed_id_per_operation();
    let events = stream
        .until(|events| {
            events
                .iter()
                .filter(|e| e.event == "operation.settled")
                .count()
                == expected.len()
        })
        .await;
    let streamed: std::collections::BTreeSet<String> = events
        .iter()
        .map(|e| e.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(streamed, expected);
}

/// Both replicas sweep the same operations; each removal past its deadline is reconciled by
/// one of them only (the one whose commit marked it), so ACS is asked about it once.
#[tokio::test]
async fn each_operation_is_reconciled_by_one_replica() {
    let env: &[(&str, &str)] = &[
        (
            "CALLOPS_OPERATIONS__CALLBACK_TIMEOUTS__REMOVE_PARTICIPANT_SECS",
            "1",
        ),
        ("CALLOPS_OPERATIONS__SWEEP_INTERVAL_MS", "20"),
    ];
    let Some(cluster) = Cluster::start(env).await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..6 {
        let call = format!("call-reconciled-{i}");
        ids.push((call.clone(), cluster.remove(i % 2, &call, "ctx").await));
    }
    for (call, id) in &ids {
        let operation = cluster.until_status(0, id, "Succeeded").await;
        assert_eq!(operation["reconciled"], true, "{operation}");
        let asked = cluster
            .emulator
            .requests()
            .into_iter()
            .filter(|request| {
                request.method == "GET"
                    && request
                        .path_and_query
                        .starts_with(&format!("/calling/callConnections/{call}/participants/"))
            })
            .count();
        assert_eq!(asked, 1, "{call}: ACS asked {asked} times");
    }
}
