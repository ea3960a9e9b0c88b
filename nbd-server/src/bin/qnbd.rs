//! `qnbd`: serve qcow2 and raw images over NBD with qemu-nbd's command line.

use clap::Parser;
use nbd_server::export::{DetectZeroes, Export, Exports};
use nbd_server::negotiate::TlsPolicy;
use nbd_server::server::{Listener, Server, ServerConfig};
use nbd_server::tls;
use qcow2::{Format, Image, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::io::FromRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const LIMITS: &str = "Limits: handshake 10 s by default (--handshake-limit); option data 64 KiB (longer: refused; \
past 1 MiB unread, connection closed); strings 4096 bytes; payloads and reads 32 MiB; per connection 64 requests and 128 MiB of \
request and reply buffers, held until each reply is written to the socket (so at most about 128 MiB per client, and \
--shared times that in all); clients at once: --shared (default 1); image metadata: L1 table 32 MiB, refcount table \
8 MiB, 65536 snapshots, backing chain depth 64.";

#[derive(Parser, Debug)]
#[command(name = "qnbd", version, about = "Serve qcow2 and raw disk images over NBD (qemu-nbd compatible)", after_help = LIMITS)]
struct Cli {
    /// TCP port to listen on (default 10809).
    #[arg(short = 'p', long)]
    port: Option<u16>,
    /// Address to bind (default 0.0.0.0).
    #[arg(short = 'b', long)]
    bind: Option<String>,
    /// Listen on a unix socket at PATH instead of TCP.
    #[arg(short = 'k', long)]
    socket: Option<String>,
    /// Offset into the image.
    #[arg(short = 'o', long, default_value_t = 0)]
    offset: u64,
    /// Serve read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Writes go to a temporary overlay discarded at exit.
    #[arg(short = 's', long)]
    snapshot: bool,
    /// Serve an internal snapshot (ID or name; `snapshot.name=NAME` and `snapshot.id=ID` work too), read-only.
    #[arg(short = 'l', long = "load-snapshot")]
    load_snapshot: Option<String>,
    /// Image format (raw, qcow2); probed when absent.
    #[arg(short = 'f', long)]
    format: Option<String>,
    /// Export name (repeat it to name each FILE in order).
    #[arg(short = 'x', long = "export-name")]
    export_name: Vec<String>,
    /// Export description.
    #[arg(short = 'D', long)]
    description: Option<String>,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long)]
    persistent: bool,
    /// Clients served at once (default 1, as qemu-nbd; 0: no limit). A client that comes while every slot is
    /// taken waits until one is free.
    #[arg(short = 'e', long, default_value_t = 1)]
    shared: usize,
    /// Close a client that comes while every --shared slot is taken, instead of letting it wait.
    #[arg(long = "refuse-extra-clients")]
    refuse_extra_clients: bool,
    /// Treat each FILE as a full set of image options (qemu's `driver=qcow2,file.filename=...`).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Every client connection gets its own throwaway overlay on the pristine image (for fuzzing campaigns:
    /// reconnect to reset the disk).
    #[arg(long = "fresh-per-connection")]
    fresh_per_connection: bool,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Fork into the background once listening.
    #[arg(long)]
    fork: bool,
    /// Write the server's PID to this file.
    #[arg(long = "pid-file")]
    pid_file: Option<String>,
    /// Cache mode: writeback (default: the host page cache, FLUSH syncs), none (O_DIRECT), writethrough
    /// (every write synced before its reply), directsync (both), unsafe (FLUSH ignored).
    #[arg(long)]
    cache: Option<String>,
    /// Same as --cache=none.
    #[arg(short = 'n', long)]
    nocache: bool,
    /// AIO mode: threads, native or io_uring (accepted; native needs --cache=none or directsync, as in qemu).
    #[arg(long)]
    aio: Option<String>,
    /// What TRIM does: ignore (default) or unmap.
    #[arg(long, default_value = "ignore")]
    discard: String,
    /// Turn written zero blocks into zero writes: off, on, unmap.
    #[arg(long = "detect-zeroes", default_value = "off")]
    detect_zeroes: String,
    /// Seconds a client has to finish the handshake (0: no limit).
    #[arg(long = "handshake-limit", default_value_t = 10)]
    handshake_limit: u64,
    /// Deepest backing chain accepted.
    #[arg(long = "max-chain-depth", default_value_t = qcow2::limits::DEFAULT_MAX_CHAIN_DEPTH)]
    max_chain_depth: usize,
    /// List the exports of a server (as a client) and exit, like qemu-nbd -L.
    #[arg(short = 'L', long)]
    list: bool,
    /// Connect FILE to the kernel NBD device DEV (e.g. /dev/nbd0) and serve it in the background; returns once
    /// the device and its partitions are usable.
    #[arg(short = 'c', long = "connect", value_name = "DEV")]
    connect: Option<String>,
    /// Disconnect DEV, wait until its server has flushed the image and exited, and report failure in the exit
    /// status.
    #[arg(short = 'd', long = "disconnect", value_name = "DEV", conflicts_with_all = ["connect", "list", "fuse"])]
    disconnect: Option<String>,
    /// Connections between the kernel and the server with -c (multi-queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    connections: u32,
    /// The kernel's request timeout in seconds with -c (0: the kernel's default).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Seconds the kernel waits for a dead connection to be replaced with -c (0: fail at once).
    #[arg(long = "dead-timeout", default_value_t = 0)]
    dead_timeout: u64,
    /// With -c: use the NBD ioctls even where the netlink interface exists.
    #[arg(long = "use-ioctl", hide = true)]
    use_ioctl: bool,
    /// Expose the image as a regular file through FUSE at MOUNTPOINT (an existing regular file, mounted over,
    /// or an empty directory, in which the image appears as the file "nbd" or the -x name). Unmounting it or
    /// SIGTERM flushes the image and ends the process.
    #[arg(long, value_name = "MOUNTPOINT", conflicts_with_all = ["connect", "list"])]
    fuse: Option<String>,
    /// With --fuse: let every user reach the file (FUSE allow_other, mode 0644); by default only the user who
    /// mounted it can (mode 0600).
    #[arg(long = "fuse-allow-other")]
    fuse_allow_other: bool,
    /// Log more (repeat for more).
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Define an object, as qemu does: `tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]`
    /// or `authz-simple,id=ID,identity=DN` (write commas inside values as ",,").
    #[arg(long = "object", value_name = "SPEC")]
    object: Vec<String>,
    /// Serve over TLS with the credentials object ID (FORCEDTLS unless --tls=on); with -L, connect with them.
    #[arg(long = "tls-creds", value_name = "ID")]
    tls_creds: Option<String>,
    /// Serve over TLS with this certificate chain (PEM); short for a tls-creds-x509 directory.
    #[arg(long = "tls-cert", value_name = "FILE")]
    tls_cert: Option<String>,
    /// The private key of --tls-cert (PEM).
    #[arg(long = "tls-key", value_name = "FILE")]
    tls_key: Option<String>,
    /// CA certificate (PEM) that client certificates must chain to (with --tls-verify-peer).
    #[arg(long = "tls-ca", value_name = "FILE")]
    tls_ca: Option<String>,
    /// Require a client certificate signed by --tls-ca.
    #[arg(long = "tls-verify-peer")]
    tls_verify_peer: bool,
    /// Allow only clients whose certificate subject is this distinguished name, or is named by the authz-simple
    /// object with this id (repeatable).
    #[arg(long = "tls-authz", value_name = "DN|ID")]
    tls_authz: Vec<String>,
    /// TLS mode: force (FORCEDTLS, the default with credentials: nothing but STARTTLS before TLS), on
    /// (SELECTIVETLS: TLS is the client's choice, except for --tls-only exports), off.
    #[arg(long = "tls", value_name = "MODE")]
    tls: Option<String>,
    /// With --tls=on: this export needs TLS (repeatable).
    #[arg(long = "tls-only", value_name = "NAME")]
    tls_only: Vec<String>,
    /// With -L: the name the server's certificate must carry (default: the -b host, or localhost).
    #[arg(long = "tls-hostname", value_name = "NAME")]
    tls_hostname: Option<String>,
    /// Accept TCP clients only from this address block (repeatable; e.g. 10.0.0.0/8, ::1); others are closed
    /// before the greeting.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<String>,
    /// Listen on AF_VSOCK port PORT (any CID), for a server inside a virtual machine; with -L, connect to it.
    #[arg(long = "vsock", value_name = "PORT")]
    vsock: Option<u32>,
    /// With -L --vsock: the CID to connect to (default 1, this machine; 2 is the host).
    #[arg(long = "vsock-cid", value_name = "CID", default_value_t = 1)]
    vsock_cid: u32,
    /// Image files to serve.
    #[arg(required_unless_present_any = ["list", "disconnect"])]
    files: Vec<String>,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("qnbd: {msg}");
    ExitCode::FAILURE
}

