//! Deliberately broken images: each gives a clear error naming the field, never a panic, a hang or a large
//! allocation (qimg runs under a 10 s timeout and a 512 MiB address-space limit here).

mod common;
use common::*;
use std::path::Path;

fn be64_at(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Runs qimg `args` bounded in time and memory; returns (exit code, stderr).
fn qimg_bounded(args: &[&str]) -> (i32, String) {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!("ulimit -v 524288; exec timeout 10 {QIMG} {}", quoted.join(" "));
    let out = std::process::Command::new("bash").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert_ne!(code, 124, "qimg {args:?} timed out");
    assert!(!err.contains("panicked"), "qimg {args:?} panicked: {err}");
    (code, err)
}

/// Every subcommand must refuse the image with a message containing `want`.
fn assert_refused(img: &Path, want: &str) {
    let out = img.with_extension("out");
    for args in
        [vec!["info", p(img)], vec!["map", "--output=json", p(img)], vec!["convert", "-O", "raw", p(img), p(&out)]]
    {
        let (code, err) = qimg_bounded(&args);
        // info reads no L2 tables (like qemu-img info): it only has to refuse header-level damage.
        if args[0] == "info" && want.starts_with("data:") {
            continue;
        }
        assert_ne!(code, 0, "qimg {args:?} accepted a broken image");
        let w = want.trim_start_matches("data:");
        assert!(err.contains(w), "qimg {args:?}: expected '{w}' in: {err}");
    }
}

fn fresh(d: &Path, name: &str) -> std::path::PathBuf {
    let img = d.join(name);
    create(&img, "", "4M");
    io(&img, "qcow2", &["write -P 0x11 0 128k", "write -c -P 0x22 1M 64k"]);
    img
}

#[test]
fn truncated_header() {
    let d = tmpdir();
    let img = fresh(d.path(), "t.qcow2");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(50).unwrap();
    // A 50-byte file with the qcow2 magic is probed as qcow2 and refused.
    let (code, err) = qimg_bounded(&["info", "-f", "qcow2", p(&img)]);
    assert_ne!(code, 0);
    assert!(err.contains("too short"), "{err}");
}

#[test]
fn bad_magic_with_format_qcow2() {
    let d = tmpdir();
    let img = fresh(d.path(), "m.qcow2");
    patch(&img, 0, b"XXXX");
    let (code, err) = qimg_bounded(&["info", "-f", "qcow2", p(&img)]);
    assert_ne!(code, 0);
    assert!(err.contains("bad magic"), "{err}");
}

#[test]
fn huge_l1_size() {
    let d = tmpdir();
    let img = fresh(d.path(), "l1.qcow2");
    patch(&img, 36, &0x4000_0000u32.to_be_bytes());
    assert_refused(&img, "l1_size 1073741824 is too large");
}

#[test]
fn cluster_bits_out_of_range() {
    let d = tmpdir();
    for bits in [8u32, 22, 63, 0xffff_ffff] {
        let img = fresh(d.path(), "cb.qcow2");
        patch(&img, 20, &bits.to_be_bytes());
        assert_refused(&img, &format!("cluster_bits {bits} is out of range"));
    }
}

#[test]
fn l2_entry_past_end_of_file() {
    let d = tmpdir();
    let img = fresh(d.path(), "l2.qcow2");
    let b = std::fs::read(&img).unwrap();
    let l1 = be64_at(&b, 40) as usize;
    let l2 = (be64_at(&b, l1) & 0x00ff_ffff_ffff_fe00) as u64;
    patch(&img, l2, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    assert_refused(&img, "data:lies past the end of the file");
}

#[test]
fn l1_entry_past_end_of_file() {
    let d = tmpdir();
    let img = fresh(d.path(), "l1e.qcow2");
    let b = std::fs::read(&img).unwrap();
    let l1 = be64_at(&b, 40);
    patch(&img, l1, &((1u64 << 63) | (1u64 << 44)).to_be_bytes());
    assert_refused(&img, "data:L2 table at offset 0x100000000000 lies past the end of the file");
}

#[test]
fn misaligned_l1_table() {
    let d = tmpdir();
    let img = fresh(d.path(), "mis.qcow2");
    patch(&img, 40, &0x30200u64.to_be_bytes());
    assert_refused(&img, "L1 table offset 0x30200 is not aligned");
}

#[test]
fn l1_overlapping_refcount_table() {
    let d = tmpdir();
    let img = fresh(d.path(), "ov.qcow2");
    let b = std::fs::read(&img).unwrap();
    let rt = be64_at(&b, 48);
    patch(&img, 40, &rt.to_be_bytes());
    assert_refused(&img, "overlaps");
}

#[test]
fn huge_refcount_table() {
    let d = tmpdir();
    let img = fresh(d.path(), "rt.qcow2");
    patch(&img, 56, &0x0100_0000u32.to_be_bytes());
    assert_refused(&img, "refcount_table_clusters 16777216 is too large");
}

#[test]
fn backing_name_outside_cluster_zero() {
    let d = tmpdir();
    let img = fresh(d.path(), "bn.qcow2");
    patch(&img, 8, &65530u64.to_be_bytes());
    patch(&img, 16, &100u32.to_be_bytes());
    assert_refused(&img, "outside the first cluster");
}

/// The patched header of the hostile-input issue: `backing_file_offset` 2^64-1 made offset + size overflow
/// and both binaries panic. Now each exits 1 naming the field, as qemu-img refuses it ("Invalid backing file
/// offset").
#[test]
fn backing_file_offset_at_the_top_of_the_range_is_refused_by_name() {
    let d = tmpdir();
    let img = d.path().join("bo.qcow2");
    create(&img, "", "4M");
    patch(&img, 8, &u64::MAX.to_be_bytes());
    patch(&img, 16, &37u32.to_be_bytes());
    let (code, err) = qimg_bounded(&["info", p(&img)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("backing_file_offset"), "{err}");
    assert_refused(&img, "backing_file_offset");
    let qemu = run("qemu-img", &["info", p(&img)]);
    assert!(!qemu.status.success(), "qemu-img opens it");
}

#[test]
fn garbage_compressed_cluster() {
    let d = tmpdir();
    let img = fresh(d.path(), "gc.qcow2");
    let b = std::fs::read(&img).unwrap();
    let l1 = be64_at(&b, 40) as usize;
    let l2 = (be64_at(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    // Entry for guest 1 MiB (cluster 16) is compressed; overwrite its data with garbage.
    let e = be64_at(&b, l2 + 16 * 8);
    assert!(e & (1 << 62) != 0, "expected a compressed cluster");
    let off = e & ((1u64 << 54) - 1);
    patch(&img, off, &[0xff; 64]);
    let out = img.with_extension("raw");
    let (code, err) = qimg_bounded(&["convert", "-O", "raw", p(&img), p(&out)]);
    assert_ne!(code, 0);
    assert!(err.contains("not valid deflate"), "{err}");
}

#[test]
fn backing_loop_and_self_loop() {
    let d = tmpdir();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", p(&a), "1M"]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&b), "1M"]);
    let (code, err) = qimg_bounded(&["map", p(&a)]);
    assert_ne!(code, 0);
    assert!(err.contains("backing chain loops back"), "{err}");
    let s = d.path().join("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "s.qcow2", "-F", "qcow2", p(&s), "1M"]);
    let (code, err) = qimg_bounded(&["convert", "-O", "raw", p(&s), p(&d.path().join("o.raw"))]);
    assert_ne!(code, 0);
    assert!(err.contains("backing chain loops back"), "{err}");
}

#[test]
fn chain_deeper_than_the_limit_is_refused() {
    let d = tmpdir();
    let mut prev = d.path().join("c0.qcow2");
    create(&prev, "", "1M");
    for i in 1..=5 {
        let next = d.path().join(format!("c{i}.qcow2"));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", p(&prev), "-F", "qcow2", p(&next)]);
        prev = next;
    }
    let o = qcow2::OpenOptions { max_chain_depth: 3, ..Default::default() };
    let e = qcow2::Image::open(p(&prev), &o).unwrap_err();
    assert_eq!(e.kind(), qcow2::ErrorKind::BackingChain);
    assert!(e.to_string().contains("deeper than 3"), "{e}");
    let o = qcow2::OpenOptions { max_chain_depth: 5, ..Default::default() };
    assert!(qcow2::Image::open(p(&prev), &o).is_ok());
}

#[test]
fn missing_backing_file_names_it() {
    let d = tmpdir();
    let a = d.path().join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", p(&a), "1M"]);
    let (code, err) = qimg_bounded(&["map", p(&a)]);
    assert_ne!(code, 0);
    assert!(err.contains("gone.qcow2"), "{err}");
    // info does not open the backing file, as with qemu-img.
    let (code, _) = qimg_bounded(&["info", p(&a)]);
    assert_eq!(code, 0);
}

#[test]
fn encrypted_images_are_refused_clearly() {
    let d = tmpdir();
    let img = d.path().join("luks.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=abc",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            p(&img),
            "1M",
        ],
    );
    assert_refused(&img, "LUKS-encrypted qcow2 images are not supported");
}

#[test]
fn unknown_incompatible_feature_is_named() {
    let d = tmpdir();
    let img = fresh(d.path(), "f.qcow2");
    patch(&img, 72, &(1u64 << 17).to_be_bytes());
    assert_refused(&img, "unsupported incompatible features: unknown feature bit 17");
}

#[test]
fn unknown_format_name() {
    let d = tmpdir();
    let img = fresh(d.path(), "u.qcow2");
    let (code, err) = qimg_bounded(&["info", "-f", "vmdk", p(&img)]);
    assert_ne!(code, 0);
    assert!(err.contains("Unknown driver 'vmdk'"), "{err}");
}

#[test]
fn too_many_snapshots() {
    let d = tmpdir();
    let img = fresh(d.path(), "sn.qcow2");
    patch(&img, 60, &70_000u32.to_be_bytes());
    patch(&img, 64, &0x10000u64.to_be_bytes());
    assert_refused(&img, "nb_snapshots 70000 is too large");
}

#[test]
fn header_length_past_the_first_cluster() {
    let d = tmpdir();
    let img = fresh(d.path(), "hl.qcow2");
    patch(&img, 100, &0x20000u32.to_be_bytes());
    assert_refused(&img, "header_length 131072 exceeds the first cluster");
}
