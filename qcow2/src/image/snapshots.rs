//! Internal snapshots: create, revert to and delete (`qemu-img snapshot -c/-a/-d`; qcow2.rst "Snapshots"),
//! and the rewrite of the refcount structures that `qimg amend -o refcount_bits=` needs.
//!
//! qemu changes refcounts and `QCOW_OFLAG_COPIED` flags in place, one after the other: a power cut between
//! the two leaves either a shared cluster flagged as owned (a later write would change the snapshot too) or
//! an owned one not flagged (`qemu-img check`: "ERROR OFLAG_COPIED"). Here each operation builds the new
//! state beside the old one, in clusters past the end of the file that the old state does not use:
//! - a copy of every L2 table the new active L1 table points at, with COPIED flags that match the new
//!   refcounts (the old tables stay as they are, for the snapshots that point at them);
//! - the new active L1 table and the new snapshot table;
//! - a complete new refcount table and its blocks, computed from every reference of the new state (the
//!   walk of `check.rs`), counting themselves.
//!
//! All of it is made durable, then one write inside the header's first sector switches the virtual size,
//! the L1 table, the refcount table and the snapshot table together (qcow2.rst "Header": bytes 24-71, and
//! `refcount_order` at 96). A power cut before that write leaves the old image (with unused bytes past its
//! end), after it the new one. Nothing is freed in place: the old state's tables are simply not counted by
//! the new refcounts. The `Qcow2` handle is stale afterwards and refuses further use: reopen the image.

#![deny(clippy::arithmetic_side_effects)] // sizes and offsets here come from the image

use super::check::{CheckReport, Roots};
use super::commit::{MetaCommit, Stage};
use super::write::WriteState;
use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};
use crate::format::snapshot::Snapshot;
use crate::format::table::{self, OFFSET_MASK, OFLAG_COPIED};
use crate::format::{header, refcount};
use crate::limits;
use std::sync::atomic::Ordering;

/// Bytes written per commit while copying tables (bounds memory).
const BATCH_BYTES: usize = 32 << 20;

/// Extra data qemu writes with each new snapshot: `vm_state_size_large`, `disk_size`, `icount`.
const EXTRA_LEN: usize = 24;

/// Longest name and ID qemu keeps (`QEMUSnapshotInfo`: 256 and 128 bytes with the terminating NUL).
const MAX_NAME: usize = 255;

/// The largest entry `snapshot_create` adds (head, extra data, ID, name, padding).
const NEW_ENTRY_MAX: u64 = 64 + MAX_NAME as u64 + 32;

/// The state an operation switches to.
struct NewState {
    /// Virtual size.
    size: u64,
    /// The L1 table whose L2 tables the new active table copies.
    l1_from: Vec<u64>,
    /// The snapshot table: parsed entries and the bytes of each.
    snapshots: Vec<Snapshot>,
    entries: Vec<Vec<u8>>,
    /// Refcount order of the new refcount structures.
    refcount_order: u32,
}

/// Encodes one snapshot table entry as qemu-img writes a new one (qcow2.rst "Snapshot table entry").
fn encode_entry(s: &Snapshot) -> Vec<u8> {
    let mut b = Vec::with_capacity(64usize.saturating_add(s.id.len()).saturating_add(s.name.len()));
    b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
    b.extend_from_slice(&s.l1_size.to_be_bytes());
    b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
    b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
    b.extend_from_slice(&s.date_sec.to_be_bytes());
    b.extend_from_slice(&s.date_nsec.to_be_bytes());
    b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&(EXTRA_LEN as u32).to_be_bytes());
    b.extend_from_slice(&s.vm_state_size.to_be_bytes());
    b.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
    b.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
    b.extend_from_slice(s.id.as_bytes());
    b.extend_from_slice(s.name.as_bytes());
    b.resize(b.len().div_ceil(8).saturating_mul(8), 0);
    b
}

/// Cuts `name` to qemu's length limit at a character boundary.
fn clip(name: &str, max: usize) -> &str {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    &name[..end]
}

