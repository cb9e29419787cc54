//! `callops watch`: reads the change stream (Server-Sent Events, parsed by
//! `eventsource-stream`) and prints a line per change; says so on stderr when the server
//! resets or drops the stream, and reconnects after a drop or a break with `Last-Event-ID`.

use std::io::Write;
use std::process::ExitCode;

use eventsource_stream::{Event, Eventsource};
use futures_util::StreamExt;
use serde_json::Value;
use url::Url;

use super::client::{Client, ClientError};
use super::{Exit, output};

/// What one event of the stream means to the client.
#[derive(Debug, PartialEq)]
pub enum StreamEvent {
    /// `operation.changed` / `operation.settled`: the change id, the event, the operation.
    Change {
        id: String,
        event: String,
        operation: Value,
    },
    /// Changes after `Last-Event-ID` are gone; the stream goes on with newer ones.
    Reset(String),
    /// The server gave up on this client (too far behind) and closes the stream.
    Dropped(String),
    /// Anything else (a newer server's event), ignored.
    Other,
}

impl StreamEvent {
    pub fn of(event: &Event) -> Self {
        match event.event.as_str() {
            "operation.changed" | "operation.settled" => match serde_json::from_str(&event.data) {
                Ok(operation) => Self::Change {
                    id: event.id.clone(),
                    event: event.event.clone(),
                    operation,
                },
                Err(_) => Self::Other,
            },
            "reset" => Self::Reset(reason(&event.data)),
            "dropped" => Self::Dropped(reason(&event.data)),
            _ => Self::Other,
        }
    }
}

/// The `reason` of a reset or drop, else its data as sent.
fn reason(data: &str) -> String {
    serde_json::from_str::<Value>(data)
        .ok()
        .and_then(|value| value["reason"].as_str().map(str::to_owned))
        .unwrap_or_else(|| data.to_owned())
}

/// Follows the stream at `url` until the server closes it (exit 0), Ctrl-C (exit 0), or an
/// error (exit 2).
pub async fn run(client: &Client, url: Url, json: bool) -> ExitCode {
    tokio::select! {
        code = follow(client, url, json) => code,
        _ = tokio::signal::ctrl_c() => Exit::Success.into(),
    }
}

/// Reconnections tried, one after another, after the stream broke.
const RECONNECTS: u32 = 5;

async fn follow(client: &Client, url: Url, json: bool) -> ExitCode {
    let mut last_id: Option<String> = None;
    let mut broken: u32 = 0;
    loop {
        let response = match client.stream(url.clone(), last_id.as_deref()).await {
            Ok(response) => response,
            // After a break the service may be restarting: a few tries, further apart.
            Err(error @ ClientError::Connect { .. }) if broken > 0 && broken < RECONNECTS => {
                eprintln!("cannot reconnect yet ({error}); trying again");
                tokio::time::sleep(std::time::Duration::from_millis(500 << broken)).await;
                broken += 1;
                continue;
            }
            Err(error) => return super::fail(&error),
        };
        broken = 0;
        // Tests (and people) learn here that changes from now on will be seen.
        eprintln!("watching {} (Ctrl-C to stop)", client.base());
        let mut events = response.bytes_stream().eventsource();
        let mut dropped = false;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    eprintln!("the stream broke ({error})");
                    broken = 1;
                    break;
                }
            };
            if !event.id.is_empty() {
                last_id = Some(event.id.clone());
            }
            match StreamEvent::of(&event) {
                StreamEvent::Change {
                    id,
                    event,
                    operation,
                } => {
                    let line = if json {
                        operation.to_string()
                    } else {
                        output::change_line(&id, &event, &operation)
                    };
                    let mut stdout = anstream::stdout().lock();
                    // A closed pipe (`| head`) ends the watch quietly.
                    if writeln!(stdout, "{line}")
                        .and_then(|()| stdout.flush())
                        .is_err()
                    {
                        return Exit::Success.into();
                    }
                }
                StreamEvent::Reset(reason) => {
                    eprintln!("reset: some changes were missed ({reason})");
                }
                StreamEvent::Dropped(reason) => {
                    eprintln!("dropped by the server ({reason})");
                    dropped = true;
                }
                StreamEvent::Other => {}
            }
        }
        if broken == 0 && (!dropped || last_id.is_none()) {
            eprintln!("the server closed the stream");
            return Exit::Success.into();
        }
        eprintln!(
            "reconnecting after change {}",
            last_id.as_deref().unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, id: &str, data: &str) -> Event {
        Event {
            event: name.to_owned(),
            id: id.to_owned(),
            data: data.to_owned(),
            retry: None,
        }
    }

    #[test]
    fn changes_become_lines_and_resets_and_drops_their_reasons() {
        let data = r#"{"id":"0190-a","kind":"removeParticipant","status":"Succeeded","callConnectionId":"call-1","context":"job-1"}"#;
        let parsed = StreamEvent::of(&event("operation.settled", "42", data));
        let StreamEvent::Change {
            id,
            event: name,
            operation,
        } = parsed
        else {
            panic!("{parsed:?}");
        };
        assert_eq!(operation["status"], json!("Succeeded"));
        let line = output::change_line(&id, &name, &operation);
        assert_eq!(
            anstream::adapter::strip_str(&line).to_string(),
            "42 operation.settled 0190-a removeParticipant Succeeded call-1 context=job-1"
        );
        assert_eq!(
            StreamEvent::of(&event(
                "reset",
                "",
                r#"{"lastEventId":3,"oldest":9,"reason":"gone"}"#
            )),
            StreamEvent::Reset("gone".to_owned())
        );
        assert_eq!(
            StreamEvent::of(&event("dropped", "", "not json")),
            StreamEvent::Dropped("not json".to_owned())
        );
        assert_eq!(
            StreamEvent::of(&event("something.new", "1", "{}")),
            StreamEvent::Other
        );
    }

    #[tokio::test]
    async fn the_stream_is_parsed_from_bytes_comments_skipped() {
        let body = ": heartbeat\n\nid: 7\nevent: operation.changed\ndata: {\"id\":\"x\",\"status\":\"Running\"}\n\n";
        let chunks = futures_util::stream::iter(
            body.as_bytes()
                .chunks(5)
                .map(|chunk| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(chunk)))
                .collect::<Vec<_>>(),
        );
        let events: Vec<_> = chunks.eventsource().collect().await;
        assert_eq!(events.len(), 1, "{events:?}");
        let event = events[0].as_ref().unwrap();
        assert!(matches!(
            StreamEvent::of(event),
            StreamEvent::Change { ref id, .. } if id == "7"
        ));
    }
}
