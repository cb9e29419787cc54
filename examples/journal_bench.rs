//! Acknowledged writes per second through the SQLite journal, with N concurrent writers,
//! under `synchronous=FULL` and `NORMAL`, in two shapes:
//! - `insert`: each write inserts one new operation snapshot;
//! - `callback`: what one callback writes: the snapshot of an existing operation (picked at
//!   random among [`CALLBACK_OPERATIONS`] written beforehand, a higher revision each time)
//!   and one new, random event id.
//!
//! ```sh
//! cargo run --release --example journal_bench -- [writers] [writes] [insert|callback]
//! ```
//! `writers` defaults to 1, 32 and 256 in turn; `writes` (the total per run, shared among
//! the writers) to 5000; both shapes run unless one is named. Each run writes to a fresh
//! database in the system temporary directory (set `TMPDIR` to measure another disk),
//! removed afterwards.

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use callops::store::journal::{Batch, Journal, SqliteOptions};
use rand::RngExt;

const DEFAULT_WRITERS: [usize; 3] = [1, 32, 256];
const DEFAULT_WRITES: usize = 5000;
/// About the size of an operation snapshot with a few events.
const BODY_BYTES: usize = 600;
/// Operations written before a `callback` run, which its writes then update.
const CALLBACK_OPERATIONS: usize = 50_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Insert,
    Callback,
}

struct Run {
    synchronous_full: bool,
    shape: Shape,
    writers: usize,
    writes: usize,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let writers: Vec<usize> = match args.next() {
        Some(arg) => vec![parse_count(&arg, "writers")?],
        None => DEFAULT_WRITERS.to_vec(),
    };
    let writes = match args.next() {
        Some(arg) => parse_count(&arg, "writes")?,
        None => DEFAULT_WRITES,
    };
    let shapes = match args.next().as_deref() {
        None => vec![Shape::Insert, Shape::Callback],
        Some("insert") => vec![Shape::Insert],
        Some("callback") => vec![Shape::Callback],
        Some(other) => return Err(format!("unknown shape {other:?}").into()),
    };
    if args.next().is_some() {
        return Err("usage: journal_bench [writers] [writes] [insert|callback]".into());
    }

    println!(
        "{:<8} {:<7} {:>7} {:>7} {:>12} {:>10} {:>12} {:>13} {:>9} {:>9}",
        "shape",
        "sync",
        "writers",
        "writes",
        "transactions",
        "mean batch",
        "writes/s",
        "ms per commit",
        "p50 ms",
        "p99 ms"
    );
    for &shape in &shapes {
        for synchronous_full in [true, false] {
            for &writers in &writers {
                run(Run {
                    synchronous_full,
                    shape,
                    writers,
                    writes: writes.max(writers),
                })
                .await?;
            }
        }
    }
    Ok(())
}

fn parse_count(arg: &str, what: &str) -> Result<usize, Box<dyn Error>> {
    match arg.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{what} must be a positive integer, not {arg:?}").into()),
    }
}

async fn run(run: Run) -> Result<(), Box<dyn Error>> {
    let dir = scratch_dir();
    let journal = Journal::open_sqlite(
        &dir.join("journal.db"),
        SqliteOptions {
            max_batch_records: 4096,
            synchronous_full: run.synchronous_full,
        },
    )?;
    let body = format!("{{\"padding\":\"{}\"}}", "x".repeat(BODY_BYTES)).into_bytes();
    if run.shape == Shape::Callback {
        let operations = (0..CALLBACK_OPERATIONS)
            .map(|i| (operation_id(i), body.clone(), 1))
            .collect();
        journal
            .write(Batch {
                operations,
                ..Batch::default()
            })
            .await?;
    }
    let before = journal.stats();

    let started = Instant::now();
    let tasks: Vec<_> = (0..run.writers)
        .map(|writer| {
            let journal = journal.clone();
            let body = body.clone();
            // Share the writes out; the first writers take the remainder.
            let count = run.writes / run.writers + usize::from(writer < run.writes % run.writers);
            let shape = run.shape;
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(count);
                for i in 0..count {
                    let batch = match shape {
                        Shape::Insert => Batch {
                            operations: vec![(format!("{writer:05}-{i:08}"), body.clone(), 1)],
                            ..Batch::default()
                        },
                        Shape::Callback => {
                            let (target, event): (usize, u128) = {
                                let mut rng = rand::rng();
                                (rng.random_range(0..CALLBACK_OPERATIONS), rng.random())
                            };
                            let revision = i64::try_from(i + 2).unwrap_or(i64::MAX);
                            Batch {
                                operations: vec![(operation_id(target), body.clone(), revision)],
                                seen: vec![(format!("{event:032x}"), 1)],
                                ..Batch::default()
                            }
                        }
                    };
                    let sent = Instant::now();
                    journal.write(batch).await?;
                    latencies.push(sent.elapsed());
                }
                Ok::<_, callops::store::journal::JournalError>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(run.writes);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let stats = journal.stats();
    let transactions = stats.transactions - before.transactions;
    let batches = stats.batches - before.batches;
    let commit_time = stats.commit_time - before.commit_time;
    journal.close().await;
    std::fs::remove_dir_all(&dir)?;

    latencies.sort_unstable();
    println!(
        "{:<8} {:<7} {:>7} {:>7} {:>12} {:>10.1} {:>12.0} {:>13.3} {:>9.3} {:>9.3}",
        match run.shape {
            Shape::Insert => "insert",
            Shape::Callback => "callback",
        },
        if run.synchronous_full {
            "FULL"
        } else {
            "NORMAL"
        },
        run.writers,
        latencies.len(),
        transactions,
        batches as f64 / transactions.max(1) as f64,
        latencies.len() as f64 / elapsed.as_secs_f64(),
        millis(commit_time) / transactions.max(1) as f64,
        millis(percentile(&latencies, 50)),
        millis(percentile(&latencies, 99)),
    );
    Ok(())
}

/// A time-ordered-looking operation id, like a UUIDv7's text.
fn operation_id(i: usize) -> String {
    format!("0190a000-0000-7000-8000-{i:012}")
}

fn scratch_dir() -> PathBuf {
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!(
        "callops-journal-bench-{}-{unique}",
        std::process::id()
    ))
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
