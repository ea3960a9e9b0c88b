//! Structure-aware image fuzzing: the input is an `arbitrary`-derived description of an image (cluster size,
//! version, refcount width, extended L2, L1 and L2 entries of every kind, refcounts, a snapshot, a backing
//! name, header extensions and feature bits), serialized to a valid-looking image on top of a freshly created
//! one (so the header checks pass), then mutated byte by byte. The image is opened read-only and walked
//! (block status, reads, check), then read-write: a few writes, a flush and a check. No panic, no hang,
//! bounded memory; an image that checks clean before the writes checks clean after them.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qcow2::format::header::Header;
use qcow2::image::create::{build, CreateOptions};
use qcow2::image::{Qcow2, Qcow2Options};
use qcow2::storage::{MemStorage, Storage};
use qcow2::{BlockDevice, Image, Layer};
use std::sync::Arc;

#[derive(Arbitrary, Debug)]
enum L2Kind {
    Unallocated,
    /// Data at appended cluster `n` (mod the clusters appended).
    Data(u8),
    /// A zero cluster, with or without a host cluster.
    Zero(bool),
    /// A compressed descriptor with raw bits.
    Compressed(u64),
    /// Anything at all.
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct Desc {
    cluster_bits: u8,
    v2: bool,
    refcount_order: u8,
    extended_l2: bool,
    size_clusters: u16,
    /// L2 tables to append; each L1 entry points at one of them (or at garbage).
    l1: Vec<(u8, bool)>,
    l2: Vec<(u8, u8, L2Kind)>,
    /// Refcount overrides: (appended cluster, value).
    refcounts: Vec<(u8, u8)>,
    data_clusters: u8,
    backing: Option<String>,
    incompatible: u8,
    compatible: u8,
    autoclear: u8,
    /// Header extensions appended after the header (type, data).
    extensions: Vec<(u32, Vec<u8>)>,
    /// Byte mutations applied last (offset, value).
    mutations: Vec<(u32, u8)>,
    /// Writes once open read-write: (guest cluster, byte, zero instead of data).
    writes: Vec<(u16, u8, bool)>,
}

const MAX_IMAGE: usize = 4 << 20;

/// The image, and whether two active entries point at the same cluster (legal, though qemu never writes it:
/// copying one reference away then leaves the other's COPIED flag clear with a refcount of 1, which
/// `qemu-img check` reports and `-r all` fixes, so that is tolerated after writes).
fn serialize(d: &Desc) -> Option<(Vec<u8>, bool)> {
    let cluster_bits = 9 + u32::from(d.cluster_bits % 8); // 512 B .. 64 KiB
    let cs = 1u64 << cluster_bits;
    let refcount_bits = 1u32 << (d.refcount_order % 7);
    let size = (u64::from(d.size_clusters % 512) + 1) * cs;
    let co = CreateOptions {
        size,
        cluster_size: cs,
        version: if d.v2 { 2 } else { 3 },
        refcount_bits,
        extended_l2: d.extended_l2 && !d.v2 && cluster_bits >= 14,
        backing_file: d.backing.as_ref().map(|b| b.chars().take(64).collect()),
        ..Default::default()
    };
    let mut img = build(&co).ok()?;
    let h = Header::parse(&img).ok()?;
    let end = (img.len() as u64).div_ceil(cs) * cs;
    img.resize(end as usize, 0);
    let first_new = end / cs;
    let l2_count = d.l1.len().min(4) as u64;
    let data_count = u64::from(d.data_clusters % 16);
    let total = l2_count + data_count;
    if (end + total * cs) as usize > MAX_IMAGE {
        return None;
    }
    img.resize((end + total * cs) as usize, 0);
    let put64 = |img: &mut Vec<u8>, off: u64, v: u64| {
        if let Some(b) = img.get_mut(off as usize..off as usize + 8) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    };
    const COPIED: u64 = 1 << 63;
    let mut referenced = std::collections::HashSet::new();
    let mut shared = false;
    // L1 entries -> appended L2 tables.
    for (i, (t, copied)) in d.l1.iter().take(h.l1_size as usize).enumerate() {
        if l2_count == 0 {
            break;
        }
        let l2 = (first_new + u64::from(*t) % l2_count) * cs;
        shared |= !referenced.insert(l2);
        put64(&mut img, h.l1_table_offset + 8 * i as u64, l2 | if *copied { COPIED } else { 0 });
    }
    // L2 entries of every kind.
    let entry_bytes = if co.extended_l2 { 16 } else { 8 };
    for (t, idx, kind) in &d.l2 {
        if l2_count == 0 {
            break;
        }
        let table = (first_new + u64::from(*t) % l2_count) * cs;
        let at = table + (u64::from(*idx) * entry_bytes) % cs;
        let v = match kind {
            L2Kind::Unallocated => 0,
            L2Kind::Data(n) if data_count > 0 => ((first_new + l2_count + u64::from(*n) % data_count) * cs) | COPIED,
            L2Kind::Data(_) => 0,
            L2Kind::Zero(host) => 1 | if *host && data_count > 0 { ((first_new + l2_count) * cs) | COPIED } else { 0 },
            L2Kind::Compressed(bits) => (1 << 62) | (bits & ((1 << 62) - 1)),
            L2Kind::Raw(v) => *v,
        };
        // Any data or table cluster met twice (or an arbitrary entry, which may point anywhere) counts as shared.
        shared |= matches!(kind, L2Kind::Raw(_) | L2Kind::Compressed(_)) || (v & 0x00ff_ffff_ffff_fe00 != 0 && !referenced.insert(v & 0x00ff_ffff_ffff_fe00));
        put64(&mut img, at, v);
    }
    // Refcounts: the appended clusters are counted (16-bit blocks only: other widths keep their zeros, which
    // the checker reports as leaks and the writer must not trip over).
    if refcount_bits == 16 {
        let rb = u64::from_be_bytes(img.get(h.refcount_table_offset as usize..h.refcount_table_offset as usize + 8)?.try_into().ok()?);
        for c in first_new..first_new + total {
            if (c * 2 + 2) <= cs {
                if let Some(b) = img.get_mut((rb + c * 2) as usize..(rb + c * 2 + 2) as usize) {
                    b.copy_from_slice(&1u16.to_be_bytes());
                }
            }
        }
        for (c, v) in &d.refcounts {
            let c = first_new + u64::from(*c) % total.max(1);
            if (c * 2 + 2) <= cs {
                if let Some(b) = img.get_mut((rb + c * 2) as usize..(rb + c * 2 + 2) as usize) {
                    b.copy_from_slice(&u16::from(*v % 4).to_be_bytes());
                }
            }
        }
    }
    // Feature bits (low bits only: the known ones and one unknown each).
    if !d.v2 {
        put64(&mut img, 72, u64::from(d.incompatible & 0x1f));
        put64(&mut img, 80, u64::from(d.compatible & 0x3));
        put64(&mut img, 88, u64::from(d.autoclear & 0x3));
    }
    // Extensions right after the header (overwriting the end-of-extensions marker).
    if !d.v2 {
        let hl = u64::from(u32::from_be_bytes(img.get(100..104)?.try_into().ok()?));
        let mut at = hl as usize;
        for (ty, data) in d.extensions.iter().take(4) {
            let len = data.len().min(256);
            let padded = len.div_ceil(8) * 8;
            if at + 8 + padded + 8 > cs as usize {
                break;
            }
            img[at..at + 4].copy_from_slice(&ty.to_be_bytes());
            img[at + 4..at + 8].copy_from_slice(&(len as u32).to_be_bytes());
            img[at + 8..at + 8 + len].copy_from_slice(&data[..len]);
            at += 8 + padded;
        }
    }
    for (off, v) in d.mutations.iter().take(16) {
        let n = img.len();
        img[*off as usize % n] = *v;
    }
    Some((img, shared))
}

fn walk(image: &Image) {
    let size = image.size();
    let mut pos = 0u64;
    for _ in 0..128 {
        if pos >= size {
            break;
        }
        match image.block_status(pos, size - pos) {
            Ok(st) => {
                assert!(st.len > 0 && st.len <= size - pos, "block status advances inside the image");
                pos += st.len;
            }
            Err(_) => break,
        }
    }
    let mut buf = vec![0u8; 65536];
    let mut off = 0u64;
    while off < size && off < 1 << 20 {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = image.read_at(&mut buf[..n], off);
        off += n as u64;
    }
}

fn open(bytes: &[u8], writable: bool) -> Option<(Arc<Image>, Arc<MemStorage>)> {
    let mem = Arc::new(MemStorage::new(bytes.to_vec(), (bytes.len() + (8 << 20)) as u64));
    let file: Arc<dyn Storage> = mem.clone();
    let opts = Qcow2Options { l2_cache_bytes: Some(1 << 20), snapshot: None, writable, ..Default::default() };
    let q = Qcow2::open(file, None, &opts).ok()?;
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0x5a; 3000], 3000));
    let base = Image::from_layer(Layer::Raw(base), None, "base").ok()?;
    let image = Image::from_layer(Layer::Qcow2(Box::new(q)), Some(base), "fuzz").ok()?;
    Some((image, mem))
}

