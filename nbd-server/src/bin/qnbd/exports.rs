//! The images to serve and the options that shape them: formats and image specs, cache modes, discard and
//! zero detection, snapshots, per-connection overlays.

use crate::tls_setup::objects;
use crate::Cli;
use nbd_server::export::{DetectZeroes, Export, Exports};
use qcow2::{Format, Image, OpenOptions};
use std::sync::Arc;

pub(crate) fn snapshot_name(s: &str) -> String {
    for part in s.split(',') {
        if let Some(v) = part.strip_prefix("snapshot.name=").or_else(|| part.strip_prefix("snapshot.id=")) {
            return v.to_string();
        }
    }
    s.to_string()
}

/// What `--cache` and `-n` ask for.
#[derive(Debug, Clone, Copy, Default)]
struct CacheMode {
    direct: bool,
    writethrough: bool,
    no_flush: bool,
}

fn cache_mode(cli: &Cli) -> Result<CacheMode, String> {
    let mode = match (cli.cache.as_deref(), cli.nocache) {
        (Some(_), true) => return Err("-n and --cache are mutually exclusive".into()),
        (None, true) => "none",
        (None, false) => "writeback",
        (Some(m), false) => m,
    };
    let c = match mode {
        "writeback" => CacheMode::default(),
        "none" | "off" => CacheMode { direct: true, ..Default::default() },
        "writethrough" => CacheMode { writethrough: true, ..Default::default() },
        "directsync" => CacheMode { direct: true, writethrough: true, no_flush: false },
        "unsafe" => CacheMode { no_flush: true, ..Default::default() },
        m => return Err(format!("Invalid cache mode `{m}'")),
    };
    match cli.aio.as_deref() {
        None | Some("threads") | Some("io_uring") => {}
        Some("native") if !c.direct => {
            return Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".into())
        }
        Some("native") => {}
        Some(a) => return Err(format!("Invalid aio mode '{a}'")),
    }
    Ok(c)
}

/// `--discard` and `--detect-zeroes`, or the image's own `discard`/`detect-zeroes` options.
fn write_modes(discard: &str, detect: &str) -> Result<(bool, DetectZeroes), String> {
    let unmap = match discard {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        d => return Err(format!("Invalid discard mode '{d}'")),
    };
    let detect_zeroes = match detect {
        "off" => DetectZeroes::Off,
        "on" => DetectZeroes::On,
        "unmap" => DetectZeroes::Unmap,
        d => return Err(format!("Invalid detect-zeroes mode '{d}'")),
    };
    if detect_zeroes == DetectZeroes::Unmap && !unmap {
        return Err("--detect-zeroes=unmap requires --discard=unmap".into());
    }
    Ok((unmap, detect_zeroes))
}

/// `--object secret,...`: checked now (qemu's rules), kept for the encrypted images a later version reads.
fn check_secrets(cli: &Cli) -> Result<(), String> {
    for o in objects(cli)? {
        if o.kind != "secret" {
            continue;
        }
        let id = o.id().ok_or("--object secret needs id=ID")?;
        match (o.get("data"), o.get("file")) {
            (Some(_), Some(_)) => return Err(format!("secret '{id}': 'data' and 'file' are mutually exclusive")),
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
            (None, Some(f)) => {
                std::fs::metadata(f).map_err(|e| format!("Unable to read {f}: {e}"))?;
            }
            (Some(_), None) => {}
        }
        match o.get("format") {
            None | Some("raw") | Some("base64") => {}
            Some(f) => return Err(format!("secret '{id}': Invalid parameter 'format' value '{f}' (raw, base64)")),
        }
    }
    Ok(())
}

