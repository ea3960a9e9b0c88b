//! `qnbd --fuse`: a qcow2 overlay exposed as a regular file, turned into a block device with losetup,
//! formatted, mounted and written; then qemu-img check is clean, the files read back and the base is unchanged.
//! Needs root, /dev/fuse and loop devices (CI runs as root); elsewhere the tests say why and pass.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The tests here take turns: one of them switches the kernel's `fuse.enable_uring`, which decides how every
/// mount made meanwhile talks to its server.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists();
    if !ok {
        eprintln!("skipped: needs root, /dev/fuse and /dev/loop-control");
    }
    ok
}

/// Unmounts and detaches whatever a failed test left behind.
struct Cleanup {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = run("umount", &[s(m)]);
        }
        for l in &self.loops {
            let _ = run("losetup", &["-d", l]);
        }
    }
}

fn pid_of(pid_file: &Path) -> u32 {
    wait_for(pid_file);
    std::fs::read_to_string(pid_file).unwrap().trim().parse().unwrap()
}

/// What [`export_overlay`] made and started.
struct Exported {
    base: PathBuf,
    ov: PathBuf,
    mp: PathBuf,
    pid_file: PathBuf,
    pid: u32,
}

/// In `d`: a raw base of `size` filled with 0x5a and a qcow2 overlay on it, exported by `qnbd --fuse --fork`
/// on the regular file `disk.img` (registered in `c` for unmounting).
fn export_overlay(d: &Path, size: &str, c: &mut Cleanup) -> Exported {
    let base = d.join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), size]);
    ok("qemu-io", &["-f", "raw", "-c", &format!("write -P 0x5a 0 {size}"), s(&base)]);
    let ov = d.join("overlay.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&ov)]);
    let mp = d.join("disk.img");
    std::fs::write(&mp, b"").unwrap();
    let pid_file = d.join("qnbd.pid");
    // --fork returns once the file is mounted
    ok(QNBD, &["--fuse", s(&mp), "--fork", "--pid-file", s(&pid_file), "-f", "qcow2", s(&ov)]);
    c.mounts.push(mp.clone());
    let pid = pid_of(&pid_file);
    Exported { base, ov, mp, pid_file, pid }
}

#[test]
fn overlay_through_fuse_and_loop_is_formatted_mounted_and_written() {
    let _turn = one_at_a_time();
    if !usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Cleanup { mounts: vec![], loops: vec![] };
    let Exported { base, ov, mp, pid_file, pid } = export_overlay(d, "96M", &mut c);
    let base_md5 = md5(&base);
    assert_eq!(std::fs::metadata(&mp).unwrap().len(), 96 << 20, "the file has the image's virtual size");
    // what the overlay shows before any write is the base
    let head = std::fs::read(&mp).unwrap();
    assert!(head.iter().all(|&b| b == 0x5a));

    let lo = ok("losetup", &["-f", "--show", s(&mp)]).trim().to_string();
    c.loops.push(lo.clone());
    ok("mkfs.ext4", &["-q", "-F", "-L", "fusetest", &lo]);
    let m = d.join("m");
    std::fs::create_dir(&m).unwrap();
    ok("mount", &[&lo, s(&m)]);
    c.mounts.push(m.clone());
    let data: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(m.join("random.bin"), &data).unwrap();
    std::fs::create_dir(m.join("dir")).unwrap();
    for i in 0..20 {
        std::fs::write(m.join(format!("dir/f{i}")), format!("file {i}\n")).unwrap();
    }
    ok("umount", &[s(&m)]);
    c.mounts.pop();
    ok("losetup", &["-d", &lo]);
    c.loops.clear();
    // unmounting the export flushes the image and ends the process
    ok("umount", &[s(&mp)]);
    c.mounts.clear();
    wait_until("qnbd exits after the unmount", Duration::from_secs(20), || !alive(pid));
    assert!(!pid_file.exists(), "the pid file is removed at exit");

    let check = ok("qemu-img", &["check", s(&ov)]);
    assert!(check.contains("No errors were found"), "{check}");
    assert_eq!(md5(&base), base_md5, "the base image is unchanged");
    let raw = d.join("out.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&ov), s(&raw)]);
    ok("e2fsck", &["-fn", s(&raw)]);
    let got = d.join("random.out");
    ok("debugfs", &["-R", &format!("dump /random.bin {}", s(&got)), s(&raw)]);
    assert!(std::fs::read(&got).unwrap() == data, "random.bin reads back");
    assert_eq!(ok("debugfs", &["-R", "cat /dir/f19", s(&raw)]), "file 19\n");
}

#[test]
fn directory_mount_point_read_only_and_sigterm() {
    let _turn = one_at_a_time();
    if !usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("img.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x33 1M 64k", s(&img)]);
    let mp = d.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let pid_file = d.join("p");
    let mut srv = Srv(std::process::Command::new(QNBD)
        .args(["--fuse", s(&mp), "-r", "--pid-file", s(&pid_file), s(&img)])
        .spawn()
        .unwrap());
    let _c = Cleanup { mounts: vec![mp.clone()], loops: vec![] };
    let file = mp.join("nbd");
    wait_for(&file);
    assert_eq!(std::fs::read_dir(&mp).unwrap().count(), 1, "one file in the directory");
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 8 << 20);
    assert!(bytes[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x33));
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0));
    let w = std::fs::OpenOptions::new().write(true).open(&file);
    assert!(w.is_err(), "-r: opening for writing is refused");
    // SAFETY: kill with a valid pid and signal number.
    unsafe { libc::kill(srv.id() as i32, libc::SIGTERM) };
    let st = srv.wait().unwrap();
    assert!(st.success(), "SIGTERM ends the process cleanly: {st:?}");
    assert!(!file.exists(), "the export is unmounted");
    let ordinary = run(QNBD, &["--fuse", s(&d.join("missing")), s(&img)]);
    assert!(!ordinary.status.success());
    assert!(String::from_utf8_lossy(&ordinary.stderr).contains("mount point"), "clear error for a missing mount point");
}