impl Qcow2 {
    /// Creates snapshot `name` of the current state (a new ID, `date` as seconds and nanoseconds).
    pub fn snapshot_create(&self, name: &str, date: (u32, u32)) -> Result<()> {
        self.refuse_data_file()?;
        let (snapshots, entries) = self.snapshot_table_for_change()?;
        // qemu: EFBIG for too many snapshots or too large a table.
        let table: u64 = snapshots.iter().map(|s| s.entry_len).sum();
        if snapshots.len() as u64 >= u64::from(limits::MAX_SNAPSHOTS)
            || table.saturating_add(NEW_ENTRY_MAX) > limits::MAX_SNAPSHOT_TABLE_BYTES
        {
            return Err(Error::new(ErrorKind::InvalidArgument, "File too large"));
        }
        // qemu's find_new_snapshot_id: one past the largest numeric ID.
        let max_id = snapshots
            .iter()
            .map(|s| {
                let digits: String = s.id.chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse::<u64>().unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?.clone();
        let name = clip(name, MAX_NAME);
        let mut snap = Snapshot {
            l1_table_offset: self.l1_offset(),
            l1_size: u32::try_from(l1.len()).map_err(|_| Error::invalid("L1 table too large"))?,
            id: max_id.saturating_add(1).to_string(),
            name: name.to_string(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size()),
            icount: Some(0),
            extra_len: EXTRA_LEN as u64,
            entry_len: 0,
        };
        let bytes = encode_entry(&snap);
        snap.entry_len = bytes.len() as u64;
        let (mut snapshots, mut entries) = (snapshots, entries);
        snapshots.push(snap);
        entries.push(bytes);
        let order = self.header.refcount_order;
        self.switch_state(NewState { size: self.size(), l1_from: l1, snapshots, entries, refcount_order: order })
    }

    /// Reverts the image to snapshot `id_or_name` (an ID first, then a name, as qemu looks it up).
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.refuse_data_file()?;
        // Bitmaps qemu loads (the autoclear bit says they are valid) stop it; others it ignores.
        let bitmaps = self.ext_state()?;
        if self.header.version >= 3 && bitmaps.ext.is_some() && bitmaps.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
            return Err(Error::new(ErrorKind::InvalidArgument, "Device has active dirty bitmaps"));
        }
        let snapshots = &self.snapshots;
        let s = snapshots
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| snapshots.iter().find(|s| s.name == id_or_name))
            .ok_or_else(|| {
                Error::new(ErrorKind::InvalidArgument, "Failed to load snapshot: No such file or directory")
            })?;
        let size = s.disk_size.unwrap_or(self.size());
        if !size.is_multiple_of(512) {
            return Err(Error::new(ErrorKind::InvalidArgument, "The new size must be a multiple of 512"));
        }
        if self.header.version < 3 && size != self.size() {
            return Err(Error::unsupported("Can't resize a v2 image which has snapshots"));
        }
        let need = size.div_ceil(self.cluster_size().saturating_mul(self.l2_entries));
        if size > limits::MAX_VIRTUAL_SIZE || u64::from(s.l1_size) < need {
            return Err(Error::corrupt(format!("snapshot '{}' L1 table is too small for its size", s.name)));
        }
        if u64::from(s.l1_size) * 8 > limits::MAX_L1_BYTES {
            return Err(Error::invalid(format!("snapshot '{}' L1 table is too large", s.name)));
        }
        let l1_from = super::open::read_table(self.file.as_ref(), s.l1_table_offset, u64::from(s.l1_size))?;
        let (snapshots, entries) = self.snapshot_table_for_change()?;
        let order = self.header.refcount_order;
        self.switch_state(NewState { size, l1_from, snapshots, entries, refcount_order: order })
    }

    /// Deletes the first snapshot named `name` (qemu-img looks a snapshot to delete up by name only).
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.refuse_data_file()?;
        let i = self
            .snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "snapshot not found"))?;
        let (mut snapshots, mut entries) = self.snapshot_table_for_change()?;
        snapshots.remove(i);
        entries.remove(i);
        let l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?.clone();
        let order = self.header.refcount_order;
        self.switch_state(NewState { size: self.size(), l1_from: l1, snapshots, entries, refcount_order: order })
    }

    /// Rewrites the refcount structures with entries of `2^order` bits (`qimg amend -o refcount_bits=`).
    pub fn set_refcount_order(&self, order: u32) -> Result<()> {
        if order > limits::MAX_REFCOUNT_ORDER || (self.header.version < 3 && order != 4) {
            return Err(Error::new(ErrorKind::InvalidArgument, "invalid refcount width"));
        }
        let (snapshots, entries) = self.snapshot_table_for_change()?;
        let l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?.clone();
        self.switch_state(NewState { size: self.size(), l1_from: l1, snapshots, entries, refcount_order: order })
    }

    /// qemu does not take internal snapshots of an image with an external data file.
    fn refuse_data_file(&self) -> Result<()> {
        if self.has_data_file() {
            return Err(Error::unsupported("Operation not supported"));
        }
        Ok(())
    }

    /// Whether a snapshot table entry has less extra data than version 3 requires (16 bytes: qcow2.rst
    /// "Snapshot table entry"; very old qemu wrote none).
    pub fn snapshot_entries_too_short_for_v3(&self) -> bool {
        self.snapshots.iter().any(|s| s.extra_len < 16)
    }

    /// Rewrites the snapshot entries that lack `vm_state_size_large` and `disk_size` with them (qemu's values:
    /// the 32-bit VM state size, the current disk size, no icount), atomically as the other commands switch.
    pub fn complete_snapshot_entries(&self) -> Result<()> {
        let (mut snapshots, mut entries) = self.snapshot_table_for_change()?;
        for (s, e) in snapshots.iter_mut().zip(entries.iter_mut()) {
            if s.extra_len < 16 {
                s.disk_size = Some(s.disk_size.unwrap_or(self.size()));
                s.extra_len = EXTRA_LEN as u64;
                *e = encode_entry(s);
                s.entry_len = e.len() as u64;
            }
        }
        let l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?.clone();
        let order = self.header.refcount_order;
        self.switch_state(NewState { size: self.size(), l1_from: l1, snapshots, entries, refcount_order: order })
    }

    /// The snapshot table and the bytes of each entry, once the image is known fit for a rewrite: opened
    /// read-write for it (no bitmaps tracked), no external data file (qemu does not snapshot those either),
    /// everything flushed, and a check without corruption.
    fn snapshot_table_for_change(&self) -> Result<(Vec<Snapshot>, Vec<Vec<u8>>)> {
        if self.bitmaps_live.get().is_some_and(|l| !l.tracked.is_empty()) {
            return Err(Error::new(ErrorKind::InvalidArgument, "the image's dirty bitmaps are being tracked"));
        }
        self.flush()?;
        let r = self.check()?;
        if r.corruptions != 0 || r.check_errors != 0 {
            return Err(Error::corrupt(format!(
                "the image has {} corruptions and {} unreadable structures; repair it first (qimg check -r all)",
                r.corruptions, r.check_errors
            )));
        }
        let snapshots = self.snapshots.clone();
        let total: u64 = snapshots.iter().map(|s| s.entry_len).sum();
        if total > limits::MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::invalid("the snapshot table is too large"));
        }
        let mut raw = vec![0u8; total as usize];
        if total > 0 {
            self.file.read_at(&mut raw, self.header.snapshots_offset)?;
        }
        let mut entries = Vec::with_capacity(snapshots.len());
        let mut at = 0usize;
        for s in &snapshots {
            let end = at.saturating_add(s.entry_len as usize);
            entries.push(raw.get(at..end).ok_or_else(|| Error::corrupt("snapshot table"))?.to_vec());
            at = end;
        }
        Ok((snapshots, entries))
    }

    /// Builds `new` past the end of the file and switches the header to it (see the module comment). If
    /// anything fails before the switch, the file gets its old length back (what lay past it was unused) and
    /// keeps the old state; the handle is retired either way (its L2 cache may hold tables that were written
    /// and then cut off): reopen the image.
    fn switch_state(&self, new: NewState) -> Result<()> {
        let mut st = self.lock()?;
        let old_len = self.file.len()?;
        match self.build_state(&new, &st) {
            Ok(sector) => {
                let mut c = MetaCommit::new(false);
                c.add(Stage::Pointers, 0, sector);
                // Whatever happens now, this handle no longer describes the file.
                self.poisoned.store(true, Ordering::Release);
                st.retire();
                self.run_commit(&c)
            }
            Err(e) => {
                let _ = self.file.set_len(old_len);
                self.poisoned.store(true, Ordering::Release);
                st.retire();
                Err(e)
            }
        }
    }

    /// Writes everything `new` needs past the end of the file, durably; returns the header sector to write.
    fn build_state(&self, new: &NewState, st: &WriteState) -> Result<Vec<u8>> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let mut next = self.file.len()?.div_ceil(cs);
        // The L2 copies go to clusters the current state does not use, as far as there are some, so that the
        // file does not grow by them at every command.
        // (and a snapshot table and an L1 table of one cluster each, the usual sizes, may go there too).
        let wanted = new.l1_from.iter().filter(|&&e| e & OFFSET_MASK != 0).count();
        let mut unused = self.unused_clusters(st, wanted.saturating_add(2))?.into_iter();
        let take = |next: &mut u64, bytes: u64| -> u64 {
            let at = *next;
            *next = next.saturating_add(bytes.div_ceil(cs).max(1));
            at << cb
        };
        // 1. Copies of the L2 tables, as they are; the new L1 table points at them (each owned: COPIED).
        let mut l1 = vec![0u64; new.l1_from.len()];
        let mut copies: Vec<u64> = Vec::new();
        let mut batch = Batch::new(self);
        for (i, &e) in new.l1_from.iter().enumerate() {
            let from = e & OFFSET_MASK;
            if from == 0 {
                continue;
            }
            let mut t = vec![0u8; cs as usize];
            self.file.read_at(&mut t, from)?;
            let to = match unused.next() {
                Some(c) => c << cb,
                None => take(&mut next, cs),
            };
            l1[i] = to | OFLAG_COPIED;
            copies.push(to);
            batch.add(Stage::Tables, to, t)?;
        }
        // 2. The snapshot table and the L1 table.
        let table: Vec<u8> = new.entries.concat();
        let mut place = |next: &mut u64, bytes: u64| match unused.next().filter(|_| bytes <= cs) {
            Some(c) => c << cb,
            None => take(next, bytes),
        };
        let snapshots_offset = if new.snapshots.is_empty() { 0 } else { place(&mut next, table.len() as u64) };
        if !table.is_empty() {
            batch.add(Stage::Tables, snapshots_offset, table)?;
        }
        let l1_offset = place(&mut next, (l1.len() as u64).saturating_mul(8));
        let mut l1_bytes = table::encode_table(&l1);
        l1_bytes.resize(((l1_bytes.len() as u64).div_ceil(cs).max(1) as usize).saturating_mul(cs as usize), 0);
        batch.add(Stage::Tables, l1_offset, l1_bytes)?;
        batch.finish()?;
        // 3. Every reference of the new state but the refcount structures.
        let end = next << cb;
        if self.file.len()? < end {
            self.file.set_len(end)?;
        }
        self.file_len.fetch_max(end, Ordering::AcqRel);
        let roots = Roots { l1_offset, l1: l1.clone(), snapshots_offset, snapshots: &new.snapshots };
        let mut report = CheckReport::default();
        let walk = self.walk(&roots, &mut report, next)?;
        if report.corruptions != 0 || report.check_errors != 0 {
            return Err(Error::corrupt(format!("the new image state does not check: {:?}", report.messages)));
        }
        let mut refs = walk.refs;
        // 4. COPIED flags of the copies: set exactly where the data cluster has one reference.
        let step = if self.header.extended_l2() { 2 } else { 1 };
        let mut batch = Batch::new(self);
        for &to in &copies {
            let mut raw = vec![0u8; cs as usize];
            self.file.read_at(&mut raw, to)?;
            let mut words = table::decode_table(&raw);
            let mut changed = false;
            for idx in 0..words.len().checked_div(step).unwrap_or(0) {
                let at = idx.saturating_mul(step);
                let e = words.get(at).copied().unwrap_or(0);
                let bm = if step == 2 { words.get(at.saturating_add(1)).copied().unwrap_or(0) } else { 0 };
                let d = self.layout.decode(e, bm);
                if d.compressed.is_some() {
                    continue;
                }
                let host = d.host.unwrap_or(0);
                if host == 0 {
                    continue;
                }
                if self.has_data_file() {
                    // Data clusters in an external data file have no refcounts (and no snapshot shares them):
                    // their flags stay as they are.
                    continue;
                }
                let owned = refs.get(&(host >> cb)).copied() == Some(1);
                let want = if owned { e | OFLAG_COPIED } else { e & !OFLAG_COPIED };
                if let Some(w) = words.get_mut(at).filter(|w| **w != want) {
                    *w = want;
                    changed = true;
                }
            }
            if changed {
                batch.add(Stage::Tables, to, table::encode_table(&words))?;
            }
        }
        batch.finish()?;
        // 5. The refcount structures: a table and blocks covering every cluster up to and including themselves.
        let order = new.refcount_order;
        let per_block = refcount::entries_per_block(cb, order);
        if per_block == 0 {
            return Err(Error::invalid("refcount width"));
        }
        let base = next;
        let (mut blocks, mut rt_clusters) = (0u64, 0u64);
        loop {
            let covered = base.saturating_add(blocks).saturating_add(rt_clusters);
            let b = covered.div_ceil(per_block);
            let t = b.saturating_mul(8).div_ceil(cs).max(1);
            if (b, t) == (blocks, rt_clusters) {
                break;
            }
            (blocks, rt_clusters) = (b, t);
        }
        if rt_clusters.saturating_mul(cs) > limits::MAX_REFTABLE_BYTES {
            return Err(Error::invalid("the refcount table would be too large"));
        }
        let rt_offset = base << cb;
        let first_block = base.saturating_add(rt_clusters);
        for c in base..first_block.saturating_add(blocks) {
            let n = refs.entry(c).or_insert(0);
            *n = n.saturating_add(1);
        }
        // The largest refcount `order` can hold (2^order bits; 64-bit refcounts hold any count).
        let max =
            1u32.checked_shl(order).and_then(|bits| 1u64.checked_shl(bits)).map_or(u64::MAX, |v| v.wrapping_sub(1));
        let mut sorted: Vec<(u64, u64)> = refs.into_iter().collect();
        sorted.sort_unstable();
        if let Some((c, n)) = sorted.iter().find(|(_, n)| *n > max) {
            let (bits, at) = (1u32 << order, c << cb);
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                if order < self.header.refcount_order {
                    // qemu-img amend's words.
                    format!("Cannot decrease refcount entry width to {bits} bits: Cluster at offset {at:#x} has a refcount of {n}")
                } else {
                    format!("the cluster at offset {at:#x} would have {n} references, more than refcount_bits={bits} can count")
                },
            ));
        }
        let mut rt = Vec::with_capacity(blocks as usize);
        let mut batch = Batch::new(self);
        let mut it = sorted.iter().peekable();
        for bi in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            while let Some(&&(c, n)) = it.peek() {
                if c.checked_div(per_block) != Some(bi) {
                    break;
                }
                refcount::set(&mut block, order, c.checked_rem(per_block).unwrap_or(0), n);
                it.next();
            }
            let off = first_block.saturating_add(bi) << cb;
            rt.push(off);
            batch.add(Stage::RefcountBlocks, off, block)?;
        }
        let mut rt_bytes = table::encode_table(&rt);
        rt_bytes.resize(rt_clusters.saturating_mul(cs) as usize, 0);
        batch.add(Stage::RefcountTable, rt_offset, rt_bytes)?;
        batch.finish()?;
        // 6. The switch: one write inside the first sector, once all of the above is durable.
        let mut sector = vec![0u8; 512];
        self.file.read_at(&mut sector, 0)?;
        let fields = [
            (24usize, new.size.to_be_bytes().to_vec()),
            (36, (l1.len() as u32).to_be_bytes().to_vec()),
            (40, l1_offset.to_be_bytes().to_vec()),
            (48, rt_offset.to_be_bytes().to_vec()),
            (56, (rt_clusters as u32).to_be_bytes().to_vec()),
            (60, (new.snapshots.len() as u32).to_be_bytes().to_vec()),
            (64, snapshots_offset.to_be_bytes().to_vec()),
        ];
        for (at, v) in fields {
            if let Some(dst) = sector.get_mut(at..at.saturating_add(v.len())) {
                dst.copy_from_slice(&v);
            }
        }
        if self.header.version >= 3 {
            sector[96..100].copy_from_slice(&order.to_be_bytes());
        } else if order != 4 {
            return Err(Error::invalid("version 2 images have 16-bit refcounts"));
        }
        Ok(sector)
    }
}

