//! The rest of qemu-img's command lines that pipelines use, run by qimg and by the installed qemu-img on
//! copies of the same images: `convert` of several sources, long options, `-r`, `--salvage`,
//! `--target-image-opts`, `-S` checks; `resize --preallocation`; `compare -p`, `-s`, `-T`; the "Formatting"
//! line of `create`.

mod common;
use common::*;
use std::path::Path;

/// `qemu-img map --output=json` of an image without host offsets, one line per 64 KiB piece (so runs that
/// merge differently because of host layout compare equal).
fn map_shape(img: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["map", "--output=json", p(img)])).unwrap();
    let mut out = Vec::new();
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let mut o = start;
        while o < start + len {
            out.push(format!(
                "{o} depth={} present={} zero={} data={} compressed={}",
                e["depth"], e["present"], e["zero"], e["data"], e["compressed"]
            ));
            o += 65536 - o % 65536;
        }
    }
    out
}

fn identical(a: &Path, fa: &str, b: &Path, fb: &str) {
    let o = run("qemu-img", &["compare", "-f", fa, "-F", fb, p(a), p(b)]);
    assert_eq!(o.status.code(), Some(0), "{}: {}", p(b), String::from_utf8_lossy(&o.stdout));
}

fn stderr_tail(o: &std::process::Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr);
    e.lines().map(|l| l.trim_start_matches("qimg: ").trim_start_matches("qemu-img: ")).collect::<Vec<_>>().join("\n")
}

#[test]
fn several_sources_are_concatenated_as_qemu_img_does() {
    let d = tmpdir();
    let a = d.path().join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&a), "1M"]);
    io(&a, "qcow2", &["write -P 1 0 64k", "write -P 2 960k 64k"]);
    // A raw source whose size is not a multiple of the target's cluster size, and an empty one.
    let b = d.path().join("b.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&b), "100352"]);
    io(&b, "raw", &["write -P 3 4096 8192", "write -P 4 90112 4096"]);
    let e = d.path().join("empty.raw");
    std::fs::write(&e, b"").unwrap();
    let c = d.path().join("c.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p(&c), "2M"]);
    io(&c, "qcow2", &["write -P 5 1M 4k", "write -z 1040k 4k"]);
    for (fmt, opts) in [("qcow2", ""), ("qcow2", "cluster_size=4k"), ("raw", "")] {
        let (mine, theirs) = (d.path().join(format!("m.{fmt}")), d.path().join(format!("t.{fmt}")));
        for f in [&mine, &theirs] {
            let _ = std::fs::remove_file(f);
        }
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&a), p(&b), p(&e), p(&c)]);
        let (mut am, mut at) = (args.clone(), args.clone());
        am.push(p(&mine));
        at.push(p(&theirs));
        ok(QIMG, &am);
        ok("qemu-img", &at);
        identical(&theirs, fmt, &mine, fmt);
        let size = |f: &Path| -> u64 {
            let v: serde_json::Value =
                serde_json::from_str(&ok("qemu-img", &["info", "--output=json", "-f", fmt, p(f)])).unwrap();
            v["virtual-size"].as_u64().unwrap()
        };
        assert_eq!(size(&mine), 1048576 + 100352 + 2097152, "{fmt}: sizes add up");
        assert_eq!(size(&mine), size(&theirs));
        if fmt == "qcow2" {
            assert_eq!(map_shape(&mine), map_shape(&theirs), "{opts}: the same clusters allocated");
            assert_eq!(run("qemu-img", &["check", p(&mine)]).status.code(), Some(0));
        }
    }
    // What qemu-img refuses with several sources, qimg refuses with the same words.
    let out = d.path().join("x.qcow2");
    for extra in [&["-l", "snap"][..], &["-B", p(&a), "-F", "qcow2"]] {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend([p(&a), p(&c), p(&out)]);
        let (m, t) = (run(QIMG, &args), run("qemu-img", &args));
        assert_eq!((m.status.code(), t.status.code()), (Some(1), Some(1)), "{extra:?}");
        assert_eq!(stderr_tail(&m), stderr_tail(&t), "{extra:?}");
    }
}

