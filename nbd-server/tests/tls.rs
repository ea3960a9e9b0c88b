//! TLS, access control and the lister, with the real clients: qemu-img and qemu-io (`--object
//! tls-creds-x509,...,endpoint=client`), nbdinfo and nbdcopy (`nbds+unix://...?tls-certificates=DIR`), and
//! raw bytes for what the spec asks of a plaintext client against FORCEDTLS. Certificates are made by the test
//! (rcgen): a CA, a server certificate for localhost/127.0.0.1, client certificates, a second CA, expired ones.

mod common;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const ERR_TLS_REQD: u32 = 0x8000_0005;

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// A certificate signed by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Ca, cn: &str, server: bool, expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let names = if server { vec!["localhost".to_string(), "127.0.0.1".to_string()] } else { vec![] };
    let mut p = CertificateParams::new(names).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationName, "qnbd test");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    (p.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
}

/// A client certificate whose only attribute is a CN that looks like two: `CN=client1, O=qnbd test`.
fn crafted_client(ca: &Ca) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "client1, O=qnbd test");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    (p.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
}

/// The directories the test uses, in qemu's layout.
struct Pki {
    server: PathBuf,
    expired_server: PathBuf,
    client: PathBuf,
    client2: PathBuf,
    no_cert: PathBuf,
    wrong_ca: PathBuf,
    expired_client: PathBuf,
    crafted: PathBuf,
}

fn write_dir(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (n, c) in files {
        std::fs::write(dir.join(n), c).unwrap();
    }
    dir.to_path_buf()
}

fn pki(root: &Path) -> Pki {
    let a = ca("qnbd test CA");
    let b = ca("another CA");
    let (sc, sk) = leaf(&a, "localhost", true, false);
    let (xc, xk) = leaf(&a, "localhost", true, true);
    let (c1, k1) = leaf(&a, "client1", false, false);
    let (c2, k2) = leaf(&a, "client2", false, false);
    let (ce, ke) = leaf(&a, "client1", false, true);
    let (cb, kb) = leaf(&b, "client1", false, false);
    let (cc, kc) = crafted_client(&a);
    Pki {
        server: write_dir(
            &root.join("server"),
            &[("ca-cert.pem", &a.pem), ("server-cert.pem", &sc), ("server-key.pem", &sk)],
        ),
        expired_server: write_dir(
            &root.join("xserver"),
            &[("ca-cert.pem", &a.pem), ("server-cert.pem", &xc), ("server-key.pem", &xk)],
        ),
        client: write_dir(
            &root.join("client"),
            &[("ca-cert.pem", &a.pem), ("client-cert.pem", &c1), ("client-key.pem", &k1)],
        ),
        client2: write_dir(
            &root.join("client2"),
            &[("ca-cert.pem", &a.pem), ("client-cert.pem", &c2), ("client-key.pem", &k2)],
        ),
        no_cert: write_dir(&root.join("nocert"), &[("ca-cert.pem", &a.pem)]),
        // trusts the other CA, and presents a certificate from it
        wrong_ca: write_dir(
            &root.join("wrongca"),
            &[("ca-cert.pem", &b.pem), ("client-cert.pem", &cb), ("client-key.pem", &kb)],
        ),
        expired_client: write_dir(
            &root.join("xclient"),
            &[("ca-cert.pem", &a.pem), ("client-cert.pem", &ce), ("client-key.pem", &ke)],
        ),
        crafted: write_dir(
            &root.join("crafted"),
            &[("ca-cert.pem", &a.pem), ("client-cert.pem", &cc), ("client-key.pem", &kc)],
        ),
    }
}

fn image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x6b 1M 1M", s(&img)]);
    img
}