impl Qcow2 {
    /// Up to `max` clusters inside the file that the current state does not use: referenced by nothing the
    /// walk finds, and neither the refcount table nor a refcount block. The old state never reads them, so
    /// the new one may be built there before the switch.
    fn unused_clusters(&self, st: &WriteState, max: usize) -> Result<Vec<u64>> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let len = self.file.len()?;
        let l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?.clone();
        let roots = Roots {
            l1_offset: self.l1_offset(),
            l1,
            snapshots_offset: self.header.snapshots_offset,
            snapshots: &self.snapshots,
        };
        let mut report = CheckReport::default();
        let walk = self.walk(&roots, &mut report, len.div_ceil(cs))?;
        if report.corruptions != 0 || report.check_errors != 0 {
            return Err(Error::corrupt(format!("the image does not check: {:?}", report.messages)));
        }
        let mut used: std::collections::HashSet<u64> = walk.refs.into_keys().collect();
        let rt = st.refs.table_offset >> cb;
        used.extend(rt..rt.saturating_add(st.refs.table_clusters));
        used.extend(st.refs.table.iter().map(|e| (e & OFFSET_MASK) >> cb).filter(|&c| c != 0));
        // Only whole clusters inside the file, and none the L2 cache still knows under its old contents (the walk
        // of the new state reads its tables through that cache).
        Ok((1..len.checked_div(cs).unwrap_or(0))
            .filter(|c| !used.contains(c) && self.l2_cache.get(c << cb).is_none())
            .take(max)
            .collect())
    }
}

