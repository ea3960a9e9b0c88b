//! Images on which `fuzz/differential.py` found qimg and qemu-img disagreeing (each fixed in qimg): qimg must
//! now print what qemu-img prints for `info --output=json` and `map --output=json`, with the same exit codes,
//! and the same `check` exit code (and, for files named `check-*`, the same report). Add a file to `tests/differential/` for every disagreement fixed.

mod common;
use common::*;

#[test]
fn every_saved_image_gets_qemu_imgs_answers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/differential");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let src = e.unwrap().path();
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        // A copy: qemu-img check must not see a path it could mistake, and nothing may change the original.
        let d = tmpdir();
        let img = d.path().join("img.qcow2");
        std::fs::copy(&src, &img).unwrap();
        let info = |tool: &str| run(tool, &["info", "--output=json", "-f", "qcow2", p(&img)]);
        let (a, b) = (info(QIMG), info("qemu-img"));
        assert_eq!(a.status.code(), b.status.code(), "{name}: info exit");
        if b.status.success() {
            let (ja, jb): (serde_json::Value, serde_json::Value) =
                (serde_json::from_slice(&a.stdout).unwrap(), serde_json::from_slice(&b.stdout).unwrap());
            for k in
                ["virtual-size", "cluster-size", "format", "dirty-flag", "backing-filename", "backing-filename-format"]
            {
                assert_eq!(ja[k], jb[k], "{name}: info {k}");
            }
        }
        let map = |tool: &str| run(tool, &["map", "--output=json", "-f", "qcow2", p(&img)]);
        let (a, b) = (map(QIMG), map("qemu-img"));
        assert_eq!(a.status.code(), b.status.code(), "{name}: map exit");
        assert_eq!(String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&b.stdout), "{name}: map");
        let check = |tool: &str| run(tool, &["check", "-f", "qcow2", p(&img)]);
        let (a, b) = (check(QIMG), check("qemu-img"));
        assert_eq!(a.status.code(), b.status.code(), "{name}: check exit");
        let text = |o: &std::process::Output| {
            let mut t = String::from_utf8_lossy(&o.stderr).into_owned();
            t.push_str(&String::from_utf8_lossy(&o.stdout));
            let mut l: Vec<String> = t.lines().map(str::to_string).collect();
            l.sort();
            l
        };
        // The full report only where the fix was in check (other damage is worded differently by each tool).
        if name.contains("check-") {
            assert_eq!(text(&a), text(&b), "{name}: check output");
        }
        n += 1;
    }
    assert!(n >= 3);
}
