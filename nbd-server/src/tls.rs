//! TLS for NBD (proto.md "TLS support"): rustls configurations from qemu's credential layout
//! (`--object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client` with `ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`) or from single files, client certificate checks,
//! and the distinguished-name allow list (`--tls-authz`). TLS 1.2 and 1.3 only.

use crate::error::Error;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A `--object` of qemu's syntax (`type,key=value,...`, with `,,` for a literal comma).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The object type (tls-creds-x509, tls-creds-psk, authz-simple, ...).
    pub kind: String,
    /// Its properties, in order.
    pub props: Vec<(String, String)>,
}

impl Object {
    /// Parses `type,key=value,...`.
    pub fn parse(spec: &str) -> crate::error::Result<Object> {
        // qemu's option syntax: the one splitter, shared with image names.
        let mut it = qcow2::spec::split_commas(spec).into_iter();
        let kind = it.next().unwrap_or_default();
        let kind = kind.strip_prefix("qom-type=").map(str::to_string).unwrap_or(kind);
        if kind.is_empty() || kind.contains('=') {
            return Err(Error::Tls(format!("--object '{spec}': the first item must be the object type")));
        }
        let mut props = Vec::new();
        for p in it {
            let Some((k, v)) = p.split_once('=') else {
                return Err(Error::Tls(format!("--object '{spec}': '{p}' is not key=value")));
            };
            props.push((k.to_string(), v.to_string()));
        }
        Ok(Object { kind, props })
    }

    /// Property `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.props.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The object's id.
    pub fn id(&self) -> Option<&str> {
        self.get("id")
    }
}

/// qemu's boolean property values.
pub fn parse_bool(v: &str) -> crate::error::Result<bool> {
    qcow2::spec::parse_bool("", v).map_err(|_| Error::Tls(format!("'{v}' is not on/off")))
}

/// Where a server's certificate, key and (optional) CA come from.
#[derive(Debug, Clone, Default)]
pub struct ServerCreds {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA certificates that sign client certificates (PEM).
    pub ca: Option<PathBuf>,
    /// Require and check a client certificate.
    pub verify_peer: bool,
}

fn read(path: &Path, what: &str) -> crate::error::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Tls(format!("Cannot read the TLS {what} {}: {e}", path.display())))
}

fn certs(path: &Path, what: &str) -> crate::error::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let v: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Tls(format!("TLS {what} {}: {e:?}", path.display())))?;
    if v.is_empty() {
        return Err(Error::Tls(format!("TLS {what} {}: no certificate in it", path.display())));
    }
    Ok(v)
}

fn key(path: &Path) -> crate::error::Result<PrivateKeyDer<'static>> {
    let pem = read(path, "key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Error::Tls(format!("TLS key {}: {e:?}", path.display())))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(ca: &Path) -> crate::error::Result<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for c in certs(ca, "CA certificate")? {
        r.add(c).map_err(|e| Error::Tls(format!("TLS CA certificate {}: {e}", ca.display())))?;
    }
    Ok(r)
}

/// The server's rustls configuration.
pub fn server_config(c: &ServerCreds) -> crate::error::Result<Arc<rustls::ServerConfig>> {
    let chain = certs(&c.cert, "certificate")?;
    let key = key(&c.key)?;
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Tls(format!("TLS: {e}")))?;
    let b = if c.verify_peer {
        let ca = c.ca.as_ref().ok_or(Error::Tls(
            "verifying client certificates needs a CA certificate (--tls-ca or ca-cert.pem)".into(),
        ))?;
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
            .build()
            .map_err(|e| Error::Tls(format!("TLS client verifier: {e}")))?;
        b.with_client_cert_verifier(v)
    } else {
        b.with_no_client_auth()
    };
    let cfg = b.with_single_cert(chain, key).map_err(|e| {
        Error::Tls(format!(
            "TLS certificate and key: {e} (supported keys: RSA of 2048 to 8192 bits, ECDSA P-256, P-384 and P-521, \
             Ed25519)"
        ))
    })?;
    Ok(Arc::new(cfg))
}

/// Server credentials from a qemu `tls-creds-x509` directory.
pub fn server_creds_from_dir(dir: &Path, verify_peer: bool) -> ServerCreds {
    let ca = dir.join("ca-cert.pem");
    ServerCreds {
        cert: dir.join("server-cert.pem"),
        key: dir.join("server-key.pem"),
        ca: ca.exists().then_some(ca),
        verify_peer,
    }
}

