//! [`ApnsClient`]: one push in, one [`Outcome`] out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderName};
use http::{HeaderValue, Method, Request, Uri};
use tokio::time::Instant;

use super::auth::{Clock, Jwt, TokenSigner, system_clock};
use super::outcome::{Classified, Outcome, classify, parse_error_body};
use super::pool::{Endpoint, Exchange, Pool, PoolAuth, Shared};
use super::{ApnsError, tls};
use crate::config::{AppAuth, Config, Environment};
use crate::model::{PushType, token_prefix};

/// One push, as the sender hands it over.
#[derive(Debug, Clone)]
pub struct PushRequest {
    /// The configured app's name.
    pub app: Arc<str>,
    /// Picks the host (production or sandbox).
    pub environment: Environment,
    /// Lowercase hex device token.
    pub token: String,
    /// `apns-id`: a UUID, so APNs's answer and our logs name the same push.
    pub apns_id: String,
    /// `apns-topic`.
    pub topic: String,
    pub push_type: PushType,
    /// `apns-priority`: 10, 5 or 1.
    pub priority: u8,
    /// `apns-expiration`, UNIX seconds.
    pub expiration: Option<i64>,
    /// `apns-collapse-id`.
    pub collapse_id: Option<String>,
    /// The JSON payload, sent as is.
    pub payload: Bytes,
}

/// Counters of one client, for tests and the demo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// HTTP/2 connections opened.
    pub connects: u64,
    /// Provider tokens minted.
    pub jwt_mints: u64,
}

struct Inner {
    /// App name → pool per environment (production, sandbox).
    pools: HashMap<Arc<str>, [Arc<Pool>; 2]>,
    shared: Arc<Shared>,
    mints: Arc<AtomicU64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for pools in self.pools.values() {
            for p in pools {
                p.close();
            }
        }
    }
}

/// The APNs client of the whole process. Cheap to clone; every clone shares the pools.
/// Dropping the last clone closes its connections.
#[derive(Clone)]
pub struct ApnsClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ApnsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsClient")
            .field("apps", &self.inner.pools.keys().collect::<Vec<_>>())
            .finish()
    }
}

static H_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
static H_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
static H_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
static H_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
static H_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
static H_ID: HeaderName = HeaderName::from_static("apns-id");

impl ApnsClient {
    /// Sets up pools for every configured app and both environments; connections open on the
    /// first push. Key and certificate files are read now, so bad ones fail start-up.
    pub fn new(cfg: &Config) -> Result<ApnsClient, ApnsError> {
        ApnsClient::with_clock(cfg, system_clock())
    }

    /// As [`ApnsClient::new`], with the clock that dates provider tokens (tests fake an hour).
    pub fn with_clock(cfg: &Config, clock: Clock) -> Result<ApnsClient, ApnsError> {
        let a = &cfg.apns;
        let roots = tls::roots(a.ca_file.as_deref())?;
        let token_tls = tls::client_config(roots.clone(), None)?;
        let proxy = if a.proxy.is_empty() {
            None
        } else {
            let uri: Uri = a.proxy.parse().map_err(|e| ApnsError::Config {
                key: "apns.proxy".into(),
                message: format!("{:?}: {e}", a.proxy),
            })?;
            match (uri.host(), uri.port_u16()) {
                (Some(h), Some(p)) => Some(format!("{h}:{p}")),
                _ => {
                    return Err(ApnsError::Config {
                        key: "apns.proxy".into(),
                        message: format!("{:?} is not http://host:port", a.proxy),
                    });
                }
            }
        };
        let shared = Arc::new(Shared {
            roots: roots.clone(),
            token_tls,
            proxy,
            request_timeout: Duration::from_millis(a.request_timeout_ms.max(1)),
            connect_timeout: Duration::from_millis(a.connect_timeout_ms.max(1)),
            ping_interval: Duration::from_secs(a.ping_interval_s.max(1)),
            connects: AtomicU64::new(0),
        });
        let endpoints = [
            Endpoint::parse("apns.production_url", &a.production_url)?,
            Endpoint::parse("apns.sandbox_url", &a.sandbox_url)?,
        ];
        let mints = Arc::new(AtomicU64::new(0));
        let mut signers: HashMap<crate::config::TokenAuthConfig, Arc<TokenSigner>> = HashMap::new();
        let mut pools = HashMap::new();
        for app in &cfg.apps {
            let make_auth =
                |signers: &mut HashMap<_, Arc<TokenSigner>>| -> Result<PoolAuth, ApnsError> {
                    Ok(match app.auth() {
                        AppAuth::Token(t) => {
                            let signer = match signers.get(t) {
                                Some(s) => s.clone(),
                                None => {
                                    let s = Arc::new(TokenSigner::new(
                                        t,
                                        Some((cfg.source.clone(), app.name.clone())),
                                        clock.clone(),
                                        mints.clone(),
                                    )?);
                                    signers.insert(t.clone(), s.clone());
                                    s
                                }
                            };
                            PoolAuth::Token(signer)
                        }
                        AppAuth::Certificate(c) => {
                            // Fail start-up on unreadable or mismatched files.
                            tls::client_config(roots.clone(), Some(c))?;
                            PoolAuth::Certificate(c.clone())
                        }
                    })
                };
            let mk = |env: Environment, ep: &Endpoint, auth: PoolAuth| {
                Arc::new(Pool::new(
                    format!("{}/{}", app.name, env),
                    ep.clone(),
                    auth,
                    shared.clone(),
                    a.connections,
                ))
            };
            let prod = mk(
                Environment::Production,
                &endpoints[0],
                make_auth(&mut signers)?,
            );
            let sand = mk(
                Environment::Sandbox,
                &endpoints[1],
                make_auth(&mut signers)?,
            );
            pools.insert(Arc::<str>::from(app.name.as_str()), [prod, sand]);
        }
        Ok(ApnsClient {
            inner: Arc::new(Inner {
                pools,
                shared,
                mints,
            }),
        })
    }

