//! A stand-in for Apple: a real HTTP/2 server over TLS on loopback that checks requests the way
//! APNs does and answers with Apple's status codes and reasons.
//!
//! It serves `pushdrop simulate` (users' own integration tests), `pushdrop demo`, and every
//! test of the client and the sender. It generates its own CA, server and client certificates
//! and `.p8` keys at start; [`Simulator::write_credentials`] puts them where a config can
//! point at them.
//!
//! What it checks: the provider token (ES256 signature, `kid`, `iss`, age over an hour →
//! `ExpiredProviderToken`, a connection bound to its first key id → `UnrelatedKeyIdInToken`,
//! a token updated within 20 minutes on one connection → `TooManyProviderTokenUpdates`), or a
//! TLS client certificate signed by its CA; method and path; `apns-topic` against the push
//! type's suffix (and optional allowed bundle ids); `apns-push-type`; `apns-priority`;
//! `apns-expiration`; `apns-collapse-id` length; `apns-id` form; duplicated headers; the token's
//! hex form; the payload's JSON and size.
//!
//! What it can be told to do: per token ([`TokenScript`]: 410 with a timestamp, 400, failures
//! for the first N tries, slow answers, any fixed answer) and per connection ([`SimOptions`]:
//! GOAWAY after N streams, an abrupt drop after N streams, latency, one stream at a time until
//! the first authorised request).
//!
//! "One stream until authorised" (what APNs does for token auth) is said in SETTINGS: a
//! connection opened while the rule holds is announced a limit of one stream, raised to
//! `max_concurrent_streams` by a SETTINGS frame that goes out just before the first authorised
//! answer. The `h2` server cannot change its SETTINGS after the handshake, so [`limit`] edits
//! the frames between it and TLS. A client that opens streams beyond the limit anyway (or on a
//! connection opened before the rule was switched on) has them answered with
//! RST_STREAM(REFUSED_STREAM) until that answer has gone out.

pub(crate) mod certs;
mod limit;
mod script;
mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;

/// Writes a file of the simulator's folder as its credentials are written: left alone when
/// unchanged, else whole under a temporary name and renamed (a reader never sees half of it).
pub fn write_text_file(path: &Path, contents: &str) -> Result<(), SimError> {
    certs::write_file(path, contents, false)
}

/// The config snippet `pushdrop simulate` writes into its folder.
pub(crate) use certs::CONFIG_FILE;
/// A random 10-character id of the shape of Apple's key and team ids.
pub use certs::apple_id;
pub use script::{MAX_DELAY_MS, ScriptError, ScriptProblem, SimScript};

/// How the simulator behaves. `Default` gives a well-behaved APNs on `127.0.0.1:0`.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Added before every answer.
    pub latency: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (APNs: 1000; 0, a server that takes no request at
    /// all, only for tests).
    pub max_concurrent_streams: u32,
    /// Announce one stream (SETTINGS_MAX_CONCURRENT_STREAMS 1) until a request on the
    /// connection was authorised, and refuse a second concurrent stream until then.
    pub streams_one_until_authorized: bool,
    /// Send a graceful GOAWAY once a connection has carried this many streams.
    pub goaway_after: Option<u32>,
    /// Drop the TCP connection (no GOAWAY, no answers) when a stream arrives after this many.
    pub drop_after: Option<u32>,
    /// Refuse TLS handshakes without a client certificate signed by the simulator's CA.
    pub require_client_cert: bool,
    /// When not empty, topics must belong to one of these bundle ids (else `TopicDisallowed`).
    pub bundle_ids: Vec<String>,
    /// At most this many accepted pushes are kept for [`Simulator::accepted`]; counting goes on.
    pub record_limit: usize,
    /// Extra names for the server certificate beside `localhost`, `127.0.0.1` and `::1`.
    pub server_names: Vec<String>,
    /// Benchmarks only (off by default): append one line per accepted push to this file,
    /// `<UNIX time in ns> <token> <apns-id>`, so a drop-to-APNs latency can be measured from
    /// outside. `pushdrop simulate` sets it from the `PUSHDROP_SIM_ARRIVALS` variable.
    pub arrivals_file: Option<PathBuf>,
    /// A folder an earlier start wrote its credentials to ([`Simulator::write_credentials`]):
    /// the CA, `.p8` key (with its key and team ids) and client certificate found there are
    /// used again, so a config that trusted that start trusts this one. Made anew when any
    /// is missing or they do not belong together.
    pub kept_credentials: Option<PathBuf>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: Duration::ZERO,
            max_concurrent_streams: 1000,
            streams_one_until_authorized: false,
            goaway_after: None,
            drop_after: None,
            require_client_cert: false,
            bundle_ids: Vec::new(),
            record_limit: 1_000_000,
            server_names: Vec::new(),
            arrivals_file: None,
            kept_credentials: None,
        }
    }
}