fn snapshot_name(s: &str) -> String {
    for part in s.split(',') {
        if let Some(v) = part.strip_prefix("snapshot.name=").or_else(|| part.strip_prefix("snapshot.id=")) {
            return v.to_string();
        }
    }
    s.to_string()
}

/// What `--cache` and `-n` ask for.
#[derive(Debug, Clone, Copy, Default)]
struct CacheMode {
    direct: bool,
    writethrough: bool,
    no_flush: bool,
}

fn cache_mode(cli: &Cli) -> Result<CacheMode, String> {
    let mode = match (cli.cache.as_deref(), cli.nocache) {
        (Some(_), true) => return Err("-n and --cache are mutually exclusive".into()),
        (None, true) => "none",
        (None, false) => "writeback",
        (Some(m), false) => m,
    };
    let c = match mode {
        "writeback" => CacheMode::default(),
        "none" | "off" => CacheMode { direct: true, ..Default::default() },
        "writethrough" => CacheMode { writethrough: true, ..Default::default() },
        "directsync" => CacheMode { direct: true, writethrough: true, no_flush: false },
        "unsafe" => CacheMode { no_flush: true, ..Default::default() },
        m => return Err(format!("Invalid cache mode `{m}'")),
    };
    match cli.aio.as_deref() {
        None | Some("threads") | Some("io_uring") => {}
        Some("native") if !c.direct => {
            return Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".into())
        }
        Some("native") => {}
        Some(a) => return Err(format!("Invalid aio mode '{a}'")),
    }
    Ok(c)
}

