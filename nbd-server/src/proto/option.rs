//! Handshake option requests and replies (proto.md, "Option haggling").

use super::consts::*;

/// Length of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// A decoded option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

/// Decodes an option request header; `None` if the magic is wrong (the connection must end).
pub fn decode_header(b: &[u8; OPTION_HEADER_LEN]) -> Option<OptionHeader> {
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[0..8]);
    if u64::from_be_bytes(m) != IHAVEOPT {
        return None;
    }
    Some(OptionHeader {
        option: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        length: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
    })
}

/// Appends an option reply to `out`.
pub fn reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// A cursor over option data that fails instead of panicking on short input.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    /// A big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A string prefixed by a u32 length, at most [`MAX_STRING`] bytes, valid UTF-8.
    pub fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(n)?).ok()
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_greeting() {
        assert_eq!(&greeting(), b"NBDMAGICIHAVEOPT\x00\x03");
    }

    #[test]
    fn golden_ack() {
        let mut v = Vec::new();
        reply(&mut v, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]);
        assert_eq!(v, [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn reader_refuses_short_and_long_strings() {
        assert_eq!(Reader::new(&[0, 0, 0, 5, b'a']).string(), None);
        assert_eq!(Reader::new(&[0, 0, 0x10, 0x01]).string(), None);
        assert_eq!(Reader::new(&[0, 0, 0, 1, b'a']).string(), Some("a"));
    }
}
