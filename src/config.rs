//! Configuration: embedded defaults (`config/default.toml`), an optional file, then
//! environment variables, layered with figment, validated once at start.
//!
//! Nothing else reads the environment. Each component gets its own section
//! (`AcsConfig`, `OperationsConfig`, ...) at construction; handlers never see `Config`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::acs::connection_string::{ConnectionString, ConnectionStringError};
use crate::identity::CredentialSettings;

/// The directory of the default store file, created when missing (any other must exist).
pub const DEFAULT_DATA_DIR: &str = "data";

/// The query parameter carrying the optional callback secret.
pub const SECRET_PARAMETER: &str = "secret";

/// Decodes the emulator's base64 access key.
pub fn decode_key(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .filter(|key| !key.is_empty())
}

/// The Call Automation api-versions callops speaks: the stable ones and the previews the
/// SDKs list. Remove Participant's path, headers, body and events are the same in all of
/// them (the 2026-03-12 request is checked against the Python SDK 1.6.0's).
pub const ACS_API_VERSIONS: [&str; 14] = [
    "2023-03-06",
    "2023-06-15-preview",
    "2023-10-03-preview",
    "2023-10-15",
    "2024-04-15",
    "2024-06-15-preview",
    "2024-09-01-preview",
    "2024-09-15",
    "2024-11-15-preview",
    "2025-03-30-preview",
    "2025-05-15",
    "2025-06-15",
    "2025-08-15-preview",
    "2026-03-12",
];

/// The compiled-in defaults.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The documented environment variables and the field each sets. Any other field is set
/// with `CALLOPS_<SECTION>__<FIELD>`.
pub const ENV_ALIASES: [(&str, &str); 29] = [
    ("LISTEN", "http.listen"),
    ("PUBLIC_URL", "http.public_url"),
    ("API_KEYS", "http.api_keys"),
    ("STORE", "store.location"),
    ("ACS_CONNECTION_STRING", "acs.connection_string"),
    ("ACS_API_VERSION", "acs.api_version"),
    ("ACS_ENDPOINT", "acs.endpoint"),
    ("ACS_CREDENTIAL", "acs.credential"),
    ("ACS_AUTHORITY", "acs.authority"),
    ("ACS_TENANT_ID", "acs.tenant_id"),
    ("ACS_CLIENT_ID", "acs.client_id"),
    ("ACS_CLIENT_SECRET", "acs.client_secret"),
    ("ACS_CLIENT_CERTIFICATE_PATH", "acs.certificate_path"),
    ("GRAPH_CREDENTIAL", "graph.credential"),
    ("GRAPH_CLIENT_CERTIFICATE_PATH", "graph.certificate_path"),
    ("GRAPH_BASE_URL", "graph.base_url"),
    ("GRAPH_AUTHORITY", "graph.authority"),
    ("GRAPH_TENANT_ID", "graph.tenant_id"),
    ("GRAPH_CLIENT_ID", "graph.client_id"),
    ("GRAPH_CLIENT_SECRET", "graph.client_secret"),
    ("CALLBACK_AUTH", "callbacks.auth"),
    ("CALLBACK_SECRET", "callbacks.secret"),
    ("ACS_CALLBACK_OPENID_URL", "callbacks.acs.openid_url"),
    ("ACS_CALLBACK_ISSUER", "callbacks.acs.issuer"),
    ("ACS_CALLBACK_AUDIENCE", "callbacks.acs.audience"),
    ("GRAPH_CALLBACK_OPENID_URL", "callbacks.graph.openid_url"),
    ("GRAPH_CALLBACK_ISSUERS", "callbacks.graph.issuers"),
    ("GRAPH_CALLBACK_AUDIENCE", "callbacks.graph.audience"),
    ("LOG_FORMAT", "log.format"),
];

/// The standard variables of the Azure SDKs and of Azure's hosts, read verbatim (as the
/// SDKs read them) into the `identity` section, below the `CALLOPS_*` variables.
pub const STANDARD_ENV: [(&str, &str); 9] = [
    ("IDENTITY_ENDPOINT", "identity.endpoint"),
    ("IDENTITY_HEADER", "identity.header"),
    (
        "AZURE_POD_IDENTITY_AUTHORITY_HOST",
        "identity.imds_endpoint",
    ),
    (
        "AZURE_FEDERATED_TOKEN_FILE",
        "identity.federated_token_file",
    ),
    ("AZURE_AUTHORITY_HOST", "identity.authority_host"),
    ("AZURE_TENANT_ID", "identity.tenant_id"),
    ("AZURE_CLIENT_ID", "identity.client_id"),
    ("AZURE_CLIENT_SECRET", "identity.client_secret"),
    ("AZURE_CLIENT_CERTIFICATE_PATH", "identity.certificate_path"),
];

/// The accepted values of `acs.credential` and `graph.credential`.
const CREDENTIALS: &str = "key (ACS: the connection string's access key), secret, certificate, workload-identity, managed-identity";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub log: LogConfig,
    pub store: StoreConfig,
    pub operations: OperationsConfig,
    pub acs: AcsConfig,
    pub graph: GraphConfig,
    pub identity: IdentityConfig,
    pub callbacks: CallbacksConfig,
    pub emulator: EmulatorConfig,
    pub stream: StreamConfig,
    pub webhooks: WebhooksConfig,
}

/// The change feed and its live stream (`GET /v1/operations:stream`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Changes are kept this long for a stream to resume from (`Last-Event-ID`) ...
    pub retention_secs: u64,
    /// ... and at most this many.
    pub max_changes: usize,
    /// An idle stream gets a comment line this often.
    pub heartbeat_secs: u64,
    /// A client this many changes behind the newest is dropped with a final event.
    pub client_buffer: usize,
    /// Open streams at most (more are refused with 503).
    pub max_clients: usize,
}

/// Outbound webhook deliveries (subscriptions and per-operation `notify`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// A delivery is retried this long after it was created, then dead-lettered.
    pub retry_total_secs: u64,
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    /// One attempt's whole deadline (connect, send, read).
    pub request_timeout_ms: u64,
    /// At most this much of a response body is read (the rest is not waited for).
    pub max_response_bytes: usize,
    /// Attempts in flight to one endpoint (scheme, host, port) at most.
    pub per_endpoint_concurrency: usize,
    /// A subscription whose deliveries have failed, without a success, for this long is
    /// disabled.
    pub disable_after_secs: u64,
    /// Targets may be `http` and private, loopback or link-local addresses (development
    /// and tests). Off: `https` to public addresses only.
    pub allow_private_targets: bool,
    /// Finished deliveries (delivered or dead-lettered) are kept this long in the log.
    pub log_retention_secs: u64,
    /// Subscriptions at most.
    pub max_subscriptions: usize,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Base URL the upstreams call back; `/callbacks/acs` is appended.
    pub public_url: Url,
    pub body_limit_bytes: usize,
    pub request_timeout_secs: u64,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout_secs: u64,
    /// How long a request body that does not arrive at once may take.
    pub body_read_timeout_secs: u64,
    /// How many such bodies may be arriving at once.
    pub max_slow_bodies: usize,
    /// Client API keys, comma-separated (see [`HttpConfig::api_keys`]); empty: open API.
    pub api_keys: SecretString,
}

/// The shortest client API key accepted (`CALLOPS_API_KEYS`).
pub const MIN_API_KEY_LEN: usize = 16;

impl HttpConfig {
    /// The client API keys: the comma-separated list, each entry trimmed, empty entries
    /// skipped. No keys: the client API is open. A key shorter than [`MIN_API_KEY_LEN`] or
    /// with characters other than visible ASCII is refused (by its position, never shown).
    pub fn api_keys(&self) -> Result<Vec<SecretString>, ConfigError> {
        let mut keys = Vec::new();
        let entries = self.api_keys.expose_secret().split(',').map(str::trim);
        for (index, key) in entries.filter(|key| !key.is_empty()).enumerate() {
            let problem = if !key.bytes().all(|b| b.is_ascii_graphic()) {
                "has characters other than visible ASCII (no spaces inside a key)"
            } else if key.len() < MIN_API_KEY_LEN {
                "is shorter than 16 characters"
            } else {
                keys.push(SecretString::from(key));
                continue;
            };
            return Err(ConfigError::ApiKey {
                position: index + 1,
                problem,
            });
        }
        Ok(keys)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs(self.body_read_timeout_secs)
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("public_url", &self.public_url.as_str())
            .field("body_limit_bytes", &self.body_limit_bytes)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("header_read_timeout_secs", &self.header_read_timeout_secs)
            .field("body_read_timeout_secs", &self.body_read_timeout_secs)
            .field("max_slow_bodies", &self.max_slow_bodies)
            .field("api_keys", &"[redacted]")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One `info` line per HTTP request (method, route, status, latency, request id).
    pub access: bool,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `memory`, a SQLite database (a file path or `sqlite://PATH`), or a shared Redis
    /// (`redis://` or `rediss://` URL; its password never reaches logs).
    pub location: String,
    /// `PRAGMA synchronous = FULL` (durable across power loss) rather than `NORMAL`
    /// (durable across a process crash).
    pub synchronous_full: bool,
    /// Most records one group commit writes.
    pub max_batch_records: usize,
    /// Redis: how long one command may take (connecting included) before the request
    /// that needed it fails with 503.
    pub redis_timeout_ms: u64,
    /// Redis: how often a long poll re-reads its operation, in case a settle notice was
    /// lost (pub/sub keeps nothing while a subscriber is disconnected).
    pub redis_poll_ms: u64,
    /// Redis: running operations each replica keeps its last copy of, the guess that makes
    /// a callback one round trip (`store/redis/event.rs`). 0: none.
    pub redis_cached_operations: usize,
    /// Redis: the prefix of every key and channel, so several deployments can share one
    /// database. Keys carry it as a hash tag (`{prefix}`), so on a cluster they share one
    /// slot and every transition stays one atomic script.
    pub redis_prefix: String,
    /// Redis over TLS (`rediss://`): a PEM file of the CA certificates to trust instead of
    /// the public roots (a Redis with a private CA). Empty: the public (webpki) roots.
    pub redis_ca_file: String,
    /// Redis: replicas that must hold a write before it is acknowledged (`WAIT`), so a
    /// failover to one of them loses nothing acknowledged. 0: the primary's word is enough.
    pub redis_wait_replicas: u32,
    /// Redis: partitions of the deployment's keys (1 to 1024), each call's keys in one, each
    /// partition its own hash tag, so a Redis Cluster spreads them over its shards. Fixed
    /// when the store is created (recorded in Redis; another number refuses to start).
    pub redis_partitions: u16,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("location", &redacted_location(&self.location))
            .field("synchronous_full", &self.synchronous_full)
            .field("max_batch_records", &self.max_batch_records)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("redis_poll_ms", &self.redis_poll_ms)
            .field("redis_cached_operations", &self.redis_cached_operations)
            .field("redis_prefix", &self.redis_prefix)
            .field("redis_ca_file", &self.redis_ca_file)
            .field("redis_wait_replicas", &self.redis_wait_replicas)
            .field("redis_partitions", &self.redis_partitions)
            .finish()
    }
}

