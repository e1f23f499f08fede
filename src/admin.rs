//! The admin endpoint: `/healthz`, `/readyz`, `/status` and `/metrics` over plain HTTP on a
//! loopback address (`[admin] listen`). It is for probes and Prometheus on the same host or pod,
//! so it has no TLS and no auth; never bind it to a public address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

use crate::logging::{SAY_LASTING_EVERY, Throttle};
use crate::metrics::{self, StateLabel};
use crate::store::Store;
use crate::store::query::Reader;

/// What the endpoint needs to answer.
#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    /// Whether the inbox watcher is running.
    pub inbox_alive: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Set when shutdown begins: `/readyz` turns unready at once.
    pub shutting_down: Arc<AtomicBool>,
    /// The inbox folder, for `/status`'s `inbox`.
    pub inbox_dir: std::path::PathBuf,
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for the admin endpoint: {source}")]
pub struct AdminError {
    pub addr: String,
    pub source: std::io::Error,
}

/// A running admin endpoint.
pub struct AdminHandle {
    /// Where it listens (useful when the config said port 0).
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl AdminHandle {
    /// Stops accepting and closes the listener.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The admin endpoint's socket, bound before the daemon takes any file: a port in use stops
/// the start before the inbox has moved a file or the sender sent a push.
pub struct AdminListener {
    listen: String,
    listener: std::net::TcpListener,
}

/// Binds `listen`.
pub fn bind(listen: &str) -> Result<AdminListener, AdminError> {
    let err = |source| AdminError {
        addr: listen.to_string(),
        source,
    };
    let listener = std::net::TcpListener::bind(listen).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(AdminListener {
        listen: listen.to_string(),
        listener,
    })
}

/// Serves on a bound listener until stopped (within a tokio runtime).
pub async fn start(bound: AdminListener, state: AdminState) -> Result<AdminHandle, AdminError> {
    let err = |source| AdminError {
        addr: bound.listen.clone(),
        source,
    };
    let listener = TcpListener::from_std(bound.listener).map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    let (stop, mut stop_rx) = watch::channel(false);
    info!(event = "admin_listening", %addr, "admin endpoint: /healthz /readyz /status /metrics");
    let task = tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut full = Throttle::new(SAY_LASTING_EVERY);
        let mut accept_failed = Throttle::new(SAY_LASTING_EVERY);
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop_rx.changed() => break,
            };
            let (stream, _) = match conn {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors (EMFILE, ENFILE), the connection stays in the
                    // listen queue and the listener stays readable: without a pause this loop
                    // would spin, and without the throttle it would log 10 lines a second.
                    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    if let Some(unsaid) = accept_failed.note() {
                        warn!(
                            event = "admin_accept_error",
                            error = %e,
                            out_of_fds,
                            failed_since_last_line = unsaid + 1,
                            "the admin endpoint cannot accept connections; retrying every 100 ms (said at most once a minute while it lasts)"
                        );
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            // At the cap, the connection is accepted and closed at once rather than left in
            // the listen queue until a slot frees: the queue would fill with the very clients
            // that hold the slots (a probe arriving behind them would wait for each of their
            // 10 s timeouts), while an accept-and-close costs no lasting descriptor, keeps
            // the queue empty, and serves the first connection that comes after a slot frees.
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                drop(stream);
                if let Some(unsaid) = full.note() {
                    warn!(
                        event = "admin_connections_full",
                        max_connections = MAX_CONNECTIONS,
                        refused_since_last_line = unsaid + 1,
                        "the admin endpoint has its maximum of connections open: new ones are closed at once until one ends (said at most once a minute while it lasts)"
                    );
                }
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                // The slot is given back once the socket is closed (locals drop in reverse).
                let _slot = slot;
                let stream = stream;
                // A connection that sends nothing at all is closed too (the head timeout
                // below starts with the first byte). A peek, not `readable()`: readiness may
                // be reported with nothing to read, and the wait was then over at once.
                let mut first = [0u8; 1];
                if !matches!(
                    tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await,
                    Ok(Ok(1))
                ) {
                    return;
                }
                let activity = Activity::default();
                let svc = {
                    let activity = activity.clone();
                    service_fn(move |req| {
                        let busy = activity.busy();
                        let state = state.clone();
                        async move {
                            let answer = handle(state, req).await;
                            drop(busy);
                            answer
                        }
                    })
                };
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // A request whose head does not arrive within HEADER_TIMEOUT (a client that
                // connected and stalled) has its connection closed instead of held forever.
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                let io = Watched {
                    inner: stream,
                    activity: activity.clone(),
                };
                let conn = builder.serve_connection(TokioIo::new(io), svc);
                tokio::pin!(conn);
                // An HTTP/2 connection has no head timeout: one that carries no bytes and no
                // request for HEADER_TIMEOUT is closed (dropped) here, as an HTTP/1 one is.
                loop {
                    tokio::select! {
                        _ = &mut conn => break,
                        _ = tokio::time::sleep(HEADER_TIMEOUT / 4) => {
                            if activity.idle_for() >= HEADER_TIMEOUT {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(AdminHandle { addr, stop, task })
}

/// How long a connection may take to send a request's head, and stay idle.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The most admin connections open at once. Monitoring needs a handful (a kubelet's probes, a
/// Prometheus scrape, an operator's curl); each connection holds a file descriptor, and the
/// daemon's descriptors are shared with the inbox's files and SQLite's: a local client opening
/// connections in a loop must not starve ingest and the database of them. 64 is ten times what
/// monitoring needs, and a small share of the usual limit (1024).
const MAX_CONNECTIONS: usize = 64;

/// The pause after a failed `accept` before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// When an admin connection last carried bytes, and how many of its requests are being
/// answered: an idle connection is closed, one waiting for a slow answer is not.
#[derive(Clone)]
struct Activity(Arc<ActivityInner>);

struct ActivityInner {
    since: std::time::Instant,
    /// Milliseconds from `since` to the last byte read or written.
    last_ms: std::sync::atomic::AtomicU64,
    busy: std::sync::atomic::AtomicUsize,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity(Arc::new(ActivityInner {
            since: std::time::Instant::now(),
            last_ms: Default::default(),
            busy: Default::default(),
        }))
    }
}

impl Activity {
    fn touch(&self) {
        let ms = self.0.since.elapsed().as_millis() as u64;
        self.0.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long nothing has moved and no request has been in hand (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.0.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
        self.0.since.elapsed().saturating_sub(last)
    }

    /// Marks a request in hand until the guard is dropped.
    fn busy(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }
}

struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A connection's socket, noting each byte that moves in [`Activity`].
struct Watched<S> {
    inner: S,
    activity: Activity,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether an `Accept` header value asks for OpenMetrics before the Prometheus text format:
/// a media range names it with a weight above 0, and at least the weight of any `text/plain`
/// range (Prometheus asks for OpenMetrics first by default, and can be told to prefer text).
fn accepts_open_metrics(accept: &str) -> bool {
    let (mut open_metrics, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let kind = parts.next().unwrap_or("");
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if kind.eq_ignore_ascii_case("application/openmetrics-text") {
            open_metrics = open_metrics.max(q);
        } else if kind.eq_ignore_ascii_case("text/plain") {
            text = text.max(q);
        }
    }
    open_metrics > 0.0 && open_metrics >= text
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    state: AdminState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET and HEAD only\n",
        );
        // RFC 9110: a 405 lists the methods the resource takes.
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Ok(r);
    }
    let text = "text/plain; charset=utf-8";
    Ok(match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, text, "ok\n"),
        "/readyz" => match readiness(&state).await {
            Ok(()) => reply(StatusCode::OK, text, "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                text,
                format!("not ready: {why}\n"),
            ),
        },
        "/status" => match status_json(&state).await {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            // The figures cannot be read (the database file deleted under the daemon): what
            // only the daemon knows is still said, as JSON, beside why.
            Err(e) => {
                let said = serde_json::json!({
                    "error": e,
                    "daemon": this_daemon(),
                    "write_errors": state.store.write_trouble(),
                });
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    format!("{said:#}"),
                )
            }
        },
        "/metrics" => {
            // Sets `store_write_failing` as it stands now.
            state.store.write_trouble();
            // Queue figures are read at scrape time, so they are exact, not sampled.
            if let Ok((totals, oldest_age_s)) = read(&state, Reader::queue_figures).await {
                let m = metrics::get();
                for (k, v) in &totals {
                    m.queue_depth
                        .get_or_create(&StateLabel {
                            state: k.to_string(),
                        })
                        .set(*v);
                }
                m.oldest_queued_age_seconds.set(oldest_age_s);
            }
            // OpenMetrics to those who ask for it (Prometheus does, first); the Prometheus
            // text format (0.0.4) to everyone else (curl, older scrapers).
            let open_metrics = req
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(accepts_open_metrics);
            if open_metrics {
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics::encode(),
                )
            } else {
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics::encode_prometheus(),
                )
            }
        }
        "/" => reply(
            StatusCode::OK,
            text,
            "pushdrop admin: /healthz /readyz /status /metrics\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, text, "not found\n"),
    })
}

/// Runs `query` on a read-only connection of its own, off the async threads.
async fn read<T: Send + 'static>(
    state: &AdminState,
    query: fn(&Reader) -> Result<T, crate::store::StoreError>,
) -> Result<T, String> {
    let path = state.store.path().to_path_buf();
    tokio::task::spawn_blocking(move || Reader::open(&path).and_then(|r| query(&r)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

async fn status_json(state: &AdminState) -> Result<String, String> {
    let mut s = read(state, Reader::status).await?;
    // The daemon answering is the one that holds the database.
    s.daemon = Some(this_daemon());
    let dir = state.inbox_dir.clone();
    let mut inbox = tokio::task::spawn_blocking(move || crate::inbox::waiting(&dir))
        .await
        .map_err(|e| e.to_string())?;
    inbox.stuck_files = Some(crate::metrics::get().inbox_stuck_files.get());
    s.inbox = Some(inbox);
    s.write_errors = Some(state.store.write_trouble());
    serde_json::to_string_pretty(&s).map_err(|e| e.to_string())
}

fn this_daemon() -> crate::store::query::DaemonState {
    crate::store::query::DaemonState {
        running: true,
        pid: Some(std::process::id()),
    }
}

/// Ready = not shutting down, the inbox watcher runs on its folder, and the database takes
/// writes: the heartbeat's, and the last drop file's commit, batch of results and claim.
async fn readiness(state: &AdminState) -> Result<(), String> {
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err("shutting down".into());
    }
    if !(state.inbox_alive)() {
        return Err("inbox watcher is not running, or the inbox folder is gone".into());
    }
    // There, but not to be listed (permissions): no file would be taken.
    if let Err(e) = std::fs::read_dir(&state.inbox_dir) {
        return Err(format!(
            "the inbox folder {} cannot be read: {e}",
            state.inbox_dir.display()
        ));
    }
    // The test write's failure is noted with the other refused writes (so `/status` and
    // `/metrics` show it too): its one row may go in where a file's commit, a batch of
    // results or a fan-out does not (a full disk); either way, what is refused is named.
    let answered = tokio::time::timeout(Duration::from_secs(2), state.store.check_writable()).await;
    let mut why = state.store.write_trouble();
    if answered.is_err() {
        why.push("store did not answer within 2 s".into());
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::accepts_open_metrics;

    #[test]
    fn open_metrics_only_to_those_who_accept_it() {
        // Prometheus' own header.
        assert!(accepts_open_metrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(accepts_open_metrics("Application/OpenMetrics-Text"));
        assert!(!accepts_open_metrics("application/openmetrics-text;q=0"));
        assert!(!accepts_open_metrics(
            "application/openmetrics-text; q=0.0, text/plain"
        ));
        assert!(!accepts_open_metrics("text/plain"));
        assert!(!accepts_open_metrics("*/*"));
        // Prometheus told to prefer its text format.
        assert!(!accepts_open_metrics(
            "text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.4,*/*;q=0.3"
        ));
        assert!(!accepts_open_metrics(
            "text/plain;q=0.9, application/openmetrics-text;q=0.5"
        ));
    }
}
