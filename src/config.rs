//! The configuration file: TOML read with serde, checked once, then handed around as a typed,
//! validated [`Config`] whose paths are all absolute (resolved against the config file's folder).
//!
//! Every error names the key and, where the file has it, the line, because an operator fixing a
//! config at 3 a.m. should not have to guess which of two `key_file`s is wrong.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The exit code of every command when the configuration is bad (spec: 64).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where droppers put files.
    pub inbox: InboxConfig,
    /// The SQLite database.
    #[serde(default)]
    pub store: StoreConfig,
    /// How to reach Apple (or the simulator).
    #[serde(default)]
    pub apns: ApnsConfig,
    /// The apps pushdrop sends for; at least one.
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// The delivery loop.
    #[serde(default)]
    pub sender: SenderConfig,
    /// Per-notification receipt files for droppers.
    #[serde(default)]
    pub receipts: ReceiptsConfig,
    /// Rotating log files.
    #[serde(default)]
    pub log: LogConfig,
    /// The loopback HTTP endpoint for probes, status and metrics.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The folder of the config file; relative paths were resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself, for messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[inbox]`: the drop directory and what happens to files after they are read.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboxConfig {
    /// The inbox directory droppers rename their files into.
    pub dir: PathBuf,
    /// Where accepted files go. Default `<dir>/processed`.
    #[serde(default)]
    pub processed_dir: Option<PathBuf>,
    /// Where rejected files and their `<name>.error.json` reports go. Default `<dir>/rejected`.
    #[serde(default)]
    pub rejected_dir: Option<PathBuf>,
    /// Keep accepted files in `processed_dir` (true) or delete them once committed (false).
    #[serde(default = "default_true")]
    pub keep_processed: bool,
    /// Processed files older than this many days are removed.
    #[serde(default = "default_keep_processed_days")]
    pub keep_processed_days: u32,
    /// Files larger than this are rejected without being parsed.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// A file written in place is taken once its size and mtime have been stable this long.
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// `"events"` (inotify and friends, the default) or `"poll"` (NFS, some bind mounts).
    #[serde(default)]
    pub watch: WatchMode,
    /// Full rescan of the inbox as a safety net, in seconds.
    #[serde(default = "default_scan_interval_s")]
    pub scan_interval_s: u64,
    /// In `watch = "poll"` mode: how often the directory is listed, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

/// How the inbox learns about new files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// Kernel events as hints, plus periodic rescans.
    #[default]
    Events,
    /// Directory listing every `poll_interval_ms`.
    Poll,
}

/// `[store]`: the SQLite database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The database file. Default `pushdrop.db` beside the config file.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// Finished deliveries, finished notifications and invalid devices older than this many
    /// days are purged (automatically once an hour, or by `pushdrop purge`).
    #[serde(default = "default_keep_finished_days")]
    pub keep_finished_days: u32,
}

impl StoreConfig {
    /// `keep_finished_days` in milliseconds (see [`Config::keep_finished_ms`], which the
    /// purges go by).
    pub fn keep_finished_ms(&self) -> i64 {
        i64::from(self.keep_finished_days) * 86_400_000
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: default_store_path(),
            keep_finished_days: default_keep_finished_days(),
        }
    }
}

/// `[apns]`: where Apple is and how to talk to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// Base URL for production devices.
    #[serde(default = "default_production_url")]
    pub production_url: String,
    /// Base URL for sandbox (development) devices.
    #[serde(default = "default_sandbox_url")]
    pub sandbox_url: String,
    /// Extra PEM CA certificate(s) to trust beside the built-in roots; empty for none.
    #[serde(default, deserialize_with = "empty_path_is_none")]
    pub ca_file: Option<PathBuf>,
    /// `http://host:port` of an HTTP CONNECT proxy; empty for a direct connection.
    #[serde(default)]
    pub proxy: String,
    /// HTTP/2 connections per app and environment.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// A request without an answer after this long counts as failed (and is retried).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Giving up on a TCP+TLS handshake after this long.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// An idle connection is probed with an HTTP/2 PING this often, in seconds.
    #[serde(default = "default_ping_interval_s")]
    pub ping_interval_s: u64,
}

impl Default for ApnsConfig {
    fn default() -> Self {
        ApnsConfig {
            production_url: default_production_url(),
            sandbox_url: default_sandbox_url(),
            ca_file: None,
            proxy: String::new(),
            connections: default_connections(),
            request_timeout_ms: default_request_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            ping_interval_s: default_ping_interval_s(),
        }
    }
}

/// `[[apps]]`: one iOS/macOS app.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The name drop files use in `"app"`.
    pub name: String,
    /// The app's bundle id; the base of `apns-topic`.
    pub bundle_id: String,
    /// The environment of devices that register without one.
    #[serde(default)]
    pub environment: Environment,
    /// Token (JWT) authentication with a `.p8` key.
    #[serde(default)]
    pub token: Option<TokenAuthConfig>,
    /// Certificate authentication with a TLS client certificate.
    #[serde(default)]
    pub certificate: Option<CertificateAuthConfig>,
}

impl AppConfig {
    /// The one way this app authenticates (validation guarantees exactly one).
    pub fn auth(&self) -> AppAuth<'_> {
        match (&self.token, &self.certificate) {
            (Some(t), _) => AppAuth::Token(t),
            (None, Some(c)) => AppAuth::Certificate(c),
            (None, None) => unreachable!("validated: every app has token or certificate auth"),
        }
    }
}

/// The authentication method of an app.
#[derive(Debug, Clone, Copy)]
pub enum AppAuth<'a> {
    /// ES256 provider tokens.
    Token(&'a TokenAuthConfig),
    /// A TLS client certificate.
    Certificate(&'a CertificateAuthConfig),
}

/// `token = { key_file, key_id, team_id }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct TokenAuthConfig {
    /// The `.p8` file (PKCS#8 PEM, EC P-256) downloaded from Apple.
    pub key_file: PathBuf,
    /// The 10-character key id (`kid`).
    pub key_id: String,
    /// The 10-character team id (`iss`).
    pub team_id: String,
}

/// `certificate = { cert_file, key_file }`, or a PKCS#12 bundle:
/// `certificate = { cert_file = "push.p12", password_file = "push.pass" }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct CertificateAuthConfig {
    /// PEM certificate (chain), or a PKCS#12 file (`.p12`/`.pfx`) holding certificate and key.
    pub cert_file: PathBuf,
    /// PEM private key; may be omitted when `cert_file` holds the key too.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// File whose first line is the PKCS#12 password; without it the password is empty.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// APNs environment of a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// `api.push.apple.com`.
    #[default]
    Production,
    /// `api.sandbox.push.apple.com`.
    Sandbox,
}

impl Environment {
    /// The name used in files, the database and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Sandbox => "sandbox",
        }
    }

    /// Parses the database/file form.
    pub fn parse(s: &str) -> Option<Environment> {
        match s {
            "production" => Some(Environment::Production),
            "sandbox" => Some(Environment::Sandbox),
            _ => None,
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[sender]`: the delivery loop.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    /// Concurrent requests to APNs, all connections together.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// A delivery that fails this many times (retryable failures) ends as `failed`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubled each attempt, with jitter.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Upper bound of the retry delay.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// No longer used: claims live in the daemon's memory. Still accepted, with a warning, so
    /// that configs written for earlier versions keep loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// `BadDeviceToken` answers for this many distinct devices of one app and environment
    /// within a minute, at least a tenth of its answers, pause that app and environment
    /// instead of invalidating the devices.
    #[serde(default = "default_bad_token_burst")]
    pub bad_token_burst: u32,
}

/// `[receipts]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptsConfig {
    /// When set, `<dir>/<id>.json` is written once a notification's deliveries are all final.
    #[serde(default, deserialize_with = "empty_path_is_none")]
    pub dir: Option<PathBuf>,
    /// Receipts list sent tokens only when there are at most this many.
    #[serde(default = "default_receipt_sent_tokens")]
    pub max_sent_tokens: usize,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Folder of the rotating log files; empty for stdout only.
    #[serde(default, deserialize_with = "empty_path_is_none")]
    pub dir: Option<PathBuf>,
    /// `hourly`, `daily` or `never`.
    #[serde(default)]
    pub rotation: Rotation,
    /// Rotated files kept.
    #[serde(default = "default_keep_files")]
    pub keep_files: usize,
    /// Format of the files: `json` or `text` (stdout is always text).
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `pushdrop=debug`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

/// Log file rotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// A new file every hour.
    Hourly,
    /// A new file every day.
    #[default]
    Daily,
    /// One file forever (rotate it with logrotate's copytruncate if you must).
    Never,
}

/// Log file format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port` of the admin endpoint; empty disables it.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            max_in_flight: default_max_in_flight(),
            max_attempts: default_max_attempts(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            lease_ms: None,
            shutdown_grace_ms: default_shutdown_grace_ms(),
            bad_token_burst: default_bad_token_burst(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            dir: None,
            rotation: Rotation::default(),
            keep_files: default_keep_files(),
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_keep_processed_days() -> u32 {
    7
}
fn default_max_file_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_settle_ms() -> u64 {
    1000
}
fn default_scan_interval_s() -> u64 {
    30
}
fn default_poll_interval_ms() -> u64 {
    500
}
fn default_store_path() -> PathBuf {
    PathBuf::from("pushdrop.db")
}
fn default_keep_finished_days() -> u32 {
    7
}
fn default_production_url() -> String {
    "https://api.push.apple.com".into()
}
fn default_sandbox_url() -> String {
    "https://api.sandbox.push.apple.com".into()
}
fn default_connections() -> usize {
    1
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_ping_interval_s() -> u64 {
    60
}
fn default_max_in_flight() -> usize {
    1000
}
fn default_max_attempts() -> u32 {
    8
}
fn default_retry_initial_ms() -> u64 {
    1000
}
fn default_retry_max_ms() -> u64 {
    600_000
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_bad_token_burst() -> u32 {
    20
}
fn default_receipt_sent_tokens() -> usize {
    100
}
fn default_keep_files() -> usize {
    14
}
fn default_log_level() -> String {
    "info".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9464".into()
}

fn empty_path_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()).map(PathBuf::from))
}

/// One problem in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path such as `apps[0].token.key_file`.
    pub key: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong, in plain words.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One problem, one line: the TOML parser's messages can run over two ("invalid table
        // header" and what it expected), which would read as a problem without a line.
        let message = self
            .message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {message}", self.key),
            None => write!(f, "{}: {message}", self.key),
        }
    }
}

