//! Persistent dirty bitmaps kept up to date while an image is open read-write (qcow2.rst "Bitmaps" and
//! "Dirty tracking bitmaps"), as qemu keeps them:
//!
//! - at a read-write open, every enabled (`auto`) bitmap that is consistent is loaded into memory and marked
//!   `in_use` on disk before any guest write; bitmaps that are disabled or already `in_use` are left as they
//!   are (an `in_use` bitmap stays inconsistent, as qemu treats it);
//! - every write, zero write and discard sets the bits of the ranges it touches (before the change, so a
//!   bitmap never misses one), lock-free;
//! - at close the bitmaps are stored as a new bitmap set (`replace_bitmaps`): new data clusters, tables and
//!   directory (refcounts first), then the header's extension switched to the new directory, then the old
//!   clusters freed. A power cut before the switch leaves the old directory, where the bitmaps are `in_use`
//!   (inconsistent, never wrong); after it, the new one, complete.
//!
//! `qimg bitmap` changes the set the same way, on an image opened with `manage_bitmaps` (nothing tracked).

use super::commit::{MetaCommit, Stage};
use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::{self, BitmapEntry, TableEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::format::header;
use std::sync::atomic::{AtomicU64, Ordering};

/// The type written over a bitmaps extension that is dropped: no extension has it, so readers skip it.
const EXT_RETIRED: u32 = 0x716e_6264;

/// Most memory all tracked bitmaps of one image may take (qemu's limit per bitmap is 512 MiB of data).
const MAX_TRACKED_BYTES: u64 = 256 << 20;

/// One enabled bitmap, in memory.
pub(crate) struct Tracked {
    /// Index of its entry in the directory.
    index: usize,
    granularity_bits: u32,
    /// Bit `i` covers guest bytes `[i << granularity_bits, (i + 1) << granularity_bits)`, bit `i % 64` of word
    /// `i / 64` (the on-disk order: byte `i / 8`, bit `i % 8`, little-endian words).
    bits: Vec<AtomicU64>,
    nbits: u64,
}

impl Tracked {
    fn mark(&self, off: u64, len: u64) {
        if len == 0 || self.nbits == 0 {
            return;
        }
        let first = off >> self.granularity_bits;
        let last = (off.saturating_add(len - 1) >> self.granularity_bits).min(self.nbits - 1);
        if first > last {
            return;
        }
        let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
        for w in w0..=w1 {
            let lo = if w == w0 { first % 64 } else { 0 };
            let hi = if w == w1 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
            if let Some(word) = self.bits.get(w) {
                word.fetch_or(mask, Ordering::Relaxed);
            }
        }
    }

    /// The bitmap data as stored on disk: `data_bytes` bytes.
    fn to_bytes(&self, data_bytes: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bits.len() * 8);
        for w in &self.bits {
            out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        out.resize(data_bytes, 0);
        out
    }

    /// Granule `i`'s bit.
    fn bit(&self, i: u64) -> bool {
        self.bits.get((i / 64) as usize).is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }
}

/// The bitmaps of an image open read-write.
pub(crate) struct Live {
    /// The directory as loaded (flags as on disk: the tracked ones `in_use`).
    entries: Vec<BitmapEntry>,
    pub(super) tracked: Vec<Tracked>,
    /// Set once the bitmaps were stored (at close).
    stored: std::sync::atomic::AtomicBool,
}

impl Live {
    /// Marks `[off, off+len)` dirty in every enabled bitmap.
    pub(crate) fn mark(&self, off: u64, len: u64) {
        for t in &self.tracked {
            t.mark(off, len);
        }
    }
}

/// A bitmap's dirty ranges, for `qemu:dirty-bitmap:NAME` and `qimg`: the runs of `[off, off+len)` that are
/// dirty or clean, in bitmap granules.
pub struct DirtyMap {
    granularity_bits: u32,
    /// In memory (an enabled bitmap of an image open read-write) or loaded from disk.
    bits: Vec<u64>,
    nbits: u64,
}

impl DirtyMap {
    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Whether the granule holding `off` is dirty, and how many bytes from `off` (at most `len`) share that
    /// state.
    pub fn run(&self, off: u64, len: u64) -> (bool, u64) {
        let bit = |i: u64| self.bits.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0);
        run_of(self.granularity_bits, self.nbits, off, len, bit)
    }
}