fn serve(args: &[String], ready: &Path) -> Srv {
    let srv = Srv(Command::new(QNBD).args(args).stdout(Stdio::null()).spawn().unwrap());
    wait_for(ready);
    srv
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16) {
    // A connect to a port in the ephemeral range can pick that very port as its own and connect to itself
    // (TCP simultaneous open) before the server listens: that is not the server.
    wait_until("the TCP listener", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|c| c.local_addr().ok() != c.peer_addr().ok())
    });
}

fn client_obj(dir: &Path) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display())
}

fn qemu_img_info(dir: &Path, sock: &Path) -> std::process::Output {
    run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &client_obj(dir),
            "--image-opts",
            &format!("driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost", sock.display()),
        ],
    )
}

fn nbdinfo_size(uri: &str) -> std::process::Output {
    run("nbdinfo", &["--size", uri])
}

fn tls_uri(sock: &Path, dir: &Path) -> String {
    format!("nbds+unix:///?socket={}&tls-certificates={}&tls-hostname=localhost", sock.display(), dir.display())
}

/// A raw plaintext client: greeting, flags, then one option; returns the first reply's type, or `None` if the
/// server closed the connection.
fn raw_option<S: Read + Write>(mut c: S, opt: u32, data: &[u8]) -> Option<u32> {
    let mut g = [0u8; 18];
    c.read_exact(&mut g).ok()?;
    c.write_all(&3u32.to_be_bytes()).ok()?;
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).ok()?;
    let mut h = [0u8; 20];
    c.read_exact(&mut h).ok()?;
    Some(u32::from_be_bytes(h[12..16].try_into().unwrap()))
}

fn unix(sock: &Path) -> std::os::unix::net::UnixStream {
    let c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn refused(o: &std::process::Output, what: &str) {
    assert!(!o.status.success(), "{what} should have been refused: {}", String::from_utf8_lossy(&o.stdout));
}

fn size_ok(o: &std::process::Output) {
    assert!(o.status.success(), "nbdinfo: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "16777216");
}

#[test]
fn forced_tls_with_qemu_layout_serves_qemu_and_libnbd_clients_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pki(d);
    let img = image(d);
    let sock = d.join("s");
    let obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", p.server.display());
    let _srv = serve(
        &["-t", "-e", "8", "--object", &obj, "--tls-creds", "tls0", "-k", s(&sock), "-f", "qcow2", s(&img)]
            .map(String::from),
        &sock,
    );

    // qemu-img and qemu-io over TLS
    let o = qemu_img_info(&p.client, &sock);
    assert!(o.status.success(), "qemu-img info: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"virtual-size\": 16777216"));
    let opts = format!("driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost", sock.display());
    let io = ok(
        "qemu-io",
        &[
            "--object",
            &client_obj(&p.client),
            "--image-opts",
            &opts,
            "-c",
            "read -P 0x6b 1M 1M",
            "-c",
            "read -P 0 0 1M",
        ],
    );
    assert!(!io.contains("fail"), "{io}");

    // nbdinfo and nbdcopy over TLS
    size_ok(&nbdinfo_size(&tls_uri(&sock, &p.client)));
    let copy = d.join("copy.raw");
    ok("nbdcopy", &[&tls_uri(&sock, &p.client), s(&copy)]);
    let want = d.join("want.raw");
    // -U: qnbd holds qemu's write lock on the image it serves.
    ok("qemu-img", &["convert", "-U", "-O", "raw", s(&img), s(&want)]);
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&want).unwrap(), "nbdcopy over TLS reads the image");

    // qnbd -L as a TLS client prints what qemu-nbd -L prints
    let l = ok(QNBD, &["-L", "-k", s(&sock), "--object", &client_obj(&p.client), "--tls-creds", "tls0"]);
    assert!(l.starts_with("exports available: 1\n export: ''\n  size:  16777216\n"), "{l}");
    let l = run(QNBD, &["-L", "-k", s(&sock)]);
    refused(&l, "-L without TLS");
    assert!(String::from_utf8_lossy(&l.stderr).contains("requires TLS"));

    // plaintext clients: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD; EXPORT_NAME closes
    assert_eq!(raw_option(unix(&sock), OPT_LIST, &[]), Some(ERR_TLS_REQD));
    assert_eq!(raw_option(unix(&sock), OPT_GO, &go_data("")), Some(ERR_TLS_REQD));
    assert_eq!(raw_option(unix(&sock), 1, b""), None, "EXPORT_NAME before TLS ends the connection");
    assert_eq!(raw_option(unix(&sock), OPT_STARTTLS, &[]), Some(REP_ACK));
    refused(&nbdinfo_size(&format!("nbd+unix:///?socket={}", sock.display())), "plaintext nbdinfo");

    // STARTTLS acknowledged, then garbage instead of a TLS ClientHello: the connection is closed
    let mut c = unix(&sock);
    assert_eq!(raw_option(&mut c, OPT_STARTTLS, &[]), Some(REP_ACK));
    c.write_all(&[0x55; 64]).unwrap();
    let mut buf = [0u8; 256];
    let mut n = 0;
    while let Ok(k) = c.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k;
        assert!(n < 4096, "the server keeps talking after a failed TLS handshake");
    }

    // wrong CA, no client certificate, expired client certificate: refused (verify-peer is on by default)
    refused(&nbdinfo_size(&tls_uri(&sock, &p.wrong_ca)), "a client trusting another CA");
    refused(&qemu_img_info(&p.wrong_ca, &sock), "qemu-img trusting another CA");
    refused(&nbdinfo_size(&tls_uri(&sock, &p.no_cert)), "a client without a certificate");
    refused(&nbdinfo_size(&tls_uri(&sock, &p.expired_client)), "an expired client certificate");

    // and the server still serves good clients
    size_ok(&nbdinfo_size(&tls_uri(&sock, &p.client)));
    size_ok(&nbdinfo_size(&tls_uri(&sock, &p.client2)));
}

