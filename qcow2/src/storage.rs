//! Positioned I/O on the files behind an image: a small trait with a file implementation and an in-memory
//! one for tests and fuzzing.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

/// Positioned reads and writes on one file. Reads past the end of the storage return zeros, as qemu's
/// file driver does (qcow2.rst allows a format to read beyond the end of its file).
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the length (truncate or grow with zeros).
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Zeroes a range, deallocating it if `punch` and the storage can.
    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()>;
    /// Reserves space for a range (`fallocate`), keeping what it holds and growing the storage to cover it;
    /// storage that cannot reserve writes zeros past its end instead.
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let cur = self.len()?;
        let end = offset.saturating_add(len);
        if end > cur {
            self.write_zeroes(cur.max(offset), end - cur.max(offset), false)?;
        }
        Ok(())
    }
    /// Whether `[offset, offset+len)` starts with data (true) or a hole (false), and how long that run is.
    /// Storage without hole information reports data.
    fn extent(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let _ = offset;
        Ok((true, len))
    }
    /// Bytes allocated on the host (qemu-img's "actual-size"), if known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// The file descriptor behind the storage, for metadata commits (see `image::commit`).
    fn raw_fd(&self) -> Option<i32> {
        None
    }
    /// The alignment transfers need to be efficient (`O_DIRECT`: smaller ones are read, patched and written).
    fn alignment(&self) -> u64 {
        1
    }
    /// The `O_DIRECT` descriptor behind the storage, for reads aligned to [`Storage::alignment`] into aligned
    /// buffers (io_uring); `None` for any other storage.
    fn direct_fd(&self) -> Option<i32> {
        None
    }
    /// Permission to write aligned ranges of [`Storage::direct_fd`] from outside the storage (io_uring), held
    /// until the write completes; `None` when the storage has no such descriptor or cannot grant it now.
    fn pin_direct_write(&self) -> Option<WritePin> {
        None
    }
    /// Where byte `offset` of this storage lies in the file underneath (for `qemu-img map`'s host offsets).
    fn host_offset(&self, offset: u64) -> u64 {
        offset
    }
    /// Whether reads may wait on the network (a remote object).
    fn is_remote(&self) -> bool {
        false
    }
    /// Whether the storage cannot grow (a block device, a window): allocation starts after the last cluster
    /// in use instead of at the end.
    fn is_fixed_size(&self) -> bool {
        false
    }
}

/// How to open a file or block device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Open for writing.
    pub writable: bool,
    /// Bypass the host page cache (`O_DIRECT`; qemu's `cache.direct=on`, `--cache=none|directsync`).
    pub direct: bool,
    /// The name must be a block or character device (qemu's `host_device` driver).
    pub host_device: bool,
    /// Never sync (qemu's `cache.no-flush=on`, the `unsafe` cache mode `qemu-img convert` uses for its
    /// target by default): writes reach the page cache in order, and the kernel writes them back.
    pub no_flush: bool,
}

/// A file or block device opened for positioned I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    name: String,
    /// A block device: its size comes from the device, it cannot grow, and writes past its end fail with ENOSPC.
    block_device: bool,
    direct: Option<Direct>,
    no_flush: bool,
}

/// `O_DIRECT` state: transfers must be aligned in memory, offset and length. Unaligned requests go through an
/// aligned bounce buffer; a partial block is read, patched and written back under the write side of `rmw`,
/// while aligned writes take its read side, so no write is lost to a concurrent read-modify-write. Aligned
/// writes issued outside the storage (a server's io_uring) hold a [`WritePin`] instead, and a
/// read-modify-write waits for the pinned writes to complete before it reads.
#[derive(Debug)]
struct Direct {
    align: u64,
    rmw: RwLock<()>,
    pinned: std::sync::Arc<AtomicUsize>,
}

/// An aligned `O_DIRECT` write in flight outside the storage ([`Storage::pin_direct_write`]): until it is
/// dropped, no read-modify-write of a partial block of the file starts.
#[derive(Debug)]
pub struct WritePin(std::sync::Arc<AtomicUsize>);

