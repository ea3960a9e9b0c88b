//! `qimg measure`: the file size a conversion needs, computed as qemu-img does (block/qcow2.c
//! `qcow2_measure` and `qcow2_calc_prealloc_size`, block/qcow2-refcount.c `qcow2_refcount_metadata_size`,
//! block/raw-format.c `raw_measure`).

use crate::size::parse_size;
use qcow2::{BlockDevice, Image};

/// What the output image would be: from `-O` and `-o`.
pub struct Target {
    /// qcow2 (else raw).
    pub qcow2: bool,
    pub cluster_size: u64,
    pub refcount_order: u32,
    pub extended_l2: bool,
    pub version3: bool,
    pub prealloc_full: bool,
    pub has_backing: bool,
}

/// Parses `-O` and `-o` (qemu's option names; unknown ones are refused as qemu-img does).
pub fn target(out_fmt: &str, opts: &[String]) -> Result<Target, String> {
    let qcow2 = match out_fmt {
        "qcow2" => true,
        "raw" => false,
        f => return Err(format!("Unknown file format '{f}' (qimg measures qcow2 and raw)")),
    };
    let mut t = Target {
        qcow2,
        cluster_size: 65536,
        refcount_order: 4,
        extended_l2: false,
        version3: true,
        prealloc_full: false,
        has_backing: false,
    };
    for kv in opts.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
        match (qcow2, k) {
            (true, "cluster_size") => t.cluster_size = parse_size(v)?,
            (true, "refcount_bits") => {
                let bits: u32 = v.parse().map_err(|_| format!("Invalid refcount_bits '{v}'"))?;
                if !bits.is_power_of_two() || bits > 64 {
                    return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
                }
                t.refcount_order = bits.trailing_zeros();
            }
            (true, "extended_l2") => t.extended_l2 = matches!(v, "on" | "true" | "yes"),
            (true, "compat") => {
                t.version3 = match v {
                    "0.10" | "v2" => false,
                    "1.1" | "v3" => true,
                    _ => return Err(format!("Invalid parameter '{v}' for 'compat'")),
                }
            }
            (true, "backing_file") => t.has_backing = true,
            (true, "lazy_refcounts" | "compression_type" | "backing_fmt" | "data_file" | "data_file_raw") => {}
            (_, "preallocation") => match v {
                "off" | "metadata" => {}
                "falloc" | "full" => t.prealloc_full = true,
                _ => return Err(format!("Invalid parameter '{v}' for 'preallocation'")),
            },
            (_, "size") => {}
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    if t.qcow2 && (!t.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&t.cluster_size)) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    Ok(t)
}

/// Refcount table and block clusters for `clusters` clusters, in bytes (qemu's `qcow2_refcount_metadata_size`
/// without the generous increase).
fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    // A fixed point: blocks count themselves and the table. Converges in a few rounds; bounded anyway.
    for _ in 0..64 {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cluster_size
}

/// The file size of a fully preallocated qcow2 image of `total` bytes (qemu's `qcow2_calc_prealloc_size`).
fn prealloc_size(total: u64, t: &Target) -> u64 {
    let cs = t.cluster_size;
    let l2e = if t.extended_l2 { 16 } else { 8 };
    let aligned = total.div_ceil(cs) * cs;
    let mut meta = cs; // the header cluster
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, t.refcount_order);
    meta + aligned
}

/// qemu's `qcow2_get_persistent_dirty_bitmap_size`: every bitmap of the source, fully allocated, with its
/// table and directory entry, in clusters of the output image.
fn bitmaps_size(src: &Image, cs: u64) -> Result<u64, String> {
    let Some(q) = src.qcow2() else { return Ok(0) };
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in q.bitmaps().map_err(|e| e.to_string())? {
        let granularity = 1u64.checked_shl(u32::from(b.granularity_bits)).unwrap_or(u64::MAX);
        let bytes = src.size().div_ceil(granularity).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        // Sizes come from the image: saturate rather than wrap on a hostile directory.
        total = total.saturating_add(clusters.saturating_mul(cs));
        total = total.saturating_add(clusters.saturating_mul(8).div_ceil(cs).saturating_mul(cs));
        dir = dir.saturating_add(qcow2::format::bitmap::entry_size(b.name.len()));
    }
    Ok(total.saturating_add(dir.div_ceil(cs).saturating_mul(cs)))
}

/// The numbers qemu-img prints: (required, fully allocated, bitmaps when both sides support them).
pub fn measure(src: Option<&Image>, size: Option<u64>, t: &Target) -> Result<(u64, u64, Option<u64>), String> {
    if !t.qcow2 {
        // Unallocated sectors count towards the size of a raw file.
        let required = match (src, size) {
            (Some(s), _) => s.size(),
            (None, Some(n)) => n.div_ceil(512) * 512,
            (None, None) => return Err("Either --size N or one filename must be specified.".into()),
        };
        return Ok((required, required, None));
    }
    let cs = t.cluster_size;
    let (virtual_size, mut required) = match (src, size) {
        (Some(s), _) => {
            let ssize = s.size();
            let virtual_size = ssize.div_ceil(cs) * cs;
            let mut required = 0u64;
            if t.has_backing {
                // The new image's backing file may share nothing with the source: count everything.
                required = virtual_size;
            } else {
                let mut off = 0u64;
                while off < ssize {
                    let st = s.block_status(off, ssize - off).map_err(|e| e.to_string())?;
                    let mut n = st.len.max(1);
                    if st.zero {
                        // Zero regions need no data cluster.
                    } else if st.data && st.present {
                        // Counted to the end of the cluster, as qemu does.
                        n = (off + n).div_ceil(cs) * cs - off;
                        required += off % cs + n;
                    }
                    off = off.saturating_add(n);
                }
            }
            (virtual_size, required)
        }
        (None, Some(n)) => (n.div_ceil(cs) * cs, 0),
        (None, None) => return Err("Either --size N or one filename must be specified.".into()),
    };
    // qcow2_measure: the L1 table of a qcow2 image is at most 32 MiB (QCOW_MAX_L1_SIZE).
    let l2e = if t.extended_l2 { 16 } else { 8 };
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e);
    if l2_tables.saturating_mul(8) > 32 << 20 {
        return Err("The image size is too large (try using a larger cluster size)".into());
    }
    if t.prealloc_full {
        required = virtual_size;
    }
    let fully = prealloc_size(virtual_size, t);
    let required = fully - virtual_size + required;
    let bitmaps = match src {
        // Only a source that can hold persistent bitmaps (qcow2 v3) has the line.
        Some(s) if t.version3 && s.qcow2().is_some_and(|q| q.header().version >= 3) => Some(bitmaps_size(s, cs)?),
        _ => None,
    };
    Ok((required, fully, bitmaps))
}

/// Prints the result as qemu-img does.
pub fn print(r: (u64, u64, Option<u64>), json: bool) {
    let (required, fully, bitmaps) = r;
    if json {
        let mut m = serde_json::Map::new();
        if let Some(b) = bitmaps {
            m.insert("bitmaps".into(), b.into());
        }
        m.insert("required".into(), required.into());
        m.insert("fully-allocated".into(), fully.into());
        println!("{}", crate::json::pretty(&serde_json::Value::Object(m)));
    } else {
        println!("required size: {required}");
        println!("fully allocated size: {fully}");
        if let Some(b) = bitmaps {
            println!("bitmaps size: {b}");
        }
    }
}
