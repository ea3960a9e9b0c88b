//! The commit helper: metadata commits that survive the death of the process.
//!
//! A metadata commit is a short sequence of writes and syncs whose order the rules in [`super`] fix. If the
//! process is killed in the middle (kill -9), the writes issued so far persist and the rest never happen: between the refcount
//! blocks and the L2 tables that is a window of leaked clusters. To close it, a server can install a
//! *commit helper*: a child process, forked while the process is still single-threaded, that shares the
//! image file descriptors. A whole batch is handed to it before any of it is applied, and the helper applies
//! it to the end even if the server dies meanwhile. A batch cut short (the server died while sending it) is
//! dropped whole. Without a helper (qimg, tests), batches run in the calling thread.

use crate::error::{Error, ErrorKind, Result};
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::{Mutex, OnceLock};

/// One step of a metadata commit.
#[derive(Debug, Clone)]
pub enum Op {
    /// Write `data` at `offset` of file descriptor `fd`.
    Write {
        /// File descriptor.
        fd: i32,
        /// Offset.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// fdatasync(`fd`).
    Sync {
        /// File descriptor.
        fd: i32,
    },
}

struct Helper {
    /// To the helper and back; `None` once [`shutdown_helper`] has let it go (commits then run in the caller).
    pipes: Mutex<Option<(std::fs::File, std::fs::File)>>,
    /// (fd, dev, ino) of every regular file open when the helper was forked: only those can be committed.
    fds: Vec<(i32, u64, u64)>,
    /// The helper's process id.
    pid: libc::pid_t,
}

static HELPER: OnceLock<Helper> = OnceLock::new();

fn fd_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat writes into the stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstat(fd, &mut st) };
    (r == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFREG).then_some((st.st_dev, st.st_ino))
}

fn apply(ops: &[Op]) -> std::result::Result<(), i32> {
    for op in ops {
        match op {
            Op::Write { fd, offset, data } => {
                let mut done = 0usize;
                while done < data.len() {
                    // SAFETY: pwrite reads `len` bytes from a live slice.
                    let r = unsafe {
                        libc::pwrite(
                            *fd,
                            data[done..].as_ptr() as *const libc::c_void,
                            data.len() - done,
                            (*offset + done as u64) as libc::off_t,
                        )
                    };
                    if r < 0 {
                        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                        if e == libc::EINTR {
                            continue;
                        }
                        return Err(e);
                    }
                    done += r as usize;
                }
            }
            // SAFETY: fdatasync on a descriptor; no memory involved.
            Op::Sync { fd } => {
                if unsafe { libc::fdatasync(*fd) } != 0 {
                    return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
                }
            }
        }
    }
    Ok(())
}

fn encode(ops: &[Op]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        match op {
            Op::Write { fd, offset, data } => {
                v.push(1);
                v.extend_from_slice(&fd.to_le_bytes());
                v.extend_from_slice(&offset.to_le_bytes());
                v.extend_from_slice(&(data.len() as u32).to_le_bytes());
                v.extend_from_slice(data);
            }
            Op::Sync { fd } => {
                v.push(2);
                v.extend_from_slice(&fd.to_le_bytes());
            }
        }
    }
    v
}

/// Reads one whole batch; `None` at EOF or on a batch cut short.
fn decode(r: &mut impl Read) -> Option<Vec<Op>> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n).ok()?;
    let n = u32::from_le_bytes(n);
    let mut ops = Vec::with_capacity(n.min(4096) as usize);
    for _ in 0..n {
        let mut k = [0u8; 5];
        r.read_exact(&mut k).ok()?;
        let fd = i32::from_le_bytes([k[1], k[2], k[3], k[4]]);
        match k[0] {
            1 => {
                let mut h = [0u8; 12];
                r.read_exact(&mut h).ok()?;
                let offset = u64::from_le_bytes(h[0..8].try_into().ok()?);
                let len = u32::from_le_bytes(h[8..12].try_into().ok()?) as usize;
                let mut data = vec![0u8; len];
                r.read_exact(&mut data).ok()?;
                ops.push(Op::Write { fd, offset, data });
            }
            2 => ops.push(Op::Sync { fd }),
            _ => return None,
        }
    }
    Some(ops)
}

