//! `qimg convert` to qcow2 and raw, and `qimg measure`, against the installed qemu-img over a matrix of
//! images qemu made: the output reads exactly like qemu-img's own conversion (`qemu-img compare`), checks
//! clean, and has the same `qemu-img info` fields; `measure` prints the same numbers.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Sources made by qemu-img and qemu-io: (name, path).
fn sources(d: &Path) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    let mk = |name: &str, fmt: &str, opts: &str, size: &str, cmds: &[&str]| {
        let f = d.join(name);
        let mut a = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.push(p(&f));
        a.push(size);
        ok("qemu-img", &a);
        let mut io = vec!["-f", fmt];
        for c in cmds {
            io.extend(["-c", c]);
        }
        io.push(p(&f));
        ok("qemu-io", &io);
        f
    };
    let writes = ["write -P 0x11 0 100k", "write -P 0x22 1M 64k", "write -z 2M 64k", "write -P 0x33 5M 3k"];
    v.push(("plain".into(), mk("plain.qcow2", "qcow2", "", "16M", &writes)));
    v.push(("4k-clusters".into(), mk("c4k.qcow2", "qcow2", "cluster_size=4096", "16M", &writes)));
    v.push(("extended-l2".into(), mk("ext.qcow2", "qcow2", "extended_l2=on,cluster_size=128k", "16M", &writes)));
    v.push(("refcount-1".into(), mk("rc1.qcow2", "qcow2", "refcount_bits=1", "16M", &writes)));
    v.push(("v2".into(), mk("v2.qcow2", "qcow2", "compat=0.10", "16M", &writes)));
    v.push(("raw-with-holes".into(), mk("holes.raw", "raw", "", "16M", &writes)));
    // Compressed clusters, deflate and zstd, made by qemu-img convert -c.
    for (name, ty) in [("deflate", "zlib"), ("zstd", "zstd")] {
        let f = d.join(format!("{name}.qcow2"));
        ok(
            "qemu-img",
            &["convert", "-q", "-c", "-O", "qcow2", "-o", &format!("compression_type={ty}"), p(&v[0].1), p(&f)],
        );
        v.push((format!("compressed-{name}"), f));
    }
    // A chain: overlay over the plain image, with its own data.
    let top = d.join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "plain.qcow2", "-F", "qcow2", p(&top)]);
    ok("qemu-io", &["-c", "write -P 0x44 1M 4k", "-c", "write -z 0 4k", p(&top)]);
    v.push(("chain".into(), top));
    v
}

fn info_fields(img: &Path) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["info", "--output=json", p(img)])).unwrap();
    serde_json::json!({
        "virtual-size": v["virtual-size"],
        "format": v["format"],
        "cluster-size": v["cluster-size"],
        "data": v["format-specific"]["data"],
    })
}

#[test]
fn convert_to_qcow2_reads_and_checks_like_qemu_imgs_own_conversion() {
    let d = tmpdir();
    let opts_cases = [
        "",
        "cluster_size=4096",
        "compat=0.10",
        "extended_l2=on,cluster_size=64k",
        "refcount_bits=8,lazy_refcounts=on",
    ];
    for (name, src) in sources(d.path()) {
        for opts in opts_cases {
            let (mine, theirs) = (d.path().join("mine.qcow2"), d.path().join("theirs.qcow2"));
            for f in [&mine, &theirs] {
                let _ = std::fs::remove_file(f);
            }
            let mut a = vec!["convert", "-O", "qcow2"];
            if !opts.is_empty() {
                a.extend(["-o", opts]);
            }
            let (mut am, mut at) = (a.clone(), a.clone());
            am.extend([p(&src), p(&mine)]);
            at.extend([p(&src), p(&theirs)]);
            ok(QIMG, &am);
            ok("qemu-img", &at);
            let what = format!("{name} -o '{opts}'");
            assert_eq!(ok("qemu-img", &["compare", p(&mine), p(&theirs)]), "Images are identical.\n", "{what}");
            let chk = run("qemu-img", &["check", p(&mine)]);
            assert_eq!(chk.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&chk.stdout));
            assert_eq!(info_fields(&mine), info_fields(&theirs), "{what}");
            // The same clusters hold data (allocation as qemu-img makes it: zero areas stay unallocated).
            let map = |f: &Path| ok("qemu-img", &["map", "--output=json", p(f)]).replace(r#", "offset": "#, "#");
            let strip =
                |m: String| m.lines().map(|l| l.split('#').next().unwrap_or("").to_string()).collect::<Vec<_>>();
            assert_eq!(strip(map(&mine)), strip(map(&theirs)), "{what}: map");
        }
    }
}

