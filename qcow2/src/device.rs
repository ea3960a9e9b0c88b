//! The block device trait the NBD server consumes, and the block status it reports.

use crate::error::Result;
use crate::storage::Storage;
use std::sync::Arc;

/// A file that a planned read's bytes come from, as much of it as a server needs: a descriptor to
/// `sendfile` from, and a positioned read for what `sendfile` cannot send. Nothing else of the image (its
/// metadata, its writers) is reachable through it.
///
/// The bytes stay valid while the server sends them: a cluster is never handed to a new owner while the
/// image is open (`image/alloc.rs`, "No reuse while open"), so at worst a concurrent write to the same
/// guest range shows through, as it would for a read done a moment later.
#[derive(Clone)]
pub struct SpliceFile(Arc<dyn Storage>);

impl SpliceFile {
    pub(crate) fn new(storage: &Arc<dyn Storage>) -> SpliceFile {
        SpliceFile(storage.clone())
    }

    /// The descriptor to `sendfile` from, if the file has one (not for `O_DIRECT` files).
    pub fn fd(&self) -> Option<i32> {
        self.0.raw_fd()
    }

    /// The `O_DIRECT` descriptor, for aligned reads into aligned buffers (see [`SpliceFile::alignment`]).
    pub fn direct_fd(&self) -> Option<i32> {
        self.0.direct_fd()
    }

    /// Permission to write an aligned range of [`SpliceFile::direct_fd`], held until the write completes
    /// (`None`: write through the device instead).
    pub fn pin_direct_write(&self) -> Option<crate::storage::WritePin> {
        self.0.pin_direct_write()
    }

    /// Reads `buf.len()` bytes at `offset` of the file (zeros past its end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }

    /// The alignment the file's transfers need (`O_DIRECT`: 512 or 4096; 1 otherwise).
    pub fn alignment(&self) -> u64 {
        self.0.alignment()
    }

    /// Whether two pieces come from the same file.
    pub fn same_file(&self, other: &SpliceFile) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Where one piece of a planned read comes from (see [`BlockDevice::plan_read`]).
#[derive(Clone)]
pub enum Source {
    /// Bytes of a file from `offset` on, readable as they are (bytes past the file's end read as zeros).
    File {
        /// The file.
        file: SpliceFile,
        /// Offset of the piece's first byte in the file.
        offset: u64,
    },
    /// Zeros.
    Zero,
    /// Bytes that only [`BlockDevice::read_at`] can produce (compressed data, memory storage): read them from
    /// the device at `offset`.
    Read {
        /// Device offset of the piece's first byte.
        offset: u64,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { offset, .. } => write!(f, "File@{offset}"),
            Source::Zero => f.write_str("Zero"),
            Source::Read { offset } => write!(f, "Read@{offset}"),
        }
    }
}

/// A run of a planned read.
#[derive(Clone, Debug)]
pub struct Piece {
    /// Length in bytes (> 0).
    pub len: u64,
    /// Where the bytes come from.
    pub source: Source,
}

/// Appends `len` bytes from `source` to a plan, merging with the last piece where they continue it.
pub fn push_piece(out: &mut Vec<Piece>, len: u64, source: Source) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let merged = match (&last.source, &source) {
            (Source::Zero, Source::Zero) => true,
            (Source::File { file: a, offset: x }, Source::File { file: b, offset: y }) => {
                a.same_file(b) && x.checked_add(last.len) == Some(*y)
            }
            (Source::Read { offset: x }, Source::Read { offset: y }) => x.checked_add(last.len) == Some(*y),
            _ => false,
        };
        if merged {
            last.len += len;
            return;
        }
    }
    out.push(Piece { len, source });
}

/// The status of a run of guest bytes, with qemu's meaning of each flag (qemu's `BDRV_BLOCK_*` as
/// `qemu-img map` prints them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Length of the run in bytes (> 0).
    pub len: u64,
    /// The layer of the chain that answered (0 = the top image).
    pub depth: u32,
    /// Allocated in that layer (data or zeros there).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Data is stored (not a hole).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in `file`, when it has one.
    pub offset: Option<u64>,
    /// The file that holds `offset`.
    pub file: Option<std::sync::Arc<str>>,
    /// qemu's allocation depth (`qemu:allocation-depth`): 0 when no layer has the range, else the 1-based
    /// layer that answers. Past the end of a short backing file, that backing layer answers (qemu
    /// synthesizes its zeros there).
    pub alloc_depth: u32,
}

