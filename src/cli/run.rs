//! `pushdrop run`.

use std::path::Path;

/// The daemon.
pub fn run(config: &Path) -> anyhow::Result<i32> {
    let (cfg, warnings) = super::load_config_to_send(config)?;
    crate::daemon::run_blocking(cfg, &warnings)
}