/// The run of equal bits from guest byte `off`, at most `len` bytes (at least 1): `bit(i)` for granule `i`.
/// Granules are checked one by one, at most 2^20 per call, so a call stays short.
fn run_of(g: u32, nbits: u64, off: u64, len: u64, bit: impl Fn(u64) -> bool) -> (bool, u64) {
    let first = off >> g;
    let dirty = first < nbits && bit(first);
    let end = off.saturating_add(len);
    let mut i = first.saturating_add(1);
    let limit = first.saturating_add(1 << 20);
    while i < nbits && i < limit && i.checked_shl(g).is_some_and(|b| b < end) && bit(i) == dirty {
        i += 1;
    }
    let run_end = i.checked_shl(g).unwrap_or(u64::MAX).min(end);
    (dirty, run_end.saturating_sub(off).clamp(1, len.max(1)))
}

/// The bitmaps extension as it is on disk now, and the header's autoclear bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExtState {
    /// The extension (its fields and where they are), if the header has one.
    pub ext: Option<header::BitmapsExt>,
    /// Autoclear feature bits as on disk.
    pub autoclear: u64,
}

/// What a bitmap of a new bitmap set holds.
pub(crate) enum Content {
    /// Its table and data clusters stay as they are.
    Keep,
    /// New data (`data_bytes` long): written to new clusters with a new table.
    Data(Vec<u8>),
}

/// qemu's refusal of a bitmap marked in use (not stored cleanly).
fn inconsistent(name: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("Bitmap '{name}' is inconsistent and cannot be used"))
}

/// Names qemu-img bitmap refuses.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > bitmap::MAX_NAME_BYTES {
        return Err(Error::new(ErrorKind::InvalidArgument, format!("Bitmap name '{name}' is too long or empty")));
    }
    Ok(())
}

impl Qcow2 {
    /// The persistent dirty bitmaps (the bitmap directory; empty without the bitmaps extension or when the
    /// autoclear bit says the extension is stale).
    pub fn bitmaps(&self) -> Result<Vec<BitmapEntry>> {
        Ok(self.read_directory()?.map(|(_, e)| e).unwrap_or_default())
    }

    pub(super) fn ext_state(&self) -> Result<ExtState> {
        self.bitmap_ext.lock().map(|g| *g).map_err(|_| Error::new(ErrorKind::Io, "bitmap state poisoned"))
    }

