//! `--fuse MOUNTPOINT`: the image as a regular file.

use crate::daemon::{catch_stop_signals, Ready, STOP};
use crate::{fail, Cli};
use nbd_server::export::Exports;
use std::process::ExitCode;
use std::time::Duration;

/// `--fuse MOUNTPOINT`: serve the image as a file until the mount point is unmounted or a signal arrives.
pub(crate) fn run_fuse(cli: &Cli, exports: Exports, mountpoint: &str) -> ExitCode {
    if exports.list.len() != 1 {
        return fail("--fuse serves exactly one image");
    }
    let export = exports.list[0].clone();
    let mut ready = match Ready::start(cli.fork, cli) {
        Ok(r) => r,
        Err(code) => return code,
    };
    catch_stop_signals();
    let o = nbd_server::fuse::FuseOptions {
        mountpoint: mountpoint.into(),
        file_name: cli.export_name.first().cloned().unwrap_or_else(|| "nbd".into()),
        read_only: export.is_read_only(),
        allow_other: cli.fuse_allow_other,
        io_uring: true,
    };
    let mounted = match nbd_server::fuse::mount(export.device.clone(), &o) {
        Ok(s) => s,
        Err(e) => return ready.fail(e),
    };
    if mounted.over_io_uring() {
        tracing::info!("FUSE over io_uring: the kernel offered it; the rings are registering");
    }
    ready.ok();
    let mut asked = false;
    while !mounted.session.guard.is_finished() {
        if !asked && STOP.load(std::sync::atomic::Ordering::SeqCst) {
            asked = true;
            if let Err(e) = nbd_server::fuse::unmount(&o.mountpoint) {
                // Cannot unmount: stop serving anyway (dropping the session tries once more), after the flush.
                tracing::warn!("{e}");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The io_uring threads end with the connection (or are stopped), before the flush.
    let (ended, served) = mounted.end();
    if let Some(n) = served {
        tracing::info!("FUSE export: {n} requests served over io_uring");
    }
    let ended = ended.map_err(|e| format!("FUSE session: {e}"));
    let result =
        if export.is_read_only() { Ok(()) } else { export.device.flush().map_err(|e| format!("flush failed: {e}")) };
    if let Some(p) = &cli.pid_file {
        let _ = std::fs::remove_file(p);
    }
    if let Err(e) = ended {
        tracing::warn!("{e}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
