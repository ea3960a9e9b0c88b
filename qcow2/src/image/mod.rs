//! A qcow2 image: open and validate, map guest ranges to host ranges through the L2 cache, read data.
//!
//! Locking: the L1 table is immutable for a reader; the L2 cache has its own short lock. The data path
//! reads guest data outside any lock, from the mapping the metadata layer returned.

pub mod alloc;
mod amend;
mod backing;
mod bitmaps;
pub mod cache;
pub mod check;
pub mod commit;
pub mod compressed;
pub mod create;
mod mapping;
mod open;
pub mod overlap;
mod snapshots;
mod write;

pub use bitmaps::DirtyMap;
pub use mapping::Mapping;
pub use open::Qcow2Options;
pub use write::Prealloc;

use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::format::snapshot::Snapshot;
use crate::storage::Storage;
use cache::L2Cache;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// An open qcow2 image (one layer; its backing file is held by [`crate::Image`]).
pub struct Qcow2 {
    file: Arc<dyn Storage>,
    /// The external data file, or the image file itself.
    data: Arc<dyn Storage>,
    header: Header,
    cluster_bits: u32,
    /// Entries per L2 table.
    l2_entries: u64,
    /// log2 of the subcluster size (equal to cluster_bits without extended L2).
    sc_bits: u32,
    /// How L2 entries are laid out, for the one L2 entry decoder (`format::table`).
    layout: crate::format::table::L2Layout,
    l1: RwLock<Vec<u64>>,
    /// Where the active L1 table lives (moves when resize grows it).
    l1_offset: AtomicU64,
    l2_cache: L2Cache,
    /// Set when the writer found the image corrupt or a commit failed: every write is refused, also on the
    /// lock-free fast path.
    poisoned: std::sync::atomic::AtomicBool,
    /// Write state (refcounts, dirty flags); `None` for a read-only image.
    writer: Option<Mutex<write::WriteState>>,
    /// Signalled when an allocating write of a busy guest cluster finished (see `write.rs`).
    writer_cv: std::sync::Condvar,
    snapshots: Vec<Snapshot>,
    /// Virtual size (the snapshot's when one is loaded); grows with resize.
    size: AtomicU64,
    /// Length of the image file (grows as clusters are allocated), to refuse metadata past its end.
    file_len: AtomicU64,
    data_file_raw: bool,
    /// Whether sparse data clusters exist (qemu's metadata preallocation detection; block status recurses).
    metadata_prealloc: std::sync::OnceLock<bool>,
    /// Whether reads of unallocated clusters come from a backing image (set by the chain that holds this
    /// layer); without one, copy-on-write sources are zeros.
    has_backing: std::sync::atomic::AtomicBool,
    /// Every metadata cluster, for the overlap check (filled only for a writable image).
    overlap: Arc<overlap::Map>,
    /// Where metadata commits run (qnbd's commit helper), or `None` for the calling thread.
    commit_sink: Option<Arc<dyn commit::CommitSink>>,
    /// The persistent dirty bitmaps kept up to date (set at a read-write open; see `bitmaps.rs`).
    bitmaps_live: std::sync::OnceLock<bitmaps::Live>,
    /// The bitmaps extension as it is now on disk, and the autoclear bits (both change with `qimg bitmap`).
    bitmap_ext: Mutex<bitmaps::ExtState>,
    /// Held by a bitmap operation (`qimg bitmap`) from reading the set to replacing it.
    bitmap_ops: Mutex<()>,
    /// Bitmaps read from disk for `dirty_run` (they do not change while this process has the image open).
    dirty_maps: Mutex<std::collections::HashMap<String, Option<Arc<DirtyMap>>>>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2").field("header", &self.header).finish_non_exhaustive()
    }
}

impl Qcow2 {
    /// Says whether the chain holding this layer gives it a backing image.
    pub fn set_has_backing(&self, yes: bool) {
        self.has_backing.store(yes, Ordering::Relaxed);
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Number of L2 tables the cache can hold.
    pub fn l2_cache_tables(&self) -> usize {
        self.l2_cache.capacity()
    }

    /// The storage holding guest data (external data file or the image itself).
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        &self.data
    }

    /// The image file storage.
    pub fn file_storage(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// Whether block status should ask the host file about data clusters (metadata preallocation).
    pub fn metadata_preallocated(&self) -> bool {
        *self.metadata_prealloc.get_or_init(|| self.detect_metadata_prealloc())
    }

    /// Whether the external data file is raw (guest offset = host offset).
    pub fn data_file_raw(&self) -> bool {
        self.data_file_raw
    }

    /// Reads the compressed cluster `desc` and copies `buf.len()` bytes starting `in_cluster` bytes into it.
    pub fn read_compressed(
        &self,
        desc: crate::format::table::CompressedDesc,
        in_cluster: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let cs = self.cluster_size() as usize;
        let in_cluster = in_cluster as usize;
        if in_cluster + buf.len() > cs {
            return Err(Error::corrupt("read crosses a compressed cluster"));
        }
        // desc.len is bounded by the descriptor's width: at most two clusters.
        let mut input = vec![0u8; desc.len as usize];
        self.file.read_at(&mut input, desc.offset)?;
        let mut out = vec![0u8; cs];
        compressed::decompress(self.header.compression_type, &input, &mut out)
            .map_err(|e| e.context(format!("compressed cluster at host offset {:#x}", desc.offset)))?;
        buf.copy_from_slice(&out[in_cluster..in_cluster + buf.len()]);
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // A clean close writes every dirty table, in the safe order, then stores the dirty bitmaps.
        if self.writer.is_some() {
            let _ = self.flush();
            if let Err(e) = self.store_bitmaps() {
                eprintln!("qcow2: storing the dirty bitmaps failed ({e}); they stay marked in use (inconsistent)");
            }
        }
    }
}
