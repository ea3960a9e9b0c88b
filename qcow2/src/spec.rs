//! qemu's block option syntax, parsed once for every tool: plain file names, `json:{...}` pseudo file names
//! and the dotted `key=value` lists of `--image-opts` (qemu's `docs/system/qemu-block-drivers` and the
//! `BlockdevOptions` schema in `qapi/block-core.json`). The result is an [`ImageSpec`]: which format driver,
//! which file (or block device) under it, and the options qnbd honours. Everything qnbd does not support is
//! refused by name, in qemu's words where qemu has them; nothing is silently dropped.
//!
//! Pure code: no file is touched here.
#![deny(clippy::arithmetic_side_effects)] // every number here comes from a client or the user

use crate::chain::Format;
use crate::error::{Error, ErrorKind, Result};

/// A bad option from the user.
fn arg(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}
use std::collections::BTreeMap;

/// Drivers qemu has that qnbd does not: refused by name, never opened as something else.
const UNSUPPORTED_DRIVERS: &[&str] = &[
    "vmdk",
    "vhdx",
    "vpc",
    "vdi",
    "qed",
    "qcow",
    "parallels",
    "luks",
    "bochs",
    "cloop",
    "dmg",
    "vvfat",
    "blkdebug",
    "blkverify",
    "blklogwrites",
    "copy-on-read",
    "preallocate",
    "quorum",
    "replication",
    "snapshot-access",
    "throttle",
    "null-co",
    "null-aio",
    "nbd",
    "nfs",
    "ssh",
    "ftp",
    "ftps",
    "iscsi",
    "rbd",
    "gluster",
    "nvme",
    "host_cdrom",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "io_uring",
];

/// Protocol prefixes of qemu file names (`nbd:...`, `http://...`) that qnbd cannot open.
const PROTOCOLS: &[&str] = &[
    "nbd",
    "nbd+unix",
    "nbd+tcp",
    "nbds",
    "ftp",
    "ftps",
    "ssh",
    "iscsi",
    "rbd",
    "gluster",
    "gluster+tcp",
    "gluster+unix",
    "gluster+rdma",
    "nfs",
    "nvme",
    "vvfat",
    "blkdebug",
    "blkverify",
    "null-co",
    "null-aio",
    "throttle",
    "quorum",
    "sheepdog",
];

/// A value in the flattened option map: a string (JSON numbers and booleans are kept in their JSON text, as
/// qemu's keyval does) or JSON `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A scalar.
    Str(String),
    /// JSON `null` (only `backing` takes it).
    Null,
}

/// The protocol node under a format driver (or exposed directly).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileSpec {
    /// The file or device name.
    pub filename: String,
    /// The `host_device` driver: the name must be a block or character device.
    pub host_device: bool,
    /// `locking`: `Some(false)` for `off`; `None` for the default (`auto`, which locks).
    pub locking: Option<bool>,
    /// `aio` (accepted: threads, native, io_uring).
    pub aio: Option<String>,
    /// A remote object (`s3://`, `http(s)://`, or `driver=s3|http|https`): read-only, through the cache.
    pub remote: Option<crate::remote::RemoteSpec>,
}

/// Where the backing image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackingSpec {
    /// As the image header says.
    #[default]
    Header,
    /// No backing image (`"backing": null`): unallocated clusters read as zeros.
    None,
    /// This image instead (`backing.driver=...,backing.file.filename=...`).
    Image(Box<ImageSpec>),
}