/// A config that could not be loaded; carries every problem found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// Every problem, in file order where lines are known.
    pub problems: Vec<ConfigProblem>,
    /// What would have been warned about had the config loaded: said beside the problems,
    /// so that fixing them does not bring a second round of news.
    pub warnings: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad config {}:", self.path.display())?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        for w in &self.warnings {
            write!(f, "\n  warning: {w}")?;
        }
        Ok(())
    }
}

/// Non-fatal findings, such as a key file readable by others.
pub type ConfigWarnings = Vec<ConfigProblem>;

/// With receipts on, a finished notification is kept at least this long, whatever
/// `keep_finished_days`: its receipt is written from it, and may still be on its way (its
/// folder unusable for a while, or a crash between the finish and the receipt that the next
/// start makes good). A purge in between would lose the receipt for good.
pub const RECEIPT_GRACE_MS: i64 = 3_600_000;

impl Config {
    /// How long finished work is kept: `keep_finished_days`, but never less than
    /// [`RECEIPT_GRACE_MS`] with receipts on. The purges' horizon (the daemon's and
    /// `pushdrop purge`'s), and how far back the start-up receipt sweep looks.
    pub fn keep_finished_ms(&self) -> i64 {
        let days = self.store.keep_finished_ms();
        if self.receipts.dir.is_some() {
            days.max(RECEIPT_GRACE_MS)
        } else {
            days
        }
    }

    /// Reads, parses and validates the config file; relative paths become absolute against the
    /// file's folder. Returns warnings beside the config (world-readable keys and the like).
    pub fn load(path: &Path) -> Result<(Config, ConfigWarnings), ConfigError> {
        Config::load_checked(path, |_| (Vec::new(), Vec::new()))
    }

    /// [`Config::load`], with more checks by `extra` on the loaded config (the contents of key
    /// and certificate files are checked this way). `extra` returns problems and warnings,
    /// named by key and line like the config's own.
    pub fn load_checked(
        path: &Path,
        extra: impl FnOnce(&Config) -> (Vec<ConfigProblem>, ConfigWarnings),
    ) -> Result<(Config, ConfigWarnings), ConfigError> {
        let fail = |key: &str, message: String| ConfigError {
            path: path.to_path_buf(),
            problems: vec![ConfigProblem {
                key: key.into(),
                line: None,
                message,
            }],
            warnings: Vec::new(),
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail("(file)", format!("cannot read {}: {e}", path.display())))?;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = abs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::from_toml_checked(&text, &abs, &base, extra)
    }

    /// Parses and validates config text as if it were the file `source` in folder `base_dir`.
    pub fn from_toml(
        text: &str,
        source: &Path,
        base_dir: &Path,
    ) -> Result<(Config, ConfigWarnings), ConfigError> {
        Config::from_toml_checked(text, source, base_dir, |_| (Vec::new(), Vec::new()))
    }

    fn from_toml_checked(
        text: &str,
        source: &Path,
        base_dir: &Path,
        extra: impl FnOnce(&Config) -> (Vec<ConfigProblem>, ConfigWarnings),
    ) -> Result<(Config, ConfigWarnings), ConfigError> {
        // Tables given as arrays are refused before serde reads them by position.
        let (blanked, positional) = positional_tables(text);
        let text = blanked.as_deref().unwrap_or(text);
        // The repaired text, where the file itself is not TOML, to locate value problems in.
        let mut repaired_text = None;
        let (mut cfg, mut problems, mut touched) = match toml::from_str::<Config>(text) {
            Ok(c) => (c, Vec::new(), None),
            Err(_) => {
                let found = serde_problems(text);
                let Some(repaired) = found.repaired else {
                    return Err(ConfigError {
                        path: source.to_path_buf(),
                        problems: found.problems,
                        warnings: Vec::new(),
                    });
                };
                repaired_text = Some((found.text, found.lines));
                (repaired, found.problems, Some(found.touched))
            }
        };
        if !positional.is_empty() {
            // What their absence makes serde and the value checks say is no news.
            let keys: Vec<String> = positional.iter().map(|p| p.key.clone()).collect();
            problems.retain(|p| !keys.iter().any(|k| within_key(&p.key, k)));
            touched.get_or_insert_with(Vec::new).extend(keys);
            problems.extend(positional);
        }
        cfg.base_dir = base_dir.to_path_buf();
        cfg.source = source.to_path_buf();
        let mut checked = Vec::new();
        let mut warnings = Vec::new();
        cfg.resolve_and_check(&mut checked, &mut warnings);
        let (more_problems, more_warnings) = extra(&cfg);
        checked.extend(more_problems);
        warnings.extend(more_warnings);
        match &touched {
            // Checked on a repaired text: what the repairs touched says nothing.
            Some(touched) => {
                let untouched = |p: &ConfigProblem| !touched.iter().any(|k| within_key(&p.key, k));
                problems.extend(checked.into_iter().filter(untouched));
                warnings.retain(untouched);
            }
            None => problems = checked,
        }
        let doc = toml_edit::ImDocument::parse(text).ok();
        // A file that is not TOML (a syntax error, repaired): its keys are found in the
        // repaired text, whose lines map back to the file's.
        let repaired_doc = repaired_text
            .as_ref()
            .filter(|_| doc.is_none())
            .and_then(|(t, map)| Some((t, map, toml_edit::ImDocument::parse(t.as_str()).ok()?)));
        let locate = |mut p: ConfigProblem| {
            if p.line.is_none() {
                p.line = match (&doc, &repaired_doc) {
                    (Some(d), _) => line_of_key(text, d, &p.key),
                    (None, Some((t, map, d))) => {
                        line_of_key(t, d, &p.key).and_then(|l| map.get(l - 1).copied().flatten())
                    }
                    (None, None) => None,
                };
            }
            p
        };
        let mut problems: Vec<_> = problems.into_iter().map(locate).collect();
        let warnings: Vec<_> = warnings.into_iter().map(locate).collect();
        if problems.is_empty() {
            Ok((cfg, warnings))
        } else {
            problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
            Err(ConfigError {
                path: source.to_path_buf(),
                problems,
                warnings,
            })
        }
    }