/// A virtual disk: what an NBD export serves.
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`; the range must lie inside the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Plans a read of `len` bytes at `offset` (inside the device) without reading any data: appends to `out`
    /// the pieces that make up the range, in order, so that a server can send file bytes straight from the
    /// page cache (`sendfile`). The plan is what [`BlockDevice::read_at`] would read at this moment.
    fn plan_read(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<()> {
        push_piece(out, len, Source::Read { offset });
        Ok(())
    }
    /// Whether the range holds a hole that the image metadata shows (a qcow2 zero or unallocated cluster over
    /// no backing data), as cheaply as a read maps the range: the L2 tables a read would load, but no look
    /// for a raw file's own holes (no `lseek`). `None`: not known this way. The default knows nothing.
    fn metadata_hole(&self, offset: u64, len: u64) -> Option<bool> {
        let _ = (offset, len);
        None
    }
    /// [`BlockDevice::plan_read`] without reading any metadata from disk: `Ok(false)` (and `out` unspecified)
    /// when the plan would need a table that is not cached. The default never plans.
    fn plan_read_cached(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<bool> {
        let _ = (offset, len, out);
        Ok(false)
    }
    /// The status of the run starting at `offset`, at most `len` bytes (`offset` inside the device).
    fn block_status(&self, offset: u64, len: u64) -> Result<Status>;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// Writes `buf` at `offset`; with `fua`, durable before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;
    /// Writes `buf` at `offset` only if that changes no metadata: no lock, no allocation, no sync, so a
    /// server may run it on an event-loop thread. `None`: nothing was written; call
    /// [`BlockDevice::write_at`] (off the event loop).
    fn write_quick(&self, buf: &[u8], offset: u64) -> Option<Result<()>> {
        let _ = (buf, offset);
        None
    }
    /// Plans a write of `len` bytes at `offset` that changes no metadata, for a server that writes the data
    /// itself (io_uring with `O_DIRECT`): appends the file ranges the bytes go to, in order, and returns true;
    /// nothing is read from disk. Each range's [`SpliceFile::pin_direct_write`] is to be held until its write
    /// completes. `false` (and `out` unspecified): call [`BlockDevice::write_at`]. The default never plans.
    fn plan_write_cached(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> bool {
        let _ = (offset, len, out);
        false
    }
    /// Makes the range read as zeros; may deallocate it if `may_unmap`.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()>;
    /// Whether [`BlockDevice::write_zeroes`] is cheap (no data written) for this device.
    fn can_fast_zero(&self) -> bool {
        false
    }
    /// Hints that the range is no longer needed (contents afterwards unspecified, but stable).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// The smallest request size the device handles without a read-modify-write or a check of the whole
    /// sector (NBD's minimum block size): 1 normally, 512 for a probed raw image (qemu restricts its first
    /// sector), the `O_DIRECT` alignment with `cache.direct`.
    fn min_block_size(&self) -> u32 {
        1
    }
    /// Whether I/O bypasses the host page cache (`O_DIRECT`): every transfer waits for the disk.
    fn direct_io(&self) -> bool {
        false
    }
    /// Whether a transfer may wait on something slower than the page cache (`O_DIRECT`, a remote object): a
    /// server then runs every request on its blocking pool, never inline on its event loop.
    fn slow_io(&self) -> bool {
        self.direct_io()
    }
    /// Persistent dirty bitmap `bitmap` at `offset`: whether that granule is dirty and for how many bytes
    /// (at most `len`) the answer holds. `None` when the device has no such bitmap.
    fn dirty_run(&self, bitmap: &str, offset: u64, len: u64) -> Result<Option<(bool, u64)>> {
        let _ = (bitmap, offset, len);
        Ok(None)
    }
}
