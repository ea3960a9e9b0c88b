//! `qimg convert -O raw`: a sparse raw copy of any image qnbd reads.

use qcow2::util::is_zero;
use qcow2::{BlockDevice, Image};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Copy granularity: the buffer one read fills.
const CHUNK: u64 = 2 << 20;
/// qemu-img's default sparse detection granularity (-S 4k).
const SPARSE: usize = 4096;

/// The non-zero `min_sparse`-sized blocks of `buf`, coalesced, as ranges of `buf`.
fn nonzero_ranges(buf: &[u8], min_sparse: usize) -> Vec<(usize, usize)> {
    if min_sparse == 0 {
        return vec![(0, buf.len())];
    }
    let mut out = Vec::new();
    let mut i = 0usize;
    while i < buf.len() {
        while i < buf.len() && is_zero(&buf[i..(i + min_sparse).min(buf.len())]) {
            i += min_sparse;
        }
        let start = i;
        while i < buf.len() && !is_zero(&buf[i..(i + min_sparse).min(buf.len())]) {
            i += min_sparse;
        }
        let end = i.min(buf.len());
        if end > start {
            out.push((start, end));
        }
    }
    out
}

/// A filled buffer on its way to the writer: guest offset, data, and the ranges of it to write.
struct Filled {
    offset: u64,
    buf: Vec<u8>,
    ranges: Vec<(usize, usize)>,
}

/// Copies `img` to `out_path` as a sparse raw file. A reader thread maps and reads while the writer writes in
/// order, as qemu-img convert overlaps its reads with in-order writes (concurrent writers to one file only
/// contend on the inode lock).
pub fn to_raw(img: &Image, out_path: &str, progress: bool, min_sparse: usize) -> Result<(), String> {
    use std::sync::mpsc::sync_channel;
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
    const DEPTH: usize = 4;
    let (tx, rx) = sync_channel::<Filled>(DEPTH);
    let (back_tx, back_rx) = sync_channel::<Vec<u8>>(DEPTH + 2);
    for _ in 0..DEPTH + 2 {
        let _ = back_tx.send(vec![0u8; CHUNK as usize]);
    }
    let result = std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<(), String> {
            let mut pos = 0u64;
            while pos < size {
                let st = img.block_status(pos, (size - pos).min(1 << 30)).map_err(|e| e.to_string())?;
                let run_end = pos + st.len;
                if !st.zero {
                    let mut p = pos;
                    while p < run_end {
                        let Ok(mut buf) = back_rx.recv() else {
                            return Ok(());
                        };
                        let n = (run_end - p).min(CHUNK) as usize;
                        buf.resize(n, 0);
                        img.read_at(&mut buf, p).map_err(|e| format!("error while reading at byte {p}: {e}"))?;
                        let ranges = nonzero_ranges(&buf, min_sparse);
                        if tx.send(Filled { offset: p, buf, ranges }).is_err() {
                            return Ok(());
                        }
                        p += n as u64;
                    }
                }
                pos = run_end;
            }
            Ok(())
        });
        let mut werr = None;
        for f in rx.iter() {
            for &(a, b) in &f.ranges {
                if let Err(e) = out.write_all_at(&f.buf[a..b], f.offset + a as u64) {
                    werr = Some(format!("error while writing at byte {}: {e}", f.offset + a as u64));
                    break;
                }
            }
            if werr.is_some() {
                break;
            }
            if let Some(b) = &bar {
                b.set_position(f.offset + f.buf.len() as u64);
            }
            let _ = back_tx.send(f.buf);
        }
        drop(rx);
        drop(back_tx);
        let r = reader.join().unwrap_or_else(|_| Err("reader thread failed".into()));
        match werr {
            Some(e) => Err(e),
            None => r,
        }
    });
    result?;
    if let Some(b) = bar {
        b.finish();
    }
    // qemu-img convert does not flush its output either (its default cache mode for the target).
    Ok(())
}

/// The default sparse granularity.
pub fn default_sparse() -> usize {
    SPARSE
}
