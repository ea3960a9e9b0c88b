//! Cluster allocation and refcounts (qcow2.rst, "Reference counts").
//!
//! # Ordering rules (enforced here and in [`super::write`], nowhere else)
//! 1. **Allocation**: a new cluster's refcount is raised in a refcount block *before* any L2 or L1 entry
//!    that points at it reaches the disk. Refcount blocks are written first in every metadata flush, then
//!    the image is synced, then L2 tables and L1 are written.
//! 2. **Data before mapping**: guest data is written to a newly allocated cluster before the L2 entry that
//!    publishes it is changed in memory, and the data file is synced before that L2 entry is written.
//! 3. **Freeing**: an L2 entry is cleared (on disk, synced) *before* the refcount of the cluster it pointed
//!    to is lowered. Freed clusters are never handed out again while the image is open, so a request still
//!    in flight can never write into a cluster that has a new owner.
//!
//! New clusters are always taken at the end of the file: sequential writers get contiguous clusters, and a
//! crash (even kill -9 between two writes) leaves at worst clusters past the last referenced one.

use crate::error::{Error, Result};
use crate::format::refcount;
use crate::format::table::OFFSET_MASK;
use crate::storage::Storage;
use std::collections::{BTreeMap, HashMap};

/// The refcount table and the refcount blocks touched since open.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// The refcount table (host offsets of refcount blocks; 0 = none yet).
    pub table: Vec<u64>,
    /// Offset and size in clusters of the refcount table on disk.
    pub table_offset: u64,
    /// See `table_offset`.
    pub table_clusters: u64,
    /// Whether the table (or its location) changed and must be written with the header.
    pub table_dirty: bool,
    /// Loaded refcount blocks, by table index, with their dirty flag.
    blocks: HashMap<u64, (Vec<u8>, bool)>,
    /// First cluster index past every allocated cluster: new clusters come from here.
    pub end_cluster: u64,
    /// Decrements waiting for the L2 entries that referenced the clusters to reach the disk.
    pub pending_free: BTreeMap<u64, u64>,
}

impl Refcounts {
    /// Loads the table. `file_len` gives where allocation starts.
    pub fn new(
        cluster_bits: u32,
        order: u32,
        table: Vec<u64>,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
    ) -> Self {
        let cs = 1u64 << cluster_bits;
        Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            blocks: HashMap::new(),
            end_cluster: file_len.div_ceil(cs),
            pending_free: BTreeMap::new(),
        }
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn per_block(&self) -> u64 {
        refcount::entries_per_block(self.cluster_bits, self.order)
    }

    fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << self.order)) - 1
        }
    }

    /// Loads block `bi` (which must exist in the table).
    fn load(&mut self, file: &dyn Storage, bi: u64) -> Result<&mut (Vec<u8>, bool)> {
        if !self.blocks.contains_key(&bi) {
            let off = self.table.get(bi as usize).copied().unwrap_or(0) & OFFSET_MASK;
            let mut b = vec![0u8; self.cs() as usize];
            if off != 0 {
                if !off.is_multiple_of(self.cs()) {
                    return Err(Error::corrupt(format!("refcount block offset {off:#x} is not aligned")));
                }
                file.read_at(&mut b, off)?;
            }
            self.blocks.insert(bi, (b, false));
        }
        self.blocks.get_mut(&bi).ok_or_else(|| Error::corrupt("refcount block vanished"))
    }

    /// The refcount of cluster `c`.
    pub fn get(&mut self, file: &dyn Storage, c: u64) -> Result<u64> {
        let bi = c / self.per_block();
        if bi as usize >= self.table.len() || self.table[bi as usize] & OFFSET_MASK == 0 {
            return Ok(0);
        }
        let (order, idx) = (self.order, c % self.per_block());
        let (b, _) = self.load(file, bi)?;
        Ok(refcount::get(b, order, idx).unwrap_or(0))
    }

    /// Adds `delta` (+1 or -1) to the refcount of cluster `c`, creating its refcount block if needed.
    pub fn update(&mut self, file: &dyn Storage, c: u64, delta: i64) -> Result<()> {
        let bi = c / self.per_block();
        self.ensure_block(file, bi)?;
        let (order, idx, max) = (self.order, c % self.per_block(), self.max_refcount());
        let (b, dirty) = self.load(file, bi)?;
        let cur = refcount::get(b, order, idx).unwrap_or(0);
        let new = if delta >= 0 { cur.checked_add(delta as u64) } else { cur.checked_sub(delta.unsigned_abs()) };
        let new = new.filter(|&v| v <= max).ok_or_else(|| {
            Error::corrupt(format!("refcount of cluster {c} would leave its range ({cur} {delta:+})"))
        })?;
        refcount::set(b, order, idx, new);
        *dirty = true;
        Ok(())
    }

    /// Sets the refcount of cluster `c` to `v` (repair), creating its refcount block if needed.
    pub fn set_value(&mut self, file: &dyn Storage, c: u64, v: u64) -> Result<()> {
        let bi = c / self.per_block();
        self.ensure_block(file, bi)?;
        let (order, idx, max) = (self.order, c % self.per_block(), self.max_refcount());
        let (b, dirty) = self.load(file, bi)?;
        refcount::set(b, order, idx, v.min(max));
        *dirty = true;
        Ok(())
    }

    /// Makes sure refcount block `bi` exists, growing the table and placing the block at the end if needed.
    fn ensure_block(&mut self, file: &dyn Storage, bi: u64) -> Result<()> {
        if (bi as usize) < self.table.len() && self.table[bi as usize] & OFFSET_MASK != 0 {
            return Ok(());
        }
        if bi as usize >= self.table.len() {
            self.grow_table(file, bi + 1)?;
            if (bi as usize) < self.table.len() && self.table[bi as usize] & OFFSET_MASK != 0 {
                return Ok(());
            }
        }
        // Place the new block at the end; it counts itself if it lies in the range it describes.
        let c = self.next_free(file)?;
        self.end_cluster = c + 1;
        self.table[bi as usize] = c << self.cluster_bits;
        self.table_dirty = true;
        self.blocks.insert(bi, (vec![0u8; self.cs() as usize], true));
        self.update(file, c, 1)
    }

    /// Grows the in-memory table to at least `entries` entries and moves it to new clusters at the end.
    fn grow_table(&mut self, file: &dyn Storage, entries: u64) -> Result<()> {
        let cs = self.cs();
        let want = entries.max(self.table.len() as u64 * 2).max(cs / 8);
        let clusters = (want * 8).div_ceil(cs);
        if clusters * cs > crate::limits::MAX_REFTABLE_BYTES {
            return Err(Error::new(crate::ErrorKind::NoSpace, "the refcount table would exceed its 8 MiB limit"));
        }
        let new_entries = (clusters * cs / 8) as usize;
        self.table.resize(new_entries, 0);
        let start = self.next_free_run(file, clusters)?;
        self.end_cluster = start + clusters;
        for c in start..start + clusters {
            self.update(file, c, 1)?;
        }
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.table_offset = start << self.cluster_bits;
        self.table_clusters = clusters;
        self.table_dirty = true;
        // The old table's clusters are freed once the header points at the new one.
        for c in 0..old_clusters {
            *self.pending_free.entry((old_off >> self.cluster_bits) + c).or_insert(0) += 1;
        }
        Ok(())
    }

    /// The first cluster at or after the end whose refcount is 0 (a hostile or damaged image may hold stale
    /// refcounts past the end of its file; those clusters are never handed out).
    fn next_free(&mut self, file: &dyn Storage) -> Result<u64> {
        self.next_free_run(file, 1)
    }

    /// The first run of `n` clusters at or after the end whose refcounts are all 0.
    fn next_free_run(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let mut start = self.end_cluster;
        let mut c = start;
        let limit = start + n + (1 << 20);
        while c < start + n {
            if c > limit {
                return Err(Error::corrupt(format!(
                    "more than a million clusters past cluster {} carry refcounts without an owner",
                    self.end_cluster
                )));
            }
            if (c + 1) << self.cluster_bits > crate::limits::MAX_HOST_OFFSET {
                return Err(Error::new(
                    crate::ErrorKind::NoSpace,
                    "the image file has reached the largest host offset",
                ));
            }
            if self.get(file, c)? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous new clusters at the end; returns the host offset of the first.
    pub fn alloc(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        // Make sure refcount blocks for the whole range exist first (they may themselves take clusters).
        loop {
            self.end_cluster = self.next_free_run(file, n)?;
            let start = self.end_cluster;
            let (b0, b1) = (start / self.per_block(), (start + n - 1) / self.per_block());
            let mut moved = false;
            for bi in b0..=b1 {
                let before = self.end_cluster;
                self.ensure_block(file, bi)?;
                moved |= self.end_cluster != before;
            }
            if !moved {
                break;
            }
        }
        let start = self.next_free_run(file, n)?;
        if start != self.end_cluster {
            // A stale refcount sat in the way of a block placed above: place the blocks again.
            self.end_cluster = start;
            return self.alloc(file, n);
        }
        if (start + n) << self.cluster_bits > crate::limits::MAX_HOST_OFFSET {
            return Err(Error::new(crate::ErrorKind::NoSpace, "the image file has reached the largest host offset"));
        }
        for c in start..start + n {
            self.update(file, c, 1)?;
        }
        self.end_cluster = start + n;
        Ok(start << self.cluster_bits)
    }

    /// Schedules a decrement of cluster `c` for after the L2 entries no longer pointing at it are durable.
    pub fn free_later(&mut self, c: u64) {
        *self.pending_free.entry(c).or_insert(0) += 1;
    }

    /// Whether any refcount block or the table has unwritten changes.
    pub fn is_dirty(&self) -> bool {
        self.table_dirty || self.blocks.values().any(|(_, d)| *d)
    }

    /// Takes the pending writes: dirty refcount blocks and, if it changed, the table, as (offset, bytes),
    /// plus whether the table changed (the header must then point at it). Marks them clean.
    pub fn take_writes(&mut self) -> (Vec<(u64, Vec<u8>)>, bool) {
        let mut v = Vec::new();
        for (bi, (b, dirty)) in self.blocks.iter_mut() {
            if *dirty {
                v.push((self.table[*bi as usize] & OFFSET_MASK, b.clone()));
                *dirty = false;
            }
        }
        let moved = self.table_dirty;
        if moved {
            let mut raw = Vec::with_capacity((self.table_clusters * self.cs()) as usize);
            for e in &self.table {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            raw.resize((self.table_clusters * self.cs()) as usize, 0);
            v.push((self.table_offset, raw));
            self.table_dirty = false;
        }
        // Keep memory bounded: drop clean blocks once they add up to 32 MiB.
        if self.blocks.len() as u64 * self.cs() > 32 << 20 {
            self.blocks.retain(|_, (_, d)| *d);
        }
        (v, moved)
    }

    /// Writes dirty refcount blocks and, if it changed, the table (the caller then updates the header).
    /// Returns whether the table moved or changed.
    pub fn write_back(&mut self, file: &dyn Storage) -> Result<bool> {
        for (bi, (b, dirty)) in self.blocks.iter_mut() {
            if *dirty {
                let off = self.table[*bi as usize] & OFFSET_MASK;
                file.write_at(b, off)?;
                *dirty = false;
            }
        }
        if self.table_dirty {
            let mut raw = Vec::with_capacity((self.table_clusters * self.cs()) as usize);
            for e in &self.table {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            raw.resize((self.table_clusters * self.cs()) as usize, 0);
            file.write_at(&raw, self.table_offset)?;
            self.table_dirty = false;
            return Ok(true);
        }
        // Keep memory bounded: drop clean blocks when many are loaded.
        if self.blocks.len() > 4096 {
            self.blocks.retain(|_, (_, d)| *d);
        }
        Ok(false)
    }

    /// Applies the pending decrements (after the L2 entries were written and synced).
    pub fn apply_frees(&mut self, file: &dyn Storage) -> Result<()> {
        let pending = std::mem::take(&mut self.pending_free);
        for (c, n) in pending {
            for _ in 0..n {
                self.update(file, c, -1)?;
            }
        }
        Ok(())
    }
}
