//! The request's edge: the whole-request deadline (`408` with the error body), the echo of
//! the client's `x-ms-client-request-id`, as Azure services do, and [`Compact`] bodies with
//! their own deadline and a cap on how many may be arriving slowly at once.
//!
//! Hand-written rather than two `axum::middleware::from_fn` layers: each of those copies
//! the inner service and boxes two futures per request, and this sits on the callback path,
//! where that was measurable. One boxed future per request here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Request, StatusCode};
use axum::response::Response;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::error::{SlowBody, error_response};
use crate::http::CLIENT_REQUEST_ID;

/// Adds [`Edge`] around a service.
#[derive(Debug, Clone)]
pub struct EdgeLayer {
    /// The whole-request deadline, reading the body included.
    deadline: Duration,
    bodies: Arc<SlowBodies>,
}

impl EdgeLayer {
    /// `deadline` for the whole request, `body_deadline` for its body to arrive, and at most
    /// `max_slow_bodies` bodies arriving slowly at once.
    pub fn new(deadline: Duration, body_deadline: Duration, max_slow_bodies: usize) -> Self {
        Self {
            deadline,
            bodies: Arc::new(SlowBodies {
                deadline: body_deadline,
                permits: Arc::new(Semaphore::new(max_slow_bodies)),
            }),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            deadline: self.deadline,
            bodies: Arc::clone(&self.bodies),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    deadline: Duration,
    bodies: Arc<SlowBodies>,
}

/// The limits on bodies that do not arrive at once.
#[derive(Debug)]
struct SlowBodies {
    deadline: Duration,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<Request<Body>> for Edge<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let client_id = request.headers().get(CLIENT_REQUEST_ID).cloned();
        let has_body = request
            .headers()
            .contains_key(axum::http::header::CONTENT_LENGTH)
            || request
                .headers()
                .contains_key(axum::http::header::TRANSFER_ENCODING);
        let request = if has_body {
            let bodies = Arc::clone(&self.bodies);
            request.map(|body| {
                Body::new(Compact {
                    body,
                    started: Instant::now(),
                    bodies,
                    slow: None,
                })
            })
        } else {
            request
        };
        let deadline = self.deadline;
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = match tokio::time::timeout(deadline, answer).await {
                Ok(Ok(response)) => response.map(Body::new),
                Err(_) => error_response(
                    StatusCode::REQUEST_TIMEOUT,
                    "RequestTimeout",
                    format!(
                        "the request did not complete within {} s",
                        deadline.as_secs()
                    ),
                ),
            };
            if let Some(id) = client_id {
                response.headers_mut().insert(CLIENT_REQUEST_ID, id);
            }
            Ok(response)
        })
    }
}

/// The largest body chunk copied rather than kept as received.
const COMPACT_BELOW: usize = 4096;

/// A request body whose small chunks are copied out of the connection's read buffer. Each
/// chunk hyper hands over shares that buffer (kilobytes), so a body dripped a byte at a time
/// would otherwise pin one buffer per byte until the body is complete: hundreds of slow
/// connections held hundreds of megabytes. A copy of a small chunk costs little.
///
/// A body that is not all there at its first read becomes slow: it takes one of a bounded
/// number of permits (none left: [`SlowBody::TooMany`]) and must end within the body
/// deadline ([`SlowBody::Deadline`]). A body that arrives with its head, as callbacks do,
/// never arms a timer or touches the permits.
struct Compact {
    body: Body,
    started: Instant,
    bodies: Arc<SlowBodies>,
    slow: Option<Slow>,
}

struct Slow {
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Compact {
    fn cut_off(
        &mut self,
        why: SlowBody,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        self.slow = None;
        Poll::Ready(Some(Err(axum::Error::new(why))))
    }
}

impl HttpBody for Compact {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Some(slow) = &mut this.slow
            && slow.deadline.as_mut().poll(cx).is_ready()
        {
            return this.cut_off(SlowBody::Deadline(this.bodies.deadline));
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => {
                if this.slow.is_none() {
                    let Ok(permit) = Arc::clone(&this.bodies.permits).try_acquire_owned() else {
                        return this.cut_off(SlowBody::TooMany);
                    };
                    let mut deadline = Box::pin(tokio::time::sleep_until(
                        this.started + this.bodies.deadline,
                    ));
                    if deadline.as_mut().poll(cx).is_ready() {
                        return this.cut_off(SlowBody::Deadline(this.bodies.deadline));
                    }
                    this.slow = Some(Slow {
                        deadline,
                        _permit: permit,
                    });
                }
                Poll::Pending
            }
            Poll::Ready(frame) => {
                if frame.is_none() {
                    this.slow = None;
                }
                Poll::Ready(frame.map(|frame| {
                    frame.map(|frame| {
                        frame.map_data(|data| {
                            if data.len() < COMPACT_BELOW {
                                Bytes::copy_from_slice(&data)
                            } else {
                                data
                            }
                        })
                    })
                }))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
