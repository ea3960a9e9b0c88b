//! The write path: in-place writes, allocation with copy-on-write merged into one write, zero clusters,
//! discard, the metadata flush, and resize. The ordering rules are in `alloc.rs`.
//!
//! Locking: writes to clusters that are already allocated to this image alone (`QCOW_OFLAG_COPIED`) go
//! straight to the file without any lock. Everything that changes metadata (allocation, COW, zeroing,
//! discard, flush) holds the one writer mutex.

use super::alloc::Refcounts;
use super::cache::Table;
use super::commit::{self, MetaCommit, Stage};
use super::overlap::Kind;
use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{self, Field};
use crate::format::table::{self, OFFSET_MASK, OFLAG_COPIED};
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::MutexGuard;

/// Most whole clusters one batched allocating write reserves at once.
const MAX_RUN_CLUSTERS: usize = 64;

/// Most bytes of dirty L2 tables kept before a metadata flush is forced.
const MAX_DIRTY_L2_BYTES: u64 = 32 << 20;

/// Mutable state of a writable image.
pub struct WriteState {
    pub(super) refs: Refcounts,
    /// L1 entries changed since the last commit (by index).
    l1_dirty: BTreeSet<usize>,
    /// Set once an inconsistency was found: no more writes.
    corrupt: bool,
    /// Guest clusters whose allocating write is copying and writing data outside the lock: other writers,
    /// zero writes and discards of those clusters wait on `Qcow2::writer_cv` (qemu's cluster allocation
    /// dependencies).
    busy: HashSet<u64>,
    /// Where the next compressed cluster's bytes may go (qemu's `free_byte_offset`): inside a host cluster
    /// already holding compressed data, which gains a reference for each cluster stored in it.
    compressed_cursor: Option<u64>,
    /// Where allocation started: a file nothing was allocated in keeps its length (even if not a multiple of
    /// the cluster size, as qemu-io leaves files).
    end_at_open: u64,
}

/// A host cluster chosen for one guest cluster's write, under the lock, before its data is written.
struct Reservation {
    l2: u64,
    idx: usize,
    state: ClusterState,
    target: u64,
    in_place: bool,
}

impl WriteState {
    /// The file was rewritten beneath this handle (`snapshots.rs`): nothing more may be written through it.
    pub(super) fn retire(&mut self) {
        self.corrupt = true;
    }

    /// Write state over the loaded refcounts.
    pub fn new(refs: Refcounts) -> Self {
        let end_at_open = refs.end_cluster;
        WriteState {
            refs,
            l1_dirty: BTreeSet::new(),
            corrupt: false,
            busy: HashSet::new(),
            compressed_cursor: None,
            end_at_open,
        }
    }

    /// Sets a cluster's refcount (repair).
    pub fn set_refcount(&mut self, file: &dyn crate::storage::Storage, c: u64, v: u64) -> Result<()> {
        self.refs.set_value(file, c, v)
    }

    /// Whether the refcount table moved since the last commit.
    pub fn refcount_table_moved(&self) -> bool {
        self.refs.table_moved
    }

    /// L1 entry `idx` changed (repair).
    pub fn mark_l1_dirty(&mut self, idx: usize) {
        self.l1_dirty.insert(idx);
    }
}

/// Reads guest data from the backing chain (or zeros) for copy-on-write.
pub type BackingReader<'a> = &'a dyn Fn(&mut [u8], u64) -> Result<()>;

/// What one cluster's L2 entry says, in the terms the writer needs (the format's one decoder).
type ClusterState = table::L2Entry;

impl Qcow2 {
    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    /// Whether the image keeps its data in an external data file (qcow2.rst, incompatible feature bit 2).
    pub fn has_data_file(&self) -> bool {
        self.header.incompatible_features & header::INCOMPAT_DATA_FILE != 0
    }

    fn subclusters(&self) -> u32 {
        if self.header.extended_l2() {
            32
        } else {
            1
        }
    }

    fn all_bits(&self) -> u32 {
        if self.header.extended_l2() {
            u32::MAX
        } else {
            1
        }
    }

