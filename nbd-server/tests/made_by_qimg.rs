//! Images that qimg's chain commands produced (`snapshot -c/-a/-d`, `amend`, `rebase`, `commit`), served by
//! qnbd: qemu reads through qnbd exactly what qemu-img reads from the file, writes through qnbd keep the
//! snapshots intact (copy-on-write of the clusters they share), and the result checks clean.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const QNBD: &str = env!("CARGO_BIN_EXE_qnbd");

/// qimg, built with this workspace's tests (`cargo test --workspace` builds every binary of the workspace).
fn qimg() -> PathBuf {
    let q = Path::new(QNBD).with_file_name("qimg");
    assert!(q.exists(), "{} is missing: run the tests with cargo test --workspace", q.display());
    q
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", s(sock))
}

fn raw(img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = img.with_extension(format!("{}.raw", snapshot.unwrap_or("now")));
    let mut a = vec!["convert", "-O", "raw"];
    if let Some(sn) = snapshot {
        a.extend_from_slice(&["-l", sn]);
    }
    a.extend_from_slice(&[s(img), s(&out)]);
    ok("qemu-img", &a);
    std::fs::read(out).unwrap()
}

#[test]
fn qnbd_serves_what_qimg_chain_commands_made() {
    let d = tempfile::tempdir().unwrap();
    let q = qimg();
    let q = q.to_str().unwrap();
    let base = d.path().join("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", s(&base), "16M"]);
    ok("qemu-io", &["-c", "write -P 1 0 16M", s(&base)]);
    let mid = d.path().join("mid.qcow2");
    ok(q, &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&mid)]);
    ok("qemu-io", &["-c", "write -P 2 1M 2M", s(&mid)]);
    let img = d.path().join("img.qcow2");
    ok(q, &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", s(&img)]);
    ok("qemu-io", &["-c", "write -P 3 2M 2M", "-c", "write -z 8M 1M", s(&img)]);
    // qimg's chain commands, one after the other.
    ok(q, &["amend", "-o", "compat=1.1", s(&base)]);
    ok(q, &["commit", "-b", s(&base), s(&img)]);
    ok(q, &["snapshot", "-c", "one", s(&img)]);
    ok("qemu-io", &["-c", "write -P 4 0 64k", s(&img)]);
    ok(q, &["snapshot", "-c", "two", s(&img)]);
    ok(q, &["amend", "-o", "refcount_bits=8", s(&img)]);
    ok(q, &["snapshot", "-a", "one", s(&img)]);
    ok(q, &["rebase", "-b", "", s(&img)]);
    ok(q, &["snapshot", "-d", "two", s(&img)]);
    assert_check_clean(&img, "after qimg's commands");
    let one = raw(&img, Some("one"));
    // qemu reads the same through qnbd as qemu-img reads from the file.
    let sock = d.path().join("s");
    {
        let mut cmd = Command::new(QNBD);
        cmd.args(["-r", "-t", "-f", "qcow2", "-k", s(&sock)]).arg(&img);
        let _srv = spawn_listening(cmd, &sock);
        let o = run("qemu-img", &["compare", "-f", "raw", &uri(&sock), s(&img)]);
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    }
    // qnbd -l serves the snapshot qimg made, as qemu-img reads it.
    {
        let mut cmd = Command::new(QNBD);
        cmd.args(["-r", "-t", "-f", "qcow2", "-l", "one", "-k", s(&sock)]).arg(&img);
        let _srv = spawn_listening(cmd, &sock);
        let out = d.path().join("one-over-nbd.raw");
        ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri(&sock), s(&out)]);
        assert!(std::fs::read(&out).unwrap() == one, "qnbd -l one reads differently from qemu-img convert -l one");
    }
    // Writes through qnbd copy the clusters the snapshot shares: the snapshot keeps its bytes.
    {
        let mut cmd = Command::new(QNBD);
        cmd.args(["-t", "-f", "qcow2", "-k", s(&sock)]).arg(&img);
        let _srv = spawn_listening(cmd, &sock);
        ok("qemu-io", &["-f", "raw", "-c", "write -P 5 1M 3M", "-c", "write -z 0 64k", "-c", "flush", &uri(&sock)]);
    }
    assert_check_clean(&img, "after writes through qnbd");
    assert!(raw(&img, Some("one")) == one, "the snapshot changed under writes through qnbd");
    let now = raw(&img, None);
    assert!(now[1 << 20..4 << 20].iter().all(|&b| b == 5) && now[..65536].iter().all(|&b| b == 0));
    assert_eq!(now[4 << 20], 1, "outside the writes the image still reads its flattened backing data");
}
