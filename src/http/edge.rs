//! The request's edge: the whole-request deadline (`408` with the error body), the echo of
//! the client's `x-ms-client-request-id`, as Azure services do, and [`Compact`] bodies.
//!
//! Hand-written rather than two `axum::middleware::from_fn` layers: each of those copies
//! the inner service and boxes two futures per request, and this sits on the callback path,
//! where that was measurable. One boxed future per request here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Request, StatusCode};
use axum::response::Response;
use tower::{Layer, Service};

use crate::error::error_response;
use crate::http::CLIENT_REQUEST_ID;

/// Adds [`Edge`] around a service.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer {
    /// The whole-request deadline, reading the body included.
    pub deadline: Duration,
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            deadline: self.deadline,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    deadline: Duration,
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
            request.map(|body| Body::new(Compact(body)))
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
struct Compact(Body);

impl HttpBody for Compact {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| {
                    frame.map_data(|data| {
                        if data.len() < COMPACT_BELOW {
                            Bytes::copy_from_slice(&data)
                        } else {
                            data
                        }
                    })
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}
