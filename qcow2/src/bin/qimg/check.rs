//! `qimg check [-r leaks|all] [--output=human|json]`: qemu-img check's report, JSON keys and exit codes
//! (0 clean, 1 check errors, 2 corruptions, 3 leaks only).

use qcow2::image::check::CheckReport;
use qcow2::{Format, Image, OpenOptions};
use serde_json::{json, Map, Value};

fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            s += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            s += &format!("\n{} internal errors have occurred during the check.\n", r.check_errors);
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                a as f64 * 100.0 / b as f64
            }
        };
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    if r.image_end_offset > 0 {
        s += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    s
}

fn to_json(r: &CheckReport, file: &str) -> Value {
    let mut m = Map::new();
    m.insert("image-end-offset".into(), json!(r.image_end_offset));
    if r.compressed_clusters > 0 {
        m.insert("compressed-clusters".into(), json!(r.compressed_clusters));
    }
    m.insert("total-clusters".into(), json!(r.total_clusters));
    if r.corruptions > 0 {
        m.insert("corruptions".into(), json!(r.corruptions));
    }
    m.insert("check-errors".into(), json!(r.check_errors));
    if r.leaks > 0 {
        m.insert("leaks".into(), json!(r.leaks));
    }
    m.insert("allocated-clusters".into(), json!(r.allocated_clusters));
    m.insert("filename".into(), json!(file));
    m.insert("format".into(), json!("qcow2"));
    if r.fragmented_clusters > 0 {
        m.insert("fragmented-clusters".into(), json!(r.fragmented_clusters));
    }
    Value::Object(m)
}

fn code(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// Runs check (and repair); returns the exit code.
pub fn run(
    file: &str,
    fmt: Option<&str>,
    repair: Option<&str>,
    json_out: bool,
    quiet: bool,
    n: crate::Naming,
) -> Result<u8, String> {
    let format = fmt.map(Format::parse).transpose().map_err(|e| e.to_string())?;
    let all = match repair {
        None => None,
        Some("leaks") => Some(false),
        Some("all") => Some(true),
        Some(r) => return Err(format!("Unknown option for -r: '{r}' (expected 'leaks' or 'all')")),
    };
    let o = OpenOptions {
        format,
        writable: all.is_some(),
        // qemu-img check opens the backing chain too (and fails without it).
        open_backing: true,
        backing_policy: crate::policy(),
        force_share: n.force_share && all.is_none(),
        ..Default::default()
    };
    let spec = crate::spec(file, fmt, n)?;
    let img = Image::open_spec(&spec, &o).map_err(|e| crate::open_error(file, e))?;
    let Some(q) = img.qcow2() else {
        return Err("This image format does not support checks".to_string());
    };
    let mut r = q.check().map_err(|e| e.to_string())?;
    if let Some(all) = all {
        if r.leaks > 0 || (all && r.corruptions > 0) {
            for m in &r.messages {
                eprintln!("{m}");
            }
            let (l, c, msgs) = q.repair(&r, all).map_err(|e| e.to_string())?;
            for m in msgs {
                eprintln!("{m}");
            }
            if !quiet && !json_out {
                println!(
                    "The following inconsistencies were found and repaired:\n\n    {l} leaked clusters\n    {c} corruptions\n\nDouble checking the fixed image now..."
                );
            }
            r = q.check().map_err(|e| e.to_string())?;
        }
    }
    for m in &r.messages {
        eprintln!("{m}");
    }
    if json_out {
        println!("{}", crate::json::pretty(&to_json(&r, file)));
    } else if !quiet {
        print!("{}", human(&r));
    }
    Ok(code(&r))
}
