//! `qimg compare A B`: qemu-img compare's messages and exit codes (0 identical, 1 different, 2 error).

use qcow2::{BlockDevice, Image};

const CHUNK: u64 = 2 << 20;
const SECTOR: u64 = 512;

/// The first differing 512-byte sector of two equally long buffers, as an offset into them.
fn first_diff(a: &[u8], b: &[u8]) -> Option<u64> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|i| i as u64 / SECTOR * SECTOR)
}

fn first_nonzero(a: &[u8]) -> Option<u64> {
    a.iter().position(|&x| x != 0).map(|i| i as u64 / SECTOR * SECTOR)
}

/// Compares; Ok(true) when identical, Ok(false) with the message printed when not.
/// With `progress`, qemu-img's progress lines come first and a newline ends the output.
pub fn run(a: &Image, b: &Image, quiet: bool, strict: bool, progress: bool) -> Result<bool, String> {
    let mut bar = crate::convert::Progress::new(a.size().max(b.size()), progress);
    let r = compare(a, b, quiet, strict, &mut bar);
    bar.end();
    r
}

fn compare(
    a: &Image,
    b: &Image,
    quiet: bool,
    strict: bool,
    bar: &mut crate::convert::Progress,
) -> Result<bool, String> {
    let (sa, sb) = (a.size(), b.size());
    let common = sa.min(sb);
    if strict && sa != sb {
        if !quiet {
            println!("Strict mode: Image size mismatch!");
        }
        return Ok(false);
    }
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mismatch = |off: u64| {
        if !quiet {
            println!("Content mismatch at offset {off}!");
        }
        Ok(false)
    };
    let mut pos = 0u64;
    while pos < common {
        let n = (common - pos).min(CHUNK);
        let za = a.block_status(pos, n).map_err(|e| e.to_string())?;
        let zb = b.block_status(pos, n).map_err(|e| e.to_string())?;
        let n = za.len.min(zb.len);
        if strict && (za.present, za.zero, za.data) != (zb.present, zb.zero, zb.data) {
            if !quiet {
                println!("Strict mode: Offset {pos} block status mismatch!");
            }
            return Ok(false);
        }
        if !(za.zero && zb.zero) {
            let (x, y) = (&mut ba[..n as usize], &mut bb[..n as usize]);
            a.read_at(x, pos).map_err(|e| format!("error while reading offset {pos}: {e}"))?;
            b.read_at(y, pos).map_err(|e| format!("error while reading offset {pos}: {e}"))?;
            if let Some(d) = first_diff(x, y) {
                return mismatch(pos + d);
            }
        }
        pos += n;
        bar.set(pos);
    }
    if sa != sb && !quiet {
        println!("Warning: Image size mismatch!");
    }
    let longer = if sa > sb { a } else { b };
    while pos < longer.size() {
        let n = (longer.size() - pos).min(CHUNK);
        let st = longer.block_status(pos, n).map_err(|e| e.to_string())?;
        if !st.zero {
            let x = &mut ba[..st.len as usize];
            longer.read_at(x, pos).map_err(|e| format!("error while reading offset {pos}: {e}"))?;
            if let Some(d) = first_nonzero(x) {
                return mismatch(pos + d);
            }
        }
        pos += st.len;
        bar.set(pos);
    }
    if !quiet {
        println!("Images are identical.");
    }
    Ok(true)
}
