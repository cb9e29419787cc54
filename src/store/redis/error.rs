//! Why the shared store could not answer.

use std::sync::Arc;

/// Why the shared store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisStoreError {
    #[error("Redis: {0}")]
    Redis(Arc<redis::RedisError>),
    #[error("Redis did not answer within {0} ms")]
    Timeout(u64),
    #[error("the records kept changing under this request ({0} attempts); try again")]
    Contended(u32),
    #[error("a record could not be serialized: {0}")]
    Serialize(Arc<serde_json::Error>),
    #[error("Redis answered the commit with {0:?}")]
    Unexpected(String),
    #[error(
        "the shared store has layout version {found}, newer than version {supported} that \
         this build of callops knows; refusing to start (run a newer callops)"
    )]
    NewerLayout { found: i64, supported: i64 },
    #[error("the shared store's layout version is not a number: {0:?}")]
    BadLayout(String),
    #[error(
        "another replica has been migrating the shared store for {secs} s (lock {key}); \
         giving up"
    )]
    MigrationWait { key: String, secs: u64 },
    #[error(
        "only {got} of the {wanted} Redis replicas store.redis_wait_replicas asks for confirmed \
         the write in time; not acknowledged, as a failover could lose it"
    )]
    NotReplicated { wanted: u32, got: u32 },
    #[error(
        "the shared store was made with {recorded} partition(s) and store.redis_partitions \
         is {configured}; every replica must use the store's number (moving to another \
         number means a new store: drain, or copy the operations over)"
    )]
    Partitions { recorded: u16, configured: u16 },
    #[error("cannot read store.redis_ca_file {path}: {error}")]
    CaFile {
        path: String,
        error: Arc<std::io::Error>,
    },
}

impl From<redis::RedisError> for RedisStoreError {
    fn from(error: redis::RedisError) -> Self {
        Self::Redis(Arc::new(error))
    }
}

impl From<serde_json::Error> for RedisStoreError {
    fn from(error: serde_json::Error) -> Self {
        Self::Serialize(Arc::new(error))
    }
}
