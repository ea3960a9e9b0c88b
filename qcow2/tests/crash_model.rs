//! The power-cut model: random operations on images qemu made (internal snapshots, compressed clusters,
//! extended L2, an external data file, a backing file, a refcount table that must grow), run on storage that
//! records every write and sync (`qcow2::testing::crash`). At every sync, and after every operation, crash
//! states are drawn: what the last completed sync made durable plus any subset of the writes issued since,
//! some torn at 512-byte sectors. Each state must open (a dirty image is repaired), check without corruption
//! (leaks are allowed), hold every byte acknowledged before the last completed FLUSH, and hold either the old
//! or a newly written value everywhere else. Some states also go through `qemu-img check`.
//!
//! The "bitmaps" image has persistent dirty bitmaps (one enabled, one disabled): crash states are also drawn
//! while the image is closed (when the enabled bitmap is stored), and in every state each bitmap is either
//! marked in use (inconsistent) or, if consistent, dirty wherever the case wrote, zeroed or discarded.
//!
//! `CRASH_CASES` raises the number of random cases (default 120) for long runs.

mod common;
use common::*;
use proptest::prelude::*;
use qcow2::image::{Qcow2, Qcow2Options};
use qcow2::storage::{MemStorage, Storage};
use qcow2::testing::crash::{CrashDisk, CrashState};
use qcow2::{BlockDevice, Image, Layer};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const CAP: u64 = 64 << 20;

/// An image made by qemu, loaded into memory.
struct Fixture {
    name: &'static str,
    dir: PathBuf,
    image: Vec<u8>,
    data_file: Option<(PathBuf, Vec<u8>)>,
    backing: Option<Vec<u8>>,
    /// What qemu reads from it.
    guest: Vec<u8>,
    /// The unit discard works in (subcluster or cluster).
    unit: u64,
    /// Operations every case starts with.
    prologue: Vec<Op>,
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
    Grow(u64),
}

fn pattern(off: u64, len: u64, seed: u8) -> Vec<u8> {
    (off..off + len).map(|i| (i as u8).wrapping_mul(29) ^ seed ^ ((i >> 9) as u8)).collect()
}

fn qemu_io(img: &std::path::Path, cmds: &[&str]) {
    io(img, "qcow2", cmds);
}

fn make(name: &'static str, root: &std::path::Path) -> Fixture {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("t.qcow2");
    let mut backing = None;
    let mut data_file = None;
    let mut prologue = Vec::new();
    let mut unit = 0;
    match name {
        "plain" => {
            create(&img, "cluster_size=4k", "1M");
            qemu_io(&img, &["write -P 0x11 0 300k", "write -P 0x12 600k 64k"]);
        }
        "snapshot" => {
            // The reproduction of the lost-L2 bug: data in an L2 table shared with a snapshot.
            create(&img, "", "1M");
            qemu_io(&img, &["write -P 0xaa 0 64k", "write -P 0xab 256k 64k"]);
            ok("qemu-img", &["snapshot", "-c", "snap", p(&img)]);
            prologue = vec![Op::Write(65536, 4096, 1), Op::Flush];
        }
        "compressed" => {
            create(&img, "cluster_size=16k", "1M");
            qemu_io(&img, &["write -c -P 0x33 0 256k", "write -P 0x34 512k 100k"]);
        }
        "extl2" => {
            create(&img, "extended_l2=on,cluster_size=64k", "1M");
            qemu_io(&img, &["write -P 0x44 0 100k", "write -P 0x45 300k 8k"]);
            unit = 2048;
        }
        "datafile" => {
            let d = dir.join("d.raw");
            create(&img, &format!("data_file={},cluster_size=4k", p(&d)), "1M");
            qemu_io(&img, &["write -P 0x55 0 200k"]);
            data_file = Some(d);
        }
        "backing" => {
            let base = dir.join("base.raw");
            ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "900k"]);
            io(&base, "raw", &["write -P 0x5c 0 900k"]);
            ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=8k,refcount_bits=1",
                    "-b",
                    "base.raw",
                    "-F",
                    "raw",
                    p(&img),
                    "1M",
                ],
            );
            qemu_io(&img, &["write -P 0x66 100k 50k"]);
            backing = Some(std::fs::read(&base).unwrap());
        }
        "bitmaps" => {
            create(&img, "", "1M");
            qemu_io(&img, &["write -P 0x21 0 256k"]);
            ok("qemu-img", &["bitmap", "--add", "-g", "16k", p(&img), "b0"]);
            ok("qemu-img", &["bitmap", "--add", "--disable", p(&img), "b1"]);
            qemu_io(&img, &["write -P 0x22 512k 64k"]);
        }
        "growth" => {
            // 512-byte clusters and 64-bit refcounts: one refcount-table cluster covers 2 MiB of file, so
            // filling the last quarter of the disk makes the table grow and move.
            create(&img, "cluster_size=512,refcount_bits=64", "2M");
            qemu_io(&img, &["write -P 0x77 0 1536k"]);
            prologue = vec![Op::Write(1536 << 10, 512 << 10, 9), Op::Flush];
        }
        _ => unreachable!("{name}"),
    }
    let raw = dir.join("want.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&raw)]);
    let image = std::fs::read(&img).unwrap();
    let q = Qcow2::open(Arc::new(MemStorage::new(image.clone(), CAP)), None, &Qcow2Options::default());
    let cs = match q {
        Ok(q) => q.cluster_size(),
        // An image with a data file needs it to open; its cluster size is in the header.
        Err(_) => 1 << u32::from_be_bytes(image[20..24].try_into().unwrap()),
    };
    if unit == 0 {
        unit = cs;
    }
    Fixture {
        name,
        image,
        data_file: data_file.map(|d| {
            let bytes = std::fs::read(&d).unwrap();
            (d, bytes)
        }),
        backing,
        guest: std::fs::read(&raw).unwrap(),
        unit,
        prologue,
        dir,
    }
}

