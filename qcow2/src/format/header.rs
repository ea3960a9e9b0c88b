//! The qcow2 header and its extensions (qcow2.rst, "Header" and "Header extensions").
//!
//! [`Header::parse`] takes the bytes of cluster 0 (or the whole file if it is shorter) and checks every field
//! against the spec and [`crate::limits`]; nothing here trusts the image.

use super::{be32, be64};
use crate::error::{Error, Result};
use crate::limits;

/// "QFI\xfb" (qcow2.rst, Header, bytes 0-3).
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header (bytes 0-71).
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header without optional fields (bytes 0-103).
pub const V3_HEADER_LEN: u32 = 104;

/// Header extension type: end of the header extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Header extension type: bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: dirty bit (refcounts may be inconsistent).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: corrupt bit.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible feature qnbd implements.
pub const INCOMPAT_SUPPORTED: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is a raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// The compression type of compressed clusters (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (zlib with window bits -12), type 0.
    Deflate,
    /// zstd, type 1.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img prints.
    pub fn qemu_name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One header extension, kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Header extension type.
    pub kind: u32,
    /// Its data, without padding.
    pub data: Vec<u8>,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name, NUL padding removed.
    pub name: String,
}

/// The bitmaps extension fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
    /// Where the extension's 24 data bytes are in the file (for updating them in place).
    pub at: u64,
}

impl BitmapsExt {
    /// The extension's data bytes (qcow2.rst "Bitmaps extension").
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        b[8..16].copy_from_slice(&self.directory_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

/// A parsed, validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for v2).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Length of the header structure (72 for v2).
    pub header_length: u32,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Bytes of the header past byte 104 that this version does not know, kept for rewriting.
    pub unknown_header_tail: Vec<u8>,
    /// Every header extension, in file order, including the known ones.
    pub extensions: Vec<Extension>,
    /// Where the end-of-extensions marker is (0 when cluster 0 ended first).
    pub extensions_end: u64,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing format name from the extension.
    pub backing_format: Option<String>,
    /// Where the (last) backing format extension starts in the file, and its data length.
    pub backing_format_at: Option<(u64, u32)>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
}

fn utf8(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The name of an incompatible feature bit, from the image's own feature name table when it has one.
    pub fn feature_name(&self, kind: u8, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.clone())
            .unwrap_or_else(|| format!("unknown feature bit {bit}"))
    }

