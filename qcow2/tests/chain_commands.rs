//! qemu-img's chain commands run by qimg and by qemu-img on copies of the same chain: `rebase` (safe mode onto
//! another backing file of another format, `-b ""` flattening, `-u`). The results must read identically
//! (`qemu-img compare`), keep the guest's bytes, check clean and name the same backing file and format.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Tests that change the working directory (the process has one) take turns.
static CWD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn backing_of(img: &Path) -> (serde_json::Value, serde_json::Value) {
    let v: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["info", "--output=json", p(img)])).unwrap();
    (v["backing-filename"].clone(), v["backing-filename-format"].clone())
}

fn map_shape(img: &Path) -> Vec<String> {
    ok("qemu-img", &["map", "--output=json", p(img)])
        .lines()
        .map(|l| l.split(", \"offset\"").next().unwrap_or("").trim_end_matches(['}', ']']).to_string())
        .collect()
}

#[test]
fn rebase_gives_what_qemu_img_rebase_gives() {
    let _cwd = CWD.lock().unwrap_or_else(|e| e.into_inner());
    let d = tmpdir();
    std::env::set_current_dir(d.path()).unwrap();
    let b1 = d.path().join("b1.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&b1), "4M"]);
    io(&b1, "qcow2", &["write -P 1 0 4M"]);
    let b2 = d.path().join("b2.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&b2), "3M"]);
    io(&b2, "raw", &["write -P 1 0 1M", "write -P 2 1M 1M"]);
    let b3 = d.path().join("a-second-backing-file-with-a-longer-name.qcow2");
    ok("qemu-img", &["convert", "-O", "qcow2", p(&b1), p(&b3)]);
    io(&b3, "qcow2", &["write -P 3 2M 64k"]);
    let make = |name: &str, base: &str, fmt: &str| {
        let ov = d.path().join(name);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, p(&ov), "4M"]);
        io(&ov, "qcow2", &["write -P 9 512k 64k", "write -P 8 3M 100k", "write -z 1536k 64k"]);
        ov
    };
    // (starting backing and format, rebase arguments)
    let cases: [(&str, &str, &[&str]); 7] = [
        ("b1.qcow2", "qcow2", &["-b", "b2.raw", "-F", "raw"]),
        ("b2.raw", "raw", &["-b", "b1.qcow2", "-F", "qcow2"]),
        ("b1.qcow2", "qcow2", &["-b", "a-second-backing-file-with-a-longer-name.qcow2", "-F", "qcow2"]),
        ("b1.qcow2", "qcow2", &["-b", ""]),
        ("b1.qcow2", "qcow2", &["-u", "-b", "b2.raw", "-F", "raw"]),
        ("b1.qcow2", "qcow2", &["-c", "-b", ""]),
        ("b1.qcow2", "qcow2", &["-c", "-b", "b2.raw", "-F", "raw"]),
    ];
    for (i, (base, fmt, args)) in cases.iter().enumerate() {
        let mine = make(&format!("m{i}.qcow2"), base, fmt);
        let theirs = make(&format!("t{i}.qcow2"), base, fmt);
        let before = d.path().join(format!("before{i}.raw"));
        ok("qemu-img", &["convert", "-O", "raw", p(&mine), p(&before)]);
        for (tool, img) in [(QIMG, &mine), ("qemu-img", &theirs)] {
            let mut a = vec!["rebase"];
            a.extend_from_slice(args);
            a.push(p(img));
            ok(tool, &a);
        }
        let what = format!("{base} {args:?}");
        assert_eq!(backing_of(&mine), backing_of(&theirs), "{what}");
        assert_eq!(ok("qemu-img", &["compare", p(&mine), p(&theirs)]), "Images are identical.\n", "{what}");
        if !args.contains(&"-u") {
            // Safe mode: the guest sees what it saw.
            assert_eq!(
                ok("qemu-img", &["compare", "-F", "raw", p(&mine), p(&before)]),
                "Images are identical.\n",
                "{what}"
            );
            assert_eq!(map_shape(&mine), map_shape(&theirs), "{what}: the same clusters written");
        }
        let chk = run("qemu-img", &["check", p(&mine)]);
        assert_eq!(chk.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&chk.stdout));
        // qemu reads and writes the rebased image.
        ok("qemu-io", &["-c", "write -P 7 0 4k", "-c", "read -P 7 0 4k", p(&mine)]);
    }
    // Refusals.
    let ov = make("r.qcow2", "b1.qcow2", "qcow2");
    let o = run(QIMG, &["rebase", p(&ov)]);
    assert_eq!(o.status.code(), Some(1));
    let o = run(QIMG, &["rebase", "-b", "missing.qcow2", "-F", "qcow2", p(&ov)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.qcow2"));
    assert_eq!(backing_of(&ov).0, serde_json::json!("b1.qcow2"), "a refused rebase changes nothing");
}

#[test]
fn commit_gives_what_qemu_img_commit_gives() {
    let _cwd = CWD.lock().unwrap_or_else(|e| e.into_inner());
    let d = tmpdir();
    std::env::set_current_dir(d.path()).unwrap();
    for (base_fmt, extra) in
        [("qcow2", &[][..]), ("raw", &[][..]), ("qcow2", &["-d"][..]), ("qcow2", &["-b", "base-t.qcow2"][..])]
    {
        let mut chains = Vec::new();
        for who in ["m", "t"] {
            let base = d.path().join(format!("base-{who}.{base_fmt}"));
            ok("qemu-img", &["create", "-q", "-f", base_fmt, p(&base), "4M"]);
            io(&base, base_fmt, &["write -P 1 0 4M"]);
            let top = d.path().join(format!("top-{who}.qcow2"));
            let name = format!("base-{who}.{base_fmt}");
            ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &name, "-F", base_fmt, p(&top)]);
            io(
                &top,
                "qcow2",
                &["write -P 9 512k 64k", "write -P 8 3M 100k", "write -z 1536k 64k", "write -P 7 1000 3000"],
            );
            chains.push((base, top));
        }
        let before = d.path().join("before.raw");
        ok("qemu-img", &["convert", "-O", "raw", p(&chains[0].1), p(&before)]);
        let what = format!("{base_fmt} {extra:?}");
        if extra.contains(&"-b") {
            // A base that is not in the chain is refused with qemu-img's words.
            let o = run(QIMG, &["commit", "-b", "somewhere-else.qcow2", p(&chains[0].1)]);
            assert_eq!(o.status.code(), Some(1), "{what}");
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("Did not find 'somewhere-else.qcow2' in the backing chain")
            );
            let o = run(QIMG, &["commit", "-b", &format!("base-m.{base_fmt}"), p(&chains[0].1)]);
            assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
            ok("qemu-img", &["commit", "-b", &format!("base-t.{base_fmt}"), p(&chains[1].1)]);
        } else {
            for (tool, (_, top)) in [(QIMG, &chains[0]), ("qemu-img", &chains[1])] {
                let mut a = vec!["commit"];
                a.extend_from_slice(extra);
                a.push(p(top));
                let out = ok(tool, &a);
                assert_eq!(out, "Image committed.\n", "{what}: {tool}");
            }
        }
        let (mb, mt) = &chains[0];
        let (tb, tt) = &chains[1];
        // The base now holds what the chain read, and the chain still reads it.
        let o = run("qemu-img", &["compare", "-f", base_fmt, "-F", base_fmt, p(mb), p(tb)]);
        assert_eq!(o.status.code(), Some(0), "{what}: bases: {}", String::from_utf8_lossy(&o.stdout));
        assert_eq!(ok("qemu-img", &["compare", "-F", "raw", p(mt), p(&before)]), "Images are identical.\n", "{what}");
        assert_eq!(
            ok("qemu-img", &["compare", "-f", base_fmt, "-F", "raw", p(mb), p(&before)]),
            "Images are identical.\n",
            "{what}"
        );
        assert_eq!(map_shape(mt), map_shape(tt), "{what}: the top image's clusters");
        for img in [mt, mb] {
            if img.extension().is_some_and(|e| e == "qcow2") {
                let chk = run("qemu-img", &["check", p(img)]);
                assert_eq!(chk.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&chk.stdout));
            }
        }
    }
    let lone = d.path().join("lone.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&lone), "1M"]);
    let o = run(QIMG, &["commit", p(&lone)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Image does not have a backing file"));
}

#[test]
fn snapshot_list_prints_what_qemu_img_prints() {
    let d = tmpdir();
    let img = d.path().join("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    // No snapshots: nothing printed.
    assert_eq!(ok(QIMG, &["snapshot", "-l", p(&img)]), ok("qemu-img", &["snapshot", "-l", p(&img)]));
    io(&img, "qcow2", &["write -P 1 0 64k"]);
    ok("qemu-img", &["snapshot", "-c", "first", p(&img)]);
    ok("qemu-img", &["snapshot", "-c", "a-longer-snapshot-name", p(&img)]);
    for args in [&["-l"][..], &["--list", "-U"], &["-l", "-f", "qcow2"]] {
        let mut a = vec!["snapshot"];
        a.extend_from_slice(args);
        a.push(p(&img));
        assert_eq!(ok(QIMG, &a), ok("qemu-img", &a), "{args:?}");
    }
}

/// `snapshot -l` output with every date masked (the two tools take their snapshots a moment apart).
fn list_without_dates(img: &Path) -> String {
    let mut b = ok("qemu-img", &["snapshot", "-l", p(img)]).into_bytes();
    let is_date = |w: &[u8]| {
        w.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b' ',
            13 | 16 => c == b':',
            _ => c.is_ascii_digit(),
        })
    };
    let mut i = 0;
    while i + 19 <= b.len() {
        if is_date(&b[i..i + 19]) {
            b[i..i + 19].copy_from_slice(b"YYYY-MM-DD hh:mm:ss");
            i += 19;
        } else {
            i += 1;
        }
    }
    String::from_utf8(b).unwrap()
}

fn raw_of(img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = img.with_extension(format!("{}.raw", snapshot.unwrap_or("active")));
    let mut a = vec!["convert", "-O", "raw"];
    if let Some(s) = snapshot {
        a.extend_from_slice(&["-l", s]);
    }
    a.extend_from_slice(&[p(img), p(&out)]);
    ok("qemu-img", &a);
    std::fs::read(&out).unwrap()
}

/// `snapshot -c`, `-a` (by ID and by name) and `-d` run by qimg and by qemu-img on copies of the same images
/// (plain, extended L2, compat=0.10, compressed clusters, with a backing file), with the same guest writes in
/// between: the snapshot lists match (dates aside), the active image and every snapshot read identically,
/// and both check clean after every command.
#[test]
fn snapshot_commands_give_what_qemu_img_gives() {
    let d = tmpdir();
    let base = d.path().join("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    io(&base, "qcow2", &["write -P 0x31 0 4M"]);
    let kinds: [(&str, &[&str]); 5] = [
        ("plain", &["-o", "cluster_size=64k"]),
        ("extl2", &["-o", "extended_l2=on,cluster_size=128k"]),
        ("v2", &["-o", "compat=0.10,cluster_size=4k"]),
        ("compressed", &["-o", "cluster_size=16k"]),
        ("backing", &["-b", "base.qcow2", "-F", "qcow2"]),
    ];
    for (kind, opts) in kinds {
        let make = |who: &str| {
            let img = d.path().join(format!("{kind}-{who}.qcow2"));
            let mut a = vec!["create", "-q", "-f", "qcow2"];
            a.extend_from_slice(opts);
            a.extend_from_slice(&[p(&img), "4M"]);
            ok("qemu-img", &a);
            if kind == "compressed" {
                io(&img, "qcow2", &["write -c -P 0x41 0 256k"]);
            }
            io(&img, "qcow2", &["write -P 1 512k 300k", "write -z 2M 64k"]);
            img
        };
        let (mine, theirs) = (make("qimg"), make("qemu"));
        let steps: [(&[&str], &[&str]); 8] = [
            (&["-c", "s1"], &["write -P 2 600k 64k", "write -P 3 3M 8k"]),
            (&["-c", "s2"], &["write -P 4 0 4k", "discard 512k 64k"]),
            (&["-c", "s1"], &["write -P 5 1M 1M"]),
            (&["-a", "s2"], &["write -P 6 100k 4k"]),
            (&["-a", "1"], &["write -P 7 3M 64k"]),
            (&["-d", "s1"], &["write -P 8 0 8k"]),
            (&["-d", "s2"], &["write -P 9 2M 4k"]),
            (&["-d", "s1"], &[]),
        ];
        for (args, writes) in steps {
            let what = format!("{kind}: snapshot {args:?}");
            for (tool, img) in [(QIMG, &mine), ("qemu-img", &theirs)] {
                let mut a = vec!["snapshot"];
                a.extend_from_slice(args);
                a.push(p(img));
                ok(tool, &a);
                let c = run("qemu-img", &["check", p(img)]);
                assert_eq!(c.status.code(), Some(0), "{what} by {tool}: {}", String::from_utf8_lossy(&c.stdout));
            }
            assert_eq!(list_without_dates(&mine), list_without_dates(&theirs), "{what}");
            assert!(raw_of(&mine, None) == raw_of(&theirs, None), "{what}: the active images differ");
            let listed = ok("qemu-img", &["snapshot", "-l", p(&mine)]);
            for id in listed.lines().skip(2).filter_map(|l| l.split_whitespace().next()) {
                let s = format!("snapshot.id={id}");
                assert!(raw_of(&mine, Some(&s)) == raw_of(&theirs, Some(&s)), "{what}: snapshot {id} differs");
            }
            for img in [&mine, &theirs] {
                io(img, "qcow2", writes);
            }
        }
        assert_eq!(ok("qemu-img", &["snapshot", "-l", p(&mine)]), "", "{kind}");
    }
}

/// The refusals of `snapshot` match qemu-img's, and change nothing.
#[test]
fn snapshot_refusals_match_qemu_img() {
    let d = tmpdir();
    let img = d.path().join("r.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    io(&img, "qcow2", &["write -P 1 0 64k"]);
    ok("qemu-img", &["snapshot", "-c", "first", p(&img)]);
    let bits1 = d.path().join("bits1.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", p(&bits1), "1M"]);
    io(&bits1, "qcow2", &["write -P 1 0 64k"]);
    let bitmaps = d.path().join("bm.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&bitmaps), "1M"]);
    ok("qemu-img", &["snapshot", "-c", "first", p(&bitmaps)]);
    ok("qemu-img", &["bitmap", "--add", p(&bitmaps), "b0"]);
    let df = d.path().join("df.qcow2");
    let data = format!("data_file={}", p(&d.path().join("df.raw")));
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &data, p(&df), "1M"]);
    let raw = d.path().join("r.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "1M"]);
    let cases: [(&[&str], &Path); 7] = [
        (&["-a", "nope"], &img),
        (&["-d", "nope"], &img),
        (&["-d", "1"], &img),
        (&["-c", "x", "-d", "first"], &img),
        (&["-a", "first"], &bitmaps),
        (&["-c", "x"], &df),
        (&["-f", "raw", "-c", "x"], &raw),
    ];
    for (args, target) in cases {
        let before = std::fs::read(target).unwrap();
        let mut a = vec!["snapshot"];
        a.extend_from_slice(args);
        a.push(p(target));
        let mine = run(QIMG, &a);
        assert!(std::fs::read(target).unwrap() == before, "{args:?}: a refused command changed the image");
        // (qemu-img itself rewrites the bitmaps of an image whose snapshot it refused to apply.)
        let theirs = run("qemu-img", &a);
        assert_eq!(mine.status.code(), Some(1), "{args:?}");
        assert_eq!(mine.status.code(), theirs.status.code(), "{args:?}");
        let (m, t) = (String::from_utf8_lossy(&mine.stderr), String::from_utf8_lossy(&theirs.stderr));
        assert_eq!(m.replace("qimg: ", "qemu-img: "), t, "{args:?}");
    }
    // refcount_bits=1 cannot count a cluster shared with a snapshot: both refuse (qemu says only "Invalid
    // argument"), and the image is unchanged.
    let before = std::fs::read(&bits1).unwrap();
    let o = run(QIMG, &["snapshot", "-c", "x", p(&bits1)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Could not create snapshot 'x': "));
    assert!(std::fs::read(&bits1).unwrap() == before);
    assert_eq!(run("qemu-img", &["snapshot", "-c", "x", p(&bits1)]).status.code(), Some(1));
}

/// `amend -o` run by qimg and by qemu-img on copies of the same images (version 2 and 3, with a backing file,
/// a snapshot and data): the same exit status and message, the same `info` fields, identical contents
/// (active and snapshot), both clean by `qemu-img check`.
#[test]
fn amend_gives_what_qemu_img_amend_gives() {
    let d = tmpdir();
    let base = d.path().join("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "8M"]);
    io(&base, "qcow2", &["write -P 0x21 0 8M"]);
    let fields = |img: &Path| {
        let v: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["info", "--output=json", p(img)])).unwrap();
        let s = &v["format-specific"]["data"];
        format!(
            "{} {} {} {} {} {} {}",
            v["virtual-size"],
            v["backing-filename"],
            v["backing-filename-format"],
            s["compat"],
            s["lazy-refcounts"],
            s["refcount-bits"],
            s["data-file-raw"]
        )
    };
    let cases: [(&str, &str); 18] = [
        ("compat=0.10", "compat=1.1"),
        ("compat=0.10", "compat=1.1,lazy_refcounts=on,refcount_bits=8,size=12M"),
        ("compat=0.10", "lazy_refcounts=on"),
        ("compat=0.10", "refcount_bits=4"),
        ("compat=0.10", "size=16M"),
        ("compat=1.1", "compat=0.10"),
        ("compat=1.1", "lazy_refcounts=on"),
        ("compat=1.1,lazy_refcounts=on", "lazy_refcounts=off"),
        ("compat=1.1", "refcount_bits=1"),
        ("compat=1.1", "refcount_bits=2"),
        ("compat=1.1", "refcount_bits=64"),
        ("compat=1.1,refcount_bits=64", "refcount_bits=16,compat=0.10"),
        ("compat=1.1", "refcount_bits=8,compat=0.10"),
        ("compat=1.1", "size=12M"),
        ("compat=1.1", "cluster_size=4k"),
        ("compat=1.1", "backing_file=x.qcow2"),
        ("compat=1.1", "data_file=x.raw"),
        ("compat=1.1", "bogus=1"),
    ];
    for (i, (create, amend)) in cases.iter().enumerate() {
        let make = |who: &str| {
            let img = d.path().join(format!("a{i}-{who}.qcow2"));
            ok(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", create, "-b", "base.qcow2", "-F", "qcow2", p(&img), "8M"],
            );
            io(&img, "qcow2", &["write -P 3 0 1M"]);
            ok("qemu-img", &["snapshot", "-c", "s", p(&img)]);
            io(&img, "qcow2", &["write -P 4 64k 64k", "write -P 5 7M 4k"]);
            img
        };
        let (mine, theirs) = (make("qimg"), make("qemu"));
        let what = format!("created with {create}, amend -o {amend}");
        let m = run(QIMG, &["amend", "-o", amend, p(&mine)]);
        let t = run("qemu-img", &["amend", "-o", amend, p(&theirs)]);
        assert_eq!(m.status.code(), t.status.code(), "{what}: {}", String::from_utf8_lossy(&m.stderr));
        if t.status.code() == Some(1) && !amend.starts_with("refcount_bits=1") {
            let (me, te) = (String::from_utf8_lossy(&m.stderr), String::from_utf8_lossy(&t.stderr));
            assert_eq!(me.replace("qimg: ", "qemu-img: "), te, "{what}");
        }
        assert_eq!(fields(&mine), fields(&theirs), "{what}");
        for img in [&mine, &theirs] {
            let c = run("qemu-img", &["check", p(img)]);
            assert_eq!(c.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&c.stdout));
        }
        assert!(raw_of(&mine, None) == raw_of(&theirs, None), "{what}: the images differ");
        assert!(
            raw_of(&mine, Some("snapshot.name=s")) == raw_of(&theirs, Some("snapshot.name=s")),
            "{what}: the snapshots differ"
        );
    }
    // Refused by name where qemu-img would expand zero clusters.
    let z = d.path().join("zero.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&z), "1M"]);
    io(&z, "qcow2", &["write -z 0 64k"]);
    let before = std::fs::read(&z).unwrap();
    let o = run(QIMG, &["amend", "-o", "compat=0.10", p(&z)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("zero clusters"));
    assert!(std::fs::read(&z).unwrap() == before);
    // -o help lists what qemu-img lists.
    assert_eq!(ok(QIMG, &["amend", "-o", "help", p(&z)]), ok("qemu-img", &["amend", "-o", "help", p(&z)]));
}

/// `commit -b BASE` into an image further down the chain (qcow2 and raw bases, an intermediate image smaller
/// than the top, zero writes, overlapping data), by qimg and by qemu-img on copies: the bases end identical,
/// the chain reads as before, the images above the base are left untouched, everything checks clean.
#[test]
fn commit_into_a_deeper_base_gives_what_qemu_img_gives() {
    let d = tmpdir();
    for base_fmt in ["qcow2", "raw"] {
        let mut chains = Vec::new();
        for who in ["m", "t"] {
            let c0 = d.path().join(format!("{who}0.{base_fmt}"));
            ok("qemu-img", &["create", "-q", "-f", base_fmt, p(&c0), "4M"]);
            io(&c0, base_fmt, &["write -P 1 0 4M"]);
            let c1 = d.path().join(format!("{who}1.qcow2"));
            let n0 = format!("{who}0.{base_fmt}");
            ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &n0, "-F", base_fmt, p(&c1), "2M"]);
            io(&c1, "qcow2", &["write -P 2 0 1M", "write -z 1M 128k"]);
            let c2 = d.path().join(format!("{who}2.qcow2"));
            let n1 = format!("{who}1.qcow2");
            ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &n1, "-F", "qcow2", p(&c2), "4M"]);
            io(&c2, "qcow2", &["write -P 3 512k 1M", "write -z 3M 64k", "write -P 4 3500k 4k"]);
            chains.push((c0, c1, c2));
        }
        let before = d.path().join("before.raw");
        ok("qemu-img", &["convert", "-O", "raw", p(&chains[0].2), p(&before)]);
        let untouched: Vec<Vec<u8>> = [&chains[0].1, &chains[0].2].iter().map(|f| std::fs::read(f).unwrap()).collect();
        for (tool, (c0, _, c2)) in [(QIMG, &chains[0]), ("qemu-img", &chains[1])] {
            assert_eq!(ok(tool, &["commit", "-b", p(c0), p(c2)]), "Image committed.\n", "{base_fmt}: {tool}");
        }
        let what = format!("commit -b into a {base_fmt} base");
        let (m, t) = (&chains[0], &chains[1]);
        let o = run("qemu-img", &["compare", "-f", base_fmt, "-F", base_fmt, p(&m.0), p(&t.0)]);
        assert_eq!(o.status.code(), Some(0), "{what}: bases: {}", String::from_utf8_lossy(&o.stdout));
        assert_eq!(ok("qemu-img", &["compare", "-F", "raw", p(&m.2), p(&before)]), "Images are identical.\n");
        assert!(std::fs::read(&m.1).unwrap() == untouched[0], "{what}: the intermediate image changed");
        assert!(std::fs::read(&m.2).unwrap() == untouched[1], "{what}: the top image changed");
        if base_fmt == "qcow2" {
            let chk = run("qemu-img", &["check", p(&m.0)]);
            assert_eq!(chk.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&chk.stdout));
            assert_eq!(map_shape(&m.0), map_shape(&t.0), "{what}: the base's clusters");
        }
    }
}

