//! Listeners (unix, TCP, systemd socket activation), the connection limit, the handshake timer, and
//! shutdown with a drain.

use crate::export::Exports;
use crate::negotiate::{Negotiation, Step, TlsPolicy};
use crate::proto::option::{self, OPTION_HEADER_LEN};
use crate::proto::{MAX_OPTION_DRAIN, MAX_OPTION_LEN};
use crate::transmission;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The exports.
    pub exports: Exports,
    /// Most clients served at once (qemu-nbd `-e`; 0: no limit).
    pub max_connections: usize,
    /// Close a client that comes when every slot is taken, instead of letting it wait in the listen queue
    /// until a slot is free (qemu-nbd's behaviour, and the default).
    pub refuse_extra: bool,
    /// Keep serving after the last client leaves (qemu-nbd `-t`).
    pub persistent: bool,
    /// Time a client has to finish the handshake (qemu 10: 10 s).
    pub handshake_timeout: Duration,
    /// TLS, when configured.
    pub tls: Option<crate::tls::ServerTls>,
    /// TCP clients allowed (empty: any); others are closed before the greeting.
    pub allow: Vec<crate::acl::Cidr>,
}

/// A listening socket.
pub enum Listener {
    /// A unix socket (its path is removed at exit).
    Unix(tokio::net::UnixListener, Option<std::path::PathBuf>),
    /// A TCP socket.
    Tcp(tokio::net::TcpListener),
    /// An AF_VSOCK socket.
    Vsock(tokio_vsock::VsockListener),
}

/// The shared state of a running server.
pub struct Server {
    config: ServerConfig,
    /// Free client slots, when clients wait for one (`refuse_extra` off and a limit set).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    active: AtomicUsize,
    /// Connections ever accepted (for the "exit after the last client" rule).
    served: AtomicUsize,
    idle: Notify,
}

