//! The SQLite journal: one database file in WAL mode, written by one dedicated thread.
//!
//! The writer thread owns the only `Connection`. Requests arrive over a channel; the writer
//! blocks for the first, then drains whatever else is queued (up to `max_batch_records`),
//! writes all of it in one transaction with cached prepared statements, commits, and answers
//! every waiter (group commit: the batches that queue up while one transaction is being
//! synced share the next sync). A failed transaction is rolled back and every waiter in it
//! gets the error; the writer carries on. `load` and `close` go through the same channel, so
//! they are ordered after every write handed over before them.
//!
//! Schema (version [`SCHEMA_VERSION`] in `PRAGMA user_version`):
//! - `operations(id TEXT PRIMARY KEY, body BLOB, revision INTEGER)`: a rowid table, since
//!   snapshots are often larger than the twentieth of a page under which `WITHOUT ROWID`
//!   pays; upserts update the row in place, so the id index is untouched on a replace.
//! - `seen(event_id TEXT PRIMARY KEY, at_ms INTEGER) WITHOUT ROWID`, indexed on `at_ms` for
//!   the expiry: small rows, looked up by their key only.
//! - `parked(seq INTEGER PRIMARY KEY, body BLOB, at_ms INTEGER)`: `seq` is the rowid itself.
//! - `events(operation TEXT, ordinal INTEGER, body BLOB, PRIMARY KEY (operation, ordinal))
//!   WITHOUT ROWID`: an operation's events, one row each, written once as they arrive (the
//!   operation's `body` lists none), so a callback's cost does not grow with the timeline.
//!   `ordinal` is the caller's; a range of them is deleted when events are dropped from the
//!   middle of a timeline, and all of an operation's with the operation. Written only along
//!   with a snapshot at least as new as the stored one.
//! - `call_events(call TEXT, seq INTEGER, body BLOB, PRIMARY KEY (call, seq)) WITHOUT ROWID`:
//!   calls' timelines, append-only, trimmed from the front.
//! - `changes(id INTEGER PRIMARY KEY, at_ms INTEGER, body BLOB)`: the change feed; the
//!   writer numbers rows in the transaction that writes them and hands them, committed, to
//!   the sink in that order; trimmed from the front.
//! - `documents(kind TEXT, id TEXT, body BLOB, PRIMARY KEY (kind, id)) WITHOUT ROWID`:
//!   webhook subscriptions and deliveries, upserted and deleted by key.
//!
//! Migrations: [`MIGRATIONS`], numbered steps applied in order at open, in the transaction
//! that sets the version; a new file (version 0) gets the schema directly. Before an
//! existing file is migrated, a consistent copy of it is written beside it (`VACUUM INTO
//! '<file>.v<old>-backup-<unix seconds>'`). Version 1 (before `events` and `call_events`)
//! kept each operation's events inside its `body`; step 2 makes them rows (ordinals 0, 1,
//! ...: the caller renumbers at load what does not fit its bound) and rewrites the body
//! without them. Step 3 adds `changes` and `documents`, empty.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::types::Type;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};
use tokio::sync::oneshot;

use super::lock::StoreLock;
use super::{Batch, Committed, JournalError, JournalStats, Loaded, Sink, SqliteOptions};
use crate::store::schema::{SchemaStatus, Step};

/// One numbered step: from the version before `to` to `to`, inside the open transaction.
pub(super) struct Migration {
    pub(super) to: i64,
    pub(super) what: &'static str,
    pub(super) run: fn(&Transaction<'_>) -> rusqlite::Result<()>,
}

/// Every step, in order. A new file gets every table directly ([`V1_TABLES`],
/// [`V2_TABLES`]), at the last step's version.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        to: 2,
        what: "operations' events move out of their bodies into rows of their own (tables \
               events and call_events)",
        run: migrate_v1,
    },
    Migration {
        to: 3,
        what: "the change feed and the webhook documents (tables changes and documents)",
        run: migrate_v2,
    },
];

/// The schema this build writes; a database with a higher `user_version` is refused.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].to;

/// How long a statement waits for a lock held by another connection (another process on
/// the same file, or a reader checkpointing) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Cap on the WAL file left behind after a checkpoint.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// The version-1 tables; a new file also gets [`V2_TABLES`].
const V1_TABLES: &str = "
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    event_id TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_at_ms ON seen (at_ms);
CREATE TABLE IF NOT EXISTS parked (
    seq INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    at_ms INTEGER NOT NULL
);
";

