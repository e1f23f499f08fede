//! TLS set-up for APNs connections: rustls with the ring provider, ALPN `h2`, TLS 1.2+, the
//! built-in web PKI roots plus `[apns] ca_file`, and the app's client certificate for
//! certificate authentication.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::ApnsError;

/// The process's one crypto provider (ring: no C toolchain beyond cc needed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file; `kind` names it in errors ("CA file").
pub fn read_certs(
    path: &Path,
    kind: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ApnsError> {
    let bad = |message: String| ApnsError::Cert {
        kind,
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&text) {
        certs.push(cert.map_err(|e| bad(pem_problem(&text, e, "certificate", certs.len())))?);
    }
    if certs.is_empty() {
        return Err(bad(format!(
            "holds no PEM certificate{}",
            misshapen_begin(&text)
        )));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, ApnsError> {
    let bad = |message: String| ApnsError::Cert {
        kind: "key file",
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        bad(match e {
            pem::Error::NoItemsFound if text.windows(9).any(|w| w == b"ENCRYPTED") => {
                "holds an encrypted private key, which pushdrop does not read: decrypt it \
                 (`openssl pkey -in KEY -out KEY.plain`, kept mode 600) or give a PKCS#12 \
                 file with certificate.password_file"
                    .into()
            }
            pem::Error::NoItemsFound => {
                format!("holds no PEM private key{}", misshapen_begin(&text))
            }
            e => pem_problem(&text, e, "private key", 0),
        })
    })
}

/// What is wrong with a PEM file, in words that point at the damage: a file cut short, a
/// stray character from a copy and paste (with its line), a malformed `BEGIN` line. The
/// parser's own words ("InvalidCharacter(33)") say none of that. `read` is how many blocks
/// of the kind sought came before the damage.
pub(crate) fn pem_problem(text: &[u8], e: pem::Error, kind: &str, read: usize) -> String {
    let which = match read {
        0 => format!("its first {kind} block"),
        n => format!(
            "the {kind} block after {n} good one{}",
            if n == 1 { "" } else { "s" }
        ),
    };
    match e {
        pem::Error::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(&end_marker);
            let begin = format!("-----BEGIN {label}");
            let at = first_line(text, |line| line.starts_with(begin.as_bytes()))
                .map(|n| format!(" (line {n})"))
                .unwrap_or_default();
            if first_line(text, |line| line.starts_with(b"-----END")).is_some() {
                // An END line is there, only not this one: a BEGIN or END line mistyped.
                format!(
                    "{which} starts `{begin}-----`{at} but no line reads `-----END {label}-----`: \
                     is the BEGIN or the END line mistyped?"
                )
            } else {
                format!(
                    "{which}{at} has no `-----END {label}-----` line: the file is cut short or \
                     was pasted incompletely"
                )
            }
        }
        pem::Error::IllegalSectionStart { line } => format!(
            "a `-----BEGIN` line is malformed: `{}`",
            crate::inbox::parse::excerpt(&String::from_utf8_lossy(&line)).escape_debug()
        ),
        pem::Error::Base64Decode(detail) => {
            let stray = detail
                .strip_prefix("InvalidCharacter(")
                .and_then(|d| d.strip_suffix(')'))
                .and_then(|d| d.parse::<u8>().ok());
            match stray {
                Some(byte) => {
                    let line = pem_line_holding(text, byte)
                        .map(|n| format!(" on line {n}"))
                        .unwrap_or_default();
                    format!(
                        "{which} is not valid base64: {}{line} is not a base64 character (the \
                         file was edited, or copied with extra characters)",
                        describe_byte(byte)
                    )
                }
                None => format!(
                    "{which} is not valid base64 ({}): the file was edited or copied badly",
                    match detail.as_str() {
                        "PrematurePadding" => "a `=` before the end of the block",
                        "InvalidTrailingPadding" => "wrong `=` padding at its end",
                        other => other,
                    }
                ),
            }
        }
        pem::Error::SectionTooLarge => format!("{which} is larger than 256 MB"),
        pem::Error::Io(e) => format!("cannot read: {e}"),
        other => format!("not a readable PEM file: {other}"),
    }
}

/// The number (from 1) of the first line of `text` that `is` picks.
fn first_line(text: &[u8], is: impl Fn(&[u8]) -> bool) -> Option<usize> {
    text.split(|&b| b == b'\n').position(is).map(|i| i + 1)
}

/// For a file in which no block was found: the line that says BEGIN without being a
/// well-formed `-----BEGIN ...-----` line, as a hint (a dash too few).
fn misshapen_begin(text: &[u8]) -> String {
    first_line(text, |line| line.windows(5).any(|w| w == b"BEGIN"))
        .map(|n| {
            format!(" (line {n} says BEGIN but is not a well-formed `-----BEGIN ...-----` line)")
        })
        .unwrap_or_default()
}

/// The line (from 1) of the first `byte` inside a `BEGIN`/`END` block, where base64 belongs.
fn pem_line_holding(text: &[u8], byte: u8) -> Option<usize> {
    let mut inside = false;
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.starts_with(b"-----BEGIN") {
            inside = true;
        } else if line.starts_with(b"-----END") {
            inside = false;
        } else if inside && line.contains(&byte) {
            return Some(i + 1);
        }
    }
    None
}

