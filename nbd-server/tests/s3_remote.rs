//! Base images in object storage, against a real S3 endpoint: a single-node Ceph cluster with radosgw
//! (`scripts/ceph-rgw.sh`), started and stopped by this test. No mock.
//!
//! One test function, since the cluster's ports are fixed: publishing with qimg, 50 overlays served by three
//! qnbd processes with separate cache folders, qemu-img compare over NBD, GET counts checked against radosgw's
//! usage log, then the faults (gateway down, qnbd killed, object replaced) and the other ways in (qemu-style
//! options, `~/.aws` files, `http://`).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const KEY: &str = "TESTACCESSKEY0000001";
const SECRET: &str = "testsecretkey000000000000000000000000001";
const ENDPOINT: &str = "http://127.0.0.1:7480";
const SIZE: u64 = 48 << 20;

/// qimg, built with this workspace's tests (`cargo test --workspace` builds every binary of the workspace).
fn qimg_path() -> String {
    let q = Path::new(QNBD).with_file_name("qimg");
    assert!(q.exists(), "{} is missing: run the tests with cargo test --workspace", q.display());
    s(&q).to_string()
}
const CHUNK: u64 = 64 << 10;

/// The cluster, stopped when the test ends (also by a panic).
struct Rgw {
    dir: PathBuf,
}

fn script() -> String {
    format!("{}/../scripts/ceph-rgw.sh", env!("CARGO_MANIFEST_DIR"))
}

impl Rgw {
    fn start(dir: &Path) -> Rgw {
        let _ = std::fs::remove_dir_all(dir);
        let o = Command::new(script()).args(["start", s(dir)]).env("OBJECTSTORE", "bluestore").output().unwrap();
        assert!(
            o.status.success(),
            "ceph-rgw.sh start: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Rgw { dir: dir.to_path_buf() }
    }

    /// Stops radosgw alone (the gateway going away under a running server).
    fn stop_gateway(&self) {
        let pid = std::fs::read_to_string(self.dir.join("run/client.rgw.a.pid")).unwrap();
        let pid: i32 = pid.trim().parse().unwrap();
        // SAFETY: plain kill(2) of the gateway's pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_until("radosgw exits", Duration::from_secs(20), || !alive(pid as u32));
        let _ = std::fs::remove_file(self.dir.join("run/client.rgw.a.pid"));
    }

    fn restart(&self) {
        let o = Command::new(script()).args(["start", s(&self.dir)]).output().unwrap();
        assert!(o.status.success(), "ceph-rgw.sh start (restart): {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Successful `get_obj` operations (GETs and HEADs) radosgw has logged for the test user.
    fn get_obj_ops(&self) -> u64 {
        let out = Command::new("radosgw-admin")
            .args(["-c", s(&self.dir.join("ceph.conf")), "usage", "show", "--uid=test"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("usage show JSON");
        let mut n = 0;
        for e in v["entries"].as_array().into_iter().flatten() {
            for b in e["buckets"].as_array().into_iter().flatten() {
                for c in b["categories"].as_array().into_iter().flatten() {
                    if c["category"] == "get_obj" {
                        n += c["successful_ops"].as_u64().unwrap_or(0);
                    }
                }
            }
        }
        n
    }

    /// The usage log once it stops moving (radosgw flushes it every second).
    fn settled_get_obj_ops(&self) -> u64 {
        let mut last = self.get_obj_ops();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(1500));
            let now = self.get_obj_ops();
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("radosgw's usage log kept moving");
    }
}

impl Drop for Rgw {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["stop", s(&self.dir)]).output();
    }
}

/// curl with the test user's signature (bucket creation, raw object access: things qimg does not do).
fn s3curl(args: &[&str]) -> std::process::Output {
    let mut c = Command::new("curl");
    c.args(["-sS", "-f", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "--aws-sigv4", "aws:amz:us-east-1:s3"])
        .args(["--user", &format!("{KEY}:{SECRET}")])
        .args(args);
    let o = c.output().unwrap();
    assert!(o.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// A command with the S3 settings in the environment and the given cache folder.
fn with_env(cmd: impl AsRef<std::ffi::OsStr>, cache: &Path) -> Command {
    let mut c = Command::new(cmd);
    c.env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_ENDPOINT_URL", ENDPOINT)
        .env("QNBD_CACHE_DIR", cache)
        .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    c
}

fn must(mut c: Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A raw disk with pseudo-random data in about half of its 64 KiB clusters and zeros elsewhere.
fn make_raw(path: &Path, seed: u64) {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = vec![0u8; SIZE as usize];
    for c in v.chunks_mut(CHUNK as usize) {
        if next() % 2 == 0 {
            for w in c.chunks_mut(8) {
                w.copy_from_slice(&next().to_le_bytes()[..w.len()]);
            }
        }
    }
    std::fs::write(path, v).unwrap();
}

/// Random 64 KiB reads at 4 KiB-aligned offsets on each export, compared with the raw file (libnbd's Python
/// binding).
const RANDOM_READS: &str = r#"
import nbd, random, sys
sock, raw, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = open(raw, 'rb').read()
rnd = random.Random(seed)
for name in sys.argv[5:]:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    for _ in range(n):
        off = rnd.randrange(0, len(data) - 65536) // 4096 * 4096
        got = h.pread(65536, off)
        if got != data[off:off + 65536]:
            sys.exit("mismatch in export %s at %d" % (name, off))
    h.shutdown()
"#;

/// What qnbd reported at exit: (GETs, chunks, fetched again, failed, HEADs).
fn report(stderr: &str) -> (u64, u64, u64, u64, u64) {
    let line =
        stderr.lines().find(|l| l.contains("remote fetches:")).unwrap_or_else(|| panic!("no report in {stderr}"));
    let nums: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[2], nums[3], nums[4], nums[5])
}

/// Stops a server with SIGTERM and returns its standard error.
fn stop(mut srv: Srv) -> String {
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(srv.id() as i32, libc::SIGTERM) };
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut e) = srv.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let st = srv.0.wait().unwrap();
    assert!(st.success(), "qnbd exit {st}: {err}");
    err
}

/// Chunks the cache folder maps (the one object version in it).
fn mapped(cache: &Path) -> (Vec<u8>, PathBuf) {
    let map = std::fs::read_dir(cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "map"))
        .expect("a cache map");
    (std::fs::read(&map).unwrap(), map.with_extension("data"))
}

fn serve(cache: &Path, sock: &Path, args: &[&str]) -> Srv {
    let mut c = with_env(QNBD, cache);
    c.args(["-t", "-e", "0", "-k", s(sock)]).args(args).stdout(Stdio::null());
    spawn_listening(c, sock)
}

#[test]
fn s3_base_images_through_radosgw() {
    if !Path::new("/usr/bin/radosgw").exists() {
        panic!("radosgw is not installed: scripts/test-all.sh installs ceph-mon, ceph-osd and radosgw");
    }
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n);
    let rgw = Rgw::start(Path::new("/var/tmp/qnbd-rgw-test"));
    s3curl(&["-X", "PUT", &format!("{ENDPOINT}/images")]);

