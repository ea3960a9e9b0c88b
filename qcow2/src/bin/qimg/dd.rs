//! `qimg dd`: qemu-img dd's operands (`if=`, `of=`, `bs=`, `count=`, `skip=`) and options (`-f`, `-O`, `-U`,
//! `--image-opts`). Like qemu-img, the output is created (raw unless `-O`) with the size of what is copied:
//! `min(count * bs, input size) - skip * bs`, and every block is written, zeros included.

use qcow2::{BlockDevice, Format, Image, OpenOptions};

/// `qimg dd`'s command line.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the input.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Format of the output (default raw).
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    pub out_format: String,
    /// Open the input even if another process is writing it.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The input is a set of image options.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Objects (accepted: secrets are not used by qimg).
    #[arg(long = "object")]
    pub object: Vec<String>,
    /// Operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS].
    #[arg(value_name = "OPERAND")]
    pub operands: Vec<String>,
}

/// Runs `qimg dd`.
pub fn run(a: Args) -> Result<(), String> {
    let (mut input, mut output) = (None, None);
    let (mut bs, mut count, mut skip) = (512u64, None, None);
    for op in &a.operands {
        let (k, v) = op.split_once('=').ok_or_else(|| format!("unrecognized operand {op}"))?;
        let blocks = |v: &str| v.parse::<u64>().map_err(|_| format!("invalid number: '{v}'"));
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => {
                bs = crate::size::parse_size(v)
                    .ok()
                    .filter(|&n| n > 0 && n <= i32::MAX as u64)
                    .ok_or_else(|| format!("invalid number: '{v}'"))?
            }
            "count" => count = Some(blocks(v)?),
            "skip" => skip = Some(blocks(v)?),
            _ => return Err(format!("unrecognized operand {k}")),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err("Must specify both input and output files".into());
    };
    let n = crate::Naming { image_opts: a.image_opts, force_share: a.force_share };
    let img = crate::open(&input, a.format.as_deref(), true, n)?;
    let mut size = img.size();
    if let Some(c) = count {
        if let Some(bytes) = c.checked_mul(bs).filter(|&b| b < size) {
            size = bytes;
        }
    }
    let start = match skip {
        Some(s) => s
            .checked_mul(bs)
            .filter(|&o| o <= size)
            .ok_or_else(|| format!("{input}: cannot skip to specified offset"))?,
        None => 0,
    };
    let out_len = size - start;
    let out_fmt = Format::parse(&a.out_format).map_err(|_| format!("Unknown file format '{}'", a.out_format))?;
    crate::create::run(&a.out_format, &output, Some(&out_len.to_string()), None, None, false, &[], true)?;
    let o = OpenOptions { format: Some(out_fmt), writable: true, no_flush: true, ..OpenOptions::default() };
    let target = Image::open(&output, &o).map_err(|e| format!("Could not open '{output}': {e}"))?;
    let chunk = bs.clamp(64 << 10, 4 << 20);
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = start;
    while pos < size {
        let n = (size - pos).min(chunk) as usize;
        img.read_at(&mut buf[..n], pos).map_err(|e| format!("error while reading from input image file: {e}"))?;
        target
            .write_at(&buf[..n], pos - start, false)
            .map_err(|e| format!("error while writing to output image file: {e}"))?;
        pos += n as u64;
    }
    target.flush().map_err(|e| format!("error while writing to output image file: {e}"))?;
    Ok(())
}
