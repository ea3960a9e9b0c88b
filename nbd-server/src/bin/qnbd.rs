//! `qnbd`: serve qcow2 and raw images over NBD with qemu-nbd's command line.

use clap::Parser;
use nbd_server::export::{DetectZeroes, Export, Exports};
use nbd_server::server::{Listener, Server, ServerConfig};
use qcow2::{Format, Image, OpenOptions};
use std::os::unix::io::FromRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const LIMITS: &str = "Limits: handshake 10 s by default (--handshake-limit); option data 64 KiB; strings 4096 bytes; \
payloads and reads 32 MiB; 64 requests and 128 MiB of buffers in flight per connection; clients at once: --shared \
(default 1); image metadata: L1 table 32 MiB, refcount table 8 MiB, 65536 snapshots, backing chain depth 64.";

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
    /// Clients served at once (default 1, as qemu-nbd).
    #[arg(short = 'e', long, default_value_t = 1)]
    shared: usize,
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
    /// Cache mode (accepted for compatibility: none, writeback, writethrough, directsync, unsafe).
    #[arg(long)]
    cache: Option<String>,
    /// Same as --cache=none (accepted).
    #[arg(short = 'n', long)]
    nocache: bool,
    /// AIO mode (accepted for compatibility: threads, native, io_uring).
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
    /// Log more (repeat for more).
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Image files to serve.
    #[arg(required_unless_present = "list")]
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

fn build_exports(cli: &Cli) -> Result<Exports, String> {
    let format = cli.format.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?;
    let unmap = match cli.discard.as_str() {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        d => return Err(format!("Invalid discard mode '{d}'")),
    };
    let detect_zeroes = match cli.detect_zeroes.as_str() {
        "off" => DetectZeroes::Off,
        "on" => DetectZeroes::On,
        "unmap" => DetectZeroes::Unmap,
        d => return Err(format!("Invalid detect-zeroes mode '{d}'")),
    };
    if cli.detect_zeroes == "unmap" && !unmap {
        return Err("--detect-zeroes=unmap requires --discard=unmap".into());
    }
    if cli.export_name.len() > cli.files.len() {
        return Err("more export names (-x) than files".into());
    }
    let mut list = Vec::new();
    let shared: qcow2::chain::SharedImages = Default::default();
    for (i, f) in cli.files.iter().enumerate() {
        let snapshot = cli.load_snapshot.as_deref().map(snapshot_name);
        let read_only = cli.read_only || snapshot.is_some();
        let opts = OpenOptions {
            format,
            writable: !read_only && !cli.snapshot && !cli.fresh_per_connection,
            snapshot,
            max_chain_depth: cli.max_chain_depth,
            shared: Some(shared.clone()),
            ..Default::default()
        };
        let img = Image::open(f, &opts).map_err(|e| e.to_string())?;
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
            multi_conn: cli.shared > 1 && !cli.fresh_per_connection,
            fresh: cli
                .fresh_per_connection
                .then(|| nbd_server::export::Fresh { base: base.clone(), opts: opts.clone() }),
        }));
    }
    Ok(Exports { list })
}

/// Listening sockets, bound before any fork so the parent returns only once clients can connect.
enum StdListener {
    Unix(std::os::unix::net::UnixListener, Option<std::path::PathBuf>),
    Tcp(std::net::TcpListener),
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
    let r = if let Some(path) = &cli.socket {
        std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| format!("Failed to connect to '{path}': {e}"))
            .and_then(|s| {
                let _ = s.set_read_timeout(timeout);
                nbd_server::list::list(s).map_err(|e| e.to_string())
            })
    } else {
        let host = cli.bind.clone().unwrap_or_else(|| "localhost".into());
        let addr = format!("{host}:{}", cli.port.unwrap_or(10809));
        std::net::TcpStream::connect(&addr).map_err(|e| format!("Failed to connect to '{addr}': {e}")).and_then(|s| {
            let _ = s.set_read_timeout(timeout);
            nbd_server::list::list(s).map_err(|e| e.to_string())
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
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .init();
    if cli.list {
        return list_exports(&cli);
    }
    if cli.shared == 0 {
        return fail("--shared must be at least 1");
    }
    let exports = match build_exports(&cli) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    // Metadata commits of writable images go through a helper process that finishes them even if this
    // process is killed (qcow2::image::commit); it must be forked before any thread or listener exists.
    if exports.list.iter().any(|e| !e.is_read_only()) {
        // SAFETY: no thread has been started yet (the runtime starts after this).
        if let Err(e) = unsafe { qcow2::image::commit::install_helper() } {
            return fail(e);
        }
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
        persistent: cli.persistent,
        handshake_timeout: if cli.handshake_limit == 0 {
            Duration::from_secs(u64::MAX / 4)
        } else {
            Duration::from_secs(cli.handshake_limit)
        },
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
