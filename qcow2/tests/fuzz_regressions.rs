//! Inputs the fuzzers found, replayed with `cargo test`. Each file in `tests/fuzz_regressions/` is named
//! after its fuzz target (or `repair-` for an image the read-write open must repair cleanly); the replay runs
//! the same case function the target runs.

#[test]
fn replay_every_saved_fuzz_input() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&p).unwrap();
        if name.starts_with("qcow2_write-") {
            if let Err(e) = qcow2::testing::write_case(&data) {
                panic!("{name}: {e}");
            }
            n += 1;
        } else if name.starts_with("repair-") {
            if let Err(e) = qcow2::testing::repair_case(&data) {
                panic!("{name}: {e}");
            }
            n += 1;
        }
    }
    assert!(n > 0, "no saved inputs found in {}", dir.display());
}