/// `--discard` and `--detect-zeroes`, or the image's own `discard`/`detect-zeroes` options.
fn write_modes(discard: &str, detect: &str) -> Result<(bool, DetectZeroes), String> {
    let unmap = match discard {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        d => return Err(format!("Invalid discard mode '{d}'")),
    };
    let detect_zeroes = match detect {
        "off" => DetectZeroes::Off,
        "on" => DetectZeroes::On,
        "unmap" => DetectZeroes::Unmap,
        d => return Err(format!("Invalid detect-zeroes mode '{d}'")),
    };
    if detect_zeroes == DetectZeroes::Unmap && !unmap {
        return Err("--detect-zeroes=unmap requires --discard=unmap".into());
    }
    Ok((unmap, detect_zeroes))
}

/// `--object secret,...`: checked now (qemu's rules), kept for the encrypted images a later version reads.
fn check_secrets(cli: &Cli) -> Result<(), String> {
    for o in objects(cli)? {
        if o.kind != "secret" {
            continue;
        }
        let id = o.id().ok_or("--object secret needs id=ID")?;
        match (o.get("data"), o.get("file")) {
            (Some(_), Some(_)) => return Err(format!("secret '{id}': 'data' and 'file' are mutually exclusive")),
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
            (None, Some(f)) => {
                std::fs::metadata(f).map_err(|e| format!("Unable to read {f}: {e}"))?;
            }
            (Some(_), None) => {}
        }
        match o.get("format") {
            None | Some("raw") | Some("base64") => {}
            Some(f) => return Err(format!("secret '{id}': Invalid parameter 'format' value '{f}' (raw, base64)")),
        }
    }
    Ok(())
}

