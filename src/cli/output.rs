//! What the client shows people: aligned tables, operation details, coloured statuses, the
//! spinner while waiting. Text is rendered with styles; `anstream` strips them when stdout
//! is not a terminal (or `NO_COLOR` is set), so tests and pipes see plain text.

use std::io::IsTerminal;
use std::time::Duration;

use anstyle::{AnsiColor, Style};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// The style of a status word.
fn status_style(status: &str) -> Style {
    let color = match status {
        "Succeeded" | "enabled" => AnsiColor::Green,
        "Failed" | "disabled" => AnsiColor::Red,
        "Canceled" => AnsiColor::Yellow,
        _ => AnsiColor::Cyan,
    };
    Style::new().fg_color(Some(color.into())).bold()
}

/// A cell: its text, and whether it shows a status (coloured).
struct Cell {
    text: String,
    status: bool,
}

/// Columns aligned on the widest cell, two spaces apart; status cells coloured. The
/// padding is outside the styles, so stripping them keeps the alignment.
fn table(headers: &[&str], rows: Vec<Vec<Cell>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.text.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<(String, Option<Style>)>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (index, ((cell, style), width)) in cells.into_iter().zip(&widths).enumerate() {
            let pad = width.saturating_sub(cell.chars().count());
            match style {
                Some(style) => text.push_str(&format!("{style}{cell}{style:#}")),
                None => text.push_str(&cell),
            }
            if index != last {
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    let bold = Style::new().bold();
    line(
        headers
            .iter()
            .map(|h| ((*h).to_owned(), Some(bold)))
            .collect(),
    );
    for row in rows {
        line(
            row.into_iter()
                .map(|cell| {
                    let style = cell.status.then(|| status_style(&cell.text));
                    (cell.text, style)
                })
                .collect(),
        )
    }
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn plain(value: &Value) -> Cell {
    Cell {
        text: text(value),
        status: false,
    }
}

fn status(value: &Value) -> Cell {
    Cell {
        text: text(value),
        status: true,
    }
}

/// The call an operation is on: its ACS call connection or its Graph call.
fn call(operation: &Value) -> &Value {
    match &operation["callConnectionId"] {
        Value::Null => &operation["callId"],
        id => id,
    }
}

/// `code: message` of an operation's error, or nothing.
fn error(operation: &Value) -> String {
    let error = &operation["error"];
    match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => String::new(),
    }
}

/// Operations, one a row; the ERROR column only when one of them has an error.
pub fn operations_table(operations: &[Value]) -> String {
    let errors = operations
        .iter()
        .any(|operation| !error(operation).is_empty());
    let rows = operations
        .iter()
        .map(|operation| {
            let mut row = vec![
                plain(&operation["id"]),
                plain(&operation["kind"]),
                status(&operation["status"]),
                plain(call(operation)),
                plain(&operation["context"]),
                plain(&operation["lastUpdatedDateTime"]),
            ];
            if errors {
                row.push(Cell {
                    text: error(operation),
                    status: false,
                });
            }
            row
        })
        .collect();
    let headers = [
        "ID", "KIND", "STATUS", "CALL", "CONTEXT", "UPDATED", "ERROR",
    ];
    table(&headers[..if errors { 7 } else { 6 }], rows)
}

/// One operation, a field a line.
pub fn operation_details(operation: &Value) -> String {
    let call_label = if operation["callConnectionId"].is_null() {
        "callId"
    } else {
        "callConnectionId"
    };
    let mut rows = vec![
        ("id", plain(&operation["id"])),
        ("kind", plain(&operation["kind"])),
        ("status", status(&operation["status"])),
        (call_label, plain(call(operation))),
        ("context", plain(&operation["context"])),
        ("created", plain(&operation["createdDateTime"])),
        ("updated", plain(&operation["lastUpdatedDateTime"])),
    ];
    let error = error(operation);
    if !error.is_empty() {
        rows.push((
            "error",
            Cell {
                text: error,
                status: false,
            },
        ));
    }
    if let Some(message) = operation["result"]["message"].as_str() {
        rows.push((
            "result",
            Cell {
                text: message.to_owned(),
                status: false,
            },
        ));
    }
    fields(rows)
}

/// `label  value` lines, the values aligned.
fn fields(rows: Vec<(&str, Cell)>) -> String {
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, cell) in rows {
        let value = if cell.status {
            let style = status_style(&cell.text);
            format!("{style}{}{style:#}", cell.text)
        } else {
            cell.text
        };
        out.push_str(&format!("{label:<width$}  {value}\n"));
    }
    out
}

/// The subscription `filter` as `name=value` pairs.
fn filter(subscription: &Value) -> String {
    subscription["filter"]
        .as_object()
        .map(|filter| {
            filter
                .iter()
                .map(|(name, value)| format!("{name}={}", text(value)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn event_types(subscription: &Value) -> String {
    subscription["eventTypes"]
        .as_array()
        .map(|types| types.iter().map(text).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

/// Subscriptions, one a row (never a secret: the list has none).
pub fn subscriptions_table(subscriptions: &[Value]) -> String {
    let rows = subscriptions
        .iter()
        .map(|subscription| {
            vec![
                plain(&subscription["id"]),
                status(&subscription["status"]),
                plain(&subscription["url"]),
                Cell {
                    text: event_types(subscription),
                    status: false,
                },
                Cell {
                    text: filter(subscription),
                    status: false,
                },
            ]
        })
        .collect();
    table(&["ID", "STATUS", "URL", "EVENTS", "FILTER"], rows)
}

/// A created subscription, with its one-time secret.
pub fn created_subscription(subscription: &Value) -> String {
    let mut out = fields(vec![
        ("id", plain(&subscription["id"])),
        ("status", status(&subscription["status"])),
        ("url", plain(&subscription["url"])),
        (
            "events",
            Cell {
                text: event_types(subscription),
                status: false,
            },
        ),
        (
            "filter",
            Cell {
                text: filter(subscription),
                status: false,
            },
        ),
        ("secret", plain(&subscription["secret"])),
    ]);
    out.push_str("(the secret is shown this once: keep it to verify deliveries)\n");
    out
}

/// One change of the stream as a line: change id, event, then the operation's row.
pub fn change_line(change_id: &str, event: &str, operation: &Value) -> String {
    let status_text = text(&operation["status"]);
    let style = status_style(&status_text);
    let mut line = format!(
        "{change_id} {event} {} {} {style}{status_text}{style:#} {}",
        text(&operation["id"]),
        text(&operation["kind"]),
        text(call(operation)),
    );
    let context = text(&operation["context"]);
    if !context.is_empty() {
        line.push_str(&format!(" context={context}"));
    }
    let error = error(operation);
    if !error.is_empty() {
        line.push_str(&format!(" ({error})"));
    }
    line
}

/// A spinner with the elapsed time on stderr, only when stderr is a terminal.
pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    pub fn start(message: String) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strip(text: &str) -> String {
        anstream::adapter::strip_str(text).to_string()
    }

    #[test]
    fn a_table_is_aligned_without_colour_once_stripped() {
        let operations = [
            json!({"id": "0190-a", "kind": "removeParticipant", "status": "Succeeded",
                   "callConnectionId": "call-1", "context": "ctx", "lastUpdatedDateTime": "t1"}),
            json!({"id": "0190-b", "kind": "cancelMediaProcessing", "status": "Failed",
                   "callId": "graph-call", "context": "", "lastUpdatedDateTime": "t2",
                   "error": {"code": "CallTerminated", "message": "the call ended"}}),
        ];
        let rendered = operations_table(&operations);
        assert!(
            rendered.contains("\u{1b}["),
            "statuses are styled: {rendered:?}"
        );
        assert_eq!(
            strip(&rendered),
            "\
ID      KIND                   STATUS     CALL        CONTEXT  UPDATED  ERROR
0190-a  removeParticipant      Succeeded  call-1      ctx      t1
0190-b  cancelMediaProcessing  Failed     graph-call           t2       CallTerminated: the call ended
"
        );
    }

    #[test]
    fn the_error_column_is_left_out_when_no_operation_failed() {
        let rendered = operations_table(&[json!({"id": "a", "kind": "k", "status": "Running",
            "callConnectionId": "c", "context": "x", "lastUpdatedDateTime": "t"})]);
        assert_eq!(
            strip(&rendered),
            "ID  KIND  STATUS   CALL  CONTEXT  UPDATED\na   k     Running  c     x        t\n"
        );
    }

    #[test]
    fn details_name_the_call_and_the_error() {
        let operation = json!({"id": "x", "kind": "removeParticipant", "status": "Failed",
            "callConnectionId": "c", "context": "k", "createdDateTime": "t0",
            "lastUpdatedDateTime": "t1",
            "error": {"code": "RemoveParticipantFailed", "message": "no"},
            "result": {"message": "participant not found"}});
        assert_eq!(
            strip(&operation_details(&operation)),
            "\
id                x
kind              removeParticipant
status            Failed
callConnectionId  c
context           k
created           t0
updated           t1
error             RemoveParticipantFailed: no
result            participant not found
"
        );
    }

    #[test]
    fn subscriptions_show_their_filter_and_events() {
        let rendered = subscriptions_table(&[json!({"id": "sub_1", "status": "enabled",
            "url": "https://h/x", "eventTypes": ["operation.settled"],
            "filter": {"kind": "removeParticipant", "contextPrefix": "job-"}})]);
        assert_eq!(
            strip(&rendered),
            "\
ID     STATUS   URL          EVENTS             FILTER
sub_1  enabled  https://h/x  operation.settled  contextPrefix=job- kind=removeParticipant
"
        );
    }
}
