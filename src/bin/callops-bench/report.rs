//! The result table (Markdown) and the machine it ran on.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Microsecond latencies: 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records `latency` (in µs, at least 1).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// One row of the table.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub scenario: String,
    /// Requests or operations per second, with its unit.
    pub rate: Option<(f64, &'static str)>,
    /// p50 and p99 in µs.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// Ratio of `rate` to the bare axum row.
    pub ratio: Option<f64>,
    /// Other figures (bytes per operation, durability, errors).
    pub other: String,
    pub target: String,
    /// `None`: no target.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(scenario: impl Into<String>) -> Self {
        Self {
            scenario: scenario.into(),
            ..Self::default()
        }
    }

    pub fn latencies(mut self, histogram: &Histogram<u64>) -> Self {
        if !histogram.is_empty() {
            self.p50_us = Some(histogram.value_at_quantile(0.50));
            self.p99_us = Some(histogram.value_at_quantile(0.99));
        }
        self
    }
}

/// A rate with thousands separated by spaces (`12 345`).
pub fn rate(value: f64) -> String {
    let whole = value.round() as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(digit);
    }
    out
}

/// A latency in µs as `850 µs` or `1.23 ms`.
pub fn latency(micros: u64) -> String {
    if micros < 1000 {
        format!("{micros} µs")
    } else if micros < 100_000 {
        format!("{:.2} ms", micros as f64 / 1000.0)
    } else {
        format!("{:.0} ms", micros as f64 / 1000.0)
    }
}

/// The Markdown table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| Scenario | Throughput | p50 | p99 | Ratio to bare axum | Other | Target | Met |\n\
         |---|---:|---:|---:|---:|---|---|:---:|\n",
    );
    let dash = || "—".to_owned();
    for row in rows {
        let throughput = row
            .rate
            .map(|(value, unit)| format!("{} {unit}", rate(value)))
            .unwrap_or_else(dash);
        let p50 = row.p50_us.map(latency).unwrap_or_else(dash);
        let p99 = row.p99_us.map(latency).unwrap_or_else(dash);
        let ratio = row
            .ratio
            .map(|ratio| format!("{ratio:.2}"))
            .unwrap_or_else(dash);
        let other = if row.other.is_empty() {
            dash()
        } else {
            row.other.clone()
        };
        let target = if row.target.is_empty() {
            dash()
        } else {
            row.target.clone()
        };
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            out,
            "| {} | {throughput} | {p50} | {p99} | {ratio} | {other} | {target} | {met} |",
            row.scenario
        );
    }
    out
}

/// CPU model, cores, kernel and compiler, one Markdown list.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("MemTotal:"))
                .map(|line| line.trim_start_matches("MemTotal:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    format!(
        "- CPU: {cpu} ({cores} cores available)\n- Memory: {memory}\n- Kernel: Linux {kernel}\n- Compiler: {rustc}\n- callops {} (release build)\n",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_and_rates_read_well() {
        assert_eq!(latency(850), "850 µs");
        assert_eq!(latency(1234), "1.23 ms");
        assert_eq!(latency(250_000), "250 ms");
        assert_eq!(rate(12_345.4), "12\u{2009}345");
        assert_eq!(rate(999.0), "999");
        assert_eq!(rate(1_000_000.0), "1\u{2009}000\u{2009}000");
    }

    #[test]
    fn the_table_has_one_line_per_row_and_dashes_for_nothing() {
        let mut histogram = histogram();
        record(&mut histogram, Duration::from_micros(500));
        let row = Row {
            rate: Some((1000.0, "req/s")),
            ratio: Some(0.9),
            target: "≥ 0.85".to_owned(),
            met: Some(true),
            ..Row::new("memory")
        }
        .latencies(&histogram);
        let text = table(&[row, Row::new("empty")]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].starts_with("| memory | 1\u{2009}000 req/s | 500 µs | 500 µs | 0.90 |"));
        assert_eq!(lines[3], "| empty | — | — | — | — | — | — | — |");
    }
}