/// A whole image as the user named it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageSpec {
    /// The format; `None`: probed.
    pub format: Option<Format>,
    /// The driver was `file` or `host_device`: the protocol node is exposed as is (raw, never probed).
    pub protocol_only: bool,
    /// The file under the format driver.
    pub file: FileSpec,
    /// qcow2 `backing`.
    pub backing: BackingSpec,
    /// qcow2 `data-file` (`data-file.filename` or `data-file.driver=file,...`).
    pub data_file: Option<FileSpec>,
    /// raw `offset`.
    pub offset: Option<u64>,
    /// raw `size`.
    pub size: Option<u64>,
    /// `read-only`.
    pub read_only: Option<bool>,
    /// `force-share`: take no locks that stop others writing (read-only only).
    pub force_share: Option<bool>,
    /// `cache.direct`: O_DIRECT.
    pub cache_direct: Option<bool>,
    /// `cache.no-flush`: FLUSH does not sync.
    pub cache_no_flush: Option<bool>,
    /// `discard`: `ignore`/`off` or `unmap`/`on`.
    pub discard: Option<String>,
    /// `detect-zeroes`: `off`, `on`, `unmap`.
    pub detect_zeroes: Option<String>,
    /// qcow2 `l2-cache-size` (bytes).
    pub l2_cache_size: Option<u64>,
    /// Under qemu's `compress` filter (`driver=compress,file.driver=qcow2,...`): every write is stored as
    /// compressed clusters.
    pub compress: bool,
    /// The name as given, for messages.
    pub given: String,
}

impl ImageSpec {
    /// A plain file, probed.
    pub fn file(name: &str) -> ImageSpec {
        ImageSpec {
            file: FileSpec { filename: name.to_string(), ..Default::default() },
            given: name.to_string(),
            ..Default::default()
        }
    }

    /// What the user typed as an image name: `json:{...}`, `file:NAME`, `host_device:NAME`, or a file name.
    /// Remote objects (`s3://BUCKET/KEY`, `http(s)://HOST/PATH`) are opened through the remote cache; other
    /// network protocol names (`nbd:`, `ssh://`, ...) are refused by name.
    pub fn parse_filename(name: &str) -> Result<ImageSpec> {
        if crate::remote::is_remote(name) {
            let mut s = Self::file(name);
            s.file.remote = Some(crate::remote::RemoteSpec::from_url(name));
            return Ok(s);
        }
        if let Some(json) = name.strip_prefix("json:") {
            let mut spec = Self::from_map(flatten_json(json)?)?;
            spec.given = name.to_string();
            return Ok(spec);
        }
        if let Some((proto, rest)) = name.split_once(':') {
            if proto == "file" {
                return Ok(ImageSpec { given: name.to_string(), ..Self::file(rest) });
            }
            if proto == "host_device" {
                let mut s = Self::file(rest);
                s.file.host_device = true;
                s.given = name.to_string();
                return Ok(s);
            }
            // qemu takes `proto:` as a protocol only when the part before ':' has no '/'.
            if !proto.contains('/') && PROTOCOLS.contains(&proto) {
                return Err(Error::unsupported(format!(
                    "'{name}': the '{proto}' protocol is not supported by qnbd (only local files and block devices)"
                )));
            }
        }
        Ok(Self::file(name))
    }

    /// `--image-opts`: a dotted `key=value,...` list (`,,` is a comma inside a value).
    pub fn parse_opts(opts: &str) -> Result<ImageSpec> {
        let mut map = BTreeMap::new();
        for item in split_commas(opts) {
            if item.is_empty() {
                continue;
            }
            let Some((k, v)) = item.split_once('=') else {
                return Err(arg(format!("Invalid parameter '{item}': expected key=value")));
            };
            map.insert(k.to_string(), Value::Str(v.to_string()));
        }
        let mut spec = Self::from_map(map)?;
        spec.given = opts.to_string();
        Ok(spec)
    }

    /// Builds a spec from a flattened option map (keys `driver`, `file.filename`, ...).
    pub fn from_map(mut map: BTreeMap<String, Value>) -> Result<ImageSpec> {
        let spec = take_image(&mut map, "")?;
        if let Some(k) = map.keys().next() {
            return Err(unsupported_option(&spec, k));
        }
        Ok(spec)
    }

    /// The name for messages and for "image:" lines: the file name for simple specs.
    pub fn display_name(&self) -> &str {
        if self.given.starts_with("json:") || self.given.contains('=') {
            &self.file.filename
        } else {
            &self.given
        }
    }
}