/// `location` with any URL password replaced by `***`.
fn redacted_location(location: &str) -> String {
    match url::Url::parse(location.trim()) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(url) if !url.username().is_empty() && url.scheme().starts_with("redis") => {
            // `redis://:secret@host` parses the secret as the password; a lone user name
            // may still be an access key in some setups: hide it too.
            let mut url = url;
            let _ = url.set_username("***");
            url.to_string()
        }
        // Unparsable: hide whatever stands before an `@`.
        _ => match (location.find("://"), location.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &location[..scheme + 3], &location[at..])
            }
            _ => location.to_owned(),
        },
    }
}

/// The node URLs of a `redis+cluster://` or `rediss+cluster://` URL (credentials carried to
/// each), or `None` for a single server's URL.
pub fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return None;
    };
    let (credentials, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let hosts = hosts.trim_end_matches('/');
    Some(
        hosts
            .split(',')
            .map(str::trim)
            .filter(|host| !host.is_empty())
            .map(|host| format!("{scheme}://{credentials}{host}"))
            .collect(),
    )
}

/// A Redis URL (`redis://`, `rediss://`, or a cluster's `redis+cluster://` and
/// `rediss+cluster://` with comma-separated seed nodes), shown without its credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL with its credentials, for the client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redacted_location(&self.0))
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redacted_location(&self.0))
    }
}

/// Most partitions of a Redis store: a change-log number keeps 12 bits for changes within a
/// millisecond and 10 for the partition.
pub const MAX_REDIS_PARTITIONS: u16 = 1024;

/// Where state is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// In memory only: nothing survives a restart.
    Memory,
    /// A SQLite database file.
    Sqlite(std::path::PathBuf),
    /// A Redis database shared by every replica.
    Redis(RedisUrl),
}

impl StoreConfig {
    /// The parsed location.
    /// Only the accepted forms: a mistyped one (`memroy`, `redis:/host`, `sqlite:/x.db`)
    /// is refused rather than taken for a file name.
    pub fn location(&self) -> Result<StoreLocation, ConfigError> {
        let text = self.location.trim();
        let refused = || Err(ConfigError::Store(redacted_location(text)));
        if text == "memory" {
            return Ok(StoreLocation::Memory);
        }
        if let Some(nodes) = cluster_nodes(text) {
            let hosts_ok = !nodes.is_empty()
                && nodes.iter().all(|node| {
                    url::Url::parse(node)
                        .is_ok_and(|url| url.host_str().is_some_and(|host| !host.is_empty()))
                });
            return if hosts_ok {
                Ok(StoreLocation::Redis(RedisUrl(text.to_owned())))
            } else {
                refused()
            };
        }
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            return match url::Url::parse(text) {
                Ok(url) if url.host_str().is_some_and(|host| !host.is_empty()) => {
                    Ok(StoreLocation::Redis(RedisUrl(text.to_owned())))
                }
                _ => refused(),
            };
        }
        if let Some(path) = text.strip_prefix("sqlite://") {
            return if path.is_empty() || path.ends_with('/') {
                refused()
            } else {
                Ok(StoreLocation::Sqlite(path.into()))
            };
        }
        // A bare path must name a database file, and must not start like a URL scheme.
        let looks_like_scheme = text
            .split_once(':')
            .is_some_and(|(head, _)| !head.is_empty() && !head.contains('/'));
        let file_name = std::path::Path::new(text)
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        let database = [".db", ".sqlite", ".sqlite3"]
            .iter()
            .any(|suffix| file_name.len() > suffix.len() && file_name.ends_with(suffix));
        if looks_like_scheme || !database {
            return refused();
        }
        Ok(StoreLocation::Sqlite(text.into()))
    }
}

/// Bounds of the operation tracker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationsConfig {
    pub max_wait_secs: u64,
    pub retry_after_secs: u64,
    pub park_ttl_ms: u64,
    pub park_max: usize,
    pub dedupe_ttl_secs: u64,
    pub retention_secs: u64,
    pub call_events_max: usize,
    /// An operation's timeline keeps its first `events_first` and last `events_last` events.
    pub events_first: usize,
    pub events_last: usize,
    pub sweep_interval_ms: u64,
    pub page_size: usize,
    pub page_size_max: usize,
    pub callback_timeouts: CallbackTimeouts,
    /// At its callback deadline, ask the platform how an issued operation ended before
    /// failing it with `CallbackTimeout`.
    pub reconcile: bool,
    /// How long the platform may take to answer that; then the operation times out.
    pub reconcile_timeout_ms: u64,
    /// After ACS's `CallDisconnected`, how long a call's unsettled removals wait for their
    /// own event before they fail with `CallEnded`.
    pub call_end_grace_ms: u64,
}

impl OperationsConfig {
    /// How many events an operation's timeline keeps.
    pub fn event_bound(&self) -> crate::operation::EventBound {
        crate::operation::EventBound {
            first: self.events_first,
            last: self.events_last,
        }
    }
}

/// How long an operation waits for its final callback before it fails with
/// `CallbackTimeout` (a later callback still settles it, marked late), per kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackTimeouts {
    pub remove_participant_secs: u64,
    pub cancel_media_processing_secs: u64,
    /// Operations observed in callbacks but not issued by callops (playPrompt, ...).
    pub observed_secs: u64,
}

impl CallbackTimeouts {
    /// The timeout of operations of `kind`.
    pub fn for_kind(&self, kind: &crate::operation::OperationKind) -> Duration {
        use crate::operation::OperationKind;
        Duration::from_secs(match kind {
            OperationKind::RemoveParticipant => self.remove_participant_secs,
            OperationKind::CancelMediaProcessing => self.cancel_media_processing_secs,
            OperationKind::Observed(_) => self.observed_secs,
        })
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcsConfig {
    /// With an access key (HMAC). Empty, and no `endpoint`: use the in-process emulator.
    pub connection_string: SecretString,
    /// The resource endpoint when Entra ID authenticates requests (`credential`).
    pub endpoint: String,
    /// How requests are authenticated (see [`CredentialKind`]); empty: `key` with a
    /// connection string.
    pub credential: String,
    /// Entra ID (`secret`, `certificate`, `workload-identity`): the authority, tenant and
    /// app; empty values fall back to `identity` (the `AZURE_*` variables).
    pub authority: Url,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub certificate_path: String,
    pub api_version: String,
    pub request_timeout_ms: u64,
    pub retry: RetryConfig,
}

/// Microsoft Graph: where it is, and the app registration callops acts as.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Graph root, e.g. `https://graph.microsoft.com/v1.0`.
    pub base_url: Url,
    /// Token authority host, e.g. `https://login.microsoftonline.com`.
    pub authority: Url,
    pub tenant_id: String,
    /// How tokens are obtained (see [`CredentialKind`]); empty: `secret` when a client id
    /// is set, else the in-process emulator.
    pub credential: String,
    /// The app (or user-assigned identity) callops acts as; the default callback audience.
    pub client_id: String,
    pub client_secret: SecretString,
    /// `certificate`: a PEM file with the RSA private key and the certificate.
    pub certificate_path: String,
    pub request_timeout_ms: u64,
    pub retry: RetryConfig,
}

impl GraphConfig {
    /// True when a credential is configured (otherwise the emulator stands in).
    pub fn is_configured(&self) -> bool {
        !self.client_id.trim().is_empty() || !self.credential.trim().is_empty()
    }
}

/// What Azure's hosts and the Azure SDKs' standard variables say about the identity
/// callops runs as ([`STANDARD_ENV`]); used by `acs` and `graph` credentials alike.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// `IDENTITY_ENDPOINT`, `IDENTITY_HEADER`: the App Service / Container Apps
    /// managed-identity endpoint and its secret header. Empty: IMDS.
    pub endpoint: String,
    pub header: SecretString,
    /// Where the Instance Metadata Service is (`AZURE_POD_IDENTITY_AUTHORITY_HOST`).
    pub imds_endpoint: Url,
    /// `AZURE_FEDERATED_TOKEN_FILE`: the workload identity's federated token.
    pub federated_token_file: String,
    /// `AZURE_AUTHORITY_HOST`: replaces the default authority.
    pub authority_host: String,
    /// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`,
    /// `AZURE_CLIENT_CERTIFICATE_PATH`: defaults of the sections' own fields.
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub certificate_path: String,
}

impl std::fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("endpoint", &self.endpoint)
            .field("header", &"[redacted]")
            .field("imds_endpoint", &self.imds_endpoint.as_str())
            .field("federated_token_file", &self.federated_token_file)
            .field("authority_host", &self.authority_host)
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("certificate_path", &self.certificate_path)
            .finish()
    }
}

