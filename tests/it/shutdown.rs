//! Graceful shutdown: in-flight requests complete and `run` returns.

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{TestApp, silent, within};

#[tokio::test]
async fn a_long_poll_in_flight_at_shutdown_is_answered_and_run_returns() {
    let app = TestApp::spawn().await;
    let script = silent();
    let started = app.remove("call-stop", script, None).await;
    let id = started["id"].as_str().unwrap().to_owned();
    app.operation_until(&id, |op| op["status"] == "Running")
        .await;
    let waiter = app.start_long_poll(&id).await;
    app.shutdown.cancel();
    let response = within(waiter).await.unwrap();
    assert_eq!(response.status(), 200);
    let operation: Value = response.json().await.unwrap();
    assert_eq!(operation["id"], id.as_str());
    within(app.server).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_stuck_in_its_headers_holds_shutdown_no_longer_than_the_header_timeout() {
    let app = TestApp::spawn_with(|config| config.http.header_read_timeout_secs = 1).await;
    let mut stuck = TcpStream::connect(app.address).await.unwrap();
    stuck
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: callops\r\n")
        .await
        .unwrap();
    let _silent = TcpStream::connect(app.address).await.unwrap();
    // An idle keep-alive connection too.
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.shutdown.cancel();
    within(app.server).await.unwrap().unwrap();
}
