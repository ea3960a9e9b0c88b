//! `qimg amend -o OPTIONS IMG`: qemu-img amend for qcow2 images: `compat` (0.10 and 1.1), `lazy_refcounts`,
//! `refcount_bits`, `size` (growing), `data_file` (a new name) and `data_file_raw=off`, with qemu-img's refusals for the rest. Each
//! change is one crash-safe step of its own (`qcow2::image::amend`, `qcow2::image::snapshots`), applied in
//! qemu's order: a version upgrade first, a downgrade last.

use qcow2::Image;

/// `qimg amend`'s command line.
#[derive(clap::Args)]
pub struct Args {
    /// Options to change (NAME=VALUE, comma-separated; `-o help` lists them).
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Format of the image.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode (accepted; qimg syncs what it changes).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Allow changes qemu-img guards with --force (accepted).
    #[arg(long = "force")]
    pub force: bool,
    /// FILENAME is a set of image options.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Objects (accepted: secrets are not used by qimg).
    #[arg(long = "object")]
    pub object: Vec<String>,
    /// The image.
    pub filename: String,
}

const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Options qemu accepts only when creating an image.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "nocow",
];

/// What the command line asks for.
#[derive(Default, Debug)]
struct Wanted {
    version: Option<u32>,
    lazy: Option<bool>,
    refcount_bits: Option<u64>,
    size: Option<u64>,
    data_file_raw: Option<bool>,
    data_file: Option<String>,
}

fn bool_opt(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
    }
}

fn parse(options: &[String]) -> Result<Wanted, String> {
    let mut w = Wanted::default();
    for group in options {
        for kv in group.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "compat" => {
                    w.version = Some(match v {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(format!("Unknown compatibility level {v}")),
                    })
                }
                "lazy_refcounts" => w.lazy = Some(bool_opt(k, v)?),
                "refcount_bits" => {
                    let n: u64 = v.parse().map_err(|_| format!("Parameter '{k}' expects a number"))?;
                    if n == 0 || n > 64 || !n.is_power_of_two() {
                        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
                    }
                    w.refcount_bits = Some(n);
                }
                "size" => {
                    w.size = Some(crate::size::parse_size(v).map_err(|_| {
                        format!(
                            "Parameter '{k}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P \
                             or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
                        )
                    })?)
                }
                "backing_file" | "backing_fmt" => {
                    return Err("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into())
                }
                "data_file" => w.data_file = Some(v.to_string()),
                "data_file_raw" => w.data_file_raw = Some(bool_opt(k, v)?),
                _ if CREATE_ONLY.contains(&k) => {
                    return Err(format!("Invalid parameter '{k}'\nThis option is only supported for image creation"))
                }
                _ if k.starts_with("encrypt.") => {
                    return Err("Can't amend encryption options - encryption not present".into())
                }
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
    }
    Ok(w)
}

/// Runs `qimg amend`.
pub fn run(a: Args) -> Result<(), String> {
    if a.options.is_empty() {
        return Err("Must specify options (-o)\nTry 'qemu-img amend --help' for more info".into());
    }
    if a.options.iter().any(|o| o.split(',').any(|k| k == "help" || k == "?")) {
        print!("{HELP}");
        return Ok(());
    }
    let w = parse(&a.options)?;
    let n = crate::Naming { image_opts: a.image_opts, force_share: false };
    let spec = crate::spec(&a.filename, a.format.as_deref(), n)?;
    let o = crate::change_options(a.format.as_deref(), w.size.is_some())?;
    let open = || Image::open_spec(&spec, &o).map_err(|e| crate::open_error(&a.filename, e));
    let img = open()?;
    let Some(q) = img.qcow2() else {
        return Err(format!("Format driver '{}' does not support option amendment", img.format().name()));
    };
    let h = q.header().clone();
    let short_entries = q.snapshot_entries_too_short_for_v3();
    let version = w.version.unwrap_or(h.version);
    if version < 3 && w.lazy == Some(true) {
        return Err(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into()
        );
    }
    let order = w.refcount_bits.map(|b| b.trailing_zeros()).unwrap_or(h.refcount_order);
    if version < 3 && order != 4 {
        return Err(if w.refcount_bits.is_some() {
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
                .into()
        } else {
            "compat=0.10 requires refcount_bits=16".into()
        });
    }
    if w.data_file.is_some() && h.incompatible_features & qcow2::format::header::INCOMPAT_DATA_FILE == 0 {
        return Err("data-file can only be set for images that use an external data file".into());
    }
    if w.data_file_raw == Some(true) {
        return Err("data-file-raw cannot be set on existing images".into());
    }
    if w.size.is_some_and(|s| s < q.size()) {
        return Err("shrinking a qcow2 image is not supported by qimg".into());
    }
    if a.progress && !a.quiet {
        print!("    (0.00/100%)\r");
    }
    // Each step leaves the handle stale (it rewrote the header): the image is opened again for the next.
    let mut img = Some(img);
    let mut step = |f: &dyn Fn(&qcow2::image::Qcow2) -> qcow2::Result<()>| -> Result<(), String> {
        let i = match img.take() {
            Some(i) => i,
            None => open()?,
        };
        let q = i.qcow2().ok_or("not a qcow2 image")?;
        f(q).map_err(|e| e.to_string())
    };
    if version == 3 && h.version < 3 {
        // Version 3 wants every snapshot entry to carry its disk size: complete old entries first (as qemu's
        // upgrade rewrites the table), then switch the version.
        if short_entries {
            step(&|q| q.complete_snapshot_entries())?;
        }
        step(&|q| q.set_version(3))?;
    }
    if let Some(on) = w.lazy {
        step(&|q| q.set_lazy_refcounts(on))?;
    }
    if let Some(name) = &w.data_file {
        step(&|q| q.set_data_file_name(name))?;
    }
    if order != h.refcount_order {
        step(&|q| q.set_refcount_order(order))?;
    }
    if w.data_file_raw == Some(false) {
        step(&|q| q.set_data_file_raw_off())?;
    }
    if let Some(s) = w.size.filter(|&s| s > h.size) {
        step(&|q| q.resize(s))?;
    }
    if version == 2 && h.version > 2 {
        step(&|q| q.set_version(2))?;
    }
    if a.progress && !a.quiet {
        println!("    (100.00/100%)\r");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_accumulate_and_later_ones_win() {
        let w = parse(&["compat=0.10,lazy_refcounts=on".into(), "compat=1.1".into()]).unwrap();
        assert_eq!((w.version, w.lazy), (Some(3), Some(true)));
        assert!(parse(&["refcount_bits=3".into()]).unwrap_err().contains("power of two"));
        assert!(parse(&["cluster_size=4k".into()]).unwrap_err().contains("only supported for image creation"));
        assert!(parse(&["bogus=1".into()]).unwrap_err().contains("Invalid parameter 'bogus'"));
        assert!(parse(&["compat=0.9".into()]).unwrap_err().contains("Unknown compatibility level 0.9"));
    }
}