    /// Parses and validates the header from `buf`, the bytes of cluster 0 (or all of a shorter file).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::invalid(format!(
                "file is too short for a qcow2 header ({} bytes, need at least 72)",
                buf.len()
            )));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Error::invalid(format!("bad magic {magic:#010x} (expected 0x514649fb, \"QFI\\xfb\")")));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!("unsupported qcow2 version {version} (only 2 and 3 exist)")));
        }
        let cluster_bits = be32(buf, 20);
        if !(limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!("cluster_bits {cluster_bits} is out of range (9..21)")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            unknown_header_tail: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            backing_format_at: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            extensions_end: 0,
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(Error::invalid(format!("file is too short for a version 3 header ({} bytes)", buf.len())));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(Error::invalid(format!(
                    "header_length {} is invalid (must be a multiple of 8 and at least 104)",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(Error::invalid(format!(
                    "header_length {} exceeds the first cluster or the file",
                    h.header_length
                )));
            }
            if h.header_length > V3_HEADER_LEN {
                let ct = buf[104];
                h.compression_type = match ct {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    _ => return Err(Error::unsupported(format!("unknown compression_type {ct}"))),
                };
                h.unknown_header_tail = buf[105..h.header_length as usize].to_vec();
            }
            // qemu's validate_compression_type: the bit is set exactly when the type is not zlib.
            let has_ct_bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
            if h.compression_type != CompressionType::Deflate && !has_ct_bit {
                return Err(Error::invalid(
                    "compression_type is not zlib but the compression type incompatible bit is clear",
                ));
            }
            if h.compression_type == CompressionType::Deflate && has_ct_bit {
                return Err(Error::invalid("qcow2: Compression type incompatible feature bit must not be set"));
            }
        }
        if h.refcount_order > limits::MAX_REFCOUNT_ORDER {
            return Err(Error::invalid(format!("refcount_order {} is out of range (0..6)", h.refcount_order)));
        }
        let unknown = h.incompatible_features & !INCOMPAT_SUPPORTED;
        // Extensions first: the feature name table names the unknown bits in the error.
        h.parse_extensions(buf)?;
        if unknown != 0 {
            let names: Vec<String> =
                (0..64u8).filter(|b| unknown & (1u64 << b) != 0).map(|b| h.feature_name(0, b)).collect();
            return Err(Error::unsupported(format!("unsupported incompatible features: {}", names.join(", "))));
        }
        match h.crypt_method {
            0 => {}
            1 => return Err(Error::unsupported("AES-encrypted qcow2 images are not supported")),
            2 => return Err(Error::unsupported("LUKS-encrypted qcow2 images are not supported")),
            m => return Err(Error::invalid(format!("unknown crypt_method {m}"))),
        }
        if h.size > limits::MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(format!("virtual size {} is too large", h.size)));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 && h.data_file.is_none() {
            // qemu accepts this and expects the data file to be named on the command line; we need the name.
            return Err(Error::invalid("external data file bit is set but the image names no data file"));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE == 0 && h.data_file.is_some() {
            return Err(Error::invalid("data file name extension present without the external data file bit"));
        }
        h.parse_backing_name(buf)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let mut off = self.header_length as usize;
        // qemu (qcow2_read_extensions): the extensions end before the backing file name, or with cluster 0.
        let limit = match usize::try_from(self.backing_file_offset) {
            Ok(0) | Err(_) => buf.len(),
            Ok(b) => b.min(buf.len()),
        };
        let too_large = || Error::invalid("Header extension too large");
        loop {
            if off >= limit {
                // qcow2.rst: extensions end with type 0; an image whose area ends first is cut short.
                return Ok(());
            }
            if off.saturating_add(8) > limit {
                return Err(too_large());
            }
            let kind = be32(buf, off);
            let len = be32(buf, off.saturating_add(4)) as usize;
            let data_off = off.saturating_add(8);
            // Every extension's length is checked, the end marker's too (as qemu does).
            let end = data_off.checked_add(len).filter(|&e| e <= limit).ok_or_else(too_large)?;
            if kind == EXT_END {
                self.extensions_end = off as u64;
                return Ok(());
            }
            let data = &buf[data_off..end];
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(utf8(data, "backing format name")?);
                    self.backing_format_at = Some((off as u64, len as u32));
                }
                EXT_DATA_FILE => self.data_file = Some(utf8(data, "external data file name")?),
                EXT_FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..];
                        let n = name_bytes.iter().position(|&c| c == 0).unwrap_or(name_bytes.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    if data.len() < 24 {
                        return Err(Error::invalid(format!("bitmaps extension too short ({len} bytes)")));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                        at: data_off as u64,
                    });
                }
                _ => {}
            }
            self.extensions.push(Extension { kind, data: data.to_vec() });
            // Each extension is padded to a multiple of 8 bytes.
            off = len.div_ceil(8).checked_mul(8).and_then(|p| data_off.checked_add(p)).unwrap_or(usize::MAX);
        }
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let size = self.backing_file_size;
        if size > limits::MAX_BACKING_NAME {
            return Err(Error::invalid(format!("backing_file_size {size} is too large (max 1023)")));
        }
        let start = self.backing_file_offset;
        // qcow2.rst, Header bytes 8-15: the name lies inside the first cluster. Checked arithmetic: the
        // offset is any 64-bit value a hostile image holds.
        let end = start.checked_add(u64::from(size)).filter(|&e| e <= self.cluster_size() && e <= buf.len() as u64);
        let Some(end) = end else {
            return Err(Error::invalid(format!(
                "Invalid backing file offset: backing_file_offset {start:#x} (backing_file_size {size}) lies outside the first cluster"
            )));
        };
        if size == 0 {
            return Ok(());
        }
        self.backing_file = Some(utf8(&buf[start as usize..end as usize], "backing file name")?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_v3() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn parses_minimal_v3_header() {
        let h = Header::parse(&minimal_v3()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert_eq!(h.header_length, 112);
        assert_eq!(h.compression_type, CompressionType::Deflate);
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut b = minimal_v3();
        b[0] = 0;
        let e = Header::parse(&b).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }

    #[test]
    fn cluster_bits_out_of_range_names_the_field() {
        let mut b = minimal_v3();
        b[20..24].copy_from_slice(&22u32.to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert!(e.to_string().contains("cluster_bits 22"), "{e}");
    }

    #[test]
    fn unknown_incompatible_bit_is_refused_by_its_name() {
        let mut b = minimal_v3();
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        // Feature name table naming bit 9.
        let off = 112;
        b[off..off + 4].copy_from_slice(&EXT_FEATURE_NAMES.to_be_bytes());
        b[off + 4..off + 8].copy_from_slice(&48u32.to_be_bytes());
        b[off + 8] = 0;
        b[off + 9] = 9;
        b[off + 10..off + 19].copy_from_slice(b"time warp");
        let e = Header::parse(&b).unwrap_err();
        assert!(e.to_string().contains("time warp"), "{e}");
    }

    #[test]
    fn extension_running_past_the_buffer_is_refused() {
        let mut b = minimal_v3();
        b[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        b[116..120].copy_from_slice(&10_000u32.to_be_bytes());
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn unknown_extension_is_kept_byte_for_byte() {
        let mut b = minimal_v3();
        b[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        b[116..120].copy_from_slice(&3u32.to_be_bytes());
        b[120..123].copy_from_slice(b"abc");
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.extensions, vec![Extension { kind: 0x1234, data: b"abc".to_vec() }]);
    }

    #[test]
    fn backing_name_outside_cluster_zero_is_refused() {
        let mut b = minimal_v3();
        b[8..16].copy_from_slice(&65530u64.to_be_bytes());
        b[16..20].copy_from_slice(&10u32.to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert!(e.to_string().contains("outside the first cluster"), "{e}");
    }

    #[test]
    fn a_backing_name_offset_that_overflows_is_refused_not_a_panic() {
        let mut b = minimal_v3();
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..20].copy_from_slice(&37u32.to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert!(e.to_string().contains("backing_file_offset"), "{e}");
    }

    #[test]
    fn luks_is_refused_clearly() {
        let mut b = minimal_v3();
        b[32..36].copy_from_slice(&2u32.to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert!(e.to_string().contains("LUKS"), "{e}");
    }
}

/// A header field that changes while an image is open, with its place in the header (qcow2.rst, "Header").
/// Writers change header fields only through [`Field::encode`], never at literal offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Bytes 0-3: `magic`.
    Magic,
    /// Bytes 4-7: `version`.
    Version,
    /// Bytes 8-15: `backing_file_offset`.
    BackingFileOffset,
    /// Bytes 16-19: `backing_file_size`.
    BackingFileSize,
    /// Bytes 20-23: `cluster_bits`.
    ClusterBits,
    /// Bytes 24-31: `size`.
    Size,
    /// Bytes 32-35: `crypt_method`.
    CryptMethod,
    /// Bytes 36-39: `l1_size`.
    L1Size,
    /// Bytes 40-47: `l1_table_offset`.
    L1TableOffset,
    /// Bytes 48-55: `refcount_table_offset`.
    RefcountTableOffset,
    /// Bytes 56-59: `refcount_table_clusters`.
    RefcountTableClusters,
    /// Bytes 60-63: `nb_snapshots`.
    NbSnapshots,
    /// Bytes 64-71: `snapshots_offset`.
    SnapshotsOffset,
    /// Bytes 72-79 (v3): `incompatible_features`.
    IncompatibleFeatures,
    /// Bytes 80-87 (v3): `compatible_features`.
    CompatibleFeatures,
    /// Bytes 88-95 (v3): `autoclear_features`.
    AutoclearFeatures,
    /// Bytes 96-99 (v3): `refcount_order`.
    RefcountOrder,
    /// Bytes 100-103 (v3): `header_length`.
    HeaderLength,
    /// Byte 104 (v3, header_length > 104): `compression_type`.
    CompressionType,
}

impl Field {
    /// Byte offset in the header and width in bytes.
    pub fn place(self) -> (u64, usize) {
        match self {
            Field::Magic => (0, 4),
            Field::Version => (4, 4),
            Field::BackingFileOffset => (8, 8),
            Field::BackingFileSize => (16, 4),
            Field::ClusterBits => (20, 4),
            Field::NbSnapshots => (60, 4),
            Field::SnapshotsOffset => (64, 8),
            Field::CompatibleFeatures => (80, 8),
            Field::RefcountOrder => (96, 4),
            Field::HeaderLength => (100, 4),
            Field::CompressionType => (104, 1),
            Field::Size => (24, 8),
            Field::CryptMethod => (32, 4),
            Field::L1Size => (36, 4),
            Field::L1TableOffset => (40, 8),
            Field::RefcountTableOffset => (48, 8),
            Field::RefcountTableClusters => (56, 4),
            Field::IncompatibleFeatures => (72, 8),
            Field::AutoclearFeatures => (88, 8),
        }
    }

    /// The write that stores `value` in this field: (offset in the image file, big-endian bytes). A narrower
    /// field keeps the low bits of `value`; callers check the range first.
    pub fn encode(self, value: u64) -> (u64, Vec<u8>) {
        let (off, width) = self.place();
        let bytes = value.to_be_bytes();
        (off, bytes[8usize.saturating_sub(width)..].to_vec())
    }

    /// Stores `value` in this field of the header bytes `h` (which must reach past the field).
    pub fn put(self, h: &mut [u8], value: u64) {
        let (off, bytes) = self.encode(value);
        let off = off as usize;
        if let Some(dst) = h.get_mut(off..off.saturating_add(bytes.len())) {
            dst.copy_from_slice(&bytes);
        }
    }

    /// Several fields that sit next to each other (in the order given) as one write, so that they reach
    /// the disk in one sector. `None` if they are not contiguous.
    pub fn encode_run(fields: &[(Field, u64)]) -> Option<(u64, Vec<u8>)> {
        let (first, _) = fields.first()?;
        let start = first.place().0;
        let mut out = Vec::new();
        for (f, v) in fields {
            let (off, bytes) = f.encode(*v);
            if Some(off) != start.checked_add(out.len() as u64) {
                return None;
            }
            out.extend_from_slice(&bytes);
        }
        Some((start, out))
    }
}

#[cfg(test)]
mod field_tests {
    use super::*;

    #[test]
    fn header_fields_encode_at_the_spec_offsets() {
        assert_eq!(Field::IncompatibleFeatures.encode(3), (72, vec![0, 0, 0, 0, 0, 0, 0, 3]));
        assert_eq!(Field::RefcountTableClusters.encode(0x0102_0304), (56, vec![1, 2, 3, 4]));
        let run = Field::encode_run(&[(Field::RefcountTableOffset, 0x10000), (Field::RefcountTableClusters, 2)]);
        assert_eq!(run, Some((48, vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2])));
        assert_eq!(Field::encode_run(&[(Field::Size, 1), (Field::L1Size, 1)]), None);
    }

    #[test]
    fn fields_agree_with_the_parser() {
        let mut h = vec![0u8; 104];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        for (f, v) in [
            (Field::Size, 1u64 << 30),
            (Field::L1Size, 2),
            (Field::L1TableOffset, 0x30000),
            (Field::RefcountTableOffset, 0x10000),
            (Field::RefcountTableClusters, 1),
            (Field::IncompatibleFeatures, 0),
            (Field::AutoclearFeatures, 0),
        ] {
            let (off, b) = f.encode(v);
            h[off as usize..off as usize + b.len()].copy_from_slice(&b);
        }
        let p = Header::parse(&h).expect("parses");
        assert_eq!((p.size, p.l1_size, p.l1_table_offset), (1 << 30, 2, 0x30000));
        assert_eq!((p.refcount_table_offset, p.refcount_table_clusters), (0x10000, 1));
    }
}
