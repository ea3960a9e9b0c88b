//! Listening sockets (unix, TCP, vsock, systemd socket activation), the network server, and `-L`.

use crate::tls_setup::client_tls;
use crate::{fail, Cli};
use nbd_server::export::Exports;
use nbd_server::server::{Listener, Server, ServerConfig};
use nbd_server::tls;
use std::os::unix::io::FromRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Listening sockets, bound before any fork so the parent returns only once clients can connect.
pub(crate) enum StdListener {
    Unix(std::os::unix::net::UnixListener, Option<std::path::PathBuf>),
    Tcp(std::net::TcpListener),
    Vsock(vsock::VsockListener),
}

pub(crate) fn bind(cli: &Cli) -> Result<Vec<StdListener>, String> {
    // systemd socket activation: LISTEN_PID must be us, LISTEN_FDS descriptors from fd 3.
    if let (Ok(pid), Ok(n)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) {
        if pid.parse::<u32>().ok() == Some(std::process::id()) {
            let n: i32 = n.parse().map_err(|_| "bad LISTEN_FDS".to_string())?;
            let mut v = Vec::new();
            for fd in 3..3 + n.clamp(0, 64) {
                use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
                let Ok(addr) = getsockname::<SockaddrStorage>(fd) else {
                    return Err(format!("LISTEN_FDS: fd {fd} is not a socket"));
                };
                // SAFETY: systemd passed us these descriptors; we take ownership of each exactly once.
                if addr.family() == Some(AddressFamily::Unix) {
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
pub(crate) fn list_exports(cli: &Cli) -> ExitCode {
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

/// Binds the listeners, goes to the background with --fork, and serves network clients until stopped.
pub(crate) fn serve(
    cli: &Cli,
    exports: Exports,
    tls: Option<tls::ServerTls>,
    allow: Vec<nbd_server::acl::Cidr>,
) -> ExitCode {
    let listeners = match bind(cli) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    // --fork: the parent exits once the child has written the pid file (qemu-nbd's order: a script may read it
    // as soon as the command returns); the listeners are bound already.
    match crate::daemon::Ready::start(cli.fork, cli) {
        Ok(mut ready) => ready.ok(),
        Err(code) => return code,
    }
    // The blocking pool runs the requests that may wait (slow or O_DIRECT I/O, remote images, flushes): at
    // most BLOCKING_THREADS of them at once, as qemu's thread pool (64), so a thousand clients do not make a
    // thousand threads; more requests wait in the pool's queue.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(nbd_server::worker_threads())
        .max_blocking_threads(nbd_server::BLOCKING_THREADS)
        .enable_all()
        .build()
    {
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