/// How an upstream's requests are authenticated (`acs.credential`, `graph.credential`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// ACS only: the connection string's access key (HMAC).
    Key,
    /// An app registration's client secret.
    Secret,
    /// An app registration's certificate (PEM: private key and certificate).
    Certificate,
    /// A federated token in a file (AKS workload identity).
    WorkloadIdentity,
    /// The host's managed identity (App Service / Container Apps endpoint, or IMDS).
    ManagedIdentity,
}

impl CredentialKind {
    /// Parses a configured value; `_` and `-` are the same, case does not matter.
    pub fn parse(text: &str) -> Option<Self> {
        Some(
            match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
                "key" | "access-key" => Self::Key,
                "secret" | "client-secret" => Self::Secret,
                "certificate" | "client-certificate" => Self::Certificate,
                "workload-identity" => Self::WorkloadIdentity,
                "managed-identity" => Self::ManagedIdentity,
                _ => return None,
            },
        )
    }
}

/// Where ACS requests go and how they are authenticated.
#[derive(Debug, Clone)]
pub enum AcsUpstream {
    /// A connection string with an access key.
    Key(ConnectionString),
    /// An endpoint and an Entra ID credential.
    Entra {
        endpoint: Url,
        credential: CredentialSettings,
    },
}

impl std::fmt::Debug for GraphConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphConfig")
            .field("base_url", &self.base_url.as_str())
            .field("authority", &self.authority.as_str())
            .field("tenant_id", &self.tenant_id)
            .field("credential", &self.credential)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("certificate_path", &self.certificate_path)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("retry", &self.retry)
            .finish()
    }
}

/// Bounds of the upstream retry loop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    pub total_timeout_ms: u64,
}

/// How callbacks are authenticated.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbacksConfig {
    pub auth: CallbackAuth,
    pub leeway_secs: u64,
    /// Tokens living longer than this (`exp − iat`) are refused.
    pub max_token_lifetime_secs: u64,
    pub key_refresh_min_interval_secs: u64,
    pub key_max_age_secs: u64,
    pub key_fetch_timeout_ms: u64,
    /// Required as `?secret=` on every callback when not empty.
    pub secret: SecretString,
    pub acs: CallbackIssuerConfig,
    pub graph: CallbackIssuerConfig,
}

impl std::fmt::Debug for CallbacksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbacksConfig")
            .field("auth", &self.auth)
            .field("leeway_secs", &self.leeway_secs)
            .field("max_token_lifetime_secs", &self.max_token_lifetime_secs)
            .field(
                "key_refresh_min_interval_secs",
                &self.key_refresh_min_interval_secs,
            )
            .field("key_max_age_secs", &self.key_max_age_secs)
            .field("key_fetch_timeout_ms", &self.key_fetch_timeout_ms)
            .field("secret", &"[redacted]")
            .field("acs", &self.acs)
            .field("graph", &self.graph)
            .finish()
    }
}

/// Who signs one platform's callbacks and for whom: where its keys are published, the
/// accepted `iss` values and the expected `aud`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackIssuerConfig {
    pub openid_url: Url,
    /// One issuer or several (`issuers`, a comma-separated string or a list).
    #[serde(alias = "issuers")]
    pub issuer: StringList,
    pub audience: String,
}

/// A list given either as a TOML/JSON list or as one comma-separated string (the form an
/// environment variable takes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        let items = match Form::deserialize(deserializer)? {
            Form::One(text) => text.split(',').map(str::to_owned).collect(),
            Form::Many(items) => items,
        };
        Ok(Self(
            items
                .into_iter()
                .map(|item| item.trim().to_owned())
                .filter(|item| !item.is_empty())
                .collect(),
        ))
    }
}

/// How callbacks are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallbackAuth {
    /// Verify the bearer JWT of every callback.
    Jwt,
    /// Every callback is accepted: for local experiments only.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub access_key: String,
    pub outcome: EmulatedOutcome,
    pub callback_delay_ms: u64,
    /// The app registration the Graph emulator accepts (development values, not secrets).
    pub graph_tenant_id: String,
    pub graph_client_id: String,
    pub graph_client_secret: String,
    /// Lifetime of the emulator's access tokens (Graph and ACS).
    pub graph_token_lifetime_secs: u64,
    /// The app's registered certificate (a PEM file; its certificate is used): certificate
    /// assertions are verified against it. Empty: the compiled-in development certificate.
    pub client_certificate_path: String,
    /// The `X-IDENTITY-HEADER` its managed-identity endpoint requires (a development value).
    pub identity_header: String,
    /// The client id of the user-assigned managed identity it knows (besides the
    /// system-assigned one).
    pub managed_identity_client_id: String,
    /// The emulated ACS resource's immutable id (the audience of its callback tokens).
    pub acs_resource_id: String,
}

/// The emulator's default outcome for calls without a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmulatedOutcome {
    Succeed,
    Fail,
}

/// A configuration that cannot be used, with what is expected instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable or ill-typed; `hint` names the environment variable of the field and the
    /// form it expects.
    #[error("{}{hint}", tidy(error))]
    Load {
        error: Box<figment::Error>,
        hint: String,
    },
    /// The cause is in the message, not a source of its own, so it is printed once.
    #[error("CALLOPS_ACS_CONNECTION_STRING (acs.connection_string) is invalid: {0}")]
    ConnectionString(ConnectionStringError),
    #[error(
        "CALLOPS_STORE (store.location) = {0:?} is not supported; expected \"memory\", a SQLite file path ending in .db, .sqlite or .sqlite3, sqlite://PATH, redis://HOST[:PORT][/DB] (rediss:// for TLS), or redis+cluster://HOST:PORT[,HOST:PORT...] for a Redis Cluster (rediss+cluster:// for TLS)"
    )]
    Store(String),
    #[error("CALLOPS_PUBLIC_URL (http.public_url) = {0:?} must be an http(s) URL with a host")]
    PublicUrl(String),
    #[error(
        "CALLOPS_API_KEYS (http.api_keys): key {position} of the comma-separated list {problem}; each key must be at least 16 visible ASCII characters"
    )]
    ApiKey {
        position: usize,
        problem: &'static str,
    },
    #[error(
        "CALLOPS_ACS_API_VERSION (acs.api_version) = {0:?} is not a Call Automation api-version callops knows; use one of {known}",
        known = ACS_API_VERSIONS.join(", ")
    )]
    AcsApiVersion(String),
    #[error("{field} {problem}")]
    Invalid {
        field: &'static str,
        problem: &'static str,
    },
    #[error(
        "ACS is not configured and the emulator is disabled; set CALLOPS_ACS_CONNECTION_STRING=endpoint=https://<resource>.communication.azure.com/;accesskey=<base64 key>, or CALLOPS_ACS_ENDPOINT=https://<resource>.communication.azure.com/ with CALLOPS_ACS_CREDENTIAL (managed-identity, workload-identity, secret, certificate) (or CALLOPS_EMULATOR__ENABLED=true to try the built-in emulator)"
    )]
    NoUpstream,
    #[error(
        "Graph has no credential and the emulator is disabled; set CALLOPS_GRAPH_TENANT_ID, CALLOPS_GRAPH_CLIENT_ID and CALLOPS_GRAPH_CLIENT_SECRET, or CALLOPS_GRAPH_CREDENTIAL (managed-identity, workload-identity, certificate) (or CALLOPS_EMULATOR__ENABLED=true to try the built-in emulator)"
    )]
    NoGraph,
    /// A credential setting that is unknown, ambiguous or incomplete: the message names the
    /// variables and the accepted values.
    #[error("{0}")]
    Credential(String),
    #[error(
        "callbacks are verified (CALLOPS_CALLBACK_AUTH=jwt) and Graph has no client id (CALLOPS_GRAPH_CLIENT_ID or AZURE_CLIENT_ID), so CALLOPS_GRAPH_CALLBACK_AUDIENCE is required: the bot's app id"
    )]
    GraphCallbackAudience,
    #[error(
        "callbacks are verified (CALLOPS_CALLBACK_AUTH=jwt) and ACS is configured, so CALLOPS_ACS_CALLBACK_AUDIENCE is required: the ACS resource's immutable resource id (Azure portal, the Communication Services resource, Properties)"
    )]
    AcsCallbackAudience,
}

impl From<ConnectionStringError> for ConfigError {
    fn from(error: ConnectionStringError) -> Self {
        Self::ConnectionString(error)
    }
}

/// figment's message without its doubled quoting (`` expected `one of `a`, `b`` ``).
fn tidy(error: &figment::Error) -> String {
    let text = error.to_string();
    match text.split_once("expected `one of ") {
        Some((head, rest)) => match rest.split_once("``") {
            Some((list, tail)) => format!("{head}expected one of {list}`{tail}"),
            None => text,
        },
        None => text,
    }
}