    fn resolve_and_check(
        &mut self,
        problems: &mut Vec<ConfigProblem>,
        warnings: &mut Vec<ConfigProblem>,
    ) {
        let base = self.base_dir.clone();
        let abs = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                normalize(p)
            } else {
                normalize(&base.join(p))
            }
        };
        let mut bad = |key: &str, message: String| {
            problems.push(ConfigProblem {
                key: key.into(),
                line: None,
                message,
            })
        };

        // [inbox]
        if self.inbox.dir.as_os_str().is_empty() {
            bad("inbox.dir", "must name a directory".into());
        }
        self.inbox.dir = abs(&self.inbox.dir);
        let processed = self
            .inbox
            .processed_dir
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
            .map(&abs)
            .unwrap_or_else(|| self.inbox.dir.join("processed"));
        let rejected = self
            .inbox
            .rejected_dir
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
            .map(&abs)
            .unwrap_or_else(|| self.inbox.dir.join("rejected"));
        for (key, dir) in [
            ("inbox.processed_dir", &processed),
            ("inbox.rejected_dir", &rejected),
        ] {
            if same_folder(dir, &self.inbox.dir) {
                bad(key, "must not be the inbox folder itself".into());
            }
        }
        if same_folder(&processed, &rejected) {
            bad(
                "inbox.rejected_dir",
                "must differ from processed_dir".into(),
            );
        }
        self.inbox.processed_dir = Some(processed);
        self.inbox.rejected_dir = Some(rejected);
        if self.inbox.max_file_bytes == 0 {
            bad("inbox.max_file_bytes", "must be at least 1".into());
        }
        if self.inbox.scan_interval_s == 0 {
            bad("inbox.scan_interval_s", "must be at least 1".into());
        }
        if self.inbox.poll_interval_ms == 0 {
            bad("inbox.poll_interval_ms", "must be at least 1".into());
        }

        // [store]
        if self.store.path.as_os_str().is_empty() {
            bad("store.path", "must name a file".into());
        }
        self.store.path = abs(&self.store.path);
        // Every command opens the store: a folder there would fail each one later, with
        // SQLite's "unable to open database file" instead of the key at fault.
        if self.store.path.is_dir() {
            bad(
                "store.path",
                format!(
                    "{} is a folder: name the database file (e.g. {})",
                    self.store.path.display(),
                    self.store.path.join("pushdrop.db").display()
                ),
            );
        } else if self.store.path.exists() && !self.store.path.is_file() {
            // A FIFO would hang the commands that read it.
            bad(
                "store.path",
                format!("{} is not a regular file", self.store.path.display()),
            );
        } else if let Some(b) = self
            .store
            .path
            .parent()
            .and_then(crate::inbox::fsutil::in_the_way)
        {
            bad(
                "store.path",
                format!(
                    "its folder cannot be made: {} exists and is not a folder",
                    b.path.display()
                ),
            );
        }

        // [apns]
        for (key, url) in [
            ("apns.production_url", &self.apns.production_url),
            ("apns.sandbox_url", &self.apns.sandbox_url),
        ] {
            // APNs takes no credentials, path or query in its URL: they would be a secret in
            // the config (as for the proxy), or a mistake silently dropped.
            if let Some(why) = url_problem(
                url,
                "https",
                false,
                "credentials (user:password@): APNs takes none in its URL",
            ) {
                bad(key, why);
            }
        }
        if !self.apns.proxy.is_empty() {
            // Credentials in the URL would be a secret written into the config (secrets are
            // referred to by path), and pushdrop sends none to the proxy: refused rather than
            // silently left out of every CONNECT.
            if let Some(why) = url_problem(
                &self.apns.proxy,
                "http",
                true,
                "credentials (user:password@): pushdrop keeps no secret in its config and sends no proxy credentials; let the proxy admit this host by its address",
            ) {
                bad("apns.proxy", why);
            }
        }
        if let Some(ca) = &self.apns.ca_file {
            let ca = abs(ca);
            if looks_inlined(&ca) {
                bad(
                    "apns.ca_file",
                    "holds a certificate or key itself, not a path: give the path of a PEM file"
                        .into(),
                );
            } else if ca.is_dir() {
                bad(
                    "apns.ca_file",
                    format!("{} is a folder, not a PEM file", ca.display()),
                );
            } else if ca.exists() && !ca.is_file() {
                bad(
                    "apns.ca_file",
                    format!("{} is not a regular file (a PEM file)", ca.display()),
                );
            } else if let Err(e) = std::fs::metadata(&ca) {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    warnings.push(out_of_sight("apns.ca_file", &ca, &e));
                } else {
                    bad("apns.ca_file", format!("{} does not exist", ca.display()));
                }
            }
            self.apns.ca_file = Some(ca);
        }
        if self.apns.connections == 0 {
            bad("apns.connections", "must be at least 1".into());
        }
        if self.apns.request_timeout_ms == 0 {
            bad("apns.request_timeout_ms", "must be at least 1".into());
        }

        // [[apps]]
        if self.apps.is_empty() {
            bad("apps", "at least one [[apps]] entry is needed".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, app) in self.apps.iter_mut().enumerate() {
            let k = |f: &str| format!("apps[{i}].{f}");
            if app.name.is_empty() {
                bad(&k("name"), "must not be empty".into());
            } else if app.name.chars().any(char::is_control) {
                // It is printed in `status` tables, log lines and metric labels.
                bad(
                    &k("name"),
                    format!(
                        "{:?} holds a control character (a line break, a tab…)",
                        app.name
                    ),
                );
            } else if !names.insert(app.name.clone()) {
                bad(
                    &k("name"),
                    format!("app {:?} is configured twice", app.name),
                );
            }
            if !is_bundle_id(&app.bundle_id) {
                bad(
                    &k("bundle_id"),
                    format!(
                        "{:?} is not a bundle id (printable ASCII without spaces)",
                        app.bundle_id
                    ),
                );
            }
            match (&app.token, &app.certificate) {
                (Some(_), Some(_)) => bad(
                    &k("token"),
                    "give either token or certificate, not both".into(),
                ),
                (None, None) => bad(
                    &k("token"),
                    "missing: give token = { key_file, key_id, team_id } or certificate = { cert_file, key_file }".into(),
                ),
                _ => {}
            }
            // Both checked when both are given: every problem named in one go.
            if let Some(t) = &mut app.token {
                t.key_file = abs(&t.key_file);
                check_secret_file(&t.key_file, &k("token.key_file"), &mut bad, warnings);
                if t.key_id.len() != 10 || !t.key_id.chars().all(|c| c.is_ascii_alphanumeric()) {
                    bad(
                        &k("token.key_id"),
                        format!("{:?} is not a 10-character key id", t.key_id),
                    );
                }
                if t.team_id.len() != 10 || !t.team_id.chars().all(|c| c.is_ascii_alphanumeric()) {
                    bad(
                        &k("token.team_id"),
                        format!("{:?} is not a 10-character team id", t.team_id),
                    );
                }
                // Apple writes both in upper case and compares them exactly: a copy typed in
                // lower case draws InvalidProviderToken at the first push.
                for (field, value) in [("token.key_id", &t.key_id), ("token.team_id", &t.team_id)] {
                    if value.chars().any(|c| c.is_ascii_lowercase()) {
                        warnings.push(ConfigProblem {
                            key: k(field),
                            line: None,
                            message: format!(
                                "{value:?} has lower-case letters: Apple's ids are upper case, and APNs compares them exactly"
                            ),
                        });
                    }
                }
            }
            if let Some(c) = &mut app.certificate {
                c.cert_file = abs(&c.cert_file);
                // Without a key_file, the cert_file holds the private key (PEM with the
                // key, or PKCS#12) and deserves the same care as a key file.
                let mut ignored = Vec::new();
                let cert_warnings = if c.key_file.is_none() {
                    &mut *warnings
                } else {
                    &mut ignored
                };
                check_secret_file(
                    &c.cert_file,
                    &k("certificate.cert_file"),
                    &mut bad,
                    cert_warnings,
                );
                if let Some(kf) = &mut c.key_file {
                    *kf = abs(kf);
                    check_secret_file(kf, &k("certificate.key_file"), &mut bad, warnings);
                }
                if let Some(pf) = &mut c.password_file {
                    *pf = abs(pf);
                    check_secret_file(pf, &k("certificate.password_file"), &mut bad, warnings);
                }
            }
        }

        // [sender]
        if self.sender.max_in_flight == 0 {
            bad("sender.max_in_flight", "must be at least 1".into());
        }
        if self.sender.max_attempts == 0 {
            bad("sender.max_attempts", "must be at least 1".into());
        }
        if self.sender.retry_max_ms < self.sender.retry_initial_ms {
            bad(
                "sender.retry_max_ms",
                "must not be below retry_initial_ms".into(),
            );
        }
        if self.sender.lease_ms.is_some() {
            warnings.push(ConfigProblem {
                key: "sender.lease_ms".into(),
                line: None,
                message: "is no longer used (claims live in the daemon's memory); remove it".into(),
            });
        }

        // [receipts], [log]
        if let Some(d) = &self.receipts.dir {
            let d = abs(d);
            // A receipt is a `.json` file: in the inbox it would be taken as a drop file (and
            // rejected), and in processed_dir or rejected_dir swept with the files there.
            let inbox = &self.inbox;
            for (name, dir) in [
                ("the inbox folder", Some(&inbox.dir)),
                ("processed_dir", inbox.processed_dir.as_ref()),
                ("rejected_dir", inbox.rejected_dir.as_ref()),
            ] {
                if dir.is_some_and(|dir| same_folder(&d, dir)) {
                    bad(
                        "receipts.dir",
                        format!(
                            "must not be {name}: receipts are .json files, which would be taken or swept as drop files"
                        ),
                    );
                }
            }
            self.receipts.dir = Some(d);
        }
        if let Some(d) = &self.log.dir {
            self.log.dir = Some(abs(d));
        }
        if let Some(why) = log_filter_problem(&self.log.level) {
            bad("log.level", why);
        }

        // [admin]
        if !self.admin.listen.is_empty()
            && self.admin.listen.parse::<std::net::SocketAddr>().is_err()
        {
            bad(
                "admin.listen",
                format!(
                    "{:?} is not an IP address and port such as 127.0.0.1:9464 or [::1]:9464 (host names are not looked up), or \"\" to disable",
                    self.admin.listen
                ),
            );
        }
    }

    /// The inbox and log folders that cannot be made because something else is already under
    /// the name: a config no command that takes or moves files could get past (`run`, `ingest`,
    /// `check-config`). The commands that only read the store leave them to those: an
    /// operator needs `status` most when the daemon cannot move files.
    pub fn folder_problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut dirs = vec![
            ("inbox.dir", self.inbox.dir.clone()),
            ("inbox.rejected_dir", self.rejected_dir().to_path_buf()),
        ];
        // With `keep_processed = false` committed files are deleted: no processed folder.
        if self.inbox.keep_processed {
            dirs.push(("inbox.processed_dir", self.processed_dir().to_path_buf()));
        }
        // These commands log to the rotating files too, and cannot start without them.
        if let Some(d) = &self.log.dir {
            dirs.push(("log.dir", d.clone()));
        }
        // The daemon would write no receipt there, each retried every 10 s.
        if let Some(d) = &self.receipts.dir {
            dirs.push(("receipts.dir", d.clone()));
        }
        // A blocker is named once, for the first key it blocks: the default processed and
        // rejected folders sit in the inbox, whose own blocker is theirs too.
        let mut named = std::collections::HashSet::new();
        for (key, dir) in &dirs {
            // The folder, or one above it that pushdrop would have to make it in: a file, or
            // a link to nothing, under its name.
            if let Some(b) = crate::inbox::fsutil::in_the_way(dir)
                && named.insert(b.path.to_path_buf())
            {
                let what = if b.dangling {
                    "is a symbolic link to nothing"
                } else {
                    "exists and is not a folder"
                };
                // The default processed and rejected folders are in the inbox, where a
                // dropper may have put a file of that name: the key is then not in the file,
                // and its line is its table's.
                let default = [
                    ("inbox.processed_dir", "processed"),
                    ("inbox.rejected_dir", "rejected"),
                ]
                .iter()
                .any(|(k, sub)| k == key && b.path == self.inbox.dir.join(sub));
                let hint = if default {
                    format!(
                        " ({key}'s default, in the inbox): move it away, or set {key} to another folder"
                    )
                } else {
                    String::new()
                };
                problems.push(ConfigProblem {
                    key: (*key).into(),
                    line: None,
                    message: format!("{} {what}{hint}", b.path.display()),
                });
            }
        }
        problems
    }

    /// `[inbox] processed_dir`, resolved.
    pub fn processed_dir(&self) -> &Path {
        self.inbox
            .processed_dir
            .as_deref()
            .unwrap_or(&self.inbox.dir)
    }

    /// `[inbox] rejected_dir`, resolved.
    pub fn rejected_dir(&self) -> &Path {
        self.inbox
            .rejected_dir
            .as_deref()
            .unwrap_or(&self.inbox.dir)
    }

    /// The app of this name.
    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// The base URL for devices of this environment.
    pub fn apns_url(&self, env: Environment) -> &str {
        match env {
            Environment::Production => &self.apns.production_url,
            Environment::Sandbox => &self.apns.sandbox_url,
        }
    }
}

/// What is wrong with a tracing filter (`[log] level`, `RUST_LOG`), if anything. Beside
/// syntax: an empty filter, and a bare word that is not a level, both of which a tracing
/// filter takes and which log nothing of pushdrop's (a bare word is a module name to log at
/// every level, and every other module is then off: "inf" for "info" silences the log).
pub(crate) fn log_filter_problem(filter: &str) -> Option<String> {
    if filter.trim().is_empty() {
        return Some("is empty: give a level such as \"info\"".into());
    }
    if tracing_subscriber::EnvFilter::try_new(filter).is_err() {
        return Some(format!("{filter:?} is not a tracing filter"));
    }
    let word = filter.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains(['=', '[', '{', ':'])
            && d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
    })?;
    Some(format!(
        "{word:?} is not a level (trace, debug, info, warn, error, off); a module takes one \
         after '=', e.g. \"info,pushdrop::delivery=warn\""
    ))
}

/// A key or certificate must exist; a private key readable by group or others draws a warning.
fn check_secret_file(
    path: &Path,
    key: &str,
    bad: &mut impl FnMut(&str, String),
    warnings: &mut Vec<ConfigProblem>,
) {
    // A key or certificate pasted where its path belongs: refused without echoing it, since
    // the message goes to a terminal, a journal or a CI log.
    if looks_inlined(path) {
        bad(
            key,
            "holds a key or certificate itself, not a path: secrets are referred to by path, \
             never inlined; put it in a file readable by pushdrop only and give that file's path"
                .into(),
        );
        return;
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            use std::os::unix::fs::PermissionsExt;
            if m.permissions().mode() & 0o077 != 0 {
                warnings.push(ConfigProblem {
                    key: key.into(),
                    line: None,
                    message: format!(
                        "{} is readable by group or others (mode {:o}); chmod 600 it",
                        path.display(),
                        m.permissions().mode() & 0o777
                    ),
                });
            }
        }
        Ok(_) => bad(key, format!("{} is not a regular file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            warnings.push(out_of_sight(key, path, &e))
        }
        Err(e) => bad(key, format!("cannot read {}: {e}", path.display())),
    }
}

