//! The NBD wire format as pure codecs (NetworkBlockDevice/nbd `doc/proto.md`): constants, option requests and
//! replies, transmission requests, and simple, structured and extended replies. No I/O happens here.
#![deny(clippy::arithmetic_side_effects)] // every number here comes from a client or the user

pub mod consts;
pub mod option;
pub mod reply;
pub mod request;

pub use consts::*;