fn unsupported_option(spec: &ImageSpec, key: &str) -> Error {
    if let Some(k) = key.strip_prefix("file.") {
        return Error::unsupported(format!(
            "Block protocol '{}' doesn't support the option '{k}'",
            if spec.file.host_device { "host_device" } else { "file" }
        ));
    }
    let fmt = if spec.protocol_only {
        if spec.file.host_device {
            "host_device"
        } else {
            "file"
        }
    } else {
        spec.format.map(Format::name).unwrap_or("raw")
    };
    if spec.protocol_only {
        return Error::unsupported(format!("Block protocol '{fmt}' doesn't support the option '{key}'"));
    }
    Error::unsupported(format!("Block format '{fmt}' does not support the option '{key}'"))
}

/// Splits at single commas; `,,` is a literal comma.
pub fn split_commas(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// Nesting depth accepted in `json:` names (qemu's parser stops at 1024; a real spec needs a handful).
const MAX_JSON_DEPTH: usize = 32;

/// Flattens a `json:` object into dotted keys, as qemu's `qdict_flatten` does.
pub fn flatten_json(json: &str) -> Result<BTreeMap<String, Value>> {
    if json.len() > crate::limits::MAX_SPEC_BYTES {
        return Err(arg("Could not parse the JSON options: longer than 64 KiB"));
    }
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| arg(format!("Could not parse the JSON options: JSON parse error, {e}")))?;
    let serde_json::Value::Object(obj) = v else {
        return Err(arg("Invalid JSON object given"));
    };
    let mut out = BTreeMap::new();
    flatten_into(&obj, "", 0, &mut out)?;
    Ok(out)
}

fn flatten_into(
    obj: &serde_json::Map<String, serde_json::Value>,
    prefix: &str,
    depth: usize,
    out: &mut BTreeMap<String, Value>,
) -> Result<()> {
    if depth > MAX_JSON_DEPTH {
        return Err(arg("Could not parse the JSON options: nested too deeply"));
    }
    for (k, v) in obj {
        let key = format!("{prefix}{k}");
        let val = match v {
            serde_json::Value::Object(o) => {
                flatten_into(o, &format!("{key}."), depth.saturating_add(1), out)?;
                continue;
            }
            serde_json::Value::Null => Value::Null,
            serde_json::Value::String(s) => Value::Str(s.clone()),
            serde_json::Value::Bool(b) => Value::Str(if *b { "on".into() } else { "off".into() }),
            serde_json::Value::Number(n) => Value::Str(n.to_string()),
            serde_json::Value::Array(_) => {
                return Err(Error::unsupported(format!("option '{key}': lists are not supported")));
            }
        };
        if out.insert(key.clone(), val).is_some() {
            return Err(arg(format!("Duplicate option '{key}'")));
        }
    }
    Ok(())
}

/// qemu's boolean values.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(arg(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

/// qemu's sizes: a number with an optional k, M, G, T, P or E suffix (powers of 1024).
pub fn parse_size(key: &str, v: &str) -> Result<u64> {
    let bad = || {
        arg(format!(
            "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means \
             kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        ))
    };
    let v = v.trim();
    let (digits, shift) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(bad()),
            };
            (&v[..i], shift)
        }
        _ => (v, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn take_str(map: &mut BTreeMap<String, Value>, key: &str) -> Result<Option<String>> {
    match map.remove(key) {
        None => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s)),
        Some(Value::Null) => Err(arg(format!("Invalid parameter type for '{key}', expected: string"))),
    }
}

fn take_bool(map: &mut BTreeMap<String, Value>, key: &str) -> Result<Option<bool>> {
    take_str(map, key)?.map(|v| parse_bool(key, &v)).transpose()
}

fn take_size(map: &mut BTreeMap<String, Value>, key: &str) -> Result<Option<u64>> {
    take_str(map, key)?.map(|v| parse_size(key, &v)).transpose()
}

/// Removes every key under `prefix.` and returns them without the prefix.
fn take_subtree(map: &mut BTreeMap<String, Value>, prefix: &str) -> BTreeMap<String, Value> {
    let dotted = format!("{prefix}.");
    let keys: Vec<String> = map.keys().filter(|k| k.starts_with(&dotted)).cloned().collect();
    keys.into_iter().filter_map(|k| map.remove(&k).map(|v| (k[dotted.len()..].to_string(), v))).collect()
}

