//! The metadata overlap check (qemu's `qcow2_check_metadata_overlap`, in its default "cached" mode): before
//! guest data is written to a host cluster, and before a metadata structure is written, the target is
//! checked against every metadata cluster the image knows. A hostile or damaged image whose L2 entry points
//! at, say, a refcount block would otherwise let a guest write overwrite its own metadata. A hit marks the
//! image corrupt (the caller's `note_corruption`), as qemu does.
//!
//! The map is built when an image is opened read-write: the header cluster, the active L1 table, the
//! refcount table and its blocks, the active L2 tables, the snapshot table and the snapshots' L1 tables,
//! and the bitmap directory. Clusters the writer allocates for metadata are added as they are allocated.
//! Nothing is ever removed: a freed cluster is never reused while the image is open (`alloc.rs`).

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::RwLock;

/// What a metadata cluster holds (qemu's names, as its corruption messages print them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Cluster 0: the header and its extensions.
    Header,
    /// The active L1 table.
    L1Table,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// An L2 table of the active L1 table.
    L2Table,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    SnapshotL1,
    /// The bitmap directory.
    BitmapDirectory,
}

impl Kind {
    /// qemu's name for the structure.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Header => "qcow2_header",
            Kind::L1Table => "active L1 table",
            Kind::RefcountTable => "refcount table",
            Kind::RefcountBlock => "refcount block",
            Kind::L2Table => "active L2 table",
            Kind::SnapshotTable => "snapshot table",
            Kind::SnapshotL1 => "inactive L1 table",
            Kind::BitmapDirectory => "bitmap directory",
        }
    }
}

/// Metadata clusters by cluster index.
#[derive(Debug, Default)]
pub struct Map {
    clusters: RwLock<HashMap<u64, Kind>>,
}

impl Map {
    /// Records cluster `c` as holding `kind`, unless it is known already (the first structure found there
    /// keeps the cluster; a second one is caught by [`Map::expect`] before it is written).
    pub fn add(&self, c: u64, kind: Kind) {
        if let Ok(mut m) = self.clusters.write() {
            m.entry(c).or_insert(kind);
        }
    }

    /// Records every cluster of the byte range `[start, start+len)`.
    pub fn add_range(&self, start: u64, len: u64, cluster_bits: u32, kind: Kind) {
        if len == 0 {
            return;
        }
        let first = start >> cluster_bits;
        let last = start.saturating_add(len - 1) >> cluster_bits;
        if let Ok(mut m) = self.clusters.write() {
            for c in first..=last {
                m.entry(c).or_insert(kind);
            }
        }
    }

    /// How many clusters are known.
    /// Forgets cluster `c` (a metadata cluster that was freed).
    pub fn remove(&self, c: u64) {
        if let Ok(mut m) = self.clusters.write() {
            m.remove(&c);
        }
    }

    /// Number of metadata clusters known.
    pub fn len(&self) -> usize {
        self.clusters.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no cluster is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What cluster `c` holds, if it is metadata.
    pub fn kind(&self, c: u64) -> Option<Kind> {
        self.clusters.read().ok().and_then(|m| m.get(&c).copied())
    }

    /// Refuses a guest data write to host cluster `c` if it holds metadata.
    pub fn check_data(&self, c: u64) -> Result<()> {
        match self.kind(c) {
            None => Ok(()),
            Some(k) => Err(Error::corrupt(format!(
                "Preventing invalid write on metadata (overlaps with {}) at host cluster {c}",
                k.name()
            ))),
        }
    }

    /// Refuses writing a `kind` structure to cluster `c` if the cluster is known to hold something else.
    pub fn expect(&self, c: u64, kind: Kind) -> Result<()> {
        match self.kind(c) {
            Some(k) if k != kind => Err(Error::corrupt(format!(
                "Preventing invalid write on metadata: the {} at host cluster {c} overlaps with {}",
                kind.name(),
                k.name()
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_write_onto_metadata_is_refused_by_name() {
        let m = Map::default();
        m.add_range(0x10000, 0x20000, 16, Kind::RefcountTable);
        m.add(5, Kind::L2Table);
        assert!(m.check_data(4).is_ok());
        let e = m.check_data(2).unwrap_err();
        assert!(e.to_string().contains("refcount table"), "{e}");
        assert!(m.check_data(5).is_err());
        assert!(m.expect(5, Kind::L2Table).is_ok());
        assert!(m.expect(1, Kind::L2Table).is_err());
        assert!(m.expect(9, Kind::RefcountBlock).is_ok());
    }
}
