//! The metadata commit: the only code that writes qcow2 metadata to disk, and the order it writes it in.
//!
//! # Ordering rules (written here and nowhere else)
//! A power cut may keep any subset of the writes issued since the last completed sync, each torn at
//! 512-byte sectors (the crash model in `tests/crash_model.rs` replays exactly that). So whenever one write
//! makes another meaningful, the first is followed by a sync before the second is issued. A commit is a list
//! of [`Stage`]s, each a set of independent writes followed by a sync; empty stages are skipped.
//! 1. **Guest data before the mapping that publishes it** (qcow2.rst, "Cluster mapping"): the data file and
//!    the image file are synced before the first metadata write of a commit. Data reaches newly allocated
//!    clusters before the L2 entry changes even in memory (see `write.rs`).
//! 2. **Refcounts before anything that uses them** (qcow2.rst, "Reference counts"): refcount blocks
//!    ([`Stage::RefcountBlocks`]) → sync → the refcount-table entries pointing at new blocks
//!    ([`Stage::RefcountTable`]) → sync → the header fields pointing at a moved refcount table
//!    ([`Stage::RefcountHeader`]) → sync. A cluster's raised refcount is durable before any L2 or L1 entry
//!    that points at it is written (at worst a crash leaks it).
//! 3. **A table before anything that points at it**: L2 tables, new, copied from a snapshot's or changed
//!    in place, and a moved L1 table ([`Stage::Tables`]) → sync → L1 entries and header fields that point at
//!    them ([`Stage::Pointers`]) → sync. (qemu's cache dependency: the L2 cache is flushed before the L1
//!    entry is written.)
//! 4. **Unpublish before freeing**: a refcount is lowered only in a second commit ([`Stage::Frees`]), after
//!    the L2/L1 entries that stopped pointing at the cluster are durable. Freed clusters are never handed
//!    out again while the image is open (`alloc.rs`), so a request still in flight, or a `sendfile` of a
//!    planned read, can never touch a cluster that has a new owner.
//! 5. **Failures** (ENOSPC, EIO): a commit that fails changes nothing in memory. Every table and block stays
//!    dirty, the next commit writes all of it again (each write holds whole current contents, so writing it
//!    twice is harmless), and the image stays usable. Only a real inconsistency (see `overlap.rs`) marks an
//!    image corrupt.
//!
//! A commit runs through an injected [`CommitSink`] when one is set (qnbd's commit helper process, which
//! finishes a started commit even if the server is killed), or else in the calling thread.

pub mod helper;

pub use helper::{install_helper, shutdown_helper};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// The steps of a commit, in the order they reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Refcount blocks (new ones, and raised counts in existing ones).
    RefcountBlocks,
    /// The refcount table: entries for new blocks, or the whole table at its new place.
    RefcountTable,
    /// The header fields that locate a moved refcount table.
    RefcountHeader,
    /// L2 tables (new, copied, changed) and a moved L1 table.
    Tables,
    /// L1 entries and the header fields that locate a moved L1 table.
    Pointers,
    /// Lowered refcounts, in a commit of their own after the unpublishing one completed.
    Frees,
}

/// Which file of the image a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The qcow2 image file (all metadata).
    Image,
    /// The external data file (guest data only).
    Data,
}

/// One step of a commit as it is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write `data` at `offset` of the image file.
    Write {
        /// Offset in the image file.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Make every write to `target` so far durable.
    Sync(Target),
}

/// A metadata commit being put together: writes sorted into their stages.
#[derive(Debug, Default)]
pub struct MetaCommit {
    writes: Vec<(Stage, u64, Vec<u8>)>,
    /// The image has an external data file that must be synced before metadata publishes its data.
    separate_data: bool,
}

impl MetaCommit {
    /// An empty commit; `separate_data` when guest data lives in an external data file.
    pub fn new(separate_data: bool) -> Self {
        MetaCommit { writes: Vec::new(), separate_data }
    }

    /// Adds a write of `data` at `offset` of the image file to `stage`.
    pub fn add(&mut self, stage: Stage, offset: u64, data: Vec<u8>) {
        self.writes.push((stage, offset, data));
    }

