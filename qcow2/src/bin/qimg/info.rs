//! `qimg info`: qemu-img info's JSON keys, values and human layout.

use crate::size::size_to_str;
use qcow2::chain::resolve_relative;
use qcow2::format::header;
use qcow2::format::snapshot::Snapshot;
use qcow2::{Image, Layer};
use serde_json::{json, Map, Value};

/// The protocol under an image: `file`, or a remote object's scheme (`s3`, `http`, `https`), as qemu names
/// its curl drivers.
fn protocol(img: &Image) -> String {
    match img.filename().split_once("://") {
        Some((scheme, _)) if qcow2::remote::is_remote(img.filename()) => scheme.to_ascii_lowercase(),
        _ => "file".to_string(),
    }
}

fn file_child(img: &Image) -> Value {
    let st = img.storage();
    let proto = protocol(img);
    let mut v = json!({
        "children": [],
        "virtual-size": st.len().unwrap_or(0).div_ceil(512) * 512,
        "filename": img.filename(),
        "format": proto,
        "actual-size": st.allocated_bytes().unwrap_or(0),
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": false
    });
    if proto != "file" {
        // qemu shows no allocation for a URL, and no file-specific data.
        if let Some(m) = v.as_object_mut() {
            m.remove("actual-size");
            m.remove("format-specific");
        }
    }
    v
}

fn snapshot_json(s: &Snapshot) -> Value {
    let mut m = Map::new();
    if let Some(ic) = s.icount.filter(|&i| i != u64::MAX) {
        m.insert("icount".into(), json!(ic));
    }
    m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec % 1_000_000_000));
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert("vm-clock-sec".into(), json!(s.vm_clock_nsec / 1_000_000_000));
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

/// The persistent bitmaps as qemu-img info lists them (name, granularity, flags `in-use` and `auto`).
fn bitmaps_json(q: &qcow2::image::Qcow2) -> Option<Value> {
    use qcow2::format::bitmap::{FLAG_AUTO, FLAG_IN_USE};
    let list = q.bitmaps().ok()?;
    if list.is_empty() {
        return None;
    }
    let v = list
        .iter()
        .map(|b| {
            let mut flags = Vec::new();
            if b.flags & FLAG_IN_USE != 0 {
                flags.push("in-use");
            }
            if b.flags & FLAG_AUTO != 0 {
                flags.push("auto");
            }
            json!({"flags": flags, "name": b.name, "granularity": 1u64.checked_shl(u32::from(b.granularity_bits)).unwrap_or(0)})
        })
        .collect();
    Some(Value::Array(v))
}

fn qcow2_specific(q: &qcow2::image::Qcow2) -> Value {
    let h = q.header();
    let mut d = Map::new();
    if h.version == 2 {
        d.insert("compat".into(), json!("0.10"));
        d.insert("compression-type".into(), json!(h.compression_type.qemu_name()));
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
    } else {
        d.insert("compat".into(), json!("1.1"));
        d.insert("compression-type".into(), json!(h.compression_type.qemu_name()));
        d.insert("lazy-refcounts".into(), json!(h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0));
        if let Some(b) = bitmaps_json(q) {
            d.insert("bitmaps".into(), b);
        }
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if let Some(df) = &h.data_file {
            d.insert("data-file".into(), json!(df));
            d.insert("data-file-raw".into(), json!(h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0));
        }
        d.insert("corrupt".into(), json!(h.incompatible_features & header::INCOMPAT_CORRUPT != 0));
        d.insert("extended-l2".into(), json!(h.extended_l2()));
    }
    json!({"type": "qcow2", "data": Value::Object(d)})
}

/// The info object of one image, keys in qemu-img's order.
pub fn info_json(img: &Image) -> Value {
    let mut m = Map::new();
    m.insert("children".into(), json!([{"name": "file", "info": file_child(img)}]));
    let q = img.qcow2();
    let h = q.map(|q| q.header());
    // qemu shows the backing format only with a backing file (the extension alone means nothing).
    if let Some(f) = h.filter(|h| h.backing_file.is_some()).and_then(|h| h.backing_format.as_ref()) {
        m.insert("backing-filename-format".into(), json!(f));
    }
    if let Some(q) = q {
        if !q.snapshots().is_empty() {
            m.insert("snapshots".into(), Value::Array(q.snapshots().iter().map(snapshot_json).collect()));
        }
    }
    m.insert("virtual-size".into(), json!(qcow2::BlockDevice::size(img)));
    m.insert("filename".into(), json!(img.filename()));
    if let Some(q) = q {
        m.insert("cluster-size".into(), json!(q.cluster_size()));
    }
    m.insert("format".into(), json!(img.format().name()));
    if protocol(img) == "file" {
        m.insert("actual-size".into(), json!(img.storage().allocated_bytes().unwrap_or(0)));
    }
    if let (Some(h), Some(q)) = (h, q) {
        m.insert("format-specific".into(), qcow2_specific(q));
        if let Some(b) = &h.backing_file {
            m.insert("full-backing-filename".into(), json!(resolve_relative(img.filename(), b)));
            m.insert("backing-filename".into(), json!(b));
        }
    }
    let dirty = h.map(|h| h.incompatible_features & header::INCOMPAT_DIRTY != 0).unwrap_or(false);
    m.insert("dirty-flag".into(), json!(dirty));
    Value::Object(m)
}

