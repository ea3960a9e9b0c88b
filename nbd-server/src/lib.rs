//! qnbd's NBD server: the wire codec (pure), the handshake state machine (pure), the transmission phase,
//! listeners and exports. `bin/qnbd.rs` maps qemu-nbd's command line onto it.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod acl;
pub mod error;
pub mod export;
pub mod fuse;
pub mod kernel;
mod lent;
pub mod list;
pub mod negotiate;
pub mod overlay;
pub mod proto;
mod queue;
pub mod server;
pub mod tls;
pub mod transmission;
mod uring;
pub mod window;

/// Threads a server runs blocking requests on at most (qemu's thread pool has 64).
pub const BLOCKING_THREADS: usize = 64;

/// Threads that run the connections' tasks (the event loop): half the processors, at least one. The other half
/// is for what the tasks hand off (the blocking pool, the kernel's block and socket work, io_uring) and for
/// clients on the same machine.
///
/// Measured on two processors (`benches/side-by-side.sh`, one thread against two, medians of 3): `--cache=none`
/// 4 KiB random reads QD32 1.12x, random writes 1.2-1.4x (a connection's reading task, its ring's reaper and its
/// writing task then share a thread instead of waking each other across two); the page-cache cases (random
/// reads and writes, sequential reads, `nbdcopy`, four clients, a thousand clients, TLS) 0.99-1.04x.
///
/// `TOKIO_WORKER_THREADS` (tokio's own variable) sets the number instead.
pub fn worker_threads() -> usize {
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        return n.max(1);
    }
    std::thread::available_parallelism().map_or(1, |n| n.get() / 2).max(1)
}