    /// The bitmap directory of this image as the header locates it now, checked. `None` without the
    /// extension or when the autoclear bit says it is stale.
    fn read_directory(&self) -> Result<Option<(header::BitmapsExt, Vec<BitmapEntry>)>> {
        let st = self.ext_state()?;
        let Some(ext) = st.ext else { return Ok(None) };
        if st.autoclear & header::AUTOCLEAR_BITMAPS == 0 || ext.nb_bitmaps == 0 {
            return Ok(None);
        }
        let fits = ext.directory_offset.checked_add(ext.directory_size).is_some_and(|e| e <= self.file_len());
        if ext.directory_size > crate::limits::MAX_BITMAP_DIRECTORY_BYTES || !fits {
            return Err(Error::corrupt(format!(
                "bitmap directory at {:#x} ({} bytes) lies outside the file",
                ext.directory_offset, ext.directory_size
            )));
        }
        // qemu's checks of the extension (qcow2.c, "bitmaps extension").
        if !ext.directory_offset.is_multiple_of(self.cluster_size()) || ext.nb_bitmaps > bitmap::MAX_BITMAPS {
            return Err(Error::corrupt(format!(
                "bitmaps extension: directory offset {:#x} or count {} is invalid",
                ext.directory_offset, ext.nb_bitmaps
            )));
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.file.read_at(&mut dir, ext.directory_offset)?;
        let entries = bitmap::parse_directory(&dir, ext.nb_bitmaps)?;
        Ok(Some((ext, entries)))
    }

    /// Sets the in-memory autoclear bits after the header changed them.
    pub(super) fn note_autoclear(&self, bits: u64) {
        if let Ok(mut g) = self.bitmap_ext.lock() {
            g.autoclear = bits;
        }
    }

    /// Replaces the image's bitmaps by `set`, crash-safe: new data clusters, tables and directory are written
    /// and counted first; then the header's bitmaps extension points at the new directory (one write inside a
    /// sector, or with the autoclear bit cleared around it when its 24 bytes straddle a sector, so a torn
    /// write only makes the bitmaps inconsistent); then what only the old set used is freed. Needs a v3 image
    /// opened read-write; the caller holds no writer lock.
    pub(crate) fn replace_bitmaps(&self, set: Vec<(BitmapEntry, Content)>) -> Result<()> {
        if self.header.version < 3 {
            return Err(Error::unsupported("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        let mut st = self.lock()?;
        let old = self.read_directory()?;
        self.flush_locked(&mut st)?;
        let cs = self.cluster_size();
        let size = self.size();
        let mut c = MetaCommit::new(self.has_separate_data());
        let mut entries = Vec::with_capacity(set.len());
        for (mut e, content) in set {
            check_name(&e.name)?;
            if let Content::Data(data) = content {
                let g = e.granularity().ok_or_else(|| Error::invalid("unsupported bitmap granularity"))?;
                let bytes = bitmap::data_bytes(size, g).unwrap_or(0) as usize;
                let mut table = Vec::new();
                for piece in data[..bytes.min(data.len())].chunks(cs as usize) {
                    if piece.iter().all(|&b| b == 0) {
                        table.push(TableEntry::Zeros.encode());
                        continue;
                    }
                    let off = st.refs.alloc(self.file.as_ref(), 1)?;
                    self.grow_file_len(&st.refs);
                    let mut cluster = piece.to_vec();
                    cluster.resize(cs as usize, 0);
                    c.add(Stage::Tables, off, cluster);
                    table.push(TableEntry::Data(off).encode());
                }
                table.resize(bitmap::table_entries(size, g, cs).unwrap_or(0) as usize, 0);
                let table_clusters = ((table.len() as u64) * 8).div_ceil(cs).max(1);
                let toff = st.refs.alloc(self.file.as_ref(), table_clusters)?;
                self.grow_file_len(&st.refs);
                let mut raw = crate::format::table::encode_table(&table);
                raw.resize((table_clusters * cs) as usize, 0);
                c.add(Stage::Tables, toff, raw);
                e.table_offset = toff;
                e.table_size = u32::try_from(table.len()).map_err(|_| Error::invalid("bitmap table too large"))?;
            }
            entries.push(e);
        }
        let dir = bitmap::encode_directory(&entries);
        if dir.len() as u64 > crate::limits::MAX_BITMAP_DIRECTORY_BYTES {
            return Err(Error::invalid("the bitmap directory would be too large"));
        }
        let (dir_off, dir_size) = if entries.is_empty() {
            (0, 0)
        } else {
            let n = (dir.len() as u64).div_ceil(cs);
            let off = st.refs.alloc(self.file.as_ref(), n)?;
            self.grow_file_len(&st.refs);
            self.overlap.add_range(off, n * cs, self.cluster_bits, super::overlap::Kind::BitmapDirectory);
            let mut raw = dir.clone();
            raw.resize((n * cs) as usize, 0);
            c.add(Stage::Tables, off, raw);
            (off, dir.len() as u64)
        };
        let inc = st.refs.add_to(&mut c, false);
        self.run_commit(&c)?;
        st.refs.committed(&inc);
        let nb = u32::try_from(entries.len()).map_err(|_| Error::invalid("too many bitmaps"))?;
        self.switch_bitmaps_ext(nb, dir_size, dir_off)?;
        // What only the old set used: the old directory, and the tables and data clusters of bitmaps that
        // were removed or rewritten. Only what a valid entry names, inside the file, once, and never a cluster
        // the image uses for other metadata: a broken entry's clusters are leaked, not freed.
        if let Some((ext, old_entries)) = old {
            use super::overlap::Kind;
            let mut freed = std::collections::HashSet::new();
            let file_clusters = self.file_len() >> self.cluster_bits;
            let mut free = |c: u64, allowed: Option<Kind>, st: &mut super::write::WriteState| {
                let kind = self.overlap.kind(c);
                if c == 0 || c >= file_clusters || (kind.is_some() && kind != allowed) || !freed.insert(c) {
                    return;
                }
                if kind.is_some() {
                    self.overlap.remove(c);
                }
                st.refs.free_later(c);
            };
            for k in 0..ext.directory_size.div_ceil(cs) {
                free((ext.directory_offset >> self.cluster_bits) + k, Some(Kind::BitmapDirectory), &mut st);
            }
            for e in old_entries {
                let kept = entries.iter().any(|n| n.table_offset == e.table_offset);
                if kept || e.validate(size, self.cluster_bits).is_err() {
                    continue;
                }
                let n = u64::from(e.table_size);
                if let Ok(table) = super::open::read_table(self.file.as_ref(), e.table_offset, n) {
                    for v in table {
                        if let Ok(TableEntry::Data(off)) = TableEntry::decode(v, self.cluster_bits) {
                            free(off >> self.cluster_bits, None, &mut st);
                        }
                    }
                }
                for k in 0..(n * 8).div_ceil(cs).max(1) {
                    free((e.table_offset >> self.cluster_bits) + k, None, &mut st);
                }
            }
        }
        self.commit_frees(&mut st)?;
        if let Ok(mut m) = self.dirty_maps.lock() {
            m.clear();
        }
        Ok(())
    }

    /// Points the header's bitmaps extension at a new directory (see [`Qcow2::replace_bitmaps`]); adds the
    /// extension when the header has none, and sets the autoclear bit.
    fn switch_bitmaps_ext(&self, nb: u32, dir_size: u64, dir_off: u64) -> Result<()> {
        let st = self.ext_state()?;
        let autoclear_on = st.autoclear | header::AUTOCLEAR_BITMAPS;
        let autoclear_off = st.autoclear & !header::AUTOCLEAR_BITMAPS;
        let field = |bits: u64| -> Result<MetaCommit> {
            let (off, bytes) = header::Field::encode_run(&[(header::Field::AutoclearFeatures, bits)])
                .ok_or_else(|| Error::invalid("autoclear field"))?;
            let mut c = MetaCommit::new(self.has_separate_data());
            c.add(Stage::Pointers, off, bytes);
            Ok(c)
        };
        if nb == 0 {
            // No bitmaps left: qemu refuses a bitmaps extension with none ("found bitmaps extension with zero
            // bitmaps"), so the extension goes: the autoclear bit first, then its type becomes one nobody
            // knows (4 bytes in one sector; unknown extensions are skipped by qemu and by this crate).
            if st.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
                self.run_commit(&field(autoclear_off)?)?;
                self.note_autoclear(autoclear_off);
            }
            if let Some(e) = st.ext {
                let mut c = MetaCommit::new(self.has_separate_data());
                c.add(Stage::Pointers, e.at - 8, EXT_RETIRED.to_be_bytes().to_vec());
                self.run_commit(&c)?;
            }
            if let Ok(mut g) = self.bitmap_ext.lock() {
                g.ext = None;
            }
            return Ok(());
        }
        let ext = match st.ext {
            Some(e) => e,
            None => self.add_bitmaps_ext()?,
        };
        let new =
            header::BitmapsExt { nb_bitmaps: nb, directory_size: dir_size, directory_offset: dir_off, at: ext.at };
        let one_sector = ext.at / 512 == (ext.at + 23) / 512;
        let currently_on = st.autoclear & header::AUTOCLEAR_BITMAPS != 0;
        if !one_sector && currently_on {
            // A torn write of the three fields could pair a new offset with an old size: make the extension
            // ignored while they change (a crash here only makes the bitmaps inconsistent).
            self.run_commit(&field(autoclear_off)?)?;
            self.note_autoclear(autoclear_off);
        }
        let mut c = MetaCommit::new(self.has_separate_data());
        c.add(Stage::Pointers, ext.at, new.encode().to_vec());
        self.run_commit(&c)?;
        if let Ok(mut g) = self.bitmap_ext.lock() {
            g.ext = Some(new);
        }
        self.run_commit(&field(autoclear_on)?)?;
        self.note_autoclear(autoclear_on);
        Ok(())
    }

    /// Adds an empty bitmaps extension to the header, crash-safe: the backing file name (if it follows the
    /// extensions) moves further first and its offset is switched; then a new end marker goes after the
    /// space of the new extension; then the extension replaces the old end marker (its type and length are
    /// one 8-byte word, so a torn write leaves the old end or a whole extension header). The autoclear bit is
    /// still clear, so qemu ignores the extension's contents until it is set.
    fn add_bitmaps_ext(&self) -> Result<header::BitmapsExt> {
        let h = &self.header;
        let cs = self.cluster_size();
        let end = h.extensions_end;
        if end == 0 || end < u64::from(h.header_length) {
            return Err(Error::unsupported("the header has no room to add a bitmaps extension"));
        }
        let new_end = end + 32;
        let commit = |writes: Vec<(u64, Vec<u8>)>| -> Result<()> {
            let mut c = MetaCommit::new(self.has_separate_data());
            for (o, d) in writes {
                c.add(Stage::Pointers, o, d);
            }
            self.run_commit(&c)
        };
        if let Some(name) = &h.backing_file {
            let at = h.backing_file_offset;
            if at < new_end + 8 {
                // Past both the new end marker and the name where it is now: the copy never overwrites the
                // name the header still points at.
                let dest = (new_end + 8).max(at + name.len() as u64).next_multiple_of(8);
                if dest + name.len() as u64 > cs {
                    return Err(Error::unsupported("the header has no room to add a bitmaps extension"));
                }
                commit(vec![(dest, name.as_bytes().to_vec())])?;
                let (off, bytes) = header::Field::encode_run(&[(header::Field::BackingFileOffset, dest)])
                    .ok_or_else(|| Error::invalid("backing file offset field"))?;
                commit(vec![(off, bytes)])?;
            }
        } else if new_end + 8 > cs {
            return Err(Error::unsupported("the header has no room to add a bitmaps extension"));
        }
        commit(vec![(new_end, vec![0u8; 8])])?;
        let mut ext = Vec::with_capacity(32);
        ext.extend_from_slice(&header::EXT_BITMAPS.to_be_bytes());
        ext.extend_from_slice(&24u32.to_be_bytes());
        ext.extend_from_slice(&[0u8; 24]);
        commit(vec![(end, ext)])?;
        let e = header::BitmapsExt { nb_bitmaps: 0, directory_size: 0, directory_offset: 0, at: end + 8 };
        if let Ok(mut g) = self.bitmap_ext.lock() {
            g.ext = Some(e);
        }
        Ok(e)
    }

    /// Serialises the bitmap operations (each reads the set, computes and replaces it), and refuses them on an
    /// image whose bitmaps this process tracks (its copy of the set would go stale).
    fn bitmap_op(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        if self.bitmaps_live.get().is_some_and(|l| !l.tracked.is_empty()) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the image's bitmaps are being kept up to date by this process: change them after closing it",
            ));
        }
        self.bitmap_ops.lock().map_err(|_| Error::new(ErrorKind::Io, "bitmap lock poisoned"))
    }

