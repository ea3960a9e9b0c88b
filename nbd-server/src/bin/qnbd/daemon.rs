//! Going to the background (`--fork`, and `-c`/`--fuse` once the device or mount is ready), the pid file, and
//! stop signals.

use crate::{fail, Cli};
use std::process::ExitCode;

/// The write end of the pipe a backgrounded server reports readiness on.
pub(crate) struct Ready(Option<std::fs::File>);

impl Ready {
    /// Not backgrounded: errors are printed here.
    pub(crate) fn foreground() -> Ready {
        Ready(None)
    }

    /// Forks; the parent waits for the child's report and exits with it; the child carries on in a new
    /// session. Must run before any thread is started.
    pub(crate) fn background() -> Result<Ready, ExitCode> {
        use std::io::Read;
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail(format!("pipe: {e}")))?;
        let (mut rd, wr) = (std::fs::File::from(rd), std::fs::File::from(wr));
        // Remote images' cache brought to rest (their runtime's idle threads are left to this parent).
        qcow2::remote::quiesce();
        // SAFETY: no thread of ours runs (the remote runtime's are idle), so the child is a faithful copy.
        match unsafe { nix::unistd::fork() } {
            Err(e) => Err(fail(format!("fork failed: {e}"))),
            Ok(nix::unistd::ForkResult::Child) => {
                drop(rd);
                let _ = nix::unistd::setsid();
                Ok(Ready(Some(wr)))
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => {
                drop(wr);
                let mut msg = String::new();
                let _ = rd.read_to_string(&mut msg);
                if msg.starts_with("OK") {
                    parent_exit(true)
                } else if let Some(e) = msg.strip_prefix("ERR ") {
                    let _ = fail(e.trim_end());
                    parent_exit(false)
                } else {
                    let _ = fail("the server exited before it was ready");
                    parent_exit(false)
                }
            }
        }
    }

    /// Goes to the background (when `background`) and writes the pid file; `Err` carries the exit code of a
    /// parent that waited for its child, or of a failure.
    pub(crate) fn start(background: bool, cli: &Cli) -> Result<Ready, ExitCode> {
        let mut ready = if background { Ready::background()? } else { Ready::foreground() };
        match write_pid_file(cli) {
            Ok(()) => Ok(ready),
            Err(e) => Err(ready.fail(e)),
        }
    }

    /// Reports success; a background server lets go of the caller's terminal and pipes.
    pub(crate) fn ok(&mut self) {
        use std::io::Write;
        if let Some(mut w) = self.0.take() {
            let _ = w.write_all(b"OK\n");
            release_terminal();
        }
    }

    /// Reports failure (printed by the waiting parent, or here).
    pub(crate) fn fail(&mut self, msg: impl std::fmt::Display) -> ExitCode {
        use std::io::Write;
        match self.0.take() {
            Some(mut w) => {
                let _ = write!(w, "ERR {msg}");
                ExitCode::FAILURE
            }
            None => fail(msg),
        }
    }
}

pub(crate) fn write_pid_file(cli: &Cli) -> Result<(), String> {
    if let Some(p) = &cli.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("Failed to write pid file {p}: {e}"))?;
    }
    Ok(())
}

pub(crate) static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// SIGTERM, SIGINT and SIGHUP set [`STOP`] instead of killing the process.
pub(crate) fn catch_stop_signals() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { signal(sig, SigHandler::Handler(on_stop_signal)) };
    }
}

/// A daemon lets go of the caller's terminal and pipes (the caller may be waiting for EOF): standard input,
/// output and error become /dev/null.
pub(crate) fn release_terminal() {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// The parent of a fork exits here, at once: it must not drop the images it opened before the fork (their
/// close would flush metadata and store dirty bitmaps while the child goes on serving the same files).
fn parent_exit(ok: bool) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(if ok { 0 } else { 1 })
}
