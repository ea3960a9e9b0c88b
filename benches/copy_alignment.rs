//! `copy-alignment FILE [MIB=256] [D...]`: how fast the kernel copies between the page cache and a buffer, by where the
//! buffer lies against the file position. For each distance d (the destination's address minus the source's,
//! modulo 4096: the Ds given, or 0, 8, 16, 24, 32, 64, 128), it times `pread` of 1 MiB and of 4 KiB into a buffer d bytes past a
//! page boundary, and `pwrite` of 64 KiB from one d bytes before a page boundary, over the first MIB MiB of FILE
//! (read once first, so that it is cached; the writes go back into the file, so use a scratch file).
//!
//! On AMD processors with fast short `rep movsb` (FSRM) d = 1..31 runs at a fifth to a third of the speed of
//! the other distances; `qcow2::alloc` places the binaries' large buffers to stay out of that range.

use std::os::unix::fs::FileExt;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: copy-alignment FILE [MIB] [D...]");
        std::process::exit(2);
    };
    let mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let f = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("copy-alignment: {path}: {e}");
            std::process::exit(1);
        }
    };
    let span = mib << 20;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < span || span == 0 {
        eprintln!("copy-alignment: {path} is shorter than {mib} MiB");
        std::process::exit(1);
    }
    // A page-aligned buffer (4 MiB less a page); every copy uses a part of it `d` bytes off a page boundary.
    let mut backing = vec![1u8; (4 << 20) + 4096];
    let base = backing.as_ptr() as usize;
    let start = base.next_multiple_of(4096) - base;
    let buf = &mut backing[start..start + (4 << 20) - 4096];
    // Cached, and every block of the span already written once (no block reservation in the timed writes).
    let mut warm = vec![0u8; 1 << 20];
    for off in (0..span).step_by(1 << 20) {
        if f.read_at(&mut warm, off).and_then(|_| f.write_at(&warm, off)).is_err() {
            eprintln!("copy-alignment: {path}: cannot read and write it back");
            std::process::exit(1);
        }
    }
    println!("{:>4} {:>14} {:>14} {:>15}", "d", "pread 1M MiB/s", "pread 4K MiB/s", "pwrite 64K MiB/s");
    // Distances to time: the arguments after MIB, or the default set.
    let mut dists = Vec::new();
    for a in args.iter().skip(3) {
        match a.parse::<usize>() {
            Ok(d) if d < 4096 => dists.push(d),
            _ => {
                eprintln!("copy-alignment: distance {a:?}: give a number of bytes from 0 to 4095");
                std::process::exit(2);
            }
        }
    }
    if dists.is_empty() {
        dists = vec![0, 8, 16, 24, 32, 64, 128];
    }
    for d in dists {
        let rate = |bs: usize, write: bool, buf: &mut [u8]| -> f64 {
            // The dirty pages of the run before are written back first, outside the timing.
            let _ = f.sync_data();
            let t = Instant::now();
            let mut done = 0u64;
            for pos in (0..span).step_by(bs) {
                // Reads: the buffer lies d bytes past a page boundary (the file position is page-aligned).
                // Writes: d bytes before one, so the page cache's destination lies d bytes ahead of it.
                let r = if write {
                    f.write_at(&buf[4096 - d..4096 - d + bs], pos)
                } else {
                    f.read_at(&mut buf[d..d + bs], pos)
                };
                match r {
                    Ok(n) => done += n as u64,
                    Err(e) => {
                        eprintln!("copy-alignment: {path}: {e}");
                        std::process::exit(1);
                    }
                }
            }
            done as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64
        };
        let (big, small, w) = (rate(1 << 20, false, buf), rate(4096, false, buf), rate(65536, true, buf));
        println!("{d:>4} {big:>14.0} {small:>14.0} {w:>15.0}");
    }
}
