//! `qnbd -c` / `-d` on this machine, whose kernel may have no nbd driver: every misuse is a clear error and a
//! non-zero exit, never a hang. The kernel path itself runs in an emulated machine:
//! scripts/kernel-nbd-test.sh (part of scripts/test-all.sh).

mod common;
use common::*;
use std::path::Path;

fn fails_with(args: &[&str], want: &str) {
    let o = run(QNBD, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
}

#[test]
fn connect_and_disconnect_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let img = s(&img);
    if !Path::new("/sys/module/nbd").exists() && !Path::new("/dev/nbd0").exists() {
        fails_with(&["-c", "/dev/nbd0", img], "no nbd driver");
        fails_with(&["-d", "/dev/nbd0"], "no nbd driver");
    }
    fails_with(&["-c", "/dev/null", img], "not a block device");
    fails_with(&["-d", img], "not a block device");
    if Path::new("/dev/loop0").exists() {
        fails_with(&["-c", "/dev/loop0", img], "not an NBD device");
    }
    fails_with(&["-c", "/dev/nbd0", img, img], "exactly one image");
    fails_with(&["-c", "/dev/nbd0", "--connections", "0", img], "connections");
    fails_with(&["-d", "/dev/nbd0", "-c", "/dev/nbd1", img], "cannot be used with");
}
