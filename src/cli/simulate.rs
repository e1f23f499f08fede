//! `pushdrop simulate`.

use std::path::Path;

/// The APNs simulator as a server.
pub fn simulate(_listen: &str, _dir: &Path, _latency_ms: u64) -> anyhow::Result<i32> {
    anyhow::bail!("simulate is not built yet")
}
