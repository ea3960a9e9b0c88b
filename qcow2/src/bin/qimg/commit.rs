//! `qimg commit`: qemu-img commit into the image's backing file, or with `-b BASE` into any image further down
//! its chain. What the images above the base hold (the topmost one where several do) is written into the base
//! (through its own writer and metadata commit); then, unless `-d` or `-b`, the top image is emptied
//! (`Qcow2::make_empty`), so the chain reads the same bytes as before. Images between the top and the base
//! are left as they are, as qemu-img leaves them.

use qcow2::chain::resolve_relative;
use qcow2::{BlockDevice, Format, Image, OpenOptions};

/// `qimg commit`'s command line.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the image.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Commit into this image of the chain; the top image is then left as it is, as qemu-img does.
    #[arg(short = 'b', long = "base")]
    pub base: Option<String>,
    /// Keep the top image as it is (do not empty it).
    #[arg(short = 'd', long = "drop")]
    pub drop: bool,
    /// Cache mode (accepted).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Rate limit in bytes per second (suffixes k, M, G...) for what is written.
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
    let rate = a
        .rate
        .as_deref()
        .map(|r| crate::size::parse_size(r).map_err(|_| format!("Invalid rate limit specified: '{r}'.")))
        .transpose()?;
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
    let same = |x: &str, y: &str| match (std::fs::canonicalize(x), std::fs::canonicalize(y)) {
        (Ok(p), Ok(q)) => p == q,
        _ => x == y,
    };
    // The images above the base, each alone (its own allocation decides), top first.
    let mut above: Vec<std::sync::Arc<Image>> = vec![top.clone()];
    let (mut base_path, mut base_fmt) = (resolve_relative(top.filename(), &backing), h.backing_format.clone());
    if let Some(b) = &a.base {
        let missing = || format!("Did not find '{b}' in the backing chain of '{}'", a.filename);
        loop {
            let named = resolve_relative(above[0].filename(), b);
            if same(b, &base_path) || same(&named, &base_path) {
                break;
            }
            if above.len() >= qcow2::limits::DEFAULT_MAX_CHAIN_DEPTH {
                return Err(missing());
            }
            let lo = OpenOptions {
                format: base_fmt.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?,
                open_backing: false,
                backing_policy: crate::policy(),
                ..OpenOptions::default()
            };
            let layer = Image::open(&base_path, &lo).map_err(|e| format!("Could not open '{base_path}': {e}"))?;
            let next = layer
                .qcow2()
                .and_then(|q| q.header().backing_file.clone().map(|f| (f, q.header().backing_format.clone())));
            let Some((f, fmt)) = next else { return Err(missing()) };
            let next_path = resolve_relative(layer.filename(), &f);
            if above.iter().any(|l| same(l.filename(), &next_path)) || same(&base_path, &next_path) {
                return Err(format!("the backing chain of '{}' has a loop", a.filename));
            }
            above.push(layer);
            (base_path, base_fmt) = (next_path, fmt);
        }
    }
    let bo = OpenOptions {
        format: base_fmt.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?,
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
    let (start, mut written) = (std::time::Instant::now(), 0u64);
    while pos < size {
        // The topmost image above the base that holds this range, if any (past the end of an image, the chain
        // reads zeros: that image decides too).
        let mut len = (size - pos).min(2 << 20);
        let mut source: Option<(usize, bool)> = None;
        for (i, l) in above.iter().enumerate() {
            if pos >= l.size() {
                source = Some((i, true));
                break;
            }
            len = len.min(l.size() - pos);
            let st = l.block_status(pos, len).map_err(|e| e.to_string())?;
            len = st.len.clamp(1, len);
            if st.depth == 0 && st.present {
                source = Some((i, st.zero));
                break;
            }
        }
        let r = match source {
            None => Ok(()),
            Some((_, true)) => base.write_zeroes(pos, len, true, false),
            Some((i, false)) => {
                let b = &mut buf[..len as usize];
                above[i].read_at(b, pos).and_then(|()| base.write_at(b, pos, false))
            }
        };
        r.map_err(|e| format!("error while committing at byte {pos}: {e}"))?;
        if source.is_some() {
            written += len;
            crate::convert::throttle(start, written, rate);
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