#[test]
fn convert_to_raw_sparse_full_existing_and_direct() {
    let d = tmpdir();
    for (name, src) in sources(d.path()) {
        for extra in [&[][..], &["-S", "0"][..], &["-t", "none", "-T", "none"][..], &["-p"][..]] {
            let (mine, theirs) = (d.path().join("mine.raw"), d.path().join("theirs.raw"));
            let mut a = vec!["convert", "-O", "raw"];
            a.extend_from_slice(extra);
            let (mut am, mut at) = (a.clone(), a.clone());
            am.extend([p(&src), p(&mine)]);
            at.extend([p(&src), p(&theirs)]);
            let out = ok(QIMG, &am);
            let expect = ok("qemu-img", &at);
            let what = format!("{name} {extra:?}");
            assert_eq!(std::fs::read(&mine).unwrap(), std::fs::read(&theirs).unwrap(), "{what}");
            // Allocated bytes: -S 0 writes every byte, otherwise holes stay holes.
            use std::os::unix::fs::MetadataExt;
            let blocks = |f: &Path| std::fs::metadata(f).unwrap().blocks();
            if extra.contains(&"0") {
                assert_eq!(blocks(&mine), blocks(&theirs), "{what}: -S 0 allocates everything");
            } else {
                assert!(blocks(&mine) <= blocks(&theirs) + 64, "{what}: sparse");
            }
            if extra.contains(&"-p") {
                // Not a terminal: qemu-img's own progress lines.
                assert_eq!(out.trim_end().rsplit('\r').next(), expect.trim_end().rsplit('\r').next(), "{what}: -p");
                assert!(out.starts_with("    (0.00/100%)"), "{what}: {out:?}");
            }
        }
        // -n onto an existing file full of garbage: zero areas must be written as zeros; with
        // --target-is-zero onto a zeroed file they are skipped.
        let t = d.path().join("existing.raw");
        std::fs::write(&t, vec![0xee; 16 << 20]).unwrap();
        ok(QIMG, &["convert", "-n", "-O", "raw", p(&src), p(&t)]);
        ok("qemu-img", &["compare", "-F", "raw", p(&src), p(&t)]);
        std::fs::write(&t, vec![0; 16 << 20]).unwrap();
        ok(QIMG, &["convert", "-n", "--target-is-zero", "-O", "raw", p(&src), p(&t)]);
        ok("qemu-img", &["compare", "-F", "raw", p(&src), p(&t)]);
    }
    // Refusals qemu-img makes too, and the ones qimg makes by name.
    let src = d.path().join("plain.qcow2");
    let o = run(QIMG, &["convert", "--target-is-zero", "-O", "raw", p(&src), p(&d.path().join("x.raw"))]);
    assert_eq!(o.status.code(), Some(1));
    let o = run(QIMG, &["convert", "-O", "raw", p(&src), p(&src)]);
    assert_eq!(o.status.code(), Some(1), "converting onto itself");
    assert!(ok("qemu-img", &["check", p(&src)]).contains("No errors"), "the source survived");
    let o = run(QIMG, &["convert", "-c", "-O", "raw", p(&src), p(&d.path().join("c.raw"))]);
    assert_eq!(o.status.code(), Some(1), "compression into raw");
    let o = run(QIMG, &["convert", "-B", p(&src), "-F", "qcow2", "-O", "raw", p(&src), p(&d.path().join("b.raw"))]);
    assert_eq!(o.status.code(), Some(1), "raw has no backing file");
}

