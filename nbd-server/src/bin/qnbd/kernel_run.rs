//! `-c DEV` and `-d DEV`: the kernel's NBD client.

use crate::daemon::{catch_stop_signals, Ready, STOP};
use crate::{fail, Cli};
use nbd_server::export::Exports;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

/// `-d DEV`.
pub(crate) fn disconnect(dev: &str) -> ExitCode {
    let d = match nbd_server::kernel::Device::open(dev) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    match nbd_server::kernel::detach(&d, Duration::from_secs(60)) {
        Ok(()) => {
            println!("{dev} disconnected");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `-c DEV`: serve FILE to the kernel's NBD client over socketpairs.
pub(crate) fn run_kernel(cli: &Cli, exports: Exports, dev_path: &str) -> ExitCode {
    use nbd_server::kernel::{self, AttachOptions, Device, Link};
    use std::os::fd::AsRawFd;
    if exports.list.len() != 1 {
        return fail("-c serves exactly one image");
    }
    let dev = match Device::open(dev_path) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    // Checked before going to the background too, so the error reaches the caller's terminal directly.
    if let Err(e) = kernel::ensure_free(&dev) {
        return fail(e);
    }
    let export = exports.list[0].clone();
    let mut ready = match Ready::start(cli.verbose == 0, cli) {
        Ok(r) => r,
        Err(code) => return code,
    };
    // A stop signal before the runtime's handlers exist is remembered, not fatal: the device must be
    // disconnected, not left pointing at a dead server.
    catch_stop_signals();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return ready.fail(format!("cannot start the runtime: {e}")),
    };
    let mut kernel_ends = Vec::new();
    let mut tasks = Vec::new();
    {
        let _g = rt.enter();
        for _ in 0..cli.connections {
            let pair = std::os::unix::net::UnixStream::pair().and_then(|(k, s)| {
                s.set_nonblocking(true)?;
                Ok((k, tokio::net::UnixStream::from_std(s)?))
            });
            let (k, s) = match pair {
                Ok(p) => p,
                Err(e) => return ready.fail(format!("socketpair: {e}")),
            };
            nbd_server::server::grow_send_buffer(&s);
            let fd = s.as_fd().try_clone_to_owned().ok();
            tasks.push(rt.spawn(nbd_server::server::serve_kernel(s, export.clone(), fd)));
            kernel_ends.push(k);
        }
    }
    let fds: Vec<i32> = kernel_ends.iter().map(|k| k.as_raw_fd()).collect();
    let opts = AttachOptions { timeout: cli.timeout, dead_conn_timeout: cli.dead_timeout, force_ioctl: cli.use_ioctl };
    // Netlink records the calling thread as the device's server: this is the main thread, so the pid is ours.
    let link = match kernel::attach(&dev, export.device.size(), export.flags(), &fds, &opts) {
        Ok(l) => l,
        Err(e) => {
            let _ = cli.pid_file.as_ref().map(std::fs::remove_file);
            return ready.fail(e);
        }
    };
    // The kernel holds its own references to its ends.
    drop(kernel_ends);
    match kernel::wait_ready(&dev, export.device.size(), Duration::from_secs(30)) {
        Ok(parts) => tracing::info!("{dev_path} is ready: {} bytes, partitions {parts:?}", export.device.size()),
        Err(e) => {
            let _ = kernel::request_disconnect(&dev);
            let _ = cli.pid_file.as_ref().map(std::fs::remove_file);
            return ready.fail(e);
        }
    }
    ready.ok();
    let dev2 = dev.clone();
    let served = rt.block_on(async move {
        let all = async {
            let mut r: Result<(), String> = Ok(());
            for t in tasks {
                match t.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::info!("kernel connection ended: {e}"),
                    Err(e) => r = Err(format!("a connection task failed: {e}")),
                }
            }
            r
        };
        tokio::pin!(all);
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
        else {
            return all.await;
        };
        if !STOP.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::select! {
                r = &mut all => return r,
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        }
        // Asked to stop: disconnect the device so the kernel ends its connections, then finish serving them.
        let _ = tokio::task::spawn_blocking(move || kernel::request_disconnect(&dev2)).await;
        match tokio::time::timeout(Duration::from_secs(30), all).await {
            Ok(r) => r,
            Err(_) => Err("the kernel did not close its connections within 30 s".into()),
        }
    });
    let result = served.and_then(|()| {
        if export.is_read_only() {
            Ok(())
        } else {
            export.device.flush().map_err(|e| format!("flush failed: {e}"))
        }
    });
    if let Link::Ioctl(t) = link {
        // NBD_DO_IT returns once the device is disconnected; don't hang on a kernel that does not let go.
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !t.is_finished() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if t.is_finished() {
            if let Ok(Err(e)) = t.join() {
                tracing::info!("NBD_DO_IT: {e}");
            }
        }
    }
    dev.write_status(&result);
    if let Some(p) = &cli.pid_file {
        let _ = std::fs::remove_file(p);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