/// Forks the commit helper, once, after the images that are to use it are open.
///
/// # Safety
/// The process must have a single thread when this is called (fork copies only the calling thread).
pub unsafe fn install_helper() -> Result<()> {
    let mut fds = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
        for e in rd.flatten() {
            if let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some((dev, ino)) = fd_id(fd) {
                    fds.push((fd, dev, ino));
                }
            }
        }
    }
    let mut to_helper = [0i32; 2];
    let mut from_helper = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the arrays we own. CLOEXEC: no program the server runs
    // inherits them.
    if unsafe { libc::pipe2(to_helper.as_mut_ptr(), libc::O_CLOEXEC) } != 0
        || unsafe { libc::pipe2(from_helper.as_mut_ptr(), libc::O_CLOEXEC) } != 0
    {
        return Err(Error::io("cannot create the commit helper's pipes", std::io::Error::last_os_error()));
    }
    // Remote images opened before this have threads: their cache is brought to rest first (the child keeps
    // no lock a thread of the parent held; it makes its own remote client if it ever needs one).
    crate::remote::quiesce();
    // SAFETY: the caller guarantees no other thread of this process runs code that takes locks the child
    // needs (only the remote runtime's idle workers may exist), so fork is sound.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::io("cannot fork the commit helper", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // The helper: apply whole batches until the server goes away.
        // SAFETY: closing the pipe ends that belong to the parent.
        unsafe {
            libc::close(to_helper[1]);
            libc::close(from_helper[0]);
            // Ignore the signals a terminal or a supervisor sends the server's group.
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            // Let go of the caller's terminal and pipes: whoever waits for their EOF must not wait for us.
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
                if null > 2 {
                    libc::close(null);
                }
            }
        }
        // SAFETY: these descriptors came from pipe() above and are owned here.
        let mut input = std::io::BufReader::new(unsafe { std::fs::File::from_raw_fd(to_helper[0]) });
        let mut output = unsafe { std::fs::File::from_raw_fd(from_helper[1]) };
        while let Some(ops) = decode(&mut input) {
            let code = match apply(&ops) {
                Ok(()) => 0i32,
                Err(e) => e,
            };
            let _ = output.write_all(&code.to_le_bytes());
        }
        // Fault injection for the tests: a helper slow to go, as on a loaded machine.
        if let Some(ms) = std::env::var("QNBD_TEST_HELPER_LINGER_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
            std::thread::sleep(std::time::Duration::from_millis(ms.min(10_000)));
        }
        // SAFETY: leave without running the parent's destructors or atexit handlers.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closing the helper's pipe ends in the parent; wrapping ours.
    let (w, r) = unsafe {
        libc::close(to_helper[0]);
        libc::close(from_helper[1]);
        (std::fs::File::from_raw_fd(to_helper[1]), std::fs::File::from_raw_fd(from_helper[0]))
    };
    let _ = (w.as_raw_fd(), r.as_raw_fd());
    HELPER
        .set(Helper { pipes: Mutex::new(Some((w, r))), fds, pid })
        .map_err(|_| Error::new(ErrorKind::InvalidArgument, "the commit helper is already installed"))
}

/// Runs a metadata commit through the helper, if one is installed and shares every descriptor in it;
/// `None` otherwise (the caller then runs it itself).
pub fn commit_if_installed(ops: &[Op]) -> Option<Result<()>> {
    let h = HELPER.get()?;
    let known = ops.iter().all(|op| {
        let fd = match op {
            Op::Write { fd, .. } | Op::Sync { fd } => *fd,
        };
        fd_id(fd).is_some_and(|(dev, ino)| h.fds.iter().any(|&(f, d, i)| f == fd && d == dev && i == ino))
    });
    if !known {
        return None;
    }
    let Ok(mut g) = h.pipes.lock() else {
        return Some(Err(Error::new(ErrorKind::Io, "commit helper lock poisoned")));
    };
    // Gone (the process is exiting, see `shutdown_helper`): the caller commits itself.
    let (w, r) = g.as_mut()?;
    Some(send(w, r, ops))
}

/// Lets the helper go and waits until it has exited, at most ten seconds: called by a server as its last step
/// before exiting. The helper shares the images' open file descriptions, and with them their locks
/// (`image::lock`); without this wait a user who stops the server (`kill $pid; wait $pid`) and opens the image
/// at once could find it still locked, for as long as the helper takes to notice the server is gone. No commit
/// is in flight when it runs (a commit holds the pipes' lock to its end); any later one runs in its caller.
pub fn shutdown_helper() {
    let Some(h) = HELPER.get() else { return };
    let Ok(mut g) = h.pipes.lock() else { return };
    // Closing the pipe to the helper ends its loop (EOF), and it exits.
    let Some(pipes) = g.take() else { return };
    drop(pipes);
    drop(g);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !exited(h.pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Whether process `pid` has finished exiting (its files closed, their locks with them): reaped here if it is
/// our child; otherwise (`--fork` made the server a grandchild of the helper's parent) gone or a zombie.
fn exited(pid: libc::pid_t) -> bool {
    let mut status = 0;
    // SAFETY: waitpid writes the status into a local.
    match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
        0 => false,
        r if r == pid => true,
        _ => match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name in parentheses.
            Ok(st) => st.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        },
    }
}

fn send(w: &mut std::fs::File, r: &mut std::fs::File, ops: &[Op]) -> Result<()> {
    w.write_all(&encode(ops)).map_err(|e| Error::io("commit helper", e))?;
    let mut code = [0u8; 4];
    r.read_exact(&mut code).map_err(|e| Error::io("commit helper", e))?;
    let code = i32::from_le_bytes(code);
    if code == 0 {
        Ok(())
    } else {
        Err(Error::io("metadata commit", std::io::Error::from_raw_os_error(code)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_short_batches_are_dropped() {
        let ops = vec![Op::Write { fd: 7, offset: 99, data: vec![1, 2, 3] }, Op::Sync { fd: 7 }];
        let b = encode(&ops);
        let back = decode(&mut &b[..]).unwrap();
        assert_eq!(back.len(), 2);
        assert!(matches!(&back[0], Op::Write { fd: 7, offset: 99, data } if data == &[1, 2, 3]));
        assert!(decode(&mut &b[..b.len() - 1]).is_none());
    }
}
