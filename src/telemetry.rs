//! Logging: `tracing` with an `EnvFilter` (`RUST_LOG`, default `callops=info,tower_http=info`)
//! and text or JSON output.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

const DEFAULT_FILTER: &str = "callops=info,tower_http=info";

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A subscriber installed earlier (tests) wins.
    let _ = result;
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
#[derive(Default)]
pub struct LogBudget {
    /// The current second in the high bits, warnings written in it in the low 16.
    state: AtomicU64,
}

impl LogBudget {
    pub const PER_SECOND: u64 = 10;

    pub const fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
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
                if used >= Self::PER_SECOND {
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
    fn at_most_ten_lines_a_second() {
        let budget = LogBudget::default();
        let allowed = (0..100).filter(|_| budget.allow_at(1_000)).count();
        assert_eq!(allowed, 10);
        assert!(budget.allow_at(1_001), "a new second, a new budget");
    }
}