impl Config {
    /// Embedded defaults, then `path` (when given), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = path {
            figment = figment.merge(Toml::file_exact(path));
        }
        for (name, field) in STANDARD_ENV {
            if let Some(value) = raw_env(&[name]).filter(|value| !value.trim().is_empty()) {
                figment = figment.merge(Serialized::default(field, value.trim()));
            }
        }
        figment = figment.merge(env_provider());
        if let Some(keys) = raw_env(&API_KEYS_ENV) {
            figment = figment.merge(Serialized::default("http.api_keys", keys));
        }
        Self::from_figment(figment)
    }

    /// The embedded defaults alone (tests start from these).
    pub fn embedded() -> Self {
        Self::from_figment(Figment::from(Toml::string(DEFAULT_TOML)))
            .expect("the embedded defaults are valid")
    }

    /// Extracts and validates.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Self = figment.extract().map_err(|error| {
            let field = error.path.join(".").to_ascii_lowercase();
            // Name the variable only when the value came from the environment.
            let from_env = error
                .metadata
                .as_ref()
                .is_some_and(|metadata| metadata.name.contains("environment"));
            let mut hint = match ENV_ALIASES.iter().find(|(_, path)| *path == field) {
                Some((alias, _)) if from_env => format!(" (environment variable CALLOPS_{alias})"),
                None if from_env && !field.is_empty() => format!(
                    " (environment variable CALLOPS_{})",
                    field.replace('.', "__").to_ascii_uppercase()
                ),
                _ => String::new(),
            };
            if field == "http.listen" {
                hint.push_str(
                    "; expected IP:PORT, e.g. 0.0.0.0:8080 or 127.0.0.1:8080 (a host name such as localhost is not resolved)",
                );
            }
            ConfigError::Load {
                error: Box::new(error),
                hint,
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.store.location()?;
        let positive = [
            (
                "stream.max_changes / stream.client_buffer / stream.max_clients",
                self.stream
                    .max_changes
                    .min(self.stream.client_buffer)
                    .min(self.stream.max_clients) as u64,
            ),
            ("stream.heartbeat_secs", self.stream.heartbeat_secs),
            (
                "webhooks.request_timeout_ms",
                self.webhooks.request_timeout_ms,
            ),
            (
                "webhooks.per_endpoint_concurrency",
                self.webhooks.per_endpoint_concurrency as u64,
            ),
            ("webhooks.initial_delay_ms", self.webhooks.initial_delay_ms),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::Invalid {
                field,
                problem: "must be at least 1",
            });
        }
        if !(1..=MAX_REDIS_PARTITIONS).contains(&self.store.redis_partitions) {
            return Err(ConfigError::Invalid {
                field: "store.redis_partitions",
                problem: "must be from 1 to 1024",
            });
        }
        if self.store.redis_timeout_ms == 0 || self.store.redis_poll_ms == 0 {
            return Err(ConfigError::Invalid {
                field: "store.redis_timeout_ms / store.redis_poll_ms",
                problem: "must be at least 1",
            });
        }
        if self.store.redis_prefix.is_empty()
            || !self
                .store
                .redis_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(ConfigError::Invalid {
                field: "store.redis_prefix",
                problem: "must be 1 or more of A-Z a-z 0-9 - _ . :",
            });
        }
        if self.store.max_batch_records == 0 {
            return Err(ConfigError::Invalid {
                field: "store.max_batch_records",
                problem: "must be at least 1",
            });
        }
        let url = &self.http.public_url;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ConfigError::PublicUrl(url.to_string()));
        }
        for (field, url) in [
            ("graph.base_url", &self.graph.base_url),
            ("graph.authority", &self.graph.authority),
            ("acs.authority", &self.acs.authority),
            ("identity.imds_endpoint", &self.identity.imds_endpoint),
        ] {
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError::Invalid {
                    field,
                    problem: "must be an http(s) URL with a host",
                });
            }
        }
        if self.acs_upstream()?.is_none() && !self.emulator.enabled {
            return Err(ConfigError::NoUpstream);
        }
        if self.graph_credential()?.is_none() && !self.emulator.enabled {
            return Err(ConfigError::NoGraph);
        }
        let invalid = |field, problem| Err(ConfigError::Invalid { field, problem });
        if !ACS_API_VERSIONS.contains(&self.acs.api_version.as_str()) {
            return Err(ConfigError::AcsApiVersion(self.acs.api_version.clone()));
        }
        if self.acs.retry.max_attempts == 0 || self.graph.retry.max_attempts == 0 {
            return invalid("acs/graph.retry.max_attempts", "must be at least 1");
        }
        if self.http.request_timeout_secs <= self.operations.max_wait_secs {
            return invalid(
                "http.request_timeout_secs",
                "must be larger than operations.max_wait_secs",
            );
        }
        if self.http.header_read_timeout_secs == 0 {
            return invalid("http.header_read_timeout_secs", "must be at least 1");
        }
        if self.http.body_read_timeout_secs == 0 {
            return invalid("http.body_read_timeout_secs", "must be at least 1");
        }
        if self.http.max_slow_bodies == 0 {
            return invalid("http.max_slow_bodies", "must be at least 1");
        }
        self.http.api_keys()?;
        if self.operations.page_size == 0
            || self.operations.page_size > self.operations.page_size_max
        {
            return invalid(
                "operations.page_size",
                "must be between 1 and operations.page_size_max",
            );
        }
        if self.operations.events_last == 0 {
            return invalid(
                "operations.events_last",
                "must be at least 1 (the newest event is always kept)",
            );
        }
        let callbacks = &self.callbacks;
        for (field, issuer) in [
            ("callbacks.acs (CALLOPS_ACS_CALLBACK_*)", &callbacks.acs),
            (
                "callbacks.graph (CALLOPS_GRAPH_CALLBACK_*)",
                &callbacks.graph,
            ),
        ] {
            let url = &issuer.openid_url;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return invalid(field, "openid_url must be an http(s) URL with a host");
            }
            if issuer.issuer.0.is_empty() {
                return invalid(field, "needs at least one issuer");
            }
        }
        if callbacks.auth == CallbackAuth::Jwt
            && self.acs_upstream()?.is_some()
            && callbacks.acs.audience.trim().is_empty()
        {
            return Err(ConfigError::AcsCallbackAudience);
        }
        if callbacks.auth == CallbackAuth::Jwt
            && self.graph.is_configured()
            && callbacks.graph.audience.trim().is_empty()
            && self.graph_app_id().is_empty()
        {
            return Err(ConfigError::GraphCallbackAudience);
        }
        if callbacks.key_fetch_timeout_ms == 0 {
            return invalid("callbacks.key_fetch_timeout_ms", "must be at least 1");
        }
        if self.emulator.enabled && decode_key(&self.emulator.access_key).is_none() {
            return invalid("emulator.access_key", "must be non-empty base64");
        }
        let certificate = self.emulator.client_certificate_path.trim();
        if self.emulator.enabled && !certificate.is_empty() && !Path::new(certificate).is_file() {
            return invalid(
                "emulator.client_certificate_path",
                "must name a readable PEM file with a CERTIFICATE (or be empty: the development certificate)",
            );
        }
        Ok(())
    }

    /// Where ACS requests go and how they are authenticated; `None` when nothing is
    /// configured (the emulator stands in). Ambiguous or incomplete settings are refused.
    pub fn acs_upstream(&self) -> Result<Option<AcsUpstream>, ConfigError> {
        let acs = &self.acs;
        let connection = acs.connection()?;
        let endpoint = acs.endpoint.trim();
        let kind = parse_kind("CALLOPS_ACS_CREDENTIAL (acs.credential)", &acs.credential)?;
        let fail = |message: String| Err(ConfigError::Credential(message));
        match (connection, endpoint.is_empty(), kind) {
            (None, true, None) => Ok(None),
            (Some(_), false, _) => fail(
                "CALLOPS_ACS_CONNECTION_STRING (an access key) and CALLOPS_ACS_ENDPOINT (Entra ID) are both set; set only one".to_owned(),
            ),
            (Some(connection), true, None | Some(CredentialKind::Key)) => {
                Ok(Some(AcsUpstream::Key(connection)))
            }
            (Some(_), true, Some(_)) => fail(format!(
                "CALLOPS_ACS_CREDENTIAL={} authenticates with Entra ID: set CALLOPS_ACS_ENDPOINT=https://<resource>.communication.azure.com/ instead of CALLOPS_ACS_CONNECTION_STRING",
                acs.credential.trim()
            )),
            (None, true, Some(CredentialKind::Key)) => fail(
                "CALLOPS_ACS_CREDENTIAL=key needs CALLOPS_ACS_CONNECTION_STRING=endpoint=https://<resource>.communication.azure.com/;accesskey=<base64 key>".to_owned(),
            ),
            (None, true, Some(_)) => fail(format!(
                "CALLOPS_ACS_CREDENTIAL={} needs CALLOPS_ACS_ENDPOINT=https://<resource>.communication.azure.com/",
                acs.credential.trim()
            )),
            (None, false, None) => fail(format!(
                "CALLOPS_ACS_ENDPOINT is set, so CALLOPS_ACS_CREDENTIAL is required: one of managed-identity, workload-identity, secret, certificate (accepted values: {CREDENTIALS})"
            )),
            (None, false, Some(CredentialKind::Key)) => fail(
                "CALLOPS_ACS_CREDENTIAL=key signs with an access key: set CALLOPS_ACS_CONNECTION_STRING instead of CALLOPS_ACS_ENDPOINT".to_owned(),
            ),
            (None, false, Some(kind)) => {
                let url = Url::parse(endpoint).ok().filter(|url| {
                    url.host().is_some()
                        && (url.scheme() == "https" || url.scheme() == "http" && is_loopback(url))
                });
                let Some(mut url) = url else {
                    return fail(format!(
                        "CALLOPS_ACS_ENDPOINT (acs.endpoint) = {endpoint:?} must be an https URL (http only on loopback: a token is never sent in the clear), e.g. https://<resource>.communication.azure.com/"
                    ));
                };
                if !url.path().ends_with('/') {
                    let path = format!("{}/", url.path());
                    url.set_path(&path);
                }
                let credential = self.entra_credential(
                    "CALLOPS_ACS",
                    kind,
                    EntraApp {
                        authority: &acs.authority,
                        tenant_id: &acs.tenant_id,
                        client_id: &acs.client_id,
                        client_secret: &acs.client_secret,
                        certificate_path: &acs.certificate_path,
                    },
                )?;
                Ok(Some(AcsUpstream::Entra {
                    endpoint: url,
                    credential,
                }))
            }
        }
    }

    /// The app Graph tokens are for (`graph.client_id`, else `AZURE_CLIENT_ID`): the bot's app
    /// id, the default audience of Graph's notification tokens. Empty for a system-assigned
    /// identity.
    pub fn graph_app_id(&self) -> &str {
        match self.graph.client_id.trim() {
            "" => self.identity.client_id.trim(),
            id => id,
        }
    }

    /// Graph's credential; `None` when none is configured (the emulator stands in).
    pub fn graph_credential(&self) -> Result<Option<CredentialSettings>, ConfigError> {
        let graph = &self.graph;
        let kind = parse_kind(
            "CALLOPS_GRAPH_CREDENTIAL (graph.credential)",
            &graph.credential,
        )?;
        let kind = match kind {
            None if graph.client_id.trim().is_empty() => return Ok(None),
            None => CredentialKind::Secret,
            Some(CredentialKind::Key) => {
                return Err(ConfigError::Credential(
                    "CALLOPS_GRAPH_CREDENTIAL=key: Graph has no access key; accepted values: secret, certificate, workload-identity, managed-identity".to_owned(),
                ));
            }
            Some(kind) => kind,
        };
        self.entra_credential(
            "CALLOPS_GRAPH",
            kind,
            EntraApp {
                authority: &graph.authority,
                tenant_id: &graph.tenant_id,
                client_id: &graph.client_id,
                client_secret: &graph.client_secret,
                certificate_path: &graph.certificate_path,
            },
        )
        .map(Some)
    }

    /// The credential of `kind` for one upstream (`prefix` names its variables), its
    /// missing pieces taken from `identity` (the `AZURE_*` variables).
    fn entra_credential(
        &self,
        prefix: &str,
        kind: CredentialKind,
        app: EntraApp<'_>,
    ) -> Result<CredentialSettings, ConfigError> {
        let identity = &self.identity;
        let pick = |own: &str, standard: &str| {
            let own = own.trim();
            if own.is_empty() { standard.trim() } else { own }.to_owned()
        };
        let tenant_id = pick(app.tenant_id, &identity.tenant_id);
        let client_id = pick(app.client_id, &identity.client_id);
        let authority = match Url::parse(identity.authority_host.trim()) {
            Ok(host) if app.authority.as_str() == DEFAULT_AUTHORITY => host,
            _ if !identity.authority_host.trim().is_empty()
                && app.authority.as_str() == DEFAULT_AUTHORITY =>
            {
                return Err(ConfigError::Credential(format!(
                    "AZURE_AUTHORITY_HOST (identity.authority_host) = {:?} is not a URL",
                    identity.authority_host.trim()
                )));
            }
            _ => app.authority.clone(),
        };
        let kind_name = match kind {
            CredentialKind::Secret => "secret",
            CredentialKind::Certificate => "certificate",
            CredentialKind::WorkloadIdentity => "workload-identity",
            CredentialKind::ManagedIdentity => "managed-identity",
            CredentialKind::Key => "key",
        };
        let mut missing = Vec::new();
        let mut need = |value: &str, names: String| {
            if value.trim().is_empty() {
                missing.push(names);
            }
        };
        if kind != CredentialKind::ManagedIdentity {
            need(
                &tenant_id,
                format!("{prefix}_TENANT_ID (or AZURE_TENANT_ID)"),
            );
            need(
                &client_id,
                format!("{prefix}_CLIENT_ID (or AZURE_CLIENT_ID)"),
            );
        }
        let secret = if app.client_secret.expose_secret().trim().is_empty() {
            identity.client_secret.clone()
        } else {
            app.client_secret.clone()
        };
        let certificate_path = pick(app.certificate_path, &identity.certificate_path);
        match kind {
            CredentialKind::Secret => need(
                secret.expose_secret(),
                format!("{prefix}_CLIENT_SECRET (or AZURE_CLIENT_SECRET)"),
            ),
            CredentialKind::Certificate => need(
                &certificate_path,
                format!("{prefix}_CLIENT_CERTIFICATE_PATH (or AZURE_CLIENT_CERTIFICATE_PATH)"),
            ),
            CredentialKind::WorkloadIdentity => need(
                &identity.federated_token_file,
                "AZURE_FEDERATED_TOKEN_FILE (identity.federated_token_file)".to_owned(),
            ),
            _ => {}
        }
        if !missing.is_empty() {
            return Err(ConfigError::Credential(format!(
                "{prefix}_CREDENTIAL={kind_name} needs {}",
                missing.join(", ")
            )));
        }
        Ok(match kind {
            CredentialKind::Secret | CredentialKind::Key => CredentialSettings::ClientSecret {
                authority,
                tenant_id,
                client_id,
                secret,
            },
            CredentialKind::Certificate => CredentialSettings::Certificate {
                authority,
                tenant_id,
                client_id,
                path: certificate_path.into(),
            },
            CredentialKind::WorkloadIdentity => CredentialSettings::WorkloadIdentity {
                authority,
                tenant_id,
                client_id,
                token_file: identity.federated_token_file.trim().into(),
            },
            CredentialKind::ManagedIdentity => CredentialSettings::ManagedIdentity {
                app_service: identity.app_service()?,
                imds: identity.imds_endpoint.clone(),
                client_id: Some(client_id).filter(|id| !id.is_empty()),
            },
        })
    }

    /// The callback URL ACS is told to call, with `?secret=` when one is configured: a
    /// secret: its `Display` hides the query.
    pub fn acs_callback_url(&self) -> SecretUrl {
        self.callback_url("callbacks/acs")
    }

    /// The notification URL the Graph emulator calls (a real bot registration has its own),
    /// with `?secret=` when one is configured.
    pub fn graph_callback_url(&self) -> SecretUrl {
        self.callback_url("callbacks/graph")
    }

    fn callback_url(&self, path: &str) -> SecretUrl {
        let mut url = self
            .http
            .public_url
            .join(path)
            .expect("a relative path joins any http URL");
        let secret = self.callbacks.secret.expose_secret();
        if !secret.is_empty() {
            url.query_pairs_mut().append_pair(SECRET_PARAMETER, secret);
        }
        SecretUrl(url)
    }
}

