//! The accept loop. `axum::serve` has no header read timeout, so a client that opens
//! connections and trickles (or never sends) its request headers would hold them forever
//! (slowloris). This serves HTTP/1.1 with hyper's `header_read_timeout`: a connection whose
//! request headers are not complete within it is closed. The same deadline applies to an
//! idle keep-alive connection waiting for its next request.
//!
//! Graceful shutdown is `axum::serve`'s: when `shutdown` is cancelled, stop accepting, tell
//! every connection to finish its in-flight request and close, and return once all have. Idle
//! connections close at once; one still sending its headers holds shutdown until the header
//! read timeout (with `axum::serve`, forever).

use std::io;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long to pause accepting after an error that is not about one connection (e.g. out
/// of file descriptors), as `axum::serve` does.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` is cancelled and every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        // A client that shuts down its sending side once its request is out still gets the
        // answer (without this, hyper drops a request whose handler is still awaiting the
        // store when the client's FIN arrives).
        .half_close(true);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                tracing::error!(%error, "accepting a connection failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        // Responses are written whole; no need to wait for more.
        let _ = stream.set_nodelay(true);
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut connection = pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                // A header read timeout, a client gone mid-request, a malformed request
                // (hyper answered it): the client's problem, not the service's.
                tracing::debug!(%remote, %error, timeout = error.is_timeout(), "connection closed with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors about one connection that was gone before it was accepted.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
