//! The write path against qemu as the oracle: the same operations through qnbd's library and through
//! qemu-io on a copy must read identically (qemu-img compare), and `qemu-img check` must call qnbd's image
//! clean. Also qimg create / check / resize against qemu-img.

mod common;
use common::*;
use qcow2::{BlockDevice, Image, OpenOptions};
use std::path::Path;

#[derive(Clone, Copy)]
enum Op {
    Write(u8, u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

fn qemu_io_cmd(op: Op) -> String {
    match op {
        Op::Write(p, o, l) => format!("write -P {p} {o} {l}"),
        Op::Zero(o, l, unmap) => format!("write -z {} {o} {l}", if unmap { "-u" } else { "" }),
        Op::Discard(o, l) => format!("discard {o} {l}"),
    }
}

/// Applies `ops` to `img` with qnbd's library and to a copy with qemu-io; both must read the same and
/// qnbd's image must check clean.
fn same_as_qemu(img: &Path, ops: &[Op]) {
    let refimg = img.with_extension("ref");
    std::fs::copy(img, &refimg).unwrap();
    {
        let dev = Image::open(p(img), &OpenOptions { writable: true, ..Default::default() }).unwrap();
        for &op in ops {
            match op {
                Op::Write(pat, o, l) => dev.write_at(&vec![pat; l as usize], o, false).unwrap(),
                Op::Zero(o, l, unmap) => dev.write_zeroes(o, l, unmap, false).unwrap(),
                Op::Discard(o, l) => dev.discard(o, l).unwrap(),
            }
        }
        dev.flush().unwrap();
    }
    let cmds: Vec<String> = ops.iter().map(|&o| qemu_io_cmd(o)).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    io(&refimg, "qcow2", &refs);
    let chk = run("qemu-img", &["check", p(img)]);
    assert_eq!(
        chk.status.code(),
        Some(0),
        "qemu-img check of {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&chk.stdout),
        String::from_utf8_lossy(&chk.stderr)
    );
    let cmp = run("qemu-img", &["compare", p(img), p(&refimg)]);
    assert_eq!(cmp.status.code(), Some(0), "compare {}: {}", img.display(), String::from_utf8_lossy(&cmp.stdout));
    // And qimg's own check agrees.
    let ours = run(QIMG, &["check", p(img)]);
    assert_eq!(ours.status.code(), Some(0), "{}", String::from_utf8_lossy(&ours.stderr));
}

fn mixed_ops(cs: u64, size: u64) -> Vec<Op> {
    let mut v = vec![
        Op::Write(0x11, 0, 3 * cs),
        Op::Write(0x22, cs / 2 + 7, cs + 100),
        Op::Write(0x33, size - cs - 512, cs + 512),
        Op::Zero(cs, cs, false),
        Op::Zero(4 * cs, 3 * cs, true),
        Op::Write(0x44, 5 * cs + 512, 1024),
        Op::Discard(0, cs),
        Op::Write(0x55, 2 * cs, 4096.min(cs)),
    ];
    // Many scattered small writes: refcount blocks and L2 tables get allocated as they go.
    let mut x = 12345u64;
    for i in 0..200 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = (x >> 20) % (size - 8192);
        v.push(Op::Write((i % 250) as u8 + 1, off & !511, 512 * (1 + (x % 8))));
    }
    v
}

#[test]
fn writes_on_every_cluster_size_and_version_match_qemu() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for compat in ["0.10", "1.1"] {
            let d = tmpdir();
            let img = d.path().join("w.qcow2");
            let size = (cs * 64).max(16 << 20);
            create(&img, &format!("cluster_size={cs},compat={compat}"), &size.to_string());
            same_as_qemu(&img, &mixed_ops(cs, size));
        }
    }
}

#[test]
fn refcount_widths_and_refcount_table_growth() {
    for bits in [1, 2, 8, 64] {
        let d = tmpdir();
        let img = d.path().join("w.qcow2");
        // 512-byte clusters with 1-bit refcounts: one refcount block covers 2 MiB, so the table must grow.
        create(&img, &format!("cluster_size=512,refcount_bits={bits}"), "64M");
        let mut ops = vec![Op::Write(0x61, 0, 24 << 20)];
        ops.extend(mixed_ops(512, 64 << 20));
        same_as_qemu(&img, &ops);
    }
}

