//! The transmission phase: decode requests, run many at once, write replies in any order, drain on DISC.
//!
//! Per connection one task reads and decodes requests (through a buffer, so a queue of small requests costs one
//! read syscall) and one writes replies (batched into one write). Requests that are quick (reads and writes
//! served from the page cache, block status) run right in the reading task: no thread hop, no context switch.
//! FLUSH, FUA and TRIM run on the blocking pool, and so does everything for a while after a request ran
//! slowly inline (the image is not in the page cache: the disk's latency is better spent in parallel).
//! Large reads on a plain (not TLS) socket are planned, not read: the reply names the file ranges that hold the
//! data and the writing task `sendfile`s them from the page cache into the socket, so the server copies no
//! guest data at all (the kernel passes page references to a unix or TCP socket).
//! Memory is bounded whatever the client sends: at
//! most [`MAX_IN_FLIGHT`] requests and [`MAX_BUFFERED`] payload and reply bytes are held at once, counted from
//! the moment a request is read until its reply is written to the socket (a client that stops reading its
//! replies makes the reading task stop reading requests), and payloads over [`MAX_PAYLOAD`] are never
//! buffered.

use crate::export::{DetectZeroes, Export};
use crate::lent::{LentReader, LentWriter, Shelf, REPLY_SHELF};
use crate::negotiate::{Context, Transmit};
use crate::proto::reply::{self, Style};
use crate::proto::request::{self, Request};
use crate::proto::*;
use crate::queue::{queue, Sender};
use crate::uring::{AlignedBuf, Ring};
use qcow2::util::is_zero;
use qcow2::{ErrorKind, Source, SpliceFile};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Most requests of one connection in flight at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most payload and reply bytes of one connection held at once.
pub const MAX_BUFFERED: usize = 128 << 20;
/// Most extents in one block status reply.
pub const MAX_EXTENTS: usize = 16384;
/// Largest payload the server discards to stay in sync after refusing an oversized write; beyond this the
/// connection is closed (proto.md allows either).
pub const MAX_DISCARD: u64 = 1 << 32;

/// A request handled inline that takes longer than this (plus 1 ns per byte moved) switches the connection
/// to the blocking pool for [`OFFLOAD_RUN`] requests.
const SLOW: Duration = Duration::from_micros(500);
/// Requests sent to the blocking pool after slow inline ones.
const OFFLOAD_RUN: u32 = 512;
/// Slow requests in a row that start an offload run.
const SLOW_IN_A_ROW: u32 = 3;

/// Largest READ or WRITE run inline: bigger ones may hold a runtime worker for long on a cold disk.
const INLINE_MAX: u64 = 128 << 10;

/// Smallest READ sent with `sendfile`: below this a copy costs less than the extra system calls, and small
/// replies are better gathered into one write.
const SPLICE_MIN: u64 = 64 << 10;
/// Largest READ sent with `sendfile`: the writing task runs on a runtime worker, and on a cold page cache a
/// larger read would hold it for long (larger reads go to the blocking pool).
const SPLICE_MAX: u64 = 4 << 20;
/// Most pieces one spliced reply may have (a fragmented image falls back to reading into a buffer).
const SPLICE_MAX_PIECES: usize = 256;

/// Whether a request may block for long whatever the cache holds: durability, deallocation, zeroing and block
/// status of ranges of any size, large transfers.
fn always_offload(req: &Request) -> bool {
    match req.kind {
        NBD_CMD_READ | NBD_CMD_WRITE => req.flags & NBD_CMD_FLAG_FUA != 0 || req.length > INLINE_MAX,
        NBD_CMD_CACHE => false,
        _ => true,
    }
}

/// The errno for a device error (proto.md "Error values").
pub fn errno(e: &qcow2::Error) -> u32 {
    match e.kind() {
        ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => NBD_EINVAL,
        ErrorKind::NoSpace => NBD_ENOSPC,
        ErrorKind::ReadOnly | ErrorKind::NotPermitted => NBD_EPERM,
        ErrorKind::Unsupported => NBD_ENOTSUP,
        _ => match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => NBD_ENOSPC,
            Some(libc::EPERM) | Some(libc::EROFS) => NBD_EPERM,
            Some(libc::ENOMEM) => NBD_ENOMEM,
            _ => NBD_EIO,
        },
    }
}

/// Flags each command accepts (anything else is EINVAL).
fn allowed_flags(kind: u16, style: Style) -> u16 {
    let df = if style == Style::Simple { 0 } else { NBD_CMD_FLAG_DF };
    let payload = if style == Style::Extended { NBD_CMD_FLAG_PAYLOAD_LEN } else { 0 };
    // proto.md, NBD_CMD_FLAG_FUA: a server that advertised NBD_FLAG_SEND_FUA accepts it on every command
    // (it is a no-op where nothing is written).
    NBD_CMD_FLAG_FUA
        | match kind {
            NBD_CMD_READ => df,
            NBD_CMD_WRITE => payload,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE | payload,
            _ => 0,
        }
}

/// Everything a request handler needs from the connection.
struct Conn {
    /// Reads may go through io_uring: the device reads local files with `O_DIRECT`.
    direct_reads: bool,
    /// The connection's ring, started at the first direct read (`None` inside: io_uring is unavailable).
    ring: std::sync::OnceLock<Option<Arc<Ring>>>,
    export: Arc<Export>,
    style: Style,
    contexts: Vec<Context>,
    /// Reply and payload buffers (shared by every connection).
    pool: &'static Shelf,
    /// Requests still to send to the blocking pool after some were slow (the image is not in the page cache).
    offload: AtomicU32,
    /// Slow requests in a row.
    slow: AtomicU32,
    /// Whether large reads go out with `sendfile` (a plain socket whose registration has not failed).
    splice: AtomicBool,
    /// The device bypasses the page cache (`--cache=none`): nothing is quick enough to run inline.
    direct: bool,
}

