//! Helpers for tests against the APNs simulator: a simulator with its credentials in a temp
//! dir, configs pointing at it, push requests, a sender-like retry loop, a CONNECT proxy.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pushdrop::apns::{ApnsClient, Outcome, PushRequest};
use pushdrop::config::{Config, Environment};
use pushdrop::model::PushType;
use pushdrop::simulator::{SimCredentials, SimOptions, Simulator};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running simulator and the temp dir holding its credentials.
pub struct SimEnv {
    pub sim: Simulator,
    pub creds: SimCredentials,
    pub dir: tempfile::TempDir,
}

pub async fn start(opts: SimOptions) -> SimEnv {
    let sim = Simulator::start(opts).await.expect("simulator starts");
    let dir = tempfile::tempdir().unwrap();
    let creds = sim.write_credentials(dir.path()).unwrap();
    SimEnv { sim, creds, dir }
}

pub const BUNDLE: &str = "com.example.app";

impl SimEnv {
    /// `[[apps]]` with the simulator's own key.
    pub fn token_app(&self, name: &str) -> String {
        token_app(
            name,
            BUNDLE,
            &self.creds.key_file,
            &self.creds.key_id,
            &self.creds.team_id,
        )
    }

    /// A config: the simulator as both hosts, `apns_extra` lines in `[apns]`, then `apps`.
    pub fn config(&self, apns_extra: &str, apps: &str) -> Config {
        config_for(
            &self.sim.url(),
            &self.creds.ca_file,
            self.dir.path(),
            apns_extra,
            apps,
        )
    }

    /// A client with one token-auth app called "app".
    pub fn client(&self, apns_extra: &str) -> ApnsClient {
        ApnsClient::new(&self.config(apns_extra, &self.token_app("app"))).unwrap()
    }
}

pub fn token_app(name: &str, bundle: &str, key: &Path, key_id: &str, team_id: &str) -> String {
    format!(
        "[[apps]]\nname = \"{name}\"\nbundle_id = \"{bundle}\"\ntoken = {{ key_file = \"{}\", key_id = \"{key_id}\", team_id = \"{team_id}\" }}\n",
        key.display()
    )
}

pub fn cert_app(name: &str, cert: &Path, key: Option<&Path>) -> String {
    let key = key
        .map(|k| format!(", key_file = \"{}\"", k.display()))
        .unwrap_or_default();
    format!(
        "[[apps]]\nname = \"{name}\"\nbundle_id = \"{BUNDLE}\"\ncertificate = {{ cert_file = \"{}\"{key} }}\n",
        cert.display()
    )
}

pub fn config_for(url: &str, ca: &Path, dir: &Path, apns_extra: &str, apps: &str) -> Config {
    let text = format!(
        "[inbox]\ndir = \"inbox\"\n\n[apns]\nproduction_url = \"{url}\"\nsandbox_url = \"{url}\"\nca_file = \"{}\"\n{apns_extra}\n\n{apps}",
        ca.display()
    );
    let (cfg, _warnings) = Config::from_toml(&text, &dir.join("pushdrop.toml"), dir)
        .unwrap_or_else(|e| panic!("test config is valid: {e}\n{text}"));
    cfg
}

/// A 32-byte device token, distinct per `i`.
pub fn token(i: u32) -> String {
    format!("{:08x}{}", i, "ab".repeat(28))
}

/// An alert push to `token(i)` for app "app".
pub fn push(i: u32) -> PushRequest {
    push_for("app", &token(i), PushType::Alert)
}

pub fn push_for(app: &str, token: &str, push_type: PushType) -> PushRequest {
    PushRequest {
        app: Arc::from(app),
        environment: Environment::Production,
        token: token.to_string(),
        apns_id: uuid::Uuid::new_v4().to_string(),
        topic: format!("{BUNDLE}{}", push_type.topic_suffix()),
        push_type,
        priority: push_type.default_priority(),
        expiration: None,
        collapse_id: None,
        payload: Bytes::from_static(br#"{"aps":{"alert":"hi"}}"#),
    }
}

/// What the sender does, in small: resend after `Retry` and `AuthRefreshed` until something
/// final comes back (bounded in tries and time). Returns every outcome seen.
pub async fn deliver(client: &ApnsClient, req: PushRequest) -> Vec<Outcome> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    for attempt in 0u32..60 {
        let o = client.send(&req).await;
        let again = matches!(
            o,
            Outcome::Retry { .. } | Outcome::Cut { .. } | Outcome::AuthRefreshed { .. }
        );
        seen.push(o);
        if !again || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt.min(10)))).await;
    }
    seen
}

