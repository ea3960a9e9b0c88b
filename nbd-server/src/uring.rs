//! `O_DIRECT` transfers (`--cache=none`, `directsync`) through io_uring.
//!
//! Without the page cache every read waits for the disk. Run on the blocking pool, each costs a thread hand-off,
//! a thread asleep in the kernel and a wake-up back: on two cores that was most of the time (140,000 context
//! switches a second at 37,000 reads). Here the connection's task submits the read, or the write into
//! allocated clusters, to a ring of its own; the ring's descriptor is polled by the runtime like a socket, and
//! one task (the reaper) runs each completion's callback, which sends the reply. No thread waits for the disk.
//!
//! Ownership: a submitted entry's buffer and file move into its [`Pending`] state, leaked into the entry's
//! `user_data` and taken back with the completion, so a connection that ends never leaves the kernel writing
//! into freed memory or using a closed descriptor.

use io_uring::{opcode, types, IoUring};
use qcow2::SpliceFile;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify};

/// Alignment of read buffers: enough for any `O_DIRECT` file (512 or 4096).
const ALIGN: usize = 4096;
/// Entries of a connection's ring (its requests in flight are bounded by `MAX_IN_FLIGHT` anyway).
const ENTRIES: u32 = 64;
/// Most entries a connection leaves queued for one submission ([`Ring::push_write`]'s `defer`).
const DEFER_MAX: usize = 16;

/// A heap buffer aligned for `O_DIRECT`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// Bytes in use (`as_slice`), at most `cap`.
    len: usize,
    /// Bytes allocated (all initialised: zeroed at allocation).
    cap: usize,
}

// SAFETY: the buffer is plain owned memory; nothing else refers to it.
unsafe impl Send for AlignedBuf {}

