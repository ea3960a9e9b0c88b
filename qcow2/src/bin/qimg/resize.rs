//! `qimg resize IMG [+|-]SIZE`: grow qcow2 and raw images (shrinking needs --shrink, raw only).

use crate::size::parse_size;
use qcow2::{BlockDevice, Format, Image, Layer, OpenOptions};

/// Runs resize.
pub fn run(file: &str, fmt: Option<&str>, size: &str, shrink: bool, quiet: bool) -> Result<(), String> {
    let format = fmt.map(Format::parse).transpose().map_err(|e| e.to_string())?;
    let o = OpenOptions {
        format,
        writable: true,
        open_backing: false,
        backing_policy: crate::policy(),
        resize: true,
        ..Default::default()
    };
    let img = Image::open(file, &o).map_err(|e| {
        let s = e.to_string();
        if s.starts_with("Could not open") {
            s
        } else {
            format!("Could not open '{file}': {s}")
        }
    })?;
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
    match img.layer() {
        Layer::Raw(s) => s.set_len(new).map_err(|e| e.to_string())?,
        Layer::Qcow2(q) => q.resize(new).map_err(|e| e.to_string())?,
    }
    if !quiet {
        println!("Image resized.");
    }
    Ok(())
}
