//! How the shared store reaches Redis: one server (`redis://`, `rediss://`) or a Redis
//! Cluster (`redis+cluster://`, `rediss+cluster://`, seed nodes separated by commas), behind
//! one [`Connector`] and one [`Connection`], so nothing else knows which it has.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, PushKind, RedisFuture, TlsCertificates, Value};
use tokio::sync::mpsc;

use super::error::RedisStoreError;
use crate::config::cluster_nodes;

/// Connects to the configured Redis, or to the configured cluster.
#[derive(Clone)]
pub enum Connector {
    Single(redis::Client),
    Cluster(ClusterSeeds),
}

/// What a cluster client is built from: a new client per subscription carries its own
/// push channel.
#[derive(Clone)]
pub struct ClusterSeeds {
    nodes: Vec<String>,
    certificates: Option<TlsCertificates>,
    timeout: Duration,
}

/// A connection shared by every request: it reconnects by itself (and, on a cluster,
/// follows `MOVED`/`ASK` and a failover).
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Connector {
    /// From the store URL; `root_cert` trusts a private CA for `rediss`.
    pub fn new(
        url: &str,
        root_cert: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Self, RedisStoreError> {
        let certificates = root_cert.map(|root_cert| TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        });
        if let Some(nodes) = cluster_nodes(url) {
            let seeds = ClusterSeeds {
                nodes,
                certificates,
                timeout,
            };
            // Built once here so a malformed URL is refused at start.
            seeds.client(None)?;
            return Ok(Self::Cluster(seeds));
        }
        Ok(Self::Single(match certificates {
            None => redis::Client::open(url)?,
            Some(certificates) => redis::Client::build_with_tls(url, certificates)?,
        }))
    }

    /// The shared connection. A first plain connection says what is wrong (refused, a
    /// certificate not trusted, a wrong password), where a manager would only retry.
    pub async fn shared(&self, timeout: Duration) -> Result<Connection, RedisStoreError> {
        let bounded = |ms| RedisStoreError::Timeout(ms);
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self {
            Self::Single(client) => {
                tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| bounded(ms))??;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                let manager = tokio::time::timeout(
                    timeout * 2,
                    ConnectionManager::new_with_config(client.clone(), config),
                )
                .await
                .map_err(|_| bounded(ms * 2))??;
                Ok(Connection::Single(manager))
            }
            Self::Cluster(seeds) => Ok(Connection::Cluster(seeds.connect(None).await?)),
        }
    }

    /// A connection of its own, for a blocking read that must not hold up the shared one.
    pub async fn dedicated(&self) -> Result<Connection, RedisStoreError> {
        match self {
            Self::Single(client) => Ok(Connection::Plain(
                client.get_multiplexed_async_connection().await?,
            )),
            Self::Cluster(seeds) => {
                // A blocking read waits up to a second before it answers.
                let seeds = ClusterSeeds {
                    timeout: seeds.timeout + Duration::from_secs(2),
                    ..seeds.clone()
                };
                Ok(Connection::Cluster(seeds.connect(None).await?))
            }
        }
    }

    /// Subscribes to `channel` and returns its messages' payloads until the subscription
    /// drops (`None` then: subscribe again).
    pub async fn subscribe(
        &self,
        channel: &str,
        timeout: Duration,
    ) -> Result<Subscription, RedisStoreError> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self {
            Self::Single(client) => {
                let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| RedisStoreError::Timeout(ms))??;
                pubsub.subscribe(channel).await?;
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        if let Ok(payload) = message.get_payload::<String>()
                            && sender.send(payload).is_err()
                        {
                            return;
                        }
                    }
                });
                Ok(Subscription {
                    payloads: receiver,
                    _connection: None,
                })
            }
            Self::Cluster(seeds) => {
                let (push, mut pushes) = mpsc::unbounded_channel();
                let mut connection = tokio::time::timeout(timeout, seeds.connect(Some(push)))
                    .await
                    .map_err(|_| RedisStoreError::Timeout(ms))??;
                tokio::time::timeout(timeout, connection.subscribe(channel))
                    .await
                    .map_err(|_| RedisStoreError::Timeout(ms))??;
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(push) = pushes.recv().await {
                        match push.kind {
                            PushKind::Message => {
                                if let Some(payload) = push.data.get(1).and_then(|value| {
                                    redis::from_redis_value_ref::<String>(value).ok()
                                }) && sender.send(payload).is_err()
                                {
                                    return;
                                }
                            }
                            // The client resubscribes by itself; whatever settled meanwhile
                            // was missed, so the subscriber is told to look again.
                            PushKind::Disconnection => return,
                            _ => {}
                        }
                    }
                });
                Ok(Subscription {
                    payloads: receiver,
                    _connection: Some(connection),
                })
            }
        }
    }
}

impl ClusterSeeds {
    fn client(
        &self,
        push: Option<mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<ClusterClient, RedisStoreError> {
        let mut builder = ClusterClientBuilder::new(self.nodes.clone())
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500);
        if let Some(certificates) = &self.certificates {
            builder = builder.certs(certificates.clone());
        }
        if let Some(push) = push {
            builder = builder
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(push);
        }
        Ok(builder.build()?)
    }

    async fn connect(
        &self,
        push: Option<mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<ClusterConnection, RedisStoreError> {
        let ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let client = self.client(push)?;
        tokio::time::timeout(self.timeout * 2, client.get_async_connection())
            .await
            .map_err(|_| RedisStoreError::Timeout(ms * 2))?
            .map_err(RedisStoreError::from)
    }
}

/// Messages of one subscription.
pub struct Subscription {
    payloads: mpsc::UnboundedReceiver<String>,
    /// Kept so the cluster subscription lives as long as this.
    _connection: Option<ClusterConnection>,
}

impl Subscription {
    /// The next payload, or `None` once the subscription dropped.
    pub async fn next(&mut self) -> Option<String> {
        self.payloads.recv().await
    }
}

impl Connection {
    /// Waits until `replicas` replicas of the node holding `key` have what this connection
    /// wrote there (Redis `WAIT`), at most `timeout`; answers how many have it.
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> redis::RedisResult<u32> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        match self {
            Self::Single(connection) => wait.query_async(connection).await,
            Self::Plain(connection) => wait.query_async(connection).await,
            // WAIT names no key: sent to the primary of `key`'s slot, on the connection that
            // carried the write.
            Self::Cluster(connection) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let value = connection
                    .route_command(
                        wait,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Plain(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Plain(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Plain(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}
