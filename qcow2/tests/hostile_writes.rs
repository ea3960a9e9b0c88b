//! Hostile images opened read-write: metadata placed where the allocator would hand out new clusters must
//! never receive guest data, and guest data must never be overwritten by metadata.

use qcow2::image::create::{build, CreateOptions};
use qcow2::image::{Qcow2, Qcow2Options};
use qcow2::storage::{MemStorage, Storage};
use qcow2::{BlockDevice, Image, Layer};
use std::sync::Arc;

/// A refcount-table entry that points past the end of the file, right where new clusters are taken: its
/// refcounts read as zeros, so an allocator that trusted them would hand the block's cluster out as data,
/// and the next commit would write refcounts over the guest's bytes.
#[test]
fn a_refcount_block_past_the_end_is_never_handed_out_as_data() {
    let cs = 4096u64;
    let size = 32u64 << 20;
    let mut img = build(&CreateOptions { size, cluster_size: cs, ..Default::default() }).unwrap();
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
    let end = (img.len() as u64).div_ceil(cs) * cs;
    // Block 1 (clusters 2048..4096 with 16-bit refcounts) placed three clusters past the end.
    let hostile = end + 3 * cs;
    img[rt + 8..rt + 16].copy_from_slice(&hostile.to_be_bytes());
    let file = Arc::new(MemStorage::new(img, 256 << 20));
    let opts = Qcow2Options { writable: true, ..Default::default() };
    let q = Qcow2::open(file.clone() as Arc<dyn Storage>, None, &opts).unwrap();
    let dev = Image::from_layer(Layer::Qcow2(Box::new(q)), None, "hostile").unwrap();
    // Mostly zeros (so that, read as refcounts, a data cluster placed on the block would let the allocator
    // use the block's range and the next commit write the block over it), with each cluster's number at its
    // end to tell clusters apart.
    let mut data = vec![0u8; 16 << 20];
    for (k, c) in data.chunks_mut(cs as usize).enumerate() {
        c[cs as usize - 8..].copy_from_slice(&(k as u64 + 1).to_be_bytes());
    }
    for (k, chunk) in data.chunks(64 << 10).enumerate() {
        dev.write_at(chunk, k as u64 * (64 << 10), false).unwrap();
    }
    dev.flush().unwrap();
    let mut got = vec![0u8; data.len()];
    dev.read_at(&mut got, 0).unwrap();
    if let Some(i) = got.iter().zip(&data).position(|(a, b)| a != b) {
        panic!("guest byte {i:#x} reads {:#x}, written {:#x}", got[i], data[i]);
    }
    drop(dev);
    // The same from what is on disk.
    let q = Qcow2::open(Arc::new(MemStorage::new(file.contents(), 256 << 20)), None, &Qcow2Options::default()).unwrap();
    let dev = Image::from_layer(Layer::Qcow2(Box::new(q)), None, "reopened").unwrap();
    dev.read_at(&mut got, 0).unwrap();
    assert!(got == data, "the data on disk differs");
}
