//! The NBD wire format as pure codecs (NetworkBlockDevice/nbd `doc/proto.md`): constants, option requests and
//! replies, transmission requests, and simple, structured and extended replies. No I/O happens here.

pub mod consts;
pub mod option;
pub mod reply;
pub mod request;

pub use consts::*;
