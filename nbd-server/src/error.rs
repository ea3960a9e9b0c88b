//! The error type of the nbd-server library: what failed (configuration, TLS material, the kernel's NBD
//! client, FUSE) with a message fit for the user; the binary prints it and exits non-zero.

/// An error of the nbd-server library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad option or value given by the user (a CIDR, an `--object` list, a boolean).
    #[error("{0}")]
    Config(String),
    /// TLS certificates, keys or names.
    #[error("{0}")]
    Tls(String),
    /// The kernel's NBD client (`-c`/`-d`).
    #[error("{0}")]
    Kernel(String),
    /// A FUSE mount or unmount.
    #[error("{0}")]
    Fuse(String),
    /// The image.
    #[error(transparent)]
    Image(#[from] qcow2::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