/// fio with O_DIRECT and libaio on `file`, verifying every block it wrote (`extra`: the job).
fn fio_verified(file: &Path, extra: &[&str]) {
    let file_arg = format!("--filename={}", s(file));
    let mut a = vec![
        file_arg.as_str(),
        "--name=q",
        "--ioengine=libaio",
        "--direct=1",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--randseed=7",
    ];
    a.extend_from_slice(extra);
    let out = run("fio", &a);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("verify: bad"), "fio {extra:?}: {text}");
}

/// Asynchronous direct I/O (FUSE_ASYNC_DIO): fio keeps 32 O_DIRECT requests in flight on the exported file,
/// so the server's threads handle them at once. Every block fio wrote reads back as written (fio's own verify),
/// and the image qemu-img sees afterwards holds exactly what the file showed.
#[test]
fn queued_direct_io_through_fuse_keeps_every_byte() {
    let _turn = one_at_a_time();
    if !usable() || run("fio", &["--version"]).status.code() != Some(0) {
        eprintln!("skipped: needs root, /dev/fuse, loop devices and fio");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Cleanup { mounts: vec![], loops: vec![] };
    let Exported { ov, mp, pid, .. } = export_overlay(d, "64M", &mut c);
    // 4 KiB random writes at queue depth 32 over the first half, then 1 MiB writes at depth 4 over a quarter.
    fio_verified(&mp, &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M"]);
    fio_verified(&mp, &["--rw=write", "--bs=1M", "--iodepth=4", "--offset=40M", "--size=16M"]);
    // What the file shows now, read with O_DIRECT at depth 1.
    let shown = d.join("shown.raw");
    ok("dd", &[&format!("if={}", s(&mp)), &format!("of={}", s(&shown)), "bs=1M", "iflag=direct", "status=none"]);
    ok("umount", &[s(&mp)]);
    c.mounts.clear();
    wait_until("qnbd exits after the unmount", Duration::from_secs(20), || !alive(pid));
    assert_check_clean(&ov, "the overlay after queued direct I/O through FUSE");
    let cmp = ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", s(&ov), s(&shown)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // The untouched gap between the two regions still reads as the base.
    let bytes = std::fs::read(&shown).unwrap();
    assert!(bytes[(32 << 20)..(40 << 20)].iter().all(|&b| b == 0x5a), "the untouched range is the base's");
    assert!(bytes[(40 << 20)..(56 << 20)].iter().any(|&b| b != 0x5a), "fio's sequential writes are there");
}

/// Sets a kernel parameter for a test and puts the old value back when dropped.
struct Param {
    path: &'static Path,
    before: String,
}

impl Drop for Param {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.before.trim());
    }
}