#[test]
fn tls_over_tcp_with_short_options_and_an_expired_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pki(d);
    let img = image(d);
    let port = free_port();
    let sv = &p.server;
    let mut srv = Srv(Command::new(QNBD)
        .args(["-t", "-e", "4", "-b", "127.0.0.1", "-p", &port.to_string(), "-f", "qcow2"])
        .args(["--tls-cert", s(&sv.join("server-cert.pem")), "--tls-key", s(&sv.join("server-key.pem")), s(&img)])
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    wait_port(port);
    // no client certificate needed without --tls-verify-peer
    let uri = format!("nbds://127.0.0.1:{port}/?tls-certificates={}&tls-hostname=localhost", p.no_cert.display());
    size_ok(&nbdinfo_size(&uri));
    let o = run(
        "qemu-img",
        &[
            "info",
            "--object",
            &client_obj(&p.client),
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"),
        ],
    );
    assert!(o.status.success(), "qemu-img over TCP+TLS: {}", String::from_utf8_lossy(&o.stderr));
    let _ = srv.kill();
    let _ = srv.wait();

    // an expired server certificate: clients refuse it
    let port = free_port();
    let xs = &p.expired_server;
    let _srv = Srv(Command::new(QNBD)
        .args(["-t", "-b", "127.0.0.1", "-p", &port.to_string(), "-f", "qcow2"])
        .args(["--tls-cert", s(&xs.join("server-cert.pem")), "--tls-key", s(&xs.join("server-key.pem")), s(&img)])
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    wait_port(port);
    let uri = format!("nbds://127.0.0.1:{port}/?tls-certificates={}&tls-hostname=localhost", p.no_cert.display());
    refused(&nbdinfo_size(&uri), "an expired server certificate");
    let l = run(
        QNBD,
        &["-L", "-b", "127.0.0.1", "-p", &port.to_string(), "--object", &client_obj(&p.no_cert), "--tls-creds", "tls0"],
    );
    refused(&l, "qnbd -L against an expired server certificate");
}

#[test]
fn authz_list_admits_only_named_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pki(d);
    let img = image(d);
    let sock = d.join("s");
    let obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", p.server.display());
    let _srv = serve(
        &[
            "-t",
            "-e",
            "4",
            "--object",
            &obj,
            "--object",
            "authz-simple,id=auth0,identity=O=qnbd test,,CN=client1",
            "--tls-creds",
            "tls0",
            "--tls-authz",
            "auth0",
            "-k",
            s(&sock),
            "-f",
            "qcow2",
            s(&img),
        ]
        .map(String::from),
        &sock,
    );
    size_ok(&nbdinfo_size(&tls_uri(&sock, &p.client)));
    refused(&nbdinfo_size(&tls_uri(&sock, &p.client2)), "CN=client2, not in the authz list");
    refused(&qemu_img_info(&p.client2, &sock), "qemu-img with CN=client2");
    refused(&nbdinfo_size(&tls_uri(&sock, &p.crafted)), "a CN that spells out another subject");
    size_ok(&nbdinfo_size(&tls_uri(&sock, &p.client)));
}