/// A URL that may carry a secret in its query: `Display` and `Debug` show it without the
/// query; [`SecretUrl::expose`] gives the whole URL to the code that sends it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Url);

impl SecretUrl {
    pub fn expose(&self) -> &Url {
        &self.0
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.clone();
        if shown.query().is_some() {
            shown.set_query(Some("[redacted]"));
        }
        f.write_str(shown.as_str())
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

/// The default token authority (Entra ID's public cloud).
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com/";

/// An app's own Entra ID settings in one section.
struct EntraApp<'a> {
    authority: &'a Url,
    tenant_id: &'a str,
    client_id: &'a str,
    client_secret: &'a SecretString,
    certificate_path: &'a str,
}

/// `None` for an empty value; an unknown one is refused with the accepted values.
fn parse_kind(variable: &str, text: &str) -> Result<Option<CredentialKind>, ConfigError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    CredentialKind::parse(text).map(Some).ok_or_else(|| {
        ConfigError::Credential(format!(
            "{variable} = {:?} is not a credential; accepted values: {CREDENTIALS}",
            text.trim()
        ))
    })
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl IdentityConfig {
    /// The App Service / Container Apps endpoint and header, when both are set.
    fn app_service(&self) -> Result<Option<(Url, SecretString)>, ConfigError> {
        let endpoint = self.endpoint.trim();
        let header = self.header.expose_secret().trim();
        match (endpoint.is_empty(), header.is_empty()) {
            (true, true) => Ok(None),
            (false, false) => match Url::parse(endpoint) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                    Ok(Some((url, SecretString::from(header.to_owned()))))
                }
                _ => Err(ConfigError::Credential(format!(
                    "IDENTITY_ENDPOINT (identity.endpoint) = {endpoint:?} is not an http(s) URL"
                ))),
            },
            (false, true) => Err(ConfigError::Credential(
                "IDENTITY_ENDPOINT is set but IDENTITY_HEADER is not: the managed-identity endpoint needs both (the platform sets both)".to_owned(),
            )),
            (true, false) => Err(ConfigError::Credential(
                "IDENTITY_HEADER is set but IDENTITY_ENDPOINT is not: the managed-identity endpoint needs both (the platform sets both)".to_owned(),
            )),
        }
    }
}

impl AcsConfig {
    /// The parsed connection string; `None` when empty (the emulator stands in).
    pub fn connection(&self) -> Result<Option<ConnectionString>, ConnectionStringError> {
        let text = self.connection_string.expose_secret();
        if text.trim().is_empty() {
            return Ok(None);
        }
        ConnectionString::parse(text).map(Some)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl std::fmt::Debug for AcsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcsConfig")
            .field("connection_string", &"[redacted]")
            .field("endpoint", &self.endpoint)
            .field("credential", &self.credential)
            .field("authority", &self.authority.as_str())
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("certificate_path", &self.certificate_path)
            .field("api_version", &self.api_version)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("retry", &self.retry)
            .finish()
    }
}

/// The variables setting `http.api_keys`. They are read verbatim, not parsed as TOML values
/// as the others are (that would turn a key of digits into a number, change it, and quote it
/// in the error).
const API_KEYS_ENV: [&str; 2] = ["CALLOPS_API_KEYS", "CALLOPS_HTTP__API_KEYS"];

/// The client subcommands' settings (`callops get`, `list`, …; see docs/cli.md): not the
/// service's, but set in the same environments, so not unknown either.
const CLIENT_ENV: [&str; 2] = ["CALLOPS_URL", "CALLOPS_API_KEY"];

/// The first of `names` that is set, verbatim (odd bytes replaced: validation refuses them).
fn raw_env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(std::env::var_os)
        .map(|value| value.to_string_lossy().into_owned())
}