/// Rewrites the first snapshot table entry of a qcow2 file without extra data, as very old qemu wrote them.
fn strip_snapshot_extra_data(img: &Path) {
    let mut d = std::fs::read(img).unwrap();
    let at = u64::from_be_bytes(d[64..72].try_into().unwrap()) as usize;
    let (id, name) = (
        u16::from_be_bytes(d[at + 12..at + 14].try_into().unwrap()) as usize,
        u16::from_be_bytes(d[at + 14..at + 16].try_into().unwrap()) as usize,
    );
    let extra = u32::from_be_bytes(d[at + 36..at + 40].try_into().unwrap()) as usize;
    let mut e = d[at..at + 40].to_vec();
    e[36..40].copy_from_slice(&0u32.to_be_bytes());
    e.extend_from_slice(&d[at + 40 + extra..at + 40 + extra + id + name]);
    // The old entry was longer: what follows the new one is zeros up to its end.
    e.resize(((40 + extra + id + name).div_ceil(8) * 8).min(d.len() - at), 0);
    d[at..at + e.len()].copy_from_slice(&e);
    std::fs::write(img, d).unwrap();
}

/// amend where the image's other parts matter: a version 2 snapshot entry without extra data (version 3
/// needs it: both tools complete it), a snapshot of another size (no downgrade), an external data file
/// (its refcounts can change). qimg and qemu-img on copies: same status and message, both clean, same lists.
#[test]
fn amend_with_snapshots_and_data_files_matches_qemu_img() {
    let d = tmpdir();
    type Prep = fn(&Path, &Path);
    let cases: [(&str, Prep, &str); 4] = [
        (
            "an old snapshot entry",
            |img, _| {
                ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", p(img), "8M"]);
                io(img, "qcow2", &["write -P 1 0 1M"]);
                ok("qemu-img", &["snapshot", "-c", "s1", p(img)]);
                strip_snapshot_extra_data(img);
            },
            "compat=1.1",
        ),
        (
            "a snapshot of another size",
            |img, _| {
                ok("qemu-img", &["create", "-q", "-f", "qcow2", p(img), "8M"]);
                io(img, "qcow2", &["write -P 1 0 1M"]);
                ok("qemu-img", &["snapshot", "-c", "s1", p(img)]);
                ok("qemu-img", &["resize", "-q", p(img), "16M"]);
            },
            "compat=0.10",
        ),
        (
            "an external data file",
            |img, dir| {
                let data = format!("data_file={}", p(&img.with_extension("raw")));
                let _ = dir;
                ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &data, p(img), "4M"]);
                io(img, "qcow2", &["write -P 1 0 1M"]);
            },
            "refcount_bits=8",
        ),
        (
            "a data file renamed",
            |img, dir| {
                let data = format!("data_file={}", p(&img.with_extension("raw")));
                ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &data, p(img), "4M"]);
                io(img, "qcow2", &["write -P 3 0 1M"]);
                // Both images end up naming this copy of the data (the same bytes).
                std::fs::copy(img.with_extension("raw"), dir.join("renamed-data.raw")).unwrap();
            },
            "data_file=renamed-data.raw",
        ),
    ];
    for (i, (what, prep, opts)) in cases.iter().enumerate() {
        let (mine, theirs) = (d.path().join(format!("e{i}-m.qcow2")), d.path().join(format!("e{i}-t.qcow2")));
        prep(&mine, d.path());
        prep(&theirs, d.path());
        // A relative data file name is looked up from the working directory (by qemu too): name it absolutely.
        let opts = match opts.strip_prefix("data_file=") {
            Some(n) => format!("data_file={}", p(&d.path().join(n))),
            None => opts.to_string(),
        };
        let m = run(QIMG, &["amend", "-o", &opts, p(&mine)]);
        let t = run("qemu-img", &["amend", "-o", &opts, p(&theirs)]);
        assert_eq!(m.status.code(), t.status.code(), "{what}: {}", String::from_utf8_lossy(&m.stderr));
        let (me, te) = (String::from_utf8_lossy(&m.stderr), String::from_utf8_lossy(&t.stderr));
        assert_eq!(me.replace("qimg: ", "qemu-img: "), te, "{what}");
        for img in [&mine, &theirs] {
            let c = run("qemu-img", &["check", p(img)]);
            assert_eq!(c.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&c.stdout));
        }
        assert_eq!(list_without_dates(&mine), list_without_dates(&theirs), "{what}");
        assert!(raw_of(&mine, None) == raw_of(&theirs, None), "{what}: the images differ");
    }
}

