//! qimg against images the real qemu tools are using: qemu-compatible image locks both ways, the image names
//! pipelines pass (`json:`, `--image-opts`), and formats qimg refuses by name.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// qemu-nbd serving `img` read-write until dropped.
struct QemuNbd(std::process::Child);

impl QemuNbd {
    fn start(img: &Path, fmt: &str, extra: &[&str]) -> QemuNbd {
        let sock = img.with_extension("sock");
        let mut a = vec!["-t", "-k", p(&sock), "-f", fmt];
        a.extend_from_slice(extra);
        a.push(p(img));
        let c = Command::new("qemu-nbd").args(&a).stderr(Stdio::null()).spawn().unwrap();
        let t = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd(c)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The message after the tool's name.
fn msg(o: &std::process::Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr);
    e.split_once(": ").map(|(_, m)| m.to_string()).unwrap_or_default()
}

#[test]
fn qimg_and_qemu_img_refuse_an_image_qemu_nbd_writes_in_the_same_words() {
    let d = tmpdir();
    let img = d.path().join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    let _srv = QemuNbd::start(&img, "qcow2", &[]);
    for args in [&["info", "--output=json"][..], &["check"], &["map", "--output=json"], &["resize"]] {
        let mut a = args.to_vec();
        a.push(p(&img));
        if args[0] == "resize" {
            a.push("32M");
        }
        let (mine, theirs) = (run(QIMG, &a), run("qemu-img", &a));
        assert_eq!(mine.status.code(), Some(1), "qimg {a:?}");
        assert_eq!(theirs.status.code(), Some(1), "qemu-img {a:?}");
        assert_eq!(msg(&mine), msg(&theirs), "{a:?}");
        assert!(msg(&mine).contains("lock"), "{}", msg(&mine));
    }
    // nova's line (nova/privsep/qemu.py, unprivileged_qemu_img_info), with and without -f: -U lets it read.
    for extra in [&[][..], &["-f", "qcow2"][..]] {
        let mut a = vec!["info", p(&img), "--force-share", "--output=json"];
        a.extend_from_slice(extra);
        let m: serde_json::Value = serde_json::from_str(&ok(QIMG, &a)).unwrap();
        let t: serde_json::Value = serde_json::from_str(&ok("qemu-img", &a)).unwrap();
        for k in ["virtual-size", "format", "cluster-size", "dirty-flag", "filename"] {
            assert_eq!(m[k], t[k], "qemu-img info field {k}");
        }
    }
}

#[test]
fn qemu_tools_refuse_an_image_qimg_holds_and_qimg_takes_qemus_locks_on_a_raw_image() {
    let d = tmpdir();
    let img = d.path().join("r.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&img), "4M"]);
    // qemu-nbd writing a raw image shares writes but not resizing, as qemu decides for raw nodes.
    let _srv = QemuNbd::start(&img, "raw", &[]);
    let mine = run(QIMG, &["resize", "-f", "raw", p(&img), "8M"]);
    let theirs = run("qemu-img", &["resize", "-f", "raw", p(&img), "8M"]);
    assert_eq!((mine.status.code(), theirs.status.code()), (Some(1), Some(1)));
    assert_eq!(msg(&mine), msg(&theirs));
    ok(QIMG, &["info", "-f", "raw", p(&img)]);
}

#[test]
fn json_and_image_opts_names_open_what_qemu_img_opens() {
    let d = tmpdir();
    let base = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "4M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 1M", p(&base)]);
    let top = d.path().join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p(&top)]);
    let names = [
        (false, format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}}}}"#, p(&top))),
        (
            false,
            format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#, p(&top)),
        ),
        (false, format!(r#"json:{{"driver":"raw","file":{{"filename":"{}"}},"offset":512,"size":1048576}}"#, p(&base))),
        (true, format!("driver=qcow2,file.driver=file,file.filename={}", p(&top))),
        (true, format!("driver=raw,file.filename={},offset=4096,size=8192", p(&base))),
    ];
    for (opts, name) in &names {
        let mut a = vec!["convert", "-O", "raw"];
        if *opts {
            a.push("--image-opts");
        }
        a.push(name);
        let (m, t) = (d.path().join("m.raw"), d.path().join("t.raw"));
        let mut am = a.clone();
        am.push(p(&m));
        let mut at = a.clone();
        at.push(p(&t));
        ok(QIMG, &am);
        ok("qemu-img", &at);
        assert_eq!(std::fs::read(&m).unwrap(), std::fs::read(&t).unwrap(), "{name}");
        let mut ai = vec!["map", "--output=json"];
        if *opts {
            ai.push("--image-opts");
        }
        ai.push(name);
        assert_eq!(ok(QIMG, &ai), ok("qemu-img", &ai), "map of {name}");
    }
    // Options qemu does not know are refused in qemu's words.
    let bad = format!("driver=raw,file.filename={},bogus=1", p(&base));
    let (mine, theirs) = (run(QIMG, &["info", "--image-opts", &bad]), run("qemu-img", &["info", "--image-opts", &bad]));
    assert_eq!((mine.status.code(), theirs.status.code()), (Some(1), Some(1)));
    assert_eq!(msg(&mine), msg(&theirs));
}

