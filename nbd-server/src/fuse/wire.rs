//! The FUSE messages the io_uring transport ([`super::ring`]) reads and writes itself: the request header and
//! the few argument structs a one-file filesystem uses, and the replies. Pure code, no I/O.
//!
//! Layouts are the kernel's `include/uapi/linux/fuse.h` (protocol 7.4x; little-endian on every Linux FUSE
//! host qnbd builds for, written here with `to_le_bytes`/`from_le_bytes` on purpose: `cfg` below refuses a
//! big-endian build). Over io_uring (`fs/fuse/dev_uring.c`, "struct fuse_uring_req_header") a request's header
//! sits in the entry's header buffer: `fuse_in_header` at [`IN_OUT`], the operation's first argument (e.g.
//! `fuse_read_in`) at [`OP_IN`], and `fuse_uring_ent_in_out` at [`ENT_IN_OUT`]; any further arguments (a
//! write's data, a lookup's name) fill the payload buffer. A reply puts `fuse_out_header` at [`IN_OUT`], its
//! argument structs or data in the payload, and their length in `ent_in_out.payload_sz`, which must be exact for
//! fixed-size replies.

#[cfg(target_endian = "big")]
compile_error!("the FUSE wire code assumes a little-endian host");

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `sizeof(struct fuse_uring_req_header)`: the least an entry's header buffer holds.
pub const HEADER_LEN: usize = 288;
/// `in_out`: `fuse_in_header` in a request, `fuse_out_header` in a reply.
pub const IN_OUT: usize = 0;
/// `op_in`: the request's first argument struct.
pub const OP_IN: usize = 128;
const OP_IN_LEN: usize = 128;
/// `ring_ent_in_out`: `{flags u64, commit_id u64, payload_sz u32, padding u32, reserved u64}`.
pub const ENT_IN_OUT: usize = 256;

/// Opcodes (`enum fuse_opcode`) the transport answers other than with `ENOSYS`.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

/// `FATTR_SIZE` in `fuse_setattr_in.valid`.
const FATTR_SIZE: u32 = 1 << 3;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// `struct fuse_in_header` (40 bytes), the fields the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
}

/// A request as the transport dispatches it; `None` fields are absent or malformed arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The name is the payload's first `name_len` bytes.
    Lookup {
        name_len: usize,
    },
    Getattr,
    /// `size`: `Some` when the request changes the size.
    Setattr {
        size: Option<u64>,
    },
    Open {
        flags: i32,
    },
    Read {
        offset: u64,
        size: u32,
    },
    /// The data is the payload's first `len` bytes; `flags`: the file's open flags (O_SYNC/O_DSYNC make the
    /// write durable).
    Write {
        offset: u64,
        len: usize,
        flags: i32,
    },
    Statfs,
    Release,
    Fsync,
    Flush,
    Opendir,
    Readdir {
        offset: u64,
        size: u32,
    },
    Releasedir,
    Destroy,
    /// Takes no reply (FORGET, BATCH_FORGET, INTERRUPT: the kernel sends them through `/dev/fuse` anyway).
    NoReply,
    /// A known operation whose argument was shorter than its struct.
    Malformed,
    /// Anything else: answered `ENOSYS`, as fuser answers what the filesystem does not implement.
    Unsupported(u32),
}

/// Parses the request in an entry's header buffer `h` ([`HEADER_LEN`] bytes) and its payload buffer (of
/// which the kernel filled `ent_in_out.payload_sz` bytes). `None`: the header itself is short.
pub fn parse(h: &[u8], payload: &[u8]) -> Option<(InHeader, Request)> {
    let hdr = InHeader {
        opcode: u32_at(h, IN_OUT + 4)?,
        unique: u64_at(h, IN_OUT + 8)?,
        nodeid: u64_at(h, IN_OUT + 16)?,
        uid: u32_at(h, IN_OUT + 24)?,
    };
    let payload_len = u32_at(h, ENT_IN_OUT + 16)? as usize;
    let payload = payload.get(..payload_len).unwrap_or(payload);
    let a = h.get(OP_IN..OP_IN + OP_IN_LEN)?;
    let req = decode(hdr.opcode, a, payload).unwrap_or(Request::Malformed);
    Some((hdr, req))
}