/// Options every node takes (`BlockdevOptionsBase`), stored on `spec`.
fn take_common(map: &mut BTreeMap<String, Value>, spec: &mut ImageSpec) -> Result<()> {
    let _ = take_str(map, "node-name")?;
    let _ = take_bool(map, "auto-read-only")?;
    if let Some(ro) = take_bool(map, "read-only")? {
        spec.read_only = Some(ro);
    }
    if let Some(fs) = take_bool(map, "force-share")? {
        spec.force_share = Some(fs);
    }
    if let Some(d) = take_bool(map, "cache.direct")? {
        spec.cache_direct = Some(d);
    }
    if let Some(n) = take_bool(map, "cache.no-flush")? {
        spec.cache_no_flush = Some(n);
    }
    if let Some(d) = take_str(map, "discard")? {
        match d.as_str() {
            "ignore" | "off" | "unmap" | "on" => spec.discard = Some(d),
            _ => return Err(arg(format!("Invalid discard option '{d}'"))),
        }
    }
    if let Some(d) = take_str(map, "detect-zeroes")? {
        match d.as_str() {
            "off" | "on" | "unmap" => spec.detect_zeroes = Some(d),
            _ => return Err(arg(format!("Parameter 'detect-zeroes' does not accept value '{d}'"))),
        }
    }
    Ok(())
}

/// The protocol options of a `file`/`host_device` node (`BlockdevOptionsFile`).
fn take_file_opts(map: &mut BTreeMap<String, Value>, file: &mut FileSpec) -> Result<()> {
    if let Some(l) = take_str(map, "locking")? {
        file.locking = match l.as_str() {
            "auto" => None,
            v => Some(parse_bool("locking", v)?),
        };
    }
    if let Some(a) = take_str(map, "aio")? {
        match a.as_str() {
            "threads" | "native" | "io_uring" => file.aio = Some(a),
            _ => return Err(arg(format!("Parameter 'aio' does not accept value '{a}'"))),
        }
    }
    let _ = take_size(map, "aio-max-batch")?;
    let _ = take_bool(map, "x-check-cache-dropped")?;
    let _ = take_str(map, "drop-cache")?;
    Ok(())
}

/// A protocol node (`file.driver=file,file.filename=...`) from its own keys; leftovers are refused.
fn take_file_node(mut map: BTreeMap<String, Value>, parent: &mut ImageSpec, what: &str) -> Result<FileSpec> {
    let mut file = FileSpec::default();
    match take_str(&mut map, "driver")?.as_deref() {
        Some(d @ ("s3" | "http" | "https")) => {
            let file = take_remote_node(&mut map, d, what)?;
            take_common(&mut map, parent)?;
            if let Some(k) = map.keys().next() {
                return Err(Error::unsupported(format!("Block protocol '{d}' doesn't support the option '{k}'")));
            }
            return Ok(file);
        }
        None | Some("file") => {}
        Some("host_device") => file.host_device = true,
        Some(d) if UNSUPPORTED_DRIVERS.contains(&d) => {
            return Err(Error::unsupported(format!("{what}: the '{d}' driver is not supported by qnbd")));
        }
        Some(d) => {
            return Err(Error::unsupported(format!(
                "{what}: driver '{d}' is not a protocol qnbd can open (file, host_device)"
            )))
        }
    }
    file.filename =
        take_str(&mut map, "filename")?.ok_or_else(|| arg(format!("{what}: the 'filename' option is required")))?;
    take_file_opts(&mut map, &mut file)?;
    // The protocol node's own cache and discard options apply to the whole image here.
    take_common(&mut map, parent)?;
    if let Some(k) = map.keys().next() {
        return Err(Error::unsupported(format!(
            "Block protocol '{}' doesn't support the option '{k}'",
            if file.host_device { "host_device" } else { "file" }
        )));
    }
    Ok(file)
}

