//! Upgrade safety: stores written by the previous release (f8423cd, before the storage-core
//! change) opened by this build. The fixtures under `tests/fixtures/upgrade/` were written by
//! that release's binary (`scripts/make-upgrade-fixtures.sh`; see the README there): a
//! settled ACS removal, a settled Graph cancel with the prompt it cancelled, a removal still
//! running, and a parked callback, on SQLite (`v1-sqlite/callops.db`) and on Redis
//! (`v1-redis/dump.rdb`). Each directory's `expected.json` is what the old release showed.
//!
//! Every test works on a copy, with retention, dedupe, park and callback-timeout windows far
//! longer than the fixtures' age: those windows are wall-clock, and the fixtures grow older
//! with every run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use callops::config::Config;
use serde_json::Value;

use crate::binary::free_port;
use crate::redis::redis_server_available;
use crate::support::{TestApp, remove_event, silent, within};

/// Ten years: longer than any fixture will be old.
const TEN_YEARS_SECS: u64 = 10 * 365 * 24 * 3600;

/// The prefix the old release wrote its Redis keys under (its default).
const REDIS_PREFIX: &str = "callops";

/// The callback the test delivers to settle the removal the old release left running.
const RUNNING_CALLBACK_ID: &str = "upgrade-running-callback-1";

/// `tests/fixtures/upgrade/{dir}`.
fn fixture_dir(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upgrade")
        .join(dir)
}

/// The old release's view of its data set (`{dir}/expected.json`).
fn expected(dir: &str) -> Value {
    let path = fixture_dir(dir).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} in expected.json"))
}

/// The configuration for opening a fixture: `location`, the old release's Redis prefix, and
/// windows longer than the fixtures' age (a park window of `park_ttl_ms`).
fn upgrade_config(config: &mut Config, location: &str, park_ttl_ms: u64) {
    config.store.location = location.to_owned();
    config.store.redis_prefix = REDIS_PREFIX.to_owned();
    // The previous release's store has one partition.
    config.store.redis_partitions = 1;
    let operations = &mut config.operations;
    operations.retention_secs = TEN_YEARS_SECS;
    operations.dedupe_ttl_secs = 2 * TEN_YEARS_SECS;
    operations.park_ttl_ms = park_ttl_ms;
    operations.sweep_interval_ms = 50;
    operations.callback_timeouts.remove_participant_secs = TEN_YEARS_SECS;
    operations.callback_timeouts.cancel_media_processing_secs = TEN_YEARS_SECS;
    operations.callback_timeouts.observed_secs = TEN_YEARS_SECS;
}