/// Per-token behaviour, set with [`Simulator::script`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScript {
    /// 410 `Unregistered` with this `timestamp` (ms since the epoch); `None`: the moment of
    /// the answer, as Apple's "no longer valid as of" is never after it.
    Unregistered { timestamp_ms: Option<i64> },
    /// 410 `ExpiredToken`, the same way.
    ExpiredToken { timestamp_ms: Option<i64> },
    /// 400 `BadDeviceToken`.
    BadDeviceToken,
    /// The first `n` requests get `status`/`reason`, later ones are accepted.
    FailFirst { n: u32, status: u16, reason: String },
    /// Answer (normally) after this delay.
    Delay(Duration),
    /// Always this answer.
    Reason { status: u16, reason: String },
    /// What `then` says, after this delay: a slow error answer (a request timeout meeting a
    /// 503) as much as a slow normal one.
    Slow {
        delay: Duration,
        then: Box<TokenScript>,
    },
}

/// What the simulator answers a request under a token script: an error answer.
type ScriptedError = (u16, String, Option<i64>);

impl TokenScript {
    /// The delay before the answer, and the answer (`Ok`: the usual checks' answer) for the
    /// `seen`th request to the token.
    fn answer(&self, seen: u32) -> (Duration, Result<(), ScriptedError>) {
        let error = match self {
            TokenScript::Unregistered { timestamp_ms } => (
                410,
                "Unregistered".into(),
                Some(timestamp_ms.unwrap_or_else(crate::model::now_ms)),
            ),
            TokenScript::ExpiredToken { timestamp_ms } => (
                410,
                "ExpiredToken".into(),
                Some(timestamp_ms.unwrap_or_else(crate::model::now_ms)),
            ),
            TokenScript::BadDeviceToken => (400, "BadDeviceToken".into(), None),
            TokenScript::FailFirst { n, status, reason } => {
                if seen > *n {
                    return (Duration::ZERO, Ok(()));
                }
                (*status, reason.clone(), None)
            }
            TokenScript::Delay(d) => return (*d, Ok(())),
            TokenScript::Reason { status, reason } => (*status, reason.clone(), None),
            TokenScript::Slow { delay, then } => {
                let (d, answer) = then.answer(seen);
                return (*delay + d, answer);
            }
        };
        (Duration::ZERO, Err(error))
    }
}

/// A push the simulator answered with 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub token: String,
    pub apns_id: String,
    pub topic: String,
    pub push_type: String,
    pub priority: u8,
    pub expiration: Option<i64>,
    pub collapse_id: Option<String>,
    pub payload: Bytes,
    /// Which connection carried it (numbered from 1 per simulator).
    pub connection: u64,
    /// The key id of its provider token; `None` with certificate auth.
    pub key_id: Option<String>,
}

/// Files written by [`Simulator::write_credentials`].
#[derive(Debug, Clone)]
pub struct SimCredentials {
    /// The CA that signed the server and client certificates (for `[apns] ca_file`).
    pub ca_file: PathBuf,
    /// `AuthKey_<KEYID>.p8`, mode 600.
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
    /// A client certificate signed by the CA, for certificate auth.
    pub client_cert_file: PathBuf,
    /// Its private key, mode 600.
    pub client_key_file: PathBuf,
    /// Certificate and key in one PEM file (certificate auth without `key_file`).
    pub client_combined_file: PathBuf,
}

impl SimCredentials {
    /// The `[apns]` and `[[apps]]` sections of a pushdrop config that sends to the simulator
    /// at `url` as app `app` (bundle id `bundle_id`) with these credentials (token auth; the
    /// certificate alternative as a comment). Paths are written as TOML strings, escaped.
    pub fn config_sections(&self, url: &str, app: &str, bundle_id: &str) -> String {
        let q = |p: &std::path::Path| toml_string(&p.display().to_string());
        format!(
            "[apns]\nproduction_url = {url}\nsandbox_url = {url}\nca_file = {ca}\n\n\
             [[apps]]\nname = {app}\nbundle_id = {bundle}\n\
             token = {{ key_file = {key}, key_id = {kid}, team_id = {team} }}\n\
             # or: certificate = {{ cert_file = {cert}, key_file = {cert_key} }}\n",
            url = toml_string(url),
            ca = q(&self.ca_file),
            app = toml_string(app),
            bundle = toml_string(bundle_id),
            key = q(&self.key_file),
            kid = toml_string(&self.key_id),
            team = toml_string(&self.team_id),
            cert = q(&self.client_cert_file),
            cert_key = q(&self.client_key_file),
        )
    }
}

