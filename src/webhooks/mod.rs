//! Outbound webhooks: subscriptions (created, listed, rotated, enabled, deleted through the
//! store) and the sender that attempts every pending delivery of the store's outbox, signed
//! per Standard Webhooks, retried with backoff, dead-lettered past its window.

pub mod signing;
pub mod target;

pub use signing::secret_schema;
pub use target::{url_schema, url_schema_object};

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use dashmap::{DashMap, DashSet};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WebhooksConfig;
use crate::metrics::{Metrics, WebhookOutcome};
use crate::store::outbox::{
    Attempt, Delivery, DeliveryStatus, EVENT_TYPES, Subscription, SubscriptionFilter,
};
use crate::store::{Storage, StoreError};
use crate::telemetry::LogBudget;
use signing::SigningKey;

/// Why a webhook request was refused.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Malformed input: the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// A limit is reached.
    #[error("{0}")]
    Conflict(String),
}

/// What a client gives to subscribe.
#[derive(Debug, Clone)]
pub struct NewSubscription {
    pub url: String,
    pub filter: SubscriptionFilter,
    pub event_types: Vec<String>,
}

/// A cheap handle.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Storage,
    client: reqwest::Client,
    config: WebhooksConfig,
    metrics: Metrics,
    /// Attempts in flight per endpoint (scheme, host, port).
    endpoints: DashMap<String, Arc<Semaphore>>,
    /// Deliveries being attempted now: not handed out again until their outcome is stored.
    in_flight: DashSet<String>,
}

/// Deliveries taken per pass of the sender.
const DUE_PER_PASS: usize = 512;

/// The longest the sender sleeps between passes (a commit wakes it sooner).
const MAX_IDLE: Duration = Duration::from_secs(1);

/// The most deliveries a subscription's log lists (the newest).
pub const DELIVERIES_LISTED: usize = 200;

/// A delivery's lease outlives its attempt (two timeouts) by this much.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// How often finished deliveries past their log retention are forgotten.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// How much of an error to keep in the attempt log.
const MAX_ERROR_LEN: usize = 256;