/// Runs `f` with a hard time limit, so a hang fails the test instead of blocking CI.
pub async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

/// A tiny HTTP CONNECT proxy on loopback that counts the tunnels it opened.
pub struct ConnectProxy {
    pub url: String,
    pub tunnels: Arc<AtomicUsize>,
    /// While set, tunnels hold every byte instead of forwarding it (a silent dead peer).
    pub frozen: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies one direction of a tunnel, holding bytes while `frozen` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn connect_proxy() -> ConnectProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tunnels = Arc::new(AtomicUsize::new(0));
    let count = tunnels.clone();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let frozen2 = frozen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            let frozen = frozen2.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let mut words = head.split_whitespace();
                let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::join!(pump(cr, uw, frozen.clone()), pump(ur, cw, frozen));
            });
        }
    });
    ConnectProxy {
        url: format!("http://{addr}"),
        tunnels,
        frozen,
        task,
    }
}

/// A `.p8` key the simulator has never seen.
pub fn foreign_p8(dir: &Path) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let path = dir.join("AuthKey_FOREIGN.p8");
    std::fs::write(&path, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A self-signed client certificate (not from the simulator's CA), cert and key files.
pub fn foreign_client_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let c = dir.join("foreign-cert.pem");
    let k = dir.join("foreign-key.pem");
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    (c, k)
}

/// A provider token signed with the simulator's key, `iat` seconds since the epoch.
pub fn jwt(env: &SimEnv, iat: u64) -> String {
    jwt_at(env, iat)
}

/// Same as [`jwt`].
pub fn jwt_at(env: &SimEnv, iat: u64) -> String {
    jwt_with(
        &env.creds.key_file,
        &env.creds.key_id,
        &env.creds.team_id,
        iat,
    )
}

/// A provider token from any key file.
pub fn jwt_with(key_file: &Path, key_id: &str, team_id: &str, iat: u64) -> String {
    let pem = std::fs::read(key_file).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(key_id.to_string());
    let claims = serde_json::json!({"iss": team_id, "iat": iat});
    jsonwebtoken::encode(&h, &claims, &key).unwrap()
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HTTP/2 connection to the simulator built by hand, for requests the client would never
/// send (wrong method, bad headers, no token).
#[derive(Clone)]
pub struct RawConn {
    send: h2::client::SendRequest<Bytes>,
}

impl RawConn {
    pub async fn open(env: &SimEnv) -> RawConn {
        RawConn::open_as(env, None).await
    }

    /// With `client` = (certificate PEM file, key PEM file): certificate auth.
    pub async fn open_as(env: &SimEnv, client: Option<(&Path, &Path)>) -> RawConn {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(env.sim.ca_pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(pushdrop::apns::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut cfg = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(key).unwrap();
                builder.with_client_auth_cert(certs, key).unwrap()
            }
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(env.sim.addr())
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        RawConn { send }
    }

    /// How many streams the server's SETTINGS let this connection open at once (`h2`'s own
    /// guess until they arrive).
    pub fn stream_limit(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Sends one request; returns the status and Apple's reason ("" for 200).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        self.try_request(method, path, headers, body)
            .await
            .unwrap_or_else(|r| panic!("{method} {path}: stream reset ({r:?})"))
    }

    /// [`RawConn::request`], or the reason the server reset the stream with.
    pub async fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, String), h2::Reason> {
        let resp = self.start(method, path, headers, body).await;
        RawConn::finish(resp).await
    }

    /// Sends a request without waiting for its answer ([`RawConn::finish`] does): several
    /// started in a row go out in that order, before any answer comes.
    pub async fn start(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> h2::client::ResponseFuture {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(()).unwrap();
        let send = self.send.clone();
        let mut send = send.ready().await.unwrap();
        let (resp, mut stream) = send.send_request(req, body.is_empty()).unwrap();
        if !body.is_empty() {
            stream
                .send_data(Bytes::copy_from_slice(body), true)
                .unwrap();
        }
        resp
    }

    /// The status and Apple's reason of a started request, or its stream's reset reason.
    pub async fn finish(resp: h2::client::ResponseFuture) -> Result<(u16, String), h2::Reason> {
        let resp = match resp.await {
            Ok(r) => r,
            Err(e) => return Err(e.reason().unwrap_or_else(|| panic!("{e}"))),
        };
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(chunk) = body.data().await {
            buf.extend_from_slice(&chunk.unwrap());
        }
        let reason = if buf.is_empty() {
            String::new()
        } else {
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            v["reason"].as_str().unwrap_or("").to_string()
        };
        Ok((status, reason))
    }
}
