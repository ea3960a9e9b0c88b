//! L1 and L2 table entries, standard and extended, and compressed cluster descriptors
//! (qcow2.rst, "Cluster mapping" and "Extended L2 Entries").

/// Bit 63 of L1 and L2 entries: the refcount of the cluster is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: reads as zeros (v3 without extended L2).
pub const OFLAG_ZERO: u64 = 1;
/// Bits 9-55: host offset of an L2 table or of a data cluster.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (1-8, 56-62) that must be zero.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1-8, 56-61).
pub const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Encodes table entries (L1, L2, refcount table) as big-endian words: the one table encoder.
pub fn encode_table(words: &[u64]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(words.len().saturating_mul(8));
    for w in words {
        raw.extend_from_slice(&w.to_be_bytes());
    }
    raw
}

/// Decodes big-endian table words; a trailing partial word is ignored.
pub fn decode_table(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8).map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()
}

/// Offset of the L2 table an L1 entry points to (0: none).
pub fn l1_l2_offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}

/// A compressed cluster descriptor decoded (qcow2.rst, "Compressed Clusters Descriptor").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDesc {
    /// Host offset of the first byte of compressed data (not aligned).
    pub offset: u64,
    /// Number of bytes from `offset` to the end of the last 512-byte sector holding the data.
    pub len: u64,
}

/// What one L2 entry (or one subcluster of an extended entry) says about a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Kind {
    /// Not allocated here; read from the backing file (host offset kept if the cluster was preallocated).
    Unallocated {
        /// Host cluster offset if one is set (extended L2 with an allocated cluster, or preallocation).
        host: Option<u64>,
    },
    /// Reads as zeros.
    Zero {
        /// Preallocated host offset, if any.
        host: Option<u64>,
    },
    /// Data at this host cluster offset.
    Data {
        /// Host cluster offset (aligned).
        host: u64,
    },
    /// Compressed cluster.
    Compressed(CompressedDesc),
}

/// Decodes a compressed descriptor for `cluster_bits` (x = 62 - (cluster_bits - 8)).
pub fn decode_compressed(entry: u64, cluster_bits: u32) -> CompressedDesc {
    // cluster_bits is 9..=21 once the header is accepted, so x is 50..=61.
    let x = 70u32.saturating_sub(cluster_bits).min(62);
    let offset = entry & 1u64.checked_shl(x).map_or(u64::MAX, |m| m.wrapping_sub(1));
    let sectors = (entry & ((1u64 << 62) - 1)).checked_shr(x).unwrap_or(0);
    // The data ends at the end of sector (offset/512 + sectors): at most 2^62 + 2^22, no overflow.
    let end = (offset & !511).saturating_add(sectors.saturating_add(1).saturating_mul(512)).max(offset);
    CompressedDesc { offset, len: end.saturating_sub(offset) }
}

/// Encodes a compressed descriptor (used by tests and the writer).
pub fn encode_compressed(d: CompressedDesc, cluster_bits: u32) -> u64 {
    let x = 70u32.saturating_sub(cluster_bits).min(62);
    let end = d.offset.saturating_add(d.len);
    let sectors = end.div_ceil(512).saturating_sub(d.offset / 512).saturating_sub(1);
    OFLAG_COMPRESSED | sectors.checked_shl(x).unwrap_or(0) | d.offset
}

/// How the L2 entries of one image are laid out (qcow2.rst, "Cluster mapping" and "Extended L2 Entries").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (128 bits: the entry and a subcluster bitmap).
    pub extended: bool,
    /// Bit 0 of a standard entry means "reads as zeros" (version 3 without extended L2).
    pub zero_flag: bool,
    /// The image has an external data file (a host offset of 0 with `COPIED` is a real cluster).
    pub data_file: bool,
}

/// One L2 entry decoded for its whole cluster: the single decoder of L2 entries, used by the mapper, the
/// writer and the checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry {
    /// Host cluster offset, when one is set.
    pub host: Option<u64>,
    /// `QCOW_OFLAG_COPIED`: this image's reference is the only one.
    pub copied: bool,
    /// The compressed descriptor of a compressed cluster.
    pub compressed: Option<CompressedDesc>,
    /// Allocated subclusters, bit 0 first (a standard entry is one subcluster).
    pub alloc: u32,
    /// Subclusters that read as zeros.
    pub zero: u32,
}

impl L2Layout {
    /// Decodes `entry` (and, for extended entries, its `bitmap`).
    pub fn decode(&self, entry: u64, bitmap: u64) -> L2Entry {
        if entry & OFLAG_COMPRESSED != 0 {
            let d = decode_compressed(entry, self.cluster_bits);
            return L2Entry { host: None, copied: false, compressed: Some(d), alloc: 0, zero: 0 };
        }
        let off = entry & OFFSET_MASK;
        let copied = entry & OFLAG_COPIED != 0;
        let host = if off != 0 || (self.data_file && copied) { Some(off) } else { None };
        let (alloc, zero) = if self.extended {
            (bitmap as u32, (bitmap >> 32) as u32)
        } else if self.zero_flag && entry & OFLAG_ZERO != 0 {
            (0, 1)
        } else if host.is_some() {
            (1, 0)
        } else {
            (0, 0)
        };
        L2Entry { host, copied, compressed: None, alloc, zero }
    }