impl Drop for WritePin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Direct {
    /// Takes the write side of `rmw` and waits for the pinned writes in flight (each completes or fails with
    /// its device: the wait is the disk's latency). New pins are refused while the lock is held.
    fn exclusive(&self) -> Result<std::sync::RwLockWriteGuard<'_, ()>> {
        let g = self.rmw.write().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        while self.pinned.load(Ordering::Acquire) != 0 {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        Ok(g)
    }
}

/// Alignment of bounce buffers (a page: enough for every device's memory alignment).
const BOUNCE_ALIGN: usize = 4096;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; BOUNCE_ALIGN]);

/// A page-aligned buffer of whole pages.
struct Bounce(Vec<Page>);

/// Bounce buffers kept by each I/O thread up to this size (larger ones are made for the request and dropped).
const BOUNCE_KEEP: usize = 4 << 20;

thread_local! {
    static BOUNCE: std::cell::RefCell<Bounce> = const { std::cell::RefCell::new(Bounce(Vec::new())) };
}

impl Bounce {
    fn new(len: usize) -> Bounce {
        Bounce(vec![Page([0; BOUNCE_ALIGN]); len.div_ceil(BOUNCE_ALIGN)])
    }

    /// Runs `f` with an aligned buffer of at least `len` bytes (contents unspecified), reusing this thread's.
    fn with<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if len > BOUNCE_KEEP {
            return f(&mut Bounce::new(len).bytes()[..len]);
        }
        BOUNCE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut b) => {
                if b.0.len() * BOUNCE_ALIGN < len {
                    *b = Bounce::new(len);
                }
                f(&mut b.bytes()[..len])
            }
            // Re-entered on this thread (not expected): a buffer of its own.
            Err(_) => f(&mut Bounce::new(len).bytes()[..len]),
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        let n = self.0.len() * BOUNCE_ALIGN;
        // SAFETY: `Page` is `repr(C)` around a byte array with no padding, so the vector's storage is `n`
        // initialised bytes, borrowed mutably for the lifetime of `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), n) }
    }
}

fn is_aligned(buf: &[u8], offset: u64, align: u64) -> bool {
    offset.is_multiple_of(align)
        && (buf.len() as u64).is_multiple_of(align)
        && (buf.as_ptr() as usize).is_multiple_of(BOUNCE_ALIGN)
}

impl FileStorage {
    /// Opens `path`, read-only or read-write.
    pub fn open(path: &str, writable: bool) -> Result<Self> {
        Self::open_with(path, &FileOptions { writable, ..Default::default() })
    }

