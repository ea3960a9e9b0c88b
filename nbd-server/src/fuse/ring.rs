//! FUSE over io_uring (Linux 6.14+, where `/sys/module/fuse/parameters/enable_uring` is `Y`): the kernel
//! copies each request into a buffer the server registered and takes the reply from it, one
//! `IORING_OP_URING_CMD` per request (`COMMIT_AND_FETCH`: answer this one, wait for the next), instead of a
//! `read` and a `write` on `/dev/fuse`. The protocol is the kernel's `fs/fuse/dev_uring.c`.
//!
//! - The kernel has one queue per possible CPU and hands a request to the queue of the CPU its caller runs on.
//!   It switches from `/dev/fuse` to the rings only once every queue has an entry registered, and if any
//!   registration fails it stays with `/dev/fuse` for good. So the rings are made before INIT is answered
//!   ([`Rings::prepare`]: no ring, no `FUSE_OVER_IO_URING` in the reply) and registered right after
//!   ([`Rings::start`]); a failure on the way leaves fuser's `/dev/fuse` threads serving everything.
//! - FORGET and INTERRUPT still come through `/dev/fuse`, which fuser keeps reading.
//! - Each thread owns a ring (128-byte entries, as `URING_CMD` needs) and its entries' buffers: a 288-byte
//!   header and a payload as large as the largest request (`max_write`, 1 MiB). The kernel writes into them
//!   from this thread's context only, so a thread never ends while its entries are registered: it ends when
//!   the kernel completes them with `ENOTCONN` (unmount), or when [`Running::stop`] asks it to.

use super::wire::{self, Request};
use super::{ImageFs, MAX_IO, TTL};
use fuser::{Errno, FileType, INodeNo};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Entries a thread registers on each of its queues. The kernel hands a queue's next request to its most
/// recently returned entry, whichever thread owns it, so a request given to a second entry of a busy thread
/// waits for that thread to finish the first: one entry a thread on each queue, so that where a thread serves one
/// queue (small machines, with page-cache I/O) a request only ever goes to a thread that is waiting for one.
/// Measured on 2 CPUs (`fio` on the exported file, six alternating rounds, medians):
/// - 8 entries on each of 2 threads a queue: 1 MiB writes QD4 at half the rate of `/dev/fuse`;
/// - 2 entries on each of 4 threads a queue: 1 MiB writes 4120 MiB/s, 4 KiB random reads QD32 146k IOPS,
///   random writes 84k;
/// - 1 entry on each of 2 threads a queue: 5128 MiB/s (+24 %), 132k (-10 %), 79k (-7 %); with 3 threads a
///   queue 4617 MiB/s, 131k, 77k; 2 entries on each of 2 threads 4222 MiB/s, 142k, 79k.
///
/// A request waiting behind a 1 MiB write costs more than the batching a second entry gives small requests
/// (a thread answering one and fetching the next in the same system call either way).
const ENTRIES_PER_QUEUE: usize = 1;
/// Entries on each online CPU's queue, each from a different thread (as long as there are that many threads): a
/// CPU's requests are handed only to its own queue, so these are how many of one client thread's requests are
/// served at once. Two, from the measurements above (one thread, one entry: no overlap at all).
const PER_QUEUE: usize = 2;
/// Most threads (each serving one or more queues).
const MAX_THREADS: usize = 8;
/// The same two when a transfer waits for the disk or the network (`O_DIRECT`, a remote image): a waiting
/// request holds its thread. `--cache=none`, fio 4 KiB random writes QD32 on 2 CPUs: 11.7k IOPS with the
/// page-cache layout, 24-29k through `/dev/fuse` with its 16 threads.
const SLOW_PER_QUEUE: usize = 16;
const SLOW_MAX_THREADS: usize = 16;
/// Most entries in all (each has a payload buffer of [`PAYLOAD_LEN`], paged in as requests use it): on a
/// machine with many CPUs, fewer entries a queue (as many as 64 CPUs had with 2 entries on each of 8 threads).
const MAX_ENTRIES: usize = 128;
/// The payload buffer: the kernel's `max(FUSE_MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE)`, which for
/// qnbd's `max_write` of [`MAX_IO`] (and max_pages from it) is `MAX_IO`.
const PAYLOAD_LEN: usize = MAX_IO as usize;
/// `user_data` of the stop eventfd's poll.
const STOP_TOKEN: u64 = u64::MAX;

