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
//! - `operations(id TEXT PRIMARY KEY, body BLOB, updated_ms INTEGER)`: a rowid table, since
//!   snapshots are often larger than the twentieth of a page under which `WITHOUT ROWID`
//!   pays; upserts update the row in place, so the id index is untouched on a replace.
//! - `seen(event_id TEXT PRIMARY KEY, at_ms INTEGER) WITHOUT ROWID`, indexed on `at_ms` for
//!   the expiry: small rows, looked up by their key only.
//! - `parked(seq INTEGER PRIMARY KEY, body BLOB, at_ms INTEGER)`: `seq` is the rowid itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{Batch, JournalError, JournalStats, Loaded, SqliteOptions};

/// The schema this build writes; a database with a higher `user_version` is refused.
pub(super) const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for a lock held by another connection (another process on
/// the same file, or a reader checkpointing) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Cap on the WAL file left behind after a checkpoint.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
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

const UPSERT_OPERATION: &str = "INSERT INTO operations (id, body, updated_ms) VALUES (?1, ?2, ?3) \
     ON CONFLICT (id) DO UPDATE SET body = excluded.body, updated_ms = excluded.updated_ms";
const DELETE_OPERATION: &str = "DELETE FROM operations WHERE id = ?1";
const INSERT_SEEN: &str = "INSERT OR IGNORE INTO seen (event_id, at_ms) VALUES (?1, ?2)";
const EXPIRE_SEEN: &str = "DELETE FROM seen WHERE at_ms < ?1";
const UPSERT_PARKED: &str = "INSERT INTO parked (seq, body, at_ms) VALUES (?1, ?2, ?3) \
     ON CONFLICT (seq) DO UPDATE SET body = excluded.body, at_ms = excluded.at_ms";
const DELETE_PARKED: &str = "DELETE FROM parked WHERE seq = ?1";
const SELECT_OPERATIONS: &str = "SELECT id, body FROM operations ORDER BY id";
const SELECT_SEEN: &str = "SELECT event_id, at_ms FROM seen ORDER BY at_ms, event_id";
const SELECT_PARKED: &str = "SELECT seq, body, at_ms FROM parked ORDER BY seq";

/// The handle's side of the writer thread.
pub(super) struct Writer {
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    counters: Arc<Counters>,
}

enum Request {
    Write {
        batch: Batch,
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
    pub(super) fn open(path: &Path, options: SqliteOptions) -> Result<Self, JournalError> {
        Self::open_with(path, options, BUSY_TIMEOUT)
    }

    fn open_with(
        path: &Path,
        options: SqliteOptions,
        busy_timeout: Duration,
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
        let conn = prepare(path, options, busy_timeout)?;
        let (requests, queue) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let max_records = options.max_batch_records.max(1);
        let thread_counters = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("callops-journal".to_owned())
            .spawn(move || run(conn, &queue, max_records, &thread_counters))
            .map_err(|e| JournalError::Spawn(Arc::new(e)))?;
        Ok(Self {
            path: path.to_owned(),
            requests,
            counters,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) async fn write(&self, batch: Batch) -> Result<(), JournalError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Write { batch, reply })
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
    // Another process may have created the schema since the check: check again under the
    // write lock.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_error)?;
    if check_version(&tx, path)? < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA).map_err(open_error)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_error)?;
    }
    tx.commit().map_err(open_error)?;
    Ok(conn)
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
    batch: Batch,
    reply: oneshot::Sender<Result<(), JournalError>>,
}

/// The writer thread: until a close, or until every handle is dropped.
fn run(
    mut conn: Connection,
    queue: &mpsc::Receiver<Request>,
    max_records: usize,
    counters: &Counters,
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
                commit(&mut conn, group, records, counters);
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
fn commit(conn: &mut Connection, group: Vec<Pending>, records: usize, counters: &Counters) {
    let result = if records == 0 {
        // Only empty batches (barriers): nothing to write, everything before them is committed.
        Ok(())
    } else {
        let started = Instant::now();
        let result = write_group(conn, &group);
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

/// One transaction for the whole group; dropping it on an error rolls it back.
fn write_group(conn: &mut Connection, group: &[Pending]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for pending in group {
        apply(&tx, &pending.batch)?;
    }
    tx.commit()
}

/// One batch, its parts in the documented order.
fn apply(tx: &Transaction<'_>, batch: &Batch) -> rusqlite::Result<()> {
    if !batch.operations.is_empty() {
        let mut upsert = tx.prepare_cached(UPSERT_OPERATION)?;
        for (id, body, updated_ms) in &batch.operations {
            upsert.execute(params![id, body, updated_ms])?;
        }
    }
    if !batch.removed_operations.is_empty() {
        let mut delete = tx.prepare_cached(DELETE_OPERATION)?;
        for id in &batch.removed_operations {
            delete.execute([id])?;
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
    Ok(())
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
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let seen = tx
        .prepare_cached(SELECT_SEEN)?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let parked = tx
        .prepare_cached(SELECT_PARKED)?
        .query_map([], |row| {
            let seq: i64 = row.get(0)?;
            let seq = u64::try_from(seq).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(0, Type::Integer, Box::new(e))
            })?;
            Ok((seq, row.get(1)?, row.get(2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.commit()?;
    Ok(Loaded {
        operations,
        seen,
        parked,
    })
}