impl Conn {
    /// Notes that a request took `took` to move `bytes` bytes: after [`SLOW_IN_A_ROW`] slow ones the next
    /// requests run on the blocking pool, in parallel, instead of inline. (One slow request proves nothing on
    /// a busy machine: the thread may just have been preempted.)
    fn note_time(&self, took: Duration, bytes: u64) {
        if took <= SLOW + Duration::from_nanos(bytes) {
            // Read first: the common case writes nothing to the shared line.
            if self.slow.load(Ordering::Relaxed) != 0 {
                self.slow.store(0, Ordering::Relaxed);
            }
        } else if self.slow.fetch_add(1, Ordering::Relaxed) + 1 >= SLOW_IN_A_ROW {
            self.slow.store(0, Ordering::Relaxed);
            self.offload.store(OFFLOAD_RUN, Ordering::Relaxed);
        }
    }

    /// Whether the next request should run on the blocking pool (counting it down).
    fn offloading(&self) -> bool {
        if self.direct {
            // Every transfer reaches the disk: run them side by side on the blocking pool.
            return true;
        }
        self.offload.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(Some(r)) = self.ring.get() {
            r.close();
        }
    }
}

/// Largest read sent through io_uring (larger ones go to the blocking pool).
const DIRECT_MAX: u64 = 1 << 20;

/// The ring and the read plan for an `O_DIRECT` read it can do: every piece a file range aligned for
/// `O_DIRECT` (or zeros of an aligned length, so the pieces after it stay aligned in the buffer). `None`: the
/// read goes the ordinary way (unaligned, compressed clusters, no io_uring, an error to report).
fn direct_plan(c: &Conn, req: &Request) -> Option<(Arc<Ring>, Vec<qcow2::Piece>)> {
    let end = req.offset.checked_add(req.length)?;
    if req.length == 0 || req.length > DIRECT_MAX || end > c.export.device.size() {
        return None;
    }
    let ring = c.ring.get_or_init(Ring::start).clone()?;
    let mut plan = Vec::new();
    // Only from cached tables: this runs on the event loop, and an L2 table read with O_DIRECT waits for the
    // disk (a miss goes the ordinary way, on the blocking pool, which caches the table for the next reads).
    if !c.export.device.plan_read_cached(req.offset, req.length, &mut plan).ok()? {
        return None;
    }
    let mut align = 512u64;
    for p in &plan {
        match &p.source {
            Source::File { file, .. } if file.direct_fd().is_some() => align = align.max(file.alignment()),
            Source::File { .. } => return None,
            Source::Zero => {}
            _ => return None,
        }
    }
    let aligned = plan
        .iter()
        .all(|p| p.len % align == 0 && !matches!(&p.source, Source::File { offset, .. } if offset % align != 0));
    aligned.then_some((ring, plan))
}

/// Largest direct read answered by the ring's reaper itself, and largest direct write sent through the ring:
/// each takes a fresh aligned buffer and a copy, which for large transfers cost more than they save (1 MiB
/// sequential writes ran at 0.92x qemu-nbd through the ring, 1.88x through the blocking pool's reused bounce
/// buffers; large reads go through a task of their own).
const REAPED_MAX: u64 = 128 << 10;

/// Queues a planned direct read that is one file range on the ring; the reaper sends its reply (or hands it to
/// the blocking pool: a short read, or a kernel whose io_uring cannot read this file). Gives the request back
/// when the plan has more pieces or the ring cannot take it.
fn queue_direct(
    c: &Arc<Conn>,
    ring: &Ring,
    tx: &Sender<Queued>,
    req: Request,
    plan: &[qcow2::Piece],
    permits: Permits,
) -> std::result::Result<(), (Request, Permits)> {
    let len = req.length as usize;
    let [qcow2::Piece { len: piece_len, source: Source::File { file, offset } }] = plan else {
        return Err((req, permits));
    };
    let (Some(fd), true, Some(buf)) =
        (file.direct_fd(), *piece_len == req.length && req.length <= REAPED_MAX, AlignedBuf::zeroed(len))
    else {
        return Err((req, permits));
    };
    // The request and its budget travel with the read; only a refused push gives them back (below).
    let slot = Arc::new(Mutex::new(Some((req, permits))));
    let (c2, t, s2) = (c.clone(), tx.clone(), slot.clone());
    let done: crate::uring::Done = Box::new(move |r, buf| {
        let Some((req, permits)) = take(&s2) else { return };
        if r >= 0 && r as usize == len {
            let _ = t.send((Out::Bytes(data_reply(&c2, &req, &buf.as_slice()[..len])), permits));
        } else if r >= 0 || ring_declined(-r) {
            // Short (a file shorter than its mapping says), or this kernel's io_uring cannot read the file:
            // the ordinary way can.
            offload(&c2, &t, req, Vec::new(), permits);
        } else {
            let e = qcow2::Error::io(format!("read at {}", req.offset), std::io::Error::from_raw_os_error(-r));
            tracing::warn!("{e}");
            let _ =
                t.send((Out::Bytes(reply::done(c2.style, req.cookie, req.offset, errno(&e), &e.to_string())), permits));
        }
    });
    if ring.push_read(file.clone(), fd, buf, 0, len, *offset, done) {
        return Ok(());
    }
    // The read was never queued, so `done` never ran: the request is still in the slot.
    take(&slot).map_or(Ok(()), Err)
}

