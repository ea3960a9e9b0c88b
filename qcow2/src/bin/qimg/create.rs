//! `qimg create`: qemu-img create for qcow2 and raw, with qemu-img's options and its "Formatting" line.

use crate::size::parse_size;
use qcow2::format::header::CompressionType;
use qcow2::image::create::{build, CreateOptions};
use qcow2::image::Prealloc;
use qcow2::{BlockDevice, Format, Image, OpenOptions};

fn on_off(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
    }
}

/// Runs `create`; prints qemu-img's "Formatting ..." line unless quiet.
#[allow(clippy::too_many_arguments)]
pub fn run(
    fmt: &str,
    file: &str,
    size: Option<&str>,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    unsafe_backing: bool,
    opts: &[String],
    quiet: bool,
) -> Result<(), String> {
    if qcow2::remote::is_remote(file) {
        return Err(format!(
            "Could not create '{file}': remote images are read-only here; publish one with qimg convert -O FMT SRC {file}"
        ));
    }
    let mut o = CreateOptions::default();
    let mut prealloc = "off".to_string();
    let mut backing = backing.map(str::to_string);
    let mut backing_fmt = backing_fmt.map(str::to_string);
    let mut size_opt: Option<u64> = None;
    // Options qemu-img prints in its "Formatting" line only when given, as given.
    let mut compat_given: Option<String> = None;
    let mut prealloc_given = false;
    let mut data_file_raw_given: Option<String> = None;
    for kv in opts.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
        match k {
            "size" => size_opt = Some(parse_size(v)?),
            "cluster_size" => o.cluster_size = parse_size(v)?,
            "compat" => {
                compat_given = Some(v.to_string());
                o.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(format!("Invalid parameter '{v}' for 'compat'")),
                }
            }
            "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
            "extended_l2" => o.extended_l2 = on_off(k, v)?,
            "refcount_bits" => o.refcount_bits = v.parse().map_err(|_| format!("Invalid refcount_bits '{v}'"))?,
            "compression_type" => {
                o.compression = match v {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(format!("Invalid parameter '{v}' for 'compression_type'")),
                }
            }
            "backing_file" => backing = Some(v.to_string()),
            "backing_fmt" => backing_fmt = Some(v.to_string()),
            "data_file" => o.data_file = Some(v.to_string()),
            "data_file_raw" => {
                o.data_file_raw = on_off(k, v)?;
                data_file_raw_given = Some(v.to_string());
            }
            "preallocation" => match v {
                "off" | "metadata" | "falloc" | "full" => {
                    prealloc = v.to_string();
                    prealloc_given = true;
                }
                _ => return Err(format!("Invalid parameter '{v}' for 'preallocation'")),
            },
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    let format = Format::parse(fmt).map_err(|e| e.to_string())?;
    let mut size = match (size.map(parse_size).transpose()?, size_opt) {
        (Some(_), Some(_)) => return Err(format!("{file}: The image size must be specified only once")),
        (Some(s), None) | (None, Some(s)) => Some(s),
        (None, None) => None,
    };
    if let Some(b) = &backing {
        if format == Format::Raw {
            return Err("'raw' does not support backing files".into());
        }
        let full = qcow2::chain::resolve_relative(file, b);
        let bf = backing_fmt.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?;
        // Only the size is read: like qemu-img, share the backing file with whoever uses it.
        match Image::open(&full, &OpenOptions { format: bf, force_share: true, ..Default::default() }) {
            Ok(img) => {
                if backing_fmt.is_none() {
                    // qemu-img 10 no longer records a probed backing format: the user must say it.
                    return Err(format!(
                        "{file}: Backing file specified without backing format\nDetected format of {}.",
                        img.format().name()
                    ));
                }
                if size.is_none() {
                    size = Some(img.size());
                }
            }
            Err(e) if !unsafe_backing => return Err(format!("{file}: {e}\nCould not open backing image.")),
            Err(_) if backing_fmt.is_none() => {
                return Err(format!("{file}: Backing file specified without backing format"));
            }
            Err(_) => {}
        }
    }
    let Some(size) = size else {
        return Err(format!("{file}: Image creation needs a size parameter"));
    };
    match format {
        Format::Raw => {
            if !quiet {
                let pre = if prealloc_given { format!(" preallocation={prealloc}") } else { String::new() };
                println!("Formatting '{file}', fmt=raw size={size}{pre}");
            }
            let f = std::fs::File::create(file).map_err(|e| format!("{file}: Could not create '{file}': {e}"))?;
            let block_device = {
                use std::os::unix::fs::FileTypeExt;
                f.metadata().map(|m| m.file_type().is_block_device()).unwrap_or(false)
            };
            if block_device {
                // A block device is "created" by checking it is large enough (qemu's host_device driver).
                use std::io::Seek;
                let len = (&f).seek(std::io::SeekFrom::End(0)).map_err(|e| format!("{file}: {e}"))?;
                if len < size {
                    return Err(format!("{file}: Image size {len} is too small for the requested size {size}"));
                }
            } else {
                f.set_len(size).map_err(|e| format!("{file}: Could not resize file: {e}"))?;
            }
            if prealloc == "falloc" && !block_device && size > 0 {
                let len = libc::off_t::try_from(size).map_err(|_| format!("{file}: size {size} is too large"))?;
                nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len)
                    .map_err(|e| format!("{file}: Could not preallocate data for the new file: {e}"))?;
            }
            if prealloc == "full" {
                use std::os::unix::fs::FileExt;
                let zeros = vec![0u8; 1 << 20];
                let mut p = 0;
                while p < size {
                    let n = (size - p).min(zeros.len() as u64) as usize;
                    f.write_all_at(&zeros[..n], p).map_err(|e| e.to_string())?;
                    p += n as u64;
                }
            }
            Ok(())
        }
        Format::Qcow2 => {
            if prealloc != "off" && backing.is_some() && !o.extended_l2 {
                return Err(format!(
                    "{file}: Backing file and preallocation can only be used at the same time if extended_l2 is on"
                ));
            }
            o.size = size;
            o.backing_file = backing.clone();
            o.backing_format = backing_fmt.clone();
            if !quiet {
                let pre = if prealloc_given { format!(" preallocation={prealloc}") } else { String::new() };
                let mut line = format!(
                    "Formatting '{file}', fmt=qcow2 cluster_size={} extended_l2={}{pre} compression_type={} size={size}",
                    o.cluster_size,
                    if o.extended_l2 { "on" } else { "off" },
                    o.compression.qemu_name()
                );
                if let Some(v) = &compat_given {
                    line += &format!(" compat={v}");
                }
                if let Some(b) = &backing {
                    line += &format!(" backing_file={b}");
                }
                if let Some(f) = &backing_fmt {
                    line += &format!(" backing_fmt={f}");
                }
                if let Some(d) = &o.data_file {
                    line += &format!(" data_file={d}");
                }
                if let Some(v) = &data_file_raw_given {
                    line += &format!(" data_file_raw={v}");
                }

                line += &format!(
                    " lazy_refcounts={} refcount_bits={}",
                    if o.lazy_refcounts { "on" } else { "off" },
                    o.refcount_bits
                );
                println!("{line}");
            }
            let bytes = build(&o).map_err(|e| format!("{file}: {e}"))?;
            if let Some(d) = &o.data_file {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(d)
                    .map_err(|e| format!("{file}: Could not create '{d}': {e}"))?;
                f.set_len(0).map_err(|e| e.to_string())?;
                f.set_len(size).map_err(|e| e.to_string())?;
            }
            std::fs::write(file, bytes).map_err(|e| format!("{file}: Could not create '{file}': {e}"))?;
            let mode = match prealloc.as_str() {
                "metadata" => Some(Prealloc::Metadata),
                "falloc" => Some(Prealloc::Falloc),
                "full" => Some(Prealloc::Full),
                _ => None,
            };
            if let Some(mode) = mode {
                let img = Image::open(
                    file,
                    &OpenOptions {
                        format: Some(Format::Qcow2),
                        writable: true,
                        open_backing: false,
                        ..Default::default()
                    },
                )
                .map_err(|e| format!("{file}: {e}"))?;
                let q = img.qcow2().ok_or("not a qcow2 image")?;
                q.preallocate(mode).map_err(|e| format!("{file}: preallocation failed: {e}"))?;
            }
            Ok(())
        }
    }
}