#[test]
fn selective_tls_guards_tls_only_exports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pki(d);
    let img = image(d);
    let img2 = d.join("secret.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img2), "8M"]);
    let sock = d.join("s");
    let obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off", p.server.display());
    let _srv = serve(
        &[
            "-t",
            "-e",
            "4",
            "--object",
            &obj,
            "--tls-creds",
            "tls0",
            "--tls=on",
            "--tls-only",
            "secret",
            "-x",
            "open",
            "-x",
            "secret",
            "-k",
            s(&sock),
            "-f",
            "qcow2",
            s(&img),
            s(&img2),
        ]
        .map(String::from),
        &sock,
    );
    // plaintext: the open export works, the TLS-only one is refused with NBD_REP_ERR_TLS_REQD and not listed
    size_ok(&nbdinfo_size(&format!("nbd+unix:///open?socket={}", sock.display())));
    assert_eq!(raw_option(unix(&sock), OPT_GO, &go_data("secret")), Some(ERR_TLS_REQD));
    let l = ok(QNBD, &["-L", "-k", s(&sock)]);
    assert!(l.contains("export: 'open'") && !l.contains("secret"), "{l}");
    // over TLS both work
    let uri = format!(
        "nbds+unix:///secret?socket={}&tls-certificates={}&tls-hostname=localhost",
        sock.display(),
        p.no_cert.display()
    );
    let o = nbdinfo_size(&uri);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "8388608");
    let l = ok(QNBD, &["-L", "-k", s(&sock), "--object", &client_obj(&p.no_cert), "--tls-creds", "tls0"]);
    assert!(l.contains("export: 'open'") && l.contains("export: 'secret'"), "{l}");
}