    pub(super) fn lock(&self) -> Result<MutexGuard<'_, WriteState>> {
        let g = self.lock_any()?;
        if g.corrupt {
            return Err(Error::corrupt("the image was found corrupt: writes are refused"));
        }
        Ok(g)
    }

    /// The writer lock, also when the image was found corrupt (to finish what is in flight).
    fn lock_any(&self) -> Result<MutexGuard<'_, WriteState>> {
        let w = self.writer.as_ref().ok_or_else(|| Error::new(ErrorKind::ReadOnly, "the image is read-only"))?;
        w.lock().map_err(|_| Error::new(ErrorKind::Io, "writer lock poisoned"))
    }

    /// Waits (releasing the lock meanwhile) until no allocating write is in flight on guest cluster `gc`.
    fn wait_cluster<'a>(&'a self, mut st: MutexGuard<'a, WriteState>, gc: u64) -> Result<MutexGuard<'a, WriteState>> {
        while st.busy.contains(&gc) {
            st = self.writer_cv.wait(st).map_err(|_| Error::new(ErrorKind::Io, "writer lock poisoned"))?;
        }
        if st.corrupt {
            return Err(Error::corrupt("the image was found corrupt: writes are refused"));
        }
        Ok(st)
    }

    /// Called once when opened read-write: unknown autoclear bits are cleared (qcow2.rst: a program that
    /// does not understand them must clear them when it writes); the bitmaps bit stays when the bitmaps were
    /// loaded to be kept up to date (`bitmaps.rs`).
    pub(super) fn open_for_writing(&self, manage_bitmaps: bool) -> Result<()> {
        let h = &self.header;
        if h.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            // qcow2.rst: a dirty image's refcounts may be wrong (lazy refcounts); repair before writing.
            let report = self.check()?;
            self.repair(&report, true)?;
            let bits = h.incompatible_features & !header::INCOMPAT_DIRTY;
            self.commit_header(&[(Field::IncompatibleFeatures, bits)])?;
        }
        if h.version >= 3 {
            let mut keep = h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW;
            let kept = if manage_bitmaps {
                h.autoclear_features & header::AUTOCLEAR_BITMAPS != 0
            } else {
                self.load_bitmaps()?
            };
            if kept {
                keep |= header::AUTOCLEAR_BITMAPS;
            }
            if keep != h.autoclear_features {
                self.commit_header(&[(Field::AutoclearFeatures, keep)])?;
                self.note_autoclear(keep);
            }
        }
        Ok(())
    }

    /// Writes header fields (contiguous, in order) as a commit of their own.
    pub(super) fn commit_header(&self, fields: &[(Field, u64)]) -> Result<()> {
        let (off, bytes) = Field::encode_run(fields)
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "header fields written together must be adjacent"))?;
        let mut c = MetaCommit::new(self.has_separate_data());
        c.add(Stage::Pointers, off, bytes);
        self.run_commit(&c)
    }

    pub(super) fn has_separate_data(&self) -> bool {
        !Arc::ptr_eq(&self.data, &self.file)
    }

    pub(super) fn run_commit(&self, c: &MetaCommit) -> Result<()> {
        commit::run(c, self.file.as_ref(), self.data.as_ref(), self.commit_sink.as_deref())
    }

    fn state_of(&self, t: &Table, idx: usize) -> ClusterState {
        let (e, bm) = if self.layout.extended { (t.word(2 * idx), t.word(2 * idx + 1)) } else { (t.word(idx), 0) };
        self.layout.decode(e, bm)
    }

    /// Refuses a cluster state the writer must not act on: a host offset that is misaligned, at the header,
    /// past the end of the file, or on the L1 or refcount table; allocation bits without a host cluster;
    /// a subcluster both allocated and zero (qcow2.rst, Extended L2 Entries).
    fn validate(&self, s: &ClusterState, pos: u64) -> Result<()> {
        let cs = self.cluster_size();
        let file_len = self.file_len();
        let bad = |what: &str| Err(Error::corrupt(format!("{what} (guest offset {pos:#x})")));
        if let Some(d) = s.compressed {
            if self.has_data_file() || d.offset < cs || d.offset >= file_len {
                return bad("compressed cluster outside the image file");
            }
            return Ok(());
        }
        if s.alloc & s.zero != 0 {
            return bad("subcluster both allocated and zero");
        }
        match s.host {
            None if s.alloc != 0 => bad("allocated subclusters without a host cluster"),
            Some(h) if h % cs != 0 => bad("host cluster offset not aligned to the cluster size"),
            Some(h) if !self.has_data_file() => {
                if h == 0 || h >= file_len {
                    bad("host cluster at the header or past the end of the file")
                } else {
                    // The overlap check: a data cluster that is really metadata (see `overlap.rs`).
                    self.overlap
                        .check_data(h >> self.cluster_bits)
                        .map_err(|e| e.context(format!("guest offset {pos:#x}")))
                }
            }
            _ => Ok(()),
        }
    }

    /// Maps index `idx` of the L2 table at `l2` to `host` (with `COPIED`) or to no cluster, with these
    /// allocated and zero subclusters (the format's one encoder).
    fn set_mapping(&self, l2: u64, idx: usize, host: Option<u64>, alloc: u32, zero: u32) -> Result<()> {
        let (entry, bitmap) = self.layout.encode(host, alloc, zero);
        self.set_entry(l2, idx, entry, bitmap)
    }

    /// Stores a raw entry (and bitmap) for index `idx` of the L2 table at `l2` (the writer lock is held, so
    /// the table loaded here is current even if readers evict it meanwhile).
    pub(super) fn set_entry(&self, l2: u64, idx: usize, entry: u64, bitmap: u64) -> Result<()> {
        let ext = self.header.extended_l2();
        let apply = |t: &Table| {
            if ext {
                t.set(2 * idx, entry);
                t.set(2 * idx + 1, bitmap);
            } else {
                t.set(idx, entry);
            }
        };
        let loaded = self.l2_table(l2)?;
        self.l2_cache.modify_loaded(l2, &loaded, apply);
        Ok(())
    }

    /// The L2 table for L1 index `l1_idx`, allocated (or copied, if shared with a snapshot) if needed.
    fn l2_for_write(&self, st: &mut WriteState, l1_idx: usize) -> Result<u64> {
        let e = {
            let l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?;
            *l1.get(l1_idx).ok_or_else(|| Error::new(ErrorKind::OutOfBounds, "write past the L1 table"))?
        };
        let off = e & OFFSET_MASK;
        if off != 0 && e & OFLAG_COPIED != 0 {
            self.overlap.expect(off >> self.cluster_bits, Kind::L2Table)?;
            self.l2_table(off)?;
            return Ok(off);
        }
        let words = (self.cluster_size() / 8) as usize;
        let new_table: Vec<u64> = if off == 0 { vec![0; words] } else { self.l2_table(off)?.to_vec() };
        let new = st.refs.alloc(self.file.as_ref(), 1)?;
        self.grow_file_len(&st.refs);
        self.l2_cache.pin(new, Arc::new(Table::new(new_table)));
        if off != 0 {
            // The shared table keeps serving the snapshot; this L1 drops its reference.
            st.refs.free_later(off >> self.cluster_bits);
        }
        self.overlap.add(new >> self.cluster_bits, Kind::L2Table);
        let mut l1 = self.l1.write().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?;
        l1[l1_idx] = new | OFLAG_COPIED;
        drop(l1);
        self.l2_cache.changed();
        st.l1_dirty.insert(l1_idx);
        Ok(new)
    }

    pub(super) fn grow_file_len(&self, refs: &Refcounts) {
        self.file_len.fetch_max(refs.end_cluster << self.cluster_bits, Ordering::AcqRel);
    }

    /// Where the L2 entry of guest offset `pos` lives: (L1 index, index in the table).
    fn indices(&self, pos: u64) -> (usize, usize) {
        let c = pos >> self.cluster_bits;
        ((c >> self.l2_entries.trailing_zeros()) as usize, (c & (self.l2_entries - 1)) as usize)
    }

    /// The current L2 entry state of `pos` without allocating, for the fast path that takes no writer lock:
    /// `None` unless this image owns the L2 table alone.
    fn peek(&self, pos: u64) -> Result<Option<ClusterState>> {
        let (l1_idx, idx) = self.indices(pos);
        let e = match self.l1.read().ok().and_then(|l1| l1.get(l1_idx).copied()) {
            Some(e) => e,
            None => return Ok(None),
        };
        if e & OFFSET_MASK == 0 || e & OFLAG_COPIED == 0 {
            return Ok(None);
        }
        let off = e & OFFSET_MASK;
        let s = match self.l2_cache.with(off, |t| self.state_of(t, idx)) {
            Some(s) => s,
            None => {
                let t = self.l2_table(off)?;
                self.l2_cache.read(|| self.state_of(&t, idx))
            }
        };
        self.validate(&s, pos)?;
        Ok(Some(s))
    }

    fn touched(&self, a: u64, b: u64) -> u32 {
        let sb = self.sc_bits;
        let (s0, s1) = ((a >> sb) as u32, ((b - 1) >> sb) as u32);
        let n = s1 - s0 + 1;
        if n >= 32 {
            u32::MAX
        } else {
            ((1u32 << n) - 1) << s0
        }
    }

    /// Writes `buf` at guest `offset` (inside the image). `backing` supplies copy-on-write data.
    pub fn write(&self, buf: &[u8], offset: u64, backing: BackingReader<'_>) -> Result<()> {
        if self.writer.is_none() {
            return Err(Error::new(ErrorKind::ReadOnly, "the image is read-only"));
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::corrupt("the image was found corrupt: writes are refused"));
        }
        self.mark_dirty(offset, buf.len() as u64);
        let cs = self.cluster_size();
        let mut done = 0usize;
        // In-place clusters whose host clusters follow each other: one write for the run (a 1 MiB write into
        // a qcow2 that qemu wrote sequentially is one write, not sixteen), as (host, length); the run ends at
        // `done`, where it is written before anything else.
        let mut run: Option<(u64, usize)> = None;
        let flush = |run: &mut Option<(u64, usize)>, end: usize| match run.take() {
            Some((host, n)) => self.data.write_at(&buf[end - n..end], host),
            None => Ok(()),
        };
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos & (cs - 1);
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let chunk = &buf[done..done + n];
            // Fast path: a cluster this image owns alone, with every touched subcluster allocated.
            let touched = self.touched(in_cluster, in_cluster + n as u64);
            let peeked = match self.peek(pos) {
                Ok(p) => p,
                Err(e) => {
                    flush(&mut run, done)?;
                    let r = Err(e);
                    if let Ok(mut st) = self.lock() {
                        self.note_corruption(&mut st, &r);
                    }
                    return r;
                }
            };
            let in_place = |s: &ClusterState| {
                s.copied && s.compressed.is_none() && s.host.is_some() && s.alloc & touched == touched
            };
            if !peeked.as_ref().is_some_and(in_place) {
                flush(&mut run, done)?;
            }
            match peeked {
                Some(s) if in_place(&s) => {
                    let host = s.host.unwrap_or(0) + in_cluster;
                    match &mut run {
                        Some((h, len)) if h.checked_add(*len as u64) == Some(host) => *len += n,
                        _ => {
                            flush(&mut run, done)?;
                            run = Some((host, n));
                        }
                    }
                }
                // Two or more whole clusters to allocate: reserved together, written with one write per
                // contiguous run of host clusters, published together.
                _ if in_cluster == 0 && buf.len() - done >= 2 * cs as usize && !self.has_data_file() => {
                    let whole = ((buf.len() - done) / cs as usize).min(MAX_RUN_CLUSTERS) * cs as usize;
                    let n = self.write_run_unlocked(&buf[done..done + whole], pos)?;
                    if n == 0 {
                        self.write_cluster_unlocked(chunk, pos, backing)?;
                    } else {
                        done += n;
                        continue;
                    }
                }
                _ => self.write_cluster_unlocked(chunk, pos, backing)?,
            }
            done += n;
        }
        flush(&mut run, done)
    }

    /// A write that costs the caller no waiting, for a server's event-loop thread: with no lock if every
    /// cluster it touches is owned by this image with every touched subcluster allocated; else, if the
    /// writer lock is free this instant, no cluster of the write is busy and no metadata commit is due, the
    /// whole write under that lock (its data I/O is page-cache work: nothing here syncs). `None` when neither
    /// applies, before anything was written: call [`Qcow2::write`] instead, off the event loop.
    pub fn write_quick(&self, buf: &[u8], offset: u64, backing: BackingReader<'_>) -> Option<Result<()>> {
        if self.writer.is_none() || self.poisoned.load(Ordering::Acquire) {
            return None;
        }
        self.mark_dirty(offset, buf.len() as u64);
        // A lookup error is the slow path's to report (and to mark the image corrupt for).
        let Some(runs) = self.in_place_runs(offset, buf.len() as u64, false).ok()? else {
            return self.write_if_unlocked(buf, offset, backing);
        };
        let mut at = 0usize;
        for (host, n) in runs {
            let n = n as usize;
            if let Err(e) = self.data.write_at(&buf[at..at + n], host) {
                return Some(Err(e));
            }
            at += n;
        }
        Some(Ok(()))
    }

    /// The host ranges `(host, length)` of an in-place write of `len` bytes at guest `offset`, in order, those
    /// that follow each other on the host merged (one write each): `Ok(None)` if some cluster is not written in
    /// place (not owned by this image alone, compressed, a touched subcluster unallocated); `Err(())` if a
    /// lookup failed, found a state the writer refuses, or (with `cached_only`) needs an L2 table that is not
    /// cached.
    fn in_place_runs(
        &self,
        offset: u64,
        len: u64,
        cached_only: bool,
    ) -> std::result::Result<Option<Vec<(u64, u64)>>, ()> {
        let end = offset.checked_add(len).filter(|&e| e <= self.size()).ok_or(())?;
        let cs = self.cluster_size();
        let mut runs: Vec<(u64, u64)> = Vec::with_capacity(4);
        let mut pos = offset;
        while pos < end {
            let in_cluster = pos & (cs - 1);
            let n = (cs - in_cluster).min(end - pos);
            let touched = self.touched(in_cluster, in_cluster + n);
            let peeked =
                if cached_only { Some(self.peek_cached(pos).ok_or(())?) } else { self.peek(pos).map_err(|_| ())? };
            match peeked {
                Some(s) if s.copied && s.compressed.is_none() && s.alloc & touched == touched => {
                    let host = s.host.and_then(|h| h.checked_add(in_cluster)).ok_or(())?;
                    match runs.last_mut() {
                        Some((h, l)) if h.checked_add(*l) == Some(host) => *l += n,
                        _ => runs.push((host, n)),
                    }
                }
                _ => return Ok(None),
            }
            pos += n;
        }
        Ok(Some(runs))
    }

    /// Where an in-place write of `len` bytes at guest `offset` would go, without writing: host ranges of
    /// [`Qcow2::data_storage`] appended to `out` (merged where contiguous), for a server that writes them itself
    /// (io_uring with `O_DIRECT`). Only what [`Qcow2::write_quick`] writes without a lock qualifies: every
    /// cluster touched owned by this image, not compressed, every touched subcluster allocated, and its L2 table
    /// cached (nothing is read here: an event loop calls this). The range is marked in the dirty bitmaps before
    /// this returns, as a write does before its data goes out. `false`: write it with [`Qcow2::write`].
    ///
    /// The host clusters stay this image's while the write is in flight: a cluster freed meanwhile (a
    /// concurrent discard) is not handed to a new owner while the image is open (`alloc.rs`).
    pub fn plan_write_cached(&self, offset: u64, len: u64, out: &mut Vec<(u64, u64)>) -> bool {
        if self.writer.is_none() || self.poisoned.load(Ordering::Acquire) || len == 0 {
            return false;
        }
        let Ok(Some(runs)) = self.in_place_runs(offset, len, true) else { return false };
        self.mark_dirty(offset, len);
        out.extend(runs);
        true
    }

    /// [`Qcow2::peek`] from a cached L2 table only; `None` also for anything the writer would refuse.
    fn peek_cached(&self, pos: u64) -> Option<ClusterState> {
        let (l1_idx, idx) = self.indices(pos);
        let e = self.l1.read().ok()?.get(l1_idx).copied()?;
        if e & OFFSET_MASK == 0 || e & OFLAG_COPIED == 0 {
            return None;
        }
        let s = self.l2_cache.with(e & OFFSET_MASK, |t| self.state_of(t, idx))?;
        self.validate(&s, pos).ok()?;
        Some(s)
    }

    /// The locked part of [`Qcow2::write_quick`].
    fn write_if_unlocked(&self, buf: &[u8], offset: u64, backing: BackingReader<'_>) -> Option<Result<()>> {
        let mut st = self.writer.as_ref()?.try_lock().ok()?;
        if st.corrupt || buf.is_empty() || self.too_many_dirty() {
            return None;
        }
        let last = offset.checked_add(buf.len() as u64 - 1)? >> self.cluster_bits;
        if (offset >> self.cluster_bits..=last).any(|c| st.busy.contains(&c)) {
            return None;
        }
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((cs - (pos & (cs - 1))) as usize).min(buf.len() - done);
            let r = self.write_cluster(&mut st, &buf[done..done + n], pos, backing);
            self.note_corruption(&mut st, &r);
            if r.is_err() {
                return Some(r);
            }
            done += n;
        }
        Some(Ok(()))
    }

    fn too_many_dirty(&self) -> bool {
        self.l2_cache.pinned() as u64 * self.cluster_size() > MAX_DIRTY_L2_BYTES
    }

    /// Marks the image corrupt on disk when the writer met an inconsistency (qcow2.rst, incompatible bit 1,
    /// as qemu's `qcow2_signal_corruption` does): from then on it is read-only for this process.
    fn note_corruption<T>(&self, st: &mut WriteState, r: &Result<T>) {
        if let Err(e) = r {
            if e.kind() == ErrorKind::Corrupt && !st.corrupt {
                st.corrupt = true;
                self.poisoned.store(true, Ordering::Release);
                eprintln!("qcow2: marking the image as corrupt: {e}; further writes are refused");
                let bits = (self.header.incompatible_features & !header::INCOMPAT_DIRTY) | header::INCOMPAT_CORRUPT;
                if self.header.version >= 3 {
                    let (off, bytes) = Field::IncompatibleFeatures.encode(bits);
                    let _ = self.file.write_at(&bytes, off);
                    let _ = self.file.flush();
                }
            }
        }
    }

    /// A new data cluster for guest cluster `pos` (host = guest offset with an external data file).
    fn alloc_data(&self, st: &mut WriteState, pos: u64) -> Result<u64> {
        if self.has_data_file() {
            return Ok(pos & !(self.cluster_size() - 1));
        }
        let h = st.refs.alloc(self.file.as_ref(), 1)?;
        self.grow_file_len(&st.refs);
        Ok(h)
    }

    /// Drops this image's reference to the cluster(s) a state points at (after the new entry is durable).
    fn release(&self, st: &mut WriteState, s: &ClusterState) {
        let cb = self.cluster_bits;
        if let Some(d) = s.compressed {
            let first = d.offset >> cb;
            let last = (d.offset + d.len.max(1) - 1) >> cb;
            for c in first..=last {
                st.refs.free_later(c);
            }
        } else if let Some(h) = s.host {
            if !self.has_data_file() {
                st.refs.free_later(h >> cb);
            }
        }
    }

    /// Stores guest cluster `pos` (cluster-aligned) as the compressed bytes `data` (qcow2.rst, "Compressed
    /// Clusters Descriptor"), as qemu's `qcow2_co_pwritev_compressed` does: the bytes are packed after the
    /// previous compressed cluster (`qcow2_alloc_bytes`), spilling into the next host cluster when that is the
    /// next one allocated; each host cluster holding part of it gains a reference. Data before mapping: the
    /// bytes are written, then counted and published. The old mapping, if any, is released.
    pub fn write_compressed(&self, pos: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let len = data.len() as u64;
        if self.has_data_file() {
            return Err(Error::unsupported("compressed clusters cannot be written to an image with a data file"));
        }
        if !pos.is_multiple_of(cs) || len == 0 || len >= cs || pos >= self.size() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "a compressed write is one cluster, smaller once compressed",
            ));
        }
        self.mark_dirty(pos, cs);
        let gc = pos >> cb;
        let mut st = self.wait_cluster(self.lock()?, gc)?;
        let (l1_idx, idx) = self.indices(pos);
        let r = self.l2_for_write(&mut st, l1_idx);
        self.note_corruption(&mut st, &r);
        let l2 = r?;
        let t = self.l2_table(l2)?;
        let state = self.state_of(&t, idx);
        drop(t);
        self.validate(&state, pos)?;
        // Where the bytes go: after the cursor if they fit in its cluster, or spill into the next cluster if
        // that is the one the allocator hands out next; else at the start of a new cluster.
        let offset = match st.compressed_cursor {
            Some(c) if (c % cs) + len <= cs => c,
            Some(c) => {
                let next = st.refs.reserve(self.file.as_ref(), 1)?;
                if next >> cb == (c >> cb) + 1 {
                    c
                } else {
                    next
                }
            }
            None => st.refs.reserve(self.file.as_ref(), 1)?,
        };
        self.grow_file_len(&st.refs);
        let (first, last) = (offset >> cb, (offset + len - 1) >> cb);
        for c in first..=last {
            self.overlap.check_data(c)?;
        }
        self.file.write_at(data, offset)?;
        // Count: once for every host cluster the bytes touch (a cluster reserved just now gets its first).
        for c in first..=last {
            st.refs.count(self.file.as_ref(), c)?;
        }
        let desc = table::CompressedDesc { offset, len };
        let entry = table::encode_compressed(desc, cb);
        self.set_entry(l2, idx, entry, 0)?;
        self.release(&mut st, &state);
        st.compressed_cursor = Some(offset + len).filter(|e| e % cs != 0);
        if self.too_many_dirty() {
            self.flush_locked(&mut st)?;
        }
        Ok(())
    }

    /// [`Qcow2::write_cluster_unlocked`] for a run of whole clusters (`buf` is whole clusters from the
    /// cluster-aligned `pos`): every cluster is reserved under one lock (and marked busy), the guest's bytes are
    /// written without it, one write per contiguous run of host clusters (a whole-cluster write needs no
    /// copy-on-write and no zero fill), and every mapping is published under the lock again: data before
    /// mapping, as for one cluster. Stops at the first busy cluster; returns the bytes handled (0: none, the
    /// caller takes the one-cluster path).
    fn write_run_unlocked(&self, buf: &[u8], pos: u64) -> Result<usize> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let mut st = self.lock()?;
        let mut res: Vec<(Reservation, u64)> = Vec::new();
        for (i, _) in buf.chunks_exact(cs as usize).enumerate() {
            let p = pos + i as u64 * cs;
            if st.busy.contains(&(p >> cb)) {
                break;
            }
            let r = self.reserve(&mut st, p);
            self.note_corruption(&mut st, &r);
            match r {
                Ok(r) => res.push((r, p)),
                Err(e) if res.is_empty() => return Err(e),
                // Publish what was reserved; the caller meets the error again on the next cluster.
                Err(_) => break,
            }
        }
        for (_, p) in &res {
            st.busy.insert(p >> cb);
        }
        drop(st);
        // One write per run of clusters that are contiguous both in the guest and on the host.
        let mut results: Vec<Result<()>> = Vec::with_capacity(res.len());
        let mut i = 0;
        while i < res.len() {
            let mut j = i + 1;
            while j < res.len() && res[j].0.target == res[j - 1].0.target + cs {
                j += 1;
            }
            let (a, b) = ((i as u64 * cs) as usize, (j as u64 * cs) as usize);
            let r = self.data.write_at(&buf[a..b], res[i].0.target);
            for _ in i..j {
                results.push(r.as_ref().map(|_| ()).map_err(|e| Error::new(e.kind(), e.to_string())));
            }
            i = j;
        }
        let mut st = self.lock_any()?;
        for (_, p) in &res {
            st.busy.remove(&(p >> cb));
        }
        self.writer_cv.notify_all();
        let mut first_err = None;
        for ((r, p), filled) in res.iter().zip(results) {
            let out = self.finish(&mut st, r, cs as usize, *p, filled);
            self.note_corruption(&mut st, &out);
            if let Err(e) = out {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if self.too_many_dirty() {
            self.flush_locked(&mut st)?;
        }
        Ok(res.len() * cs as usize)
    }

    /// Slow path for one cluster, with the data I/O outside the writer lock: the host cluster is reserved
    /// (and the guest cluster marked busy) under the lock; the copy-on-write source is read, decompressed and
    /// written with the guest's bytes without it; the new mapping is published under the lock again. Writers
    /// to other clusters run meanwhile; writers to this one wait for it.
    fn write_cluster_unlocked(&self, chunk: &[u8], pos: u64, backing: BackingReader<'_>) -> Result<()> {
        let gc = pos >> self.cluster_bits;
        let mut st = self.wait_cluster(self.lock()?, gc)?;
        let r = self.reserve(&mut st, pos);
        self.note_corruption(&mut st, &r);
        let res = r?;
        st.busy.insert(gc);
        drop(st);
        let filled = self.fill_cluster(&res.state, chunk, pos, res.target, res.in_place, backing);
        let mut st = self.lock_any()?;
        st.busy.remove(&gc);
        self.writer_cv.notify_all();
        let r = self.finish(&mut st, &res, chunk.len(), pos, filled);
        self.note_corruption(&mut st, &r);
        r?;
        if self.too_many_dirty() {
            self.flush_locked(&mut st)?;
        }
        Ok(())
    }

    /// The same under a lock the caller holds (zero writes that must write zeros; rare).
    fn write_cluster(&self, st: &mut WriteState, chunk: &[u8], pos: u64, backing: BackingReader<'_>) -> Result<()> {
        let res = self.reserve(st, pos)?;
        let filled = self.fill_cluster(&res.state, chunk, pos, res.target, res.in_place, backing);
        self.finish(st, &res, chunk.len(), pos, filled)
    }

    /// Chooses where guest cluster `pos` is written: in place if this image owns it, else a new cluster
    /// (its refcount raised in memory; nothing points at it yet).
    fn reserve(&self, st: &mut WriteState, pos: u64) -> Result<Reservation> {
        let (l1_idx, idx) = self.indices(pos);
        let l2 = self.l2_for_write(st, l1_idx)?;
        let t = self.l2_table(l2)?;
        let state = self.state_of(&t, idx);
        drop(t);
        self.validate(&state, pos)?;
        let in_place = state.copied && state.compressed.is_none() && state.host.is_some();
        let target = if in_place {
            state.host.unwrap_or(0)
        } else if self.has_data_file() {
            pos & !(self.cluster_size() - 1)
        } else {
            let h = st.refs.reserve(self.file.as_ref(), 1)?;
            self.grow_file_len(&st.refs);
            h
        };
        Ok(Reservation { l2, idx, state, target, in_place })
    }

    /// Publishes a filled reservation (data before mapping: the data write completed): the new cluster is
    /// counted and the L2 entry changed together. A failed data write (ENOSPC, EIO) fails the request only;
    /// its reserved cluster was never counted.
    fn finish(&self, st: &mut WriteState, res: &Reservation, len: usize, pos: u64, filled: Result<()>) -> Result<()> {
        filled?;
        if st.corrupt {
            return Err(Error::corrupt("the image was found corrupt: writes are refused"));
        }
        if !res.in_place && !self.has_data_file() {
            st.refs.count(self.file.as_ref(), res.target >> self.cluster_bits)?;
        }
        let a = pos & (self.cluster_size() - 1);
        let touched = self.touched(a, a + len as u64);
        let s = &res.state;
        let (alloc, zero) =
            if s.compressed.is_some() { (self.all_bits(), 0) } else { (s.alloc | touched, s.zero & !touched) };
        self.set_mapping(res.l2, res.idx, Some(res.target), alloc, zero)?;
        if !res.in_place {
            self.release(st, s);
        }
        Ok(())
    }

    /// Writes one cluster's new contents at host `target`: the guest's `chunk` at `pos`, merged with what the
    /// cluster read before (copy-on-write from its old place, a compressed cluster or the backing file).
    fn fill_cluster(
        &self,
        s: &ClusterState,
        chunk: &[u8],
        pos: u64,
        target: u64,
        in_place: bool,
        backing: BackingReader<'_>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let cluster_start = pos & !(cs - 1);
        let a = pos - cluster_start;
        let b = a + chunk.len() as u64;
        let touched = self.touched(a, b);
        let ss = 1u64 << self.sc_bits;
        let nsub = self.subclusters();
        // The range rebuilt: touched subclusters in place; when moving, the touched subclusters and those that
        // hold data. Untouched unallocated subclusters of a new cluster are never read, so (as qemu does) they
        // are not written: a first 4 KiB write into an extended-L2 overlay writes 4 KiB, not a cluster.
        let span = |bits: u32| {
            let s0 = u64::from(bits.trailing_zeros());
            let s1 = 32 - u64::from(bits.leading_zeros());
            (s0 * ss, s1 * ss)
        };
        let (r0, r1) = if nsub == 1 || s.compressed.is_some() {
            if in_place {
                (0, ss)
            } else {
                (0, cs)
            }
        } else if in_place {
            span(touched)
        } else {
            span(touched | s.alloc)
        };
        let mut out = vec![0u8; (r1 - r0) as usize];
        let mut decompressed: Option<Vec<u8>> = None;
        // Whether everything around the guest's bytes is zeros by definition (no old data, no backing file).
        let no_backing = !self.has_backing.load(Ordering::Relaxed);
        let mut zero_fill = true;
        for sc in (r0 / ss)..(r1 / ss) {
            let bit = 1u32 << sc;
            let seg = &mut out[(sc * ss - r0) as usize..((sc + 1) * ss - r0) as usize];
            let seg_start = sc * ss;
            // Skip bytes the guest overwrites entirely, and, in place, subclusters that hold data already: only
            // the guest's own bytes go there (rewriting the rest could undo a concurrent fast-path write).
            if (a <= seg_start && b >= seg_start + ss) || (in_place && s.alloc & bit != 0 && s.compressed.is_none()) {
                continue;
            }
            if let Some(d) = s.compressed {
                if decompressed.is_none() {
                    let mut full = vec![0u8; cs as usize];
                    self.read_compressed(d, 0, &mut full)?;
                    decompressed = Some(full);
                }
                if let Some(full) = &decompressed {
                    seg.copy_from_slice(&full[seg_start as usize..(seg_start + ss) as usize]);
                }
                zero_fill = false;
            } else if s.alloc & bit != 0 {
                self.data.read_at(seg, s.host.unwrap_or(0) + seg_start)?;
                zero_fill = false;
            } else if s.zero & bit != 0 {
                // Already zeros.
            } else if touched & bit != 0 && !no_backing {
                backing(seg, cluster_start + seg_start)?;
                zero_fill = false;
            }
        }
        out[(a - r0) as usize..(b - r0) as usize].copy_from_slice(chunk);
        // Data first; the mapping that publishes it changes only after the write completed.
        if in_place {
            let mut pieces: Vec<(u64, u64)> = Vec::new();
            for sc in (r0 / ss)..(r1 / ss) {
                let (x, y) = if s.alloc & (1u32 << sc) != 0 {
                    (a.max(sc * ss), b.min((sc + 1) * ss))
                } else {
                    (sc * ss, (sc + 1) * ss)
                };
                if x >= y {
                    continue;
                }
                match pieces.last_mut() {
                    Some(last) if last.1 == x => last.1 = y,
                    _ => pieces.push((x, y)),
                }
            }
            for (x, y) in pieces {
                self.data.write_at(&out[(x - r0) as usize..(y - r0) as usize], target + x)?;
            }
        } else if zero_fill && !self.has_data_file() {
            // A new cluster always comes from past the end the file had when it was opened and is never
            // handed out twice (`alloc.rs`), so it reads as zeros already: only the guest's bytes are written
            // (qemu writes zeros there with write_zeroes; a hole is the same on every file system).
            self.data.write_at(chunk, target + a)?;
        } else {
            self.data.write_at(&out, target + r0)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros. Whole clusters become zero clusters (v3) or zero
    /// subclusters; with `may_unmap` their host clusters are released. Partial clusters get zeros written.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        backing: BackingReader<'_>,
        has_backing: bool,
    ) -> Result<()> {
        self.zero_or_discard(offset, len, may_unmap, false, backing, has_backing)
    }

    /// Discards whole clusters in the range as qemu does (`--discard=unmap`): they become zero clusters
    /// (unallocated on v2 without a backing file) and their host clusters are released. Partial clusters are
    /// left alone, as the NBD spec allows.
    pub fn discard(&self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        let nop: BackingReader<'_> = &|b: &mut [u8], _| {
            b.fill(0);
            Ok(())
        };
        self.zero_or_discard(offset, len, true, true, nop, has_backing)
    }

    fn zero_or_discard(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        discard: bool,
        backing: BackingReader<'_>,
        has_backing: bool,
    ) -> Result<()> {
        if self.writer.is_none() {
            return Err(Error::new(ErrorKind::ReadOnly, "the image is read-only"));
        }
        // A discard changes what the guest reads too: the bitmaps see it (qemu marks discards dirty).
        self.mark_dirty(offset, len);
        let gran = 1u64 << self.sc_bits;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let unit_end = ((pos / gran) + 1) * gran;
            let n = unit_end.min(end) - pos;
            if n < gran {
                // Partial unit: zeros as data (discard leaves it alone).
                if !discard {
                    self.write(&vec![0u8; n as usize], pos, backing)?;
                }
                pos += n;
                continue;
            }
            // Whole units up to the end of this cluster.
            let cs = self.cluster_size();
            let cluster_end = ((pos / cs) + 1) * cs;
            let span_end = cluster_end.min(end / gran * gran);
            let mut st = self.wait_cluster(self.lock()?, pos >> self.cluster_bits)?;
            let r = self.zero_units(&mut st, pos, span_end, may_unmap, has_backing, backing);
            self.note_corruption(&mut st, &r);
            r?;
            if self.too_many_dirty() {
                self.flush_locked(&mut st)?;
            }
            drop(st);
            pos = span_end;
        }
        Ok(())
    }

    /// Zeroes whole units (subclusters or clusters) `[a, b)` within one cluster.
    fn zero_units(
        &self,
        st: &mut WriteState,
        a: u64,
        b: u64,
        may_unmap: bool,
        has_backing: bool,
        backing: BackingReader<'_>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let cluster_start = a & !(cs - 1);
        let (l1_idx, idx) = self.indices(a);
        let whole = a == cluster_start && b == cluster_start + cs;
        // v2 has no zero flag: write zeros unless the cluster already reads as zeros.
        if self.header.version < 3 {
            let st_now = self.peek_any(a)?;
            let reads_zero = st_now.as_ref().is_none_or(|s| s.host.is_none() && s.compressed.is_none()) && !has_backing;
            if reads_zero {
                return Ok(());
            }
            if whole && may_unmap && !has_backing {
                let l2 = self.l2_for_write(st, l1_idx)?;
                let t = self.l2_table(l2)?;
                let s = self.state_of(&t, idx);
                drop(t);
                self.set_mapping(l2, idx, None, 0, 0)?;
                self.release(st, &s);
                return Ok(());
            }
            let zeros = vec![0u8; (b - a) as usize];
            return self.write_cluster(st, &zeros, a, backing);
        }
        let l2 = self.l2_for_write(st, l1_idx)?;
        let t = self.l2_table(l2)?;
        let s = self.state_of(&t, idx);
        drop(t);
        self.validate(&s, a)?;
        let touched = self.touched(a - cluster_start, b - cluster_start);
        if self.header.extended_l2() {
            if s.compressed.is_some() && !whole {
                // A compressed cluster has no subclusters: decompress it into a new cluster first.
                let mut buf = vec![0u8; (b - a) as usize];
                buf.fill(0);
                return self.write_cluster(st, &buf, a, backing);
            }
            let keep_host = !whole || !may_unmap;
            let kept = match (s.host, s.copied, keep_host && s.compressed.is_none()) {
                (Some(h), true, true) => Some(h),
                _ => None,
            };
            let alloc = if kept.is_some() { s.alloc & !touched } else { 0 };
            let zero = if kept.is_none() { s.zero | touched } else { (s.zero | touched) & !alloc };
            // Dropping the host when other subclusters still hold data would lose them.
            if kept.is_none() && s.alloc & !touched != 0 {
                let zeros = vec![0u8; (b - a) as usize];
                return self.write_cluster(st, &zeros, a, backing);
            }
            let zero = if kept.is_none() {
                zero | (!s.alloc & !s.zero & if has_backing { 0 } else { u32::MAX })
            } else {
                zero
            };
            self.set_mapping(l2, idx, kept, alloc, zero)?;
            if kept.is_none() {
                self.release(st, &s);
            }
            return Ok(());
        }
        // Standard L2, whole cluster: the zero flag, keeping a cluster this image owns unless unmapping.
        let (kept, release) = match (s.host, s.copied, may_unmap, s.compressed) {
            (Some(h), true, false, None) => (Some(h), false),
            _ => (None, true),
        };
        self.set_mapping(l2, idx, kept, 0, 1)?;
        if release {
            self.release(st, &s);
        }
        Ok(())
    }

    /// The L2 state of `pos` even when the L2 table is shared (no allocation).
    fn peek_any(&self, pos: u64) -> Result<Option<ClusterState>> {
        let (l1_idx, idx) = self.indices(pos);
        let e = match self.l1.read().ok().and_then(|l1| l1.get(l1_idx).copied()) {
            Some(e) => e,
            None => return Ok(None),
        };
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let t = self.l2_table(off)?;
        Ok(Some(self.state_of(&t, idx)))
    }

    /// Makes every completed write durable, metadata in the order `alloc.rs` describes.
    pub fn flush(&self) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        let mut st = self.lock()?;
        self.flush_locked(&mut st)
    }

    pub(super) fn flush_locked(&self, st: &mut WriteState) -> Result<()> {
        if st.corrupt {
            return Err(commit::refused());
        }
        // A failed commit (ENOSPC, EIO) leaves everything dirty for the next one: the image stays usable.
        // Only an inconsistency found on the way (an impossible refcount) makes it corrupt.
        let r = self.flush_inner(st);
        self.note_corruption(st, &r);
        r
    }

    /// The whole flush as two commits (see `commit/mod.rs` for the order): everything that publishes or
    /// counts, then the lowered refcounts of what stopped being referenced.
    fn flush_inner(&self, st: &mut WriteState) -> Result<()> {
        // New clusters whose writer wrote only the guest's bytes (`fill_cluster`) may end past the end of
        // the file: give the file its full length first, as qemu's cluster-sized writes would have.
        // Best effort: bytes past the end read as zeros anyway, and a file that cannot change its length (a
        // block device) must still commit.
        let end = st.refs.end_cluster << self.cluster_bits;
        if st.refs.end_cluster != st.end_at_open && self.file.len().is_ok_and(|l| l < end) {
            let _ = self.file.set_len(end);
        }
        let dirty_l2 = self.l2_cache.dirty();
        let mut c = MetaCommit::new(self.has_separate_data());
        let refs = st.refs.add_to(&mut c, false);
        let cb = self.cluster_bits;
        for off in &refs.offsets {
            self.overlap.expect(off >> cb, Kind::RefcountBlock)?;
        }
        let mut offs = Vec::with_capacity(dirty_l2.len());
        for (off, t) in &dirty_l2 {
            self.overlap.expect(off >> cb, Kind::L2Table)?;
            c.add(Stage::Tables, *off, table::encode_table(&t.to_vec()));
            offs.push(*off);
        }
        let l1_written = self.add_l1_entries(st, &mut c)?;
        self.run_commit(&c)?;
        st.refs.committed(&refs);
        self.l2_cache.mark_clean(&offs);
        for i in &l1_written {
            st.l1_dirty.remove(i);
        }
        self.commit_frees(st)
    }

    /// Adds the 512-byte sectors of the L1 table that hold changed entries to `c` (qemu writes L1 entries a
    /// sector at a time too); returns the entries included.
    fn add_l1_entries(&self, st: &WriteState, c: &mut MetaCommit) -> Result<Vec<usize>> {
        if st.l1_dirty.is_empty() {
            return Ok(Vec::new());
        }
        let l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?;
        let per_sector = 512 / 8;
        let mut sectors: Vec<usize> = st.l1_dirty.iter().map(|i| i / per_sector).collect();
        sectors.dedup();
        for s in sectors {
            let first = s * per_sector;
            let last = (first + per_sector).min(l1.len());
            if first < last {
                c.add(Stage::Pointers, self.l1_offset() + (first as u64) * 8, table::encode_table(&l1[first..last]));
            }
        }
        Ok(st.l1_dirty.iter().copied().collect())
    }

    /// Applies the queued refcount decrements, now that the entries that pointed at those clusters are
    /// durable, and commits them.
    pub(super) fn commit_frees(&self, st: &mut WriteState) -> Result<()> {
        if st.refs.pending_free.is_empty() {
            return Ok(());
        }
        st.refs.apply_frees(self.file.as_ref())?;
        let mut c = MetaCommit::new(false);
        let inc = st.refs.add_to(&mut c, true);
        // If this commit fails, the lowered counts stay dirty and go out with the next commit's refcount
        // blocks: the unpublishing writes are durable already, so that order is still safe.
        self.run_commit(&c)?;
        st.refs.committed(&inc);
        Ok(())
    }
}

