//! The shared store over TLS (`rediss://`): a `redis-server` serving TLS only, with a
//! certificate from a private CA that callops is told to trust (`store.redis_ca_file`).

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::binary::{Process, free_port};
use crate::redis::redis_server_available;
use crate::support::{TestApp, remove_event, silent, within};

#[tokio::test]
async fn a_redis_over_tls_signed_by_a_private_ca_is_a_store_once_that_ca_is_trusted() {
    if !redis_server_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let _redis = Process(
        Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
            .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(&cert_file)
            .arg("--tls-key-file")
            .arg(&key_file)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    within(async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let url = format!("rediss://127.0.0.1:{port}");

    // The public roots do not know that CA: callops refuses to start, and says why.
    let mut config = callops::config::Config::embedded();
    config.store.location = url.clone();
    config.store.redis_timeout_ms = 1000;
    config.emulator.listen = "127.0.0.1:0".parse().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = callops::run(listener, config, CancellationToken::new())
        .await
        .unwrap_err();
    let refused = format!("{refused:#}");
    assert!(refused.contains("connecting to Redis"), "{refused}");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");

    // Trusted: an operation is stored, settled and read over TLS.
    let app = TestApp::spawn_with(|config| {
        config.store.location = url.clone();
        config.store.redis_ca_file = cert_file.display().to_string();
    })
    .await;
    let started = app.remove("call-tls", silent(), Some("ctx-tls")).await;
    let id = started["id"].as_str().unwrap();
    let summary = app
        .callback(&remove_event("ev-tls", "call-tls", "ctx-tls", true))
        .await;
    assert_eq!(summary["matched"], 1, "{summary}");
    let operation = app.get_json(&format!("/v1/operations/{id}")).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
}