impl Webhooks {
    /// The sender's HTTP client: a short timeout, no redirects, and (unless private targets
    /// are allowed) a resolver that drops private addresses.
    pub fn new(
        storage: Storage,
        config: &WebhooksConfig,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("callops-webhooks/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .connect_timeout(Duration::from_millis(config.request_timeout_ms))
            .redirect(reqwest::redirect::Policy::none());
        if !config.allow_private_targets {
            builder = builder.dns_resolver(Arc::new(target::PublicResolver));
        }
        let client = builder
            .build()
            .map_err(|error| anyhow::anyhow!("building the webhook HTTP client: {error}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                storage,
                client,
                config: config.clone(),
                metrics,
                endpoints: DashMap::new(),
                in_flight: DashSet::new(),
            }),
        })
    }

    /// Checks a target URL against the configured policy.
    pub fn check_url(&self, url: &str) -> Result<(), WebhookError> {
        target::check_url(url, self.inner.config.allow_private_targets)
            .map(drop)
            .map_err(|error| WebhookError::Invalid(error.to_string()))
    }

    /// Creates a subscription with a new secret; returned with it (the only time it is
    /// shown).
    pub async fn create_subscription(
        &self,
        new: NewSubscription,
    ) -> Result<Subscription, WebhookError> {
        self.check_url(&new.url)?;
        check_event_types(&new.event_types)?;
        let outbox = self.inner.storage.outbox()?;
        if outbox.subscription_count() >= self.inner.config.max_subscriptions {
            return Err(WebhookError::Conflict(format!(
                "at most {} subscriptions (webhooks.max_subscriptions)",
                self.inner.config.max_subscriptions
            )));
        }
        let event_types = first_of_each(new.event_types);
        let subscription = Subscription {
            id: format!("sub_{}", uuid::Uuid::now_v7().simple()),
            url: new.url,
            filter: new.filter,
            event_types,
            secret: signing::generate_secret(),
            created_date_time: OffsetDateTime::now_utc(),
            disabled: false,
            disabled_reason: None,
            failing_since: None,
        };
        self.write(vec![subscription.document()]).await?;
        Ok(subscription)
    }

    pub fn subscriptions(&self) -> Result<Vec<Subscription>, WebhookError> {
        Ok(self.inner.storage.outbox()?.subscriptions())
    }

    pub fn subscription(&self, id: &str) -> Result<Subscription, WebhookError> {
        self.inner
            .storage
            .outbox()?
            .subscription(id)
            .ok_or_else(|| unknown_subscription(id))
    }

    /// Deletes a subscription; its pending deliveries are dead-lettered when next due.
    pub async fn delete_subscription(&self, id: &str) -> Result<(), WebhookError> {
        let subscription = self.subscription(id)?;
        let mut document = subscription.document();
        document.body = None;
        self.write(vec![document]).await
    }

    /// Gives a subscription a new secret; returned with it.
    pub async fn rotate_secret(&self, id: &str) -> Result<Subscription, WebhookError> {
        let mut subscription = self.subscription(id)?;
        subscription.secret = signing::generate_secret();
        self.write(vec![subscription.document()]).await?;
        Ok(subscription)
    }

    /// Turns a disabled subscription on again.
    pub async fn enable(&self, id: &str) -> Result<Subscription, WebhookError> {
        let mut subscription = self.subscription(id)?;
        subscription.disabled = false;
        subscription.disabled_reason = None;
        subscription.failing_since = None;
        self.write(vec![subscription.document()]).await?;
        Ok(subscription)
    }

    /// A subscription's deliveries, newest first.
    pub fn deliveries(&self, subscription: &str) -> Result<Vec<Delivery>, WebhookError> {
        self.subscription(subscription)?;
        Ok(self
            .inner
            .storage
            .outbox()?
            .deliveries_of(subscription, DELIVERIES_LISTED))
    }

    /// Sends a delivery again (same `webhook-id`), with a new retry window.
    pub async fn redeliver(
        &self,
        subscription: &str,
        delivery: &str,
    ) -> Result<Delivery, WebhookError> {
        self.subscription(subscription)?;
        let mut found = self
            .inner
            .storage
            .outbox()?
            .delivery(delivery)
            .filter(|found| found.subscription.as_deref() == Some(subscription))
            .ok_or_else(|| {
                WebhookError::NotFound(format!(
                    "delivery {delivery:.64} of subscription {subscription:.64} does not exist"
                ))
            })?;
        let now = OffsetDateTime::now_utc();
        found.status = DeliveryStatus::Pending;
        found.next_attempt_date_time = None;
        found.deadline = now + retry_total(&self.inner.config);
        self.write(vec![found.document()]).await?;
        Ok(found)
    }

    /// Deliveries waiting, and the age of the oldest (zero: none, or not this backend).
    pub fn pending(&self) -> (u64, f64) {
        let Ok(outbox) = self.inner.storage.outbox() else {
            return (0, 0.0);
        };
        let (count, oldest) = outbox.pending();
        let age = oldest.map_or(0.0, |oldest| {
            (OffsetDateTime::now_utc() - oldest)
                .as_seconds_f64()
                .max(0.0)
        });
        (count as u64, age)
    }

    async fn write(
        &self,
        documents: Vec<crate::store::journal::Document>,
    ) -> Result<(), WebhookError> {
        Ok(self.inner.storage.write_documents(documents).await?)
    }

    /// Attempts every due delivery until `shutdown`, each on `tasks`.
    pub async fn run(self, tasks: TaskTracker, shutdown: CancellationToken) {
        let outbox = match self.inner.storage.outbox() {
            Ok(outbox) => outbox.clone(),
            Err(error) => {
                tracing::warn!(%error, "webhooks and the change stream are off");
                return;
            }
        };
        let mut next_cleanup = tokio::time::Instant::now();
        let lease = Duration::from_millis(self.inner.config.request_timeout_ms) * 2 + LEASE_MARGIN;
        loop {
            let now = OffsetDateTime::now_utc();
            if tokio::time::Instant::now() >= next_cleanup {
                next_cleanup += CLEANUP_EVERY;
                self.forget_finished(&outbox, now).await;
            }
            for delivery in outbox.due(now, DUE_PER_PASS) {
                if !self.inner.in_flight.insert(delivery.id.clone()) {
                    continue;
                }
                // On a shared store, one replica attempts each delivery at a time.
                match self.inner.storage.lease_delivery(&delivery.id, lease).await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        self.inner.in_flight.remove(&delivery.id);
                        continue;
                    }
                }
                let this = self.clone();
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    let id = delivery.id.clone();
                    tokio::select! {
                        () = this.attempt(delivery) => {
                            // An error leaves the lease to expire.
                            let _ = this.inner.storage.release_delivery(&id).await;
                        }
                        // Left pending: the next start attempts it again, same id.
                        () = stop.cancelled() => {}
                    }
                    this.inner.in_flight.remove(&id);
                });
            }
            let idle = outbox
                .next_due()
                .map_or(MAX_IDLE, |due| {
                    Duration::try_from(due - now).unwrap_or(Duration::ZERO)
                })
                .clamp(Duration::from_millis(10), MAX_IDLE);
            tokio::select! {
                () = outbox.added() => {}
                () = tokio::time::sleep(idle) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Forgets finished deliveries past `webhooks.log_retention_secs`.
    async fn forget_finished(&self, outbox: &crate::store::outbox::Outbox, now: OffsetDateTime) {
        let retention = time::Duration::seconds(
            i64::try_from(self.inner.config.log_retention_secs).unwrap_or(i64::MAX / 2),
        );
        let forgotten: Vec<_> = outbox
            .finished_before(now - retention)
            .into_iter()
            .map(|id| crate::store::journal::Document {
                kind: crate::store::outbox::DELIVERY,
                id,
                body: None,
            })
            .collect();
        if !forgotten.is_empty()
            && let Err(error) = self.inner.storage.write_documents(forgotten).await
        {
            tracing::warn!(%error, "finished webhook deliveries could not be forgotten; retried later");
        }
    }

    /// One attempt of `delivery`, and its outcome stored.
    async fn attempt(&self, mut delivery: Delivery) {
        let Ok(outbox) = self.inner.storage.outbox() else {
            return;
        };
        let target = match &delivery.subscription {
            Some(id) => match outbox.subscription(id) {
                Some(subscription) if subscription.disabled => {
                    Err(format!("subscription {id} is disabled"))
                }
                Some(subscription) => Ok((subscription.url, Some(subscription.secret))),
                None => Err(format!("subscription {id} was deleted")),
            },
            None => delivery
                .url
                .clone()
                .map(|url| (url, delivery.secret.clone()))
                .ok_or_else(|| "the delivery names no target".to_owned()),
        }
        .and_then(|(url, secret)| match self.check_url(&url) {
            Ok(()) => Ok((url, secret)),
            Err(error) => Err(error.to_string()),
        });
        let (url, secret) = match target {
            Ok(target) => target,
            Err(reason) => {
                let now = OffsetDateTime::now_utc();
                delivery.record(Attempt {
                    date_time: now,
                    status_code: None,
                    error: Some(reason),
                    duration_ms: 0,
                });
                delivery.status = DeliveryStatus::Failed;
                delivery.next_attempt_date_time = None;
                self.inner.metrics.webhook_attempt(WebhookOutcome::Failed);
                self.store_outcome(delivery, None).await;
                return;
            }
        };
        let permits = self.endpoint(&url);
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        let started = std::time::Instant::now();
        let sent = OffsetDateTime::now_utc();
        let answer = self.send(&url, secret.as_deref(), &delivery, sent).await;
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (status_code, error, verdict) = match answer {
            Ok(answer) => {
                let verdict = match classify(answer.status) {
                    Verdict::Retry(_) => Verdict::Retry(answer.retry_after),
                    verdict => verdict,
                };
                (Some(answer.status), answer.error, verdict)
            }
            Err(error) => (None, Some(error), Verdict::Retry(None)),
        };
        delivery.record(Attempt {
            date_time: sent,
            status_code,
            error,
            duration_ms,
        });
        let now = OffsetDateTime::now_utc();
        let outcome = match verdict {
            Verdict::Delivered => {
                delivery.status = DeliveryStatus::Delivered;
                delivery.next_attempt_date_time = None;
                WebhookOutcome::Delivered
            }
            Verdict::Refused => {
                delivery.status = DeliveryStatus::Failed;
                delivery.next_attempt_date_time = None;
                WebhookOutcome::Failed
            }
            Verdict::Retry(retry_after) => {
                let next = now + backoff(&self.inner.config, delivery.attempt_count, retry_after);
                if next > delivery.deadline {
                    delivery.status = DeliveryStatus::Failed;
                    delivery.next_attempt_date_time = None;
                    WebhookOutcome::Failed
                } else {
                    delivery.next_attempt_date_time = Some(next);
                    WebhookOutcome::Retried
                }
            }
        };
        self.inner.metrics.webhook_attempt(outcome);
        let health = delivery
            .subscription
            .as_deref()
            .and_then(|id| self.health_change(id, verdict == Verdict::Delivered, now));
        self.store_outcome(delivery, health).await;
    }

    /// The subscription with its health after an attempt, when that changed: failing since
    /// the first failure after a success, disabled once failing longer than configured.
    fn health_change(
        &self,
        id: &str,
        delivered: bool,
        now: OffsetDateTime,
    ) -> Option<Subscription> {
        let mut subscription = self.inner.storage.outbox().ok()?.subscription(id)?;
        let disable_after = time::Duration::seconds(
            i64::try_from(self.inner.config.disable_after_secs).unwrap_or(i64::MAX),
        );
        match (delivered, subscription.failing_since) {
            (true, Some(_)) => subscription.failing_since = None,
            (true, None) => return None,
            (false, None) => subscription.failing_since = Some(now),
            (false, Some(since)) if now - since >= disable_after && !subscription.disabled => {
                subscription.disabled = true;
                let since = since
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                subscription.disabled_reason = Some(format!("every delivery failed since {since}"));
                tracing::warn!(subscription.id = %id, "webhook subscription disabled: its endpoint keeps failing");
            }
            (false, Some(_)) => return None,
        }
        Some(subscription)
    }

    async fn store_outcome(&self, delivery: Delivery, subscription: Option<Subscription>) {
        let mut documents = vec![delivery.document()];
        documents.extend(subscription.map(|s| s.document()));
        if let Err(error) = self.inner.storage.write_documents(documents).await {
            static BUDGET: LogBudget = LogBudget::new();
            if BUDGET.allow() {
                tracing::error!(%error, delivery.id = %delivery.id, "a webhook attempt's outcome could not be stored; it is attempted again");
            }
        }
    }

    fn endpoint(&self, url: &str) -> Arc<Semaphore> {
        let key = url::Url::parse(url)
            .map(|url| url.origin().ascii_serialization())
            .unwrap_or_default();
        self.inner
            .endpoints
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.inner.config.per_endpoint_concurrency)))
            .clone()
    }

    /// POSTs the delivery; the receiver's status and, for a failure, the start of its body.
    async fn send(
        &self,
        url: &str,
        secret: Option<&str>,
        delivery: &Delivery,
        now: OffsetDateTime,
    ) -> Result<Answer, String> {
        let timestamp = now.unix_timestamp();
        let mut request = self
            .inner
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &delivery.id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(key) = secret.and_then(|secret| SigningKey::parse(secret).ok()) {
            request = request.header(
                "webhook-signature",
                key.sign(&delivery.id, timestamp, delivery.payload.as_bytes()),
            );
        }
        let response = request
            .body(delivery.payload.clone())
            .send()
            .await
            .map_err(describe)?;
        let status = response.status();
        let retry_after = crate::upstream::retry_after(response.headers());
        let error = if status.is_success() {
            None
        } else {
            let body = read_bounded(response, self.inner.config.max_response_bytes).await;
            let text = String::from_utf8_lossy(&body);
            Some(format!(
                "HTTP {}: {:.*}",
                status.as_u16(),
                MAX_ERROR_LEN,
                text.trim()
            ))
        };
        Ok(Answer {
            status: status.as_u16(),
            error,
            retry_after,
        })
    }
}

