//! Persistent dirty bitmaps on disk (qcow2.rst, "Bitmaps"): the bitmap directory (one entry per bitmap), the
//! bitmap tables and the layout of bitmap data. Pure code.

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
    /// Type-specific extra data, kept verbatim.
    pub extra: Vec<u8>,
}

/// Flag bit 0: the bitmap was not saved correctly and may be inconsistent.
pub const FLAG_IN_USE: u32 = 1;
/// Flag bit 1: the bitmap is enabled and must reflect every change of the disk.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bit 2: unknown extra data does not stop the bitmap from being used.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Type 1: dirty tracking bitmap.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Mask of bits 9-55 of a bitmap table entry: the host offset of a data cluster.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Largest granularity qemu supports (`granularity_bits` 9 to 31).
pub const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Longest name qemu supports.
pub const MAX_NAME_BYTES: usize = 1023;
/// Most bitmap data qemu stores for one bitmap (`BME_MAX_PHYS_SIZE`, 512 MiB).
pub const MAX_DATA_BYTES: u64 = 0x2000_0000;
/// Most bitmap table entries qemu accepts (`BME_MAX_TABLE_SIZE`).
pub const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Most bitmaps in one image (qemu's `QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;

impl BitmapEntry {
    /// Bytes of this entry in the directory (with padding).
    pub fn encoded_len(&self) -> u64 {
        entry_size(self.name.len().saturating_add(self.extra.len()))
    }

    /// The bitmap's granularity in bytes, if `granularity_bits` is one qemu supports.
    pub fn granularity(&self) -> Option<u64> {
        GRANULARITY_BITS.contains(&self.granularity_bits).then(|| 1u64 << self.granularity_bits)
    }

    /// Checks the entry against the disk it describes (qcow2.rst "Bitmap directory"): a dirty tracking bitmap
    /// with a supported granularity, a name, known flags, extra data only when declared compatible, and a
    /// cluster-aligned table of exactly the entries `disk_size` needs.
    pub fn validate(&self, disk_size: u64, cluster_bits: u32) -> Result<()> {
        let bad = |what: String| Err(Error::corrupt(format!("bitmap '{}': {what}", self.name)));
        if self.kind != TYPE_DIRTY_TRACKING {
            return bad(format!("unknown type {}", self.kind));
        }
        let Some(g) = self.granularity() else {
            return bad(format!("unsupported granularity_bits {}", self.granularity_bits));
        };
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return bad("name length out of range".into());
        }
        if self.flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
            return bad(format!("reserved flags {:#x}", self.flags));
        }
        if !self.extra.is_empty() && self.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return bad("unknown extra data".into());
        }
        let cs = 1u64 << cluster_bits;
        if self.table_offset == 0 || !self.table_offset.is_multiple_of(cs) {
            return bad(format!("table offset {:#x} is not a cluster boundary", self.table_offset));
        }
        if data_bytes(disk_size, g).is_none_or(|b| b > MAX_DATA_BYTES) {
            return bad("too large for its granularity (more than 512 MiB of bitmap data)".into());
        }
        match table_entries(disk_size, g, cs) {
            Some(n) if n == u64::from(self.table_size) && n <= MAX_TABLE_ENTRIES => Ok(()),
            _ => bad(format!("table size {} does not fit the disk size {disk_size}", self.table_size)),
        }
    }
}

/// Bytes of bitmap data for a disk of `disk_size` bytes at `granularity` bytes per bit.
pub fn data_bytes(disk_size: u64, granularity: u64) -> Option<u64> {
    Some(disk_size.div_ceil(granularity.max(1)).div_ceil(8))
}

/// Entries of the bitmap table (clusters of bitmap data) for a disk of `disk_size` bytes.
pub fn table_entries(disk_size: u64, granularity: u64, cluster_size: u64) -> Option<u64> {
    Some(data_bytes(disk_size, granularity)?.div_ceil(cluster_size.max(1)))
}

/// One bitmap table entry (qcow2.rst "Bitmap table").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// No cluster: the data reads as all zeros.
    Zeros,
    /// No cluster: the data reads as all ones.
    Ones,
    /// The data cluster at this host offset.
    Data(u64),
}

