//! Helpers of the operations tests: a deployment-like temp folder whose config points at a
//! running APNs simulator, the daemon in-process or the real binary, a tiny HTTP client for
//! the admin endpoint and the OpenMetrics parser.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use pushdrop::config::Config;
use pushdrop::daemon::Daemon;
use pushdrop::simulator::{SimCredentials, SimOptions, Simulator};

// Re-exported for the ops tests; each test file uses a few of them.
#[allow(unused_imports)]
pub use super::inbox::{APP, BUNDLE, device, notification, token, wait_for};

/// Knobs of the config an [`Ops`] writes.
#[derive(Clone)]
pub struct OpsOptions {
    /// `[admin] listen`; `127.0.0.1:0` for in-process tests, `""` for the binary.
    pub admin: String,
    pub shutdown_grace_ms: u64,
    pub max_in_flight: usize,
    pub sim: SimOptions,
}

impl Default for OpsOptions {
    fn default() -> Self {
        OpsOptions {
            admin: "127.0.0.1:0".into(),
            shutdown_grace_ms: 10_000,
            max_in_flight: 1000,
            sim: SimOptions::default(),
        }
    }
}

/// A simulator (served by a runtime of its own, so that tests can stay synchronous like the
/// daemon's API) and a folder laid out like a deployment:
/// `pushdrop.toml`, `inbox/`, `staging/`, `var/pushdrop.db`, `receipts/`, `log/`.
pub struct Ops {
    // Field order is drop order: the simulator stops before its runtime goes away.
    pub sim: Simulator,
    pub rt: tokio::runtime::Runtime,
    pub creds: SimCredentials,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub inbox: PathBuf,
    pub staging: PathBuf,
    pub db: PathBuf,
    pub receipts: PathBuf,
    pub log: PathBuf,
}

impl Ops {
    pub fn new(o: OpsOptions) -> Ops {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-simulator")
            .enable_all()
            .build()
            .unwrap();
        let sim = rt
            .block_on(Simulator::start(o.sim.clone()))
            .expect("simulator starts");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let creds = sim.write_credentials(&root.join("simulator")).unwrap();
        for d in ["inbox", "staging", "var", "receipts", "log"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let text = format!(
            r#"[inbox]
dir = "inbox"
settle_ms = 200

[store]
path = "var/pushdrop.db"

{sections}
[sender]
max_in_flight = {in_flight}
retry_initial_ms = 100
retry_max_ms = 1000
shutdown_grace_ms = {grace}

[receipts]
dir = "receipts"

[log]
dir = "log"
format = "json"
level = "info"

[admin]
listen = "{admin}"
"#,
            sections = creds.config_sections(&sim.url(), APP, BUNDLE),
            in_flight = o.max_in_flight,
            grace = o.shutdown_grace_ms,
            admin = o.admin,
        );
        let config_path = root.join("pushdrop.toml");
        std::fs::write(&config_path, text).unwrap();
        Ops {
            sim,
            rt,
            creds,
            config_path,
            inbox: root.join("inbox"),
            staging: root.join("staging"),
            db: root.join("var/pushdrop.db"),
            receipts: root.join("receipts"),
            log: root.join("log"),
            dir,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        super::inbox::load_config(&self.config_path)
    }

    /// The daemon in-process.
    pub fn start(&self) -> Daemon {
        super::inbox::start_daemon(&self.config_path)
    }

    /// Drops a file the recommended way: written in `staging/`, renamed into the inbox.
    pub fn drop_file(&self, name: &str, content: impl AsRef<[u8]>) {
        self.drop_file_written_at(name, content, SystemTime::now());
    }

    /// Same, with the mtime (when the dropper wrote it) set to `at`.
    pub fn drop_file_written_at(&self, name: &str, content: impl AsRef<[u8]>, at: SystemTime) {
        let tmp = self.staging.join(name);
        std::fs::write(&tmp, content).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(at)
            .unwrap();
        std::fs::rename(&tmp, self.inbox.join(name)).unwrap();
    }

    /// Drop files still waiting in the inbox.
    pub fn inbox_pending(&self) -> usize {
        std::fs::read_dir(&self.inbox)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .count()
    }

    /// A read-only connection to the database.
    pub fn db(&self) -> rusqlite::Connection {
        open_ro(&self.db)
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |r| r.get(0)).expect(sql)
    }

    /// Runs the binary with this config.
    pub fn pushdrop(&self, args: &[&str]) -> std::process::Output {
        pushdrop_cmd(&self.config_path)
            .args(args)
            .output()
            .expect("run pushdrop")
    }
}

/// A process a test spawned: killed when the test ends, passed or failed half-way, unless the
/// test took it back to stop it its own way.
pub struct Spawned(Option<std::process::Child>);

impl Spawned {
    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("not taken").id()
    }