    /// Whether no metadata is written.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The steps in disk order: data synced first, then each non-empty stage followed by a sync. An empty
    /// commit still syncs (a FLUSH with no metadata to write makes the data durable).
    pub fn steps(&self) -> Vec<Step> {
        let mut out = Vec::new();
        if self.separate_data {
            out.push(Step::Sync(Target::Data));
        }
        let mut stages: Vec<Stage> = self.writes.iter().map(|w| w.0).collect();
        stages.sort();
        stages.dedup();
        // Rule 1: guest data in the image file is durable before the first write that may publish it.
        // Refcount blocks and frees publish nothing, and the sync after them covers the data.
        if stages.first().is_some_and(|s| !matches!(s, Stage::RefcountBlocks | Stage::Frees)) {
            out.push(Step::Sync(Target::Image));
        }
        for stage in stages {
            for (s, offset, data) in &self.writes {
                if *s == stage {
                    out.push(Step::Write { offset: *offset, data: data.clone() });
                }
            }
            out.push(Step::Sync(Target::Image));
        }
        if self.writes.is_empty() {
            out.push(Step::Sync(Target::Image));
        }
        out
    }
}

/// Carries out a commit's steps; implemented by qnbd's commit helper (see [`helper`]). A sink that cannot
/// take a commit (say, a descriptor it does not share) returns `None` and the commit runs in the caller.
pub trait CommitSink: std::fmt::Debug + Send + Sync {
    /// Applies `steps` on `image` / `data`, in order, stopping at the first error.
    fn apply(&self, steps: &[Step], image: &dyn Storage, data: &dyn Storage) -> Option<Result<()>>;
}

/// Runs `commit` on the image's files: through `sink` if it takes it, else here.
pub fn run(commit: &MetaCommit, image: &dyn Storage, data: &dyn Storage, sink: Option<&dyn CommitSink>) -> Result<()> {
    let steps = commit.steps();
    if let Some(r) = sink.and_then(|s| s.apply(&steps, image, data)) {
        return r;
    }
    for step in &steps {
        match step {
            Step::Write { offset, data: bytes } => image.write_at(bytes, *offset)?,
            Step::Sync(Target::Image) => image.flush()?,
            Step::Sync(Target::Data) => data.flush()?,
        }
    }
    Ok(())
}

/// The process-wide helper as a [`CommitSink`] (installed by qnbd before it starts threads).
#[derive(Debug, Default, Clone, Copy)]
pub struct HelperSink;

impl CommitSink for HelperSink {
    fn apply(&self, steps: &[Step], image: &dyn Storage, data: &dyn Storage) -> Option<Result<()>> {
        let (f, d) = (image.raw_fd()?, data.raw_fd()?);
        let ops: Vec<helper::Op> = steps
            .iter()
            .map(|s| match s {
                Step::Write { offset, data } => helper::Op::Write { fd: f, offset: *offset, data: data.clone() },
                Step::Sync(Target::Image) => helper::Op::Sync { fd: f },
                Step::Sync(Target::Data) => helper::Op::Sync { fd: d },
            })
            .collect();
        helper::commit_if_installed(&ops)
    }
}

/// An error for a commit that a corrupt image must not run.
pub(crate) fn refused() -> Error {
    Error::new(ErrorKind::Corrupt, "the image was found corrupt: metadata is no longer written")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_ends_with_a_sync_and_stages_keep_their_order() {
        let mut c = MetaCommit::new(true);
        c.add(Stage::Pointers, 40, vec![1]);
        c.add(Stage::RefcountBlocks, 0x1000, vec![2]);
        c.add(Stage::Tables, 0x2000, vec![3]);
        c.add(Stage::Tables, 0x3000, vec![4]);
        let w = |offset: u64, b: u8| Step::Write { offset, data: vec![b] };
        assert_eq!(
            c.steps(),
            vec![
                Step::Sync(Target::Data),
                w(0x1000, 2),
                Step::Sync(Target::Image),
                w(0x2000, 3),
                w(0x3000, 4),
                Step::Sync(Target::Image),
                w(40, 1),
                Step::Sync(Target::Image),
            ]
        );
    }

    #[test]
    fn data_is_synced_before_a_commit_that_starts_with_tables() {
        let mut c = MetaCommit::new(false);
        c.add(Stage::Tables, 0x2000, vec![3]);
        let w = Step::Write { offset: 0x2000, data: vec![3] };
        assert_eq!(c.steps(), vec![Step::Sync(Target::Image), w, Step::Sync(Target::Image)]);
    }

    #[test]
    fn an_empty_commit_still_syncs() {
        assert_eq!(MetaCommit::new(false).steps(), vec![Step::Sync(Target::Image)]);
    }
}