/// Spare large buffers: a fresh 1 MiB buffer is mapped, faulted in page by page and unmapped again by the
/// allocator for every large direct read.
static SPARE: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());
/// Sizes of buffers kept spare.
const SPARE_SIZES: std::ops::RangeInclusive<usize> = (256 << 10)..=(1 << 20);
/// Most spare buffers kept (by the whole process).
const SPARE_COUNT: usize = 8;

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` > 0).
    pub fn zeroed(len: usize) -> Option<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        NonNull::new(p).map(|ptr| AlignedBuf { ptr, len: len.max(1), cap: len.max(1) })
    }

    /// A buffer of `len` bytes that may hold another transfer's bytes (a spare one when there is one): the
    /// caller overwrites all of it before any of it leaves the process.
    pub fn reused(len: usize) -> Option<AlignedBuf> {
        if SPARE_SIZES.contains(&len) {
            let mut spare = lock(&SPARE);
            if let Some(i) = spare.iter().position(|b| b.cap >= len) {
                let mut b = spare.swap_remove(i);
                b.len = len;
                return Some(b);
            }
        }
        Self::zeroed(len)
    }

    /// Keeps the buffer for [`AlignedBuf::reused`] if it is of a size kept and there is room; frees it otherwise.
    pub fn recycle(self) {
        if SPARE_SIZES.contains(&self.cap) {
            let mut spare = lock(&SPARE);
            if spare.len() < SPARE_COUNT {
                spare.push(self);
            }
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points at cap >= len initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self is the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = std::alloc::Layout::from_size_align(self.cap, ALIGN) {
            // SAFETY: allocated in `zeroed` with this very layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// What to do with a finished transfer: its result (bytes moved, or a negative errno) and the buffer back. Runs
/// on the reaper's task, so it must not block.
pub type Done = Box<dyn FnOnce(i32, AlignedBuf) + Send>;

/// A transfer in flight: what the kernel uses until it completes.
struct Pending {
    done: Done,
    buf: AlignedBuf,
    _file: SpliceFile,
}

/// One connection's ring.
///
/// Each entry's `user_data` is its [`Pending`], boxed and leaked at submission and taken back by the reaper
/// from the completion (each entry here completes exactly once): no table to lock between the connection's
/// task and the reaper, which measured as contention on two cores.
pub struct Ring {
    // Dropped before `uring`: deregistered while the descriptor is still open.
    fd: AsyncFd<i32>,
    uring: IoUring,
    /// Held to fill and submit the submission queue (the connection's task, and the reaper retrying). The
    /// completion queue is the reaper's alone.
    submit: Mutex<()>,
    /// Entries submitted and not yet reaped.
    in_flight: AtomicUsize,
    /// Entries queued and not yet submitted (`defer`): [`Ring::submit_deferred`] sends them.
    deferred: AtomicUsize,
    /// The reaper is gone: nothing more is submitted.
    dead: AtomicBool,
    closed: AtomicBool,
    /// A submission failed: the reaper tries again.
    retry: AtomicBool,
    /// Wakes the reaper: the ring closed, or a submission is to be retried.
    wake: Notify,
    /// `IORING_OP_WRITE` is there (Linux 5.6, as `IORING_OP_READ`; a kernel could still filter it).
    can_write: bool,
}

// Entries the kernel has not finished when the reaper goes (see `Drain`) are never reaped: their `Pending` stays
// leaked, so the kernel never writes into freed buffers or uses a closed descriptor.

/// Takes `m`, whether or not a thread panicked holding it (what it guards stays consistent across a panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ring {
    /// A ring polled by the current runtime, with its reaper task; `None` where io_uring is unavailable
    /// (an old kernel, `kernel.io_uring_disabled`, a seccomp filter): reads then go to the blocking pool.
    pub fn start() -> Option<Arc<Ring>> {
        let uring = match IoUring::new(ENTRIES) {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("io_uring unavailable ({e}): direct reads go to the thread pool");
                return None;
            }
        };
        // IORING_OP_READ came in Linux 5.6; rings exist since 5.1.
        let mut probe = io_uring::Probe::new();
        if uring.submitter().register_probe(&mut probe).is_err() || !probe.is_supported(opcode::Read::CODE) {
            tracing::debug!("io_uring cannot read here: direct reads go to the thread pool");
            return None;
        }
        let raw = std::os::fd::AsRawFd::as_raw_fd(&uring);
        // SAFETY: `raw` is the ring's descriptor, open for as long as `uring` lives, which is longer than the
        // AsyncFd (declared first in `Ring`, so dropped first).
        let fd = unsafe { AsyncFd::register_with_interest(raw, Interest::READABLE) }.ok()?;
        let ring = Arc::new(Ring {
            fd,
            uring,
            submit: Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            deferred: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            retry: AtomicBool::new(false),
            wake: Notify::new(),
            can_write: probe.is_supported(opcode::Write::CODE),
        });
        tokio::spawn(reap(ring.clone()));
        Some(ring)
    }

    /// Stops the reaper once nothing is in flight (the connection has ended).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Submits a read of `len` bytes of `file` (descriptor `fd`) at `offset` into `buf[at..at + len]`. `done` gets
    /// the number of bytes read (fewer at the end of the file) or a negative errno, and the buffer, on the reaper's
    /// task. False when the ring cannot take the read (`done` is then dropped, never run).
    ///
    /// Each read is submitted at once (never deferred, unlike [`Ring::push_write`]): the disk is the bottleneck of
    /// reads, and a read waiting in the queue is one it is not doing. Gathering the reads of a burst of requests
    /// into one submission measured slower twice (0.95x qemu-nbd against 1.6x at 4 KiB QD32; later 44k against
    /// 62k reads a second), and deferring at most 2, 4 or 8 reads the way writes are gained nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn push_read(
        &self,
        file: SpliceFile,
        fd: i32,
        mut buf: AlignedBuf,
        at: usize,
        len: usize,
        offset: u64,
        done: Done,
    ) -> bool {
        let fits = at.checked_add(len).is_some_and(|e| e <= buf.len) && u32::try_from(len).is_ok();
        if !fits {
            return false;
        }
        // SAFETY: `at + len` is inside the buffer (checked above).
        let ptr = unsafe { buf.as_mut_slice().as_mut_ptr().add(at) };
        let sqe = opcode::Read::new(types::Fd(fd), ptr, len as u32).offset(offset).build();
        self.push(sqe, Pending { done, buf, _file: file }, false)
    }

    /// Submits a write of the first `len` bytes of `buf` to `file` (descriptor `fd`) at `offset`; `done` gets the
    /// number of bytes written or a negative errno, and the buffer, on the reaper's task. False when the ring
    /// cannot take the write, or cannot write at all ([`Ring::can_write`]); `done` is then dropped, never run.
    ///
    /// `defer`: more requests are waiting to be queued behind this one, so the write may wait in the submission
    /// queue for them (at most [`DEFER_MAX`] entries) and go to the kernel with them, in one system call, one
    /// block plug and one notification of the device. The caller then calls [`Ring::submit_deferred`] before
    /// it waits for anything. With 4 KiB writes at queue depth 32 the connection's task was the bottleneck
    /// (the client's requests queued in the socket) and this took it from about 42k to 60k writes a second.
    #[allow(clippy::too_many_arguments)]
    pub fn push_write(
        &self,
        file: SpliceFile,
        fd: i32,
        buf: AlignedBuf,
        len: usize,
        offset: u64,
        done: Done,
        defer: bool,
    ) -> bool {
        if !self.can_write || len > buf.len || u32::try_from(len).is_err() {
            return false;
        }
        let sqe = opcode::Write::new(types::Fd(fd), buf.as_slice().as_ptr(), len as u32).offset(offset).build();
        self.push(sqe, Pending { done, buf, _file: file }, defer)
    }

    /// Whether this kernel's io_uring has `IORING_OP_WRITE`.
    pub fn can_write(&self) -> bool {
        self.can_write
    }

    /// Queues `sqe` (its buffer and file are in `p`) and submits it with whatever is queued, unless `defer` and
    /// fewer than [`DEFER_MAX`] entries wait; false (and `p` dropped, its callback never run) if the ring cannot
    /// take it.
    fn push(&self, sqe: io_uring::squeue::Entry, p: Pending, defer: bool) -> bool {
        let raw = Box::into_raw(Box::new(p));
        let sqe = sqe.user_data(raw as u64);
        let _g = lock(&self.submit);
        if self.dead.load(Ordering::SeqCst) {
            // SAFETY: `raw` came from Box::into_raw above and the kernel never saw it.
            drop(unsafe { Box::from_raw(raw) });
            return false;
        }
        // SAFETY: the submission queue is only touched under `submit`. The entry's buffer and file live in the
        // leaked `Pending` until the reaper takes it back from the completion.
        let mut pushed = unsafe { self.uring.submission_shared().push(&sqe) }.is_ok();
        if !pushed {
            // The submission queue is full: submit what is there (deferred entries too) to make room.
            self.submit_or_retry();
            // SAFETY: as above.
            pushed = unsafe { self.uring.submission_shared().push(&sqe) }.is_ok();
        }
        if !pushed {
            // SAFETY: `raw` came from Box::into_raw above and the kernel never saw it.
            drop(unsafe { Box::from_raw(raw) });
            return false;
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        // (Counted under `submit`.)
        if defer && self.deferred.load(Ordering::Relaxed) + 1 < DEFER_MAX {
            self.deferred.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.submit_or_retry();
        true
    }

    /// Submits the entries left queued by `defer`, if any.
    pub fn submit_deferred(&self) {
        if self.deferred.load(Ordering::Relaxed) == 0 {
            return;
        }
        let _g = lock(&self.submit);
        self.submit_or_retry();
    }

    /// Submits everything queued (the caller holds `submit`). A failed or partial submission leaves entries
    /// queued, still counted as deferred: the reaper submits them again.
    fn submit_or_retry(&self) {
        if self.submit_queued() {
            self.deferred.store(0, Ordering::Relaxed);
        } else {
            self.retry.store(true, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// Submits what is queued (the caller holds `submit`); false if anything is left in the queue (the kernel
    /// refused the submission, or took only part of it).
    fn submit_queued(&self) -> bool {
        // SAFETY: the caller holds `submit`, the lock of the submission queue.
        self.uring.submit().is_ok() && unsafe { self.uring.submission_shared() }.is_empty()
    }

    /// Reads `len` bytes of `file` (descriptor `fd`) at `offset` into `buf[at..at + len]` at once; gives back the
    /// number of bytes read (fewer at the end of the file) and the buffer.
    pub async fn read(
        &self,
        file: SpliceFile,
        fd: i32,
        buf: AlignedBuf,
        at: usize,
        len: usize,
        offset: u64,
    ) -> io::Result<(usize, AlignedBuf)> {
        let (tx, rx) = oneshot::channel();
        let done: Done = Box::new(move |r, buf| {
            let _ = tx.send((r, buf));
        });
        if !self.push_read(file, fd, buf, at, len, offset, done) {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        match rx.await {
            Ok((r, buf)) if r >= 0 => Ok((r as usize, buf)),
            Ok((r, _)) => Err(io::Error::from_raw_os_error(-r)),
            // The reaper is gone (the runtime is shutting down).
            Err(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }
}

/// Hands completions back until the ring is closed and nothing is in flight.
async fn reap(ring: Arc<Ring>) {
    let _drain = Drain(ring.clone());
    let mut done: Vec<(Box<Pending>, i32)> = Vec::new();
    loop {
        if ring.closed.load(Ordering::SeqCst) && ring.in_flight.load(Ordering::SeqCst) == 0 {
            return;
        }
        let ready = tokio::select! {
            r = ring.fd.readable() => Some(r),
            _ = ring.wake.notified() => None,
        };
        match ready {
            // Cleared before draining: a completion posted after the drain makes the descriptor readable again.
            Some(Ok(mut r)) => r.clear_ready(),
            Some(Err(_)) => return,
            None => {}
        }
        if ring.retry.swap(false, Ordering::SeqCst) {
            let _g = lock(&ring.submit);
            if ring.submit_queued() {
                ring.deferred.store(0, Ordering::Relaxed);
            } else {
                // The kernel refused the submission for now (memory, a full completion queue): try again
                // shortly, after reaping what has completed.
                ring.retry.store(true, Ordering::SeqCst);
                let r = ring.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    r.wake.notify_one();
                });
            }
        }
        // Every completion taken from the queue is owned again (and no longer in flight) before any callback
        // runs: should one panic, the others' state is dropped as the task unwinds, releasing what their
        // callbacks hold (the connection, its budget), instead of staying leaked as bare `user_data`.
        // SAFETY: only this task reads the completion queue. Every entry's user_data is a `Pending` leaked by
        // `push`, and it completes once.
        done.extend(
            unsafe { ring.uring.completion_shared() }
                .map(|c| (unsafe { Box::from_raw(c.user_data() as *mut Pending) }, c.result())),
        );
        ring.in_flight.fetch_sub(done.len(), Ordering::SeqCst);
        for (p, r) in done.drain(..) {
            (p.done)(r, p.buf);
        }
    }
}

/// Ends a reaper that stops with entries in flight (the runtime shutting down, a failed poll of the ring): waits
/// for the kernel to finish them, a few seconds at most, and drops their state without answering, so that what
/// the callbacks hold (the connection and with it the image, whose drop stores its bitmaps; write pins) is
/// released. What the kernel has not finished by then stays leaked, never freed under it.
struct Drain(Arc<Ring>);

impl Drop for Drain {
    fn drop(&mut self) {
        let ring = &self.0;
        // No entry after this one: a connection task still running on another thread while the runtime
        // shuts down would leave its entry (and the connection it holds) leaked, never reaped.
        {
            let _g = lock(&ring.submit);
            ring.dead.store(true, Ordering::SeqCst);
        }
        for _ in 0..5000 {
            if ring.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            {
                let _g = lock(&ring.submit);
                let _ = ring.submit_queued();
            }
            // SAFETY: the reaper is gone (this runs as it is dropped): nothing else reads the completion queue.
            let done: Vec<u64> = unsafe { ring.uring.completion_shared() }.map(|c| c.user_data()).collect();
            for ud in &done {
                // SAFETY: as in `reap`: each user_data is a `Pending` leaked by `push`, completed once.
                drop(unsafe { Box::from_raw(*ud as *mut Pending) });
                ring.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            if done.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_small_ones_are_not() {
        let mut b = AlignedBuf::reused(1 << 20).unwrap();
        b.as_mut_slice().fill(7);
        let p = b.as_slice().as_ptr();
        b.recycle();
        // A smaller large read takes the same buffer back, sized to what it asked.
        let b = AlignedBuf::reused(512 << 10).unwrap();
        assert_eq!(b.as_slice().len(), 512 << 10);
        assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        // (No other test of this crate takes large buffers.)
        assert_eq!(b.as_slice().as_ptr(), p, "the spare buffer was reused");
        b.recycle();
        let small = AlignedBuf::reused(4096).unwrap();
        assert!(small.as_slice().iter().all(|&x| x == 0), "small buffers are always fresh and zeroed");
        small.recycle();
        assert!(lock(&SPARE).iter().all(|b| SPARE_SIZES.contains(&b.cap)));
    }

    /// Deferred writes wait in the submission queue until `submit_deferred` (or the `DEFER_MAX`th entry, or an
    /// entry that is not deferred) sends them, and then land where they were aimed.
    #[tokio::test]
    async fn deferred_writes_wait_for_their_submission() {
        use qcow2::{BlockDevice, Image, OpenOptions, Source};
        use std::sync::atomic::AtomicU32;
        use std::time::Duration;
        // O_DIRECT needs a disk file system (/tmp may be tmpfs).
        let d = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
        let path = d.path().join("d.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let opts = OpenOptions { format: Some(qcow2::Format::Raw), writable: true, direct: true, ..Default::default() };
        let dev = Image::open(path.to_str().unwrap(), &opts).unwrap();
        let Some(ring) = Ring::start().filter(|r| r.can_write()) else {
            eprintln!("no io_uring writes here: skipped");
            return;
        };
        let done = Arc::new(AtomicU32::new(0));
        // Completions that were not a whole 4 KiB write (asserted here, not in the reaper).
        let bad = Arc::new(AtomicU32::new(0));
        let push = |i: u64, defer: bool| {
            let mut plan = Vec::new();
            assert!(dev.plan_write_cached(i * 4096, 4096, &mut plan));
            let Some(qcow2::Piece { source: Source::File { file, offset }, .. }) = plan.pop() else {
                panic!("a file range expected")
            };
            let mut buf = AlignedBuf::zeroed(4096).unwrap();
            buf.as_mut_slice().fill(i as u8 + 1);
            let fd = file.direct_fd().unwrap();
            let (n, b) = (done.clone(), bad.clone());
            let cb: Done = Box::new(move |r, _| {
                if r != 4096 {
                    b.fetch_add(1, Ordering::SeqCst);
                }
                n.fetch_add(1, Ordering::SeqCst);
            });
            assert!(ring.push_write(file, fd, buf, 4096, offset, cb, defer));
        };
        // Waits (10 s at most, a busy disk may be slow) until `n` writes are done; then exactly `n` must be.
        let done_by = |n: u32| {
            let done = done.clone();
            async move {
                for _ in 0..1000 {
                    if done.load(Ordering::SeqCst) >= n {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert_eq!(done.load(Ordering::SeqCst), n);
            }
        };
        for i in 0..3 {
            push(i, true);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(done.load(Ordering::SeqCst), 0, "deferred writes went to the kernel on their own");
        ring.submit_deferred();
        done_by(3).await;
        // At most DEFER_MAX wait: the last of them submits them all.
        for i in 3..3 + DEFER_MAX as u64 {
            push(i, true);
        }
        done_by(3 + DEFER_MAX as u32).await;
        // An entry that is not deferred takes the deferred ones with it.
        push(40, true);
        push(41, false);
        done_by(5 + DEFER_MAX as u32).await;
        assert_eq!(bad.load(Ordering::SeqCst), 0, "a write did not complete whole");
        ring.close();
        let mut b = vec![0u8; 4096];
        for i in (0..3 + DEFER_MAX as u64).chain([40, 41]) {
            dev.read_at(&mut b, i * 4096).unwrap();
            assert!(b.iter().all(|&x| x == i as u8 + 1), "block {i}");
        }
    }

    /// A completion callback that panics ends the reaper, but the other completions of its batch are still
    /// released: what their callbacks hold (here an `Arc`, in the server the connection and its budget) is
    /// dropped, and nothing stays counted in flight.
    #[tokio::test]
    async fn a_panicking_callback_strands_no_other_completion() {
        use qcow2::{BlockDevice, Image, OpenOptions, Source};
        use std::time::Duration;
        let d = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
        let path = d.path().join("p.raw");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let opts = OpenOptions { format: Some(qcow2::Format::Raw), writable: true, direct: true, ..Default::default() };
        let dev = Image::open(path.to_str().unwrap(), &opts).unwrap();
        let Some(ring) = Ring::start() else {
            eprintln!("no io_uring here: skipped");
            return;
        };
        let held = Arc::new(());
        let callbacks: [Done; 2] = [Box::new(|_, _| panic!("a callback's panic (expected by this test)")), {
            let h = held.clone();
            Box::new(move |_, _| drop(h))
        }];
        for (i, cb) in callbacks.into_iter().enumerate() {
            let mut plan = Vec::new();
            assert!(dev.plan_write_cached(i as u64 * 4096, 4096, &mut plan));
            let Some(qcow2::Piece { source: Source::File { file, offset }, .. }) = plan.pop() else {
                panic!("a file range expected")
            };
            let fd = file.direct_fd().unwrap();
            assert!(ring.push_read(file, fd, AlignedBuf::zeroed(4096).unwrap(), 0, 4096, offset, cb));
        }
        // Both reads finish while this (single-threaded) runtime cannot run the reaper: it then finds both
        // completions in one batch, the panicking one first.
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..1000 {
            if Arc::strong_count(&held) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(Arc::strong_count(&held), 1, "the second completion's state was leaked");
        assert_eq!(ring.in_flight.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for len in [1usize, 512, 4096, 65536 + 512] {
            let b = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.as_slice().len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }
}