/// `CALLOPS_*` variables among `names` that set nothing: not an alias, not `SECTION__FIELD`
/// (those are checked against the fields), not the config file's. A typo such as
/// `CALLOPS_LISTENN` would otherwise be ignored without a word.
pub fn unknown_env<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    names
        .into_iter()
        .filter(|name| {
            let Some(key) = name.strip_prefix("CALLOPS_") else {
                return false;
            };
            !(key.contains("__")
                || key == "CONFIG"
                || key.starts_with("TEST_")
                || API_KEYS_ENV.contains(name)
                || CLIENT_ENV.contains(name)
                || ENV_ALIASES.iter().any(|(alias, _)| *alias == key))
        })
        .collect()
}

/// `CALLOPS_*` variables: the documented aliases, and `SECTION__FIELD` for everything else
/// (but [`API_KEYS_ENV`]).
fn env_provider() -> Env {
    Env::prefixed("CALLOPS_").filter_map(|key| {
        let key = key.as_str().to_ascii_uppercase();
        if API_KEYS_ENV
            .iter()
            .any(|name| name.strip_prefix("CALLOPS_") == Some(key.as_str()))
        {
            return None;
        }
        if let Some((_, path)) = ENV_ALIASES.iter().find(|(alias, _)| *alias == key) {
            return Some((*path).into());
        }
        key.contains("__")
            .then(|| key.to_ascii_lowercase().replace("__", ".").into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(
        clippy::result_large_err,
        reason = "figment's Jail API returns figment::Error"
    )]
    fn load_with_env(vars: &[(&str, &str)]) -> Result<Config, String> {
        let mut result = None;
        figment::Jail::expect_with(|jail| {
            for (name, value) in vars {
                jail.set_env(name, value);
            }
            result = Some(Config::load(None).map_err(|e| e.to_string()));
            Ok(())
        });
        result.unwrap()
    }

    #[test]
    fn acs_api_versions_are_checked_at_start() {
        for version in [
            "2024-09-15",
            "2025-05-15",
            "2025-06-15",
            "2026-03-12",
            "2023-03-06",
        ] {
            let config = load_with_env(&[("CALLOPS_ACS_API_VERSION", version)]).unwrap();
            assert_eq!(config.acs.api_version, version);
        }
        for version in ["", "2026-13-01", "latest"] {
            let message = load_with_env(&[("CALLOPS_ACS_API_VERSION", version)]).unwrap_err();
            assert!(message.contains("CALLOPS_ACS_API_VERSION"), "{message}");
            assert!(
                message.contains(
                    "2024-09-15, 2024-11-15-preview, 2025-03-30-preview, 2025-05-15, 2025-06-15"
                ),
                "{message}"
            );
            assert!(message.contains("2026-03-12"), "{message}");
        }
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let config = Config::embedded();
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.acs.api_version, "2024-09-15");
        assert!(config.acs.connection().unwrap().is_none());
        assert_eq!(
            config.acs_callback_url().expose().as_str(),
            "http://127.0.0.1:8080/callbacks/acs"
        );
    }

    #[test]
    fn environment_overrides_file() {
        let config = load_with_env(&[
            ("CALLOPS_LISTEN", "0.0.0.0:9000"),
            ("CALLOPS_PUBLIC_URL", "https://callops.example.com/base/"),
            (
                "CALLOPS_ACS_CONNECTION_STRING",
                "endpoint=https://r.communication.azure.com/;accesskey=a2V5",
            ),
            ("CALLOPS_ACS_API_VERSION", "2026-03-12"),
            ("CALLOPS_ACS_CALLBACK_AUDIENCE", "resource-id"),
            ("CALLOPS_OPERATIONS__MAX_WAIT_SECS", "30"),
            ("CALLOPS_CONFIG", "ignored, not a field"),
        ])
        .unwrap();
        assert_eq!(config.http.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.acs.api_version, "2026-03-12");
        assert_eq!(config.operations.max_wait_secs, 30);
        assert_eq!(
            config.acs_callback_url().expose().as_str(),
            "https://callops.example.com/base/callbacks/acs"
        );
        let cs = config.acs.connection().unwrap().unwrap();
        assert_eq!(cs.endpoint.as_str(), "https://r.communication.azure.com/");
    }

    #[test]
    fn the_event_timeline_bound_comes_from_the_environment_and_keeps_one_at_least() {
        use crate::operation::EventBound;
        assert_eq!(
            Config::embedded().operations.event_bound(),
            EventBound {
                first: 10,
                last: 40
            }
        );
        let config = load_with_env(&[
            ("CALLOPS_OPERATIONS__EVENTS_FIRST", "0"),
            ("CALLOPS_OPERATIONS__EVENTS_LAST", "5"),
        ])
        .unwrap();
        assert_eq!(
            config.operations.event_bound(),
            EventBound { first: 0, last: 5 }
        );
        let err = load_with_env(&[("CALLOPS_OPERATIONS__EVENTS_LAST", "0")]).unwrap_err();
        assert!(err.contains("operations.events_last"), "{err}");
    }

    #[test]
    fn errors_say_what_is_expected_without_secrets() {
        let err = load_with_env(&[(
            "CALLOPS_ACS_CONNECTION_STRING",
            "accesskey=c3VwZXJzZWNyZXQ=",
        )])
        .unwrap_err();
        assert!(err.contains("CALLOPS_ACS_CONNECTION_STRING"), "{err}");
        assert!(err.contains("endpoint=https://"), "{err}");
        assert!(!err.contains("c3VwZXJzZWNyZXQ"), "{err}");

        let err = load_with_env(&[("CALLOPS_STORE", "postgres://x")]).unwrap_err();
        assert!(err.contains("memory"), "{err}");
        let err = load_with_env(&[("CALLOPS_LISTEN", "nowhere")]).unwrap_err();
        assert!(err.contains("CALLOPS_LISTEN"), "{err}");
        let err = load_with_env(&[("CALLOPS_CALLBACK_AUTH", "maybe")]).unwrap_err();
        assert!(err.contains("CALLOPS_CALLBACK_AUTH"), "{err}");
        let err = load_with_env(&[("CALLOPS_OPERATIONS__MAX_WAIT_SECS", "soon")]).unwrap_err();
        assert!(err.contains("CALLOPS_OPERATIONS__MAX_WAIT_SECS"), "{err}");
        let err = load_with_env(&[("CALLOPS_EMULATOR__ENABLED", "false")]).unwrap_err();
        assert!(err.contains("CALLOPS_ACS_CONNECTION_STRING"), "{err}");
    }

    #[test]
    fn graph_is_configured_from_the_environment_and_checked() {
        let config = load_with_env(&[
            ("CALLOPS_GRAPH_BASE_URL", "https://graph.microsoft.us/v1.0"),
            (
                "CALLOPS_GRAPH_AUTHORITY",
                "https://login.microsoftonline.us",
            ),
            ("CALLOPS_GRAPH_TENANT_ID", "tenant"),
            ("CALLOPS_GRAPH_CLIENT_ID", "app"),
            ("CALLOPS_GRAPH_CLIENT_SECRET", "c2VjcmV0"),
            ("CALLOPS_GRAPH__RETRY__MAX_ATTEMPTS", "2"),
        ])
        .unwrap();
        assert!(config.graph.is_configured());
        assert_eq!(
            config.graph.base_url.as_str(),
            "https://graph.microsoft.us/v1.0"
        );
        assert_eq!(config.graph.retry.max_attempts, 2);
        assert!(!format!("{config:?}").contains("c2VjcmV0"));
        assert_eq!(
            config.graph_callback_url().expose().as_str(),
            "http://127.0.0.1:8080/callbacks/graph"
        );
        // An id without a secret, no credentials without the emulator, odd URLs.
        let err = load_with_env(&[("CALLOPS_GRAPH_CLIENT_ID", "app")]).unwrap_err();
        assert!(err.contains("CALLOPS_GRAPH_CLIENT_SECRET"), "{err}");
        let err = load_with_env(&[
            (
                "CALLOPS_ACS_CONNECTION_STRING",
                "endpoint=https://r.communication.azure.com/;accesskey=a2V5",
            ),
            ("CALLOPS_EMULATOR__ENABLED", "false"),
        ])
        .unwrap_err();
        assert!(err.contains("CALLOPS_GRAPH_CLIENT_ID"), "{err}");
        let err = load_with_env(&[("CALLOPS_GRAPH_BASE_URL", "ftp://graph")]).unwrap_err();
        assert!(err.contains("graph.base_url"), "{err}");
        let config = Config::embedded();
        assert_eq!(
            config
                .operations
                .callback_timeouts
                .for_kind(&crate::operation::OperationKind::CancelMediaProcessing),
            Duration::from_secs(240)
        );
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment's Jail API returns figment::Error"
    )]
    fn a_config_file_sits_between_defaults_and_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "callops.toml",
                "[http]\nlisten = \"127.0.0.1:9100\"\n[operations]\nmax_wait_secs = 20\n",
            )?;
            jail.set_env("CALLOPS_OPERATIONS__MAX_WAIT_SECS", "10");
            let config = Config::load(Some(Path::new("callops.toml"))).unwrap();
            assert_eq!(config.http.listen.to_string(), "127.0.0.1:9100");
            assert_eq!(config.operations.max_wait_secs, 10);
            assert_eq!(config.acs.api_version, "2024-09-15");
            let err = Config::load(Some(Path::new("missing.toml"))).unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            jail.create_file("typo.toml", "[http]\nlisen = \"x\"\n")?;
            let err = Config::load(Some(Path::new("typo.toml"))).unwrap_err();
            assert!(err.to_string().contains("lisen"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn api_keys_are_a_trimmed_comma_separated_list_never_shown() {
        let config = Config::embedded();
        assert!(
            config.http.api_keys().unwrap().is_empty(),
            "open by default"
        );
        assert_eq!(config.http.header_read_timeout(), Duration::from_secs(10));

        let first = "k1-0123456789abcdef";
        let second = "k2-fedcba9876543210";
        let list = format!(" {first} ,, {second},");
        let config = load_with_env(&[("CALLOPS_API_KEYS", &list)]).unwrap();
        let keys: Vec<String> = config
            .http
            .api_keys()
            .unwrap()
            .iter()
            .map(|key| key.expose_secret().to_owned())
            .collect();
        assert_eq!(keys, [first, second]);
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("k1-0123") && !shown.contains("k2-fedc"),
            "{shown}"
        );
        // The nested-field spelling works too.
        let config = load_with_env(&[("CALLOPS_HTTP__API_KEYS", first)]).unwrap();
        assert_eq!(config.http.api_keys().unwrap().len(), 1);

        // Refused by position, never echoed.
        let short = "short-key-1234";
        let err = load_with_env(&[("CALLOPS_API_KEYS", &format!("{first},{short}"))]).unwrap_err();
        assert!(err.contains("CALLOPS_API_KEYS"), "{err}");
        assert!(err.contains("key 2"), "{err}");
        assert!(err.contains("16"), "{err}");
        assert!(!err.contains(short) && !err.contains(first), "{err}");
        // Taken verbatim: digits stay a string, leading zeros and all.
        for verbatim in [
            "0123456789012345678",
            "[abcdefghijklmnopq]",
            "true-but-longer-than-16",
        ] {
            let config = load_with_env(&[("CALLOPS_API_KEYS", verbatim)]).unwrap();
            let keys = config.http.api_keys().unwrap();
            assert_eq!(keys[0].expose_secret(), verbatim);
        }
        let err = load_with_env(&[("CALLOPS_API_KEYS", "1234567")]).unwrap_err();
        assert!(!err.contains("1234567"), "{err}");
        let spaced = "has a space inside it";
        let err = load_with_env(&[("CALLOPS_API_KEYS", spaced)]).unwrap_err();
        assert!(err.contains("key 1"), "{err}");
        assert!(!err.contains(spaced), "{err}");
        let err = load_with_env(&[("CALLOPS_HTTP__HEADER_READ_TIMEOUT_SECS", "0")]).unwrap_err();
        assert!(err.contains("http.header_read_timeout_secs"), "{err}");
    }

    #[test]
    fn load_errors_name_the_expected_form_once() {
        let err = load_with_env(&[("CALLOPS_LISTEN", "localhost:8080")]).unwrap_err();
        assert!(
            err.contains("CALLOPS_LISTEN") && err.contains("0.0.0.0:8080"),
            "{err}"
        );
        let file = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Toml::string("[http]\nlistn = \"x\"\n"));
        let err = Config::from_figment(file).unwrap_err().to_string();
        assert!(err.contains("expected one of `listen`"), "{err}");
        assert!(
            !err.contains("``") && !err.contains("CALLOPS_HTTP__LISTN"),
            "{err}"
        );
        let err = ConfigError::from(
            crate::acs::connection_string::ConnectionString::parse("endpoint=x").unwrap_err(),
        );
        assert!(std::error::Error::source(&err).is_none(), "{err}");
    }

    #[test]
    fn unknown_callops_variables_are_found() {
        let names = [
            "CALLOPS_LISTENN",
            "CALLOPS_LISTEN",
            "CALLOPS_STORE",
            "CALLOPS_OPERATIONS__MAX_WAIT_SECS",
            "CALLOPS_API_KEYS",
            "CALLOPS_CONFIG",
            "CALLOPS_TEST_REDIS",
            "PATH",
        ];
        assert_eq!(unknown_env(names), ["CALLOPS_LISTENN"]);
    }

    #[test]
    fn the_client_settings_are_not_unknown_variables() {
        let names = [
            "CALLOPS_URL",
            "CALLOPS_API_KEY",
            "CALLOPS_URLS",
            "CALLOPS_APIKEY",
        ];
        assert_eq!(unknown_env(names), ["CALLOPS_URLS", "CALLOPS_APIKEY"]);
    }

    #[test]
    fn the_store_location_is_memory_a_sqlite_file_or_redis() {
        let location = |text: &str| {
            StoreConfig {
                location: text.to_owned(),
                ..Config::embedded().store
            }
            .location()
        };
        assert_eq!(location("memory").unwrap(), StoreLocation::Memory);
        assert_eq!(
            location("data/callops.db").unwrap(),
            StoreLocation::Sqlite("data/callops.db".into())
        );
        assert_eq!(
            location("sqlite:///var/lib/callops/state.db").unwrap(),
            StoreLocation::Sqlite("/var/lib/callops/state.db".into())
        );
        assert_eq!(
            location("redis://:pw@127.0.0.1:6380/2").unwrap(),
            StoreLocation::Redis(RedisUrl("redis://:pw@127.0.0.1:6380/2".to_owned()))
        );
        assert!(matches!(
            location("rediss://cache.example.net:10000").unwrap(),
            StoreLocation::Redis(_)
        ));
        for cluster in [
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
            "rediss+cluster://:key@cache.example.net:10000",
        ] {
            assert!(matches!(
                location(cluster).unwrap(),
                StoreLocation::Redis(_)
            ));
        }
        let shown = format!(
            "{:?}",
            location("redis+cluster://:hunter2pw@h:1,h:2").unwrap()
        );
        assert!(!shown.contains("hunter2pw"), "{shown}");
        for mistyped in [
            "redis+cluster://",
            "redis+cluster://,",
            "memroy",
            "redis:/127.0.0.1:6379",
            "redis//127.0.0.1:6379",
            "sqlite:/var/lib/x.db",
            "sqlite://",
            "data/",
            "data/callops",
            "c:callops.db",
            "https://example.com/x.db",
        ] {
            let error = location(mistyped).unwrap_err().to_string();
            assert!(
                error.contains("memory") && error.contains("redis://"),
                "{mistyped}: {error}"
            );
        }
        assert_eq!(
            location("/var/lib/callops/state.sqlite3").unwrap(),
            StoreLocation::Sqlite("/var/lib/callops/state.sqlite3".into())
        );
        let shown = format!("{:?}", location("redis://:hunter2pw@h:1").unwrap());
        assert!(!shown.contains("hunter2pw"), "{shown}");
        let error = location("redis://:hunter2pw@").unwrap_err().to_string();
        assert!(!error.contains("hunter2pw"), "{error}");
        let config = StoreConfig {
            location: "rediss://:hunter2pw@cache.example.net:10000".to_owned(),
            ..Config::embedded().store
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2pw") && shown.contains("cache.example.net"),
            "{shown}"
        );
        for bad in ["", "sqlite://", "redis://", "postgres://x"] {
            assert!(location(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let config = load_with_env(&[
            (
                "CALLOPS_ACS_CONNECTION_STRING",
                "endpoint=https://r/;accesskey=c3VwZXJzZWNyZXQ=",
            ),
            ("CALLOPS_ACS_CALLBACK_AUDIENCE", "resource-id"),
            ("CALLOPS_CALLBACK_SECRET", "callback-secret-value"),
        ])
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("c3VwZXJzZWNyZXQ"), "{shown}");
        assert!(!shown.contains("callback-secret-value"), "{shown}");
        let url = config.acs_callback_url();
        assert!(
            url.expose()
                .as_str()
                .ends_with("/callbacks/acs?secret=callback-secret-value")
        );
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("callback-secret-value"), "{shown}");
            assert!(shown.contains("/callbacks/acs"), "{shown}");
        }
    }

    #[test]
    fn acs_with_entra_id_comes_from_an_endpoint_and_a_credential() {
        let config = load_with_env(&[
            ("CALLOPS_ACS_ENDPOINT", "https://r.communication.azure.com"),
            ("CALLOPS_ACS_CREDENTIAL", "managed-identity"),
            ("CALLOPS_ACS_CALLBACK_AUDIENCE", "resource-id"),
            ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
            ("IDENTITY_HEADER", "0123456789"),
            ("AZURE_CLIENT_ID", "user-assigned-id"),
        ])
        .unwrap();
        let Some(AcsUpstream::Entra {
            endpoint,
            credential:
                CredentialSettings::ManagedIdentity {
                    app_service: Some((url, header)),
                    client_id,
                    ..
                },
        }) = config.acs_upstream().unwrap()
        else {
            panic!("{:?}", config.acs_upstream());
        };
        assert_eq!(endpoint.as_str(), "https://r.communication.azure.com/");
        assert_eq!(url.as_str(), "http://localhost:42356/msi/token");
        // Taken verbatim, digits and all, and never shown.
        assert_eq!(header.expose_secret(), "0123456789");
        assert!(!format!("{config:?}").contains("0123456789"));
        assert_eq!(client_id.as_deref(), Some("user-assigned-id"));
        assert!(
            config.graph_credential().unwrap().is_none(),
            "Graph stays emulated"
        );

        // Workload identity as the AKS webhook sets it up.
        let config = load_with_env(&[
            ("CALLOPS_ACS_ENDPOINT", "https://r.communication.azure.com/"),
            ("CALLOPS_ACS_CREDENTIAL", "workload_identity"),
            ("CALLOPS_ACS_CALLBACK_AUDIENCE", "resource-id"),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/azure-identity-token",
            ),
            ("AZURE_CLIENT_ID", "app"),
            ("AZURE_TENANT_ID", "tenant"),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
            ("CALLOPS_GRAPH_CREDENTIAL", "workload-identity"),
            ("CALLOPS_GRAPH_CALLBACK_AUDIENCE", "bot-app-id"),
        ])
        .unwrap();
        for credential in [
            match config.acs_upstream().unwrap() {
                Some(AcsUpstream::Entra { credential, .. }) => credential,
                other => panic!("{other:?}"),
            },
            config.graph_credential().unwrap().unwrap(),
        ] {
            let CredentialSettings::WorkloadIdentity {
                authority,
                tenant_id,
                client_id,
                token_file,
            } = credential
            else {
                panic!("{credential:?}");
            };
            assert_eq!(authority.as_str(), "https://login.microsoftonline.us/");
            assert_eq!((tenant_id.as_str(), client_id.as_str()), ("tenant", "app"));
            assert!(token_file.ends_with("azure-identity-token"));
        }
        // A connection string keeps working exactly as before.
        let config = load_with_env(&[
            (
                "CALLOPS_ACS_CONNECTION_STRING",
                "endpoint=https://r.communication.azure.com/;accesskey=a2V5",
            ),
            ("CALLOPS_ACS_CALLBACK_AUDIENCE", "resource-id"),
            ("CALLOPS_ACS_CREDENTIAL", "key"),
        ])
        .unwrap();
        assert!(matches!(
            config.acs_upstream().unwrap(),
            Some(AcsUpstream::Key(_))
        ));
    }

    #[test]
    fn graph_takes_a_certificate_or_a_managed_identity() {
        let config = load_with_env(&[
            ("CALLOPS_GRAPH_CREDENTIAL", "certificate"),
            ("CALLOPS_GRAPH_TENANT_ID", "tenant"),
            ("CALLOPS_GRAPH_CLIENT_ID", "app"),
            (
                "CALLOPS_GRAPH_CLIENT_CERTIFICATE_PATH",
                "/etc/callops/graph.pem",
            ),
        ])
        .unwrap();
        assert!(matches!(
            config.graph_credential().unwrap(),
            Some(CredentialSettings::Certificate { path, .. }) if path.ends_with("graph.pem")
        ));
        // The bot's app id, the notifications' audience, can come from AZURE_CLIENT_ID.
        let config = load_with_env(&[
            ("CALLOPS_GRAPH_CREDENTIAL", "workload-identity"),
            ("AZURE_CLIENT_ID", "bot-app-id"),
            ("AZURE_TENANT_ID", "tenant"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/tokens/azure-identity-token"),
        ])
        .unwrap();
        assert_eq!(config.graph_app_id(), "bot-app-id");
        let config = load_with_env(&[
            ("CALLOPS_GRAPH_CREDENTIAL", "managed-identity"),
            ("CALLOPS_GRAPH_CALLBACK_AUDIENCE", "bot-app-id"),
        ])
        .unwrap();
        assert!(matches!(
            config.graph_credential().unwrap(),
            Some(CredentialSettings::ManagedIdentity { app_service: None, client_id: None, ref imds })
                if imds.as_str() == "http://169.254.169.254/"
        ));
    }

    #[test]
    fn ambiguous_or_incomplete_credentials_refuse_to_start() {
        let refused = |vars: &[(&str, &str)], wanted: &[&str]| {
            let err = load_with_env(vars).unwrap_err();
            for word in wanted {
                assert!(err.contains(word), "{vars:?}: {err} lacks {word}");
            }
            assert!(!err.contains("a2V5") && !err.contains("s3cr3t"), "{err}");
        };
        let key = "endpoint=https://r.communication.azure.com/;accesskey=a2V5";
        let endpoint = "https://r.communication.azure.com/";
        refused(
            &[
                ("CALLOPS_ACS_CONNECTION_STRING", key),
                ("CALLOPS_ACS_ENDPOINT", endpoint),
            ],
            &[
                "CALLOPS_ACS_CONNECTION_STRING",
                "CALLOPS_ACS_ENDPOINT",
                "only one",
            ],
        );
        refused(
            &[("CALLOPS_ACS_ENDPOINT", endpoint)],
            &[
                "CALLOPS_ACS_CREDENTIAL",
                "managed-identity",
                "workload-identity",
            ],
        );
        refused(
            &[("CALLOPS_ACS_CREDENTIAL", "managed-identity")],
            &["CALLOPS_ACS_ENDPOINT"],
        );
        refused(
            &[
                ("CALLOPS_ACS_CONNECTION_STRING", key),
                ("CALLOPS_ACS_CREDENTIAL", "managed-identity"),
            ],
            &[
                "CALLOPS_ACS_ENDPOINT",
                "instead of CALLOPS_ACS_CONNECTION_STRING",
            ],
        );
        refused(
            &[
                ("CALLOPS_ACS_ENDPOINT", endpoint),
                ("CALLOPS_ACS_CREDENTIAL", "key"),
            ],
            &["CALLOPS_ACS_CONNECTION_STRING"],
        );
        refused(
            &[
                ("CALLOPS_ACS_ENDPOINT", endpoint),
                ("CALLOPS_ACS_CREDENTIAL", "magic"),
            ],
            &[
                "CALLOPS_ACS_CREDENTIAL",
                "\"magic\"",
                "managed-identity",
                "certificate",
            ],
        );
        refused(
            &[
                ("CALLOPS_ACS_ENDPOINT", "http://r.communication.azure.com/"),
                ("CALLOPS_ACS_CREDENTIAL", "managed-identity"),
            ],
            &["CALLOPS_ACS_ENDPOINT", "https"],
        );
        refused(
            &[
                ("CALLOPS_ACS_ENDPOINT", endpoint),
                ("CALLOPS_ACS_CREDENTIAL", "workload-identity"),
            ],
            &[
                "CALLOPS_ACS_TENANT_ID",
                "AZURE_CLIENT_ID",
                "AZURE_FEDERATED_TOKEN_FILE",
            ],
        );
        refused(
            &[
                ("CALLOPS_ACS_ENDPOINT", endpoint),
                ("CALLOPS_ACS_CREDENTIAL", "secret"),
                ("CALLOPS_ACS_TENANT_ID", "t"),
                ("CALLOPS_ACS_CLIENT_ID", "c"),
            ],
            &["CALLOPS_ACS_CLIENT_SECRET", "AZURE_CLIENT_SECRET"],
        );
        refused(
            &[
                ("CALLOPS_ACS_ENDPOINT", endpoint),
                ("CALLOPS_ACS_CREDENTIAL", "managed-identity"),
                ("IDENTITY_ENDPOINT", "http://localhost:1/msi/token"),
            ],
            &["IDENTITY_HEADER"],
        );
        refused(
            &[
                ("CALLOPS_GRAPH_CREDENTIAL", "certificate"),
                ("CALLOPS_GRAPH_TENANT_ID", "t"),
                ("CALLOPS_GRAPH_CLIENT_ID", "c"),
            ],
            &["CALLOPS_GRAPH_CLIENT_CERTIFICATE_PATH"],
        );
        refused(
            &[("CALLOPS_GRAPH_CREDENTIAL", "key")],
            &["CALLOPS_GRAPH_CREDENTIAL", "secret"],
        );
        refused(
            &[(
                "CALLOPS_EMULATOR__CLIENT_CERTIFICATE_PATH",
                "/nonexistent/dev.pem",
            )],
            &["emulator.client_certificate_path"],
        );
        // A managed identity without a client id names no bot: the audience must be given.
        refused(
            &[("CALLOPS_GRAPH_CREDENTIAL", "managed-identity")],
            &["CALLOPS_GRAPH_CALLBACK_AUDIENCE"],
        );
        refused(
            &[
                ("CALLOPS_ACS_ENDPOINT", endpoint),
                ("CALLOPS_ACS_CREDENTIAL", "managed-identity"),
            ],
            &["CALLOPS_ACS_CALLBACK_AUDIENCE"],
        );
    }

    #[test]
    fn callback_verification_is_configured_from_the_environment() {
        let config = Config::embedded();
        assert_eq!(config.callbacks.auth, CallbackAuth::Jwt);
        assert_eq!(
            config.callbacks.graph.issuer.0,
            [
                "https://graph.microsoft.com",
                "https://api.botframework.com"
            ]
        );
        let config = load_with_env(&[
            (
                "CALLOPS_ACS_CALLBACK_OPENID_URL",
                "https://acs.example.us/calling/.well-known/acsopenidconfiguration",
            ),
            ("CALLOPS_ACS_CALLBACK_ISSUER", "https://acs.example.us"),
            ("CALLOPS_ACS_CALLBACK_AUDIENCE", "resource-id"),
            (
                "CALLOPS_GRAPH_CALLBACK_OPENID_URL",
                "https://graph.example.us/keys",
            ),
            ("CALLOPS_GRAPH_CALLBACK_ISSUERS", " https://a , https://b ,"),
            ("CALLOPS_GRAPH_CALLBACK_AUDIENCE", "bot-app-id"),
            ("CALLOPS_CALLBACK_AUTH", "none"),
        ])
        .unwrap();
        assert_eq!(config.callbacks.auth, CallbackAuth::None);
        assert_eq!(config.callbacks.acs.issuer.0, ["https://acs.example.us"]);
        assert_eq!(config.callbacks.acs.audience, "resource-id");
        assert_eq!(config.callbacks.graph.issuer.0, ["https://a", "https://b"]);
        assert_eq!(config.callbacks.graph.audience, "bot-app-id");
        assert_eq!(
            config.callbacks.graph.openid_url.as_str(),
            "https://graph.example.us/keys"
        );
        // A real ACS resource needs its audience; no issuer or a bad URL is refused.
        let err = load_with_env(&[(
            "CALLOPS_ACS_CONNECTION_STRING",
            "endpoint=https://r.communication.azure.com/;accesskey=a2V5",
        )])
        .unwrap_err();
        assert!(err.contains("CALLOPS_ACS_CALLBACK_AUDIENCE"), "{err}");
        let err = load_with_env(&[("CALLOPS_GRAPH_CALLBACK_ISSUERS", " , ")]).unwrap_err();
        assert!(err.contains("issuer"), "{err}");
        let err = load_with_env(&[("CALLOPS_ACS_CALLBACK_OPENID_URL", "ftp://keys")]).unwrap_err();
        assert!(err.contains("openid_url"), "{err}");
    }

    #[test]
    fn cluster_urls_name_their_seed_nodes_with_the_credentials() {
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/").unwrap(),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://:p%40ss@cache.example.net:10000").unwrap(),
            ["rediss://:p%40ss@cache.example.net:10000"]
        );
    }
}