#[test]
fn copy_on_write_from_backing_chain_and_compressed_clusters() {
    let d = tmpdir();
    let base = d.path().join("base.qcow2");
    create(&base, "", "16M");
    // qemu writes compressed clusters only where nothing is allocated yet.
    io(&base, "qcow2", &["write -c -P 0x42 4M 128k", "write -P 0x41 0 4M", "write -P 0x41 5M 11M"]);
    let img = d.path().join("ov.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&img)]);
    same_as_qemu(&img, &mixed_ops(65536, 16 << 20));
    // Overwriting compressed clusters in place (no backing).
    let c = d.path().join("c.qcow2");
    create(&c, "", "4M");
    io(&c, "qcow2", &["write -c -P 0x71 0 1M"]);
    same_as_qemu(&c, &[Op::Write(0x72, 1000, 10), Op::Zero(65536, 65536, false), Op::Write(0x73, 200000, 70000)]);
}

#[test]
fn extended_l2_allocates_only_touched_subclusters() {
    let d = tmpdir();
    let base = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "8M"]);
    io(&base, "raw", &["write -P 0x5a 0 8M"]);
    let img = d.path().join("x.qcow2");
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
            "base.raw",
            "-F",
            "raw",
            p(&img),
        ],
    );
    same_as_qemu(&img, &mixed_ops(131072, 8 << 20));
    // A 4 KiB write into an unallocated cluster writes one subcluster, not a whole cluster of COW.
    let img2 = d.path().join("x2.qcow2");
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
            "base.raw",
            "-F",
            "raw",
            p(&img2),
        ],
    );
    {
        use std::os::unix::fs::MetadataExt;
        let dev = Image::open(p(&img2), &OpenOptions { writable: true, ..Default::default() }).unwrap();
        dev.write_at(&[1u8; 4096], 128 * 1024 + 4096, false).unwrap();
        dev.flush().unwrap();
        // A second fresh cluster under the same L2 table: only its touched subcluster reaches the disk.
        let before = std::fs::metadata(&img2).unwrap().blocks() * 512;
        dev.write_at(&[2u8; 4096], 1 << 20, false).unwrap();
        dev.flush().unwrap();
        let grew = std::fs::metadata(&img2).unwrap().blocks() * 512 - before;
        assert!(grew <= 16 << 10, "a 4 KiB write into a fresh cluster took {grew} bytes of disk");
    }
    ok("qemu-io", &["-c", "read -P 2 1M 4k", "-c", "read -P 0x5a 1052672 126976", p(&img2)]);
    let map = ok("qemu-img", &["map", "--output=json", p(&img2)]);
    assert!(
        map.contains(
            "\"start\": 135168, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"
        ),
        "{map}"
    );
    let chk = run("qemu-img", &["check", p(&img2)]);
    assert_eq!(chk.status.code(), Some(0));
}

