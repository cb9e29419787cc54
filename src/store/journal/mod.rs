//! `Journal`: the durable, embedded record of callops' state.
//!
//! Domain-agnostic: it stores opaque bytes (the JSON snapshots the caller produces) under
//! string ids and sequence numbers. The caller keeps the hot in-memory index (the store's
//! DashMaps) and hands the journal a [`Batch`] of changes; the journal only writes them
//! durably and gives them back, once, at start ([`Journal::load`]).
//!
//! Two implementations behind one cheap handle: [`Journal::memory`] keeps nothing, and
//! [`Journal::open_sqlite`] writes to an SQLite database in WAL mode from a dedicated writer
//! thread that owns the connection. Writers wait on a oneshot channel, never on a lock or on
//! I/O, so [`Journal::write`] never blocks the async runtime; the writer groups every batch
//! that arrives while a transaction is being written into the next single transaction
//! (group commit), so one `fsync` acknowledges many writes.
//!
//! Semantics of a [`Batch`]: all or nothing, durable when [`Journal::write`] returns `Ok`,
//! and applied in the order its parts are listed (operations upserts, their events, removed
//! operations with theirs, seen inserts, seen expiry, parked upserts, unparked deletes, call
//! events, retired calls). Batches are applied in the order they were handed over, each one
//! whole, even when they share a transaction.

mod lock;
mod sqlite;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// One group of changes, written atomically (all or nothing) and durable when `write`
/// returns Ok.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Insert or replace: (operation id as its canonical string, JSON snapshot, revision).
    /// A snapshot never replaces one with a higher revision, so concurrent writers may reach
    /// the journal in any order.
    pub operations: Vec<(String, Vec<u8>, i64)>,
    pub removed_operations: Vec<String>,
    /// Event ids seen (dedupe), with when (unix ms). Insert-or-ignore.
    pub seen: Vec<(String, i64)>,
    /// Forget seen ids older than this (unix ms).
    pub seen_expired_before: Option<i64>,
    /// Parked callbacks: (sequence number, JSON, parked-at unix ms). Insert-or-replace.
    /// Sequence numbers must be at most `i64::MAX` (SQLite integers are signed).
    pub parked: Vec<(u64, Vec<u8>, i64)>,
    /// Parked callbacks applied or expired.
    pub unparked: Vec<u64>,
    /// Operations' events, written once each: skipped for an operation whose stored
    /// snapshot has a higher revision than the one given (a later commit wrote them).
    pub events: Vec<OperationEvents>,
    /// Events added to calls' timelines: (call key, sequence number, JSON). Insert-or-ignore.
    pub call_events: Vec<(String, u64, Vec<u8>)>,
    /// Forget a call's events before a sequence number: (call key, first kept).
    pub call_events_kept_from: Vec<(String, u64)>,
    /// Forget calls' timelines: (call key, last sequence number they used).
    pub retired_calls: Vec<(String, u64)>,
}

/// What a commit writes of one operation's events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OperationEvents {
    /// The operation id, as in [`Batch::operations`].
    pub operation: String,
    /// The revision of the snapshot these events go with.
    pub revision: i64,
    /// Drop every stored event first (they are written again, renumbered).
    pub replace: bool,
    /// New events: (ordinal, JSON). Insert-or-ignore.
    pub added: Vec<(u64, Vec<u8>)>,
    /// Events dropped from the timeline: the ordinals `from..to` are forgotten.
    pub evicted: Option<(u64, u64)>,
}

impl Batch {
    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of records: one per upsert, removal, seen id, parked and unparked
    /// callback, event added, call event and retired call, plus one for a seen expiry and
    /// one per range of events forgotten.
    pub fn len(&self) -> usize {
        self.operations.len()
            + self.removed_operations.len()
            + self.seen.len()
            + usize::from(self.seen_expired_before.is_some())
            + self.parked.len()
            + self.unparked.len()
            + self
                .events
                .iter()
                .map(|events| {
                    events.added.len()
                        + usize::from(events.evicted.is_some())
                        + usize::from(events.replace)
                })
                .sum::<usize>()
            + self.call_events.len()
            + self.call_events_kept_from.len()
            + self.retired_calls.len()
    }

