//! The connections of one (app, environment): opened lazily, multiplexed, replaced after
//! GOAWAY or errors, probed with PINGs when idle, and never more than `[apns] connections`.
//!
//! Stream accounting is ours, not h2's: h2 assumes a generous stream limit until the server's
//! SETTINGS arrive and queues excess streams silently, while APNs (token auth) allows one
//! stream until the first request is authorised. So each connection allows one stream until it
//! has answered something other than an authentication error, then follows the server's
//! SETTINGS_MAX_CONCURRENT_STREAMS (`current_max_send_streams`). Callers beyond the capacity
//! wait on a [`Notify`], bounded by their deadline and by [`MAX_WAITERS`].

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::{ResponseFuture, SendRequest};
use h2::{Ping, PingPong, Reason};
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::auth::{Jwt, MIN_TOKEN_AGE, TokenSigner};
use super::outcome::{Outcome, goaway_reason};
use super::sniff::{Signals, Sniffer};
use super::{ApnsError, proxy, tls};

/// How long, once a request's timeout has passed, an answer that may already be in the
/// socket is still waited for.
const STALL_GRACE: Duration = Duration::from_millis(500);

/// Requests allowed to wait for a stream in one pool; more get `Retry` at once.
pub(crate) const MAX_WAITERS: usize = 65_536;
/// A cap on what a server may announce as its stream limit.
const MAX_STREAMS_PER_CONN: usize = 10_000;
/// First reconnect delay after a failure; doubled per failure, with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where a pool connects to.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub host: String,
    pub port: u16,
    pub authority: http::uri::Authority,
    pub server_name: ServerName<'static>,
}

