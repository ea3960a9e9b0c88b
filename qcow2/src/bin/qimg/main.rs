//! `qimg`: a qemu-img-compatible subset (info, map, convert, compare) built on the qcow2 crate.

mod amend;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod dd;
mod info;
mod json;
mod map;
mod measure;
mod rebase;
mod resize;
mod size;
mod snapshot;

use clap::{Parser, Subcommand, ValueEnum};

/// Large buffers placed where the kernel copies into and out of them at full speed (`qcow2::alloc`).
#[global_allocator]
static ALLOC: qcow2::alloc::IoAlloc = qcow2::alloc::IoAlloc;
use qcow2::{Format, Image, OpenOptions};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "qimg", version, about = "qemu-img compatible image tool (qcow2 and raw)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Which backing and external data file names in image headers are followed: any (qemu's behaviour),
    /// relative (only names inside the image's folder), none (no backing file).
    #[arg(long = "backing-policy", global = true, value_name = "any|relative|none", default_value = "any")]
    backing_policy: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new image (qemu-img create).
    Create {
        /// Format (qcow2 or raw).
        #[arg(short = 'f', long = "format", default_value = "raw")]
        format: String,
        /// Backing file.
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F', long = "backing-format")]
        backing_fmt: Option<String>,
        /// Do not open the backing file (its size must then be given).
        #[arg(short = 'u', long = "backing-unsafe")]
        unsafe_backing: bool,
        /// Options: cluster_size, compat, lazy_refcounts, extended_l2, refcount_bits, compression_type,
        /// preallocation, data_file, data_file_raw, backing_file, backing_fmt, size.
        #[arg(short = 'o', long = "options")]
        options: Vec<String>,
        /// Quiet.
        #[arg(short = 'q', long = "quiet")]
        quiet: bool,
        /// Objects (accepted: secrets are not used by qimg).
        #[arg(long = "object")]
        object: Vec<String>,
        /// The new image.
        filename: String,
        /// Virtual size (defaults to the backing file's).
        size: Option<String>,
    },
    /// Check an image's consistency (qemu-img check).
    Check {
        /// Format.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Repair: leaks or all.
        #[arg(short = 'r', long = "repair")]
        repair: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Quiet.
        #[arg(short = 'q', long = "quiet")]
        quiet: bool,
        /// Open even if another process is writing it (no lock that stops a writer).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image names are sets of image options (`driver=qcow2,file.filename=...`).
        #[arg(long = "image-opts")]
        image_opts: bool,
        /// Cache mode (none or directsync: O_DIRECT; accepted otherwise).
        #[arg(short = 'T', long = "cache")]
        cache: Option<String>,
        /// Objects (accepted: secrets are not used by qimg).
        #[arg(long = "object")]
        object: Vec<String>,
        /// The image.
        filename: String,
    },
    /// Change an image's virtual size (qemu-img resize).
    Resize {
        /// Format.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Allow shrinking (raw only).
        #[arg(long)]
        shrink: bool,
        /// Quiet.
        #[arg(short = 'q', long = "quiet")]
        quiet: bool,
        /// How the new area is allocated: off, metadata (qcow2), falloc, full.
        #[arg(long = "preallocation")]
        preallocation: Option<String>,
        /// FILENAME is a set of image options (`driver=qcow2,file.filename=...`).
        #[arg(long = "image-opts")]
        image_opts: bool,
        /// Objects (accepted: secrets are not used by qimg).
        #[arg(long = "object")]
        object: Vec<String>,
        /// The image.
        filename: String,
        /// New size, or +SIZE / -SIZE.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Show information about an image (qemu-img info).
    Info {
        /// Image format (raw, qcow2); probed when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Show every image of the backing chain.
        #[arg(short = 'b', long)]
        backing_chain: bool,
        /// Open even if another process is writing it (no lock that stops a writer).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// FILENAME is a set of image options (`driver=qcow2,file.filename=...`).
        #[arg(long = "image-opts")]
        image_opts: bool,
        /// Objects (accepted: secrets are not used by qimg).
        #[arg(long = "object")]
        object: Vec<String>,
        /// The image.
        filename: String,
    },
    /// Show how the image's guest ranges are stored (qemu-img map).
    Map {
        /// Image format.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// First guest offset to map.
        #[arg(long = "start-offset", default_value = "0")]
        start_offset: String,
        /// Bytes to map.
        #[arg(long = "max-length")]
        max_length: Option<String>,
        /// Open even if another process is writing it (no lock that stops a writer).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image names are sets of image options (`driver=qcow2,file.filename=...`).
        #[arg(long = "image-opts")]
        image_opts: bool,
        /// Objects (accepted: secrets are not used by qimg).
        #[arg(long = "object")]
        object: Vec<String>,
        /// The image.
        filename: String,
    },
    /// Copy one or more images (concatenated) into a raw or qcow2 image (qemu-img convert).
    Convert(convert::Args),
    /// List, create, apply and delete internal snapshots (qemu-img snapshot).
    Snapshot(snapshot::Args),
    /// Change options of an existing image (qemu-img amend).
    Amend(amend::Args),
    /// Write an image's data into its backing file (qemu-img commit).
    Commit(commit::Args),
    /// Change the backing file of an image (qemu-img rebase).
    Rebase(rebase::Args),
    /// Copy part of an image into a new one, dd style (qemu-img dd).
    Dd(dd::Args),
    /// Change persistent dirty bitmaps (qemu-img bitmap).
    Bitmap(bitmap::Args),
    /// Compute the size a new image needs (qemu-img measure).
    Measure {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Format of the new image (default raw).
        #[arg(short = 'O', long = "target-format", default_value = "raw")]
        out_format: String,
        /// Options of the new image (cluster_size, refcount_bits, extended_l2, compat, preallocation, ...).
        #[arg(short = 'o', long = "options")]
        options: Vec<String>,
        /// Measure an empty image of this size instead of a source.
        #[arg(short = 's', long)]
        size: Option<String>,
        /// Source format.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Measure an internal snapshot of the source (snapshot.name=, snapshot.id= or an ID or name).
        #[arg(short = 'l', long = "snapshot")]
        snapshot: Option<String>,
        /// Open even if another process is writing it.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The source is a set of image options.
        #[arg(long = "image-opts")]
        image_opts: bool,
        /// Objects (accepted: secrets are not used by qimg).
        #[arg(long = "object")]
        object: Vec<String>,
        /// The source image.
        filename: Option<String>,
    },
    /// Compare the contents of two images (qemu-img compare).
    Compare {
        /// Format of the first image.
        #[arg(short = 'f', long = "a-format")]
        format1: Option<String>,
        /// Format of the second image.
        #[arg(short = 'F', long = "b-format")]
        format2: Option<String>,
        /// Quiet.
        #[arg(short = 'q', long = "quiet")]
        quiet: bool,
        /// Show progress.
        #[arg(short = 'p', long = "progress")]
        progress: bool,
        /// Strict mode: sizes and allocation status must match too.
        #[arg(short = 's', long = "strict")]
        strict: bool,
        /// Open even if another process is writing it (no lock that stops a writer).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image names are sets of image options (`driver=qcow2,file.filename=...`).
        #[arg(long = "image-opts")]
        image_opts: bool,
        /// Cache mode (none or directsync: O_DIRECT).
        #[arg(short = 'T', long = "cache")]
        cache: Option<String>,
        /// Objects (accepted: secrets are not used by qimg).
        #[arg(long = "object")]
        object: Vec<String>,
        /// First image.
        a: String,
        /// Second image.
        b: String,
    },
}