/// What a receiver answered.
struct Answer {
    status: u16,
    error: Option<String>,
    retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Delivered,
    /// A final refusal: dead-lettered at once.
    Refused,
    /// Tried again, not before the given delay when the receiver named one.
    Retry(Option<Duration>),
}

/// 2xx delivers; 408, 429 and 5xx are retried; anything else (3xx: redirects are not
/// followed; 4xx) is refused for good.
fn classify(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 | 500..=599 => Verdict::Retry(None),
        _ => Verdict::Refused,
    }
}

/// The delay before attempt `attempts + 1`: exponential from `initial_delay_ms` with
/// jitter, capped at `max_delay_ms`; a receiver's `Retry-After` when longer (capped too).
fn backoff(
    config: &WebhooksConfig,
    attempts: u32,
    retry_after: Option<Duration>,
) -> time::Duration {
    let max = Duration::from_millis(config.max_delay_ms.max(config.initial_delay_ms));
    let delay = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(config.initial_delay_ms))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempts.saturating_sub(1) as usize)
        .unwrap_or(max);
    let delay = retry_after.map_or(delay, |after| after.max(delay)).min(max);
    time::Duration::try_from(delay).unwrap_or(time::Duration::HOUR)
}

fn retry_total(config: &WebhooksConfig) -> time::Duration {
    time::Duration::seconds(i64::try_from(config.retry_total_secs).unwrap_or(i64::MAX / 2))
}