/// Opens the image; a lock conflict is retried for up to a second, since a qnbd that was just stopped may
/// still be going away (its commit helper holds the image's locks until it has seen the server exit). A real
/// conflict is reported after that second, with qemu's message.
fn open_retrying(spec: &qcow2::spec::ImageSpec, opts: &OpenOptions) -> qcow2::Result<Arc<Image>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match Image::open_spec(spec, opts) {
            Err(e) if e.kind() == qcow2::ErrorKind::Locked && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

pub(crate) fn build_exports(cli: &Cli) -> Result<Exports, String> {
    let format = cli.format.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?;
    if cli.image_opts && format.is_some() {
        return Err("--image-opts and -f are mutually exclusive".into());
    }
    let cache = cache_mode(cli)?;
    write_modes(&cli.discard, &cli.detect_zeroes)?;
    check_secrets(cli)?;
    if cli.export_name.len() > cli.files.len() {
        return Err("more export names (-x) than files".into());
    }
    let mut list = Vec::new();
    let shared: qcow2::chain::SharedImages = Default::default();
    for (i, f) in cli.files.iter().enumerate() {
        let spec = if cli.image_opts {
            qcow2::spec::ImageSpec::parse_opts(f)
        } else {
            qcow2::spec::ImageSpec::parse_filename(f)
        }
        .map_err(|e| format!("Failed to open '{f}': {e}"))?;
        let (unmap, detect_zeroes) = write_modes(
            spec.discard.as_deref().unwrap_or(&cli.discard),
            spec.detect_zeroes.as_deref().unwrap_or(&cli.detect_zeroes),
        )?;
        let snapshot = cli.load_snapshot.as_deref().map(snapshot_name);
        let read_only = cli.read_only || snapshot.is_some() || spec.read_only == Some(true);
        let opts = OpenOptions {
            format,
            writable: !read_only && !cli.snapshot && !cli.fresh_per_connection,
            snapshot,
            max_chain_depth: cli.max_chain_depth,
            backing_policy: qcow2::BackingPolicy::parse(&cli.backing_policy).map_err(|e| e.to_string())?,
            shared: Some(shared.clone()),
            // Commits go to the helper process once it is installed below (in this thread until then).
            commit_sink: Some(std::sync::Arc::new(qcow2::image::commit::HelperSink)),
            direct: cache.direct,
            ..Default::default()
        };
        let img = open_retrying(&spec, &opts).map_err(|e| e.to_string())?;
        let f = &spec.display_name().to_string();
        let base = img.clone();
        let (img, read_only) = if cli.snapshot && !read_only {
            (nbd_server::overlay::temporary(&img, &opts).map_err(|e| e.to_string())?, false)
        } else {
            (img, read_only)
        };
        let name = match cli.export_name.get(i) {
            Some(n) => n.clone(),
            None if cli.files.len() == 1 => String::new(),
            None => f.clone(),
        };
        if name.len() > nbd_server::proto::MAX_STRING {
            return Err("export name is longer than 4096 bytes".into());
        }
        for b in &cli.bitmaps {
            match img.has_bitmap(b) {
                Ok(true) => {}
                Ok(false) => return Err(format!("Bitmap '{b}' is not found")),
                Err(e) => return Err(e.to_string()),
            }
        }
        list.push(Arc::new(Export {
            name,
            description: cli.description.clone().unwrap_or_default(),
            device: if cli.offset == 0 {
                img as Arc<dyn qcow2::BlockDevice>
            } else {
                Arc::new(
                    nbd_server::window::Window::new(img, cli.offset)
                        .ok_or_else(|| format!("Offset {} is beyond the end of '{f}'", cli.offset))?,
                )
            },
            read_only,
            unmap,
            detect_zeroes,
            allocation_depth: cli.allocation_depth,
            bitmaps: cli.bitmaps.clone(),
            multi_conn: (cli.shared != 1 || cli.connections > 1) && !cli.fresh_per_connection,
            fresh: cli
                .fresh_per_connection
                .then(|| nbd_server::export::Fresh { base: base.clone(), opts: opts.clone() }),
            cache: nbd_server::export::Cache {
                writethrough: cache.writethrough,
                ignore_flush: cache.no_flush || spec.cache_no_flush == Some(true),
            },
        }));
    }
    Ok(Exports { list, tls_only: cli.tls_only.clone() })
}