/// A key, certificate or CA file in a folder this user may not enter (mode 750, a mounted
/// Secret): a warning only, since the commands that use no credentials (`status`, `show`, …)
/// work without it; `run` and `check-config`, which read the file, refuse it then (see
/// [`crate::apns::credential_problems`]).
fn out_of_sight(key: &str, path: &Path, e: &std::io::Error) -> ConfigProblem {
    ConfigProblem {
        key: key.into(),
        line: None,
        message: format!(
            "cannot look at {}: {e} (only `run` and `check-config` read it)",
            path.display()
        ),
    }
}

/// Whether a configured path is rather a key or certificate pasted in: PEM armour, line
/// breaks, or a long run of base64 (the body of a PEM on one line) with upper case, lower
/// case and digits, which no file name made of words or hex digests has.
fn looks_inlined(path: &Path) -> bool {
    let text = path.to_string_lossy();
    if text.contains("-----BEGIN") || text.contains('\n') {
        return true;
    }
    let base64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
    text.split(|c: char| !base64(c)).any(|run| {
        // A path's own slashes are not part of a body, unless the run is long anyway.
        run.len() >= 60
            && run.chars().any(|c| c.is_ascii_uppercase())
            && run.chars().any(|c| c.is_ascii_lowercase())
            && run.chars().any(|c| c.is_ascii_digit())
    })
}

/// The same folder, by name or (for folders that exist) through a symlink. The config's
/// check, and the inbox's again when it starts.
pub(crate) fn same_folder(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Removes `.` and `..` components lexically, so messages show `/srv/var/inbox` rather than
/// `/srv/config/../var/inbox`. (Symlinked folders above `..` are not resolved; the paths
/// still name the same files for every operation pushdrop does.)
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The 1-based line of a byte offset into `text` (TOML errors give offsets).
pub(crate) fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The top-level tables a config must have.
const TOP_LEVEL_REQUIRED: &[&str] = &["inbox"];

/// Values tried in turn for a missing field, until one has the field's type.
const PLACEHOLDERS: &[&str] = &["\"pushdrop-placeholder\"", "0", "false", "[]", "{}"];

/// What [`serde_problems`] found, and the config of the text it repaired on the way (when the
/// repairs made it parse), with the keys it touched: its value checks can still be run, so
/// that a type error does not hide a bad value elsewhere.
struct SerdeFindings {
    problems: Vec<ConfigProblem>,
    repaired: Option<Config>,
    touched: Vec<String>,
    /// The text as last repaired, and each of its lines' number in the file (`None` for an
    /// inserted line): the value checks' problems are located in it when the file itself does
    /// not parse as TOML.
    text: String,
    lines: Vec<Option<usize>>,
}

/// Every problem serde finds in the text, not just the first. After each error the text is
/// repaired and parsed again (at most 50 rounds): a bad `key = value` line is blanked, an
/// unknown table is blanked with its keys, a missing field gets a placeholder line after its
/// table's header. Problems caused by these repairs are not reported, and lines are the
/// file's own.
fn serde_problems(text: &str) -> SerdeFindings {
    // Each current line with its line number in the file (None for inserted lines).
    let mut lines: Vec<(String, Option<usize>)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (l.to_string(), Some(i + 1)))
        .collect();
    let mut touched: Vec<String> = Vec::new();
    let mut problems = Vec::new();
    // Inserted placeholder lines (current index) and which placeholder each holds.
    let mut tries: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut repaired = None;
    for _ in 0..50 {
        let current = lines
            .iter()
            .map(|(l, _)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let e = match toml::from_str::<Config>(&current) {
            Ok(cfg) => {
                repaired = Some(cfg);
                break;
            }
            Err(e) => e,
        };
        let at = e.span().map(|s| line_of_offset(&current, s.start));
        let idx = at.map(|l| l - 1).filter(|&i| i < lines.len());
        let mut key = key_of_toml_error(&current, &e);
        // serde names the Rust type a table is read into; the reader knows it as a table.
        let message = match e.message().trim().split_once("expected struct ") {
            Some((head, _)) => format!("{head}expected a table"),
            None => e.message().trim().to_string(),
        };
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_string);
        // An error on a line we inserted: that placeholder has the wrong type; try the next.
        if let Some(i) = idx.filter(|&i| lines[i].1.is_none() && missing.is_none()) {
            let Some(n) = tries
                .get(&i)
                .map(|n| n + 1)
                .filter(|&n| n < PLACEHOLDERS.len())
            else {
                break;
            };
            let field = lines[i]
                .0
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            lines[i].0 = format!("{field} = {}", PLACEHOLDERS[n]);
            tries.insert(i, n);
            continue;
        }
        // An unknown key inside an inline table is reported at the table's line: name it, and
        // take just that key out of the line, so the table's other keys are still checked
        // (or, when that fails, blank the line, which touches the whole table).
        let mut inline_repair = None;
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            inline_repair = idx.and_then(|i| without_inline_key(&lines[i].0, field));
            if !key.ends_with(field) {
                if inline_repair.is_none() {
                    touched.push(key.clone());
                }
                key = format!("{key}.{field}");
            }
        }
        // A bad value inside an inline table: only that key is taken out of the line.
        if inline_repair.is_none()
            && missing.is_none()
            && let (Some(i), Some(span)) = (idx, e.span())
        {
            let col = span.start - current[..span.start].rfind('\n').map_or(0, |p| p + 1);
            inline_repair = inline_key_at(&lines[i].0, col)
                .and_then(|inner| without_inline_key(&lines[i].0, &inner));
        }
        let mut line = idx.and_then(|i| lines[i].1);
        // A missing field is named under the table that lacks it; a missing top-level table
        // has no line (serde points at the file's start).
        if let Some(field) = &missing {
            if TOP_LEVEL_REQUIRED.contains(&field.as_str()) {
                key = field.clone();
                line = None;
            } else if !key.ends_with(field.as_str()) {
                key = format!("{key}.{field}");
            }
        }
        // A field found missing because a repair blanked it (the same key, not the same
        // field of another table) is no new problem.
        let consequence = missing.is_some()
            && (touched.contains(&key) || idx.is_some_and(|i| lines[i].1.is_none()));
        if !consequence {
            problems.push(ConfigProblem {
                key: key.clone(),
                line,
                message,
            });
        }
        touched.push(key);
        if let Some(field) = missing {
            // A placeholder for the missing field: after its table's header, or a missing
            // top-level table at the end.
            if TOP_LEVEL_REQUIRED.contains(&field.as_str()) {
                lines.push((format!("[{field}]"), None));
                continue;
            }
            let Some(i) = idx else { break };
            if !lines[i].0.trim_start().starts_with('[') {
                // Missing from an inline table (`token = { ... }`): the placeholder goes
                // into the table. Its fields are all strings, which the first placeholder is.
                let Some(filled) = with_inline_key(&lines[i].0, &field, PLACEHOLDERS[0]) else {
                    break;
                };
                lines[i].0 = filled;
                continue;
            }
            lines.insert(i + 1, (format!("{field} = {}", PLACEHOLDERS[0]), None));
            // Indexes of inserted lines after this one move down by one.
            tries = tries
                .into_iter()
                .map(|(j, n)| (if j > i { j + 1 } else { j }, n))
                .collect();
            tries.insert(i + 1, 0);
            continue;
        }
        let Some(i) = idx else { break };
        if let Some(repaired) = inline_repair {
            lines[i].0 = repaired;
            continue;
        }
        // Where the text parses as TOML, what goes is the whole entry, however many lines its
        // value takes (a multi-line string, array or inline table), or the whole table: a
        // line-by-line repair would leave a value's other lines behind as new errors.
        if let Some(blank) = e
            .span()
            .and_then(|span| lines_to_blank(&current, span.start))
        {
            touched.push(blank.path);
            for (l, _) in &mut lines[blank.lines] {
                l.clear();
            }
            continue;
        }
        let t = lines[i].0.trim_start().to_string();
        if t.starts_with('[') {
            // An unknown table: blank it with every key under it.
            lines[i].0.clear();
            for (l, _) in lines.iter_mut().skip(i + 1) {
                if l.trim_start().starts_with('[') {
                    break;
                }
                l.clear();
            }
        } else {
            // A `key = value` line serde or TOML refused, or a line that is no TOML at all
            // (`dir "x"`): blanked, and the rest of the file is read on.
            lines[i].0.clear();
        }
    }
    if problems.is_empty() {
        problems.push(ConfigProblem {
            key: "(file)".into(),
            line: None,
            message: "the file does not parse".into(),
        });
    }
    SerdeFindings {
        problems,
        repaired,
        touched,
        text: lines
            .iter()
            .map(|(l, _)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        lines: lines.iter().map(|(_, n)| *n).collect(),
    }
}

/// A `key = { ... }` line with its inline table changed by `edit`, if the line parses as such
/// and `edit` succeeds.
fn edit_inline_table(
    line: &str,
    edit: impl FnOnce(&mut toml_edit::InlineTable) -> Option<()>,
) -> Option<String> {
    let mut doc: toml_edit::DocumentMut = line.parse().ok()?;
    let (_, item) = doc.iter_mut().next()?;
    edit(item.as_value_mut()?.as_inline_table_mut()?)?;
    Some(doc.to_string().trim_end().to_string())
}

/// A `key = { ... }` line without `field` in its inline table.
fn without_inline_key(line: &str, field: &str) -> Option<String> {
    edit_inline_table(line, |t| t.remove(field).map(drop))
}

/// A `key = { ... }` line with `field = value` added to its inline table.
fn with_inline_key(line: &str, field: &str, value: &str) -> Option<String> {
    let value: toml_edit::Value = value.parse().ok()?;
    edit_inline_table(line, |t| {
        t.insert(field, value);
        Some(())
    })
}

/// The key of a `key = { ... }` line's inline table whose value holds byte `at` of the line.
fn inline_key_at(line: &str, at: usize) -> Option<String> {
    let doc = toml_edit::ImDocument::parse(line).ok()?;
    let (_, item) = doc.as_table().iter().next()?;
    item.as_value()?
        .as_inline_table()?
        .iter()
        .find(|(_, v)| v.span().is_some_and(|s| s.contains(&at)))
        .map(|(k, _)| k.to_string())
}

