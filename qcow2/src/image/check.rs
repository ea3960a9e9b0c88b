//! Consistency check and repair (what `qemu-img check [-r leaks|all]` does): every cluster's refcount
//! against the references found by walking the header, tables, snapshots and bitmaps.
//!
//! Memory is bounded by the metadata actually present: references go in a map, and on-disk refcounts are
//! walked block by block.

use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header;
use crate::format::refcount;
use crate::format::snapshot::Snapshot;
use crate::format::table::{OFFSET_MASK, OFLAG_COPIED};
use std::collections::HashMap;

/// Reserved bits of an L1 entry (qcow2.rst "L1 table entry": bits 0-8 and 56-62; qemu's `L1E_RESERVED_MASK`).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// The result of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose refcount is lower than their references, plus other errors that may corrupt data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Errors of the check itself (unreadable metadata).
    pub check_errors: u64,
    /// Guest clusters allocated in the active L1 (data, compressed, preallocated zero).
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem, as qemu-img prints them.
    pub messages: Vec<String>,
    /// Clusters whose refcount should change: (cluster, on-disk refcount, references).
    pub mismatches: Vec<(u64, u64, u64)>,
    /// COPIED flags to fix: (L2 table offset or u64::MAX for L1, index, should be set).
    pub copied_fixes: Vec<(u64, usize, bool)>,
    /// Data clusters of the active L1 whose refcount is above 1 (shared with a snapshot or referenced twice).
    pub shared_clusters: u64,
}

impl CheckReport {
    /// Records a problem (at most 10,000 lines are kept; the counts stay exact).
    fn push(&mut self, m: String) {
        if self.messages.len() < 10_000 {
            self.messages.push(m);
        }
    }
}

/// What the metadata reachable from some [`Roots`] points at.
pub(super) struct Walk {
    /// References per cluster index.
    pub refs: HashMap<u64, u64>,
    /// (L2 table offset, L1 entry, L1 index) of the active L1 table.
    l2_refs: Vec<(u64, u64, usize)>,
    /// (data cluster, L2 table offset, index, entry) of the active tables.
    data_refs: Vec<(u64, u64, usize, u64)>,
}

/// Where a walk starts: the active L1 table and the snapshot table (the header's, or a state being built).
pub(super) struct Roots<'a> {
    /// Offset of the active L1 table.
    pub l1_offset: u64,
    /// Its entries.
    pub l1: Vec<u64>,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Its entries.
    pub snapshots: &'a [Snapshot],
}

/// Counts one reference to each cluster of `[off, off + len)`; a cluster past the end of the file is a
/// corruption.
fn count_ref(
    refs: &mut HashMap<u64, u64>,
    nb_clusters: u64,
    cb: u32,
    r: &mut CheckReport,
    off: u64,
    len: u64,
    what: &str,
) {
    if len == 0 {
        return;
    }
    let first = off >> cb;
    let last = off.saturating_add(len - 1) >> cb;
    for c in first..=last {
        if c >= nb_clusters {
            r.corruptions += 1;
            r.messages.push(format!("ERROR {what} at offset {:#x} is beyond the end of the image file", c << cb));
            continue;
        }
        *refs.entry(c).or_insert(0) += 1;
    }
}