/// Kills the server it watches (SIGKILL) if the test is still running at its deadline.
struct Watchdog {
    pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    fn new(limit: Duration) -> Watchdog {
        let pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, d) = (pid.clone(), done.clone());
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + limit;
            while std::time::Instant::now() < until {
                if d.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let pid = p.load(std::sync::atomic::Ordering::SeqCst);
            if pid != 0 {
                eprintln!("watchdog: the test ran past its limit; killing qnbd {pid}");
                // SAFETY: kill with a pid and a valid signal number.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
        Watchdog { pid, done }
    }

    fn watch(&self, pid: u32) {
        self.pid.store(pid, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `qnbd -v --fuse MP -f qcow2 IMG` in the foreground, its log in `log`; returns once the file is mounted.
fn serve_logged(mp: &Path, img: &Path, log: &Path, extra: &[&str], watchdog: &Watchdog) -> Srv {
    std::fs::write(mp, b"").unwrap();
    let mut cmd = std::process::Command::new(QNBD);
    cmd.args(["-v", "--fuse", s(mp), "-f", "qcow2"]).args(extra).arg(img);
    cmd.stderr(std::fs::File::create(log).unwrap());
    let srv = Srv(cmd.spawn().unwrap());
    watchdog.watch(srv.id());
    wait_until("the export is mounted", Duration::from_secs(20), || std::fs::metadata(mp).is_ok_and(|m| m.len() > 0));
    srv
}

/// FUSE over io_uring (`fuse.enable_uring=Y`, set for this test and put back after): the kernel hands requests
/// to qnbd's rings instead of `/dev/fuse`. Queued direct I/O verifies every block, a filesystem made on a loop
/// device over the file holds its files, the image is clean and holds exactly what the file showed, and the log
/// counts the requests the rings answered. With the parameter off, the same export serves through `/dev/fuse`.
#[test]
fn requests_over_io_uring_keep_every_byte_and_fall_back_to_dev_fuse() {
    let _turn = one_at_a_time();
    if !usable() || run("fio", &["--version"]).status.code() != Some(0) {
        eprintln!("skipped: needs root, /dev/fuse, loop devices and fio");
        return;
    }
    let param = Path::new("/sys/module/fuse/parameters/enable_uring");
    let Ok(before) = std::fs::read_to_string(param) else {
        eprintln!("skipped: this kernel has no FUSE over io_uring ({} is missing)", param.display());
        return;
    };
    let _restore = Param { path: param, before };
    if let Err(e) = std::fs::write(param, "Y") {
        eprintln!("skipped: cannot switch {} on: {e}", param.display());
        return;
    }
    // A broken transport leaves requests waiting in the kernel: the watchdog kills the server then, which fails
    // them (and the test) instead of hanging it.
    let watchdog = Watchdog::new(Duration::from_secs(180));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), "96M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 96M", s(&base)]);
    let ov = d.join("overlay.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&ov)]);
    let mp = d.join("disk.img");
    let log = d.join("qnbd.log");
    let mut c = Cleanup { mounts: vec![], loops: vec![] };
    let mut srv = serve_logged(&mp, &ov, &log, &[], &watchdog);
    c.mounts.push(mp.clone());

    fio_verified(&mp, &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M"]);
    fio_verified(&mp, &["--rw=write", "--bs=1M", "--iodepth=4", "--offset=40M", "--size=16M"]);
    // A filesystem on a loop device over the file, in its last 32 MiB.
    let lo = ok("losetup", &["-f", "--show", "--offset", &(64u64 << 20).to_string(), s(&mp)]).trim().to_string();
    c.loops.push(lo.clone());
    ok("mkfs.ext4", &["-q", "-F", &lo]);
    let m = d.join("m");
    std::fs::create_dir(&m).unwrap();
    ok("mount", &[&lo, s(&m)]);
    c.mounts.push(m.clone());
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    std::fs::write(m.join("f.bin"), &data).unwrap();
    ok("umount", &[s(&m)]);
    c.mounts.pop();
    ok("losetup", &["-d", &lo]);
    c.loops.clear();
    let shown = d.join("shown.raw");
    ok("dd", &[&format!("if={}", s(&mp)), &format!("of={}", s(&shown)), "bs=1M", "iflag=direct", "status=none"]);
    ok("umount", &[s(&mp)]);
    c.mounts.clear();
    let st = srv.wait().unwrap();
    assert!(st.success(), "qnbd ends cleanly after the unmount: {st:?}");

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("FUSE over io_uring: the kernel offered it"), "{text}");
    // (fuser's own second unmount attempt after the unmount warns at -v: not qnbd's.)
    assert!(!text.lines().any(|l| l.contains("WARN") && !l.contains("fuser::mnt")), "no warning: {text}");
    let served = served_over_io_uring(&text);
    // fio alone wrote 8192 blocks of 4 KiB and 16 of 1 MiB, and read them all back.
    assert!(served > 16_000, "{served} requests over io_uring: {text}");
    assert_check_clean(&ov, "the overlay after I/O over io_uring");
    let cmp = ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", s(&ov), s(&shown)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let got = d.join("f.out");
    let fs_image = d.join("fs.raw");
    ok("dd", &[&format!("if={}", s(&shown)), &format!("of={}", s(&fs_image)), "bs=1M", "skip=64", "status=none"]);
    ok("e2fsck", &["-fn", s(&fs_image)]);
    ok("debugfs", &["-R", &format!("dump /f.bin {}", s(&got)), s(&fs_image)]);
    assert!(std::fs::read(&got).unwrap() == data, "the file written through the loop device reads back");

    // A directory mount point over the rings: lookup, readdir, stat, statfs, setattr, and SIGTERM.
    let dm = d.join("dm");
    std::fs::create_dir(&dm).unwrap();
    let mut cmd = std::process::Command::new(QNBD);
    cmd.args(["-v", "--fuse", s(&dm), "-f", "qcow2", s(&ov)]).stderr(std::fs::File::create(&log).unwrap());
    let mut srv = Srv(cmd.spawn().unwrap());
    watchdog.watch(srv.id());
    c.mounts.push(dm.clone());
    let file = dm.join("nbd");
    wait_for(&file);
    let names: Vec<String> =
        std::fs::read_dir(&dm).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["nbd"], "one file in the directory");
    let md = std::fs::metadata(&file).unwrap();
    assert_eq!((md.len(), md.is_file()), (96 << 20, true));
    assert!(std::fs::metadata(dm.join("other")).is_err(), "no other name");
    let df = ok("stat", &["-f", "-c", "%b %S", s(&dm)]);
    assert_eq!(df.trim(), "24576 4096", "statfs: the image's size in 4 KiB blocks");
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    assert!(f.set_len(96 << 20).is_ok(), "truncating to the image's size is allowed");
    assert_eq!(f.set_len(1 << 20).unwrap_err().raw_os_error(), Some(libc::EPERM), "resizing is refused");
    drop(f);
    assert!(std::fs::read(&file).unwrap() == std::fs::read(&shown).unwrap(), "the same bytes");
    // SAFETY: kill with a valid pid and signal number.
    unsafe { libc::kill(srv.id() as i32, libc::SIGTERM) };
    assert!(srv.wait().unwrap().success(), "SIGTERM ends the export cleanly");
    c.mounts.clear();
    assert!(!file.exists(), "unmounted");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("FUSE over io_uring: the kernel offered it"), "{text}");
    let served = served_over_io_uring(&text);
    assert!(served > 20, "{served} requests over io_uring: {text}");

    // Off: the same export through /dev/fuse, nothing said of io_uring.
    std::fs::write(param, "N").unwrap();
    let mut srv = serve_logged(&mp, &ov, &log, &["-r"], &watchdog);
    c.mounts.push(mp.clone());
    let bytes = std::fs::read(&mp).unwrap();
    assert!(bytes == std::fs::read(&shown).unwrap(), "the same bytes through /dev/fuse");
    ok("umount", &[s(&mp)]);
    c.mounts.clear();
    assert!(srv.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("io_uring"), "{text}");
}

/// The count qnbd logs at exit ("FUSE export: N requests served over io_uring").
fn served_over_io_uring(log: &str) -> u64 {
    log.lines()
        .find_map(|l| l.split("FUSE export: ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count of requests served over io_uring in the log: {log}"))
}