/// Whether `key` is `outer` or a key inside it (`apps[0].token` is inside `apps`).
fn within_key(key: &str, outer: &str) -> bool {
    key == outer
        || key
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// The tables a config has, by dotted key; `apps` is an array of them, and `token` and
/// `certificate` are tables inside each app.
const TABLE_KEYS: &[&str] = &[
    "inbox", "store", "apns", "sender", "receipts", "log", "admin",
];
const APP_TABLE_KEYS: &[&str] = &["token", "certificate"];

/// Tables written as arrays (`inbox = ["in", "out"]`), which serde would read by position:
/// each is a problem, and the text comes back with its lines blanked (line numbers kept), so
/// that nothing of it is read. `None` for the text when there are none (or it is not TOML).
fn positional_tables(text: &str) -> (Option<String>, Vec<ConfigProblem>) {
    use toml_edit::{Item, Value};
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return (None, Vec::new());
    };
    let root = doc.as_table();
    // (key, bytes of the entry) of each table given as an array.
    let mut found: Vec<(String, std::ops::Range<usize>)> = Vec::new();
    let entry_span = |t: &toml_edit::Table, k: &str, v: &Value| {
        let start = t.key(k).and_then(|k| k.span()).map(|s| s.start);
        Some(start?..v.span()?.end)
    };
    for &k in TABLE_KEYS {
        if let Some(Item::Value(v @ Value::Array(_))) = root.get(k)
            && let Some(span) = entry_span(root, k, v)
        {
            found.push((k.to_string(), span));
        }
    }
    match root.get("apps") {
        Some(Item::ArrayOfTables(a)) => {
            for (i, t) in a.iter().enumerate() {
                for &k in APP_TABLE_KEYS {
                    if let Some(Item::Value(v @ Value::Array(_))) = t.get(k)
                        && let Some(span) = entry_span(t, k, v)
                    {
                        found.push((format!("apps[{i}].{k}"), span));
                    }
                }
            }
        }
        Some(Item::Value(v @ Value::Array(apps))) => {
            let whole = entry_span(root, "apps", v);
            let bad = apps.iter().enumerate().find_map(|(i, app)| match app {
                Value::InlineTable(t) => APP_TABLE_KEYS
                    .iter()
                    .find(|k| matches!(t.get(k), Some(Value::Array(_))))
                    .map(|k| format!("apps[{i}].{k}")),
                _ => Some(format!("apps[{i}]")),
            });
            // An inline array goes whole: its lines cannot be taken apart.
            if let (Some(key), Some(span)) = (bad, whole) {
                found.push((key, span));
            }
        }
        _ => {}
    }
    if found.is_empty() {
        return (None, Vec::new());
    }
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let problems = found
        .into_iter()
        .map(|(key, span)| {
            let spanned = lines_of(text, &span);
            let first = *spanned.start();
            for l in lines.iter_mut().take(spanned.end() + 1).skip(first) {
                l.clear();
            }
            ConfigProblem {
                key,
                line: Some(first + 1),
                message: "expected a table, not an array: keys are named, never read by position"
                    .into(),
            }
        })
        .collect();
    (Some(lines.join("\n")), problems)
}

/// An entry of a TOML document that holds a given byte: the dotted path down to the innermost
/// value holding it (`apps[0].token.key_file`, `log.keep_files[1]`), or the table whose header
/// holds it; and the bytes of the whole entry (key to end of value) or of that header.
struct Entry {
    path: String,
    /// The entry's own dotted key (the table's, for a header).
    key: String,
    span: std::ops::Range<usize>,
    header: bool,
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The entry of `table` (a table of a parsed document, its keys under `prefix`) that holds
/// byte `at`; see [`Entry`].
fn entry_at(table: &toml_edit::Table, prefix: &str, at: usize) -> Option<Entry> {
    use toml_edit::Item;
    for (k, item) in table.iter() {
        let path = join_key(prefix, k);
        match item {
            Item::Value(v) => {
                let (Some(ks), Some(vs)) = (table.key(k).and_then(|k| k.span()), v.span()) else {
                    continue;
                };
                let span = ks.start.min(vs.start)..ks.end.max(vs.end);
                if span.contains(&at) {
                    return Some(Entry {
                        path: within_value(v, path.clone(), at),
                        key: path,
                        span,
                        header: false,
                    });
                }
            }
            // A table's span runs from its header to its last entry: what holds `at` and is
            // no entry of it is its header (or a comment among its entries).
            Item::Table(t) => {
                if let Some(e) = entry_at(t, &path, at) {
                    return Some(e);
                }
                if let Some(h) = t.span().filter(|h| h.contains(&at)) {
                    return Some(Entry {
                        key: path.clone(),
                        path,
                        span: h,
                        header: true,
                    });
                }
            }
            Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    if let Some(e) = entry_at(t, &path, at) {
                        return Some(e);
                    }
                    if let Some(h) = t.span().filter(|h| h.contains(&at)) {
                        return Some(Entry {
                            key: path.clone(),
                            path,
                            span: h,
                            header: true,
                        });
                    }
                }
            }
            Item::None => {}
        }
    }
    None
}

/// `path` followed down into `v` (an inline table's keys, an array's indexes) to the innermost
/// value holding byte `at`.
fn within_value(v: &toml_edit::Value, path: String, at: usize) -> String {
    use toml_edit::Value;
    let holds = |x: &Value| x.span().is_some_and(|s| s.contains(&at));
    match v {
        Value::InlineTable(t) => t
            .iter()
            .find(|(k, x)| {
                holds(x)
                    || t.key(k)
                        .and_then(|k| k.span())
                        .is_some_and(|s| s.contains(&at))
            })
            .map_or(path.clone(), |(k, x)| {
                within_value(x, join_key(&path, k), at)
            }),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find(|(_, x)| holds(x))
            .map_or(path.clone(), |(i, x)| {
                within_value(x, format!("{path}[{i}]"), at)
            }),
        _ => path,
    }
}

/// Lines a repair blanks (0-based, of the text), and the key of what goes with them.
struct Blank {
    lines: std::ops::RangeInclusive<usize>,
    path: String,
}

/// The lines (0-based) that bytes `span` of `text` touch.
fn lines_of(text: &str, span: &std::ops::Range<usize>) -> std::ops::RangeInclusive<usize> {
    let first = line_of_offset(text, span.start) - 1;
    let last = line_of_offset(text, span.end.saturating_sub(1).max(span.start)) - 1;
    first..=last
}

/// What a repair blanks for an error at byte `at`: the whole entry holding `at`, or a whole
/// table (header and entries, up to the next header) when `at` is on its header. `None` when
/// `text` does not parse as TOML or nothing holds `at`.
fn lines_to_blank(text: &str, at: usize) -> Option<Blank> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let entry = entry_at(doc.as_table(), "", at)?;
    let spanned = lines_of(text, &entry.span);
    let first = *spanned.start();
    let last = if entry.header {
        // Up to the line before the next header, or the end of the text.
        let mut starts = Vec::new();
        headers(doc.as_table(), &mut starts);
        starts
            .into_iter()
            .filter(|&s| s > entry.span.start)
            .min()
            .map_or(text.lines().count().max(1) - 1, |s| {
                line_of_offset(text, s).saturating_sub(2).max(first)
            })
    } else {
        *spanned.end()
    };
    Some(Blank {
        lines: first..=last,
        path: entry.key,
    })
}

/// The start of every table header in `table` and below it.
fn headers(table: &toml_edit::Table, out: &mut Vec<usize>) {
    use toml_edit::Item;
    for (_, item) in table.iter() {
        match item {
            Item::Table(t) => {
                out.extend(t.span().map(|s| s.start));
                headers(t, out);
            }
            Item::ArrayOfTables(a) => {
                for t in a.iter() {
                    out.extend(t.span().map(|s| s.start));
                    headers(t, out);
                }
            }
            _ => {}
        }
    }
}

/// A sub-table header's name with the index of the array-of-tables entry it belongs to:
/// `[apps.token]` after the second `[[apps]]` is `apps[1].token`. `counts` holds how many
/// entries of each array of tables came before.
fn within_array(name: &str, counts: &std::collections::HashMap<String, usize>) -> String {
    match name.split_once('.') {
        Some((head, rest)) => match counts.get(head.trim()) {
            Some(&n) if n > 0 => format!("{}[{}].{}", head.trim(), n - 1, rest.trim()),
            _ => name.to_string(),
        },
        None => name.to_string(),
    }
}

/// The dotted key a serde error is about: the key of the line its span starts on, under the
/// table header above it (`[sender]` → `sender.max_attempts`, the second `[[apps]]` →
/// `apps[1].bundle_id`).
pub(crate) fn key_of_toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return "(file)".into();
    };
    let start = span.start.min(text.len());
    // A text that parses as TOML names the value itself, wherever it sits (an element of a
    // multi-line array, an inline table on a line of its own); the line-based reading below
    // serves a text that does not parse.
    if let Ok(doc) = toml_edit::ImDocument::parse(text)
        && let Some(entry) = entry_at(doc.as_table(), "", start)
    {
        return entry.path;
    }
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let raw_line = text[line_start..].lines().next().unwrap_or("");
    let line = raw_line.trim();
    // The table the line sits in, and for arrays of tables, which one.
    let mut table = String::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = within_array(name.trim(), &counts);
        }
    }
    if let Some(name) = line.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
        // An array table's header: which one of them.
        let name = name.trim().to_string();
        let n = counts.get(&name).copied().unwrap_or(0);
        return format!("{name}[{n}]");
    }
    if line.starts_with('[') {
        return within_array(line.trim_matches(['[', ']']).trim(), &counts);
    }
    let key = line
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"')
        .to_string();
    let key = match (table.is_empty(), key.is_empty()) {
        (_, true) if table.is_empty() => return "(file)".into(),
        (_, true) => return table,
        (true, false) => key,
        (false, false) => format!("{table}.{key}"),
    };
    // A bad value inside an inline table: named by its own key (`apps[0].token.key_file`).
    match inline_key_at(raw_line, start - line_start) {
        Some(inner) => format!("{key}.{inner}"),
        None => key,
    }
}

/// Finds the line of a dotted key path such as `apps[1].token.key_file` in the document: the
/// deepest part of the path that exists, so a missing key points at its table.
fn line_of_key(text: &str, doc: &toml_edit::ImDocument<&str>, key: &str) -> Option<usize> {
    use toml_edit::{Item, Value};
    enum Node<'a> {
        Table(&'a toml_edit::Table),
        Inline(&'a toml_edit::InlineTable),
        Other,
    }
    fn of_item(i: &Item) -> Node<'_> {
        match i {
            Item::Table(t) => Node::Table(t),
            Item::Value(Value::InlineTable(t)) => Node::Inline(t),
            _ => Node::Other,
        }
    }
    let mut node = Node::Table(doc.as_table());
    let mut span = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (key_span, next) = match node {
            Node::Table(t) => (t.key(name).and_then(|k| k.span()), t.get(name)),
            Node::Inline(t) => {
                let ks = t.key(name).and_then(|k| k.span());
                (ks, None)
            }
            Node::Other => (None, None),
        };
        span = key_span.or(span);
        let Some(next) = next else { break };
        node = match (index, next) {
            (Some(i), Item::ArrayOfTables(a)) => match a.get(i) {
                Some(t) => {
                    span = t.span().or(span);
                    Node::Table(t)
                }
                None => break,
            },
            (Some(_), _) => break,
            (None, item) => of_item(item),
        };
    }
    span.map(|s| line_of_offset(text, s.start))
}

