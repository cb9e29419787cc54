//! `GET /v1/operations:stream`: the change feed as Server-Sent Events, with the list's
//! filters. Each event is one change (`id` its change id, `event` `operation.changed` or
//! `operation.settled`, `data` the operation as `GET /v1/operations/{id}` shows it).
//! `Last-Event-ID` resumes after that change from the store's window (a `reset` event says
//! when changes after it are gone); heartbeats are comments. A client that falls
//! `stream.client_buffer` changes behind gets a final `dropped` event and is closed: it
//! reads from the shared window at its own pace, so it never holds up anyone else.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiQuery, ErrorBody};
use crate::http::operations::FilterQuery;
use crate::metrics::Metrics;
use crate::service::OperationService;
use crate::store::ListFilter;
use crate::store::feed::{Change, Feed, Since};

/// Changes read from the window at a time.
const READ_BATCH: usize = 256;

/// The stream's settings and its open clients. A cheap handle.
#[derive(Clone)]
pub struct StreamHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    heartbeat: Duration,
    client_buffer: u64,
    max_clients: usize,
    clients: AtomicUsize,
    shutdown: CancellationToken,
    metrics: Metrics,
}

impl StreamHub {
    pub fn new(
        config: &crate::config::StreamConfig,
        shutdown: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(HubInner {
                heartbeat: Duration::from_secs(config.heartbeat_secs),
                client_buffer: config.client_buffer as u64,
                max_clients: config.max_clients,
                clients: AtomicUsize::new(0),
                shutdown,
                metrics,
            }),
        }
    }
}

/// Counts a client while its stream lives.
struct Client(Arc<HubInner>);

impl Drop for Client {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.stream_clients(-1);
    }
}

#[utoipa::path(
    get,
    path = "/v1/operations:stream",
    tag = "operations",
    operation_id = "streamOperations",
    params(
        FilterQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this change id (0: from the oldest kept)"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `operation.changed` / `operation.settled` (data: the operation), `reset` (changes after Last-Event-ID are no longer kept), `dropped` (the client fell too far behind)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed input: the message names the field", body = ErrorBody),
        (status = 401, description = "No API key, or not a configured one (when keys are configured)", body = ErrorBody),
        (status = 501, description = "Not offered on this store backend", body = ErrorBody),
        (status = 503, description = "Too many open streams", body = ErrorBody)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub(crate) async fn stream_operations(
    State(service): State<OperationService>,
    State(hub): State<StreamHub>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<FilterQuery>,
) -> Result<Response, ApiError> {
    let filter = query.filter()?;
    let feed = service.feed()?.clone();
    let after = match headers.get("last-event-id") {
        None => feed.head(),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::BadRequest("Last-Event-ID: not a change id from this stream".to_owned())
            })?,
    };
    let inner = &hub.inner;
    if inner.clients.fetch_add(1, Ordering::Relaxed) >= inner.max_clients {
        inner.clients.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::Unavailable(format!(
            "at most {} open streams (stream.max_clients)",
            inner.max_clients
        )));
    }
    inner.metrics.stream_clients(1);
    let cursor = Cursor {
        head: feed.subscribe(),
        feed,
        filter,
        position: after,
        queue: VecDeque::new(),
        client_buffer: inner.client_buffer,
        live: false,
        shutdown: inner.shutdown.clone(),
        done: false,
        _client: Client(Arc::clone(inner)),
    };
    let events = stream::unfold(cursor, |mut cursor| async move {
        let event = cursor.next().await?;
        Some((Ok::<_, Infallible>(event), cursor))
    });
    Ok(sse(events, inner.heartbeat).into_response())
}

fn sse(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    heartbeat: Duration,
) -> impl IntoResponse {
    Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
}

/// One client's place in the feed.
struct Cursor {
    feed: Feed,
    head: tokio::sync::watch::Receiver<u64>,
    filter: ListFilter,
    /// The last change id looked at.
    position: u64,
    queue: VecDeque<Arc<Change>>,
    client_buffer: u64,
    /// Caught up with the newest change once: from then on, falling `client_buffer`
    /// behind means the client reads too slowly (a replay of old changes does not count).
    live: bool,
    shutdown: CancellationToken,
    done: bool,
    _client: Client,
}

