//! `pushdrop simulate`: the APNs simulator as a server, for users' own integration tests.
//!
//! `--script FILE` scripts its answers per token and per connection (see
//! [`crate::simulator::SimScript`]); SIGHUP re-reads the file.
//!
//! For benchmarks (`scripts/bench-send`), `PUSHDROP_SIM_ARRIVALS=FILE` makes the simulator
//! append `<UNIX ns> <token> <apns-id>` per accepted push to FILE; unset, nothing is written.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use crate::simulator::{
    CONFIG_FILE, SimCredentials, SimOptions, SimScript, Simulator, toml_string,
};
/// The app of the written config.
pub const APP_NAME: &str = "simulated";
/// Its bundle id, and the one topic the simulated team may push to without `--bundle-id`.
pub const BUNDLE_ID: &str = "com.example.simulated";

/// A line of the banner on stdout. A server outlives its banner's reader: a harness that
/// closed its end of the pipe once it saw the first line (`| grep -m1 listening`) must not
/// stop it, so a line that cannot be written is dropped.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// Starts the simulator, writes credentials and a config into `dir`, serves until Ctrl-C or
/// SIGTERM. A bad `script` stops it before it listens, with exit code 64 (a bad config).
/// `bundle_ids`: the topics (bundle ids, before any push type's suffix) it accepts, as Apple
/// accepts a team's own apps only; empty means [`BUNDLE_ID`], `*` any.
pub fn simulate(
    addr: SocketAddr,
    dir: &Path,
    latency_ms: u64,
    script: Option<&Path>,
    bundle_ids: &[String],
) -> anyhow::Result<i32> {
    let sim_topics = match bundle_ids {
        [] => vec![BUNDLE_ID.to_string()],
        ids if ids.iter().any(|b| b == "*") => Vec::new(),
        ids => ids.to_vec(),
    };
    let config_bundle_id = sim_topics
        .first()
        .map_or(BUNDLE_ID, String::as_str)
        .to_owned();
    crate::logging::init_stderr("info");
    let latency = std::time::Duration::from_millis(latency_ms);
    let first_script = match script.map(SimScript::load) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!("pushdrop: {e}");
            return Ok(super::EXIT_BAD_CONFIG);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    runtime.block_on(async {
        let arrivals_file: Option<std::path::PathBuf> = std::env::var_os("PUSHDROP_SIM_ARRIVALS")
            .filter(|v| !v.is_empty())
            .map(Into::into);
        let arrivals = arrivals_file.clone();
        let sim = Simulator::start(SimOptions {
            kept_credentials: Some(dir.clone()),
            listen: addr,
            latency,
            // A long-running server must not grow: count accepted pushes, keep none.
            record_limit: 0,
            bundle_ids: sim_topics.clone(),
            arrivals_file,
            ..SimOptions::default()
        })
        .await
        .map_err(|e| match e {
            // The file the variable named: said with the variable.
            crate::simulator::SimError::Io { path, source } if Some(&path) == arrivals.as_ref() => {
                anyhow::anyhow!("PUSHDROP_SIM_ARRIVALS: cannot open {}: {source}", path.display())
            }
            e => e.into(),
        })?;
        if let Some(s) = &first_script {
            s.apply(&sim, latency);
        }
        let creds = sim
            .write_credentials(&dir)
            .with_context(|| format!("cannot write credentials into {}", dir.display()))?;
        let config = dir.join(CONFIG_FILE);
        crate::simulator::write_text_file(
            &config,
            &config_snippet(&sim.url(), &dir, &creds, &config_bundle_id),
        )
        .with_context(|| format!("cannot write {}", config.display()))?;
        // Said once its files are written: a harness that waits for this line reads them.
        tracing::info!(event = "sim_listening", addr = %sim.addr(), "APNs simulator listening");
        say!("APNs simulator listening on {}", sim.url());
        if sim.credentials_reused() {
            say!(
                "  credentials:         kept from an earlier start in {} (delete them for new ones)",
                dir.display()
            );
        } else if let Some(why) = sim.credentials_not_kept() {
            // On one line, as the header's others (a TOML error spans two).
            let why = why.lines().map(str::trim).collect::<Vec<_>>().join("; ");
            say!(
                "  credentials:         made anew in {} (the earlier ones could not be used: {why})",
                dir.display()
            );
        } else {
            say!("  credentials:         made anew in {}", dir.display());
        }
        say!("  CA certificate:      {}", creds.ca_file.display());
        say!(
            "  token key:           {} (key_id {}, team_id {})",
            creds.key_file.display(),
            creds.key_id,
            creds.team_id
        );
        say!(
            "  client certificate:  {} (key {})",
            creds.client_cert_file.display(),
            creds.client_key_file.display()
        );
        if sim_topics.is_empty() {
            say!("  topics:              any (--bundle-id '*')");
        } else {
            say!(
                "  topics:              {} (other bundle ids: 400 TopicDisallowed; --bundle-id names yours)",
                sim_topics.join(", ")
            );
        }
        say!("  config:              {}", config.display());
        say!(
            "Copy its [apns] and [[apps]] sections into your config, or run pushdrop with --config {}",
            config.display()
        );
        if let (Some(p), Some(s)) = (script, &first_script) {
            let n = s.tokens.len();
            say!(
                "  script:              {} ({n} token{}; SIGHUP re-reads it)",
                p.display(),
                if n == 1 { "" } else { "s" }
            );
        }
        say!("Ctrl-C stops.");
        serve_until_stop(&sim, script, latency).await;
        say!(
            "served {} requests on {} connections; {} accepted",
            sim.requests(),
            sim.connections(),
            sim.accepted_count()
        );
        sim.shutdown().await;
        Ok::<_, anyhow::Error>(0)
    })
}

