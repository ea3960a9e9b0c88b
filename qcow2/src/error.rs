//! The one error type of the `qcow2` crate: a small kind plus a message that names the file, the field and the
//! offending value.

use std::fmt;

/// What went wrong, in a form callers can match on (the NBD server maps it to an errno).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The underlying storage failed.
    Io,
    /// The bytes are not a valid image of the format (bad magic, field out of range).
    InvalidFormat,
    /// A valid image that uses something qnbd does not implement (encryption, unknown feature bit).
    Unsupported,
    /// Metadata that contradicts itself (offset past the end of the file, misaligned table, overlap).
    Corrupt,
    /// A request outside the device.
    OutOfBounds,
    /// A write to a read-only image.
    ReadOnly,
    /// A bad argument from the user (unknown snapshot, bad size string).
    InvalidArgument,
    /// The backing chain loops or is too deep.
    BackingChain,
    /// The device has no room left.
    NoSpace,
    /// Another process holds a conflicting image lock.
    Locked,
    /// The operation is not permitted (a write that would change how a probed raw image is probed).
    NotPermitted,
}

/// An error with its kind, a human message and, for I/O errors, the OS error. Boxed: one pointer wide, so a
/// `Result` on the hot paths (a cluster mapping, a read) stays small and cheap to return.
#[derive(Debug)]
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    msg: String,
    source: Option<std::io::Error>,
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an error of `kind` with `msg`.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error(Box::new(Inner { kind, msg: msg.into(), source: None }))
    }

    /// An I/O error with the operation that failed as context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error(Box::new(Inner { kind: ErrorKind::Io, msg: context.into(), source: Some(source) }))
    }

    /// Shorthand for an [`ErrorKind::InvalidFormat`] error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidFormat, msg)
    }

    /// Shorthand for an [`ErrorKind::Corrupt`] error.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }

    /// The kind of the error.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The OS errno behind an I/O error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.0.source.as_ref().and_then(|e| e.raw_os_error())
    }

    /// Prefixes the message with context (for example the file name).
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.0.msg = format!("{ctx}: {}", self.0.msg);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.source {
            Some(e) => write!(f, "{}: {}", self.0.msg, e),
            None => f.write_str(&self.0.msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source.as_ref().map(|e| e as _)
    }
}