/// A client configuration (for `qnbd -L`): trust the CA in `ca`, present `client-cert.pem` and
/// `client-key.pem` from the same directory when they exist.
pub fn client_config(dir: &Path) -> crate::error::Result<Arc<rustls::ClientConfig>> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Tls(format!("TLS: {e}")))?
        .with_root_certificates(roots(&dir.join("ca-cert.pem"))?);
    let (cert, key_file) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let cfg = if cert.exists() && key_file.exists() {
        b.with_client_auth_cert(certs(&cert, "certificate")?, key(&key_file)?)
            .map_err(|e| Error::Tls(format!("TLS client certificate: {e}")))?
    } else {
        b.with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// The server name a client checks the certificate against.
pub fn server_name(host: &str) -> crate::error::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| Error::Tls(format!("'{host}' is not a valid TLS host name: {e}")))
}

/// One attribute of a distinguished name: its short name (upper case, e.g. "CN") and its value.
pub type DnPart = (String, String);

/// Parses a distinguished name written as on the command line (RFC 4514 style: `CN=client,O=Example Org`;
/// `\,` and friends escape a character; `+` joins attributes of one RDN) into a sorted list of parts, so
/// "CN=client,O=Example" and "O=Example, CN=client" name the same subject. `None` if malformed.
pub fn parse_dn(dn: &str) -> Option<Vec<DnPart>> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = dn.chars();
    let mut pieces = Vec::new();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.push(chars.next()?),
            ',' | '+' => pieces.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    pieces.push(cur);
    for p in pieces {
        let (k, v) = p.split_once('=')?;
        let k = k.trim().to_ascii_uppercase();
        if k.is_empty() {
            return None;
        }
        parts.push((k, v.trim().to_string()));
    }
    parts.sort();
    Some(parts)
}

/// The subject of a DER certificate as parts, read structurally from its RDNs (never by re-parsing a
/// formatted string, so a value holding "," or "=" stays one value).
pub fn subject_parts(der: &[u8]) -> Option<Vec<DnPart>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut parts = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        for atv in rdn.iter() {
            let key = x509_parser::objects::oid2abbrev(atv.attr_type(), x509_parser::objects::oid_registry())
                .map(|s| s.to_ascii_uppercase())
                .unwrap_or_else(|_| atv.attr_type().to_id_string());
            parts.push((key, atv.as_str().ok()?.to_string()));
        }
    }
    parts.sort();
    Some(parts)
}

/// The subject DN of a DER certificate, for messages.
pub fn subject_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string())
}

/// Whether the client certificate `der` is allowed by `allowed` (distinguished names).
pub fn authorized(der: Option<&[u8]>, allowed: &[String]) -> bool {
    let Some(got) = der.and_then(subject_parts) else {
        return false;
    };
    allowed.iter().any(|a| parse_dn(a).is_some_and(|want| want == got))
}

/// What a server does about TLS.
#[derive(Clone)]
pub struct ServerTls {
    /// The acceptor.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// FORCEDTLS or SELECTIVETLS.
    pub policy: crate::negotiate::TlsPolicy,
    /// Client certificate subjects allowed (empty: any client the verifier accepts).
    pub authz: Vec<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("policy", &self.policy).field("authz", &self.authz).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_parse_as_qemu_does() {
        let o = Object::parse("tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server").unwrap();
        assert_eq!(o.kind, "tls-creds-x509");
        assert_eq!(o.id(), Some("tls0"));
        assert_eq!(o.get("dir"), Some("/etc/pki/qemu"));
        let a = Object::parse("authz-simple,id=auth0,identity=CN=laptop,,O=Example Org,,C=GB").unwrap();
        assert_eq!(a.get("identity"), Some("CN=laptop,O=Example Org,C=GB"));
        assert!(Object::parse("id=x").is_err());
        assert!(Object::parse("tls-creds-x509,novalue").is_err());
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn distinguished_names_match_in_any_order_and_escapes_hold() {
        assert_eq!(parse_dn("CN=client, O=Example"), parse_dn("o=Example,CN=client"));
        assert_ne!(parse_dn("CN=client,O=Example"), parse_dn("CN=client"));
        assert_eq!(
            parse_dn(r"CN=alice\, O=Example").unwrap(),
            vec![("CN".to_string(), "alice, O=Example".to_string())]
        );
        assert_eq!(parse_dn("CN=a,=b"), None);
        assert_eq!(parse_dn("CN"), None);
        assert!(!authorized(None, &["CN=x".into()]));
        assert!(!authorized(Some(b"not a certificate"), &["CN=x".into()]));
    }
}
