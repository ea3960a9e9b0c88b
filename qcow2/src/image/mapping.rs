//! Guest range → host range, through the L1 table and the L2 cache (qcow2.rst, "Cluster mapping").

use super::cache::Table;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::header;
use crate::format::offset::{GuestOffset, HostOffset};
use crate::format::table::{self, CompressedDesc, L2Kind};

/// Where a run of guest bytes lives in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Plain data at `host` (the host offset of the run's first byte).
    Data {
        /// Host offset of the first byte.
        host: HostOffset,
    },
    /// Reads as zeros; `host` is set for preallocated zero clusters.
    Zero {
        /// Host offset of the first byte, if preallocated.
        host: Option<HostOffset>,
    },
    /// Not allocated in this layer: the backing file (or zeros) supplies the data.
    Unallocated {
        /// Host offset of the first byte, if the cluster has one (extended L2, raw external data file).
        host: Option<HostOffset>,
    },
    /// Inside a compressed cluster (one cluster at most).
    Compressed {
        /// The cluster's descriptor.
        desc: CompressedDesc,
        /// Offset of the run's first byte inside the cluster.
        in_cluster: u64,
    },
}

impl Mapping {
    /// The host offset this mapping gives the byte `delta` bytes into the run, if any.
    fn host_at(&self, delta: u64) -> Option<u64> {
        match *self {
            Mapping::Data { host } => host.get().checked_add(delta),
            Mapping::Zero { host } | Mapping::Unallocated { host } => host.and_then(|h| h.get().checked_add(delta)),
            Mapping::Compressed { .. } => None,
        }
    }

    /// Whether `next`, found `delta` bytes after the start of `self`, continues the same run.
    fn continued_by(&self, next: &Mapping, delta: u64) -> bool {
        let same_kind = matches!(
            (self, next),
            (Mapping::Data { .. }, Mapping::Data { .. })
                | (Mapping::Zero { .. }, Mapping::Zero { .. })
                | (Mapping::Unallocated { .. }, Mapping::Unallocated { .. })
        );
        same_kind && self.host_at(delta) == next.host_at(0)
    }
}

impl Qcow2 {
    /// Maps the guest range starting at `guest`, at most `max_len` bytes long, and returns the mapping of its
    /// first run and that run's length (> 0). `guest` must be below the virtual size.
    pub fn mapping(&self, guest: GuestOffset, max_len: u64) -> Result<(Mapping, u64)> {
        match self.mapping_io(guest, max_len, true)? {
            Some(m) => Ok(m),
            None => Err(Error::new(crate::ErrorKind::Corrupt, "an L2 table could not be read")),
        }
    }

    /// [`Qcow2::mapping`] without reading anything from the file: `None` when the L2 table it needs is not in
    /// the cache (for callers that must not wait for the disk, like an event loop).
    pub fn mapping_cached(&self, guest: GuestOffset, max_len: u64) -> Result<Option<(Mapping, u64)>> {
        self.mapping_io(guest, max_len, false)
    }

    fn mapping_io(&self, guest: GuestOffset, max_len: u64, io: bool) -> Result<Option<(Mapping, u64)>> {
        let guest = guest.get();
        let size = self.size();
        if guest >= size || max_len == 0 {
            return Err(Error::new(crate::ErrorKind::OutOfBounds, format!("mapping at {guest} is past the end")));
        }
        let cb = self.cluster_bits;
        let end = guest + max_len.min(size - guest);
        let cluster = guest >> cb;
        // l2_entries is a power of two: shifts and masks, not divisions, on the hot path.
        let l1_idx = cluster >> self.l2_entries.trailing_zeros();
        let cover_end = (l1_idx + 1).saturating_mul(self.l2_entries << cb);
        let lim = end.min(cover_end);
        // This thread's last table, if it is still the table for this L1 index: no lock, no reference count.
        let l1_entry = self.l1.read().ok().and_then(|l1| l1.get(l1_idx as usize).copied()).unwrap_or(0);
        let l2_off = table::l1_l2_offset(l1_entry);
        if l2_off == 0 {
            let m = self.unallocated_at(guest);
            return Ok(Some((m, self.extend(m, guest, lim, |p| Ok(self.unallocated_at(p)))?)));
        }
        if let Some(r) = self.l2_cache.with(l2_off, |t| self.map_in(t, guest, lim)) {
            return r.map(Some);
        }
        if !io {
            return Ok(None);
        }
        let t = self.l2_table(l2_off)?;
        self.l2_cache.read(|| self.map_in(&t, guest, lim)).map(Some)
    }

