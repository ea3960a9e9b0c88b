//! Property tests of the write path: random sequences of write / write-zeroes / discard / flush at unaligned
//! offsets that cross cluster and subcluster boundaries, on random image shapes, checked against an in-memory
//! model of the guest disk. Three levels:
//! - in memory (thousands of cases): contents equal the model, qnbd's check finds no error and no leak;
//! - power cuts: the storage stops persisting at a random write or flush; the image that survives opens,
//!   has no corruption, and holds every block acknowledged before the last completed FLUSH;
//! - with qemu (files): `qemu-img check` reports no errors and no leaks and `qemu-img convert` reads the model,
//!   on shapes qemu makes (compressed base clusters, internal snapshots, backing chains, extended L2).

mod common;
use common::*;
use proptest::prelude::*;
use qcow2::image::create::{build, CreateOptions};
use qcow2::image::{Qcow2, Qcow2Options};
use qcow2::storage::{MemStorage, Storage};
use qcow2::{BlockDevice, Image, OpenOptions};
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

#[derive(Debug, Clone)]
struct Shape {
    cluster_bits: u32,
    extended_l2: bool,
    refcount_bits: u32,
    version: u32,
    backing: bool,
}

const SIZE: u64 = 1 << 20;

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop_oneof![Just(9u32), Just(12), Just(14), Just(16)],
        any::<bool>(),
        prop_oneof![Just(1u32), Just(4), Just(16), Just(64)],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(cb, ext, rb, v3, backing)| {
            let extended_l2 = ext && cb >= 14 && v3;
            let version = if v3 { 3 } else { 2 };
            let refcount_bits = if version == 2 { 16 } else { rb };
            Shape { cluster_bits: cb, extended_l2, refcount_bits, version, backing }
        })
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(200_000)));
    prop_oneof![
        5 => (range.clone(), any::<u8>()).prop_map(|((o, l), p)| Op::Write(o, l, p)),
        2 => (range.clone(), any::<bool>()).prop_map(|((o, l), u)| Op::Zero(o, l, u)),
        1 => range.prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Flush),
    ]
}

