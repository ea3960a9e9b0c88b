//! `qimg convert -O raw|qcow2`: a copy of any image qnbd reads into a new (or, with `-n`, an existing) raw
//! or qcow2 image, through the same writer and metadata commit qnbd uses.

use qcow2::util::is_zero;
use qcow2::{BlockDevice, Image};

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

/// How `convert` writes its target.
pub struct Options {
    /// `-n`: the target exists (a file or a block device) and is not created.
    pub no_create: bool,
    /// `--target-is-zero` (with `-n`): the target reads as zeros already, so zero areas are skipped.
    pub target_is_zero: bool,
    /// `-S`: zero runs of at least this many bytes become holes; 0 writes every byte (fully allocated).
    pub min_sparse: usize,
    /// `-p` (and not `-q`).
    pub progress: bool,
    /// Write whole blocks of this many bytes (the target's cluster size for qcow2, as qemu-img aligns its
    /// writes), so no new cluster is left partly a hole in the file.
    pub align: u64,
    /// `-c`: write compressed clusters of this type (the target's cluster size is `align`).
    pub compress: Option<qcow2::format::header::CompressionType>,
    /// `-B`: the target has a backing file; only what the source's top image holds is copied (what it leaves
    /// to its backing chain is left to the target's), and zero areas are written as zeros, as qemu-img does.
    pub top_only: bool,
}

/// Progress as qemu-img prints it: a bar on a terminal, else qemu's "    (x.xx/100%)" lines, each ending in a
/// carriage return (the last in a newline).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    total: u64,
    shown: u64,
}

impl Progress {
    /// A progress display for `total` bytes, shown if `on`.
    pub fn new(total: u64, on: bool) -> Progress {
        use std::io::IsTerminal;
        let tty = on && std::io::stdout().is_terminal();
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "    ({percent_precise}/100%) {wide_bar} {bytes}/{total_bytes}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let p = Progress { bar, plain: on && !tty, total, shown: u64::MAX };
        p.print(0);
        p
    }

    fn print(&self, pos: u64) {
        if self.plain {
            use std::io::Write;
            let pct = if self.total == 0 { 100.0 } else { pos as f64 * 100.0 / self.total as f64 };
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }

    /// `pos` bytes are done.
    pub fn set(&mut self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
        // qemu prints when the percentage moves by at least one.
        let step = pos.saturating_mul(100).checked_div(self.total).unwrap_or(0);
        if self.plain && step != self.shown {
            self.shown = step;
            self.print(pos);
        }
    }

    /// All done.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish();
        }
        if self.plain {
            println!("    (100.00/100%)");
        }
    }
}

/// Copies `img` into `target` (already created, opened writable): data is read by a thread that maps and
/// reads ahead while this one writes in order. Zero areas are skipped when the target reads as zeros already
/// (a new image, or `--target-is-zero`), written as zeroes otherwise, and written as data with `-S 0`.
pub fn copy(img: &Image, target: &Image, o: &Options) -> Result<(), String> {
    use std::sync::mpsc::sync_channel;
    let size = img.size();
    if target.size() < size {
        return Err(format!("Error: the target ({} bytes) is smaller than the source ({size} bytes)", target.size()));
    }
    // A target with a backing file does not read as zeros where nothing is written.
    let zero_init = (!o.no_create || o.target_is_zero) && !o.top_only;
    let top_only = o.top_only;
    let mut progress = Progress::new(size, o.progress);
    const DEPTH: usize = 4;
    /// A zero run the target must be told about (not zero-initialised), or a filled buffer.
    enum Work {
        Data(Filled),
        Zero(u64, u64),
    }
    let (tx, rx) = sync_channel::<Work>(DEPTH);
    let (back_tx, back_rx) = sync_channel::<Vec<u8>>(DEPTH + 2);
    for _ in 0..DEPTH + 2 {
        let _ = back_tx.send(vec![0u8; CHUNK as usize]);
    }
    let align = o.align.max(1);
    // Zero detection works in whole target blocks.
    let min_sparse = if o.min_sparse == 0 { 0 } else { o.min_sparse.max(align as usize) };
    let result = std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<(), String> {
            let mut pos = 0u64;
            while pos < size {
                let st = img.block_status(pos, (size - pos).min(1 << 30)).map_err(|e| e.to_string())?;
                let mut run_end = pos + st.len.max(1).min(size - pos);
                let status_end = run_end;
                if top_only && (st.depth > 0 || !st.present) {
                    // Left to the backing file, in the source as in the target.
                    pos = run_end;
                    continue;
                }
                if !st.zero || min_sparse == 0 {
                    // Whole target blocks: from the start of the block holding `pos` (a zero run before it
                    // ended inside it) to the end of the block holding the run's end.
                    run_end = run_end.div_ceil(align).saturating_mul(align).min(size);
                    let mut p = pos - pos % align;
                    while p < run_end {
                        let Ok(mut buf) = back_rx.recv() else {
                            return Ok(());
                        };
                        let n = (run_end - p).min(CHUNK) as usize;
                        buf.resize(n, 0);
                        // Known zeros only inside the zero run itself: the rounding to whole target blocks
                        // reaches into the neighbouring runs, which are read.
                        if st.zero && p >= pos && p + n as u64 <= status_end {
                            buf.fill(0);
                        } else {
                            img.read_at(&mut buf, p).map_err(|e| format!("error while reading at byte {p}: {e}"))?;
                        }
                        let ranges = nonzero_ranges(&buf, min_sparse);
                        if tx.send(Work::Data(Filled { offset: p, buf, ranges })).is_err() {
                            return Ok(());
                        }
                        p += n as u64;
                    }
                } else if !zero_init && tx.send(Work::Zero(pos, run_end - pos)).is_err() {
                    return Ok(());
                }
                pos = run_end;
            }
            Ok(())
        });
        let mut werr = None;
        for w in rx.iter() {
            let r = match &w {
                Work::Zero(off, len) => target
                    .write_zeroes(*off, *len, true, false)
                    .map_err(|e| format!("error while writing at byte {off}: {e}")),
                Work::Data(f) => match o.compress {
                    Some(kind) => write_compressed(target, f, kind, align, size, zero_init),
                    None => write_ranges(target, f, zero_init),
                },
            };
            if let Err(e) = r {
                werr = Some(e);
                break;
            }
            match w {
                Work::Zero(off, len) => progress.set(off + len),
                Work::Data(f) => {
                    progress.set(f.offset + f.buf.len() as u64);
                    let _ = back_tx.send(f.buf);
                }
            }
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
    target.flush().map_err(|e| format!("error while flushing the target: {e}"))?;
    progress.finish();
    Ok(())
}