fn decode(opcode: u32, a: &[u8], payload: &[u8]) -> Option<Request> {
    Some(match opcode {
        op::LOOKUP => {
            // The name, then a NUL.
            Request::Lookup { name_len: payload.iter().position(|&b| b == 0)? }
        }
        op::GETATTR => Request::Getattr,
        op::SETATTR => {
            // fuse_setattr_in: valid u32, padding u32, fh u64, size u64, ...
            let valid = u32_at(a, 0)?;
            Request::Setattr { size: if valid & FATTR_SIZE != 0 { Some(u64_at(a, 16)?) } else { None } }
        }
        op::OPEN => Request::Open { flags: u32_at(a, 0)? as i32 },
        // fuse_read_in / fuse_write_in: fh u64, offset u64, size u32, read/write_flags u32, lock_owner u64,
        // flags u32, padding u32.
        op::READ => Request::Read { offset: u64_at(a, 8)?, size: u32_at(a, 16)? },
        op::WRITE => {
            let len = u32_at(a, 16)? as usize;
            if len > payload.len() {
                return None;
            }
            Request::Write { offset: u64_at(a, 8)?, len, flags: u32_at(a, 32)? as i32 }
        }
        op::STATFS => Request::Statfs,
        op::RELEASE => Request::Release,
        op::FSYNC => Request::Fsync,
        op::FLUSH => Request::Flush,
        op::OPENDIR => Request::Opendir,
        op::READDIR => Request::Readdir { offset: u64_at(a, 8)?, size: u32_at(a, 16)? },
        op::RELEASEDIR => Request::Releasedir,
        op::DESTROY => Request::Destroy,
        op::FORGET | op::BATCH_FORGET | op::INTERRUPT => Request::NoReply,
        other => Request::Unsupported(other),
    })
}

/// Writes `fuse_out_header {len, error, unique}` into the header buffer and `payload_sz` into
/// `ring_ent_in_out`. `error` is 0 or a negative errno; `len` is the header plus the payload, though the
/// kernel does not read it over io_uring.
pub fn put_reply_header(h: &mut [u8], unique: u64, error: i32, payload_len: u32) {
    let len = 16u32.saturating_add(payload_len);
    h[IN_OUT..IN_OUT + 4].copy_from_slice(&len.to_le_bytes());
    h[IN_OUT + 4..IN_OUT + 8].copy_from_slice(&error.to_le_bytes());
    h[IN_OUT + 8..IN_OUT + 16].copy_from_slice(&unique.to_le_bytes());
    h[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&payload_len.to_le_bytes());
}

/// `ring_ent_in_out.commit_id` of the request in the header buffer.
pub fn commit_id(h: &[u8]) -> u64 {
    u64_at(h, ENT_IN_OUT + 8).unwrap_or(0)
}

/// What `struct fuse_attr` says of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    /// atime, mtime and ctime.
    pub time: SystemTime,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

fn secs(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    (d.as_secs(), d.subsec_nanos())
}

/// `struct fuse_attr` (88 bytes).
fn attr_bytes(a: &Attr, out: &mut [u8]) {
    let (s, ns) = secs(a.time);
    out[0..8].copy_from_slice(&a.ino.to_le_bytes());
    out[8..16].copy_from_slice(&a.size.to_le_bytes());
    out[16..24].copy_from_slice(&a.blocks.to_le_bytes());
    for at in [24, 32, 40] {
        out[at..at + 8].copy_from_slice(&s.to_le_bytes());
    }
    for at in [48, 52, 56] {
        out[at..at + 4].copy_from_slice(&ns.to_le_bytes());
    }
    out[60..64].copy_from_slice(&a.mode.to_le_bytes());
    out[64..68].copy_from_slice(&a.nlink.to_le_bytes());
    out[68..72].copy_from_slice(&a.uid.to_le_bytes());
    out[72..76].copy_from_slice(&a.gid.to_le_bytes());
    out[76..80].copy_from_slice(&0u32.to_le_bytes()); // rdev
    out[80..84].copy_from_slice(&a.blksize.to_le_bytes());
    out[84..88].copy_from_slice(&0u32.to_le_bytes()); // flags
}

