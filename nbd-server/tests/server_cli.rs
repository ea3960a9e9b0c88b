//! qnbd as users run it: qcow2 images written through NBD and checked by qemu-img, kill -9 in the middle of
//! writes, -s snapshots, --fork and --pid-file, socket activation, several exports sharing one base,
//! exit after the last client, and clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

fn spawn(args: &[&str], sock: &Path) -> Srv {
    let c = Srv(Command::new(QNBD).args(args).arg("-k").arg(sock).stdout(Stdio::null()).spawn().unwrap());
    wait_for(sock);
    c
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// A qcow2 overlay on a raw base with data, as nova makes them.
fn overlay(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), "64M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 64M", s(&base)]);
    let ov = dir.join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&ov)]);
    ov
}

#[test]
fn qcow2_written_through_nbd_checks_clean_and_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let ov = overlay(d.path());
    let sock = d.path().join("s.sock");
    let mut srv = spawn(&["-t", "-e", "4", "--discard=unmap", s(&ov)], &sock);
    let u = uri(&sock);
    ok(
        "fio",
        &[
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={u}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--io_size=8M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--numjobs=1",
        ],
    );
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 40M 1M", "-c", "write -z 48M 1M", "-c", "discard 50M 1M", &u]);
    let out = d.path().join("out.raw");
    ok("nbdcopy", &[&u, s(&out)]);
    let _ = srv.kill();
    let _ = srv.wait();
    // qnbd's commit helper holds the image's locks until it has seen the server go.
    wait_gone(s(&sock));
    assert_check_clean(&ov, "after the clients");
    // What qemu reads from the image is what the clients read through qnbd.
    ok("qemu-img", &["compare", "-F", "raw", s(&ov), s(&out)]);
    ok("qemu-io", &["-c", "read -P 0x77 40M 1M", "-c", "read -P 0 48M 1M", "-c", "read -P 0x11 60M 1M", s(&ov)]);
}

#[test]
fn kill_9_in_the_middle_of_writes_leaves_a_clean_image() {
    let d = tempfile::tempdir().unwrap();
    let ov = overlay(d.path());
    for (round, ms) in [300u64, 700, 1100].into_iter().enumerate() {
        let sock = d.path().join(format!("k{round}.sock"));
        let mut srv = spawn(&["-t", "-e", "4", s(&ov)], &sock);
        let u = uri(&sock);
        let mut fio = Command::new("fio")
            .args([
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={u}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=64M",
                "--time_based",
                "--runtime=5",
                "--fsync=64",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        // SIGKILL: no chance to flush anything.
        let _ = srv.kill();
        let _ = srv.wait();
        let _ = fio.wait();
        wait_gone(s(&sock));
        assert_check_clean(&ov, &format!("round {round}"));
    }
}

#[test]
fn snapshot_mode_discards_writes() {
    let d = tempfile::tempdir().unwrap();
    let ov = overlay(d.path());
    let before = std::fs::read(&ov).unwrap();
    let sock = d.path().join("s.sock");
    let mut srv = spawn(&["-s", "-t", s(&ov)], &sock);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x99 0 1M", "-c", "read -P 0x99 0 1M", &uri(&sock)]);
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(std::fs::read(&ov).unwrap() == before, "-s changed the image");
    let leftovers: Vec<_> = std::fs::read_dir("/var/tmp")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("qnbd-snapshot-{}-", srv.id())))
        .collect();
    assert!(leftovers.is_empty(), "temporary overlay left behind");
}

