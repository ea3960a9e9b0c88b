//! `qnbd -L`: list a server's exports as a client, printing what `qemu-nbd -L` prints.

use crate::proto::option::{Reader, OPTION_HEADER_LEN};
use crate::proto::*;
use std::io::{Read, Write};

/// qemu's names for the transmission flag bits (nbd/common.c).
const FLAG_NAMES: [(u16, &str); 12] = [
    (NBD_FLAG_READ_ONLY, "readonly"),
    (NBD_FLAG_SEND_FLUSH, "flush"),
    (NBD_FLAG_SEND_FUA, "fua"),
    (NBD_FLAG_ROTATIONAL, "rotational"),
    (NBD_FLAG_SEND_TRIM, "trim"),
    (NBD_FLAG_SEND_WRITE_ZEROES, "zeroes"),
    (NBD_FLAG_SEND_DF, "df"),
    (NBD_FLAG_CAN_MULTI_CONN, "multi"),
    (NBD_FLAG_SEND_RESIZE, "resize"),
    (NBD_FLAG_SEND_CACHE, "cache"),
    (NBD_FLAG_SEND_FAST_ZERO, "fast-zero"),
    (NBD_FLAG_BLOCK_STATUS_PAYLOAD, "block-status-payload"),
];

struct Conn<S: Read + Write> {
    s: S,
}

type Reply = (u32, Vec<u8>);

impl<S: Read + Write> Conn<S> {
    fn opt(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        let mut v = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v)
    }

    /// Replies to one option, up to the final ACK or error.
    fn replies(&mut self) -> std::io::Result<Vec<Reply>> {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h)?;
            let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or([0; 8]));
            if magic != REPLY_MAGIC_OPT {
                return Err(std::io::Error::other("bad option reply magic"));
            }
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap_or([0; 4]));
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or([0; 4]));
            if len > MAX_OPTION_LEN {
                return Err(std::io::Error::other("option reply too long"));
            }
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d)?;
            let last = kind == NBD_REP_ACK || kind & NBD_REP_FLAG_ERROR != 0;
            out.push((kind, d));
            if last || out.len() > 100_000 {
                return Ok(out);
            }
        }
    }
}

fn named(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// TLS for the lister: the client configuration and the name the server's certificate must carry.
pub type ClientTls =
    (std::sync::Arc<tokio_rustls::rustls::ClientConfig>, tokio_rustls::rustls::pki_types::ServerName<'static>);

/// Lists the exports of the server on `stream`; returns the text qemu-nbd -L prints.
pub fn list<S: Read + Write>(stream: S) -> std::io::Result<String> {
    list_tls(stream, None)
}

/// [`list`], upgrading the connection with NBD_OPT_STARTTLS first when `tls` is given.
pub fn list_tls<S: Read + Write>(stream: S, tls: Option<ClientTls>) -> std::io::Result<String> {
    let mut c = Conn { s: stream };
    let mut g = [0u8; 18];
    c.s.read_exact(&mut g)?;
    if &g[0..16] != b"NBDMAGICIHAVEOPT" {
        return Err(std::io::Error::other("not a newstyle NBD server"));
    }
    c.s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())?;
    let Some((cfg, name)) = tls else {
        return list_exports(c);
    };
    c.opt(NBD_OPT_STARTTLS, &[])?;
    match c.replies()?.last() {
        Some((NBD_REP_ACK, _)) => {}
        Some((k, _)) => return Err(std::io::Error::other(format!("the server refused STARTTLS ({k:#x})"))),
        None => return Err(std::io::Error::other("no reply to STARTTLS")),
    }
    let conn = tokio_rustls::rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
    list_exports(Conn { s: tokio_rustls::rustls::StreamOwned::new(conn, c.s) })
}

fn list_exports<S: Read + Write>(mut c: Conn<S>) -> std::io::Result<String> {
    c.opt(NBD_OPT_EXTENDED_HEADERS, &[])?;
    let extended = c.replies()?.last().is_some_and(|r| r.0 == NBD_REP_ACK);
    if !extended {
        c.opt(NBD_OPT_STRUCTURED_REPLY, &[])?;
        c.replies()?;
    }
    c.opt(NBD_OPT_LIST, &[])?;
    let mut names = Vec::new();
    for (kind, d) in c.replies()? {
        if kind == NBD_REP_SERVER {
            let mut r = Reader::new(&d);
            if let Some(n) = r.string() {
                names.push(n.to_string());
            }
        } else if kind == NBD_REP_ERR_TLS_REQD {
            return Err(std::io::Error::other("the server requires TLS (give --tls-creds)"));
        } else if kind & NBD_REP_FLAG_ERROR != 0 {
            return Err(std::io::Error::other(format!("server refused to list exports ({kind:#x})")));
        }
    }
    let mut out = format!("exports available: {}\n", names.len());
    for name in &names {
        out += &format!(" export: '{name}'\n");
        let mut d = named(name);
        d.extend_from_slice(&3u16.to_be_bytes());
        for t in [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE] {
            d.extend_from_slice(&t.to_be_bytes());
        }
        c.opt(NBD_OPT_INFO, &d)?;
        let (mut size, mut flags, mut desc, mut bs) = (0u64, 0u16, None, None);
        for (kind, d) in c.replies()? {
            if kind != NBD_REP_INFO || d.len() < 2 {
                continue;
            }
            match u16::from_be_bytes([d[0], d[1]]) {
                NBD_INFO_EXPORT if d.len() >= 12 => {
                    size = u64::from_be_bytes(d[2..10].try_into().unwrap_or([0; 8]));
                    flags = u16::from_be_bytes([d[10], d[11]]);
                }
                NBD_INFO_DESCRIPTION => desc = Some(String::from_utf8_lossy(&d[2..]).into_owned()),
                NBD_INFO_BLOCK_SIZE if d.len() >= 14 => {
                    let g = |o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap_or([0; 4]));
                    bs = Some((g(2), g(6), g(10)));
                }
                _ => {}
            }
        }
        if let Some(desc) = desc {
            out += &format!("  description: {desc}\n");
        }
        out += &format!("  size:  {size}\n");
        out += &format!("  flags: {flags:#x} (");
        for (bit, n) in FLAG_NAMES {
            if flags & bit != 0 {
                out += &format!(" {n}");
            }
        }
        out += " )\n";
        if let Some((a, b, m)) = bs {
            out += &format!("  min block: {a}\n  opt block: {b}\n  max block: {m}\n");
        }
        out += &format!("  transaction size: {}\n", if extended { "64-bit" } else { "32-bit" });
        let mut d = named(name);
        d.extend_from_slice(&0u32.to_be_bytes());
        c.opt(NBD_OPT_LIST_META_CONTEXT, &d)?;
        let ctx: Vec<String> = c
            .replies()?
            .into_iter()
            .filter(|(k, d)| *k == NBD_REP_META_CONTEXT && d.len() >= 4)
            .map(|(_, d)| String::from_utf8_lossy(&d[4..]).into_owned())
            .collect();
        out += &format!("  available meta contexts: {}\n", ctx.len());
        for n in ctx {
            out += &format!("   {n}\n");
        }
    }
    c.opt(NBD_OPT_ABORT, &[])?;
    let _ = c.replies();
    Ok(out)
}
