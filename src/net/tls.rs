//! Certificates (rcgen), role URI SANs, and rustls configurations per SAP.
//!
//! Every listener demands a client certificate chained to the cluster CA (checked by rustls during
//! the handshake); the *role* is checked by the application right after the handshake, before any
//! request is read, via [`peer_role`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Errors creating or loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read `{path}`: {source}; run `tuplespace certs --out {dir}` to create certificates"
    )]
    Read {
        path: PathBuf,
        dir: String,
        source: std::io::Error,
    },
    #[error("`{path}` holds no usable {what}; regenerate it with `tuplespace certs`")]
    Empty { path: PathBuf, what: &'static str },
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error(
        "`{0}` already exists; pass --force to overwrite the cluster CA (every certificate it issued becomes useless)"
    )]
    Exists(PathBuf),
}

/// A certificate's role (PROTOCOL.md §1), carried as URI SAN `urn:tuplespace:role:ROLE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CertRole {
    Client,
    Admin,
    Node,
}

pub const ROLE_URI_PREFIX: &str = "urn:tuplespace:role:";

impl CertRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Client => "client",
            CertRole::Admin => "admin",
            CertRole::Node => "node",
        }
    }
    pub fn parse(s: &str) -> Option<CertRole> {
        match s {
            "client" => Some(CertRole::Client),
            "admin" => Some(CertRole::Admin),
            "node" => Some(CertRole::Node),
            _ => None,
        }
    }
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }
}

/// Which listening SAP a connection arrived on; decides the roles allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SapKind {
    /// The proxy's CLIENT_SAP: client or admin.
    Client,
    /// The proxy's SHUTDOWN_SAP: admin only.
    Shutdown,
    /// Links between nodes: node only.
    Node,
}

impl SapKind {
    pub fn allows(self, role: CertRole) -> bool {
        match self {
            SapKind::Client => matches!(role, CertRole::Client | CertRole::Admin),
            SapKind::Shutdown => role == CertRole::Admin,
            SapKind::Node => role == CertRole::Node,
        }
    }
}

/// Installs the one process-wide rustls crypto provider (ring). Installing two panics later.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider is already installed: that one is used, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Roles found in a DER certificate's URI SANs.
pub fn roles_of(cert: &CertificateDer<'_>) -> Vec<CertRole> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return vec![];
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return vec![];
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => {
                u.strip_prefix(ROLE_URI_PREFIX).and_then(CertRole::parse)
            }
            _ => None,
        })
        .collect()
}

/// The roles of the peer of an established connection (leaf certificate only).
pub fn peer_roles(conn: &quinn::Connection) -> Vec<CertRole> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(roles_of))
        .unwrap_or_default()
}

/// The peer's leaf certificate (DER) of an established connection: its identity for
/// per-certificate limits.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| c.as_ref().to_vec()))
}

/// True if the peer holds a certificate role allowed on `sap`.
pub fn peer_allowed(conn: &quinn::Connection, sap: SapKind) -> bool {
    peer_roles(conn).into_iter().any(|r| sap.allows(r))
}

/// File names inside a certificate directory (PROTOCOL.md §1).
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}
pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

fn read(path: &Path, dir: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        dir: dir.display().to_string(),
        source,
    })
}

/// The identity (chain + key) and trust root loaded from a certificate directory.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
        }
    }
}

impl Identity {
    /// Loads `NAME.pem`/`NAME.key` and `ca.pem` from `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<Identity, TlsError> {
        let cp = cert_path(dir, name);
        let kp = key_path(dir, name);
        let ca = cert_path(dir, "ca");
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&read(&cp, dir)?)
            .filter_map(Result::ok)
            .collect();
        if chain.is_empty() {
            return Err(TlsError::Empty {
                path: cp,
                what: "certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&kp, dir)?).map_err(|_| TlsError::Empty {
            path: kp.clone(),
            what: "private key",
        })?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read(&ca, dir)?).filter_map(Result::ok) {
            roots.add(c)?;
        }
        if roots.is_empty() {
            return Err(TlsError::Empty {
                path: ca,
                what: "CA certificate",
            });
        }
        Ok(Identity {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }
}

