//! qnbd with the real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh and fio, over unix sockets and
//! 127.0.0.1. Where a client's view can differ by server, qnbd's answers are compared with qemu-nbd's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

struct Srv {
    child: Child,
    uri: String,
}

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `bin` (qnbd or qemu-nbd) with `args` on a unix socket in `dir` (or TCP when `tcp`).
fn serve(bin: &str, dir: &Path, tag: &str, args: &[&str], tcp: bool) -> Srv {
    let sock = dir.join(format!("{tag}.sock"));
    let mut cmd = Command::new(bin);
    let uri = if tcp {
        let port = free_port();
        cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
        format!("nbd://127.0.0.1:{port}")
    } else {
        cmd.args(["-k", sock.to_str().unwrap()]);
        format!("nbd+unix:///?socket={}", sock.display())
    };
    cmd.args(args).stdout(Stdio::null());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let srv = Srv { child, uri };
    let t = Instant::now();
    loop {
        let up = if tcp {
            // Not a self-connection (an ephemeral local port equal to the server's, before it listens).
            std::net::TcpStream::connect(srv.uri.trim_start_matches("nbd://"))
                .is_ok_and(|c| c.local_addr().ok() != c.peer_addr().ok())
        } else {
            sock.exists()
        };
        if up {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{bin} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    srv
}

/// A qcow2 chain (raw base <- qcow2 overlay) with data, zeros and holes.
fn chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", base.to_str().unwrap(), "8M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 5M 64k", base.to_str().unwrap()]);
    let ov = dir.join("ov.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", ov.to_str().unwrap(), "12M"]);
    ok(
        "qemu-io",
        &["-c", "write -P 0x21 512k 1M", "-c", "write -z 3M 128k", "-c", "write -P 0x22 9M 4k", ov.to_str().unwrap()],
    );
    ov
}

#[test]
fn qemu_img_reads_qcow2_chain_over_unix_and_tcp() {
    let d = tempfile::tempdir().unwrap();
    let ov = chain(d.path());
    for tcp in [false, true] {
        let s = serve(QNBD, d.path(), "q", &["-r", "-t", "-e", "4", ov.to_str().unwrap()], tcp);
        let info = ok("qemu-img", &["info", "--output=json", &s.uri]);
        assert!(info.contains("\"virtual-size\": 12582912"), "{info}");
        let cmp = ok("qemu-img", &["compare", &s.uri, ov.to_str().unwrap()]);
        assert_eq!(cmp, "Images are identical.\n");
        ok("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0x21 512k 1M", "-c", "read -P 0x22 9M 4k", &s.uri]);
        let out = d.path().join("out.raw");
        ok("qemu-img", &["convert", "-O", "raw", &s.uri, out.to_str().unwrap()]);
        ok("qemu-img", &["compare", "-f", "raw", out.to_str().unwrap(), ov.to_str().unwrap()]);
    }
}

#[test]
fn block_status_seen_by_qemu_img_and_nbdinfo_matches_qemu_nbd() {
    let d = tempfile::tempdir().unwrap();
    let ov = chain(d.path());
    let ours = serve(QNBD, d.path(), "q", &["-r", "-t", "-e", "8", "-A", ov.to_str().unwrap()], false);
    let theirs = serve("qemu-nbd", d.path(), "r", &["-r", "-t", "-e", "8", "-A", ov.to_str().unwrap()], false);
    let a = ok("qemu-img", &["map", "--output=json", &ours.uri]);
    let b = ok("qemu-img", &["map", "--output=json", &theirs.uri]);
    assert_eq!(a, b, "qemu-img map over NBD");
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let a = ok("nbdinfo", &[&format!("--map={ctx}"), "--json", &ours.uri]);
        let b = ok("nbdinfo", &[&format!("--map={ctx}"), "--json", &theirs.uri]);
        assert_eq!(a, b, "nbdinfo --map={ctx}");
    }
}

