//! Helpers shared by the integration tests: run qemu-img / qemu-io (the oracle) and qimg side by side.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const QIMG: &str = env!("CARGO_BIN_EXE_qimg");

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (the README's test command installs it): {e}"));
    out
}

pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// qemu-img create with options.
pub fn create(path: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(p(path));
    args.push(size);
    ok("qemu-img", &args);
}

/// Runs qemu-io commands on an image (format qcow2 unless `fmt` says otherwise).
pub fn io(path: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(path));
    ok("qemu-io", &args);
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// Removes from `ours` the object keys `theirs` lacks (older qemu prints fewer keys).
fn align_keys(ours: &mut serde_json::Value, theirs: &serde_json::Value) {
    use serde_json::Value;
    match (ours, theirs) {
        (Value::Object(o), Value::Object(t)) => {
            o.retain(|k, _| t.contains_key(k));
            for (k, v) in o.iter_mut() {
                align_keys(v, &t[k]);
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            for (a, b) in o.iter_mut().zip(t) {
                align_keys(a, b);
            }
        }
        _ => {}
    }
}

/// `qimg map --output=json` must equal `qemu-img map --output=json`.
pub fn assert_map_equal(img: &Path) {
    let theirs = json(&ok("qemu-img", &["map", "--output=json", p(img)]));
    let mut ours = json(&ok(QIMG, &["map", "--output=json", p(img)]));
    align_keys(&mut ours, &theirs);
    assert_eq!(ours, theirs, "map of {}", img.display());
}

/// `qimg info --output=json` must equal qemu-img's.
pub fn assert_info_equal(img: &Path, extra: &[&str]) {
    let mut a = vec!["info", "--output=json"];
    a.extend_from_slice(extra);
    a.push(p(img));
    let theirs = json(&ok("qemu-img", &a));
    let mut ours = json(&ok(QIMG, &a));
    align_keys(&mut ours, &theirs);
    assert_eq!(ours, theirs, "info of {}", img.display());
}

/// `qimg convert -O raw` must produce exactly the bytes of `qemu-img convert -O raw`.
pub fn assert_convert_equal(img: &Path, dir: &Path) {
    let a = dir.join("qemu.raw");
    let b = dir.join("qimg.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(img), p(&a)]);
    ok(QIMG, &["convert", "-O", "raw", p(img), p(&b)]);
    let (la, lb) = (std::fs::metadata(&a).unwrap().len(), std::fs::metadata(&b).unwrap().len());
    assert_eq!(la, lb, "converted sizes of {}", img.display());
    if la <= 512 << 20 {
        let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        if let Some(i) = x.iter().zip(&y).position(|(u, v)| u != v) {
            panic!("convert of {} differs from qemu-img's at byte {i}", img.display());
        }
    } else {
        // Large sparse outputs: qemu-img compare skips holes on both sides.
        ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", p(&a), p(&b)]);
    }
    std::fs::remove_file(&a).ok();
    std::fs::remove_file(&b).ok();
}

/// A planned read (what the NBD server sends with `sendfile`) carried out piece by piece gives exactly the
/// bytes `read_at` gives, for reads of several sizes at aligned and odd offsets.
pub fn assert_plan_equal(img: &Path) {
    use qcow2::{BlockDevice, Source};
    let image = qcow2::Image::open(p(img), &qcow2::OpenOptions::default()).unwrap();
    let size = image.size();
    let limit = size.min(64 << 20);
    for (step, len) in [(1u64 << 20, 1u64 << 20), (300_001, 200_003), (65536 * 3 + 512, 4096), (7 << 20, 5 << 20)] {
        let mut off = 0u64;
        while off < limit {
            let n = len.min(size - off);
            let mut want = vec![0u8; n as usize];
            image.read_at(&mut want, off).unwrap();
            let mut plan = Vec::new();
            image.plan_read(off, n, &mut plan).unwrap();
            let mut got = Vec::with_capacity(n as usize);
            for piece in &plan {
                let mut b = vec![0u8; piece.len as usize];
                match &piece.source {
                    Source::File { file, offset } => file.read_at(&mut b, *offset).unwrap(),
                    Source::Zero => {}
                    Source::Read { offset } => image.read_at(&mut b, *offset).unwrap(),
                }
                got.extend_from_slice(&b);
            }
            assert_eq!(got.len(), want.len(), "plan of {}+{n} in {} covers the range", off, img.display());
            if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
                panic!("plan of {off}+{n} in {} differs from read_at at byte {i}: {plan:?}", img.display());
            }
            off += step;
        }
    }
}

/// All comparisons.
pub fn assert_all_equal(img: &Path, dir: &Path) {
    assert_plan_equal(img);
    assert_map_equal(img);
    assert_info_equal(img, &[]);
    assert_convert_equal(img, dir);
}

pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
