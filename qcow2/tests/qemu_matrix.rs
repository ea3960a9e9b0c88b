//! Images made by the real qemu-img and qemu-io read identically through qimg: convert output byte for
//! byte, map records and info JSON field for field.

mod common;
use common::*;

/// A write pattern that touches whole clusters, partial clusters, zeroes and discards.
fn scribble(img: &std::path::Path, cs: u64) {
    let c = |n: u64| (n * cs).to_string();
    io(
        img,
        "qcow2",
        &[
            &format!("write -P 0x11 0 {}", c(2)),
            &format!("write -P 0x22 {} 700", cs * 3 + 100),
            &format!("write -P 0x33 {} {}", c(5), c(1)),
            &format!("write -z {} {}", c(5), cs / 2),
            &format!("write -P 0x44 {} {}", c(9), c(3)),
            &format!("discard {} {}", c(10), c(1)),
            &format!("write -z {} {}", c(14), c(2)),
        ],
    );
}

#[test]
fn cluster_sizes_and_versions_read_like_qemu() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for compat in ["0.10", "1.1"] {
            let d = tmpdir();
            let img = d.path().join("img.qcow2");
            let size = (cs * 20).max(1 << 20);
            create(&img, &format!("cluster_size={cs},compat={compat}"), &size.to_string());
            scribble(&img, cs);
            assert_all_equal(&img, d.path());
        }
    }
}

#[test]
fn refcount_widths_read_like_qemu() {
    for bits in [1, 16, 64] {
        let d = tmpdir();
        let img = d.path().join("img.qcow2");
        create(&img, &format!("refcount_bits={bits}"), "8M");
        scribble(&img, 65536);
        assert_all_equal(&img, d.path());
    }
}

#[test]
fn compressed_clusters_deflate_and_zstd() {
    for ct in ["zlib", "zstd"] {
        for cs in [4096u64, 65536] {
            let d = tmpdir();
            let img = d.path().join("img.qcow2");
            create(&img, &format!("compression_type={ct},cluster_size={cs}"), "4M");
            io(
                &img,
                "qcow2",
                &[&format!("write -c -P 0x5a 0 {}", cs * 4), &format!("write -c -P 0x01 {} {}", cs * 8, cs)],
            );
            // Compressed clusters from convert -c of a varied raw file, too.
            let raw = d.path().join("src.raw");
            let data: Vec<u8> = (0..(1u32 << 20)).map(|i| ((i / 7) ^ (i >> 11)) as u8).collect();
            std::fs::write(&raw, &data).unwrap();
            let conv = d.path().join("conv.qcow2");
            ok(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("compression_type={ct},cluster_size={cs}"),
                    p(&raw),
                    p(&conv),
                ],
            );
            assert_all_equal(&img, d.path());
            assert_all_equal(&conv, d.path());
        }
    }
}

#[test]
fn extended_l2_partial_subcluster_writes() {
    let d = tmpdir();
    let base = d.path().join("base.qcow2");
    create(&base, "", "4M");
    io(&base, "qcow2", &["write -P 0x66 0 4M"]);
    let img = d.path().join("img.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&img),
        ],
    );
    io(
        &img,
        "qcow2",
        &[
            "write -P 0x77 4096 4096",
            "write -P 0x78 20k 1000",
            "write -z 131072 8192",
            "write -P 0x79 1M 128k",
            "discard 1M 4096",
        ],
    );
    assert_all_equal(&img, d.path());
}

