//! The qemu-nbd command lines of real pipelines, run against qnbd and against qemu-nbd in the same test, on
//! copies of the same images: the export (size, flags, every byte) and the image after writes must be the
//! same. Read back with qemu-img, qemu-io and nbdinfo.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const QEMU_NBD: &str = "qemu-nbd";

/// A chain made by qemu-img in `dir`: `base.raw` (data at 0 and 1 MiB) under `top.qcow2` (data at 2 MiB),
/// named relatively, so a copy of the folder is a copy of the chain.
fn fixture(dir: &Path) {
    let base = dir.join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), "8M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 64k", s(&base)]);
    let top = dir.join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&top)]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x33 2M 64k", s(&top)]);
}

/// One server process, stopped (SIGTERM, then waited for) when dropped.
struct Running {
    srv: Srv,
    sock: PathBuf,
}

impl Running {
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.srv.id().to_string()]).status();
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.srv.try_wait() {
                // qnbd's commit helper (same command line) lets go of the image's locks once it sees the
                // server gone.
                wait_gone(s(&self.sock));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the server did not stop on SIGTERM");
    }
}

/// Starts `prog` with `args` (SOCK, DIR and PIDFILE replaced) in `dir` and waits for its socket.
fn serve(prog: &str, dir: &Path, args: &[&str]) -> Running {
    let sock = dir.join("nbd.sock");
    let pid = dir.join("server.pid");
    let d = s(dir).to_string();
    let args: Vec<String> =
        args.iter().map(|a| a.replace("SOCK", s(&sock)).replace("PIDFILE", s(&pid)).replace("DIR", &d)).collect();
    let mut c = Command::new(prog);
    c.args(&args).current_dir(dir).stdout(Stdio::null());
    Running { srv: spawn_listening(c, &sock), sock }
}

/// What a client sees of an export: size, read-only, and a digest of every byte (through qemu-img convert).
#[derive(Debug, PartialEq)]
struct Seen {
    size: u64,
    read_only: bool,
    bytes: String,
    patterns: String,
    map: String,
}

fn look(r: &Running, dir: &Path) -> Seen {
    let info: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &r.uri()])).unwrap();
    let e = &info["exports"][0];
    let out = dir.join("export.raw");
    ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &r.uri(), s(&out)]);
    let bytes = md5(&out);
    std::fs::remove_file(&out).unwrap();
    // Reads of the known patterns through qemu-io (the NBD block driver): which ones verify must match.
    let o = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "read -P 0x22 1M 64k",
            "-c",
            "read -P 0x33 2M 64k",
            &r.uri(),
        ],
    );
    let patterns: String = String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.contains("ops;")).collect();
    let map = ok("qemu-img", &["map", "--output=json", "-f", "raw", &r.uri()]);
    Seen {
        size: e["export-size"].as_u64().unwrap(),
        read_only: e["is_read_only"].as_bool().unwrap(),
        bytes,
        patterns,
        map,
    }
}

/// Runs one pipeline's command line against both servers, each on its own copy of the fixture; `write`
/// also writes through the export, and the images must end the same.
fn both(name: &str, args: &[&str], write: bool) {
    let mut seen = Vec::new();
    let mut after = Vec::new();
    for prog in [QNBD, QEMU_NBD] {
        let d = tempfile::tempdir().unwrap();
        fixture(d.path());
        let r = serve(prog, d.path(), args);
        let s1 = look(&r, d.path());
        if write {
            ok(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 0x44 3M 128k", "-c", "write -z 1M 64k", "-c", "flush", &r.uri()],
            );
            let o =
                ok("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0x44 3M 128k", "-c", "read -P 0 1M 64k", &r.uri()]);
            assert!(!o.contains("verification failed"), "{name} ({prog}): {o}");
        }
        if args.contains(&"--pid-file") {
            let pid = std::fs::read_to_string(d.path().join("server.pid")).unwrap();
            assert_eq!(pid.trim(), r.srv.id().to_string(), "{name} ({prog}): pid file");
        }
        r.stop();
        if write {
            let top = d.path().join("top.qcow2");
            assert_check_clean(&top, &format!("{name} ({prog})"));
            let out = d.path().join("after.raw");
            ok("qemu-img", &["convert", "-O", "raw", s(&top), s(&out)]);
            after.push(md5(&out));
        }
        seen.push(s1);
    }
    assert_eq!(seen[0], seen[1], "{name}: qnbd (left) and qemu-nbd (right) export differently");
    if write {
        assert_eq!(after[0], after[1], "{name}: the images differ after the same writes");
    }
}