/// This build on `location`, once it answers `/healthz` (a failed start fails the test with
/// the error it returned).
async fn start(location: &str, park_ttl_ms: u64) -> TestApp {
    let mut app = TestApp::spawn_with(|config| upgrade_config(config, location, park_ttl_ms)).await;
    let up = within(async {
        loop {
            if app.server.is_finished() {
                return false;
            }
            if let Ok(response) = app.http.get(app.url("/healthz")).send().await
                && response.status() == 200
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if !up {
        let result = (&mut app.server).await;
        panic!("this build did not start on the old release's store {location}: {result:?}");
    }
    app
}

/// Stops `app` cleanly (as on SIGTERM) and checks it stopped without an error.
async fn stop(app: TestApp) {
    app.shutdown.cancel();
    let result = within(app.server).await.expect("the server task");
    assert!(
        result.is_ok(),
        "this build did not stop cleanly: {result:?}"
    );
}

/// `GET /v1/operations/{id}`, which must answer 200.
async fn read(app: &TestApp, id: &str, what: &str) -> Value {
    let response = app.get(&format!("/v1/operations/{id}")).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(
        status, 200,
        "{what} ({id}) is not readable after the upgrade: {body}"
    );
    serde_json::from_str(&body).unwrap()
}

/// Every field `old` shows is shown unchanged by `new` (which may add fields of its own).
fn assert_shows_the_same(old: &Value, new: &Value, what: &str) {
    let old_fields = old.as_object().expect("an operation object");
    for (field, value) in old_fields {
        assert_eq!(
            new.get(field),
            Some(value),
            "{what} ({}): field {field:?} changed across the upgrade\n old: {old}\n new: {new}",
            old["id"]
        );
    }
}

/// Every operation of `expected` (the old release's view) reads the same, but the running
/// removal, which is checked apart (it may have settled since).
async fn assert_old_operations_unchanged(app: &TestApp, expected: &Value, running_settled: bool) {
    let running = text(expected, "/runningRemoval/id");
    for old in expected["operations"].as_array().expect("operations") {
        let id = old["id"].as_str().unwrap();
        let new = read(app, id, "an operation written by the old release").await;
        if id == running && running_settled {
            // Settled by the callback this test delivered: the rest is unchanged.
            for field in [
                "id",
                "kind",
                "context",
                "callConnectionId",
                "createdDateTime",
            ] {
                assert_eq!(new[field], old[field], "running removal: {field}: {new}");
            }
            continue;
        }
        assert_shows_the_same(old, &new, "an operation written by the old release");
    }
}

/// A delivery of `events` to `/callbacks/acs`; its summary.
async fn deliver(app: &TestApp, events: &Value) -> Value {
    app.callback(events).await
}

/// The old release's settled removal's callback, delivered again (same CloudEvent id).
fn settled_removal_redelivery(expected: &Value) -> Value {
    remove_event(
        text(expected, "/settledRemoval/eventId"),
        text(expected, "/settledRemoval/callConnectionId"),
        text(expected, "/settledRemoval/context"),
        true,
    )
}

/// The callback settling the removal the old release left running.
fn running_removal_callback(expected: &Value) -> Value {
    remove_event(
        RUNNING_CALLBACK_ID,
        text(expected, "/runningRemoval/callConnectionId"),
        text(expected, "/runningRemoval/context"),
        true,
    )
}

/// The call and context the old release parked a callback under.
fn parked_on(expected: &Value) -> (&str, &str, &str) {
    (
        text(expected, "/parkedCallback/data/callConnectionId"),
        text(expected, "/parkedCallback/data/operationContext"),
        text(expected, "/parkedCallback/id"),
    )
}

/// The events `/v1/acs/callConnections/{call}/events` lists (none when it answers 404).
async fn call_events(app: &TestApp, call: &str) -> Vec<Value> {
    let response = app
        .get(&format!("/v1/acs/callConnections/{call}/events"))
        .await;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match status.as_u16() {
        200 => body["value"].as_array().expect("value").clone(),
        404 => Vec::new(),
        other => panic!("GET the events of call {call}: {other} {body}"),
    }
}

/// The whole check on the store at `location`, holding the old release's data set (its view
/// is `expected`): this build reads it, carries on with it, and a second start on what it
/// left reads the same again.
async fn check_upgrade(location: &str, expected: &Value) {
    let app = start(location, TEN_YEARS_SECS * 1000).await;

    // 1. Everything the old release wrote reads as it did, the running removal included.
    assert_old_operations_unchanged(&app, expected, false).await;
    let running = text(expected, "/runningRemoval/id");
    let before = read(&app, running, "the running removal").await;
    assert_eq!(
        before["status"], "Running",
        "the removal the old release left running: {before}"
    );

    // 2. A redelivery of the old release's settled removal's callback is a duplicate (its
    //    event id was remembered by the old release).
    let redelivered = deliver(&app, &settled_removal_redelivery(expected)).await;
    assert_eq!(
        redelivered["duplicates"],
        1,
        "a redelivery of the old settled removal's callback event {} is not a duplicate: {redelivered}",
        text(expected, "/settledRemoval/eventId")
    );

    // 3. The running removal settles when its callback arrives.
    let summary = deliver(&app, &running_removal_callback(expected)).await;
    assert_eq!(
        summary["matched"], 1,
        "the callback for the old release's running removal did not match it: {summary}"
    );
    let settled = app
        .operation_until(running, |op| op["status"] == "Succeeded")
        .await;
    assert!(
        settled["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["id"] == RUNNING_CALLBACK_ID && event["effect"] == "applied"),
        "the running removal's settling callback is not on its events: {settled}"
    );
    assert_old_operations_unchanged(&app, expected, true).await;

    // 4. The callback the old release parked is still parked (its window is long here) and
    //    settles the operation that appears for its (call, context).
    let (call, context, parked_id) = parked_on(expected);
    let created = app.remove(call, silent(), Some(context)).await;
    let parked_op = created["id"].as_str().unwrap().to_owned();
    let applied = app
        .operation_until(&parked_op, |op| op["status"] == "Succeeded")
        .await;
    assert!(
        applied["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["id"] == parked_id && event["effect"] == "applied"),
        "the callback the old release parked ({parked_id}) did not settle the operation that appeared for it: {applied}"
    );

    // What this start leaves behind, for the second start to read the same.
    let mut ids: Vec<String> = expected["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["id"].as_str().unwrap().to_owned())
        .collect();
    ids.push(parked_op);
    let mut left = Vec::new();
    for id in &ids {
        left.push(read(&app, id, "an operation before the second start").await);
    }
    stop(app).await;

    // 5. A second start on what this build left: clean, and everything reads the same.
    let app = start(location, TEN_YEARS_SECS * 1000).await;
    for old in &left {
        let id = old["id"].as_str().unwrap();
        let new = read(&app, id, "an operation after the second start").await;
        assert_shows_the_same(old, &new, "after the second start");
    }
    for (events, what) in [
        (
            settled_removal_redelivery(expected),
            "the old settled removal's callback",
        ),
        (
            running_removal_callback(expected),
            "the running removal's callback",
        ),
    ] {
        let summary = deliver(&app, &events).await;
        assert_eq!(
            summary["duplicates"], 1,
            "after the second start, a redelivery of {what} is not a duplicate: {summary}"
        );
    }
    stop(app).await;
}

/// A copy of the SQLite fixture in a directory of its own; the database's path.
fn sqlite_copy(dir: &Path) -> String {
    let source = fixture_dir("v1-sqlite").join("callops.db");
    let target = dir.join("callops.db");
    std::fs::copy(&source, &target).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    for companion in ["-wal", "-shm"] {
        let mut name = source.clone().into_os_string();
        name.push(companion);
        assert!(
            !Path::new(&name).exists(),
            "the fixture must be one file: {} exists",
            Path::new(&name).display()
        );
    }
    target.display().to_string()
}

/// SQLite written by the old release (schema version 1).
///
/// This branch still writes schema version 1, so it opens the file as it is. Once the
/// append-only journal (schema version 2, with its v1 → v2 migration) is merged, this test
/// covers the migration: the first start must migrate the old file and read everything in
/// it, the second start must open the migrated file cleanly and read the same.
#[tokio::test]
async fn sqlite_written_by_the_previous_release_is_read_and_carried_on() {
    let dir = tempfile::tempdir().unwrap();
    let location = sqlite_copy(dir.path());
    check_upgrade(&location, &expected("v1-sqlite")).await;
}

/// A callback the old release parked, whose park window passed while callops was down
/// (here: a 1 ms window): as for a park that expires while callops runs (README, "Early
/// callbacks"), it is kept on its call's events as `unmatched`, and it does not settle an
/// operation that appears for its (call, context) later.
///
/// Fails on the `upgrade` branch as of a4ff959: `OperationStore::restore` (src/store/tracker.rs)
/// drops a stored park older than the park window (and the journal forgets it) without
/// putting it on its call's events, unlike the sweep (and unlike the Redis store, whose sweep
/// moves it: `redis_a_park_that_expired_while_down_is_unmatched_on_its_call` passes).
#[tokio::test]
async fn sqlite_a_park_that_expired_while_down_is_unmatched_on_its_call() {
    let dir = tempfile::tempdir().unwrap();
    let location = sqlite_copy(dir.path());
    let expected = expected("v1-sqlite");
    let app = start(&location, 1).await;
    assert_park_expired_while_down(&app, &expected).await;
    stop(app).await;
}

async fn assert_park_expired_while_down(app: &TestApp, expected: &Value) {
    let (call, context, parked_id) = parked_on(expected);
    let unmatched = within(async {
        loop {
            let events = call_events(app, call).await;
            if let Some(event) = events.into_iter().find(|event| event["id"] == parked_id) {
                return event;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let unmatched = tokio::time::timeout(Duration::from_secs(5), unmatched)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the callback {parked_id} the old release parked, expired while callops was down, \
                 is not on the events of call {call} within 5 s"
            )
        });
    assert_eq!(
        unmatched["effect"], "unmatched",
        "the expired park on its call's events: {unmatched}"
    );
    let created = app.remove(call, silent(), Some(context)).await;
    let id = created["id"].as_str().unwrap();
    let operation = read(app, id, "the operation appearing after the park expired").await;
    assert_ne!(
        operation["status"], "Succeeded",
        "an expired park settled an operation: {operation}"
    );
}

/// A `redis-server` loading a copy of the Redis fixture (`dump.rdb`), on a free loopback
/// port; SIGKILLed on drop.
struct FixtureRedis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl FixtureRedis {
    /// `None` when `redis-server` is missing (the test is skipped, or fails under `CI`).
    async fn start() -> Option<Self> {
        if !redis_server_available() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let source = fixture_dir("v1-redis").join("dump.rdb");
        std::fs::copy(&source, dir.path().join("dump.rdb"))
            .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--dbfilename", "dump.rdb"])
            .args(["--appendonly", "no"])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let mut server = Self {
            port,
            child,
            _dir: dir,
        };
        // Loaded once PING answers PONG (not LOADING); the fixture's keys are then there.
        within(async {
            loop {
                if let Some(status) = server.child.try_wait().unwrap() {
                    panic!("redis-server on port {port} exited: {status}");
                }
                if let Ok(reply) = server.query::<String>(&redis::cmd("PING")).await
                    && reply == "PONG"
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let keys: u64 = server.query(&redis::cmd("DBSIZE")).await.unwrap();
        assert!(keys > 0, "redis-server loaded no key from the fixture");
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        cmd.query_async(&mut connection).await
    }
}

impl Drop for FixtureRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis written by the old release: this build reads the old key layout.
#[tokio::test]
async fn redis_written_by_the_previous_release_is_read_and_carried_on() {
    let Some(redis) = FixtureRedis::start().await else {
        return;
    };
    check_upgrade(&redis.url(), &expected("v1-redis")).await;
}

/// On Redis the park window is fixed when the callback is parked (the old release wrote a
/// ten-year one, as due time on `index:parked`): the window passing while callops was down is
/// simulated by making it due now, before this build starts. As on SQLite, the callback is
/// then kept on its call's events as `unmatched`.
#[tokio::test]
async fn redis_a_park_that_expired_while_down_is_unmatched_on_its_call() {
    let Some(redis) = FixtureRedis::start().await else {
        return;
    };
    let due = format!("{{{REDIS_PREFIX}}}:index:parked");
    let names: Vec<String> = redis
        .query(redis::cmd("ZRANGE").arg(&due).arg(0).arg(-1))
        .await
        .unwrap();
    assert_eq!(
        names.len(),
        1,
        "one park in the fixture, under {due}: {names:?}"
    );
    let updated: u64 = redis
        .query(
            redis::cmd("ZADD")
                .arg(&due)
                .arg("XX")
                .arg("CH")
                .arg(0)
                .arg(&names[0]),
        )
        .await
        .unwrap();
    assert_eq!(updated, 1, "the park's due time was not moved");
    let app = start(&redis.url(), TEN_YEARS_SECS * 1000).await;
    assert_park_expired_while_down(&app, &expected("v1-redis")).await;
    stop(app).await;
}

/// `{callops}:schema`, as the fixture's Redis has it.
async fn layout_version(redis: &FixtureRedis) -> Option<String> {
    redis
        .query(redis::cmd("GET").arg(format!("{{{REDIS_PREFIX}}}:schema")))
        .await
        .unwrap()
}

async fn migration_lock_held(redis: &FixtureRedis) -> bool {
    let held: u64 = redis
        .query(redis::cmd("EXISTS").arg(format!("{{{REDIS_PREFIX}}}:migrating")))
        .await
        .unwrap();
    held > 0
}

/// The previous release wrote no layout version: this build finds its keys, takes the
/// store as version 1, and leaves it at version 2.
#[tokio::test]
async fn redis_the_previous_release_store_is_at_layout_version_2_after_a_start() {
    let Some(redis) = FixtureRedis::start().await else {
        return;
    };
    assert_eq!(layout_version(&redis).await, None);
    let app = start(&redis.url(), TEN_YEARS_SECS * 1000).await;
    assert_eq!(layout_version(&redis).await.as_deref(), Some("2"));
    assert!(!migration_lock_held(&redis).await);
    stop(app).await;
}

/// An empty store gets this build's version; a store from a newer build is refused, naming
/// both versions, and left as it is.
#[tokio::test]
async fn redis_an_empty_store_gets_version_2_and_a_newer_one_is_refused() {
    let Some(redis) = FixtureRedis::start().await else {
        return;
    };
    let open = |prefix: &str| {
        let mut config = Config::embedded();
        config.store.location = redis.url();
        config.store.redis_prefix = prefix.to_owned();
        config.store.redis_partitions = 1;
        async move {
            callops::store::Storage::open(&config, callops::metrics::Metrics::new())
                .await
                .map(drop)
        }
    };
    open("empty").await.expect("an empty store");
    let version: Option<String> = redis
        .query(redis::cmd("GET").arg("{empty}:schema"))
        .await
        .unwrap();
    assert_eq!(version.as_deref(), Some("2"));

    let () = redis
        .query(
            redis::cmd("SET")
                .arg(format!("{{{REDIS_PREFIX}}}:schema"))
                .arg(99),
        )
        .await
        .unwrap();
    let error = open(REDIS_PREFIX)
        .await
        .expect_err("a store from a newer build");
    let message = format!("{error:#}");
    assert!(message.contains("layout version 99"), "{message}");
    assert!(message.contains("newer than version 2"), "{message}");
    assert_eq!(layout_version(&redis).await.as_deref(), Some("99"));
}

/// Two replicas of this build start at once on the previous release's store: one migrates
/// it (the step is logged once across both), the other waits for it; both then serve, the
/// lock is gone and the store is at version 2.
#[tokio::test]
async fn redis_two_replicas_starting_at_once_on_an_old_store_migrate_it_once() {
    let Some(redis) = FixtureRedis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let replicas: Vec<(u16, PathBuf, crate::binary::Process)> = (0..2)
        .map(|i| {
            let port = free_port();
            let log_path = dir.path().join(format!("replica-{i}.log"));
            let log = std::fs::File::create(&log_path).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_callops"))
                .env("RUST_LOG", "callops=info")
                .env("NO_COLOR", "1")
                .env("CALLOPS_LISTEN", format!("127.0.0.1:{port}"))
                .env("CALLOPS_PUBLIC_URL", format!("http://127.0.0.1:{port}"))
                .env("CALLOPS_STORE", redis.url())
                .env("CALLOPS_EMULATOR__LISTEN", "127.0.0.1:0")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            (port, log_path, crate::binary::Process(child))
        })
        .collect();
    for (port, log, _) in &replicas {
        let url = format!("http://127.0.0.1:{port}/healthz");
        within(async {
            loop {
                if let Ok(response) = http.get(&url).send().await
                    && response.status() == 200
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let text = std::fs::read_to_string(log).unwrap();
        assert!(text.contains("callops listening"), "{text}");
    }
    let migrated: usize = replicas
        .iter()
        .map(|(_, log, _)| {
            std::fs::read_to_string(log)
                .unwrap()
                .matches("shared store (Redis) migrated")
                .count()
        })
        .sum();
    assert_eq!(migrated, 1, "the migration step ran {migrated} times");
    assert_eq!(layout_version(&redis).await.as_deref(), Some("2"));
    assert!(!migration_lock_held(&redis).await);
}

/// While another replica holds the migration lock on an old store, a start waits (it has
/// not returned, so nothing is served); once that replica has set the version and let the
/// lock go, the start completes without migrating again.
#[tokio::test]
async fn redis_a_start_waits_while_another_replica_migrates() {
    let Some(redis) = FixtureRedis::start().await else {
        return;
    };
    let lock = format!("{{{REDIS_PREFIX}}}:migrating");
    let () = redis
        .query(
            redis::cmd("SET")
                .arg(&lock)
                .arg("another-replica")
                .arg("PX")
                .arg(30_000),
        )
        .await
        .unwrap();
    let mut config = Config::embedded();
    config.store.location = redis.url();
    config.store.redis_prefix = REDIS_PREFIX.to_owned();
    config.store.redis_partitions = 1;
    let opening = tokio::spawn(async move {
        callops::store::Storage::open(&config, callops::metrics::Metrics::new())
            .await
            .map(drop)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !opening.is_finished(),
        "the start did not wait for the lock"
    );
    assert_eq!(layout_version(&redis).await, None);

    let () = redis
        .query(
            redis::cmd("SET")
                .arg(format!("{{{REDIS_PREFIX}}}:schema"))
                .arg(2),
        )
        .await
        .unwrap();
    let _: u64 = redis.query(redis::cmd("DEL").arg(&lock)).await.unwrap();
    within(opening)
        .await
        .unwrap()
        .expect("the start once the other replica is done");
    assert_eq!(layout_version(&redis).await.as_deref(), Some("2"));
}
