//! `qimg commit`: qemu-img commit into the image's backing file. What the top image holds is written into the
//! backing file (through its own writer and metadata commit); then, unless `-d`, the top image is emptied
//! (`Qcow2::make_empty`), so the chain reads the same bytes as before.

use qcow2::chain::resolve_relative;
use qcow2::{BlockDevice, Format, Image, OpenOptions};

/// `qimg commit`'s command line.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the image.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Commit into this image of the chain (only the image's own backing file is supported); the top image
    /// is then left as it is, as qemu-img does.
    #[arg(short = 'b', long = "base")]
    pub base: Option<String>,
    /// Keep the top image as it is (do not empty it).
    #[arg(short = 'd', long = "drop")]
    pub drop: bool,
    /// Cache mode (accepted).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Rate limit (accepted).
    #[arg(short = 'r', long = "rate")]
    pub rate: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILENAME is a set of image options.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Objects (accepted: secrets are not used by qimg).
    #[arg(long = "object")]
    pub object: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Runs `qimg commit`.
pub fn run(a: Args) -> Result<(), String> {
    let n = crate::Naming { image_opts: a.image_opts, force_share: false };
    let spec = crate::spec(&a.filename, a.format.as_deref(), n)?;
    // The top image alone: its own clusters are what is committed.
    let o = OpenOptions {
        format: a.format.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?,
        writable: !a.drop && a.base.is_none(),
        open_backing: false,
        backing_policy: crate::policy(),
        ..OpenOptions::default()
    };
    let top = Image::open_spec(&spec, &o).map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    let q = top.qcow2().ok_or("Image does not have a backing file")?;
    let h = q.header();
    let Some(backing) = h.backing_file.clone() else {
        return Err("Image does not have a backing file".into());
    };
    let base_path = resolve_relative(top.filename(), &backing);
    if let Some(b) = &a.base {
        let same = |x: &str, y: &str| match (std::fs::canonicalize(x), std::fs::canonicalize(y)) {
            (Ok(p), Ok(q)) => p == q,
            _ => x == y,
        };
        if !same(&resolve_relative(top.filename(), b), &base_path) && !same(b, &base_path) {
            return Err(format!("qimg commit -b supports only the image's own backing file ('{backing}'), not '{b}'"));
        }
    }
    let bo = OpenOptions {
        format: h.backing_format.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?,
        writable: true,
        backing_policy: crate::policy(),
        ..OpenOptions::default()
    };
    let base = Image::open(&base_path, &bo).map_err(|e| format!("Could not open '{base_path}': {e}"))?;
    let size = top.size();
    if base.size() < size {
        match base.qcow2() {
            Some(bq) => bq.resize(size).map_err(|e| format!("Could not resize the base image: {e}"))?,
            None => return Err(format!("the base image '{base_path}' is smaller than the top image")),
        }
    }
    let mut bar = crate::convert::Progress::new(size, a.progress && !a.quiet);
    let mut buf = vec![0u8; 2 << 20];
    let mut pos = 0u64;
    while pos < size {
        let st = top.block_status(pos, (size - pos).min(2 << 20)).map_err(|e| e.to_string())?;
        let len = st.len.clamp(1, size - pos);
        if st.depth == 0 && st.present {
            let r = if st.zero {
                base.write_zeroes(pos, len, true, false)
            } else {
                let b = &mut buf[..len as usize];
                top.read_at(b, pos).and_then(|()| base.write_at(b, pos, false))
            };
            r.map_err(|e| format!("error while committing at byte {pos}: {e}"))?;
        }
        pos += len;
        bar.set(pos);
    }
    base.flush().map_err(|e| format!("error while flushing the base image: {e}"))?;
    bar.finish();
    // With -b, qemu-img leaves the top image as it is (as with -d).
    if !a.drop && a.base.is_none() {
        q.make_empty().map_err(|e| format!("Could not empty the top image: {e}"))?;
    }
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(())
}