    /// Opens `path` with `o`.
    pub fn open_with(path: &str, o: &FileOptions) -> Result<Self> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(o.writable);
        if o.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|e| {
            if o.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::io(format!("Could not open '{path}': the file system does not support O_DIRECT"), e)
            } else {
                Error::io(format!("Could not open '{path}'"), e)
            }
        })?;
        let ft = file.metadata().map_err(|e| Error::io(format!("stat of '{path}'"), e))?.file_type();
        if ft.is_dir() {
            return Err(Error::invalid(format!("'{path}' is a directory")));
        }
        if o.host_device && !(ft.is_block_device() || ft.is_char_device()) {
            return Err(Error::new(
                crate::ErrorKind::InvalidArgument,
                format!("'host_device' driver requires '{path}' to be either a character or block device"),
            ));
        }
        let mut s = FileStorage {
            file,
            name: path.to_string(),
            block_device: ft.is_block_device(),
            direct: None,
            no_flush: o.no_flush,
        };
        if o.direct {
            s.direct = Some(Direct { align: s.probe_alignment(), rmw: RwLock::new(()), pinned: Default::default() });
        }
        Ok(s)
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, name: &str) -> Self {
        use std::os::unix::fs::FileTypeExt;
        let block_device = file.metadata().map(|m| m.file_type().is_block_device()).unwrap_or(false);
        FileStorage { file, name: name.to_string(), block_device, direct: None, no_flush: false }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The smallest transfer `O_DIRECT` accepts here, as qemu's `raw_probe_alignment` finds it: if even a
    /// 1-byte read works the file system does not say (an empty file, a hole), so 4096, which is always safe;
    /// else 512 if an aligned 512-byte read works, else 4096.
    fn probe_alignment(&self) -> u64 {
        let mut b = Bounce::new(BOUNCE_ALIGN);
        if self.file.read_at(&mut b.bytes()[..1], 0).is_ok() {
            return 4096;
        }
        match self.file.read_at(&mut b.bytes()[..512], 0) {
            Ok(_) => 512,
            Err(_) => 4096,
        }
    }

    /// The I/O alignment the storage needs (1 unless opened with `O_DIRECT`).
    pub fn alignment(&self) -> u64 {
        self.direct.as_ref().map_or(1, |d| d.align)
    }

    fn seek(&self, offset: u64, whence: nix::unistd::Whence) -> std::result::Result<u64, nix::errno::Errno> {
        let off = libc::off_t::try_from(offset).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
        let r = nix::unistd::lseek(&self.file, off, whence)?;
        u64::try_from(r).map_err(|_| nix::errno::Errno::EOVERFLOW)
    }

    fn pread_all(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("read of '{}' at {offset}", self.name), e)),
            }
        }
        Ok(())
    }

    /// An aligned `O_DIRECT` read: a short read is the end of the file (the rest reads as zeros); reading on
    /// from the unaligned point would fail.
    fn pread_direct(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        loop {
            match self.file.read_at(buf, offset) {
                Ok(n) => {
                    // Short only at the end of the file; short before it (a network file system), the rest
                    // cannot be read aligned: an error, never zeros.
                    if n < buf.len() && offset.saturating_add(n as u64) < self.len()? {
                        return Err(Error::io(
                            format!("short O_DIRECT read of '{}' at {offset}", self.name),
                            std::io::Error::from_raw_os_error(libc::EIO),
                        ));
                    }
                    buf[n..].fill(0);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("read of '{}' at {offset}", self.name), e)),
            }
        }
    }

    fn pwrite_all(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            // A block device answers a write past its end with ENOSPC, or with a short write.
            let e = if self.block_device && e.kind() == std::io::ErrorKind::WriteZero {
                std::io::Error::from_raw_os_error(libc::ENOSPC)
            } else {
                e
            };
            let kind =
                if e.raw_os_error() == Some(libc::ENOSPC) { crate::ErrorKind::NoSpace } else { crate::ErrorKind::Io };
            let err = Error::io(format!("write of '{}' at {offset}", self.name), e);
            if kind == crate::ErrorKind::NoSpace {
                Error::new(kind, err.to_string())
            } else {
                err
            }
        })
    }

    /// `[offset, offset + len)` widened to the alignment.
    fn widen(align: u64, offset: u64, len: usize) -> Option<(u64, usize)> {
        let start = offset - offset % align;
        let end = offset.checked_add(len as u64)?.checked_next_multiple_of(align)?;
        Some((start, usize::try_from(end - start).ok()?))
    }

    fn direct_read(&self, d: &Direct, buf: &mut [u8], offset: u64) -> Result<()> {
        if is_aligned(buf, offset, d.align) {
            return self.pread_direct(buf, offset);
        }
        let (start, n) = Self::widen(d.align, offset, buf.len())
            .ok_or_else(|| Error::new(crate::ErrorKind::OutOfBounds, "read past 2^64"))?;
        Bounce::with(n, |b| {
            self.pread_direct(b, start)?;
            let skip = (offset - start) as usize;
            buf.copy_from_slice(&b[skip..skip + buf.len()]);
            Ok(())
        })
    }

    fn direct_write(&self, d: &Direct, buf: &[u8], offset: u64) -> Result<()> {
        let poisoned = || Error::new(crate::ErrorKind::Io, "poisoned lock");
        if offset.is_multiple_of(d.align) && (buf.len() as u64).is_multiple_of(d.align) {
            let _g = d.rmw.read().map_err(|_| poisoned())?;
            if (buf.as_ptr() as usize).is_multiple_of(BOUNCE_ALIGN) {
                return self.pwrite_all(buf, offset);
            }
            return Bounce::with(buf.len(), |b| {
                b.copy_from_slice(buf);
                self.pwrite_all(b, offset)
            });
        }
        // A long unaligned write: only its partial first and last blocks are read, patched and written back
        // (each under the exclusive lock, briefly); the aligned middle goes out as an aligned write.
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::new(crate::ErrorKind::OutOfBounds, "write past 2^64"))?;
        let (a0, a1) = (offset.next_multiple_of(d.align), end - end % d.align);
        if a1 > a0 && (offset != a0 || end != a1) {
            let (head, rest) = buf.split_at((a0 - offset) as usize);
            let (middle, tail) = rest.split_at((a1 - a0) as usize);
            if !head.is_empty() {
                self.direct_write(d, head, offset)?;
            }
            self.direct_write(d, middle, a0)?;
            if !tail.is_empty() {
                self.direct_write(d, tail, a1)?;
            }
            return Ok(());
        }
        let (start, n) = Self::widen(d.align, offset, buf.len())
            .ok_or_else(|| Error::new(crate::ErrorKind::OutOfBounds, "write past 2^64"))?;
        let _g = d.exclusive()?;
        let old_len = self.len()?;
        Bounce::with(n, |b| {
            self.pread_direct(b, start)?;
            let skip = (offset - start) as usize;
            b[skip..skip + buf.len()].copy_from_slice(buf);
            self.pwrite_all(b, start)
        })?;
        // The widened write may have grown a regular file past what was asked: trim it back.
        let want = old_len.max(offset + buf.len() as u64);
        if !self.block_device && start + n as u64 > want {
            self.file.set_len(want).map_err(|e| Error::io(format!("truncate of '{}'", self.name), e))?;
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.direct {
            Some(d) => self.direct_read(d, buf, offset),
            None => self.pread_all(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match &self.direct {
            Some(d) => self.direct_write(d, buf, offset),
            None => self.pwrite_all(buf, offset),
        }
    }

    fn len(&self) -> Result<u64> {
        if self.block_device {
            // A block device's inode says 0 bytes: the device knows its size (as BLKGETSIZE64 does).
            use std::io::Seek;
            return (&self.file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(|e| Error::io(format!("size of '{}'", self.name), e));
        }
        self.file.metadata().map(|m| m.len()).map_err(|e| Error::io(format!("stat of '{}'", self.name), e))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if self.block_device {
            // A device cannot grow or shrink; anything inside it is already there.
            return if len <= self.len()? {
                Ok(())
            } else {
                Err(Error::new(
                    crate::ErrorKind::NoSpace,
                    format!("'{}' is a block device of {} bytes: it cannot grow to {len}", self.name, self.len()?),
                ))
            };
        }
        self.file.set_len(len).map_err(|e| Error::io(format!("truncate of '{}'", self.name), e))
    }

    fn flush(&self) -> Result<()> {
        if self.no_flush {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| Error::io(format!("flush of '{}'", self.name), e))
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let (o, l) = (libc::off_t::try_from(offset), libc::off_t::try_from(len));
        let (Ok(o), Ok(l)) = (o, l) else {
            return Err(Error::new(crate::ErrorKind::InvalidArgument, "range too large to reserve"));
        };
        match fallocate(&self.file, FallocateFlags::empty(), o, l) {
            Ok(()) => Ok(()),
            // File systems without fallocate: zeros past the end, as the default does.
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let cur = self.len()?;
                let end = offset.saturating_add(len);
                if end > cur {
                    self.write_zeroes(cur.max(offset), end - cur.max(offset), false)?;
                }
                Ok(())
            }
            Err(e) => Err(Error::io(format!("preallocation of '{}'", self.name), std::io::Error::from(e))),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        let end = offset.saturating_add(len);
        let file_len = self.len()?;
        if punch && end <= file_len {
            use nix::fcntl::{fallocate, FallocateFlags};
            let (o, l) = (libc::off_t::try_from(offset), libc::off_t::try_from(len));
            // With O_DIRECT a read-modify-write of a partial block must not run across the punch.
            let _rmw = match &self.direct {
                Some(d) => Some(d.exclusive()?),
                None => None,
            };
            if let (Ok(o), Ok(l)) = (o, l) {
                let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                if fallocate(&self.file, flags, o, l).is_ok() {
                    return Ok(());
                }
            }
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn extent(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let end = offset.saturating_add(len);
        // SEEK_DATA: where the next data starts; if it is past us, we are in a hole.
        match self.seek(offset, nix::unistd::Whence::SeekData) {
            Ok(d) if d > offset => Ok((false, (d - offset).min(len))),
            Ok(_) => {
                let h = self.seek(offset, nix::unistd::Whence::SeekHole).unwrap_or(end);
                Ok((true, h.clamp(offset + 1, end) - offset))
            }
            // ENXIO: no data past offset (a hole to the end), or SEEK_DATA unsupported: report data.
            Err(e) => {
                let at_eof = self.len().map(|l| offset >= l).unwrap_or(false);
                if e == nix::errno::Errno::ENXIO || at_eof {
                    Ok((false, len))
                } else {
                    Ok((true, len))
                }
            }
        }
    }

    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn raw_fd(&self) -> Option<i32> {
        // With O_DIRECT every transfer must be aligned: no `sendfile` and no commit helper writing from its own
        // buffers; everything goes through `read_at`/`write_at` and their bounce buffers.
        if self.direct.is_some() {
            return None;
        }
        Some(self.file.as_raw_fd())
    }

    fn alignment(&self) -> u64 {
        FileStorage::alignment(self)
    }

    fn direct_fd(&self) -> Option<i32> {
        self.direct.as_ref().map(|_| self.file.as_raw_fd())
    }

    fn pin_direct_write(&self) -> Option<WritePin> {
        let d = self.direct.as_ref()?;
        // Never waits (callers are event loops): a read-modify-write under way means "write it the ordinary way".
        let _g = d.rmw.try_read().ok()?;
        d.pinned.fetch_add(1, Ordering::AcqRel);
        Some(WritePin(d.pinned.clone()))
    }

    fn is_fixed_size(&self) -> bool {
        self.block_device
    }
}

/// An in-memory storage, for tests and fuzzing. Its size is capped so that hostile images cannot make it grow
/// without bound. It can also play a power cut: [`MemStorage::crash_after`] makes it stop persisting after a
/// number of writes and flushes; [`MemStorage::durable`] is then what a disk would hold (everything up to the
/// last flush that completed before the cut).
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    cap: u64,
    durable: RwLock<Vec<u8>>,
    /// Writes and flushes left before the power cut; negative: never.
    ops_left: std::sync::atomic::AtomicI64,
}

impl MemStorage {
    /// A storage holding `data` that may grow up to `cap` bytes.
    pub fn new(data: Vec<u8>, cap: u64) -> Self {
        MemStorage {
            durable: RwLock::new(data.clone()),
            data: RwLock::new(data),
            cap,
            ops_left: std::sync::atomic::AtomicI64::new(-1),
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Cuts the power after `n` more writes or flushes: from then on nothing becomes durable.
    pub fn crash_after(&self, n: u64) {
        self.ops_left.store(n as i64, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the power cut has happened.
    pub fn crashed(&self) -> bool {
        self.ops_left.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// What survived: the contents as of the last flush before the power cut.
    pub fn durable(&self) -> Vec<u8> {
        self.durable.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Counts one operation; false once the power is off.
    fn tick(&self) -> bool {
        use std::sync::atomic::Ordering;
        let v = self.ops_left.load(Ordering::SeqCst);
        if v < 0 {
            return true;
        }
        if v == 0 {
            return false;
        }
        self.ops_left.store(v - 1, Ordering::SeqCst);
        true
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self.data.read().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        buf.fill(0);
        if let Ok(start) = usize::try_from(offset) {
            if start < d.len() {
                let n = buf.len().min(d.len() - start);
                buf[..n].copy_from_slice(&d[start..start + n]);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.tick();
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.cap).ok_or_else(|| {
            Error::new(crate::ErrorKind::NoSpace, format!("write at {offset} beyond the in-memory cap"))
        })?;
        let mut d = self.data.write().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().map(|d| d.len() as u64).unwrap_or(0))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if len > self.cap {
            return Err(Error::new(crate::ErrorKind::NoSpace, "resize beyond the in-memory cap"));
        }
        let mut d = self.data.write().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        d.resize(len as usize, 0);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.tick() {
            let d = self.data.read().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?.clone();
            if let Ok(mut g) = self.durable.write() {
                *g = d;
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _punch: bool) -> Result<()> {
        self.tick();
        let l = self.len()?;
        let end = offset.saturating_add(len).min(l.max(offset.saturating_add(len)));
        if end > self.cap {
            return Err(Error::new(crate::ErrorKind::NoSpace, "zeroes beyond the in-memory cap"));
        }
        let mut d = self.data.write().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].fill(0);
        Ok(())
    }
}

/// A window of another storage: qemu's raw `offset` and `size` options. Nothing outside the window is read or
/// written; the window cannot grow.
pub struct SliceStorage {
    inner: std::sync::Arc<dyn Storage>,
    offset: u64,
    size: u64,
}

impl SliceStorage {
    /// The window `[offset, offset + size)` of `inner` (`size` defaults to the rest of it), checked against its
    /// length as qemu's raw driver does.
    pub fn new(inner: std::sync::Arc<dyn Storage>, offset: Option<u64>, size: Option<u64>) -> Result<Self> {
        let len = inner.len()?;
        let offset = offset.unwrap_or(0);
        let size = match size {
            Some(s) => s,
            None => len.checked_sub(offset).ok_or_else(|| {
                Error::new(
                    crate::ErrorKind::InvalidArgument,
                    format!("Offset ({offset}) cannot be greater than size ({len})"),
                )
            })?,
        };
        if offset.checked_add(size).is_none_or(|e| e > len) {
            return Err(Error::new(
                crate::ErrorKind::InvalidArgument,
                format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of \
                     the containing file ({len})"
                ),
            ));
        }
        Ok(SliceStorage { inner, offset, size })
    }

    /// The part of `[off, off + len)` inside the window, as an offset in `inner` and a length.
    fn clip(&self, off: u64, len: u64) -> (u64, u64) {
        let n = if off >= self.size { 0 } else { len.min(self.size - off) };
        (self.offset + off.min(self.size), n)
    }
}

impl Storage for SliceStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let (at, n) = self.clip(offset, buf.len() as u64);
        buf[n as usize..].fill(0);
        self.inner.read_at(&mut buf[..n as usize], at)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let (at, n) = self.clip(offset, buf.len() as u64);
        if n != buf.len() as u64 {
            return Err(Error::new(
                crate::ErrorKind::NoSpace,
                format!("write at {offset} past the end of the raw window"),
            ));
        }
        self.inner.write_at(buf, at)
    }

    fn len(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if len == self.size {
            return Ok(());
        }
        Err(Error::unsupported("a raw image with an offset or size option cannot be resized"))
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        let (at, n) = self.clip(offset, len);
        if n != len {
            return Err(Error::new(
                crate::ErrorKind::NoSpace,
                format!("zeroes at {offset} past the end of the raw window"),
            ));
        }
        self.inner.write_zeroes(at, n, punch)
    }

    fn extent(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let (at, n) = self.clip(offset, len);
        if n == 0 {
            return Ok((false, len));
        }
        self.inner.extent(at, n)
    }

    fn alignment(&self) -> u64 {
        self.inner.alignment()
    }

    fn host_offset(&self, offset: u64) -> u64 {
        self.inner.host_offset(self.offset.saturating_add(offset))
    }

    fn is_fixed_size(&self) -> bool {
        true
    }
}
