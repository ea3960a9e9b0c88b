//! Test support shared by the fuzz targets and `cargo test` (so a saved fuzz input replays exactly what the
//! target does).

use crate::image::{Qcow2, Qcow2Options};
use crate::storage::{MemStorage, Storage};
use std::sync::Arc;

/// The `qcow2_write` fuzz case: `data` is 64 bytes of operations followed by an image. If the image opens
/// and checks clean, the operations run (write / zero / discard / flush); afterwards the image must have no
/// corruption. Returns the problems found, if any.
pub fn write_case(data: &[u8]) -> Result<(), String> {
    if data.len() < 64 {
        return Ok(());
    }
    let (ops, img) = data.split_at(64);
    // Room to grow: writes may allocate up to 8 MiB past the image.
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new(img.to_vec(), img.len() as u64 + (8 << 20)));
    let opts = Qcow2Options { l2_cache_bytes: Some(1 << 20), snapshot: None, writable: false, ..Default::default() };
    let Ok(ro) = Qcow2::open(file.clone(), None, &opts) else { return Ok(()) };
    let Ok(before) = ro.check() else { return Ok(()) };
    if before.corruptions != 0 || before.leaks != 0 || before.check_errors != 0 {
        return Ok(());
    }
    drop(ro);
    let opts = Qcow2Options { writable: true, ..opts };
    let Ok(q) = Qcow2::open(file.clone(), None, &opts) else { return Ok(()) };
    let size = q.size();
    if size == 0 {
        return Ok(());
    }
    let zeros: &dyn Fn(&mut [u8], u64) -> crate::Result<()> = &|b, _| {
        b.fill(0);
        Ok(())
    };
    let buf = vec![0xa5u8; 70000];
    for w in ops.chunks_exact(8) {
        let off = u64::from(u32::from_le_bytes([w[1], w[2], w[3], w[4]])) % size;
        let len = (u64::from(u16::from_le_bytes([w[5], w[6]])) + 1).min(size - off);
        let r = match w[0] % 5 {
            0 | 1 => q.write(&buf[..len as usize], off, zeros),
            2 => q.write_zeroes(off, len, w[7] & 1 != 0, zeros, false),
            3 => q.discard(off, len, false),
            _ => q.flush(),
        };
        if r.is_err() {
            // Out of room in memory, or a corruption the writer detected (it then refuses writes).
            return Ok(());
        }
    }
    if q.flush().is_err() {
        return Ok(());
    }
    drop(q);
    let opts = Qcow2Options { writable: false, ..opts };
    let after = Qcow2::open(file, None, &opts)
        .and_then(|q| q.check())
        .map_err(|e| format!("the writer left an image qnbd cannot open or check: {e}"))?;
    // A cluster referenced twice from the active tables (legal, though qemu never writes it) keeps its other
    // reference's COPIED flag clear when one reference is copied away; only that is tolerated then. Leaks are
    // not judged: stale refcounts past the end of the file show as leaks once the file grows over them.
    let real: Vec<&String> = after
        .messages
        .iter()
        .filter(|m| m.starts_with("ERROR") && !(before.shared_clusters > 0 && m.starts_with("ERROR OFLAG_COPIED")))
        .collect();
    if real.is_empty() {
        Ok(())
    } else {
        Err(format!("the writer corrupted a clean image: {real:?}"))
    }
}
/// Opening an image read-write repairs it when it is dirty (lazy refcounts): an image without corruption
/// (leaks allowed) must have none after being opened read-write and flushed. `img` is the whole image; the
/// `qcow2_structured` fuzz target found the first case (COPIED flags judged before the refcounts were repaired).
pub fn repair_case(img: &[u8]) -> Result<(), String> {
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new(img.to_vec(), img.len() as u64 + (8 << 20)));
    let opts = Qcow2Options { l2_cache_bytes: Some(1 << 20), snapshot: None, writable: false, ..Default::default() };
    let Ok(ro) = Qcow2::open(file.clone(), None, &opts) else { return Ok(()) };
    let Ok(before) = ro.check() else { return Ok(()) };
    if before.corruptions != 0 || before.check_errors != 0 {
        return Ok(());
    }
    drop(ro);
    let rw = Qcow2Options { writable: true, ..opts.clone() };
    let Ok(q) = Qcow2::open(file.clone(), None, &rw) else { return Ok(()) };
    if q.flush().is_err() {
        return Ok(());
    }
    drop(q);
    let after = Qcow2::open(file, None, &opts)
        .and_then(|q| q.check())
        .map_err(|e| format!("the repaired image cannot be opened or checked: {e}"))?;
    if after.corruptions == 0 {
        Ok(())
    } else {
        Err(format!("opening read-write corrupted an image: {:?}", after.messages))
    }
}

pub mod crash;