/// `struct fuse_attr_out` (104 bytes) into `out`; its length.
pub fn attr_out(a: &Attr, ttl: Duration, out: &mut [u8]) -> usize {
    out[..104].fill(0);
    out[0..8].copy_from_slice(&ttl.as_secs().to_le_bytes());
    out[8..12].copy_from_slice(&ttl.subsec_nanos().to_le_bytes());
    attr_bytes(a, &mut out[16..104]);
    104
}

/// `struct fuse_entry_out` (128 bytes, generation 0) into `out`; its length.
pub fn entry_out(a: &Attr, ttl: Duration, out: &mut [u8]) -> usize {
    out[..128].fill(0);
    out[0..8].copy_from_slice(&a.ino.to_le_bytes());
    for at in [16, 24] {
        out[at..at + 8].copy_from_slice(&ttl.as_secs().to_le_bytes());
    }
    for at in [32, 36] {
        out[at..at + 4].copy_from_slice(&ttl.subsec_nanos().to_le_bytes());
    }
    attr_bytes(a, &mut out[40..128]);
    128
}

/// `struct fuse_open_out` (16 bytes: fh 0, `open_flags`) into `out`; its length.
pub fn open_out(open_flags: u32, out: &mut [u8]) -> usize {
    out[..16].fill(0);
    out[8..12].copy_from_slice(&open_flags.to_le_bytes());
    16
}

/// `struct fuse_write_out` (8 bytes) into `out`; its length.
pub fn write_out(written: u32, out: &mut [u8]) -> usize {
    out[..8].fill(0);
    out[0..4].copy_from_slice(&written.to_le_bytes());
    8
}

/// `struct fuse_statfs_out` (80 bytes) into `out`, as fuser's `statfs(blocks, 0, 0, 1, 0, bsize, 255, bsize)`;
/// its length.
pub fn statfs_out(blocks: u64, bsize: u32, out: &mut [u8]) -> usize {
    out[..80].fill(0);
    out[0..8].copy_from_slice(&blocks.to_le_bytes());
    out[24..32].copy_from_slice(&1u64.to_le_bytes()); // files
    out[40..44].copy_from_slice(&bsize.to_le_bytes());
    out[44..48].copy_from_slice(&255u32.to_le_bytes()); // namelen
    out[48..52].copy_from_slice(&bsize.to_le_bytes()); // frsize
    80
}