#[test]
fn nbdinfo_list_and_can() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("d.raw");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let s = serve(
        QNBD,
        d.path(),
        "q",
        &["-t", "-e", "2", "-x", "disk1", "-D", "the first disk", img.to_str().unwrap()],
        false,
    );
    let list = ok("nbdinfo", &["--list", "--json", &s.uri]);
    assert!(list.contains("\"export-name\": \"disk1\""), "{list}");
    assert!(list.contains("\"description\": \"the first disk\""), "{list}");
    let uri = s.uri.replace("nbd+unix:///", "nbd+unix:///disk1");
    for can in ["write", "flush", "fua", "trim", "zero", "fast-zero", "df", "multi-conn", "cache", "structured-reply"] {
        let o = run("nbdinfo", &[&format!("--can={can}"), &uri]);
        assert_eq!(o.status.code(), Some(0), "--can={can}");
    }
    let ro = serve(QNBD, d.path(), "r", &["-r", "-t", img.to_str().unwrap()], false);
    assert_eq!(run("nbdinfo", &["--can=write", &ro.uri]).status.code(), Some(2));
}

#[test]
fn nbdcopy_one_and_four_connections() {
    let d = tempfile::tempdir().unwrap();
    let ov = chain(d.path());
    let s = serve(QNBD, d.path(), "q", &["-r", "-t", "-e", "4", ov.to_str().unwrap()], false);
    let want = d.path().join("want.raw");
    ok("qemu-img", &["convert", "-O", "raw", ov.to_str().unwrap(), want.to_str().unwrap()]);
    for c in ["1", "4"] {
        let out = d.path().join(format!("c{c}.raw"));
        ok("nbdcopy", &["-C", c, &s.uri, out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap(), "nbdcopy -C {c}");
    }
}

#[test]
fn writes_from_qemu_io_and_nbdcopy_reach_a_raw_file() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("w.raw");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let s = serve(QNBD, d.path(), "q", &["-t", "-e", "4", "-f", "raw", img.to_str().unwrap()], false);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x61 4096 64k", "-c", "write -z 8192 4096", "-c", "flush", &s.uri]);
    let src = d.path().join("src.raw");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    ok("nbdcopy", &["--destination-is-zero", src.to_str().unwrap(), &s.uri]);
    let back = std::fs::read(&img).unwrap();
    assert_eq!(&back[..1 << 20], &data[..]);
    drop(s);
    // And through qemu-io on a fresh server: zeroes and writes at the end.
    let s = serve(QNBD, d.path(), "q2", &["-t", "-f", "raw", img.to_str().unwrap()], false);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x62 7M 1M", &s.uri]);
    let back = std::fs::read(&img).unwrap();
    assert!(back[7 << 20..].iter().all(|&b| b == 0x62));
}

#[test]
fn nbdsh_script_sees_the_protocol_features() {
    let d = tempfile::tempdir().unwrap();
    let ov = chain(d.path());
    let s = serve(QNBD, d.path(), "q", &["-r", "-t", "-A", ov.to_str().unwrap()], false);
    let script = format!(
        r#"
h.set_export_name("")
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri("{}")
assert h.get_size() == 12 << 20
assert h.can_meta_context("base:allocation")
assert h.can_meta_context("qemu:allocation-depth")
assert h.is_read_only()
assert h.pread(4096, 512 * 1024) == b"\x21" * 4096
assert h.pread(4096, 0) == b"\x11" * 4096
seen = {{}}
def f(ctx, off, entries, err):
    seen[ctx] = list(entries)
h.block_status(2 << 20, 0, f)
assert seen["qemu:allocation-depth"][:2] == [512 * 1024, 2], seen
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write on a read-only export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
print("ok")
"#,
        s.uri
    );
    let out = ok("/usr/bin/python3", &["-c", &format!("import nbd, errno\nh = nbd.NBD()\n{script}")]);
    assert_eq!(out.trim(), "ok");
}

