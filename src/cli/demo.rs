//! `pushdrop demo`: a self-contained tour on a fresh machine. It starts the built-in APNs
//! simulator, writes a config for a temporary folder, runs the real daemon in-process, drops
//! the files of `inbox-example/` into its inbox the way a dropper would (write elsewhere,
//! rename in), and prints what happened. Nothing is faked: every figure comes from the
//! daemon's SQLite database, the simulator's record of what reached it over HTTP/2 and TLS,
//! and the receipt files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

use crate::config::Config;
use crate::daemon::Daemon;
use crate::model::{now_ms, token_prefix};
use crate::simulator::{SimOptions, Simulator, TokenScript};
use crate::store::query::Reader;

/// The example files, built in so the demo also works outside a checkout.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "0-devices.jsonl",
        include_str!("../../inbox-example/0-devices.jsonl"),
    ),
    (
        "broadcast.json",
        include_str!("../../inbox-example/broadcast.json"),
    ),
    (
        "to-users.json",
        include_str!("../../inbox-example/to-users.json"),
    ),
    ("voip.json", include_str!("../../inbox-example/voip.json")),
    (
        "scheduled.json",
        include_str!("../../inbox-example/scheduled.json"),
    ),
    (
        "broken.json",
        include_str!("../../inbox-example/broken.json"),
    ),
];

const APP: &str = "buxheti";
const BUNDLE: &str = "info.buxheti.shkoder";

/// Runs the tour; `examples` replaces the built-in files with a folder of your own.
pub fn demo(examples: Option<&Path>, keep: bool) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(examples, keep))
}

/// The drop files the tour uses, and where they come from (said in its header).
struct Examples {
    files: Vec<(String, String)>,
    source: String,
}

/// `--examples DIR`; else `./inbox-example/` when there is one (a checkout, where the user
/// may have edited them); else the built-in copies.
fn load_examples(dir: Option<&Path>) -> anyhow::Result<Examples> {
    let dir = match dir {
        Some(d) => Some(d.to_path_buf()),
        None => Some(PathBuf::from("inbox-example")).filter(|d| d.is_dir()),
    };
    let Some(dir) = dir else {
        return Ok(Examples {
            files: EMBEDDED
                .iter()
                .map(|(n, c)| (n.to_string(), c.to_string()))
                .collect(),
            source: "inbox-example/, built into pushdrop".into(),
        });
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if name.ends_with(".json") || name.ends_with(".jsonl") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            files.push((name, text));
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no .json or .jsonl files in {}", dir.display());
    }
    Ok(Examples {
        files,
        source: format!("{}/", dir.display()),
    })
}

/// Device tokens registered by the examples' `*devices*` files, in file order.
fn registered_tokens(files: &[(String, String)]) -> Vec<String> {
    let mut tokens = Vec::new();
    for (name, text) in files.iter().filter(|(n, _)| n.contains("devices")) {
        let values: Vec<serde_json::Value> = if name.ends_with(".jsonl") {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        } else {
            match serde_json::from_str(text) {
                Ok(serde_json::Value::Array(a)) => a,
                Ok(v) => vec![v],
                Err(_) => vec![],
            }
        };
        for v in values {
            if v["type"] == "device"
                && v.get("action").is_none_or(|a| a == "register")
                && let Some(t) = v["token"].as_str()
            {
                let t = t.to_ascii_lowercase();
                if !tokens.contains(&t) {
                    tokens.push(t);
                }
            }
        }
    }
    tokens
}

/// Writes a file the way droppers should: elsewhere first, then `rename` into the inbox. The
/// mtime is set an hour back, as if the dropper had written it then.
fn drop_file(staging: &Path, inbox: &Path, name: &str, content: &str) -> anyhow::Result<()> {
    let tmp = staging.join(name);
    std::fs::write(&tmp, content)?;
    let f = std::fs::File::options().write(true).open(&tmp)?;
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))?;
    drop(f);
    std::fs::rename(&tmp, inbox.join(name))?;
    Ok(())
}