    /// `qimg bitmap --add NAME [-g GRANULARITY] [--disable]`.
    pub fn bitmap_add(&self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        let _op = self.bitmap_op()?;
        check_name(name)?;
        if !granularity.is_power_of_two() || !(512..=1 << 31).contains(&granularity) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Granularity must be power of 2 and at least 512".to_string(),
            ));
        }
        if bitmap::data_bytes(self.size(), granularity).is_none_or(|b| b > bitmap::MAX_DATA_BYTES) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        let cur = self.bitmaps()?;
        if cur.iter().any(|e| e.name == name) {
            return Err(Error::new(ErrorKind::InvalidArgument, format!("Bitmap already exists: {name}")));
        }
        let mut set: Vec<(BitmapEntry, Content)> = cur.into_iter().map(|e| (e, Content::Keep)).collect();
        let e = BitmapEntry {
            table_offset: 0,
            table_size: 0,
            flags: if enabled { FLAG_AUTO } else { 0 },
            kind: bitmap::TYPE_DIRTY_TRACKING,
            granularity_bits: granularity.trailing_zeros() as u8,
            name: name.to_string(),
            extra: Vec::new(),
        };
        set.push((e, Content::Data(Vec::new())));
        self.replace_bitmaps(set)
    }

    /// Finds bitmap `name` for a change, with the set it belongs to.
    fn bitmap_for_change(&self, name: &str) -> Result<(Vec<BitmapEntry>, usize)> {
        let cur = self.bitmaps()?;
        let i = cur
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, format!("Dirty bitmap '{name}' not found")))?;
        Ok((cur, i))
    }

    /// `qimg bitmap --remove NAME`.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        let _op = self.bitmap_op()?;
        let (cur, i) = self.bitmap_for_change(name)?;
        let set = cur.into_iter().enumerate().filter(|(k, _)| *k != i).map(|(_, e)| (e, Content::Keep)).collect();
        self.replace_bitmaps(set)
    }

    /// `qimg bitmap --clear NAME`: all bits clean (an in-use bitmap becomes consistent again).
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        let _op = self.bitmap_op()?;
        let (cur, i) = self.bitmap_for_change(name)?;
        if cur[i].flags & FLAG_IN_USE != 0 {
            return Err(inconsistent(name));
        }
        cur[i].validate(self.size(), self.cluster_bits)?;
        let set = cur
            .into_iter()
            .enumerate()
            .map(|(k, mut e)| {
                if k == i {
                    e.flags &= !FLAG_IN_USE;
                    (e, Content::Data(Vec::new()))
                } else {
                    (e, Content::Keep)
                }
            })
            .collect();
        self.replace_bitmaps(set)
    }

    /// `qimg bitmap --enable NAME` / `--disable NAME`.
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let _op = self.bitmap_op()?;
        let (mut cur, i) = self.bitmap_for_change(name)?;
        if cur[i].flags & FLAG_IN_USE != 0 {
            return Err(inconsistent(name));
        }
        if enabled {
            cur[i].flags |= FLAG_AUTO;
        } else {
            cur[i].flags &= !FLAG_AUTO;
        }
        self.replace_bitmaps(cur.into_iter().map(|e| (e, Content::Keep)).collect())
    }

    /// `qimg bitmap --merge SOURCE NAME`: every granule of `source` (a bitmap of any granularity, of this
    /// image or another of the same size) that is dirty becomes dirty in `name`.
    pub fn bitmap_merge(&self, name: &str, source: &DirtyMap) -> Result<()> {
        let _op = self.bitmap_op()?;
        let (cur, i) = self.bitmap_for_change(name)?;
        let e = &cur[i];
        if e.flags & FLAG_IN_USE != 0 {
            return Err(inconsistent(name));
        }
        e.validate(self.size(), self.cluster_bits)?;
        let g = u32::from(e.granularity_bits);
        let size = self.size();
        let mut data = self.read_bitmap_data(e, self.cluster_size())?;
        let mut pos = 0u64;
        while pos < size {
            let (dirty, n) = source.run(pos, size - pos);
            if dirty {
                let (first, last) = (pos >> g, (pos + n - 1) >> g);
                for b in first..=last {
                    if let Some(byte) = data.get_mut((b / 8) as usize) {
                        *byte |= 1 << (b % 8);
                    }
                }
            }
            pos += n.max(1);
        }
        let set = cur
            .into_iter()
            .enumerate()
            .map(|(k, e)| if k == i { (e, Content::Data(data.clone())) } else { (e, Content::Keep) })
            .collect();
        self.replace_bitmaps(set)
    }

    /// Bitmap `name` of this image as a dirty map (for merging it elsewhere).
    pub fn dirty_map(&self, name: &str) -> Result<Option<DirtyMap>> {
        self.load_dirty_map(name)
    }

    /// Called at a read-write open: loads the enabled bitmaps and marks them `in_use` on disk. Returns
    /// whether the bitmaps extension is kept (its autoclear bit stays set).
    pub(super) fn load_bitmaps(&self) -> Result<bool> {
        let Some((ext, entries)) = self.read_directory()? else {
            return Ok(false);
        };
        let size = self.size();
        let cs = self.cluster_size();
        let mut tracked = Vec::new();
        let mut memory = 0u64;
        for (i, e) in entries.iter().enumerate() {
            if e.flags & FLAG_AUTO == 0 || e.flags & FLAG_IN_USE != 0 {
                continue;
            }
            e.validate(size, self.cluster_bits).map_err(|err| {
                err.context("the image cannot be written without breaking this bitmap (qemu-img check, or remove it)")
            })?;
            let g = u64::from(e.granularity_bits);
            let nbits = size.div_ceil(1 << g);
            let words = nbits.div_ceil(64);
            memory = memory.saturating_add(words.saturating_mul(8));
            if memory > MAX_TRACKED_BYTES {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("bitmap '{}' needs more than {} MiB of memory", e.name, MAX_TRACKED_BYTES >> 20),
                ));
            }
            let data = self.read_bitmap_data(e, cs)?;
            let bits: Vec<AtomicU64> = (0..words as usize)
                .map(|w| {
                    let mut b = [0u8; 8];
                    if let Some(src) = data.get(w * 8..) {
                        let n = src.len().min(8);
                        b[..n].copy_from_slice(&src[..n]);
                    }
                    AtomicU64::new(u64::from_le_bytes(b))
                })
                .collect();
            tracked.push(Tracked { index: i, granularity_bits: g as u32, bits, nbits });
        }
        let entry_at = bitmap::entry_offsets(&entries);
        // in_use before any guest write: a crash from here on leaves these bitmaps inconsistent, never wrong.
        if !tracked.is_empty() {
            let mut c = MetaCommit::new(self.has_separate_data());
            for t in &tracked {
                let e = &entries[t.index];
                let at = ext.directory_offset + entry_at[t.index] + 12;
                c.add(Stage::Pointers, at, (e.flags | FLAG_IN_USE).to_be_bytes().to_vec());
            }
            self.run_commit(&c)?;
        }
        let mut entries = entries;
        for t in &tracked {
            entries[t.index].flags |= FLAG_IN_USE;
        }
        let live = Live { entries, tracked, stored: std::sync::atomic::AtomicBool::new(false) };
        let _ = self.bitmaps_live.set(live);
        Ok(true)
    }

    /// The data bytes of a bitmap, from its table (checked: every data cluster inside the file).
    fn read_bitmap_data(&self, e: &BitmapEntry, cs: u64) -> Result<Vec<u8>> {
        let g = e.granularity().ok_or_else(|| Error::corrupt(format!("bitmap '{}': bad granularity", e.name)))?;
        let bytes = bitmap::data_bytes(self.size(), g).unwrap_or(0);
        let n = u64::from(e.table_size);
        let fits = e.table_offset.checked_add(n * 8).is_some_and(|end| end <= self.file_len());
        if !fits || n * 8 > crate::limits::MAX_L1_BYTES {
            return Err(Error::corrupt(format!("bitmap '{}': table outside the file", e.name)));
        }
        let table = super::open::read_table(self.file.as_ref(), e.table_offset, n)?;
        let mut data = vec![0u8; bytes as usize];
        for (j, v) in table.into_iter().enumerate() {
            let start = j * cs as usize;
            let Some(piece) = data.get_mut(start..(start + cs as usize).min(bytes as usize)) else {
                break;
            };
            match TableEntry::decode(v, self.cluster_bits)? {
                TableEntry::Zeros => {}
                TableEntry::Ones => piece.fill(0xff),
                TableEntry::Data(off) => {
                    if off.checked_add(cs).is_none_or(|end| end > self.file_len()) {
                        return Err(Error::corrupt(format!(
                            "bitmap '{}': data cluster {off:#x} outside the file",
                            e.name
                        )));
                    }
                    self.file.read_at(piece, off)?;
                }
            }
        }
        Ok(data)
    }

    /// Marks `[off, off+len)` dirty in every enabled bitmap (called before each change of guest data).
    pub(crate) fn mark_dirty(&self, off: u64, len: u64) {
        if let Some(b) = self.bitmaps_live.get() {
            b.mark(off, len);
        }
    }

    /// Bitmap `name` at `off`: whether that granule is dirty and for how many bytes (at most `len`) the
    /// answer holds. A bitmap this image keeps up to date answers from memory as it changes; any other is
    /// read from disk once (it cannot change while this process has the image open).
    pub fn dirty_run(&self, name: &str, off: u64, len: u64) -> Result<Option<(bool, u64)>> {
        if let Some(live) = self.bitmaps_live.get() {
            if let Some(t) = live.tracked.iter().find(|t| live.entries[t.index].name == name) {
                return Ok(Some(run_of(t.granularity_bits, t.nbits, off, len, |i| t.bit(i))));
            }
        }
        let mut cache = self.dirty_maps.lock().map_err(|_| Error::new(ErrorKind::Io, "bitmap cache poisoned"))?;
        if !cache.contains_key(name) {
            let m = self.load_dirty_map(name)?;
            if cache.len() >= 64 {
                cache.clear();
            }
            cache.insert(name.to_string(), m.map(std::sync::Arc::new));
        }
        let map = cache.get(name).and_then(|m| m.clone());
        drop(cache);
        Ok(map.map(|m| m.run(off, len)))
    }

    /// Whether this image has a usable bitmap `name`: `Ok(false)` when it has none by that name, an error
    /// when the bitmap is inconsistent (`in_use` on disk and not kept by this process) or malformed.
    pub fn has_usable_bitmap(&self, name: &str) -> Result<bool> {
        if let Some(live) = self.bitmaps_live.get() {
            if live.tracked.iter().any(|t| live.entries[t.index].name == name) {
                return Ok(true);
            }
        }
        let Some((_, entries)) = self.read_directory()? else { return Ok(false) };
        let Some(e) = entries.iter().find(|e| e.name == name) else { return Ok(false) };
        if e.flags & FLAG_IN_USE != 0 {
            return Err(inconsistent(name));
        }
        e.validate(self.size(), self.cluster_bits)?;
        Ok(true)
    }

    /// Whether this image (open read-write) keeps persistent bitmaps up to date.
    pub fn tracks_bitmaps(&self) -> bool {
        self.bitmaps_live.get().is_some_and(|b| !b.tracked.is_empty())
    }

    /// Bitmap `name` as stored on disk; `None` when there is no such bitmap.
    fn load_dirty_map(&self, name: &str) -> Result<Option<DirtyMap>> {
        let Some((_, entries)) = self.read_directory()? else { return Ok(None) };
        let Some(e) = entries.into_iter().find(|e| e.name == name) else { return Ok(None) };
        if e.flags & FLAG_IN_USE != 0 {
            return Err(inconsistent(name));
        }
        e.validate(self.size(), self.cluster_bits)?;
        let g = u32::from(e.granularity_bits);
        let nbits = self.size().div_ceil(1 << g);
        if nbits / 8 > MAX_TRACKED_BYTES {
            return Err(Error::new(ErrorKind::Unsupported, format!("bitmap '{name}' is too large to load")));
        }
        let data = self.read_bitmap_data(&e, self.cluster_size())?;
        let bits = data
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(Some(DirtyMap { granularity_bits: g, bits, nbits }))
    }

    /// Stores the tracked bitmaps (at close) as a new bitmap set with their `in_use` flags cleared (see
    /// [`Qcow2::replace_bitmaps`]); the others stay as they are. Runs once.
    pub(crate) fn store_bitmaps(&self) -> Result<()> {
        let Some(live) = self.bitmaps_live.get() else { return Ok(()) };
        if live.tracked.is_empty() || live.stored.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let size = self.size();
        let set = live
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| match live.tracked.iter().find(|t| t.index == i) {
                Some(t) => {
                    let bytes = bitmap::data_bytes(size, 1 << t.granularity_bits).unwrap_or(0) as usize;
                    let mut e = e.clone();
                    e.flags &= !FLAG_IN_USE;
                    (e, Content::Data(t.to_bytes(bytes)))
                }
                None => (e.clone(), Content::Keep),
            })
            .collect();
        self.replace_bitmaps(set)
    }
}
