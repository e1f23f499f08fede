//! `pushdrop run`: wires the inbox, the store, the sender and the admin endpoint together and
//! shuts them down in order on SIGTERM/SIGINT.

use crate::config::Config;

/// Runs the daemon until a signal; returns the exit code.
pub fn run_blocking(_cfg: Config) -> anyhow::Result<i32> {
    anyhow::bail!("run is not built yet")
}
