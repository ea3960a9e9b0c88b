//! Cluster lookup: an L2 cache hit, an L2 cache miss, and a lookup that falls through a 10-deep chain.
//! The images are made by qemu-img / qemu-io (installed by the README's test command).

use criterion::{criterion_group, criterion_main, Criterion};
use qcow2::format::offset::GuestOffset;
use qcow2::{BlockDevice, Image, OpenOptions};
use std::hint::black_box;
use std::path::Path;
use std::process::Command;

fn sh(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().expect("qemu-img and qemu-io are needed for this bench");
    assert!(st.success(), "{cmd} {args:?}");
}

fn make(dir: &Path) -> (String, String) {
    let one = dir.join("one.qcow2");
    let one = one.to_str().unwrap().to_string();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", &one, "2G"]);
    // Data in two L2 tables' ranges (one L2 table covers 512 MiB with 64 KiB clusters).
    sh("qemu-io", &["-c", "write -P 1 0 1M", "-c", "write -P 2 1G 1M", &one]);
    let mut prev = dir.join("c0.qcow2").to_str().unwrap().to_string();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", &prev, "1G"]);
    sh("qemu-io", &["-c", "write -P 3 0 1M", &prev]);
    for i in 1..10 {
        let next = dir.join(format!("c{i}.qcow2")).to_str().unwrap().to_string();
        sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &prev, "-F", "qcow2", &next]);
        prev = next;
    }
    (one, prev)
}

fn lookup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (one, top) = make(dir.path());
    let img = Image::open(&one, &OpenOptions::default()).unwrap();
    let q = img.qcow2().unwrap();
    c.bench_function("l2_cache_hit", |b| {
        b.iter(|| black_box(q.mapping(black_box(GuestOffset(65536 * 3)), 4096).unwrap()))
    });

    // A cache of one table, alternating between two tables: every lookup misses and reads the table.
    let small = OpenOptions { l2_cache_bytes: Some(65536), ..Default::default() };
    let img2 = Image::open(&one, &small).unwrap();
    let q2 = img2.qcow2().unwrap();
    let mut flip = false;
    c.bench_function("l2_cache_miss", |b| {
        b.iter(|| {
            flip = !flip;
            black_box(q2.mapping(GuestOffset(if flip { 0 } else { 1 << 30 }), 4096).unwrap())
        })
    });

    let chain = Image::open(&top, &OpenOptions::default()).unwrap();
    c.bench_function("chain_10_deep_status", |b| {
        b.iter(|| black_box(chain.block_status(black_box(8192), 4096).unwrap()))
    });
    let mut buf = vec![0u8; 4096];
    c.bench_function("chain_10_deep_read_4k", |b| b.iter(|| chain.read_at(black_box(&mut buf), 8192).unwrap()));
}

criterion_group!(benches, lookup);
criterion_main!(benches);