fn build_exports(cli: &Cli) -> Result<Exports, String> {
    let format = cli.format.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?;
    if cli.image_opts && format.is_some() {
        return Err("--image-opts and -f are mutually exclusive".into());
    }
    let cache = cache_mode(cli)?;
    write_modes(&cli.discard, &cli.detect_zeroes)?;
    check_secrets(cli)?;
    if cli.export_name.len() > cli.files.len() {
        return Err("more export names (-x) than files".into());
    }
    let mut list = Vec::new();
    let shared: qcow2::chain::SharedImages = Default::default();
    for (i, f) in cli.files.iter().enumerate() {
        let spec = if cli.image_opts {
            qcow2::spec::ImageSpec::parse_opts(f)
        } else {
            qcow2::spec::ImageSpec::parse_filename(f)
        }
        .map_err(|e| format!("Failed to open '{f}': {e}"))?;
        let (unmap, detect_zeroes) = write_modes(
            spec.discard.as_deref().unwrap_or(&cli.discard),
            spec.detect_zeroes.as_deref().unwrap_or(&cli.detect_zeroes),
        )?;
        let snapshot = cli.load_snapshot.as_deref().map(snapshot_name);
        let read_only = cli.read_only || snapshot.is_some() || spec.read_only == Some(true);
        let opts = OpenOptions {
            format,
            writable: !read_only && !cli.snapshot && !cli.fresh_per_connection,
            snapshot,
            max_chain_depth: cli.max_chain_depth,
            shared: Some(shared.clone()),
            // Commits go to the helper process once it is installed below (in this thread until then).
            commit_sink: Some(std::sync::Arc::new(qcow2::image::commit::HelperSink)),
            direct: cache.direct,
            ..Default::default()
        };
        let img = Image::open_spec(&spec, &opts).map_err(|e| e.to_string())?;
        let f = &spec.display_name().to_string();
        let base = img.clone();
        let (img, read_only) = if cli.snapshot && !read_only {
            (nbd_server::overlay::temporary(&img, &opts).map_err(|e| e.to_string())?, false)
        } else {
            (img, read_only)
        };
        let name = match cli.export_name.get(i) {
            Some(n) => n.clone(),
            None if cli.files.len() == 1 => String::new(),
            None => f.clone(),
        };
        if name.len() > nbd_server::proto::MAX_STRING {
            return Err("export name is longer than 4096 bytes".into());
        }
        list.push(Arc::new(Export {
            name,
            description: cli.description.clone().unwrap_or_default(),
            device: if cli.offset == 0 {
                img as Arc<dyn qcow2::BlockDevice>
            } else {
                Arc::new(
                    nbd_server::window::Window::new(img, cli.offset)
                        .ok_or_else(|| format!("Offset {} is beyond the end of '{f}'", cli.offset))?,
                )
            },
            read_only,
            unmap,
            detect_zeroes,
            allocation_depth: cli.allocation_depth,
            multi_conn: (cli.shared != 1 || cli.connections > 1) && !cli.fresh_per_connection,
            fresh: cli
                .fresh_per_connection
                .then(|| nbd_server::export::Fresh { base: base.clone(), opts: opts.clone() }),
            cache: nbd_server::export::Cache {
                writethrough: cache.writethrough,
                ignore_flush: cache.no_flush || spec.cache_no_flush == Some(true),
            },
        }));
    }
    Ok(Exports { list, tls_only: cli.tls_only.clone() })
}

fn objects(cli: &Cli) -> Result<Vec<tls::Object>, String> {
    cli.object.iter().map(|o| tls::Object::parse(o)).collect()
}

fn creds_object<'a>(objects: &'a [tls::Object], id: &str) -> Result<&'a tls::Object, String> {
    let o = objects.iter().find(|o| o.id() == Some(id)).ok_or_else(|| format!("No TLS credentials with id '{id}'"))?;
    match o.kind.as_str() {
        "tls-creds-x509" => Ok(o),
        "tls-creds-psk" => Err(format!(
            "'{id}': TLS-PSK (tls-creds-psk) is not supported: rustls, the TLS library qnbd uses, has no \
             pre-shared-key cipher suites; use tls-creds-x509 certificates"
        )),
        "tls-creds-anon" => {
            Err(format!("'{id}': anonymous TLS (tls-creds-anon) is not supported: it authenticates nobody"))
        }
        k => Err(format!("'{id}' is a {k} object, not TLS credentials")),
    }
}

/// The server's TLS set-up from --tls-creds/--object or --tls-cert/--tls-key, or `None` without credentials.
fn build_tls(cli: &Cli) -> Result<Option<tls::ServerTls>, String> {
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
        let verify = o.get("verify-peer").map(tls::parse_bool).transpose()?.unwrap_or(true) || cli.tls_verify_peer;
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
    let config = tls::server_config(&creds)?;
    Ok(Some(tls::ServerTls { acceptor: tokio_rustls::TlsAcceptor::from(config), policy, authz }))
}

/// Client TLS for -L: the credentials object must have endpoint=client.
fn client_tls(cli: &Cli) -> Result<Option<nbd_server::list::ClientTls>, String> {
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
    Ok(Some((tls::client_config(std::path::Path::new(dir))?, tls::server_name(&host)?)))
}

/// Listening sockets, bound before any fork so the parent returns only once clients can connect.
enum StdListener {
    Unix(std::os::unix::net::UnixListener, Option<std::path::PathBuf>),
    Tcp(std::net::TcpListener),
    Vsock(vsock::VsockListener),
}