    /// Appends `other`, a batch meant to be applied after this one, so that applying the
    /// merged batch has the effect of applying both in turn: an operation `other` upserts is
    /// no longer removed, one `other` removes is no longer upserted, a callback `other` parks
    /// is no longer unparked. The seen expiry becomes the later of the two (a seen id older
    /// than it is forgotten even if `other` recorded it: it has expired anyway).
    pub fn merge(&mut self, other: Batch) {
        if !other.operations.is_empty() {
            let upserted: HashSet<&str> = other
                .operations
                .iter()
                .map(|(id, ..)| id.as_str())
                .collect();
            self.removed_operations
                .retain(|id| !upserted.contains(id.as_str()));
        }
        if !other.removed_operations.is_empty() {
            let removed: HashSet<&str> = other
                .removed_operations
                .iter()
                .map(String::as_str)
                .collect();
            self.operations
                .retain(|(id, ..)| !removed.contains(id.as_str()));
        }
        if !other.parked.is_empty() {
            let parked: HashSet<u64> = other.parked.iter().map(|(seq, ..)| *seq).collect();
            self.unparked.retain(|seq| !parked.contains(seq));
        }
        self.operations.extend(other.operations);
        self.removed_operations.extend(other.removed_operations);
        self.seen.extend(other.seen);
        self.seen_expired_before = match (self.seen_expired_before, other.seen_expired_before) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.parked.extend(other.parked);
        self.unparked.extend(other.unparked);
        self.events.extend(other.events);
        self.call_events.extend(other.call_events);
        self.call_events_kept_from
            .extend(other.call_events_kept_from);
        self.retired_calls.extend(other.retired_calls);
    }
}

/// The parked sequence number [`Journal::probe`] uses; callers never use it.
pub const PROBE_SEQ: u64 = 0;

/// What a journal holds at start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// (operation id, JSON snapshot, revision), in id order.
    pub operations: Vec<(String, Vec<u8>, i64)>,
    /// (event id, seen at unix ms), oldest first.
    pub seen: Vec<(String, i64)>,
    /// (sequence number, JSON, parked-at unix ms), in sequence order.
    pub parked: Vec<(u64, Vec<u8>, i64)>,
    /// Operations' events: (operation id, ordinal, JSON), by id then ordinal.
    pub events: Vec<(String, u64, Vec<u8>)>,
    /// Calls' events: (call key, sequence number, JSON), by call then sequence number.
    pub call_events: Vec<(String, u64, Vec<u8>)>,
}

/// How an SQLite journal writes.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    /// The most records one transaction takes when it groups waiting batches (a single batch
    /// larger than this is still written whole, in a transaction of its own). At least 1.
    pub max_batch_records: usize,
    /// `PRAGMA synchronous=FULL` when true: a commit is synced to disk before it is
    /// acknowledged, so it survives a power loss. `NORMAL` otherwise: in WAL mode a commit
    /// still survives a crash of the process, but the last ones may be lost on a power loss
    /// or an operating-system crash.
    pub synchronous_full: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            max_batch_records: 4096,
            synchronous_full: true,
        }
    }
}

/// Counters since the journal was opened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JournalStats {
    /// Transactions committed.
    pub transactions: u64,
    /// Batches (calls to `write`) committed.
    pub batches: u64,
    /// Records ([`Batch::len`]) committed.
    pub records: u64,
    /// The most batches committed in one transaction.
    pub largest_batch: u64,
    /// The most records committed in one transaction.
    pub largest_transaction_records: u64,
    /// Transactions that failed (every batch in them was answered with the error).
    pub failed_transactions: u64,
    /// Time spent writing and committing transactions, failed ones included.
    pub commit_time: Duration,
}

