//! Helpers shared by the integration tests that drive qnbd and the real tools.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The qnbd binary under test.
pub const QNBD: &str = env!("CARGO_BIN_EXE_qnbd");

/// Runs a tool (system python and nbdsh first in PATH).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a tool that must succeed; its standard output.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Waits (bounded) until `cond` holds.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `path` exists.
pub fn wait_for(path: &Path) {
    wait_until(&format!("{} appears", path.display()), Duration::from_secs(10), || path.exists());
}

/// Whether process `pid` is still alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// A child process killed when the test ends, even by a panic.
pub struct Srv(pub Child);

impl std::ops::Deref for Srv {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Srv {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qemu-img check` finds the image clean (exit 0); `what` says which case failed.
pub fn assert_check_clean(img: &Path, what: &str) {
    let chk = run("qemu-img", &["check", s(img)]);
    assert_eq!(
        chk.status.code(),
        Some(0),
        "{what}: {}{}",
        String::from_utf8_lossy(&chk.stdout),
        String::from_utf8_lossy(&chk.stderr)
    );
}

/// md5 of a file, as md5sum prints it.
pub fn md5(path: &Path) -> String {
    ok("md5sum", &[s(path)]).split_whitespace().next().unwrap_or_default().to_string()
}

/// Waits until no process runs with `needle` in its command line: after SIGKILL, qnbd's commit helper (a fork
/// of the server, with the same command line) may still be finishing the last metadata batch.
pub fn wait_gone(needle: &str) {
    wait_until(&format!("processes with '{needle}' exit"), Duration::from_secs(10), || pids_with(needle).is_empty());
}

/// The pids of the processes with `needle` in their command line (a zombie's is empty).
pub fn pids_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Spawns `cmd` (its standard error captured) and waits, bounded, until it listens on the unix socket `sock`;
/// a server that exits first fails the test with its error output.
pub fn spawn_listening(mut cmd: std::process::Command, sock: &Path) -> Srv {
    let what = format!("{cmd:?}");
    let child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut srv = Srv(child);
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = srv.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = srv.0.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("{what} exited ({st}): {err}");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    srv
}
