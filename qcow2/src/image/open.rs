//! Opening a qcow2 image: header checks, table bounds, metadata overlap, L1 and snapshot tables.

use super::cache::L2Cache;
use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{self, Header};
use crate::format::snapshot;
use crate::format::table;
use crate::limits;
use crate::storage::Storage;
use std::sync::Arc;

/// How to open a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    /// L2 cache size in bytes; `None` for qemu's default (cover the image, at most 32 MiB).
    pub l2_cache_bytes: Option<u64>,
    /// Open as of this internal snapshot (by ID or name).
    pub snapshot: Option<String>,
    /// Open for writing.
    pub writable: bool,
    /// Where metadata commits run; `None`: in the calling thread.
    pub commit_sink: Option<Arc<dyn super::commit::CommitSink>>,
    /// Metadata only (qemu's `BDRV_O_NO_IO`, as `qemu-img info` opens images): an external data file is not
    /// needed, and guest data must not be read.
    pub metadata_only: bool,
    /// Opened to change the persistent bitmaps (`qimg bitmap`): they are kept, not tracked.
    pub manage_bitmaps: bool,
}

pub(crate) fn read_table(s: &dyn Storage, off: u64, entries: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (entries * 8) as usize];
    s.read_at(&mut raw, off)?;
    Ok(table::decode_table(&raw))
}

/// A named region of metadata, for the overlap check.
struct Region {
    name: &'static str,
    start: u64,
    len: u64,
}

fn check_table(name: &str, off: u64, bytes: u64, cluster_size: u64, file_len: u64) -> Result<()> {
    if !off.is_multiple_of(cluster_size) {
        return Err(Error::corrupt(format!("{name} offset {off:#x} is not aligned to the cluster size")));
    }
    let end = off.checked_add(bytes).ok_or_else(|| Error::corrupt(format!("{name} offset {off:#x} overflows")))?;
    if bytes > 0 && end > file_len {
        return Err(Error::corrupt(format!(
            "{name} at offset {off:#x} ({bytes} bytes) lies past the end of the file ({file_len} bytes)"
        )));
    }
    Ok(())
}

