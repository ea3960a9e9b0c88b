//! Persistent dirty bitmaps through qnbd, against the real tools: bitmaps made by qemu-img are kept up to date
//! by writes through qnbd (and read back by qemu-nbd), `qnbd -B` exports them as `qemu-nbd -B` does, and an
//! incremental backup in ovirt-imageio's style (full copy, writes, then only the dirty extents) restores the
//! image exactly. qimg's bitmap commands: `qcow2/tests/bitmaps.rs`.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const QNBD: &str = env!("CARGO_BIN_EXE_qnbd");

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", s(sock))
}

/// The extents of `context` as `nbdinfo --map` prints them (offset, length, value), from a read-only server
/// (`qnbd` or `qemu-nbd`) exporting `img` with `-B` for each bitmap.
fn map_of(server: &str, img: &Path, bitmaps: &[&str], context: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s");
    let mut cmd = Command::new(server);
    cmd.args(["-r", "-t", "-f", "qcow2", "-k", s(&sock)]);
    for b in bitmaps {
        cmd.args(["-B", b]);
    }
    cmd.arg(img);
    let _srv = spawn_listening(cmd, &sock);
    ok("nbdinfo", &[&format!("--map={context}"), &uri(&sock)])
}

/// Runs qemu-io commands on an image served by `server` (read-write), then stops the server the way a client
/// does: it disconnects and the server (no `-t`) exits, storing what it keeps in memory.
fn write_through(server: &str, img: &Path, cmds: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s");
    let mut cmd = Command::new(server);
    cmd.args(["-f", "qcow2", "-k", s(&sock)]).arg(img);
    // Without -t the server serves one client: wait for its socket without connecting.
    let mut srv = Srv(cmd.spawn().unwrap());
    wait_for(&sock);
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let u = uri(&sock);
    args.push(&u);
    ok("qemu-io", &args);
    wait_until("the server exits after its client", std::time::Duration::from_secs(20), || {
        matches!(srv.try_wait(), Ok(Some(_)))
    });
    let st = srv.0.wait().unwrap();
    assert!(st.success(), "{server} exited with {st}");
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

const WRITES: [&str; 5] =
    ["write -P 2 1M 4k", "write -P 3 9M 100k", "write -z 20M 1M", "discard 30M 128k", "write -P 4 63M 1M"];

#[test]
fn writes_through_qnbd_keep_qemu_made_bitmaps_up_to_date() {
    let d = tempfile::tempdir().unwrap();
    let mine = image_with_bitmaps(d.path(), "mine.qcow2");
    let theirs = d.path().join("theirs.qcow2");
    std::fs::copy(&mine, &theirs).unwrap();
    write_through(QNBD, &mine, &WRITES);
    write_through("qemu-nbd", &theirs, &WRITES);
    assert_check_clean(&mine, "after writes through qnbd");
    // The same bitmaps, neither in use (stored cleanly), b0 still enabled.
    assert_eq!(info_bitmaps(&mine), info_bitmaps(&theirs));
    assert_eq!(info_bitmaps(&mine)[0]["flags"], serde_json::json!(["auto"]));
    // The same dirty areas, read by qemu-nbd from both images; b1 (disabled) saw nothing.
    for b in ["b0", "b1"] {
        let ctx = format!("qemu:dirty-bitmap:{b}");
        let m = map_of("qemu-nbd", &mine, &[b], &ctx);
        assert_eq!(m, map_of("qemu-nbd", &theirs, &[b], &ctx), "{b}");
        if b == "b0" {
            assert!(m.contains("dirty"), "{m}");
        } else {
            assert!(!m.contains("dirty"), "{m}");
        }
    }
    // A second session adds to the same bitmap.
    write_through(QNBD, &mine, &["write -P 5 40M 64k"]);
    write_through("qemu-nbd", &theirs, &["write -P 5 40M 64k"]);
    let ctx = "qemu:dirty-bitmap:b0";
    assert_eq!(map_of("qemu-nbd", &mine, &["b0"], ctx), map_of("qemu-nbd", &theirs, &["b0"], ctx));
    assert_check_clean(&mine, "after a second session");
    ok("qemu-img", &["compare", s(&mine), s(&theirs)]);
}

#[test]
fn qnbd_exports_bitmaps_as_qemu_nbd_does() {
    let d = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(d.path(), "img.qcow2");
    // Dirty some areas with qemu-io (it keeps b0 up to date), and merge them into b1 with qemu-img.
    ok("qemu-io", &["-c", "write -P 7 3M 70k", "-c", "write -P 7 50M 1M", s(&img)]);
    ok("qemu-img", &["bitmap", "--merge", "b0", s(&img), "b1"]);
    for ctx in ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1", "base:allocation"] {
        let m = map_of(QNBD, &img, &["b0", "b1"], ctx);
        assert_eq!(m, map_of("qemu-nbd", &img, &["b0", "b1"], ctx), "{ctx}");
    }
    // qemu's own NBD client reads a bitmap through x-dirty-bitmap (as backup tools built on qemu do): qemu-img
    // map then reports dirty areas as "data": false. It reads the same from both servers.
    let qemu_client_map = |server: &str| {
        let sock = d.path().join("x");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(server);
        cmd.args(["-r", "-t", "-f", "qcow2", "-B", "b0", "-k", s(&sock)]).arg(&img);
        let _srv = spawn_listening(cmd, &sock);
        let opts = format!("driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0", s(&sock));
        ok("qemu-img", &["map", "--output=json", "--image-opts", &opts])
    };
    let m = qemu_client_map(QNBD);
    assert_eq!(m, qemu_client_map("qemu-nbd"));
    assert!(m.contains("\"data\": false"), "{m}");
    // The contexts a client is told about.
    let list = |server: &str| {
        let sock = d.path().join("l");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(server);
        cmd.args(["-r", "-t", "-f", "qcow2", "-B", "b1", "-k", s(&sock)]).arg(&img);
        let _srv = spawn_listening(cmd, &sock);
        let out = ok("nbdinfo", &["--json", &uri(&sock)]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["exports"][0]["contexts"].clone()
    };
    assert_eq!(list(QNBD), list("qemu-nbd"));
    // An unknown bitmap is refused with qemu-nbd's words.
    let o = run(QNBD, &["-r", "-B", "nope", "-k", s(&d.path().join("x")), s(&img)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Bitmap 'nope' is not found"));
}

#[test]
fn incremental_backup_through_qnbd_restores_the_image() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    ok("qemu-io", &["-c", "write -P 1 0 16M", "-c", "write -P 2 40M 4M", s(&img)]);
    ok("qemu-img", &["bitmap", "--add", s(&img), "backup-1"]);
    // Full backup: nbdcopy of the whole disk from qnbd.
    let full = d.path().join("full.raw");
    {
        let sock = d.path().join("f");
        let mut cmd = Command::new(QNBD);
        cmd.args(["-r", "-t", "-f", "qcow2", "-k", s(&sock)]).arg(&img);
        let _srv = spawn_listening(cmd, &sock);
        ok("nbdcopy", &[&uri(&sock), s(&full)]);
    }
    // The guest writes through qnbd.
    write_through(QNBD, &img, &["write -P 3 1M 8k", "write -P 4 17M 1M", "write -z 41M 64k", "write -P 5 60M 4k"]);
    // Incremental: copy only what qemu:dirty-bitmap:backup-1 says is dirty, onto the full backup.
    let sock = d.path().join("i");
    let mut cmd = Command::new(QNBD);
    cmd.args(["-r", "-t", "-f", "qcow2", "-B", "backup-1", "-k", s(&sock)]).arg(&img);
    let _srv = spawn_listening(cmd, &sock);
    let map = ok("nbdinfo", &["--map=qemu:dirty-bitmap:backup-1", &uri(&sock)]);
    let mut copied = 0u64;
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[3] != "dirty" {
            continue;
        }
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        copied += len;
        // Read the dirty extent over NBD and write it into the backup at the same offset.
        let part = d.path().join("part");
        let _ = std::fs::remove_file(&part);
        ok("nbdsh", &["-u", &uri(&sock), "-c", &format!("open({:?}, 'wb').write(h.pread({len}, {off}))", s(&part))]);
        let data = std::fs::read(&part).unwrap();
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(&full).unwrap().write_all_at(&data, off).unwrap();
    }
    assert!(copied > 0 && copied < 8 << 20, "only the dirty extents were copied ({copied} bytes)");
    let o = run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&full), s(&img)]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
}