/// What version 2 added, as step 2 creates it.
const V2_TABLES: &str = "
CREATE TABLE IF NOT EXISTS events (
    operation TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (operation, ordinal)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS call_events (
    call TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (call, seq)
) WITHOUT ROWID;
";

/// What version 3 added, as step 3 creates it.
const V3_TABLES: &str = "
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
";

const INSERT_CHANGE: &str = "INSERT INTO changes (id, at_ms, body) VALUES (?1, ?2, ?3)";
const EXPIRE_CHANGES: &str = "DELETE FROM changes WHERE id <= ?1";
const LAST_CHANGE: &str = "SELECT COALESCE(MAX(id), 0) FROM changes";
const UPSERT_DOCUMENT: &str = "INSERT INTO documents (kind, id, body) VALUES (?1, ?2, ?3) \
     ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body";
const DELETE_DOCUMENT: &str = "DELETE FROM documents WHERE kind = ?1 AND id = ?2";
const SELECT_CHANGES: &str = "SELECT id, at_ms, body FROM changes ORDER BY id";
const SELECT_DOCUMENTS: &str = "SELECT kind, id, body FROM documents ORDER BY kind, id";
const UPSERT_OPERATION: &str = "INSERT INTO operations (id, body, revision) VALUES (?1, ?2, ?3) \
     ON CONFLICT (id) DO UPDATE SET body = excluded.body, revision = excluded.revision \
     WHERE excluded.revision >= operations.revision";
const DELETE_OPERATION: &str = "DELETE FROM operations WHERE id = ?1";
const SELECT_REVISION: &str = "SELECT revision FROM operations WHERE id = ?1";
const INSERT_EVENT: &str =
    "INSERT OR IGNORE INTO events (operation, ordinal, body) VALUES (?1, ?2, ?3)";
const DELETE_EVENTS: &str = "DELETE FROM events WHERE operation = ?1";
const DELETE_EVENT_RANGE: &str =
    "DELETE FROM events WHERE operation = ?1 AND ordinal >= ?2 AND ordinal < ?3";
const INSERT_CALL_EVENT: &str =
    "INSERT OR IGNORE INTO call_events (call, seq, body) VALUES (?1, ?2, ?3)";
const TRIM_CALL_EVENTS: &str = "DELETE FROM call_events WHERE call = ?1 AND seq < ?2";
const RETIRE_CALL: &str = "DELETE FROM call_events WHERE call = ?1 AND seq <= ?2";
const INSERT_SEEN: &str = "INSERT OR IGNORE INTO seen (event_id, at_ms) VALUES (?1, ?2)";
const EXPIRE_SEEN: &str = "DELETE FROM seen WHERE at_ms < ?1";
const UPSERT_PARKED: &str = "INSERT INTO parked (seq, body, at_ms) VALUES (?1, ?2, ?3) \
     ON CONFLICT (seq) DO UPDATE SET body = excluded.body, at_ms = excluded.at_ms";
const DELETE_PARKED: &str = "DELETE FROM parked WHERE seq = ?1";
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";
const COMMIT: &str = "COMMIT";
const SELECT_OPERATIONS: &str = "SELECT id, body, revision FROM operations ORDER BY id";
const SELECT_SEEN: &str = "SELECT event_id, at_ms FROM seen ORDER BY at_ms, event_id";
const SELECT_PARKED: &str = "SELECT seq, body, at_ms FROM parked ORDER BY seq";
const SELECT_EVENTS: &str =
    "SELECT operation, ordinal, body FROM events ORDER BY operation, ordinal";
const SELECT_CALL_EVENTS: &str = "SELECT call, seq, body FROM call_events ORDER BY call, seq";

/// The handle's side of the writer thread.
pub(super) struct Writer {
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    counters: Arc<Counters>,
    /// Held by the handle, not the thread, so that dropping the last handle releases it at
    /// once; `close` releases it once the connection is closed.
    lock: StoreLock,
}

enum Request {
    Write {
        /// Boxed: a batch is large beside the other requests.
        batch: Box<Batch>,
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
    /// A std channel: `load` is a blocking call, possibly made inside a runtime, where a
    /// oneshot's `blocking_recv` would panic.
    Load(mpsc::SyncSender<Result<Loaded, JournalError>>),
    /// Answered once the connection is closed.
    Close(oneshot::Sender<()>),
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    batches: AtomicU64,
    records: AtomicU64,
    largest_batch: AtomicU64,
    largest_transaction_records: AtomicU64,
    failed_transactions: AtomicU64,
    commit_nanos: AtomicU64,
}

impl Writer {
    pub(super) fn open(
        path: &Path,
        options: SqliteOptions,
        sink: Arc<OnceLock<Sink>>,
    ) -> Result<Self, JournalError> {
        Self::open_with(path, options, BUSY_TIMEOUT, sink)
    }

    fn open_with(
        path: &Path,
        options: SqliteOptions,
        busy_timeout: Duration,
        sink: Arc<OnceLock<Sink>>,
    ) -> Result<Self, JournalError> {
        if path.is_dir() {
            return Err(JournalError::IsDirectory {
                path: path.to_owned(),
            });
        }
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|source| JournalError::CreateDirectory {
                path: parent.to_owned(),
                source: Arc::new(source),
            })?;
        }
        // Before SQLite touches the file: a second process must not even create the schema.
        let lock = StoreLock::acquire(path)?;
        let conn = prepare(path, options, busy_timeout)?;
        let last: i64 = conn
            .query_row(LAST_CHANGE, [], |row| row.get(0))
            .map_err(|source| JournalError::Open {
                path: path.to_owned(),
                source: Arc::new(source),
            })?;
        let feed = FeedState {
            next: u64::try_from(last).unwrap_or(0) + 1,
            sink,
        };
        let (requests, queue) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let max_records = options.max_batch_records.max(1);
        let thread_counters = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("callops-journal".to_owned())
            .spawn(move || run(conn, &queue, max_records, &thread_counters, feed))
            .map_err(|e| JournalError::Spawn(Arc::new(e)))?;
        Ok(Self {
            path: path.to_owned(),
            requests,
            counters,
            lock,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) async fn write(&self, batch: Batch) -> Result<(), JournalError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Write {
                batch: Box::new(batch),
                reply,
            })
            .map_err(|_| JournalError::WriterStopped)?;
        answer.await.map_err(|_| JournalError::WriterStopped)?
    }

    pub(super) fn load(&self) -> Result<Loaded, JournalError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send(Request::Load(reply))
            .map_err(|_| JournalError::WriterStopped)?;
        answer.recv().map_err(|_| JournalError::WriterStopped)?
    }

    pub(super) async fn close(&self) {
        let (reply, closed) = oneshot::channel();
        if self.requests.send(Request::Close(reply)).is_ok() {
            // An error means the writer was already gone (an earlier close): closed too.
            let _ = closed.await;
        }
        self.lock.release();
    }

    pub(super) fn stats(&self) -> JournalStats {
        let c = &self.counters;
        JournalStats {
            transactions: c.transactions.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            largest_transaction_records: c.largest_transaction_records.load(Ordering::Relaxed),
            failed_transactions: c.failed_transactions.load(Ordering::Relaxed),
            commit_time: Duration::from_nanos(c.commit_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// Opens the database, checks its schema version, switches it to WAL and creates the schema.
fn prepare(
    path: &Path,
    options: SqliteOptions,
    busy_timeout: Duration,
) -> Result<Connection, JournalError> {
    let open_error = |source| JournalError::Open {
        path: path.to_owned(),
        source: Arc::new(source),
    };
    // No SQLITE_OPEN_URI: the path is a file name, whatever it looks like.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
    conn.busy_timeout(busy_timeout).map_err(open_error)?;
    check_version(&conn, path)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(JournalError::NoWal {
            path: path.to_owned(),
            mode,
        });
    }
    let synchronous = if options.synchronous_full {
        "FULL"
    } else {
        "NORMAL"
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(open_error)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(open_error)?;
    let found = check_version(&conn, path)?;
    if (1..SCHEMA_VERSION).contains(&found) {
        backup(&conn, path, found)?;
    }
    // Checked again under the write lock (another connection may have written meanwhile).
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_error)?;
    let found = check_version(&tx, path)?;
    if found == 0 {
        tx.execute_batch(V1_TABLES).map_err(open_error)?;
        tx.execute_batch(V2_TABLES).map_err(open_error)?;
        tx.execute_batch(V3_TABLES).map_err(open_error)?;
    } else {
        for step in MIGRATIONS.iter().filter(|step| step.to > found) {
            (step.run)(&tx).map_err(|source| JournalError::Migrate {
                path: path.to_owned(),
                from: found,
                source: Arc::new(source),
            })?;
            tracing::info!(store.path = %path.display(), from = found, to = step.to, step = step.what, "journal migration step applied");
        }
    }
    if found < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_error)?;
    }
    tx.commit().map_err(open_error)?;
    Ok(conn)
}

