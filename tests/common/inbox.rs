//! A temp directory with a config, an inbox and a database, plus helpers to drop files and
//! wait for the daemon to take them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pushdrop::config::Config;
use pushdrop::daemon::Daemon;

/// The one app of test configs (the app of `inbox-example/`).
pub const APP: &str = "buxheti";
pub const BUNDLE: &str = "info.buxheti.shkoder";

/// Knobs of a test config.
#[derive(Clone)]
pub struct Options {
    pub settle_ms: u64,
    pub max_file_bytes: u64,
    pub poll: bool,
    /// With `poll`: how often the inbox is listed.
    pub poll_interval_ms: u64,
    pub scan_interval_s: u64,
    pub keep_processed: bool,
    /// Extra apps besides `buxheti`: (name, bundle id).
    pub extra_apps: Vec<(String, String)>,
    /// Where APNs is: a running simulator's URL, CA and signing key. Without it the config
    /// points at a loopback port where nothing listens (the inbox tests need no APNs).
    pub apns: Option<Apns>,
    /// Extra TOML appended to the config (`[sender]`, `[receipts]`, … sections).
    pub extra_toml: String,
}

/// A simulator's coordinates for the config.
#[derive(Clone)]
pub struct Apns {
    pub url: String,
    pub ca_file: PathBuf,
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            settle_ms: 300,
            max_file_bytes: 64 * 1024 * 1024,
            poll: false,
            poll_interval_ms: 100,
            scan_interval_s: 30,
            keep_processed: true,
            extra_apps: Vec::new(),
            apns: None,
            extra_toml: String::new(),
        }
    }
}