impl Qcow2 {
    /// Checks refcounts and `QCOW_OFLAG_COPIED` flags against every reference in the image.
    pub fn check(&self) -> Result<CheckReport> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let file_len = self.file.len()?;
        let nb_clusters = file_len.div_ceil(cs);
        let mut r = CheckReport { total_clusters: self.size().div_ceil(cs), ..Default::default() };
        let roots = Roots {
            l1_offset: self.l1_offset(),
            l1: self.l1.read().map(|l| l.clone()).unwrap_or_default(),
            snapshots_offset: self.header.snapshots_offset,
            snapshots: &self.snapshots,
        };
        let Walk { mut refs, l2_refs, data_refs } = self.walk(&roots, &mut r, nb_clusters)?;
        let h = &self.header;
        let mut add = |r: &mut CheckReport, off: u64, len: u64, what: &str| {
            count_ref(&mut refs, nb_clusters, cb, r, off, len, what);
        };
        add(&mut r, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs, "refcount table");
        // On-disk refcounts, block by block.
        let order = h.refcount_order;
        let per_block = refcount::entries_per_block(cb, order);
        let rt = super::open::read_table(
            self.file.as_ref(),
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs / 8,
        )?;
        let mut ondisk: HashMap<u64, u64> = HashMap::new();
        let mut block = vec![0u8; cs as usize];
        for (bi, &e) in rt.iter().enumerate() {
            // qcow2.rst "Refcount table entry": bits 0-8 are reserved (qemu's check_refblocks).
            if e & 0x1ff != 0 {
                r.corruptions += 1;
                r.push(format!("ERROR refcount table entry {bi} has reserved bits set"));
                continue;
            }
            // qemu's REFT_OFFSET_MASK: every bit above the reserved ones is offset (a value past 2^56 lies
            // outside any image).
            let off = e & !0x1ff;
            if off == 0 {
                continue;
            }
            // qemu's check_refblocks, in its order and words.
            if !off.is_multiple_of(cs) {
                r.corruptions += 1;
                r.push(format!("ERROR refcount block {bi} is not cluster aligned; refcount table entry corrupted"));
                continue;
            }
            if off >= file_len {
                r.corruptions += 1;
                r.push(format!("ERROR refcount block {bi} is outside image"));
                continue;
            }
            add(&mut r, off, cs, "refcount block");
            self.file.read_at(&mut block, off)?;
            let base = bi as u64 * per_block;
            for i in 0..per_block {
                let c = base + i;
                if c >= nb_clusters {
                    break;
                }
                let v = refcount::get(&block, order, i).unwrap_or(0);
                if v != 0 {
                    ondisk.insert(c, v);
                }
            }
        }
        let mut all: Vec<u64> = refs.keys().chain(ondisk.keys()).copied().collect();
        all.sort_unstable();
        all.dedup();
        let mut highest = 0u64;
        for c in all {
            let have = ondisk.get(&c).copied().unwrap_or(0);
            let want = refs.get(&c).copied().unwrap_or(0);
            if have > 0 || want > 0 {
                highest = highest.max(c + 1);
            }
            if have != want {
                if have > want {
                    r.leaks += 1;
                    r.push(format!("Leaked cluster {c} refcount={have} reference={want}"));
                } else {
                    r.corruptions += 1;
                    r.push(format!("ERROR cluster {c} refcount={have} reference={want}"));
                }
                r.mismatches.push((c, have, want));
            }
        }
        // QCOW_OFLAG_COPIED must say "refcount is exactly 1" in the active tables.
        for (l2, e, i) in l2_refs {
            let rc = ondisk.get(&(l2 >> cb)).copied().unwrap_or(0);
            let copied = e & OFLAG_COPIED != 0;
            if copied != (rc == 1) {
                r.corruptions += 1;
                r.push(format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"));
                r.copied_fixes.push((u64::MAX, i, refs.get(&(l2 >> cb)).copied().unwrap_or(0) == 1));
            }
        }
        for (c, l2, idx, ent) in data_refs {
            let rc = ondisk.get(&c).copied().unwrap_or(0);
            r.shared_clusters += u64::from(rc > 1);
            let copied = ent & OFLAG_COPIED != 0;
            if copied != (rc == 1) {
                r.corruptions += 1;
                r.push(format!("ERROR OFLAG_COPIED data cluster: l2_entry={ent:x} refcount={rc}"));
                r.copied_fixes.push((l2, idx, refs.get(&c).copied().unwrap_or(0) == 1));
            }
        }
        r.image_end_offset = highest * cs;
        Ok(r)
    }