#[test]
fn ovirt_imageio_serves_an_overlay_without_its_backing_chain() {
    // ovirt-imageio, ovirt_imageio/_internal/qemu_nbd.py, Server.start(): backing_chain=False, qcow2, writable,
    // cache "none" with aio "native" when O_DIRECT works.
    both(
        "ovirt-imageio",
        &[
            "--export-name=",
            "--persistent",
            "--shared=8",
            "--socket=SOCK",
            "--cache=none",
            "--aio=native",
            "--discard=unmap",
            "--detect-zeroes=unmap",
            "--allocation-depth",
            r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "DIR/top.qcow2"}, "backing": null}"#,
        ],
        true,
    );
}

#[test]
fn ovirt_imageio_serves_a_window_of_a_raw_image_read_only() {
    // ovirt-imageio qemu_nbd.py with offset and size: a raw node with "offset"/"size" around the file.
    both(
        "ovirt-imageio offset/size",
        &[
            "--export-name=",
            "--persistent",
            "--shared=8",
            "--socket=SOCK",
            "--read-only",
            "--cache=writeback",
            "--aio=threads",
            r#"json:{"driver": "raw", "file": {"driver": "file", "filename": "DIR/base.raw"}, "offset": 0, "size": 4194304}"#,
        ],
        false,
    );
}

#[test]
fn vdsm_serves_a_qcow2_chain_writable() {
    // vdsm, lib/vdsm/storage/nbd.py, start_transient_service(): qcow2 with its backing chain, discard.
    both(
        "vdsm",
        &[
            "--socket",
            "SOCK",
            "--persistent",
            "--shared=8",
            "--export-name=",
            "--cache=none",
            "--aio=native",
            "--allocation-depth",
            "--discard=unmap",
            "--detect-zeroes=unmap",
            r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "DIR/top.qcow2"}}"#,
        ],
        true,
    );
}

#[test]
fn vdsm_serves_read_only() {
    both(
        "vdsm read-only",
        &[
            "--socket",
            "SOCK",
            "--persistent",
            "--shared=8",
            "--export-name=",
            "--cache=none",
            "--aio=native",
            "--allocation-depth",
            "--read-only",
            r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "DIR/top.qcow2"}}"#,
        ],
        false,
    );
}

#[test]
fn virt_v2v_serves_a_snapshot_with_unlimited_clients() {
    // virt-v2v, lib/qemuNBD.ml, run_unix: snapshot (read-only input), --shared=0, a pid file.
    both(
        "virt-v2v -s",
        &[
            "-t",
            "--shared=0",
            "--discard=unmap",
            "--pid-file",
            "PIDFILE",
            "--socket",
            "SOCK",
            "-s",
            "--format",
            "qcow2",
            "DIR/top.qcow2",
        ],
        false,
    );
}

#[test]
fn virt_v2v_serves_image_opts() {
    // virt-v2v lib/qemuNBD.ml with imgopts = true.
    both(
        "virt-v2v --image-opts",
        &[
            "-t",
            "--shared=0",
            "--discard=unmap",
            "--pid-file",
            "PIDFILE",
            "--socket",
            "SOCK",
            "--image-opts",
            "driver=qcow2,file.driver=file,file.filename=DIR/top.qcow2",
        ],
        true,
    );
}