async fn run(examples: Option<&Path>, keep: bool) -> anyhow::Result<i32> {
    let started = Instant::now();
    let examples = load_examples(examples)?;
    let files = &examples.files;
    // Ctrl-C, SIGTERM or SIGHUP ends the tour early, and it still cleans up after itself (the
    // daemon stopped, the folder removed unless `--keep`); a second one stops it at once.
    // Caught before the folder exists, so none is left by a signal's default action.
    let stop = Interrupt::install()?;
    let tmp = tempfile::Builder::new()
        .prefix("pushdrop-demo-")
        .tempdir()?;
    let root = tmp.path().to_path_buf();
    stop.remove_at_exit((!keep).then(|| root.clone()));
    for d in ["inbox", "staging", "receipts", "log"] {
        std::fs::create_dir_all(root.join(d))?;
    }

    let sim = Simulator::start(SimOptions {
        bundle_ids: vec![BUNDLE.to_string()],
        ..SimOptions::default()
    })
    .await?;
    let creds = sim.write_credentials(&root.join("simulator"))?;

    // Script a few of the example devices so the tour shows every path.
    let tokens = registered_tokens(files);
    let mut scripted = Vec::new();
    let mut script = |i: usize, s: TokenScript, what: &str| {
        if let Some(t) = tokens.get(i) {
            sim.script(t, s);
            scripted.push((t.clone(), what.to_string()));
        }
    };
    script(
        1,
        TokenScript::Unregistered {
            timestamp_ms: Some(now_ms() - 30 * 60 * 1000),
        },
        "answers 410 Unregistered (app deleted 30 min ago)",
    );
    script(2, TokenScript::BadDeviceToken, "answers 400 BadDeviceToken");
    script(
        3,
        TokenScript::FailFirst {
            n: 2,
            status: 503,
            reason: "ServiceUnavailable".into(),
        },
        "answers 503 twice, then 200",
    );

    let config_path = root.join("pushdrop.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"# Written by `pushdrop demo`.
[inbox]
dir = "inbox"
settle_ms = 200

[store]
path = "pushdrop.db"

{sections}
[sender]
retry_initial_ms = 200
retry_max_ms = 2000

[receipts]
dir = "receipts"

[log]
dir = "log"
level = "info"

[admin]
listen = ""
"#,
            sections = creds.config_sections(&sim.url(), APP, BUNDLE),
        ),
    )?;
    let (cfg, _) = Config::load(&config_path)?;
    let _log = crate::logging::init_files_only(&cfg.log)?;
    let cfg = Arc::new(cfg);
    // The daemon owns a runtime of its own: start and stop it off this runtime's threads.
    let daemon = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || Daemon::start(cfg)).await??
    };

    let toured = tour(&cfg, &root, files, &stop).await;
    tokio::task::spawn_blocking(move || daemon.shutdown()).await?;
    // A signal after the tour (while the table is made) stops it as one during the tour.
    let toured = match (toured, stop.signal()) {
        (Ok(()), Some((name, _))) => Err(anyhow::anyhow!("interrupted by {name}")),
        (t, _) => t,
    };
    let mut out = match toured {
        Ok(()) => report(&cfg, &examples, &scripted, &sim, started)?,
        Err(e) => match stop.signal() {
            Some((_, code)) => {
                sim.shutdown().await;
                let kept = if keep {
                    format!("kept the demo folder: {}", tmp.keep().display())
                } else {
                    "the demo folder is removed".into()
                };
                eprintln!("pushdrop demo: interrupted; the daemon stopped, {kept}");
                return Ok(code);
            }
            None => return Err(e),
        },
    };
    sim.shutdown().await;
    let kept = keep.then(|| tmp.keep());
    match &kept {
        Some(kept) => out.push_str(&format!(
            "\nkept the demo folder: {}\ntry: pushdrop --config {}/pushdrop.toml status\n",
            kept.display(),
            kept.display()
        )),
        None => out.push_str(
            "\nthe demo folder (and the receipts above) is removed now; `pushdrop demo --keep` keeps it\n",
        ),
    }
    // A reader that went away (`| head`) ends the output, not the tour: the folder is already
    // kept or removed as asked. Output that cannot be written otherwise (a full disk) is said
    // on stderr, with where the kept folder is.
    use std::io::Write as _;
    stop.remove_at_exit(None);
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            if let Some(kept) = kept {
                eprintln!("pushdrop demo: kept the demo folder: {}", kept.display());
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("pushdrop demo: cannot write the output: {e}");
            if let Some(kept) = kept {
                eprintln!("pushdrop demo: kept the demo folder: {}", kept.display());
            }
            Ok(1)
        }
    }
}