impl Server {
    /// A server for `config`.
    pub fn new(config: ServerConfig) -> Arc<Server> {
        let slots = (config.max_connections > 0 && !config.refuse_extra)
            .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_connections)));
        Arc::new(Server {
            config,
            slots,
            active: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// Runs the whole connection: handshake (with STARTTLS when configured), then transmission. `splice` is a
    /// duplicate of the stream's socket, for sending large reads with `sendfile` when no TLS is in the way.
    pub async fn serve_connection<S>(
        self: &Arc<Self>,
        mut stream: S,
        splice: Option<OwnedFd>,
        held: Held,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(self.config.handshake_timeout).unwrap_or(now + Duration::from_secs(1 << 40));
        let exports = &self.config.exports;
        let policy = self.config.tls.as_ref().map(|t| t.policy).unwrap_or(TlsPolicy::NoTls);
        let timed_out = || {
            tracing::info!("client did not finish the handshake in time");
            Ok(())
        };
        let neg = match tokio::time::timeout_at(deadline, greet(&mut stream)).await {
            Ok(Ok(Some(n))) => n.with_tls(policy),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return timed_out(),
        };
        match tokio::time::timeout_at(deadline, negotiate(&mut stream, neg, exports)).await {
            Ok(Ok(Ended::Transmit(t))) => self.transmit(stream, t, splice, held).await,
            Ok(Ok(Ended::Closed)) => Ok(()),
            // Boxed: the TLS state would otherwise make every plain connection's task as large as a TLS one's
            // (5 KiB against 2.5 KiB).
            Ok(Ok(Ended::StartTls(neg))) => {
                drop(splice);
                Box::pin(self.serve_tls(stream, neg, deadline, held)).await
            }
            Ok(Err(e)) => Err(e),
            Err(_) => timed_out(),
        }
    }

    /// The rest of a connection after STARTTLS: the TLS handshake, option haggling again, transmission.
    async fn serve_tls<S>(
        self: &Arc<Self>,
        stream: S,
        mut neg: Negotiation,
        deadline: tokio::time::Instant,
        held: Held,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timed_out = || {
            tracing::info!("client did not finish the handshake in time");
            Ok(())
        };
        // TLS owns the socket from here: nothing is sent around it.
        let Some(tls) = &self.config.tls else {
            return Ok(());
        };
        // A failed TLS handshake closes the connection (proto.md, NBD_OPT_STARTTLS).
        let mut s = match tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!("TLS handshake failed: {e}");
                return Ok(());
            }
            Err(_) => return timed_out(),
        };
        if !tls.authz.is_empty() {
            let der = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
            if !crate::tls::authorized(der.as_deref(), &tls.authz) {
                let who = der.as_deref().and_then(crate::tls::subject_of).unwrap_or_else(|| "no certificate".into());
                tracing::warn!("TLS client '{who}' is not in the --tls-authz list: closing");
                let _ = s.shutdown().await;
                return Ok(());
            }
        }
        neg.tls_started();
        match tokio::time::timeout_at(deadline, negotiate(&mut s, neg, &self.config.exports)).await {
            Ok(Ok(Ended::Transmit(t))) => self.transmit(s, t, None, held).await,
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => timed_out(),
        }
    }

    /// Starts the transmission phase as a task of its own, which holds `held` until the connection ends. (The
    /// handshake's task ends here: its state, larger than the transmission's, is not kept for the whole
    /// connection.)
    async fn transmit<S>(
        self: &Arc<Self>,
        stream: S,
        t: Box<crate::negotiate::Transmit>,
        splice: Option<OwnedFd>,
        held: Held,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(mut export) = self.config.exports.find(&t.export.name).cloned() else {
            return Ok(());
        };
        if let Some(f) = export.fresh.clone() {
            // A throwaway overlay for this connection only: the campaign resets its disk by reconnecting.
            let dev = tokio::task::spawn_blocking(move || crate::overlay::temporary(&f.base, &f.opts)).await;
            match dev {
                Ok(Ok(d)) => export = Arc::new(export.with_device(d)),
                Ok(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        let (rd, wr) = tokio::io::split(stream);
        let run = transmission::run_spliced(rd, wr, *t, export, splice.map(transmission::Splice::new));
        tokio::spawn(async move {
            let _held = held;
            if let Err(e) = run.await {
                tracing::debug!("connection ended: {e}");
            }
        });
        Ok(())
    }

    /// Accepts clients on every listener until shutdown (or, unless persistent, until the last client leaves).
    pub async fn run(self: Arc<Self>, listeners: Vec<Listener>, shutdown: Arc<Notify>) {
        let mut tasks = Vec::new();
        let done = Arc::new(Notify::new());
        for l in listeners {
            let me = self.clone();
            tasks.push(tokio::spawn(async move { me.accept_loop(l).await }));
        }
        let me = self.clone();
        let finished = done.clone();
        tokio::spawn(async move {
            if me.config.persistent {
                return;
            }
            // Exit when the first client has come and every client has left.
            loop {
                me.idle.notified().await;
                if me.served.load(Ordering::SeqCst) > 0 && me.active.load(Ordering::SeqCst) == 0 {
                    finished.notify_one();
                    return;
                }
            }
        });
        tokio::select! {
            _ = shutdown.notified() => {}
            _ = done.notified() => {}
        }
        for t in &tasks {
            t.abort();
        }
        for e in &self.config.exports.list {
            if !e.is_read_only() {
                let _ = e.device.flush();
            }
        }
    }

    async fn accept_loop(self: Arc<Self>, l: Listener) {
        loop {
            // With every slot taken, the next client waits in the listen queue (as with qemu-nbd, which stops
            // accepting): it is greeted as soon as a slot is free, however quickly it came.
            let mut slot = None;
            if let Some(sem) = &self.slots {
                match sem.clone().acquire_owned().await {
                    Ok(p) => slot = Some(p),
                    Err(_) => return,
                }
            }
            let r: std::io::Result<()> = match &l {
                Listener::Unix(u, _) => match u.accept().await {
                    Ok((s, _)) => {
                        grow_send_buffer(&s);
                        let fd = s.as_fd().try_clone_to_owned().ok();
                        self.clone().spawn_client(s, fd, slot.take());
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Listener::Tcp(t) => match t.accept().await {
                    Ok((s, peer)) => {
                        if crate::acl::allowed(&self.config.allow, peer.ip()) {
                            let _ = s.set_nodelay(true);
                            let fd = s.as_fd().try_clone_to_owned().ok();
                            self.clone().spawn_client(s, fd, slot.take());
                        } else {
                            // Closed before the greeting: a stranger learns nothing.
                            tracing::info!("connection from {peer} refused: not in --allow");
                            drop(s);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Listener::Vsock(v) => match v.accept().await {
                    Ok((s, _)) => {
                        self.clone().spawn_client(s, None, slot.take());
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = r {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn spawn_client<S>(
        self: Arc<Self>,
        s: S,
        splice: Option<OwnedFd>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let n = self.active.fetch_add(1, Ordering::SeqCst);
        if self.config.max_connections > 0 && permit.is_none() && n >= self.config.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            // Refuse cleanly: close at once, so the client fails fast instead of hanging.
            tracing::info!("connection limit ({}) reached: refusing a client", self.config.max_connections);
            drop(s);
            return;
        }
        self.served.fetch_add(1, Ordering::SeqCst);
        let held = Held { _slot: Slot(self.clone()), _permit: permit };
        tokio::spawn(async move {
            if let Err(e) = self.serve_connection(s, splice, held).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

/// Gives the connection's slot back however the connection ends (even by a panic).
struct Slot(Arc<Server>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.notify_one();
    }
}

/// What a connection holds of its server until it ends: its place in the count of clients and, with `-e`, its
/// slot.
pub struct Held {
    // Dropped in this order: the count first, then the slot.
    _slot: Slot,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Send buffer asked for on unix sockets: room for several 256 KiB read replies (the request size of `nbdcopy`
/// and qemu's mirror jobs) at once. Linux's default (about 208 KiB, doubled for overhead) holds less than one such
/// reply, so the writer and the client took turns at every reply: `nbdcopy -C 1` of a 1 GiB qcow2 took 0.36 s
/// with the default and 0.19 s with this on the development machine. It is a limit, not an allocation: an idle
/// connection costs nothing more. TCP sockets keep the kernel's autotuning, which setting a size would turn off.
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// Raises a unix socket's send buffer to [`UNIX_SEND_BUFFER`]; past `net.core.wmem_max` only with
/// `CAP_NET_ADMIN` (SO_SNDBUFFORCE). Failing changes nothing but speed, so it is not reported.
pub fn grow_send_buffer<F: AsFd>(s: &F) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let fd = s.as_fd();
    // The kernel doubles what it is given (bookkeeping overhead) and reports the doubled value.
    let enough = |fd| getsockopt(&fd, sockopt::SndBuf).is_ok_and(|v| v >= UNIX_SEND_BUFFER);
    if enough(fd) {
        return;
    }
    let _ = setsockopt(&fd, sockopt::SndBuf, &UNIX_SEND_BUFFER);
    if !enough(fd) {
        let _ = setsockopt(&fd, sockopt::SndBufForce, &UNIX_SEND_BUFFER);
    }
}

/// Serves a connection whose handshake happened elsewhere: a socket handed to the kernel's NBD client
/// (`qnbd -c`), which speaks the transmission phase with simple replies only. `splice` is a duplicate of the
/// socket, for `sendfile`.
pub async fn serve_kernel<S>(
    stream: S,
    export: Arc<crate::export::Export>,
    splice: Option<OwnedFd>,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let t = crate::negotiate::Transmit {
        export: export.meta(),
        style: crate::proto::reply::Style::Simple,
        contexts: Vec::new(),
    };
    transmission::run_spliced(rd, wr, t, export, splice.map(transmission::Splice::new)).await
}

/// How option haggling ended.
pub enum Ended {
    /// Enter transmission.
    Transmit(Box<crate::negotiate::Transmit>),
    /// The client asked for TLS and was acknowledged: run the TLS handshake, then negotiate again.
    StartTls(Negotiation),
    /// The connection is over.
    Closed,
}

/// Sends the greeting and reads the client flags; `None` if the client left or sent unknown flags.
pub async fn greet<S>(s: &mut S) -> std::io::Result<Option<Negotiation>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(&option::greeting()).await?;
    s.flush().await?;
    let flags = match s.read_u32().await {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    Ok(Negotiation::new(flags))
}

/// Option haggling until transmission, STARTTLS or the end.
pub async fn negotiate<S>(s: &mut S, mut neg: Negotiation, exports: &Exports) -> std::io::Result<Ended>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; OPTION_HEADER_LEN];
        if s.read_exact(&mut h).await.is_err() {
            return Ok(Ended::Closed);
        }
        let Some(hdr) = option::decode_header(&h) else {
            return Ok(Ended::Closed);
        };
        let too_long = hdr.length > MAX_OPTION_LEN;
        let mut data = Vec::new();
        if hdr.length > MAX_OPTION_DRAIN {
            // Refused unread: the error reply, then the connection closes (as qemu-nbd does past its limit).
            // Reading a length of up to 4 GiB to stay in step would let one client hold the server for seconds.
            out.clear();
            let _ = neg.option(hdr.option, &[], true, exports, &mut out);
            s.write_all(&out).await?;
            s.flush().await?;
            return Ok(Ended::Closed);
        } else if too_long {
            // Read and discarded, 64 KiB at a time, to stay in step.
            let mut left = hdr.length as usize;
            let mut sink = vec![0u8; MAX_OPTION_LEN as usize];
            while left > 0 {
                let k = left.min(sink.len());
                s.read_exact(&mut sink[..k]).await?;
                left -= k;
            }
        } else {
            data.resize(hdr.length as usize, 0);
            s.read_exact(&mut data).await?;
        }
        out.clear();
        let step = neg.option(hdr.option, &data, too_long, exports, &mut out);
        s.write_all(&out).await?;
        s.flush().await?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(Ended::Closed),
            Step::Transmit(t) => return Ok(Ended::Transmit(Box::new(t))),
            Step::StartTls => return Ok(Ended::StartTls(neg)),
        }
    }
}

/// The whole plaintext handshake over one stream (no TLS): what to serve, or `None` if the client left.
pub async fn handshake<S>(s: &mut S, exports: &Exports) -> std::io::Result<Option<crate::negotiate::Transmit>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(neg) = greet(s).await? else {
        return Ok(None);
    };
    match negotiate(s, neg, exports).await? {
        Ended::Transmit(t) => Ok(Some(*t)),
        _ => Ok(None),
    }
}
