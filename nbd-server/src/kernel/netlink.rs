//! Generic netlink messages for the kernel's "nbd" family (linux/include/uapi/linux/nbd-netlink.h) and the
//! generic netlink controller (linux/genetlink.h). Pure: encoders produce bytes, decoders read bytes; the
//! socket lives in `kernel::mod`. Everything the kernel sends back is checked before use.

/// `NETLINK_GENERIC`.
pub const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// The nbd family's name and version.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

// nbd-netlink.h: commands.
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;

// nbd-netlink.h: attributes.
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

/// What `NBD_CMD_CONNECT` sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Device index (N of /dev/nbdN).
    pub index: u32,
    /// Export size in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u64,
    /// Transmission flags from the server.
    pub server_flags: u64,
    /// Request timeout in seconds (0: the kernel's default).
    pub timeout: u64,
    /// Seconds to wait for a dead connection to be replaced (0: none).
    pub dead_conn_timeout: u64,
    /// The sockets (descriptors in the calling process).
    pub sockets: Vec<i32>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Msg { buf, nests: Vec::new() }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_ne_bytes());
    }

    fn u64(&mut self, kind: u16, v: u64) {
        self.attr(kind, &v.to_ne_bytes());
    }

    fn begin_nest(&mut self, kind: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    fn end_nest(&mut self) {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// CTRL_CMD_GETFAMILY for `name`.
pub fn get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut m = Msg::new(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, CTRL_CMD_GETFAMILY, 2);
    let mut s = name.as_bytes().to_vec();
    s.push(0);
    m.attr(CTRL_ATTR_FAMILY_NAME, &s);
    m.finish()
}

/// NBD_CMD_CONNECT.
pub fn connect(family: u16, seq: u32, c: &Connect) -> Vec<u8> {
    let mut m = Msg::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    m.u32(NBD_ATTR_INDEX, c.index);
    m.u64(NBD_ATTR_SIZE_BYTES, c.size);
    m.u64(NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size);
    m.u64(NBD_ATTR_SERVER_FLAGS, c.server_flags);
    if c.timeout > 0 {
        m.u64(NBD_ATTR_TIMEOUT, c.timeout);
    }
    if c.dead_conn_timeout > 0 {
        m.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout);
    }
    m.begin_nest(NBD_ATTR_SOCKETS);
    for fd in &c.sockets {
        m.begin_nest(NBD_SOCK_ITEM);
        m.u32(NBD_SOCK_FD, *fd as u32);
        m.end_nest();
    }
    m.end_nest();
    m.finish()
}

/// NBD_CMD_DISCONNECT for device `index`.
pub fn disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = Msg::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
    m.u32(NBD_ATTR_INDEX, index);
    m.finish()
}

/// One message of a datagram the kernel sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An error or an acknowledgement (errno 0).
    Ack {
        /// The request's sequence number.
        seq: u32,
        /// 0, or the positive errno of the failure.
        errno: i32,
    },
    /// A generic netlink message.
    Genl {
        /// The request's sequence number.
        seq: u32,
        /// The generic netlink command.
        cmd: u8,
        /// The attribute bytes.
        attrs: Vec<u8>,
    },
    /// Anything else (skipped).
    Other,
}

fn rd_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn rd_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram into messages. A malformed datagram gives `None`.
pub fn parse(datagram: &[u8]) -> Option<Vec<Reply>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + NLMSG_HDRLEN <= datagram.len() {
        let len = rd_u32(datagram, at)? as usize;
        if len < NLMSG_HDRLEN || at.checked_add(len)? > datagram.len() {
            return None;
        }
        let kind = rd_u16(datagram, at + 4)?;
        let seq = rd_u32(datagram, at + 8)?;
        let body = &datagram[at + NLMSG_HDRLEN..at + len];
        if kind == NLMSG_ERROR {
            let e = i32::from_ne_bytes(body.get(0..4)?.try_into().ok()?);
            out.push(Reply::Ack { seq, errno: e.checked_neg().unwrap_or(i32::MAX) });
        } else if kind >= GENL_ID_CTRL && body.len() >= GENL_HDRLEN {
            out.push(Reply::Genl { seq, cmd: body[0], attrs: body[GENL_HDRLEN..].to_vec() });
        } else {
            out.push(Reply::Other);
        }
        at += align4(len);
    }
    Some(out)
}