/// Whether a ring transfer's error means "this kernel's io_uring cannot do it" (or the ring could not take it):
/// the ordinary way can.
fn ring_declined(errno: i32) -> bool {
    matches!(errno, libc::EAGAIN | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
}

/// A READ reply that carries all its data at once.
fn data_reply(c: &Conn, req: &Request, data: &[u8]) -> Vec<u8> {
    let h = whole_data_header(c.style, req);
    let mut v = c.pool.sized(h.len() + data.len());
    v[..h.len()].copy_from_slice(&h);
    v[h.len()..].copy_from_slice(data);
    v
}

/// Queues an `O_DIRECT` WRITE that changes no metadata (`plan_write_cached`: one aligned range of allocated
/// clusters) on the connection's ring; the reaper sends its reply once the disk has the data. Gives the request
/// back when it must go the ordinary way: FUA, zero detection, a plan of several ranges or none, unaligned, a
/// read-modify-write of the file under way, no io_uring writes.
///
/// `more`: another request is waiting behind this one (see [`Ring::push_write`]'s `defer`).
fn queue_direct_write(
    c: &Arc<Conn>,
    tx: &Sender<Queued>,
    req: Request,
    payload: Vec<u8>,
    permits: Permits,
    more: bool,
) -> std::result::Result<(), (Request, Vec<u8>, Permits)> {
    let ex = &c.export;
    let len = payload.len();
    let quick = req.flags & NBD_CMD_FLAG_FUA == 0
        && len as u64 == req.length
        && req.length <= REAPED_MAX
        && !ex.is_read_only()
        && !(ex.detect_zeroes != DetectZeroes::Off && is_zero(&payload));
    let Some(ring) = quick.then(|| c.ring.get_or_init(Ring::start).clone()).flatten().filter(|r| r.can_write()) else {
        return Err((req, payload, permits));
    };
    let mut plan = Vec::new();
    if !ex.device.plan_write_cached(req.offset, req.length, &mut plan) || plan.len() != 1 {
        return Err((req, payload, permits));
    }
    let Some(qcow2::Piece { source: Source::File { file, offset }, .. }) = plan.pop() else {
        return Err((req, payload, permits));
    };
    let align = file.alignment().max(512);
    let (Some(fd), true) = (file.direct_fd(), offset.is_multiple_of(align) && req.length.is_multiple_of(align)) else {
        return Err((req, payload, permits));
    };
    let (Some(pin), Some(mut buf)) = (file.pin_direct_write(), AlignedBuf::zeroed(len)) else {
        return Err((req, payload, permits));
    };
    buf.as_mut_slice().copy_from_slice(&payload);
    let slot = Arc::new(Mutex::new(Some((req, permits))));
    let (c2, t, s2) = (c.clone(), tx.clone(), slot.clone());
    let done: crate::uring::Done = Box::new(move |r, buf| {
        // The write is over (done or failed): a read-modify-write of the file may start.
        drop(pin);
        let Some((req, permits)) = take(&s2) else { return };
        let reply = if r >= 0 && r as usize == len {
            reply::done(c2.style, req.cookie, req.offset, 0, "")
        } else if r >= 0 || ring_declined(-r) {
            // Short (the disk took part of it: the whole write again, the ordinary way), or this kernel's
            // io_uring cannot write the file.
            let mut payload = c2.pool.sized(len);
            payload.copy_from_slice(&buf.as_slice()[..len]);
            offload(&c2, &t, req, payload, permits);
            return;
        } else {
            let e = qcow2::Error::io(format!("write at {}", req.offset), std::io::Error::from_raw_os_error(-r));
            tracing::warn!("{e}");
            reply::done(c2.style, req.cookie, req.offset, errno(&e), &e.to_string())
        };
        let _ = t.send((Out::Bytes(reply), permits));
    });
    if ring.push_write(file, fd, buf, len, offset, done, more) {
        c.pool.put(payload);
        return Ok(());
    }
    // Never queued (`done` dropped with the pin): the ordinary way, with the payload.
    match take(&slot) {
        Some((req, permits)) => Err((req, payload, permits)),
        None => Ok(()),
    }
}

/// Sends the connection's deferred ring entries to the kernel: called before its task waits for anything (the
/// client's next bytes, budget that replies free), since what it waits for may need them done.
fn submit_deferred(c: &Conn) {
    if let Some(Some(r)) = c.ring.get() {
        r.submit_deferred();
    }
}

/// `n` units of `s`, submitting the deferred ring entries first if they are not there yet.
async fn acquire(c: &Conn, s: &Arc<Semaphore>, n: u32) -> Option<OwnedSemaphorePermit> {
    match s.clone().try_acquire_many_owned(n) {
        Ok(p) => Some(p),
        Err(TryAcquireError::Closed) => None,
        Err(TryAcquireError::NoPermits) => {
            submit_deferred(c);
            s.clone().acquire_many_owned(n).await.ok()
        }
    }
}

fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    crate::uring::lock(m).take()
}

/// Runs a planned direct read through the ring and returns its reply (one data chunk); `None` when the read
/// should go the ordinary way instead: a short read (a file shorter than its mapping says) or a ring that
/// cannot take it.
async fn direct_read(c: &Conn, ring: &Ring, req: &Request, plan: Vec<qcow2::Piece>) -> Option<Vec<u8>> {
    let style = c.style;
    let len = req.length as usize;
    // Every byte of it is read or zero-filled below before it is copied out (a short read gives up).
    let Some(mut buf) = AlignedBuf::reused(len) else {
        return Some(reply::done(style, req.cookie, req.offset, NBD_ENOMEM, "out of memory"));
    };
    let mut pos = 0usize;
    for p in plan {
        let n = p.len as usize;
        if pos.checked_add(n).is_none_or(|e| e > len) {
            return None;
        }
        match p.source {
            Source::File { file, offset } => {
                let fd = file.direct_fd()?;
                match ring.read(file, fd, buf, pos, n, offset).await {
                    Ok((got, b)) if got == n => buf = b,
                    Ok(_) => return None,
                    // The ring could not take it, or this kernel's io_uring cannot read this file: the
                    // ordinary way can (bounce buffers).
                    Err(e) if e.raw_os_error().is_some_and(ring_declined) => return None,
                    Err(e) => {
                        tracing::warn!("read at {} failed: {e}", req.offset);
                        return Some(reply::done(style, req.cookie, req.offset, NBD_EIO, &e.to_string()));
                    }
                }
            }
            _ => buf.as_mut_slice()[pos..pos + n].fill(0),
        }
        pos += n;
    }
    if pos != len {
        // A plan that does not cover the request (never expected): the ordinary way.
        return None;
    }
    let v = data_reply(c, req, &buf.as_slice()[..len]);
    buf.recycle();
    Some(v)
}

/// The header of a READ reply that carries all its data at once: a simple reply, or one OFFSET_DATA chunk
/// with DONE.
fn whole_data_header(style: Style, req: &Request) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    if style == Style::Simple {
        h.extend_from_slice(&reply::simple(req.cookie, 0));
    } else {
        reply::data_header(&mut h, style, NBD_REPLY_FLAG_DONE, req.cookie, req.offset, req.offset, req.length);
    }
    h
}