fn pattern(off: u64, len: u64, seed: u8) -> Vec<u8> {
    (off..off + len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn backing_data() -> Vec<u8> {
    (0..SIZE - 4096 * 3).map(|i| (i / 4096) as u8 | 1).collect()
}

/// Applies `op` to the model the way qnbd defines it: discard zeroes whole allocation units only.
fn model_apply(m: &mut [u8], op: &Op, unit: u64) {
    match *op {
        Op::Write(o, l, p) => m[o as usize..(o + l) as usize].copy_from_slice(&pattern(o, l, p)),
        Op::Zero(o, l, _) => m[o as usize..(o + l) as usize].fill(0),
        Op::Discard(o, l) => {
            let a = o.div_ceil(unit) * unit;
            let b = (o + l) / unit * unit;
            if b > a {
                m[a as usize..b as usize].fill(0);
            }
        }
        Op::Flush => {}
    }
}

fn new_image(s: &Shape) -> Arc<MemStorage> {
    let o = CreateOptions {
        size: SIZE,
        cluster_size: 1 << s.cluster_bits,
        version: s.version,
        refcount_bits: s.refcount_bits,
        extended_l2: s.extended_l2,
        backing_file: s.backing.then(|| "mem".to_string()),
        ..Default::default()
    };
    let b = build(&o).unwrap();
    Arc::new(MemStorage::new(b, 64 << 20))
}

/// Runs `ops` on a writable image over `file`; returns the model and, for each op, whether a FLUSH had
/// completed by then.
fn run_ops(s: &Shape, file: Arc<MemStorage>, ops: &[Op]) -> (Qcow2, Vec<u8>) {
    let opts = Qcow2Options { l2_cache_bytes: Some(1 << 16), snapshot: None, writable: true, ..Default::default() };
    let q = Qcow2::open(file as Arc<dyn Storage>, None, &opts).unwrap();
    let base = backing_data();
    let mut model: Vec<u8> = vec![0; SIZE as usize];
    if s.backing {
        model[..base.len()].copy_from_slice(&base);
    }
    let unit = 1u64 << if s.extended_l2 { s.cluster_bits - 5 } else { s.cluster_bits };
    let reader = |b: &mut [u8], o: u64| -> qcow2::Result<()> {
        b.fill(0);
        if s.backing {
            let o = o as usize;
            if o < base.len() {
                let n = b.len().min(base.len() - o);
                b[..n].copy_from_slice(&base[o..o + n]);
            }
        }
        Ok(())
    };
    for op in ops {
        match *op {
            Op::Write(o, l, p) => q.write(&pattern(o, l, p), o, &reader).unwrap(),
            Op::Zero(o, l, u) => q.write_zeroes(o, l, u, &reader, s.backing).unwrap(),
            Op::Discard(o, l) => q.discard(o, l, s.backing).unwrap(),
            Op::Flush => q.flush().unwrap(),
        }
        model_apply(&mut model, op, unit);
    }
    (q, model)
}

fn read_all(q: &Qcow2, s: &Shape) -> Vec<u8> {
    let file = q.file_storage().clone();
    drop(file);
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0x55; 0], 0));
    let _ = st;
    let base = backing_data();
    let mut out = vec![0u8; SIZE as usize];
    let mut pos = 0u64;
    while pos < SIZE {
        let (m, n) = q.mapping(qcow2::format::offset::GuestOffset(pos), SIZE - pos).unwrap();
        let chunk = &mut out[pos as usize..(pos + n) as usize];
        match m {
            qcow2::image::Mapping::Data { host } => q.data_storage().read_at(chunk, host.get()).unwrap(),
            qcow2::image::Mapping::Zero { .. } => chunk.fill(0),
            qcow2::image::Mapping::Compressed { desc, in_cluster } => {
                q.read_compressed(desc, in_cluster, chunk).unwrap()
            }
            qcow2::image::Mapping::Unallocated { .. } => {
                chunk.fill(0);
                if s.backing && (pos as usize) < base.len() {
                    let k = chunk.len().min(base.len() - pos as usize);
                    chunk[..k].copy_from_slice(&base[pos as usize..pos as usize + k]);
                }
            }
        }
        pos += n;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn random_writes_match_the_model_and_check_clean(s in shape(), ops in proptest::collection::vec(op(), 1..24)) {
        let file = new_image(&s);
        let (q, model) = run_ops(&s, file.clone(), &ops);
        q.flush().unwrap();
        let got = read_all(&q, &s);
        prop_assert!(got == model, "contents differ from the model");
        let r = q.check().unwrap();
        prop_assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        prop_assert_eq!(r.leaks, 0, "{:?}", r.messages);
        drop(q);
        // Reopened from what is on "disk": the same.
        let q2 = Qcow2::open(Arc::new(MemStorage::new(file.durable(), 64 << 20)), None, &Qcow2Options::default()).unwrap();
        prop_assert!(read_all(&q2, &s) == model, "contents after reopening differ");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, max_shrink_iters: 100, .. ProptestConfig::default() })]

    #[test]
    fn power_cut_at_any_point_keeps_flushed_data_and_no_corruption(
        s in shape(),
        ops in proptest::collection::vec(op(), 1..20),
        cut in 0u64..400,
    ) {
        let file = new_image(&s);
        file.crash_after(cut);
        let opts = Qcow2Options { l2_cache_bytes: Some(1 << 16), snapshot: None, writable: true, ..Default::default() };
        let q = Qcow2::open(file.clone() as Arc<dyn Storage>, None, &opts).unwrap();
        let base = backing_data();
        let unit = 1u64 << if s.extended_l2 { s.cluster_bits - 5 } else { s.cluster_bits };
        let reader = |b: &mut [u8], o: u64| -> qcow2::Result<()> {
            b.fill(0);
            if s.backing && (o as usize) < base.len() {
                let n = b.len().min(base.len() - o as usize);
                b[..n].copy_from_slice(&base[o as usize..o as usize + n]);
            }
            Ok(())
        };
        let mut model = vec![0u8; SIZE as usize];
        if s.backing {
            model[..base.len()].copy_from_slice(&base);
        }
        // The state acknowledged by the last FLUSH that completed before the power cut, and which bytes were
        // touched after it (those may hold either value).
        let mut flushed = model.clone();
        let mut touched = vec![false; SIZE as usize];
        for op in &ops {
            let r = match *op {
                Op::Write(o, l, p) => q.write(&pattern(o, l, p), o, &reader),
                Op::Zero(o, l, u) => q.write_zeroes(o, l, u, &reader, s.backing),
                Op::Discard(o, l) => q.discard(o, l, s.backing),
                Op::Flush => q.flush(),
            };
            prop_assert!(r.is_ok());
            model_apply(&mut model, op, unit);
            match *op {
                Op::Flush if !file.crashed() => {
                    flushed = model.clone();
                    touched.fill(false);
                }
                Op::Write(o, l, _) | Op::Zero(o, l, _) | Op::Discard(o, l) => touched[o as usize..(o + l) as usize].fill(true),
                _ => {}
            }
        }
        drop(q);
        let disk = Arc::new(MemStorage::new(file.durable(), 64 << 20));
        let q2 = Qcow2::open(disk as Arc<dyn Storage>, None, &Qcow2Options::default()).unwrap();
        let r = q2.check().unwrap();
        prop_assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        let got = read_all(&q2, &s);
        for i in 0..SIZE as usize {
            if !touched[i] {
                prop_assert_eq!(got[i], flushed[i], "byte {} acknowledged before the last FLUSH was lost", i);
            }
        }
    }
}