#[test]
fn fio_nbd_engine_random_read_write() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("f.raw");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let s = serve(QNBD, d.path(), "q", &["-t", "-e", "4", "-f", "raw", img.to_str().unwrap()], false);
    let out = ok(
        "fio",
        &[
            "--name=t",
            "--ioengine=nbd",
            &format!("--uri={}", s.uri),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--io_size=8M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--output-format=terse",
            "--minimal",
        ],
    );
    assert!(out.contains(";"), "{out}");
}

fn qemu_version() -> (u32, u32) {
    let v = ok("qemu-img", &["--version"]);
    let num = v.split_whitespace().nth(2).unwrap_or("0.0");
    let mut it = num.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[test]
fn qemu_client_with_extended_headers() {
    // qemu 8.2 and later negotiate NBD extended headers by default.
    if qemu_version() < (8, 2) {
        eprintln!("SKIPPED: qemu-img {:?} predates NBD extended headers (8.2)", qemu_version());
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let ov = chain(d.path());
    let s = serve(QNBD, d.path(), "q", &["-r", "-t", "-v", ov.to_str().unwrap()], false);
    assert_eq!(ok("qemu-img", &["compare", &s.uri, ov.to_str().unwrap()]), "Images are identical.\n");
    let theirs = serve("qemu-nbd", d.path(), "r", &["-r", "-t", ov.to_str().unwrap()], false);
    assert_eq!(
        ok("qemu-img", &["map", "--output=json", &s.uri]),
        ok("qemu-img", &["map", "--output=json", &theirs.uri])
    );
}

/// Large reads go out with `sendfile` straight from the image files: through compressed clusters (read the
/// ordinary way), zero clusters, copy-on-write clusters and past the end of a shorter backing file, every
/// client reads exactly what qemu-img reads, with simple replies, structured replies (holes as chunks, or
/// one chunk with DF) and extended-header-less nbdcopy, over unix sockets and TCP.
#[test]
fn large_reads_sent_from_the_page_cache_read_like_qemu() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    ok("qemu-img", &["create", "-q", "-f", "raw", &p("src.raw"), "4M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 3M", "-c", "write -P 0x34 3146240 1000", &p("src.raw")]);
    ok("qemu-img", &["convert", "-q", "-c", "-O", "qcow2", &p("src.raw"), &p("comp.qcow2")]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "comp.qcow2", "-F", "qcow2", &p("top.qcow2"), "8M"]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x44 1M 512k",
            "-c",
            "write -z 2M 256k",
            "-c",
            "write -P 0x55 5M 100k",
            "-c",
            "write -P 0x66 3100k 8k",
            &p("top.qcow2"),
        ],
    );
    ok("qemu-img", &["convert", "-O", "raw", &p("top.qcow2"), &p("want.raw")]);
    let want = std::fs::read(p("want.raw")).unwrap();
    for tcp in [false, true] {
        let s = serve(QNBD, d.path(), "q", &["-r", "-t", "-e", "4", &p("top.qcow2")], tcp);
        for (i, tool) in ["nbdcopy", "qemu-img"].iter().enumerate() {
            let out = p(&format!("got{i}.raw"));
            let _ = std::fs::remove_file(&out);
            if *tool == "nbdcopy" {
                ok("nbdcopy", &[&s.uri, &out]);
            } else {
                ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &s.uri, &out]);
            }
            assert!(std::fs::read(&out).unwrap() == want, "{tool} over {} read other bytes than qemu-img", s.uri);
        }
        // libnbd, request by request: 1 MiB and odd-sized reads at odd offsets, with each reply style.
        let script = format!(
            r#"
import nbd
want = open("{want}", "rb").read()
for structured, flags in ((False, 0), (True, 0), (True, nbd.CMD_FLAG_DF)):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri("{uri}")
    assert h.get_structured_replies_negotiated() == structured
    for off, n in ((0, 8 << 20), (100, 1 << 20), (3 << 20, 1 << 20), (65536 * 3 + 7, 300001), ((8 << 20) - 70000, 70000)):
        if flags:
            # DF: the whole range in one data chunk.
            chunks = []
            buf = bytearray(n)
            def chunk(data, o, status, err):
                chunks.append(status)
                buf[o - off:o - off + len(data)] = data
                return 0
            h.pread_structured(n, off, chunk, flags=flags)
            assert chunks == [nbd.READ_DATA], chunks
            got = bytes(buf)
        else:
            got = h.pread(n, off)
        assert got == want[off:off + n], (structured, flags, off, n)
    h.shutdown()
print("ok")
"#,
            want = p("want.raw"),
            uri = s.uri
        );
        assert_eq!(ok("/usr/bin/python3", &["-c", &script]).trim(), "ok");
    }
}

