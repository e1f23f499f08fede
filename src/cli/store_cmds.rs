//! `status`, `show`, `devices`, `retry`, `purge`, `backup`.

use std::path::Path;

/// Filters of `pushdrop devices`.
pub struct DeviceFilter {
    pub app: Option<String>,
    pub user: Option<String>,
    pub invalid: bool,
    pub limit: usize,
}

/// `pushdrop status`.
pub fn status(config: &Path, _json: bool) -> anyhow::Result<i32> {
    let _cfg = super::load_config(config)?;
    anyhow::bail!("status is not built yet")
}

/// `pushdrop show`.
pub fn show(config: &Path, _id: &str, _app: Option<&str>, _json: bool) -> anyhow::Result<i32> {
    let _cfg = super::load_config(config)?;
    anyhow::bail!("show is not built yet")
}

/// `pushdrop devices`.
pub fn devices(config: &Path, _f: &DeviceFilter, _json: bool) -> anyhow::Result<i32> {
    let _cfg = super::load_config(config)?;
    anyhow::bail!("devices is not built yet")
}

/// `pushdrop retry`.
pub fn retry(config: &Path, _id: Option<&str>) -> anyhow::Result<i32> {
    let _cfg = super::load_config(config)?;
    anyhow::bail!("retry is not built yet")
}

/// `pushdrop purge`.
pub fn purge(config: &Path) -> anyhow::Result<i32> {
    let _cfg = super::load_config(config)?;
    anyhow::bail!("purge is not built yet")
}

/// `pushdrop backup`.
pub fn backup(config: &Path, _dest: &Path) -> anyhow::Result<i32> {
    let _cfg = super::load_config(config)?;
    anyhow::bail!("backup is not built yet")
}
