//! On-disk structures of qcow2, as pure codecs: no I/O happens in this module.

pub mod header;
pub mod offset;
pub mod probe;
pub mod refcount;
pub mod snapshot;
pub mod table;

/// Reads a big-endian u16 at `off`; the caller has checked the bounds.
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Reads a big-endian u32 at `off`; the caller has checked the bounds.
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Reads a big-endian u64 at `off`; the caller has checked the bounds.
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}
