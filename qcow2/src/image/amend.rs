//! `qemu-img amend` for qcow2: the version (`compat=0.10|1.1`), `lazy_refcounts` and (through
//! `snapshots.rs`) `refcount_bits`.
//!
//! A version change rewrites the header and moves its extensions (qcow2.rst "Header", "Header extensions"):
//! version 2 ends the header at byte 72, version 3 at `header_length`. The new header with its extensions
//! must fit the first sector, which is then written once; a backing file name that does not fit goes first
//! to bytes of cluster 0 that the old header does not use, and is made durable before the sector names it.
//! qemu writes its feature name table too (384 bytes, optional): qimg leaves it out so the switch stays one
//! sector. Either way, a power cut leaves the old header or the new one.

#![deny(clippy::arithmetic_side_effects)] // offsets and lengths here come from the image

use super::commit::{MetaCommit, Stage};
use super::write::WriteState;
use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{self, Field};
use crate::format::table::OFFSET_MASK;
use std::sync::atomic::Ordering;

const SECTOR: usize = 512;

/// The header length qemu writes for version 3 (104 bytes, the compression type byte and padding).
const V3_LEN: usize = 112;

impl Qcow2 {
    /// Turns lazy refcounts on or off (a version 3 compatible feature bit; the image must be clean, which
    /// opening it read-write made it).
    pub fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        let h = &self.header;
        if h.version < 3 {
            if !on {
                return Ok(());
            }
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        let bits = if on {
            h.compatible_features | header::COMPAT_LAZY_REFCOUNTS
        } else {
            h.compatible_features & !header::COMPAT_LAZY_REFCOUNTS
        };
        if bits == h.compatible_features {
            return Ok(());
        }
        self.flush()?;
        let mut st = self.lock()?;
        st.retire();
        self.poisoned.store(true, Ordering::Release);
        self.commit_header(&[(Field::CompatibleFeatures, bits)])
    }

    /// Clears `data_file_raw` (the external data file need no longer stay a valid raw image).
    pub fn set_data_file_raw_off(&self) -> Result<()> {
        let h = &self.header;
        if h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW == 0 {
            return Ok(());
        }
        self.flush()?;
        let mut st = self.lock()?;
        st.retire();
        self.poisoned.store(true, Ordering::Release);
        let bits = self.ext_state()?.autoclear & !header::AUTOCLEAR_DATA_FILE_RAW;
        self.commit_header(&[(Field::AutoclearFeatures, bits)])
    }

    /// Changes the image's version (2 or 3). Going to version 2 is refused where version 2 cannot say what
    /// the image holds: zero clusters, refcounts other than 16 bits, or any version 3 feature.
    pub fn set_version(&self, version: u32) -> Result<()> {
        let h = &self.header;
        if version == h.version {
            return Ok(());
        }
        if version == 2 {
            if h.refcount_order != 4 {
                return Err(Error::new(ErrorKind::InvalidArgument, "compat=0.10 requires refcount_bits=16"));
            }
            let v3_only = h.incompatible_features != 0
                || h.bitmaps.is_some()
                || h.autoclear_features != 0
                || h.data_file.is_some()
                || h.extensions.iter().any(|e| e.kind == header::EXT_CRYPTO);
            if v3_only {
                return Err(Error::unsupported(
                    "compat=0.10: the image uses version 3 features (an external data file, extended L2 entries, \
                     compression other than zlib, or bitmaps), which qimg does not downgrade",
                ));
            }
            // qemu: a snapshot with VM state or of another size could not be applied to a version 2 image.
            if self.snapshots.iter().any(|s| s.vm_state_size != 0 || s.disk_size.is_some_and(|d| d != self.size())) {
                return Err(Error::new(ErrorKind::InvalidArgument, "Internal snapshots prevent downgrade of image"));
            }
            let r = self.check()?;
            if r.corruptions != 0 || r.check_errors != 0 {
                return Err(Error::corrupt("the image does not check clean; repair it first (qimg check -r all)"));
            }
            if self.has_zero_clusters()? {
                return Err(Error::unsupported(
                    "compat=0.10: the image has zero clusters, which version 2 cannot express; qimg does not expand them",
                ));
            }
        } else if version != 3 {
            return Err(Error::new(ErrorKind::InvalidArgument, format!("unknown version {version}")));
        } else if self.snapshot_entries_too_short_for_v3() {
            return Err(Error::invalid(
                "a snapshot table entry lacks the extra data version 3 requires (complete_snapshot_entries first)",
            ));
        }
        self.flush()?;
        let mut st = self.lock()?;
        let mut head = vec![0u8; 72];
        self.file.read_at(&mut head, 0)?;
        head[4..8].copy_from_slice(&version.to_be_bytes());
        if version == 3 {
            head.resize(V3_LEN, 0);
            // incompatible, compatible and autoclear features: none; refcount_order 4; header_length.
            head[96..100].copy_from_slice(&4u32.to_be_bytes());
            head[100..104].copy_from_slice(&(V3_LEN as u32).to_be_bytes());
        }
        // The extensions, byte for byte, but the feature name table (meaningless in version 2, optional in 3).
        let exts: Vec<(u32, Vec<u8>)> = h
            .extensions
            .iter()
            .filter(|e| e.kind != header::EXT_FEATURE_NAMES)
            .map(|e| (e.kind, e.data.clone()))
            .collect();
        self.rewrite_header_area(&mut st, head, &exts)
    }