impl TableEntry {
    /// Decodes an entry; reserved bits set or a misaligned offset are refused.
    pub fn decode(v: u64, cluster_bits: u32) -> Result<TableEntry> {
        let off = v & TABLE_OFFSET_MASK;
        let reserved = v & !(TABLE_OFFSET_MASK | 1);
        if reserved != 0 || (off != 0 && v & 1 != 0) {
            return Err(Error::corrupt(format!("bitmap table entry {v:#x} has reserved bits set")));
        }
        if off == 0 {
            return Ok(if v & 1 != 0 { TableEntry::Ones } else { TableEntry::Zeros });
        }
        let cs = 1u64.checked_shl(cluster_bits).unwrap_or(0);
        if cs == 0 || !off.is_multiple_of(cs) {
            return Err(Error::corrupt(format!("bitmap data cluster {off:#x} is not aligned to a cluster")));
        }
        Ok(TableEntry::Data(off))
    }

    /// The on-disk value.
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => 1,
            TableEntry::Data(off) => off & TABLE_OFFSET_MASK,
        }
    }
}

/// Encodes a directory: each entry padded to 8 bytes (the inverse of [`parse_directory`]).
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.kind);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        out.extend_from_slice(&(e.extra.len().min(u32::MAX as usize) as u32).to_be_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(start.saturating_add(e.encoded_len() as usize), 0);
    }
    out
}

/// Offsets of each entry inside the directory.
pub fn entry_offsets(entries: &[BitmapEntry]) -> Vec<u64> {
    let mut at = 0u64;
    entries
        .iter()
        .map(|e| {
            let o = at;
            at = at.saturating_add(e.encoded_len());
            o
        })
        .collect()
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
        // A name that is not UTF-8 is refused rather than changed: the entry's size on disk must stay its own.
        let name = String::from_utf8(entry.get(name_at..total).ok_or_else(past)?.to_vec())
            .map_err(|_| Error::invalid(format!("bitmap directory entry {i}: the name is not UTF-8")))?;
        let extra = entry.get(ENTRY_HEAD..name_at).ok_or_else(past)?.to_vec();
        out.push(BitmapEntry {
            table_offset: be64(head, 0),
            table_size: be32(head, 8),
            flags: be32(head, 12),
            kind: head[16],
            granularity_bits: head[17],
            name,
            extra,
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
        // Encoding gives the same bytes back, and the entries' places in them.
        assert_eq!(encode_directory(&e), b);
        assert_eq!(entry_offsets(&e), vec![0, 32]);
    }

    #[test]
    fn table_entries_and_sizes() {
        assert_eq!(TableEntry::decode(0, 16).unwrap(), TableEntry::Zeros);
        assert_eq!(TableEntry::decode(1, 16).unwrap(), TableEntry::Ones);
        assert_eq!(TableEntry::decode(0x30000, 16).unwrap(), TableEntry::Data(0x30000));
        assert!(TableEntry::decode(0x30001, 16).is_err(), "an offset with the all-ones bit");
        assert!(TableEntry::decode(0x30200, 16).is_err(), "misaligned");
        assert!(TableEntry::decode(1 << 60, 16).is_err(), "reserved high bits");
        assert!(TableEntry::decode(2, 16).is_err(), "reserved low bits");
        for v in [0u64, 1, 0x30000] {
            assert_eq!(TableEntry::decode(v, 16).unwrap().encode(), v);
        }
        // 1 GiB at 64 KiB per bit: 16384 bits, 2048 bytes, one 64 KiB cluster.
        assert_eq!(data_bytes(1 << 30, 65536), Some(2048));
        assert_eq!(table_entries(1 << 30, 65536, 65536), Some(1));
        assert_eq!(table_entries(0, 65536, 65536), Some(0));
        // 4 TiB at 512 bytes per bit: 1 GiB of data.
        assert_eq!(data_bytes(4 << 40, 512), Some(1 << 30));
    }

    #[test]
    fn validation_refuses_what_qemu_refuses() {
        let good = BitmapEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags: FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            name: "b0".into(),
            extra: Vec::new(),
        };
        good.validate(1 << 30, 16).unwrap();
        let mut e = good.clone();
        e.kind = 2;
        assert!(e.validate(1 << 30, 16).is_err());
        let mut e = good.clone();
        e.granularity_bits = 8;
        assert!(e.validate(1 << 30, 16).is_err());
        let mut e = good.clone();
        e.table_size = 2;
        assert!(e.validate(1 << 30, 16).is_err());
        let mut e = good.clone();
        e.table_offset = 0x50200;
        assert!(e.validate(1 << 30, 16).is_err());
        let mut e = good.clone();
        e.flags |= 1 << 5;
        assert!(e.validate(1 << 30, 16).is_err());
        let mut e = good.clone();
        e.extra = vec![1, 2, 3];
        assert!(e.validate(1 << 30, 16).is_err());
        e.flags |= FLAG_EXTRA_DATA_COMPATIBLE;
        e.validate(1 << 30, 16).unwrap();
    }
}