#[test]
fn fork_and_pid_file() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("f.raw");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let sock = d.path().join("f.sock");
    let pidf = d.path().join("q.pid");
    let t = Instant::now();
    let out = run(QNBD, &["--fork", "-t", "--pid-file", s(&pidf), "-k", s(&sock), "-f", "raw", s(&img)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(5));
    // --fork returns once clients can connect.
    assert!(sock.exists());
    wait_for(&pidf);
    let pid: i32 = std::fs::read_to_string(&pidf).unwrap().trim().parse().unwrap();
    ok("nbdinfo", &["--size", &uri(&sock)]);
    ok("kill", &[&pid.to_string()]);
    let t = Instant::now();
    while sock.exists() || pidf.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "socket or pid file left after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn systemd_socket_activation() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.raw");
    std::fs::File::create(&img).unwrap().set_len(2 << 20).unwrap();
    let sock = d.path().join("a.sock");
    let script = format!(
        "import socket, os\ns = socket.socket(socket.AF_UNIX)\ns.bind({:?})\ns.listen(8)\nos.dup2(s.fileno(), 3)\nos.set_inheritable(3, True)\n\
         os.environ['LISTEN_FDS'] = '1'\nos.environ['LISTEN_PID'] = str(os.getpid())\n\
         os.execv({:?}, ['qnbd', '-t', '-f', 'raw', {:?}])\n",
        s(&sock),
        QNBD,
        s(&img)
    );
    let mut c = Srv(Command::new("/usr/bin/python3").args(["-c", &script]).spawn().unwrap());
    wait_for(&sock);
    let size = ok("nbdinfo", &["--size", &uri(&sock)]);
    assert_eq!(size.trim(), "2097152");
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn several_exports_share_one_base() {
    let d = tempfile::tempdir().unwrap();
    let ov = overlay(d.path());
    let mut files = Vec::new();
    for i in 0..3 {
        let f = d.path().join(format!("vm{i}.qcow2"));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&f)]);
        ok("qemu-io", &["-c", &format!("write -P {} 0 64k", 0x40 + i), s(&f)]);
        files.push(f);
    }
    let _ = ov;
    let sock = d.path().join("m.sock");
    let mut args = vec!["-r", "-t", "-e", "8"];
    for n in ["vm0", "vm1", "vm2"] {
        args.extend(["-x", n]);
    }
    for f in &files {
        args.push(s(f));
    }
    let mut srv = spawn(&args, &sock);
    let list = ok("nbdinfo", &["--list", "--json", &uri(&sock)]);
    for n in ["vm0", "vm1", "vm2"] {
        assert!(list.contains(&format!("\"export-name\": \"{n}\"")), "{list}");
    }
    for i in 0..3 {
        let u = format!("nbd+unix:///vm{i}?socket={}", sock.display());
        ok(
            "qemu-io",
            &["-r", "-f", "raw", "-c", &format!("read -P {} 0 64k", 0x40 + i), "-c", "read -P 0x11 1M 64k", &u],
        );
    }
    let _ = srv.kill();
    let _ = srv.wait();
}