type Ring128 = IoUring<squeue::Entry128, cqueue::Entry>;

/// What a thread is told once INIT is answered.
enum Go {
    /// Register on this `/dev/fuse` descriptor.
    Serve(Arc<OwnedFd>),
    /// INIT failed: end.
    Quit,
}

/// Rings made before INIT is answered, their threads waiting for [`Rings::start`].
pub struct Rings {
    go: Vec<mpsc::Sender<Go>>,
    running: Running,
}

/// The threads serving the rings.
pub struct Running {
    threads: Vec<JoinHandle<()>>,
    /// Written to end the threads while the connection is still up (they would otherwise wait for it).
    stop: Arc<OwnedFd>,
    /// Requests answered over the rings (each thread adds its count when it ends).
    served: Arc<AtomicU64>,
}

/// The number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-1` or `0-3,8-11`): the kernel's
/// number of queues.
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(text.trim())
        .map(|ids| ids.len())
        .ok_or_else(|| io::Error::other(format!("cannot read the CPU list {text:?}")))
}

/// The online CPUs (`/sys/devices/system/cpu/online`); empty if that cannot be read.
fn online_cpus() -> Vec<usize> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|t| parse_cpu_list(t.trim()))
        .unwrap_or_default()
}

/// The CPU numbers of a kernel CPU list, in order; `None` if it is malformed or names more than 4096.
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut ids = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let a = part.parse::<usize>().ok()?;
                (a, a)
            }
        };
        let n = b.checked_sub(a)?.checked_add(1)?;
        if ids.len().checked_add(n)? > 4096 {
            return None;
        }
        ids.extend(a..=b);
    }
    (!ids.is_empty()).then_some(ids)
}

/// Which queues each thread registers an entry on, for `queues` queues (one per possible CPU) of which those
/// of the `online` CPUs (all of them, if none is named) get `per_queue` entries from distinct threads and the
/// rest one (the kernel uses the rings only once every queue has an entry), from at most `most` threads:
/// several threads a queue on small machines, one thread serving several queues on large ones, and at most
/// [`MAX_ENTRIES`] entries in all (but one a queue at least). Every thread gets at least one queue.
fn plan(queues: usize, online: &[usize], per_queue: usize, most: usize) -> io::Result<Vec<Vec<u16>>> {
    let mut active: Vec<usize> = online.iter().copied().filter(|&c| c < queues).collect();
    active.sort_unstable();
    active.dedup();
    if active.is_empty() {
        active = (0..queues).collect();
    }
    let rest = queues - active.len();
    let threads = active.len().saturating_mul(per_queue).clamp(1, most.max(1));
    let k = per_queue.min(threads).min((MAX_ENTRIES.saturating_sub(rest) / active.len().max(1)).max(1)).max(1);
    // Every thread takes one of the active queues' slots at least.
    let threads = threads.min(active.len().saturating_mul(k)).max(1);
    let mut plan: Vec<Vec<u16>> = vec![Vec::new(); threads];
    let mut slot = 0usize;
    let is_active = |q: usize| active.binary_search(&q).is_ok();
    // An active queue's k slots are consecutive (modulo the threads), so on distinct threads, as k <= threads.
    for q in (0..queues).filter(|&q| is_active(q)).chain((0..queues).filter(|&q| !is_active(q))) {
        let qid = u16::try_from(q).map_err(io::Error::other)?;
        for _ in 0..if is_active(q) { k } else { 1 } {
            plan[slot % threads].push(qid);
            slot += 1;
        }
    }
    Ok(plan)
}

