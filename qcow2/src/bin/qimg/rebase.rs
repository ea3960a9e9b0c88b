//! `qimg rebase`: qemu-img rebase. Safe mode writes into the image every cluster whose guest-visible bytes
//! would change with the new backing file (`-b ""`: every cluster the old chain gives), then switches the
//! header (`Qcow2::set_backing`, crash-safe); `-u` switches the header only.

use qcow2::chain::resolve_relative;
use qcow2::{BlockDevice, Format, Image, OpenOptions};

/// `qimg rebase`'s command line.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the image.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// The new backing file ("" for none).
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_fmt: Option<String>,
    /// Only change the header (the new backing file is not read).
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_mode: bool,
    /// Cache mode of the image (accepted).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Cache mode of the backing files (accepted).
    #[arg(short = 'T', long = "backing-cache")]
    pub backing_cache: Option<String>,
    /// Compress the clusters written (as compressed clusters, where that makes them smaller).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Open the backing files even if another process writes them.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// FILENAME is a set of image options.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Objects (accepted: secrets are not used by qimg).
    #[arg(long = "object")]
    pub object: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Runs `qimg rebase`.
pub fn run(a: Args) -> Result<(), String> {
    let Some(new) = a.backing.clone() else {
        return Err("Must specify backing file (-b) or use unsafe mode (-u)".into());
    };
    let new = (!new.is_empty()).then_some(new);
    let n = crate::Naming { image_opts: a.image_opts, force_share: false };
    let spec = crate::spec(&a.filename, a.format.as_deref(), n)?;
    let o = OpenOptions {
        format: a.format.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?,
        writable: true,
        open_backing: !a.unsafe_mode,
        backing_policy: crate::policy(),
        ..OpenOptions::default()
    };
    let img = Image::open_spec(&spec, &o).map_err(|e| crate::open_error(&a.filename, e))?;
    let q = img.qcow2().ok_or("rebase needs a qcow2 image")?;
    let mut fmt = a.backing_fmt.clone();
    if !a.unsafe_mode {
        let newb = match &new {
            Some(b) => {
                let path = resolve_relative(img.filename(), b);
                let bo = OpenOptions {
                    format: a.backing_fmt.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?,
                    force_share: true,
                    backing_policy: crate::policy(),
                    ..OpenOptions::default()
                };
                let nb =
                    Image::open(&path, &bo).map_err(|e| format!("Could not open new backing file '{path}': {e}"))?;
                fmt.get_or_insert_with(|| nb.format().name().to_string());
                Some(nb)
            }
            None => None,
        };
        copy_differences(&img, newb.as_deref(), a.progress && !a.quiet, a.compress)?;
    }
    q.set_backing(new.as_deref(), fmt.as_deref())
        .map_err(|e| format!("Could not change the backing file to '{}': {e}", new.as_deref().unwrap_or("")))?;
    Ok(())
}

/// Writes into the top image every cluster it does not hold whose bytes through the old chain differ from
/// the new backing file's (zeros past its end, or everywhere without one); `compress`: as compressed clusters.
fn copy_differences(img: &Image, newb: Option<&Image>, progress: bool, compress: bool) -> Result<(), String> {
    let size = img.size();
    let cs = img.qcow2().map_or(65536, |q| q.cluster_size());
    let chunk = (2u64 << 20).max(cs) / cs * cs;
    let mut bar = crate::convert::Progress::new(size, progress);
    let old_backing_size = img.backing().map_or(0, |b| b.size());
    let (mut old, mut new) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut pos = 0u64;
    while pos < size {
        let st = img.block_status(pos, (size - pos).min(chunk)).map_err(|e| e.to_string())?;
        let n = st.len.clamp(1, size - pos);
        if st.depth == 0 && st.present {
            pos += n;
            bar.set(pos);
            continue;
        }
        // Whole clusters from the one holding `pos`, at most one chunk.
        let start = pos - pos % cs;
        let end = (pos + n).div_ceil(cs).saturating_mul(cs).min(size).min(start + chunk);
        let len = (end - start) as usize;
        img.read_at(&mut old[..len], start).map_err(|e| format!("error while reading at byte {start}: {e}"))?;
        new[..len].fill(0);
        if let Some(b) = newb {
            let bsize = b.size();
            if start < bsize {
                let m = ((bsize - start) as usize).min(len);
                b.read_at(&mut new[..m], start)
                    .map_err(|e| format!("error while reading the new backing file: {e}"))?;
            }
        }
        // Runs of clusters to write go out as one write each (one allocation, one data write).
        let mut run: Option<(usize, bool)> = None; // (start in the chunk, zero cluster)
        let mut c = 0usize;
        while c <= len {
            let e = (c + cs as usize).min(len);
            let at = start + c as u64;
            let want = if c < len {
                // A cluster the top image holds stays as it is.
                let own = img.block_status(at, (e - c) as u64).map(|s| s.depth == 0 && s.present).unwrap_or(false);
                // Past the old backing file's end the old bytes are zeros and go in as a zero cluster; inside it
                // they go in as data, even zeros (what qemu-img rebase does).
                (!own && old[c..e] != new[c..e]).then_some(at >= old_backing_size)
            } else {
                None
            };
            if let Some((r0, zero)) = run.filter(|&(_, z)| want != Some(z)) {
                let at0 = start + r0 as u64;
                let r = if zero {
                    img.write_zeroes(at0, (c - r0) as u64, false, false)
                } else if compress {
                    write_compressed(img, &old[r0..c], at0, cs)
                } else {
                    img.write_at(&old[r0..c], at0, false)
                };
                r.map_err(|err| format!("error while writing at byte {at0}: {err}"))?;
                run = None;
            }
            if let (None, Some(z)) = (run, want) {
                run = Some((c, z));
            }
            if c == len {
                break;
            }
            c = e;
        }
        pos = end.max(pos + 1);
        bar.set(pos);
    }
    img.flush().map_err(|e| format!("error while flushing: {e}"))?;
    bar.finish();
    Ok(())
}

/// Writes `data` (whole clusters from `at`, the last one possibly cut by the end of the image) cluster by
/// cluster, compressed where that makes a cluster smaller, as qemu-img rebase -c does.
fn write_compressed(img: &Image, data: &[u8], at: u64, cs: u64) -> qcow2::Result<()> {
    let q = img.qcow2().ok_or_else(|| qcow2::Error::unsupported("-c needs a qcow2 image"))?;
    let kind = q.header().compression_type;
    for (i, piece) in data.chunks(cs as usize).enumerate() {
        let off = at + i as u64 * cs;
        match qcow2::image::compressed::compress_cluster(kind, piece, cs) {
            Some(c) => q.write_compressed(off, &c)?,
            None => img.write_at(piece, off, false)?,
        }
    }
    Ok(())
}