#[test]
fn writes_after_an_internal_snapshot_copy_shared_clusters() {
    let d = tmpdir();
    let img = d.path().join("s.qcow2");
    create(&img, "", "8M");
    io(&img, "qcow2", &["write -P 0x10 0 4M"]);
    ok("qemu-img", &["snapshot", "-c", "before", p(&img)]);
    same_as_qemu(&img, &mixed_ops(65536, 8 << 20));
    // The snapshot still reads as it was.
    let a = d.path().join("a.raw");
    ok("qemu-img", &["convert", "-l", "before", "-O", "raw", p(&img), p(&a)]);
    let data = std::fs::read(&a).unwrap();
    assert!(data[..4 << 20].iter().all(|&b| b == 0x10));
    assert!(data[4 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn external_data_file() {
    let d = tmpdir();
    let img = d.path().join("e.qcow2");
    let data = d.path().join("e.data");
    create(&img, &format!("data_file={}", p(&data)), "8M");
    let ops = mixed_ops(65536, 8 << 20);
    let refimg = img.with_extension("ref");
    let refdata = d.path().join("e.refdata");
    create(&refimg, &format!("data_file={}", p(&refdata)), "8M");
    {
        let dev = Image::open(p(&img), &OpenOptions { writable: true, ..Default::default() }).unwrap();
        for &op in &ops {
            match op {
                Op::Write(pat, o, l) => dev.write_at(&vec![pat; l as usize], o, false).unwrap(),
                Op::Zero(o, l, u) => dev.write_zeroes(o, l, u, false).unwrap(),
                Op::Discard(o, l) => dev.discard(o, l).unwrap(),
            }
        }
    }
    let cmds: Vec<String> = ops.iter().map(|&o| qemu_io_cmd(o)).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    io(&refimg, "qcow2", &refs);
    assert_eq!(run("qemu-img", &["check", p(&img)]).status.code(), Some(0));
    assert_eq!(run("qemu-img", &["compare", p(&img), p(&refimg)]).status.code(), Some(0));
}

#[test]
fn qimg_create_matches_qemu_img_create() {
    for (opts, size) in [
        ("", "64M"),
        ("compat=0.10,cluster_size=4k", "1G"),
        ("extended_l2=on,lazy_refcounts=on,refcount_bits=64,compression_type=zstd", "1G"),
        ("cluster_size=512,refcount_bits=1", "100M"),
        ("cluster_size=2M", "10T"),
    ] {
        let d = tmpdir();
        let a = d.path().join("a.qcow2");
        let b = d.path().join("b.qcow2");
        let mut qa = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            qa.extend(["-o", opts]);
        }
        let mut qb = qa.clone();
        qa.extend([p(&a), size]);
        qb.extend([p(&b), size]);
        ok("qemu-img", &qa);
        ok(QIMG, &qb);
        assert_eq!(run("qemu-img", &["check", p(&b)]).status.code(), Some(0), "check of qimg create -o {opts}");
        let strip = |s: String| -> String {
            s.lines()
                .filter(|l| !l.contains("actual-size") && !l.contains("\"virtual-size\": 1") && !l.contains("filename"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let ia = strip(ok("qemu-img", &["info", "--output=json", p(&a)]));
        let ib = strip(ok("qemu-img", &["info", "--output=json", p(&b)]));
        assert_eq!(ia.replace("a.qcow2", "X"), ib.replace("b.qcow2", "X"), "qimg create -o {opts}");
        // The new image takes writes that qemu reads back.
        same_as_qemu(&b, &[Op::Write(0x7e, 0, 1 << 20), Op::Write(0x7f, 3 << 20, 4096)]);
    }
    // With a backing file the size defaults to the backing file's; a missing backing file is an error.
    let d = tmpdir();
    let base = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "5M"]);
    let ov = d.path().join("ov.qcow2");
    ok(QIMG, &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p(&ov)]);
    let info = ok("qemu-img", &["info", "--output=json", p(&ov)]);
    assert!(info.contains("\"virtual-size\": 5242880"), "{info}");
    assert!(info.contains("\"backing-filename\": \"base.raw\""), "{info}");
    let bad =
        run(QIMG, &["create", "-q", "-f", "qcow2", "-b", "missing.raw", "-F", "raw", p(&d.path().join("x.qcow2"))]);
    assert_ne!(bad.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Could not open backing image"));
    let nosize = run(QIMG, &["create", "-q", "-f", "qcow2", p(&d.path().join("y.qcow2"))]);
    assert!(String::from_utf8_lossy(&nosize.stderr).contains("Image creation needs a size parameter"));
}

/// Sets cluster `c`'s 16-bit refcount in the first refcount block.
fn poke_refcount(img: &Path, c: u64, v: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).unwrap();
    let rt = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).unwrap();
    let rb = u64::from_be_bytes(e);
    f.write_all_at(&v.to_be_bytes(), rb + 2 * c).unwrap();
}

#[test]
fn qimg_check_reports_and_repairs_like_qemu_img() {
    let d = tmpdir();
    let img = d.path().join("k.qcow2");
    create(&img, "", "64M");
    io(&img, "qcow2", &["write 0 1M", "write -c 2M 64k", "write 4M 64k"]);
    // A leak: one more cluster in the file with a refcount and no reference.
    let len = std::fs::metadata(&img).unwrap().len().div_ceil(65536) * 65536;
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(len + 65536).unwrap();
    poke_refcount(&img, len / 65536, 1);
    for args in [vec!["check"], vec!["check", "--output=json"]] {
        let mut a = args.clone();
        a.push(p(&img));
        let theirs = run("qemu-img", &a);
        let ours = run(QIMG, &a);
        assert_eq!(ours.status.code(), theirs.status.code(), "{a:?}");
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout).replace("qemu-img", "qimg"),
            "{a:?}"
        );
    }
    // A corruption: a data cluster whose refcount is 0.
    let bad = d.path().join("bad.qcow2");
    std::fs::copy(&img, &bad).unwrap();
    poke_refcount(&bad, 6, 0);
    let theirs = run("qemu-img", &["check", "--output=json", p(&bad)]);
    let ours = run(QIMG, &["check", "--output=json", p(&bad)]);
    assert_eq!(ours.status.code(), Some(2));
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(String::from_utf8_lossy(&ours.stdout), String::from_utf8_lossy(&theirs.stdout));
    // Repairs: leaks, then everything; qemu-img then calls both clean.
    let out = run(QIMG, &["check", "-r", "leaks", p(&img)]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 leaked clusters"));
    assert_eq!(run("qemu-img", &["check", p(&img)]).status.code(), Some(0));
    let out = run(QIMG, &["check", "-r", "all", p(&bad)]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run("qemu-img", &["check", p(&bad)]).status.code(), Some(0));
}

