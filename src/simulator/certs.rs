//! The simulator's generated credentials: a CA, a server certificate for loopback, a client
//! certificate for certificate auth, and `.p8` signing keys for token auth. Made at start (so
//! nothing secret ever lives in the repository), or read back from the folder an earlier start
//! wrote them to ([`load_kept`]), so that a restarted simulator is trusted by the same config.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use super::SimError;

/// Everything certificate-shaped the simulator made at start.
pub(crate) struct Certs {
    pub ca_pem: String,
    /// The CA's private key (PKCS#8 PEM), kept so a later start can sign with the same CA.
    pub ca_key_pem: String,
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    pub server_cert_der: rustls::pki_types::CertificateDer<'static>,
    pub server_key_der: Vec<u8>,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

/// A token-auth signing key the simulator accepts.
pub(crate) struct TokenKey {
    pub key_id: String,
    pub team_id: String,
    /// PKCS#8 PEM, what Apple's `.p8` download holds.
    pub p8_pem: String,
    /// The public half, for verifying.
    pub decoding: jsonwebtoken::DecodingKey,
}

fn cert_err(what: &str) -> impl Fn(rcgen::Error) -> SimError + '_ {
    move |e| SimError::Cert(format!("{what}: {e}"))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, "pushdrop simulator");
    d
}

/// A random id of Apple's shape: 10 upper-case letters and digits.
pub fn apple_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..10)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The CA's parameters: the same at every start, so a kept CA key signs certificates that
/// chain to the kept CA certificate.
fn ca_params() -> Result<CertificateParams, SimError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
    ca_params.distinguished_name = dn("pushdrop simulator CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca_params)
}

/// Makes the CA, the server certificate (valid for `server_names`) and a client certificate.
pub(crate) fn generate(server_names: &[String]) -> Result<Certs, SimError> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("CA key"))?;
    let ca_cert = ca_params()?.self_signed(&ca_key).map_err(cert_err("CA"))?;
    let client_key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("client key"))?;
    let mut cp = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("client"))?;
    cp.distinguished_name = dn("pushdrop simulator client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params()?, ca_key);
    let client_cert = cp
        .signed_by(&client_key, &issuer)
        .map_err(cert_err("client"))?;
    with_server_cert(
        server_names,
        issuer,
        ca_cert.pem(),
        ca_key_pem,
        (client_cert.pem(), client_key.serialize_pem()),
    )
}

/// The certificates with a fresh server certificate signed by `issuer` (the CA).
fn with_server_cert(
    server_names: &[String],
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_key_pem: String,
    (client_cert_pem, client_key_pem): (String, String),
) -> Result<Certs, SimError> {
    let server_key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("server key"))?;
    let mut sp = CertificateParams::new(server_names.to_vec()).map_err(cert_err("server"))?;
    sp.distinguished_name = dn("pushdrop simulator");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = sp
        .signed_by(&server_key, &issuer)
        .map_err(cert_err("server"))?;
    let ca_der = pem_cert_der(&ca_pem).ok_or_else(|| SimError::Cert("CA: not PEM".into()))?;
    Ok(Certs {
        ca_pem,
        ca_key_pem,
        ca_der,
        server_cert_der: server_cert.der().clone(),
        server_key_der: server_key.serialize_der(),
        client_cert_pem,
        client_key_pem,
    })
}

/// The DER of the first certificate of a PEM text.
fn pem_cert_der(pem: &str) -> Option<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

/// The files of a simulator folder, by name: [`super::Simulator::write_credentials`] writes
/// them, a restart reads them back, and a folder holding any of them without [`IDS_FILE`] is
/// someone else's (see [`load_kept`]). Keys are `AuthKey_<KEYID>.p8` beside them.
pub(crate) const CA_FILE: &str = "ca.pem";
pub(crate) const CA_KEY_FILE: &str = "ca-key.pem";
pub(crate) const CLIENT_CERT_FILE: &str = "client.pem";
pub(crate) const CLIENT_KEY_FILE: &str = "client-key.pem";
pub(crate) const CLIENT_COMBINED_FILE: &str = "client-combined.pem";
/// The config snippet `pushdrop simulate` writes beside the credentials.
pub(crate) const CONFIG_FILE: &str = "pushdrop-simulator.toml";
pub(crate) const IDS_FILE: &str = "simulator-ids.toml";

/// The key and team id of the primary `.p8` key, in [`IDS_FILE`].
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct KeptIds {
    pub key_id: String,
    pub team_id: String,
}

/// The files a simulator folder holds besides [`IDS_FILE`] (and `AuthKey_*.p8` keys).
const WRITTEN: [&str; 6] = [
    CA_FILE,
    CA_KEY_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    CLIENT_COMBINED_FILE,
    CONFIG_FILE,
];