#[test]
fn convert_with_a_backing_file_copies_what_qemu_img_copies() {
    let d = tmpdir();
    let base = d.path().join("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    ok("qemu-io", &["-c", "write -P 1 0 1M", "-c", "write -P 2 1M 1M", p(&base)]);
    // A raw copy with changes (every byte is "top"), and an overlay (only its own clusters are).
    let raw = d.path().join("changed.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&base), p(&raw)]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 3 1M 64k", "-c", "write -P 9 3M 64k", p(&raw)]);
    let ovl = d.path().join("ovl.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&ovl)]);
    ok("qemu-io", &["-c", "write -P 7 512k 64k", "-c", "write -z 2M 64k", p(&ovl)]);
    for (src, fmt) in [(&raw, "raw"), (&ovl, "qcow2")] {
        let (mine, theirs) = (d.path().join("mine.qcow2"), d.path().join("theirs.qcow2"));
        for f in [&mine, &theirs] {
            let _ = std::fs::remove_file(f);
        }
        let a = ["convert", "-f", fmt, "-O", "qcow2", "-B", p(&base), "-F", "qcow2", p(src)];
        let (mut am, mut at) = (a.to_vec(), a.to_vec());
        am.push(p(&mine));
        at.push(p(&theirs));
        ok(QIMG, &am);
        ok("qemu-img", &at);
        assert_eq!(ok("qemu-img", &["compare", p(&mine), p(&theirs)]), "Images are identical.\n", "{fmt}");
        let top = |f: &Path| -> Vec<String> {
            ok("qemu-img", &["map", "--output=json", p(f)])
                .lines()
                .filter(|l| l.contains("\"depth\": 0"))
                .map(|l| l.split(", \"offset\"").next().unwrap_or("").trim_end_matches('}').to_string())
                .collect()
        };
        assert_eq!(top(&mine), top(&theirs), "{fmt}: the same clusters in the top image");
        assert!(ok("qemu-img", &["info", p(&mine)]).contains("backing file format: qcow2"));
        assert_eq!(run("qemu-img", &["check", p(&mine)]).status.code(), Some(0));
    }
}

#[test]
fn compressed_output_reads_like_qemu_imgs_and_is_no_larger() {
    let d = tmpdir();
    // Real, compressible data (program files), and the matrix's sources.
    let real = d.path().join("real.raw");
    let mut bytes = Vec::new();
    for f in std::fs::read_dir("/usr/bin").unwrap().flatten().take(200) {
        if let Ok(b) = std::fs::read(f.path()) {
            bytes.extend_from_slice(&b);
        }
        if bytes.len() > 24 << 20 {
            break;
        }
    }
    bytes.truncate(24 << 20);
    std::fs::write(&real, &bytes).unwrap();
    let mut srcs = sources(d.path());
    srcs.push(("real".into(), real));
    for (name, src) in srcs {
        for (ct, opts) in
            [("zlib", "compression_type=zlib"), ("zstd", "compression_type=zstd"), ("4k", "cluster_size=4k")]
        {
            let (mine, theirs) = (d.path().join("mine.qcow2"), d.path().join("theirs.qcow2"));
            for f in [&mine, &theirs] {
                let _ = std::fs::remove_file(f);
            }
            ok(QIMG, &["convert", "-c", "-O", "qcow2", "-o", opts, p(&src), p(&mine)]);
            ok("qemu-img", &["convert", "-c", "-O", "qcow2", "-o", opts, p(&src), p(&theirs)]);
            let what = format!("{name} -c {ct}");
            assert_eq!(ok("qemu-img", &["compare", p(&mine), p(&theirs)]), "Images are identical.\n", "{what}");
            let chk = run("qemu-img", &["check", p(&mine)]);
            assert_eq!(chk.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&chk.stdout));
            assert_eq!(info_fields(&mine), info_fields(&theirs), "{what}");
            let (a, b) = (std::fs::metadata(&mine).unwrap().len(), std::fs::metadata(&theirs).unwrap().len());
            assert!(a as f64 <= b as f64 * 1.05 + 65536.0, "{what}: {a} bytes against qemu-img's {b}");
            // qimg reads back what it wrote, too.
            let out = d.path().join("back.raw");
            ok(QIMG, &["convert", "-O", "raw", p(&mine), p(&out)]);
            ok("qemu-img", &["compare", "-F", "raw", p(&theirs), p(&out)]);
        }
    }
}