#[test]
fn resize_grows_qcow2_and_raw() {
    let d = tmpdir();
    let img = d.path().join("r.qcow2");
    // 512-byte clusters: 16 MiB needs more L1 than 1 MiB had, so the L1 table moves.
    create(&img, "cluster_size=512", "1M");
    io(&img, "qcow2", &["write -P 0x21 0 1M"]);
    let out = ok(QIMG, &["resize", p(&img), "+15M"]);
    assert_eq!(out, "Image resized.\n");
    assert_eq!(run("qemu-img", &["check", p(&img)]).status.code(), Some(0));
    io(&img, "qcow2", &["write -P 0x22 15M 1M", "read -P 0x21 0 1M", "read -P 0 1M 14M"]);
    let info = ok("qemu-img", &["info", "--output=json", p(&img)]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    let shrink = run(QIMG, &["resize", p(&img), "1M"]);
    assert_ne!(shrink.status.code(), Some(0));
    let raw = d.path().join("r.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "1M"]);
    ok(QIMG, &["resize", "-f", "raw", p(&raw), "3M"]);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 3 << 20);
}

#[test]
fn preallocation_modes_lay_out_what_qemu_img_does() {
    for mode in ["metadata", "falloc", "full"] {
        let d = tmpdir();
        let a = d.path().join("a.qcow2");
        let b = d.path().join("b.qcow2");
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &format!("preallocation={mode}"), p(&a), "8M"]);
        ok(QIMG, &["create", "-q", "-f", "qcow2", "-o", &format!("preallocation={mode}"), p(&b), "8M"]);
        assert_eq!(run("qemu-img", &["check", p(&b)]).status.code(), Some(0), "{mode}");
        assert_eq!(std::fs::metadata(&a).unwrap().len(), std::fs::metadata(&b).unwrap().len(), "{mode}");
        assert_eq!(
            ok("qemu-img", &["map", "--output=json", p(&a)]),
            ok("qemu-img", &["map", "--output=json", p(&b)]),
            "{mode}"
        );
        same_as_qemu(&b, &[Op::Write(0x31, 100, 5000), Op::Zero(65536, 65536, true)]);
    }
    let d = tmpdir();
    let bad = run(
        QIMG,
        &["create", "-q", "-f", "qcow2", "-o", "preallocation=sometimes", p(&d.path().join("x.qcow2")), "1M"],
    );
    assert_ne!(bad.status.code(), Some(0));
}

