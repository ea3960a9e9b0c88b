//! I/O errors and a full disk under a writable image: the request fails, never the image. A metadata commit
//! that fails leaves everything dirty; once the error clears, FLUSH succeeds and every write acknowledged
//! before it is on disk, with no corruption and no leak. Only a real inconsistency marks an image corrupt.

use qcow2::image::create::{build, CreateOptions};
use qcow2::image::{Qcow2, Qcow2Options};
use qcow2::storage::{MemStorage, Storage};
use qcow2::{BlockDevice, ErrorKind, Image, Layer};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// A storage whose writes and syncs fail while `fail` is non-zero: 1 = EIO, 2 = ENOSPC (writes past the
/// current end only, as a full file system fails them).
#[derive(Debug)]
struct Flaky {
    inner: MemStorage,
    fail: AtomicU32,
}

impl Flaky {
    fn err(&self, what: &str) -> qcow2::Error {
        match self.fail.load(Ordering::SeqCst) {
            2 => qcow2::Error::new(ErrorKind::NoSpace, format!("{what}: no space left on device")),
            _ => qcow2::Error::io(what.to_string(), std::io::Error::from_raw_os_error(libc_eio())),
        }
    }
}

fn libc_eio() -> i32 {
    5
}

impl Storage for Flaky {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> qcow2::Result<()> {
        match self.fail.load(Ordering::SeqCst) {
            1 => return Err(self.err("write")),
            2 if offset + buf.len() as u64 > self.inner.len()? => return Err(self.err("write")),
            _ => {}
        }
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> qcow2::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> qcow2::Result<()> {
        if self.fail.load(Ordering::SeqCst) != 0 && len > self.inner.len()? {
            return Err(self.err("truncate"));
        }
        self.inner.set_len(len)
    }
    fn flush(&self) -> qcow2::Result<()> {
        if self.fail.load(Ordering::SeqCst) == 1 {
            return Err(self.err("flush"));
        }
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> qcow2::Result<()> {
        if self.fail.load(Ordering::SeqCst) != 0 {
            return Err(self.err("write zeroes"));
        }
        self.inner.write_zeroes(offset, len, punch)
    }
}

fn pattern(i: u64) -> Vec<u8> {
    vec![(i as u8).wrapping_mul(37) | 1; 4096]
}

fn run(mode: u32) {
    let size = 8u64 << 20;
    let img = build(&CreateOptions { size, cluster_size: 4096, ..Default::default() }).unwrap();
    let flaky = Arc::new(Flaky { inner: MemStorage::new(img, 64 << 20), fail: AtomicU32::new(0) });
    let opts = Qcow2Options { writable: true, ..Default::default() };
    let q = Qcow2::open(flaky.clone() as Arc<dyn Storage>, None, &opts).unwrap();
    let dev = Image::from_layer(Layer::Qcow2(Box::new(q)), None, "flaky").unwrap();
    // Acknowledged writes, spread so that they allocate L2 tables and clusters, not yet committed.
    let mut acked = Vec::new();
    for i in 0..200u64 {
        dev.write_at(&pattern(i), i * 40960, false).unwrap();
        acked.push(i);
    }
    flaky.fail.store(mode, Ordering::SeqCst);
    if mode == 1 {
        assert!(dev.flush().is_err(), "the flush fails while the disk does");
    }
    // A write into a new cluster fails (EIO, or ENOSPC: it would grow the file), and with EIO so does the
    // next flush; reads still work.
    let e = dev.write_at(&pattern(999), 7 << 20, false).unwrap_err();
    assert_eq!(e.kind(), if mode == 1 { ErrorKind::Io } else { ErrorKind::NoSpace }, "{e}");
    if mode == 1 {
        assert!(dev.flush().is_err());
    }
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 40960 * 3).unwrap();
    assert_eq!(b, pattern(3));
    // The error clears: FLUSH succeeds, writes work again, and nothing is marked corrupt.
    flaky.fail.store(0, Ordering::SeqCst);
    dev.flush().expect("flush after the error cleared");
    dev.write_at(&pattern(500), 6 << 20, false).unwrap();
    dev.flush().unwrap();
    drop(dev);
    // What a restart finds: every acknowledged write, no corruption, no leak.
    let disk = Arc::new(MemStorage::new(flaky.inner.durable(), 64 << 20));
    let q = Qcow2::open(disk as Arc<dyn Storage>, None, &Qcow2Options::default()).unwrap();
    assert_eq!(q.header().incompatible_features & 2, 0, "marked corrupt");
    let r = q.check().unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{:?}", r.messages);
    let dev = Image::from_layer(Layer::Qcow2(Box::new(q)), None, "after").unwrap();
    for i in acked {
        dev.read_at(&mut b, i * 40960).unwrap();
        assert_eq!(b, pattern(i), "acknowledged write {i} lost");
    }
    dev.read_at(&mut b, 6 << 20).unwrap();
    assert_eq!(b, pattern(500));
    dev.read_at(&mut b, 7 << 20).unwrap();
    assert_eq!(b, vec![0; 4096], "the failed write left data behind");
}

#[test]
fn an_io_error_during_a_commit_fails_the_flush_not_the_image() {
    run(1);
}

#[test]
fn a_full_disk_fails_requests_and_flush_succeeds_once_space_is_free() {
    run(2);
}
