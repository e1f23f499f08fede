//! Provider tokens (ES256 JWTs) for token authentication.
//!
//! Apple wants one token per key, reused for 20 to 60 minutes: older than an hour it answers
//! `ExpiredProviderToken`, refreshed more often than every 20 minutes it answers
//! `TooManyProviderTokenUpdates`. So a [`TokenSigner`] per key is shared by every connection
//! of every app using that key, and it is the only place that mints.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::ApnsError;
use crate::config::TokenAuthConfig;

/// The time source of token ages. Injectable so tests can live through an hour in a second.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The real clock.
pub fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

/// A token is refreshed on use once it is this old (Apple: between 20 and 60 minutes).
pub const REFRESH_AFTER: Duration = Duration::from_secs(50 * 60);
/// No token is replaced before it is this old (Apple: `TooManyProviderTokenUpdates`).
pub const MIN_TOKEN_AGE: Duration = Duration::from_secs(20 * 60);

/// One minted token, ready to go into the `authorization` header.
#[derive(Debug)]
pub(crate) struct Jwt {
    /// `bearer <jwt>`.
    pub header: HeaderValue,
    /// The token's `iat`, by the signer's clock.
    pub issued: SystemTime,
    /// Increases with every mint; lets a failed request tell whether its token is still the
    /// current one.
    pub generation: u64,
}

struct State {
    /// The key file, key id and team id: the config's at start, and as the config file says
    /// after Apple rejected them (see [`TokenSigner::current`]).
    key_file: PathBuf,
    key_id: String,
    team_id: String,
    key: EncodingKey,
    /// The key file's bytes `key` was read from: a rejected key that is still the same file
    /// mints no new token before [`MIN_TOKEN_AGE`].
    pem: Vec<u8>,
    current: Option<Arc<Jwt>>,
    /// Set after Apple rejected the key: the next mint re-reads the config's ids and the key
    /// file, so fixed credentials are picked up without a restart.
    reload: bool,
    /// When an `ExpiredProviderToken` answer last made a new token: at most one such refresh
    /// per 20 minutes.
    last_forced: Option<SystemTime>,
}

