//! Creating an empty qcow2 image with the layout qemu-img uses: the header in cluster 0 (backing name and
//! extensions after it), the refcount table in cluster 1, one refcount block in cluster 2 and the L1 table
//! from cluster 3 on.

use crate::error::{Error, Result};
use crate::format::header::Field;
use crate::format::header::{self, CompressionType};
use crate::limits;

/// What `qimg create -f qcow2 -o ...` asks for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size (power of two, 512 B .. 2 MiB).
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width in bits (1, 2, 4, ..., 64).
    pub refcount_bits: u32,
    /// Lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Compression type.
    pub compression: CompressionType,
    /// Backing file name, as it is to be stored.
    pub backing_file: Option<String>,
    /// Backing file format, stored in the backing format extension.
    pub backing_format: Option<String>,
    /// External data file name.
    pub data_file: Option<String>,
    /// The external data file is raw (guest offset = host offset).
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

fn ext(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(8) * 8, 0);
}

/// Feature name table entries qemu writes (qcow2.rst, "Feature name table").
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The bytes of a new, empty image (its whole initial file contents).
pub fn build(o: &CreateOptions) -> Result<Vec<u8>> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            format!("Cluster size must be a power of two between 512 and 2048k (got {cs})"),
        ));
    }
    let cluster_bits = cs.trailing_zeros();
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if o.version == 2 && (o.refcount_bits != 16 || o.lazy_refcounts || o.extended_l2 || o.data_file.is_some()) {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "compat=0.10 supports only refcount_bits=16, no lazy refcounts, extended L2 or data file",
        ));
    }
    if o.version == 2 && o.compression != CompressionType::Deflate {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "compat=0.10 supports only the zlib compression type",
        ));
    }
    if o.extended_l2 && cs < 16384 {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if o.size > limits::MAX_VIRTUAL_SIZE {
        return Err(Error::new(crate::ErrorKind::InvalidArgument, "Image size is too large"));
    }
    let l2_entries = cs / if o.extended_l2 { 16 } else { 8 };
    let l1_size = o.size.div_ceil(cs * l2_entries);
    if l1_size * 8 > limits::MAX_L1_BYTES {
        return Err(Error::new(crate::ErrorKind::InvalidArgument, "Image size is too large for this cluster size"));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let reftable_off = cs;
    let refblock_off = 2 * cs;
    let l1_off = 3 * cs;
    let used_clusters = 3 + l1_clusters;
    let order = o.refcount_bits.trailing_zeros();
    // One refcount block covers entries_per_block clusters; the initial metadata must fit in it.
    if used_clusters > crate::format::refcount::entries_per_block(cluster_bits, order) {
        return Err(Error::new(crate::ErrorKind::InvalidArgument, "Image size is too large for this cluster size"));
    }

    let mut incompat = 0u64;
    if o.extended_l2 {
        incompat |= header::INCOMPAT_EXTL2;
    }
    if o.compression != CompressionType::Deflate {
        incompat |= header::INCOMPAT_COMPRESSION;
    }
    if o.data_file.is_some() {
        incompat |= header::INCOMPAT_DATA_FILE;
    }
    let compat = if o.lazy_refcounts { header::COMPAT_LAZY_REFCOUNTS } else { 0 };
    let autoclear = if o.data_file_raw { header::AUTOCLEAR_DATA_FILE_RAW } else { 0 };
    let header_len: u32 = if o.version == 3 { 112 } else { 72 };

    let mut h = vec![0u8; header_len as usize];
    Field::Magic.put(&mut h, u64::from(header::MAGIC));
    Field::Version.put(&mut h, u64::from(o.version));
    Field::ClusterBits.put(&mut h, u64::from(cluster_bits));
    Field::Size.put(&mut h, o.size);
    Field::L1Size.put(&mut h, l1_size);
    Field::L1TableOffset.put(&mut h, l1_off);
    Field::RefcountTableOffset.put(&mut h, reftable_off);
    Field::RefcountTableClusters.put(&mut h, 1);
    if o.version == 3 {
        Field::IncompatibleFeatures.put(&mut h, incompat);
        Field::CompatibleFeatures.put(&mut h, compat);
        Field::AutoclearFeatures.put(&mut h, autoclear);
        Field::RefcountOrder.put(&mut h, u64::from(order));
        Field::HeaderLength.put(&mut h, u64::from(header_len));
        let ct = match o.compression {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        };
        Field::CompressionType.put(&mut h, ct);
    }
    if let Some(f) = &o.backing_format {
        ext(&mut h, header::EXT_BACKING_FORMAT, f.as_bytes());
    }
    if let Some(d) = &o.data_file {
        ext(&mut h, header::EXT_DATA_FILE, d.as_bytes());
    }
    // The feature name table is optional: small clusters with a backing name may have no room for it.
    let backing_len = o.backing_file.as_ref().map_or(0, |b| b.len());
    let table_fits = h.len() + 8 + 8 * 48 + 8 + backing_len <= cs as usize;
    if o.version == 3 && table_fits {
        let mut t = Vec::new();
        for (kind, bit, name) in FEATURE_NAMES {
            let mut e = [0u8; 48];
            e[0] = kind;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            t.extend_from_slice(&e);
        }
        ext(&mut h, header::EXT_FEATURE_NAMES, &t);
    }
    h.extend_from_slice(&[0u8; 8]); // end of extensions
    if let Some(b) = &o.backing_file {
        if b.len() > limits::MAX_BACKING_NAME as usize {
            return Err(Error::new(crate::ErrorKind::InvalidArgument, "Backing file name too long"));
        }
        let off = h.len() as u64;
        Field::BackingFileOffset.put(&mut h, off);
        Field::BackingFileSize.put(&mut h, b.len() as u64);
        h.extend_from_slice(b.as_bytes());
    }
    if h.len() as u64 > cs {
        return Err(Error::new(
            crate::ErrorKind::InvalidArgument,
            "header and backing name do not fit in the first cluster",
        ));
    }
    let total = l1_off + l1_size * 8;
    let mut file = vec![0u8; total as usize];
    file[..h.len()].copy_from_slice(&h);
    file[reftable_off as usize..reftable_off as usize + 8].copy_from_slice(&refblock_off.to_be_bytes());
    let block = &mut file[refblock_off as usize..(refblock_off + cs) as usize];
    for c in 0..used_clusters {
        crate::format::refcount::set(block, order, c, 1);
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_image_parses_back() {
        let o = CreateOptions {
            size: 1 << 30,
            backing_file: Some("b.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        };
        let b = build(&o).unwrap();
        let h = header::Header::parse(&b[..65536]).unwrap();
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.l1_size, 2);
        assert_eq!(h.backing_file.as_deref(), Some("b.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(b.len(), 3 * 65536 + 16);
    }
}
