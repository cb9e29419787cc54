//! What the upstream clients (ACS, Graph) share: the bounded retry loop, what counts as
//! transient, and `Retry-After`.
//!
//! Transient failures (connection errors, timeouts, 408, 429, 5xx) are retried with
//! exponential backoff and full jitter (backon), honouring `Retry-After` (seconds, fractions,
//! or an HTTP date), within the attempt and total-time bounds of [`RetryConfig`].

use std::future::Future;
use std::time::Duration;

use backon::BackoffBuilder;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::metrics::{AttemptOutcome, Metrics};

/// How one attempt failed.
#[derive(Debug)]
pub enum AttemptError<E> {
    /// Not worth retrying: the upstream refused for good.
    Final(E),
    /// Worth retrying, after `retry_after` when the upstream said so.
    Transient {
        error: TransientError,
        retry_after: Option<Duration>,
    },
}

/// A failure worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum TransientError {
    #[error("the upstream answered {status}")]
    Status { status: StatusCode },
    #[error("the request failed: {0}")]
    Transport(#[source] reqwest::Error),
}

/// How the retry loop ended without success.
#[derive(Debug)]
pub enum Retried<E> {
    /// An attempt failed for good.
    Final(E),
    /// Every attempt failed transiently, or the time budget ran out.
    Exhausted { attempts: u32, last: TransientError },
}

impl<E> AttemptError<E> {
    /// A transport error (connection refused, timeout, reset): always transient.
    pub fn transport(error: reqwest::Error) -> Self {
        Self::Transient {
            error: TransientError::Transport(error),
            retry_after: None,
        }
    }