impl Qcow2 {
    /// Grows the virtual size to `new_size` (shrinking is refused). The L1 table moves to new clusters at
    /// the end of the file if it must grow; the header changes only after the new table is durable.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let mut st = self.lock()?;
        let r = self.resize_locked(&mut st, new_size);
        self.note_corruption(&mut st, &r);
        r
    }

    fn resize_locked(&self, st: &mut WriteState, new_size: u64) -> Result<()> {
        let old = self.size();
        if !self.bitmaps()?.is_empty() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "cannot resize an image with persistent dirty bitmaps (remove them first)",
            ));
        }
        if new_size < old {
            return Err(Error::new(ErrorKind::InvalidArgument, "shrinking qcow2 images is not supported"));
        }
        if new_size > crate::limits::MAX_VIRTUAL_SIZE {
            return Err(Error::new(ErrorKind::InvalidArgument, "the new size is too large"));
        }
        if !self.snapshots.is_empty() && self.header.version < 3 {
            return Err(Error::new(ErrorKind::Unsupported, "Can't resize a v2 image which has snapshots"));
        }
        self.flush_locked(st)?;
        let cs = self.cluster_size();
        let need = new_size.div_ceil(cs * self.l2_entries);
        let cur = self.l1.read().map(|l| l.len() as u64).unwrap_or(0);
        let mut c = MetaCommit::new(self.has_separate_data());
        let mut moved = None;
        let inc = if need > cur {
            if need * 8 > crate::limits::MAX_L1_BYTES {
                return Err(Error::new(ErrorKind::InvalidArgument, "the new size needs an L1 table over 32 MiB"));
            }
            let clusters = (need * 8).div_ceil(cs);
            let off = st.refs.alloc(self.file.as_ref(), clusters)?;
            self.grow_file_len(&st.refs);
            for k in 0..clusters {
                self.overlap.add((off >> self.cluster_bits) + k, Kind::L1Table);
            }
            let mut l1 = self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?.clone();
            l1.resize(need as usize, 0);
            let mut raw = table::encode_table(&l1);
            raw.resize((clusters * cs) as usize, 0);
            // Refcounts of the new table, then the table, then the header that points at it.
            let inc = st.refs.add_to(&mut c, false);
            c.add(Stage::Tables, off, raw);
            moved = Some((off, l1));
            inc
        } else {
            st.refs.add_to(&mut c, false)
        };
        let (l1_off, l1_n) = moved.as_ref().map(|(o, l)| (*o, l.len() as u64)).unwrap_or((self.l1_offset(), cur));
        // Header bytes 24-47 (size, crypt_method, l1_size, l1_table_offset) in one write, inside one sector.
        let (hoff, hdr) = Field::encode_run(&[
            (Field::Size, new_size),
            (Field::CryptMethod, u64::from(self.header.crypt_method)),
            (Field::L1Size, l1_n),
            (Field::L1TableOffset, l1_off),
        ])
        .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "header fields are not adjacent"))?;
        c.add(Stage::Pointers, hoff, hdr);
        if let Err(e) = self.run_commit(&c) {
            if moved.is_some() {
                // The header may or may not point at the new L1 table now (a sync failed after its write):
                // later L1 updates could go to the wrong table, so this process writes no more. The image on
                // disk is consistent either way (both tables hold the same entries).
                st.corrupt = true;
                self.poisoned.store(true, Ordering::Release);
                eprintln!("qcow2: moving the L1 table failed ({e}); the image is read-only until it is reopened");
            }
            return Err(e);
        }
        st.refs.committed(&inc);
        if let Some((off, l1)) = moved {
            let old_off = self.l1_offset();
            for k in 0..(cur * 8).div_ceil(cs) {
                st.refs.free_later((old_off >> self.cluster_bits) + k);
            }
            *self.l1.write().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))? = l1;
            self.l1_offset.store(off, Ordering::Release);
            self.l2_cache.changed();
        }
        self.size.store(new_size, Ordering::Release);
        self.commit_frees(st)
    }

    pub(super) fn l1_offset(&self) -> u64 {
        self.l1_offset.load(Ordering::Acquire)
    }
}

