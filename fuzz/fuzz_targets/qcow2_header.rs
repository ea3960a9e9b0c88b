//! Header and header extension parsing: any bytes, no panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = qcow2::format::header::Header::parse(data) {
        // Every accepted header is self-consistent.
        assert!((9..=21).contains(&h.cluster_bits));
        assert!(h.refcount_order <= 6);
        let _ = h.feature_name(0, 3);
    }
    let _ = qcow2::format::snapshot::parse_table(data, 8);
});