    /// A transient status, with the response's `Retry-After`.
    pub fn status(status: StatusCode, headers: &HeaderMap) -> Self {
        Self::Transient {
            error: TransientError::Status { status },
            retry_after: retry_after(headers),
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the budget of `config` runs out.
/// `upstream` names the service in logs and metrics; every attempt and retry is counted in
/// `metrics`.
pub async fn with_retries<T, E, F, Fut>(
    config: &RetryConfig,
    upstream: &'static str,
    metrics: &Metrics,
    mut attempt: F,
) -> Result<T, Retried<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AttemptError<E>>>,
{
    let started = Instant::now();
    let deadline = started + Duration::from_millis(config.total_timeout_ms);
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(config.initial_delay_ms))
        .with_max_delay(Duration::from_millis(config.max_delay_ms))
        .with_max_times(config.max_attempts.saturating_sub(1) as usize)
        .with_jitter()
        .build();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt_started = Instant::now();
        let result = attempt().await;
        metrics.upstream_attempt(upstream, outcome(&result), attempt_started.elapsed());
        let (error, retry_after) = match result {
            Ok(value) => {
                tracing::debug!(
                    upstream,
                    attempts,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "upstream request succeeded"
                );
                return Ok(value);
            }
            Err(AttemptError::Final(error)) => return Err(Retried::Final(error)),
            Err(AttemptError::Transient { error, retry_after }) => (error, retry_after),
        };
        let Some(backoff) = delays.next() else {
            return Err(Retried::Exhausted {
                attempts,
                last: error,
            });
        };
        // Retry-After is the server's word; backoff applies when it says nothing.
        let delay = retry_after.unwrap_or(backoff);
        if Instant::now() + delay > deadline {
            return Err(Retried::Exhausted {
                attempts,
                last: error,
            });
        }
        metrics.upstream_retry(upstream);
        tracing::warn!(upstream, attempts, delay_ms = delay.as_millis() as u64, error = %error, "retrying upstream request");
        tokio::time::sleep(delay).await;
    }
}

/// How an attempt ended, for the metrics.
fn outcome<T, E>(result: &Result<T, AttemptError<E>>) -> AttemptOutcome {
    match result {
        Ok(_) => AttemptOutcome::Ok,
        Err(AttemptError::Final(_)) => AttemptOutcome::Rejected,
        Err(AttemptError::Transient {
            error: TransientError::Status { status },
            ..
        }) => AttemptOutcome::Status(status.as_u16()),
        Err(AttemptError::Transient {
            error: TransientError::Transport(_),
            ..
        }) => AttemptOutcome::TransportError,
    }
}

/// The failure a non-2xx `response` means: transient (with its `Retry-After`), or final —
/// built by `refused` from the status and the body's error code and message.
pub async fn failure<E>(
    response: reqwest::Response,
    refused: impl FnOnce(StatusCode, Option<String>, Option<String>) -> E,
) -> AttemptError<E> {
    let status = response.status();
    if is_transient(status) {
        return AttemptError::status(status, response.headers());
    }
    let bytes = response.bytes().await.unwrap_or_default();
    let (code, message) = error_code_and_message(&bytes);
    AttemptError::Final(refused(status, code, message))
}

/// Statuses worth retrying.
pub fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// `Retry-After` as seconds (fractions allowed, as Graph sends them) or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::from_secs_f64(seconds.min(3600.0)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The `{"error": {"code", "message"}}` body both ACS and Graph send with a refusal; the
/// code may be a string or a number.
pub fn error_code_and_message(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct ErrorResponse {
        error: Option<ErrorBody>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        code: Option<serde_json::Value>,
        message: Option<String>,
    }
    match serde_json::from_slice::<ErrorResponse>(body)
        .ok()
        .and_then(|body| body.error)
    {
        Some(ErrorBody { code, message }) => (
            code.map(|code| match code {
                serde_json::Value::String(text) => text,
                other => other.to_string(),
            }),
            message,
        ),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use reqwest::header::HeaderValue;

    use super::*;

    fn config(max_attempts: u32) -> RetryConfig {
        RetryConfig {
            max_attempts,
            initial_delay_ms: 10,
            max_delay_ms: 20,
            total_timeout_ms: 60_000,
        }
    }

    #[test]
    fn retry_after_accepts_seconds_fractions_and_dates() {
        let check = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("retry-after", HeaderValue::from_str(value).unwrap());
            retry_after(&headers)
        };
        assert_eq!(check("2"), Some(Duration::from_secs(2)));
        assert_eq!(check("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(check("2.128"), Some(Duration::from_millis(2128)));
        assert_eq!(check("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        assert_eq!(check("soon"), None);
        assert_eq!(check("-1"), None);
    }

    #[test]
    fn transient_statuses() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [400, 401, 403, 404, 409] {
            assert!(!is_transient(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn error_bodies_of_both_platforms() {
        assert_eq!(
            error_code_and_message(br#"{"error":{"code":8522,"message":"gone"}}"#),
            (Some("8522".into()), Some("gone".into()))
        );
        let graph = include_bytes!("../tests/fixtures/graph/graph_error_generic_example.json");
        assert_eq!(
            error_code_and_message(graph),
            (
                Some("invalidRange".into()),
                Some("Uploaded fragment overlaps with existing data.".into())
            )
        );
        assert_eq!(error_code_and_message(b"<html>"), (None, None));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_within_the_attempt_budget() {
        let calls = AtomicU32::new(0);
        let metrics = Metrics::new();
        let result: Result<(), Retried<()>> = with_retries(&config(3), "test", &metrics, || {
            calls.fetch_add(1, Ordering::Relaxed);
            async {
                Err(AttemptError::Transient {
                    error: TransientError::Status {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                    },
                    retry_after: None,
                })
            }
        })
        .await;
        assert!(matches!(
            result,
            Err(Retried::Exhausted { attempts: 3, .. })
        ));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // Every attempt is counted and timed; the two after the first are retries.
        let text = metrics.encode(Default::default()).unwrap();
        for line in [
            r#"callops_upstream_requests_total{upstream="test",status="503"} 3"#,
            r#"callops_upstream_request_duration_seconds_count{upstream="test"} 3"#,
            r#"callops_upstream_retries_total{upstream="test"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_failure_stops_at_once_and_success_returns_the_value() {
        let result: Result<(), Retried<&str>> =
            with_retries(&config(5), "test", &Metrics::new(), || async {
                Err(AttemptError::Final("no"))
            })
            .await;
        assert!(matches!(result, Err(Retried::Final("no"))));
        let calls = AtomicU32::new(0);
        let result: Result<u32, Retried<()>> =
            with_retries(&config(5), "test", &Metrics::new(), || {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                async move {
                    if n == 0 {
                        Err(AttemptError::Transient {
                            error: TransientError::Status {
                                status: StatusCode::TOO_MANY_REQUESTS,
                            },
                            retry_after: Some(Duration::from_millis(2128)),
                        })
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(result.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_beyond_the_time_budget_ends_the_loop() {
        let mut config = config(5);
        config.total_timeout_ms = 1000;
        let result: Result<(), Retried<()>> =
            with_retries(&config, "test", &Metrics::new(), || async {
                Err(AttemptError::Transient {
                    error: TransientError::Status {
                        status: StatusCode::TOO_MANY_REQUESTS,
                    },
                    retry_after: Some(Duration::from_secs(5)),
                })
            })
            .await;
        assert!(matches!(
            result,
            Err(Retried::Exhausted { attempts: 1, .. })
        ));
    }
}