/// What a request holds of the connection's budget (a slot among [`MAX_IN_FLIGHT`] and its share of
/// [`MAX_BUFFERED`]) until its reply is written to the socket.
type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// A reply on its way to the writing task, with the budget it holds (released once it is written: a client
/// that does not read its replies cannot make the server hold more than the budget, and the queue of replies
/// holds at most [`MAX_IN_FLIGHT`]).
type Queued = (Out, Permits);

/// A reply on its way to the writing task.
enum Out {
    /// The whole reply.
    Bytes(Vec<u8>),
    /// Headers, zeros and file ranges, in order (only on connections that splice).
    Parts(Vec<Part>),
}

/// A piece of a spliced reply.
enum Part {
    Bytes(Vec<u8>),
    Zero(u64),
    File { file: SpliceFile, offset: u64, len: u64 },
}

/// The socket of a plain connection, for `sendfile` (a duplicate descriptor, registered for writability on
/// its own).
/// It is registered with the runtime at the first large read, not before: a connection that only ever moves
/// small blocks does not pay for the registration.
pub enum Splice {
    /// Not registered yet.
    Idle(OwnedFd),
    /// Registered for writability.
    Registered(AsyncFd<OwnedFd>),
    /// Registration failed: large reads go out through a buffer (the descriptor is kept for `shutdown`).
    Failed(OwnedFd),
}

impl Splice {
    /// Shuts the socket down both ways.
    fn shutdown(&self) {
        let fd = match self {
            Splice::Idle(fd) => fd.as_raw_fd(),
            Splice::Registered(a) => a.get_ref().as_raw_fd(),
            Splice::Failed(fd) => fd.as_raw_fd(),
        };
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
    }

    /// Wraps a duplicate of the connection's socket.
    pub fn new(fd: OwnedFd) -> Splice {
        Splice::Idle(fd)
    }

    /// The registered socket, registering it on first use; `None` if it cannot be.
    fn registered(&mut self) -> Option<&AsyncFd<OwnedFd>> {
        if let Splice::Idle(fd) = self {
            let Ok(fd) = fd.try_clone() else { return None };
            // SAFETY: an `OwnedFd` is a valid open descriptor that stays open, as the same descriptor, until the
            // `AsyncFd` that owns it is dropped.
            *self = match unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) } {
                Ok(a) => Splice::Registered(a),
                Err(e) => {
                    let (fd, e) = e.into_parts();
                    tracing::debug!("cannot register the socket for sendfile: {e}");
                    Splice::Failed(fd)
                }
            };
        }
        match self {
            Splice::Registered(a) => Some(a),
            _ => None,
        }
    }

    /// Sends up to `len` bytes of file `file` from `offset`; returns how many went out (fewer at the end of
    /// the file, or where the file cannot be spliced: the caller sends the rest another way) and the time
    /// spent in the system calls (reading the file; not waiting for the client). Errors are the socket's or
    /// the file's.
    async fn sendfile(&mut self, file: i32, mut offset: u64, len: u64) -> std::io::Result<(u64, Duration)> {
        let mut sent = 0u64;
        let mut busy = Duration::ZERO;
        let Some(sock) = self.registered() else {
            return Ok((0, busy));
        };
        while sent < len {
            let mut ready = sock.writable().await?;
            let want = (len - sent).min(1 << 30) as usize;
            let r = ready.try_io(|s| {
                let mut off = libc::off_t::try_from(offset).map_err(|_| std::io::Error::other("offset too large"))?;
                let t0 = Instant::now();
                // SAFETY: sendfile reads the file and writes the socket, both descriptors open for the call's
                // duration; `off` is a valid local that the kernel updates.
                let n = unsafe { libc::sendfile(s.get_ref().as_raw_fd(), file, &mut off, want) };
                busy += t0.elapsed();
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as u64)
                }
            });
            match r {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    sent += n;
                    offset += n;
                }
                // A file sendfile cannot read (some file systems).
                Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) => break,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok((sent, busy))
    }
}

/// Serves the transmission phase on `rd` / `wr` until DISC, EOF or a protocol violation.
pub async fn run<R, W>(rd: R, wr: W, t: Transmit, export: Arc<Export>) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    run_spliced(rd, wr, t, export, None).await
}

/// [`run`], with the plain socket under `wr` for sending large reads with `sendfile` (`None` under TLS).
/// (Not itself `async`: the returned future keeps only what it uses, not `t`, a connection's task is smaller.)
pub fn run_spliced<R, W>(
    rd: R,
    wr: W,
    t: Transmit,
    export: Arc<Export>,
    splice: Option<Splice>,
) -> impl std::future::Future<Output = std::io::Result<()>> + Send
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // O_DIRECT or a remote base: every request on the blocking pool (see `Conn::offloading`).
    let direct = export.device.slow_io();
    let conn = Arc::new(Conn {
        direct_reads: direct && export.device.direct_io(),
        ring: Default::default(),
        direct,
        export,
        style: t.style,
        contexts: t.contexts,
        pool: &REPLY_SHELF,
        offload: AtomicU32::new(0),
        slow: AtomicU32::new(0),
        splice: AtomicBool::new(splice.is_some()),
    });
    serve(rd, wr, conn, splice)
}