/// A consistent copy of the database, as it is at `version`, beside it; its path.
fn backup(conn: &Connection, path: &Path, version: i64) -> Result<PathBuf, JournalError> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".v{version}-backup-{seconds}"));
    let target = PathBuf::from(name);
    conn.execute("VACUUM INTO ?1", [target.to_string_lossy()])
        .map_err(|source| JournalError::Backup {
            path: target.clone(),
            source: Arc::new(source),
        })?;
    tracing::info!(
        backup = %target.display(),
        store.path = %path.display(),
        from = version,
        to = SCHEMA_VERSION,
        "journal backed up before its migration; restore it (with the previous release) to roll back"
    );
    Ok(target)
}

/// The version of the database at `path`, read-only (no lock taken, nothing created or
/// migrated), and the steps an open would run. A missing file is a new one.
pub(super) fn status(path: &Path) -> Result<SchemaStatus, JournalError> {
    let steps = MIGRATIONS.iter().map(|step| Step {
        to: step.to,
        what: step.what,
    });
    if !path.exists() {
        return Ok(SchemaStatus::new(None, SCHEMA_VERSION, steps));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|source| JournalError::Open {
        path: path.to_owned(),
        source: Arc::new(source),
    })?;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|source| JournalError::Open {
            path: path.to_owned(),
            source: Arc::new(source),
        })?;
    let found = (found > 0).then_some(found);
    Ok(SchemaStatus::new(found, SCHEMA_VERSION, steps))
}