impl Cursor {
    /// The next event, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        loop {
            if let Some(change) = self.queue.pop_front() {
                return Some(change_event(&change));
            }
            if self.live && self.feed.count_after(self.position) > self.client_buffer {
                self.done = true;
                return Some(
                    Event::default()
                        .event("dropped")
                        .data(format!(
                            r#"{{"lastEventId":{},"reason":"the client fell more than {} changes behind; reconnect with Last-Event-ID"}}"#,
                            self.position, self.client_buffer
                        )),
                );
            }
            // Marked seen before reading, so a change pushed meanwhile wakes the wait below.
            self.head.borrow_and_update();
            match self.feed.since(self.position, &self.filter, READ_BATCH) {
                Since::Gap { oldest } => {
                    let missed_after = self.position;
                    self.position = oldest.saturating_sub(1);
                    return Some(Event::default().event("reset").data(format!(
                        r#"{{"lastEventId":{missed_after},"oldest":{oldest},"reason":"changes after Last-Event-ID are no longer kept; read the operations again (GET /v1/operations)"}}"#
                    )));
                }
                Since::Changes(changes, position) => {
                    let moved = position > self.position;
                    self.position = position;
                    self.queue.extend(changes);
                    if moved {
                        continue;
                    }
                    self.live = true;
                }
            }
            tokio::select! {
                changed = self.head.changed() => {
                    if changed.is_err() {
                        self.done = true;
                        return None;
                    }
                }
                () = self.shutdown.cancelled() => {
                    self.done = true;
                    return None;
                }
            }
        }
    }
}

fn change_event(change: &Change) -> Event {
    let kind = if change.settled {
        "operation.settled"
    } else {
        "operation.changed"
    };
    Event::default()
        .id(change.id.to_string())
        .event(kind)
        .data(String::from_utf8_lossy(&change.json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::{CallRef, Operation, OperationKind};
    use crate::store::feed;
    use time::OffsetDateTime;

    fn push(feed: &Feed, id: u64) {
        let operation = Operation::new(
            OperationKind::RemoveParticipant,
            CallRef::CallConnection(format!("call-{id}")),
            "ctx".into(),
            OffsetDateTime::now_utc(),
        );
        let json = serde_json::to_string(&operation).unwrap();
        let at_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        feed.push(vec![(id, at_ms, feed::row(1, false, &json))]);
    }

    fn cursor(feed: &Feed, after: u64, client_buffer: u64) -> Cursor {
        let config = crate::config::Config::embedded().stream;
        let hub = StreamHub::new(&config, CancellationToken::new(), Metrics::new());
        hub.inner.clients.fetch_add(1, Ordering::Relaxed);
        Cursor {
            feed: feed.clone(),
            head: feed.subscribe(),
            filter: ListFilter::default(),
            position: after,
            queue: VecDeque::new(),
            client_buffer,
            live: false,
            shutdown: hub.inner.shutdown.clone(),
            done: false,
            _client: Client(Arc::clone(&hub.inner)),
        }
    }

    fn rendered(event: Event) -> String {
        format!("{event:?}")
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_once_live_is_dropped_with_a_final_event() {
        let feed = Feed::new(Duration::from_secs(60), 1000);
        push(&feed, 1);
        // A replay of more than the buffer is fine: the client is not live yet.
        for id in 2..=10 {
            push(&feed, id);
        }
        let mut reader = cursor(&feed, 0, 3);
        for _ in 1..=10 {
            let event = tokio::time::timeout(Duration::from_secs(5), reader.next())
                .await
                .unwrap()
                .unwrap();
            assert!(!rendered(event).contains("dropped"));
        }
        // Caught up: it waits for the next change, and is live from then on.
        let waiting = tokio::time::timeout(Duration::from_millis(50), reader.next()).await;
        assert!(waiting.is_err(), "no change: nothing to send");
        for id in 11..=20 {
            push(&feed, id);
        }
        let event = reader.next().await.unwrap();
        let text = rendered(event);
        assert!(text.contains("dropped"), "{text}");
        assert!(reader.next().await.is_none(), "the stream ends after it");
    }
}
