//! qnbd as a drop-in for qemu-nbd where users meet the difference: image locks both ways with the real
//! qemu-img, qemu-io and qemu-nbd; the probed-raw exploit; clients that come one right after another; block
//! devices (loop devices); O_DIRECT (`--cache=none`) with unaligned requests.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A server process on a unix socket, killed when dropped.
struct Served {
    _srv: Srv,
    sock: PathBuf,
}

impl Served {
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

fn serve(prog: &str, sock: &Path, args: &[&str]) -> Served {
    let mut c = Command::new(prog);
    c.arg("-k").arg(sock).args(args);
    Served { _srv: spawn_listening(c, sock), sock: sock.to_path_buf() }
}

/// What follows the program name in an error (`qemu-img: MESSAGE`).
fn msg(o: &std::process::Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    e.split_once(": ").map(|(_, m)| m.trim().to_string()).unwrap_or(e)
}

#[test]
fn locks_are_qemus_both_ways() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let sock = d.path().join("s");
    // qnbd writing: qemu-img, qemu-io and qemu-nbd are refused as if qemu-nbd were writing.
    let mut refusals = Vec::new();
    for server in [QNBD, "qemu-nbd"] {
        let srv = serve(server, &sock, &["-t", "-f", "qcow2", s(&img)]);
        let tries = [
            run("qemu-img", &["info", s(&img)]),
            run("qemu-io", &["-c", "write 0 512", s(&img)]),
            run("qemu-img", &["resize", s(&img), "32M"]),
            // (bounded: a server that got in would serve forever)
            run("timeout", &["10", "qemu-nbd", "-k", s(&d.path().join("t")), "-f", "qcow2", s(&img)]),
            run("timeout", &["10", QNBD, "-k", s(&d.path().join("t")), "-f", "qcow2", s(&img)]),
            run("timeout", &["10", QNBD, "-r", "-k", s(&d.path().join("t")), "-f", "qcow2", s(&img)]),
        ];
        for t in &tries {
            assert_eq!(t.status.code(), Some(1), "{server}: {}", msg(t));
        }
        refusals
            .push(tries.iter().map(|t| msg(t).replace("Failed to blk_new_open", "Could not open")).collect::<Vec<_>>());
        // -U reads it.
        ok("qemu-img", &["info", "-U", s(&img)]);
        drop(srv);
        // qnbd's commit helper holds the image's locks until it has seen the server go.
        wait_gone(s(&img));
    }
    for (a, b) in refusals[0].iter().zip(&refusals[1]) {
        let lock = |m: &str| m.split_once("Failed to get").map(|(_, l)| l.to_string());
        assert_eq!(lock(a), lock(b), "qnbd: {a}\nqemu-nbd: {b}");
        assert!(lock(a).is_some(), "{a}");
    }
    // qemu-io writing: qnbd is refused, with qemu's message; file.locking=off opts out.
    let mut io = Srv(Command::new("qemu-io")
        .args(["-f", "qcow2", s(&img)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let o = run("timeout", &["10", QNBD, "-k", s(&d.path().join("t")), "-f", "qcow2", s(&img)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(msg(&o).contains("Failed to get \"write\" lock"), "{}", msg(&o));
    assert!(msg(&o).contains("Is another process using the image"), "{}", msg(&o));
    let _off = serve(
        QNBD,
        &d.path().join("u"),
        &["-r", "--image-opts", &format!("driver=qcow2,file.filename={},file.locking=off", s(&img))],
    );
    let _ = io.0.kill();
}

#[test]
fn a_probed_raw_image_cannot_be_turned_into_a_qcow2_reading_host_files() {
    let d = tempfile::tempdir().unwrap();
    // A qcow2 header whose backing file is a host file: the first sector a client would write.
    let evil = d.path().join("evil.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", s(&evil), "1M"]);
    let sector = d.path().join("sector");
    std::fs::write(&sector, &std::fs::read(&evil).unwrap()[..512]).unwrap();
    for server in [QNBD, "qemu-nbd"] {
        let img = d.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
        let srv = serve(server, &d.path().join("s"), &["-t", s(&img)]);
        let info = ok("nbdinfo", &["--json", &srv.uri()]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["exports"][0]["block_size_minimum"], 512, "{server}");
        let w = run("qemu-io", &["-f", "raw", "-c", &format!("write -s {} 0 512", s(&sector)), &srv.uri()]);
        let out = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
        assert!(out.contains("Operation not permitted"), "{server}: {out}");
        // Zeros can complete a magic too: "QED\x01" is raw, zeroing its fourth byte would make it QED. NBD block
        // sizes are advisory, so a client may send a 1-byte WRITE_ZEROES or TRIM there.
        let w = ok("qemu-io", &["-f", "raw", "-c", "write -P 0 0 512", &srv.uri()]);
        assert!(!w.contains("failed"), "{w}");
        let script = "import nbd\nh.set_strict_mode(0)\nh.pwrite(b'QED\\x01', 0)\ntry:\n    h.zero(1, 3)\n    print('zero allowed')\nexcept nbd.Error as e:\n    print('zero refused', e.errnum)\ntry:\n    h.trim(1, 3)\n    print('trim done')\nexcept nbd.Error as e:\n    print('trim refused', e.errnum)\n";
        let out = ok("nbdsh", &["-u", &srv.uri(), "-c", script]);
        if server == QNBD {
            // qnbd checks the zeroed bytes themselves (qemu-nbd turns the request into a whole-sector write,
            // which its own check refuses); either way the image must still probe as raw (below).
            assert!(out.contains("zero refused 1"), "{out}");
        }
        // Other writes to the first sector still work.
        let w = ok("qemu-io", &["-f", "raw", "-c", "write -P 0x41 0 512", "-c", "read -P 0x41 0 512", &srv.uri()]);
        assert!(!w.contains("failed"), "{server}: {w}");
        drop(srv);
        // qnbd's commit helper holds the image's locks until it has seen the server go.
        wait_gone(s(&img));
        let i = ok("qemu-img", &["info", "--output=json", s(&img)]);
        assert!(i.contains("\"format\": \"raw\""), "{server}: the image no longer probes as raw: {i}");
    }
    // Given -f raw, the user asked for it: the write goes through, as in qemu.
    let img = d.path().join("disk.img");
    let srv = serve(QNBD, &d.path().join("s"), &["-t", "-f", "raw", s(&img)]);
    ok("qemu-io", &["-f", "raw", "-c", &format!("write -s {} 0 512", s(&sector)), &srv.uri()]);
}

#[test]
fn clients_that_come_back_to_back_are_all_served() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("d.raw");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let srv = serve(QNBD, &d.path().join("s"), &["-t", "-e", "1", "-f", "raw", s(&img)]);
    for i in 0..500 {
        let o = run("nbdinfo", &["--size", &srv.uri()]);
        assert!(o.status.success(), "client {i} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    // 300 connections from one process, each closed before the next opens.
    let script = format!(
        "import nbd\nfor i in range(300):\n    h = nbd.NBD()\n    h.connect_unix({:?})\n    assert h.pread(512, 0) == b'\\x07' * 512\n    h.shutdown()\n    del h\nprint('ok')\n",
        s(&srv.sock)
    );
    let o = run("python3", &["-c", &script]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A loop device over a new file of `size` bytes, detached when dropped.
struct Loop(String);

impl Loop {
    fn new(file: &Path, size: u64) -> Option<Loop> {
        std::fs::File::create(file).unwrap().set_len(size).unwrap();
        let o = run("losetup", &["-f", "--show", s(file)]);
        o.status.success().then(|| Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.0]);
    }
}

#[test]
fn raw_and_qcow2_images_on_loop_devices_are_served_and_written() {
    let d = tempfile::tempdir().unwrap();
    let Some(raw) = Loop::new(&d.path().join("raw.img"), 8 << 20) else {
        eprintln!("skipped: no loop device here (needs root)");
        return;
    };
    // A raw block device: its size comes from the device, through both drivers.
    for name in
        [raw.0.clone(), format!(r#"json:{{"driver":"raw","file":{{"driver":"host_device","filename":"{}"}}}}"#, raw.0)]
    {
        let srv = serve(QNBD, &d.path().join("s"), &["-t", "-f", "raw", "--cache=none", &name]);
        assert_eq!(ok("nbdinfo", &["--size", &srv.uri()]).trim(), (8u64 << 20).to_string(), "{name}");
        ok("qemu-io", &["-f", "raw", "-c", "write -P 0x61 4095 8193", &srv.uri()]);
        drop(srv);
        // qnbd's commit helper holds the image's locks until it has seen the server go.
        wait_gone(&name);
    }
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x61 4095 8193", &raw.0]);
    // A qcow2 image inside a small device: it allocates inside the device, and a full device fails the
    // write with ENOSPC, never the image.
    let Some(dev) = Loop::new(&d.path().join("q.img"), 4 << 20) else { return };
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &dev.0, "64M"]);
    let srv = serve(QNBD, &d.path().join("s2"), &["-t", "-f", "qcow2", &dev.0]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x62 0 1M", "-c", "flush", &srv.uri()]);
    let full = run("qemu-io", &["-f", "raw", "-c", "write -P 0x63 8M 8M", &srv.uri()]);
    let out = String::from_utf8_lossy(&full.stdout).to_string() + &String::from_utf8_lossy(&full.stderr);
    assert!(out.contains("No space left on device"), "{out}");
    ok("qemu-io", &["-f", "raw", "-c", "flush", "-c", "read -P 0x62 0 1M", &srv.uri()]);
    drop(srv);
    // qnbd's commit helper holds the image's locks until it has seen the server go.
    wait_gone(&dev.0);
    let chk = run("qemu-img", &["check", "-f", "qcow2", &dev.0]);
    // Leaked clusters from the failed write are allowed (exit 3); corruption (2) is not.
    assert!(matches!(chk.status.code(), Some(0) | Some(3)), "{}", String::from_utf8_lossy(&chk.stdout));
    ok("qemu-io", &["-f", "qcow2", "-c", "read -P 0x62 0 1M", &dev.0]);
}

#[test]
fn cache_none_reads_and_writes_unaligned_requests_correctly() {
    let d = tempfile::tempdir().unwrap();
    for (fmt, name) in [("raw", "d.raw"), ("qcow2", "d.qcow2")] {
        let img = d.path().join(name);
        ok("qemu-img", &["create", "-q", "-f", fmt, s(&img), "8M"]);
        for cache in ["none", "directsync", "writethrough", "unsafe"] {
            let srv = serve(QNBD, &d.path().join("s"), &["-t", "-f", fmt, &format!("--cache={cache}"), s(&img)]);
            ok(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x71 1000 3000",
                    "-c",
                    "write -P 0x72 65537 100",
                    "-c",
                    "write -P 0x73 1M 1M",
                    "-c",
                    // Long and unaligned at both ends: partial first and last blocks, an aligned middle.
                    "write -P 0x74 2097252 204800",
                    &srv.uri(),
                ],
            );
            let r = ok(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "read -P 0x71 1000 3000",
                    "-c",
                    "read -P 0x72 65537 100",
                    "-c",
                    "read -P 0 65637 100",
                    "-c",
                    "read -P 0x73 1M 1M",
                    "-c",
                    "read -P 0 2097152 100",
                    "-c",
                    "read -P 0x74 2097252 204800",
                    "-c",
                    "read -P 0 2302052 100",
                    &srv.uri(),
                ],
            );
            assert!(!r.contains("failed"), "{fmt} --cache={cache}: {r}");
            drop(srv);
            // qnbd's commit helper holds the image's locks until it has seen the server go.
            wait_gone(s(&img));
            let r = ok("qemu-io", &["-f", fmt, "-c", "read -P 0x71 1000 3000", "-c", "read -P 0x73 1M 1M", s(&img)]);
            assert!(!r.contains("failed"), "{fmt} --cache={cache} on disk: {r}");
            if fmt == "qcow2" {
                assert_check_clean(&img, &format!("--cache={cache}"));
            } else {
                assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 << 20, "the raw file kept its size");
            }
        }
    }
}

#[test]
fn backing_policy_keeps_an_untrusted_image_from_reading_host_files() {
    let d = tempfile::tempdir().unwrap();
    // An uploaded image whose backing file is a host file.
    let img = d.path().join("upload.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", s(&img), "1M"]);
    for policy in ["relative", "none"] {
        let o = run("timeout", &["10", QNBD, "-r", "--backing-policy", policy, "-k", s(&d.path().join("s")), s(&img)]);
        assert_eq!(o.status.code(), Some(1), "{policy}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("'/etc/passwd' is refused by --backing-policy"), "{policy}: {e}");
    }
    // The default is qemu's: it follows the name.
    let srv = serve(QNBD, &d.path().join("s"), &["-r", "-t", s(&img)]);
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let n = passwd.len().min(512);
    let out = d.path().join("head.raw");
    ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &srv.uri(), s(&out)]);
    assert_eq!(&std::fs::read(&out).unwrap()[..n], &passwd[..n]);
}

/// `--cache=none` reads aligned requests through io_uring: a chain with data in both layers, zero clusters and
/// compressed clusters (which go the ordinary way) reads over NBD exactly as qemu reads the files, with 4 KiB
/// to 1 MiB requests from qemu-img compare and qemu-io at many queue positions.
#[test]
fn cache_none_chain_reads_equal_qemu() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let src = d.path().join("src.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&src), "16M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x12 8M 4M", s(&src)]);
    // Compressed clusters in the base.
    ok("qemu-img", &["convert", "-q", "-c", "-O", "qcow2", s(&src), s(&base)]);
    let top = d.path().join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&top)]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x21 1M 3M",
            "-c",
            "write -z 5M 1M",
            "-c",
            "write -P 0x22 9M 64k",
            "-c",
            "write -P 0x23 13M 2M",
            s(&top),
        ],
    );
    let srv = serve(QNBD, &d.path().join("s"), &["-r", "-t", "-e", "4", "-f", "qcow2", "--cache=none", s(&top)]);
    let cmp = ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", s(&top), &srv.uri()]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let r = ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "aio_read -P 0x11 0 4k",
            "-c",
            "aio_read -P 0x21 1M 1M",
            "-c",
            "aio_read -P 0 5M 64k",
            "-c",
            "aio_read -P 0x22 9M 64k",
            "-c",
            "aio_read -P 0x12 10M 512k",
            "-c",
            "aio_read -P 0x23 14M 1M",
            "-c",
            "aio_read -P 0 15M 1M",
            "-c",
            "aio_flush",
            &srv.uri(),
        ],
    );
    assert!(!r.contains("fail") && !r.contains("Pattern verification"), "{r}");
}

