//! The load generator: HTTP/1.1 keep-alive connections (hyper's client connection over a
//! `TcpStream`, no pool, no redirects), and a closed loop of workers, one connection each,
//! sending pre-built requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::report;

/// One keep-alive connection.
pub struct Conn {
    addr: SocketAddr,
    host: HeaderValue,
    sender: SendRequest<Full<Bytes>>,
}

/// A response: its status, body, and when its head arrived.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
    pub head_at: Instant,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            addr,
            host: HeaderValue::from_str(&addr.to_string()).context("host header")?,
            sender: connect(addr).await?,
        })
    }

    /// Sends one request (reconnecting first if the server closed the connection).
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        authorization: Option<&HeaderValue>,
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        if self.sender.is_closed() || self.sender.ready().await.is_err() {
            self.sender = connect(self.addr).await?;
        }
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone());
        if !body.is_empty() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let request = request
            .body(Full::new(body))
            .context("building a request")?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("sending to {path}"))?;
        let head_at = Instant::now();
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading a response body")?
            .to_bytes();
        Ok(Answer {
            status,
            body,
            head_at,
        })
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Answer> {
        self.send(Method::GET, path, None, Bytes::new()).await
    }

    /// `GET path` answered 200, as JSON.
    pub async fn get_json(&mut self, path: &str) -> anyhow::Result<serde_json::Value> {
        let answer = self.get(path).await?;
        if !answer.status.is_success() {
            bail!("GET {path}: {}", answer.status);
        }
        serde_json::from_slice(&answer.body).with_context(|| format!("GET {path}: not JSON"))
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A fixed set of `POST path` requests: request `i` carries `bodies[i]` and
/// `tokens[i % tokens.len()]` (when there are tokens).
pub struct Shots {
    pub path: String,
    pub bodies: Vec<Bytes>,
    pub tokens: Vec<HeaderValue>,
    /// Start over at the first body when all are sent (otherwise the run ends there).
    pub cycle: bool,
    /// Count answers whose body does not say `"matched":1` (callops' delivery summary).
    pub expect_matched: bool,
}

/// What a closed-loop run measured.
pub struct RunResult {
    /// Latencies of requests started in the measured window (µs).
    pub latencies: Histogram<u64>,
    /// 2xx answers in the measured window.
    pub ok: u64,
    /// Failures (non-2xx or transport errors) in the whole run, warm-up included.
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// 2xx answers without `"matched":1` when that was expected.
    pub unmatched: u64,
    /// The measured window: from the end of the warm-up to the last measured answer.
    pub window: Duration,
    /// Indices of every request answered 2xx (warm-up included).
    pub acknowledged: Vec<usize>,
    /// The bodies ran out before the duration was over.
    pub exhausted: bool,
}

impl RunResult {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

struct WorkerResult {
    latencies: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_errors: Vec<String>,
    unmatched: u64,
    last: Option<Instant>,
    acknowledged: Vec<usize>,
    exhausted: bool,
}

/// Sends `shots` over `connections` connections, each worker sending its next request as
/// soon as the previous one is answered, for `warmup` (not measured) and then `duration`.
pub async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    shots: Arc<Shots>,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<RunResult> {
    closed_loop_over(&[addr], connections, shots, warmup, duration).await
}

/// [`closed_loop`] over several servers (replicas of one deployment): connection `i` goes
/// to `addrs[i % addrs.len()]`; the workers still share one sequence of requests.
pub async fn closed_loop_over(
    addrs: &[SocketAddr],
    connections: usize,
    shots: Arc<Shots>,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<RunResult> {
    if addrs.is_empty() {
        bail!("no server to send to");
    }
    let mut conns = Vec::with_capacity(connections);
    for index in 0..connections {
        conns.push(Conn::open(addrs[index % addrs.len()]).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let measured_from = start + warmup;
    let end = measured_from + duration;
    let mut workers = Vec::with_capacity(connections);
    for conn in conns {
        let shots = shots.clone();
        let next = next.clone();
        workers.push(tokio::spawn(worker(conn, shots, next, measured_from, end)));
    }
    let mut result = RunResult {
        latencies: report::histogram(),
        ok: 0,
        errors: 0,
        first_errors: Vec::new(),
        unmatched: 0,
        window: Duration::ZERO,
        acknowledged: Vec::new(),
        exhausted: false,
    };
    let mut last = measured_from;
    for worker in workers {
        let worker = worker.await.context("a load worker panicked")?;
        result.latencies.add(&worker.latencies)?;
        result.ok += worker.ok;
        result.errors += worker.errors;
        result.unmatched += worker.unmatched;
        result.exhausted |= worker.exhausted;
        result.acknowledged.extend(worker.acknowledged);
        for error in worker.first_errors {
            if result.first_errors.len() < 10 {
                result.first_errors.push(error);
            }
        }
        if let Some(at) = worker.last {
            last = last.max(at);
        }
    }
    result.window = last.saturating_duration_since(measured_from);
    Ok(result)
}

async fn worker(
    mut conn: Conn,
    shots: Arc<Shots>,
    next: Arc<AtomicUsize>,
    measured_from: Instant,
    end: Instant,
) -> WorkerResult {
    let mut result = WorkerResult {
        latencies: report::histogram(),
        ok: 0,
        errors: 0,
        first_errors: Vec::new(),
        unmatched: 0,
        last: None,
        acknowledged: Vec::new(),
        exhausted: false,
    };
    let count = shots.bodies.len();
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let mut index = next.fetch_add(1, Ordering::Relaxed);
        if index >= count {
            if !shots.cycle || count == 0 {
                result.exhausted = true;
                break;
            }
            index %= count;
        }
        let token = match shots.tokens.len() {
            0 => None,
            n => Some(&shots.tokens[index % n]),
        };
        let sent = conn
            .send(
                Method::POST,
                &shots.path,
                token,
                shots.bodies[index].clone(),
            )
            .await;
        let done = Instant::now();
        let measured = started >= measured_from;
        match sent {
            Ok(answer) if answer.status.is_success() => {
                result.acknowledged.push(index);
                if measured {
                    report::record(&mut result.latencies, done - started);
                    result.ok += 1;
                    result.last = Some(done);
                }
                if shots.expect_matched && !contains(&answer.body, b"\"matched\":1") {
                    result.unmatched += 1;
                    if result.first_errors.len() < 3 {
                        result.first_errors.push(format!(
                            "{} not matched: {}",
                            answer.status,
                            String::from_utf8_lossy(&answer.body)
                        ));
                    }
                }
            }
            Ok(answer) => {
                result.errors += 1;
                if result.first_errors.len() < 3 {
                    result.first_errors.push(format!(
                        "{}: {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    ));
                }
            }
            Err(error) => {
                result.errors += 1;
                if result.first_errors.len() < 3 {
                    result.first_errors.push(format!("{error:#}"));
                }
            }
        }
    }
    result
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Runs `make(i)` for `i` in `0..count` over `connections` connections (each worker takes
/// the next index), failing on the first error. For setting up operations.
pub async fn for_each<F, Fut, T>(
    addr: SocketAddr,
    connections: usize,
    count: usize,
    make: F,
) -> anyhow::Result<Vec<(usize, T)>>
where
    F: Fn(usize, Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<(Conn, T)>> + Send,
    T: Send + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..connections.min(count.max(1)) {
        let mut conn = Conn::open(addr).await?;
        let make = make.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return anyhow::Ok(out);
                }
                let (back, value) = make(index, conn).await?;
                conn = back;
                out.push((index, value));
            }
        }));
    }
    let mut out = Vec::with_capacity(count);
    for worker in workers {
        out.extend(worker.await.context("a setup worker panicked")??);
    }
    Ok(out)
}

/// Seconds of CPU (user + system) process `pid` (or this one) has used.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_matched_count() {
        assert!(contains(br#"{"received":1,"matched":1}"#, b"\"matched\":1"));
        assert!(!contains(
            br#"{"received":1,"matched":0}"#,
            b"\"matched\":1"
        ));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn reads_its_own_cpu_time() {
        assert!(cpu_seconds(None).is_some());
    }
}