/// With qemu as the judge, on files, including shapes qemu makes (snapshots, compressed clusters).
fn qemu_case(dir: &std::path::Path, variant: u32, ops: &[Op]) {
    let img = dir.join("p.qcow2");
    let size = SIZE.to_string();
    match variant {
        0 => create(&img, "cluster_size=4096", &size),
        1 => create(&img, "extended_l2=on,cluster_size=64k", &size),
        2 => {
            create(&img, "cluster_size=16k", &size);
            io(&img, "qcow2", &["write -c -P 0x3c 0 256k", "write -P 0x3d 512k 100k"]);
        }
        3 => {
            create(&img, "", &size);
            io(&img, "qcow2", &["write -P 0x4c 0 768k"]);
            ok("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
        }
        _ => {
            let base = dir.join("b.raw");
            ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "900k"]);
            io(&base, "raw", &["write -P 0x5c 0 900k"]);
            ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=8k,refcount_bits=1",
                    "-b",
                    "b.raw",
                    "-F",
                    "raw",
                    p(&img),
                    &size,
                ],
            );
        }
    }
    let want = dir.join("want.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&want)]);
    let mut model = std::fs::read(&want).unwrap();
    let dev = Image::open(p(&img), &OpenOptions { writable: true, ..Default::default() }).unwrap();
    let q = dev.qcow2().unwrap();
    let unit = if variant == 1 { 2048 } else { q.cluster_size() };
    for op in ops {
        match *op {
            Op::Write(o, l, pt) => dev.write_at(&pattern(o, l, pt), o, false).unwrap(),
            Op::Zero(o, l, u) => dev.write_zeroes(o, l, u, false).unwrap(),
            Op::Discard(o, l) => dev.discard(o, l).unwrap(),
            Op::Flush => dev.flush().unwrap(),
        }
        model_apply(&mut model, op, unit);
    }
    dev.flush().unwrap();
    drop(dev);
    let chk = run("qemu-img", &["check", p(&img)]);
    assert_eq!(
        chk.status.code(),
        Some(0),
        "variant {variant}: {}{}",
        String::from_utf8_lossy(&chk.stdout),
        String::from_utf8_lossy(&chk.stderr)
    );
    let got = dir.join("got.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&got)]);
    let got = std::fs::read(&got).unwrap();
    if let Some(i) = got.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("variant {variant}: qemu reads byte {i} as {:#x}, the model says {:#x}", got[i], model[i]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, max_shrink_iters: 20, .. ProptestConfig::default() })]

    #[test]
    fn qemu_reads_the_model_and_checks_clean(variant in 0u32..5, ops in proptest::collection::vec(op(), 1..16)) {
        let d = tmpdir();
        qemu_case(d.path(), variant, &ops);
    }
}