/// Mints and caches the provider token of one key.
pub(crate) struct TokenSigner {
    /// The config file and the app whose `token` this signer was made for: read again after
    /// a rejection, for a fixed `key_id`, `team_id` or `key_file`.
    origin: Option<(PathBuf, String)>,
    clock: Clock,
    state: Mutex<State>,
    mints: Arc<AtomicU64>,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

pub(crate) fn read_key(path: &Path) -> Result<EncodingKey, ApnsError> {
    parse_key(path, &read_pem(path)?)
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ApnsError> {
    std::fs::read(path).map_err(|e| ApnsError::Key {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<EncodingKey, ApnsError> {
    let bad = |e: String| ApnsError::Key {
        path: path.to_path_buf(),
        message: format!("not a PKCS#8 EC P-256 (.p8) private key: {e}"),
    };
    // The PEM first: a damaged file is said as such (where, and what), not as
    // "InvalidKeyFormat".
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    if let Err(e) = PrivateKeyDer::from_pem_slice(pem)
        && !matches!(e, rustls::pki_types::pem::Error::NoItemsFound)
    {
        return Err(ApnsError::Key {
            path: path.to_path_buf(),
            message: super::tls::pem_problem(pem, e, "private key", 0),
        });
    }
    let key = EncodingKey::from_ec_pem(pem).map_err(|e| bad(e.to_string()))?;
    // `from_ec_pem` takes any EC key; one on another curve (P-384, secp256k1) fails only when
    // it signs. One signature now (tens of microseconds, once per read) makes `check-config`
    // and the start refuse it, instead of an app paused for good at its first push.
    jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &Claims { iss: "", iat: 0 },
        &key,
    )
    .map_err(|e| {
        bad(format!(
            "it cannot sign ES256 ({e}): is it on another curve?"
        ))
    })?;
    Ok(key)
}

impl TokenSigner {
    /// Reads the key now, so a bad key file is reported at start-up. `origin`: the config
    /// file and app name to read the token settings from again after a rejection.
    pub fn new(
        cfg: &TokenAuthConfig,
        origin: Option<(PathBuf, String)>,
        clock: Clock,
        mints: Arc<AtomicU64>,
    ) -> Result<TokenSigner, ApnsError> {
        let pem = read_pem(&cfg.key_file)?;
        let key = parse_key(&cfg.key_file, &pem)?;
        Ok(TokenSigner {
            origin,
            clock,
            state: Mutex::new(State {
                key_file: cfg.key_file.clone(),
                key_id: cfg.key_id.clone(),
                team_id: cfg.team_id.clone(),
                key,
                pem,
                current: None,
                reload: false,
                last_forced: None,
            }),
            mints,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State half-updated (every field is
        // replaced whole), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (key id, team id) as tokens are made now.
    pub fn ids(&self) -> (String, String) {
        let st = self.lock();
        (st.key_id.clone(), st.team_id.clone())
    }

    fn age(&self, jwt: &Jwt) -> Duration {
        (self.clock)()
            .duration_since(jwt.issued)
            .unwrap_or(Duration::ZERO)
    }

    /// The token to use now: the cached one, or a new one when it is 50 minutes old, or when
    /// the key was rejected and its file has changed since (or the token is 20 minutes old).
    pub fn current(&self) -> Result<Arc<Jwt>, ApnsError> {
        let mut st = self.lock();
        if let Some(j) = st.current.clone()
            && self.age(&j) < REFRESH_AFTER
        {
            if !st.reload {
                return Ok(j);
            }
            // Rejected (`InvalidProviderToken` and friends): the config's ids and the key
            // file are read again, so fixed ones are used at once. The same key and ids mint
            // nothing new before the token is 20 minutes old (one token per key, reused):
            // another token Apple refuses alike tells it nothing new, and each try of a paused
            // app would count as a refresh.
            let (ids_changed, pem) = self.reread(&mut st)?;
            if pem == st.pem && !ids_changed && self.age(&j) < MIN_TOKEN_AGE {
                st.reload = false;
                return Ok(j);
            }
            self.load(&mut st, pem)?;
        }
        self.mint(&mut st)
    }

    /// Takes `pem` as the key from now on (a rejected key's file read again).
    fn load(&self, st: &mut State, pem: Vec<u8>) -> Result<(), ApnsError> {
        st.key = parse_key(&st.key_file, &pem)?;
        st.pem = pem;
        st.reload = false;
        Ok(())
    }

    /// After a rejection: the app's token settings as the config file has them now (whether
    /// they changed), and the bytes of the key file they name.
    fn reread(&self, st: &mut State) -> Result<(bool, Vec<u8>), ApnsError> {
        let changed = self.reread_config(st);
        Ok((changed, read_pem(&st.key_file)?))
    }

    /// Takes the app's `token` settings from the config file as it is now; returns whether
    /// they changed. A config that cannot be read or is not valid now changes nothing (the
    /// daemon keeps what it started with; `check-config` says what is wrong).
    fn reread_config(&self, st: &mut State) -> bool {
        let Some((path, app)) = &self.origin else {
            return false;
        };
        let cfg = match crate::config::Config::load(path) {
            Ok((cfg, _)) => cfg,
            Err(e) => {
                tracing::warn!(event = "config_reread_failed", app = app.as_str(), error = %e, "cannot read the config again for the app's key_id, team_id and key_file; keeping those it started with");
                return false;
            }
        };
        let Some(t) = cfg
            .apps
            .iter()
            .find(|a| a.name == *app)
            .and_then(|a| a.token.as_ref())
        else {
            return false;
        };
        if t.key_file == st.key_file && t.key_id == st.key_id && t.team_id == st.team_id {
            return false;
        }
        tracing::info!(event = "token_settings_reread", app = app.as_str(), key_id = %t.key_id, team_id = %t.team_id, key_file = %t.key_file.display(), "the app's token settings changed in the config file: used from now on");
        st.key_file = t.key_file.clone();
        st.key_id = t.key_id.clone();
        st.team_id = t.team_id.clone();
        true
    }

    /// After APNs answered `ExpiredProviderToken` to a request signed with `used`: returns
    /// whether a newer token is now in place (minted here, or by a concurrent request). The
    /// answer makes a new token at once, but never twice within 20 minutes: a token such a
    /// refresh made that APNs still calls expired (a clock far off) is kept, and the caller
    /// pauses the app instead of minting in a loop.
    pub fn on_expired(&self, used: &Jwt) -> Result<bool, ApnsError> {
        let mut st = self.lock();
        let now = (self.clock)();
        let forced_lately = st.last_forced.is_some_and(|t| {
            now.duration_since(t)
                .is_ok_and(|since| since < MIN_TOKEN_AGE)
                || t > now
        });
        match &st.current {
            Some(j) if j.generation != used.generation => return Ok(true),
            Some(j) if self.age(j) < MIN_TOKEN_AGE && forced_lately => return Ok(false),
            _ => {}
        }
        self.mint(&mut st)?;
        st.last_forced = Some(now);
        Ok(true)
    }

    /// After APNs rejected the key or token outright (`InvalidProviderToken` and friends): the
    /// next token is minted from the key file as it is on disk then.
    pub fn on_rejected(&self, used: &Jwt) {
        let mut st = self.lock();
        if st.current.as_ref().map(|j| j.generation) == Some(used.generation) {
            st.reload = true;
        }
    }

    fn mint(&self, st: &mut State) -> Result<Arc<Jwt>, ApnsError> {
        if st.reload {
            let (_, pem) = self.reread(st)?;
            self.load(st, pem)?;
        }
        let key = &st.key;
        let now = (self.clock)();
        let iat = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        // Apple's documented header is `alg` and `kid` only. jsonwebtoken adds `"typ":"JWT"`,
        // which h2 would send with every request: it never indexes `authorization` in HPACK.
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None;
        header.kid = Some(st.key_id.clone());
        let token = jsonwebtoken::encode(
            &header,
            &Claims {
                iss: &st.team_id,
                iat,
            },
            key,
        )
        .map_err(|e| ApnsError::Key {
            path: st.key_file.clone(),
            message: format!("cannot sign a provider token: {e}"),
        })?;
        let header =
            HeaderValue::from_str(&format!("bearer {token}")).map_err(|e| ApnsError::Key {
                path: st.key_file.clone(),
                message: format!("token is not a header value: {e}"),
            })?;
        let generation = st.current.as_ref().map_or(1, |j| j.generation + 1);
        let jwt = Arc::new(Jwt {
            header,
            issued: UNIX_EPOCH + Duration::from_secs(iat),
            generation,
        });
        st.current = Some(jwt.clone());
        self.mints.fetch_add(1, Ordering::Relaxed);
        crate::metrics::get().jwt_refreshes.inc();
        tracing::info!(event = "jwt_minted", key_id = %st.key_id, team_id = %st.team_id, iat, "minted APNs provider token");
        Ok(jwt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    fn signer(offset: Arc<AtomicI64>) -> (TokenSigner, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let path = dir.path().join("AuthKey_ABC123DEFG.p8");
        std::fs::write(&path, key.serialize_pem()).unwrap();
        let base = SystemTime::now();
        let clock: Clock =
            Arc::new(move || base + Duration::from_secs(offset.load(Ordering::Relaxed) as u64));
        let cfg = TokenAuthConfig {
            key_file: path,
            key_id: "ABC123DEFG".into(),
            team_id: "DEF123GHIJ".into(),
        };
        (
            TokenSigner::new(&cfg, None, clock, Arc::new(AtomicU64::new(0))).unwrap(),
            dir,
        )
    }

    #[test]
    fn an_ec_key_on_another_curve_is_refused_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("AuthKey_P384.p8");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        std::fs::write(&path, key.serialize_pem()).unwrap();
        let Err(ApnsError::Key { message, .. }) = read_key(&path) else {
            panic!("a P-384 key was taken for an APNs key");
        };
        assert!(message.contains("another curve"), "{message}");
    }

    /// A `.p8` damaged by a copy and paste says what and where, not "InvalidKeyFormat".
    #[test]
    fn a_damaged_key_file_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("AuthKey_BANG.p8");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut lines: Vec<String> = key.serialize_pem().lines().map(String::from).collect();
        lines[2].insert(5, '!');
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let Err(ApnsError::Key { message, .. }) = read_key(&path) else {
            panic!("a damaged key was read");
        };
        assert!(
            message.contains("is not valid base64: `!` on line 3 is not a base64 character"),
            "{message}"
        );
    }

    #[test]
    fn token_is_reused_then_refreshed_at_fifty_minutes() {
        let t = Arc::new(AtomicI64::new(0));
        let (s, _d) = signer(t.clone());
        let a = s.current().unwrap();
        t.store(49 * 60, Ordering::Relaxed);
        assert_eq!(s.current().unwrap().generation, a.generation);
        t.store(50 * 60, Ordering::Relaxed);
        let b = s.current().unwrap();
        assert_eq!(b.generation, a.generation + 1);
        assert_eq!(s.mints.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn expired_answer_never_mints_twice_within_twenty_minutes() {
        let t = Arc::new(AtomicI64::new(0));
        let (s, _d) = signer(t.clone());
        let a = s.current().unwrap();
        // The first answer makes a new token at once, however young the one it named.
        t.store(60, Ordering::Relaxed);
        assert!(s.on_expired(&a).unwrap());
        let b = s.current().unwrap();
        assert_eq!(b.generation, 2);
        // Many requests signed with the old token come back expired: no new mint; the new
        // one called expired too (a clock far off): kept, for 20 minutes.
        t.store(19 * 60, Ordering::Relaxed);
        for _ in 0..10 {
            assert!(s.on_expired(&a).unwrap());
            assert!(!s.on_expired(&b).unwrap());
        }
        assert_eq!(s.mints.load(Ordering::Relaxed), 2);
        t.store(21 * 60, Ordering::Relaxed);
        assert!(s.on_expired(&b).unwrap());
        assert_eq!(s.current().unwrap().generation, 3);
    }

    /// The header Apple documents, and nothing more: every byte of the token goes out with
    /// every request.
    #[test]
    fn token_header_is_alg_and_kid_only() {
        use base64::Engine as _;
        let (s, _d) = signer(Arc::new(AtomicI64::new(0)));
        let jwt = s.current().unwrap();
        let value = jwt.header.to_str().unwrap();
        let token = value.strip_prefix("bearer ").unwrap();
        let head = token.split('.').next().unwrap();
        let head = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head)
            .unwrap();
        let head: serde_json::Value = serde_json::from_slice(&head).unwrap();
        assert_eq!(
            head,
            serde_json::json!({"alg": "ES256", "kid": "ABC123DEFG"})
        );
    }

    /// Each try of an app paused for its credentials asks for a token: the same key file
    /// gives the same token, until it is 20 minutes old.
    #[test]
    fn a_rejected_key_that_did_not_change_mints_nothing_new() {
        let t = Arc::new(AtomicI64::new(0));
        let (s, _d) = signer(t.clone());
        let a = s.current().unwrap();
        for _ in 0..3 {
            s.on_rejected(&a);
            assert_eq!(s.current().unwrap().generation, a.generation);
        }
        t.fetch_add(MIN_TOKEN_AGE.as_secs() as i64, Ordering::SeqCst);
        s.on_rejected(&a);
        assert_eq!(s.current().unwrap().generation, a.generation + 1);
        assert_eq!(s.mints.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn rejected_key_is_reread_from_disk() {
        let t = Arc::new(AtomicI64::new(0));
        let (s, _d) = signer(t);
        let a = s.current().unwrap();
        std::fs::write(s.lock().key_file.clone(), "garbage").unwrap();
        s.on_rejected(&a);
        let err = s.current().unwrap_err().to_string();
        assert!(err.contains("AuthKey_ABC123DEFG.p8"), "{err}");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(s.lock().key_file.clone(), key.serialize_pem()).unwrap();
        assert_eq!(s.current().unwrap().generation, 2);
    }
}
