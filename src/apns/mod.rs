//! The APNs client: HTTP/2 over TLS to Apple (or any server that speaks its protocol, such as
//! the built-in [`crate::simulator`]).
//!
//! The sender hands [`ApnsClient::send`] one [`PushRequest`] at a time, from as many tasks as
//! it likes, and gets back an [`Outcome`] that already says what to do next. Everything about
//! connections is hidden here: one pool per (app, environment), because a connection is bound
//! to one key or certificate; streams multiplexed up to what the server allows; reconnects with
//! back-off; provider tokens minted and refreshed on Apple's schedule.
//!
//! Layout: [`outcome`] maps APNs answers onto outcomes, [`auth`] mints provider tokens,
//! `tls` and `proxy` open the transport, `pool` owns the connections, `client` ties it up.

pub mod auth;
mod client;
pub mod outcome;
mod pool;
mod proxy;
mod sniff;
pub mod tls;

use std::path::PathBuf;

pub use auth::{Clock, system_clock};
pub use client::{ApnsClient, ClientStats, PushRequest, TIMEOUT_REASON};
pub use outcome::Outcome;

/// What would stop the client from starting, by config key: the contents of the CA file and
/// of every app's key or certificate (the config itself only checks that they exist). For
/// `check-config` and `run`, so that a bad key file is a bad config (exit 64) named by its
/// key and line.
pub fn credential_problems(cfg: &crate::config::Config) -> Vec<crate::config::ConfigProblem> {
    problems_of_credentials(cfg, false)
}

/// [`credential_problems`] among the files this user can read, for the other commands: a key
/// file that holds no key is a bad config for every command (SPEC 3: exit 64), while an
/// operator who may not read the keys can still run `status`, `show` and the rest.
pub fn readable_credential_problems(
    cfg: &crate::config::Config,
) -> Vec<crate::config::ConfigProblem> {
    problems_of_credentials(cfg, true)
}

fn problems_of_credentials(
    cfg: &crate::config::Config,
    readable_only: bool,
) -> Vec<crate::config::ConfigProblem> {
    let mut problems = Vec::new();
    let mut bad = |key: String, e: ApnsError| {
        problems.push(crate::config::ConfigProblem {
            key,
            line: None,
            message: e.to_string(),
        })
    };
    // Files that do not exist (or are no files) are reported by the config already; one in a
    // folder this user may not enter is only a warning there, and an error here.
    // `readable_only`: a file this user may not read (or reach) is left to `run`.
    let present = |p: &std::path::Path| match std::fs::metadata(p) {
        Ok(m) => m.is_file() && (!readable_only || std::fs::File::open(p).is_ok()),
        Err(e) => !readable_only && e.kind() == std::io::ErrorKind::PermissionDenied,
    };
    let roots = match cfg.apns.ca_file.as_deref().filter(|p| present(p)) {
        Some(ca) => match tls::roots(Some(ca)) {
            Ok(r) => Some(r),
            Err(e) => {
                bad("apns.ca_file".into(), e);
                None
            }
        },
        None => tls::roots(None).ok(),
    };
    for (i, app) in cfg.apps.iter().enumerate() {
        // Both or neither given is reported by the config already.
        match (&app.token, &app.certificate) {
            (Some(t), None) if present(&t.key_file) => {
                if let Err(e) = auth::read_key(&t.key_file) {
                    bad(format!("apps[{i}].token.key_file"), e);
                }
            }
            (None, Some(c))
                if present(&c.cert_file)
                    && (!readable_only
                        || [&c.key_file, &c.password_file]
                            .into_iter()
                            .flatten()
                            .all(|p| present(p))) =>
            {
                if let Some(roots) = &roots
                    && let Err(e) = tls::client_config(roots.clone(), Some(c))
                {
                    // The key of the file at fault.
                    let field = match &e {
                        ApnsError::Cert { path, .. } if Some(path) == c.key_file.as_ref() => {
                            "key_file"
                        }
                        ApnsError::Cert { path, .. } if Some(path) == c.password_file.as_ref() => {
                            "password_file"
                        }
                        _ => "cert_file",
                    };
                    bad(format!("apps[{i}].certificate.{field}"), e);
                }
            }
            _ => {}
        }
    }
    problems
}

