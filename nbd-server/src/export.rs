//! An export: a named block device with the options qemu-nbd gives it.

use crate::negotiate::{Catalog, ExportMeta};
use crate::proto::*;
use qcow2::BlockDevice;
use std::sync::Arc;

/// What WRITE_ZEROES-like detection does with written zero blocks (qemu-nbd `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Write zeros as data.
    Off,
    /// Turn all-zero writes into write-zeroes.
    On,
    /// Turn all-zero writes into write-zeroes that may deallocate (needs `--discard=unmap`).
    Unmap,
}

/// One export.
pub struct Export {
    /// Name clients ask for.
    pub name: String,
    /// Description for NBD_INFO_DESCRIPTION and NBD_OPT_LIST.
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes (also forced when the device is read-only).
    pub read_only: bool,
    /// TRIM and write-zeroes may deallocate (`--discard=unmap`).
    pub unmap: bool,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Persistent dirty bitmaps offered as `qemu:dirty-bitmap:NAME` (`-B NAME`).
    pub bitmaps: Vec<String>,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN (the server accepts more than one connection).
    pub multi_conn: bool,
    /// Give every connection its own throwaway overlay on this image (`--fresh-per-connection`).
    pub fresh: Option<Fresh>,
    /// What the cache mode asks of writes and FLUSH.
    pub cache: Cache,
}

/// The parts of qemu's cache modes that act on requests (`O_DIRECT` is the image's business).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cache {
    /// Every write is durable before its reply (`writethrough`, `directsync`): as if each had FUA.
    pub writethrough: bool,
    /// FLUSH does nothing (`unsafe`, `cache.no-flush=on`); the image is still flushed when the server stops.
    pub ignore_flush: bool,
}

/// What a fresh per-connection overlay is made from.
#[derive(Clone)]
pub struct Fresh {
    /// The pristine image.
    pub base: Arc<qcow2::Image>,
    /// How to open the overlay's chain.
    pub opts: qcow2::OpenOptions,
}

impl Export {
    /// A copy of this export serving `device` instead (for a per-connection overlay).
    pub fn with_device(&self, device: Arc<dyn BlockDevice>) -> Export {
        Export {
            name: self.name.clone(),
            description: self.description.clone(),
            device,
            read_only: false,
            unmap: self.unmap,
            detect_zeroes: self.detect_zeroes,
            allocation_depth: self.allocation_depth,
            bitmaps: self.bitmaps.clone(),
            multi_conn: false,
            fresh: None,
            cache: self.cache,
        }
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("name", &self.name).field("read_only", &self.read_only).finish_non_exhaustive()
    }
}

/// Block size constraints advertised: any alignment, 4 KiB preferred, 32 MiB payloads.
pub const BLOCK_SIZE: (u32, u32, u32) = (1, 4096, MAX_PAYLOAD as u32);
/// The largest minimum block size a server may advertise (proto.md, "Block size constraints": at most 64 KiB).
pub const MAX_MIN_BLOCK: u32 = 64 << 10;

impl Export {
    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        if self.fresh.is_some() {
            // The template is read-only; each connection writes to its own overlay.
            return self.read_only;
        }
        self.read_only || self.device.is_read_only()
    }

    /// The transmission flags (proto.md "Transmission flags"). Writes share one device and one file, so a
    /// FLUSH on any connection covers writes acknowledged on every connection: CAN_MULTI_CONN holds whenever
    /// more than one connection is allowed.
    pub fn flags(&self) -> u16 {
        let mut f = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_DF
            | NBD_FLAG_SEND_CACHE
            | NBD_FLAG_BLOCK_STATUS_PAYLOAD;
        if self.multi_conn {
            f |= NBD_FLAG_CAN_MULTI_CONN;
        }
        if self.is_read_only() {
            f |= NBD_FLAG_READ_ONLY;
        } else {
            f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
        }
        f
    }

    /// What the handshake reports.
    pub fn meta(&self) -> ExportMeta {
        ExportMeta {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.device.size(),
            flags: self.flags(),
            allocation_depth: self.allocation_depth,
            bitmaps: self.bitmaps.clone(),
            // proto.md, "Block size constraints": the minimum is at most 64 KiB (libnbd ignores all three
            // constraints past that); a device with larger clusters (the compress filter) still serves any
            // size, so it advertises 64 KiB there and its cluster as the preferred size.
            block_size: (
                self.device.min_block_size().max(BLOCK_SIZE.0).min(MAX_MIN_BLOCK),
                BLOCK_SIZE.1.max(self.device.min_block_size()),
                BLOCK_SIZE.2,
            ),
        }
    }
}

/// A set of exports; "" names the first one.
#[derive(Debug, Default, Clone)]
pub struct Exports {
    /// The exports, in command-line order.
    pub list: Vec<Arc<Export>>,
    /// Names of exports that need TLS under SELECTIVETLS.
    pub tls_only: Vec<String>,
}

impl Exports {
    /// The export called `name`.
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        self.list.iter().find(|e| e.name == name).or_else(|| if name.is_empty() { self.list.first() } else { None })
    }
}

impl Catalog for Exports {
    fn lookup(&self, name: &str) -> Option<ExportMeta> {
        self.find(name).map(|e| e.meta())
    }

    fn list(&self) -> Vec<ExportMeta> {
        self.list.iter().map(|e| e.meta()).collect()
    }

    fn tls_only(&self, name: &str) -> bool {
        let name = if name.is_empty() { self.list.first().map(|e| e.name.as_str()).unwrap_or("") } else { name };
        self.tls_only.iter().any(|n| n == name)
    }
}