async fn serve<R, W>(rd: R, wr: W, conn: Arc<Conn>, mut splice: Option<Splice>) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut rd = LentReader::new(rd);
    let (tx, mut rx) = queue::<Queued>();
    let wconn = conn.clone();
    let writer = tokio::spawn(async move {
        let mut w = LentWriter::new(wr);
        let r = async {
            while let Some((o, permits)) = rx.recv().await {
                match o {
                    // A lone reply in one buffer (a client at queue depth 1): written as it is, without a copy
                    // into the write buffer, whose pages then stay untouched (a thousand idle-ish clients cost
                    // a thousand times less memory).
                    Out::Bytes(b) if rx.is_empty() && w.buffer().is_empty() => {
                        w.get_mut().write_all(&b).await?;
                        // Through the layer under the buffer too (TLS keeps records until flushed).
                        w.flush().await?;
                        wconn.pool.put(b);
                        drop(permits);
                        continue;
                    }
                    o => send(&wconn, &mut w, splice.as_mut(), o).await?,
                }
                drop(permits);
                while let Some((o, permits)) = rx.try_recv() {
                    send(&wconn, &mut w, splice.as_mut(), o).await?;
                    drop(permits);
                }
                w.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        if r.is_err() {
            // A reply broke off (its header may be out already): end the connection both ways, so that neither
            // the client nor the reading task waits for bytes that never come.
            if let Some(s) = &splice {
                s.shutdown();
            }
        }
        w.shutdown().await.ok();
        r
    });
    let inflight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let memory = Arc::new(Semaphore::new(MAX_BUFFERED >> 10));
    let ext = conn.style == Style::Extended;
    let hlen = request::header_len(ext);
    let mut hdr = [0u8; 32];
    let result: std::io::Result<()> = loop {
        if rd.buffered() < hlen {
            submit_deferred(&conn);
        }
        match rd.read_exact(&mut hdr[..hlen]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let Ok(mut req) = request::decode(&hdr[..hlen], ext) else {
            tracing::debug!("bad request magic: closing");
            break Ok(());
        };
        if conn.export.cache.writethrough && matches!(req.kind, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES | NBD_CMD_TRIM) {
            // writethrough/directsync: every write is durable before its reply, as if the client set FUA.
            req.flags |= NBD_CMD_FLAG_FUA;
        }
        if conn.export.cache.ignore_flush {
            // unsafe / cache.no-flush: FUA is a flush too, and flushes are ignored.
            req.flags &= !NBD_CMD_FLAG_FUA;
        }
        if req.kind == NBD_CMD_DISC {
            break Ok(());
        }
        // Payload: WRITE carries `length` bytes; with extended headers PAYLOAD_LEN says the same for others.
        let has_payload = req.kind == NBD_CMD_WRITE || (ext && req.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0);
        let mut payload = Vec::new();
        let mut early: Option<(u32, &str)> = None;
        if has_payload {
            let limit = if req.kind == NBD_CMD_WRITE { MAX_PAYLOAD } else { MAX_OPTION_LEN as u64 };
            if req.length > limit {
                // proto.md: with extended headers an oversized PAYLOAD_LEN SHOULD end the connection.
                if req.length > MAX_DISCARD || ext {
                    tracing::debug!("payload of {} bytes is too large: closing", req.length);
                    break Ok(());
                }
                submit_deferred(&conn);
                if let Err(e) = discard(&mut rd, req.length).await {
                    break Err(e);
                }
                early = Some((NBD_EINVAL, "payload larger than the maximum block size"));
            } else {
                let units = (req.length as usize).div_ceil(1024) as u32;
                let Some(permit) = acquire(&conn, &memory, units).await else {
                    break Ok(());
                };
                payload = conn.pool.sized(req.length as usize);
                if rd.buffered() < payload.len() {
                    submit_deferred(&conn);
                }
                if let Err(e) = rd.read_exact(&mut payload).await {
                    break Err(e);
                }
                drop(permit);
            }
        }
        if req.flags & !allowed_flags(req.kind, conn.style) != 0 && early.is_none() {
            early = Some((NBD_EINVAL, "unsupported flags for this command"));
        }
        let Some(slot) = acquire(&conn, &inflight, 1).await else {
            break Ok(());
        };
        if let Some((e, msg)) = early {
            let Some(mem) = acquire(&conn, &memory, 0).await else {
                break Ok(());
            };
            if tx.send((Out::Bytes(reply::done(conn.style, req.cookie, req.offset, e, msg)), (mem, slot))).is_err() {
                break Ok(());
            }
            continue;
        }
        let reply_bytes = if req.kind == NBD_CMD_READ { req.length.min(MAX_PAYLOAD) as usize } else { 0 };
        let units = (reply_bytes + payload.len()).div_ceil(1024) as u32;
        let Some(mem) = acquire(&conn, &memory, units).await else {
            break Ok(());
        };
        // A large read on a plain socket: plan it here (metadata only) and let the writer send the data.
        // (Not with O_DIRECT: those files are never sent with `sendfile`; io_uring reads them below.)
        let splice = conn.splice.load(Ordering::Relaxed)
            && !conn.direct_reads
            && req.kind == NBD_CMD_READ
            && (SPLICE_MIN..=SPLICE_MAX).contains(&req.length)
            && conn.offload.load(Ordering::Relaxed) == 0;
        // The permits go with the reply: released once the writer has written it to the socket.
        let permits: Permits = (mem, slot);
        // O_DIRECT: a read goes to the connection's io_uring, its task waits for the disk, not a thread.
        if conn.direct_reads && req.kind == NBD_CMD_READ {
            if let Some((ring, plan)) = direct_plan(&conn, &req) {
                // One file range (the usual case): queued here, answered by the reaper when the disk is done.
                let (req, permits) = match queue_direct(&conn, &ring, &tx, req, &plan, permits) {
                    Ok(()) => continue,
                    Err(back) => back,
                };
                // Several pieces: read one after the other by a task of their own.
                let (c, t) = (conn.clone(), tx.clone());
                tokio::spawn(async move {
                    match direct_read(&c, &ring, &req, plan).await {
                        Some(bytes) => {
                            let _ = t.send((Out::Bytes(bytes), permits));
                        }
                        None => offload(&c, &t, req, Vec::new(), permits),
                    }
                });
                continue;
            }
        }
        // O_DIRECT: an in-place write of allocated clusters goes to the ring too.
        let (req, payload, permits) = if conn.direct_reads && req.kind == NBD_CMD_WRITE {
            let more = rd.buffered() >= hlen;
            match queue_direct_write(&conn, &tx, req, payload, permits, more) {
                Ok(()) => continue,
                Err(back) => back,
            }
        } else {
            (req, payload, permits)
        };
        let out = match splice.then(|| spliced_read(&conn, &req)).flatten() {
            Some(parts) => Some((Out::Parts(parts), permits)),
            None if !always_offload(&req) && !conn.offloading() => {
                let t0 = Instant::now();
                let moved = req.length.min(MAX_PAYLOAD);
                match inline(&conn, req, payload) {
                    Ok(bytes) => {
                        conn.note_time(t0.elapsed(), moved);
                        Some((Out::Bytes(bytes), permits))
                    }
                    Err((req, payload)) => {
                        offload(&conn, &tx, req, payload, permits);
                        None
                    }
                }
            }
            None => {
                offload(&conn, &tx, req, payload, permits);
                None
            }
        };
        if let Some((out, permits)) = out {
            // Answered here: the reply goes out in order with the others.
            if tx.send((out, permits)).is_err() {
                break Ok(());
            }
        }
    };
    // DISC or EOF: let every request in flight finish and its reply go out (proto.md, NBD_CMD_DISC).
    submit_deferred(&conn);
    let _ = inflight.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(tx);
    let w = writer.await.unwrap_or(Ok(()));
    if !conn.export.is_read_only() {
        let dev = conn.export.device.clone();
        let _ = tokio::task::spawn_blocking(move || dev.flush()).await;
    }
    result.and(w)
}

/// Zeros to send from.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Writes one reply: spliced parts go out with `sendfile` after everything buffered before them.
async fn send<W: AsyncWrite + Unpin>(
    c: &Conn,
    w: &mut LentWriter<W>,
    splice: Option<&mut Splice>,
    o: Out,
) -> std::io::Result<()> {
    match o {
        Out::Bytes(b) => {
            w.write_all(&b).await?;
            c.pool.put(b);
            Ok(())
        }
        // Boxed: its state is large and would otherwise be part of every connection's writing task.
        Out::Parts(p) => Box::pin(send_parts(c, w, splice, p)).await,
    }
}

/// Writes the parts of a spliced reply.
async fn send_parts<W: AsyncWrite + Unpin>(
    c: &Conn,
    w: &mut LentWriter<W>,
    mut splice: Option<&mut Splice>,
    parts: Vec<Part>,
) -> std::io::Result<()> {
    for p in parts {
        match p {
            Part::Bytes(b) => w.write_all(&b).await?,
            Part::Zero(mut n) => {
                while n > 0 {
                    let k = n.min(ZEROS.len() as u64) as usize;
                    w.write_all(&ZEROS[..k]).await?;
                    n -= k as u64;
                }
            }
            Part::File { file, offset, len } => {
                w.flush().await?;
                let sent = match (splice.as_deref_mut(), file.fd()) {
                    (Some(s), Some(fd)) => {
                        let (n, busy) = s.sendfile(fd, offset, len).await?;
                        if matches!(s, Splice::Failed(_)) {
                            // Plan no more spliced reads: their data would be read here, on a runtime thread.
                            c.splice.store(false, Ordering::Relaxed);
                        }
                        c.note_time(busy, n);
                        n
                    }
                    _ => 0,
                };
                if sent < len {
                    // The rest (past the end of the file it reads as zeros): through a buffer. The header is
                    // out already, so a failure here can only end the connection.
                    let mut b = c.pool.sized((len - sent) as usize);
                    file.read_at(&mut b, offset + sent).map_err(|e| std::io::Error::other(e.to_string()))?;
                    w.write_all(&b).await?;
                    c.pool.put(b);
                }
            }
        }
    }
    Ok(())
}

/// The reply to a READ as parts for [`send`], from the device's read plan; `None` when the request should be
/// served the ordinary way (an error to report, pieces only `read_at` can produce, a fragmented range).
fn spliced_read(c: &Conn, req: &Request) -> Option<Vec<Part>> {
    let dev = &c.export.device;
    let end = req.offset.checked_add(req.length)?;
    if end > dev.size() || req.length > MAX_PAYLOAD {
        return None;
    }
    let mut plan = Vec::new();
    dev.plan_read(req.offset, req.length, &mut plan).ok()?;
    // Every piece must be zeros or a file `sendfile` can read (not `Read`, not an `O_DIRECT` file: their data
    // would be read in the writing task, on a runtime thread).
    let sendable = |p: &qcow2::Piece| match &p.source {
        Source::Zero => true,
        Source::File { file, .. } => file.fd().is_some(),
        _ => false,
    };
    if plan.len() > SPLICE_MAX_PIECES || !plan.iter().all(sendable) {
        return None;
    }
    let data = |src: Source, len: u64| match src {
        Source::File { file, offset } => Part::File { file, offset, len },
        _ => Part::Zero(len),
    };
    let style = c.style;
    let mut parts = Vec::with_capacity(plan.len() + 1);
    let df = req.flags & NBD_CMD_FLAG_DF != 0;
    let holes = plan.iter().any(|p| matches!(p.source, Source::Zero));
    if style == Style::Simple || df || !holes {
        parts.push(Part::Bytes(whole_data_header(style, req)));
        parts.extend(plan.into_iter().map(|p| data(p.source, p.len)));
        return Some(parts);
    }
    // Holes as OFFSET_HOLE chunks, data as OFFSET_DATA chunks; the last chunk carries DONE.
    let mut pos = req.offset;
    let count = plan.len();
    for (i, p) in plan.into_iter().enumerate() {
        let flags = if i + 1 == count { NBD_REPLY_FLAG_DONE } else { 0 };
        let mut h = Vec::with_capacity(40);
        match p.source {
            Source::Zero => {
                reply::hole(&mut h, style, flags, req.cookie, req.offset, pos, u32::try_from(p.len).ok()?);
                parts.push(Part::Bytes(h));
            }
            src => {
                reply::data_header(&mut h, style, flags, req.cookie, req.offset, pos, p.len);
                parts.push(Part::Bytes(h));
                parts.push(data(src, p.len));
            }
        }
        pos += p.len;
    }
    Some(parts)
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        rd.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Runs one request and returns its whole reply; the payload buffer goes back to the pool.
/// Runs a request on the blocking pool; its reply goes to the writer when done.
fn offload(conn: &Arc<Conn>, tx: &Sender<Queued>, req: Request, payload: Vec<u8>, permits: Permits) {
    let conn = conn.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let r = tokio::task::spawn_blocking(move || handle(&conn, req, payload)).await;
        if let Ok(bytes) = r {
            let _ = tx.send((Out::Bytes(bytes), permits));
        }
    });
}

/// Handles a quick request on the runtime thread that read it. A WRITE runs here only if the device can
/// do it without touching metadata ([`qcow2::BlockDevice::write_quick`]: no lock, no allocation, no sync);
/// otherwise it is handed back, to run on the blocking pool.
fn inline(c: &Conn, req: Request, payload: Vec<u8>) -> std::result::Result<Vec<u8>, (Request, Vec<u8>)> {
    if req.kind != NBD_CMD_WRITE {
        return Ok(handle(c, req, payload));
    }
    let ex = &c.export;
    let in_range = req.offset.checked_add(req.length).is_some_and(|e| e <= ex.device.size());
    if ex.is_read_only() || !in_range || (ex.detect_zeroes != DetectZeroes::Off && is_zero(&payload)) {
        // Errors and zero detection: the general path.
        return Ok(handle(c, req, payload));
    }
    match ex.device.write_quick(&payload, req.offset) {
        None => Err((req, payload)),
        Some(r) => {
            c.pool.put(payload);
            Ok(match r {
                Ok(()) => reply::done(c.style, req.cookie, req.offset, 0, ""),
                Err(e) => reply::done(c.style, req.cookie, req.offset, errno(&e), &e.to_string()),
            })
        }
    }
}

fn handle(c: &Conn, req: Request, payload: Vec<u8>) -> Vec<u8> {
    let r = execute(c, req, &payload);
    c.pool.put(payload);
    r
}

fn execute(c: &Conn, req: Request, payload: &[u8]) -> Vec<u8> {
    let style = c.style;
    let ex = &c.export;
    let dev = &ex.device;
    let size = dev.size();
    let fail = |e: u32, msg: &str| reply::done(style, req.cookie, req.offset, e, msg);
    let ok = || reply::done(style, req.cookie, req.offset, 0, "");
    let end = req.offset.checked_add(req.length);
    let in_range = end.is_some_and(|e| e <= size);
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    let writable = !ex.is_read_only();
    match req.kind {
        NBD_CMD_READ => {
            if !in_range {
                return fail(NBD_EINVAL, "read beyond the end of the export");
            }
            if req.length > MAX_PAYLOAD {
                return fail(NBD_EINVAL, "read larger than the maximum block size");
            }
            if req.length == 0 {
                // A data chunk must carry at least one byte (proto.md, NBD_REPLY_TYPE_OFFSET_DATA): nothing to
                // send but the final chunk.
                return ok();
            }
            read(c, &req)
        }
        NBD_CMD_WRITE => {
            if !writable {
                return fail(NBD_EPERM, "export is read-only");
            }
            if !in_range {
                return fail(NBD_ENOSPC, "write beyond the end of the export");
            }
            let r = if ex.detect_zeroes != DetectZeroes::Off && is_zero(payload) {
                let unmap = ex.detect_zeroes == DetectZeroes::Unmap && ex.unmap;
                dev.write_zeroes(req.offset, req.length, unmap, fua)
            } else {
                dev.write_at(payload, req.offset, fua)
            };
            match r {
                Ok(()) => ok(),
                Err(e) => fail(errno(&e), &e.to_string()),
            }
        }
        NBD_CMD_FLUSH if ex.cache.ignore_flush => ok(),
        NBD_CMD_FLUSH => match dev.flush() {
            Ok(()) => ok(),
            Err(e) => fail(errno(&e), &e.to_string()),
        },
        NBD_CMD_TRIM => {
            if !writable {
                return fail(NBD_EPERM, "export is read-only");
            }
            if !in_range {
                return fail(NBD_EINVAL, "trim beyond the end of the export");
            }
            let r = if ex.unmap && req.length > 0 { dev.discard(req.offset, req.length) } else { Ok(()) };
            match r.and_then(|_| if fua { dev.flush() } else { Ok(()) }) {
                Ok(()) => ok(),
                Err(e) => fail(errno(&e), &e.to_string()),
            }
        }
        NBD_CMD_WRITE_ZEROES => {
            if !writable {
                return fail(NBD_EPERM, "export is read-only");
            }
            if !in_range {
                return fail(NBD_ENOSPC, "write beyond the end of the export");
            }
            if req.flags & NBD_CMD_FLAG_FAST_ZERO != 0 && !dev.can_fast_zero() {
                return fail(NBD_ENOTSUP, "fast zeroing is not possible on this export");
            }
            let may_unmap = ex.unmap && req.flags & NBD_CMD_FLAG_NO_HOLE == 0;
            match dev.write_zeroes(req.offset, req.length, may_unmap, fua) {
                Ok(()) => ok(),
                Err(e) => fail(errno(&e), &e.to_string()),
            }
        }
        NBD_CMD_CACHE => {
            if !in_range {
                return fail(NBD_EINVAL, "cache beyond the end of the export");
            }
            ok()
        }
        NBD_CMD_BLOCK_STATUS => block_status(c, &req, payload),
        _ => fail(NBD_EINVAL, "unknown command"),
    }
}

fn read(c: &Conn, req: &Request) -> Vec<u8> {
    let style = c.style;
    let dev = &c.export.device;
    let len = req.length as usize;
    // One header and the data read straight after it, into a reused buffer.
    let one = |h: &[u8]| {
        let mut v = c.pool.sized(h.len() + len);
        v[..h.len()].copy_from_slice(h);
        match dev.read_at(&mut v[h.len()..], req.offset) {
            Ok(()) => Ok(v),
            Err(e) => {
                c.pool.put(v);
                Err(e)
            }
        }
    };
    if style == Style::Simple {
        return one(&reply::simple(req.cookie, 0)).unwrap_or_else(|e| reply::simple(req.cookie, errno(&e)).to_vec());
    }
    let df = req.flags & NBD_CMD_FLAG_DF != 0;
    let fail = |e: qcow2::Error| reply::done(style, req.cookie, req.offset, errno(&e), &e.to_string());
    // A single data chunk when the client asks for it or it is all data anyway; otherwise holes go as
    // OFFSET_HOLE chunks, as from qemu-nbd. A small read looks for holes only in the image metadata, which
    // its read maps anyway (no lseek of a raw file for each 4 KiB read).
    let all_data = || {
        if len <= 4096 {
            dev.metadata_hole(req.offset, req.length) != Some(true)
        } else {
            dev.block_status(req.offset, req.length).is_ok_and(|st| !st.zero && st.len >= req.length)
        }
    };
    if df || all_data() {
        return one(&whole_data_header(style, req)).unwrap_or_else(fail);
    }
    let mut v = c.pool.take();
    v.clear();
    // Larger reads: holes as OFFSET_HOLE chunks, data as OFFSET_DATA chunks; the last chunk carries DONE.
    let end = req.offset + req.length;
    let mut pos = req.offset;
    while pos < end {
        let st = match dev.block_status(pos, end - pos) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let n = st.len.min(end - pos);
        let last = pos + n >= end;
        let flags = if last { NBD_REPLY_FLAG_DONE } else { 0 };
        if st.zero {
            reply::hole(&mut v, style, flags, req.cookie, req.offset, pos, n as u32);
        } else {
            reply::data_header(&mut v, style, flags, req.cookie, req.offset, pos, n);
            let at = v.len();
            v.resize(at + n as usize, 0);
            if let Err(e) = dev.read_at(&mut v[at..], pos) {
                return fail(e);
            }
        }
        pos += n;
    }
    v
}

/// Appends `n` bytes of `val` to a context's extents, merged into the last one while it stays within
/// `max_len` (callers pass `n <= max_len`).
fn add_extent(l: &mut Vec<(u64, u32)>, n: u64, val: u32, max_len: u64) {
    match l.last_mut() {
        Some((len, v)) if *v == val && *len + n <= max_len => *len += n,
        _ => l.push((n.min(max_len), val)),
    }
}

fn block_status(c: &Conn, req: &Request, payload: &[u8]) -> Vec<u8> {
    let style = c.style;
    let fail = |e: u32, msg: &str| reply::done(style, req.cookie, req.offset, e, msg);
    if c.contexts.is_empty() {
        return fail(NBD_EINVAL, "no metadata context was negotiated");
    }
    // With PAYLOAD_LEN (extended headers) the payload holds the effect length and the context IDs wanted.
    let (length, wanted): (u64, Vec<Context>) = if req.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0 {
        if payload.len() < 8 || !(payload.len() - 8).is_multiple_of(4) {
            return fail(NBD_EINVAL, "malformed block status payload");
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&payload[..8]);
        let ids: Vec<u32> =
            payload[8..].chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).collect();
        let mut w = Vec::new();
        for id in ids {
            match c.contexts.iter().find(|x| x.id() == id) {
                Some(&ctx) if !w.contains(&ctx) => w.push(ctx),
                Some(_) => {}
                None => return fail(NBD_EINVAL, "unknown metadata context ID"),
            }
        }
        if w.is_empty() {
            return fail(NBD_EINVAL, "no metadata context selected");
        }
        (u64::from_be_bytes(a), w)
    } else {
        (req.length, c.contexts.clone())
    };
    let dev = &c.export.device;
    let size = dev.size();
    if length == 0 {
        return fail(NBD_EINVAL, "zero-length block status");
    }
    match req.offset.checked_add(length) {
        Some(e) if e <= size => {}
        _ => return fail(NBD_EINVAL, "block status beyond the end of the export"),
    }
    let end = req.offset + length;
    let one = req.flags & NBD_CMD_FLAG_REQ_ONE != 0;
    // Extents per context, merged where the context's value does not change.
    let mut lists: Vec<Vec<(u64, u32)>> = vec![Vec::new(); wanted.len()];
    let mut pos = req.offset;
    let max_len = if style == Style::Extended { u64::MAX } else { u64::from(u32::MAX) & !4095 };
    let mut steps = 0usize;
    // Only the contexts other than dirty bitmaps need the device's block status.
    let needs_status = wanted.iter().any(|c| !matches!(c, Context::DirtyBitmap(_)));
    while needs_status && pos < end && steps < MAX_EXTENTS {
        let st = match dev.block_status(pos, end - pos) {
            Ok(s) => s,
            Err(e) => return fail(errno(&e), &e.to_string()),
        };
        // At most one extent's worth, so `pos` advances by exactly what the extents describe.
        let n = st.len.min(end - pos).min(max_len);
        for (i, ctx) in wanted.iter().enumerate() {
            let val = match ctx {
                Context::BaseAllocation => {
                    (if st.data { 0 } else { NBD_STATE_HOLE }) | (if st.zero { NBD_STATE_ZERO } else { 0 })
                }
                Context::AllocationDepth => st.alloc_depth,
                // Filled below, from the bitmap's own runs.
                Context::DirtyBitmap(_) => continue,
            };
            add_extent(&mut lists[i], n, val, max_len);
        }
        pos += n;
        steps += 1;
        // REQ_ONE: one extent, as long as the next steps keep every context's value (the device's steps end
        // where the host mapping does; qemu-nbd merges them the same way).
        if one && lists.iter().any(|l| l.len() > 1) {
            break;
        }
    }
    // qemu:dirty-bitmap:NAME (qemu's docs/interop/nbd.rst): bit 0 set where the bitmap is dirty.
    for (i, ctx) in wanted.iter().enumerate() {
        let Context::DirtyBitmap(b) = ctx else { continue };
        let Some(name) = c.export.bitmaps.get(usize::from(*b)) else {
            return fail(NBD_EINVAL, "unknown bitmap");
        };
        let l = &mut lists[i];
        let mut pos = req.offset;
        let mut steps = 0usize;
        while pos < end && steps < MAX_EXTENTS {
            let (dirty, n) = match dev.dirty_run(name, pos, end - pos) {
                Ok(Some(r)) => r,
                Ok(None) => return fail(NBD_EINVAL, "the bitmap is gone"),
                Err(e) => return fail(errno(&e), &e.to_string()),
            };
            let n = n.clamp(1, end - pos).min(max_len);
            let val = u32::from(dirty);
            add_extent(l, n, val, max_len);
            pos += n;
            steps += 1;
            if one && l.len() > 1 {
                break;
            }
        }
    }
    let mut v = Vec::new();
    let count = wanted.len();
    for (i, (ctx, mut l)) in wanted.iter().zip(lists).enumerate() {
        if one {
            l.truncate(1);
        }
        let flags = if i + 1 == count { NBD_REPLY_FLAG_DONE } else { 0 };
        reply::block_status(&mut v, style, flags, req.cookie, req.offset, ctx.id(), &l);
    }
    v
}