    /// Connections opened and tokens minted so far.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            connects: self.inner.shared.connects.load(Ordering::Relaxed),
            jwt_mints: self.inner.mints.load(Ordering::Relaxed),
        }
    }

    /// The key id and team id an app's provider tokens are made with now (token auth only):
    /// the config's, or those read again after a rejection.
    pub fn token_ids(&self, app: &str) -> Option<(String, String)> {
        match &self.pool(app, Environment::Production)?.auth {
            PoolAuth::Token(s) => Some(s.ids()),
            PoolAuth::Certificate(_) => None,
        }
    }

    /// The pool of an app and environment: a device's own environment picks the host.
    fn pool(&self, app: &str, environment: Environment) -> Option<&Arc<Pool>> {
        let pools = self.inner.pools.get(app)?;
        Some(match environment {
            Environment::Production => &pools[0],
            Environment::Sandbox => &pools[1],
        })
    }

    /// The next connect of the app and environment's pool happens no later than `at`, even
    /// when its own back-off after failed connects runs longer. The sender's pause of an
    /// unreachable APNs decides when to try again; the pool's back-off is there against
    /// connect storms between such tries, and must not outlast them (the first try after the
    /// pause would otherwise fail on the old error without connecting).
    pub fn connect_by(&self, app: &str, environment: Environment, at: std::time::Instant) {
        if let Some(pool) = self.pool(app, environment) {
            pool.connect_by(at.into());
        }
    }

    /// At a stop: requests that have not gone out yet (waiting for a connection or a free
    /// stream) end as unsent retries instead of going out during the grace period, whose
    /// answers the stop might not wait for (they would be sent again after the restart).
    /// Requests already written finish.
    pub fn close_to_new_requests(&self) {
        for pools in self.inner.pools.values() {
            for pool in pools {
                pool.close_to_new_requests();
            }
        }
    }

    /// Sends one push. Never panics; returns within about `request_timeout_ms` of the
    /// request going out (before that: the connect time when a connection must be opened,
    /// and the wait for a free stream when every connection carries all APNs allows).
    pub async fn send(&self, req: &PushRequest) -> Outcome {
        let Some(pool) = self.pool(&req.app, req.environment) else {
            return Outcome::Failed {
                status: 0,
                reason: format!("app {:?} is not configured", req.app),
            };
        };
        let outcome = send_on(pool, req).await;
        if !matches!(outcome, Outcome::Sent { .. }) {
            tracing::debug!(
                pool = %pool.label,
                token = token_prefix(&req.token),
                apns_id = %req.apns_id,
                outcome = outcome.kind(),
                reason = outcome.reason(),
                "APNs push not sent"
            );
        }
        outcome
    }
}

/// How the reason of a request APNs did not answer in time begins (the metrics' `timeout`).
pub const TIMEOUT_REASON: &str = "no answer from APNs within";

/// How often a request APNs did not process is sent again at once; later tries wait a
/// moment first (see [`REROUTE_WAIT`]), until the request's deadline.
const MAX_REROUTES: u32 = 3;

/// The first wait before a try past [`MAX_REROUTES`]; it doubles up to 32 times this.
const REROUTE_WAIT: Duration = Duration::from_millis(5);