const KINDS: [&str; 8] = ["plain", "snapshot", "compressed", "extl2", "datafile", "backing", "growth", "bitmaps"];

fn fixtures() -> &'static Vec<Fixture> {
    static F: OnceLock<(tempfile::TempDir, Vec<Fixture>)> = OnceLock::new();
    &F.get_or_init(|| {
        let d = tmpdir();
        let v = KINDS.iter().map(|k| make(k, d.path())).collect();
        (d, v)
    })
    .1
}

/// What a crash state may hold: the contents at the last completed FLUSH, or any value written since.
#[derive(Clone, Debug)]
struct Expect {
    flushed: Vec<u8>,
    since: Vec<(u64, Vec<u8>)>,
    /// Every range the case changed so far: a consistent enabled bitmap must be dirty there.
    changed: Vec<(u64, u64)>,
}

impl Expect {
    fn allows(&self, i: usize, v: u8) -> bool {
        let at = |(o, d): &(u64, Vec<u8>)| {
            let o = *o as usize;
            i >= o && i < o + d.len() && d[i - o] == v
        };
        self.flushed.get(i).copied().unwrap_or(0) == v || self.since.iter().any(at)
    }
}

fn backing_image(fx: &Fixture) -> Option<Arc<Image>> {
    fx.backing.as_ref().map(|b| {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new(b.clone(), CAP));
        Image::from_layer(Layer::Raw(s), None, "base").unwrap()
    })
}

fn open_image(fx: &Fixture, file: Arc<dyn Storage>, data: Option<Arc<dyn Storage>>) -> qcow2::Result<Arc<Image>> {
    let opts = Qcow2Options { writable: true, l2_cache_bytes: Some(1 << 16), ..Default::default() };
    let q = Qcow2::open(file, data, &opts)?;
    Image::from_layer(Layer::Qcow2(Box::new(q)), backing_image(fx), fx.name)
}

