//! `qimg bitmap`: qemu-img bitmap's operations on persistent dirty bitmaps (add, remove, clear, enable,
//! disable, merge), applied in command-line order, each a crash-safe rewrite of the bitmap set.

use qcow2::{Format, Image, OpenOptions};

/// `qimg bitmap`'s command line.
#[derive(clap::Args)]
pub struct Args {
    /// Add BITMAP (enabled unless --disable follows).
    #[arg(long)]
    pub add: bool,
    /// Remove BITMAP.
    #[arg(long)]
    pub remove: bool,
    /// Clear BITMAP (every bit clean).
    #[arg(long)]
    pub clear: bool,
    /// Enable BITMAP (it tracks writes).
    #[arg(long)]
    pub enable: bool,
    /// Disable BITMAP.
    #[arg(long)]
    pub disable: bool,
    /// Merge bitmap SOURCE (of this image, or of -b SOURCE_FILE) into BITMAP.
    #[arg(long, value_name = "SOURCE")]
    pub merge: Option<String>,
    /// Granularity of a new bitmap (with --add; default 64k).
    #[arg(short = 'g', long = "granularity")]
    pub granularity: Option<String>,
    /// The image holding the --merge source bitmap.
    #[arg(short = 'b', long = "source-file")]
    pub source_file: Option<String>,
    /// Format of the -b image.
    #[arg(short = 'F', long = "source-format")]
    pub source_format: Option<String>,
    /// Format of FILENAME.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// FILENAME is a set of image options.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Objects (accepted: secrets are not used by qimg).
    #[arg(long = "object")]
    pub object: Vec<String>,
    /// The image.
    pub filename: String,
    /// The bitmap.
    pub bitmap: String,
}

/// The operations in the order the command line gives them (qemu-img applies them in that order).
fn operations(a: &Args) -> Vec<&'static str> {
    let mut ops: Vec<(usize, &'static str)> = Vec::new();
    let args: Vec<String> = std::env::args().collect();
    for (name, on) in [
        ("add", a.add),
        ("remove", a.remove),
        ("clear", a.clear),
        ("enable", a.enable),
        ("disable", a.disable),
        ("merge", a.merge.is_some()),
    ] {
        if on {
            let flag = format!("--{name}");
            let at = args.iter().position(|x| *x == flag || x.starts_with(&format!("{flag}="))).unwrap_or(usize::MAX);
            ops.push((at, name));
        }
    }
    ops.sort();
    ops.into_iter().map(|(_, n)| n).collect()
}

/// Runs `qimg bitmap`.
pub fn run(a: Args) -> Result<(), String> {
    let ops = operations(&a);
    if ops.is_empty() {
        return Err("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into());
    }
    if a.granularity.is_some() && !a.add {
        return Err("granularity only supported with --add".into());
    }
    if a.source_file.is_some() && a.merge.is_none() {
        return Err("-b requires --merge".into());
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        return Err("-F requires -b".into());
    }
    let granularity = match &a.granularity {
        Some(g) => crate::size::parse_size(g)?,
        None => 65536,
    };
    let n = crate::Naming { image_opts: a.image_opts, force_share: false };
    let spec = crate::spec(&a.filename, a.format.as_deref(), n)?;
    let o = crate::change_options(a.format.as_deref(), false)?;
    let img = Image::open_spec(&spec, &o).map_err(|e| crate::open_error(&a.filename, e))?;
    let q = img.qcow2().ok_or("Bitmaps are only supported by qcow2 images")?;
    let name = a.bitmap.as_str();
    for op in ops {
        let r = match op {
            "add" => q.bitmap_add(name, granularity, true),
            "remove" => q.bitmap_remove(name),
            "clear" => q.bitmap_clear(name),
            "enable" => q.bitmap_set_enabled(name, true),
            "disable" => q.bitmap_set_enabled(name, false),
            _ => merge(q, &a, name),
        };
        r.map_err(|e| format!("Operation {op} on bitmap {name} failed: {e}"))?;
    }
    Ok(())
}

fn merge(q: &qcow2::image::Qcow2, a: &Args, name: &str) -> qcow2::Result<()> {
    let src_name = a.merge.as_deref().unwrap_or("");
    let not_found =
        || qcow2::Error::new(qcow2::ErrorKind::InvalidArgument, format!("Dirty bitmap '{src_name}' not found"));
    let map = match &a.source_file {
        None => q.dirty_map(src_name)?,
        Some(f) => {
            let o = OpenOptions {
                format: a.source_format.as_deref().map(Format::parse).transpose()?,
                force_share: true,
                open_backing: false,
                backing_policy: crate::policy(),
                ..OpenOptions::default()
            };
            let src = Image::open(f, &o)?;
            if qcow2::BlockDevice::size(src.as_ref()) != q.size() {
                return Err(qcow2::Error::new(
                    qcow2::ErrorKind::InvalidArgument,
                    "Bitmaps are of different sizes".to_string(),
                ));
            }
            match src.qcow2() {
                Some(sq) => sq.dirty_map(src_name)?,
                None => None,
            }
        }
    };
    let map = map.ok_or_else(not_found)?;
    q.bitmap_merge(name, &map)
}
