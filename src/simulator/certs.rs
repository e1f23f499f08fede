//! The simulator's generated credentials: a CA, a server certificate for loopback, a client
//! certificate for certificate auth, and `.p8` signing keys for token auth. All fresh per
//! start, so nothing secret ever lives in the repository.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use super::SimError;

/// Everything certificate-shaped the simulator made at start.
pub(crate) struct Certs {
    pub ca_pem: String,
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

/// Makes the CA, the server certificate (valid for `server_names`) and a client certificate.
pub(crate) fn generate(server_names: &[String]) -> Result<Certs, SimError> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
    ca_params.distinguished_name = dn("pushdrop simulator CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err("CA"))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("server key"))?;
    let mut sp = CertificateParams::new(server_names.to_vec()).map_err(cert_err("server"))?;
    sp.distinguished_name = dn("pushdrop simulator");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = sp
        .signed_by(&server_key, &issuer)
        .map_err(cert_err("server"))?;

    let client_key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("client key"))?;
    let mut cp = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("client"))?;
    cp.distinguished_name = dn("pushdrop simulator client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = cp
        .signed_by(&client_key, &issuer)
        .map_err(cert_err("client"))?;

    Ok(Certs {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().clone(),
        server_cert_der: server_cert.der().clone(),
        server_key_der: server_key.serialize_der(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    })
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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| SimError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    f.write_all(contents.as_bytes()).map_err(io)?;
    Ok(())
}