/// How the user named an image and how to share it.
#[derive(Clone, Copy, Default)]
pub(crate) struct Naming {
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-U`.
    pub force_share: bool,
}

/// `--backing-policy`, read once in `main`.
static POLICY: std::sync::OnceLock<qcow2::BackingPolicy> = std::sync::OnceLock::new();

/// The backing policy the user chose.
pub(crate) fn policy() -> qcow2::BackingPolicy {
    POLICY.get().copied().unwrap_or_default()
}

/// The image spec for `path` (`--image-opts` list, `json:` name or file name).
pub(crate) fn spec(path: &str, fmt: Option<&str>, n: Naming) -> Result<qcow2::spec::ImageSpec, String> {
    if n.image_opts && fmt.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    let s = if n.image_opts {
        qcow2::spec::ImageSpec::parse_opts(path)
    } else {
        qcow2::spec::ImageSpec::parse_filename(path)
    };
    s.map_err(|e| format!("Could not open '{path}': {e}"))
}

fn open(path: &str, fmt: Option<&str>, backing: bool, n: Naming) -> Result<Arc<Image>, String> {
    open_with(path, fmt, backing, n, false)
}

/// `open` of an internal snapshot (`-l`: `snapshot.name=N`, `snapshot.id=I` or an ID or name), read-only.
fn open_snapshot(path: &str, fmt: Option<&str>, n: Naming, snapshot: Option<String>) -> Result<Arc<Image>, String> {
    let Some(snap) = snapshot else {
        return open(path, fmt, true, n);
    };
    let snap = snap
        .split(',')
        .find_map(|p| p.strip_prefix("snapshot.name=").or_else(|| p.strip_prefix("snapshot.id=")))
        .map(str::to_string)
        .unwrap_or(snap);
    let format = fmt.map(Format::parse).transpose().map_err(|e| format!("Could not open '{path}': {e}"))?;
    let o = OpenOptions {
        format,
        force_share: n.force_share,
        backing_policy: policy(),
        snapshot: Some(snap),
        ..OpenOptions::default()
    };
    let spec = spec(path, fmt, n)?;
    Image::open_spec(&spec, &o).map_err(|e| e.to_string())
}

/// `open` with the backing chain, with O_DIRECT if `direct` (`-T none`).
fn open_direct(path: &str, fmt: Option<&str>, n: Naming, direct: bool) -> Result<Arc<Image>, String> {
    if !direct {
        return open(path, fmt, true, n);
    }
    let o = OpenOptions {
        format: fmt.map(Format::parse).transpose().map_err(|e| format!("Could not open '{path}': {e}"))?,
        force_share: n.force_share,
        backing_policy: policy(),
        direct: true,
        ..OpenOptions::default()
    };
    Image::open_spec(&spec(path, fmt, n)?, &o).map_err(|e| format!("Could not open '{path}': {e}"))
}

/// How `qimg bitmap`, `snapshot` and `amend` open the image they change: read-write, without its backing
/// chain, bitmaps kept rather than tracked.
pub(crate) fn change_options(fmt: Option<&str>, resize: bool) -> Result<OpenOptions, String> {
    Ok(OpenOptions {
        format: fmt.map(Format::parse).transpose().map_err(|e| e.to_string())?,
        writable: true,
        open_backing: false,
        backing_policy: policy(),
        manage_bitmaps: true,
        resize,
        ..OpenOptions::default()
    })
}

/// The message of an image that did not open: the library's when it names the image already, else qemu-img's
/// "Could not open 'NAME': ..." around it.
pub(crate) fn open_error(name: &str, e: qcow2::Error) -> String {
    let s = e.to_string();
    if s.starts_with("Could not open") {
        s
    } else {
        format!("Could not open '{name}': {s}")
    }
}

/// `open`; `metadata_only` as qemu-img info opens images (no external data file, no guest data).
fn open_with(
    path: &str,
    fmt: Option<&str>,
    backing: bool,
    n: Naming,
    metadata_only: bool,
) -> Result<Arc<Image>, String> {
    let format = fmt.map(Format::parse).transpose().map_err(|e| format!("Could not open '{path}': {e}"))?;
    let o = OpenOptions {
        format,
        open_backing: backing,
        force_share: n.force_share,
        backing_policy: policy(),
        metadata_only,
        ..OpenOptions::default()
    };
    let spec = spec(path, fmt, n)?;
    Image::open_spec(&spec, &o).map_err(|e| open_error(path, e))
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.cmd {
        Cmd::Create { format, backing, backing_fmt, unsafe_backing, options, quiet, filename, size, .. } => {
            create::run(
                &format,
                &filename,
                size.as_deref(),
                backing.as_deref(),
                backing_fmt.as_deref(),
                unsafe_backing,
                &options,
                quiet,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { format, repair, output, quiet, filename, force_share, image_opts, .. } => {
            let n = Naming { image_opts, force_share };
            let c = check::run(&filename, format.as_deref(), repair.as_deref(), output == Output::Json, quiet, n)?;
            Ok(ExitCode::from(c))
        }
        Cmd::Resize { format, shrink, quiet, filename, size, preallocation, image_opts, .. } => {
            let n = Naming { image_opts, force_share: false };
            resize::run(&filename, format.as_deref(), n, &size, shrink, preallocation.as_deref(), quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Info { format, output, backing_chain, filename, force_share, image_opts, .. } => {
            let img = open_with(&filename, format.as_deref(), backing_chain, Naming { image_opts, force_share }, true)?;
            let mut chain = vec![img.clone()];
            if backing_chain {
                let mut cur = img;
                while let Some(b) = cur.backing().cloned() {
                    chain.push(b.clone());
                    cur = b;
                }
            }
            match output {
                Output::Json => {
                    let v: Vec<_> = chain.iter().map(|i| info::info_json(i)).collect();
                    let v = if backing_chain { serde_json::Value::Array(v) } else { v[0].clone() };
                    println!("{}", json::pretty(&v));
                }
                Output::Human => {
                    let parts: Vec<_> = chain.iter().map(|i| info::info_human(i)).collect();
                    print!("{}", parts.join("\n"));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Map { format, output, start_offset, max_length, filename, force_share, image_opts, .. } => {
            let start = size::parse_size(&start_offset)?;
            let len = max_length.as_deref().map(size::parse_size).transpose()?;
            let img = open(&filename, format.as_deref(), true, Naming { image_opts, force_share })?;
            map::run(&img, output == Output::Json, start, len)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Snapshot(a) => {
            snapshot::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Amend(a) => {
            amend::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Commit(a) => {
            commit::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rebase(a) => {
            rebase::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dd(a) => {
            dd::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bitmap(a) => {
            bitmap::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Convert(a) => {
            convert::run(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Measure {
            output, out_format, options, size, format, snapshot, force_share, image_opts, filename, ..
        } => {
            let t = measure::target(&out_format, &options)?;
            let size = size.as_deref().map(size::parse_size).transpose()?;
            let src = match (&filename, size) {
                (Some(_), Some(_)) => return Err("--size N cannot be used together with a filename.".into()),
                (None, None) => return Err("Either --size N or one filename must be specified.".into()),
                (Some(f), None) => {
                    Some(open_snapshot(f, format.as_deref(), Naming { image_opts, force_share }, snapshot)?)
                }
                (None, Some(_)) => None,
            };
            let r = measure::measure(src.as_deref(), size, &t)?;
            measure::print(r, output == Output::Json);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Compare { format1, format2, quiet, strict, progress, cache, a, b, force_share, image_opts, .. } => {
            let n = Naming { image_opts, force_share };
            let direct = match cache.as_deref() {
                None | Some("writeback" | "unsafe" | "writethrough") => false,
                Some("none" | "off" | "directsync") => true,
                Some(c) => return Err(format!("Invalid source cache option: {c}")),
            };
            let ia = open_direct(&a, format1.as_deref(), n, direct)?;
            let ib = open_direct(&b, format2.as_deref(), n, direct)?;
            match compare::run(&ia, &ib, quiet, strict, progress && !quiet) {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => Ok(ExitCode::from(1)),
                Err(e) => {
                    eprintln!("qimg: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match qcow2::BackingPolicy::parse(&cli.backing_policy) {
        Ok(p) => {
            let _ = POLICY.set(p);
        }
        Err(e) => {
            eprintln!("qimg: {e}");
            return ExitCode::FAILURE;
        }
    }
    let is_compare = matches!(cli.cmd, Cmd::Compare { .. });
    match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qimg: {e}");
            // qemu-img compare uses 2 for errors; everything else 1.
            ExitCode::from(if is_compare { 2 } else { 1 })
        }
    }
}