impl Rings {
    /// Makes the rings and their threads for `fs`'s connection, before INIT is answered. `owner`: only this
    /// user's requests are served (besides the ones the kernel sends on its own behalf), as fuser does
    /// without allow_other.
    pub fn prepare(fs: Arc<ImageFs>, owner: Option<u32>) -> io::Result<Rings> {
        let queues = possible_cpus()?;
        let (per_queue, most) =
            if fs.device.slow_io() { (SLOW_PER_QUEUE, SLOW_MAX_THREADS) } else { (PER_QUEUE, MAX_THREADS) };
        let plan = plan(queues, &online_cpus(), per_queue, most)?;
        let stop = eventfd()?;
        let served = Arc::new(AtomicU64::new(0));
        let mut made = Rings { go: Vec::new(), running: Running { threads: Vec::new(), stop, served } };
        for (i, qids) in plan.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::channel();
            let t = Thread {
                fs: fs.clone(),
                owner,
                qids,
                stop: made.running.stop.clone(),
                served: made.running.served.clone(),
            };
            // The ring is made by the thread that uses it (a single-issuer ring belongs to its maker).
            let spawned =
                std::thread::Builder::new().name(format!("fuse-ring-{i}")).spawn(move || match t.make_ring() {
                    Ok(ring) => {
                        let _ = ready_tx.send(Ok(()));
                        t.run(ring, rx)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                });
            let made_ring = match spawned {
                Ok(h) => {
                    made.go.push(tx);
                    made.running.threads.push(h);
                    ready_rx.recv().unwrap_or_else(|_| Err(io::Error::other("ring thread ended")))
                }
                Err(e) => Err(e),
            };
            if let Err(e) = made_ring {
                made.abandon();
                return Err(e);
            }
        }
        Ok(made)
    }

    /// INIT has been answered: the threads register their entries on `dev` (a `/dev/fuse` descriptor of the
    /// connection) and serve.
    pub fn start(self, dev: BorrowedFd<'_>) -> io::Result<Running> {
        let dev = Arc::new(dev.try_clone_to_owned()?);
        for g in &self.go {
            let _ = g.send(Go::Serve(dev.clone()));
        }
        Ok(self.running)
    }

    /// INIT was not answered: the threads end.
    pub fn abandon(self) {
        for g in &self.go {
            let _ = g.send(Go::Quit);
        }
        self.running.join();
    }
}

impl Running {
    /// The count of requests answered over the rings, complete once the threads have ended.
    pub fn served_total(&self) -> Arc<AtomicU64> {
        self.served.clone()
    }

    /// Waits for the threads, which end once the kernel has completed all their entries (after the unmount);
    /// stops those still running after `limit` (the connection outlived the unmount: a lazy one, say).
    pub fn join_within(self, limit: std::time::Duration) {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until && !self.threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.stop();
    }

    fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Ends the threads without waiting for the unmount (their entries are cancelled), then waits for them.
    pub fn stop(self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to an eventfd we own.
        let _ = unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        self.join();
    }
}

fn eventfd() -> io::Result<Arc<OwnedFd>> {
    // SAFETY: eventfd has no memory arguments; the result is checked before it is owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }))
}

/// One registered entry: its queue and buffers. The iovecs stay with it: the kernel reads them when it issues
/// the REGISTER, which may be later than the submission.
struct Entry {
    qid: u16,
    header: Box<[u8]>,
    payload: Mapped,
    iov: Box<[libc::iovec; 2]>,
    /// Still registered (no error completion seen).
    live: bool,
    /// Its REGISTER has not completed yet (a COMMIT_AND_FETCH has not been sent).
    registering: bool,
}