/// rustls server configuration: TLS 1.3, client certificate from the cluster CA required.
pub fn server_config(id: &Identity, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// rustls client configuration: TLS 1.3, server verified against the cluster CA, our certificate
/// presented.
pub fn client_config(id: &Identity, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots.clone())
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

fn leaf_params(
    role: CertRole,
    name: &str,
    extra_sans: &[String],
) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("tuplespace {} {name}", role.as_str()),
    );
    params.distinguished_name = dn;
    params
        .subject_alt_names
        .push(SanType::URI(role.uri().try_into()?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if role != CertRole::Node {
        // Client and admin certificates authenticate a client only: no server names and no
        // serverAuth usage, so they can never pass as a proxy or a server.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        return Ok(params);
    }
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for s in extra_sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    for n in names {
        match n.parse::<IpAddr>() {
            Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
            Err(_) => params
                .subject_alt_names
                .push(SanType::DnsName(n.try_into()?)),
        }
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    // Validity: rcgen's defaults (wide), acceptable for development certificates; production
    // deployments issue their own from their own CA.
    Ok(params)
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    if private {
        // 0600 from the first byte, never through a symlink planted at the path.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(err)?;
        f.write_all(contents.as_bytes()).map_err(err)?;
        return f.sync_all().map_err(err);
    }
    std::fs::write(path, contents).map_err(err)
}

/// Creates the cluster CA and one certificate per role in `dir` (development certificates).
pub fn create_cluster(dir: &Path, extra_sans: &[String], force: bool) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca_pem = cert_path(dir, "ca");
    if ca_pem.exists() && !force {
        return Err(TlsError::Exists(ca_pem));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "tuplespace cluster CA (development)");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = params.self_signed(&ca_key)?;
    write_file(&ca_pem, &ca_cert.pem(), false)?;
    write_file(&key_path(dir, "ca"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(params, ca_key);
    for role in [CertRole::Client, CertRole::Admin, CertRole::Node] {
        issue_with(&issuer, role, role.as_str(), extra_sans, dir, role.as_str())?;
    }
    Ok(())
}

fn issue_with(
    issuer: &Issuer<'_, KeyPair>,
    role: CertRole,
    name: &str,
    extra_sans: &[String],
    out: &Path,
    file_stem: &str,
) -> Result<(), TlsError> {
    let key = KeyPair::generate()?;
    let cert = leaf_params(role, name, extra_sans)?.signed_by(&key, issuer)?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_owned(),
        source,
    })?;
    write_file(&cert_path(out, file_stem), &cert.pem(), false)?;
    write_file(&key_path(out, file_stem), &key.serialize_pem(), true)?;
    Ok(())
}

/// Issues one more certificate from the CA in `ca_dir` into `out` as `ROLE.pem`/`ROLE.key`
/// (so `out` can be used as a `--certs` directory), copying `ca.pem` there too.
pub fn issue(
    ca_dir: &Path,
    role: CertRole,
    name: &str,
    extra_sans: &[String],
    out: &Path,
) -> Result<(), TlsError> {
    let ca_pem_path = cert_path(ca_dir, "ca");
    let ca_key_path = key_path(ca_dir, "ca");
    let ca_pem = String::from_utf8_lossy(&read(&ca_pem_path, ca_dir)?).into_owned();
    let ca_key_pem = String::from_utf8_lossy(&read(&ca_key_path, ca_dir)?).into_owned();
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    issue_with(&issuer, role, name, extra_sans, out, role.as_str())?;
    let out_ca = cert_path(out, "ca");
    if out_ca != ca_pem_path {
        write_file(&out_ca, &ca_pem, false)?;
    }
    Ok(())
}

/// True when `dir` holds the files `up` needs.
pub fn cluster_present(dir: &Path) -> bool {
    ["ca", "client", "admin", "node"]
        .iter()
        .all(|n| cert_path(dir, n).exists() && key_path(dir, n).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_cluster_carries_roles() {
        let dir = tempfile::tempdir().unwrap();
        create_cluster(dir.path(), &[], false).unwrap();
        for role in [CertRole::Client, CertRole::Admin, CertRole::Node] {
            let id = Identity::load(dir.path(), role.as_str()).unwrap();
            assert_eq!(roles_of(&id.chain[0]), vec![role]);
        }
        assert!(matches!(
            create_cluster(dir.path(), &[], false),
            Err(TlsError::Exists(_))
        ));
        let out = dir.path().join("host2");
        issue(
            dir.path(),
            CertRole::Node,
            "host2",
            &["10.0.0.2".into()],
            &out,
        )
        .unwrap();
        let id = Identity::load(&out, "node").unwrap();
        assert_eq!(roles_of(&id.chain[0]), vec![CertRole::Node]);
        install_crypto_provider();
        server_config(&id, b"x").unwrap();
        client_config(&id, b"x").unwrap();
    }

    #[test]
    fn client_and_admin_certificates_cannot_serve() {
        let dir = tempfile::tempdir().unwrap();
        create_cluster(dir.path(), &["10.0.0.9".into()], false).unwrap();
        for role in [CertRole::Client, CertRole::Admin, CertRole::Node] {
            let id = Identity::load(dir.path(), role.as_str()).unwrap();
            let (_, c) = x509_parser::parse_x509_certificate(id.chain[0].as_ref()).unwrap();
            let eku = c.extended_key_usage().unwrap().unwrap().value;
            let names = c
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .filter(|n| !matches!(n, x509_parser::extensions::GeneralName::URI(_)))
                .count();
            assert!(eku.client_auth, "{role:?}");
            assert_eq!(eku.server_auth, role == CertRole::Node, "{role:?}");
            assert_eq!(
                names > 0,
                role == CertRole::Node,
                "{role:?}: {names} server names"
            );
        }
        // Private keys are 0600.
        use std::os::unix::fs::PermissionsExt;
        for n in ["ca", "client", "admin", "node"] {
            let m = std::fs::metadata(key_path(dir.path(), n)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{n}");
        }
    }

    #[test]
    fn sap_policy() {
        assert!(SapKind::Client.allows(CertRole::Admin));
        assert!(SapKind::Client.allows(CertRole::Client));
        assert!(!SapKind::Client.allows(CertRole::Node));
        assert!(!SapKind::Shutdown.allows(CertRole::Client));
        assert!(SapKind::Shutdown.allows(CertRole::Admin));
        assert!(!SapKind::Node.allows(CertRole::Admin));
    }

    /// Runs a TLS handshake in memory between a server holding `server` and a client holding
    /// `client`; Ok when both sides complete it.
    fn handshake(server: &Identity, client: &Identity) -> Result<(), rustls::Error> {
        install_crypto_provider();
        let mut s = rustls::ServerConnection::new(Arc::new(server_config(server, b"x").unwrap()))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c =
            rustls::ClientConnection::new(Arc::new(client_config(client, b"x").unwrap()), name)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()?;
            }
            if !s.is_handshaking() && !c.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    /// docs/SECURITY.md's rotation: with both CAs in every `ca.pem`, leaves of either CA talk to
    /// each other; once the old CA is removed, its leaves are refused.
    #[test]
    fn ca_rotation_with_two_cas_in_ca_pem() {
        let old = tempfile::tempdir().unwrap();
        let new = tempfile::tempdir().unwrap();
        create_cluster(old.path(), &[], false).unwrap();
        create_cluster(new.path(), &[], false).unwrap();
        let both = [
            std::fs::read_to_string(cert_path(old.path(), "ca")).unwrap(),
            std::fs::read_to_string(cert_path(new.path(), "ca")).unwrap(),
        ]
        .concat();
        // A host still on its old node certificate, and a client already on the new CA, both
        // trusting both CAs.
        let host = tempfile::tempdir().unwrap();
        let user = tempfile::tempdir().unwrap();
        for (dir, from, name) in [(&host, &old, "node"), (&user, &new, "client")] {
            for f in [cert_path(from.path(), name), key_path(from.path(), name)] {
                std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
            }
            std::fs::write(cert_path(dir.path(), "ca"), &both).unwrap();
        }
        let server = Identity::load(host.path(), "node").unwrap();
        let client = Identity::load(user.path(), "client").unwrap();
        handshake(&server, &client).unwrap();
        // Without the overlap, the same pair is refused.
        let lone = Identity::load(old.path(), "node").unwrap();
        assert!(handshake(&lone, &client).is_err());
        // The rotation finished: the host has a new node certificate and trusts only the new CA;
        // a leaf of the old CA is refused.
        let rotated = Identity::load(new.path(), "node").unwrap();
        handshake(&rotated, &client).unwrap();
        let stale = Identity::load(old.path(), "client").unwrap();
        let stale = Identity {
            roots: rotated.roots.clone(),
            ..stale
        };
        assert!(handshake(&rotated, &stale).is_err());
    }
}
