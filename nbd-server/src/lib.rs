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
