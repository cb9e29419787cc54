//! Azure Communication Services: the wire formats and the outbound client.
//!
//! Upstream wire types stay inside this module; the rest of the service sees domain types
//! ([`events::AcsEvent`], [`crate::operation`]).

pub mod auth;
pub mod client;
pub mod connection_string;
pub mod events;
pub mod identifier;
pub mod signing;
