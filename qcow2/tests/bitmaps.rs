//! qimg's persistent bitmap commands against qemu-img's: `qimg bitmap` (add, remove, clear, enable, disable,
//! merge, in command-line order), `qimg info` listing bitmaps, `qimg convert --bitmaps`. The bitmaps' bits are
//! read back through qemu-nbd (`nbdinfo --map=qemu:dirty-bitmap:NAME`).

mod common;
use common::{ok, run, QIMG};
use std::path::{Path, PathBuf};
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", s(sock))
}

/// The extents of `context` as `nbdinfo --map` prints them, from qemu-nbd exporting `img` read-only with
/// `-B` for each bitmap.
fn map_of(img: &Path, bitmaps: &[&str], context: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-r", "-t", "-f", "qcow2", "-k", s(&sock)]);
    for b in bitmaps {
        cmd.args(["-B", b]);
    }
    cmd.arg(img).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("qemu-nbd");
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "qemu-nbd did not start");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("qemu-nbd exited: {st}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = ok("nbdinfo", &[&format!("--map={context}"), &uri(&sock)]);
    let _ = child.kill();
    let _ = child.wait();
    out
}

fn assert_check_clean(img: &Path, what: &str) {
    let chk = run("qemu-img", &["check", s(img)]);
    assert_eq!(chk.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&chk.stdout));
}

fn info_bitmaps(img: &Path) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["info", "--output=json", s(img)])).unwrap();
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// A 64 MiB image with data, an enabled bitmap b0 (64 KiB granularity) and a disabled one b1 (512 KiB),
/// made by qemu-img.
fn image_with_bitmaps(d: &Path, name: &str) -> PathBuf {
    let img = d.join(name);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    ok("qemu-io", &["-c", "write -P 1 0 8M", s(&img)]);
    ok("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "512k", "--disable", s(&img), "b1"]);
    img
}

#[test]
fn qimg_bitmap_commands_give_what_qemu_img_gives() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "64M"]);
    ok("qemu-io", &["-c", "write -P 1 0 4M", s(&base)]);
    let steps: [&[&str]; 9] = [
        &["--add", "b0"],
        &["--add", "-g", "512k", "--disable", "b1"],
        &["--add", "--granularity", "4k", "b2"],
        &["--merge", "b0", "b2"],
        &["--disable", "b0"],
        &["--clear", "b2"],
        &["--enable", "b1"],
        &["--merge", "b2", "-b", "other.qcow2", "-F", "qcow2", "b0"],
        &["--remove", "b1"],
    ];
    let (mine, theirs) = (d.path().join("mine.qcow2"), d.path().join("theirs.qcow2"));
    std::fs::copy(&base, &mine).unwrap();
    std::fs::copy(&base, &theirs).unwrap();
    // A source image for the cross-image merge, with a dirty bitmap of its own.
    let other = d.path().join("other.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&other), "64M"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "128k", s(&other), "b2"]);
    ok("qemu-io", &["-c", "write -P 9 5M 300k", s(&other)]);
    std::env::set_current_dir(d.path()).unwrap();
    for (i, step) in steps.iter().enumerate() {
        for (tool, img) in [(QIMG, &mine), ("qemu-img", &theirs)] {
            let mut a = vec!["bitmap"];
            let (ops, name) = step.split_at(step.len() - 1);
            a.extend_from_slice(ops);
            a.push(s(img));
            a.push(name[0]);
            ok(tool, &a);
        }
        assert_eq!(info_bitmaps(&mine), info_bitmaps(&theirs), "after step {i} {step:?}");
        assert_check_clean(&mine, &format!("after step {i} {step:?}"));
        // Writes between steps (qemu-io keeps the enabled bitmaps of either image up to date).
        let w = format!("write -P {} {}M 96k", i + 10, i * 3 + 1);
        for img in [&mine, &theirs] {
            ok("qemu-io", &["-c", &w, s(img)]);
        }
        let names: Vec<String> = info_bitmaps(&mine)
            .as_array()
            .map(|a| a.iter().map(|b| b["name"].as_str().unwrap_or("").to_string()).collect())
            .unwrap_or_default();
        for n in names {
            let ctx = format!("qemu:dirty-bitmap:{n}");
            assert_eq!(map_of(&mine, &[&n], &ctx), map_of(&theirs, &[&n], &ctx), "bitmap {n} after step {i} {step:?}");
        }
    }
    // Refusals with qemu-img's words.
    for (args, msg) in [
        (&["--add", "b0"][..], "Operation add on bitmap b0 failed: Bitmap already exists: b0"),
        (&["--remove", "nope"], "Operation remove on bitmap nope failed: Dirty bitmap 'nope' not found"),
        (&["--add", "-g", "1000", "x"], "Granularity must be power of 2 and at least 512"),
        (&["x"], "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"),
    ] {
        let (ops, name) = args.split_at(args.len() - 1);
        let mut a = vec!["bitmap"];
        a.extend_from_slice(ops);
        a.push(s(&mine));
        a.push(name[0]);
        let (m, t) = (run(QIMG, &a), run("qemu-img", &a));
        assert_eq!((m.status.code(), t.status.code()), (Some(1), Some(1)), "{args:?}");
        assert!(String::from_utf8_lossy(&m.stderr).contains(msg), "{args:?}: {}", String::from_utf8_lossy(&m.stderr));
    }
    let v2 = d.path().join("v2.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", s(&v2), "1M"]);
    let o = run(QIMG, &["bitmap", "--add", s(&v2), "b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Cannot store dirty bitmaps in qcow2 v2 files"));
    // qimg info lists bitmaps as qemu-img info does, in both layouts.
    for out in ["json", "human"] {
        let a = ["info", "--output", out, s(&mine)];
        let strip = |t: String| {
            t.lines().filter(|l| !l.contains("disk size") && !l.contains("actual-size")).collect::<Vec<_>>().join("\n")
        };
        assert_eq!(strip(ok(QIMG, &a)), strip(ok("qemu-img", &a)), "info --output={out}");
    }
}

