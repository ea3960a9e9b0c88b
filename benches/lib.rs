//! Shared helpers for qnbd's benches (none yet).
