//! Logging: `tracing` with an `EnvFilter` (`RUST_LOG`, default `callops=info,tower_http=info`)
//! and text or JSON output.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

const DEFAULT_FILTER: &str = "callops=info,tower_http=info";

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let (filter, refused) = filter_from(std::env::var("RUST_LOG").ok().as_deref());
    // Colours only for a person at a terminal, never into a file or a log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    let result = match format {
        LogFormat::Text => builder.fmt_fields(escaped_fields()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A subscriber installed earlier (tests) wins.
    if result.is_ok()
        && let Some(error) = refused
    {
        tracing::warn!(%error, default = DEFAULT_FILTER, "RUST_LOG is not a valid filter; the default is used");
    }
}

/// The filter `RUST_LOG` asks for, or the default and why the asked one was refused.
fn filter_from(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    match rust_log.map(str::trim).filter(|text| !text.is_empty()) {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(text) => match EnvFilter::try_new(text) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(DEFAULT_FILTER), Some(error.to_string())),
        },
    }
}

/// Text-format fields with every value escaped: values come from outside (event types and
/// ids, contexts), and a newline, an ANSI escape or a NUL in one must not forge a log line.
/// A value holding a space or `=` is quoted, so it cannot pass for another field either.
pub fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let text = format!("{value:?}");
        if field.name() != "message" {
            write!(writer, "{field}=")?;
        }
        write_escaped(writer, &text, field.name() != "message")
    })
    .delimited(" ")
}

fn write_escaped(out: &mut dyn std::fmt::Write, text: &str, quote: bool) -> std::fmt::Result {
    let quoted = quote
        && !(text.len() >= 2 && text.starts_with('"') && text.ends_with('"'))
        && text.contains([' ', '=', '"']);
    if quoted {
        out.write_char('"')?;
    }
    for c in text.chars() {
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            '"' if quoted => out.write_str("\\\"")?,
            '\\' if quoted => out.write_str("\\\\")?,
            c if c.is_control() => write!(out, "\\u{{{:x}}}", u32::from(c))?,
            c => out.write_char(c)?,
        }
    }
    if quoted {
        out.write_char('"')?;
    }
    Ok(())
}

/// A subscriber for tests: the test writer, installed at most once.
pub fn init_for_test() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("callops=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// At most [`LogBudget::PER_SECOND`] lines a second for one kind of repeated event (a
/// refused callback, a store that cannot be reached); the caller logs the rest at debug, so
/// a flood cannot flood the logs. Lock-free.
pub struct LogBudget {
    /// The current second in the high bits, warnings written in it in the low 16.
    state: AtomicU64,
    /// Lines a second.
    limit: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl LogBudget {
    pub const PER_SECOND: u64 = 10;

    pub const fn new() -> Self {
        Self::per_second(Self::PER_SECOND)
    }

    /// At most `limit` lines a second (below 65 536).
    pub const fn per_second(limit: u64) -> Self {
        Self {
            state: AtomicU64::new(0),
            limit,
        }
    }

    /// Whether one more line may be written this second.
    pub fn allow(&self) -> bool {
        self.allow_at(unix_second())
    }

    fn allow_at(&self, second: u64) -> bool {
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let (at, used) = (state >> 16, state & 0xffff);
            let next = if at == second {
                if used >= self.limit {
                    return false;
                }
                state + 1
            } else {
                (second << 16) | 1
            };
            match self.state.compare_exchange_weak(
                state,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(current) => state = current,
            }
        }
    }
}

fn unix_second() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod log_budget_tests {
    use super::*;

    #[test]
    fn an_invalid_rust_log_is_named_and_the_default_used() {
        assert!(filter_from(Some("callops=debug")).1.is_none());
        assert!(filter_from(None).1.is_none());
        let (filter, refused) = filter_from(Some("callops=loud"));
        assert!(refused.is_some());
        assert_eq!(
            filter.to_string(),
            EnvFilter::new(DEFAULT_FILTER).to_string()
        );
    }

    #[test]
    fn at_most_ten_lines_a_second() {
        let budget = LogBudget::default();
        let allowed = (0..100).filter(|_| budget.allow_at(1_000)).count();
        assert_eq!(allowed, 10);
        assert!(budget.allow_at(1_001), "a new second, a new budget");
    }
}

#[cfg(test)]
mod escape_tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_value_from_outside_cannot_forge_a_log_line() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(escaped_fields())
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let forged = "x\n2026-01-01T00:00:00Z ERROR forged\u{1b}[31m\0 level=ERROR";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(event.r#type = %forged, event.id = ?forged, "callback names no call");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains(['\u{1b}', '\0']), "{text:?}");
        assert!(
            text.contains(
                r#"event.type="x\n2026-01-01T00:00:00Z ERROR forged\u{1b}[31m\u{0} level=ERROR""#
            ),
            "{text}"
        );
    }
}