/// A remote protocol node: `driver=s3` with `url=s3://B/K` or `bucket` and `key`, and optionally `endpoint`,
/// `region`, `access-key-id`, `secret-access-key`, `timeout`; `driver=http|https` with qemu curl's `url` and
/// `timeout` (its `readahead` and `sslverify=on` accepted; the cache does readahead).
fn take_remote_node(map: &mut BTreeMap<String, Value>, driver: &str, what: &str) -> Result<FileSpec> {
    let url = take_str(map, "url")?;
    let mut r = crate::remote::RemoteSpec::default();
    if driver == "s3" {
        let (bucket, key) = (take_str(map, "bucket")?, take_str(map, "key")?);
        r.url = match (url, bucket, key) {
            (Some(u), None, None) if u.starts_with("s3://") => u,
            (None, Some(b), Some(k)) => format!("s3://{b}/{k}"),
            _ => return Err(arg(format!("{what}: the s3 driver needs 'url=s3://BUCKET/KEY' or 'bucket' and 'key'"))),
        };
        r.endpoint = take_str(map, "endpoint")?;
        r.region = take_str(map, "region")?;
        r.access_key_id = take_str(map, "access-key-id")?;
        r.secret_access_key = take_str(map, "secret-access-key")?;
    } else {
        r.url = url.unwrap_or_default();
        if !r.url.to_ascii_lowercase().starts_with(&format!("{driver}://")) {
            return Err(arg(format!("{what}: the {driver} driver needs 'url={driver}://HOST/PATH'")));
        }
        let _ = take_size(map, "readahead")?;
        if take_bool(map, "sslverify")? == Some(false) {
            return Err(Error::unsupported(format!("{what}: sslverify=off is not supported by qnbd")));
        }
    }
    r.timeout = take_size(map, "timeout")?;
    r.location()?;
    Ok(FileSpec { filename: r.url.clone(), remote: Some(r), ..Default::default() })
}

/// A child given as a reference to another node (`file=NODE`): qnbd has no node graph, so none can be found
/// (qemu's words); JSON `null` is the wrong type there.
fn no_node_reference(map: &mut BTreeMap<String, Value>, key: &str) -> Result<()> {
    match map.remove(key) {
        Some(Value::Str(r)) => Err(Error::unsupported(format!("Cannot find device='{r}' nor node-name='{r}'"))),
        Some(Value::Null) => Err(arg(format!("Invalid parameter type for '{key}', expected: string"))),
        None => Ok(()),
    }
}

/// qemu's `compress` filter (block/compress.c): its `file` child is the image (a qcow2 node, or a file to
/// probe), whose writes become compressed clusters. Its own options (`read-only`, `cache.*`, ...) apply to
/// the whole image, as a protocol node's do.
fn take_compress(map: &mut BTreeMap<String, Value>) -> Result<ImageSpec> {
    no_node_reference(map, "file")?;
    let mut sub = take_subtree(map, "file");
    if sub.is_empty() {
        return Err(arg("A block device must be specified for \"file\""));
    }
    // `file.filename` without a driver is a file node, as in qemu.
    if !sub.contains_key("driver") && sub.contains_key("filename") {
        return Err(Error::unsupported("Compression is not supported for underlying format: file"));
    }
    let mut inner = take_image(&mut sub, "file")?;
    if let Some(k) = sub.keys().next() {
        return Err(unsupported_option(&inner, k).context("file"));
    }
    // Only qcow2 stores compressed clusters (qemu: "Compression is not supported for underlying format").
    let format = match (inner.protocol_only, inner.format) {
        (true, _) if inner.file.host_device => Some("host_device"),
        (true, _) => Some("file"),
        (false, Some(Format::Raw)) => Some("raw"),
        _ => None,
    };
    if let Some(f) = format {
        return Err(Error::unsupported(format!("Compression is not supported for underlying format: {f}")));
    }
    take_common(map, &mut inner)?;
    inner.compress = true;
    Ok(inner)
}

