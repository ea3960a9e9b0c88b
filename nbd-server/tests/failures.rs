//! Failures of the disk under the image: a full file system and writes that hit it fail the request, never
//! the image. Once space is free, FLUSH succeeds and everything acknowledged before is on disk after a
//! restart; `qemu-img check` finds no corruption. Also: a hostile image whose L2 entry points at its own
//! metadata is refused by the overlap check and marked corrupt, as qemu does.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// A small tmpfs mounted for the test, unmounted when dropped (needs root, as CI runs).
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        ok("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", s(dir)]);
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn serve(img: &Path, sock: &Path) -> Srv {
    let _ = std::fs::remove_file(sock);
    let srv = Srv(Command::new(QNBD).args(["-f", "qcow2", "-t", "-k", s(sock), s(img)]).spawn().unwrap());
    wait_for(sock);
    srv
}

const CLIENT: &str = r#"
import nbd, sys, os
sock, filler, chunk = sys.argv[1], sys.argv[2], 1 << 20
h = nbd.NBD()
h.connect_unix(sock)
acked = 0
err = None
# Write 1 MiB chunks of a pattern until the file system is full.
for i in range(48):
    buf = bytes([(i * 7 + 1) & 0xff]) * chunk
    try:
        h.pwrite(buf, i * chunk)
        acked = i + 1
    except nbd.Error as e:
        err = e
        break
assert err is not None, "the file system never filled up"
try:
    h.flush()
    first_flush = "ok"
except nbd.Error as e:
    first_flush = "failed"
# Still usable: a read of acknowledged data works at once.
assert h.pread(4096, 0) == bytes([1]) * 4096
os.unlink(filler)
h.flush()
# Writes work again, and the chunk that failed can be written now.
buf = bytes([(acked * 7 + 1) & 0xff]) * chunk
h.pwrite(buf, acked * chunk)
h.flush()
h.shutdown()
print(acked + 1, first_flush)
"#;

#[test]
fn a_full_file_system_fails_requests_not_the_image_and_flush_succeeds_once_space_is_free() {
    let d = tempfile::tempdir().unwrap();
    let mnt = Mount::tmpfs(&d.path().join("mnt"), "24m");
    let img = mnt.0.join("img.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    // Leave about 10 MiB free.
    let filler = mnt.0.join("filler");
    std::fs::write(&filler, vec![1u8; 14 << 20]).unwrap();
    let sock = d.path().join("s");
    let mut srv = serve(&img, &sock);
    let out = ok("/usr/bin/python3", &["-c", CLIENT, s(&sock), s(&filler)]);
    eprintln!("chunks written, first flush: {out}");
    let mut it = out.split_whitespace();
    let written: u64 = it.next().and_then(|v| v.parse().ok()).expect("client output");
    assert!((3..48).contains(&written), "{out}");
    // SIGTERM: the server flushes and exits cleanly.
    unsafe { libc::kill(srv.id() as i32, libc::SIGTERM) };
    let st = srv.wait().unwrap();
    assert!(st.success(), "qnbd exit: {st:?}");
    wait_gone(s(&img));
    // No corruption, and no leak either: a failed write gives its cluster back.
    let chk = run("qemu-img", &["check", s(&img)]);
    assert!(
        matches!(chk.status.code(), Some(0)),
        "{}{}",
        String::from_utf8_lossy(&chk.stdout),
        String::from_utf8_lossy(&chk.stderr)
    );
    // Every acknowledged chunk is there, as qemu reads it.
    let mut cmds = Vec::new();
    for i in 0..written {
        cmds.push(format!("read -P {} {} 1M", (i * 7 + 1) & 0xff, i << 20));
    }
    cmds.push(format!("read -P 0 {} {}", written << 20, (64 - written) << 20));
    let mut args = vec!["-f", "qcow2", "-r"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(&img));
    let out = run("qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("Pattern verification failed"), "{text}");
}

/// An L2 entry that points at the image's own refcount block: a guest write there would overwrite
/// metadata. qemu marks the image corrupt and refuses the write; so does qnbd, and the image stays
/// readable.
#[test]
fn a_data_write_onto_metadata_is_refused_and_marks_the_image_corrupt() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("h.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", s(&img), "16M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 64k", s(&img)]);
    // Layout of a fresh 64k-cluster image: header at 0, refcount table at 0x10000, refcount block at
    // 0x20000, L1 at 0x30000, then the first L2 table and the data cluster. Point guest cluster 0 at the
    // refcount block, keeping the COPIED flag so the write would go there in place.
    let mut bytes = std::fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let rb_table = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(bytes[rb_table..rb_table + 8].try_into().unwrap());
    bytes[l2..l2 + 8].copy_from_slice(&(rb | (1 << 63)).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let sock = d.path().join("s");
    let mut srv = serve(&img, &sock);
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x22 0 4k", &uri]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("error") || !out.status.success(), "the write was accepted: {text}");
    // Reads still work; writes elsewhere are refused too (the image is read-only now).
    ok("qemu-io", &["-f", "raw", "-r", "-c", "read 1M 4k", &uri]);
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x33 8M 4k", &uri]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("error") || !out.status.success(), "a write after the corruption was accepted: {text}");
    unsafe { libc::kill(srv.id() as i32, libc::SIGTERM) };
    let _ = srv.wait();
    wait_gone(s(&img));
    // The refcount block is intact, and the header says corrupt, as qemu would have left it.
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after[rb as usize..rb as usize + 65536], bytes[rb as usize..rb as usize + 65536]);
    let info = ok("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
}