#[test]
fn dirty_image_is_repaired_when_opened_read_write() {
    let d = tmpdir();
    let img = d.path().join("dirty.qcow2");
    create(&img, "lazy_refcounts=on", "8M");
    // qemu-io dies with SIGKILL after writing: lazy refcounts leave the dirty bit set and refcounts stale.
    let _ = run("qemu-io", &["-c", "write -P 0x61 0 1M", "-c", "sigraise 9", p(&img)]);
    let info = ok("qemu-img", &["info", "--output=json", p(&img)]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    {
        let dev = Image::open(p(&img), &OpenOptions { writable: true, ..Default::default() }).unwrap();
        dev.write_at(&[0x62; 4096], 2 << 20, false).unwrap();
        dev.flush().unwrap();
    }
    let info = ok("qemu-img", &["info", "--output=json", p(&img)]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    assert_eq!(run("qemu-img", &["check", p(&img)]).status.code(), Some(0));
    io(&img, "qcow2", &["read -P 0x61 0 1M", "read -P 0x62 2M 4k"]);
}

#[test]
fn unknown_autoclear_bits_are_cleared_and_unknown_extensions_kept() {
    use std::os::unix::fs::FileExt;
    let d = tmpdir();
    let img = d.path().join("ac.qcow2");
    create(&img, "", "8M");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    f.write_all_at(&(1u64 << 5).to_be_bytes(), 88).unwrap();
    // An unknown header extension right after the header (before the feature table's end marker it replaces).
    let mut h = vec![0u8; 4096];
    f.read_exact_at(&mut h, 0).unwrap();
    let before = qcow2::format::header::Header::parse(&h).unwrap();
    drop(f);
    {
        let dev = Image::open(p(&img), &OpenOptions { writable: true, ..Default::default() }).unwrap();
        dev.write_at(&[1; 512], 0, false).unwrap();
    }
    let f = std::fs::File::open(&img).unwrap();
    f.read_exact_at(&mut h, 0).unwrap();
    let after = qcow2::format::header::Header::parse(&h).unwrap();
    assert_eq!(after.autoclear_features, 0);
    assert_eq!(after.extensions, before.extensions, "header extensions must be kept byte for byte");
    assert_eq!(run("qemu-img", &["check", p(&img)]).status.code(), Some(0));
}

/// A thread that looked up an L2 table remembers it (a lock-free cache hit); a write from another thread that
/// changes the table, or allocates a new one, must be seen by that thread's next read, never the stale table.
#[test]
fn tables_remembered_by_a_reading_thread_never_go_stale() {
    let dir = tmpdir();
    let img = dir.path().join("t.qcow2");
    create(&img, "cluster_size=65536", "1G");
    let image = Image::open(p(&img), &OpenOptions { writable: true, ..Default::default() }).unwrap();
    let (to_reader, reads) = std::sync::mpsc::channel::<(u64, u8)>();
    let (to_writer, done) = std::sync::mpsc::channel::<()>();
    let reader = {
        let image = image.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            for (off, want) in reads {
                image.read_at(&mut buf, off).unwrap();
                assert!(
                    buf.iter().all(|&b| b == want),
                    "offset {off}: stale read (wanted {want:#x}, got {:#x})",
                    buf[0]
                );
                // read a neighbour in the same table too, so the table is remembered before the next change
                image.read_at(&mut buf, off ^ 65536).unwrap();
                to_writer.send(()).unwrap();
            }
        })
    };
    // Offsets in the first table (allocated clusters change it), then in a table that does not exist yet.
    let offs = [0u64, 3 << 16, 7 << 16, 5 << 16, (600 << 20) + 4096, (600 << 20) + (9 << 16)];
    for (i, &off) in offs.iter().enumerate() {
        to_reader.send((off, 0)).unwrap();
        done.recv().unwrap();
        let pat = 0x10 + i as u8;
        image.write_at(&vec![pat; 4096], off, false).unwrap();
        to_reader.send((off, pat)).unwrap();
        done.recv().unwrap();
        image.write_zeroes(off, 4096, true, false).unwrap();
        to_reader.send((off, 0)).unwrap();
        done.recv().unwrap();
    }
    drop(to_reader);
    reader.join().unwrap();
    image.flush().unwrap();
    drop(image);
    let check = ok("qemu-img", &["check", p(&img)]);
    assert!(check.contains("No errors"), "{check}");
}

