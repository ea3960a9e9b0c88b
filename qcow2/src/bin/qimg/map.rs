//! `qimg map`: qemu-img map's records, merged the way qemu-img merges them.

use qcow2::{BlockDevice, Image, Result, Status};
use std::io::Write;

/// One record of the map (qemu-img's `MapEntry`).
#[derive(Debug, Clone)]
pub struct Entry {
    /// Guest start.
    pub start: u64,
    /// Status of the run.
    pub st: Status,
}

/// qemu-img's `entry_mergeable`.
fn mergeable(a: &Entry, b: &Entry) -> bool {
    let (x, y) = (&a.st, &b.st);
    x.len > 0
        && x.zero == y.zero
        && x.data == y.data
        && x.compressed == y.compressed
        && x.depth == y.depth
        && x.present == y.present
        && x.file == y.file
        && match (x.offset, y.offset) {
            (None, None) => true,
            (Some(o), Some(p)) => o + x.len == p,
            _ => false,
        }
}

/// Walks `[start, end)` and calls `emit` with each merged record.
pub fn walk(img: &Image, start: u64, end: u64, mut emit: impl FnMut(&Entry) -> Result<()>) -> Result<()> {
    let mut cur: Option<Entry> = None;
    let mut pos = start;
    while pos < end {
        // qemu-img asks for at most 1 GiB at a time (bytes = MIN(length - offset, BDRV_REQUEST_MAX_BYTES)).
        let st = img.block_status(pos, (end - pos).min(1 << 30))?;
        let len = st.len;
        let e = Entry { start: pos, st };
        match &mut cur {
            Some(c) if mergeable(c, &e) => c.st.len += len,
            _ => {
                if let Some(c) = cur.take() {
                    emit(&c)?;
                }
                cur = Some(e);
            }
        }
        pos += len;
    }
    if let Some(c) = cur {
        emit(&c)?;
    }
    Ok(())
}

/// One JSON record, as qemu-img prints it.
pub fn json_line(e: &Entry) -> String {
    let s = &e.st;
    let mut l = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, s.len, s.depth, s.present, s.zero, s.data, s.compressed
    );
    if let Some(o) = s.offset {
        l += &format!(", \"offset\": {o}");
    }
    l.push('}');
    l
}

/// Runs the map command; returns the exit status.
pub fn run(img: &Image, json: bool, start: u64, len: Option<u64>) -> std::result::Result<(), String> {
    let size = img.size();
    let end = len.map(|l| start.saturating_add(l).min(size)).unwrap_or(size);
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut first = true;
    let mut err: Option<String> = None;
    if json {
        let _ = out.write_all(b"[");
    } else {
        let _ = writeln!(out, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
    }
    let r = walk(img, start.min(end), end, |e| {
        if json {
            if !first {
                let _ = out.write_all(b",\n");
            }
            first = false;
            let _ = out.write_all(json_line(e).as_bytes());
        } else {
            let s = &e.st;
            if s.data && s.offset.is_none() {
                err = Some("File contains external, encrypted or compressed clusters.".into());
                return Err(qcow2::Error::new(qcow2::ErrorKind::Unsupported, "stop"));
            }
            if s.data && !s.zero {
                let _ = writeln!(
                    out,
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(s.len),
                    hex(s.offset.unwrap_or(0)),
                    s.file.as_deref().unwrap_or("")
                );
            }
        }
        Ok(())
    });
    if json {
        if first && r.is_ok() {
            // qemu-img map: an empty range (a 0-byte image, --start-offset at or past the end, --max-length=0)
            // is still one entry, of length 0, starting where the walk would have.
            let at = if len == Some(0) { start } else { start.max(end) };
            let _ = write!(
                out,
                "{{ \"start\": {at}, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}}"
            );
        }
        let _ = out.write_all(b"]\n");
    }
    let _ = out.flush();
    if let Some(e) = err {
        return Err(e);
    }
    r.map_err(|e| e.to_string())
}

/// printf's "%#x": "0" for zero, "0x..." otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
