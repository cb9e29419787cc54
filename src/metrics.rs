//! Prometheus metrics (`GET /metrics`, OpenMetrics text), with `prometheus-client`.
//!
//! [`Metrics`] is a cheap handle (an `Arc`) on one registry per [`crate::run`]: no global
//! registry, so many servers can run in one process. Counters and histograms are updated
//! where things happen (one line at each site); values other components already keep (the
//! store's sizes, the journal's totals, key and token fetches) are read at scrape time into
//! a [`Snapshot`] and written by a collector.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::correlation::{DeliverySummary, IncomingEvent};
use crate::operation::{CallRef, FINAL_STATUSES, ISSUED_KINDS, OperationKind, OperationStatus};

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels1 = [(&'static str, Cow<'static, str>); 1];
type Labels2 = [(&'static str, Cow<'static, str>); 2];
type Labels3 = [(&'static str, Cow<'static, str>); 3];
type HistogramFamily = Family<Labels1, Histogram, fn() -> Histogram>;

/// The application's metrics: one registry, cloned cheaply.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// What the collector writes; set by [`Metrics::encode`].
    snapshot: Arc<Mutex<Snapshot>>,
    /// One scrape at a time, so a scrape writes its own snapshot.
    scrape: Mutex<()>,
    /// The callback counters, made once per (source, outcome) so the callback path takes no
    /// lock: `[acs, graph] × CALLBACK_OUTCOMES`.
    callbacks: [[Counter; CALLBACK_OUTCOMES.len()]; 2],
    /// Decoded callback events by (source, type, outcome).
    callback_events: Family<Labels3, Counter>,
    /// Per source, the counters of each event type seen (made on first sight, then reached
    /// without touching the family's lock), at most [`MAX_EVENT_TYPES`] types per source.
    callback_types: [DashMap<Box<str>, EventCounters>; 2],
    upstream_requests: Family<Labels2, Counter>,
    upstream_duration: HistogramFamily,
    upstream_retries: Family<Labels1, Counter>,
    commit_duration: Histogram,
    commit_records: Histogram,
    /// Webhook attempts by outcome, one counter per [`WEBHOOK_OUTCOMES`] entry.
    webhook_attempts: [Counter; WEBHOOK_OUTCOMES.len()],
    /// Open change streams.
    stream_clients: prometheus_client::metrics::gauge::Gauge,
    /// Reconciliations by (kind, outcome).
    reconciliations: Family<Labels2, Counter>,
}

/// How a webhook attempt ended, for `callops_webhook_deliveries_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// A 2xx answered it.
    Delivered = 0,
    /// A transient failure; it is tried again later.
    Retried = 1,
    /// Dead-lettered: refused for good or out of retry time.
    Failed = 2,
}

const WEBHOOK_OUTCOMES: [&str; 3] = ["delivered", "retried", "failed"];

/// Values read at scrape time from the components that keep them.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub operations_in_memory: u64,
    pub parked_callbacks: u64,
    /// Parked callbacks whose operation never appeared, moved to their call's events.
    pub parked_callbacks_expired: u64,
    pub long_poll_waiters: u64,
    pub store_transactions: u64,
    pub store_records: u64,
    pub store_largest_batch: u64,
    pub store_commit_seconds: f64,
    pub key_fetches_acs: u64,
    pub key_fetches_graph: u64,
    pub graph_token_fetches: u64,
    /// Operations created, by [`ISSUED_KINDS`] index.
    pub operations_started: [u64; 2],
    /// Operations settled, by [`ISSUED_KINDS`] index, then [`FINAL_STATUSES`] index.
    pub operations_settled: [[u64; 3]; 2],
    /// Webhook deliveries waiting for an attempt.
    pub webhook_pending: u64,
    /// Age of the oldest of them.
    pub webhook_oldest_pending_seconds: f64,
}

