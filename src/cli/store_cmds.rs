//! `status`, `show`, `devices`, `retry`, `purge`, `backup`: the operator's view of the store.

use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::store::query::{DeviceQuery, Reader};
use crate::store::{Store, StoreError};

use super::safe;

/// Filters of `pushdrop devices`.
pub struct DeviceFilter {
    pub app: Option<String>,
    pub user: Option<String>,
    pub invalid: bool,
    /// `None`: every matching device.
    pub limit: Option<usize>,
}

/// Opens the database read-only, creating and migrating it first if it does not exist yet or
/// is not migrated yet (a daemon starting for the first time may have just created the file:
/// the migration then waits for the daemon's, and finds it done).
fn reader(cfg: &Config) -> anyhow::Result<Reader> {
    let path = &cfg.store.path;
    if path.exists() {
        let r = Reader::open(path)?;
        let version: i64 = r
            .conn()
            .query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version > crate::store::SCHEMA_VERSION {
            // A newer build's tables may mean something else: as `run` does, refuse.
            return Err(crate::store::StoreError::TooNew {
                found: version,
                supported: crate::store::SCHEMA_VERSION,
            }
            .into());
        }
        if version == crate::store::SCHEMA_VERSION {
            return Ok(r);
        }
    }
    open_store(path)?;
    Ok(Reader::open(path)?)
}

/// Opens (and migrates) the store, creating it if missing, and says so: not an error (a fresh
/// install shows an empty queue), but a mistyped `store.path` would otherwise go unnoticed.
fn open_store(path: &Path) -> anyhow::Result<Store> {
    let new = !path.exists();
    let store = Store::open(path, false)?;
    if new {
        eprintln!(
            "note: no database at {} yet (store.path); created an empty one",
            path.display()
        );
    }
    Ok(store)
}