#[test]
fn allow_list_closes_strangers_before_the_greeting() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let port = free_port();
    let srv = Srv(Command::new(QNBD)
        .args([
            "-t",
            "-e",
            "4",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "fd00::/8",
        ])
        .arg(&img)
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    wait_port(port);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    let n = c.read(&mut g).unwrap_or(0);
    assert_eq!(n, 0, "a peer outside --allow gets no greeting");
    refused(&nbdinfo_size(&format!("nbd://127.0.0.1:{port}")), "nbdinfo from outside --allow");

    // The image is locked while the first server writes it (and until its commit helper has gone too).
    drop(srv);
    wait_gone(s(&img));
    let port = free_port();
    let _srv2 = Srv(Command::new(QNBD)
        .args(["-t", "-b", "127.0.0.1", "-p", &port.to_string(), "--allow", "127.0.0.0/8"])
        .arg(&img)
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    wait_port(port);
    size_ok(&nbdinfo_size(&format!("nbd://127.0.0.1:{port}")));
}

#[test]
fn bad_tls_and_access_options_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pki(d);
    let img = image(d);
    let sock = s(&d.join("x")).to_string();
    let psk_dir = d.join("psk");
    std::fs::create_dir(&psk_dir).unwrap();
    std::fs::write(psk_dir.join("keys.psk"), "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let psk = format!("tls-creds-psk,id=tls0,dir={},endpoint=server", psk_dir.display());
    let srv_obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", p.server.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--object".into(), psk, "--tls-creds".into(), "tls0".into()], "invalid object type: tls-creds-psk"),
        (vec!["--object".into(), "tls-creds-anon,id=a0,endpoint=server".into()], "invalid object type: tls-creds-anon"),
        (vec!["--tls-creds".into(), "nope".into()], "No TLS credentials with id 'nope'"),
        (vec!["--object".into(), client_obj(&p.client), "--tls-creds".into(), "tls0".into()], "server endpoint"),
        (vec!["--tls-cert".into(), s(&p.server.join("server-cert.pem")).into()], "--tls-key"),
        (
            vec!["--tls-cert".into(), "/nonexistent.pem".into(), "--tls-key".into(), "/nonexistent.key".into()],
            "Cannot read",
        ),
        (vec!["--tls-authz".into(), "CN=x".into()], "need credentials"),
        (
            vec![
                "--object".into(),
                srv_obj.clone(),
                "--tls-creds".into(),
                "tls0".into(),
                "--tls".into(),
                "maybe".into(),
            ],
            "Invalid TLS mode",
        ),
        (
            vec![
                "--object".into(),
                format!("{srv_obj},verify-peer=off"),
                "--tls-creds".into(),
                "tls0".into(),
                "--tls-only".into(),
                "zzz".into(),
            ],
            "no export",
        ),
        (
            vec!["--object".into(), srv_obj.clone(), "--tls-creds".into(), "tls0".into(), "--tls=on".into()],
            "plaintext clients",
        ),
        (vec!["--allow".into(), "10.0.0.0/40".into()], "prefix length"),
        (vec!["--allow".into(), "10.0.0.0/8".into(), "-k".into(), sock.clone()], "TCP listeners only"),
    ];
    for (args, want) in cases {
        let mut all = args.clone();
        if !all.iter().any(|a| a == "-k") {
            all.extend(["-k".to_string(), sock.clone()]);
        }
        all.push(s(&img).to_string());
        let o = Command::new(QNBD).args(&all).output().unwrap();
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn keys_of_every_kind_and_size_qemu_loads_are_served() {
    // An RSA key of 2432 bits is what nbd's own test certificates use; gnutls (qemu) loads it, and ECDSA and
    // Ed25519 keys too. Made by openssl, as an administrator would.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = image(d);
    let kinds: [(&str, &[&str]); 4] = [
        ("rsa2432", &["-newkey", "rsa:2432"]),
        ("rsa3072", &["-newkey", "rsa:3072"]),
        ("ecdsa", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]),
        ("ed25519", &["-newkey", "ed25519"]),
    ];
    for (name, newkey) in kinds {
        let kd = d.join(name);
        std::fs::create_dir(&kd).unwrap();
        let (key, cert) = (kd.join("key.pem"), kd.join("cert.pem"));
        let mut a = vec![
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            s(&key),
            "-out",
            s(&cert),
        ];
        a.extend_from_slice(newkey);
        ok("openssl", &a);
        // libnbd trusts the self-signed certificate as its CA.
        std::fs::copy(&cert, kd.join("ca-cert.pem")).unwrap();
        let sock = kd.join("s");
        let _srv = Srv(Command::new(QNBD)
            .args(["-t", "-r", "-k", s(&sock), "--tls-cert", s(&cert), "--tls-key", s(&key)])
            .arg(&img)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap());
        wait_for(&sock);
        size_ok(&nbdinfo_size(&tls_uri(&sock, &kd)));
    }
}