impl Endpoint {
    pub fn parse(key: &str, url: &str) -> Result<Endpoint, ApnsError> {
        let bad = |message: String| ApnsError::Config {
            key: key.into(),
            message,
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| bad(format!("{url:?} is not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad(format!("{url:?} must start with https://")));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| bad(format!("{url:?} has no host")))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| bad(format!("{host:?} is not a host name: {e}")))?;
        Ok(Endpoint {
            host,
            port,
            authority,
            server_name,
        })
    }
}

/// Why a connection ended when its driver task vanished without reporting (runtime shutdown).
const DRIVER_GONE: &str = "connection task ended";

/// How the pool's connections authenticate.
pub(crate) enum PoolAuth {
    Token(Arc<TokenSigner>),
    Certificate(crate::config::CertificateAuthConfig),
}

/// Settings shared by every pool of a client.
pub(crate) struct Shared {
    pub roots: Arc<RootCertStore>,
    /// The TLS config of token-auth connections (no client certificate), built once.
    pub token_tls: Arc<rustls::ClientConfig>,
    /// `host:port` of the CONNECT proxy.
    pub proxy: Option<String>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    /// Connections opened by this client (tests check "never a connection per request").
    pub connects: AtomicU64,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// One HTTP/2 connection.
pub(crate) struct Conn {
    pub id: u64,
    slot: usize,
    send: SendRequest<Bytes>,
    in_flight: AtomicUsize,
    authorised: AtomicBool,
    /// GOAWAY seen (by the frame sniffer) or retired by the pool.
    signals: Arc<Signals>,
    /// Asks the supervisor for an immediate PING (after a request timed out).
    check: Notify,
    /// Milliseconds since `born` of the last finished request.
    last_active_ms: AtomicU64,
    /// Milliseconds since `born` of the last answer APNs gave on it, plus one (0: none yet).
    last_answer_ms: AtomicU64,
    born: Instant,
    driver: tokio::task::AbortHandle,
    /// The provider token this connection sends (token auth), and whether APNs called it
    /// expired here. APNs tracks tokens per connection and answers
    /// `TooManyProviderTokenUpdates` when a connection's token changes within 20 minutes
    /// unless it called the old one expired: a token minted at once for another connection's
    /// `ExpiredProviderToken` waits here until this connection may take it.
    token: Mutex<Pinned>,
    token_expired: AtomicBool,
}

/// A connection's provider token, and when it last changed to another (`None` while it sends
/// its first): APNs counts changes per connection, at most one per 20 minutes.
#[derive(Default)]
struct Pinned {
    jwt: Option<Arc<Jwt>>,
    changed_at: Option<Instant>,
}

impl Conn {
    /// The provider token for the next request on this connection: the signer's current one,
    /// unless this connection sends an older one that it may not yet replace (see `token`).
    pub(crate) fn token(&self, signer: &TokenSigner) -> Result<Arc<Jwt>, ApnsError> {
        let current = signer.current()?;
        let mut pinned = self.token.lock().unwrap_or_else(|p| p.into_inner());
        let changed_at = pinned.changed_at;
        if let Some(p) = pinned.jwt.as_ref()
            && p.generation != current.generation
        {
            // A change: 20 minutes newer, and 20 minutes after this connection's last change
            // (a token adopted late, after an idle spell, must not be replaced by the next
            // forced refresh at once); unless APNs called this connection's token expired.
            let too_soon = current
                .issued
                .duration_since(p.issued)
                .map_or(true, |newer| newer < MIN_TOKEN_AGE)
                || changed_at.is_some_and(|at| at.elapsed() < MIN_TOKEN_AGE);
            if too_soon && !self.token_expired.load(Ordering::Acquire) {
                return Ok(p.clone());
            }
            pinned.changed_at = Some(Instant::now());
        }
        self.token_expired.store(false, Ordering::Release);
        pinned.jwt = Some(current.clone());
        Ok(current)
    }

    /// APNs answered `ExpiredProviderToken` to this connection's token: it takes the next one.
    pub(crate) fn token_expired(&self) {
        self.token_expired.store(true, Ordering::Release);
    }

    /// The streams it may carry at once. A server that announces 0 gets none: `h2` would
    /// hold such a request unsent until it timed out, and spend its attempt.
    fn limit(&self) -> usize {
        let announced = self.send.current_max_send_streams();
        if self.authorised.load(Ordering::Acquire) {
            announced.min(MAX_STREAMS_PER_CONN)
        } else {
            announced.min(1)
        }
    }

    fn is_closing(&self) -> bool {
        self.signals.closing.load(Ordering::Acquire)
    }

    /// Until when requests may wait for its streams without a deadline of their own: `window`
    /// after APNs last answered on it (or after it opened). While it answers, its streams
    /// free up; one whose streams all hang is not one to queue behind.
    fn progress_until(&self, window: Duration) -> Instant {
        self.born + Duration::from_millis(self.last_answer_ms.load(Ordering::Relaxed)) + window
    }
}

#[derive(Default)]
struct Slot {
    conn: Option<Arc<Conn>>,
    connecting: bool,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Outcome>,
    /// The last try to open a connection failed (APNs unreachable, not a connection that
    /// broke): requests then take the error at once instead of waiting out the back-off, and
    /// the sender's pause decides when to try again (see [`super::ApnsClient::connect_by`]).
    connect_failed: bool,
    opened_before: bool,
    /// When APNs last refused the credentials on this slot's connection, and the pause that
    /// means: requests that began before then take it instead of each opening a connection
    /// of its own to be refused in turn (an unauthorised connection carries one stream at a
    /// time).
    refused: Option<(Instant, Outcome)>,
}

struct State {
    slots: Vec<Slot>,
    closed: bool,
}

/// The connections of one app and environment.
pub(crate) struct Pool {
    /// `app/environment`, for logs.
    pub label: String,
    pub endpoint: Endpoint,
    pub auth: PoolAuth,
    shared: Arc<Shared>,
    state: Mutex<State>,
    notify: Notify,
    waiting: AtomicUsize,
    /// Set when the sender stops: requests still waiting for a stream are not sent.
    closing: AtomicBool,
}

/// A stream slot on a connection, held from before the request is written until its answer
/// is read.
pub(crate) struct Lease {
    pub conn: Arc<Conn>,
    pool: Arc<Pool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let c = &self.conn;
        c.last_active_ms
            .store(c.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        // The last request on a retired connection: its supervisor may close it now.
        if c.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && c.is_closing() {
            c.check.notify_one();
        }
        if self.pool.waiting.load(Ordering::SeqCst) > 0 {
            self.pool.notify.notify_one();
        }
    }
}

/// What became of one request on the wire.
pub(crate) enum Exchange {
    /// APNs answered.
    Answer {
        status: u16,
        apns_id: Option<String>,
        body: Bytes,
    },
    /// The request never left (refused stream, connection already unusable): safe to resend
    /// at once on another stream.
    NotSent(String),
    /// Above a graceful GOAWAY's last stream id: unprocessed, to be resent by the caller.
    GoAway(String),
    /// No answer before the deadline.
    Timeout,
    /// The connection broke under the request; `pause` when it was a TLS alert (credentials);
    /// `collateral` when the connection (closed or reset, no GOAWAY) had answered requests
    /// before: it worked until it broke, and this request went down with it.
    Broken {
        reason: String,
        pause: bool,
        collateral: bool,
    },
}

/// How far a connection attempt got, said when it runs out of `connect_timeout_ms`: "took
/// over 10000 ms" alone does not tell a proxy that never answers CONNECT from a server (or a
/// tunnel) that hangs in the TLS handshake, and the two are fixed in different places.
#[repr(u8)]
enum Step {
    Tcp,
    ProxyAnswer,
    Tls,
    Http2,
}

impl Step {
    fn said(step: u8, proxy: bool) -> &'static str {
        match step {
            s if s == Step::Tcp as u8 && proxy => "the proxy did not take the TCP connection",
            s if s == Step::Tcp as u8 => "no TCP connection was made",
            s if s == Step::ProxyAnswer as u8 => {
                "the proxy took the connection but did not answer CONNECT"
            }
            s if s == Step::Tls as u8 => "the TLS handshake did not finish",
            _ => "the server did not answer the HTTP/2 handshake",
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let d = exp.min(BACKOFF_MAX);
    d.mul_f64(rand::random_range(0.5..1.5))
}

/// An error's text without the link to a library's manual that rustls appends ("peer closed
/// connection without sending TLS close_notify: https://docs.rs/rustls/..."): a reason is
/// read by operators, in logs, `show` and receipts.
fn without_doc_link(text: &str) -> String {
    match text.find(": https://docs.rs/") {
        Some(at) => text[..at].to_string(),
        None => text.to_string(),
    }
}

/// A TLS alert from the server after the handshake (TLS 1.3 reports a rejected client
/// certificate that way) shows up only as text once h2 has wrapped it.
fn is_tls_alert(text: &str) -> bool {
    text.contains("received fatal alert") || text.contains("peer sent")
}

impl Pool {
    pub fn new(
        label: String,
        endpoint: Endpoint,
        auth: PoolAuth,
        shared: Arc<Shared>,
        connections: usize,
    ) -> Pool {
        Pool {
            label,
            endpoint,
            auth,
            shared,
            state: Mutex::new(State {
                slots: (0..connections.max(1)).map(|_| Slot::default()).collect(),
                closed: false,
            }),
            notify: Notify::new(),
            closing: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
        }
    }

    /// `[apns] request_timeout_ms`.
    pub fn request_timeout(&self) -> Duration {
        self.shared.request_timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves State consistent; a panic elsewhere must not stop sends.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes every connection; called when the client is dropped.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        for slot in &mut st.slots {
            if let Some(c) = slot.conn.take() {
                c.signals.closing.store(true, Ordering::Release);
                c.driver.abort();
            }
        }
        drop(st);
        self.notify.notify_waiters();
    }

    /// Waits for a free stream (opening connections as needed) for a request that began at
    /// `began`, until `deadline`. A wait for a stream on open connections that all carry as
    /// many as APNs allows has no end of its own while APNs answers on one of them (within
    /// the request timeout): a slow APNs that caps the streams (one per connection until it
    /// authorises a token) is not an unreachable one. Once none answers, `deadline` holds.
    pub async fn acquire(
        self: &Arc<Self>,
        began: Instant,
        deadline: Instant,
    ) -> Result<Lease, Outcome> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= MAX_WAITERS {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Outcome::Retry {
                status: None,
                reason: format!("{MAX_WAITERS} requests already wait for an HTTP/2 stream"),
                unsent: true,
            });
        }
        let _waiting = Waiting(&self.waiting);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.closing.load(Ordering::SeqCst) {
                return Err(Outcome::Retry {
                    status: None,
                    reason: "the daemon is stopping: not sent".into(),
                    unsent: true,
                });
            }
            let wait_until = match self.try_acquire(began) {
                Ok(lease) => return Ok(lease),
                Err(Wait::Until(t)) => t,
                Err(Wait::Notified) => deadline,
                Err(Wait::Streams(until)) => {
                    let _ = tokio::time::timeout_at(until, notified).await;
                    continue;
                }
                Err(Wait::Fail(o)) => return Err(o),
            };
            if let Some(o) = self.backoff_error(deadline) {
                return Err(o);
            }
            if Instant::now() >= deadline {
                // Nothing free, and no connection that answers: those open (a server that
                // allows no stream, or whose streams all hang) are replaced, so that the next
                // try connects anew.
                self.retire_silent();
                return Err(Outcome::Retry {
                    status: None,
                    reason: format!(
                        "no HTTP/2 stream to {} free within {} ms",
                        self.endpoint.authority,
                        self.shared.request_timeout.as_millis()
                    ),
                    unsent: true,
                });
            }
            // Woken or not, everything is looked at again: a connection may have answered.
            let _ = tokio::time::timeout_at(wait_until.min(deadline), notified).await;
        }
    }

    /// Retires the open connections that gave no answer within the request timeout (none
    /// since they opened, or none for that long while requests waited for them).
    fn retire_silent(&self) {
        let now = Instant::now();
        let silent: Vec<Arc<Conn>> = self
            .lock()
            .slots
            .iter()
            .filter_map(|s| s.conn.clone())
            .filter(|c| !c.is_closing() && c.progress_until(self.shared.request_timeout) <= now)
            .collect();
        for c in silent {
            self.retire_stalled(&c, "no answer and no free stream");
        }
    }

    /// Takes a connection APNs stopped answering on out of service, with the back-off of a
    /// broken one: its requests in flight run out their own timeouts, new ones go to a new
    /// connection, and while every new one hangs too, requests are held unsent (the app
    /// pauses as unreachable) instead of each spending an attempt on a connection that
    /// answers nothing.
    fn retire_stalled(&self, conn: &Conn, what: &str) {
        let reason = format!(
            "{what} from APNs on this connection within {} ms",
            self.shared.request_timeout.as_millis()
        );
        tracing::warn!(event = "apns_connection_stalled", pool = %self.label, conn = conn.id, %reason, "APNs stopped answering on a connection; opening another");
        self.retire(conn, Some(reason));
    }

    /// See [`super::ApnsClient::close_to_new_requests`].
    pub fn close_to_new_requests(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// See [`super::ApnsClient::connect_by`]: slots backing off past `at` try again at `at`.
    pub fn connect_by(&self, at: Instant) {
        let mut st = self.lock();
        for slot in &mut st.slots {
            if slot.retry_at.is_some_and(|t| t > at) {
                slot.retry_at = Some(at);
            }
        }
    }

    /// When every slot is backing off past `deadline`, or after a failed connect: the error
    /// that put it there.
    fn backoff_error(&self, deadline: Instant) -> Option<Outcome> {
        let st = self.lock();
        let mut err = None;
        for slot in &st.slots {
            if slot.conn.as_ref().is_some_and(|c| !c.is_closing()) || slot.connecting {
                return None;
            }
            match slot.retry_at {
                Some(t) if t >= deadline || slot.connect_failed => err = slot.last_error.clone(),
                _ => return None,
            }
        }
        err.map(|e| match e {
            Outcome::Retry { status, reason, .. } => Outcome::Retry {
                status,
                reason,
                unsent: true,
            },
            other => other,
        })
    }

    fn try_acquire(self: &Arc<Self>, began: Instant) -> Result<Lease, Wait> {
        let mut st = self.lock();
        if st.closed {
            return Err(Wait::Fail(Outcome::Retry {
                status: None,
                reason: "APNs client is shutting down".into(),
                unsent: true,
            }));
        }
        let mut best: Option<(&Arc<Conn>, usize, usize)> = None;
        let mut spare = 0usize;
        let mut progress_until: Option<Instant> = None;
        for slot in &st.slots {
            let Some(c) = &slot.conn else { continue };
            if c.is_closing() {
                continue;
            }
            progress_until =
                progress_until.max(Some(c.progress_until(self.shared.request_timeout)));
            let limit = c.limit();
            let n = c.in_flight.load(Ordering::SeqCst);
            if n < limit {
                spare += limit - n;
                if best.is_none_or(|(_, bn, _)| n < bn) {
                    best = Some((c, n, limit));
                }
            }
        }
        if let Some((c, _, _)) = best {
            c.in_flight.fetch_add(1, Ordering::SeqCst);
            let lease = Lease {
                conn: c.clone(),
                pool: self.clone(),
            };
            if spare > 1 && self.waiting.load(Ordering::SeqCst) > 1 {
                // Pass the baton: another waiter can have a stream too.
                self.notify.notify_one();
            }
            return Ok(lease);
        }
        // Nothing free: open connections in empty slots (lazily, one at a time per slot).
        let now = Instant::now();
        let mut live = false;
        let mut pause = None;
        let mut earliest: Option<Instant> = None;
        for i in 0..st.slots.len() {
            let slot = &mut st.slots[i];
            if slot.conn.as_ref().is_some_and(|c| !c.is_closing()) || slot.connecting {
                live = true;
                continue;
            }
            if let Some((at, o)) = &slot.refused
                && began <= *at
            {
                pause = Some(o.clone());
                continue;
            }
            if let Some(t) = slot.retry_at
                && t > now
            {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
                if let Some(e @ Outcome::PauseApp { .. }) = &slot.last_error {
                    pause = Some(e.clone());
                }
                continue;
            }
            slot.connecting = true;
            live = true;
            let pool = self.clone();
            tokio::spawn(async move { pool.connect_slot(i).await });
        }
        if let Some(until) = progress_until.filter(|&t| t > now) {
            return Err(Wait::Streams(until));
        }
        if live {
            return Err(Wait::Notified);
        }
        if let Some(p) = pause {
            // Credentials are wrong: waiting for the back-off would only delay the pause.
            return Err(Wait::Fail(p));
        }
        Err(earliest.map_or(Wait::Notified, Wait::Until))
    }

    async fn connect_slot(self: Arc<Self>, i: usize) {
        /// Should this task die (a panic in a dependency), the slot must not stay
        /// "connecting" forever.
        struct Reset<'a>(&'a Pool, usize, bool);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                if self.2 {
                    self.0.lock().slots[self.1].connecting = false;
                    self.0.notify.notify_waiters();
                }
            }
        }
        let mut reset = Reset(&self, i, true);
        let step = AtomicU8::new(Step::Tcp as u8);
        let result =
            match tokio::time::timeout(self.shared.connect_timeout, self.open(i, &step)).await {
                Ok(r) => r,
                Err(_) => Err(Outcome::Retry {
                    status: None,
                    reason: format!(
                        "connecting to {}{} took over {} ms: {}",
                        self.endpoint.authority,
                        self.via(),
                        self.shared.connect_timeout.as_millis(),
                        Step::said(step.load(Ordering::Relaxed), self.shared.proxy.is_some())
                    ),
                    unsent: true,
                }),
            };
        reset.2 = false;
        drop(reset);
        let mut st = self.lock();
        let closed = st.closed;
        let slot = &mut st.slots[i];
        slot.connecting = false;
        match result {
            Ok((conn, ping, done)) => {
                if closed {
                    conn.driver.abort();
                } else {
                    if slot.opened_before {
                        crate::metrics::get().reconnects.inc();
                    }
                    slot.opened_before = true;
                    slot.retry_at = None;
                    slot.last_error = None;
                    slot.connect_failed = false;
                    slot.conn = Some(conn.clone());
                    self.shared.connects.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::get().connections_open.inc();
                    tracing::debug!(pool = %self.label, conn = conn.id, "APNs connection open");
                    let pool = self.clone();
                    tokio::spawn(async move { pool.supervise(conn, ping, done).await });
                }
            }
            Err(outcome) => {
                slot.failures += 1;
                let delay = backoff(slot.failures);
                slot.retry_at = Some(Instant::now() + delay);
                slot.connect_failed = true;
                tracing::warn!(
                    event = "apns_connect_failed",
                    pool = %self.label,
                    failures = slot.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    reason = outcome.reason(),
                    "cannot connect to APNs"
                );
                slot.last_error = Some(outcome);
            }
        }
        drop(st);
        self.notify.notify_waiters();
    }