#[test]
fn long_options_and_accepted_flags_convert_like_the_short_ones() {
    let d = tmpdir();
    let src = d.path().join("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "4M"]);
    io(&src, "qcow2", &["write -P 7 0 1M", "write -P 8 3M 64k"]);
    // (qimg's line, qemu-img's line): qemu-img 10.0 lacks some of the long names its help lists.
    let lines: [(&[&str], &[&str]); 4] = [
        (
            &["--source-format", "qcow2", "--target-format", "qcow2", "--target-options", "cluster_size=4k", "--quiet"],
            &["--source-format", "qcow2", "-O", "qcow2", "-o", "cluster_size=4k", "--quiet"],
        ),
        (
            &["-f", "qcow2", "-O", "raw", "-W", "-m", "16", "-C", "-U", "-q", "-r", "64M"],
            &["-f", "qcow2", "-O", "raw", "-W", "-m", "16", "-C", "-U", "-q", "-r", "64M"],
        ),
        (
            &["--object", "secret,id=s0,data=x", "-O", "qcow2", "--parallel", "2", "--oob-writes", "--progress", "-q"],
            &["--object", "secret,id=s0,data=x", "-O", "qcow2", "--parallel", "2", "--oob-writes", "-p", "-q"],
        ),
        (
            &["--source-cache", "none", "--target-cache", "none", "--sparse-size", "8k", "--no-create", "-O", "raw"],
            &["--source-cache", "none", "-t", "none", "--sparse-size", "8k", "-n", "-O", "raw"],
        ),
    ];
    for (mine, theirs) in lines {
        for (tool, args) in [(QIMG, mine), ("qemu-img", theirs)] {
            let out = d.path().join(if tool == QIMG { "m" } else { "t" });
            let _ = std::fs::remove_file(&out);
            if args.contains(&"-n") || args.contains(&"--no-create") {
                std::fs::write(&out, vec![0x5a; 4 << 20]).unwrap();
            }
            let mut a = vec!["convert"];
            a.extend_from_slice(args);
            a.extend([p(&src), p(&out)]);
            let o = run(tool, &a);
            assert!(o.status.success(), "{tool} {a:?}: {}", String::from_utf8_lossy(&o.stderr));
            if args.contains(&"-q") || args.contains(&"--quiet") {
                assert!(o.stdout.is_empty(), "{tool} {a:?} is quiet");
            }
        }
        let fmt = if mine.contains(&"raw") { "raw" } else { "qcow2" };
        identical(&d.path().join("t"), fmt, &d.path().join("m"), fmt);
        identical(&src, "qcow2", &d.path().join("m"), fmt);
    }
    // -m outside 1..16, a bad -S and a bad -r are refused as qemu-img refuses them.
    for bad in [&["-m", "0"][..], &["-m", "17"], &["-S", "1000"], &["-S", "32M"], &["--salvage", "-C"]] {
        let mut a = vec!["convert"];
        a.extend_from_slice(bad);
        let out = d.path().join("bad");
        a.extend([p(&src), p(&out)]);
        let (m, t) = (run(QIMG, &a), run("qemu-img", &a));
        assert_eq!(m.status.code(), Some(1), "{bad:?}");
        assert_eq!(t.status.code(), Some(1), "{bad:?}");
        assert_eq!(stderr_tail(&m), stderr_tail(&t), "{bad:?}");
    }
    let o = run(QIMG, &["convert", "-r", "fast", p(&src), p(&d.path().join("r"))]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn convert_takes_options_between_its_file_names() {
    // `qemu-img convert SRC -O raw DST`, as scripts write it: getopt lets options come after a name.
    let d = tmpdir();
    let src = d.path().join("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "4M"]);
    io(&src, "qcow2", &["write -P 7 0 1M"]);
    for (i, args) in [&["-O", "raw"][..], &["-O", "qcow2", "-c"], &["-p", "-O", "raw"]].iter().enumerate() {
        let out = d.path().join(format!("o{i}"));
        let mut a = vec!["convert", p(&src)];
        a.extend_from_slice(args);
        a.push(p(&out));
        ok(QIMG, &a);
        identical(&src, "qcow2", &out, if args.contains(&"qcow2") { "qcow2" } else { "raw" });
    }
    // One name only: qemu-img's message and status.
    let (m, t) = (run(QIMG, &["convert", p(&src)]), run("qemu-img", &["convert", p(&src)]));
    assert_eq!((m.status.code(), t.status.code()), (Some(1), Some(1)));
    assert_eq!(stderr_tail(&m), stderr_tail(&t));
}

#[test]
fn a_rate_limit_slows_the_copy_down() {
    let d = tmpdir();
    let src = d.path().join("s.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&src), "8M"]);
    io(&src, "raw", &["write -P 9 0 8M"]);
    let t = std::time::Instant::now();
    ok(QIMG, &["convert", "-f", "raw", "-r", "16M", p(&src), p(&d.path().join("o"))]);
    // 8 MiB at 16 MiB/s: at least about half a second (the first buffer is not waited for).
    assert!(t.elapsed() >= std::time::Duration::from_millis(350), "{:?}", t.elapsed());
    identical(&src, "raw", &d.path().join("o"), "raw");
}

/// Points the L2 entry of guest cluster `idx` of a fresh 64 KiB-cluster image at a host cluster past the end
/// of the file (unreadable for qimg, read as zeros by qemu).
fn break_l2_entry(img: &Path, idx: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    let entry = 0x8000_0000_0000_0000u64 | (1u64 << 30);
    f.write_all_at(&entry.to_be_bytes(), l2 + idx * 8).unwrap();
}

#[test]
fn salvage_copies_unreadable_clusters_as_zeros_with_a_warning() {
    let d = tmpdir();
    let src = d.path().join("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "1M"]);
    io(&src, "qcow2", &["write -P 1 0 192k"]);
    break_l2_entry(&src, 1);
    let out = d.path().join("o.raw");
    let o = run(QIMG, &["convert", "-O", "raw", p(&src), p(&out)]);
    assert_eq!(o.status.code(), Some(1), "without --salvage the error stops the copy");
    let o = run(QIMG, &["convert", "--salvage", "-O", "raw", p(&src), p(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: error while reading offset 65536"));
    // The rest is copied; the broken cluster reads as zeros (as qemu reads it).
    let theirs = d.path().join("t.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&src), p(&theirs)]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&theirs).unwrap());
}

#[test]
fn target_image_opts_name_an_existing_target() {
    let d = tmpdir();
    let src = d.path().join("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "2M"]);
    io(&src, "qcow2", &["write -P 3 64k 1M"]);
    let t = d.path().join("t.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&t), "2M"]);
    io(&t, "qcow2", &["write -P 0xee 0 2M"]);
    let opts = format!("driver=qcow2,file.filename={}", p(&t));
    let o = run(QIMG, &["convert", "--target-image-opts", p(&src), &opts]);
    assert_eq!(o.status.code(), Some(1), "needs -n, as in qemu-img");
    assert!(stderr_tail(&o).contains("--target-image-opts requires use of -n flag"));
    ok(QIMG, &["convert", "-n", "--target-image-opts", p(&src), &opts]);
    identical(&src, "qcow2", &t, "qcow2");
    assert_eq!(run("qemu-img", &["check", p(&t)]).status.code(), Some(0));
}

#[test]
fn resize_preallocation_allocates_the_new_area_as_qemu_img_does() {
    let d = tmpdir();
    for (fmt, opts) in [
        ("raw", ""),
        ("qcow2", ""),
        ("qcow2", "compat=0.10"),
        ("qcow2", "cluster_size=4k"),
        ("qcow2", "extended_l2=on,cluster_size=128k"),
    ] {
        for modes in [&["metadata", "falloc", "full"][..], &["full", "off", "falloc"], &["falloc"]] {
            let what = format!("{fmt} {opts} {modes:?}");
            let (mine, theirs) = (d.path().join("m"), d.path().join("t"));
            for f in [&mine, &theirs] {
                let _ = std::fs::remove_file(f);
                let mut a = vec!["create", "-q", "-f", fmt];
                if !opts.is_empty() {
                    a.extend(["-o", opts]);
                }
                a.extend([p(f), "1M"]);
                ok("qemu-img", &a);
                io(f, fmt, &["write -P 5 0 100k"]);
            }
            for m in modes {
                let arg = format!("--preallocation={m}");
                let (om, ot) = (
                    run(QIMG, &["resize", "-f", fmt, arg.as_str(), p(&mine), "+1M"]),
                    run("qemu-img", &["resize", "-f", fmt, arg.as_str(), p(&theirs), "+1M"]),
                );
                assert_eq!(om.status.code(), ot.status.code(), "{what} {m}: {}", stderr_tail(&om));
                assert_eq!(om.stdout, ot.stdout, "{what} {m}");
                assert_eq!(stderr_tail(&om), stderr_tail(&ot), "{what} {m}");
            }
            identical(&theirs, fmt, &mine, fmt);
            use std::os::unix::fs::MetadataExt;
            let (bm, bt) = (std::fs::metadata(&mine).unwrap(), std::fs::metadata(&theirs).unwrap());
            // The space reserved or written is qemu-img's, give or take metadata clusters.
            let slack = 4 * 1024 * 1024 / 8 + 256 * 1024;
            assert!(bm.blocks().abs_diff(bt.blocks()) * 512 <= slack, "{what}: {} vs {}", bm.blocks(), bt.blocks());
            if fmt == "qcow2" {
                assert_eq!(map_shape(&mine), map_shape(&theirs), "{what}");
                let chk = run("qemu-img", &["check", p(&mine)]);
                assert_eq!(chk.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&chk.stdout));
            }
        }
    }
    // Refusals: shrinking with preallocation, an unknown mode, metadata on raw.
    let r = d.path().join("r.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&r), "2M"]);
    for args in [&["--shrink", "--preallocation=full", "1M"][..], &["--preallocation=bogus", "3M"]] {
        let mut a = vec!["resize", "-f", "raw"];
        a.extend_from_slice(&args[..args.len() - 1]);
        a.extend([p(&r), args[args.len() - 1]]);
        let (m, t) = (run(QIMG, &a), run("qemu-img", &a));
        assert_eq!((m.status.code(), t.status.code()), (Some(1), Some(1)), "{args:?}");
        assert_eq!(stderr_tail(&m), stderr_tail(&t), "{args:?}");
    }
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 2 << 20, "refused resizes change nothing");
    // --image-opts names the image.
    let q = d.path().join("q.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&q), "1M"]);
    ok(QIMG, &["resize", "--image-opts", &format!("driver=qcow2,file.filename={}", p(&q)), "3M"]);
    assert!(ok("qemu-img", &["info", p(&q)]).contains("virtual size: 3 MiB"));
}

/// The non-progress text of `compare -p` output (progress lines are "    (x.xx/100%)\r").
fn without_progress(s: &[u8]) -> String {
    let s = String::from_utf8_lossy(s);
    let mut out = String::new();
    for piece in s.split('\r') {
        let t = piece.trim_start();
        if t.starts_with('(') && t.contains("/100%)") {
            out.push_str(t.split_once("/100%)").map_or("", |x| x.1));
        } else {
            out.push_str(piece);
        }
    }
    out
}

#[test]
fn compare_reports_what_qemu_img_reports_with_progress_strict_and_direct() {
    let d = tmpdir();
    let a = d.path().join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&a), "4M"]);
    io(&a, "qcow2", &["write -P 1 0 1M", "write -z 2M 64k"]);
    let same = d.path().join("same.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&a), p(&same)]);
    let differs = d.path().join("differs.qcow2");
    ok("qemu-img", &["convert", "-O", "qcow2", p(&a), p(&differs)]);
    io(&differs, "qcow2", &["write -P 9 1536k 512", "write -P 9 3M 4k"]);
    let longer = d.path().join("longer.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&a), p(&longer)]);
    ok("qemu-img", &["resize", "-q", "-f", "raw", p(&longer), "5M"]);
    let longer_dirty = d.path().join("longer-dirty.raw");
    std::fs::copy(&longer, &longer_dirty).unwrap();
    io(&longer_dirty, "raw", &["write -P 4 4608k 512"]);
    for b in [&same, &differs, &longer, &longer_dirty] {
        for flags in [&[][..], &["-s"], &["-p"], &["-p", "-s"], &["-T", "none"], &["-q"], &["--strict", "--progress"]] {
            let mut args = vec!["compare"];
            args.extend_from_slice(flags);
            args.extend([p(&a), p(b)]);
            let (m, t) = (run(QIMG, &args), run("qemu-img", &args));
            let what = format!("{args:?}");
            assert_eq!(m.status.code(), t.status.code(), "{what}");
            assert_eq!(without_progress(&m.stdout), without_progress(&t.stdout), "{what}");
            if flags.contains(&"-p") {
                assert!(String::from_utf8_lossy(&m.stdout).starts_with("    (0.00/100%)\r"), "{what}");
            }
        }
    }
}

#[test]
fn create_prints_qemu_imgs_formatting_line() {
    let d = tmpdir();
    let base = d.path().join("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "1M"]);
    std::env::set_current_dir(d.path()).unwrap();
    let cases: [&[&str]; 14] = [
        &["-f", "qcow2"],
        &["-f", "raw"],
        &["-f", "raw", "-o", "preallocation=falloc"],
        &["-f", "raw", "-o", "preallocation=off"],
        &["-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on"],
        &["-f", "qcow2", "-o", "compat=0.10"],
        &["-f", "qcow2", "-o", "compat=v3,lazy_refcounts=off"],
        &["-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd,refcount_bits=8"],
        &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"],
        &["-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on"],
        &["-f", "qcow2", "-o", "compat=1.1,data_file=d.raw", "-b", "base.qcow2", "-F", "qcow2"],
        &["-f", "qcow2", "-o", "preallocation=metadata"],
        &["-f", "qcow2", "-o", "preallocation=off,cluster_size=2M"],
        &["--format", "qcow2", "--options", "extended_l2=on", "-o", "cluster_size=128k"],
    ];
    for args in cases {
        let mut outs = Vec::new();
        for tool in [QIMG, "qemu-img"] {
            for f in ["x", "d.raw"] {
                let _ = std::fs::remove_file(d.path().join(f));
            }
            let mut a = vec!["create"];
            a.extend_from_slice(args);
            a.extend(["x", "1M"]);
            let o = run(tool, &a);
            assert!(o.status.success(), "{tool} {a:?}: {}", String::from_utf8_lossy(&o.stderr));
            outs.push(String::from_utf8_lossy(&o.stdout).into_owned());
        }
        assert_eq!(outs[0], outs[1], "{args:?}");
    }
    let o = run(QIMG, &["create", "-f", "qcow2", "-o", "size=2M", "x", "1M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_tail(&o).contains("The image size must be specified only once"));
}

#[test]
fn dd_copies_what_qemu_img_dd_copies() {
    let d = tmpdir();
    let src = d.path().join("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "1M"]);
    io(&src, "qcow2", &["write -P 1 0 64k", "write -P 2 200k 100k", "write -P 3 1000k 24k"]);
    let cases: [&[&str]; 6] = [
        &[],
        &["bs=64k", "count=3", "skip=1"],
        &["bs=4k", "-O", "qcow2"],
        &["bs=3000"],
        &["count=1"],
        &["bs=1M", "count=10"],
    ];
    for args in cases {
        let fmt = if args.contains(&"qcow2") { "qcow2" } else { "raw" };
        let (mine, theirs) = (d.path().join("m"), d.path().join("t"));
        for (tool, out) in [(QIMG, &mine), ("qemu-img", &theirs)] {
            let _ = std::fs::remove_file(out);
            let i = format!("if={}", p(&src));
            let o = format!("of={}", p(out));
            let mut a = vec!["dd"];
            a.extend_from_slice(args);
            a.extend([i.as_str(), o.as_str()]);
            ok(tool, &a);
        }
        identical(&theirs, fmt, &mine, fmt);
        let size = |f: &Path| -> u64 {
            let v: serde_json::Value =
                serde_json::from_str(&ok("qemu-img", &["info", "--output=json", "-f", fmt, p(f)])).unwrap();
            v["virtual-size"].as_u64().unwrap()
        };
        assert_eq!(size(&mine), size(&theirs), "{args:?}");
    }
    // Refusals, with qemu-img's words.
    for (args, msg) in [
        (&["bs=64k", "skip=100"][..], "cannot skip to specified offset"),
        (&["conv=notrunc"], "unrecognized operand conv"),
    ] {
        let i = format!("if={}", p(&src));
        let o = format!("of={}", p(&d.path().join("x")));
        let mut a = vec!["dd"];
        a.extend_from_slice(args);
        a.extend([i.as_str(), o.as_str()]);
        // qemu-img prints the skip error but exits 0 (and leaves an empty output); qimg exits 1.
        let (m, t) = (run(QIMG, &a), run("qemu-img", &a));
        assert_eq!(m.status.code(), Some(1), "{args:?}");
        assert!(stderr_tail(&m).contains(msg), "{args:?}: {}", stderr_tail(&m));
        assert!(stderr_tail(&t).contains(msg), "{args:?}: {}", stderr_tail(&t));
    }
    let o = run(QIMG, &["dd", &format!("if={}", p(&src))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_tail(&o).contains("Must specify both input and output files"));
}
