//! The APNs client: HTTP/2 over TLS to Apple (or any server that speaks its protocol, such as
//! the built-in [`crate::simulator`]).
//!
//! The sender hands [`ApnsClient::send`] one [`PushRequest`] at a time, from as many tasks as
//! it likes, and gets back an [`Outcome`] that already says what to do next. Everything about
//! connections is hidden here: one pool per (app, environment), because a connection is bound
//! to one key or certificate; streams multiplexed up to what the server allows; reconnects with
//! back-off; provider tokens minted and refreshed on Apple's schedule.
//!
//! Layout: [`outcome`] maps APNs answers onto outcomes, [`auth`] mints provider tokens,
//! `tls` and `proxy` open the transport, `pool` owns the connections, `client` ties it up.

pub mod auth;
mod client;
pub mod outcome;
mod pool;
mod proxy;
mod sniff;
pub mod tls;

use std::path::PathBuf;

pub use auth::{Clock, system_clock};
pub use client::{ApnsClient, ClientStats, PushRequest};
pub use outcome::Outcome;

/// A configuration problem found while setting up the client (bad key, certificate or URL).
/// Network trouble is never an `ApnsError`: it is an [`Outcome`] of a send.
#[derive(Debug, thiserror::Error)]
pub enum ApnsError {
    /// The `.p8` key cannot be read or used.
    #[error("APNs key {path}: {message}")]
    Key { path: PathBuf, message: String },
    /// A certificate, private key or CA file cannot be read or used.
    #[error("certificate file {path}: {message}")]
    Cert { path: PathBuf, message: String },
    /// A URL or proxy setting cannot be used.
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    /// rustls refused the TLS settings.
    #[error("TLS set-up: {0}")]
    Tls(String),
}