    // Publish: qimg converts a local raw disk straight to s3://, compressed.
    make_raw(&p("base.raw"), 7);
    let qcache = p("qimg-cache");
    let mut c = with_env(qimg_path(), &qcache);
    c.args(["convert", "-c", "-O", "qcow2", s(&p("base.raw")), "s3://images/base.qcow2"]);
    must(c);
    s3curl(&["-o", s(&p("base.qcow2")), &format!("{ENDPOINT}/images/base.qcow2")]);
    ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&p("base.raw")), s(&p("base.qcow2"))]);
    let obj_len = std::fs::metadata(p("base.qcow2")).unwrap().len();
    let obj_chunks = obj_len.div_ceil(CHUNK);

    // qimg info, map, check and compare read the remote image as qemu-img reads the downloaded copy.
    let q = |args: &[&str]| {
        let mut c = with_env(qimg_path(), &qcache);
        c.args(args);
        must(c)
    };
    let rmap = q(&["map", "--output=json", "s3://images/base.qcow2"]);
    assert_eq!(rmap, ok("qemu-img", &["map", "--output=json", s(&p("base.qcow2"))]));
    let rcheck = q(&["check", "s3://images/base.qcow2"]);
    assert!(rcheck.contains("No errors were found"), "{rcheck}");
    assert!(q(&["compare", "s3://images/base.qcow2", s(&p("base.raw"))]).contains("identical"));
    let info: serde_json::Value =
        serde_json::from_str(&q(&["info", "--output=json", "s3://images/base.qcow2"])).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], SIZE);
    assert_eq!(info["children"][0]["info"]["format"], "s3");

    // 50 overlays on the S3 base (qimg create checks the base through the cache too).
    let overlays: Vec<PathBuf> = (0..50).map(|i| p(&format!("ov{i}.qcow2"))).collect();
    for ov in &overlays {
        q(&["create", "-q", "-f", "qcow2", "-b", "s3://images/base.qcow2", "-F", "qcow2", s(ov)]);
    }

    // Three "hosts": three qnbd processes, each with its own cache folder, serving every third overlay.
    let before = rgw.settled_get_obj_ops();
    let mut servers = Vec::new();
    for h in 0..3 {
        let mut args: Vec<String> = Vec::new();
        for (i, ov) in overlays.iter().enumerate().filter(|(i, _)| i % 3 == h) {
            args.extend(["-x".to_string(), format!("ov{i}"), s(ov).to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (cache, sock) = (p(&format!("cache{h}")), p(&format!("host{h}.sock")));
        servers.push((serve(&cache, &sock, &args), cache, sock));
    }
    // Random reads first (a cold cache, many exports sharing one base), then every byte of every export.
    let raw = p("base.raw");
    for (h, (_, _, sock)) in servers.iter().enumerate() {
        let names: Vec<String> = (0..50).filter(|i| i % 3 == h).map(|i| format!("ov{i}")).collect();
        let mut args = vec!["-c", RANDOM_READS, s(sock), s(&raw), "40", "1"];
        args.extend(names.iter().map(String::as_str));
        ok("/usr/bin/python3", &args);
    }
    for (h, (_, _, sock)) in servers.iter().enumerate() {
        for i in (0..50).filter(|i| i % 3 == h) {
            let uri = format!("nbd+unix:///ov{i}?socket={}", s(sock));
            ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &uri, s(&p("base.raw"))]);
        }
    }
    // A write lands in its overlay only.
    let uri0 = format!("nbd+unix:///ov0?socket={}", s(&servers[0].2));
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x6b 1M 64k", &uri0]);
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x6b 1M 64k", &uri0]);
    let uri3 = format!("nbd+unix:///ov3?socket={}", s(&servers[0].2));
    ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &uri3, s(&p("base.raw"))]);

    let mut total = 0;
    for (srv, cache, _) in servers {
        let err = stop(srv);
        let (gets, chunks, again, failed, heads) = report(&err);
        let (map, data) = mapped(&cache);
        let ones = map.iter().filter(|&&b| b == 1).count() as u64;
        // Each chunk of the base fetched at most once per cache folder, and the whole base was read.
        assert_eq!((again, failed), (0, 0), "{err}");
        assert_eq!(chunks, ones, "chunks fetched against chunks mapped: {err}");
        assert!(chunks <= obj_chunks, "{chunks} chunks fetched of {obj_chunks}: {err}");
        assert!(gets <= chunks, "{err}");
        assert_eq!(heads, 1, "one HEAD per base and process: {err}");
        // Every mapped chunk holds the object's bytes.
        let (want, got) = (std::fs::read(p("base.qcow2")).unwrap(), std::fs::read(data).unwrap());
        for (c, &m) in map.iter().enumerate() {
            if m == 1 {
                let r = c * CHUNK as usize..((c + 1) * CHUNK as usize).min(want.len());
                assert!(want[r.clone()] == got[r], "cached chunk {c} differs");
            }
        }
        total += gets + heads;
    }
    // radosgw counted exactly the requests the three servers reported.
    assert_eq!(rgw.settled_get_obj_ops() - before, total);
    let chk = q(&["check", s(&overlays[0])]);
    assert!(chk.contains("No errors were found"), "{chk}");

    faults(&rgw, t.path(), obj_len);
    other_ways_in(t.path());
}