/// What the tour does with the running daemon: drop the files the way a dropper would, and
/// wait until everything due is final.
async fn tour(
    cfg: &Config,
    root: &Path,
    files: &[(String, String)],
    stop: &Interrupt,
) -> anyhow::Result<()> {
    // Devices first (a dropper registers before it broadcasts), then the rest.
    let inbox = cfg.inbox.dir.clone();
    let staging = root.join("staging");
    let (devices, rest): (Vec<_>, Vec<_>) = files.iter().partition(|(n, _)| n.contains("devices"));
    for (name, text) in &devices {
        drop_file(&staging, &inbox, name, text)?;
    }
    wait_for(stop, Duration::from_secs(30), || inbox_empty(&inbox)).await?;
    for (name, text) in &rest {
        drop_file(&staging, &inbox, name, text)?;
    }
    wait_for(stop, Duration::from_secs(30), || inbox_empty(&inbox)).await?;
    let db = cfg.store.path.clone();
    wait_for(stop, Duration::from_secs(60), || nothing_due(&db)).await?;
    // Receipts are written just after the last result; give them a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// SIGINT, SIGTERM or SIGHUP during the tour: noted here, acted on by the tour's waits. A
/// second, other signal ends the process at once, removing the demo folder first unless kept.
struct Interrupt {
    /// The first signal, with the exit code it stands for.
    got: Arc<std::sync::OnceLock<(&'static str, i32)>>,
    /// The folder a second signal removes before it ends the process.
    folder: Arc<std::sync::Mutex<Option<PathBuf>>>,
}

impl Interrupt {
    fn install() -> anyhow::Result<Interrupt> {
        use tokio::signal::unix::{SignalKind, signal};
        let got: Arc<std::sync::OnceLock<(&'static str, i32)>> = Arc::default();
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        // A closed terminal (an SSH session gone) too.
        let mut hup = signal(SignalKind::hangup())?;
        let noted = got.clone();
        let folder: Arc<std::sync::Mutex<Option<PathBuf>>> = Arc::default();
        let to_remove = folder.clone();
        tokio::spawn(async move {
            let mut first: Option<(&'static str, Instant)> = None;
            loop {
                let (name, code) = tokio::select! {
                    _ = int.recv() => ("SIGINT", 130),
                    _ = term.recv() => ("SIGTERM", 143),
                    _ = hup.recv() => ("SIGHUP", 129),
                };
                match first {
                    None => {
                        first = Some((name, Instant::now()));
                        let _ = noted.set((name, code));
                    }
                    // The same signal again at once is one stop sent twice (`timeout`
                    // signals its child, then the child's process group).
                    Some((n, at))
                        if n == name && at.elapsed() < crate::daemon::SAME_SIGNAL_WINDOW => {}
                    // A second: at once, as a signal would have, but not leaving the
                    // folder (its keys and database) behind.
                    Some(_) => {
                        let dir = to_remove.lock().unwrap_or_else(|p| p.into_inner()).take();
                        if let Some(dir) = dir {
                            let _ = std::fs::remove_dir_all(&dir);
                        }
                        eprintln!("pushdrop demo: stopped at once by {name}");
                        std::process::exit(code);
                    }
                }
            }
        });
        Ok(Interrupt { got, folder })
    }

    /// The folder a second signal removes before it ends the process.
    fn remove_at_exit(&self, dir: Option<PathBuf>) {
        *self.folder.lock().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    /// The signal that came, with the exit code it stands for.
    fn signal(&self) -> Option<(&'static str, i32)> {
        self.got.get().copied()
    }
}

fn inbox_empty(inbox: &Path) -> bool {
    std::fs::read_dir(inbox).is_ok_and(|rd| {
        rd.filter_map(Result::ok)
            .all(|e| e.file_type().is_ok_and(|t| t.is_dir()))
    })
}

/// True when every delivery that is due is final (scheduled notifications may wait).
fn nothing_due(db: &Path) -> bool {
    let Ok(r) = Reader::open(db) else {
        return false;
    };
    let now = now_ms();
    let q: rusqlite::Result<(i64, i64)> = r.conn().query_row(
        "SELECT (SELECT count(*) FROM deliveries WHERE state = 0),
                (SELECT count(*) FROM notifications WHERE fanned_out = 0 AND send_at <= ?1)",
        [now],
        |row| Ok((row.get(0)?, row.get(1)?)),
    );
    matches!(q, Ok((0, 0)))
}

async fn wait_for(
    stop: &Interrupt,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if let Some((name, _)) = stop.signal() {
            bail!("interrupted by {name}");
        }
        if Instant::now() > deadline {
            bail!("the demo did not settle within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The tour's table, as text: written out at once at the end, so that a closed pipe
/// (`pushdrop demo | head`) costs nothing but the output.
fn report(
    cfg: &Config,
    files: &Examples,
    scripted: &[(String, String)],
    sim: &Simulator,
    started: Instant,
) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing into a String cannot fail.
    macro_rules! say {
        ($($t:tt)*) => {
            let _ = writeln!(out, $($t)*);
        };
    }
    let r = Reader::open(&cfg.store.path)?;
    let c = r.conn();
    say!(
        "pushdrop demo: the real daemon, files, SQLite and HTTP/2 over TLS to the built-in APNs simulator"
    );
    say!(
        "(the files of {}; written an hour ago, as far as their mtimes tell, so that the devices registered before the 410 scripted below)\n",
        files.source
    );

    say!("FILES DROPPED ({})", files.files.len());
    let processed = list(cfg.processed_dir());
    let rejected = list(cfg.rejected_dir());
    for (name, _) in &files.files {
        if processed.iter().any(|p| p == name) {
            say!("  {name:<22} accepted -> processed/");
        } else if rejected.iter().any(|p| p == name) {
            let report =
                std::fs::read_to_string(cfg.rejected_dir().join(format!("{name}.error.json")))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            let problems = report
                .as_ref()
                .and_then(|v| v["problems"].as_array().cloned())
                .unwrap_or_default();
            say!("  {name:<22} REJECTED -> rejected/{name}.error.json");
            for p in problems.iter().take(4) {
                say!(
                    "      record {} {}{}: {}",
                    p["record"],
                    p["line"]
                        .as_u64()
                        .map(|l| format!("line {l} "))
                        .unwrap_or_default(),
                    p["field"].as_str().unwrap_or(""),
                    p["message"].as_str().unwrap_or("")
                );
            }
        } else {
            say!("  {name:<22} ?");
        }
    }

    say!("\nNOTIFICATIONS");
    say!(
        "  {:<26} {:<8} {:<12} {:>6} {:>6} {:>8} {:>8} {:>8}",
        "id",
        "target",
        "push type",
        "queued",
        "sent",
        "failed",
        "expired",
        "invalid"
    );
    let mut st = c.prepare(
        "SELECT n.ext_id, n.target_kind, n.push_type, n.send_at,
                sum(d.state = 0), sum(d.state = 1), sum(d.state = 2), sum(d.state = 3), sum(d.state = 4)
         FROM notifications n LEFT JOIN deliveries d ON d.notification_id = n.id
         GROUP BY n.id ORDER BY n.id",
    )?;
    let rows = st.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, i64>(3)?,
            [
                row.get::<_, Option<i64>>(4)?.unwrap_or(0),
                row.get::<_, Option<i64>>(5)?.unwrap_or(0),
                row.get::<_, Option<i64>>(6)?.unwrap_or(0),
                row.get::<_, Option<i64>>(7)?.unwrap_or(0),
                row.get::<_, Option<i64>>(8)?.unwrap_or(0),
            ],
        ))
    })?;
    for row in rows {
        let (id, kind, push_type, send_at, n) = row?;
        let scheduled = if send_at > now_ms() {
            format!(
                "  (scheduled for {})",
                crate::store::query::rfc3339_ms(send_at)
            )
        } else {
            String::new()
        };
        say!(
            "  {id:<26} {kind:<8} {push_type:<12} {:>6} {:>6} {:>8} {:>8} {:>8}{scheduled}",
            n[0],
            n[1],
            n[2],
            n[3],
            n[4]
        );
    }

    let totals = r.status()?.totals;
    say!(
        "\nDELIVERIES  sent {}, invalid_token {}, failed {}, expired {}, queued {}",
        totals["sent"],
        totals["invalid_token"],
        totals["failed"],
        totals["expired"],
        totals["queued"]
    );

    say!("\nSCRIPTED DEVICES (what the simulator was told to answer)");
    for (t, what) in scripted {
        say!("  {}…  {what}", token_prefix(t));
    }

    say!("\nRETRIED (delivered after more than one attempt)");
    let mut st = c.prepare(
        "SELECT v.token, d.attempts, d.state, coalesce(d.last_reason, '') FROM deliveries d
         JOIN devices v ON v.id = d.device_id WHERE d.attempts > 1 ORDER BY d.id",
    )?;
    let mut any = false;
    for row in st.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, i64>(2)?,
            row.get::<_, String>(3)?,
        ))
    })? {
        let (t, attempts, state, reason) = row?;
        any = true;
        let state = crate::model::DeliveryState::from_code(state).map_or("?", |s| s.as_str());
        say!(
            "  {}…  {attempts} attempts, now {state}{}",
            token_prefix(&t),
            if reason.is_empty() {
                String::new()
            } else {
                format!(" (last: {reason})")
            }
        );
    }
    if !any {
        say!("  none");
    }

    say!("\nINVALIDATED DEVICES");
    let invalid = r.devices(&crate::store::query::DeviceQuery {
        invalid_only: true,
        limit: 100,
        ..Default::default()
    })?;
    if invalid.is_empty() {
        say!("  none");
    }
    for d in &invalid {
        say!(
            "  {}…  {} since {} ({})",
            token_prefix(&d.token),
            d.app,
            d.invalidated_at.as_deref().unwrap_or("?"),
            d.invalid_reason.as_deref().unwrap_or("?")
        );
    }

    say!(
        "\nSIMULATOR  {} requests over {} HTTP/2 connection(s), {} accepted with 200",
        sim.requests(),
        sim.connections(),
        sim.accepted_count()
    );

    say!("\nRECEIPTS");
    if let Some(dir) = &cfg.receipts.dir {
        let mut receipts = list(dir);
        receipts.sort();
        for name in receipts {
            say!("  {}", dir.join(name).display());
        }
    }
    say!("\nelapsed {:.2} s", started.elapsed().as_secs_f64());
    Ok(out)
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
