//! Transmission requests: the 28-byte simple header and the 32-byte extended header (proto.md,
//! "Request message").

use super::consts::*;

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (payload length for WRITE; effect length otherwise).
    pub length: u64,
}

/// Length of a request header.
pub fn header_len(extended: bool) -> usize {
    if extended {
        32
    } else {
        28
    }
}

/// Why a header could not be decoded: the connection cannot continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHeader {
    /// The magic was not the one the negotiated header style uses.
    Magic(u32),
    /// Fewer bytes than a header.
    Short,
}

/// Decodes a request header from `b` (exactly [`header_len`] bytes).
pub fn decode(b: &[u8], extended: bool) -> Result<Request, BadHeader> {
    if b.len() < header_len(extended) {
        return Err(BadHeader::Short);
    }
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let want = if extended { NBD_EXTENDED_REQUEST_MAGIC } else { NBD_REQUEST_MAGIC };
    if magic != want {
        return Err(BadHeader::Magic(magic));
    }
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o.saturating_add(8)]);
        u64::from_be_bytes(a)
    };
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64_at(8),
        offset: u64_at(16),
        length: if extended { u64_at(24) } else { u64::from(u32::from_be_bytes([b[24], b[25], b[26], b[27]])) },
    })
}

/// Encodes a request header (used by the client side and tests).
pub fn encode(r: &Request, extended: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&(if extended { NBD_EXTENDED_REQUEST_MAGIC } else { NBD_REQUEST_MAGIC }).to_be_bytes());
    v.extend_from_slice(&r.flags.to_be_bytes());
    v.extend_from_slice(&r.kind.to_be_bytes());
    v.extend_from_slice(&r.cookie.to_be_bytes());
    v.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        v.extend_from_slice(&r.length.to_be_bytes());
    } else {
        v.extend_from_slice(&(r.length as u32).to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_simple_read_request() {
        let bytes = [
            0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0x00, 0, 0,
            0x02, 0x00,
        ];
        let r = decode(&bytes, false).unwrap();
        assert_eq!(r, Request { flags: 1, kind: 0, cookie: 0x0102030405060708, offset: 4096, length: 512 });
        assert_eq!(encode(&r, false), bytes);
    }

    #[test]
    fn extended_round_trip_and_wrong_magic() {
        let r = Request { flags: 0x20, kind: 7, cookie: 9, offset: 1 << 40, length: 1 << 33 };
        let b = encode(&r, true);
        assert_eq!(b.len(), 32);
        assert_eq!(decode(&b, true), Ok(r));
        assert_eq!(decode(&b, false), Err(BadHeader::Magic(NBD_EXTENDED_REQUEST_MAGIC)));
    }
}