/// Checks one crash state; `qemu` also runs `qemu-img check` on it.
fn check_state(fx: &Fixture, st: &CrashState, exp: &Expect, qemu: bool) -> Result<(), String> {
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new(st.files[0].clone(), CAP));
    let data: Option<Arc<dyn Storage>> =
        fx.data_file.as_ref().map(|_| Arc::new(MemStorage::new(st.files[1].clone(), CAP)) as Arc<dyn Storage>);
    if qemu {
        // Tests run in parallel: each state gets files of its own (the backing file is shared, unchanged).
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let img = fx.dir.join(format!("crash-{n}.qcow2"));
        std::fs::write(&img, &st.files[0]).unwrap();
        let name = match &fx.data_file {
            Some(_) => {
                let d = fx.dir.join(format!("crash-{n}.data"));
                std::fs::write(&d, &st.files[1]).unwrap();
                format!(
                    r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"data-file":{{"driver":"file","filename":"{}"}}}}"#,
                    p(&img),
                    p(&d)
                )
            }
            None => p(&img).to_string(),
        };
        let out = run("qemu-img", &["check", &name]);
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(fx.dir.join(format!("crash-{n}.data")));
        // 0: clean, 3: leaks only. 2 is corruption.
        if !matches!(out.status.code(), Some(0) | Some(3)) {
            return Err(format!(
                "qemu-img check: {:?}\n{}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let img = open_image(fx, file, data).map_err(|e| format!("does not open: {e}"))?;
    let q = img.qcow2().ok_or("not qcow2")?;
    check_bitmaps(&st.files[0], exp)?;
    let r = q.check().map_err(|e| format!("check fails: {e}"))?;
    if r.corruptions != 0 || r.check_errors != 0 {
        return Err(format!("check: {} corruptions, {} errors: {:?}", r.corruptions, r.check_errors, r.messages));
    }
    let size = img.size().min(exp.flushed.len() as u64) as usize;
    let mut got = vec![0u8; size];
    img.read_at(&mut got, 0).map_err(|e| format!("read fails: {e}"))?;
    for (i, &v) in got.iter().enumerate() {
        if v != exp.flushed[i] && !exp.allows(i, v) {
            let f = exp.flushed[i];
            return Err(format!("guest byte {i:#x} reads {v:#x}: flushed {f:#x} and no write since put it there"));
        }
    }
    Ok(())
}

/// The bitmaps of a crash state, read from an untouched copy of it (opening read-write marks them in use):
/// b0 (enabled since the fixture was made) is in use, disabled, or dirty wherever the case changed the disk.
/// Bitmaps added later may be clean anywhere.
fn check_bitmaps(image: &[u8], exp: &Expect) -> Result<(), String> {
    use qcow2::format::bitmap::{FLAG_AUTO, FLAG_IN_USE};
    // Metadata only: an image with an external data file opens without it.
    let ro = Qcow2Options { writable: false, metadata_only: true, ..Default::default() };
    let q = Qcow2::open(Arc::new(MemStorage::new(image.to_vec(), CAP)), None, &ro).map_err(|e| format!("{e}"))?;
    for b in q.bitmaps().map_err(|e| format!("bitmaps: {e}"))? {
        if b.name != "b0" || b.flags & FLAG_IN_USE != 0 || b.flags & FLAG_AUTO == 0 {
            continue;
        }
        let Some(_) = q.dirty_map(&b.name).map_err(|e| format!("bitmap {}: {e}", b.name))? else {
            return Err(format!("bitmap {} listed but unreadable", b.name));
        };
        for &(o, l) in &exp.changed {
            let mut pos = o;
            while pos < o + l {
                let (dirty, n) =
                    q.dirty_run(&b.name, pos, o + l - pos).map_err(|e| e.to_string())?.unwrap_or((false, 1));
                if !dirty {
                    return Err(format!("consistent bitmap {} is clean at {pos:#x}, written by the case", b.name));
                }
                pos += n;
            }
        }
    }
    Ok(())
}

/// Applies `op` to the exact model (what reads must return once it completed).
fn model_apply(m: &mut Vec<u8>, op: &Op, unit: u64) {
    match *op {
        Op::Write(o, l, s) => m[o as usize..(o + l) as usize].copy_from_slice(&pattern(o, l, s)),
        Op::Zero(o, l, _) => m[o as usize..(o + l) as usize].fill(0),
        Op::Discard(o, l) => {
            let (a, b) = (o.div_ceil(unit) * unit, (o + l) / unit * unit);
            if b > a {
                m[a as usize..b as usize].fill(0);
            }
        }
        Op::Grow(n) => m.resize(m.len() + n as usize, 0),
        Op::Flush => {}
    }
}

fn run_case(kind: usize, ops: &[Op], seed: u64) -> Result<usize, String> {
    let fx = &fixtures()[kind];
    let disk = CrashDisk::new(seed, 4, CAP);
    let file = disk.add_file(fx.image.clone());
    let data = fx.data_file.as_ref().map(|(_, d)| disk.add_file(d.clone()) as Arc<dyn Storage>);
    let mut model = fx.guest.clone();
    let mut exp = Expect { flushed: model.clone(), since: Vec::new(), changed: Vec::new() };
    let mut checked = 0usize;
    let mut drain = |exp: &Expect, what: &str| -> Result<(), String> {
        for (n, st) in disk.take_states().into_iter().enumerate() {
            let qemu = (seed as usize + checked).is_multiple_of(24);
            check_state(fx, &st, exp, qemu).map_err(|e| format!("{}: {what}: {}: {e}", fx.name, st.how))?;
            checked += 1;
            let _ = n;
        }
        Ok(())
    };
    let img = open_image(fx, file, data).map_err(|e| format!("open: {e}"))?;
    drain(&exp, "open")?;
    let size = img.size();
    let all: Vec<Op> = fx.prologue.iter().chain(ops).cloned().collect();
    for (k, op) in all.iter().enumerate() {
        let op = match *op {
            // An image with bitmaps cannot be resized (qimg refuses it, as qemu-img did before 8.2).
            Op::Grow(_) if fx.name == "bitmaps" => Op::Flush,
            // Ranges are drawn for 1 MiB; fit them to this image.
            Op::Write(o, l, s) if o + l > size => Op::Write(o % size, l.min(size - o % size), s),
            Op::Zero(o, l, u) if o + l > size => Op::Zero(o % size, l.min(size - o % size), u),
            Op::Discard(o, l) if o + l > size => Op::Discard(o % size, l.min(size - o % size)),
            ref o => o.clone(),
        };
        // Issued: until a FLUSH completes, its new values are allowed alongside the old ones.
        match op {
            Op::Write(o, l, s) => exp.since.push((o, pattern(o, l, s))),
            Op::Zero(o, l, _) | Op::Discard(o, l) => exp.since.push((o, vec![0; l as usize])),
            Op::Grow(_) | Op::Flush => {}
        }
        if let Op::Write(o, l, _) | Op::Zero(o, l, _) | Op::Discard(o, l) = op {
            exp.changed.push((o, l));
        }
        let q = img.qcow2().ok_or("not qcow2")?;
        let r = match op {
            Op::Write(o, l, s) => img.write_at(&pattern(o, l, s), o, false),
            Op::Zero(o, l, u) => img.write_zeroes(o, l, u, false),
            Op::Discard(o, l) => img.discard(o, l),
            Op::Flush => img.flush(),
            Op::Grow(n) => q.resize(q.size() + n),
        };
        r.map_err(|e| format!("op {k} {op:?}: {e}"))?;
        model_apply(&mut model, &op, fx.unit);
        if let Op::Grow(n) = op {
            exp.flushed.resize(exp.flushed.len() + n as usize, 0);
        }
        disk.sample_now(&format!("after op {k} {op:?}"));
        drain(&exp, &format!("op {k} {op:?}"))?;
        if let Op::Flush = op {
            exp = Expect { flushed: model.clone(), since: Vec::new(), changed: exp.changed.clone() };
        }
    }
    // What the image reads now is the model.
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).map_err(|e| format!("final read: {e}"))?;
    if let Some(i) = got.iter().zip(&model).position(|(a, b)| a != b) {
        return Err(format!(
            "{}: the open image reads byte {i:#x} as {:#x}, the model {:#x}",
            fx.name, got[i], model[i]
        ));
    }
    // Closing flushes and stores the bitmaps: crash states on the way, then the closed image.
    drop(img);
    disk.sample_now("after close");
    drain(&exp, "close")?;
    if fx.name == "bitmaps" {
        let closed = disk.current(0);
        check_bitmaps(&closed, &exp)?;
        let ro = Qcow2Options { writable: false, ..Default::default() };
        let q = Qcow2::open(Arc::new(MemStorage::new(closed, CAP)), None, &ro).map_err(|e| e.to_string())?;
        let b0 = q.bitmaps().map_err(|e| e.to_string())?.into_iter().find(|b| b.name == "b0").ok_or("b0 lost")?;
        if b0.flags & qcow2::format::bitmap::FLAG_IN_USE != 0 {
            return Err("b0 is still in use after a clean close".into());
        }
    }
    Ok(checked)
}

fn op() -> impl Strategy<Value = Op> {
    const SIZE: u64 = 1 << 20;
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(150_000)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((o, l), p)| Op::Write(o, l, p)),
        2 => (range.clone(), any::<bool>()).prop_map(|((o, l), u)| Op::Zero(o, l, u)),
        1 => range.prop_map(|(o, l)| Op::Discard(o, l)),
        3 => Just(Op::Flush),
        1 => (1u64..300_000).prop_map(|n| Op::Grow(n / 512 * 512 + 512)),
    ]
}

