//! `GET /v1/operations:stream`: one event per change with its id, the list's filters,
//! resumption with `Last-Event-ID` without gaps, `reset` past the window.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::support::{SOON, TestApp, within};
use callops::emulator::Script;

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// A reader of an event stream.
pub struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl SseClient {
    /// Opens `path` (with `Last-Event-ID` when given); asserts a 200 event stream.
    pub async fn open(http: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Self {
        let mut request = http.get(url);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (heartbeat comments skipped); `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: "message".to_owned(),
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        event.id = Some(value.trim_start().to_owned());
                        any = true;
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event.event = value.trim_start().to_owned();
                        any = true;
                    } else if let Some(value) = line.strip_prefix("data:") {
                        if !event.data.is_empty() {
                            event.data.push('\n');
                        }
                        event
                            .data
                            .push_str(value.strip_prefix(' ').unwrap_or(value));
                        any = true;
                    }
                }
                if any {
                    return Some(event);
                }
                continue;
            }
            match self.response.chunk().await.unwrap() {
                Some(chunk) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                None => return None,
            }
        }
    }

    /// Events until `done` says the collected ones are enough.
    pub async fn until(&mut self, done: impl Fn(&[SseEvent]) -> bool) -> Vec<SseEvent> {
        let mut events = Vec::new();
        within(async {
            while !done(&events) {
                events.push(self.next().await.expect("the stream ended early"));
            }
        })
        .await;
        events
    }
}

fn settled_ids(events: &[SseEvent]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| e.event == "operation.settled")
        .map(|e| e.json()["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn every_change_is_an_event_and_a_resumed_stream_misses_nothing() {
    let app = TestApp::spawn().await;
    let url = app.url("/v1/operations:stream?kind=removeParticipant");
    let mut first = SseClient::open(&app.http, &url, None).await;
    let mut started = Vec::new();
    for n in 0..3 {
        let operation = app
            .remove(&format!("s-call-{n}"), Script::default(), None)
            .await;
        started.push(operation["id"].as_str().unwrap().to_owned());
    }
    let events = first.until(|events| settled_ids(events).len() == 3).await;
    assert_eq!(settled_ids(&events), started.iter().cloned().collect());
    // Ids increase; each event names its change and carries the operation as GET shows it.
    let ids: Vec<u64> = events
        .iter()
        .map(|e| e.id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    let last_settled = events
        .iter()
        .rev()
        .find(|e| e.event == "operation.settled")
        .unwrap();
    let id = last_settled.json()["id"].as_str().unwrap().to_owned();
    let shown = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(last_settled.json(), shown);
    let last_seen = events.last().unwrap().id.clone().unwrap();
    drop(first);

    // While disconnected: more removals (and a Graph cancel, which the filter leaves out).
    let mut missed = Vec::new();
    for n in 3..6 {
        let operation = app
            .remove(&format!("s-call-{n}"), Script::default(), None)
            .await;
        missed.push(operation["id"].as_str().unwrap().to_owned());
    }
    let cancel = app
        .cancel(
            "3fa85f64-5717-4562-b3fc-2c963f66afa6",
            Default::default(),
            None,
        )
        .await;
    for id in &missed {
        app.operation_until(id, |op| op["status"] == "Succeeded")
            .await;
    }
    let mut resumed = SseClient::open(&app.http, &url, Some(&last_seen)).await;
    let replayed = resumed.until(|events| settled_ids(events).len() == 3).await;
    assert_eq!(settled_ids(&replayed), missed.iter().cloned().collect());
    assert!(
        replayed
            .iter()
            .all(|e| e.json()["kind"] == "removeParticipant")
    );
    assert!(replayed.iter().all(|e| e.json()["id"] != cancel["id"]));
    assert!(
        replayed
            .iter()
            .all(|e| e.id.as_deref().unwrap().parse::<u64>().unwrap()
                > last_seen.parse::<u64>().unwrap())
    );
    // Live again: a new change arrives on the resumed stream.
    let live = app.remove("s-call-live", Script::default(), None).await;
    let more = resumed
        .until(|events| settled_ids(events).contains(live["id"].as_str().unwrap()))
        .await;
    assert!(!more.is_empty());
}

#[tokio::test]
async fn an_id_older_than_the_window_gets_a_reset_then_what_is_kept() {
    let app = TestApp::spawn_with(|config| config.stream.max_changes = 4).await;
    for n in 0..4 {
        let operation = app
            .remove(&format!("w-call-{n}"), Script::default(), None)
            .await;
        app.operation_until(operation["id"].as_str().unwrap(), |op| {
            op["status"] == "Succeeded"
        })
        .await;
    }
    let mut client = SseClient::open(&app.http, &app.url("/v1/operations:stream"), Some("1")).await;
    let reset = within(client.next()).await.unwrap();
    assert_eq!(reset.event, "reset");
    let oldest = reset.json()["oldest"].as_u64().unwrap();
    assert!(oldest > 2, "{reset:?}");
    let next = within(client.next()).await.unwrap();
    assert_eq!(next.id.unwrap().parse::<u64>().unwrap(), oldest);
}

#[tokio::test]
async fn bad_stream_requests_get_clear_errors() {
    let app = TestApp::spawn().await;
    let bad_id = app
        .http
        .get(app.url("/v1/operations:stream"))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_id.status(), 400);
    let body: Value = bad_id.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Last-Event-ID")
    );
    let bad_filter = app.get("/v1/operations:stream?status=Exploded").await;
    assert_eq!(bad_filter.status(), 400);
    let unknown = app.get("/v1/operations:stream?maxpagesize=3").await;
    assert_eq!(unknown.status(), 400);
    // Heartbeats keep an idle stream open; shutdown ends it.
    let mut idle = SseClient::open(&app.http, &app.url("/v1/operations:stream"), None).await;
    app.shutdown.cancel();
    let ended = tokio::time::timeout(SOON + Duration::from_secs(5), idle.next()).await;
    assert!(matches!(ended, Ok(None)), "{ended:?}");
}