#[test]
fn convert_copies_bitmaps_as_qemu_img_does() {
    let d = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(d.path(), "src.qcow2");
    ok("qemu-io", &["-c", "write -P 7 3M 70k", s(&img)]);
    let (mine, theirs) = (d.path().join("m.qcow2"), d.path().join("t.qcow2"));
    ok(QIMG, &["convert", "--bitmaps", "-O", "qcow2", s(&img), s(&mine)]);
    ok("qemu-img", &["convert", "--bitmaps", "-O", "qcow2", s(&img), s(&theirs)]);
    assert_eq!(info_bitmaps(&mine), info_bitmaps(&theirs));
    assert_check_clean(&mine, "convert --bitmaps");
    for b in ["b0", "b1"] {
        let ctx = format!("qemu:dirty-bitmap:{b}");
        assert_eq!(map_of(&mine, &[b], &ctx), map_of(&theirs, &[b], &ctx), "{b}");
    }
    for (args, msg) in [
        (&["--bitmaps", "-O", "raw"][..], "does not support bitmaps"),
        (&["--skip-broken-bitmaps", "-O", "qcow2"], "requires --bitmaps"),
    ] {
        let mut a = vec!["convert"];
        a.extend_from_slice(args);
        let out = d.path().join("x");
        a.extend([s(&img), s(&out)]);
        let o = run(QIMG, &a);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(msg), "{args:?}");
    }
}

#[test]
fn the_bitmaps_extension_comes_and_goes_as_qemu_expects() {
    let d = tempfile::tempdir().unwrap();
    // An overlay with a long backing file name: adding the extension moves the name, never over itself.
    let long = d.path().join("a-backing-file-with-a-rather-long-name-for-the-header.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&long), "16M"]);
    ok("qemu-io", &["-c", "write -P 5 0 1M", s(&long)]);
    let img = d.path().join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", s(&long), "-F", "qcow2", s(&img)]);
    for round in 0..2 {
        ok(QIMG, &["bitmap", "--add", s(&img), "b0"]);
        ok(QIMG, &["bitmap", "--add", "--disable", s(&img), "b1"]);
        let info = ok("qemu-img", &["info", "--output=json", s(&img)]);
        assert!(info.contains(s(&long)), "round {round}: the backing file name survived: {info}");
        assert_eq!(info_bitmaps(&img).as_array().map(|a| a.len()), Some(2), "round {round}");
        assert_check_clean(&img, "with bitmaps");
        ok("qemu-io", &["-c", "write -P 6 64k 64k", s(&img)]);
        // Removing every bitmap drops the extension: qemu opens the image without a warning and writes it.
        ok(QIMG, &["bitmap", "--remove", s(&img), "b0"]);
        ok(QIMG, &["bitmap", "--remove", s(&img), "b1"]);
        let o = run("qemu-io", &["-c", "write -P 7 128k 4k", s(&img)]);
        assert!(o.status.success(), "round {round}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).is_empty(), "round {round}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(info_bitmaps(&img), serde_json::Value::Null, "round {round}");
        assert_check_clean(&img, "without bitmaps");
        ok("qemu-io", &["-c", "read -P 5 0 64k", "-c", "read -P 6 64k 64k", "-c", "read -P 7 128k 4k", s(&img)]);
    }
    // A bitmap too large for its granularity is refused as qemu-img refuses it.
    let big = d.path().join("big.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&big), "64T"]);
    let o = run(QIMG, &["bitmap", "--add", "-g", "512", s(&big), "b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Use larger granularity"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
