//! qimg's hand-written size argument parser: any string, no panic, and what it accepts prints back sanely.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../qcow2/src/bin/qimg/size.rs"]
#[allow(dead_code)]
mod size;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(v) = size::parse_size(s) {
            let _ = size::size_to_str(v);
        }
    }
});