/// Why `url` is not `scheme://host[:port]` (the port required with `port`; a trailing `/`
/// allowed), or `None`. A URL with credentials is never echoed, well-formed or not: `creds`
/// says why it is refused instead.
fn url_problem(url: &str, scheme: &str, port: bool, creds: &str) -> Option<String> {
    if url.contains('@') {
        return Some(format!("holds {creds}"));
    }
    let form = if port {
        format!("{scheme}://host:port")
    } else {
        format!("{scheme}://host[:port]")
    };
    let Ok(u) = url.parse::<http::Uri>() else {
        return Some(format!("{url:?} is not of the form {form}"));
    };
    if u.scheme_str() != Some(scheme) || u.host().is_none() || (port && u.port().is_none()) {
        return Some(format!("{url:?} is not of the form {form}"));
    }
    if !u.authority().is_some_and(|a| plain_authority(a.as_str())) {
        return Some(format!(
            "{url:?}: its host and port are not plain (a host name or address, and digits after `:`): give {form}"
        ));
    }
    if u.port_u16() == Some(0) {
        return Some(format!(
            "{url:?}: port 0 is no port to connect to: give {form} with the port it listens on"
        ));
    }
    if u.query().is_some() || url.contains('#') || !u.path().trim_end_matches('/').is_empty() {
        return Some(format!(
            "has a path, query or fragment, which its requests would not carry: give {form} only"
        ));
    }
    None
}

/// `host`, `host:port` or `[v6]:port`, nothing else (no `;param` after the port).
fn plain_authority(a: &str) -> bool {
    let (host_ok, port) = match a.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, after)) => (
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'),
                match after {
                    "" => None,
                    p => match p.strip_prefix(':') {
                        Some(p) => Some(p),
                        None => return false,
                    },
                },
            ),
            None => return false,
        },
        None => {
            let (h, p) = match a.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (a, None),
            };
            (
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
                p,
            )
        }
    };
    host_ok
        && port.is_none_or(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
        })
}

