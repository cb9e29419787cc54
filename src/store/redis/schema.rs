//! The shared store's layout version, `{prefix}:schema`, and its migration at connect.
//!
//! Version 1 is the previous release's layout (it has no `schema` key); version 2 adds
//! `index:unsent`, which old data simply lacks, so step 2 only sets the version. A store
//! older than this build is migrated by one replica under `{prefix}:migrating` (a token,
//! with an expiry, released only by its holder); the others wait for it, unserved, before
//! they start. An empty store gets this build's version; a newer one is refused.

use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::{RedisStore, RedisStoreError};
use crate::store::schema::{SchemaStatus, Step};

/// One numbered step, from the version before `to`.
pub(super) struct Migration {
    pub(super) to: i64,
    pub(super) what: &'static str,
    pub(super) run: for<'a> fn(&'a RedisStore) -> BoxFuture<'a, Result<(), RedisStoreError>>,
}

/// Every step, in order.
pub(super) const MIGRATIONS: &[Migration] = &[Migration {
    to: 2,
    what: "adds index:unsent (operations whose request is owed); old data has none, so \
           only the version is set",
    run: nothing_to_rewrite,
}];

/// The layout this build writes.
pub const LAYOUT_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].to;

/// How long the migration lock lives unless released: a migrating replica that dies
/// leaves it to another once this passes.
const LOCK_TTL: Duration = Duration::from_secs(20);
/// How long a replica waits for another's migration before giving up.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// Deletes the lock only while it still holds our token.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";

fn nothing_to_rewrite(_: &RedisStore) -> BoxFuture<'_, Result<(), RedisStoreError>> {
    Box::pin(std::future::ready(Ok(())))
}

/// How many of partition 0's indexes exist: none in an empty store (partition 0 is the
/// whole of a store written before partitions).
fn indexes_exist(keys: &super::keys::Keys) -> redis::Cmd {
    let mut exists = redis::cmd("EXISTS");
    exists
        .arg(keys.all(0))
        .arg(keys.expiries(0))
        .arg(keys.park_due(0))
        .arg(keys.deadlines(0));
    exists
}

impl RedisStore {
    /// The store's layout version: `None` when it is empty (no operation and no park is
    /// indexed), 1 when it has data but no `schema` key.
    pub(super) async fn layout_version(&self) -> Result<Option<i64>, RedisStoreError> {
        let keys = &self.inner.keys;
        let (version, indexed): (Option<String>, u64) = self
            .query({
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(keys.schema());
                pipe.add_command(indexes_exist(keys));
                pipe
            })
            .await?;
        match version {
            Some(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| RedisStoreError::BadLayout(text)),
            None if indexed > 0 => Ok(Some(1)),
            None => Ok(None),
        }
    }

    /// Records the partition count the store is created with, or checks it against the
    /// configured one: replicas that split calls differently would not find each other's.
    pub(super) async fn check_partitions(&self) -> Result<(), RedisStoreError> {
        let keys = &self.inner.keys;
        let configured = keys.partitions();
        let (recorded, indexed): (Option<u16>, u64) = self
            .query({
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(keys.partition_count());
                pipe.add_command(indexes_exist(keys));
                pipe
            })
            .await?;
        let recorded = match recorded {
            Some(recorded) => recorded,
            // A store made before partitions were recorded has one.
            None if indexed > 0 => 1,
            None => {
                let (recorded,): (u16,) = self
                    .query({
                        let mut pipe = redis::pipe();
                        pipe.cmd("SET")
                            .arg(keys.partition_count())
                            .arg(configured)
                            .arg("NX")
                            .ignore();
                        pipe.cmd("GET").arg(keys.partition_count());
                        pipe
                    })
                    .await?;
                recorded
            }
        };
        if recorded != configured {
            return Err(RedisStoreError::Partitions {
                recorded,
                configured,
            });
        }
        Ok(())
    }

    /// The layout version beside this build's and the steps a start would run; reads only.
    pub async fn layout_status(&self) -> Result<SchemaStatus, RedisStoreError> {
        let steps = MIGRATIONS.iter().map(|step| Step {
            to: step.to,
            what: step.what,
        });
        Ok(SchemaStatus::new(
            self.layout_version().await?,
            LAYOUT_VERSION,
            steps,
        ))
    }

    /// Brings the store to [`LAYOUT_VERSION`] (or finds another replica did), refusing a
    /// newer one. Waits at most [`WAIT_MAX`] for another replica's migration. Steps must be
    /// safe to run again: a holder slower than [`LOCK_TTL`] loses the lock to another.
    pub(super) async fn migrate_layout(&self) -> Result<(), RedisStoreError> {
        let keys = &self.inner.keys;
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.layout_version().await? {
                Some(found) if found > LAYOUT_VERSION => {
                    return Err(RedisStoreError::NewerLayout {
                        found,
                        supported: LAYOUT_VERSION,
                    });
                }
                Some(LAYOUT_VERSION) => return Ok(()),
                Some(_) => {}
                None => {
                    // Empty: ours, unless another replica marked it first (then read again).
                    let (set,): (Option<String>,) = self
                        .query({
                            let mut pipe = redis::pipe();
                            pipe.cmd("SET")
                                .arg(keys.schema())
                                .arg(LAYOUT_VERSION)
                                .arg("NX");
                            pipe
                        })
                        .await?;
                    if set.is_some() {
                        return Ok(());
                    }
                    continue;
                }
            }
            let token = uuid::Uuid::new_v4().to_string();
            let (locked,): (Option<String>,) = self
                .query({
                    let mut pipe = redis::pipe();
                    pipe.cmd("SET")
                        .arg(keys.migrating())
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX));
                    pipe
                })
                .await?;
            if locked.is_some() {
                let migrated = self.run_steps().await;
                let released = self.release_lock(&token).await;
                return migrated.and(released);
            }
            if started.elapsed() >= WAIT_MAX {
                return Err(RedisStoreError::MigrationWait {
                    key: keys.migrating(),
                    secs: WAIT_MAX.as_secs(),
                });
            }
            tracing::info!(
                lock = %keys.migrating(),
                "another replica is migrating the shared store; waiting for it before serving"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Under the lock: the steps after the version found now, each followed by its version.
    async fn run_steps(&self) -> Result<(), RedisStoreError> {
        let keys = &self.inner.keys;
        // Read under the lock: another replica may have finished before we took it.
        let Some(found) = self.layout_version().await? else {
            return Ok(());
        };
        for step in MIGRATIONS.iter().filter(|step| step.to > found) {
            (step.run)(self).await?;
            let (): () = self
                .query({
                    let mut pipe = redis::pipe();
                    pipe.cmd("SET").arg(keys.schema()).arg(step.to).ignore();
                    pipe
                })
                .await?;
            tracing::info!(
                from = found,
                to = step.to,
                step = step.what,
                "shared store (Redis) migrated"
            );
        }
        Ok(())
    }

    async fn release_lock(&self, token: &str) -> Result<(), RedisStoreError> {
        let mut connection = self.inner.connection.clone();
        let release = redis::Script::new(RELEASE);
        let mut invocation = release.key(self.inner.keys.migrating());
        invocation.arg(token);
        let _: i64 =
            tokio::time::timeout(self.inner.timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| RedisStoreError::Timeout(self.timeout_ms()))??;
        Ok(())
    }
}