#[test]
fn virt_v2v_writes_a_compressed_qcow2_through_the_compress_filter() {
    // virt-v2v output/output.ml for -oo compressed (and backup tools alike): qemu-nbd over qemu's compress
    // filter, written by nbdcopy. Both servers, each into its own fresh qcow2 from the same source.
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&src), "4M"]);
    // Compressible patterns, a hole, and a cluster of random bytes that does not compress.
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 512k", s(&src)]);
    ok("dd", &["if=/dev/urandom", &format!("of={}", s(&src)), "bs=64k", "seek=50", "count=1", "conv=notrunc"]);
    let mut out = Vec::new();
    for prog in [QNBD, QEMU_NBD] {
        let dst = d.path().join(format!("out-{}.qcow2", out.len()));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&dst), "4M"]);
        let opts = format!("driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={}", s(&dst));
        let r = serve(prog, d.path(), &["-t", "--socket", "SOCK", "--image-opts", &opts]);
        ok("nbdcopy", &[s(&src), &r.uri()]);
        r.stop();
        assert_check_clean(&dst, prog);
        let check = ok("qemu-img", &["check", "--output=json", s(&dst)]);
        let j: serde_json::Value = serde_json::from_str(&check).unwrap();
        let compressed = j["compressed-clusters"].as_u64().unwrap_or(0);
        let allocated = j["allocated-clusters"].as_u64().unwrap();
        // Every data cluster but the random one is compressed.
        assert_eq!(compressed + 1, allocated, "{prog}: {check}");
        let cmp = ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&dst)]);
        assert!(cmp.contains("identical"), "{prog}: {cmp}");
        out.push(dst);
    }
    // Writes that are not whole clusters, from a client that did not ask for block sizes (so GO reports a
    // minimum of 1 and libnbd sends them as they are): several at once into one cluster on disjoint ranges,
    // with a WRITE_ZEROES among them, one across two clusters, one into the image's last, partial cluster.
    // qnbd reads, merges and compresses each cluster again; none may undo another.
    let p = d.path().join("p.qcow2");
    let size: u64 = (1 << 20) + 4608;
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), &size.to_string()]);
    let opts = format!("driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={}", s(&p));
    let r = serve(QNBD, d.path(), &["-t", "--socket", "SOCK", "--image-opts", &opts]);
    let expected = d.path().join("expected.raw");
    let script = format!(
        r#"
import nbd
size = {size}
want = bytearray(b"\x22" * size)
h = nbd.NBD()
h.set_request_block_size(False)
h.connect_uri("{uri}")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
h.pwrite(bytes(want), 0)
cmds = []
for i in range(8):
    data = bytes([0x40 + i]) * 3000
    cmds.append(h.aio_pwrite(data, i * 4096 + 100))
    want[i * 4096 + 100:i * 4096 + 3100] = data
cmds.append(h.aio_zero(8192, 40000))
want[40000:48192] = bytes(8192)
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cmds:
    assert h.aio_command_completed(c)
for data, at in [(b"\x55" * 5000, 65536 - 2000), (b"\x66" * 1000, size - 1500)]:
    h.pwrite(data, at)
    want[at:at + len(data)] = data
assert h.pread(size, 0) == want
h.shutdown()
open("{exp}", "wb").write(want)
"#,
        size = size,
        uri = r.uri(),
        exp = s(&expected)
    );
    ok("/usr/bin/python3", &["-c", &script]);
    r.stop();
    assert_check_clean(&p, "after partial writes");
    let cmp = ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&expected), s(&p)]);
    assert!(cmp.contains("identical"), "{cmp}");
    let j: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["check", "--output=json", s(&p)])).unwrap();
    assert!(j["compressed-clusters"].as_u64().unwrap_or(0) >= 17, "{j}");
    // What cannot hold compressed clusters is refused in qemu-nbd's words.
    let raw = d.path().join("r.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let e = run(QNBD, &["--image-opts", &format!("driver=compress,file.driver=raw,file.file.filename={}", s(&raw))]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("Compression is not supported for underlying format: raw"));
}