async fn send_on(pool: &Arc<Pool>, req: &PushRequest) -> Outcome {
    // Latency is timed from here, a wait for a connection or a free stream included: the
    // answer's latency as the delivery saw it, the figure its log line gives too.
    let began = Instant::now();
    let timeout = pool_timeout(pool);
    // Connecting, and sending again what APNs did not process, end `timeout` after the
    // request began or first went out. An answer has `timeout` from when its request went out:
    // the wait for a free stream on a busy connection (APNs allows one until it authorises a
    // token, and caps them after) is not APNs failing to answer, and a request timed out for
    // it would be sent again although APNs had it: a duplicate push.
    let mut deadline = began + timeout;
    let mut reroutes = 0;
    loop {
        let lease = match pool.acquire(began, deadline).await {
            Ok(l) => l,
            Err(o) => return o,
        };
        let now = Instant::now();
        if reroutes == 0 {
            // The first time it goes out.
            deadline = deadline.max(now + timeout);
        }
        let answer_by = now + timeout;
        let jwt = match &pool.auth {
            PoolAuth::Token(s) => match lease.conn.token(s) {
                Ok(j) => Some(j),
                Err(e) => {
                    return Outcome::PauseApp {
                        status: None,
                        reason: e.to_string(),
                    };
                }
            },
            PoolAuth::Certificate(_) => None,
        };
        let request = match build_request(&pool.endpoint.authority, req, jwt.as_deref()) {
            Ok(r) => r,
            Err(o) => return o,
        };
        let exchange = pool
            .exchange(&lease.conn, request, req.payload.clone(), answer_by)
            .await;
        match exchange {
            Exchange::Answer {
                status,
                apns_id,
                body,
            } => {
                let latency = began.elapsed();
                crate::metrics::get()
                    .send_latency_seconds
                    .observe(latency.as_secs_f64());
                if status != 403 {
                    pool.mark_authorised(&lease.conn);
                }
                if status == 200 {
                    return Outcome::Sent {
                        apns_id: apns_id.unwrap_or_else(|| req.apns_id.clone()),
                        latency,
                    };
                }
                let err = parse_error_body(&body);
                return match classify(status, &err.reason, err.timestamp) {
                    Classified::Done(o) => {
                        if matches!(o, Outcome::PauseApp { .. }) {
                            // Re-read credentials next time: the key file on the next mint,
                            // certificate files on the next connection.
                            if let (PoolAuth::Token(s), Some(j)) = (&pool.auth, &jwt) {
                                s.on_rejected(j);
                            }
                            pool.refuse(&lease.conn, o.reason());
                            tracing::warn!(event = "apns_credentials_rejected", pool = %pool.label, reason = o.reason(), "APNs rejected the app's credentials");
                        }
                        o
                    }
                    Classified::ExpiredToken => {
                        lease.conn.token_expired();
                        expired(pool, jwt.as_deref())
                    }
                };
            }
            // Not processed by APNs (a refused stream, a connection going away): sent again at
            // once, on another connection where this one is gone. A server that keeps
            // refusing (one stream until the first authorised request) frees a slot with
            // each answer, so after a few tries the next waits a moment; only one that
            // refuses until the deadline makes this an unsent retry, which pauses the app
            // like an unreachable APNs.
            Exchange::NotSent(reason) | Exchange::GoAway(reason) => {
                drop(lease);
                reroutes += 1;
                if Instant::now() >= deadline {
                    return Outcome::Retry {
                        status: None,
                        reason,
                        unsent: true,
                    };
                }
                if reroutes > MAX_REROUTES {
                    let wait = REROUTE_WAIT * 2u32.pow((reroutes - MAX_REROUTES - 1).min(5));
                    tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
                }
            }
            Exchange::Timeout => {
                // A hanging APNs shows in the histogram too, at the timeout.
                crate::metrics::get()
                    .send_latency_seconds
                    .observe(began.elapsed().as_secs_f64());
                return Outcome::Retry {
                    status: None,
                    reason: format!("{TIMEOUT_REASON} {} ms", pool_timeout(pool).as_millis()),
                    unsent: false,
                };
            }
            Exchange::Broken {
                reason,
                pause,
                collateral,
            } => {
                return if pause {
                    Outcome::PauseApp {
                        status: None,
                        reason,
                    }
                } else if collateral {
                    Outcome::Cut { reason }
                } else {
                    Outcome::Retry {
                        status: None,
                        reason,
                        unsent: false,
                    }
                };
            }
        }
    }
}

fn pool_timeout(pool: &Pool) -> Duration {
    pool.request_timeout()
}