/// The gateway stopped and restarted under a running server; a killed server's cache reused; an object
/// replaced under a running server.
fn faults(rgw: &Rgw, dir: &Path, obj_len: u64) {
    let p = |n: &str| dir.join(n);
    let base_uri = |sock: &Path| format!("nbd+unix:///?socket={}", s(sock));
    let read = |sock: &Path, off: u64, len: u64| {
        run(
            "nbdsh",
            &[
                "-u",
                &base_uri(sock),
                "-c",
                &format!(
                    "assert h.pread({len}, {off}) == open({:?}, 'rb').read()[{off}:{}]",
                    s(&p("base.raw")),
                    off + len
                ),
            ],
        )
    };

    // Gateway down: cached reads served, uncached reads fail with EIO, all recovers after the restart.
    let (cache, sock) = (p("cache-down"), p("down.sock"));
    let srv = serve(&cache, &sock, &["-r", "s3://images/base.qcow2"]);
    assert!(read(&sock, 0, 8 << 20).status.success());
    rgw.stop_gateway();
    let cached = read(&sock, 0, 8 << 20);
    assert!(cached.status.success(), "cached read with the gateway down: {}", String::from_utf8_lossy(&cached.stderr));
    let cold = read(&sock, 40 << 20, 1 << 20);
    assert!(!cold.status.success(), "an uncached read with the gateway down succeeded");
    let e = String::from_utf8_lossy(&cold.stderr);
    assert!(e.contains("EIO") || e.contains("Input/output error"), "{e}");
    rgw.restart();
    let warm = read(&sock, 40 << 20, 1 << 20);
    assert!(warm.status.success(), "after the restart: {}", String::from_utf8_lossy(&warm.stderr));
    let err = stop(srv);
    assert!(report(&err).3 > 0, "failed GETs are counted: {err}");

    // A server killed while it fetches: the next one uses what the cache maps, and never a partial range.
    let (cache, sock) = (p("cache-kill"), p("kill.sock"));
    let srv = serve(&cache, &sock, &["-r", "s3://images/base.qcow2"]);
    let mut reader = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &base_uri(&sock), s(&p("base.raw"))])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed as soon as the cache maps something (while it is still fetching the rest, usually).
    wait_until("the first chunks mapped", Duration::from_secs(20), || {
        std::fs::read_dir(&cache).into_iter().flatten().filter_map(|e| e.ok()).any(|e| {
            e.path().extension().is_some_and(|x| x == "map") && std::fs::read(e.path()).is_ok_and(|m| m.contains(&1))
        })
    });
    let mut srv = srv;
    let _ = srv.0.kill();
    let _ = srv.0.wait();
    let _ = reader.kill();
    let _ = reader.wait();
    let (map, data) = mapped(&cache);
    let before: u64 = map.iter().filter(|&&b| b == 1).count() as u64;
    eprintln!("killed with {before} of {} chunks mapped", map.len());
    let (want, got) = (std::fs::read(p("base.qcow2")).unwrap(), std::fs::read(&data).unwrap());
    for (c, &m) in map.iter().enumerate() {
        if m == 1 {
            let r = c * CHUNK as usize..((c + 1) * CHUNK as usize).min(want.len());
            assert!(want[r.clone()] == got[r], "chunk {c} mapped by a killed server differs");
        }
    }
    let srv = serve(&cache, &sock, &["-r", "s3://images/base.qcow2"]);
    ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &base_uri(&sock), s(&p("base.raw"))]);
    let err = stop(srv);
    let (_, chunks, again, _, _) = report(&err);
    assert_eq!(again, 0, "{err}");
    assert!(
        chunks + before <= obj_len.div_ceil(CHUNK),
        "the second server fetched again what the first mapped: {before} mapped, {chunks} fetched: {err}"
    );

    // The object replaced under a running server: uncached reads fail with a clear error; a new server
    // serves the new version from a new cache entry.
    let (cache, sock) = (p("cache-replace"), p("replace.sock"));
    let srv = serve(&cache, &sock, &["-r", "s3://images/base.qcow2"]);
    assert!(read(&sock, 0, 1 << 20).status.success());
    make_raw(&p("other.raw"), 99);
    let mut c = with_env(qimg_path(), &p("qimg-cache"));
    c.args(["convert", "-c", "-O", "qcow2", s(&p("other.raw")), "s3://images/base.qcow2"]);
    must(c);
    assert!(!read(&sock, 40 << 20, 1 << 20).status.success(), "a read of the replaced object succeeded");
    let err = stop(srv);
    assert!(err.contains("changed after it was opened"), "{err}");
    let srv = serve(&cache, &sock, &["-r", "s3://images/base.qcow2"]);
    ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &base_uri(&sock), s(&p("other.raw"))]);
    drop(srv);
    let maps = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "map"))
        .count();
    assert_eq!(maps, 2, "one cache entry per object version");
    // Put the original back for what follows.
    let mut c = with_env(qimg_path(), &p("qimg-cache"));
    c.args(["convert", "-c", "-O", "qcow2", s(&p("base.raw")), "s3://images/base.qcow2"]);
    must(c);
    // Over its size limit, the cache drops the versions no process has open, and keeps the one in use.
    let mut c = with_env(qimg_path(), &cache);
    c.env("QNBD_CACHE_SIZE", "1k").args(["compare", "s3://images/base.qcow2", s(&p("base.raw"))]);
    must(c);
    let left: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.iter().filter(|n| n.ends_with(".map")).count(), 1, "{left:?}");
    assert_eq!(left.iter().filter(|n| n.ends_with(".data")).count(), 1, "{left:?}");
}

