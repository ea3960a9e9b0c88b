//! Image locks compatible with qemu's (`block/file-posix.c`, "raw_apply_lock_bytes" and
//! "raw_check_lock_bytes"): open-file-description byte-range locks on the image file itself.
//!
//! qemu describes a user of a file by the permissions it takes (`perm`) and the ones it does not let others
//! take (`unshared`). For permission bit `i` it holds a shared (read) lock on byte `100 + i` while it has the
//! permission, and on byte `200 + i` while it refuses to share it. Before using the file it checks that nobody
//! else refuses what it wants (a write lock on `200 + i` would conflict) and that nobody else has what it
//! refuses (a write lock on `100 + i` would conflict). Every lock is a read lock, so taking one never waits and
//! the checks are what fail.
//!
//! What qemu 10 takes, seen in `/proc/locks` (and what qnbd therefore takes): the file of a qcow2 image,
//! writable: perm {consistent read, write, resize}, unshared {write, resize}; read-only: perm {consistent
//! read}, unshared {write, resize}; a raw image as the served node: perm {consistent read (, write)}, unshared
//! {resize}; a raw backing file: perm {consistent read}, nothing unshared; `force-share`: perm {consistent
//! read}, nothing unshared.

use crate::error::{Error, ErrorKind, Result};
use std::os::fd::AsFd;

/// A set of qemu block permissions (`BLK_PERM_*`, bit `i` locks byte `100 + i` / `200 + i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(pub u8);

impl Perms {
    /// `BLK_PERM_CONSISTENT_READ`.
    pub const CONSISTENT_READ: Perms = Perms(1);
    /// `BLK_PERM_WRITE`.
    pub const WRITE: Perms = Perms(2);
    /// `BLK_PERM_WRITE_UNCHANGED`.
    pub const WRITE_UNCHANGED: Perms = Perms(4);
    /// `BLK_PERM_RESIZE`.
    pub const RESIZE: Perms = Perms(8);
    /// No permission.
    pub const NONE: Perms = Perms(0);

    /// The union.
    pub const fn with(self, o: Perms) -> Perms {
        Perms(self.0 | o.0)
    }

    fn has(self, bit: u8) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// qemu's names of the permissions, by bit.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// `RAW_LOCK_PERM_BASE` and `RAW_LOCK_SHARED_BASE`.
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// How an image file is used, in qemu's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Use {
    /// What we take.
    pub perm: Perms,
    /// What we refuse others.
    pub unshared: Perms,
}

impl Use {
    /// The file of a qcow2 image (or its external data file).
    pub fn qcow2(writable: bool) -> Use {
        let perm = if writable {
            Perms::CONSISTENT_READ.with(Perms::WRITE).with(Perms::RESIZE)
        } else {
            Perms::CONSISTENT_READ
        };
        Use { perm, unshared: Perms::WRITE.with(Perms::RESIZE) }
    }

    /// A raw image that is the top of what is served or read.
    pub fn raw_top(writable: bool) -> Use {
        let perm = if writable { Perms::CONSISTENT_READ.with(Perms::WRITE) } else { Perms::CONSISTENT_READ };
        Use { perm, unshared: Perms::RESIZE }
    }

    /// A read-only user that shares everything (a raw backing file, `force-share`).
    pub fn shared_reader() -> Use {
        Use { perm: Perms::CONSISTENT_READ, unshared: Perms::NONE }
    }
}

fn flock(ty: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = ty;
    f.l_whence = libc::SEEK_SET as libc::c_short;
    f.l_start = start;
    f.l_len = 1;
    f
}

/// Whether another open file description holds a lock on `byte` that a write lock would conflict with.
fn taken_by_other(fd: &impl AsFd, byte: i64) -> std::io::Result<bool> {
    let mut f = flock(libc::F_WRLCK as libc::c_short, byte);
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut f)).map_err(std::io::Error::from)?;
    Ok(f.l_type != libc::F_UNLCK as libc::c_short)
}

fn lock_byte(fd: &impl AsFd, byte: i64) -> std::io::Result<()> {
    let f = flock(libc::F_RDLCK as libc::c_short, byte);
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&f)).map(|_| ()).map_err(std::io::Error::from)
}

/// Takes the locks of `u` on `fd` (the file `name`) and checks nobody conflicts, as qemu does. The locks last
/// as long as the file description: closing the file releases them. A file system without OFD locks
/// (EINVAL, ENOTSUP, ENOLCK) is used unlocked, as qemu's `locking=auto` does.
pub fn apply(fd: &impl AsFd, u: Use, name: &str) -> Result<()> {
    let unsupported =
        |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::ENOLCK));
    let io = |e: std::io::Error| Error::io(format!("Failed to lock '{name}'"), e);
    for bit in 0..NAMES.len() as u8 {
        for (set, base) in [(u.perm, PERM_BASE), (u.unshared, SHARED_BASE)] {
            if set.has(bit) {
                if let Err(e) = lock_byte(fd, base + i64::from(bit)) {
                    return if unsupported(&e) { Ok(()) } else { Err(io(e)) };
                }
            }
        }
    }
    let busy = |what: String| {
        Error::new(
            ErrorKind::Locked,
            format!("Failed to get {what} lock\nIs another process using the image [{name}]?"),
        )
    };
    for (bit, perm_name) in NAMES.iter().enumerate() {
        if u.perm.has(bit as u8) && taken_by_other(fd, SHARED_BASE + bit as i64).map_err(io)? {
            return Err(busy(format!("\"{perm_name}\"")));
        }
    }
    for (bit, perm_name) in NAMES.iter().enumerate() {
        if u.unshared.has(bit as u8) && taken_by_other(fd, PERM_BASE + bit as i64).map_err(io)? {
            return Err(busy(format!("shared \"{perm_name}\"")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn a_writer_and_a_reader_of_a_qcow2_file_exclude_each_other() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let (a, b, c) = (open(&p), open(&p), open(&p));
        apply(&a, Use::qcow2(true), "x").unwrap();
        let e = apply(&b, Use::qcow2(false), "x").unwrap_err();
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock\nIs another process using the image [x]?");
        assert_eq!(e.kind(), ErrorKind::Locked);
        // Sharing readers still get in.
        apply(&c, Use::shared_reader(), "x").unwrap();
        drop(a);
        drop(b);
        let b = open(&p);
        apply(&b, Use::qcow2(false), "x").unwrap();
        let w = open(&p);
        let e = apply(&w, Use::qcow2(true), "x").unwrap_err();
        assert!(e.to_string().starts_with("Failed to get \"write\" lock"), "{e}");
    }

    #[test]
    fn raw_writers_share_writes_but_not_resize() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let (a, b, c) = (open(&p), open(&p), open(&p));
        apply(&a, Use::raw_top(true), "r").unwrap();
        apply(&b, Use::raw_top(true), "r").unwrap();
        let e = apply(&c, Use::qcow2(true), "r").unwrap_err();
        assert!(e.to_string().starts_with("Failed to get \"resize\" lock"), "{e}");
    }
}