#[test]
fn chain_raw_qcow2_qcow2_qcow2_with_shorter_backing() {
    let d = tmpdir();
    let raw = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "3M"]);
    io(&raw, "raw", &["write -P 0xa1 0 1M", "write -P 0xa2 2M 512"]);
    let l1 = d.path().join("l1.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p(&l1), "5M"]);
    io(&l1, "qcow2", &["write -P 0xb1 100k 3000", "write -P 0xb2 3M 64k"]);
    let l2 = d.path().join("l2.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "l1.qcow2", "-F", "qcow2", p(&l2), "6M"]);
    io(&l2, "qcow2", &["write -P 0xc1 200k 70k", "write -z 0 4096"]);
    let l3 = d.path().join("l3.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "l2.qcow2", "-F", "qcow2", p(&l3), "8M"]);
    io(&l3, "qcow2", &["write -P 0xd1 65000 10", "write -P 0xd2 7M 4096"]);
    assert_all_equal(&l3, d.path());
    assert_info_equal(&l3, &["--backing-chain"]);
    // Relative backing names resolve against the overlay's folder, not the working directory.
    let out = ok(QIMG, &["info", "--output=json", p(&l3)]);
    assert!(out.contains(&format!("\"full-backing-filename\": \"{}\"", p(&d.path().join("l2.qcow2")))), "{out}");
}

#[test]
fn internal_snapshot_then_more_writes() {
    let d = tmpdir();
    let img = d.path().join("img.qcow2");
    create(&img, "", "4M");
    io(&img, "qcow2", &["write -P 0x10 0 1M"]);
    ok("qemu-img", &["snapshot", "-c", "first", p(&img)]);
    io(&img, "qcow2", &["write -P 0x20 512k 1M"]);
    ok("qemu-img", &["snapshot", "-c", "second", p(&img)]);
    io(&img, "qcow2", &["write -z 0 64k"]);
    assert_all_equal(&img, d.path());
    // Reading as of a snapshot: compare with qemu-img convert -l.
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    ok("qemu-img", &["convert", "-l", "first", "-O", "raw", p(&img), p(&a)]);
    let out = run(QIMG, &["info", p(&img)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("second"));
    let img_s =
        qcow2::Image::open(p(&img), &qcow2::OpenOptions { snapshot: Some("first".into()), ..Default::default() })
            .unwrap();
    let mut buf = vec![0u8; 4 << 20];
    qcow2::BlockDevice::read_at(img_s.as_ref(), &mut buf, 0).unwrap();
    std::fs::write(&b, &buf).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn external_data_file_raw_and_not() {
    for raw in ["on", "off"] {
        let d = tmpdir();
        let img = d.path().join("img.qcow2");
        let data = d.path().join("data.bin");
        create(&img, &format!("data_file={},data_file_raw={raw}", p(&data)), "4M");
        io(&img, "qcow2", &["write -P 0x31 0 100k", "write -P 0x32 2M 4096"]);
        assert_all_equal(&img, d.path());
    }
}

#[test]
fn one_tebibyte_sparse_image() {
    let d = tmpdir();
    let img = d.path().join("big.qcow2");
    create(&img, "", "1T");
    io(&img, "qcow2", &["write -P 0x42 0 64k", "write -P 0x43 512G 4096", "write -P 0x44 1023G 1M"]);
    assert_map_equal(&img);
    assert_info_equal(&img, &[]);
    assert_convert_equal(&img, d.path());
}

#[test]
fn raw_images_read_like_qemu() {
    let d = tmpdir();
    let img = d.path().join("img.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&img), "10M"]);
    io(&img, "raw", &["write -P 0x55 1M 64k", "write -P 0x56 9M 4096"]);
    assert_all_equal(&img, d.path());
}

#[test]
fn compare_reports_like_qemu() {
    let d = tmpdir();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    create(&a, "", "4M");
    create(&b, "", "4M");
    io(&a, "qcow2", &["write -P 0x01 0 1M"]);
    io(&b, "qcow2", &["write -P 0x01 0 1M"]);
    let same = run(QIMG, &["compare", p(&a), p(&b)]);
    assert_eq!(same.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&same.stdout), "Images are identical.\n");
    io(&b, "qcow2", &["write -P 0x02 70000 1"]);
    let theirs = run("qemu-img", &["compare", p(&a), p(&b)]);
    let ours = run(QIMG, &["compare", p(&a), p(&b)]);
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(ours.stdout, theirs.stdout);
    let c = d.path().join("c.qcow2");
    create(&c, "", "5M");
    io(&c, "qcow2", &["write -P 0x01 0 1M", "write -P 0x09 4M 512"]);
    let theirs = run("qemu-img", &["compare", p(&a), p(&c)]);
    let ours = run(QIMG, &["compare", p(&a), p(&c)]);
    assert_eq!(String::from_utf8_lossy(&ours.stdout), String::from_utf8_lossy(&theirs.stdout));
    assert_eq!(ours.status.code(), theirs.status.code());
    let missing = run(QIMG, &["compare", p(&a), "/nonexistent.qcow2"]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn human_output_matches_qemu() {
    let d = tmpdir();
    let base = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "4M"]);
    io(&base, "raw", &["write -P 0x11 0 64k"]);
    let img = d.path().join("ov.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", p(&base), "-F", "raw", p(&img), "6M"]);
    io(&img, "qcow2", &["write -P 0x33 32k 64k"]);
    assert_eq!(ok(QIMG, &["map", p(&img)]), ok("qemu-img", &["map", p(&img)]));
    assert_eq!(ok(QIMG, &["info", p(&img)]), ok("qemu-img", &["info", p(&img)]));
}

/// A read plan of a sparse raw file gives its holes as zeros (the server sends them as hole chunks, as block
/// status reports them) and its data as file ranges.
#[test]
fn read_plan_of_a_sparse_raw_file_has_its_holes() {
    use qcow2::{BlockDevice, Source};
    let d = tmpdir();
    let img = d.path().join("sparse.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&img), "4M"]);
    io(&img, "raw", &["write -P 0x7 1M 64k"]);
    let image = qcow2::Image::open(p(&img), &qcow2::OpenOptions::default()).unwrap();
    let mut plan = Vec::new();
    image.plan_read(0, 4 << 20, &mut plan).unwrap();
    let kinds: Vec<(u64, bool)> = plan.iter().map(|x| (x.len, matches!(x.source, Source::Zero))).collect();
    // (qemu-img create writes the first 4 KiB of a raw file; the rest up to 1 MiB is a hole.)
    assert!(kinds.ends_with(&[(1044480, true), (65536, false), ((3 << 20) - 65536, true)]), "{plan:?}");
    assert_plan_equal(&img);
}