/// A cache folder on a full file system (a 256 KiB tmpfs): reads are served from the fetched bytes, correct,
/// and the cache keeps what fits.
fn full_cache_disk(dir: &Path) {
    let full = dir.join("cache-full");
    std::fs::create_dir_all(&full).unwrap();
    ok("mount", &["-t", "tmpfs", "-o", "size=256k", "tmpfs", s(&full)]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(full.clone());
    let o = with_env(qimg_path(), &full)
        .args(["compare", "s3://images/base.qcow2", s(&dir.join("base.raw"))])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "compare with a full cache disk: {e}{}", String::from_utf8_lossy(&o.stdout));
    assert!(e.contains("served without being kept"), "{e}");
}

/// `--fork`: the server goes on in a child process, which makes its own remote client.
fn forked(dir: &Path) {
    let (cache, sock, pid) = (dir.join("cache-fork"), dir.join("fork.sock"), dir.join("fork.pid"));
    let mut c = with_env(QNBD, &cache);
    c.args(["--fork", "-r", "-t", "--pid-file", s(&pid), "-k", s(&sock), "s3://images/base.qcow2"]);
    must(c);
    wait_for(&pid);
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    let r = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &uri, s(&dir.join("base.raw"))]);
    let pid: i32 = std::fs::read_to_string(&pid).unwrap().trim().parse().unwrap();
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("the forked server exits", Duration::from_secs(20), || !alive(pid as u32));
    assert!(r.status.success(), "{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
}