#[test]
fn exits_after_the_last_client_unless_persistent() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("e.raw");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let sock = d.path().join("e.sock");
    let mut srv = spawn(&["-f", "raw", s(&img)], &sock);
    ok("nbdinfo", &["--size", &uri(&sock)]);
    let t = Instant::now();
    loop {
        if let Some(st) = srv.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "qnbd kept running after its only client left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn errors_are_clear_and_exit_non_zero() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("x.sock");
    let out = run(QNBD, &["-k", s(&sock), "/nonexistent/disk.qcow2"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/disk.qcow2"));
    let img = d.path().join("x.raw");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let out = run(QNBD, &["--discard=sometimes", "-k", s(&sock), s(&img)]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("discard"));
    let out = run(QNBD, &["-f", "vmdk", "-k", s(&sock), s(&img)]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown driver 'vmdk'"));
    assert!(!sock.exists());
    // A header whose backing_file_offset is 2^64-1: refused by name, exit 1, no panic.
    let img = d.path().join("bo.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let mut b = std::fs::read(&img).unwrap();
    b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    b[16..20].copy_from_slice(&37u32.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let out = run(QNBD, &["-k", s(&sock), s(&img)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("backing_file_offset") && !err.contains("panicked"), "{err}");
}

#[test]
fn list_prints_what_qemu_nbd_list_prints() {
    let d = tempfile::tempdir().unwrap();
    let ov = overlay(d.path());
    let sock = d.path().join("l.sock");
    let mut srv = spawn(&["-r", "-t", "-e", "4", "-A", "-x", "disk", "-D", "the disk", s(&ov)], &sock);
    let ours = ok(QNBD, &["-L", "-k", s(&sock)]);
    let theirs = ok("qemu-nbd", &["-L", "-k", s(&sock)]);
    assert_eq!(ours, theirs);
    assert!(ours.contains(" export: 'disk'"), "{ours}");
    let _ = srv.kill();
    let _ = srv.wait();
    let gone = run(QNBD, &["-L", "-k", s(&sock)]);
    assert_ne!(gone.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("Failed to connect"));
}

#[test]
fn offset_exports_the_rest_of_the_image() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("o.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&img), "4M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x31 1M 64k", s(&img)]);
    let sock = d.path().join("o.sock");
    let mut srv = spawn(&["-t", "-f", "raw", "-o", "1048576", s(&img)], &sock);
    let size = ok("nbdinfo", &["--size", &uri(&sock)]);
    assert_eq!(size.trim(), "3145728");
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x31 0 64k", "-c", "write -P 0x32 2M 4k", &uri(&sock)]);
    let _ = srv.kill();
    let _ = srv.wait();
    // qnbd's commit helper holds the image's locks until it has seen the server go.
    wait_gone(s(&sock));
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x32 3M 4k", s(&img)]);
}

#[test]
fn fresh_per_connection_gives_each_client_the_pristine_image() {
    let d = tempfile::tempdir().unwrap();
    let ov = overlay(d.path());
    let before = std::fs::read(&ov).unwrap();
    let sock = d.path().join("f.sock");
    let mut srv = spawn(&["-t", "-e", "4", "--fresh-per-connection", s(&ov)], &sock);
    let u = uri(&sock);
    // A client scribbles; the next one sees the pristine image again.
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x99 0 1M", "-c", "read -P 0x99 0 1M", &u]);
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x11 0 1M", &u]);
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(std::fs::read(&ov).unwrap() == before, "the pristine image changed");
}

#[test]
fn four_writers_with_multi_conn_keep_the_qcow2_consistent() {
    let d = tempfile::tempdir().unwrap();
    let ov = overlay(d.path());
    let src = d.path().join("src.raw");
    let data: Vec<u8> = (0..(48u32 << 20)).map(|i| ((i / 4096) as u8).wrapping_mul(13) ^ (i as u8)).collect();
    std::fs::write(&src, &data).unwrap();
    let sock = d.path().join("m.sock");
    let mut srv = spawn(&["-t", "-e", "4", s(&ov)], &sock);
    ok("nbdinfo", &["--can=multi-conn", &uri(&sock)]);
    // nbdcopy uses four connections when the server allows multi-conn.
    ok("nbdcopy", &["-C", "4", "--flush", s(&src), &uri(&sock)]);
    let _ = srv.kill();
    let _ = srv.wait();
    // qnbd's commit helper holds the image's locks until it has seen the server go.
    wait_gone(s(&sock));
    assert_check_clean(&ov, "after four writers");
    let out = d.path().join("out.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&ov), s(&out)]);
    let back = std::fs::read(&out).unwrap();
    assert!(back[..data.len()] == data[..], "data written over four connections differs");
    assert!(back[data.len()..].iter().all(|&b| b == 0x11), "the base shows through after the copied range");
}

/// Whether process `pid` has exited (gone, or a zombie nobody has reaped yet).
fn exited(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| st.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])))
        .unwrap_or(true)
}

/// A user stops the server and uses the image at once (`kill $pid; wait $pid; qemu-img check ...`): once the
/// server has exited, so has its commit helper, which shares the image's open files and with them its locks.
/// The helper is made slow to go (`QNBD_TEST_HELPER_LINGER_MS`, as on a loaded machine) so that a server that
/// does not wait for it leaves the image locked when it exits.
#[test]
fn a_stopped_server_leaves_the_image_unlocked_when_it_exits() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("u.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    let sock = d.path().join("u.sock");
    let mut cmd = Command::new(QNBD);
    cmd.args(["-t", "-f", "qcow2", "-k", s(&sock), s(&img)]).env("QNBD_TEST_HELPER_LINGER_MS", "500");
    cmd.stdout(Stdio::null());
    let mut srv = spawn_listening(cmd, &sock);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 2 0 64k", &uri(&sock)]);
    ok("kill", &["-TERM", &srv.0.id().to_string()]);
    let st = srv.0.wait().unwrap();
    assert!(st.success(), "the server exited with {st}");
    assert!(pids_with(s(&sock)).is_empty(), "a process of the server outlived it");
    assert_check_clean(&img, "right after the server exited");
    // In the background (--fork) the helper is not the server's child; the server still waits for it.
    let pidfile = d.path().join("q.pid");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(QNBD);
    cmd.args(["--fork", "--pid-file", s(&pidfile), "-t", "-f", "qcow2", "-k", s(&sock), s(&img)]);
    cmd.env("QNBD_TEST_HELPER_LINGER_MS", "500");
    let st = cmd.status().unwrap();
    assert!(st.success(), "qnbd --fork exited with {st}");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    ok("qemu-io", &["-f", "raw", "-c", "write -P 9 0 64k", &uri(&sock)]);
    ok("kill", &["-TERM", &pid]);
    wait_until("the background server exits", Duration::from_secs(20), || exited(&pid));
    assert!(pids_with(s(&sock)).is_empty(), "a process of the background server outlived it");
    assert_check_clean(&img, "right after the background server exited");
    ok("qemu-io", &["-f", "qcow2", "-c", "read -P 9 0 64k", s(&img)]);
}