#[test]
fn formats_qimg_cannot_read_are_refused_by_name_not_read_as_raw() {
    let d = tmpdir();
    for fmt in ["vmdk", "vdi", "vhdx", "vpc", "qed", "parallels"] {
        let f = d.path().join(format!("x.{fmt}"));
        ok("qemu-img", &["create", "-q", "-f", fmt, p(&f), "4M"]);
        let o = run(QIMG, &["info", p(&f)]);
        assert_eq!(o.status.code(), Some(1), "{fmt} was opened");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(&format!("'{fmt}' format")), "{fmt}: {e}");
    }
}

#[test]
fn backing_policy_refuses_names_that_leave_the_image_folder() {
    let d = tmpdir();
    let sub = d.path().join("imgs");
    std::fs::create_dir(&sub).unwrap();
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&d.path().join("outside.raw")), "1M"]);
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&sub.join("base.raw")), "1M"]);
    let mk = |name: &str, backing: &str| {
        let f = sub.join(name);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", p(&f), "1M"]);
        f
    };
    let rel = mk("rel.qcow2", "base.raw");
    let abs = mk("abs.qcow2", p(&d.path().join("outside.raw")));
    let up = mk("up.qcow2", "../outside.raw");
    let info = |policy: &str, img: &Path| run(QIMG, &["info", "--backing-chain", "--backing-policy", policy, p(img)]);
    for img in [&rel, &abs, &up] {
        assert!(info("any", img).status.success(), "any: {}", p(img));
    }
    assert!(info("relative", &rel).status.success());
    for img in [&abs, &up] {
        let o = info("relative", img);
        assert_eq!(o.status.code(), Some(1), "{}", p(img));
        assert!(String::from_utf8_lossy(&o.stderr).contains("refused by --backing-policy"), "{o:?}");
    }
    let o = info("none", &rel);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no backing file is allowed"));
    // An external data file named by an absolute path is refused under `relative` too.
    let df = sub.join("df.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", p(&d.path().join("data.raw"))), p(&df), "1M"],
    );
    let o = run(QIMG, &["map", "--backing-policy=relative", p(&df)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("data file"), "{o:?}");
    assert!(run(QIMG, &["map", p(&df)]).status.success());
}

#[test]
fn backing_policy_confines_a_relative_data_file_to_the_image_folder() {
    let d = tmpdir();
    let sub = d.path().join("imgs");
    std::fs::create_dir(&sub).unwrap();
    let img = sub.join("df.qcow2");
    // qemu-img writes the name as given; run it inside the folder so the name is relative.
    let o = std::process::Command::new("qemu-img")
        .current_dir(&sub)
        .args(["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "df.qcow2", "1M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    // qemu opens a data file name relative to the working directory: write from inside the folder.
    let o = std::process::Command::new("qemu-io")
        .current_dir(&sub)
        .args(["-f", "qcow2", "-c", "write -P 0x42 0 4k", "df.qcow2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    // From another folder: under `relative` the name is taken inside the image's folder, never elsewhere.
    let o = std::process::Command::new(QIMG)
        .current_dir(d.path())
        .args(["convert", "--backing-policy=relative", "-O", "raw", p(&img), p(&d.path().join("out.raw"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(&std::fs::read(d.path().join("out.raw")).unwrap()[..4096], &[0x42; 4096][..]);
}
