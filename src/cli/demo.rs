//! `pushdrop demo`.

use std::path::Path;

/// A self-contained tour (built with the sender).
pub fn demo(_examples: Option<&Path>, _keep: bool) -> anyhow::Result<i32> {
    anyhow::bail!("demo is not built yet")
}