/// How an upstream attempt ended, for `callops_upstream_requests_total{status}`.
#[derive(Debug, Clone, Copy)]
pub enum AttemptOutcome {
    /// Any 2xx.
    Ok,
    /// A final refusal (not retried).
    Rejected,
    /// A transient status (408, 429, 5xx), retried within the budget.
    Status(u16),
    /// No answer: connection error, timeout.
    TransportError,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What happened to one decoded callback event, for `callops_callback_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    Matched,
    Duplicate,
    Parked,
    Observed,
    Unmatched,
    /// Kept on its call's events (it names no operation).
    Call,
}

const EVENT_OUTCOMES: [&str; 6] = [
    "matched",
    "duplicate",
    "parked",
    "observed",
    "unmatched",
    "call",
];

/// Distinct event types counted per source; more are counted as `other` (callbacks are
/// authenticated, but the label set must stay bounded whatever arrives).
const MAX_EVENT_TYPES: usize = 256;

/// The counters of one event type, one per [`EventOutcome`].
pub type EventCounters = Arc<[Counter; 6]>;

/// The index of `unmatched` in [`CALLBACK_OUTCOMES`].
const UNMATCHED: usize = 4;

/// The index of `refused` in [`CALLBACK_OUTCOMES`].
const REFUSED: usize = 5;

/// The outcomes `callops_callbacks_total` counts, in index order.
const CALLBACK_OUTCOMES: [&str; 6] = [
    "matched",
    "duplicate",
    "parked",
    "observed",
    "unmatched",
    "refused",
];

impl Metrics {
    /// A fresh registry with every metric of callops registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("callops");
        let callback_family: Family<Labels2, Counter> = Family::default();
        registry.register(
            "callbacks",
            "Callback events by source (acs, graph) and outcome (matched, duplicate, parked, observed, unmatched; refused counts refused requests)",
            callback_family.clone(),
        );
        let callbacks = ["acs", "graph"].map(|source| {
            CALLBACK_OUTCOMES.map(|outcome| {
                callback_family
                    .get_or_create_owned(&[("source", source.into()), ("outcome", outcome.into())])
            })
        });
        let callback_events: Family<Labels3, Counter> = Family::default();
        registry.register(
            "callback_events",
            "Decoded callback events by source (acs, graph), type (the event's type) and outcome (matched, duplicate, parked, observed, unmatched, call)",
            callback_events.clone(),
        );
        let upstream_requests = Family::default();
        registry.register(
            "upstream_requests",
            "Upstream request attempts by upstream (acs, graph) and status (ok, rejected, a transient HTTP status, transport_error)",
            upstream_requests.clone(),
        );
        let upstream_duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)));
        registry.register(
            "upstream_request_duration_seconds",
            "Duration of one upstream request attempt",
            upstream_duration.clone(),
        );
        let upstream_retries = Family::default();
        registry.register(
            "upstream_retries",
            "Upstream request attempts retried after a transient failure",
            upstream_retries.clone(),
        );
        let commit_duration = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        registry.register(
            "store_commit_duration_seconds",
            "How long a request waited for its changes to be durable (journal write)",
            commit_duration.clone(),
        );
        let commit_records = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "store_commit_records",
            "Records in one committed change set",
            commit_records.clone(),
        );
        let webhook_family: Family<Labels1, Counter> = Family::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, retried, failed: dead-lettered)",
            webhook_family.clone(),
        );
        let webhook_attempts = WEBHOOK_OUTCOMES
            .map(|outcome| webhook_family.get_or_create_owned(&[("outcome", outcome.into())]));
        let stream_clients = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "stream_clients",
            "Open change streams (GET /v1/operations:stream)",
            stream_clients.clone(),
        );
        let reconciliations: Family<Labels2, Counter> = Family::default();
        registry.register(
            "reconciliations",
            "Operations past their callback deadline whose platform was asked, by kind and outcome (succeeded, still_pending, call_ended, call_terminated, unreachable; superseded: a callback settled it first)",
            reconciliations.clone(),
        );
        for kind in ISSUED_KINDS {
            for outcome in crate::reconcile::OUTCOMES {
                drop(
                    reconciliations
                        .get_or_create(&[("kind", kind_label(&kind)), ("outcome", outcome.into())]),
                );
            }
        }
        // Every series a dashboard or alert names exists from the start, at zero.
        for upstream in ["acs", "graph"] {
            drop(upstream_retries.get_or_create(&[("upstream", upstream.into())]));
            drop(upstream_duration.get_or_create(&[("upstream", upstream.into())]));
            for status in ["ok", "rejected", "transport_error"] {
                drop(
                    upstream_requests
                        .get_or_create(&[("upstream", upstream.into()), ("status", status.into())]),
                );
            }
        }
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
        Self {
            inner: Arc::new(Inner {
                registry,
                snapshot,
                scrape: Mutex::new(()),
                callbacks,
                callback_events,
                callback_types: [DashMap::new(), DashMap::new()],
                upstream_requests,
                upstream_duration,
                upstream_retries,
                commit_duration,
                commit_records,
                webhook_attempts,
                stream_clients,
                reconciliations,
            }),
        }
    }

    /// Counts one webhook attempt.
    pub fn webhook_attempt(&self, outcome: WebhookOutcome) {
        self.inner.webhook_attempts[outcome as usize].inc();
    }

    /// A change stream opened (`1`) or closed (`-1`).
    pub fn stream_clients(&self, delta: i64) {
        self.inner.stream_clients.inc_by(delta);
    }

    /// Counts the outcomes of one callback delivery from `source` (`acs`, `graph`).
    pub fn callbacks_delivered(&self, source: &'static str, summary: &DeliverySummary) {
        // In the order of CALLBACK_OUTCOMES.
        let counts = [
            summary.matched,
            summary.duplicates,
            summary.parked,
            summary.observed,
            summary.unmatched,
        ];
        let counters = self.callbacks_of(source);
        for (counter, count) in counters.iter().zip(counts) {
            if count > 0 {
                counter.inc_by(count as u64);
            }
        }
    }

    /// Counts a parked callback whose operation never appeared as unmatched.
    pub fn parked_expired(&self, event: &IncomingEvent) {
        let source = match event.call {
            Some(CallRef::Call(_)) => "graph",
            _ => "acs",
        };
        self.callbacks_of(source)[UNMATCHED].inc();
        count_event(
            &self.event_counters(source, &event.event_type),
            EventOutcome::Unmatched,
        );
    }

    /// Counts one reconciliation of an operation of `kind` (an issued kind's name) that
    /// ended with `outcome` (one of [`crate::reconcile::OUTCOMES`]).
    pub fn reconciliation(&self, kind: &str, outcome: &'static str) {
        let kind = kind_label(&OperationKind::from_name(kind));
        self.inner
            .reconciliations
            .get_or_create(&[("kind", kind), ("outcome", outcome.into())])
            .inc();
    }

    /// Counts one refused callback request from `source`.
    pub fn callback_refused(&self, source: &'static str) {
        self.callbacks_of(source)[REFUSED].inc();
    }

    /// The counters of events of `event_type` from `source` (`acs`, `graph`); count one
    /// with [`count_event`] once its outcome is known.
    pub fn event_counters(&self, source: &'static str, event_type: &str) -> EventCounters {
        let types = &self.inner.callback_types[usize::from(source != "acs")];
        if let Some(counters) = types.get(event_type) {
            return counters.clone();
        }
        let shown = if types.len() < MAX_EVENT_TYPES {
            event_type
        } else {
            "other"
        };
        types
            .entry(shown.into())
            .or_insert_with(|| {
                Arc::new(EVENT_OUTCOMES.map(|outcome| {
                    self.inner.callback_events.get_or_create_owned(&[
                        ("source", source.into()),
                        ("type", Cow::Owned(shown.to_owned())),
                        ("outcome", outcome.into()),
                    ])
                }))
            })
            .clone()
    }

    /// Duplicate callback events from `source` (`acs`, `graph`) since start, for `/healthz`.
    pub fn duplicate_callbacks(&self, source: &'static str) -> u64 {
        self.callbacks_of(source)[1].get()
    }

    fn callbacks_of(&self, source: &'static str) -> &[Counter; CALLBACK_OUTCOMES.len()] {
        &self.inner.callbacks[usize::from(source != "acs")]
    }

    /// Records one upstream attempt that took `duration` and ended with `outcome`.
    pub fn upstream_attempt(
        &self,
        upstream: &'static str,
        outcome: AttemptOutcome,
        duration: Duration,
    ) {
        let status: Cow<'static, str> = match outcome {
            AttemptOutcome::Ok => "ok".into(),
            AttemptOutcome::Rejected => "rejected".into(),
            AttemptOutcome::Status(status) => status.to_string().into(),
            AttemptOutcome::TransportError => "transport_error".into(),
        };
        self.inner
            .upstream_requests
            .get_or_create(&[("upstream", upstream.into()), ("status", status)])
            .inc();
        self.inner
            .upstream_duration
            .get_or_create(&[("upstream", upstream.into())])
            .observe(duration.as_secs_f64());
    }

    /// Counts one upstream retry.
    pub fn upstream_retry(&self, upstream: &'static str) {
        self.inner
            .upstream_retries
            .get_or_create(&[("upstream", upstream.into())])
            .inc();
    }

    /// Records one journal commit of `records` records that took `duration`.
    pub fn store_commit(&self, records: usize, duration: Duration) {
        self.inner.commit_duration.observe(duration.as_secs_f64());
        self.inner.commit_records.observe(records as f64);
    }

    /// Every metric, with `snapshot`'s values, in OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn encode(&self, snapshot: Snapshot) -> Result<String, std::fmt::Error> {
        let _one_scrape = self
            .inner
            .scrape
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *self
            .inner
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = snapshot;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)?;
        Ok(text)
    }
}

/// The content type of [`to_prometheus_text`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as the classic Prometheus text format (0.0.4), for scrapers that ask for
/// it: counters' families named by their `_total` samples, no `# UNIT`, `# EOF` or `_created`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            match kind {
                "counter" => {
                    counters.insert(name.to_owned());
                    out.push_str(&format!("# TYPE {name}_total counter\n"));
                }
                "unknown" => out.push_str(&format!("# TYPE {name} untyped\n")),
                _ => out.push_str(&format!("{line}\n")),
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ")
            && let Some((name, help)) = rest.split_once(' ')
        {
            // A family's HELP comes before its TYPE: look ahead by name.
            let is_counter = openmetrics.contains(&format!("# TYPE {name} counter"));
            let shown = if is_counter {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            out.push_str(&format!("# HELP {shown} {help}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if sample
            .strip_suffix("_created")
            .is_some_and(|family| counters.contains(family))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Issued kinds by name; every observed kind is `observed` (its names come from callbacks).
fn kind_label(kind: &OperationKind) -> Cow<'static, str> {
    match kind {
        OperationKind::RemoveParticipant => "removeParticipant".into(),
        OperationKind::CancelMediaProcessing => "cancelMediaProcessing".into(),
        OperationKind::Observed(_) => "observed".into(),
    }
}

fn status_label(status: OperationStatus) -> Cow<'static, str> {
    match status {
        OperationStatus::NotStarted => "notStarted",
        OperationStatus::Running => "running",
        OperationStatus::Succeeded => "succeeded",
        OperationStatus::Failed => "failed",
        OperationStatus::Canceled => "canceled",
    }
    .into()
}

/// Writes the scrape-time values.
#[derive(Debug)]
struct SnapshotCollector(Arc<Mutex<Snapshot>>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let gauge = |encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64| {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        let counter = |encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64| {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
        };
        gauge(
            &mut encoder,
            "operations_in_memory",
            "Operations held in memory",
            s.operations_in_memory,
        )?;
        gauge(
            &mut encoder,
            "parked_callbacks",
            "Callbacks parked for an operation not created yet",
            s.parked_callbacks,
        )?;
        counter(
            &mut encoder,
            "parked_callbacks_expired",
            "Parked callbacks whose operation never appeared within the park window (kept on their call's events)",
            s.parked_callbacks_expired,
        )?;
        gauge(
            &mut encoder,
            "long_poll_waiters",
            "Long polls waiting for an operation to settle",
            s.long_poll_waiters,
        )?;
        counter(
            &mut encoder,
            "store_transactions",
            "Journal transactions committed",
            s.store_transactions,
        )?;
        counter(
            &mut encoder,
            "store_records",
            "Journal records committed",
            s.store_records,
        )?;
        gauge(
            &mut encoder,
            "store_largest_batch",
            "The most batches committed in one journal transaction",
            s.store_largest_batch,
        )?;
        gauge(
            &mut encoder,
            "webhook_pending",
            "Webhook deliveries waiting for an attempt (the retry queue)",
            s.webhook_pending,
        )?;
        let oldest = ConstGauge::new(s.webhook_oldest_pending_seconds);
        oldest.encode(encoder.encode_descriptor(
            "webhook_oldest_pending_age_seconds",
            "Age of the oldest webhook delivery waiting for an attempt (0: none)",
            None,
            oldest.metric_type(),
        )?)?;
        let seconds = ConstCounter::new(s.store_commit_seconds);
        seconds.encode(encoder.encode_descriptor(
            "store_commit_seconds",
            "Time spent writing and committing journal transactions",
            None,
            seconds.metric_type(),
        )?)?;
        let fetches = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "callback_key_fetches",
            "Fetches of a platform's callback signing keys",
            None,
            fetches.metric_type(),
        )?;
        for (source, value) in [("acs", s.key_fetches_acs), ("graph", s.key_fetches_graph)] {
            let labels = [("source", source)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        counter(
            &mut encoder,
            "graph_token_fetches",
            "Graph access token requests",
            s.graph_token_fetches,
        )?;
        let mut family = encoder.encode_descriptor(
            "operations_started",
            "Operations created, by kind",
            None,
            fetches.metric_type(),
        )?;
        for (kind, value) in ISSUED_KINDS.iter().zip(s.operations_started) {
            let labels = [("kind", kind_label(kind))];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "operations_settled",
            "Operations that reached a final status (the first time), by kind and status",
            None,
            fetches.metric_type(),
        )?;
        for (kind, row) in ISSUED_KINDS.iter().zip(s.operations_settled) {
            for (status, value) in FINAL_STATUSES.iter().zip(row) {
                let labels = [
                    ("kind", kind_label(kind)),
                    ("status", status_label(*status)),
                ];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Counts one event in `counters` (from [`Metrics::event_counters`]).
pub fn count_event(counters: &EventCounters, outcome: EventOutcome) {
    counters[outcome as usize].inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_names_every_metric() {
        let metrics = Metrics::new();
        metrics.callbacks_delivered(
            "acs",
            &DeliverySummary {
                received: 3,
                matched: 2,
                duplicates: 1,
                ..DeliverySummary::default()
            },
        );
        metrics.callback_refused("graph");
        assert_eq!(
            (
                metrics.duplicate_callbacks("acs"),
                metrics.duplicate_callbacks("graph")
            ),
            (1, 0)
        );
        metrics.upstream_attempt("acs", AttemptOutcome::Status(503), Duration::from_millis(3));
        metrics.upstream_retry("acs");
        metrics.store_commit(4, Duration::from_millis(2));
        let text = metrics
            .encode(Snapshot {
                operations_in_memory: 7,
                key_fetches_graph: 2,
                store_commit_seconds: 0.5,
                operations_started: [1, 0],
                operations_settled: [[1, 0, 0], [0, 0, 0]],
                ..Snapshot::default()
            })
            .unwrap();
        for line in [
            "callops_callbacks_total{source=\"acs\",outcome=\"matched\"} 2",
            "callops_callbacks_total{source=\"acs\",outcome=\"duplicate\"} 1",
            "callops_callbacks_total{source=\"graph\",outcome=\"refused\"} 1",
            "callops_operations_started_total{kind=\"removeParticipant\"} 1",
            "callops_operations_settled_total{kind=\"removeParticipant\",status=\"succeeded\"} 1",
            "callops_operations_settled_total{kind=\"cancelMediaProcessing\",status=\"canceled\"} 0",
            "callops_upstream_requests_total{upstream=\"acs\",status=\"503\"} 1",
            "callops_upstream_request_duration_seconds_count{upstream=\"acs\"} 1",
            "callops_upstream_retries_total{upstream=\"acs\"} 1",
            "callops_store_commit_duration_seconds_count 1",
            "callops_store_commit_records_sum 4.0",
            "callops_operations_in_memory 7",
            "callops_parked_callbacks 0",
            "callops_parked_callbacks_expired_total 0",
            "callops_long_poll_waiters 0",
            "callops_store_transactions_total 0",
            "callops_store_records_total 0",
            "callops_store_largest_batch 0",
            "callops_store_commit_seconds_total 0.5",
            "callops_callback_key_fetches_total{source=\"graph\"} 2",
            "callops_graph_token_fetches_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn event_types_are_counted_by_outcome_and_bounded() {
        let metrics = Metrics::new();
        let play = metrics.event_counters("acs", "Microsoft.Communication.PlayCompleted");
        count_event(&play, EventOutcome::Observed);
        count_event(
            &metrics.event_counters("acs", "Microsoft.Communication.PlayCompleted"),
            EventOutcome::Observed,
        );
        for n in 0..MAX_EVENT_TYPES + 10 {
            let counters = metrics.event_counters("graph", &format!("type{n}.updated"));
            count_event(&counters, EventOutcome::Call);
        }
        let text = metrics.encode(Snapshot::default()).unwrap();
        let line = |series: &str| {
            text.lines()
                .find(|l| l.starts_with(series))
                .map(str::to_owned)
        };
        assert_eq!(
            line(r#"callops_callback_events_total{source="acs",type="Microsoft.Communication.PlayCompleted",outcome="observed"}"#)
                .as_deref()
                .and_then(|l| l.rsplit(' ').next()),
            Some("2")
        );
        // The first types keep their names; the rest share `other`.
        assert!(line(r#"callops_callback_events_total{source="graph",type="type0.updated",outcome="call"} 1"#).is_some());
        assert!(
            line(r#"callops_callback_events_total{source="graph",type="other",outcome="call"}"#)
                .is_some_and(|l| l.ends_with(" 10")),
            "{text}"
        );
    }

    #[test]
    fn registries_are_independent() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.callback_refused("acs");
        let line = |metrics: &Metrics| {
            metrics
                .encode(Snapshot::default())
                .unwrap()
                .lines()
                .find(|l| {
                    l.starts_with("callops_callbacks_total{")
                        && l.contains("source=\"acs\"")
                        && l.contains("outcome=\"refused\"")
                })
                .map(str::to_owned)
        };
        assert!(line(&a).unwrap().ends_with(" 1"), "{:?}", line(&a));
        assert!(line(&b).unwrap().ends_with(" 0"), "{:?}", line(&b));
    }
}