/// `-c`: every non-zero cluster of a filled (cluster-aligned) buffer compressed, on every core, and written
/// as a compressed cluster; one that does not shrink below a cluster is written as it is (qemu's rule). The
/// image's last cluster, if partial, is padded with zeros first, as qemu does.
fn write_compressed(
    target: &Image,
    f: &Filled,
    kind: qcow2::format::header::CompressionType,
    cs: u64,
    size: u64,
    zero_init: bool,
) -> Result<(), String> {
    let q = target.qcow2().ok_or("-c needs a qcow2 target")?;
    let pieces: Vec<&[u8]> = f.buf.chunks(cs as usize).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16);
    let per = pieces.len().div_ceil(threads).max(1);
    let compressed: Vec<Option<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = pieces
            .chunks(per)
            .map(|group| {
                s.spawn(move || {
                    group
                        .iter()
                        .map(|p| {
                            if is_zero(p) {
                                return None;
                            }
                            let mut padded;
                            let input: &[u8] = if p.len() < cs as usize {
                                padded = p.to_vec();
                                padded.resize(cs as usize, 0);
                                &padded
                            } else {
                                p
                            };
                            qcow2::image::compressed::compress(kind, input).filter(|c| (c.len() as u64) < cs)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(pieces.len());
        for h in handles {
            all.extend(h.join().map_err(|_| "a compression thread failed".to_string())?);
        }
        Ok::<_, String>(all)
    })?;
    for (i, (piece, c)) in pieces.iter().zip(compressed).enumerate() {
        let off = f.offset + i as u64 * cs;
        let err = |e: qcow2::Error| format!("error while writing at byte {off}: {e}");
        if is_zero(piece) {
            if !zero_init {
                target.write_zeroes(off, piece.len() as u64, true, false).map_err(err)?;
            }
            continue;
        }
        match c {
            Some(c) if off + cs <= size.div_ceil(cs) * cs => q.write_compressed(off, &c).map_err(err)?,
            _ => target.write_at(piece, off, false).map_err(err)?,
        }
    }
    Ok(())
}

/// Writes the non-zero ranges of a filled buffer; the gaps between them are zeroed when the target does not
/// read as zeros already.
fn write_ranges(target: &Image, f: &Filled, zero_init: bool) -> Result<(), String> {
    let mut at = 0usize;
    let err = |off: u64, e: qcow2::Error| format!("error while writing at byte {off}: {e}");
    for &(a, b) in &f.ranges {
        if !zero_init && a > at {
            let off = f.offset + at as u64;
            target.write_zeroes(off, (a - at) as u64, true, false).map_err(|e| err(off, e))?;
        }
        let off = f.offset + a as u64;
        target.write_at(&f.buf[a..b], off, false).map_err(|e| err(off, e))?;
        at = b;
    }
    if !zero_init && at < f.buf.len() {
        let off = f.offset + at as u64;
        target.write_zeroes(off, (f.buf.len() - at) as u64, true, false).map_err(|e| err(off, e))?;
    }
    Ok(())
}

/// The default sparse granularity.
pub fn default_sparse() -> usize {
    SPARSE
}