    /// Names `name` as the external data file (`amend -o data_file=`; the image must have one already).
    pub fn set_data_file_name(&self, name: &str) -> Result<()> {
        let h = &self.header;
        if h.incompatible_features & header::INCOMPAT_DATA_FILE == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "data-file can only be set for images that use an external data file",
            ));
        }
        if name.is_empty() || name.len() > crate::limits::MAX_BACKING_NAME as usize {
            return Err(Error::new(ErrorKind::InvalidArgument, format!("data file name '{name}' is invalid")));
        }
        self.flush()?;
        let mut st = self.lock()?;
        let mut head = vec![0u8; h.header_length as usize];
        self.file.read_at(&mut head, 0)?;
        let mut exts: Vec<(u32, Vec<u8>)> = h
            .extensions
            .iter()
            .filter(|e| e.kind != header::EXT_FEATURE_NAMES && e.kind != header::EXT_DATA_FILE)
            .map(|e| (e.kind, e.data.clone()))
            .collect();
        exts.push((header::EXT_DATA_FILE, name.as_bytes().to_vec()));
        self.rewrite_header_area(&mut st, head, &exts)
    }

    /// Writes `head` (the header proper) followed by `exts` and the end marker in one write of the first
    /// sector, the backing file name kept or moved first to bytes of cluster 0 the old header does not use.
    /// The handle is stale afterwards.
    fn rewrite_header_area(&self, st: &mut WriteState, mut head: Vec<u8>, exts: &[(u32, Vec<u8>)]) -> Result<()> {
        let h = &self.header;
        for (kind, data) in exts {
            head.extend_from_slice(&kind.to_be_bytes());
            head.extend_from_slice(&(data.len() as u32).to_be_bytes());
            head.extend_from_slice(data);
            head.resize(head.len().div_ceil(8).saturating_mul(8), 0);
        }
        head.extend_from_slice(&[0u8; 8]);
        if head.len() > SECTOR {
            return Err(Error::unsupported(
                "the header's extensions do not fit in one sector: qimg cannot change them in one atomic write",
            ));
        }
        let cs = self.cluster_size() as usize;
        let mut sector = vec![0u8; SECTOR];
        self.file.read_at(&mut sector, 0)?;
        if let Some(name) = &h.backing_file {
            // Where the name goes: where it is, if the new header stops short of it; else past both the new
            // header and the old name, in bytes the old header does not use.
            let old = h.backing_file_offset as usize;
            let old_end = old.saturating_add(name.len());
            let old_exts_end = (h.extensions_end as usize).saturating_add(8);
            let dest = if head.len() <= old { old } else { head.len().max(old_end).max(old_exts_end) };
            if dest.saturating_add(name.len()) > cs {
                return Err(Error::unsupported("cluster 0 has no room for the backing file name"));
            }
            head[8..16].copy_from_slice(&(dest as u64).to_be_bytes());
            let name_end = dest.saturating_add(name.len());
            if let Some(dst) = sector.get_mut(dest..name_end) {
                dst.copy_from_slice(name.as_bytes());
            } else if dest != old {
                let mut c = MetaCommit::new(self.has_separate_data());
                c.add(Stage::Tables, dest as u64, name.as_bytes().to_vec());
                self.run_commit(&c)?;
                // The name may start inside the first sector: keep what was just written there.
                self.file.read_at(&mut sector, 0)?;
            }
        }
        sector[..head.len()].copy_from_slice(&head);
        st.retire();
        self.poisoned.store(true, Ordering::Release);
        let mut c = MetaCommit::new(self.has_separate_data());
        c.add(Stage::Pointers, 0, sector);
        self.run_commit(&c)
    }

    /// Whether any L2 table, active or a snapshot's, has a zero cluster or subcluster.
    fn has_zero_clusters(&self) -> Result<bool> {
        let mut l1s = vec![self.l1.read().map_err(|_| Error::new(ErrorKind::Io, "L1 lock poisoned"))?.clone()];
        for s in &self.snapshots {
            if u64::from(s.l1_size) * 8 > crate::limits::MAX_L1_BYTES {
                return Err(Error::invalid(format!("snapshot '{}' L1 table is too large", s.name)));
            }
            l1s.push(super::open::read_table(self.file.as_ref(), s.l1_table_offset, u64::from(s.l1_size))?);
        }
        let step = if self.header.extended_l2() { 2 } else { 1 };
        for l1 in l1s {
            for e in l1 {
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let t = self.l2_table(l2)?;
                let n = (self.l2_entries as usize).min(t.len().checked_div(step).unwrap_or(0));
                for idx in 0..n {
                    let at = idx.saturating_mul(step);
                    let bm = if step == 2 { t.word(at.saturating_add(1)) } else { 0 };
                    let d = self.layout.decode(t.word(at), bm);
                    if d.compressed.is_none() && d.zero != 0 {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}