    /// Encodes an entry for a host cluster (with `COPIED`) or none, and its bitmap (0 for standard entries,
    /// where a zero subcluster becomes the zero flag).
    pub fn encode(&self, host: Option<u64>, alloc: u32, zero: u32) -> (u64, u64) {
        let base = host.map_or(0, |h| h | OFLAG_COPIED);
        if self.extended {
            (base, u64::from(alloc) | (u64::from(zero) << 32))
        } else if zero != 0 {
            (base | OFLAG_ZERO, 0)
        } else {
            (base, 0)
        }
    }

    /// What subcluster `sc` of a decoded entry says; `None` for an invalid entry (a subcluster both
    /// allocated and zero, or allocated without a host cluster).
    pub fn kind(&self, e: &L2Entry, sc: u32) -> Option<L2Kind> {
        if let Some(d) = e.compressed {
            return Some(L2Kind::Compressed(d));
        }
        let bit = if self.extended { 1u32.checked_shl(sc)? } else { 1 };
        match (e.alloc & bit != 0, e.zero & bit != 0) {
            (true, true) => None,
            (true, false) => e.host.map(|h| L2Kind::Data { host: h }),
            (false, true) => Some(L2Kind::Zero { host: e.host }),
            (false, false) => Some(L2Kind::Unallocated { host: if self.extended { e.host } else { None } }),
        }
    }
}

/// Decodes a standard L2 entry (no subclusters). `zero_bit_valid` is false for v2 and extended L2.
pub fn decode_l2(entry: u64, cluster_bits: u32, zero_bit_valid: bool, has_data_file: bool) -> L2Kind {
    let l = L2Layout { cluster_bits, extended: false, zero_flag: zero_bit_valid, data_file: has_data_file };
    l.kind(&l.decode(entry, 0), 0).unwrap_or(L2Kind::Unallocated { host: None })
}

/// Decodes subcluster `sc` (0..32) of an extended L2 entry `(entry, bitmap)`.
/// Returns `None` for an invalid bitmap (a subcluster both allocated and zero, or allocated without offset).
pub fn decode_l2_ext(entry: u64, bitmap: u64, sc: u32, cluster_bits: u32, has_data_file: bool) -> Option<L2Kind> {
    let l = L2Layout { cluster_bits, extended: true, zero_flag: false, data_file: has_data_file };
    l.kind(&l.decode(entry, bitmap), sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_encode_and_decode_back() {
        for extended in [false, true] {
            let l = L2Layout { cluster_bits: 16, extended, zero_flag: !extended, data_file: false };
            let (alloc, zero) = if extended { (0b0110, 0b1000) } else { (1, 0) };
            let (e, bm) = l.encode(Some(0x30000), alloc, zero);
            let d = l.decode(e, bm);
            assert_eq!((d.host, d.copied, d.alloc, d.zero), (Some(0x30000), true, alloc, zero));
            let (e, bm) = l.encode(None, 0, 1);
            let z = l.decode(e, bm);
            assert_eq!(l.kind(&z, 0), Some(L2Kind::Zero { host: None }));
        }
    }

    #[test]
    fn tables_round_trip_as_big_endian_words() {
        let w = [1u64, 0x0102_0304_0506_0708, u64::MAX];
        let raw = encode_table(&w);
        assert_eq!(&raw[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_table(&raw), w);
    }

    #[test]
    fn compressed_descriptor_round_trips_for_every_cluster_size() {
        for bits in 9..=21 {
            let d = CompressedDesc { offset: 0x12_3456, len: 1000.min((1u64 << bits) - 100) };
            let e = encode_compressed(d, bits);
            let back = decode_compressed(e, bits);
            assert_eq!(back.offset, d.offset, "bits {bits}");
            assert!(back.len >= d.len && back.len < d.len + 512, "bits {bits}: {back:?}");
        }
    }

    #[test]
    fn zero_flag_only_counts_when_valid() {
        assert_eq!(decode_l2(OFLAG_ZERO, 16, true, false), L2Kind::Zero { host: None });
        assert_eq!(decode_l2(OFLAG_ZERO, 16, false, false), L2Kind::Unallocated { host: None });
        assert_eq!(decode_l2(0x10000 | OFLAG_COPIED, 16, true, false), L2Kind::Data { host: 0x10000 });
    }

    #[test]
    fn extended_subcluster_bits() {
        let e = 0x20000 | OFLAG_COPIED;
        let bm = 0b1 | (0b10 << 32);
        assert_eq!(decode_l2_ext(e, bm, 0, 16, false), Some(L2Kind::Data { host: 0x20000 }));
        assert_eq!(decode_l2_ext(e, bm, 1, 16, false), Some(L2Kind::Zero { host: Some(0x20000) }));
        assert_eq!(decode_l2_ext(e, bm, 2, 16, false), Some(L2Kind::Unallocated { host: Some(0x20000) }));
        assert_eq!(decode_l2_ext(e, 1 | (1 << 32), 0, 16, false), None);
    }
}
