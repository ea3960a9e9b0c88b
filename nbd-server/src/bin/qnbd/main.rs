//! `qnbd`: serve qcow2 and raw images over NBD with qemu-nbd's command line.
//!
//! One module per job: the command line and dispatch here; `exports` (images and their options), `tls_setup`,
//! `listen` (sockets, socket activation, the network server, `-L`), `daemon` (backgrounding, pid file,
//! signals), `kernel_run` (`-c`/`-d`) and `fuse_run` (`--fuse`).

mod daemon;
mod exports;
mod fuse_run;
mod kernel_run;
mod listen;
mod tls_setup;

use exports::build_exports;
use fuse_run::run_fuse;
use kernel_run::{disconnect, run_kernel};
use listen::list_exports;
use tls_setup::build_tls;

use clap::Parser;

/// Large buffers placed where the kernel copies into and out of them at full speed (`qcow2::alloc`).
#[global_allocator]
static ALLOC: qcow2::alloc::IoAlloc = qcow2::alloc::IoAlloc;

use std::process::ExitCode;

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
    /// Offer the persistent dirty bitmap NAME as the qemu:dirty-bitmap:NAME metadata context (repeatable).
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,
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
    /// Which backing and external data file names in image headers are followed: any (qemu's behaviour),
    /// relative (only names inside the image's folder: for images from untrusted sources), none (no backing
    /// file; data files as relative).
    #[arg(long = "backing-policy", value_name = "any|relative|none", default_value = "any")]
    backing_policy: String,
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
    /// Folder of the local cache of remote images (s3://, http(s)://), shared with other qnbd and qimg processes
    /// using it (default: $QNBD_CACHE_DIR, else $XDG_CACHE_HOME/qnbd, else ~/.cache/qnbd).
    #[arg(long = "cache-dir", value_name = "DIR")]
    cache_dir: Option<String>,
    /// Size limit of the remote cache folder (default: $QNBD_CACHE_SIZE, else 20G); object versions no process
    /// has open are removed, least recently opened first.
    #[arg(long = "cache-size", value_name = "SIZE")]
    cache_size: Option<String>,
    /// Image files to serve.
    #[arg(required_unless_present_any = ["list", "disconnect"])]
    files: Vec<String>,
}

/// The name messages start with: the one qnbd was run by (`qemu-nbd` through a drop-in link, whose
/// messages scripts match on), `qnbd` otherwise.
fn prog() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("qnbd")
        .to_string()
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{}: {msg}", prog());
    ExitCode::FAILURE
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
    if let Err(e) = tls_setup::objects(&cli) {
        return fail(e);
    }
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
    if cli.cache_dir.is_some() || cli.cache_size.is_some() {
        let mut c = qcow2::remote::CacheConfig::default();
        if let Some(d) = &cli.cache_dir {
            c.dir = d.into();
        }
        if let Some(s) = &cli.cache_size {
            match qcow2::spec::parse_size("--cache-size", s) {
                Ok(n) => c.max_bytes = n,
                Err(e) => return fail(e),
            }
        }
        qcow2::remote::configure(c);
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
    let code = if let Some(dev) = &cli.connect {
        run_kernel(&cli, exports, dev)
    } else if let Some(mp) = &cli.fuse {
        run_fuse(&cli, exports, mp)
    } else {
        listen::serve(&cli, exports, tls, allow)
    };
    report_remote();
    // The images are closed: let the commit helper go, and wait for it, so that their locks are gone once this
    // process is (a script's `kill; wait` and then qemu-img on the image).
    qcow2::image::commit::shutdown_helper();
    code
}

/// At exit, what the remote images cost: the GET counter the tests compare with the object store's own log.
fn report_remote() {
    let s = qcow2::remote::stats();
    if s.heads > 0 {
        eprintln!(
            "{}: remote fetches: {} GETs, {} bytes, {} chunks, {} fetched again, {} failed, {} HEADs",
            prog(),
            s.gets,
            s.bytes,
            s.chunks,
            s.refetched,
            s.errors,
            s.heads
        );
    }
}