fn bind(cli: &Cli) -> Result<Vec<StdListener>, String> {
    // systemd socket activation: LISTEN_PID must be us, LISTEN_FDS descriptors from fd 3.
    if let (Ok(pid), Ok(n)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) {
        if pid.parse::<u32>().ok() == Some(std::process::id()) {
            let n: i32 = n.parse().map_err(|_| "bad LISTEN_FDS".to_string())?;
            let mut v = Vec::new();
            for fd in 3..3 + n.clamp(0, 64) {
                let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                // SAFETY: getsockname writes at most `len` bytes into `st`, which we own.
                let r = unsafe { libc::getsockname(fd, &mut st as *mut _ as *mut libc::sockaddr, &mut len) };
                if r != 0 {
                    return Err(format!("LISTEN_FDS: fd {fd} is not a socket"));
                }
                // SAFETY: systemd passed us these descriptors; we take ownership of each exactly once.
                if i32::from(st.ss_family) == libc::AF_UNIX {
                    v.push(StdListener::Unix(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) }, None));
                } else {
                    v.push(StdListener::Tcp(unsafe { std::net::TcpListener::from_raw_fd(fd) }));
                }
            }
            return Ok(v);
        }
    }
    if let Some(port) = cli.vsock {
        if cli.socket.is_some() || cli.port.is_some() || cli.bind.is_some() {
            return Err("--vsock listens on AF_VSOCK only: drop -k, -p and -b".into());
        }
        let l = vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)
            .map_err(|e| format!("Failed to bind AF_VSOCK port {port}: {e}"))?;
        return Ok(vec![StdListener::Vsock(l)]);
    }
    if let Some(path) = &cli.socket {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let l = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| format!("Failed to bind socket to {path}: {e}"))?;
        return Ok(vec![StdListener::Unix(l, Some(path.into()))]);
    }
    let host = cli.bind.clone().unwrap_or_else(|| "0.0.0.0".into());
    let port = cli.port.unwrap_or(10809);
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let l = std::net::TcpListener::bind(&addr).map_err(|e| format!("Failed to bind socket to {addr}: {e}"))?;
    Ok(vec![StdListener::Tcp(l)])
}