/// `s` as a TOML basic string; a JSON string is one for everything a path can hold.
pub(crate) fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// Files of an extra signing key from [`Simulator::add_token_key`].
#[derive(Debug, Clone)]
pub struct SimTokenKey {
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
}

/// Why the simulator could not start or write files.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("generating simulator credentials: {0}")]
    Cert(String),
    #[error("simulator TLS set-up: {0}")]
    Tls(String),
    #[error(
        "{dir} holds {files}, which the simulator did not write (it has no simulator-ids.toml): \
         it writes its CA, keys and config snippet under those names, so it will not use this \
         folder; give --dir a new or empty folder (or one an earlier `pushdrop simulate` wrote)"
    )]
    NotOurs { dir: PathBuf, files: String },
}

struct ScriptState {
    script: TokenScript,
    seen: u32,
}

/// Settings that tests may change while the simulator runs.
pub(crate) struct Live {
    latency_us: AtomicU64,
    goaway_after: AtomicU32,
    drop_after: AtomicU32,
    streams_one: AtomicBool,
    clock_skew_s: AtomicI64,
}

/// State shared by the accept loop and every connection.
pub(crate) struct Shared {
    pub(crate) keys: RwLock<HashMap<String, Arc<certs::TokenKey>>>,
    scripts: Mutex<HashMap<String, ScriptState>>,
    has_scripts: AtomicBool,
    accepted: Mutex<Vec<Accepted>>,
    pub(crate) accepted_total: AtomicU64,
    pub(crate) requests: AtomicUsize,
    pub(crate) connections: AtomicU64,
    pub(crate) open_connections: AtomicU64,
    pub(crate) record_limit: usize,
    pub(crate) bundle_ids: Vec<String>,
    pub(crate) max_streams: u32,
    pub(crate) live: Live,
    /// See [`SimOptions::arrivals_file`].
    arrivals: Option<Mutex<std::fs::File>>,
}

fn opt(n: u32) -> Option<u32> {
    (n != 0).then_some(n)
}

impl Shared {
    pub(crate) fn latency(&self) -> Duration {
        Duration::from_micros(self.live.latency_us.load(Ordering::Relaxed))
    }
    pub(crate) fn goaway_after(&self) -> Option<u32> {
        opt(self.live.goaway_after.load(Ordering::Relaxed))
    }
    pub(crate) fn drop_after(&self) -> Option<u32> {
        opt(self.live.drop_after.load(Ordering::Relaxed))
    }
    pub(crate) fn streams_one(&self) -> bool {
        self.live.streams_one.load(Ordering::Relaxed)
    }
    /// The simulator's idea of now, in UNIX seconds (tests skew it to age tokens).
    pub(crate) fn now_s(&self) -> i64 {
        crate::model::now_ms() / 1000 + self.live.clock_skew_s.load(Ordering::Relaxed)
    }

    /// The extra delay and the answer a token's script asks for: `Ok` to go on with the usual
    /// answer, or `Err((status, reason, timestamp))`.
    pub(crate) fn scripted(&self, token: &str) -> (Duration, Result<(), ScriptedError>) {
        if !self.has_scripts.load(Ordering::Relaxed) {
            return (Duration::ZERO, Ok(()));
        }
        let mut scripts = self.scripts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = scripts.get_mut(token) else {
            return (Duration::ZERO, Ok(()));
        };
        s.seen += 1;
        s.script.answer(s.seen)
    }

    pub(crate) fn record(&self, a: Accepted) {
        self.accepted_total.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = &self.arrivals {
            use std::io::Write as _;
            let ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let line = format!("{ns} {} {}\n", a.token, a.apns_id);
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            // One write per line, so a reader never sees half a line.
            let _ = f.write_all(line.as_bytes());
        }
        if self.record_limit == 0 {
            return;
        }
        let mut v = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < self.record_limit {
            v.push(a);
        }
    }
}

