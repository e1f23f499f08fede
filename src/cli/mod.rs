//! The commands behind `pushdrop <command>`. Each returns the process exit code, or an error
//! that [`exit`] prints; a bad configuration always ends with exit code 64.

pub mod demo;
pub mod inbox_cmds;
pub mod run;
pub mod simulate;
pub mod store_cmds;

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, ConfigError, ConfigWarnings, EXIT_BAD_CONFIG};

/// Loads the config for a command; warnings go to stderr (the logger may not exist yet).
/// Key, certificate and CA files this user can read must hold what `run` needs: a bad one is
/// a bad config for every command (exit 64), not only for `run` and `check-config`.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    let (cfg, warnings) = Config::load_checked(path, |c| {
        (crate::apns::readable_credential_problems(c), Vec::new())
    })?;
    for w in warnings {
        eprintln!("warning: {}: {w}", path.display());
    }
    Ok(cfg)
}

/// For the commands that use no config (`demo`, `simulate`): one named all the same
/// (`--config`, `PUSHDROP_CONFIG`) must be a good one.
pub fn check_named_config(named: Option<&Path>) -> anyhow::Result<()> {
    match named {
        Some(path) => load_config(path).map(|_| ()),
        None => Ok(()),
    }
}

/// [`load_config`] for the commands that take or move drop files (`ingest`): inbox folders
/// that cannot be made are a bad config (exit 64).
pub fn load_config_for_files(path: &Path) -> anyhow::Result<Config> {
    let (cfg, warnings) = Config::load_checked(path, |c| {
        let mut problems = c.folder_problems();
        problems.extend(crate::apns::readable_credential_problems(c));
        (problems, Vec::new())
    })?;
    for w in warnings {
        eprintln!("warning: {}: {w}", path.display());
    }
    Ok(cfg)
}

/// Everything `run` and `check-config` check beyond [`load_config`]: inbox folders that
/// cannot be made, and key, certificate and CA files whose contents cannot be used.
fn run_problems(
    c: &Config,
) -> (
    Vec<crate::config::ConfigProblem>,
    crate::config::ConfigWarnings,
) {
    let mut problems = c.folder_problems();
    problems.extend(crate::apns::credential_problems(c));
    (problems, crate::apns::credential_warnings(c))
}

/// [`load_config`] for the command that sends (`run`): inbox folders and the contents of
/// key, certificate and CA files are checked too, so that one it cannot use is a bad config
/// (exit 64). The warnings are the daemon's to log, once its log is set up: an operator
/// reads the rotating files, not the terminal it was started from.
pub fn load_config_to_send(path: &Path) -> anyhow::Result<(Config, ConfigWarnings)> {
    Ok(Config::load_checked(path, run_problems)?)
}

/// For commands that only print what they read (`status`, `show`, `devices`, `validate`,
/// `check-config`): a closed pipe ends the process quietly, as it ends `cat` or `grep`
/// (`pushdrop show ID | head -3`), instead of a panic in the middle of printing. Rust
/// ignores SIGPIPE by default; the daemon and the commands that write keep it that way.
pub fn quiet_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal before any thread starts; no
    // handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Output that cannot be written (a full disk behind `> file`, a closed terminal) ends a
/// command with one line on stderr and exit 1, instead of a panic's message and exit 101.
/// `println!` panics on such errors; other panics keep the default report.
pub fn exit_1_when_output_fails() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            // stderr may be closed too (`2>&1 | grep -m1 …`): no second panic over it.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "pushdrop: cannot write the output: {why}"
            );
            // What the command did is logged (`requeued`, `purged`, …): those lines reach
            // the log file before the exit, which skips the guard that would write them.
            crate::logging::flush_files();
            std::process::exit(1);
        }
        default(info);
    }));
}

/// Text for a terminal: control characters (C0, DEL, C1, which a terminal may take for
/// commands: U+009B starts an escape sequence) written as `\u{..}`, so data from drop files
/// cannot move the cursor or recolour the screen.
pub(crate) fn safe(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Turns a command's result into the process exit code, printing the error if any.
pub fn exit(result: anyhow::Result<i32>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            if let Some(ce) = e.downcast_ref::<ConfigError>() {
                eprintln!("pushdrop: {ce}");
                return ExitCode::from(EXIT_BAD_CONFIG as u8);
            }
            eprintln!("pushdrop: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line, each said once: many errors name their cause in
/// their own message (`cannot open database X: <cause>`), and `{:#}` would then repeat it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if said.is_empty() || line.contains(&said) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&said);
    }
    line
}

/// `pushdrop check-config`: every problem with key and line; exit 64 if there is one. A key,
/// certificate or CA file whose contents `run` cannot use (a certificate and key that do not
/// match, a PKCS#12 password that does not open it) is an error here as it is for `run`: a
/// config check that passes what the daemon refuses would let a deploy step (systemd's
/// `ExecStartPre`) pass a daemon that cannot start.
pub fn check_config(path: &Path) -> anyhow::Result<i32> {
    match Config::load_checked(path, run_problems) {
        // Problems and warnings on stderr, as every command gives them; the verdict of a good
        // config on stdout.
        Ok((cfg, warnings)) => {
            for w in &warnings {
                eprintln!("warning: {}: {w}", path.display());
            }
            println!(
                "{}: ok ({} app{}, inbox {}, store {})",
                path.display(),
                cfg.apps.len(),
                if cfg.apps.len() == 1 { "" } else { "s" },
                cfg.inbox.dir.display(),
                cfg.store.path.display()
            );
            Ok(0)
        }
        Err(e) => {
            // Worded as every command words a bad config.
            eprintln!("pushdrop: {e}");
            Ok(EXIT_BAD_CONFIG)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_says_each_cause_once() {
        // StoreError::Unwritable names its cause in its message and also gives it as source().
        let store = crate::store::StoreError::Unwritable {
            path: "db/p.db".into(),
            source: std::io::Error::other("read-only file system"),
        };
        let e = anyhow::Error::new(store).context("cannot start");
        assert_eq!(e.chain().count(), 3);
        assert_eq!(
            super::error_chain(&e),
            "cannot start: database db/p.db is not writable: read-only file system"
        );
        let e = anyhow::Error::new(std::io::Error::other("no such file")).context("cannot open x");
        assert_eq!(super::error_chain(&e), "cannot open x: no such file");
    }
}
