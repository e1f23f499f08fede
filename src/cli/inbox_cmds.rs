//! `pushdrop validate` and `pushdrop ingest`.

use std::path::{Path, PathBuf};

/// Checks drop files without ingesting them.
pub fn validate(config: &Path, _files: &[PathBuf]) -> anyhow::Result<i32> {
    let _cfg = super::load_config(config)?;
    anyhow::bail!("validate is not built yet")
}

/// One-shot ingest.
pub fn ingest(config: &Path, _files: &[PathBuf]) -> anyhow::Result<i32> {
    let _cfg = super::load_config(config)?;
    anyhow::bail!("ingest is not built yet")
}
