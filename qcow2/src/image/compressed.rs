//! Decompression of compressed clusters (qcow2.rst, "Compressed Clusters Descriptor" and the compression
//! type header field): raw deflate with a 4 KiB window (zlib window bits -12) or zstd.

use crate::error::{Error, Result};
use crate::format::header::CompressionType;

/// Decompresses `input` into exactly `out.len()` bytes (one cluster). Extra input past the cluster is
/// ignored (the last sector may hold the start of another cluster's data).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut d = flate2::Decompress::new_with_window_bits(false, 12);
    let r = d.decompress(input, out, flate2::FlushDecompress::Finish);
    let produced = d.total_out() as usize;
    match r {
        Ok(_) if produced == out.len() => Ok(()),
        Ok(_) => {
            Err(Error::corrupt(format!("compressed cluster inflates to {produced} bytes, expected {}", out.len())))
        }
        Err(e) => Err(Error::corrupt(format!("compressed cluster is not valid deflate data: {e}"))),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use std::io::Read;
    // qemu writes one or more zstd frames and stops once the cluster is full; read frame by frame.
    let mut src = input;
    let mut done = 0usize;
    while done < out.len() {
        let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
            .map_err(|e| Error::corrupt(format!("compressed cluster is not valid zstd data: {e}")))?;
        let mut frame_bytes = 0usize;
        loop {
            if done == out.len() {
                break;
            }
            match dec.read(&mut out[done..]) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    frame_bytes += n;
                }
                Err(e) => return Err(Error::corrupt(format!("compressed cluster is not valid zstd data: {e}"))),
            }
        }
        if frame_bytes == 0 && done < out.len() {
            return Err(Error::corrupt(format!(
                "compressed cluster decompresses to {done} bytes, expected {}",
                out.len()
            )));
        }
    }
    Ok(())
}

/// One cluster's compressed bytes, or `None` when they would not be smaller than a cluster of `cs` bytes
/// (qemu's rule: such a cluster is written as it is); a partial last cluster is padded with zeros first, as
/// qemu does.
pub fn compress_cluster(kind: CompressionType, piece: &[u8], cs: u64) -> Option<Vec<u8>> {
    let padded;
    let input: &[u8] = if (piece.len() as u64) < cs {
        let mut v = piece.to_vec();
        v.resize(usize::try_from(cs).ok()?, 0);
        padded = v;
        &padded
    } else {
        piece
    };
    compress(kind, input).filter(|c| (c.len() as u64) < cs)
}

/// Compresses one cluster for qemu to read: raw deflate with window bits -12 (zlib-rs backend) or a zstd frame
/// (libzstd, level 3). Each thread keeps its compressor, so the per-call setup (window, tables) is paid once.
/// Returns `None` if the result would not be smaller than the input.
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    use std::cell::RefCell;
    thread_local! {
        static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
        static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    }
    match kind {
        CompressionType::Deflate => DEFLATE.with(|cell| {
            let mut slot = cell.borrow_mut();
            let c = slot.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() < input.len() => {
                    c.reset();
                    Some(out)
                }
                _ => {
                    // A stream that did not finish (the output did not fit) keeps pending bytes that a reset
                    // does not drop in every backend: start the next cluster with a new compressor.
                    *slot = None;
                    None
                }
            }
        }),
        // zstd's default level (3), as qemu's `qcow2_zstd_compress` leaves it (ruzstd, which decodes, only
        // encodes at its fastest and weakest level).
        CompressionType::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = zstd::bulk::Compressor::new(0).ok();
            }
            let out = slot.as_mut()?.compress(input).ok()?;
            (out.len() < input.len()).then_some(out)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_round_trip_one_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let c = compress(kind, &data).expect("compressible");
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xaa; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &padded, &mut out).unwrap();
            assert_eq!(out, data, "{kind:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            assert!(decompress(kind, &[0xff; 100], &mut out).is_err());
            assert!(decompress(kind, &[], &mut out).is_err());
        }
    }
}