/// Zero-filled anonymous memory mapped for one buffer, paged in as it is written.
struct Mapped {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl Mapped {
    fn new(len: usize) -> io::Result<Mapped> {
        // SAFETY: a fresh private anonymous mapping, touching no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapped { ptr, len })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable and writable (zero-filled, so initialised) until dropped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Mapped {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, borrowed mutably through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

struct Thread {
    fs: Arc<ImageFs>,
    owner: Option<u32>,
    qids: Vec<u16>,
    stop: Arc<OwnedFd>,
    served: Arc<AtomicU64>,
}

/// Makes the kernel give up the rings for this connection before it has switched to them: a REGISTER it
/// refuses (no such queue) turns io_uring off for the connection and wakes the requests waiting for the rings,
/// which then go through `/dev/fuse` (`fuse_uring_register`'s error path). After the switch it changes nothing.
fn force_fallback(fd: i32) {
    let Ok(mut ring) = Ring128::builder().build(2) else {
        tracing::error!("FUSE io_uring: cannot turn the rings off; requests may wait until the unmount");
        return;
    };
    // Leaked: the kernel may look at them after this function has given up waiting.
    let header: &'static mut [u8] = Box::leak(vec![0u8; wire::HEADER_LEN].into_boxed_slice());
    let payload: &'static mut [u8] = Box::leak(vec![0u8; 8192].into_boxed_slice());
    let iov: &'static [libc::iovec; 2] = Box::leak(Box::new([
        libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() },
        libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() },
    ]));
    let sqe = uring_cmd(fd, CMD_REGISTER, u16::MAX, 0, Some(iov), 0);
    // SAFETY: the iovecs and buffers are leaked, valid forever.
    if unsafe { ring.submission().push(&sqe) }.is_ok() {
        let _ = ring.submit_and_wait(1);
    }
}