    /// The mapping at `guest` and its run up to `lim`, from L2 table `t`.
    #[inline(always)]
    fn map_in(&self, t: &Table, guest: u64, lim: u64) -> Result<(Mapping, u64)> {
        let first = self.classify(t, guest)?;
        if let Mapping::Compressed { .. } = first {
            let cluster_end = ((guest >> self.cluster_bits) + 1) << self.cluster_bits;
            return Ok((first, cluster_end.min(lim) - guest));
        }
        // A run inside one unit (a 4 KiB read in a cluster): nothing to extend.
        let unit_end = ((guest >> self.sc_bits) + 1) << self.sc_bits;
        if unit_end >= lim {
            return Ok((first, lim - guest));
        }
        Ok((first, self.extend(first, guest, lim, |p| self.classify(t, p))?))
    }

    /// Extends the run that starts at `guest` with mapping `first` over following units up to `lim`.
    fn extend(&self, first: Mapping, guest: u64, lim: u64, mut at: impl FnMut(u64) -> Result<Mapping>) -> Result<u64> {
        let unit = 1u64 << self.sc_bits;
        let mut pos = ((guest >> self.sc_bits) + 1) << self.sc_bits;
        while pos < lim {
            let next = at(pos)?;
            if !first.continued_by(&next, pos - guest) {
                break;
            }
            pos += unit;
        }
        Ok(pos.min(lim) - guest)
    }

    fn unallocated_at(&self, guest: u64) -> Mapping {
        // With a raw external data file, every guest offset has the same host offset (qcow2.rst, autoclear
        // bit 1).
        Mapping::Unallocated { host: self.data_file_raw.then_some(HostOffset(guest)) }
    }

    /// What the L2 table `t` says about the byte at `guest`.
    #[inline(always)]
    fn classify(&self, t: &Table, guest: u64) -> Result<Mapping> {
        let cb = self.cluster_bits;
        let cs = 1u64 << cb;
        let idx = ((guest >> cb) & (self.l2_entries - 1)) as usize;
        let has_data_file = self.header.incompatible_features & header::INCOMPAT_DATA_FILE != 0;
        let in_cluster = guest & (cs - 1);
        let kind = if self.layout.extended {
            let (e, bm) = (t.word(2 * idx), t.word(2 * idx + 1));
            if e & table::OFLAG_COMPRESSED != 0 && bm != 0 {
                return Err(bad_bitmap(bm, guest, true));
            }
            let sc = (in_cluster >> self.sc_bits) as u32;
            match self.layout.kind(&self.layout.decode(e, bm), sc) {
                Some(k) => k,
                None => return Err(bad_bitmap(bm, guest, false)),
            }
        } else {
            let d = self.layout.decode(t.word(idx), 0);
            self.layout.kind(&d, 0).unwrap_or(L2Kind::Unallocated { host: None })
        };
        let check_host = |h: u64| -> Result<HostOffset> {
            if h & (cs - 1) == 0 && (has_data_file || (h != 0 && h < self.file_len())) {
                Ok(HostOffset(h + in_cluster))
            } else {
                Err(self.bad_host(h, guest, has_data_file))
            }
        };
        Ok(match kind {
            L2Kind::Data { host } => Mapping::Data { host: check_host(host)? },
            L2Kind::Zero { host } => Mapping::Zero { host: host.map(check_host).transpose()? },
            L2Kind::Unallocated { host: Some(h) } => Mapping::Unallocated { host: Some(check_host(h)?) },
            L2Kind::Unallocated { host: None } => self.unallocated_at(guest),
            L2Kind::Compressed(desc) => {
                if has_data_file {
                    return Err(Error::corrupt("compressed cluster in an image with an external data file"));
                }
                if desc.offset >= self.file_len() || desc.offset < cs {
                    return Err(Error::corrupt(format!(
                        "compressed cluster for guest offset {guest:#x} at host offset {:#x} lies outside the file",
                        desc.offset
                    )));
                }
                Mapping::Compressed { desc, in_cluster }
            }
        })
    }

    /// Why host offset `h` for guest offset `guest` is refused (off the hot path: only built on corruption).
    #[cold]
    #[inline(never)]
    fn bad_host(&self, h: u64, guest: u64, has_data_file: bool) -> Error {
        if h & (self.cluster_size() - 1) != 0 {
            Error::corrupt(format!(
                "cluster offset {h:#x} for guest offset {guest:#x} is not aligned to the cluster size"
            ))
        } else if !has_data_file && h == 0 {
            Error::corrupt(format!("data cluster for guest offset {guest:#x} points at the header"))
        } else {
            Error::corrupt(format!(
                "data cluster for guest offset {guest:#x} at host offset {h:#x} lies past the end of the file ({} \
                 bytes)",
                self.file_len()
            ))
        }
    }
}

#[cold]
#[inline(never)]
fn bad_bitmap(bm: u64, guest: u64, compressed: bool) -> Error {
    if compressed {
        Error::corrupt(format!("compressed cluster at guest offset {guest:#x} has a non-zero subcluster bitmap"))
    } else {
        Error::corrupt(format!("invalid subcluster bitmap {bm:#018x} at guest offset {guest:#x}"))
    }
}