/// Writes to new clusters, committed (written and synced) every [`BATCH_BYTES`].
struct Batch<'a> {
    q: &'a Qcow2,
    c: MetaCommit,
    bytes: usize,
}

impl<'a> Batch<'a> {
    fn new(q: &'a Qcow2) -> Self {
        Batch { q, c: MetaCommit::new(false), bytes: 0 }
    }

    fn add(&mut self, stage: Stage, off: u64, data: Vec<u8>) -> Result<()> {
        self.bytes = self.bytes.saturating_add(data.len());
        self.c.add(stage, off, data);
        if self.bytes >= BATCH_BYTES {
            self.finish()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if self.bytes > 0 {
            let c = std::mem::replace(&mut self.c, MetaCommit::new(false));
            self.bytes = 0;
            self.q.run_commit(&c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_entry_is_laid_out_as_qemu_img_writes_it() {
        let s = Snapshot {
            l1_table_offset: 0x150000,
            l1_size: 1,
            id: "1".into(),
            name: "s1".into(),
            date_sec: 0x6b0c_bbc0,
            date_nsec: 0x00f0_66f8,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(64 << 20),
            icount: Some(0),
            extra_len: 24,
            entry_len: 0,
        };
        let b = encode_entry(&s);
        // Bytes taken from an image qemu-img 10 wrote (`qemu-img snapshot -c s1` of a 64 MiB image).
        let head = "000000000015000000000001000100026b0cbbc000f066f800000000000000000000000000000018";
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(&hex[..80], head);
        assert_eq!(&hex[80..128], "000000000000000000000000040000000000000000000000");
        assert_eq!(&b[64..67], b"1s1");
        assert_eq!(b.len(), 72);
        let parsed = crate::format::snapshot::parse_table(&b, 1).unwrap();
        assert_eq!(parsed[0].name, "s1");
        assert_eq!(parsed[0].disk_size, Some(64 << 20));
        assert_eq!(parsed[0].entry_len, 72);
    }

    #[test]
    fn names_are_clipped_at_a_character_boundary() {
        assert_eq!(clip("abc", 2), "ab");
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("x", 255), "x");
    }
}
