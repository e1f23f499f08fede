//! TLS set-up for APNs connections: rustls with the ring provider, ALPN `h2`, TLS 1.2+, the
//! built-in web PKI roots plus `[apns] ca_file`, and the app's client certificate for
//! certificate authentication.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::ApnsError;

/// The process's one crypto provider (ring: no C toolchain beyond cc needed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ApnsError> {
    let bad = |message: String| ApnsError::Cert {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, ApnsError> {
    let bad = |message: String| ApnsError::Cert {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    rustls_pemfile::private_key(&mut text.as_slice())
        .map_err(|e| bad(format!("not a PEM file: {e}")))?
        .ok_or_else(|| {
            let encrypted = text.windows(9).any(|w| w == b"ENCRYPTED");
            bad(if encrypted {
                "holds an encrypted private key, which pushdrop does not read: decrypt it \
                 (`openssl pkey -in KEY -out KEY.plain`, kept mode 600) or give a PKCS#12 \
                 file with certificate.password_file"
                    .into()
            } else {
                "holds no PEM private key".into()
            })
        })
}

/// A PKCS#12 file is DER, not PEM: its name says `.p12`/`.pfx`, or it does not start like PEM.
pub(crate) fn is_pkcs12(path: &Path) -> bool {
    let by_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("p12") || e.eq_ignore_ascii_case("pfx"));
    by_name
        || std::fs::read(path).is_ok_and(|b| b.first() == Some(&0x30) && !b.starts_with(b"-----"))
}

/// The certificate chain and private key of a PKCS#12 file; the password is the first line
/// of `password_file` (empty without one).
pub fn read_pkcs12(
    path: &Path,
    password_file: Option<&Path>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ApnsError> {
    let bad = |message: String| ApnsError::Cert {
        path: path.to_path_buf(),
        message,
    };
    let password = match password_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| ApnsError::Cert {
                path: p.to_path_buf(),
                message: format!("cannot read the PKCS#12 password: {e}"),
            })?
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        None => String::new(),
    };
    let der = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let store = p12_keystore::KeyStore::from_pkcs12(
        &der,
        &password,
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .map_err(|e| {
        bad(match password_file {
            Some(_) => format!("not a readable PKCS#12 file (wrong password?): {e}"),
            None => format!(
                "not a readable PKCS#12 file (a password-protected one needs \
                 certificate.password_file, a file whose first line is the password): {e}"
            ),
        })
    })?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or_else(|| bad("PKCS#12 file holds no private key with certificates".into()))?;
    let certs: Vec<CertificateDer<'static>> = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    if certs.is_empty() {
        return Err(bad("PKCS#12 file holds no certificate".into()));
    }
    let key = PrivateKeyDer::try_from(chain.key().as_der().to_vec())
        .map_err(|e| bad(format!("PKCS#12 private key: {e}")))?;
    Ok((certs, key))
}

/// The trusted roots: Mozilla's (webpki-roots) plus every certificate of `ca_file`.
pub(crate) fn roots(ca_file: Option<&Path>) -> Result<Arc<RootCertStore>, ApnsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| ApnsError::Cert {
                path: path.to_path_buf(),
                message: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    Ok(Arc::new(roots))
}

/// A client config; with `client_cert` for certificate authentication. The files are read
/// here, so calling this at every new connection picks up renewed certificates.
pub(crate) fn client_config(
    roots: Arc<RootCertStore>,
    client_cert: Option<&crate::config::CertificateAuthConfig>,
) -> Result<Arc<ClientConfig>, ApnsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ApnsError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let cert_file = c.cert_file.as_path();
            let (certs, key, key_path) = if is_pkcs12(cert_file) {
                let (certs, key) = read_pkcs12(cert_file, c.password_file.as_deref())?;
                (certs, key, cert_file)
            } else {
                let key_path = c.key_file.as_deref().unwrap_or(cert_file);
                (
                    read_certs(cert_file)?,
                    read_private_key(key_path)?,
                    key_path,
                )
            };
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| ApnsError::Cert {
                    path: cert_file.to_path_buf(),
                    message: format!(
                        "certificate and key {} do not go together: {e}",
                        key_path.display()
                    ),
                })?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
