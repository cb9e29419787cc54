//! A webhook receiver for tests that fails on demand: answers 2xx, a chosen status, hangs
//! past the sender's timeout, or is down (connections refused). It verifies every
//! request's Standard Webhooks signature with the `standardwebhooks` crate and records
//! what it accepted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::within;

/// What the receiver does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Accept,
    Status(u16),
    /// Never answers (the sender times out).
    Hang,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub body: Value,
    /// The signature verified with the secret the receiver was told (None: no secret set,
    /// or unsigned).
    pub verified: Option<bool>,
    /// Answered 2xx.
    pub accepted: bool,
}

#[derive(Default)]
struct Shared {
    mode: Mutex<Option<Mode>>,
    secrets: Mutex<Vec<String>>,
    received: Mutex<Vec<Received>>,
}

pub struct Receiver {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    stop: Mutex<Option<CancellationToken>>,
}

impl Receiver {
    pub async fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let receiver = Self {
            address,
            shared: Arc::default(),
            stop: Mutex::new(None),
        };
        receiver.set_mode(mode);
        receiver.serve(listener);
        receiver
    }

    fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/hook", post(receive))
            .route("/hook/{name}", post(receive))
            .with_state(Arc::clone(&self.shared));
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        *self.stop.lock().unwrap() = Some(stop);
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.address)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = Some(mode);
    }

    /// Secrets to verify signatures with (any of them may match).
    pub fn trust(&self, secret: &str) {
        self.shared.secrets.lock().unwrap().push(secret.to_owned());
    }

    /// Stops listening: connections are refused until [`Receiver::up`].
    pub fn down(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            stop.cancel();
        }
    }

    /// Listens again on the same address.
    pub async fn up(&self) {
        let listener = loop {
            match TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// The operations whose delivery was accepted (`data.id` of each body).
    pub fn operations_delivered(&self) -> BTreeSet<String> {
        self.deduplicated()
            .values()
            .map(|r| r.body["data"]["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits (bounded) until the accepted deliveries name exactly `expected`.
    pub async fn until_delivered(&self, expected: &BTreeSet<String>) {
        within(async {
            while self.operations_delivered() != *expected {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// Checks every request was signed and verified, and that each operation came under
    /// one webhook-id only, whatever the attempts; the ids per operation.
    pub fn one_signed_id_per_operation(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for received in self.received() {
            assert_eq!(received.verified, Some(true), "{received:?}");
            ids.entry(received.body["data"]["id"].as_str().unwrap().to_owned())
                .or_default()
                .insert(received.id);
        }
        assert!(ids.values().all(|ids| ids.len() == 1), "{ids:?}");
        ids
    }

    /// Accepted requests, deduplicated on `webhook-id` as a receiver would: id → first body.
    pub fn deduplicated(&self) -> BTreeMap<String, Received> {
        let mut unique = BTreeMap::new();
        for received in self.received().into_iter().filter(|r| r.accepted) {
            unique.entry(received.id.clone()).or_insert(received);
        }
        unique
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mode = shared.mode.lock().unwrap().unwrap_or(Mode::Accept);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let secrets = shared.secrets.lock().unwrap().clone();
    let verified = (!secrets.is_empty() && headers.contains_key("webhook-signature")).then(|| {
        secrets.iter().any(|secret| {
            standardwebhooks::Webhook::new(secret)
                .and_then(|webhook| webhook.verify(&body, &headers))
                .is_ok()
        })
    });
    let status = match mode {
        Mode::Status(status) => StatusCode::from_u16(status).unwrap(),
        _ => StatusCode::NO_CONTENT,
    };
    shared.received.lock().unwrap().push(Received {
        id: header("webhook-id"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        verified,
        accepted: status.is_success() && mode != Mode::Hang,
    });
    if mode == Mode::Hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    status
}