fn take_image(map: &mut BTreeMap<String, Value>, what: &str) -> Result<ImageSpec> {
    let mut spec = ImageSpec::default();
    let driver = take_str(map, "driver")?;
    let label = if what.is_empty() { "image" } else { what };
    match driver.as_deref() {
        Some("file") | Some("host_device") => {
            spec.protocol_only = true;
            spec.format = Some(Format::Raw);
            spec.file.host_device = driver.as_deref() == Some("host_device");
            spec.file.filename = take_str(map, "filename")?.ok_or_else(|| arg("The 'filename' option is required"))?;
            take_file_opts(map, &mut spec.file)?;
            take_common(map, &mut spec)?;
            return Ok(spec);
        }
        Some(d @ ("s3" | "http" | "https")) => {
            // A remote protocol node exposed directly, as qemu exposes `driver=https,url=...`.
            spec.protocol_only = true;
            spec.format = Some(Format::Raw);
            spec.file = take_remote_node(map, d, label)?;
            take_common(map, &mut spec)?;
            return Ok(spec);
        }
        Some("compress") if what.is_empty() => return take_compress(map),
        Some("compress") => {
            return Err(Error::unsupported(format!("{label}: the 'compress' filter is supported only on top")));
        }
        Some("qcow2") => spec.format = Some(Format::Qcow2),
        Some("raw") => spec.format = Some(Format::Raw),
        None => {}
        Some(d) if UNSUPPORTED_DRIVERS.contains(&d) => {
            return Err(Error::unsupported(format!("the '{d}' format is not supported by qnbd (only qcow2 and raw)")));
        }
        Some(d) => return Err(Error::unsupported(format!("Unknown driver '{d}'"))),
    }
    // The file under the format driver.
    no_node_reference(map, "file")?;
    let sub = take_subtree(map, "file");
    if sub.is_empty() {
        return Err(arg(if spec.format.is_some() {
            format!("{label}: a block device must be specified for \"file\"")
        } else {
            "Must specify either driver or file".to_string()
        }));
    }
    spec.file = take_file_node(sub, &mut spec, "file")?;
    take_common(map, &mut spec)?;
    match spec.format {
        Some(Format::Raw) => {
            spec.offset = take_size(map, "offset")?;
            spec.size = take_size(map, "size")?;
            if spec.size.is_some_and(|s| s % 512 != 0) {
                return Err(arg("Specified size is not multiple of 512"));
            }
        }
        Some(Format::Qcow2) | None => {
            match map.remove("backing") {
                Some(Value::Null) => spec.backing = BackingSpec::None,
                Some(Value::Str(s)) if s.is_empty() => spec.backing = BackingSpec::None,
                Some(Value::Str(r)) => {
                    return Err(Error::unsupported(format!("Cannot find device='{r}' nor node-name='{r}'")));
                }
                None => {}
            }
            let mut b = take_subtree(map, "backing");
            if !b.is_empty() {
                if spec.backing == BackingSpec::None {
                    return Err(arg("'backing' is both null and a set of options"));
                }
                let inner = take_image(&mut b, "backing")?;
                if let Some(k) = b.keys().next() {
                    return Err(unsupported_option(&inner, k).context("backing"));
                }
                spec.backing = BackingSpec::Image(Box::new(inner));
            }
            no_node_reference(map, "data-file")?;
            let d = take_subtree(map, "data-file");
            if !d.is_empty() {
                spec.data_file = Some(take_file_node(d, &mut spec, "data-file")?);
            }
            spec.l2_cache_size = take_size(map, "l2-cache-size")?;
            // Cache tuning qnbd does its own way: accepted and checked, not used.
            for k in ["cache-size", "refcount-cache-size", "cache-clean-interval"] {
                let _ = take_size(map, k)?;
            }
            for k in ["lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other"] {
                let _ = take_bool(map, k)?;
            }
            let _ = take_bool(map, "discard-no-unref")?;
            let _ = take_str(map, "overlap-check")?;
            let _ = take_subtree(map, "overlap-check");
            if map.keys().any(|k| k == "encrypt" || k.starts_with("encrypt.")) {
                return Err(Error::unsupported("encrypted qcow2 images are not supported by qnbd"));
            }
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_names_pipelines_use() {
        // ovirt-imageio qemu_nbd.py and vdsm nbd.py: an overlay served without its backing chain.
        let s = ImageSpec::parse_filename(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/v/img"},"backing":null}"#,
        )
        .unwrap();
        assert_eq!(s.format, Some(Format::Qcow2));
        assert_eq!(s.file.filename, "/v/img");
        assert_eq!(s.backing, BackingSpec::None);
        assert_eq!(s.display_name(), "/v/img");
        // Dotted keys inside JSON, numbers as numbers.
        let s = ImageSpec::parse_filename(r#"json:{"file.filename":"r.raw","driver":"raw","offset":512,"size":1024}"#)
            .unwrap();
        assert_eq!((s.offset, s.size), (Some(512), Some(1024)));
    }

    #[test]
    fn image_opts_with_every_option_pipelines_pass() {
        let s = ImageSpec::parse_opts(
            "driver=qcow2,file.driver=file,file.filename=/a,,b.qcow2,file.locking=off,file.aio=native,\
             cache.direct=on,cache.no-flush=off,read-only=on,discard=unmap,detect-zeroes=unmap,\
             data-file.filename=d.raw,backing.driver=raw,backing.file.filename=base.raw,l2-cache-size=4M",
        )
        .unwrap();
        assert_eq!(s.file.filename, "/a,b.qcow2");
        assert_eq!(s.file.locking, Some(false));
        assert_eq!(s.file.aio.as_deref(), Some("native"));
        assert_eq!((s.cache_direct, s.cache_no_flush, s.read_only), (Some(true), Some(false), Some(true)));
        assert_eq!(s.discard.as_deref(), Some("unmap"));
        assert_eq!(s.data_file.as_ref().map(|d| d.filename.as_str()), Some("d.raw"));
        assert_eq!(s.l2_cache_size, Some(4 << 20));
        let BackingSpec::Image(b) = &s.backing else { panic!("backing spec expected") };
        assert_eq!((b.format, b.file.filename.as_str()), (Some(Format::Raw), "base.raw"));
        let s = ImageSpec::parse_opts("driver=host_device,filename=/dev/loop0").unwrap();
        assert!(s.protocol_only && s.file.host_device);
    }

    #[test]
    fn remote_names_and_options() {
        let s = ImageSpec::parse_filename("s3://b/dir/k.qcow2").unwrap();
        assert_eq!(s.file.remote.as_ref().map(|r| r.url.as_str()), Some("s3://b/dir/k.qcow2"));
        let s =
            ImageSpec::parse_opts("driver=qcow2,file.driver=https,file.url=https://h/p.qcow2,file.timeout=5").unwrap();
        let r = s.file.remote.unwrap();
        assert_eq!((r.url.as_str(), r.timeout), ("https://h/p.qcow2", Some(5)));
        let s = ImageSpec::parse_opts(
            "driver=qcow2,file.driver=s3,file.bucket=b,file.key=k/x,file.endpoint=http://e:1,file.region=r,\
             file.access-key-id=A,file.secret-access-key=S",
        )
        .unwrap();
        let r = s.file.remote.unwrap();
        assert_eq!(r.url, "s3://b/k/x");
        assert_eq!((r.endpoint.as_deref(), r.region.as_deref()), (Some("http://e:1"), Some("r")));
        assert_eq!((r.access_key_id.as_deref(), r.secret_access_key.as_deref()), (Some("A"), Some("S")));
        let s = ImageSpec::parse_opts("driver=http,url=http://h/raw.img").unwrap();
        assert!(s.protocol_only && s.file.remote.is_some());
        let e = |s: &str| ImageSpec::parse_opts(s).unwrap_err().to_string();
        assert!(e("driver=qcow2,file.driver=s3,file.bucket=b").contains("needs 'url=s3://BUCKET/KEY'"));
        assert!(e("driver=qcow2,file.driver=https,file.url=http://h/p").contains("needs 'url=https://HOST/PATH'"));
        assert!(e("driver=qcow2,file.driver=https,file.url=https://h/p,file.sslverify=off").contains("sslverify"));
        assert_eq!(
            e("driver=qcow2,file.driver=s3,file.url=s3://b/k,file.bogus=1"),
            "Block protocol 's3' doesn't support the option 'bogus'"
        );
        assert!(ImageSpec::parse_filename("nbd://h/x").is_err());
    }

    #[test]
    fn errors_are_qemus() {
        let e = |s: &str| ImageSpec::parse_opts(s).unwrap_err().to_string();
        assert_eq!(e("driver=foo,file.filename=x"), "Unknown driver 'foo'");
        assert!(e("driver=vmdk,file.filename=x").contains("'vmdk' format is not supported"));
        assert_eq!(e("driver=raw,file.filename=x,bogus=1"), "Block format 'raw' does not support the option 'bogus'");
        assert_eq!(
            e("driver=raw,file.driver=file,file.filename=x,file.bogus=1"),
            "Block protocol 'file' doesn't support the option 'bogus'"
        );
        assert_eq!(e("filename=x"), "Must specify either driver or file");
        assert_eq!(e("driver=raw,file=x"), "Cannot find device='x' nor node-name='x'");
        assert!(e("driver=raw,file.filename=x,offset=x").starts_with("Parameter 'offset' expects"));
        assert_eq!(e("driver=raw,file.filename=x,size=4097"), "Specified size is not multiple of 512");
        let j = |s: &str| ImageSpec::parse_filename(s).unwrap_err().to_string();
        assert!(j("json:{bad").starts_with("Could not parse the JSON options"));
        assert_eq!(j("json:[]"), "Invalid JSON object given");
        assert!(j("nbd://localhost/x").contains("'nbd' protocol is not supported"));
        assert!(j("json:{\"driver\":\"qcow2\",\"file\":{\"filename\":\"x\"},\"encrypt.format\":\"luks\"}")
            .contains("encrypted"));
    }

    #[test]
    fn the_compress_filter_over_qcow2_only() {
        // virt-v2v's output for -oo compressed (output/output.ml), with a ',' in the name.
        let s = ImageSpec::parse_opts(
            "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename=/o/a,,b.qcow2",
        )
        .unwrap();
        assert!(s.compress);
        assert_eq!((s.format, s.file.filename.as_str()), (Some(Format::Qcow2), "/o/a,b.qcow2"));
        // The filter's own options apply to the image; json: names work the same.
        let s = ImageSpec::parse_filename(
            r#"json:{"driver":"compress","read-only":true,"file":{"driver":"qcow2","file":{"filename":"x"}}}"#,
        )
        .unwrap();
        assert_eq!((s.compress, s.read_only), (true, Some(true)));
        // The child's format is probed when it has none but a file below it.
        assert_eq!(ImageSpec::parse_opts("driver=compress,file.file.filename=x").unwrap().format, None);
        // qemu-nbd's messages for what cannot hold compressed clusters, or holds no file.
        let e = |s: &str| ImageSpec::parse_opts(s).unwrap_err().to_string();
        assert_eq!(e("driver=compress"), "A block device must be specified for \"file\"");
        assert_eq!(
            e("driver=compress,file.driver=raw,file.file.filename=x"),
            "Compression is not supported for underlying format: raw"
        );
        for f in ["file.driver=file,file.filename=x", "file.filename=x"] {
            assert_eq!(e(&format!("driver=compress,{f}")), "Compression is not supported for underlying format: file");
        }
        assert!(e("driver=qcow2,file.filename=x,backing.driver=compress,backing.file.driver=qcow2").contains("on top"));
        assert!(e("driver=compress,file.driver=qcow2,file.file.filename=x,bogus=1").contains("'bogus'"));
        assert!(e("driver=compress,file=node0").contains("node-name='node0'"));
    }

    #[test]
    fn plain_names_stay_plain() {
        for n in ["disk.img", "/a/b:c.img", "./x:y", "dir/nbd:z"] {
            let s = ImageSpec::parse_filename(n).unwrap();
            assert_eq!((s.file.filename.as_str(), s.format), (n, None));
        }
        assert_eq!(ImageSpec::parse_filename("file:x:y").unwrap().file.filename, "x:y");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("s", "4k").unwrap(), 4096);
        assert_eq!(parse_size("s", "1G").unwrap(), 1 << 30);
        assert!(parse_size("s", "16E").is_err());
        assert!(parse_size("s", "-1").is_err());
        assert!(parse_size("s", "").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_fails_cleanly(s in "\\PC{0,200}") {
            let _ = ImageSpec::parse_opts(&s);
            let _ = ImageSpec::parse_filename(&s);
            let _ = ImageSpec::parse_filename(&format!("json:{s}"));
        }
    }
}