/// A byte as an operator can find it in an editor: the character when it is printable.
fn describe_byte(byte: u8) -> String {
    match byte {
        b' ' => "a space".into(),
        0x21..=0x7e => format!("`{}`", byte as char),
        _ => format!("the byte 0x{byte:02x}"),
    }
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
        kind: "PKCS#12 file",
        path: path.to_path_buf(),
        message,
    };
    let password = match password_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| ApnsError::Cert {
                kind: "PKCS#12 password file",
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
        for cert in read_certs(path, "CA file")? {
            roots.add(cert).map_err(|e| ApnsError::Cert {
                kind: "CA file",
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
                    read_certs(cert_file, "certificate file")?,
                    read_private_key(key_path)?,
                    key_path,
                )
            };
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| ApnsError::Cert {
                    kind: "certificate file",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        crate::simulator::certs::generate(&["localhost".to_string()])
            .unwrap()
            .ca_pem
    }

    fn read(text: &str) -> Result<Vec<CertificateDer<'static>>, ApnsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, text).unwrap();
        read_certs(&path, "CA file")
    }

    fn said(text: &str) -> String {
        read(text).unwrap_err().to_string()
    }

    /// A CA file damaged by a copy and paste says what and where, not "InvalidCharacter(33)".
    #[test]
    fn a_damaged_pem_file_says_what_is_wrong_and_where() {
        let good = ca_pem();
        assert_eq!(read(&(good.clone() + &good)).unwrap().len(), 2);

        // A stray character in the second block's third line.
        let lines = good.lines().count();
        let mut damaged: Vec<String> = good.lines().map(str::to_string).collect();
        damaged[2].insert(10, '!');
        let text = good.clone() + &damaged.join("\n") + "\n";
        let msg = said(&text);
        assert!(
            msg.contains(&format!(
                "the certificate block after 1 good one is not valid base64: `!` on line {} \
                 is not a base64 character",
                lines + 3
            )),
            "{msg}"
        );
        assert!(!msg.contains("InvalidCharacter"), "{msg}");

        // Cut short: no END line.
        let cut = &good[..good.find("-----END").unwrap()];
        let msg = said(cut);
        assert!(
            msg.contains(
                "its first certificate block (line 1) has no `-----END CERTIFICATE-----` line: \
                 the file is cut short"
            ),
            "{msg}"
        );

        assert!(said("garbage\n").contains("holds no PEM certificate"));

        // A mistyped BEGIN line is not said as a file cut short.
        let msg = said(&good.replace("BEGIN CERTIFICATE", "BEGIN  CERTIFICATE"));
        assert!(msg.starts_with("CA file "), "{msg}");
        assert!(
            msg.contains(
                "its first certificate block starts `-----BEGIN  CERTIFICATE-----` (line 1) but \
                 no line reads `-----END  CERTIFICATE-----`: is the BEGIN or the END line \
                 mistyped?"
            ),
            "{msg}"
        );
        let msg = said(&good.replace("-----BEGIN", "----BEGIN"));
        assert!(
            msg.contains(
                "holds no PEM certificate (line 1 says BEGIN but is not a well-formed \
                 `-----BEGIN ...-----` line)"
            ),
            "{msg}"
        );
    }
}