/// A cache far smaller than the working set, with readers evicting tables all the time while a writer
/// allocates clusters in every table: every write succeeds, every reader reads back what was written, and the
/// image checks clean.
#[test]
fn writes_succeed_and_read_back_while_readers_churn_a_tiny_cache() {
    let dir = tmpdir();
    let img = dir.path().join("t.qcow2");
    create(&img, "cluster_size=4096", "64M");
    // Two 4 KiB tables of 512 entries: each covers 2 MiB, the image needs 32.
    let opts = OpenOptions { writable: true, l2_cache_bytes: Some(8192), ..Default::default() };
    let image = Image::open(p(&img), &opts).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (image, stop) = (image.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut i = r;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 2_000_000 {
                    image.read_at(&mut buf, ((i * 2_100_003) % (64 << 20)) & !4095).unwrap();
                    i += 7;
                }
            })
        })
        .collect();
    let mut written = Vec::new();
    for k in 0..600u64 {
        let off = ((k * 1_234_567) % (64 << 20)) & !4095;
        let pat = (k % 250) as u8 + 1;
        image.write_at(&vec![pat; 4096], off, false).unwrap_or_else(|e| panic!("write {k} at {off}: {e}"));
        written.retain(|&(o, _)| o != off);
        written.push((off, pat));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let mut buf = vec![0u8; 4096];
    for &(off, pat) in &written {
        image.read_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|&b| b == pat), "offset {off}: wanted {pat:#x}, got {:#x}", buf[0]);
    }
    image.flush().unwrap();
    drop(image);
    let check = ok("qemu-img", &["check", p(&img)]);
    assert!(check.contains("No errors"), "{check}");
}

/// Allocating writes copy and write their data outside the writer lock; writers to the same new cluster
/// must wait for each other, or one's copy-on-write would overwrite the other's bytes. Four threads write
/// interleaved 512-byte sectors (thread t owns sectors t, t+4, ...) of the same clusters, on a fresh image,
/// an overlay of a backing file, an extended-L2 overlay and an image with an internal snapshot: every
/// thread's bytes must be there, qemu reads the same, and `qemu-img check` calls it clean.
#[test]
fn concurrent_writers_to_the_same_new_clusters_lose_nothing() {
    let d = tmpdir();
    let base = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "4M"]);
    io(&base, "raw", &["write -P 0x5c 0 4M"]);
    for (name, opts, backing) in [
        ("fresh", "cluster_size=65536", false),
        ("cow", "cluster_size=65536", true),
        ("extl2", "extended_l2=on,cluster_size=65536", true),
        ("snap", "cluster_size=16384", false),
    ] {
        let img = d.path().join(format!("{name}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
        if backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.extend([p(&img), "4M"]);
        ok("qemu-img", &args);
        if name == "snap" {
            io(&img, "qcow2", &["write -P 0x33 0 4M"]);
            ok("qemu-img", &["snapshot", "-c", "s", p(&img)]);
        }
        let dev = Image::open(p(&img), &OpenOptions { writable: true, ..Default::default() }).unwrap();
        let size = 4u64 << 20;
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let dev = dev.clone();
                sc.spawn(move || {
                    // Each round goes over the disk in a different order, so threads meet in new clusters.
                    for round in 0..2u64 {
                        let sector = (t + round * 7) % 4;
                        let mut k = 0u64;
                        while k < size / 512 / 4 {
                            let s = (sector + k * 4 * 97) % (size / 512) / 4 * 4 + t;
                            let fill = (t as u8 + 1) * 16 + round as u8;
                            dev.write_at(&[fill; 512], s * 512, false).unwrap();
                            k += 1;
                        }
                    }
                });
            }
        });
        dev.flush().unwrap();
        let mut got = vec![0u8; size as usize];
        dev.read_at(&mut got, 0).unwrap();
        drop(dev);
        for (s, sec) in got.chunks(512).enumerate() {
            let t = (s % 4) as u8;
            assert!(sec.iter().all(|&b| b == (t + 1) * 16 + 1), "{name}: sector {s} lost thread {t}'s write");
        }
        let chk = run("qemu-img", &["check", p(&img)]);
        assert_eq!(chk.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&chk.stdout));
        let raw = d.path().join(format!("{name}.raw"));
        ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&raw)]);
        assert!(std::fs::read(&raw).unwrap() == got, "{name}: qemu reads other bytes");
    }
}