/// `commit -r RATE` limits what is written per second (4 MiB at 2 MiB/s: at least 1.5 s); a bad rate gets
/// qemu-img's message.
#[test]
fn commit_rate_limit_holds() {
    let d = tmpdir();
    let base = d.path().join("rb.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "8M"]);
    let top = d.path().join("rt.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "rb.qcow2", "-F", "qcow2", p(&top)]);
    io(&top, "qcow2", &["write -P 1 0 4M"]);
    let bad = run(QIMG, &["commit", "-r", "abc", p(&top)]);
    assert_eq!(bad.status.code(), Some(1));
    let theirs = run("qemu-img", &["commit", "-r", "abc", p(&top)]);
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).replace("qimg: ", "qemu-img: "),
        String::from_utf8_lossy(&theirs.stderr)
    );
    let t = std::time::Instant::now();
    ok(QIMG, &["commit", "-r", "2M", p(&top)]);
    assert!(t.elapsed() >= std::time::Duration::from_millis(1500), "4 MiB at 2 MiB/s took {:?}", t.elapsed());
    assert_eq!(ok("qemu-io", &["-f", "qcow2", "-c", "read -P 1 0 4M", p(&base)]).lines().count(), 2);
}

/// Sets header bytes `at..at + bytes.len()` of a file.
fn patch(img: &Path, at: usize, bytes: &[u8]) {
    let mut d = std::fs::read(img).unwrap();
    d[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(img, d).unwrap();
}

/// Bitmaps that qemu ignores (their autoclear bit is clear) do not stop `snapshot -a`; a snapshot whose L1 size
/// is hostile makes `amend -o compat=0.10` refuse the image, not allocate gigabytes.
#[test]
fn snapshot_and_amend_edges_of_hostile_or_stale_metadata() {
    let d = tmpdir();
    let (mine, theirs) = (d.path().join("bm-m.qcow2"), d.path().join("bm-t.qcow2"));
    for img in [&mine, &theirs] {
        ok("qemu-img", &["create", "-q", "-f", "qcow2", p(img), "4M"]);
        io(img, "qcow2", &["write -P 1 0 1M"]);
        ok("qemu-img", &["snapshot", "-c", "s1", p(img)]);
        io(img, "qcow2", &["write -P 2 0 64k"]);
        ok("qemu-img", &["bitmap", "--add", p(img), "b0"]);
        patch(img, 88, &[0; 8]);
    }
    ok(QIMG, &["snapshot", "-a", "s1", p(&mine)]);
    ok("qemu-img", &["snapshot", "-a", "s1", p(&theirs)]);
    assert!(raw_of(&mine, None) == raw_of(&theirs, None));
    // qemu keeps the ignored bitmap's clusters counted (leaks, exit 3); qimg's rebuilt refcounts drop them.
    let c = run("qemu-img", &["check", p(&mine)]);
    assert_eq!(c.status.code(), Some(0), "{}", String::from_utf8_lossy(&c.stdout));
    // A snapshot claiming 2^31-1 L1 entries.
    let h = d.path().join("hostile.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&h), "4M"]);
    io(&h, "qcow2", &["write -P 1 0 64k"]);
    ok("qemu-img", &["snapshot", "-c", "s1", p(&h)]);
    let table = u64::from_be_bytes(std::fs::read(&h).unwrap()[64..72].try_into().unwrap()) as usize;
    patch(&h, table + 8, &0x7fff_ffffu32.to_be_bytes());
    let before = std::fs::read(&h).unwrap();
    let t = std::time::Instant::now();
    // Under a 1 GiB address-space limit: reading that table would abort the process (exit 134).
    let o =
        Command::new("prlimit").args(["--as=1073741824", QIMG, "amend", "-o", "compat=0.10", p(&h)]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert!(std::fs::read(&h).unwrap() == before, "a refused amend changed the image");
}

/// Random sequences of `snapshot -c/-a/-d` and guest writes (data, zeros, discards, compressed clusters), the same
/// on two copies, one run by qimg and one by qemu-img: after every command the exit status, the snapshot list,
/// the active image and every snapshot agree, and qimg's copy checks clean. (With refcount_bits=2, qemu-img
/// fails to apply a snapshot whose clusters its in-place order would briefly count past 3, where qimg's
/// rebuilt refcounts stay within it: that width is left out here.)
#[test]
fn random_snapshot_sequences_agree_with_qemu_img() {
    let d = tmpdir();
    let kinds =
        ["cluster_size=64k", "cluster_size=4k", "extended_l2=on,cluster_size=64k", "compat=0.10,cluster_size=16k"];
    let ids = |img: &Path| -> Vec<(String, String)> {
        ok("qemu-img", &["snapshot", "-l", p(img)])
            .lines()
            .skip(2)
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w[0].to_string(), w.get(1).copied().unwrap_or("").to_string())
            })
            .collect()
    };
    for (seed, kind) in kinds.iter().enumerate() {
        let mut rng = (seed as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let (mine, theirs) = (d.path().join(format!("r{seed}-m.qcow2")), d.path().join(format!("r{seed}-t.qcow2")));
        for img in [&mine, &theirs] {
            ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", kind, p(img), "8M"]);
        }
        for step in 0..16 {
            let listed = ids(&theirs);
            let op: Vec<String> = match next(10) {
                0..=2 => vec!["-c".into(), ["a", "b", "c"][next(3) as usize].into()],
                3..=4 if !listed.is_empty() => {
                    let (id, name) = &listed[next(listed.len() as u64) as usize];
                    vec!["-a".into(), if next(2) == 0 { id.clone() } else { name.clone() }]
                }
                5 if !listed.is_empty() => vec!["-d".into(), listed[next(listed.len() as u64) as usize].1.clone()],
                _ => {
                    let off = next(2048) * 4096;
                    let len = [4096u64, 65536, 300_000, 1 << 20][next(4) as usize].min((8 << 20) - off);
                    let cmd = match next(4) {
                        0 => format!("write -z {off} {len}"),
                        1 => format!("discard {off} {len}"),
                        2 => format!("write -c -P 9 {} 65536", off / 65536 * 65536),
                        _ => format!("write -P {} {off} {len}", next(256)),
                    };
                    for img in [&mine, &theirs] {
                        run("qemu-io", &["-c", &cmd, p(img)]);
                    }
                    continue;
                }
            };
            let what = format!("{kind}, step {step}: snapshot {op:?}");
            let args = |img: &Path| -> Vec<String> {
                let mut a = vec!["snapshot".to_string()];
                a.extend(op.iter().cloned());
                a.push(p(img).to_string());
                a
            };
            let am = args(&mine);
            let at = args(&theirs);
            let m = run(QIMG, &am.iter().map(String::as_str).collect::<Vec<_>>());
            let t = run("qemu-img", &at.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(m.status.code(), t.status.code(), "{what}: {}", String::from_utf8_lossy(&m.stderr));
            let c = run("qemu-img", &["check", p(&mine)]);
            assert_eq!(c.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&c.stdout));
            assert_eq!(ids(&mine), ids(&theirs), "{what}");
            assert!(raw_of(&mine, None) == raw_of(&theirs, None), "{what}: the active images differ");
            for (id, _) in ids(&theirs) {
                let s = format!("snapshot.id={id}");
                assert!(raw_of(&mine, Some(&s)) == raw_of(&theirs, Some(&s)), "{what}: snapshot {id} differs");
            }
        }
    }
}