/// `--cache=none` writes into allocated clusters go through io_uring with `O_DIRECT`, beside unaligned writes
/// (read-modify-write of a block), allocating writes, discards and zero writes: the image ends up as the same
/// commands leave it through qemu-nbd `--cache=none`, clean, with the same dirty bitmap; then fio writes and
/// verifies at QD32 through qnbd.
#[test]
fn cache_none_in_place_writes_equal_qemu() {
    let d = tempfile::tempdir().unwrap();
    let mine = image_with_bitmap(d.path(), "mine.qcow2", "32M");
    let theirs = d.path().join("theirs.qcow2");
    std::fs::copy(&mine, &theirs).unwrap();
    let cmds = [
        // Loads the first L2 table (an ordinary write); the next ones in allocated clusters go to the ring.
        "write -P 0x41 0 4k",
        "aio_write -P 0x42 1M 4k",
        "aio_write -P 0x43 2M 64k",
        "aio_write -P 0x44 3M 512",
        "aio_write -P 0x45 3076k 4k",
        "aio_write -P 0x46 4100k 1k",
        "aio_write -P 0x47 4104k 8k",
        "aio_write -P 0x48 5M 1M",
        "aio_write -P 0x49 31M 2M",
        "aio_write -P 0x4a 40M 64k",
        "aio_flush",
        "discard 6M 128k",
        "aio_write -P 0x4b 6M 4k",
        "write -z 7M 64k",
        "aio_write -P 0x4c 7M 4k",
        "aio_write -P 0x4d 8M 128k",
        "aio_flush",
    ];
    for (server, img) in [(QNBD, &mine), ("qemu-nbd", &theirs)] {
        let srv = serve(server, &d.path().join("s"), &["-t", "-f", "qcow2", "--cache=none", s(img)]);
        // qemu-io's default cache mode, writethrough, sets FUA on every write: writeback, as a VM's disk.
        let mut args = vec!["-f", "raw", "-t", "writeback"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        let u = srv.uri();
        args.push(&u);
        let r = ok("qemu-io", &args);
        assert!(!r.contains("fail"), "{server}: {r}");
        stop(srv);
        wait_gone(s(img));
    }
    assert_check_clean(&mine, "after --cache=none writes");
    let cmp = ok("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", s(&mine), s(&theirs)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let map = |img: &Path| {
        let sock = d.path().join("m");
        let srv = serve("qemu-nbd", &sock, &["-r", "-t", "-f", "qcow2", "-B", "b0", s(img)]);
        ok("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &srv.uri()])
    };
    let (m, t) = (map(&mine), map(&theirs));
    assert!(m.contains("dirty"), "{m}");
    assert_eq!(m, t, "the dirty bitmap after --cache=none writes");
    // Many writes in flight at once into allocated clusters, read back and verified.
    let srv = serve(QNBD, &d.path().join("s"), &["-t", "-e", "4", "-f", "qcow2", "--cache=none", s(&mine)]);
    let out = ok(
        "fio",
        &[
            "--name=t",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--io_size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
            "--minimal",
        ],
    );
    assert!(out.contains(';'), "{out}");
    stop(srv);
    wait_gone(s(&mine));
    assert_check_clean(&mine, "after fio through --cache=none");
}

/// A 64 MiB qcow2 whose first `written` bytes qemu-io wrote (allocated clusters), with an enabled bitmap `b0`.
fn image_with_bitmap(dir: &Path, name: &str, written: &str) -> PathBuf {
    let img = dir.join(name);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    ok("qemu-io", &["-c", &format!("write -P 0x31 0 {written}"), s(&img)]);
    ok("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    img
}

/// Stops a server as a user does (SIGTERM: it stores its bitmaps and exits) and checks that it exited cleanly.
fn stop(mut srv: Served) {
    let pid = srv._srv.0.id().to_string();
    ok("kill", &["-TERM", &pid]);
    let st = srv._srv.0.wait().unwrap();
    assert!(st.success(), "the server exited with {st}");
}

/// SIGTERM while a client has writes in flight through `--cache=none`'s io_uring: the server waits for the
/// kernel to finish them, exits cleanly and stores the image's bitmaps (not left "in-use", which qemu refuses).
#[test]
fn cache_none_sigterm_under_load_stores_bitmaps() {
    let d = tempfile::tempdir().unwrap();
    let img = image_with_bitmap(d.path(), "t.qcow2", "64M");
    for round in 0..3 {
        let srv = serve(QNBD, &d.path().join("s"), &["-t", "-f", "qcow2", "--cache=none", s(&img)]);
        let mut fio = Command::new("fio")
            .args([
                "--name=t",
                "--ioengine=nbd",
                &format!("--uri={}", srv.uri()),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--time_based",
                "--runtime=3",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700 + 200 * round));
        stop(srv);
        let _ = fio.kill();
        let _ = fio.wait();
        wait_gone(s(&img));
        let info: serde_json::Value =
            serde_json::from_str(&ok("qemu-img", &["info", "--output=json", s(&img)])).unwrap();
        let flags = &info["format-specific"]["data"]["bitmaps"][0]["flags"];
        assert_eq!(flags, &serde_json::json!(["auto"]), "round {round}: {info}");
        assert_check_clean(&img, "after SIGTERM under load");
    }
}