/// Finds attribute `kind` in an attribute list.
pub fn find_attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    let mut at = 0usize;
    while at + 4 <= attrs.len() {
        let len = rd_u16(attrs, at)? as usize;
        if len < 4 || at + len > attrs.len() {
            return None;
        }
        if rd_u16(attrs, at + 2)? & NLA_TYPE_MASK == kind {
            return Some(&attrs[at + 4..at + len]);
        }
        at += align4(len);
    }
    None
}

/// The family ID in a CTRL_CMD_NEWFAMILY reply's attributes.
pub fn family_id(attrs: &[u8]) -> Option<u16> {
    rd_u16(find_attr(attrs, CTRL_ATTR_FAMILY_ID)?, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_family_golden_bytes() {
        let m = get_family(7, "nbd");
        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes());
        want.extend_from_slice(&0x10u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[3, 2, 0, 0]);
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&2u16.to_ne_bytes());
        want.extend_from_slice(b"nbd\0");
        assert_eq!(m, want);
    }

    #[test]
    fn connect_nests_every_socket() {
        let c = Connect {
            index: 3,
            size: 1 << 30,
            block_size: 512,
            server_flags: 0x1ed,
            timeout: 30,
            dead_conn_timeout: 0,
            sockets: vec![5, 6],
        };
        let m = connect(0x22, 1, &c);
        assert_eq!(rd_u32(&m, 0), Some(m.len() as u32));
        assert_eq!(m[16], NBD_CMD_CONNECT);
        let attrs = &m[20..];
        assert_eq!(find_attr(attrs, NBD_ATTR_INDEX), Some(&3u32.to_ne_bytes()[..]));
        assert_eq!(find_attr(attrs, NBD_ATTR_SIZE_BYTES), Some(&(1u64 << 30).to_ne_bytes()[..]));
        assert_eq!(find_attr(attrs, NBD_ATTR_TIMEOUT), Some(&30u64.to_ne_bytes()[..]));
        assert_eq!(find_attr(attrs, NBD_ATTR_DEAD_CONN_TIMEOUT), None);
        let socks = find_attr(attrs, NBD_ATTR_SOCKETS).expect("sockets");
        // two items of 12 bytes each: item header + fd attribute
        assert_eq!(socks.len(), 24);
        let first = find_attr(socks, NBD_SOCK_ITEM).expect("item");
        assert_eq!(find_attr(first, NBD_SOCK_FD), Some(&5u32.to_ne_bytes()[..]));
        assert_eq!(
            find_attr(&socks[12..], NBD_SOCK_ITEM).and_then(|i| find_attr(i, NBD_SOCK_FD)),
            Some(&6u32.to_ne_bytes()[..])
        );
    }

    #[test]
    fn parse_ack_error_and_family() {
        let mut d = Vec::new();
        // NLMSG_ERROR with -EBUSY for seq 9, followed by the original header
        d.extend_from_slice(&36u32.to_ne_bytes());
        d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        d.extend_from_slice(&0u16.to_ne_bytes());
        d.extend_from_slice(&9u32.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        d.extend_from_slice(&(-16i32).to_ne_bytes());
        d.extend_from_slice(&[0u8; 16]);
        // a family reply
        let mut f = Msg::new(GENL_ID_CTRL, 0, 4, 1, 2);
        f.attr(CTRL_ATTR_FAMILY_ID, &0x1du16.to_ne_bytes());
        d.extend_from_slice(&f.finish());
        let r = parse(&d).expect("parse");
        assert_eq!(r[0], Reply::Ack { seq: 9, errno: 16 });
        let Reply::Genl { seq, attrs, .. } = &r[1] else { panic!("not genl") };
        assert_eq!(*seq, 4);
        assert_eq!(family_id(attrs), Some(0x1d));
    }

    #[test]
    fn hostile_datagrams_are_refused_not_trusted() {
        assert_eq!(parse(&[0xff; 16]), None);
        let mut d = 8u32.to_ne_bytes().to_vec();
        d.resize(16, 0);
        assert_eq!(parse(&d), None);
        assert_eq!(find_attr(&[2, 0, 1, 0], 1), None);
        assert_eq!(find_attr(&[200, 0, 1, 0, 0, 0], 1), None);
        assert_eq!(parse(&[]), Some(vec![]));
        let mut e = 16u32.to_ne_bytes().to_vec();
        e.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        e.resize(16, 0);
        assert_eq!(parse(&e), None);
    }
}