/// How `qimg create -o preallocation=` prepares a new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prealloc {
    /// Map every guest cluster to a host cluster (the file stays sparse).
    Metadata,
    /// Also reserve the space with fallocate.
    Falloc,
    /// Also write zeros over it.
    Full,
}

impl Qcow2 {
    /// Allocates a host cluster for every guest cluster, in order, as qemu's preallocation does.
    pub fn preallocate(&self, mode: Prealloc) -> Result<()> {
        self.preallocate_range(0, self.size(), mode)
    }

    /// Allocates a host cluster for every unmapped guest cluster touching `[start, end)` (`qimg create -o
    /// preallocation=` and, with `grown`, `qimg resize --preallocation=` over the new area). Clusters already
    /// mapped are left alone; with a backing file, a cluster that also holds bytes before `start` is left to
    /// the backing file.
    ///
    /// Nothing stale becomes visible: a new host cluster is past the old end of the file (a hole, read as
    /// zeros; qemu maps it the same way), or it reuses freed space and is written with zeros before its
    /// mapping is published.
    pub fn preallocate_range(&self, start: u64, end: u64, mode: Prealloc) -> Result<()> {
        let mut st = self.lock()?;
        let cs = self.cluster_size();
        let end = end.min(self.size());
        let old_file_len = self.data.len()?;
        let has_backing = self.header.backing_file_offset != 0;
        let mut allocated: Vec<u64> = Vec::new();
        let mut pos = start - start % cs;
        while pos < end {
            let (l1_idx, idx) = self.indices(pos);
            let l2 = self.l2_for_write(&mut st, l1_idx)?;
            let t = self.l2_table(l2)?;
            let s = self.state_of(&t, idx);
            drop(t);
            let shared_with_backing = has_backing && pos < start;
            if s.host.is_none() && s.compressed.is_none() && !shared_with_backing {
                let host = self.alloc_data(&mut st, pos)?;
                // Data before the mapping that publishes it: a reused cluster, or full mode, gets its zeros now.
                let stale = host < old_file_len;
                if mode == Prealloc::Full || stale {
                    self.data.write_zeroes(host, cs, false)?;
                }
                // Extended L2 entries: the host cluster is reserved and its subclusters stay unallocated (read
                // from the backing file or as zeros), as qemu preallocates them.
                let alloc = if self.header.extended_l2() { 0 } else { self.all_bits() };
                self.set_mapping(l2, idx, Some(host), alloc, 0)?;
                allocated.push(host);
            }
            if self.too_many_dirty() {
                self.flush_locked(&mut st)?;
            }
            pos += cs;
        }
        let file_end = st.refs.end_cluster << self.cluster_bits;
        let data_end = if self.has_data_file() { self.size().div_ceil(cs) * cs } else { file_end };
        let len = self.data.len()?;
        if len < data_end {
            match mode {
                Prealloc::Metadata => self.data.set_len(data_end)?,
                // Reserved (falloc) or written with zeros (full) up to the new end.
                Prealloc::Falloc => self.data.allocate(len, data_end - len)?,
                Prealloc::Full => self.data.write_zeroes(len, data_end - len, false)?,
            }
        }
        if mode == Prealloc::Falloc {
            // New clusters inside the old file (reused space) are reserved too.
            for h in allocated.into_iter().filter(|&h| h < len) {
                self.data.allocate(h, cs)?;
            }
        }
        self.flush_locked(&mut st)
    }
}