/// Why the journal could not open, read or write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// [`Journal::close`] was called.
    #[error("the journal is closed")]
    Closed,
    /// The writer thread is gone without a close (it panicked).
    #[error("the journal writer stopped unexpectedly")]
    WriterStopped,
    #[error("cannot create the journal directory {}: {source}", path.display())]
    CreateDirectory {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Another journal, normally in another process, holds this database file's lock (see
    /// [`Journal::open_sqlite`]); `pid` is the holder's, when its lock file names it.
    #[error(
        "the store file {} is in use by another callops process ({}); one process per file",
        path.display(),
        pid.map_or_else(|| "pid unknown".to_owned(), |pid| format!("pid {pid}"))
    )]
    InUse { path: PathBuf, pid: Option<u32> },
    #[error("cannot lock the journal database through {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("the journal path {} is a directory; it must name a database file", path.display())]
    IsDirectory { path: PathBuf },
    /// SQLite reports a full disk as "disk I/O error" as often as "disk is full": an error
    /// opening the file on a device with almost no space left is reported as this instead.
    #[error(
        "no space left on the device holding {} ({available} bytes available): free some, \
         or point CALLOPS_STORE at another device ({cause})",
        path.display()
    )]
    DiskFull {
        path: PathBuf,
        available: u64,
        cause: String,
    },
    #[error("cannot open the journal database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Arc<rusqlite::Error>,
    },
    #[error(
        "the journal database {} has schema version {found}, newer than version {supported} \
         that this build of callops knows; refusing to open it (run a newer callops, or move \
         the file away)",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "cannot migrate the journal database {} from schema version {from}: {source}",
        path.display()
    )]
    Migrate {
        path: PathBuf,
        from: i64,
        #[source]
        source: Arc<rusqlite::Error>,
    },
    #[error(
        "cannot back up the journal database before migrating it (to {}): {source}",
        path.display()
    )]
    Backup {
        path: PathBuf,
        #[source]
        source: Arc<rusqlite::Error>,
    },
    #[error(
        "the journal database {} cannot use write-ahead logging (journal_mode stays {mode:?}); \
         put it on a local file system",
        path.display()
    )]
    NoWal { path: PathBuf, mode: String },
    #[error("cannot start the journal writer thread: {0}")]
    Spawn(#[source] Arc<std::io::Error>),
    #[error("journal write failed: {0}")]
    Write(#[source] Arc<rusqlite::Error>),
    #[error("journal read failed: {0}")]
    Read(#[source] Arc<rusqlite::Error>),
    #[error("sequence number or ordinal {0} is larger than the journal can store (i64::MAX)")]
    SequenceOutOfRange(u64),
}

/// Below this much free space an open that fails is blamed on the full disk.
const NEARLY_FULL_BYTES: u64 = 1024 * 1024;

impl JournalError {
    /// This error, or [`JournalError::DiskFull`] when it is an open or lock failure and the
    /// device holding `path` has (almost) no space left.
    fn or_disk_full(self, path: &Path) -> Self {
        if !matches!(self, Self::Open { .. } | Self::Lock { .. }) {
            return self;
        }
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        match fs4::available_space(directory) {
            Ok(available) if available < NEARLY_FULL_BYTES => Self::DiskFull {
                path: directory.to_path_buf(),
                available,
                cause: self.to_string(),
            },
            _ => self,
        }
    }
}

/// A cheap handle (Clone + Send + Sync) to a journal.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    /// Set by `close`: later writes fail at once.
    closed: AtomicBool,
}

enum Backend {
    Memory,
    Sqlite(sqlite::Writer),
}

impl Journal {
    /// Keeps nothing: `write` returns at once, `load` is empty.
    pub fn memory() -> Self {
        Self::with_backend(Backend::Memory)
    }

    /// Opens (creating the file and its parent directories) an SQLite database in WAL mode,
    /// creates the schema if missing, or migrates an older one after backing it up beside
    /// it (its version is `PRAGMA user_version`; a newer one is refused), and starts the
    /// writer thread. Blocking: meant for start-up.
    ///
    /// One process per file: the journal holds an OS lock on `<path>.lock` (which names its
    /// PID) until it is closed or dropped; an open while another journal holds it fails at
    /// once with [`JournalError::InUse`].
    pub fn open_sqlite(path: &Path, options: SqliteOptions) -> Result<Self, JournalError> {
        sqlite::Writer::open(path, options)
            .map(|writer| Self::with_backend(Backend::Sqlite(writer)))
            .map_err(|error| error.or_disk_full(path))
    }

    /// The schema version of the SQLite database at `path` beside this build's, and the
    /// migration steps opening it would run; read-only (no lock taken, nothing created, so a
    /// running server may hold the file). Blocking.
    pub fn sqlite_status(path: &Path) -> Result<crate::store::schema::SchemaStatus, JournalError> {
        sqlite::status(path)
    }

    fn with_backend(backend: Backend) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Everything stored, as of every write acknowledged before it.
    ///
    /// Blocking (it waits for the writer thread to read the database): meant for start-up,
    /// before the first write. From async code call it in `tokio::task::spawn_blocking`.
    pub fn load(&self) -> Result<Loaded, JournalError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        match &self.inner.backend {
            Backend::Memory => Ok(Loaded::default()),
            Backend::Sqlite(writer) => writer.load().map_err(|e| self.gone(e)),
        }
    }

    /// Hands `batch` to the writer and resolves once it is committed. Every batch that
    /// arrives while a transaction is being written goes into the next single transaction
    /// (up to `max_batch_records`). Never blocks the async runtime.
    ///
    /// If the future is dropped after handing the batch over, the batch is still written;
    /// only its answer is lost. An empty batch writes nothing and resolves once every batch
    /// handed over before it is committed (a barrier).
    pub async fn write(&self, batch: Batch) -> Result<(), JournalError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        let events = batch.events.iter().flat_map(|events| {
            let added = events.added.iter().map(|(ordinal, _)| ordinal);
            added.chain(events.evicted.iter().map(|(_, to)| to))
        });
        let calls = batch.call_events.iter().map(|(_, seq, _)| seq).chain(
            batch
                .call_events_kept_from
                .iter()
                .chain(&batch.retired_calls)
                .map(|(_, seq)| seq),
        );
        if let Some(&seq) = batch
            .parked
            .iter()
            .map(|(seq, ..)| seq)
            .chain(&batch.unparked)
            .chain(events)
            .chain(calls)
            .find(|&&seq| i64::try_from(seq).is_err())
        {
            return Err(JournalError::SequenceOutOfRange(seq));
        }
        match &self.inner.backend {
            Backend::Memory => Ok(()),
            Backend::Sqlite(writer) => writer.write(batch).await.map_err(|e| self.gone(e)),
        }
    }

    /// Commits everything handed over so far and stops the writer (for shutdown); later
    /// writes and loads fail with [`JournalError::Closed`]. Resolves once the database is
    /// closed. Closing twice is harmless.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Backend::Sqlite(writer) = &self.inner.backend {
            writer.close().await;
        }
    }

    /// Proves the journal can commit now: a real write (a parked row under the reserved
    /// sequence number [`PROBE_SEQ`], removed in the same transaction) through the writer,
    /// so a stuck writer, a locked or read-only database or a full disk all fail it.
    pub async fn probe(&self) -> Result<(), JournalError> {
        if matches!(self.inner.backend, Backend::Memory) {
            return Ok(());
        }
        self.write(Batch {
            parked: vec![(PROBE_SEQ, b"readiness probe".to_vec(), 0)],
            unparked: vec![PROBE_SEQ],
            ..Batch::default()
        })
        .await
    }

    /// Counters: transactions committed, records written, largest batch, total commit time.
    pub fn stats(&self) -> JournalStats {
        match &self.inner.backend {
            Backend::Memory => JournalStats::default(),
            Backend::Sqlite(writer) => writer.stats(),
        }
    }

    /// Where the data lives (None for memory), for logs.
    pub fn location(&self) -> Option<&Path> {
        match &self.inner.backend {
            Backend::Memory => None,
            Backend::Sqlite(writer) => Some(writer.path()),
        }
    }

    /// A writer that went away after `close` was called was closed, not lost.
    fn gone(&self, error: JournalError) -> JournalError {
        match error {
            JournalError::WriterStopped if self.inner.closed.load(Ordering::Acquire) => {
                JournalError::Closed
            }
            other => other,
        }
    }
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("location", &self.location())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: &str, body: &str, ms: i64) -> (String, Vec<u8>, i64) {
        (id.to_owned(), body.as_bytes().to_vec(), ms)
    }

    #[test]
    fn len_counts_every_record_and_the_expiry() {
        let mut batch = Batch::default();
        assert!(batch.is_empty());
        assert_eq!(batch.len(), 0);
        batch.operations.push(op("a", "{}", 1));
        batch.removed_operations.push("b".to_owned());
        batch.seen.push(("e1".to_owned(), 1));
        batch.seen_expired_before = Some(0);
        batch.parked.push((1, b"{}".to_vec(), 1));
        batch.unparked.push(2);
        assert!(!batch.is_empty());
        assert_eq!(batch.len(), 6);
        assert!(
            !Batch {
                seen_expired_before: Some(5),
                ..Batch::default()
            }
            .is_empty()
        );
    }

    #[test]
    fn merge_has_the_effect_of_both_batches_in_turn() {
        let mut first = Batch {
            operations: vec![op("a", "1", 1), op("b", "1", 1)],
            removed_operations: vec!["c".to_owned()],
            seen: vec![("e1".to_owned(), 1)],
            seen_expired_before: Some(10),
            parked: vec![(1, b"p1".to_vec(), 1)],
            unparked: vec![2],
            ..Batch::default()
        };
        let second = Batch {
            operations: vec![op("c", "2", 2), op("a", "2", 2)],
            removed_operations: vec!["b".to_owned()],
            seen: vec![("e2".to_owned(), 2)],
            seen_expired_before: Some(5),
            parked: vec![(2, b"p2".to_vec(), 2)],
            unparked: vec![1],
            ..Batch::default()
        };
        first.merge(second);
        // "a" upserted twice (the later wins when applied in order), "b" upserted then removed,
        // "c" removed then upserted.
        assert_eq!(
            first.operations,
            vec![op("a", "1", 1), op("c", "2", 2), op("a", "2", 2)]
        );
        assert_eq!(first.removed_operations, vec!["b".to_owned()]);
        assert_eq!(first.seen, vec![("e1".to_owned(), 1), ("e2".to_owned(), 2)]);
        assert_eq!(first.seen_expired_before, Some(10));
        // 1 parked then unparked: unparked; 2 unparked then parked: parked.
        assert_eq!(
            first.parked,
            vec![(1, b"p1".to_vec(), 1), (2, b"p2".to_vec(), 2)]
        );
        assert_eq!(first.unparked, vec![1]);

        let mut empty = Batch::default();
        empty.merge(Batch {
            seen_expired_before: Some(3),
            ..Batch::default()
        });
        assert_eq!(empty.seen_expired_before, Some(3));
    }

    #[tokio::test]
    async fn memory_keeps_nothing_and_closes() {
        let journal = Journal::memory();
        assert_eq!(journal.location(), None);
        assert_eq!(format!("{journal:?}"), "Journal { location: None }");
        let batch = Batch {
            operations: vec![op("a", "{}", 1)],
            ..Batch::default()
        };
        journal.write(batch.clone()).await.expect("memory write");
        assert_eq!(journal.load().expect("memory load"), Loaded::default());
        assert_eq!(journal.stats(), JournalStats::default());
        journal.close().await;
        assert!(matches!(
            journal.write(batch).await,
            Err(JournalError::Closed)
        ));
    }

    #[tokio::test]
    async fn sequence_numbers_beyond_i64_are_refused_before_the_writer() {
        let journal = Journal::memory();
        let too_big = u64::try_from(i64::MAX).expect("fits") + 1;
        let parked = Batch {
            parked: vec![(too_big, Vec::new(), 0)],
            ..Batch::default()
        };
        assert!(
            matches!(journal.write(parked).await, Err(JournalError::SequenceOutOfRange(n)) if n == too_big)
        );
        let unparked = Batch {
            unparked: vec![too_big],
            ..Batch::default()
        };
        assert!(matches!(
            journal.write(unparked).await,
            Err(JournalError::SequenceOutOfRange(_))
        ));
    }
}