/// `-L`: connect to the server named by -k or -b/-p and print its exports as qemu-nbd -L does.
fn list_exports(cli: &Cli) -> ExitCode {
    let timeout = Some(Duration::from_secs(30));
    let tls = match client_tls(cli) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let r = if let Some(port) = cli.vsock {
        vsock::VsockStream::connect_with_cid_port(cli.vsock_cid, port)
            .map_err(|e| format!("Failed to connect to vsock {}:{port}: {e}", cli.vsock_cid))
            .and_then(|s| {
                let _ = s.set_read_timeout(timeout);
                nbd_server::list::list_tls(s, tls).map_err(|e| e.to_string())
            })
    } else if let Some(path) = &cli.socket {
        std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| format!("Failed to connect to '{path}': {e}"))
            .and_then(|s| {
                let _ = s.set_read_timeout(timeout);
                nbd_server::list::list_tls(s, tls).map_err(|e| e.to_string())
            })
    } else {
        let host = cli.bind.clone().unwrap_or_else(|| "localhost".into());
        let addr = format!("{host}:{}", cli.port.unwrap_or(10809));
        std::net::TcpStream::connect(&addr).map_err(|e| format!("Failed to connect to '{addr}': {e}")).and_then(|s| {
            let _ = s.set_read_timeout(timeout);
            nbd_server::list::list_tls(s, tls).map_err(|e| e.to_string())
        })
    };
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // fuser warns about its own second unmount attempt after the mount point was unmounted: not news.
    let level = match cli.verbose {
        0 => "warn,fuser=error,rustls=error",
        1 => "info,fuser=warn,rustls=warn",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .init();
    if cli.list {
        return list_exports(&cli);
    }
    if let Some(dev) = &cli.disconnect {
        return disconnect(dev);
    }
    if cli.files.len() != 1 && (cli.connect.is_some() || cli.fuse.is_some()) {
        return fail(if cli.connect.is_some() {
            "-c serves exactly one image"
        } else {
            "--fuse serves exactly one image"
        });
    }
    let exports = match build_exports(&cli) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let tls = match build_tls(&cli) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    for n in &cli.tls_only {
        if exports.find(n).is_none_or(|e| e.name != *n) {
            return fail(format!("--tls-only '{n}': no export has that name"));
        }
    }
    let mut allow = Vec::new();
    for a in &cli.allow {
        match nbd_server::acl::Cidr::parse(a) {
            Ok(c) => allow.push(c),
            Err(e) => return fail(e),
        }
    }
    if !allow.is_empty() && (cli.socket.is_some() || cli.vsock.is_some()) {
        return fail("--allow applies to TCP listeners only");
    }
    if (tls.is_some() || !allow.is_empty()) && (cli.connect.is_some() || cli.fuse.is_some()) {
        return fail("TLS and --allow apply to network listeners, not to -c or --fuse");
    }
    if cli.fresh_per_connection && (cli.connect.is_some() || cli.fuse.is_some()) {
        return fail("--fresh-per-connection is for network clients; use -s for a throwaway overlay with -c or --fuse");
    }
    // Metadata commits of writable images go through a helper process that finishes them even if this
    // process is killed (qcow2::image::commit); it must be forked before any thread or listener exists.
    if exports.list.iter().any(|e| !e.is_read_only()) {
        // SAFETY: no thread has been started yet (the runtime starts after this).
        if let Err(e) = unsafe { qcow2::image::commit::install_helper() } {
            return fail(e);
        }
    }
    if let Some(dev) = &cli.connect {
        return run_kernel(&cli, exports, dev);
    }
    if let Some(mp) = &cli.fuse {
        return run_fuse(&cli, exports, mp);
    }
    let listeners = match bind(&cli) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    if cli.fork {
        // SAFETY: no threads exist yet (the runtime starts after this), so fork is safe.
        match unsafe { libc::fork() } {
            -1 => return fail("fork failed"),
            0 => {
                // SAFETY: setsid has no memory-safety preconditions.
                unsafe { libc::setsid() };
                // A daemon lets go of the caller's terminal and pipes (the caller may be waiting for EOF).
                if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
                    use std::os::unix::io::AsRawFd;
                    for fd in 0..3 {
                        // SAFETY: dup2 onto the standard descriptors with a descriptor we own.
                        unsafe { libc::dup2(null.as_raw_fd(), fd) };
                    }
                }
            }
            _ => return ExitCode::SUCCESS,
        }
    }
    if let Some(p) = &cli.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            return fail(format!("Failed to write pid file {p}: {e}"));
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let config = ServerConfig {
        exports,
        max_connections: cli.shared,
        refuse_extra: cli.refuse_extra_clients,
        persistent: cli.persistent,
        handshake_timeout: if cli.handshake_limit == 0 {
            Duration::from_secs(u64::MAX / 4)
        } else {
            Duration::from_secs(cli.handshake_limit)
        },
        tls,
        allow,
    };
    let mut paths = Vec::new();
    let code = rt.block_on(async {
        let mut ls = Vec::new();
        for l in listeners {
            match l {
                StdListener::Unix(u, p) => {
                    let _ = u.set_nonblocking(true);
                    if let Some(p) = &p {
                        paths.push(p.clone());
                    }
                    match tokio::net::UnixListener::from_std(u) {
                        Ok(u) => ls.push(Listener::Unix(u, p)),
                        Err(e) => return fail(e),
                    }
                }
                StdListener::Tcp(t) => {
                    let _ = t.set_nonblocking(true);
                    match tokio::net::TcpListener::from_std(t) {
                        Ok(t) => ls.push(Listener::Tcp(t)),
                        Err(e) => return fail(e),
                    }
                }
                StdListener::Vsock(v) => {
                    if let Err(e) = v.set_nonblocking(true) {
                        return fail(e);
                    }
                    ls.push(Listener::Vsock(tokio_vsock::VsockListener::from(std::os::fd::OwnedFd::from(v))));
                }
            }
        }
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let s2 = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
            else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
            s2.notify_one();
        });
        Server::new(config).run(ls, shutdown).await;
        ExitCode::SUCCESS
    });
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &cli.pid_file {
        let _ = std::fs::remove_file(p);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

/// The write end of the pipe a backgrounded server reports readiness on.
struct Ready(Option<std::fs::File>);

impl Ready {
    /// Not backgrounded: errors are printed here.
    fn foreground() -> Ready {
        Ready(None)
    }

    /// Forks; the parent waits for the child's report and exits with it; the child carries on in a new
    /// session. Must run before any thread is started.
    fn background() -> Result<Ready, ExitCode> {
        use std::io::Read;
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(fail(format!("pipe: {}", std::io::Error::last_os_error())));
        }
        // SAFETY: both descriptors were just created and are owned once each.
        let (mut rd, wr) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
        // SAFETY: no thread has been started yet, so the child is a faithful copy.
        match unsafe { libc::fork() } {
            -1 => Err(fail("fork failed")),
            0 => {
                drop(rd);
                // SAFETY: setsid has no memory-safety preconditions.
                unsafe { libc::setsid() };
                Ok(Ready(Some(wr)))
            }
            _ => {
                drop(wr);
                let mut msg = String::new();
                let _ = rd.read_to_string(&mut msg);
                if msg.starts_with("OK") {
                    Err(ExitCode::SUCCESS)
                } else if let Some(e) = msg.strip_prefix("ERR ") {
                    Err(fail(e.trim_end()))
                } else {
                    Err(fail("the server exited before it was ready"))
                }
            }
        }
    }

    /// Goes to the background (when `background`) and writes the pid file; `Err` carries the exit code of a
    /// parent that waited for its child, or of a failure.
    fn start(background: bool, cli: &Cli) -> Result<Ready, ExitCode> {
        let mut ready = if background { Ready::background()? } else { Ready::foreground() };
        match write_pid_file(cli) {
            Ok(()) => Ok(ready),
            Err(e) => Err(ready.fail(e)),
        }
    }

    /// Reports success; a background server lets go of the caller's terminal and pipes.
    fn ok(&mut self) {
        use std::io::Write;
        if let Some(mut w) = self.0.take() {
            let _ = w.write_all(b"OK\n");
            if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
                use std::os::unix::io::AsRawFd;
                for fd in 0..3 {
                    // SAFETY: dup2 onto the standard descriptors with a descriptor we own.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
        }
    }

    /// Reports failure (printed by the waiting parent, or here).
    fn fail(&mut self, msg: impl std::fmt::Display) -> ExitCode {
        use std::io::Write;
        match self.0.take() {
            Some(mut w) => {
                let _ = write!(w, "ERR {msg}");
                ExitCode::FAILURE
            }
            None => fail(msg),
        }
    }
}

fn write_pid_file(cli: &Cli) -> Result<(), String> {
    if let Some(p) = &cli.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("Failed to write pid file {p}: {e}"))?;
    }
    Ok(())
}