/// A running simulator. Dropping it (or [`Simulator::shutdown`]) stops it and closes every
/// connection abruptly.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    certs: certs::Certs,
    primary: Arc<certs::TokenKey>,
    /// The credentials are those of an earlier start ([`SimOptions::kept_credentials`]).
    reused: bool,
    /// Why an earlier start's credentials were not used again.
    not_kept: Option<certs::NotKept>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Simulator {
    /// Generates credentials, binds the listener and starts serving on the current runtime.
    pub async fn start(opts: SimOptions) -> Result<Simulator, SimError> {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        if !opts.listen.ip().is_unspecified() && !opts.listen.ip().is_loopback() {
            names.push(opts.listen.ip().to_string());
        }
        names.extend(opts.server_names.iter().cloned());
        let (kept, not_kept) = match opts.kept_credentials.as_deref() {
            None => (None, None),
            Some(dir) => match certs::load_kept(dir, &names)? {
                Ok(k) => (k, None),
                Err(why) => (None, Some(why)),
            },
        };
        let reused = kept.is_some();
        let (certs, primary) = match kept {
            Some((c, k)) => (c, Arc::new(k)),
            None => (certs::generate(&names)?, Arc::new(certs::token_key()?)),
        };
        let tls = server::tls_config(&certs, opts.require_client_cert)?;
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|e| SimError::Listen {
                addr: opts.listen,
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| SimError::Listen {
            addr: opts.listen,
            source: e,
        })?;
        let mut keys = HashMap::new();
        keys.insert(primary.key_id.clone(), primary.clone());
        let arrivals = match &opts.arrivals_file {
            None => None,
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| SimError::Io {
                        path: path.clone(),
                        source: e,
                    })?,
            )),
        };
        let shared = Arc::new(Shared {
            keys: RwLock::new(keys),
            scripts: Mutex::new(HashMap::new()),
            has_scripts: AtomicBool::new(false),
            accepted: Mutex::new(Vec::new()),
            accepted_total: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            connections: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            record_limit: opts.record_limit,
            bundle_ids: opts.bundle_ids.clone(),
            max_streams: opts.max_concurrent_streams,
            live: Live {
                latency_us: AtomicU64::new(opts.latency.as_micros() as u64),
                goaway_after: AtomicU32::new(opts.goaway_after.unwrap_or(0)),
                drop_after: AtomicU32::new(opts.drop_after.unwrap_or(0)),
                streams_one: AtomicBool::new(opts.streams_one_until_authorized),
                clock_skew_s: AtomicI64::new(0),
            },
            arrivals,
        });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(server::accept_loop(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            shared.clone(),
            stop_rx,
        ));
        tracing::debug!(event = "sim_bound", %addr, "APNs simulator bound");
        Ok(Simulator {
            addr,
            shared,
            certs,
            primary,
            reused,
            not_kept,
            stop,
            task: Some(task),
        })
    }

    /// Whether the credentials are an earlier start's ([`SimOptions::kept_credentials`]).
    pub fn credentials_reused(&self) -> bool {
        self.reused
    }

    /// Why the credentials an earlier start left in [`SimOptions::kept_credentials`] were
    /// made anew (a missing file, a key that does not match), so the user can tell.
    pub fn credentials_not_kept(&self) -> Option<&str> {
        self.not_kept.as_ref().map(|n| n.why.as_str())
    }

    /// The base URL for `[apns] production_url`/`sandbox_url`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the server certificate (PEM), for `[apns] ca_file`.
    pub fn ca_pem(&self) -> &str {
        &self.certs.ca_pem
    }

    /// The key id of the primary `.p8` key.
    pub fn key_id(&self) -> &str {
        &self.primary.key_id
    }

    /// The team id of the primary `.p8` key.
    pub fn team_id(&self) -> &str {
        &self.primary.team_id
    }

    /// Writes `ca.pem`, `AuthKey_<KEYID>.p8`, `client.pem`, `client-key.pem` and
    /// `client-combined.pem` into `dir` (created if missing); keys get mode 600.
    pub fn write_credentials(&self, dir: &Path) -> Result<SimCredentials, SimError> {
        std::fs::create_dir_all(dir).map_err(|e| SimError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let c = &self.certs;
        let creds = SimCredentials {
            ca_file: dir.join(certs::CA_FILE),
            key_file: dir.join(format!("AuthKey_{}.p8", self.primary.key_id)),
            key_id: self.primary.key_id.clone(),
            team_id: self.primary.team_id.clone(),
            client_cert_file: dir.join(certs::CLIENT_CERT_FILE),
            client_key_file: dir.join(certs::CLIENT_KEY_FILE),
            client_combined_file: dir.join(certs::CLIENT_COMBINED_FILE),
        };
        certs::write_file(&creds.ca_file, &c.ca_pem, false)?;
        certs::write_file(&dir.join(certs::CA_KEY_FILE), &c.ca_key_pem, true)?;
        let ids = certs::KeptIds {
            key_id: self.primary.key_id.clone(),
            team_id: self.primary.team_id.clone(),
        };
        let ids = toml::to_string(&ids).map_err(|e| SimError::Cert(format!("ids: {e}")))?;
        certs::write_file(&dir.join(certs::IDS_FILE), &ids, false)?;
        certs::write_file(&creds.key_file, &self.primary.p8_pem, true)?;
        // The key the earlier start wrote here is no one's any more: left, keys would pile up
        // beside the new one at each start that makes new credentials. Only that one: a key
        // file the simulator cannot tell it wrote is not its to delete.
        if let Some(old) = self.not_kept.as_ref().and_then(|n| n.old_key.as_ref())
            && *old != creds.key_file
        {
            let _ = std::fs::remove_file(old);
        }
        certs::write_file(&creds.client_cert_file, &c.client_cert_pem, false)?;
        certs::write_file(&creds.client_key_file, &c.client_key_pem, true)?;
        certs::write_file(
            &creds.client_combined_file,
            &format!("{}{}", c.client_cert_pem, c.client_key_pem),
            true,
        )?;
        Ok(creds)
    }

    /// Registers one more signing key (another team's, say) and writes its `.p8` into `dir`.
    pub fn add_token_key(&self, dir: &Path) -> Result<SimTokenKey, SimError> {
        let key = Arc::new(certs::token_key()?);
        std::fs::create_dir_all(dir).map_err(|e| SimError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let key_file = dir.join(format!("AuthKey_{}.p8", key.key_id));
        certs::write_file(&key_file, &key.p8_pem, true)?;
        let out = SimTokenKey {
            key_file,
            key_id: key.key_id.clone(),
            team_id: key.team_id.clone(),
        };
        self.shared
            .keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.key_id.clone(), key);
        Ok(out)
    }

    /// Sets (replaces) the behaviour for one device token.
    pub fn script(&self, token: &str, s: TokenScript) {
        let mut scripts = self
            .shared
            .scripts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        scripts.insert(
            token.to_ascii_lowercase(),
            ScriptState { script: s, seen: 0 },
        );
        self.shared.has_scripts.store(true, Ordering::Relaxed);
    }

    /// Removes every token script.
    pub fn clear_scripts(&self) {
        self.shared
            .scripts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Every push answered 200 (up to `record_limit`), in answer order.
    ///
    /// A push is noted once its 200 has been handed to HTTP/2 (so a push whose answer could
    /// not be sent is not in here), which means a client can hold its 200 a moment before the
    /// push appears: wait for [`Simulator::accepted_count`] to reach what you expect.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.shared
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many pushes were answered 200 (also beyond `record_limit`).
    pub fn accepted_count(&self) -> u64 {
        self.shared.accepted_total.load(Ordering::Relaxed)
    }

    /// Every request seen, whatever the answer (refused streams included).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// TLS connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// HTTP/2 connections open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// Latency before every answer, from now on.
    pub fn set_latency(&self, d: Duration) {
        self.shared
            .live
            .latency_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// GOAWAY after this many streams, for connections opened from now on.
    pub fn set_goaway_after(&self, n: Option<u32>) {
        self.shared
            .live
            .goaway_after
            .store(n.unwrap_or(0), Ordering::Relaxed);
    }

    /// Abrupt drop after this many streams, for connections opened from now on.
    pub fn set_drop_after(&self, n: Option<u32>) {
        self.shared
            .live
            .drop_after
            .store(n.unwrap_or(0), Ordering::Relaxed);
    }

    /// One stream until authorised, for connections opened from now on.
    pub fn set_streams_one_until_authorized(&self, on: bool) {
        self.shared.live.streams_one.store(on, Ordering::Relaxed);
    }

    /// Moves the simulator's clock (token ages) by `secs` from real time.
    pub fn set_clock_skew(&self, secs: i64) {
        self.shared.live.clock_skew_s.store(secs, Ordering::Relaxed);
    }

    /// Stops listening and drops every connection.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
