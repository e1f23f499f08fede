//! The simulator's network side: TLS accept, one task per connection driving h2, one task per
//! stream checking the request and answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::certs::Certs;
use super::limit::{LimitIo, Raise};
use super::{Accepted, Shared, SimError};
use crate::model::PushType;

/// The simulator's rustls config: its server certificate, ALPN h2, and client certificates
/// verified against its CA (required or optional).
pub(crate) fn tls_config(
    certs: &Certs,
    require_client_cert: bool,
) -> Result<Arc<rustls::ServerConfig>, SimError> {
    let provider = crate::apns::tls::provider();
    let tls = |e: &dyn std::fmt::Display| SimError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.ca_der.clone()).map_err(|e| tls(&e))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let verifier = if require_client_cert {
        verifier
    } else {
        verifier.allow_unauthenticated()
    }
    .build()
    .map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certs.server_key_der.clone()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![certs.server_cert_der.clone(), certs.ca_der.clone()],
            key,
        )
        .map_err(|e| tls(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(event = "sim_accept_failed", error = %e, "simulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "simulator: TLS handshake failed");
                    return;
                }
            };
            serve_connection(tls, shared, stop).await;
        });
    }
}

/// How long a closed connection's socket keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// A second handle on a connection's socket, so that its close is the one a server that
/// shuts down on purpose makes: when the HTTP/2 connection is done and drops its own handle,
/// this one sends a FIN, then reads and drops whatever the client still sends until it
/// closes too (at most [`LINGER`]). Closed with requests of the client unread, the kernel
/// would answer them with a reset, and a reset makes the client's kernel throw away what it
/// had not read yet: the last answers and the GOAWAY that says which streams to send again.
/// Those streams then end as "connection reset", their attempt spent, and an answered one is
/// sent twice. [`Linger::abrupt`] lets the socket go at once instead, for `drop_after`'s
/// connection that just goes away.
struct Linger(Option<std::net::TcpStream>);

impl Linger {
    fn new(tcp: &tokio::net::TcpStream) -> Linger {
        use std::os::fd::AsFd as _;
        Linger(
            tcp.as_fd()
                .try_clone_to_owned()
                .ok()
                .map(std::net::TcpStream::from),
        )
    }

    fn abrupt(&mut self) {
        self.0 = None;
    }
}