    /// TCP (maybe through the proxy), TLS, HTTP/2 preface and one PING round trip: a
    /// connection is usable only once the server has answered, so a rejected client
    /// certificate (which TLS 1.3 reports after the handshake) is a connect error.
    async fn open(
        &self,
        slot: usize,
        step: &AtomicU8,
    ) -> Result<
        (
            Arc<Conn>,
            PingPong,
            oneshot::Receiver<Result<(), h2::Error>>,
        ),
        Outcome,
    > {
        let ep = &self.endpoint;
        let tcp = match &self.shared.proxy {
            Some(p) => {
                proxy::connect(p, &ep.host, ep.port, || {
                    step.store(Step::ProxyAnswer as u8, Ordering::Relaxed)
                })
                .await
            }
            None => tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)).await,
        }
        .map_err(|e| Outcome::Retry {
            status: None,
            reason: match &self.shared.proxy {
                Some(p) => format!("cannot reach {} through proxy {p}: {e}", ep.authority),
                None => format!("cannot connect to {}: {e}", ep.authority),
            },
            unsent: true,
        })?;
        // Latency matters more than packet count for small pushes.
        let _ = tcp.set_nodelay(true);
        step.store(Step::Tls as u8, Ordering::Relaxed);
        let tls_config = match &self.auth {
            PoolAuth::Token(_) => self.shared.token_tls.clone(),
            PoolAuth::Certificate(c) => tls::client_config(self.shared.roots.clone(), Some(c))
                .map_err(|e| Outcome::PauseApp {
                    status: None,
                    reason: e.to_string(),
                })?,
        };
        let tls = tokio_rustls::TlsConnector::from(tls_config)
            .connect(ep.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                let tls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
                match tls_error {
                    // The server refused the handshake (a client certificate it does not
                    // take): the app's credentials, as SPEC 4.3 pauses for.
                    Some(rustls::Error::AlertReceived(_)) => Outcome::PauseApp {
                        status: None,
                        reason: self.tls_reason(&e.to_string()),
                    },
                    // Anything else is TLS trouble on the way (a server certificate this side
                    // does not trust, no TLS at that port): APNs is unreachable from here.
                    Some(_) => Outcome::Retry {
                        status: None,
                        reason: self.tls_reason(&e.to_string()),
                        unsent: true,
                    },
                    None => Outcome::Retry {
                        status: None,
                        reason: format!(
                            "TLS handshake with {}{} failed: {e}",
                            ep.authority,
                            self.via()
                        ),
                        unsent: true,
                    },
                }
            })?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(Outcome::PauseApp {
                status: None,
                reason: format!(
                    "{} does not speak HTTP/2 (no ALPN h2): is the APNs URL right?",
                    ep.authority
                ),
            });
        }
        step.store(Step::Http2 as u8, Ordering::Relaxed);
        let signals = Arc::new(Signals::default());
        let tls = Sniffer::new(tls, signals.clone());
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 22)
            .max_concurrent_reset_streams(1024)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| self.broken_outcome(&e.to_string()))?;
        let Some(mut ping) = connection.ping_pong() else {
            unreachable!("ping_pong is taken once, here")
        };
        let (done_tx, mut done_rx) = oneshot::channel();
        let driver = tokio::spawn(async move {
            let _ = done_tx.send(connection.await);
        });
        let first = tokio::select! {
            r = ping.ping(Ping::opaque()) => r.map_err(|e| (e.to_string(), false)),
            d = &mut done_rx => Err((match d {
                Ok(Err(e)) => e.to_string(),
                _ => "connection closed before it answered".to_string(),
            }, true)),
        };
        if let Err((mut text, driver_done)) = first {
            // The PING error is generic; the driver's own error says why (TLS alert?).
            if !driver_done
                && let Ok(Ok(Err(e))) =
                    tokio::time::timeout(Duration::from_millis(500), &mut done_rx).await
            {
                text = e.to_string();
            }
            driver.abort();
            return Err(self.broken_outcome(&text));
        }
        let conn = Arc::new(Conn {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            slot,
            send,
            in_flight: AtomicUsize::new(0),
            authorised: AtomicBool::new(false),
            signals,
            check: Notify::new(),
            last_active_ms: AtomicU64::new(0),
            last_answer_ms: AtomicU64::new(0),
            born: Instant::now(),
            driver: driver.abort_handle(),
            token: Mutex::default(),
            token_expired: AtomicBool::new(false),
        });
        Ok((conn, ping, done_rx))
    }

    /// " through proxy …" when connections go through one: a failure's reason names it.
    fn via(&self) -> String {
        self.shared
            .proxy
            .as_ref()
            .map(|p| format!(" through proxy {p}"))
            .unwrap_or_default()
    }

    fn tls_reason(&self, detail: &str) -> String {
        let mut s = match &self.auth {
            PoolAuth::Certificate(crate::config::CertificateAuthConfig { cert_file, .. }) => {
                format!(
                    "TLS with {} failed using client certificate {}: {detail}",
                    self.endpoint.authority,
                    cert_file.display()
                )
            }
            PoolAuth::Token(_) => format!("TLS with {} failed: {detail}", self.endpoint.authority),
        };
        if detail.contains("UnknownIssuer") || detail.contains("invalid peer certificate") {
            s.push_str(" (the server's certificate is not trusted: set [apns] ca_file to its CA?)");
        } else if detail.contains("CertificateRequired") {
            s.push_str(" (the server wants a TLS client certificate: use certificate auth)");
        }
        s
    }

    fn broken_outcome(&self, text: &str) -> Outcome {
        if is_tls_alert(text) {
            Outcome::PauseApp {
                status: None,
                reason: self.tls_reason(text),
            }
        } else {
            Outcome::Retry {
                status: None,
                reason: format!(
                    "connection to {} failed: {}",
                    self.endpoint.authority,
                    without_doc_link(text)
                ),
                unsent: true,
            }
        }
    }

    /// Watches one connection: idle PINGs, a PING on demand after a timeout, and clean-up
    /// when the connection ends.
    async fn supervise(
        self: Arc<Self>,
        conn: Arc<Conn>,
        mut ping: PingPong,
        mut done: oneshot::Receiver<Result<(), h2::Error>>,
    ) {
        let interval = self.shared.ping_interval;
        let ping_timeout = self
            .shared
            .request_timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(20));
        let end: Result<(), String> = loop {
            let probe = tokio::select! {
                r = &mut done => break match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(DRIVER_GONE.into()),
                },
                _ = tokio::time::sleep(interval) => {
                    let idle_ms = (conn.born.elapsed().as_millis() as u64)
                        .saturating_sub(conn.last_active_ms.load(Ordering::Relaxed));
                    conn.in_flight.load(Ordering::Relaxed) == 0 && idle_ms >= interval.as_millis() as u64
                }
                _ = conn.check.notified() => true,
            };
            // Retired (credentials refused, GOAWAY) and idle: closed, not kept open beside
            // its successor until the server drops it.
            if conn.is_closing() {
                if conn.in_flight.load(Ordering::SeqCst) == 0 {
                    break Ok(());
                }
                continue;
            }
            if !probe {
                continue;
            }
            match tokio::time::timeout(ping_timeout, ping.ping(Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => break Err(format!("PING failed: {e}")),
                Err(_) => {
                    break Err(format!(
                        "no answer to PING within {} ms",
                        ping_timeout.as_millis()
                    ));
                }
            }
        };
        conn.driver.abort();
        match end {
            Ok(()) => {
                tracing::debug!(pool = %self.label, conn = conn.id, "APNs connection closed");
                self.retire(&conn, None);
            }
            // The driver task was dropped without a word: the runtime is shutting down.
            Err(reason) if reason == DRIVER_GONE => {
                tracing::debug!(pool = %self.label, conn = conn.id, "APNs connection dropped at shutdown");
                self.retire(&conn, Some(reason));
            }
            Err(reason) => {
                tracing::warn!(event = "apns_connection_lost", pool = %self.label, conn = conn.id, %reason, "APNs connection lost");
                self.retire(&conn, Some(reason));
            }
        }
        crate::metrics::get().connections_open.dec();
    }

    /// Takes a connection out of service; new requests go to a new one. With `broken`, the
    /// slot reconnects only after a back-off (a server that drops every connection must not
    /// get a connect storm).
    pub fn retire(&self, conn: &Conn, broken: Option<String>) {
        conn.signals.closing.store(true, Ordering::Release);
        conn.check.notify_one();
        let mut st = self.lock();
        let slot = &mut st.slots[conn.slot];
        if slot.conn.as_ref().is_some_and(|c| c.id == conn.id) {
            slot.conn = None;
            if let Some(reason) = broken {
                slot.connect_failed = false;
                slot.failures += 1;
                slot.retry_at = Some(Instant::now() + backoff(slot.failures));
                slot.last_error = Some(Outcome::Retry {
                    status: None,
                    reason,
                    unsent: true,
                });
            }
        }
        drop(st);
        self.notify.notify_waiters();
    }

    /// APNs refused the credentials on `conn` for `reason`: the connection is retired, and
    /// the requests already waiting for a stream pause the app for the same reason (with no
    /// HTTP status: they were not sent) instead of trying a connection each. Requests that
    /// begin later connect anew, with the credentials as they are then.
    pub fn refuse(&self, conn: &Conn, reason: &str) {
        let pause = Outcome::PauseApp {
            status: None,
            reason: reason.to_string(),
        };
        self.lock().slots[conn.slot].refused = Some((Instant::now(), pause));
        self.retire(conn, None);
    }

    /// The first answer that is not an authentication error lifts the one-stream limit.
    pub fn mark_authorised(&self, conn: &Conn) {
        if !conn.authorised.swap(true, Ordering::AcqRel) {
            let mut st = self.lock();
            st.slots[conn.slot].refused = None;
            st.slots[conn.slot].failures = 0;
            drop(st);
            self.notify.notify_waiters();
        }
    }

    /// Writes one request and reads its answer.
    pub async fn exchange(
        &self,
        conn: &Conn,
        request: http::Request<()>,
        payload: Bytes,
        deadline: Instant,
    ) -> Exchange {
        if conn.is_closing() {
            // GOAWAY arrived after this request picked the connection: it must not open a
            // stream there (RFC 9113 6.8).
            self.retire(conn, None);
            return Exchange::NotSent("connection is going away (GOAWAY)".into());
        }
        let mut send = conn.send.clone();
        let sent_at = conn.born.elapsed().as_millis() as u64;
        let (response, mut body) = match send.send_request(request, payload.is_empty()) {
            Ok(x) => x,
            Err(e) => {
                self.retire(conn, None);
                return Exchange::NotSent(format!("connection not usable: {e}"));
            }
        };
        if !payload.is_empty() {
            // An error here means the stream is already reset; the response says why.
            let _ = body.send_data(payload, true);
        }
        let mut response = std::pin::pin!(read_response(response));
        let answer = match tokio::time::timeout_at(deadline, &mut response).await {
            Ok(a) => Ok(a),
            // After a stall of this process (stopped, its VM paused, its cores taken), the
            // timer may be served before the answers that came meanwhile, unread in the
            // socket, however long they have waited. They get a moment to be read before the
            // request counts as unanswered: else a push APNs accepted goes out again.
            Err(_) => tokio::time::timeout(STALL_GRACE, &mut response).await,
        };
        match answer {
            Err(_) => {
                conn.check.notify_one();
                // No answer at all on the connection since this request went out: it hangs.
                if conn.last_answer_ms.load(Ordering::Relaxed) <= sent_at && !conn.is_closing() {
                    self.retire_stalled(conn, "no answer");
                }
                Exchange::Timeout
            }
            Ok(Ok((status, apns_id, body))) => {
                // One past the millisecond, so that an answer in the millisecond a request went
                // out counts as after it, and 0 stays "none yet".
                conn.last_answer_ms.store(
                    conn.born.elapsed().as_millis() as u64 + 1,
                    Ordering::Relaxed,
                );
                Exchange::Answer {
                    status,
                    apns_id,
                    body,
                }
            }
            Ok(Err(e)) => self.stream_error(conn, e),
        }
    }

    fn stream_error(&self, conn: &Conn, e: h2::Error) -> Exchange {
        if e.reason() == Some(Reason::REFUSED_STREAM) && !e.is_go_away() {
            return Exchange::NotSent("stream refused by APNs (REFUSED_STREAM)".into());
        }
        if e.is_go_away() {
            let reason = conn
                .signals
                .goaway_reason()
                .or_else(|| goaway_reason(&format!("{e:?}")));
            if e.reason() == Some(Reason::NO_ERROR) {
                self.retire(conn, None);
                return Exchange::GoAway(reason.unwrap_or_else(|| "GOAWAY".into()));
            }
            let text = reason.unwrap_or_else(|| format!("GOAWAY {:?}", e.reason()));
            self.retire(conn, Some(text.clone()));
            return Exchange::Broken {
                reason: text,
                pause: false,
                collateral: false,
            };
        }
        if e.is_reset() {
            return Exchange::Broken {
                reason: format!("stream reset by APNs: {e}"),
                pause: false,
                collateral: false,
            };
        }
        let text = without_doc_link(&e.to_string());
        let pause = is_tls_alert(&text);
        let reason = if pause {
            self.tls_reason(&text)
        } else {
            format!("connection to {} lost: {text}", self.endpoint.authority)
        };
        self.retire(conn, Some(reason.clone()));
        let collateral = !pause && conn.last_answer_ms.load(Ordering::Relaxed) > 0;
        Exchange::Broken {
            reason,
            pause,
            collateral,
        }
    }
}

enum Wait {
    /// Wait for a notification (a stream freed, a connection opened).
    Notified,
    /// Every open connection carries all the streams it may, and one of them answers:
    /// wait for a stream to end (each ends by its answer or its own timeout), looking again
    /// when that connection would count as hanging.
    Streams(Instant),
    /// Every slot backs off until then.
    Until(Instant),
    /// Give up with this outcome.
    Fail(Outcome),
}

async fn read_response(
    response: ResponseFuture,
) -> Result<(u16, Option<String>, Bytes), h2::Error> {
    let response = response.await?;
    let status = response.status().as_u16();
    let apns_id = response
        .headers()
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = response.into_body();
    if body.is_end_stream() {
        return Ok((status, apns_id, Bytes::new()));
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        // Apple's error bodies are tiny; never buffer a runaway body.
        if buf.len() < 64 * 1024 {
            buf.extend_from_slice(&chunk);
        }
    }
    Ok((status, apns_id, buf.freeze()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_manual_link_is_cut_from_a_reason() {
        assert_eq!(
            super::without_doc_link(
                "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof"
            ),
            "peer closed connection without sending TLS close_notify"
        );
        assert_eq!(super::without_doc_link("broken pipe"), "broken pipe");
    }
}