fuzz_target!(|d: Desc| {
    let Some((bytes, shared)) = serialize(&d) else { return };
    if let Ok(path) = std::env::var("QNBD_FUZZ_DUMP") {
        // Debugging a finding: the image as serialized, before any write.
        let _ = std::fs::write(path, &bytes);
    }
    let clean_before = match open(&bytes, false) {
        Some((image, _)) => {
            walk(&image);
            image.qcow2().and_then(|q| q.check().ok()).is_some_and(|r| r.corruptions == 0)
        }
        None => return,
    };
    let Some((image, mem)) = open(&bytes, true) else { return };
    let cs = image.qcow2().map(|q| 1u64 << q.header().cluster_bits).unwrap_or(65536);
    let size = image.size();
    for (c, byte, zero) in d.writes.iter().take(8) {
        let off = (u64::from(*c) * cs) % size.max(1);
        let len = (size - off).min(4096);
        if len == 0 {
            continue;
        }
        let _ = if *zero {
            image.write_zeroes(off, len, true, false)
        } else {
            image.write_at(&vec![*byte; len as usize], off, false)
        };
    }
    let flushed = image.flush().is_ok();
    drop(image);
    if clean_before && flushed {
        if let Some((after, _)) = open(&mem.contents(), false) {
            let r = after.qcow2().and_then(|q| q.check().ok());
            let bad = r.as_ref().map_or(0, |r| {
                r.messages.iter().filter(|m| m.starts_with("ERROR") && !(shared && m.starts_with("ERROR OFLAG_COPIED"))).count()
            });
            assert!(bad == 0, "a clean image was corrupted by the writer: {r:?}");
        }
    }
});