/// The credentials an earlier start wrote into `dir`, with a new server certificate for
/// `server_names`. `Ok(None)`: no earlier start wrote there. `Err`: one did, but its files
/// are not all there or do not belong together (the CA key must sign for the CA certificate,
/// each key match its certificate); says which, and names the old `.p8` key file when there
/// is one, to be replaced. [`SimError::NotOurs`]: the folder holds files of the names the
/// simulator writes but not its [`IDS_FILE`]: someone else's (a config folder with a real
/// key, `client.pem`), which it must neither replace nor delete.
pub(crate) fn load_kept(
    dir: &Path,
    server_names: &[String],
) -> Result<Result<Option<(Certs, TokenKey)>, NotKept>, SimError> {
    let ids_text = match std::fs::read_to_string(dir.join(IDS_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut found: Vec<String> = WRITTEN
                .iter()
                .filter(|n| dir.join(n).exists())
                .map(|n| n.to_string())
                .collect();
            found.extend(
                old_keys(dir)
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str().map(str::to_string)),
            );
            return if found.is_empty() {
                Ok(Ok(None))
            } else {
                Err(SimError::NotOurs {
                    dir: dir.to_path_buf(),
                    files: found.join(", "),
                })
            };
        }
        Err(e) => return Ok(Err(NotKept::why(format!("{IDS_FILE}: {e}")))),
    };
    Ok(load_ours(dir, server_names, &ids_text))
}

/// [`load_kept`] for a folder with the simulator's [`IDS_FILE`].
fn load_ours(
    dir: &Path,
    server_names: &[String],
    ids_text: &str,
) -> Result<Option<(Certs, TokenKey)>, NotKept> {
    let read =
        |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: {e}"));
    let ids: KeptIds = toml::from_str(ids_text)
        .map_err(|e| NotKept::why(format!("{IDS_FILE}: {}", e.message())))?;
    let p8_name = format!("AuthKey_{}.p8", ids.key_id);
    // The earlier start's key is the one key file this start may replace.
    let fail = |why: String| NotKept {
        why,
        old_key: Some(dir.join(&p8_name)),
    };
    let ca_pem = read(CA_FILE).map_err(fail)?;
    let ca_key_pem = read(CA_KEY_FILE).map_err(fail)?;
    let client_cert_pem = read(CLIENT_CERT_FILE).map_err(fail)?;
    let client_key_pem = read(CLIENT_KEY_FILE).map_err(fail)?;
    let p8_pem = read(&p8_name).map_err(fail)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| fail(format!("{CA_KEY_FILE} is not a key: {e}")))?;
    let holds = |cert_pem: &str, key: &KeyPair| {
        pem_cert_der(cert_pem).is_some_and(|der| {
            let public = key.public_key_raw();
            der.windows(public.len()).any(|w| w == public)
        })
    };
    let client_key = KeyPair::from_pem(&client_key_pem)
        .map_err(|e| fail(format!("client-key.pem is not a key: {e}")))?;
    if !holds(&ca_pem, &ca_key) {
        return Err(fail(format!("{CA_KEY_FILE} is not the key of ca.pem")));
    }
    if !holds(&client_cert_pem, &client_key) {
        return Err(fail("client-key.pem is not the key of client.pem".into()));
    }
    let token_key =
        KeyPair::from_pem(&p8_pem).map_err(|e| fail(format!("{p8_name} is not a key: {e}")))?;
    let decoding = jsonwebtoken::DecodingKey::from_ec_pem(token_key.public_key_pem().as_bytes())
        .map_err(|e| fail(format!("{p8_name}: {e}")))?;
    let issuer = Issuer::new(ca_params().map_err(|e| fail(e.to_string()))?, ca_key);
    let certs = with_server_cert(
        server_names,
        issuer,
        ca_pem,
        ca_key_pem,
        (client_cert_pem, client_key_pem),
    )
    .map_err(|e| fail(e.to_string()))?;
    Ok(Some((
        certs,
        TokenKey {
            key_id: ids.key_id,
            team_id: ids.team_id,
            p8_pem,
            decoding,
        },
    )))
}

/// Why an earlier start's credentials are not used again.
#[derive(Debug)]
pub(crate) struct NotKept {
    pub why: String,
    /// The `.p8` key file that start wrote (named in its [`IDS_FILE`]), to be removed when
    /// the new one is written.
    pub old_key: Option<std::path::PathBuf>,
}

impl NotKept {
    fn why(why: String) -> NotKept {
        NotKept { why, old_key: None }
    }
}

/// The `.p8` keys in a simulator folder (`AuthKey_*.p8`).
pub(crate) fn old_keys(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("AuthKey_") && n.ends_with(".p8"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A new `.p8` key with fresh key and team ids.
pub(crate) fn token_key() -> Result<TokenKey, SimError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err(".p8 key"))?;
    let decoding = jsonwebtoken::DecodingKey::from_ec_pem(key.public_key_pem().as_bytes())
        .map_err(|e| SimError::Cert(format!(".p8 public key: {e}")))?;
    Ok(TokenKey {
        key_id: apple_id(),
        team_id: apple_id(),
        p8_pem: key.serialize_pem(),
        decoding,
    })
}

/// Writes a file; `secret` files get mode 600 from the start (never briefly world-readable).
pub(crate) fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), SimError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| SimError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    // Unchanged (a restart that keeps its credentials): left as it is, so that whoever reads
    // it meanwhile (a running pushdrop re-reading its key, a second simulator started on the
    // same folder) never finds it half written. A secret is set back to 600.
    if std::fs::read(path).is_ok_and(|old| old == contents.as_bytes()) {
        if secret {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        return Ok(());
    }
    // Otherwise written whole under a temporary name, then renamed over.
    let tmp = path.with_file_name(crate::inbox::fsutil::temp_name("sim"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if secret {
        opts.mode(0o600);
    }
    crate::inbox::fsutil::write_and_rename(&opts, &tmp, path, contents.as_bytes()).map_err(io)
}
