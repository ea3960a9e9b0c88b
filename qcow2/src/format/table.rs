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
    let mut raw = Vec::with_capacity(words.len() * 8);
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
    let x = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << x) - 1);
    let sectors = (entry & ((1u64 << 62) - 1)) >> x;
    // The data ends at the end of sector (offset/512 + sectors).
    let end = ((offset & !511) + (sectors + 1) * 512).max(offset);
    CompressedDesc { offset, len: end - offset }
}

/// Encodes a compressed descriptor (used by tests and the writer).
pub fn encode_compressed(d: CompressedDesc, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let end = d.offset + d.len;
    let sectors = (end.div_ceil(512) - d.offset / 512).saturating_sub(1);
    OFLAG_COMPRESSED | (sectors << x) | d.offset
}

/// Decodes a standard L2 entry (no subclusters). `zero_bit_valid` is false for v2 and extended L2.
pub fn decode_l2(entry: u64, cluster_bits: u32, zero_bit_valid: bool, has_data_file: bool) -> L2Kind {
    if entry & OFLAG_COMPRESSED != 0 {
        return L2Kind::Compressed(decode_compressed(entry, cluster_bits));
    }
    let off = entry & OFFSET_MASK;
    let host = if off != 0 || (has_data_file && entry & OFLAG_COPIED != 0) { Some(off) } else { None };
    if zero_bit_valid && entry & OFLAG_ZERO != 0 {
        return L2Kind::Zero { host };
    }
    match host {
        Some(h) => L2Kind::Data { host: h },
        None => L2Kind::Unallocated { host: None },
    }
}

/// Decodes subcluster `sc` (0..32) of an extended L2 entry `(entry, bitmap)`.
/// Returns `None` for an invalid bitmap (a subcluster both allocated and zero, or allocated without offset).
pub fn decode_l2_ext(entry: u64, bitmap: u64, sc: u32, cluster_bits: u32, has_data_file: bool) -> Option<L2Kind> {
    if entry & OFLAG_COMPRESSED != 0 {
        return Some(L2Kind::Compressed(decode_compressed(entry, cluster_bits)));
    }
    let off = entry & OFFSET_MASK;
    let host = if off != 0 || (has_data_file && entry & OFLAG_COPIED != 0) { Some(off) } else { None };
    let alloc = bitmap & (1u64 << sc) != 0;
    let zero = bitmap & (1u64 << (sc + 32)) != 0;
    match (alloc, zero) {
        (true, true) => None,
        (true, false) => host.map(|h| L2Kind::Data { host: h }),
        (false, true) => Some(L2Kind::Zero { host }),
        (false, false) => Some(L2Kind::Unallocated { host }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