/// Version 1 to 2: every operation's events move from its body to `events` rows. A body
/// that is not a JSON object with an `events` array is left as it is (the load reports it).
fn migrate_v1(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(V2_TABLES)?;
    let bodies = tx
        .prepare("SELECT id, body FROM operations")?
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut insert = tx.prepare(INSERT_EVENT)?;
    let mut update = tx.prepare("UPDATE operations SET body = ?2 WHERE id = ?1")?;
    let to_json = |value: &serde_json::Value| {
        serde_json::to_vec(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
    };
    for (id, body) in bodies {
        let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_slice(&body) else {
            continue;
        };
        let Some(serde_json::Value::Array(events)) =
            fields.insert("events".to_owned(), serde_json::Value::Array(Vec::new()))
        else {
            continue;
        };
        for (ordinal, event) in (0_i64..).zip(&events) {
            insert.execute(params![id, ordinal, to_json(event)?])?;
        }
        update.execute(params![id, to_json(&serde_json::Value::Object(fields))?])?;
    }
    Ok(())
}

/// Version 2 to 3: the change feed and the documents start empty.
fn migrate_v2(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(V3_TABLES)
}

/// The database's schema version, refusing a newer one than this build knows.
fn check_version(conn: &Connection, path: &Path) -> Result<i64, JournalError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|source| JournalError::Open {
            path: path.to_owned(),
            source: Arc::new(source),
        })?;
    if found > SCHEMA_VERSION {
        return Err(JournalError::NewerSchema {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(found)
}

/// A batch waiting for its transaction.
struct Pending {
    batch: Box<Batch>,
    reply: oneshot::Sender<Result<(), JournalError>>,
}

/// The writer thread's side of the change feed.
struct FeedState {
    /// The number the next change row gets.
    next: u64,
    sink: Arc<OnceLock<Sink>>,
}

/// The writer thread: until a close, or until every handle is dropped.
fn run(
    mut conn: Connection,
    queue: &mpsc::Receiver<Request>,
    max_records: usize,
    counters: &Counters,
    mut feed: FeedState,
) {
    // A request taken from the queue that does not fit in the current group.
    let mut carried: Option<Request> = None;
    loop {
        let request = match carried.take() {
            Some(request) => request,
            None => match queue.recv() {
                Ok(request) => request,
                // Every handle is gone: whatever was acknowledged is committed.
                Err(mpsc::RecvError) => break,
            },
        };
        match request {
            Request::Write { batch, reply } => {
                let mut records = batch.len();
                let mut group = vec![Pending { batch, reply }];
                while records < max_records {
                    match queue.try_recv() {
                        Ok(Request::Write { batch, reply })
                            if records + batch.len() <= max_records =>
                        {
                            records += batch.len();
                            group.push(Pending { batch, reply });
                        }
                        Ok(other) => {
                            carried = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit(&mut conn, group, records, counters, &mut feed);
            }
            Request::Load(reply) => {
                // The caller may have given up waiting: nothing to do then.
                let _ = reply.send(load(&mut conn).map_err(|e| JournalError::Read(Arc::new(e))));
            }
            Request::Close(reply) => {
                // The last connection to close checkpoints the WAL into the database. A
                // failure there loses nothing: the WAL is replayed at the next open.
                let _ = conn.close();
                let _ = reply.send(());
                return;
            }
        }
    }
}

/// Writes `group` in one transaction and answers every waiter.
fn commit(
    conn: &mut Connection,
    mut group: Vec<Pending>,
    records: usize,
    counters: &Counters,
    feed: &mut FeedState,
) {
    let result = if records == 0 {
        // Only empty batches (barriers): nothing to write, everything before them is committed.
        Ok(())
    } else {
        let started = Instant::now();
        let result = write_group(conn, &group, feed.next);
        if result.is_ok() {
            // Numbered as `apply` numbered them; the sink gets them in that order.
            let mut committed = Committed::default();
            for pending in &mut group {
                feed.next = pending.batch.take_committed(feed.next, &mut committed);
            }
            if let Some(sink) = feed.sink.get()
                && !(committed.changes.is_empty() && committed.documents.is_empty())
            {
                sink(committed);
            }
        }
        let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counters.commit_nanos.fetch_add(elapsed, Ordering::Relaxed);
        let batches = group.len() as u64;
        if result.is_ok() {
            counters.transactions.fetch_add(1, Ordering::Relaxed);
            counters.batches.fetch_add(batches, Ordering::Relaxed);
            counters
                .records
                .fetch_add(records as u64, Ordering::Relaxed);
            counters.largest_batch.fetch_max(batches, Ordering::Relaxed);
            counters
                .largest_transaction_records
                .fetch_max(records as u64, Ordering::Relaxed);
        } else {
            counters.failed_transactions.fetch_add(1, Ordering::Relaxed);
        }
        result.map_err(|e| JournalError::Write(Arc::new(e)))
    };
    for pending in group {
        // A waiter that gave up (its future was dropped) needs no answer.
        let _ = pending.reply.send(result.clone());
    }
}

/// One transaction for the whole group, rolled back on an error.
///
/// `BEGIN` and `COMMIT` are cached statements like the others (a `rusqlite::Transaction`
/// would parse both anew for every transaction).
fn write_group(conn: &mut Connection, group: &[Pending], first: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(BEGIN_WRITE)?.execute([])?;
    let mut next = first;
    let written = group
        .iter()
        .try_for_each(|pending| apply(conn, &pending.batch, &mut next))
        .and_then(|()| conn.prepare_cached(COMMIT)?.execute([]).map(drop));
    if written.is_err() && !conn.is_autocommit() {
        // Still in the transaction (a failed statement, or a COMMIT that could not finish):
        // undo it all. A failure here leaves SQLite to roll back as it closes the journal.
        let _ = conn.execute_batch("ROLLBACK");
    }
    written
}

/// One batch, its parts in the documented order.
fn apply(tx: &Connection, batch: &Batch, next_change: &mut u64) -> rusqlite::Result<()> {
    if !batch.operations.is_empty() {
        let mut upsert = tx.prepare_cached(UPSERT_OPERATION)?;
        for (id, body, revision) in &batch.operations {
            upsert.execute(params![id, body, revision])?;
        }
    }
    for events in &batch.events {
        let stored: Option<i64> = tx
            .prepare_cached(SELECT_REVISION)?
            .query_row([&events.operation], |row| row.get(0))
            .optional()?;
        // No snapshot (removed), or a newer one: a later commit has these events.
        if stored.is_none_or(|stored| stored > events.revision) {
            continue;
        }
        if events.replace {
            tx.prepare_cached(DELETE_EVENTS)?
                .execute([&events.operation])?;
        }
        let mut insert = tx.prepare_cached(INSERT_EVENT)?;
        for (ordinal, body) in &events.added {
            insert.execute(params![events.operation, sequence(*ordinal)?, body])?;
        }
        if let Some((from, to)) = events.evicted {
            tx.prepare_cached(DELETE_EVENT_RANGE)?.execute(params![
                events.operation,
                sequence(from)?,
                sequence(to)?
            ])?;
        }
    }
    if !batch.removed_operations.is_empty() {
        let mut delete = tx.prepare_cached(DELETE_OPERATION)?;
        let mut delete_events = tx.prepare_cached(DELETE_EVENTS)?;
        for id in &batch.removed_operations {
            delete.execute([id])?;
            delete_events.execute([id])?;
        }
    }
    if !batch.seen.is_empty() {
        let mut insert = tx.prepare_cached(INSERT_SEEN)?;
        for (event_id, at_ms) in &batch.seen {
            insert.execute(params![event_id, at_ms])?;
        }
    }
    if let Some(before) = batch.seen_expired_before {
        tx.prepare_cached(EXPIRE_SEEN)?.execute([before])?;
    }
    if !batch.parked.is_empty() {
        let mut upsert = tx.prepare_cached(UPSERT_PARKED)?;
        for (seq, body, at_ms) in &batch.parked {
            upsert.execute(params![sequence(*seq)?, body, at_ms])?;
        }
    }
    if !batch.unparked.is_empty() {
        let mut delete = tx.prepare_cached(DELETE_PARKED)?;
        for seq in &batch.unparked {
            delete.execute([sequence(*seq)?])?;
        }
    }
    if !batch.call_events.is_empty() {
        let mut insert = tx.prepare_cached(INSERT_CALL_EVENT)?;
        for (call, seq, body) in &batch.call_events {
            insert.execute(params![call, sequence(*seq)?, body])?;
        }
    }
    if !batch.call_events_kept_from.is_empty() {
        let mut trim = tx.prepare_cached(TRIM_CALL_EVENTS)?;
        for (call, seq) in &batch.call_events_kept_from {
            trim.execute(params![call, sequence(*seq)?])?;
        }
    }
    if !batch.retired_calls.is_empty() {
        let mut retire = tx.prepare_cached(RETIRE_CALL)?;
        for (call, seq) in &batch.retired_calls {
            retire.execute(params![call, sequence(*seq)?])?;
        }
    }
    if !batch.changes.is_empty() {
        let mut insert = tx.prepare_cached(INSERT_CHANGE)?;
        for (at_ms, body) in &batch.changes {
            insert.execute(params![sequence(*next_change)?, at_ms, body])?;
            *next_change += 1;
        }
    }
    if let Some(through) = batch.changes_expired_through {
        tx.prepare_cached(EXPIRE_CHANGES)?
            .execute([sequence(through)?])?;
    }
    for document in &batch.documents {
        match &document.body {
            Some(body) => tx.prepare_cached(UPSERT_DOCUMENT)?.execute(params![
                document.kind,
                document.id,
                body
            ])?,
            None => tx
                .prepare_cached(DELETE_DOCUMENT)?
                .execute(params![document.kind, document.id])?,
        };
    }
    Ok(())
}

/// A stored sequence number or ordinal, which `sequence` wrote.
fn unsigned(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    u64::try_from(value)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, Type::Integer, Box::new(e)))
}

/// A sequence number as SQLite stores it (`Journal::write` refuses larger ones up front).
fn sequence(seq: u64) -> rusqlite::Result<i64> {
    i64::try_from(seq).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Everything stored, from one read snapshot.
fn load(conn: &mut Connection) -> rusqlite::Result<Loaded> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let operations = tx
        .prepare_cached(SELECT_OPERATIONS)?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let seen = tx
        .prepare_cached(SELECT_SEEN)?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let parked = tx
        .prepare_cached(SELECT_PARKED)?
        .query_map([], |row| Ok((unsigned(row, 0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let events = tx
        .prepare_cached(SELECT_EVENTS)?
        .query_map([], |row| Ok((row.get(0)?, unsigned(row, 1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let call_events = tx
        .prepare_cached(SELECT_CALL_EVENTS)?
        .query_map([], |row| Ok((row.get(0)?, unsigned(row, 1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let changes = tx
        .prepare_cached(SELECT_CHANGES)?
        .query_map([], |row| Ok((unsigned(row, 0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let documents = tx
        .prepare_cached(SELECT_DOCUMENTS)?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let last_change = tx
        .prepare_cached(LAST_CHANGE)?
        .query_row([], |row| unsigned(row, 0))?;
    tx.commit()?;
    Ok(Loaded {
        last_change,
        operations,
        seen,
        parked,
        events,
        call_events,
        changes,
        documents,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use super::super::{Backend, Journal, OperationEvents};
    use super::*;

    fn temp_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("callops-journal-")
            .tempdir()
            .expect("temporary directory")
    }

    fn open(path: &Path) -> Journal {
        Journal::open_sqlite(path, SqliteOptions::default()).expect("open the journal")
    }

    fn op(id: &str, body: &str, revision: i64) -> (String, Vec<u8>, i64) {
        (id.to_owned(), body.as_bytes().to_vec(), revision)
    }

    fn ops(batch: Vec<(String, Vec<u8>, i64)>) -> Batch {
        Batch {
            operations: batch,
            ..Batch::default()
        }
    }

    #[tokio::test]
    async fn what_was_written_is_loaded_after_reopening() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let journal = open(&path);
        assert_eq!(journal.load().expect("load"), Loaded::default());
        assert_eq!(
            format!("{journal:?}"),
            format!("Journal {{ location: Some({path:?}) }}")
        );
        assert_eq!(journal.location(), Some(path.as_path()));

        let batches = [
            Batch {
                operations: vec![
                    op("c", r#"{"v":1}"#, 1),
                    op("a", r#"{"v":1}"#, 1),
                    op("b", r#"{"v":1}"#, 1),
                ],
                seen: vec![("e1".to_owned(), 100), ("e2".to_owned(), 200)],
                parked: vec![
                    (3, b"p3".to_vec(), 10),
                    (1, b"p1".to_vec(), 10),
                    (2, b"p2".to_vec(), 10),
                ],
                ..Batch::default()
            },
            Batch {
                // A later snapshot replaces the earlier one; an upsert and a removal of the
                // same id in one batch leave it removed.
                operations: vec![op("a", r#"{"v":2}"#, 2), op("d", r#"{"v":1}"#, 2)],
                removed_operations: vec![
                    "b".to_owned(),
                    "d".to_owned(),
                    "never-written".to_owned(),
                ],
                // Insert-or-ignore: e1 keeps its first time.
                seen: vec![("e1".to_owned(), 999), ("e3".to_owned(), 300)],
                unparked: vec![2],
                ..Batch::default()
            },
            Batch {
                seen: vec![("e4".to_owned(), 50)],
                // Forgets e1 (100), e2 (200) and e4 (50, recorded in this very batch).
                seen_expired_before: Some(250),
                // Parked and unparked in one batch: unparked.
                parked: vec![(4, b"p4".to_vec(), 20), (3, b"p3-again".to_vec(), 30)],
                unparked: vec![4, 99],
                ..Batch::default()
            },
            Batch {
                seen: vec![("e5".to_owned(), 10)],
                ..Batch::default()
            },
        ];
        let records: usize = batches.iter().map(Batch::len).sum();
        for batch in batches {
            journal.write(batch).await.expect("write");
        }
        let stats = journal.stats();
        assert_eq!(stats.batches, 4);
        assert_eq!(stats.records, records as u64);
        assert!(
            stats.transactions >= 1 && stats.transactions <= 4,
            "{stats:?}"
        );
        assert_eq!(stats.failed_transactions, 0);
        journal.close().await;

        let expected = Loaded {
            operations: vec![
                ("a".to_owned(), br#"{"v":2}"#.to_vec(), 2),
                ("c".to_owned(), br#"{"v":1}"#.to_vec(), 1),
            ],
            seen: vec![("e5".to_owned(), 10), ("e3".to_owned(), 300)],
            parked: vec![(1, b"p1".to_vec(), 10), (3, b"p3-again".to_vec(), 30)],
            ..Loaded::default()
        };
        let reopened = open(&path);
        assert_eq!(reopened.load().expect("load after reopening"), expected);
        // Loading again gives the same.
        assert_eq!(reopened.load().expect("second load"), expected);
        reopened.close().await;
    }

    fn events(
        operation: &str,
        revision: i64,
        added: &[u64],
        evicted: Option<(u64, u64)>,
    ) -> OperationEvents {
        OperationEvents {
            operation: operation.to_owned(),
            revision,
            replace: false,
            added: added
                .iter()
                .map(|n| (*n, format!("e{n}").into_bytes()))
                .collect(),
            evicted,
        }
    }

    /// Events are written with a snapshot at least as new as the stored one, once; a range
    /// is forgotten; an operation's removal takes them along; call events are trimmed and
    /// retired by sequence number.
    #[tokio::test]
    async fn events_go_with_their_snapshot_and_leave_with_their_operation() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let journal = open(&path);
        let loaded_events = |journal: &Journal| -> Vec<(String, u64)> {
            let loaded = journal.load().expect("load");
            loaded
                .events
                .into_iter()
                .map(|(op, n, _)| (op, n))
                .collect()
        };
        journal
            .write(Batch {
                operations: vec![op("a", "{}", 5), op("b", "{}", 1)],
                events: vec![
                    events("a", 5, &[0, 1, 2, 3], None),
                    events("b", 1, &[0], None),
                ],
                ..Batch::default()
            })
            .await
            .expect("write");
        // A stale commit (revision 4) lands late: neither its snapshot nor its events count.
        journal
            .write(Batch {
                operations: vec![op("a", "{}", 4)],
                events: vec![events("a", 4, &[9], Some((0, 4)))],
                ..Batch::default()
            })
            .await
            .expect("write");
        // Written again (harmless), one more, and 1..3 dropped from the middle.
        journal
            .write(Batch {
                operations: vec![op("a", "{}", 6)],
                events: vec![events("a", 6, &[3, 4], Some((1, 3)))],
                ..Batch::default()
            })
            .await
            .expect("write");
        let expected = [("a", 0), ("a", 3), ("a", 4), ("b", 0)];
        let expected: Vec<(String, u64)> = expected
            .iter()
            .map(|(op, n)| ((*op).to_owned(), *n))
            .collect();
        assert_eq!(loaded_events(&journal), expected);
        // Events of an operation not stored (removed) are not written.
        journal
            .write(Batch {
                removed_operations: vec!["b".to_owned()],
                events: vec![events("gone", 1, &[0], None)],
                call_events: vec![
                    ("acs:c".to_owned(), 3, b"c3".to_vec()),
                    ("acs:c".to_owned(), 4, b"c4".to_vec()),
                    ("acs:c".to_owned(), 5, b"c5".to_vec()),
                    ("acs:d".to_owned(), 6, b"d6".to_vec()),
                ],
                call_events_kept_from: vec![("acs:c".to_owned(), 4)],
                ..Batch::default()
            })
            .await
            .expect("write");
        assert_eq!(loaded_events(&journal), expected[..3].to_vec());
        journal
            .write(Batch {
                retired_calls: vec![("acs:d".to_owned(), 6), ("acs:c".to_owned(), 4)],
                ..Batch::default()
            })
            .await
            .expect("write");
        assert_eq!(
            journal.load().expect("load").call_events,
            vec![("acs:c".to_owned(), 5, b"c5".to_vec())]
        );
        journal.close().await;
    }

    #[tokio::test]
    async fn a_probe_commits_a_real_transaction_and_leaves_nothing() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let journal = open(&path);
        journal.probe().await.expect("probe");
        assert_eq!(journal.stats().transactions, 1);
        assert_eq!(journal.load().expect("load"), Loaded::default());
        journal.close().await;
        assert!(matches!(journal.probe().await, Err(JournalError::Closed)));
        assert!(Journal::memory().probe().await.is_ok());
    }

    #[tokio::test]
    async fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let journal = open(&path);
        for (body, revision) in [(r#"{"v":5}"#, 5), (r#"{"v":3}"#, 3), (r#"{"v":5b}"#, 5)] {
            journal
                .write(ops(vec![op("a", body, revision)]))
                .await
                .expect("write");
        }
        let loaded = journal.load().expect("load");
        assert_eq!(
            loaded.operations,
            vec![("a".to_owned(), br#"{"v":5b}"#.to_vec(), 5)]
        );
        journal.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_transactions() {
        const WRITES: usize = 200;
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let journal = open(&path);
        let tasks: Vec<_> = (0..WRITES)
            .map(|i| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    let batch = Batch {
                        operations: vec![op(&format!("op-{i:04}"), "{}", 1)],
                        seen: vec![(format!("event-{i:04}"), 1)],
                        ..Batch::default()
                    };
                    journal.write(batch).await
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("writer task").expect("write");
        }
        let stats = journal.stats();
        assert_eq!(stats.batches, WRITES as u64);
        assert_eq!(stats.records, 2 * WRITES as u64);
        assert!(stats.transactions < WRITES as u64, "no grouping: {stats:?}");
        assert!(stats.largest_batch > 1, "{stats:?}");
        journal.close().await;

        let loaded = open(&path).load().expect("load");
        let expected: Vec<_> = (0..WRITES)
            .map(|i| (format!("op-{i:04}"), b"{}".to_vec(), 1))
            .collect();
        assert_eq!(loaded.operations, expected);
        assert_eq!(loaded.seen.len(), WRITES);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_stop_at_max_batch_records_but_a_big_batch_stays_whole() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let options = SqliteOptions {
            max_batch_records: 3,
            synchronous_full: false,
        };
        let journal = Journal::open_sqlite(&path, options).expect("open");
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    journal
                        .write(ops(vec![op(&format!("op-{i:02}"), "{}", 1)]))
                        .await
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("writer task").expect("write");
        }
        assert!(
            journal.stats().largest_transaction_records <= 3,
            "{:?}",
            journal.stats()
        );

        let big = ops((0..5).map(|i| op(&format!("big-{i}"), "{}", 1)).collect());
        journal
            .write(big)
            .await
            .expect("a batch larger than the group limit");
        let stats = journal.stats();
        assert_eq!(stats.largest_transaction_records, 5);
        assert_eq!(stats.records, 35);
        assert_eq!(journal.load().expect("load").operations.len(), 35);
        journal.close().await;
    }

    #[tokio::test]
    async fn an_empty_batch_is_a_barrier_and_writes_nothing() {
        let dir = temp_dir();
        let journal = open(&dir.path().join("journal.db"));
        journal
            .write(ops(vec![op("a", "{}", 1)]))
            .await
            .expect("write");
        journal.write(Batch::default()).await.expect("empty write");
        let stats = journal.stats();
        assert_eq!((stats.transactions, stats.batches), (1, 1));
        journal.close().await;
    }

    #[tokio::test]
    async fn writes_and_loads_after_close_fail_with_closed() {
        let dir = temp_dir();
        let journal = open(&dir.path().join("journal.db"));
        let other_handle = journal.clone();
        journal
            .write(ops(vec![op("a", "{}", 1)]))
            .await
            .expect("write");
        journal.close().await;
        let error = other_handle
            .write(ops(vec![op("b", "{}", 1)]))
            .await
            .expect_err("write after close");
        assert!(matches!(error, JournalError::Closed), "{error:?}");
        assert_eq!(error.to_string(), "the journal is closed");
        assert!(matches!(other_handle.load(), Err(JournalError::Closed)));
        // Closing again is harmless.
        other_handle.close().await;
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_dropping_the_journal_without_close() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let journal = open(&path);
        journal
            .write(ops(vec![op("a", "{}", 1)]))
            .await
            .expect("write");
        journal
            .write(Batch {
                parked: vec![(7, b"p".to_vec(), 3)],
                ..Batch::default()
            })
            .await
            .expect("write");
        drop(journal);
        // The old writer thread may still be winding down: WAL lets both connections coexist.
        let loaded = open(&path).load().expect("load");
        assert_eq!(loaded.operations, vec![("a".to_owned(), b"{}".to_vec(), 1)]);
        assert_eq!(loaded.parked, vec![(7, b"p".to_vec(), 3)]);
    }

    /// Set for the child process of `acknowledged_writes_survive_a_killed_process`.
    const CRASH_CHILD_PATH: &str = "CALLOPS_JOURNAL_CRASH_CHILD_PATH";
    const CRASH_WRITES: usize = 50;

    /// Does nothing unless run as the child of the crash test: then it writes, says which
    /// writes were acknowledged, and waits to be killed.
    #[test]
    fn crash_child() {
        let Some(path) = std::env::var_os(CRASH_CHILD_PATH) else {
            return;
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let journal = open(Path::new(&path));
            for i in 0..CRASH_WRITES {
                journal
                    .write(ops(vec![op(&format!("op-{i:02}"), "{}", 1)]))
                    .await
                    .expect("write");
            }
            println!("[crash child: {CRASH_WRITES} writes acknowledged]");
            // The parent kills this process; never linger if it does not.
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
    }

    #[test]
    fn acknowledged_writes_survive_a_killed_process() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "store::journal::sqlite::tests::crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_PATH, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child");
        let stdout = child.stdout.take().expect("child stdout");
        let acknowledged = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // libtest may print the test name on the same line first.
            .any(|line| {
                line.contains(&format!(
                    "[crash child: {CRASH_WRITES} writes acknowledged]"
                ))
            });
        child.kill().expect("kill the child");
        let status = child.wait().expect("child status");
        assert!(
            acknowledged,
            "the child did not acknowledge its writes ({status})"
        );
        assert!(!status.success(), "the child was not killed: {status}");

        let loaded = open(&path).load().expect("load after the crash");
        let expected: Vec<_> = (0..CRASH_WRITES)
            .map(|i| (format!("op-{i:02}"), b"{}".to_vec(), 1))
            .collect();
        assert_eq!(loaded.operations, expected);
    }

    #[tokio::test]
    async fn a_failed_transaction_answers_every_waiter_and_the_writer_carries_on() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let writer = Writer::open_with(
            &path,
            SqliteOptions::default(),
            Duration::from_millis(20),
            Arc::default(),
        )
        .expect("open");
        let journal = Journal::with_backend(Backend::Sqlite(writer), Arc::default());
        // Another connection holds the write lock: the writer's transactions fail as busy.
        let blocker = Connection::open(&path).expect("second connection");
        blocker
            .execute_batch("BEGIN IMMEDIATE")
            .expect("take the write lock");
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    journal
                        .write(ops(vec![op(&format!("lost-{i}"), "{}", 1)]))
                        .await
                })
            })
            .collect();
        for task in tasks {
            let error = task
                .await
                .expect("writer task")
                .expect_err("a write while the database is locked");
            assert!(matches!(error, JournalError::Write(_)), "{error:?}");
            assert!(error.to_string().contains("locked"), "{error}");
        }
        let stats = journal.stats();
        assert!(stats.failed_transactions >= 1, "{stats:?}");
        assert_eq!(stats.transactions, 0);

        blocker.execute_batch("COMMIT").expect("release the lock");
        journal
            .write(ops(vec![op("kept", "{}", 1)]))
            .await
            .expect("write after the failure");
        let loaded = journal.load().expect("load");
        assert_eq!(
            loaded.operations,
            vec![("kept".to_owned(), b"{}".to_vec(), 1)]
        );
        journal.close().await;
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_is_refused_until_the_first_is_closed_or_dropped() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let pid = std::process::id();
        let first = open(&path);
        let error = Journal::open_sqlite(&path, SqliteOptions::default())
            .expect_err("a second open of the same file");
        assert!(
            matches!(&error, JournalError::InUse { path: held, pid: Some(holder) }
                if *held == path && *holder == pid),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "the store file {} is in use by another callops process (pid {pid}); one \
                 process per file",
                path.display()
            )
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("journal.db.lock")).expect("lock file"),
            format!("{pid}\n")
        );

        // Closed, with another handle still alive: released.
        let other_handle = first.clone();
        first.close().await;
        let second = open(&path);
        drop(other_handle);
        // Dropped without close: released too.
        drop(second);
        open(&path).close().await;
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let conn = Connection::open(&path).expect("create");
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("set the version");
        drop(conn);
        let error =
            Journal::open_sqlite(&path, SqliteOptions::default()).expect_err("a newer schema");
        assert!(
            matches!(
                error,
                JournalError::NewerSchema {
                    found: 4,
                    supported: 3,
                    ..
                }
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("schema version 4"), "{message}");
        assert!(message.contains("newer than version 3"), "{message}");
        assert!(message.contains("refusing to open it"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    /// A version 1 file: operations with their events inside the body.
    fn write_v1(path: &Path) {
        let conn = Connection::open(path).expect("create");
        conn.execute_batch(
            "CREATE TABLE operations (id TEXT PRIMARY KEY, body BLOB NOT NULL, revision INTEGER NOT NULL);
             CREATE TABLE seen (event_id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL) WITHOUT ROWID;
             CREATE INDEX seen_at_ms ON seen (at_ms);
             CREATE TABLE parked (seq INTEGER PRIMARY KEY, body BLOB NOT NULL, at_ms INTEGER NOT NULL);
             INSERT INTO operations VALUES ('a', CAST('{\"events\":[{\"n\":1},{\"n\":2}]}' AS BLOB), 3);
             INSERT INTO seen VALUES ('e1', 10);
             PRAGMA user_version = 1;",
        )
        .expect("version 1 schema");
    }

    fn backups(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .expect("read dir")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| path.to_string_lossy().contains("-backup-"))
            .collect()
    }

    fn user_version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("user_version")
    }

    #[tokio::test]
    async fn a_version_1_file_is_backed_up_then_migrated() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        write_v1(&path);
        let before = Journal::sqlite_status(&path).expect("status");
        assert_eq!((before.found, before.current), (Some(1), SCHEMA_VERSION));
        assert_eq!(
            before.steps.iter().map(|s| s.to).collect::<Vec<_>>(),
            [2, 3]
        );

        let journal = open(&path);
        let loaded = journal.load().expect("load");
        assert_eq!(
            loaded.operations,
            vec![("a".to_owned(), br#"{"events":[]}"#.to_vec(), 3)]
        );
        assert_eq!(loaded.events.len(), 2);
        journal.close().await;

        let found = backups(dir.path());
        assert_eq!(found.len(), 1, "{found:?}");
        let name = found[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("journal.db.v1-backup-"), "{name}");
        let backup = Connection::open(&found[0]).expect("open the backup");
        assert_eq!(user_version(&backup), 1);
        let body: Vec<u8> = backup
            .query_row("SELECT body FROM operations WHERE id = 'a'", [], |row| {
                row.get(0)
            })
            .expect("the old row");
        assert_eq!(body, br#"{"events":[{"n":1},{"n":2}]}"#);
        let seen: i64 = backup
            .query_row("SELECT count(*) FROM seen", [], |row| row.get(0))
            .expect("seen");
        assert_eq!(seen, 1);
        assert_eq!(
            user_version(&Connection::open(&path).unwrap()),
            SCHEMA_VERSION
        );
        let after = Journal::sqlite_status(&path).expect("status");
        assert_eq!((after.found, after.steps.len()), (Some(SCHEMA_VERSION), 0));

        // Opened again: up to date, no second backup.
        open(&path).close().await;
        assert_eq!(backups(dir.path()).len(), 1);
    }

    #[tokio::test]
    async fn a_new_file_makes_no_backup() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        let status = Journal::sqlite_status(&path).expect("status of a missing file");
        assert_eq!((status.found, status.steps.len()), (None, 0));
        assert!(!path.exists(), "the status created the file");
        open(&path).close().await;
        assert!(backups(dir.path()).is_empty());
        assert_eq!(
            user_version(&Connection::open(&path).unwrap()),
            SCHEMA_VERSION
        );
    }

    #[tokio::test]
    async fn the_status_reads_a_file_another_journal_holds_and_changes_nothing() {
        let dir = temp_dir();
        let path = dir.path().join("journal.db");
        write_v1(&path);
        let status = Journal::sqlite_status(&path).expect("status");
        assert_eq!(status.found, Some(1));
        assert_eq!(user_version(&Connection::open(&path).unwrap()), 1);
        let journal = open(&path);
        let status = Journal::sqlite_status(&path).expect("status while held");
        assert_eq!(status.found, Some(SCHEMA_VERSION));
        journal.close().await;
    }

    #[test]
    fn the_schema_version_is_the_last_steps() {
        assert_eq!(SCHEMA_VERSION, MIGRATIONS.last().unwrap().to);
        assert!(MIGRATIONS.windows(2).all(|pair| pair[0].to < pair[1].to));
    }

    #[tokio::test]
    async fn missing_directories_are_created() {
        let dir = temp_dir();
        let path = dir.path().join("a").join("b").join("journal.db");
        let journal = open(&path);
        journal
            .write(ops(vec![op("a", "{}", 1)]))
            .await
            .expect("write");
        journal.close().await;
        assert!(path.is_file());
    }

    #[test]
    fn unusable_paths_give_clear_errors() {
        let dir = temp_dir();
        let error =
            Journal::open_sqlite(dir.path(), SqliteOptions::default()).expect_err("a directory");
        assert!(
            matches!(error, JournalError::IsDirectory { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("is a directory"), "{error}");

        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"not a directory").expect("write a file");
        let error = Journal::open_sqlite(&file.join("journal.db"), SqliteOptions::default())
            .expect_err("a parent that is a file");
        assert!(
            matches!(error, JournalError::CreateDirectory { .. }),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("cannot create the journal directory"),
            "{error}"
        );

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).expect("write garbage");
        let error =
            Journal::open_sqlite(&garbage, SqliteOptions::default()).expect_err("not a database");
        assert!(matches!(error, JournalError::Open { .. }), "{error:?}");
        assert!(error.to_string().contains("not a database"), "{error}");
    }
}