/// `-d DEV`.
fn disconnect(dev: &str) -> ExitCode {
    let d = match nbd_server::kernel::Device::open(dev) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    match nbd_server::kernel::detach(&d, Duration::from_secs(60)) {
        Ok(()) => {
            println!("{dev} disconnected");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `-c DEV`: serve FILE to the kernel's NBD client over socketpairs.
fn run_kernel(cli: &Cli, exports: Exports, dev_path: &str) -> ExitCode {
    use nbd_server::kernel::{self, AttachOptions, Device, Link};
    use std::os::fd::AsRawFd;
    if exports.list.len() != 1 {
        return fail("-c serves exactly one image");
    }
    let dev = match Device::open(dev_path) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    // Checked before going to the background too, so the error reaches the caller's terminal directly.
    if let Err(e) = kernel::ensure_free(&dev) {
        return fail(e);
    }
    let export = exports.list[0].clone();
    let mut ready = match Ready::start(cli.verbose == 0, cli) {
        Ok(r) => r,
        Err(code) => return code,
    };
    // A stop signal before the runtime's handlers exist is remembered, not fatal: the device must be
    // disconnected, not left pointing at a dead server.
    catch_stop_signals();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return ready.fail(format!("cannot start the runtime: {e}")),
    };
    let mut kernel_ends = Vec::new();
    let mut tasks = Vec::new();
    {
        let _g = rt.enter();
        for _ in 0..cli.connections {
            let pair = std::os::unix::net::UnixStream::pair().and_then(|(k, s)| {
                s.set_nonblocking(true)?;
                Ok((k, tokio::net::UnixStream::from_std(s)?))
            });
            let (k, s) = match pair {
                Ok(p) => p,
                Err(e) => return ready.fail(format!("socketpair: {e}")),
            };
            let fd = s.as_fd().try_clone_to_owned().ok();
            tasks.push(rt.spawn(nbd_server::server::serve_kernel(s, export.clone(), fd)));
            kernel_ends.push(k);
        }
    }
    let fds: Vec<i32> = kernel_ends.iter().map(|k| k.as_raw_fd()).collect();
    let opts = AttachOptions { timeout: cli.timeout, dead_conn_timeout: cli.dead_timeout, force_ioctl: cli.use_ioctl };
    // Netlink records the calling thread as the device's server: this is the main thread, so the pid is ours.
    let link = match kernel::attach(&dev, export.device.size(), export.flags(), &fds, &opts) {
        Ok(l) => l,
        Err(e) => {
            let _ = cli.pid_file.as_ref().map(std::fs::remove_file);
            return ready.fail(e);
        }
    };
    // The kernel holds its own references to its ends.
    drop(kernel_ends);
    match kernel::wait_ready(&dev, export.device.size(), Duration::from_secs(30)) {
        Ok(parts) => tracing::info!("{dev_path} is ready: {} bytes, partitions {parts:?}", export.device.size()),
        Err(e) => {
            let _ = kernel::request_disconnect(&dev);
            let _ = cli.pid_file.as_ref().map(std::fs::remove_file);
            return ready.fail(e);
        }
    }
    ready.ok();
    let dev2 = dev.clone();
    let served = rt.block_on(async move {
        let all = async {
            let mut r: Result<(), String> = Ok(());
            for t in tasks {
                match t.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::info!("kernel connection ended: {e}"),
                    Err(e) => r = Err(format!("a connection task failed: {e}")),
                }
            }
            r
        };
        tokio::pin!(all);
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
        else {
            return all.await;
        };
        if !STOP.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::select! {
                r = &mut all => return r,
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        }
        // Asked to stop: disconnect the device so the kernel ends its connections, then finish serving them.
        let _ = tokio::task::spawn_blocking(move || kernel::request_disconnect(&dev2)).await;
        match tokio::time::timeout(Duration::from_secs(30), all).await {
            Ok(r) => r,
            Err(_) => Err("the kernel did not close its connections within 30 s".into()),
        }
    });
    let result = served.and_then(|()| {
        if export.is_read_only() {
            Ok(())
        } else {
            export.device.flush().map_err(|e| format!("flush failed: {e}"))
        }
    });
    if let Link::Ioctl(t) = link {
        // NBD_DO_IT returns once the device is disconnected; don't hang on a kernel that does not let go.
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !t.is_finished() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if t.is_finished() {
            if let Ok(Err(e)) = t.join() {
                tracing::info!("NBD_DO_IT: {e}");
            }
        }
    }
    dev.write_status(&result);
    if let Some(p) = &cli.pid_file {
        let _ = std::fs::remove_file(p);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// SIGTERM, SIGINT and SIGHUP set [`STOP`] instead of killing the process.
fn catch_stop_signals() {
    let handler = on_stop_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// `--fuse MOUNTPOINT`: serve the image as a file until the mount point is unmounted or a signal arrives.
fn run_fuse(cli: &Cli, exports: Exports, mountpoint: &str) -> ExitCode {
    if exports.list.len() != 1 {
        return fail("--fuse serves exactly one image");
    }
    let export = exports.list[0].clone();
    let mut ready = match Ready::start(cli.fork, cli) {
        Ok(r) => r,
        Err(code) => return code,
    };
    catch_stop_signals();
    let o = nbd_server::fuse::FuseOptions {
        mountpoint: mountpoint.into(),
        file_name: cli.export_name.first().cloned().unwrap_or_else(|| "nbd".into()),
        read_only: export.is_read_only(),
        allow_other: cli.fuse_allow_other,
    };
    let session = match nbd_server::fuse::mount(export.device.clone(), &o) {
        Ok(s) => s,
        Err(e) => return ready.fail(e),
    };
    ready.ok();
    let mut asked = false;
    while !session.guard.is_finished() {
        if !asked && STOP.load(std::sync::atomic::Ordering::SeqCst) {
            asked = true;
            if let Err(e) = nbd_server::fuse::unmount(&o.mountpoint) {
                // Cannot unmount: stop serving anyway (dropping the session tries once more), after the flush.
                tracing::warn!("{e}");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ended = if session.guard.is_finished() {
        session.join().map_err(|e| format!("FUSE session: {e}"))
    } else {
        drop(session);
        Ok(())
    };
    let result =
        if export.is_read_only() { Ok(()) } else { export.device.flush().map_err(|e| format!("flush failed: {e}")) };
    if let Some(p) = &cli.pid_file {
        let _ = std::fs::remove_file(p);
    }
    if let Err(e) = ended {
        tracing::warn!("{e}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
