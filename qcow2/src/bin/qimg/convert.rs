//! `qimg convert -O raw`: a sparse raw copy of any image qnbd reads.

use qcow2::{BlockDevice, Image};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Copy granularity: the buffer one read fills.
const CHUNK: u64 = 2 << 20;
/// qemu-img's default sparse detection granularity (-S 4k).
const SPARSE: usize = 4096;

/// Writes the non-zero `SPARSE`-sized blocks of `buf` (taken at guest `offset`) to `out`, coalesced.
fn write_sparse(out: &File, buf: &[u8], offset: u64, min_sparse: usize) -> std::io::Result<()> {
    if min_sparse == 0 {
        return out.write_all_at(buf, offset);
    }
    let mut i = 0usize;
    while i < buf.len() {
        // Skip zero blocks.
        while i < buf.len() && is_zero(&buf[i..(i + min_sparse).min(buf.len())]) {
            i += min_sparse;
        }
        let start = i;
        while i < buf.len() && !is_zero(&buf[i..(i + min_sparse).min(buf.len())]) {
            i += min_sparse;
        }
        let end = i.min(buf.len());
        if end > start {
            out.write_all_at(&buf[start..end], offset + start as u64)?;
        }
    }
    Ok(())
}

/// Whether every byte is zero (sixteen bytes at a time; the compiler vectorises this).
pub fn is_zero(b: &[u8]) -> bool {
    let chunks = b.chunks_exact(16);
    let rest = chunks.remainder();
    chunks.fold(0u128, |acc, c| {
        let mut w = [0u8; 16];
        w.copy_from_slice(c);
        acc | u128::from_ne_bytes(w)
    }) == 0
        && rest.iter().all(|&x| x == 0)
}

/// Copies `img` to `out_path` as a sparse raw file.
pub fn to_raw(img: &Image, out_path: &str, progress: bool, min_sparse: usize) -> Result<(), String> {
    let out = File::create(out_path).map_err(|e| format!("Could not create '{out_path}': {e}"))?;
    let size = img.size();
    out.set_len(size).map_err(|e| format!("Could not resize '{out_path}': {e}"))?;
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template("    ({percent_precise}/100%) {wide_bar} {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < size {
        let st = img.block_status(pos, (size - pos).min(1 << 30)).map_err(|e| e.to_string())?;
        let run_end = pos + st.len;
        if !st.zero {
            let mut p = pos;
            while p < run_end {
                let n = (run_end - p).min(CHUNK) as usize;
                img.read_at(&mut buf[..n], p).map_err(|e| format!("error while reading at byte {p}: {e}"))?;
                write_sparse(&out, &buf[..n], p, min_sparse)
                    .map_err(|e| format!("error while writing at byte {p}: {e}"))?;
                p += n as u64;
                if let Some(b) = &bar {
                    b.set_position(p);
                }
            }
        }
        pos = run_end;
        if let Some(b) = &bar {
            b.set_position(pos);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    out.sync_all().map_err(|e| format!("Could not flush '{out_path}': {e}"))?;
    Ok(())
}

/// The default sparse granularity.
pub fn default_sparse() -> usize {
    SPARSE
}