/// libnbd's interop tests `structured-read.sh` and `dirty-bitmap.sh` (which assert qemu-nbd's answers):
/// a small structured read over a hole gets an OFFSET_HOLE chunk, and block status with REQ_ONE gives one
/// extent as long as the value stays the same, across clusters that are not contiguous in the file.
#[test]
fn small_structured_reads_and_req_one_block_status_answer_as_qemu_nbd() {
    let d = tempfile::tempdir().unwrap();
    // 512-byte clusters, all 1s but a 512-byte unallocated zero cluster at 2048 (structured-read.sh).
    let sr = d.path().join("sr.qcow2");
    let sr_s = sr.to_str().unwrap();
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compat=v3", sr_s, "3k"]);
    ok("qemu-io", &["-d", "unmap", "-f", "qcow2", "-c", "w -P 1 0 3k", "-c", "w -zu 2k 512", sr_s]);
    // Data at 0 before the bitmap, at 64k after it (another host cluster), zeros at 512k (dirty-bitmap.sh).
    let db = d.path().join("db.qcow2");
    let db_s = db.to_str().unwrap();
    ok("qemu-img", &["create", "-q", "-f", "qcow2", db_s, "1M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "w 0 64k", db_s]);
    ok("qemu-img", &["bitmap", "--add", "--enable", "-f", "qcow2", db_s, "bitmap0"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "w 64k 64k", "-c", "w -z 512k 64k", db_s]);
    let mut seen = Vec::new();
    for bin in [QNBD, "qemu-nbd"] {
        let a = serve(bin, d.path(), "a", &["-r", "-t", "-f", "qcow2", sr_s], false);
        let b = serve(bin, d.path(), "b", &["-r", "-t", "-f", "qcow2", "-B", "bitmap0", db_s], false);
        let script = format!(
            r#"
h = nbd.NBD()
h.connect_uri("{}")
chunks = []
def cb(buf, off, status, err):
    chunks.append((status, off, len(buf), buf[0]))
    return 0
buf = h.pread_structured(1024, 2048, cb)
assert buf == b"\0" * 512 + b"\1" * 512, buf
assert chunks == [(nbd.READ_HOLE, 2048, 512, 0), (nbd.READ_DATA, 2560, 512, 1)], chunks
chunks.clear()
h.pread_structured(1024, 2048, cb, nbd.CMD_FLAG_DF)
assert chunks == [(nbd.READ_DATA, 2048, 1024, 0)], chunks
h.shutdown()
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:bitmap0")
h.connect_uri("{}")
seen = {{}}
def f(ctx, off, entries, err):
    seen[ctx] = list(entries)
h.block_status(1 << 20, 0, f, nbd.CMD_FLAG_REQ_ONE)
assert seen["base:allocation"] == [131072, 0], seen
assert seen["qemu:dirty-bitmap:bitmap0"] == [65536, 0], seen
h.block_status(1 << 20, 0, f)
print(sorted(seen.items()))
"#,
            a.uri, b.uri
        );
        let out = ok("/usr/bin/python3", &["-c", &format!("import nbd\n{script}")]);
        seen.push(out);
    }
    assert_eq!(seen[0], seen[1], "qnbd (left) and qemu-nbd (right) differ");
}