/// What can be an app's bundle id (and so an `apns-topic` header): not empty, printable
/// ASCII without spaces (a control character or non-ASCII could never go out as the header).
/// Apple documents no stricter rule, and the simulator's `--bundle-id` uses the same one, so
/// the config it writes passes `check-config`.
pub fn is_bundle_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_id_is_printable_ascii_without_spaces() {
        assert!(is_bundle_id("info.buxheti.shkoder"));
        for bad in ["", "a b", "com.ex\u{1}am", "com.exämple", "com.ex\tam"] {
            assert!(!is_bundle_id(bad), "{bad:?}");
        }
    }

    fn load(text: &str) -> Result<(Config, ConfigWarnings), ConfigError> {
        load_in(tempfile::tempdir().unwrap().path(), text)
    }

    /// What a report names: each problem's key and line.
    fn keys_and_lines(err: &ConfigError) -> Vec<(String, Option<usize>)> {
        err.problems
            .iter()
            .map(|p| (p.key.clone(), p.line))
            .collect()
    }

    /// Loads `text` as `dir/p.toml`, with `KEY` naming a key file (mode 600) made in `dir`.
    fn load_in(dir: &Path, text: &str) -> Result<(Config, ConfigWarnings), ConfigError> {
        let key = dir.join("AuthKey.p8");
        std::fs::write(&key, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = text.replace("KEY", &key.display().to_string());
        Config::from_toml(&text, &dir.join("p.toml"), dir)
    }

    const GOOD: &str = r#"
[inbox]
dir = "inbox"

[[apps]]
name = "a"
bundle_id = "com.example.a"
token = { key_file = "KEY", key_id = "ABC123DEFG", team_id = "DEF123GHIJ" }
"#;

    #[test]
    fn minimal_config_gets_defaults_and_absolute_paths() {
        let (cfg, warnings) = load(GOOD).unwrap();
        assert!(warnings.is_empty());
        assert!(cfg.inbox.dir.is_absolute());
        assert_eq!(cfg.processed_dir(), cfg.inbox.dir.join("processed"));
        assert_eq!(cfg.rejected_dir(), cfg.inbox.dir.join("rejected"));
        assert_eq!(cfg.sender.max_attempts, 8);
        assert_eq!(cfg.apns.production_url, "https://api.push.apple.com");
        assert_eq!(cfg.admin.listen, "127.0.0.1:9464");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err =
            load(&GOOD.replace("dir = \"inbox\"", "dir = \"inbox\"\nsettle_msec = 5")).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        let p = &err.problems[0];
        assert_eq!(p.line, Some(4), "{p}");
        assert_eq!(p.key, "inbox.settle_msec", "{p}");
        assert!(p.message.contains("settle_msec"), "{p}");
    }

    #[test]
    fn a_missing_field_is_named_under_its_table() {
        let key_line = |text: &str| {
            let err = load(text).unwrap_err();
            (err.problems[0].key.clone(), err.problems[0].line)
        };
        // A missing table has no line of its own.
        let no_inbox = GOOD.replace("[inbox]\ndir = \"inbox\"\n", "");
        assert_eq!(key_line(&no_inbox), ("inbox".to_string(), None));
        let no_bundle = GOOD.replace("bundle_id = \"com.example.a\"\n", "");
        assert_eq!(
            key_line(&no_bundle),
            ("apps[0].bundle_id".to_string(), Some(5))
        );
        let no_key_file = GOOD.replace("key_file = \"KEY\", ", "");
        assert_eq!(
            key_line(&no_key_file),
            ("apps[0].token.key_file".to_string(), Some(8))
        );
    }

    #[test]
    fn every_type_error_is_reported_with_its_key() {
        let text = GOOD.replace("dir = \"inbox\"", "dir = \"inbox\"\nsettle_ms = \"soon\"")
            + "\n[sender]\nmax_attempts = \"eight\"\nmax_in_fligth = 3\n";
        let err = load(&text).unwrap_err();
        let got: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            got,
            vec![
                ("inbox.settle_ms", Some(4)),
                ("sender.max_attempts", Some(12)),
                ("sender.max_in_fligth", Some(13))
            ],
            "{err}"
        );
        let bundle = GOOD.replace("bundle_id = \"com.example.a\"", "bundle_id = 5");
        let err = load(&bundle).unwrap_err();
        assert_eq!(err.problems[0].key, "apps[0].bundle_id", "{err}");
        // A table given as a value is named as a table, not as the type it is read into.
        let err = load(&GOOD.replace("[inbox]\ndir = \"inbox\"", "inbox = 5")).unwrap_err();
        assert_eq!(err.problems[0].key, "inbox", "{err}");
        assert!(
            err.problems[0].message.ends_with("expected a table"),
            "{err}"
        );
    }

    /// A value written over several lines (a multi-line string, array or inline table) is
    /// one entry: an error in it names its key and hides nothing after it, and its other lines
    /// are no errors of their own.
    #[test]
    fn a_value_over_several_lines_is_one_entry_in_the_report() {
        let text = GOOD.replace(
            "dir = \"inbox\"",
            "dir = \"inbox\"\nextra = \"\"\"\nmulti\nline = 5\n\"\"\"\nscan_interval_s = 0",
        ) + "\n[log]\nkeep_files = [\n 1,\n 2,\n]\n[sender]\nfoo = { a = 1, b = [\n 2,\n 3 ] }\nmax_attempts = 0\n";
        let err = load(&text).unwrap_err();
        assert_eq!(
            keys_and_lines(&err),
            vec![
                ("inbox.extra".to_string(), Some(4)),
                ("inbox.scan_interval_s".to_string(), Some(8)),
                ("log.keep_files".to_string(), Some(16)),
                ("sender.foo".to_string(), Some(21)),
                ("sender.max_attempts".to_string(), Some(24)),
            ],
            "{err}"
        );

        // `[[apps]]` written as an array of inline tables: each entry is named by its index.
        let apps = "apps = [\n  { name = \"a\", bundle_id = \"com.example.a\", token = { key_file = \"KEY\", key_id = \"ABC123DEFG\", team_id = \"DEF123GHIJ\" } },\n  { name = \"b\", bundle_id = \"com.example.b\", environment = \"staging\", token = { key_file = \"KEY\", key_id = \"ABC123DEFG\", team_id = \"DEF123GHIJ\" } },\n]\n[inbox]\ndir = \"inbox\"\n[sender]\nmax_attempts = 0\n";
        let err = load(apps).unwrap_err();
        assert_eq!(
            keys_and_lines(&err),
            vec![
                ("apps[1].environment".to_string(), Some(3)),
                ("sender.max_attempts".to_string(), Some(8)),
            ],
            "{err}"
        );
    }

    /// Ids in lower case work as far as the config goes, and then APNs refuses them (it
    /// compares them exactly): a warning.
    #[test]
    fn lower_case_ids_warn() {
        let text = GOOD.replace("ABC123DEFG", "abc123defg");
        let (_, warnings) = load(&text).unwrap();
        let keys: Vec<_> = warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["apps[0].token.key_id"], "{warnings:?}");
        // Beside an error, the warning is still said.
        let err = load(&text.replace("dir = \"inbox\"", "dir = \"inbox\"\nscan_interval_s = 0"))
            .unwrap_err();
        assert_eq!(err.warnings.len(), 1, "{err}");
        assert!(
            err.to_string()
                .contains("warning: line 9: apps[0].token.key_id"),
            "{err}"
        );
    }

    /// A table written as an array would be read by position (serde's way with structs):
    /// refused, and nothing of it is taken.
    #[test]
    fn a_table_written_as_an_array_is_refused_not_read_by_position() {
        let problems = |text: &str| keys_and_lines(&load(text).unwrap_err());
        let text = "sender = [5, 0]".to_string()
            + &GOOD.replace(
                "[inbox]\ndir = \"inbox\"",
                "inbox = [\"in\", \"out\", \"rej\"]",
            );
        assert_eq!(
            problems(&text),
            [
                ("sender".to_string(), Some(1)),
                ("inbox".to_string(), Some(2))
            ]
        );
        let text = GOOD.replace(
            "token = { key_file = \"KEY\", key_id = \"ABC123DEFG\", team_id = \"DEF123GHIJ\" }",
            "token = [\"KEY\", \"ABC123DEFG\", \"DEF123GHIJ\"]",
        );
        assert_eq!(problems(&text), [("apps[0].token".to_string(), Some(8))]);
        let err = load(&text).unwrap_err();
        assert!(
            err.problems[0].message.contains("never read by position"),
            "{err}"
        );
    }

    /// A key pasted into `key_file` is refused as an inlined secret, and not echoed.
    #[test]
    fn a_key_pasted_where_its_path_belongs_is_refused_without_echo() {
        let pem = "-----BEGIN PRIVATE KEY-----\\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSECRET\\n-----END PRIVATE KEY-----";
        let err = load(&GOOD.replace("key_file = \"KEY\"", &format!("key_file = \"{pem}\"")))
            .unwrap_err();
        let shown = err.to_string();
        assert_eq!(err.problems.len(), 1, "{shown}");
        assert_eq!(err.problems[0].key, "apps[0].token.key_file", "{shown}");
        assert!(shown.contains("never inlined"), "{shown}");
        assert!(!shown.contains("SECRET"), "{shown}");
        // The body alone, on one line; and a PEM where the CA file's path belongs.
        let body = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg3IwB3d2NAz2A4QDuJeIuDBcY4o";
        let err = load(&GOOD.replace("key_file = \"KEY\"", &format!("key_file = \"{body}\"")))
            .unwrap_err();
        assert!(!err.to_string().contains(body), "{err}");
        let err = load(&format!("{GOOD}\n[apns]\nca_file = \"{pem}\"\n")).unwrap_err();
        assert_eq!(err.problems[0].key, "apns.ca_file", "{err}");
        assert!(!err.to_string().contains("SECRET"), "{err}");
        // Paths of words, hex digests or Nix-like hashes are paths.
        for p in [
            "/var/lib/pushdrop/AuthKey_ABC123DEFG.p8",
            "/nix/store/0c2ab9sq7mbyx4l0z8a5w1jjqhpv1h2s-keys/key.p8",
            "/k/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08/key.p8",
        ] {
            assert!(!looks_inlined(Path::new(p)), "{p}");
        }
    }

    /// After a TOML syntax error the file is read on, and what is found after it keeps its
    /// line.
    #[test]
    fn problems_after_a_syntax_error_keep_their_lines() {
        let text = format!("{GOOD}[store\npath = \"x.db\"\n[sender]\nmax_attempts = 0\n");
        let err = load(&text).unwrap_err();
        let got: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            got,
            vec![("store", Some(9)), ("sender.max_attempts", Some(12))],
            "{err}"
        );
        // A line that is no TOML at all (a key without `=`) hides nothing after it.
        let text = GOOD.replace(
            "dir = \"inbox\"",
            "dir = \"inbox\"\nsettle \"x\"\nscan_interval_s = 0",
        );
        let err = load(&text).unwrap_err();
        let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [Some(4), Some(5)], "{err}");
        assert_eq!(err.problems[1].key, "inbox.scan_interval_s", "{err}");
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let text = GOOD.replace("ABC123DEFG", "short") + "\n[sender]\nmax_attempts = 0\n";
        let err = load(&text).unwrap_err();
        let keys: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("apps[0].token.key_id", Some(8)),
                ("sender.max_attempts", Some(11))
            ],
            "{err}"
        );
    }

    #[test]
    fn an_app_name_with_a_line_break_is_refused() {
        let text = GOOD.replace("name = \"a\"", "name = \"a\\nb\"");
        let err = load(&text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["apps[0].name"], "{err}");
    }

    /// An app with both `token` and `certificate`: that, and the problems inside each.
    #[test]
    fn both_credentials_and_the_problems_inside_each_are_named() {
        let text =
            GOOD.replace("DEF123GHIJ", "bad") + "certificate = { cert_file = \"missing.pem\" }\n";
        let err = load(&text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "apps[0].token",
                "apps[0].token.team_id",
                "apps[0].certificate.cert_file"
            ],
            "{err}"
        );
    }

    #[test]
    fn retired_lease_ms_loads_with_a_warning() {
        let text = format!("{GOOD}\n[sender]\nlease_ms = 60000\n");
        let (_, warnings) = load(&text).unwrap();
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].key, "sender.lease_ms");
        assert!(warnings[0].message.contains("no longer used"));
    }

    #[test]
    fn world_readable_key_warns() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("AuthKey.p8");
        std::fs::write(&key, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = GOOD.replace("KEY", &key.display().to_string());
        let (_, warnings) =
            Config::from_toml(&text, &dir.path().join("p.toml"), dir.path()).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].message.contains("chmod 600"));
    }

    #[test]
    fn a_cert_file_holding_the_private_key_warns_when_others_may_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for f in ["push.p12", "push.pass", "cert.pem", "key.pem"] {
            let p = dir.path().join(f);
            std::fs::write(&p, "x").unwrap();
            let mode = if f.ends_with(".pass") || f == "key.pem" {
                0o600
            } else {
                0o644
            };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let with = |auth: &str| {
            let text = GOOD.replace(
                r#"token = { key_file = "KEY", key_id = "ABC123DEFG", team_id = "DEF123GHIJ" }"#,
                auth,
            );
            Config::from_toml(&text, &dir.path().join("p.toml"), dir.path())
                .unwrap()
                .1
        };
        // PKCS#12 (or a PEM with its key): the cert_file is the secret.
        let w = with(r#"certificate = { cert_file = "push.p12", password_file = "push.pass" }"#);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].key, "apps[0].certificate.cert_file");
        // The key in a file of its own: the certificate is public.
        let w = with(r#"certificate = { cert_file = "cert.pem", key_file = "key.pem" }"#);
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn a_processed_or_rejected_dir_that_is_the_inbox_through_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("inbox")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("inbox"), dir.path().join("alias")).unwrap();
        let text = GOOD.replace(
            "dir = \"inbox\"",
            "dir = \"inbox\"\nrejected_dir = \"alias\"",
        );
        let err = load_in(dir.path(), &text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "inbox.rejected_dir", "{err}");
        assert!(
            err.problems[0].message.contains("inbox folder itself"),
            "{err}"
        );
    }

    #[test]
    fn a_receipts_dir_among_the_inbox_folders_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (receipts, named) in [
            ("inbox", "the inbox folder"),
            ("inbox/processed", "processed_dir"),
            ("inbox/rejected", "rejected_dir"),
        ] {
            let text = format!("{GOOD}\n[receipts]\ndir = \"{receipts}\"\n");
            let err = load_in(dir.path(), &text).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{err}");
            assert_eq!(err.problems[0].key, "receipts.dir", "{err}");
            assert!(err.problems[0].message.contains(named), "{err}");
        }
        let text = format!("{GOOD}\n[receipts]\ndir = \"receipts\"\n");
        assert!(load_in(dir.path(), &text).is_ok());
    }

    /// A bare word in a tracing filter names a module and turns every other one off.
    #[test]
    fn a_log_level_typo_is_refused_rather_than_silencing_the_log() {
        let dir = tempfile::tempdir().unwrap();
        for level in ["inf", "warn,pushdrp", "", " "] {
            let text = format!("{GOOD}\n[log]\nlevel = \"{level}\"\n");
            let err = load_in(dir.path(), &text).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{err}");
            assert_eq!(err.problems[0].key, "log.level", "{err}");
            let why = &err.problems[0].message;
            assert!(
                why.contains("is not a level") || why.contains("is empty"),
                "{err}"
            );
        }
        for level in [
            "debug",
            "INFO",
            "info,pushdrop::delivery=warn",
            "off",
            "warn,h2=error",
        ] {
            let text = format!("{GOOD}\n[log]\nlevel = \"{level}\"\n");
            assert!(load_in(dir.path(), &text).is_ok(), "{level}");
        }
    }

    /// Every command opens the store: a folder as `store.path` is a bad config for all.
    #[test]
    fn a_folder_as_the_store_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("var")).unwrap();
        let text = format!("{GOOD}\n[store]\npath = \"var\"\n");
        let err = load_in(dir.path(), &text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "store.path");
        assert!(err.problems[0].message.contains("is a folder"), "{err}");
    }

    /// Nor a FIFO (the reading commands would hang on it), nor a path under a file.
    #[test]
    fn a_store_path_that_cannot_be_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.db");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::write(dir.path().join("z.json"), "{}").unwrap();
        for path in ["fifo.db", "z.json/pushdrop.db"] {
            let text = format!("{GOOD}\n[store]\npath = \"{path}\"\n");
            let err = load_in(dir.path(), &text).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{path}: {err}");
            assert_eq!(err.problems[0].key, "store.path", "{err}");
        }
    }

    #[test]
    fn a_folder_under_a_file_is_refused_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blocker"), "a file").unwrap();
        let text = GOOD.replace(
            "dir = \"inbox\"",
            "dir = \"inbox\"\nprocessed_dir = \"blocker/processed\"",
        );
        // Only the commands that take or move files check it (`status` must still work).
        assert!(load_in(dir.path(), &text).is_ok());
        let key = dir.path().join("AuthKey.p8");
        let text = text.replace("KEY", &key.display().to_string());
        let err = Config::from_toml_checked(&text, &dir.path().join("p.toml"), dir.path(), |c| {
            (c.folder_problems(), Vec::new())
        })
        .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "inbox.processed_dir", "{err}");
        // Committed files deleted: there is no processed folder to make.
        let deleting = text.replace("dir = \"inbox\"", "dir = \"inbox\"\nkeep_processed = false");
        let (cfg, _) =
            Config::from_toml(&deleting, &dir.path().join("p.toml"), dir.path()).unwrap();
        assert!(cfg.folder_problems().is_empty());
        assert!(
            err.problems[0]
                .message
                .contains("blocker exists and is not a folder"),
            "{err}"
        );
        assert!(!err.problems[0].message.contains("default"), "{err}");
        // A file named `processed` dropped into the inbox, where the default folder goes: the
        // key is not in the config, so the message says where the folder comes from.
        std::fs::create_dir_all(dir.path().join("inbox")).unwrap();
        std::fs::write(dir.path().join("inbox/processed"), "a drop").unwrap();
        let (cfg, _) = Config::from_toml(
            &text.replace("\nprocessed_dir = \"blocker/processed\"", ""),
            &dir.path().join("p.toml"),
            dir.path(),
        )
        .unwrap();
        let problems = cfg.folder_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "inbox.processed_dir");
        assert!(
            problems[0].message.ends_with(
                "processed exists and is not a folder (inbox.processed_dir's default, in the \
                 inbox): move it away, or set inbox.processed_dir to another folder"
            ),
            "{problems:?}"
        );
        std::fs::remove_file(dir.path().join("inbox/processed")).unwrap();
        // The log folder too: `run` could not start its log.
        let logging = format!("{deleting}\n[log]\ndir = \"blocker\"\n");
        let (cfg, _) = Config::from_toml(&logging, &dir.path().join("p.toml"), dir.path()).unwrap();
        let problems = cfg.folder_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "log.dir");
        // And the receipts folder: the daemon could write no receipt.
        let receipts = format!("{deleting}\n[receipts]\ndir = \"blocker\"\n");
        let (cfg, _) =
            Config::from_toml(&receipts, &dir.path().join("p.toml"), dir.path()).unwrap();
        let problems = cfg.folder_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "receipts.dir");
        // A link to nothing cannot be made a folder either.
        std::os::unix::fs::symlink("nowhere", dir.path().join("dangling")).unwrap();
        let dangling = format!("{deleting}\n[log]\ndir = \"dangling\"\n");
        let (cfg, _) =
            Config::from_toml(&dangling, &dir.path().join("p.toml"), dir.path()).unwrap();
        let problems = cfg.folder_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].message.contains("symbolic link to nothing"),
            "{problems:?}"
        );
        // An inbox that is a file blocks its default processed and rejected folders too:
        // named once, for the inbox.
        let blocked = text.replace(
            "dir = \"inbox\"\nprocessed_dir = \"blocker/processed\"",
            "dir = \"blocker\"",
        );
        let (cfg, _) = Config::from_toml(&blocked, &dir.path().join("p.toml"), dir.path()).unwrap();
        let problems = cfg.folder_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "inbox.dir");
    }

    /// Every error, whatever its kind: an unknown table, a missing field or a type error does
    /// not hide the errors after it, nor the value checks of the rest of the file.
    #[test]
    fn every_error_is_named_not_only_those_before_the_first_hard_one() {
        let keys = |text: &str| -> Vec<(String, Option<usize>)> {
            load(text)
                .unwrap_err()
                .problems
                .into_iter()
                .map(|p| (p.key, p.line))
                .collect()
        };
        let token =
            r#"token = { key_file = "KEY", key_id = "ABC123DEFG", team_id = "DEF123GHIJ" }"#;
        let text = format!(
            "[inbox]\ndir = \"i\"\nsettle_ms = \"x\"\n[[apps]]\nname = \"a\"\nbundle_id = \"x.y\"\n\
             environment = \"prod\"\n{token}\n[sendr]\nmax = 1\n[log]\nformat = \"xml\"\n\
             [apns]\nconnections = 0\n"
        );
        assert_eq!(
            keys(&text),
            [
                ("inbox.settle_ms".to_string(), Some(3)),
                ("apps[0].environment".to_string(), Some(7)),
                ("sendr".to_string(), Some(9)),
                ("log.format".to_string(), Some(12)),
                ("apns.connections".to_string(), Some(14)),
            ]
        );
        // Missing fields, in the second of two apps too; a missing [inbox] beside a bad value.
        let text = format!(
            "[inbox]\nsettle_ms = 5\n[[apps]]\nname = \"a\"\n{token}\n[[apps]]\n\
             bundle_id = \"x.z\"\n{token}\n[log]\nformat = \"xml\"\n"
        );
        assert_eq!(
            keys(&text),
            [
                ("inbox.dir".to_string(), Some(1)),
                ("apps[0].bundle_id".to_string(), Some(3)),
                ("apps[1].name".to_string(), Some(6)),
                ("log.format".to_string(), Some(10)),
            ]
        );
        let text = format!(
            "[[apps]]\nname = \"a\"\nbundle_id = \"x.y\"\n{}\n",
            token.replace("ABC123DEFG", "ABC")
        );
        assert_eq!(
            keys(&text),
            [
                ("apps[0].token.key_id".to_string(), Some(4)),
                ("inbox".to_string(), None),
            ]
        );
        // The same field missing in two tables: both named.
        let text = format!(
            "[inbox]\ndir = \"i\"\n[[apps]]\nbundle_id = \"x.y\"\n{token}\n[[apps]]\n\
             bundle_id = \"x.z\"\n{token}\n"
        );
        assert_eq!(
            keys(&text),
            [
                ("apps[0].name".to_string(), Some(3)),
                ("apps[1].name".to_string(), Some(6)),
            ]
        );
        // A field missing from an inline table hides nothing after it.
        let text =
            GOOD.replace(r#", team_id = "DEF123GHIJ""#, "") + "\n[sender]\nmax_in_flight = 0\n";
        assert_eq!(
            keys(&text),
            [
                ("apps[0].token.team_id".to_string(), Some(8)),
                ("sender.max_in_flight".to_string(), Some(11)),
            ]
        );
        // The same in the sub-table form: named with its app's index, placeholder unreported.
        let text = "[inbox]\ndir = \"i\"\n[[apps]]\nname = \"a\"\nbundle_id = \"x.y\"\n\
                    [apps.token]\nkey_file = \"KEY\"\nkey_id = \"ABC123DEFG\"\n";
        assert_eq!(keys(text), [("apps[0].token.team_id".to_string(), Some(6))]);
        // A wrong type inside an inline table is named by its key.
        let text = GOOD.replace(r#"key_id = "ABC123DEFG""#, "key_id = 5");
        assert_eq!(keys(&text), [("apps[0].token.key_id".to_string(), Some(8))]);
        // An unknown key in an inline table is named with its table.
        let text = GOOD.replace("key_id =", "kid = \"X\", key_id =");
        assert_eq!(keys(&text), [("apps[0].token.kid".to_string(), Some(8))]);
        // ... each of them, and the rest of that table is still checked.
        let text = GOOD.replace(
            r#"key_id = "ABC123DEFG""#,
            r#"kid = "X", foo = 1, key_id = "ABC""#,
        );
        assert_eq!(
            keys(&text),
            [
                ("apps[0].token.kid".to_string(), Some(8)),
                ("apps[0].token.foo".to_string(), Some(8)),
                ("apps[0].token.key_id".to_string(), Some(8)),
            ]
        );
    }

    #[test]
    fn proxy_credentials_are_refused_not_dropped() {
        let with = |proxy: &str| GOOD.to_string() + &format!("\n[apns]\nproxy = \"{proxy}\"\n");
        let err = load(&with("http://u:hunter2@127.0.0.1:3128")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "apns.proxy", "{err}");
        assert!(err.problems[0].message.contains("credentials"), "{err}");
        assert!(
            !err.to_string().contains("hunter2"),
            "never echoes it: {err}"
        );
        assert!(load(&with("http://127.0.0.1:3128")).is_ok());
    }

    /// An APNs URL is a host and port: credentials, a path or a query would be dropped
    /// silently (or be a secret in the config), so they are refused, never echoed.
    #[test]
    fn apns_urls_with_credentials_path_or_query_are_refused() {
        let with =
            |url: &str| GOOD.to_string() + &format!("\n[apns]\nproduction_url = \"{url}\"\n");
        for url in [
            "https://u:hunter2@127.0.0.1:2197",
            "https://127.0.0.1:2197/apns",
            "https://127.0.0.1:2197?hunter2",
        ] {
            let err = load(&with(url)).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{url}: {err}");
            assert_eq!(err.problems[0].key, "apns.production_url", "{err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        assert!(load(&with("https://127.0.0.1:2197")).is_ok());
        assert!(load(&with("https://127.0.0.1:2197/")).is_ok());
        assert!(load(&with("https://[::1]:2197")).is_ok());
        assert!(load(&with("https://api.push.apple.com")).is_ok());
        // Malformed ones too, never echoing a password; and what `run` could not use.
        for url in [
            "https://user:s3cr3t PW@127.0.0.1",
            "https://user:hunter2@[::1",
            "https://127.0.0.1:2197;hunter2",
            "https://127.0.0.1:2197#hunter2",
            "http://127.0.0.1:2197",
            "https://127.0.0.1:0",
        ] {
            let err = load(&with(url)).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{url}: {err}");
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
        }
        let proxy = |p: &str| GOOD.to_string() + &format!("\n[apns]\nproxy = \"{p}\"\n");
        for p in [
            "http://user:s3cr3t^x@127.0.0.1:3128",
            "http://127.0.0.1:3128/x",
            "http://127.0.0.1",
            "http://127.0.0.1:0",
        ] {
            let err = load(&proxy(p)).unwrap_err();
            assert_eq!(err.problems[0].key, "apns.proxy", "{p}: {err}");
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
        }
    }

    #[test]
    fn a_problem_is_shown_on_one_line() {
        let err = load(&GOOD.replace("[[apps]]", "[apps")).unwrap_err();
        let shown = err.to_string();
        assert_eq!(shown.lines().count(), 1 + err.problems.len(), "{shown}");
        assert!(shown.contains("invalid table header; expected"), "{shown}");
    }

    #[test]
    fn wrong_enum_value_is_named() {
        let err = load(&(GOOD.to_string() + "\n[log]\nrotation = \"weekly\"\n")).unwrap_err();
        assert!(
            err.problems[0].message.contains("weekly")
                || err.problems[0].message.contains("hourly"),
            "{err}"
        );
        assert_eq!(err.problems[0].line, Some(11), "{err}");
    }

    /// Every key the config types accept, as dotted paths (`apps.token.key_file`).
    fn accepted_keys() -> std::collections::BTreeSet<String> {
        let (mut cfg, _) = load(GOOD).unwrap();
        // Fill every optional part so that serialization shows every key.
        cfg.inbox.processed_dir = Some("p".into());
        cfg.inbox.rejected_dir = Some("r".into());
        cfg.apns.ca_file = Some("ca.pem".into());
        cfg.receipts.dir = Some("receipts".into());
        cfg.log.dir = Some("log".into());
        cfg.apps[0].certificate = Some(CertificateAuthConfig {
            cert_file: "c.pem".into(),
            key_file: Some("k.pem".into()),
            password_file: Some("p12.pass".into()),
        });
        let value = toml::Value::try_from(&cfg).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        fn walk(prefix: &str, v: &toml::Value, keys: &mut std::collections::BTreeSet<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let p = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&p, v, keys);
                    }
                }
                toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
                    for v in a {
                        walk(prefix, v, keys);
                    }
                }
                _ => {
                    keys.insert(prefix.to_string());
                }
            }
        }
        walk("", &value, &mut keys);
        keys
    }

    #[test]
    fn readme_config_reference_lists_every_key() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"));
        let section = readme
            .split("## Configuration reference")
            .nth(1)
            .expect("README has a configuration reference")
            .split("\n## ")
            .next()
            .unwrap_or("");
        // Retired keys ("no longer used") are still accepted but not part of the default
        // config the comparison is made with.
        let documented: std::collections::BTreeSet<String> = section
            .lines()
            .filter(|l| !l.contains("no longer used"))
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_string)
            .collect();
        let accepted = accepted_keys();
        let missing: Vec<_> = accepted.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&accepted).collect();
        assert!(
            missing.is_empty(),
            "keys the code accepts but the README does not list: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "keys the README lists but the code rejects: {extra:?}"
        );
    }
}