fn local_date(secs: u32) -> String {
    let t = libc::time_t::from(secs);
    // SAFETY: localtime_r writes into the tm we pass and reads the time_t we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return String::from("?");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// One row of qemu's snapshot table ("%-7s %-16s %8s %19s %15s %10s").
pub fn snapshot_row(id: &str, tag: &str, vm: &str, date: &str, clock: &str, icount: &str) -> String {
    format!("{id:<7} {tag:<16} {vm:>8} {date:>19} {clock:>15} {icount:>10}")
}

/// qemu's human layout of nested info: `key: value`, with lists and objects below their key, list items as
/// `[i]:`, keys with spaces for dashes, each level indented by four more spaces.
fn human_object(d: &Map<String, Value>, indent: usize, s: &mut String) {
    for (k, v) in d {
        human_value(&k.replace('-', " "), v, indent, s);
    }
}

fn human_value(label: &str, v: &Value, indent: usize, s: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(o) => {
            *s += &format!("{pad}{label}:\n");
            human_object(o, indent + 4, s);
        }
        Value::Array(a) => {
            *s += &format!("{pad}{label}:\n");
            for (i, item) in a.iter().enumerate() {
                human_value(&format!("[{i}]"), item, indent + 4, s);
            }
        }
        Value::String(x) => *s += &format!("{pad}{label}: {x}\n"),
        other => *s += &format!("{pad}{label}: {other}\n"),
    }
}

/// qemu's snapshot table ("Snapshot list:" and a row per snapshot), as `qemu-img info` and `qemu-img
/// snapshot -l` print it; empty without snapshots.
pub fn snapshot_list(q: &qcow2::image::Qcow2) -> String {
    let mut s = String::new();
    if q.snapshots().is_empty() {
        return s;
    }
    s += "Snapshot list:\n";
    s += &snapshot_row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT");
    s += "\n";
    for sn in q.snapshots() {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = match sn.icount {
            Some(i) if i != u64::MAX => i.to_string(),
            _ => String::new(),
        };
        s += &snapshot_row(&sn.id, &sn.name, &size_to_str(sn.vm_state_size), &local_date(sn.date_sec), &clock, &icount);
        s += "\n";
    }
    s
}

/// The human layout of one image's info.
pub fn info_human(img: &Image) -> String {
    let mut s = String::new();
    let size = qcow2::BlockDevice::size(img);
    let disk = img.storage().allocated_bytes().unwrap_or(0);
    s += &format!("image: {}\n", img.filename());
    s += &format!("file format: {}\n", img.format().name());
    s += &format!("virtual size: {} ({size} bytes)\n", size_to_str(size));
    let remote = protocol(img) != "file";
    let disk_str = if remote { "unavailable".to_string() } else { size_to_str(disk) };
    s += &format!("disk size: {disk_str}\n");
    if let Layer::Qcow2(q) = img.layer() {
        let h = q.header();
        s += &format!("cluster_size: {}\n", q.cluster_size());
        if let Some(b) = &h.backing_file {
            let full = resolve_relative(img.filename(), b);
            if &full == b {
                s += &format!("backing file: {b}\n");
            } else {
                s += &format!("backing file: {b} (actual path: {full})\n");
            }
        }
        if let Some(f) = h.backing_format.as_ref().filter(|_| h.backing_file.is_some()) {
            s += &format!("backing file format: {f}\n");
        }
        if h.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            s += "cleanly shut down: no\n";
        }
        s += &snapshot_list(q);
        s += "Format specific information:\n";
        if let Value::Object(d) = &qcow2_specific(q)["data"] {
            human_object(d, 4, &mut s);
        }
    }
    let flen = img.storage().len().unwrap_or(0).div_ceil(512) * 512;
    s += "Child node '/file':\n";
    s += &format!("    filename: {}\n", img.filename());
    s += &format!("    protocol type: {}\n", protocol(img));
    s += &format!("    file length: {} ({flen} bytes)\n", size_to_str(flen));
    s += &format!("    disk size: {disk_str}\n");
    s
}
