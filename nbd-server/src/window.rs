//! qemu-nbd's `-o/--offset`: export the image from an offset on.

use qcow2::{BlockDevice, Result, Status};
use std::sync::Arc;

/// The part of a device from `offset` to its end.
pub struct Window {
    inner: Arc<dyn BlockDevice>,
    offset: u64,
}

impl Window {
    /// A window of `inner` starting at `offset`; `None` if the offset lies past the end.
    pub fn new(inner: Arc<dyn BlockDevice>, offset: u64) -> Option<Window> {
        (offset <= inner.size()).then_some(Window { inner, offset })
    }
}

impl BlockDevice for Window {
    fn size(&self) -> u64 {
        self.inner.size() - self.offset
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset + self.offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        let mut st = self.inner.block_status(offset + self.offset, len)?;
        st.len = st.len.min(self.size() - offset);
        Ok(st)
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.inner.write_at(buf, offset + self.offset, fua)
    }
    fn write_quick(&self, buf: &[u8], offset: u64) -> Option<Result<()>> {
        self.inner.write_quick(buf, offset + self.offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        self.inner.write_zeroes(offset + self.offset, len, may_unmap, fua)
    }
    fn can_fast_zero(&self) -> bool {
        self.inner.can_fast_zero()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset + self.offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn min_block_size(&self) -> u32 {
        self.inner.min_block_size()
    }
    fn direct_io(&self) -> bool {
        self.inner.direct_io()
    }
    fn slow_io(&self) -> bool {
        self.inner.slow_io()
    }
    fn dirty_run(&self, bitmap: &str, offset: u64, len: u64) -> Result<Option<(bool, u64)>> {
        self.inner.dirty_run(bitmap, offset + self.offset, len)
    }
}
