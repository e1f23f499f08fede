//! pushdrop: files dropped into an inbox become Apple push notifications.
//!
//! The data's path is the module tree: [`config`] → [`inbox`] (watch, parse, ingest) →
//! [`store`] (SQLite) → [`sender`] → [`apns`] (client, auth, outcomes) → [`admin`] and
//! [`metrics`]. The [`simulator`] stands beside them as a stand-in for Apple.

pub mod admin;
pub mod apns;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod inbox;
pub mod lockfile;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod ownership;
pub mod receipts;
pub mod sender;
pub mod simulator;
pub mod store;
