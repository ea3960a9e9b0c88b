//! Every bound qnbd puts on values read from an image, in one place.
//!
//! Images are hostile input: each of these caps an allocation, a loop or a recursion whose size comes from
//! the file. The numbers follow qemu's own limits (block/qcow2.h) where qemu has one.

/// Largest L1 table accepted, in bytes (qemu: `QCOW_MAX_L1_SIZE`, 32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes (qemu: `QCOW_MAX_REFTABLE_SIZE`, 8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots accepted (qemu: `QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table accepted, in bytes (qemu: `QCOW_MAX_SNAPSHOTS_SIZE`, 64 MiB).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data in one snapshot table entry (qemu: `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Smallest and largest `cluster_bits` (qcow2.rst: "cluster_bits ... must be between 9 and 21").
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest `refcount_order` (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Largest backing file name (qemu: 1023 bytes).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest header (header_length plus extensions must fit in cluster 0).
pub const MAX_HEADER_BYTES: u64 = 1 << MAX_CLUSTER_BITS;
/// Largest virtual size accepted (qemu: `QCOW_MAX_VIRTUAL_SIZE`-ish, 2^63 / 512 rounded: we use 2^56, the
/// largest offset an L2 entry can express).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Largest host offset an L1/L2 entry can hold (bits 9..55).
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;
/// Default deepest backing chain accepted (the image itself counts as depth 0).
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 64;
/// Default cap of the L2 cache, in bytes (qemu's rule: enough for the whole image, at most 32 MiB).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Largest compressed cluster we read: the descriptor can name at most this many bytes (two clusters, as
/// qemu's decompression buffer allows).
pub const MAX_COMPRESSED_FACTOR: u64 = 2;
/// Largest bitmap directory accepted, in bytes (qemu: `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`, 64 MiB).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;
/// Most metadata clusters the overlap check tracks for an image opened read-write (about 1 GiB of map at
/// worst; real images hold a tiny fraction of that).
pub const MAX_TRACKED_METADATA_CLUSTERS: usize = 1 << 24;
/// Longest `json:` image name or `--image-opts` list parsed.
pub const MAX_SPEC_BYTES: usize = 64 << 10;
