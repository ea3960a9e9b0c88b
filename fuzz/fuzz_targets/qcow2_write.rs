//! The write path on a fuzzed image: a fuzzed sequence of write / zero / discard / flush, then the
//! consistency check must find no corruption the writer introduced (images that start clean end clean).
//! The case itself lives in `qcow2::testing::write_case`, which `cargo test` replays on saved inputs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = qcow2::testing::write_case(data) {
        panic!("{e}");
    }
});