#[test]
fn measure_prints_qemu_imgs_numbers() {
    let d = tmpdir();
    let srcs = sources(d.path());
    // A bitmap counts too.
    let bm = d.path().join("bm.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&bm), "3G"]);
    ok("qemu-img", &["bitmap", "--add", p(&bm), "b0"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "512k", p(&bm), "another"]);
    let mut all: Vec<PathBuf> = srcs.into_iter().map(|(_, f)| f).collect();
    all.push(bm);
    for src in &all {
        for args in [
            &["-O", "qcow2"][..],
            &["-O", "raw"],
            &["--output=json", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
            &["-O", "qcow2", "-o", "preallocation=full"],
            &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"],
            &["-O", "qcow2", "-o", "compat=0.10"],
        ] {
            let mut a = vec!["measure"];
            a.extend_from_slice(args);
            a.push(p(src));
            assert_eq!(ok(QIMG, &a), ok("qemu-img", &a), "{a:?}");
        }
    }
    for size in ["1G", "5T", "100G"] {
        let a = ["measure", "--output=json", "-O", "qcow2", "--size", size, "-o", "cluster_size=512"];
        let (m, t) = (run(QIMG, &a), run("qemu-img", &a));
        assert_eq!(m.status.code(), t.status.code(), "{a:?}");
        assert_eq!(m.stdout, t.stdout, "{a:?}");
        let msg =
            |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).split_once(": ").map(|x| x.1.to_string());
        assert_eq!(msg(&m), msg(&t), "{a:?}");
    }
    let o = run(QIMG, &["measure", "-O", "qcow2"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn create_with_a_backing_file_needs_its_format_as_in_qemu_img_10() {
    let d = tmpdir();
    let base = d.path().join("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "1M"]);
    let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
    let mine = run(QIMG, &["create", "-f", "qcow2", "-b", p(&base), p(&a)]);
    let theirs = run("qemu-img", &["create", "-f", "qcow2", "-b", p(&base), p(&b)]);
    assert_eq!((mine.status.code(), theirs.status.code()), (Some(1), Some(1)));
    let lines = |o: &std::process::Output| {
        let mut l: Vec<String> = String::from_utf8_lossy(&o.stderr)
            .lines()
            .map(|l| l.trim_start_matches("qimg: ").trim_start_matches("qemu-img: ").replace(p(&a), p(&b)))
            .collect();
        l.sort();
        l
    };
    assert_eq!(lines(&mine), lines(&theirs));
    assert!(!a.exists(), "nothing created");
}

#[test]
fn fully_allocated_qcow2_output_keeps_data_next_to_holes_inside_a_cluster() {
    // -S 0 into 64 KiB clusters: a zero run that ends inside a cluster must not swallow the data after it.
    let d = tmpdir();
    let src = d.path().join("s.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&src), "1M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 4k 60k", "-c", "write -P 0x6b 200k 4k", p(&src)]);
    for (fmt, opts) in [("qcow2", ""), ("qcow2", "extended_l2=on,cluster_size=128k"), ("raw", "")] {
        let out = d.path().join(format!("o.{fmt}"));
        let _ = std::fs::remove_file(&out);
        let mut a = vec!["convert", "-f", "raw", "-S", "0", "-O", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([p(&src), p(&out)]);
        ok(QIMG, &a);
        assert_eq!(
            ok("qemu-img", &["compare", "-f", "raw", "-F", fmt, p(&src), p(&out)]),
            "Images are identical.\n",
            "{fmt} {opts}"
        );
    }
}