impl Qcow2 {
    /// Opens a qcow2 image on `file`. `data` is the external data file if the image has one.
    pub fn open(file: Arc<dyn Storage>, data: Option<Arc<dyn Storage>>, opts: &Qcow2Options) -> Result<Qcow2> {
        let file_len = file.len()?;
        let mut first = vec![0u8; file_len.min(4096) as usize];
        file.read_at(&mut first, 0)?;
        if first.len() >= 24 {
            let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
            if (limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&bits) {
                let want = file_len.min(1 << bits) as usize;
                if want > first.len() {
                    first.resize(want, 0);
                    file.read_at(&mut first, 0)?;
                }
            }
        }
        let header = Header::parse(&first)?;
        let cluster_bits = header.cluster_bits;
        let cs = header.cluster_size();
        let ext = header.extended_l2();
        if ext && cluster_bits < 14 {
            return Err(Error::invalid(format!(
                "extended L2 entries need clusters of 16 KiB or more (cluster_bits {cluster_bits})"
            )));
        }
        let has_data_file = header.incompatible_features & header::INCOMPAT_DATA_FILE != 0;
        let data = match (has_data_file, data) {
            (true, Some(d)) => d,
            (true, None) if opts.metadata_only && !opts.writable => {
                Arc::new(crate::storage::MemStorage::new(Vec::new(), 0))
            }
            (true, None) => return Err(Error::invalid("the image needs its external data file, which was not opened")),
            // qemu (qcow2_do_open, when it may do I/O): the raw bit means nothing without a data file.
            (false, _) if !opts.metadata_only && header.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0 => {
                return Err(Error::invalid("data-file-raw requires a data file"));
            }
            (false, _) => file.clone(),
        };
        let l2_entries = cs / if ext { 16 } else { 8 };

        // L1 table (qcow2.rst Header bytes 36-47; qemu: QCOW_MAX_L1_SIZE).
        let l1_bytes = u64::from(header.l1_size) * 8;
        if l1_bytes > limits::MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "l1_size {} is too large ({} bytes; the limit is 32 MiB)",
                header.l1_size, l1_bytes
            )));
        }
        let needed_l1 = header.size.div_ceil(cs * l2_entries);
        if u64::from(header.l1_size) < needed_l1 {
            return Err(Error::corrupt(format!(
                "l1_size {} is too small for the virtual size {} (need {needed_l1})",
                header.l1_size, header.size
            )));
        }
        check_table("L1 table", header.l1_table_offset, l1_bytes, cs, file_len)?;
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        if rt_bytes > limits::MAX_REFTABLE_BYTES {
            return Err(Error::invalid(format!(
                "refcount_table_clusters {} is too large ({rt_bytes} bytes; the limit is 8 MiB)",
                header.refcount_table_clusters
            )));
        }
        check_table("refcount table", header.refcount_table_offset, rt_bytes, cs, file_len)?;
        if header.refcount_table_offset == 0 || header.refcount_table_clusters == 0 {
            return Err(Error::corrupt("the image has no refcount table"));
        }
        if header.nb_snapshots > limits::MAX_SNAPSHOTS {
            return Err(Error::invalid(format!("nb_snapshots {} is too large", header.nb_snapshots)));
        }
        let mut regions = vec![
            Region { name: "header", start: 0, len: cs },
            Region { name: "L1 table", start: header.l1_table_offset, len: l1_bytes },
            Region { name: "refcount table", start: header.refcount_table_offset, len: rt_bytes },
        ];
        // qemu's validate_table_offset, also without snapshots: aligned, and the table below 2^63.
        let table_end =
            u64::from(header.nb_snapshots).checked_mul(40).and_then(|n| header.snapshots_offset.checked_add(n));
        if !header.snapshots_offset.is_multiple_of(cs) || table_end.is_none_or(|e| e > i64::MAX as u64) {
            return Err(Error::invalid("Snapshot table offset invalid"));
        }
        let snapshots = if header.nb_snapshots > 0 {
            // Each entry is at least 40 bytes, plus ID, name and extra data: bounded by the table limit.
            let max = limits::MAX_SNAPSHOT_TABLE_BYTES.min(file_len.saturating_sub(header.snapshots_offset));
            let mut buf = vec![0u8; max as usize];
            file.read_at(&mut buf, header.snapshots_offset)?;
            let s = snapshot::parse_table(&buf, header.nb_snapshots)?;
            regions.push(Region { name: "snapshot table", start: header.snapshots_offset, len: 40 });
            s
        } else {
            Vec::new()
        };
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                if a.len > 0 && b.len > 0 && a.start < b.start + b.len && b.start < a.start + a.len {
                    return Err(Error::corrupt(format!(
                        "{} (at {:#x}) overlaps the {} (at {:#x})",
                        a.name, a.start, b.name, b.start
                    )));
                }
            }
        }

        let (l1_off, l1_size, size) = match &opts.snapshot {
            None => (header.l1_table_offset, u64::from(header.l1_size), header.size),
            Some(want) => {
                let s = snapshots
                    .iter()
                    .find(|s| &s.id == want || &s.name == want)
                    .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, format!("Can't find snapshot '{want}'")))?;
                let bytes = u64::from(s.l1_size) * 8;
                if bytes > limits::MAX_L1_BYTES {
                    return Err(Error::invalid(format!("snapshot '{want}' L1 table is too large")));
                }
                check_table("snapshot L1 table", s.l1_table_offset, bytes, cs, file_len)?;
                let size = s.disk_size.unwrap_or(header.size);
                if size > limits::MAX_VIRTUAL_SIZE || u64::from(s.l1_size) < size.div_ceil(cs * l2_entries) {
                    return Err(Error::corrupt(format!("snapshot '{want}' L1 table is too small for its size")));
                }
                (s.l1_table_offset, u64::from(s.l1_size), size)
            }
        };
        let l1 = read_table(file.as_ref(), l1_off, l1_size)?;
        let needed_tables = needed_l1.max(1);
        let cache_bytes = opts.l2_cache_bytes.unwrap_or(limits::DEFAULT_L2_CACHE_MAX);
        let tables = (cache_bytes / cs).clamp(1, needed_tables) as usize;
        let data_file_raw = has_data_file && header.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0;
        let overlap = Arc::new(super::overlap::Map::default());
        let writer = if opts.writable {
            if opts.snapshot.is_some() {
                return Err(Error::new(ErrorKind::ReadOnly, "an internal snapshot can only be opened read-only"));
            }
            if header.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
                return Err(Error::corrupt("the image is marked corrupt; it can only be opened read-only"));
            }
            let rt = read_table(file.as_ref(), header.refcount_table_offset, rt_bytes / 8)?;
            let mut refs = super::alloc::Refcounts::new(
                cluster_bits,
                header.refcount_order,
                rt,
                header.refcount_table_offset,
                u64::from(header.refcount_table_clusters),
                file_len,
                overlap.clone(),
            );
            if file.is_fixed_size() {
                refs.start_after_last_used(file.as_ref())?;
            }
            Some(std::sync::Mutex::new(super::write::WriteState::new(refs)))
        } else {
            None
        };
        let img = Qcow2 {
            file,
            data,
            cluster_bits,
            l2_entries,
            sc_bits: if ext { cluster_bits - 5 } else { cluster_bits },
            layout: table::L2Layout {
                cluster_bits,
                extended: ext,
                zero_flag: header.version >= 3 && !ext,
                data_file: has_data_file,
            },
            l1: std::sync::RwLock::new(l1),
            l1_offset: std::sync::atomic::AtomicU64::new(l1_off),
            l2_cache: L2Cache::new(tables),
            poisoned: std::sync::atomic::AtomicBool::new(false),
            writer,
            writer_cv: std::sync::Condvar::new(),
            snapshots,
            size: std::sync::atomic::AtomicU64::new(size),
            file_len: std::sync::atomic::AtomicU64::new(file_len),
            data_file_raw,
            metadata_prealloc: std::sync::OnceLock::new(),
            has_backing: std::sync::atomic::AtomicBool::new(header.backing_file.is_some()),
            overlap,
            commit_sink: opts.commit_sink.clone(),
            bitmaps_live: std::sync::OnceLock::new(),
            bitmap_ext: std::sync::Mutex::new(super::bitmaps::ExtState {
                ext: header.bitmaps,
                autoclear: header.autoclear_features,
            }),
            dirty_maps: std::sync::Mutex::new(std::collections::HashMap::new()),
            bitmap_ops: std::sync::Mutex::new(()),
            header,
        };
        if img.writer.is_some() {
            img.map_metadata(&regions)?;
            img.open_for_writing(opts.manage_bitmaps)?;
        }
        Ok(img)
    }

    /// Fills the overlap map (see `overlap.rs`) of an image opened read-write.
    fn map_metadata(&self, regions: &[Region]) -> Result<()> {
        use super::overlap::Kind;
        let cb = self.cluster_bits;
        let m = &self.overlap;
        for r in regions {
            let kind = match r.name {
                "header" => Kind::Header,
                "L1 table" => Kind::L1Table,
                "refcount table" => Kind::RefcountTable,
                _ => continue,
            };
            m.add_range(r.start, r.len, cb, kind);
        }
        // Ranges from the image are bounded (qemu's limits) and clipped to the file: what lies past its end
        // holds nothing yet, and a hostile size must not make this map huge.
        let file_len = self.file_len();
        let clip = |start: u64, len: u64, max: u64| (start, len.min(max).min(file_len.saturating_sub(start)));
        if self.header.nb_snapshots > 0 {
            let bytes: u64 = self.snapshots.iter().map(|s| s.entry_len).sum();
            let (o, l) = clip(self.header.snapshots_offset, bytes, limits::MAX_SNAPSHOT_TABLE_BYTES);
            m.add_range(o, l, cb, Kind::SnapshotTable);
        }
        for s in &self.snapshots {
            let (o, l) = clip(s.l1_table_offset, u64::from(s.l1_size) * 8, limits::MAX_L1_BYTES);
            m.add_range(o, l, cb, Kind::SnapshotL1);
            if m.len() > limits::MAX_TRACKED_METADATA_CLUSTERS {
                return Err(Error::invalid("the image has too many metadata clusters to write to it safely"));
            }
        }
        if let Some(b) = &self.header.bitmaps {
            let (o, l) = clip(b.directory_offset, b.directory_size, limits::MAX_BITMAP_DIRECTORY_BYTES);
            m.add_range(o, l, cb, Kind::BitmapDirectory);
        }
        for e in self.refcount_table()? {
            let off = e & table::OFFSET_MASK;
            if off != 0 {
                m.add(off >> cb, Kind::RefcountBlock);
            }
        }
        let l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?;
        for e in l1.iter() {
            let off = table::l1_l2_offset(*e);
            // An L2 table past the end of the file is refused where it is used (`l2_table`).
            if off != 0 && off < file_len {
                m.add(off >> cb, Kind::L2Table);
            }
        }
        if m.len() > limits::MAX_TRACKED_METADATA_CLUSTERS {
            return Err(Error::invalid("the image has too many metadata clusters to write to it safely"));
        }
        Ok(())
    }

    /// qemu's `qcow2_detect_metadata_preallocation`: if the image file holds clearly fewer clusters on the
    /// host than the refcounts say are in use, some data clusters are holes, and block status must ask the
    /// host file whether data clusters read as zeros.
    pub(crate) fn detect_metadata_prealloc(&self) -> bool {
        if self.header.incompatible_features & header::INCOMPAT_DATA_FILE != 0 {
            return false;
        }
        let Some(on_disk) = self.file.allocated_bytes() else {
            return false;
        };
        let cs = self.cluster_size();
        let real_clusters = on_disk / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.file_len().div_ceil(cs);
        let Ok(rt) = self.refcount_table() else {
            return false;
        };
        let per_block = crate::format::refcount::entries_per_block(self.cluster_bits, self.header.refcount_order);
        let mut count = 0u64;
        let mut block = vec![0u8; cs as usize];
        let mut loaded = u64::MAX;
        for c in 0..end_cluster {
            let bi = c / per_block;
            let Some(&bo) = rt.get(bi as usize) else {
                break;
            };
            let bo = bo & table::OFFSET_MASK;
            if bo == 0 {
                continue;
            }
            if loaded != bi {
                if self.file.read_at(&mut block, bo).is_err() {
                    return false;
                }
                loaded = bi;
            }
            let rc = crate::format::refcount::get(&block, self.header.refcount_order, c % per_block).unwrap_or(0);
            count += u64::from(rc != 0);
            if count > threshold {
                return true;
            }
        }
        false
    }

    /// The refcount table (bounded by [`limits::MAX_REFTABLE_BYTES`] at open).
    pub(crate) fn refcount_table(&self) -> Result<Vec<u64>> {
        let entries = u64::from(self.header.refcount_table_clusters) * self.cluster_size() / 8;
        read_table(self.file.as_ref(), self.header.refcount_table_offset, entries)
    }

    /// Loads (through the cache) the L2 table at `off`, checking it lies inside the file.
    pub(crate) fn l2_table(&self, off: u64) -> Result<super::cache::L2Table> {
        let generation = self.l2_cache.generation();
        if let Some(t) = self.l2_cache.get(off) {
            return Ok(t);
        }
        let cs = self.cluster_size();
        if !off.is_multiple_of(cs) {
            return Err(Error::corrupt(format!("L2 table offset {off:#x} is not aligned to the cluster size")));
        }
        if off == 0 {
            return Err(Error::corrupt("L2 table offset points at the header (cluster 0)"));
        }
        if off.saturating_add(cs) > self.file_len() {
            return Err(Error::corrupt(format!(
                "L2 table at offset {off:#x} lies past the end of the file ({} bytes)",
                self.file_len()
            )));
        }
        let words = cs / 8;
        let t = std::sync::Arc::new(super::cache::Table::new(read_table(self.file.as_ref(), off, words)?));
        Ok(self.l2_cache.put(off, t, generation))
    }
}
