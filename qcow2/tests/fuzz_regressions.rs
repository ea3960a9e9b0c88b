//! Inputs the fuzzers found, replayed with `cargo test`. Each file in `tests/fuzz_regressions/` is named
//! after its fuzz target; the replay does what the target does and asserts what it asserts.

use qcow2::image::{Qcow2, Qcow2Options};
use qcow2::storage::{MemStorage, Storage};
use std::sync::Arc;

/// The `qcow2_write` target: a clean image stays free of corruption after any writes.
fn qcow2_write(data: &[u8]) {
    if data.len() < 64 {
        return;
    }
    let (ops, img) = data.split_at(64);
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new(img.to_vec(), img.len() as u64 + (8 << 20)));
    let opts = Qcow2Options { l2_cache_bytes: Some(1 << 20), snapshot: None, writable: false };
    let Ok(ro) = Qcow2::open(file.clone(), None, &opts) else { return };
    let Ok(before) = ro.check() else { return };
    if before.corruptions != 0 || before.leaks != 0 || before.check_errors != 0 {
        return;
    }
    drop(ro);
    let opts = Qcow2Options { writable: true, ..opts };
    let Ok(q) = Qcow2::open(file.clone(), None, &opts) else { return };
    let size = q.size();
    if size == 0 {
        return;
    }
    let zeros: &dyn Fn(&mut [u8], u64) -> qcow2::Result<()> = &|b, _| {
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
            return;
        }
    }
    q.flush().unwrap();
    drop(q);
    let after = Qcow2::open(file, None, &Qcow2Options { writable: false, ..opts }).unwrap().check().unwrap();
    let real: Vec<&String> = after
        .messages
        .iter()
        .filter(|m| m.starts_with("ERROR") && !(before.shared_clusters > 0 && m.starts_with("ERROR OFLAG_COPIED")))
        .collect();
    assert!(real.is_empty(), "{real:?}");
}

#[test]
fn replay_every_saved_fuzz_input() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&p).unwrap();
        if name.starts_with("qcow2_write-") {
            qcow2_write(&data);
            n += 1;
        }
    }
    assert!(n > 0, "no saved inputs found in {}", dir.display());
}
