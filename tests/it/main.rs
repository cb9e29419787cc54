//! End-to-end tests: the real server (`callops::run`) on port 0, the ACS emulator as the
//! upstream, everything over HTTP on loopback.

mod api_keys;
mod binary;
mod callback_auth;
mod callbacks;
mod cli;
mod container;
mod durability;
mod graph;
mod hostile_input;
mod identity;
mod metrics;
mod openapi;
mod operations;
mod receiver;
mod reconcile;
mod redis;
mod redis_cluster;
mod redis_tls;
mod removal;
mod secrets;
mod shared_races;
mod shutdown;
mod stream;
mod support;
mod ui;
mod upgrade;
mod webhooks;
