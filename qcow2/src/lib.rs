//! qcow2 and raw disk images for qnbd: on-disk formats (pure codecs), image opening and validation, guest
//! range mapping through a bounded L2 cache, backing chains, and the [`BlockDevice`] trait the NBD server
//! serves.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod chain;
pub mod device;
pub mod error;
pub mod format;
pub mod image;
pub mod limits;
pub mod lock;
pub mod remote;
pub mod spec;
pub mod storage;
pub mod testing;
pub mod util;

pub use chain::{BackingPolicy, Format, Image, Layer, OpenOptions};
pub use device::{BlockDevice, Piece, Source, SpliceFile, Status};
pub use error::{Error, ErrorKind, Result};