impl Drop for Linger {
    fn drop(&mut self) {
        let (Some(tcp), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            // The descriptor is a copy of a non-blocking one (the flag is the socket's).
            let Ok(mut tcp) = tokio::net::TcpStream::from_std(tcp) else {
                return;
            };
            let _ = tcp.shutdown().await;
            let mut sink = [0u8; 16 * 1024];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = tcp.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// Per-connection state the stream tasks share.
struct ConnState {
    id: u64,
    /// The client authenticated with a certificate signed by our CA.
    client_cert: bool,
    auth: std::sync::Mutex<ConnAuth>,
    authorised: AtomicBool,
    /// Raises the stream limit announced in SETTINGS, when it was lowered to one.
    raise: Option<Arc<Raise>>,
    in_flight: AtomicUsize,
}

#[derive(Default)]
struct ConnAuth {
    /// The key id of the first token seen: later tokens must use the same key.
    bound_kid: Option<String>,
    /// The last verified `authorization` header, so ES256 is verified once per token.
    verified: Option<(HeaderValue, i64, String)>,
    /// This connection was told its token expired: the new token it asked for is no update
    /// "too often".
    expired_said: bool,
    /// When (simulator seconds) this connection's token last changed; `None` while it sends
    /// the first one it sent.
    changed_at: Option<i64>,
}

async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    // Declared before the connection, so dropped after it.
    let mut linger = Linger::new(tls.get_ref().0);
    // One stream until authorised is announced in SETTINGS on connections opened while the
    // rule holds (see `limit`); `take_slot` refuses extra streams on the others.
    let raise = (shared.streams_one() && shared.max_streams > 1).then(Arc::<Raise>::default);
    let tls = LimitIo::new(tls, raise.clone(), shared.max_streams);
    let mut h2 = match h2::server::Builder::new()
        .max_concurrent_streams(shared.max_streams)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .max_pending_accept_reset_streams(100_000)
        .max_local_error_reset_streams(None)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "simulator: HTTP/2 handshake failed");
            return;
        }
    };
    // Counted open until this function returns, however it returns.
    struct Open(Arc<super::Shared>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
    shared.open_connections.fetch_add(1, Ordering::Relaxed);
    let _open = Open(shared.clone());
    let conn = Arc::new(ConnState {
        id: shared.connections.fetch_add(1, Ordering::Relaxed) + 1,
        client_cert,
        auth: std::sync::Mutex::new(ConnAuth::default()),
        authorised: AtomicBool::new(false),
        raise,
        in_flight: AtomicUsize::new(0),
    });
    let goaway_after = shared.goaway_after();
    let drop_after = shared.drop_after();
    let mut streams: u32 = 0;
    // Streams whose answers are still being made.
    let answering = Arc::new(AtomicUsize::new(0));
    // Streams that came after `drop_after`'s last: held unanswered until the connection is
    // gone, so that not even a stream reset is sent for them.
    let mut unanswered = Vec::new();
    loop {
        let next = tokio::select! {
            n = h2.accept() => n,
            _ = stop.changed() => return,
        };
        match next {
            None => return,
            Some(Err(e)) => {
                tracing::debug!(conn = conn.id, error = %e, "simulator: connection ended");
                return;
            }
            Some(Ok((request, respond))) => {
                streams += 1;
                if drop_after.is_some_and(|n| streams > n) {
                    // Sent before the drop: held unanswered with the connection.
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    unanswered.push((request, respond));
                    break;
                }
                if goaway_after.is_some_and(|n| streams > n) {
                    // Sent before the client saw the GOAWAY: not processed, and said so, as
                    // a server that shuts a connection down does, so that the client sends
                    // it again on a new connection.
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    let (_, mut respond) = (request, respond);
                    respond.send_reset(Reason::REFUSED_STREAM);
                    continue;
                }
                shared.requests.fetch_add(1, Ordering::Relaxed);
                // The slot is taken here, in arrival order: the first stream of a new
                // connection is the one served, as under a real limit of one.
                let Some(slot) = take_slot(&shared, &conn) else {
                    let (_, mut respond) = (request, respond);
                    respond.send_reset(Reason::REFUSED_STREAM);
                    continue;
                };
                answering.fetch_add(1, Ordering::AcqRel);
                let done = answering.clone();
                let (sh, co) = (shared.clone(), conn.clone());
                tokio::spawn(async move {
                    handle_stream(sh, co, request, respond, slot).await;
                    done.fetch_sub(1, Ordering::AcqRel);
                });
                if goaway_after == Some(streams) {
                    // Said at info: a test harness scripting `goaway_after` sees it happen.
                    tracing::info!(
                        event = "sim_goaway",
                        conn = conn.id,
                        streams,
                        "simulator: GOAWAY after the scripted number of streams (goaway_after)"
                    );
                    h2.graceful_shutdown();
                }
                if drop_after == Some(streams) {
                    break;
                }
            }
        }
    }
    // `drop_after`: abrupt, like goaway_after counted. The N streams carried are answered
    // (slow ones waited for 10 s at most), then the socket closes without a word (no GOAWAY,
    // no stream reset), whether or not the client sends more: streams after the Nth stay
    // unanswered.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut flushed = false;
    loop {
        if answering.load(Ordering::Acquire) == 0 {
            // The last answers are queued in the connection: driven a moment more, so that
            // they are written before the socket goes.
            if flushed {
                break;
            }
            flushed = true;
        }
        tokio::select! {
            // Driving the connection sends the answers; late streams are held unanswered.
            n = h2.accept() => match n {
                Some(Ok(late)) => {
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    unanswered.push(late);
                }
                _ => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(if flushed { 20 } else { 1 })) => {}
            _ = tokio::time::sleep_until(until) => break,
            _ = stop.changed() => return,
        }
    }
    tracing::info!(
        event = "sim_connection_dropped",
        conn = conn.id,
        streams,
        "simulator: connection closed without a word after the scripted number of streams (drop_after)"
    );
    linger.abrupt();
    // The connection (and its socket) first: a stream handle dropped while the connection
    // lives would have it send a reset.
    drop(h2);
    drop(unanswered);
}