/// 403 `ExpiredProviderToken`: refresh (at most once per 20 minutes) and ask for a resend.
fn expired(pool: &Pool, used: Option<&Jwt>) -> Outcome {
    let reason = "ExpiredProviderToken".to_string();
    let (PoolAuth::Token(signer), Some(used)) = (&pool.auth, used) else {
        // Certificate auth has no token to refresh: Apple should not say this; retry later.
        return Outcome::Retry {
            status: Some(403),
            reason,
            unsent: false,
        };
    };
    match signer.on_expired(used) {
        Ok(true) => Outcome::AuthRefreshed { reason },
        // Too young to replace (Apple refuses a new token within 20 minutes of the last):
        // every request with it would be refused alike, so the app pauses with back-off, its
        // deliveries keeping their attempts, until a new token may be minted.
        Ok(false) => {
            tracing::warn!(
                event = "jwt_expired_too_young",
                pool = %pool.label,
                "APNs calls a provider token younger than 20 minutes expired; is this host's clock right?"
            );
            Outcome::PauseApp {
                status: Some(403),
                reason,
            }
        }
        Err(e) => Outcome::PauseApp {
            status: Some(403),
            reason: e.to_string(),
        },
    }
}

fn bad_header(name: &str, token: &str) -> Outcome {
    Outcome::Failed {
        status: 0,
        reason: format!(
            "{name} of the push to {} is not a valid HTTP header value",
            token_prefix(token)
        ),
    }
}

fn build_request(
    authority: &http::uri::Authority,
    req: &PushRequest,
    jwt: Option<&Jwt>,
) -> Result<Request<()>, Outcome> {
    let mut path = String::with_capacity(10 + req.token.len());
    path.push_str("/3/device/");
    path.push_str(&req.token);
    let uri = Uri::builder()
        .scheme(http::uri::Scheme::HTTPS)
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| Outcome::Failed {
            status: 0,
            reason: format!(
                "device token {} cannot go into a URL path",
                token_prefix(&req.token)
            ),
        })?;
    let mut r = Request::new(());
    *r.method_mut() = Method::POST;
    *r.uri_mut() = uri;
    let h = r.headers_mut();
    h.insert(
        H_TOPIC.clone(),
        HeaderValue::from_str(&req.topic).map_err(|_| bad_header("apns-topic", &req.token))?,
    );
    h.insert(
        H_PUSH_TYPE.clone(),
        HeaderValue::from_static(req.push_type.as_str()),
    );
    h.insert(
        H_PRIORITY.clone(),
        match req.priority {
            10 => HeaderValue::from_static("10"),
            5 => HeaderValue::from_static("5"),
            1 => HeaderValue::from_static("1"),
            p => HeaderValue::from(u16::from(p)),
        },
    );
    if let Some(e) = req.expiration {
        h.insert(H_EXPIRATION.clone(), HeaderValue::from(e));
    }
    if let Some(c) = &req.collapse_id {
        h.insert(
            H_COLLAPSE_ID.clone(),
            HeaderValue::from_str(c).map_err(|_| bad_header("apns-collapse-id", &req.token))?,
        );
    }
    // Each apns-id is sent once per attempt: worth nothing in HPACK's dynamic table, where it
    // would push out the headers every request repeats (topic, push type, priority), so they
    // had to be sent in full again. "Never indexed" keeps it out, as h2 does for `:path`.
    let mut id =
        HeaderValue::from_str(&req.apns_id).map_err(|_| bad_header("apns-id", &req.token))?;
    id.set_sensitive(true);
    h.insert(H_ID.clone(), id);
    if let Some(j) = jwt {
        h.insert(AUTHORIZATION, j.header.clone());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_apple_headers() {
        let req = PushRequest {
            app: "a".into(),
            environment: Environment::Production,
            token: "ab".repeat(32),
            apns_id: "123e4567-e89b-12d3-a456-426614174000".into(),
            topic: "com.example.voip".into(),
            push_type: PushType::Voip,
            priority: 5,
            expiration: Some(1_800_000_000),
            collapse_id: Some("c".into()),
            payload: Bytes::from_static(b"{}"),
        };
        let auth: http::uri::Authority = "api.push.apple.com".parse().unwrap();
        let r = build_request(&auth, &req, None).unwrap();
        assert_eq!(r.method(), Method::POST);
        assert_eq!(
            r.uri().to_string(),
            format!("https://api.push.apple.com/3/device/{}", req.token)
        );
        let h = r.headers();
        assert_eq!(h["apns-topic"], "com.example.voip");
        assert_eq!(h["apns-push-type"], "voip");
        assert_eq!(h["apns-priority"], "5");
        assert_eq!(h["apns-expiration"], "1800000000");
        assert_eq!(h["apns-collapse-id"], "c");
        assert_eq!(h["apns-id"], "123e4567-e89b-12d3-a456-426614174000");
        assert!(
            h["apns-id"].is_sensitive(),
            "a one-off apns-id is sent never-indexed, out of HPACK's table"
        );
        assert!(
            !h["apns-topic"].is_sensitive(),
            "repeated headers are indexed"
        );
        assert!(h.get("authorization").is_none());

        let bad = PushRequest {
            topic: "a\nb".into(),
            ..req
        };
        assert_eq!(
            build_request(&auth, &bad, None).unwrap_err().kind(),
            "failed"
        );
    }
}