    /// The child, no longer killed on drop.
    pub fn take(&mut self) -> std::process::Child {
        self.0.take().expect("taken once")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `cmd` with no stdin and its stdout and stderr into the file `log`.
pub fn spawn_logged(cmd: &mut std::process::Command, log: &Path) -> Spawned {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    Spawned(Some(child))
}

/// The binary with `--config path`.
pub fn pushdrop_cmd(config: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pushdrop"));
    c.arg("--config").arg(config);
    c
}

/// A read-only connection to a database file.
pub fn open_ro(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// An answer of the admin endpoint.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// A plain HTTP/1.1 request, the way a probe or Prometheus asks (`Connection: close`).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> HttpReply {
    http_with(addr, method, path, "")
}

/// `/metrics` as Prometheus asks for it: OpenMetrics first.
pub fn get_open_metrics(addr: SocketAddr) -> HttpReply {
    http_with(
        addr,
        "GET",
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    )
}

/// As [`http`], with extra header lines (each ending in `\r\n`).
pub fn http_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> HttpReply {
    let mut s = TcpStream::connect(addr).expect("connect to the admin endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let raw = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpReply {
        status,
        content_type,
        body,
    }
}

pub fn get(addr: SocketAddr, path: &str) -> HttpReply {
    http(addr, "GET", path)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size");
        let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

pub type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// Parses `/metrics` with a strict OpenMetrics parser (it requires `# EOF`, `_total` on
/// counters, one TYPE per family...).
pub fn parse_metrics(text: &str) -> Exposition {
    openmetrics_parser::openmetrics::parse_openmetrics(text)
        .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics: {e:?}\n{text}"))
}

/// The value of the one sample of a family (name without `_total`) whose labels match;
/// `None` when there is none. Histograms give their count.
pub fn sample(expo: &Exposition, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    family_of(expo, family)
        .iter_samples()
        .find(|s| matches(s, labels))
        .map(|s| value_of(&s.value))
}

/// The type a family was declared with.
pub fn family_type(expo: &Exposition, family: &str) -> OpenMetricsType {
    family_of(expo, family).family_type
}

fn family_of<'a>(
    expo: &'a Exposition,
    family: &str,
) -> &'a openmetrics_parser::MetricFamily<OpenMetricsType, OpenMetricsValue> {
    expo.families
        .get(family)
        .unwrap_or_else(|| panic!("no metric family {family}"))
}

fn matches(s: &openmetrics_parser::Sample<OpenMetricsValue>, labels: &[(&str, &str)]) -> bool {
    let set = s.get_labelset().expect("labels");
    labels
        .iter()
        .all(|(k, v)| set.get_label_value(k) == Some(*v))
}

/// The sum of every sample of a family whose labels match.
pub fn sum(expo: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    family_of(expo, family)
        .iter_samples()
        .filter(|s| matches(s, labels))
        .map(|s| value_of(&s.value))
        .sum()
}

fn value_of(v: &OpenMetricsValue) -> f64 {
    match v {
        OpenMetricsValue::Counter(c) => c.value.as_f64(),
        OpenMetricsValue::Gauge(g) | OpenMetricsValue::Unknown(g) => g.as_f64(),
        OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
        other => panic!("unexpected metric value {other:?}"),
    }
}
