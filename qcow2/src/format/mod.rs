//! On-disk structures of qcow2, as pure codecs: no I/O happens in this module.
//!
//! Every value here comes from an image: arithmetic is checked or saturating, never implicit (the lint below
//! makes `+`, `-`, `*`, `<<` ... on integers a build error in these modules).
#![deny(clippy::arithmetic_side_effects)]

pub mod bitmap;
pub mod header;
pub mod offset;
pub mod probe;
pub mod refcount;
pub mod snapshot;
pub mod table;

/// Reads a big-endian u16 at `off`; the caller has checked the bounds.
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    b.get(off..off.saturating_add(2)).and_then(|s| s.try_into().ok()).map_or(0, u16::from_be_bytes)
}

/// Reads a big-endian u32 at `off`; the caller has checked the bounds.
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off.saturating_add(4)).and_then(|s| s.try_into().ok()).map_or(0, u32::from_be_bytes)
}

/// Reads a big-endian u64 at `off`; the caller has checked the bounds.
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    b.get(off..off.saturating_add(8)).and_then(|s| s.try_into().ok()).map_or(0, u64::from_be_bytes)
}
