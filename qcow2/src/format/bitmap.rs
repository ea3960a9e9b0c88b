//! The bitmap directory (qcow2.rst, "Bitmap directory"): one entry per persistent dirty bitmap. Pure code.

use crate::error::{Error, Result};
use crate::format::{be16, be32, be64};

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags (bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible).
    pub flags: u32,
    /// Type (1: dirty tracking bitmap).
    pub kind: u8,
    /// log2 of the bytes each bit covers.
    pub granularity_bits: u8,
    /// The bitmap's name.
    pub name: String,
}

/// Fixed part of a directory entry.
const ENTRY_HEAD: usize = 24;

/// Parses `count` entries from the directory bytes `buf`.
pub fn parse_directory(buf: &[u8], count: u32) -> Result<Vec<BitmapEntry>> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut off = 0usize;
    for i in 0..count {
        let past = || Error::invalid(format!("bitmap directory entry {i} runs past the directory"));
        let head = off.checked_add(ENTRY_HEAD).and_then(|e| buf.get(off..e)).ok_or_else(past)?;
        let name_len = usize::from(be16(head, 18));
        let extra = be32(head, 20) as usize;
        let name_at = ENTRY_HEAD.checked_add(extra).ok_or_else(past)?;
        let total = name_at.checked_add(name_len).ok_or_else(past)?;
        let entry = off.checked_add(total).and_then(|e| buf.get(off..e)).ok_or_else(past)?;
        let name = String::from_utf8_lossy(entry.get(name_at..total).ok_or_else(past)?).into_owned();
        out.push(BitmapEntry {
            table_offset: be64(head, 0),
            table_size: be32(head, 8),
            flags: be32(head, 12),
            kind: head[16],
            granularity_bits: head[17],
            name,
        });
        // Entries are padded to 8 bytes.
        off = total.div_ceil(8).checked_mul(8).and_then(|n| off.checked_add(n)).ok_or_else(past)?;
    }
    Ok(out)
}

/// Bytes of a directory entry for a name of `name_len` bytes (qemu's `calc_dir_entry_size`).
pub fn entry_size(name_len: usize) -> u64 {
    (ENTRY_HEAD.saturating_add(name_len) as u64).div_ceil(8).saturating_mul(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_padding() {
        let mut b = vec![0u8; 64];
        b[0..8].copy_from_slice(&0x30000u64.to_be_bytes());
        b[8..12].copy_from_slice(&1u32.to_be_bytes());
        b[16] = 1;
        b[17] = 16;
        b[18..20].copy_from_slice(&3u16.to_be_bytes());
        b[24..27].copy_from_slice(b"abc");
        b[32 + 16] = 1;
        b[32 + 17] = 20;
        b[32 + 18..32 + 20].copy_from_slice(&1u16.to_be_bytes());
        b[32 + 24] = b'z';
        let e = parse_directory(&b, 2).unwrap();
        assert_eq!((e[0].name.as_str(), e[0].granularity_bits, e[0].table_offset), ("abc", 16, 0x30000));
        assert_eq!((e[1].name.as_str(), e[1].granularity_bits), ("z", 20));
        assert!(parse_directory(&b, 3).is_err());
        assert_eq!(entry_size(3), 32);
    }
}