/// What `run` and `check-config` say about client certificates that work today but will not
/// for long: expired or not yet valid (APNs refuses them; Apple's push certificates last a
/// year), expiring within [`EXPIRY_WARNING_DAYS`], and a `key_file` a PKCS#12 file makes
/// unused. Files that cannot be read are [`credential_problems`].
pub fn credential_warnings(cfg: &crate::config::Config) -> Vec<crate::config::ConfigProblem> {
    let mut warnings = Vec::new();
    let now = crate::model::now_ms() / 1000;
    for (i, app) in cfg.apps.iter().enumerate() {
        let Some(c) = &app.certificate else {
            continue;
        };
        let mut warn = |field: &str, message: String| {
            warnings.push(crate::config::ConfigProblem {
                key: format!("apps[{i}].certificate.{field}"),
                line: None,
                message,
            })
        };
        let pkcs12 = tls::is_pkcs12(&c.cert_file);
        if pkcs12 && c.key_file.is_some() {
            warn(
                "key_file",
                "is not used: the PKCS#12 cert_file holds the private key".into(),
            );
        }
        if !pkcs12 && c.password_file.is_some() && c.cert_file.is_file() {
            warn(
                "password_file",
                "is not used: only a PKCS#12 cert_file is opened with a password, and this one is PEM".into(),
            );
        }
        let leaf = if pkcs12 {
            tls::read_pkcs12(&c.cert_file, c.password_file.as_deref())
                .ok()
                .and_then(|(certs, _)| certs.into_iter().next())
        } else {
            tls::read_certs(&c.cert_file, "certificate file")
                .ok()
                .and_then(|certs| certs.into_iter().next())
        };
        let Some(leaf) = leaf else {
            continue;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
            continue;
        };
        let validity = cert.validity();
        let (from, until) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        let date = |t: i64| {
            crate::store::query::rfc3339_ms(t.saturating_mul(1000))
                .get(..10)
                .unwrap_or("?")
                .to_string()
        };
        if until < now {
            warn(
                "cert_file",
                format!(
                    "{}: the certificate expired on {}: APNs refuses it (make a new one in the Apple developer account)",
                    c.cert_file.display(),
                    date(until)
                ),
            );
        } else if from > now {
            warn(
                "cert_file",
                format!(
                    "{}: the certificate is not valid before {}",
                    c.cert_file.display(),
                    date(from)
                ),
            );
        } else if until - now < EXPIRY_WARNING_DAYS * 86_400 {
            warn(
                "cert_file",
                format!(
                    "{}: the certificate expires on {} (in {} days): renew it",
                    c.cert_file.display(),
                    date(until),
                    (until - now) / 86_400
                ),
            );
        }
    }
    warnings
}

/// A client certificate expiring within this many days draws a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// A configuration problem found while setting up the client (bad key, certificate or URL).
/// Network trouble is never an `ApnsError`: it is an [`Outcome`] of a send.
#[derive(Debug, thiserror::Error)]
pub enum ApnsError {
    /// The `.p8` key cannot be read or used.
    #[error("APNs key {path}: {message}")]
    Key { path: PathBuf, message: String },
    /// A certificate, private key or CA file cannot be read or used; `kind` says which
    /// ("key file": a key file is no certificate file, and an error saying so misleads).
    #[error("{kind} {path}: {message}")]
    Cert {
        kind: &'static str,
        path: PathBuf,
        message: String,
    },
    /// A URL or proxy setting cannot be used.
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    /// rustls refused the TLS settings.
    #[error("TLS set-up: {0}")]
    Tls(String),
}
