//! TLS from qemu's `--object tls-creds-x509` / `authz-simple` or from `--tls-cert`/`--tls-key`.

use crate::Cli;
use nbd_server::negotiate::TlsPolicy;
use nbd_server::tls;

/// The `--object`s, parsed. Credential types qnbd cannot provide are refused here, before any image is
/// opened, in qemu's words for an object type a build lacks ("invalid object type", which scripts such as
/// libnbd's tests look for to skip what needs them).
pub(crate) fn objects(cli: &Cli) -> Result<Vec<tls::Object>, String> {
    let objects: Vec<tls::Object> =
        cli.object.iter().map(|o| tls::Object::parse(o).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    for o in &objects {
        let why = match o.kind.as_str() {
            "tls-creds-psk" => {
                "qnbd has no TLS-PSK: rustls, the TLS library it uses, has no pre-shared-key cipher suites; use \
                 tls-creds-x509 certificates"
            }
            "tls-creds-anon" => "qnbd has no anonymous TLS: it authenticates nobody; use tls-creds-x509 certificates",
            _ => continue,
        };
        return Err(format!("invalid object type: {} ({why})", o.kind));
    }
    Ok(objects)
}

fn creds_object<'a>(objects: &'a [tls::Object], id: &str) -> Result<&'a tls::Object, String> {
    let o = objects.iter().find(|o| o.id() == Some(id)).ok_or_else(|| format!("No TLS credentials with id '{id}'"))?;
    match o.kind.as_str() {
        "tls-creds-x509" => Ok(o),
        k => Err(format!("'{id}' is a {k} object, not TLS credentials")),
    }
}

/// The server's TLS set-up from --tls-creds/--object or --tls-cert/--tls-key, or `None` without credentials.
pub(crate) fn build_tls(cli: &Cli) -> Result<Option<tls::ServerTls>, String> {
    let objects = objects(cli)?;
    let creds = if let Some(id) = &cli.tls_creds {
        if cli.tls_cert.is_some() {
            return Err("give either --tls-creds or --tls-cert, not both".into());
        }
        let o = creds_object(&objects, id)?;
        if o.get("endpoint").unwrap_or("client") != "server" {
            return Err(format!("Expecting TLS credentials with a server endpoint ('{id}' needs endpoint=server)"));
        }
        let dir = o.get("dir").ok_or_else(|| format!("'{id}': tls-creds-x509 needs dir=DIR"))?;
        // qemu's default for verify-peer is on: clients must present a certificate signed by ca-cert.pem.
        let verify = o.get("verify-peer").map(tls::parse_bool).transpose().map_err(|e| e.to_string())?.unwrap_or(true)
            || cli.tls_verify_peer;
        Some(tls::server_creds_from_dir(std::path::Path::new(dir), verify))
    } else if let Some(cert) = &cli.tls_cert {
        let key = cli.tls_key.as_ref().ok_or("--tls-cert needs --tls-key")?;
        Some(tls::ServerCreds {
            cert: cert.into(),
            key: key.into(),
            ca: cli.tls_ca.as_ref().map(Into::into),
            verify_peer: cli.tls_verify_peer,
        })
    } else {
        None
    };
    let policy = match cli.tls.as_deref() {
        None if !cli.tls_only.is_empty() => TlsPolicy::Selective,
        None | Some("force") | Some("forced") | Some("require") => TlsPolicy::Forced,
        Some("on") | Some("selective") => TlsPolicy::Selective,
        Some("off") => {
            if !cli.tls_only.is_empty() {
                return Err("--tls-only needs TLS (--tls=on)".into());
            }
            return Ok(None);
        }
        Some(m) => return Err(format!("Invalid TLS mode '{m}' (force, on, off)")),
    };
    let Some(creds) = creds else {
        if cli.tls.is_some()
            || !cli.tls_only.is_empty()
            || !cli.tls_authz.is_empty()
            || cli.tls_key.is_some()
            || cli.tls_verify_peer
        {
            return Err("TLS options need credentials: --tls-creds ID (with --object tls-creds-x509,...) or --tls-cert and --tls-key".into());
        }
        return Ok(None);
    };
    let mut authz = Vec::new();
    for a in &cli.tls_authz {
        match objects.iter().find(|o| o.id() == Some(a.as_str())) {
            Some(o) if o.kind == "authz-simple" => authz
                .push(o.get("identity").ok_or_else(|| format!("'{a}': authz-simple needs identity=DN"))?.to_string()),
            Some(o) => return Err(format!("'{a}' is a {} object: only authz-simple is supported", o.kind)),
            None if a.contains('=') => authz.push(a.clone()),
            None => return Err(format!("No authorization object with id '{a}' (and it is not a distinguished name)")),
        }
    }
    if !authz.is_empty() && !creds.verify_peer {
        return Err("--tls-authz needs client certificates: --tls-verify-peer and a CA (or verify-peer=on)".into());
    }
    // Under SELECTIVETLS a plaintext client skips every certificate check: allowed only when every export
    // needs TLS anyway.
    if policy == TlsPolicy::Selective && (creds.verify_peer || !authz.is_empty()) {
        let all_tls_only = !cli.files.is_empty()
            && (0..cli.files.len()).all(|i| {
                let name = cli.export_name.get(i).map(String::as_str).unwrap_or(if cli.files.len() == 1 {
                    ""
                } else {
                    &cli.files[i]
                });
                cli.tls_only.iter().any(|t| t == name)
            });
        if !all_tls_only {
            return Err("--tls=on lets plaintext clients reach exports not named by --tls-only, without any certificate \
                        check: client certificates (--tls-authz, verify-peer) need --tls=force or every export in --tls-only"
                .into());
        }
    }
    let config = tls::server_config(&creds).map_err(|e| e.to_string())?;
    Ok(Some(tls::ServerTls { acceptor: tokio_rustls::TlsAcceptor::from(config), policy, authz }))
}

/// Client TLS for -L: the credentials object must have endpoint=client.
pub(crate) fn client_tls(cli: &Cli) -> Result<Option<nbd_server::list::ClientTls>, String> {
    let Some(id) = &cli.tls_creds else {
        return Ok(None);
    };
    let objects = objects(cli)?;
    let o = creds_object(&objects, id)?;
    if o.get("endpoint").unwrap_or("client") != "client" {
        return Err(format!("Expecting TLS credentials with a client endpoint ('{id}' needs endpoint=client)"));
    }
    let dir = o.get("dir").ok_or_else(|| format!("'{id}': tls-creds-x509 needs dir=DIR"))?;
    let host = cli.tls_hostname.clone().or_else(|| cli.bind.clone()).unwrap_or_else(|| "localhost".into());
    let client = tls::client_config(std::path::Path::new(dir)).map_err(|e| e.to_string())?;
    Ok(Some((client, tls::server_name(&host).map_err(|e| e.to_string())?)))
}