/// Reads at most `limit` bytes of a response (the rest is not waited for).
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// A transport error in a few words (reqwest's own message names the URL, kept out).
fn describe(error: reqwest::Error) -> String {
    if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&error);
        let mut cause = String::new();
        while let Some(inner) = source {
            cause = inner.to_string();
            source = inner.source();
        }
        let max = MAX_ERROR_LEN;
        format!("connection failed: {cause:.max$}")
    } else {
        format!("request failed: {:.*}", MAX_ERROR_LEN, error.without_url())
    }
}

fn check_event_types(types: &[String]) -> Result<(), WebhookError> {
    if types.is_empty() {
        return Err(WebhookError::Invalid(format!(
            "eventTypes: name at least one of {}",
            EVENT_TYPES.join(", ")
        )));
    }
    match types.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
        Some(unknown) => Err(WebhookError::Invalid(format!(
            "eventTypes: {unknown:.64} is not one of {}",
            EVENT_TYPES.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Each event type once, in the order given (`dedup` alone keeps repeats that are apart).
fn first_of_each(types: Vec<String>) -> Vec<String> {
    let mut kept: Vec<String> = Vec::with_capacity(types.len());
    for event_type in types {
        if !kept.contains(&event_type) {
            kept.push(event_type);
        }
    }
    kept
}

fn unknown_subscription(id: &str) -> WebhookError {
    WebhookError::NotFound(format!("subscription {id:.64} does not exist"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WebhooksConfig {
        crate::config::Config::embedded().webhooks
    }

    #[test]
    fn event_types_are_kept_once_each_in_order() {
        let given = [
            "operation.changed",
            "operation.settled",
            "operation.changed",
        ];
        let kept = first_of_each(given.iter().map(|t| (*t).to_owned()).collect());
        assert_eq!(kept, ["operation.changed", "operation.settled"]);
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        assert_eq!(classify(200), Verdict::Delivered);
        assert_eq!(classify(204), Verdict::Delivered);
        for status in [408, 429, 500, 502, 503, 504] {
            assert_eq!(classify(status), Verdict::Retry(None), "{status}");
        }
        for status in [301, 302, 400, 401, 404, 410] {
            assert_eq!(classify(status), Verdict::Refused, "{status}");
        }
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let config = config();
        let first = backoff(&config, 1, None);
        assert!(first <= time::Duration::seconds(2), "{first}");
        let late = backoff(&config, 40, None);
        assert!(late <= time::Duration::hours(1), "{late}");
        let told = backoff(&config, 1, Some(Duration::from_secs(120)));
        assert_eq!(told, time::Duration::seconds(120));
        let too_long = backoff(&config, 1, Some(Duration::from_secs(10 * 3600)));
        assert_eq!(too_long, time::Duration::hours(1));
    }

    #[test]
    fn event_types_must_be_known() {
        assert!(check_event_types(&["operation.settled".into()]).is_ok());
        assert!(check_event_types(&[]).is_err());
        assert!(check_event_types(&["operation.exploded".into()]).is_err());
    }
}