/// A temp directory laid out like a deployment: `config/pushdrop.toml`, `var/inbox`, ….
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub inbox: PathBuf,
    pub processed: PathBuf,
    pub rejected: PathBuf,
    pub db: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        Env::with(Options::default())
    }

    pub fn with(o: Options) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("config");
        std::fs::create_dir_all(&conf).unwrap();
        let key = conf.join("AuthKey_ABC123DEFG.p8");
        let (url, ca, key_file, key_id, team_id) = match &o.apns {
            Some(a) => (
                a.url.clone(),
                format!("ca_file = \"{}\"", a.ca_file.display()),
                a.key_file.display().to_string(),
                a.key_id.clone(),
                a.team_id.clone(),
            ),
            None => {
                // A real P-256 key, so the APNs client starts; nothing listens at port 9.
                let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .unwrap()
                    .serialize_pem();
                std::fs::write(&key, pem).unwrap();
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
                (
                    "https://127.0.0.1:9".to_string(),
                    String::new(),
                    "AuthKey_ABC123DEFG.p8".to_string(),
                    "ABC123DEFG".to_string(),
                    "DEF123GHIJ".to_string(),
                )
            }
        };
        let mut text = format!(
            r#"[inbox]
dir = "../var/inbox"
settle_ms = {settle}
max_file_bytes = {max}
watch = "{watch}"
poll_interval_ms = {poll_ms}
scan_interval_s = {scan}
keep_processed = {keep}

[store]
path = "../var/pushdrop.db"

[apns]
production_url = "{url}"
sandbox_url = "{url}"
{ca}

[[apps]]
name = "{APP}"
bundle_id = "{BUNDLE}"
environment = "production"
token = {{ key_file = "{key_file}", key_id = "{key_id}", team_id = "{team_id}" }}

[log]
level = "info"
format = "text"

[admin]
listen = ""
"#,
            settle = o.settle_ms,
            max = o.max_file_bytes,
            watch = if o.poll { "poll" } else { "events" },
            poll_ms = o.poll_interval_ms,
            scan = o.scan_interval_s,
            keep = o.keep_processed,
        );
        for (name, bundle) in &o.extra_apps {
            text.push_str(&format!(
                "\n[[apps]]\nname = \"{name}\"\nbundle_id = \"{bundle}\"\ntoken = {{ key_file = \"{key_file}\", key_id = \"{key_id}\", team_id = \"{team_id}\" }}\n"
            ));
        }
        text.push('\n');
        text.push_str(&o.extra_toml);
        let config_path = conf.join("pushdrop.toml");
        std::fs::write(&config_path, text).unwrap();
        let var = dir.path().join("var");
        let inbox = var.join("inbox");
        std::fs::create_dir_all(&inbox).unwrap();
        Env {
            processed: inbox.join("processed"),
            rejected: inbox.join("rejected"),
            db: var.join("pushdrop.db"),
            inbox,
            config_path,
            dir,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        load_config(&self.config_path)
    }

    /// Starts the daemon in-process.
    pub fn start(&self) -> Daemon {
        start_daemon(&self.config_path)
    }

    /// Drops a file the recommended way: written under a dot name, renamed in.
    pub fn drop_file(&self, name: &str, content: impl AsRef<[u8]>) {
        let tmp = self.inbox.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.inbox.join(name)).unwrap();
    }

    /// Entry names of a folder (sorted), without the subfolders processed/rejected.
    pub fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "processed" && n != "rejected")
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    pub fn inbox_names(&self) -> Vec<String> {
        Env::names(&self.inbox)
    }

    pub fn processed_names(&self) -> Vec<String> {
        Env::names(&self.processed)
    }

    /// Rejected files, without their reports.
    pub fn rejected_names(&self) -> Vec<String> {
        Env::names(&self.rejected)
            .into_iter()
            .filter(|n| !n.ends_with(".error.json"))
            .collect()
    }

    /// The `<name>.error.json` report of a rejected file.
    pub fn report(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.rejected.join(format!("{name}.error.json")))
            .unwrap_or_else(|e| panic!("report of {name}: {e}"));
        serde_json::from_str(&text).expect("report is JSON")
    }

    /// A read-only connection to the database.
    pub fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open db");
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    /// A connection that may write (the tests' own reads go through [`Env::db`]).
    pub fn db_rw(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.db).expect("open db");
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |r| r.get(0)).expect(sql)
    }

    /// The first column of `sql`'s rows, as text.
    pub fn texts(&self, sql: &str) -> Vec<String> {
        self.db()
            .prepare(sql)
            .expect(sql)
            .query_map([], |r| r.get(0))
            .expect(sql)
            .collect::<Result<_, _>>()
            .expect(sql)
    }

    /// Runs the binary with this config.
    pub fn pushdrop(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_pushdrop"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .expect("run pushdrop")
    }

    /// `pushdrop status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.pushdrop(&["status", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }
}

/// Polls `cond` until it holds; panics after 60 s (generous for a slow shared machine).
/// Loads a test config, which must draw no warning.
pub fn load_config(path: &Path) -> Arc<Config> {
    let (cfg, warnings) = Config::load(path).expect("test config loads");
    assert!(warnings.is_empty(), "{warnings:?}");
    Arc::new(cfg)
}

/// The daemon in-process, from a config file.
pub fn start_daemon(path: &Path) -> Daemon {
    Daemon::start(load_config(path)).expect("daemon starts")
}

pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A 32-byte device token as 64 hex digits, distinct per `n`.
pub fn token(n: u64) -> String {
    format!("{:016x}{:048x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15), n)
}

/// A device registration line.
pub fn device(n: u64, user: &str) -> String {
    format!(
        r#"{{"type":"device","app":"{APP}","token":"{}","user":"{user}"}}"#,
        token(n)
    )
}

/// A notification to one token; `id` may be empty for "assign one".
pub fn notification(id: &str, tok: &str) -> String {
    let id = if id.is_empty() {
        String::new()
    } else {
        format!(r#""id":"{id}","#)
    };
    format!(
        r#"{{"type":"notification",{id}"app":"{APP}","to":{{"tokens":["{tok}"]}},"payload":{{"aps":{{"alert":{{"title":"Hello","body":"World"}}}}}}}}"#
    )
}