/// `struct fuse_dirent`s for `entries` (ino, `DT_*` type, name) from index `offset` on, as many as fit in
/// `size` bytes of `out`; the length written. Each entry's `off` is its index plus one.
pub fn dirents(entries: &[(u64, u32, &str)], offset: u64, size: usize, out: &mut [u8]) -> usize {
    let limit = size.min(out.len());
    let mut at = 0usize;
    for (i, (ino, kind, name)) in entries.iter().enumerate() {
        if (i as u64) < offset {
            continue;
        }
        let name = name.as_bytes();
        let len = (24 + name.len()).next_multiple_of(8);
        if at + len > limit {
            break;
        }
        let e = &mut out[at..at + len];
        e.fill(0);
        e[0..8].copy_from_slice(&ino.to_le_bytes());
        e[8..16].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        e[16..20].copy_from_slice(&(name.len() as u32).to_le_bytes());
        e[20..24].copy_from_slice(&kind.to_le_bytes());
        e[24..24 + name.len()].copy_from_slice(name);
        at += len;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: u32, unique: u64, nodeid: u64, uid: u32, op_in: &[u8], payload_len: u32) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&(40u32 + op_in.len() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        h[16..24].copy_from_slice(&nodeid.to_le_bytes());
        h[24..28].copy_from_slice(&uid.to_le_bytes());
        h[OP_IN..OP_IN + op_in.len()].copy_from_slice(op_in);
        h[ENT_IN_OUT + 8..ENT_IN_OUT + 16].copy_from_slice(&unique.to_le_bytes());
        h[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&payload_len.to_le_bytes());
        h
    }

    #[test]
    fn a_write_request_is_read_from_its_argument_and_payload() {
        // fuse_write_in: fh 7, offset 0x10000, size 5, write_flags 0, lock_owner 0, flags O_DSYNC.
        let mut w = [0u8; 40];
        w[0..8].copy_from_slice(&7u64.to_le_bytes());
        w[8..16].copy_from_slice(&0x10000u64.to_le_bytes());
        w[16..20].copy_from_slice(&5u32.to_le_bytes());
        w[32..36].copy_from_slice(&(libc::O_DSYNC as u32).to_le_bytes());
        let h = header(op::WRITE, 42, 1, 1000, &w, 5);
        let payload = b"hello, and stale bytes after the request";
        let (hdr, req) = parse(&h, payload).unwrap();
        assert_eq!(hdr, InHeader { opcode: 16, unique: 42, nodeid: 1, uid: 1000 });
        assert_eq!(req, Request::Write { offset: 0x10000, len: 5, flags: libc::O_DSYNC });
        assert_eq!(commit_id(&h), 42);
        // A write whose size is past the payload the kernel said it filled is malformed, not read beyond.
        let h = header(op::WRITE, 44, 1, 0, &w, 3);
        assert_eq!(parse(&h, payload).unwrap().1, Request::Malformed);
    }

    #[test]
    fn lookup_names_setattr_sizes_and_unknown_operations() {
        let h = header(op::LOOKUP, 2, 1, 0, &[], 4);
        assert_eq!(parse(&h, b"nbd\0junk").unwrap().1, Request::Lookup { name_len: 3 });
        // No NUL within the payload length: malformed.
        let h = header(op::LOOKUP, 2, 1, 0, &[], 3);
        assert_eq!(parse(&h, b"nbd\0").unwrap().1, Request::Malformed);
        let mut s = [0u8; 88];
        s[0..4].copy_from_slice(&FATTR_SIZE.to_le_bytes());
        s[16..24].copy_from_slice(&(1u64 << 30).to_le_bytes());
        let h = header(op::SETATTR, 4, 1, 0, &s, 0);
        assert_eq!(parse(&h, &[]).unwrap().1, Request::Setattr { size: Some(1 << 30) });
        s[0..4].copy_from_slice(&1u32.to_le_bytes()); // FATTR_MODE only
        let h = header(op::SETATTR, 4, 1, 0, &s, 0);
        assert_eq!(parse(&h, &[]).unwrap().1, Request::Setattr { size: None });
        let h = header(52, 6, 1, 0, &[], 0); // STATX
        assert_eq!(parse(&h, &[]).unwrap().1, Request::Unsupported(52));
        assert_eq!(parse(&[0u8; 20], &[]), None, "a short header");
    }

    #[test]
    fn replies_have_the_kernel_layouts() {
        let mut h = vec![0xffu8; HEADER_LEN];
        put_reply_header(&mut h, 0x1122334455667788, -5, 8);
        assert_eq!(&h[0..16], &[24, 0, 0, 0, 0xfb, 0xff, 0xff, 0xff, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&h[ENT_IN_OUT + 16..ENT_IN_OUT + 20], &[8, 0, 0, 0]);

        let a = Attr {
            ino: 1,
            size: 0x4000_0000,
            blocks: 0x20_0000,
            time: UNIX_EPOCH + Duration::new(0x6000_0000, 7),
            mode: libc::S_IFREG | 0o600,
            nlink: 1,
            uid: 1000,
            gid: 100,
            blksize: 4096,
        };
        let mut out = vec![0xaau8; 256];
        assert_eq!(attr_out(&a, Duration::from_secs(1), &mut out), 104);
        let mut want = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(&1u64.to_le_bytes()); // ino
        want.extend_from_slice(&0x4000_0000u64.to_le_bytes());
        want.extend_from_slice(&0x20_0000u64.to_le_bytes());
        for _ in 0..3 {
            want.extend_from_slice(&0x6000_0000u64.to_le_bytes());
        }
        for _ in 0..3 {
            want.extend_from_slice(&7u32.to_le_bytes());
        }
        for v in [0o100600u32, 1, 1000, 100, 0, 4096, 0] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(&out[..104], &want[..]);
        assert_eq!(out[104], 0xaa, "nothing past the struct");

        assert_eq!(entry_out(&a, Duration::from_millis(1500), &mut out), 128);
        assert_eq!(&out[0..8], &1u64.to_le_bytes(), "nodeid");
        assert_eq!(&out[8..16], &[0; 8], "generation");
        assert_eq!(&out[16..24], &1u64.to_le_bytes(), "entry_valid");
        assert_eq!(&out[32..36], &500_000_000u32.to_le_bytes(), "entry_valid_nsec");
        assert_eq!(&out[40..128], &want[16..104], "the same fuse_attr");

        assert_eq!(open_out(1 | 1 << 6, &mut out), 16);
        assert_eq!(&out[..16], &[0, 0, 0, 0, 0, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(write_out(4096, &mut out), 8);
        assert_eq!(&out[..8], &[0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(statfs_out(3, 4096, &mut out), 80);
        assert_eq!(&out[..8], &3u64.to_le_bytes());
        assert_eq!(&out[24..32], &1u64.to_le_bytes());
        assert_eq!(&out[40..52], &[0, 0x10, 0, 0, 255, 0, 0, 0, 0, 0x10, 0, 0]);
        assert!(out[52..80].iter().all(|&b| b == 0));
    }

    #[test]
    fn directory_entries_are_padded_and_stop_where_they_no_longer_fit() {
        let entries = [(1, 4, "."), (1, 4, ".."), (2, 8, "disk")];
        let mut out = vec![0xaau8; 200];
        let n = dirents(&entries, 0, 200, &mut out);
        assert_eq!(n, 32 + 32 + 32);
        assert_eq!(
            &out[64..96],
            &[
                2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0, b'd', b'i', b's', b'k', 0, 0,
                0, 0
            ]
        );
        assert_eq!(dirents(&entries, 2, 200, &mut out), 32, "from the offset the kernel asks for");
        assert_eq!(dirents(&entries, 0, 63, &mut out), 32, "only whole entries");
        assert_eq!(dirents(&entries, 3, 200, &mut out), 0);
    }

    #[test]
    fn any_bytes_parse_without_reading_past_what_the_kernel_filled() {
        // xorshift64: a fixed sequence of headers with every opcode up to 60, random argument bytes and payload
        // lengths (some beyond the buffer), and random payload bytes.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000u64 {
            let mut h: Vec<u8> = (0..HEADER_LEN).map(|_| next() as u8).collect();
            h[4..8].copy_from_slice(&((round % 61) as u32).to_le_bytes());
            let filled = (next() % 80) as u32;
            h[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&filled.to_le_bytes());
            let payload: Vec<u8> = (0..64).map(|_| (next() % 4) as u8).collect();
            let visible = (filled as usize).min(payload.len());
            let (hdr, req) = parse(&h, &payload).unwrap();
            assert_eq!(hdr.opcode, (round % 61) as u32);
            match req {
                Request::Write { len, .. } => assert!(len <= visible),
                Request::Lookup { name_len } => {
                    assert!(name_len < visible && payload[name_len] == 0 && !payload[..name_len].contains(&0))
                }
                _ => {}
            }
        }
    }
}