/// qemu-style options, the shared AWS files, a public http:// URL, and the refusals.
fn other_ways_in(dir: &Path) {
    full_cache_disk(dir);
    forked(dir);
    let p = |n: &str| dir.join(n);
    // --image-opts with the endpoint and keys given there (nothing in the environment).
    let (cache, sock) = (p("cache-opts"), p("opts.sock"));
    let mut c = Command::new(QNBD);
    c.env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY").env_remove("AWS_ENDPOINT_URL");
    c.args(["-r", "-t", "--cache-dir", s(&cache), "-k", s(&sock), "--image-opts"]).arg(format!(
        "driver=qcow2,file.driver=s3,file.bucket=images,file.key=base.qcow2,file.endpoint={ENDPOINT},\
         file.access-key-id={KEY},file.secret-access-key={SECRET}"
    ));
    let srv = spawn_listening(c, &sock);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &format!("nbd+unix:///?socket={}", s(&sock)), s(&p("base.raw"))],
    );
    drop(srv);

    // ~/.aws/credentials and ~/.aws/config.
    let home = p("home");
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    std::fs::write(
        home.join(".aws/credentials"),
        format!("[default]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n"),
    )
    .unwrap();
    std::fs::write(home.join(".aws/config"), format!("[default]\nregion = us-east-1\nendpoint_url = {ENDPOINT}\n"))
        .unwrap();
    let o = Command::new(qimg_path())
        .env("HOME", &home)
        .env("QNBD_CACHE_DIR", p("cache-home"))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_ENDPOINT_URL")
        .args(["compare", "s3://images/base.qcow2", s(&p("base.raw"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "with ~/.aws files: {}", String::from_utf8_lossy(&o.stderr));

    // A public object by plain URL, as a backing file too.
    let url = format!("{ENDPOINT}/images/public.qcow2");
    s3curl(&["-T", s(&p("base.qcow2")), "-H", "x-amz-acl: public-read", &url]);
    let o = Command::new(qimg_path())
        .env("QNBD_CACHE_DIR", p("cache-http"))
        .args(["compare", &url, s(&p("base.raw"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "http:// image: {}", String::from_utf8_lossy(&o.stderr));
    let ov = p("http-ov.qcow2");
    let o = Command::new(qimg_path())
        .env("QNBD_CACHE_DIR", p("cache-http"))
        .args(["create", "-q", "-f", "qcow2", "-b", &url, "-F", "qcow2", s(&ov)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(qimg_path())
        .env("QNBD_CACHE_DIR", p("cache-http"))
        .args(["compare", s(&ov), s(&p("base.raw"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Refusals, by name: writing a remote image, a missing object, a bad name.
    let o =
        Command::new(QNBD).env("QNBD_CACHE_DIR", p("cache-http")).args(["-k", s(&p("w.sock")), &url]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("remote images are read-only"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = with_env(qimg_path(), &p("cache-http")).args(["info", "s3://images/nothing.qcow2"]).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.trim(), "qimg: Could not open 's3://images/nothing.qcow2': no such object");
    let o = Command::new(qimg_path()).args(["info", "s3://bucket-only"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected s3://BUCKET/KEY"));
}