/// `pushdrop status [--json]`.
pub fn status(config: &Path, json: bool) -> anyhow::Result<i32> {
    let cfg = super::load_config(config)?;
    let mut s = reader(&cfg)?.status()?;
    s.daemon = crate::store::daemon_state(&cfg.store.path);
    s.inbox = Some(crate::inbox::waiting(&cfg.inbox.dir));
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    println!("database      {}", cfg.store.path.display());
    match &s.daemon {
        Some(d) if d.running => println!(
            "daemon        running{}",
            d.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
        Some(_) => println!(
            "daemon        not running (no `pushdrop run` holds the database{})",
            if s.paused.is_empty() {
                ""
            } else {
                ": the pauses below are its last word"
            }
        ),
        None => {}
    }
    if let Some(i) = &s.inbox {
        match (i.waiting_files, &i.error) {
            (Some(n), _) if n > 0 => println!(
                "inbox         {n} file(s) waiting in {} (the oldest changed {:.1} s ago)",
                i.dir,
                i.oldest_waiting_s.unwrap_or_default()
            ),
            (Some(_), _) => println!("inbox         no files waiting in {}", i.dir),
            (None, e) => println!(
                "inbox         cannot read {}: {}",
                i.dir,
                e.as_deref().unwrap_or("unknown error")
            ),
        }
    }
    println!(
        "queued        {} ({} due later; the oldest waiting for {:.1} s), {} notification(s) still to fan out",
        s.queued, s.queued_later, s.oldest_queued_age_s, s.scheduled_notifications
    );
    if s.deliveries.is_empty() {
        println!("deliveries    none (none queued, and none finished within keep_finished_days)");
    } else {
        println!(
            "{:<20} {:>9} {:>9} {:>9} {:>9} {:>13}",
            "app", "queued", "sent", "failed", "expired", "invalid_token"
        );
        for (app, by) in &s.deliveries {
            let g = |k: &str| by.get(k).copied().unwrap_or(0);
            println!(
                "{:<20} {:>9} {:>9} {:>9} {:>9} {:>13}",
                app,
                g("queued"),
                g("sent"),
                g("failed"),
                g("expired"),
                g("invalid_token")
            );
        }
    }
    for (app, d) in &s.devices {
        println!(
            "devices       {app}: {} active, {} invalid, {} unregistered, {} token-only",
            d.active, d.invalid, d.unregistered, d.unregistered_tokens_only
        );
    }
    for e in &s.paused {
        println!(
            "paused        {}: {} (since {})",
            e.app.as_deref().unwrap_or("-"),
            safe(&e.message),
            e.at
        );
    }
    if !s.recent_errors.is_empty() {
        println!("recent errors");
        for e in &s.recent_errors {
            println!(
                "  {} {} {}{}",
                e.at,
                e.kind,
                e.app
                    .as_deref()
                    .map(|a| format!("[{a}] "))
                    .unwrap_or_default(),
                safe(&e.message)
            );
        }
    }
    Ok(0)
}

/// A payload's JSON text for a terminal, still the same JSON: DEL and C1 characters (which
/// JSON allows raw inside strings) written as `\u00XX` escapes. C0 characters cannot be
/// raw inside a JSON string, and outside one they are whitespace, kept as stored.
fn json_terminal_safe(json: &str) -> std::borrow::Cow<'_, str> {
    let risky = |c: char| ('\u{7f}'..='\u{9f}').contains(&c);
    if !json.chars().any(risky) {
        return json.into();
    }
    json.chars()
        .map(|c| {
            if risky(c) {
                format!("\\u{:04x}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// That `show` or `retry` found no notification `id` (of `app`, when named): with the app
/// asked about, and a mistyped app said as such, not as a missing id.
fn say_no_notification(cfg: &crate::config::Config, id: &str, app: Option<&str>) {
    match app {
        Some(app) if !cfg.apps.iter().any(|a| a.name == app) => eprintln!(
            "pushdrop: no notification with id {id:?} for app {app:?}, which is not in the config"
        ),
        Some(app) => eprintln!("pushdrop: no notification with id {id:?} for app {app:?}"),
        None => eprintln!("pushdrop: no notification with id {id:?}"),
    }
}

/// `pushdrop show ID`.
pub fn show(config: &Path, id: &str, app: Option<&str>, json: bool) -> anyhow::Result<i32> {
    let cfg = super::load_config(config)?;
    let Some(n) = reader(&cfg)?.show(id, app, usize::MAX)? else {
        say_no_notification(&cfg, id, app);
        return Ok(1);
    };
    if json {
        print_json(&n)?;
        return Ok(0);
    }
    println!("notification  {} (app {})", n.id, safe(&n.app));
    // A file's `to.tokens` may hold thousands: the deliveries below list them one by one.
    const TARGET_SHOWN: usize = 200;
    match n.target.char_indices().nth(TARGET_SHOWN) {
        Some((cut, _)) => println!(
            "target        {}… ({} characters; `show --json` has it whole)",
            safe(&n.target[..cut]),
            n.target.chars().count()
        ),
        None => println!("target        {}", safe(&n.target)),
    }
    println!(
        "push          {} priority {} topic {}{}",
        n.push_type,
        n.priority,
        n.topic,
        n.collapse_id
            .as_deref()
            .map(|c| format!(" collapse-id {}", safe(c)))
            .unwrap_or_default()
    );
    println!(
        "created       {} from {}",
        n.created_at,
        safe(n.source_file.as_deref().unwrap_or("-"))
    );
    println!("send at       {}", n.send_at);
    if let Some(e) = &n.expiration {
        println!("expiration    {e}");
    }
    println!("finished      {}", n.finished_at.as_deref().unwrap_or("no"));
    let counts: Vec<String> = n.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("deliveries    {}", counts.join(", "));
    println!("payload       {}", json_terminal_safe(n.payload.get()));
    // Whole tokens (only log lines shorten them): two tokens may share their first digits,
    // and an operator pastes one into `devices` or their own registry.
    for d in &n.deliveries {
        println!(
            "  {} {:<10} {:<13} attempts {} apns-id {}{}",
            safe(&d.token),
            d.environment,
            d.state,
            d.attempts,
            d.apns_id,
            match (&d.last_status, &d.last_reason) {
                (Some(s), Some(r)) => format!(" last {s} {}", safe(r)),
                (None, Some(r)) => format!(" last {}", safe(r)),
                (Some(s), None) => format!(" last {s}"),
                _ => String::new(),
            }
        );
    }
    Ok(0)
}

/// `pushdrop devices`.
pub fn devices(config: &Path, f: &DeviceFilter, json: bool) -> anyhow::Result<i32> {
    let cfg = super::load_config(config)?;
    let limit = f.limit.unwrap_or(usize::MAX);
    // One more than asked: whether the list is cut short, which is then said.
    let mut rows = reader(&cfg)?.devices(&DeviceQuery {
        app: f.app.clone(),
        user: f.user.clone(),
        invalid_only: f.invalid,
        limit: limit.saturating_add(1),
    })?;
    let cut = rows.len() > limit;
    rows.truncate(limit);
    if cut {
        eprintln!("pushdrop: showing the first {limit} devices; more match (--limit)");
    }
    // A mistyped app would otherwise list nothing and succeed. An app no longer in the
    // config still lists the devices the store keeps for it.
    if let Some(app) = f.app.as_deref()
        && rows.is_empty()
        && !cfg.apps.iter().any(|a| a.name == app)
    {
        let names: Vec<&str> = cfg.apps.iter().map(|a| a.name.as_str()).collect();
        eprintln!(
            "pushdrop: no app {app:?} in the config or the device registry (configured: {})",
            names.join(", ")
        );
        return Ok(1);
    }
    if json {
        print_json(&rows)?;
        return Ok(0);
    }
    println!(
        "{:<14} {:<16} {:<11} {:<14} {:<24} token",
        "app", "user", "env", "state", "invalid since"
    );
    for d in &rows {
        println!(
            "{:<14} {:<16} {:<11} {:<14} {:<24} {}{}",
            d.app,
            safe(d.user.as_deref().unwrap_or("-")),
            d.environment,
            d.state,
            d.invalidated_at.as_deref().unwrap_or("-"),
            d.token,
            d.invalid_reason
                .as_deref()
                .map(|r| format!(" ({})", safe(r)))
                .unwrap_or_default()
        );
    }
    if cut {
        println!(
            "{} device(s) shown; more match (--limit {limit})",
            rows.len()
        );
    } else {
        println!("{} device(s)", rows.len());
    }
    Ok(0)
}

/// Writes `value` as pretty JSON and a newline to stdout, as it is serialized: a registry
/// of a million devices is not built as one string first.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, value)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush())
        // Said as `println!`'s failures are (see `cli::exit_1_when_output_fails`).
        .context("cannot write the output")
}

/// `pushdrop retry ID | --failed`.
pub fn retry(config: &Path, id: Option<&str>, app: Option<&str>) -> anyhow::Result<i32> {
    let cfg = super::load_config(config)?;
    let _log = crate::logging::init_one_shot(&cfg.log);
    // A mistyped app would otherwise requeue nothing and succeed. An app no longer in the
    // config may still have failed deliveries in the store.
    if let Some(app) = app
        && !cfg.apps.iter().any(|a| a.name == app)
        && id.is_none()
    {
        let names: Vec<&str> = cfg.apps.iter().map(|a| a.name.as_str()).collect();
        eprintln!(
            "pushdrop: no app {app:?} in the config (configured: {}); nothing requeued",
            names.join(", ")
        );
        return Ok(1);
    }
    let store = open_store(&cfg.store.path)?;
    let requeued =
        match store.retry_failed_blocking(id.map(str::to_string), app.map(str::to_string)) {
            // A mistyped id (or app), or one two apps use, is an error, said as `show` says it.
            Err(StoreError::UnknownNotification(id)) => {
                say_no_notification(&cfg, &id, app);
                return Ok(1);
            }
            Err(e @ StoreError::AmbiguousId { .. }) => {
                eprintln!("pushdrop: {e}");
                return Ok(1);
            }
            r => r?,
        };
    let n = requeued.deliveries;
    // The log line first: what was done is on record even when the output cannot be written
    // (a full disk, a closed pipe). Its fields say what was asked: one notification (`id`
    // and its `app`), or all failed deliveries (`scope`), of one app when named. A `None`
    // field is left out.
    tracing::info!(
        event = "requeued",
        id,
        scope = id.is_none().then_some("all failed"),
        app = requeued.app.as_deref(),
        deliveries = n,
        "failed deliveries requeued by `pushdrop retry`"
    );
    match (id, app) {
        (Some(id), _) => println!("requeued {n} failed deliveries of {id}"),
        (None, Some(app)) => println!("requeued {n} failed deliveries of app {app}"),
        (None, None) => println!("requeued {n} failed deliveries"),
    }
    Ok(0)
}

/// `pushdrop purge`.
pub fn purge(config: &Path) -> anyhow::Result<i32> {
    let cfg = super::load_config(config)?;
    let _log = crate::logging::init_one_shot(&cfg.log);
    let store = open_store(&cfg.store.path)?;
    let cutoff = crate::model::now_ms() - cfg.keep_finished_ms();
    let c = store.purge_blocking(cutoff, crate::inbox::drop_names(&cfg.inbox.dir))?;
    let horizon = if cfg.keep_finished_ms() > cfg.store.keep_finished_ms() {
        // Receipts on and a retention shorter than their grace.
        format!(
            "{} minutes (receipts are on: a notification is kept that long for its receipt)",
            crate::config::RECEIPT_GRACE_MS / 60_000
        )
    } else {
        let days = cfg.store.keep_finished_days;
        format!("{days} day{}", if days == 1 { "" } else { "s" })
    };
    // Logged first, as `retry` does.
    tracing::info!(
        event = "purged",
        deliveries = c.deliveries,
        notifications = c.notifications,
        devices = c.devices,
        committed_files = c.committed_files,
        "purged by `pushdrop purge`"
    );
    println!(
        "purged what is older than {horizon}: {} deliveries, {} notifications, {} devices (invalid, or tokens only named in to.tokens, with no delivery left), {} committed-file records",
        c.deliveries, c.notifications, c.devices, c.committed_files
    );
    Ok(0)
}

/// `pushdrop backup DEST`.
pub fn backup(config: &Path, dest: &Path) -> anyhow::Result<i32> {
    use std::os::unix::fs::OpenOptionsExt;
    let cfg = super::load_config(config)?;
    // A copy of a database made just now would be a backup of nothing: a mistyped
    // store.path must not pass for a backup.
    if !cfg.store.path.exists() {
        anyhow::bail!(
            "no database at {} (store.path): nothing to back up",
            cfg.store.path.display()
        );
    }
    if dest.to_str().is_none() {
        anyhow::bail!(
            "{}: the backup's path must be UTF-8 text (SQLite takes it as text)",
            dest.display()
        );
    }
    let store = Store::open(&cfg.store.path, false)?;
    // Made empty first, readable by its owner only: the copy holds the device registry, and
    // `VACUUM INTO` would make it with the umask's mode (often 644). SQLite writes into an
    // empty file.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            anyhow::bail!("{} exists; backup writes a new file", dest.display())
        }
        Err(e) => return Err(e).with_context(|| format!("backup to {}", dest.display())),
    }
    if let Err(e) = store.backup_blocking(dest) {
        let _ = std::fs::remove_file(dest);
        return Err(e).with_context(|| format!("backup to {}", dest.display()));
    }
    println!(
        "wrote a consistent copy of {} to {}",
        cfg.store.path.display(),
        dest.display()
    );
    Ok(0)
}

#[cfg(test)]
mod terminal_tests {
    use super::{json_terminal_safe, safe};

    #[test]
    fn control_characters_never_reach_the_terminal_raw() {
        assert_eq!(safe("plain é"), "plain é");
        assert_eq!(safe("a\nb\u{9b}31m\u{7f}"), "a\\u{a}b\\u{9b}31m\\u{7f}");
        let payload = "{\"aps\":{\"alert\":\"x\u{9b}31m\u{7f}\"},\n \"k\":1}";
        let shown = json_terminal_safe(payload);
        assert_eq!(
            shown,
            "{\"aps\":{\"alert\":\"x\\u009b31m\\u007f\"},\n \"k\":1}"
        );
        // Still the same JSON.
        let a: serde_json::Value = serde_json::from_str(payload).unwrap();
        let b: serde_json::Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(a, b);
    }
}
