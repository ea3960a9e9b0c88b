//! The block device trait the NBD server consumes, and the block status it reports.

use crate::error::Result;

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
    /// The status of the run starting at `offset`, at most `len` bytes (`offset` inside the device).
    fn block_status(&self, offset: u64, len: u64) -> Result<Status>;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// Writes `buf` at `offset`; with `fua`, durable before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;
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
}
