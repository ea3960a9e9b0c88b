//! Transmission replies: simple (16 bytes), structured chunks (20-byte header) and extended chunks (32-byte
//! header), with the payloads of the chunk types qnbd sends (proto.md, "Reply message").

use super::consts::*;

/// Which reply header style the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Simple replies only.
    Simple,
    /// Structured replies (NBD_OPT_STRUCTURED_REPLY).
    Structured,
    /// Extended headers (NBD_OPT_EXTENDED_HEADERS).
    Extended,
}

/// A simple reply header.
pub fn simple(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Appends a structured or extended chunk header to `out`. `offset` is the request's offset (sent only in
/// extended headers).
pub fn chunk_header(out: &mut Vec<u8>, style: Style, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) {
    match style {
        Style::Extended => {
            out.extend_from_slice(&NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}

/// The reply to a request that carries no data, successful or not, in the connection's style.
pub fn done(style: Style, cookie: u64, offset: u64, error: u32, msg: &str) -> Vec<u8> {
    match (style, error) {
        (Style::Simple, e) => simple(cookie, e).to_vec(),
        (_, 0) => {
            let mut v = Vec::with_capacity(32);
            chunk_header(&mut v, style, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, offset, 0);
            v
        }
        (_, e) => {
            let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
            let mut v = Vec::with_capacity(msg.len().saturating_add(40));
            chunk_header(
                &mut v,
                style,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_ERROR,
                cookie,
                offset,
                (msg.len() as u64).saturating_add(6),
            );
            v.extend_from_slice(&e.to_be_bytes());
            v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            v.extend_from_slice(msg);
            v
        }
    }
}

/// An OFFSET_HOLE chunk: a u64 offset and a u32 size in every header style (there is no 64-bit hole chunk).
pub fn hole(out: &mut Vec<u8>, style: Style, flags: u16, cookie: u64, req_off: u64, offset: u64, len: u32) {
    chunk_header(out, style, flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, req_off, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The header of an OFFSET_DATA chunk whose `len` data bytes follow.
pub fn data_header(out: &mut Vec<u8>, style: Style, flags: u16, cookie: u64, req_off: u64, offset: u64, len: u64) {
    chunk_header(out, style, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, req_off, len.saturating_add(8));
    out.extend_from_slice(&offset.to_be_bytes());
}

/// A BLOCK_STATUS (or BLOCK_STATUS_EXT with extended headers) chunk for one context.
pub fn block_status(
    out: &mut Vec<u8>,
    style: Style,
    flags: u16,
    cookie: u64,
    req_off: u64,
    id: u32,
    ext: &[(u64, u32)],
) {
    if style == Style::Extended {
        let len = (ext.len() as u64).saturating_mul(16).saturating_add(8);
        chunk_header(out, style, flags, NBD_REPLY_TYPE_BLOCK_STATUS_EXT, cookie, req_off, len);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&(ext.len() as u32).to_be_bytes());
        for &(l, f) in ext {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&u64::from(f).to_be_bytes());
        }
    } else {
        let len = (ext.len() as u64).saturating_mul(8).saturating_add(4);
        chunk_header(out, style, flags, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, req_off, len);
        out.extend_from_slice(&id.to_be_bytes());
        for &(l, f) in ext {
            out.extend_from_slice(&(l as u32).to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_simple_error() {
        assert_eq!(simple(7, NBD_EINVAL), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn golden_structured_error_chunk() {
        let v = done(Style::Structured, 1, 0, NBD_ENOSPC, "no");
        assert_eq!(
            v,
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 28, 0, 2, b'n', b'o']
        );
    }

    #[test]
    fn extended_block_status_layout() {
        let mut v = Vec::new();
        block_status(&mut v, Style::Extended, NBD_REPLY_FLAG_DONE, 5, 4096, 1, &[(1 << 33, 3)]);
        assert_eq!(v.len(), 32 + 8 + 16);
        assert_eq!(&v[0..4], &NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&v[6..8], &NBD_REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&v[16..24], &4096u64.to_be_bytes());
        assert_eq!(&v[32..36], &1u32.to_be_bytes());
        assert_eq!(&v[36..40], &1u32.to_be_bytes());
        assert_eq!(&v[40..48], &(1u64 << 33).to_be_bytes());
    }
}