/// A `URING_CMD` for `/dev/fuse`: `fuse_uring_cmd_req {flags, commit_id, qid}` in the command area;
/// REGISTER also carries the entry's two iovecs (`addr`, and `len` = 2, which the crate's builder does not
/// set: written into the entry's bytes).
fn uring_cmd(
    fd: i32,
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    iov: Option<&[libc::iovec; 2]>,
    user_data: u64,
) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut b = opcode::UringCmd80::new(types::Fd(fd), cmd_op).cmd(cmd);
    if let Some(iov) = iov {
        b = b.addr(Some(iov.as_ptr() as u64));
    }
    let e = b.build().user_data(user_data);
    if iov.is_none() {
        return e;
    }
    // SAFETY: Entry128 is `repr(C)`, 128 bytes of plain data (the SQE and its extension); `len` is the u32
    // at byte 24 of `struct io_uring_sqe`.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(e) };
    bytes[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above, back to the same type.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

impl Thread {
    /// This thread's ring: room for a submission per entry and the stop poll, and for all their completions.
    fn make_ring(&self) -> io::Result<Ring128> {
        let entries = self.qids.len() * ENTRIES_PER_QUEUE;
        let mut b = IoUring::builder();
        b.setup_cqsize(u32::try_from(entries * 2 + 2).map_err(io::Error::other)?);
        // The kernel's copies of requests into the buffers run as task work of this thread: deferred, they run
        // in a batch when the thread next waits, instead of interrupting it (1.4-2.9x the requests a second on
        // 4 KiB random reads).
        b.setup_single_issuer();
        b.setup_defer_taskrun();
        b.build(u32::try_from(entries + 1).map_err(io::Error::other)?)
    }

    fn run(self, mut ring: Ring128, go: mpsc::Receiver<Go>) {
        let dev = match go.recv() {
            Ok(Go::Serve(d)) => d,
            _ => return,
        };
        let fd = dev.as_raw_fd();
        // Never dropped while the kernel may write into an entry's buffers: freed only once every entry has
        // completed with an error (below), leaked otherwise, also when a panic unwinds through here.
        let mut entries: ManuallyDrop<Vec<Entry>> = ManuallyDrop::new(Vec::new());
        for &qid in &self.qids {
            for _ in 0..ENTRIES_PER_QUEUE {
                let mut header = vec![0u8; wire::HEADER_LEN].into_boxed_slice();
                // A mapping of its own: pages are only made when the kernel or a reply first writes them (the
                // allocator would clear a block this size, making all of it resident at once).
                let mut payload = match Mapped::new(PAYLOAD_LEN) {
                    Ok(m) => m,
                    Err(e) => {
                        // Out of memory or mappings: nothing was submitted, so the entries can go; the kernel
                        // waits for this thread's queues, so make it use /dev/fuse.
                        tracing::warn!("FUSE io_uring: cannot map a request buffer: {e}");
                        force_fallback(fd);
                        // SAFETY: nothing was submitted; the entries are dropped once.
                        unsafe { ManuallyDrop::drop(&mut entries) };
                        return;
                    }
                };
                let iov = Box::new([
                    libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() },
                    libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() },
                ]);
                entries.push(Entry { qid, header, payload, iov, live: true, registering: true });
            }
        }
        let stop_poll =
            opcode::PollAdd::new(types::Fd(self.stop.as_raw_fd()), libc::POLLIN as u32).build().user_data(STOP_TOKEN);
        let mut pushed = true;
        // SAFETY: the eventfd outlives the ring (both belong to this thread's run).
        pushed &= unsafe { ring.submission().push(&stop_poll.into()) }.is_ok();
        for (i, e) in entries.iter().enumerate() {
            let sqe = uring_cmd(fd, CMD_REGISTER, e.qid, 0, Some(&e.iov), i as u64);
            // SAFETY: the iovecs and the buffers they point to are in `entries`, which is never freed while the
            // kernel may use them.
            pushed = pushed && unsafe { ring.submission().push(&sqe) }.is_ok();
        }
        if !pushed {
            // Cannot happen (the queue has room for all): nothing was submitted, so the entries can go. The
            // kernel was promised rings at INIT and waits for this thread's queues: make it use /dev/fuse.
            tracing::warn!("FUSE io_uring: submission queue full while registering");
            force_fallback(fd);
            // SAFETY: nothing was submitted; the entries are dropped once.
            unsafe { ManuallyDrop::drop(&mut entries) };
            return;
        }
        let mut live = entries.len();
        let mut served = 0u64;
        let mut replies: Vec<squeue::Entry128> = Vec::with_capacity(entries.len());
        let mut ended_early = false;
        let mut stopping = false;
        while live > 0 && !stopping {
            if let Err(e) = ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    // Interrupted, or completions to reap first: reaped below.
                    Some(libc::EINTR | libc::EBUSY) => {}
                    // The kernel could not take the submissions for now (no memory for them): they stay queued
                    // and go with the next call. Ending here would leave this thread's queues without entries,
                    // and requests routed to them waiting until the unmount.
                    Some(libc::EAGAIN | libc::ENOMEM) => std::thread::sleep(std::time::Duration::from_millis(1)),
                    _ => {
                        tracing::warn!("FUSE io_uring: {e}");
                        ended_early = true;
                        break;
                    }
                }
            }
            let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (token, res) in done {
                if token == STOP_TOKEN {
                    // Asked to stop: the requests of this batch are still answered (below), since the kernel
                    // has handed them over and their clients wait for the answers (a write may be done
                    // already).
                    stopping = true;
                    continue;
                }
                let Some(e) = entries.get_mut(token as usize) else { continue };
                if e.registering && (res == -libc::EAGAIN || res == -libc::EINTR) {
                    // INIT not processed yet (or interrupted): register again.
                    replies.push(uring_cmd(fd, CMD_REGISTER, e.qid, 0, Some(&e.iov), token));
                    continue;
                }
                if res < 0 {
                    // ENOTCONN at the unmount. Anything else loses this entry; a failed registration also makes
                    // the kernel stay with /dev/fuse.
                    if res != -libc::ENOTCONN && res != -libc::ECONNABORTED {
                        tracing::warn!(
                            "FUSE io_uring entry on queue {}: {}",
                            e.qid,
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                    if e.live {
                        e.live = false;
                        live -= 1;
                    }
                    continue;
                }
                e.registering = false;
                let commit = self.answer(e);
                served += 1;
                replies.push(uring_cmd(fd, CMD_COMMIT_AND_FETCH, e.qid, commit, None, token));
            }
            for r in replies.drain(..) {
                // SAFETY: as for the registrations; COMMIT_AND_FETCH refers to the same buffers.
                while unsafe { ring.submission().push(&r) }.is_err() {
                    if ring.submit().is_err() {
                        break;
                    }
                }
            }
            if stopping {
                // The answers go to the kernel (a commit is handled as it is submitted); the fetches that come
                // with them are cancelled with the ring.
                let _ = ring.submit();
            }
        }
        self.served.fetch_add(served, Ordering::Relaxed);
        if ended_early {
            // This thread's queues may lack entries now; if the kernel has not switched to the rings yet it
            // would wait for them forever.
            force_fallback(fd);
        }
        if live == 0 {
            // SAFETY: every entry has completed with an error: the kernel holds none of them.
            unsafe { ManuallyDrop::drop(&mut entries) };
        }
        // Otherwise the entries stay registered and the kernel may yet write into them (the ring's cancellation
        // runs after this thread has moved on): they are leaked. This happens only when the server stops before
        // the unmount has reached it, on its way out.
        drop(dev);
    }

    /// Handles the request in `e` and writes the reply into its buffers; the commit id to send back. Every
    /// request is answered, so the entry returns to the kernel (FORGET and INTERRUPT, which take no answer, do
    /// not travel over the rings).
    fn answer(&self, e: &mut Entry) -> u64 {
        let commit = wire::commit_id(&e.header);
        let Some((hdr, req)) = wire::parse(&e.header, &e.payload) else {
            wire::put_reply_header(&mut e.header, commit, -libc::EIO, 0);
            return commit;
        };
        // A panic in the device code fails the request, and the entry goes back to the kernel.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.dispatch(&hdr, req, &mut e.payload)))
                .unwrap_or_else(|_| {
                    tracing::error!("FUSE request {} failed: a panic in the server", hdr.opcode);
                    Err(Errno::EIO)
                });
        match result {
            Ok(n) => wire::put_reply_header(&mut e.header, hdr.unique, 0, n as u32),
            Err(err) => wire::put_reply_header(&mut e.header, hdr.unique, -err.code(), 0),
        }
        commit
    }

    /// Runs one request; the reply's payload length (written into `payload`).
    fn dispatch(&self, hdr: &wire::InHeader, req: Request, payload: &mut [u8]) -> Result<usize, Errno> {
        let fs = &*self.fs;
        let ino = INodeNo(hdr.nodeid);
        if let Request::Unsupported(_) = req {
            // Before the access check, as fuser does.
            return Err(Errno::ENOSYS);
        }
        // As fuser without allow_other: another user's requests are refused, except those the kernel may send
        // with any uid (reads, writes, fsync, release of an open file).
        if let Some(owner) = self.owner {
            let kernel_may = matches!(
                req,
                Request::Read { .. }
                    | Request::Write { .. }
                    | Request::Fsync
                    | Request::Release
                    | Request::Releasedir
                    | Request::Readdir { .. }
                    | Request::Destroy
            );
            if hdr.uid != owner && !kernel_may {
                return Err(Errno::EACCES);
            }
        }
        match req {
            Request::Lookup { name_len } => {
                let a = fs.lookup_file(ino, &payload[..name_len])?;
                Ok(wire::entry_out(&attr(&a), TTL, payload))
            }
            Request::Getattr => {
                let a = fs.attr(ino).ok_or(Errno::ENOENT)?;
                Ok(wire::attr_out(&attr(&a), TTL, payload))
            }
            Request::Setattr { size } => {
                let a = fs.set_attr(ino, size)?;
                Ok(wire::attr_out(&attr(&a), TTL, payload))
            }
            Request::Open { flags } => {
                let f = fs.open_file(ino, flags)?;
                Ok(wire::open_out(f.bits(), payload))
            }
            Request::Read { offset, size } => fs.read_into(ino, offset, size, payload),
            Request::Write { offset, len, flags } => {
                // Written from the payload buffer itself, whose start then takes the reply.
                let n = fs.write_from(ino, offset, &payload[..len], flags)?;
                Ok(wire::write_out(n, payload))
            }
            Request::Statfs => {
                let (blocks, bsize) = fs.blocks();
                Ok(wire::statfs_out(blocks, bsize, payload))
            }
            Request::Flush | Request::Fsync => fs.make_durable().map(|()| 0),
            Request::Release | Request::Releasedir | Request::Destroy => Ok(0),
            Request::Opendir => Ok(wire::open_out(0, payload)),
            Request::Readdir { offset, size } => {
                let entries = fs.dir_entries(ino)?;
                let list: Vec<(u64, u32, &str)> = entries
                    .iter()
                    .map(|(i, kind, name)| (i.0, if *kind == FileType::Directory { 4 } else { 8 }, *name))
                    .collect();
                Ok(wire::dirents(&list, offset, size as usize, payload))
            }
            Request::Malformed => Err(Errno::EINVAL),
            Request::NoReply | Request::Unsupported(_) => Err(Errno::ENOSYS),
        }
    }
}