/// Waits for Ctrl-C or SIGTERM; meanwhile each SIGHUP re-reads the script (a bad one is
/// logged and the running script kept, so a harness's typo does not stop the server).
async fn serve_until_stop(sim: &Simulator, script: Option<&Path>, latency: std::time::Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            Some(()) = async { term.as_mut()?.recv().await } => return,
            Some(()) = async { hup.as_mut()?.recv().await } => {
                let Some(path) = script else {
                    tracing::warn!(event = "sim_sighup", "SIGHUP: no --script to re-read");
                    continue;
                };
                match SimScript::load(path) {
                    Ok(s) => {
                        s.apply(sim, latency);
                        tracing::info!(
                            event = "sim_script_reloaded",
                            script = %path.display(),
                            tokens = s.tokens.len(),
                            "simulator script re-read"
                        );
                    }
                    // On one line: a log line is one line.
                    Err(e) => tracing::error!(event = "sim_script_refused", "{}; the previous script stays in force", e.to_string().replacen(":\n  ", ": ", 1).replace("\n  ", "; ")),
                }
            }
        }
    }
}

/// A complete, valid config for the simulator: usable as is, or as a source of the
/// `[apns]` and `[[apps]]` sections.
pub fn config_snippet(url: &str, dir: &Path, creds: &SimCredentials, bundle_id: &str) -> String {
    let q = |p: &Path| toml_string(&p.display().to_string());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by `pushdrop simulate`: settings for its APNs simulator."
    );
    let _ = writeln!(
        s,
        "# Copy [apns] and [[apps]] into your config, or use this file as is."
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "[inbox]");
    let _ = writeln!(s, "dir = {}", q(&dir.join("inbox")));
    let _ = writeln!(s);
    let _ = writeln!(s, "[store]");
    let _ = writeln!(s, "path = {}", q(&dir.join("pushdrop.db")));
    let _ = writeln!(s);
    s.push_str(&creds.config_sections(url, APP_NAME, bundle_id));
    let _ = writeln!(s);
    let _ = writeln!(s, "[admin]");
    let _ = writeln!(s, "listen = \"\"");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn written_config_is_valid_and_points_at_the_simulator() {
        let sim = Simulator::start(SimOptions::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let creds = sim.write_credentials(dir.path()).unwrap();
        let text = config_snippet(&sim.url(), dir.path(), &creds, BUNDLE_ID);
        let (cfg, warnings) =
            crate::config::Config::from_toml(&text, &dir.path().join(CONFIG_FILE), dir.path())
                .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.apns.production_url, sim.url());
        assert_eq!(cfg.apps[0].name, APP_NAME);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&creds.key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
