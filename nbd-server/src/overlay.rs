//! Throwaway qcow2 overlays: `-s/--snapshot` writes go to a temporary overlay on the image, deleted at
//! exit. The overlay file is unlinked as soon as it is open, so nothing is left behind even after kill -9.

use qcow2::image::create::{build, CreateOptions};
use qcow2::{BlockDevice, Image, OpenOptions};
use std::sync::Arc;

/// Folder for temporary overlays: `$TMPDIR`, else /var/tmp (as qemu).
fn tmpdir() -> std::path::PathBuf {
    std::env::var_os("TMPDIR").map(Into::into).unwrap_or_else(|| "/var/tmp".into())
}

/// Creates and opens a temporary qcow2 overlay whose backing file is `base` (already open, shared).
pub fn temporary(base: &Arc<Image>, opts: &OpenOptions) -> qcow2::Result<Arc<Image>> {
    let abs = std::fs::canonicalize(base.filename())
        .map_err(|e| qcow2::Error::io(format!("cannot resolve '{}'", base.filename()), e))?;
    let abs = abs.to_string_lossy().into_owned();
    let dir = tmpdir();
    let mut path = None;
    for i in 0..100u32 {
        let p = dir.join(format!("qnbd-snapshot-{}-{i}.qcow2", std::process::id()));
        if !p.exists() {
            path = Some(p);
            break;
        }
    }
    let path = path.ok_or_else(|| qcow2::Error::new(qcow2::ErrorKind::Io, "no free temporary overlay name"))?;
    let co = CreateOptions {
        size: base.size(),
        backing_file: Some(abs),
        backing_format: Some(base.format().name().to_string()),
        ..Default::default()
    };
    let bytes = build(&co)?;
    let p = path.to_string_lossy().into_owned();
    std::fs::write(&path, bytes).map_err(|e| qcow2::Error::io(format!("cannot create '{p}'"), e))?;
    let o = OpenOptions { format: Some(qcow2::Format::Qcow2), writable: true, snapshot: None, ..opts.clone() };
    let r = Image::open(&p, &o);
    let _ = std::fs::remove_file(&path);
    r
}
