//! Throwaway qcow2 overlays: `-s/--snapshot` writes go to a temporary overlay on the image, deleted at
//! exit. The overlay file is unlinked as soon as it is open, so nothing is left behind even after kill -9.

use qcow2::{Image, OpenOptions};
use std::sync::Arc;

/// Folder for temporary overlays: `$TMPDIR`, else /var/tmp (as qemu).
fn tmpdir() -> std::path::PathBuf {
    std::env::var_os("TMPDIR").map(Into::into).unwrap_or_else(|| "/var/tmp".into())
}

/// Creates and opens a temporary qcow2 overlay whose backing file is `base` (already open, shared).
pub fn temporary(base: &Arc<Image>, opts: &OpenOptions) -> qcow2::Result<Arc<Image>> {
    let dir = tmpdir();
    let mut last = None;
    for i in 0..100u32 {
        let path = dir.join(format!("qnbd-snapshot-{}-{i}.qcow2", std::process::id()));
        if path.exists() {
            continue;
        }
        match base.create_overlay(&path, opts) {
            Ok(img) => {
                // Unlinked as soon as it is open: nothing is left behind, even after kill -9.
                let _ = std::fs::remove_file(&path);
                return Ok(img);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| qcow2::Error::new(qcow2::ErrorKind::Io, "no free temporary overlay name")))
}