/// The one stream a connection not yet authorised may carry; released when its answer has
/// gone out (or the stream ended otherwise).
struct InFlight(Arc<ConnState>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes the one-stream slot, in the order the streams arrived: `None` when the connection
/// is still unauthorised and its one stream is taken (this one is then refused).
fn take_slot(shared: &Shared, conn: &Arc<ConnState>) -> Option<Option<InFlight>> {
    if !shared.streams_one() || conn.authorised.load(Ordering::Acquire) {
        return Some(None);
    }
    if conn.in_flight.fetch_add(1, Ordering::AcqRel) >= 1 {
        conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    Some(Some(InFlight(conn.clone())))
}

/// An answer that is not 200.
struct Reject {
    status: u16,
    reason: std::borrow::Cow<'static, str>,
    timestamp: Option<i64>,
}

fn reject(status: u16, reason: &'static str) -> Reject {
    Reject {
        status,
        reason: reason.into(),
        timestamp: None,
    }
}

async fn handle_stream(
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    slot: Option<InFlight>,
) {
    let _slot = slot;
    let (parts, body) = request.into_parts();
    let payload = match read_body(body).await {
        Ok(p) => p,
        Err(_) => return, // the client reset the stream
    };
    let mut authorised = false;
    let result = check(
        &shared,
        &conn,
        &parts.method,
        &parts.uri,
        &parts.headers,
        &payload,
        &mut authorised,
    );
    let mut delay = shared.latency();
    let result = match result {
        Ok(accepted) => {
            let (extra, answer) = shared.scripted(&accepted.token);
            delay += extra;
            match answer {
                Ok(()) => Ok(accepted),
                Err((status, reason, timestamp)) => Err(Reject {
                    status,
                    reason: reason.into(),
                    timestamp,
                }),
            }
        }
        Err(r) => Err(r),
    };
    if let Err(r) = &result
        && r.status == 403
        && r.reason == "ExpiredProviderToken"
    {
        conn.auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expired_said = true;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    // APNs raises its stream limit once it has authorised a request, which a client learns
    // with the answer: the raise goes out just before it, and until then (a slow answer
    // included) a second stream is refused.
    if authorised
        && !conn.authorised.swap(true, Ordering::AcqRel)
        && let Some(raise) = &conn.raise
    {
        raise.now();
    }
    let apns_id = match parts.headers.get("apns-id") {
        Some(v) => v.clone(),
        None => HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).unwrap_or(
            HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
        ),
    };
    match result {
        Ok(mut accepted) => {
            let mut resp = Response::new(());
            resp.headers_mut().insert("apns-id", apns_id.clone());
            if respond.send_response(resp, true).is_ok() {
                accepted.apns_id = apns_id.to_str().unwrap_or("").to_string();
                shared.record(accepted);
            }
        }
        Err(r) => {
            let body = match r.timestamp {
                Some(ts) => serde_json::json!({ "reason": r.reason, "timestamp": ts }).to_string(),
                None => serde_json::json!({ "reason": r.reason }).to_string(),
            };
            let mut resp = Response::new(());
            *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
            resp.headers_mut().insert("apns-id", apns_id);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            // The answer to a HEAD has no content (RFC 9110): a client takes a body for a
            // protocol error, and would not see the 405.
            if parts.method == http::Method::HEAD {
                let _ = respond.send_response(resp, true);
            } else if let Ok(mut stream) = respond.send_response(resp, false) {
                let _ = stream.send_data(Bytes::from(body), true);
            }
        }
    }
}

/// The request body; a single DATA frame (the usual case) is taken without copying.
async fn read_body(mut body: RecvStream) -> Result<Bytes, h2::Error> {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        // Stop keeping bytes far beyond any limit; size checks only need to know "too big".
        match (&mut first, &mut rest) {
            (None, _) => first = Some(chunk),
            (Some(f), None) => {
                let mut b = BytesMut::from(&f[..]);
                b.extend_from_slice(&chunk);
                rest = Some(b);
            }
            (Some(_), Some(b)) => {
                if b.len() < 64 * 1024 {
                    b.extend_from_slice(&chunk);
                }
            }
        }
    }
    Ok(match (first, rest) {
        (_, Some(b)) => b.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// A header's value, once: a repeated header is `DuplicateHeaders`, and a value that is not
/// plain text (`HeaderValue::to_str`'s visible ASCII) is `bad`, as Apple finds it malformed,
/// not absent.
fn header<'a>(h: &'a HeaderMap, name: &str, bad: &'static str) -> Result<Option<&'a str>, Reject> {
    single_header(h, name)?
        .map(|v| v.to_str().map_err(|_| reject(400, bad)))
        .transpose()
}

fn single_header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a HeaderValue>, Reject> {
    let mut all = h.get_all(name).iter();
    let Some(v) = all.next() else { return Ok(None) };
    if all.next().is_some() {
        return Err(reject(400, "DuplicateHeaders"));
    }
    Ok(Some(v))
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Apple's checks, in roughly Apple's order: method, path, credentials, headers, token,
/// payload.
/// `authorised` is set once the credentials passed, whatever the later checks say.
fn check(
    shared: &Shared,
    conn: &ConnState,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    payload: &Bytes,
    authorised: &mut bool,
) -> Result<Accepted, Reject> {
    if method != Method::POST {
        return Err(reject(405, "MethodNotAllowed"));
    }
    let Some(token) = uri.path().strip_prefix("/3/device/") else {
        return Err(reject(404, "BadPath"));
    };
    if token.contains('/') {
        return Err(reject(404, "BadPath"));
    }
    let key_id = check_auth(shared, conn, headers)?;
    *authorised = true;

    let push_type = header(headers, "apns-push-type", "InvalidPushType")?
        .map(|s| PushType::parse(s).ok_or_else(|| reject(400, "InvalidPushType")))
        .transpose()?;
    // Required with a token, and with a certificate that covers several topics, as the
    // simulator's does (the app and its `.voip`, `.complication`, … topics, as Apple's
    // universal certificates): only a single-topic certificate names its topic.
    let topic = match header(headers, "apns-topic", "BadTopic")? {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => return Err(reject(400, "MissingTopic")),
    };
    // Apple requires `apns-push-type` on watchOS only and recommends it elsewhere: without
    // it, the topic's suffix says the kind (`.voip` is a VoIP push), else it is an alert.
    let push_type = push_type.unwrap_or_else(|| {
        PushType::ALL
            .into_iter()
            .find(|p| !p.topic_suffix().is_empty() && topic.ends_with(p.topic_suffix()))
            .unwrap_or(PushType::Alert)
    });
    if push_type != PushType::Mdm && !topic.is_empty() {
        let suffix = push_type.topic_suffix();
        let base = if suffix.is_empty() {
            let foreign = PushType::ALL
                .iter()
                .map(|p| p.topic_suffix())
                .any(|s| !s.is_empty() && topic.ends_with(s));
            if foreign {
                return Err(reject(400, "BadTopic"));
            }
            topic.as_str()
        } else {
            topic
                .strip_suffix(suffix)
                .ok_or_else(|| reject(400, "BadTopic"))?
        };
        if !shared.bundle_ids.is_empty() && !shared.bundle_ids.iter().any(|b| b == base) {
            return Err(reject(400, "TopicDisallowed"));
        }
    }
    let priority = match header(headers, "apns-priority", "BadPriority")? {
        None => 10,
        // Apple's values spelled plainly: "05" or "+5" is not a priority a client sends.
        Some("10") => 10,
        Some("5") => 5,
        Some("1") => 1,
        Some(_) => return Err(reject(400, "BadPriority")),
    };
    if !push_type.allows_priority(priority) {
        return Err(reject(400, "BadPriority"));
    }
    let expiration = match header(headers, "apns-expiration", "BadExpirationDate")? {
        None => None,
        // Seconds since the epoch, in digits only ("+100" and "-1" are not dates).
        Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => match s.parse::<i64>()
        {
            Ok(e) => Some(e),
            Err(_) => return Err(reject(400, "BadExpirationDate")),
        },
        Some(_) => return Err(reject(400, "BadExpirationDate")),
    };
    // Apple's limit is 64 bytes, whatever the characters.
    let collapse_id = match single_header(headers, "apns-collapse-id")? {
        Some(c) if c.len() > 64 => return Err(reject(400, "BadCollapseId")),
        c => c.map(|c| String::from_utf8_lossy(c.as_bytes()).into_owned()),
    };
    if let Some(id) = header(headers, "apns-id", "BadMessageId")?
        && !is_uuid(id)
    {
        return Err(reject(400, "BadMessageId"));
    }
    if token.is_empty() {
        return Err(reject(400, "MissingDeviceToken"));
    }
    if token.len() % 2 != 0
        || !(32..=512).contains(&token.len())
        || !token.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(reject(400, "BadDeviceToken"));
    }
    if payload.is_empty() {
        return Err(reject(400, "PayloadEmpty"));
    }
    if payload.len() > push_type.max_payload_bytes() {
        return Err(reject(413, "PayloadTooLarge"));
    }
    let json_object = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
        // Checked apart: skipping over a string does not check its UTF-8.
        && std::str::from_utf8(payload).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok();
    if !json_object {
        // Apple documents no reason for a malformed payload; this one says what is wrong.
        return Err(reject(400, "BadPayload"));
    }
    Ok(Accepted {
        token: token.to_ascii_lowercase(),
        apns_id: String::new(),
        topic,
        push_type: push_type.as_str().to_string(),
        priority,
        expiration,
        collapse_id,
        payload: payload.clone(),
        connection: conn.id,
        key_id,
    })
}

#[derive(serde::Deserialize)]
struct Claims {
    iss: String,
    iat: i64,
}

const TOKEN_MAX_AGE_S: i64 = 3600;
const TOKEN_MIN_UPDATE_S: i64 = 20 * 60;
/// How far in the future an `iat` may lie (clock skew between hosts).
const TOKEN_FUTURE_SLACK_S: i64 = 5 * 60;

/// The token of an `authorization` value, its scheme's name in any case (RFC 9110 11.1), as
/// HTTP servers read it.
fn bearer_token(value: &str) -> Option<&str> {
    value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t)
}

/// Token checks; returns the key id (`None` on a certificate-authenticated connection).
fn check_auth(
    shared: &Shared,
    conn: &ConnState,
    headers: &HeaderMap,
) -> Result<Option<String>, Reject> {
    if conn.client_cert {
        return Ok(None);
    }
    let value = match single_header(headers, http::header::AUTHORIZATION.as_str())? {
        None => return Err(reject(403, "MissingProviderToken")),
        Some(v) => v,
    };
    let now = shared.now_s();
    let mut auth = conn.auth.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((v, iat, kid)) = &auth.verified
        && v == value
    {
        if now - iat > TOKEN_MAX_AGE_S {
            return Err(reject(403, "ExpiredProviderToken"));
        }
        return Ok(Some(kid.clone()));
    }
    let invalid = || reject(403, "InvalidProviderToken");
    let text = value.to_str().map_err(|_| invalid())?;
    let token = bearer_token(text).ok_or_else(invalid)?;
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
    if header.alg != jsonwebtoken::Algorithm::ES256 {
        return Err(invalid());
    }
    let kid = header.kid.ok_or_else(invalid)?;
    let key = shared
        .keys
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&kid)
        .cloned()
        .ok_or_else(invalid)?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
        .map_err(|_| invalid())?
        .claims;
    if claims.iss != key.team_id {
        return Err(invalid());
    }
    if claims.iat > now + TOKEN_FUTURE_SLACK_S {
        return Err(invalid());
    }
    match &auth.bound_kid {
        Some(b) if *b != kid => return Err(reject(403, "UnrelatedKeyIdInToken")),
        Some(_) => {}
        None => auth.bound_kid = Some(kid.clone()),
    }
    // Apple: "update the authentication token no more than once every 20 minutes". A new
    // token on this connection must be 20 minutes newer than the one it replaces (an older
    // one, or one minted a moment later by another worker, is an update too often), and come
    // 20 minutes after the connection's last change; unless the old one was called expired.
    // (The same token under another spelling of its scheme is no change.)
    let same_token = |v: &HeaderValue| v.to_str().ok().and_then(bearer_token) == Some(token);
    let changed = auth.verified.as_ref().is_some_and(|(v, ..)| !same_token(v));
    if let Some((_, prev_iat, _)) = &auth.verified
        && changed
        && !auth.expired_said
        && (claims.iat - prev_iat < TOKEN_MIN_UPDATE_S
            || auth
                .changed_at
                .is_some_and(|at| now - at < TOKEN_MIN_UPDATE_S))
    {
        return Err(reject(429, "TooManyProviderTokenUpdates"));
    }
    if now - claims.iat > TOKEN_MAX_AGE_S {
        return Err(reject(403, "ExpiredProviderToken"));
    }
    auth.verified = Some((value.clone(), claims.iat, kid.clone()));
    auth.expired_said = false;
    if changed {
        auth.changed_at = Some(now);
    }
    Ok(Some(kid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_form() {
        assert!(is_uuid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(is_uuid("123E4567-E89B-12D3-A456-426614174000"));
        assert!(!is_uuid("123e4567e89b12d3a456426614174000"));
        assert!(!is_uuid("123e4567-e89b-12d3-a456-42661417400g"));
    }
}