/// fuser's [`fuser::FileAttr`] as the wire's [`wire::Attr`].
fn attr(a: &fuser::FileAttr) -> wire::Attr {
    let kind = if a.kind == FileType::Directory { libc::S_IFDIR } else { libc::S_IFREG };
    wire::Attr {
        ino: a.ino.0,
        size: a.size,
        blocks: a.blocks,
        time: a.mtime,
        mode: kind | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        blksize: a.blksize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For each queue, the threads with an entry on it (in order; a thread twice if it registered twice).
    fn owners(plan: &[Vec<u16>], queues: usize) -> Vec<Vec<usize>> {
        let mut on = vec![Vec::new(); queues];
        for (t, qs) in plan.iter().enumerate() {
            for &q in qs {
                on[usize::from(q)].push(t);
            }
        }
        on
    }

    #[test]
    fn every_queue_has_its_entries_on_distinct_threads_and_every_thread_serves() {
        // The layouts measured on 2 CPUs: page cache (2 threads a queue) and O_DIRECT (16 threads, each on both).
        let p = plan(2, &[0, 1], PER_QUEUE, MAX_THREADS).unwrap();
        assert_eq!(owners(&p, 2), vec![vec![0, 1], vec![2, 3]]);
        let p = plan(2, &[0, 1], SLOW_PER_QUEUE, SLOW_MAX_THREADS).unwrap();
        assert_eq!(p.len(), 16);
        assert!(owners(&p, 2).iter().all(|on| on.len() == 16));
        // 64 possible CPUs of which 2 online (a VM with room to hot-plug): the two online queues keep the
        // O_DIRECT layout's 16 entries; the others get one each.
        let p = plan(64, &[0, 1], SLOW_PER_QUEUE, SLOW_MAX_THREADS).unwrap();
        let on = owners(&p, 64);
        assert_eq!((on[0].len(), on[1].len()), (16, 16));
        assert!(on[2..].iter().all(|t| t.len() == 1));
        for queues in [1, 2, 3, 4, 7, 8, 16, 64, 129, 256, 1000, 4096] {
            let onlines: [Vec<usize>; 4] =
                [vec![], (0..queues).collect(), vec![0, 1], (0..queues).step_by(3).chain([queues + 5]).collect()];
            for online in &onlines {
                for (want, most) in [(PER_QUEUE, MAX_THREADS), (SLOW_PER_QUEUE, SLOW_MAX_THREADS), (1, 1), (3, 2)] {
                    let plan = plan(queues, online, want, most).unwrap();
                    let what = format!("{queues} queues, {} online, {want} wanted from {most}", online.len());
                    assert!((1..=most).contains(&plan.len()), "{what}: {} threads", plan.len());
                    assert!(plan.iter().all(|qs| !qs.is_empty()), "{what}: a thread without a queue");
                    let on = owners(&plan, queues);
                    let mut active = vec![online.iter().all(|&c| c >= queues); queues];
                    for &c in online.iter().filter(|&&c| c < queues) {
                        active[c] = true;
                    }
                    let k = on[active.iter().position(|&a| a).unwrap()].len();
                    assert!(k >= 1 && k <= want, "{what}: {k} entries a queue");
                    for (q, threads) in on.iter().enumerate() {
                        let mut distinct = threads.clone();
                        distinct.dedup();
                        assert_eq!(&distinct, threads, "{what}: queue {q} twice on a thread");
                        assert_eq!(threads.len(), if active[q] { k } else { 1 }, "{what}: queue {q}");
                    }
                    let entries: usize = plan.iter().map(Vec::len).sum();
                    assert!(entries <= MAX_ENTRIES.max(queues), "{what}: {entries} entries");
                }
            }
        }
    }

    #[test]
    fn cpu_lists() {
        let n = |s: &str| parse_cpu_list(s).map(|ids| ids.len());
        assert_eq!(n("0-1"), Some(2));
        assert_eq!(n("0"), Some(1));
        assert_eq!(n("0-3,8-11"), Some(8));
        assert_eq!(parse_cpu_list("0,2"), Some(vec![0, 2]));
        assert_eq!(parse_cpu_list("0-3,8-11").unwrap()[4], 8);
        assert_eq!(n("3-1"), None);
        assert_eq!(n(""), None);
        assert_eq!(n("0-99999"), None, "bounded");
        assert_eq!(n("0-4095"), Some(4096));
        assert_eq!(n("0-4095,5000"), None, "bounded in all");
    }

    #[test]
    fn a_register_command_carries_the_iovecs_and_its_queue() {
        let iov = [
            libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 288 },
            libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 1 << 20 },
        ];
        let e = uring_cmd(7, CMD_REGISTER, 1, 0, Some(&iov), 5);
        // SAFETY: reading the plain bytes of a 128-byte repr(C) entry.
        let b: [u8; 128] = unsafe { std::mem::transmute(e) };
        assert_eq!(b[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(&b[4..8], &7i32.to_ne_bytes(), "fd");
        assert_eq!(&b[8..12], &1u32.to_ne_bytes(), "cmd_op");
        assert_eq!(&b[12..16], &[0; 4], "__pad1 must be zero");
        assert_eq!(&b[16..24], &(iov.as_ptr() as u64).to_ne_bytes(), "addr");
        assert_eq!(&b[24..28], &2u32.to_ne_bytes(), "len: two iovecs");
        assert_eq!(&b[32..40], &5u64.to_ne_bytes(), "user_data");
        assert_eq!(&b[48 + 16..48 + 18], &1u16.to_ne_bytes(), "qid in fuse_uring_cmd_req");
        let c = uring_cmd(7, CMD_COMMIT_AND_FETCH, 0, 0xabcd, None, 6);
        // SAFETY: as above.
        let b: [u8; 128] = unsafe { std::mem::transmute(c) };
        assert_eq!(&b[8..12], &2u32.to_ne_bytes());
        assert_eq!(&b[48 + 8..48 + 16], &0xabcdu64.to_ne_bytes(), "commit_id");
    }
}
