//! Opens any byte string as an in-memory qcow2 image over an in-memory raw backing file, walks its block
//! status and reads ranges chosen by the input: no panic, no hang, bounded memory. Each read is also planned
//! (what the server sends with sendfile): a plan covers the range exactly and carries the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qcow2::image::{Qcow2, Qcow2Options};
use qcow2::storage::{MemStorage, Storage};
use qcow2::{BlockDevice, Image, Layer, Source};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ops, img) = data.split_at(8);
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new(img.to_vec(), img.len() as u64));
    let opts = Qcow2Options { l2_cache_bytes: Some(1 << 20), snapshot: None, writable: false, ..Default::default() };
    let Ok(q) = Qcow2::open(file, None, &opts) else { return };
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0x5a; 3000], 3000));
    let Ok(base) = Image::from_layer(Layer::Raw(base), None, "base") else { return };
    let Ok(image) = Image::from_layer(Layer::Qcow2(Box::new(q)), Some(base), "fuzz") else { return };
    let size = image.size();
    // Walk the block status from the start, a bounded number of steps.
    let mut pos = 0u64;
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        match image.block_status(pos, size - pos) {
            Ok(st) => {
                assert!(st.len > 0 && st.len <= size - pos);
                pos += st.len;
            }
            Err(_) => break,
        }
    }
    // Reads at offsets chosen by the input.
    let mut buf = vec![0u8; 65536];
    for w in ops.chunks(2) {
        if size == 0 {
            break;
        }
        let off = (u64::from(w[0]) << 8 | u64::from(*w.get(1).unwrap_or(&0))) * 4099 % size;
        let len = (size - off).min(buf.len() as u64) as usize;
        let read = image.read_at(&mut buf[..len], off);
        let mut plan = Vec::new();
        if image.plan_read(off, len as u64, &mut plan).is_err() {
            continue;
        }
        assert_eq!(plan.iter().map(|p| p.len).sum::<u64>(), len as u64, "a plan covers its range");
        if read.is_err() {
            continue;
        }
        let mut at = 0usize;
        let mut piece = Vec::new();
        for p in &plan {
            piece.clear();
            piece.resize(p.len as usize, 0);
            let ok = match &p.source {
                Source::Zero => true,
                Source::Read { offset } => image.read_at(&mut piece, *offset).is_ok(),
                Source::File { file, offset } => file.read_at(&mut piece, *offset).is_ok(),
            };
            if ok {
                assert!(piece[..] == buf[at..at + p.len as usize], "a plan reads what read_at reads");
            }
            at += p.len as usize;
        }
    }
});