static STATES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static CASES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn cases() -> u32 {
    std::env::var("CRASH_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(120)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 30, .. ProptestConfig::default() })]

    #[test]
    fn every_crash_state_opens_checks_clean_and_keeps_flushed_data(
        kind in 0..KINDS.len(),
        ops in proptest::collection::vec(op(), 1..10),
        seed in any::<u64>(),
    ) {
        match run_case(kind, &ops, seed) {
            Ok(n) => {
                let total = STATES.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                if CASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == cases() {
                    eprintln!("{total} crash states checked in {} cases", cases());
                }
            }
            Err(e) => prop_assert!(false, "{}", e),
        }
    }
}

/// Every kind, with a fixed sequence that writes, zeroes, discards, grows and flushes: each kind is covered
/// in every run, whatever the random cases draw.
#[test]
fn each_image_kind_survives_crashes_during_a_fixed_sequence() {
    let ops = vec![
        Op::Write(4096, 70_000, 3),
        Op::Zero(200_000, 140_000, true),
        Op::Flush,
        Op::Write(60_000, 10_000, 4),
        Op::Discard(0, 300_000),
        Op::Grow(65536),
        Op::Write(900_000, 100_000, 5),
        Op::Flush,
    ];
    let mut total = 0;
    for kind in 0..KINDS.len() {
        total += run_case(kind, &ops, kind as u64 * 7919).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(total > 200, "only {total} crash states checked");
    eprintln!("{total} crash states checked");
}

/// The reproduction from the issue: an L2 table shared with an internal snapshot is copied by a 4 KiB write
/// at 64 KiB. A power cut that kept the L1 entry pointing at the copy but not the copy itself lost 0..64k
/// (the old flush wrote both before one sync). Every subset of every window of the FLUSH is tried here.
#[test]
fn a_copied_l2_table_is_durable_before_the_l1_entry_that_points_at_it() {
    let fx = &fixtures()[1];
    assert_eq!(fx.name, "snapshot");
    let disk = CrashDisk::new(2, 0, CAP);
    disk.set_exhaustive(true);
    let file = disk.add_file(fx.image.clone());
    let img = open_image(fx, file, None).unwrap();
    disk.take_states();
    img.write_at(&[0x5a; 4096], 65536, false).unwrap();
    img.flush().unwrap();
    let states = disk.take_states();
    assert!(states.len() >= 8, "{} states", states.len());
    let exp = Expect { flushed: fx.guest.clone(), since: vec![(65536, vec![0x5a; 4096])], changed: Vec::new() };
    for st in &states {
        check_state(fx, st, &exp, false).unwrap_or_else(|e| panic!("{}: {e}", st.how));
        let mut got = vec![0u8; 65536];
        let f: Arc<dyn Storage> = Arc::new(MemStorage::new(st.files[0].clone(), CAP));
        open_image(fx, f, None).unwrap().read_at(&mut got, 0).unwrap();
        assert!(got.iter().all(|&b| b == 0xaa), "{}: 0..64k lost", st.how);
    }
}

/// New refcount blocks, the refcount-table entries that point at them and the header that points at a
/// moved table: a crash that keeps a pointer but not what it points at left clusters in use with refcount 0
/// (`qemu-img check`: "ERROR cluster N refcount=0 reference=1"). Every subset of every window is tried, and
/// each state also goes through `qemu-img check`.
#[test]
fn refcount_blocks_and_a_moved_table_are_durable_before_what_points_at_them() {
    let fx = &fixtures()[6];
    assert_eq!(fx.name, "growth");
    let disk = CrashDisk::new(3, 24, CAP);
    let file = disk.add_file(fx.image.clone());
    let img = open_image(fx, file, None).unwrap();
    let rt_before = img.qcow2().unwrap().header().refcount_table_offset;
    disk.take_states();
    disk.set_exhaustive(true);
    // First new blocks whose entries go into the table where it is, then so many that the table moves.
    let mut guest = fx.guest.clone();
    for (at, len) in [(1536u64 << 10, 48u64 << 10), (1584 << 10, 464 << 10)] {
        let data = pattern(at, len, 9);
        img.write_at(&data, at, false).unwrap();
        img.flush().unwrap();
        let states = disk.take_states();
        assert!(states.len() >= 24, "{} states", states.len());
        let exp = Expect { flushed: guest.clone(), since: vec![(at, data.clone())], changed: Vec::new() };
        for (i, st) in states.iter().enumerate() {
            check_state(fx, st, &exp, i % 8 == 0).unwrap_or_else(|e| panic!("{}: {e}", st.how));
        }
        guest[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    // The table did move (the case covers the growth it is named after).
    let f: Arc<dyn Storage> = Arc::new(MemStorage::new(disk.current(0), CAP));
    let q = Qcow2::open(f, None, &Qcow2Options::default()).unwrap();
    assert_ne!(q.header().refcount_table_offset, rt_before, "the refcount table did not move");
}

/// `qimg bitmap`'s operations (each a new bitmap set switched in by the header), cut at every sync and at
/// random points of every window: each state opens, checks clean (leaks allowed), lists either the bitmaps
/// before the operation or after it, and a consistent enabled bitmap is dirty wherever qemu-io wrote before.
#[test]
fn bitmap_commands_are_crash_safe() {
    let fx = fixtures().iter().find(|f| f.name == "bitmaps").unwrap();
    let disk = CrashDisk::new(11, 16, CAP);
    let file = disk.add_file(fx.image.clone());
    let opts = Qcow2Options { writable: true, manage_bitmaps: true, ..Default::default() };
    let q = Qcow2::open(file, None, &opts).unwrap();
    disk.take_states();
    let names = |q: &Qcow2| -> Vec<String> { q.bitmaps().unwrap().into_iter().map(|b| b.name).collect() };
    // qemu-io wrote 512k..576k while b0 was enabled: that must stay dirty in every consistent b0.
    let exp = Expect { flushed: fx.guest.clone(), since: Vec::new(), changed: vec![(512 << 10, 64 << 10)] };
    let source = q.dirty_map("b0").unwrap().unwrap();
    type Step = Box<dyn Fn(&Qcow2) -> qcow2::Result<()>>;
    let steps: Vec<(&str, Step)> = vec![
        ("add b2", Box::new(|q| q.bitmap_add("b2", 1 << 20, true))),
        ("merge b0 into b1", Box::new(move |q| q.bitmap_merge("b1", &source))),
        ("disable b0", Box::new(|q| q.bitmap_set_enabled("b0", false))),
        ("clear b1", Box::new(|q| q.bitmap_clear("b1"))),
        ("remove b2", Box::new(|q| q.bitmap_remove("b2"))),
    ];
    let mut total = 0;
    for (what, step) in steps {
        let before = names(&q);
        step(&q).unwrap_or_else(|e| panic!("{what}: {e}"));
        let after = names(&q);
        disk.sample_now(what);
        let states = disk.take_states();
        assert!(!states.is_empty(), "{what}: no crash states");
        for (i, st) in states.iter().enumerate() {
            let ro = Qcow2Options { writable: false, metadata_only: true, ..Default::default() };
            let s = Qcow2::open(Arc::new(MemStorage::new(st.files[0].clone(), CAP)), None, &ro)
                .unwrap_or_else(|e| panic!("{what}: {}: does not open: {e}", st.how));
            let got = names(&s);
            assert!(
                got == before || got == after,
                "{what}: {}: bitmaps {got:?}, neither {before:?} nor {after:?}",
                st.how
            );
            // b0 was enabled and consistent when qemu-io wrote: wherever it is still consistent and enabled,
            // that write is dirty (check_state opens the state read-write and checks it too).
            check_state(fx, st, &exp, i % 6 == 0).unwrap_or_else(|e| panic!("{what}: {}: {e}", st.how));
        }
        total += states.len();
    }
    eprintln!("{total} crash states checked over the bitmap commands");
}

/// `qimg rebase`'s header switch (`Qcow2::set_backing`), cut at every sync and inside every window: each state
/// names the old backing file with the old format or the new one with the new format, never a mix, and
/// checks clean.
#[test]
fn a_backing_file_change_is_atomic() {
    let fx = fixtures().iter().find(|f| f.name == "backing").unwrap();
    let old = (Some("base.raw".to_string()), Some("raw".to_string()));
    for (name, fmt) in [
        (Some("a-new-backing-file-with-a-name-longer-than-the-old-one.qcow2"), Some("qcow2")),
        (Some("b.raw"), Some("raw")),
        (None, None),
    ] {
        let disk = CrashDisk::new(13, 16, CAP);
        disk.set_exhaustive(true);
        let file = disk.add_file(fx.image.clone());
        let q = Qcow2::open(file, None, &Qcow2Options { writable: true, ..Default::default() }).unwrap();
        disk.take_states();
        q.set_backing(name, fmt).unwrap();
        disk.sample_now("after set_backing");
        let new = (name.map(str::to_string), if name.is_some() { fmt.map(str::to_string) } else { None });
        let states = disk.take_states();
        assert!(!states.is_empty());
        for st in &states {
            let h = qcow2::format::header::Header::parse(&st.files[0][..65536.min(st.files[0].len())])
                .unwrap_or_else(|e| panic!("{name:?}: {}: header does not parse: {e}", st.how));
            let got = (h.backing_file.clone(), if h.backing_file.is_some() { h.backing_format.clone() } else { None });
            assert!(got == old || got == new, "{name:?}: {}: names {got:?}, neither {old:?} nor {new:?}", st.how);
            let exp = Expect { flushed: fx.guest.clone(), since: Vec::new(), changed: Vec::new() };
            check_state(fx, st, &exp, false).unwrap_or_else(|e| panic!("{name:?}: {}: {e}", st.how));
        }
        // The final state is the new one.
        let h = qcow2::format::header::Header::parse(&disk.current(0)[..65536]).unwrap();
        assert_eq!(
            (h.backing_file.clone(), if h.backing_file.is_some() { h.backing_format.clone() } else { None }),
            new
        );
    }
}

/// `qimg commit`'s emptying of the top image (`Qcow2::make_empty`), cut at every sync and inside every window:
/// each state opens, checks clean, and every byte reads as the image held it or as its backing file holds it.
#[test]
fn emptying_an_image_is_crash_safe() {
    let fx = fixtures().iter().find(|f| f.name == "backing").unwrap();
    let disk = CrashDisk::new(17, 16, CAP);
    let file = disk.add_file(fx.image.clone());
    let q = Qcow2::open(file, None, &Qcow2Options { writable: true, ..Default::default() }).unwrap();
    disk.take_states();
    q.make_empty().unwrap();
    disk.sample_now("after make_empty");
    let mut after = fx.backing.clone().unwrap();
    after.resize(fx.guest.len(), 0);
    let exp = Expect { flushed: fx.guest.clone(), since: vec![(0, after.clone())], changed: Vec::new() };
    let states = disk.take_states();
    assert!(!states.is_empty());
    for (i, st) in states.iter().enumerate() {
        check_state(fx, st, &exp, i % 4 == 0).unwrap_or_else(|e| panic!("{}: {e}", st.how));
    }
    // Emptied: the image reads its backing file.
    drop(q);
    let f: Arc<dyn Storage> = Arc::new(MemStorage::new(disk.current(0), CAP));
    let img = open_image(fx, f, None).unwrap();
    let mut got = vec![0u8; after.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == after, "the emptied image does not read as its backing file");
}

/// What the image in `bytes` reads as (opened read-only, with the fixture's backing file).
fn guest_of(fx: &Fixture, bytes: &[u8]) -> Vec<u8> {
    let f: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes.to_vec(), CAP));
    let q = Qcow2::open(f, None, &Qcow2Options::default()).unwrap();
    let img = Image::from_layer(Layer::Qcow2(Box::new(q)), backing_image(fx), fx.name).unwrap();
    let mut got = vec![0u8; img.size() as usize];
    img.read_at(&mut got, 0).unwrap();
    got
}

fn nb_snapshots(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[60..64].try_into().unwrap())
}

/// `qimg snapshot -c`, `-a` and `-d` (`Qcow2::snapshot_create/apply/delete`), cut at every sync and inside
/// every window: each state opens, checks clean (some also through `qemu-img check`), has the old or the new
/// number of snapshots, and reads as the whole old image or the whole new one, never a mix.
#[test]
fn snapshot_commands_are_crash_safe() {
    let mut total = 0;
    for name in ["snapshot", "compressed", "extl2", "growth", "backing"] {
        let fx = fixtures().iter().find(|f| f.name == name).unwrap();
        let disk = CrashDisk::new(23, 12, CAP);
        let file = disk.add_file(fx.image.clone());
        let open = || Qcow2::open(file.clone(), None, &Qcow2Options { writable: true, ..Default::default() }).unwrap();
        let n0 = nb_snapshots(&fx.image);
        let before = fx.guest.clone();
        disk.take_states();
        let created = open().snapshot_create("t1", (1, 2));
        if name == "backing" {
            // refcount_bits=1 cannot count a data cluster shared with a snapshot: refused, nothing changed.
            assert!(created.is_err());
            assert_eq!(disk.current(0)[..fx.image.len()], fx.image[..]);
            continue;
        }
        created.unwrap();
        disk.sample_now("after snapshot -c");
        // Then the active image moves on, and is reverted to the snapshot, which is then deleted.
        let mut changed = before.clone();
        {
            let q = open();
            let img = Image::from_layer(Layer::Qcow2(Box::new(q)), backing_image(fx), fx.name).unwrap();
            let data = pattern(0, 8192, 0x5d);
            img.write_at(&data, 4096, false).unwrap();
            img.flush().unwrap();
            changed[4096..4096 + 8192].copy_from_slice(&data);
        }
        let states_create = disk.take_states();
        let step = |what: &str, f: &dyn Fn(&Qcow2) -> qcow2::Result<()>, old: &[u8], new: &[u8], n: (u32, u32)| {
            let q = open();
            disk.take_states();
            f(&q).unwrap_or_else(|e| panic!("{name}: {what}: {e}"));
            drop(q);
            disk.sample_now(what);
            let states = disk.take_states();
            assert!(!states.is_empty());
            let exp = Expect { flushed: old.to_vec(), since: vec![(0, new.to_vec())], changed: Vec::new() };
            for (i, st) in states.iter().enumerate() {
                let ns = nb_snapshots(&st.files[0]);
                assert!(ns == n.0 || ns == n.1, "{name}: {what}: {}: {ns} snapshots", st.how);
                check_state(fx, st, &exp, i % 5 == 0).unwrap_or_else(|e| panic!("{name}: {what}: {}: {e}", st.how));
                let got = guest_of(fx, &st.files[0]);
                assert!(got == old || got == new, "{name}: {what}: {}: reads as neither image", st.how);
            }
            states.len()
        };
        for (i, st) in states_create.iter().enumerate() {
            let ns = nb_snapshots(&st.files[0]);
            assert!(ns == n0 || ns == n0 + 1, "{name}: create: {}: {ns} snapshots", st.how);
            // The write after the snapshot may be cut too; before the switch there was none.
            let since = if ns == n0 { Vec::new() } else { vec![(0, changed.clone())] };
            let exp = Expect { flushed: before.clone(), since, changed: Vec::new() };
            check_state(fx, st, &exp, i % 5 == 0).unwrap_or_else(|e| panic!("{name}: create: {}: {e}", st.how));
        }
        total += states_create.len();
        total += step("snapshot -a", &|q| q.snapshot_apply("t1"), &changed, &before, (n0 + 1, n0 + 1));
        total += step("snapshot -d", &|q| q.snapshot_delete("t1"), &before, &before, (n0 + 1, n0));
        assert_eq!(nb_snapshots(&disk.current(0)), n0);
        assert!(guest_of(fx, &disk.current(0)) == before);
    }
    assert!(total > 50, "only {total} crash states");
    eprintln!("{total} crash states checked over the snapshot commands");
}

/// `qimg amend` (`Qcow2::set_version`, `set_refcount_order`, `set_lazy_refcounts`), cut at every sync and
/// inside every window: each state opens, checks clean (qimg's check, and `qemu-img check` on some), names the
/// same backing file, reads as the image did, and has the old or the new value of what changed.
#[test]
fn amend_is_crash_safe() {
    let d = tmpdir();
    let base = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "1M"]);
    io(&base, "raw", &["write -P 0x5c 0 1M"]);
    let backing = std::fs::read(&base).unwrap();
    // A long backing file name (past the first sector once the version 3 header pushes it out of place).
    let long = format!("{}/{}base.raw", d.path().display(), "x/../".repeat(70));
    let mut total = 0;
    for (create, op) in [("compat=0.10", "v3"), ("compat=1.1", "v2"), ("compat=1.1", "bits8"), ("compat=1.1", "lazy")] {
        let img = d.path().join(format!("{op}.qcow2"));
        std::fs::create_dir_all(d.path().join("x")).unwrap();
        let o = format!("{create},cluster_size=4k");
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, "-b", &long, "-F", "raw", p(&img), "1M"]);
        io(&img, "qcow2", &["write -P 1 0 300k"]);
        ok("qemu-img", &["snapshot", "-c", "s", p(&img)]);
        io(&img, "qcow2", &["write -P 2 100k 8k"]);
        let bytes = std::fs::read(&img).unwrap();
        let h0 = qcow2::format::header::Header::parse(&bytes[..4096]).unwrap();
        let open_rw = |b: Vec<u8>| {
            let f: Arc<dyn Storage> = Arc::new(MemStorage::new(b, CAP));
            Qcow2::open(f, None, &Qcow2Options { writable: true, ..Default::default() })
        };
        let guest = |b: &[u8]| {
            let f: Arc<dyn Storage> = Arc::new(MemStorage::new(b.to_vec(), CAP));
            let q = Qcow2::open(f, None, &Qcow2Options::default()).unwrap();
            let raw =
                Image::from_layer(Layer::Raw(Arc::new(MemStorage::new(backing.clone(), CAP))), None, "b").unwrap();
            let i = Image::from_layer(Layer::Qcow2(Box::new(q)), Some(raw), "t").unwrap();
            let mut g = vec![0u8; i.size() as usize];
            i.read_at(&mut g, 0).unwrap();
            g
        };
        let want = guest(&bytes);
        let disk = CrashDisk::new(29, 16, CAP);
        disk.set_exhaustive(true);
        let file = disk.add_file(bytes.clone());
        let q = Qcow2::open(file, None, &Qcow2Options { writable: true, ..Default::default() }).unwrap();
        disk.take_states();
        match op {
            "v3" => q.set_version(3),
            "v2" => q.set_version(2),
            "bits8" => q.set_refcount_order(3),
            _ => q.set_lazy_refcounts(true),
        }
        .unwrap_or_else(|e| panic!("{op}: {e}"));
        drop(q);
        disk.sample_now(op);
        let states = disk.take_states();
        assert!(!states.is_empty());
        let mut seen_new = false;
        for (i, st) in states.iter().enumerate() {
            let b = &st.files[0];
            let h = qcow2::format::header::Header::parse(&b[..4096])
                .unwrap_or_else(|e| panic!("{op}: {}: header does not parse: {e}", st.how));
            assert_eq!(h.backing_file.as_deref(), Some(long.as_str()), "{op}: {}", st.how);
            assert_eq!(h.backing_format.as_deref(), Some("raw"), "{op}: {}", st.how);
            let changed = match op {
                "v3" => h.version == 3,
                "v2" => h.version == 2,
                "bits8" => h.refcount_order == 3,
                _ => h.compatible_features & 1 != 0,
            };
            seen_new |= changed;
            assert!(changed || h == h0, "{op}: {}: neither the old header nor the new one", st.how);
            let q = open_rw(b.clone()).unwrap_or_else(|e| panic!("{op}: {}: does not open: {e}", st.how));
            let r = q.check().unwrap();
            assert!(r.corruptions == 0 && r.check_errors == 0, "{op}: {}: {:?}", st.how, r.messages);
            drop(q);
            assert!(guest(b) == want, "{op}: {}: the guest data changed", st.how);
            if i % 6 == 0 {
                let f = d.path().join(format!("{op}-state.qcow2"));
                std::fs::write(&f, b).unwrap();
                let c = run("qemu-img", &["check", p(&f)]);
                assert!(
                    matches!(c.status.code(), Some(0) | Some(3)),
                    "{op}: {}: {}",
                    st.how,
                    String::from_utf8_lossy(&c.stdout)
                );
            }
        }
        assert!(seen_new, "{op}: no state has the change");
        total += states.len();
    }
    eprintln!("{total} crash states checked over amend");
}
