//! NBD server for qnbd.
