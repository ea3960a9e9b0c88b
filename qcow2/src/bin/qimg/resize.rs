//! `qimg resize IMG [+|-]SIZE`: grow qcow2 and raw images, with `--preallocation` of the new area as
//! qemu-img does it (shrinking needs --shrink, raw only).

use crate::size::parse_size;
use qcow2::image::Prealloc;
use qcow2::{BlockDevice, Format, Image, Layer, OpenOptions};

/// Runs resize.
pub fn run(
    file: &str,
    fmt: Option<&str>,
    n: crate::Naming,
    size: &str,
    shrink: bool,
    prealloc: Option<&str>,
    quiet: bool,
) -> Result<(), String> {
    let mode = match prealloc {
        None | Some("off") => None,
        Some("metadata") => Some(Prealloc::Metadata),
        Some("falloc") => Some(Prealloc::Falloc),
        Some("full") => Some(Prealloc::Full),
        Some(m) => return Err(format!("Invalid preallocation mode '{m}'")),
    };
    let format = fmt.map(Format::parse).transpose().map_err(|e| e.to_string())?;
    let o = OpenOptions {
        format,
        writable: true,
        open_backing: false,
        backing_policy: crate::policy(),
        resize: true,
        ..Default::default()
    };
    let spec = crate::spec(file, fmt, n)?;
    let img = Image::open_spec(&spec, &o).map_err(|e| crate::open_error(file, e))?;
    let cur = img.size();
    let new = if let Some(d) = size.strip_prefix('+') {
        cur.checked_add(parse_size(d)?).ok_or("Image size is too large")?
    } else if let Some(d) = size.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?).ok_or("New image size must be positive")?
    } else {
        parse_size(size)?
    };
    if new < cur && !shrink {
        return Err("Use the --shrink option to perform a shrink operation.".into());
    }
    if new < cur && mode.is_some() {
        return Err("Preallocation can only be used for growing images".into());
    }
    match img.layer() {
        Layer::Raw(s) => {
            if mode == Some(Prealloc::Metadata) {
                return Err("Unsupported preallocation mode: metadata".into());
            }
            s.set_len(new).map_err(|e| e.to_string())?;
            if new > cur {
                let r = match mode {
                    Some(Prealloc::Falloc) => s.allocate(cur, new - cur),
                    Some(Prealloc::Full) => s.write_zeroes(cur, new - cur, false),
                    _ => Ok(()),
                };
                r.and_then(|()| s.flush()).map_err(|e| format!("Could not preallocate the new area: {e}"))?;
            }
        }
        Layer::Qcow2(q) => {
            q.resize(new).map_err(|e| e.to_string())?;
            if let Some(m) = mode.filter(|_| new > cur) {
                q.preallocate_range(cur, new, m).map_err(|e| format!("Could not preallocate the new area: {e}"))?;
            }
        }
    }
    if !quiet {
        println!("Image resized.");
    }
    Ok(())
}
