//! Cluster allocation and refcounts (qcow2.rst, "Reference counts").
//!
//! Refcounts change only in memory here; [`Refcounts::add_to`] hands the changed blocks and table to a
//! [`MetaCommit`], whose module states the order they reach the disk in. Two rules live here:
//! - **No reuse while open**: new clusters are always taken at or past the end the file had when it was
//!   opened, and a freed cluster is never handed out again while the image is open, so a request still in
//!   flight (or a `sendfile` of a planned read) can never touch a cluster that has a new owner, and a new
//!   data cluster reads as zeros until its writer writes it (`write.rs` relies on that and writes only the
//!   guest's bytes into a new cluster that would otherwise be zero-filled). Sequential writers get
//!   contiguous clusters, and a crash leaves at worst leaked clusters.
//! - **Lowered only after unpublishing**: [`Refcounts::free_later`] queues a decrement; it is applied by
//!   [`Refcounts::apply_frees`] only after the commit that removed the last on-disk pointer completed.
//! - **Counted when published**: a data cluster is [`Refcounts::reserve`]d while its data is written and
//!   counted ([`Refcounts::count`]) under the same lock that publishes its L2 entry, so a commit never
//!   carries the refcount of a cluster whose write is still in flight.

use super::commit::{MetaCommit, Stage};
use super::overlap::{Kind, Map};
use crate::error::{Error, Result};
use crate::format::header::Field;
use crate::format::refcount;
use crate::format::table::OFFSET_MASK;
use crate::storage::Storage;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What [`Refcounts::add_to`] put into a commit, to mark clean once that commit completed.
#[derive(Debug, Default)]
pub struct Included {
    blocks: Vec<u64>,
    /// Host offsets of the blocks included (for the overlap check before they are written).
    pub offsets: Vec<u64>,
    table: bool,
    moved: bool,
}

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
    /// Whether the table changed and must be written.
    pub table_dirty: bool,
    /// Whether the table moved: the header must then point at its new place.
    pub table_moved: bool,
    /// Loaded refcount blocks, by table index, with their dirty flag.
    blocks: HashMap<u64, (Vec<u8>, bool)>,
    /// First cluster index past every allocated cluster: new clusters come from here.
    pub end_cluster: u64,
    /// Decrements waiting for the L2 entries that referenced the clusters to reach the disk.
    pub pending_free: BTreeMap<u64, u64>,
    /// The image's metadata clusters: new refcount blocks and tables are added as they are placed.
    overlap: Arc<Map>,
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
        overlap: Arc<Map>,
    ) -> Self {
        let cs = 1u64 << cluster_bits;
        Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            table_moved: false,
            blocks: HashMap::new(),
            end_cluster: file_len.div_ceil(cs),
            pending_free: BTreeMap::new(),
            overlap,
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
            let e = self.table.get(bi as usize).copied().unwrap_or(0);
            if e & 0x1ff != 0 {
                return Err(Error::corrupt(format!("refcount table entry {bi} has reserved bits set")));
            }
            if e & !0x1ff & !OFFSET_MASK != 0 {
                return Err(Error::corrupt(format!("refcount block {bi} lies outside the image")));
            }
            let off = e & OFFSET_MASK;
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

    /// Starts allocation right after the last cluster in use, for an image whose file cannot grow past its
    /// end (a block device: its "end" is the device size, where nothing fits).
    pub fn start_after_last_used(&mut self, file: &dyn Storage) -> Result<()> {
        let per = self.per_block();
        for bi in (0..self.table.len() as u64).rev() {
            if self.table[bi as usize] & OFFSET_MASK == 0 {
                continue;
            }
            let order = self.order;
            let (b, _) = self.load(file, bi)?;
            if let Some(i) = (0..per).rev().find(|&i| refcount::get(b, order, i).unwrap_or(0) != 0) {
                self.end_cluster = bi * per + i + 1;
                return Ok(());
            }
        }
        self.end_cluster = 0;
        Ok(())
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
        self.overlap.add(c, Kind::RefcountBlock);
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
        self.overlap.add_range(start << self.cluster_bits, clusters * cs, self.cluster_bits, Kind::RefcountTable);
        for c in start..start + clusters {
            self.update(file, c, 1)?;
        }
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.table_offset = start << self.cluster_bits;
        self.table_clusters = clusters;
        self.table_dirty = true;
        self.table_moved = true;
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
            // A cluster the overlap map knows as metadata is in use even if its refcount says 0 (a hostile
            // refcount table may point at blocks past the end of the file).
            if self.get(file, c)? != 0 || self.overlap.kind(c).is_some() {
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous new clusters at the end, counted; returns the host offset of the first.
    pub fn alloc(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let off = self.reserve(file, n)?;
        let start = off >> self.cluster_bits;
        for c in start..start + n {
            self.update(file, c, 1)?;
        }
        Ok(off)
    }

    /// Reserves `n` contiguous new clusters at the end without counting them yet (their refcount blocks
    /// exist afterwards): a writer fills them outside the lock and counts each with [`Refcounts::count`]
    /// when it publishes it. A reservation that fails is simply forgotten: nothing counts or points at it,
    /// so a commit (or a kill -9) in between leaks nothing, and the clusters are never handed out again.
    pub fn reserve(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
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
            return self.reserve(file, n);
        }
        if (start + n) << self.cluster_bits > crate::limits::MAX_HOST_OFFSET {
            return Err(Error::new(crate::ErrorKind::NoSpace, "the image file has reached the largest host offset"));
        }
        self.end_cluster = start + n;
        Ok(start << self.cluster_bits)
    }

    /// Counts a cluster reserved by [`Refcounts::reserve`], as its first reference is published.
    pub fn count(&mut self, file: &dyn Storage, c: u64) -> Result<()> {
        self.update(file, c, 1)
    }

    /// Schedules a decrement of cluster `c` for after the L2 entries no longer pointing at it are durable.
    pub fn free_later(&mut self, c: u64) {
        *self.pending_free.entry(c).or_insert(0) += 1;
    }

    /// Adds the changed refcount structures to `c`: dirty blocks to [`Stage::RefcountBlocks`] (or
    /// [`Stage::Frees`] for a commit of lowered counts), the table to [`Stage::RefcountTable`] and a moved
    /// table's header fields to [`Stage::RefcountHeader`]. Nothing is marked clean until
    /// [`Refcounts::committed`] is called with the result, after the commit completed.
    pub fn add_to(&self, c: &mut MetaCommit, frees: bool) -> Included {
        let mut inc = Included::default();
        let stage = if frees { Stage::Frees } else { Stage::RefcountBlocks };
        for (bi, (b, dirty)) in &self.blocks {
            if *dirty {
                let off = self.table.get(*bi as usize).copied().unwrap_or(0) & OFFSET_MASK;
                if off != 0 {
                    c.add(stage, off, b.clone());
                    inc.blocks.push(*bi);
                    inc.offsets.push(off);
                }
            }
        }
        if self.table_dirty && !frees {
            let bytes = (self.table_clusters * self.cs()) as usize;
            let mut raw = crate::format::table::encode_table(&self.table);
            raw.resize(bytes, 0);
            c.add(Stage::RefcountTable, self.table_offset, raw);
            inc.table = true;
            if self.table_moved {
                let run = Field::encode_run(&[
                    (Field::RefcountTableOffset, self.table_offset),
                    (Field::RefcountTableClusters, self.table_clusters),
                ]);
                if let Some((off, bytes)) = run {
                    c.add(Stage::RefcountHeader, off, bytes);
                    inc.moved = true;
                }
            }
        }
        inc
    }

    /// Marks what `inc` names clean: the commit that carried it completed.
    pub fn committed(&mut self, inc: &Included) {
        for bi in &inc.blocks {
            if let Some((_, d)) = self.blocks.get_mut(bi) {
                *d = false;
            }
        }
        if inc.table {
            self.table_dirty = false;
        }
        if inc.moved {
            self.table_moved = false;
        }
        // Keep memory bounded: drop clean blocks once they add up to 32 MiB.
        if self.blocks.len() as u64 * self.cs() > 32 << 20 {
            self.blocks.retain(|_, (_, d)| *d);
        }
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