impl Qcow2 {
    /// `qemu-img commit`'s emptying of the top image: every cluster unallocated again (it reads from the
    /// backing file), each L2 entry cleared before its cluster is freed (the writer's usual order: the frees
    /// go out after the commit that clears the entries).
    pub fn make_empty(&self) -> Result<()> {
        if self.has_data_file() {
            return Err(Error::unsupported("emptying an image with an external data file is not supported"));
        }
        let mut st = self.lock()?;
        let cs = self.cluster_size();
        let size = self.size();
        let span = cs * self.l2_entries;
        let mut pos = 0u64;
        while pos < size {
            let (l1_idx, idx) = self.indices(pos);
            let l1e = self.l1.read().ok().and_then(|l| l.get(l1_idx).copied()).unwrap_or(0) & table::OFFSET_MASK;
            if l1e == 0 {
                pos = (pos / span + 1) * span;
                continue;
            }
            let l2 = self.l2_for_write(&mut st, l1_idx)?;
            let t = self.l2_table(l2)?;
            let s = self.state_of(&t, idx);
            drop(t);
            if s.host.is_some() || s.compressed.is_some() || s.alloc != 0 || s.zero != 0 {
                self.validate(&s, pos)?;
                self.set_mapping(l2, idx, None, 0, 0)?;
                self.release(&mut st, &s);
            }
            if self.too_many_dirty() {
                self.flush_locked(&mut st)?;
            }
            pos += cs;
        }
        self.flush_locked(&mut st)
    }
}