/// `plan_write_cached` (the io_uring write path of `--cache=none`): plans only in-place writes of allocated,
/// uncompressed clusters whose L2 table is cached, on `O_DIRECT` files; a write to the planned host range
/// reads back through the image; and an unaligned write (a read-modify-write of a block) waits while a
/// planned write holds its pin.
#[test]
fn plan_write_cached_plans_only_in_place_writes() {
    use qcow2::Source;
    use std::os::unix::fs::FileExt;
    let d = tmpdir();
    let img = d.path().join("p.qcow2");
    create(&img, "", "4M");
    io(&img, "qcow2", &["write -P 1 0 1M", "write -c -P 2 1M 64k"]);
    let plan = |dev: &Image, off: u64, len: u64| {
        let mut out = Vec::new();
        dev.plan_write_cached(off, len, &mut out).then_some(out)
    };
    // Without O_DIRECT there is nothing to plan for.
    {
        let dev = Image::open(p(&img), &OpenOptions { writable: true, ..Default::default() }).unwrap();
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, 0).unwrap();
        assert!(plan(&dev, 0, 4096).is_none());
    }
    let dev = Image::open(p(&img), &OpenOptions { writable: true, direct: true, ..Default::default() }).unwrap();
    assert!(plan(&dev, 0, 4096).is_none(), "the L2 table is not cached yet");
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 0).unwrap();
    let planned: u64 = plan(&dev, 60 << 10, 8192).expect("two allocated clusters").iter().map(|p| p.len).sum();
    assert_eq!(planned, 8192);
    assert!(plan(&dev, 1 << 20, 4096).is_none(), "compressed");
    assert!(plan(&dev, 2 << 20, 4096).is_none(), "unallocated");
    assert!(plan(&dev, (4 << 20) - 4096, 8192).is_none(), "past the end");
    let pieces = plan(&dev, 8192, 4096).unwrap();
    let [qcow2::Piece { len: 4096, source: Source::File { file, offset } }] = &pieces[..] else {
        panic!("one file range expected")
    };
    let fd = file.direct_fd().expect("an O_DIRECT descriptor");
    // Written where the plan says, with an aligned buffer, as io_uring would.
    #[repr(C, align(4096))]
    struct Block([u8; 4096]);
    let data = Box::new(Block([0x77; 4096]));
    // SAFETY: `fd` stays open while `dev` lives; ManuallyDrop keeps the File from closing it.
    let f = std::mem::ManuallyDrop::new(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    let pin = file.pin_direct_write().expect("no read-modify-write under way");
    f.write_all_at(&data.0, *offset).unwrap();
    dev.read_at(&mut b, 8192).unwrap();
    assert_eq!(b, vec![0x77; 4096]);
    // A read-modify-write waits for the pin.
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // 100 bytes: unaligned for any O_DIRECT alignment (512 or 4096).
            dev.write_at(&[0x55; 100], 16384 + 100, false).unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!done.load(std::sync::atomic::Ordering::SeqCst), "the read-modify-write ran under a pinned write");
        drop(pin);
    });
    assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    dev.read_at(&mut b, 16384).unwrap();
    assert!(b[..100].iter().all(|&x| x == 1) && b[100..200].iter().all(|&x| x == 0x55) && b[200] == 1);
    dev.flush().unwrap();
    // The plan holds the file open (and so its lock) like the image does.
    drop(pieces);
    drop(dev);
    let r = ok("qemu-io", &["-r", "-c", "read -P 0x77 8k 4k", "-c", "read -P 0x55 16484 100", p(&img)]);
    assert!(!r.contains("fail"), "{r}");
}

/// In-place writes over several allocated clusters are merged into one write where the host clusters follow
/// each other, and split where they do not (clusters qemu allocated out of order, a compressed one between),
/// with the same result as qemu's.
#[test]
fn in_place_writes_across_clusters_in_any_host_order_match_qemu() {
    let d = tmpdir();
    let img = d.path().join("o.qcow2");
    create(&img, "", "4M");
    // Host order: cluster 1, 0, 3, 2, then 4..8 in order, 9 compressed, 10 and 11 in order.
    io(
        &img,
        "qcow2",
        &[
            "write -P 1 64k 64k",
            "write -P 2 0 64k",
            "write -P 3 192k 64k",
            "write -P 4 128k 64k",
            "write -P 5 256k 320k",
            "write -c -P 6 576k 64k",
            "write -P 7 640k 128k",
        ],
    );
    same_as_qemu(
        &img,
        &[
            Op::Write(0x61, 0, 256 << 10),
            Op::Write(0x62, 1000, 200_000),
            Op::Write(0x63, 300 << 10, 400 << 10),
            Op::Write(0x64, (256 << 10) - 7, 14),
            Op::Write(0x65, 0, 768 << 10),
        ],
    );
}