    /// Every reference the metadata reachable from `roots` holds (header, L1 tables, snapshot table, L2
    /// tables, data and compressed clusters, bitmaps; not the refcount structures), counted per L1 table
    /// that reaches it as qemu counts them, with problems recorded in `r`.
    pub(super) fn walk(&self, roots: &Roots<'_>, r: &mut CheckReport, nb_clusters: u64) -> Result<Walk> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let file_len = self.file.len()?;
        let mut refs: HashMap<u64, u64> = HashMap::new();
        let mut add = |r: &mut CheckReport, off: u64, len: u64, what: &str| {
            count_ref(&mut refs, nb_clusters, cb, r, off, len, what);
        };
        let h = &self.header;
        add(r, 0, cs, "header");
        add(r, roots.l1_offset, roots.l1.len() as u64 * 8, "L1 table");
        if !roots.snapshots.is_empty() {
            // The snapshot table's length: the sum of its entries.
            let len: u64 = roots.snapshots.iter().map(|s| s.entry_len).sum();
            add(r, roots.snapshots_offset, len, "snapshot table");
        }
        let data_file = h.incompatible_features & header::INCOMPAT_DATA_FILE != 0;
        // Active L1 (with statistics), then each snapshot's.
        // One L1 table at a time (the active one, then each snapshot's), with a bound on the total work.
        let mut budget: u64 = 1 << 26;
        let ext = h.extended_l2();
        let step = if ext { 2 } else { 1 };
        let mut l2_refs: Vec<(u64, u64, usize)> = Vec::new(); // (l2 offset, l1 index) of the active L1
        let mut data_refs: Vec<(u64, u64, usize, u64)> = Vec::new(); // (data cluster, l2 offset, idx, entry)
        let mut next_contiguous: u64;
        for k in 0..=roots.snapshots.len() {
            let is_active = &(k == 0);
            let l1: Vec<u64> = if k == 0 {
                roots.l1.clone()
            } else {
                let s = &roots.snapshots[k - 1];
                let bytes = u64::from(s.l1_size) * 8;
                let fits = s.l1_table_offset.checked_add(bytes).is_some_and(|e| e <= file_len);
                if bytes > crate::limits::MAX_L1_BYTES || !s.l1_table_offset.is_multiple_of(cs) || !fits {
                    r.corruptions += 1;
                    r.push(format!("ERROR snapshot '{}' has an invalid L1 table", s.name));
                    continue;
                }
                add(r, s.l1_table_offset, bytes, "snapshot L1 table");
                match super::open::read_table(self.file.as_ref(), s.l1_table_offset, u64::from(s.l1_size)) {
                    Ok(t) => t,
                    Err(_) => {
                        r.check_errors += 1;
                        continue;
                    }
                }
            };
            budget = budget.saturating_sub(l1.len() as u64);
            if budget == 0 {
                r.check_errors += 1;
                r.push("ERROR the image has too many L1 entries to check".to_string());
                break;
            }
            for (i, &e) in l1.iter().enumerate() {
                // qcow2-refcount.c check_refcounts_l1: reserved bits of an L1 entry (qcow2.rst, "L1 table entry").
                if e & L1_RESERVED != 0 {
                    r.corruptions += 1;
                    r.push(format!("ERROR found L1 entry with reserved bits set: {e:x}"));
                }
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                if !l2.is_multiple_of(cs) || l2 + cs > file_len {
                    r.corruptions += 1;
                    r.push(format!("ERROR l2_offset={l2:x}: Table is not cluster aligned or past the end"));
                    continue;
                }
                add(r, l2, cs, "L2 table");
                if *is_active {
                    l2_refs.push((l2, e, i));
                }
                let t = match self.l2_table(l2) {
                    Ok(t) => self.l2_cache.read(|| t.to_vec()),
                    Err(_) => {
                        r.check_errors += 1;
                        continue;
                    }
                };
                // qemu's next_contiguous_offset is local to check_refcounts_l2: fragmentation is counted per L2
                // table.
                next_contiguous = 0;
                for idx in 0..(t.len() / step) {
                    let ent = t[idx * step];
                    let bm = if step == 2 { t[idx * 2 + 1] } else { 0 };
                    let decoded = self.layout.decode(ent, bm);
                    // check_refcounts_l2: reserved bits of a standard cluster descriptor, in every table.
                    if decoded.compressed.is_none() && ent & crate::format::table::L2_STD_RESERVED != 0 {
                        r.corruptions += 1;
                        r.push(format!("ERROR found l2 entry with reserved bits set: {ent:x}"));
                    }
                    if let Some(d) = decoded.compressed {
                        add(r, d.offset & !511, (d.offset & 511) + d.len, "compressed cluster");
                        if *is_active {
                            r.allocated_clusters += 1;
                            r.compressed_clusters += 1;
                            r.fragmented_clusters += 1;
                        }
                        continue;
                    }
                    // Offset 0 is no cluster in the image file (a data file's cluster 0 is not counted here).
                    let off = decoded.host.unwrap_or(0);
                    if off == 0 {
                        continue;
                    }
                    if !off.is_multiple_of(cs) {
                        r.corruptions += 1;
                        r.push(format!("ERROR offset={off:x}: Cluster is not properly aligned; L2 entry corrupted."));
                        continue;
                    }
                    if !data_file {
                        add(r, off, cs, "data cluster");
                    }
                    if *is_active {
                        r.allocated_clusters += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            r.fragmented_clusters += 1;
                        }
                        next_contiguous = off + cs;
                        if !data_file {
                            data_refs.push((off >> cb, l2, idx, ent));
                        }
                    }
                }
            }
        }
        // The bitmaps extension as it is now, counted only when its autoclear bit says it is valid (qemu
        // ignores it otherwise, and its clusters are leaks).
        let ext = self.ext_state()?;
        if let Some(b) = ext.ext.filter(|_| ext.autoclear & header::AUTOCLEAR_BITMAPS != 0) {
            self.bitmap_refs(b, r, &mut |r, off, len| add(r, off, len, "bitmap"))?;
        }
        Ok(Walk { refs, l2_refs, data_refs })
    }

    /// References held by persistent bitmaps: the directory, each bitmap table and its data clusters. A
    /// directory, entry or table entry that breaks qcow2.rst "Bitmaps" counts as a corruption.
    fn bitmap_refs(
        &self,
        b: header::BitmapsExt,
        r: &mut CheckReport,
        add: &mut dyn FnMut(&mut CheckReport, u64, u64),
    ) -> Result<()> {
        use crate::format::bitmap::{parse_directory, TableEntry};
        let fits = b.directory_offset.checked_add(b.directory_size).is_some_and(|e| e <= self.file_len());
        if b.directory_size > crate::limits::MAX_BITMAP_DIRECTORY_BYTES || !fits {
            r.corruptions += 1;
            r.push("ERROR bitmap directory lies outside the image file".into());
            return Ok(());
        }
        if b.nb_bitmaps == 0 {
            return Ok(());
        }
        add(r, b.directory_offset, b.directory_size);
        let mut dir = vec![0u8; b.directory_size as usize];
        self.file.read_at(&mut dir, b.directory_offset)?;
        let entries = match parse_directory(&dir, b.nb_bitmaps) {
            Ok(e) => e,
            Err(e) => {
                r.corruptions += 1;
                r.push(format!("ERROR bitmap directory: {e}"));
                return Ok(());
            }
        };
        for e in entries {
            if let Err(err) = e.validate(self.size(), self.cluster_bits) {
                r.corruptions += 1;
                r.push(format!("ERROR {err}"));
                continue;
            }
            let n = u64::from(e.table_size);
            let fits = e.table_offset.checked_add(n * 8).is_some_and(|end| end <= self.file_len());
            if n * 8 > crate::limits::MAX_L1_BYTES || !fits {
                r.corruptions += 1;
                r.push(format!("ERROR bitmap '{}': table outside the image file", e.name));
                continue;
            }
            add(r, e.table_offset, n * 8);
            let t = super::open::read_table(self.file.as_ref(), e.table_offset, n)?;
            for v in t {
                match TableEntry::decode(v, self.cluster_bits) {
                    Ok(TableEntry::Data(o)) => add(r, o, self.cluster_size()),
                    Ok(_) => {}
                    Err(err) => {
                        r.corruptions += 1;
                        r.push(format!("ERROR bitmap '{}': {err}", e.name));
                    }
                }
            }
        }
        Ok(())
    }

    /// Repairs what `report` found: leaks always; corruptions (too-low refcounts, wrong COPIED flags) too
    /// when `all`. Returns (leaks fixed, corruptions fixed).
    pub fn repair(&self, report: &CheckReport, all: bool) -> Result<(u64, u64, Vec<String>)> {
        let w = self.writer.as_ref().ok_or_else(|| Error::new(ErrorKind::ReadOnly, "repair needs a writable image"))?;
        let mut st = w.lock().map_err(|_| Error::new(ErrorKind::Io, "writer lock poisoned"))?;
        let (mut leaks, mut corruptions) = (0, 0);
        let mut msgs = Vec::new();
        for &(c, have, want) in &report.mismatches {
            if have > want || all {
                msgs.push(format!("Repairing cluster {c} refcount={have} reference={want}"));
                st.set_refcount(self.file.as_ref(), c, want)?;
                if have > want {
                    leaks += 1;
                } else {
                    corruptions += 1;
                }
            }
        }
        if all {
            // qemu's order (qcow2-refcount.c: compare_refcounts, then check_oflag_copied): COPIED flags are
            // judged by the refcounts as repaired, so look again once those are written.
            // check() reads the refcount table the header named at open: if the repair moved it, judge by
            // the first report instead (qemu-img check -r all runs again for anything left).
            let moved = st.refcount_table_moved();
            self.flush_locked(&mut st)?;
            drop(st);
            let again = if moved { None } else { Some(self.check()?) };
            st = w.lock().map_err(|_| Error::new(ErrorKind::Io, "writer lock poisoned"))?;
            let fixes = again.as_ref().map_or(&report.copied_fixes, |r| &r.copied_fixes);
            for &(l2, idx, set) in fixes {
                if l2 == u64::MAX {
                    let mut l1 = self.l1.write().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?;
                    if let Some(e) = l1.get_mut(idx) {
                        *e = if set { *e | OFLAG_COPIED } else { *e & !OFLAG_COPIED };
                    }
                    drop(l1);
                    self.l2_cache.changed();
                    st.mark_l1_dirty(idx);
                } else {
                    let t = self.l2_table(l2)?;
                    let step = if self.header.extended_l2() { 2 } else { 1 };
                    let e = t.word(idx * step);
                    let bm = if step == 2 { t.word(idx * 2 + 1) } else { 0 };
                    let e = if set { e | OFLAG_COPIED } else { e & !OFLAG_COPIED };
                    drop(t);
                    self.set_entry(l2, idx, e, bm)?;
                }
                corruptions += 1;
            }
        }
        self.flush_locked(&mut st)?;
        Ok((leaks, corruptions, msgs))
    }
}
