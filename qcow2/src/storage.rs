//! Positioned I/O on the files behind an image: a small trait with a file implementation and an in-memory
//! one for tests and fuzzing.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::RwLock;

/// Positioned reads and writes on one file. Reads past the end of the storage return zeros, as qemu's
/// file driver does (qcow2.rst allows a format to read beyond the end of its file).
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the length (truncate or grow with zeros).
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Zeroes a range, deallocating it if `punch` and the storage can.
    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()>;
    /// Whether `[offset, offset+len)` starts with data (true) or a hole (false), and how long that run is.
    /// Storage without hole information reports data.
    fn extent(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let _ = offset;
        Ok((true, len))
    }
    /// Bytes allocated on the host (qemu-img's "actual-size"), if known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// The file descriptor behind the storage, for metadata commits (see `image::commit`).
    fn raw_fd(&self) -> Option<i32> {
        None
    }
}

/// A file opened for positioned I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    name: String,
}

impl FileStorage {
    /// Opens `path`, read-only or read-write.
    pub fn open(path: &str, writable: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(format!("Could not open '{path}'"), e))?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::invalid(format!("'{path}' is a directory")));
        }
        Ok(FileStorage { file, name: path.to_string() })
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, name: &str) -> Self {
        FileStorage { file, name: name.to_string() }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let off = libc::off_t::try_from(offset).ok()?;
        // SAFETY: lseek on a file descriptor we own; it has no memory-safety preconditions.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        u64::try_from(r).ok()
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("read of '{}' at {offset}", self.name), e)),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| Error::io(format!("write of '{}' at {offset}", self.name), e))
    }

    fn len(&self) -> Result<u64> {
        self.file.metadata().map(|m| m.len()).map_err(|e| Error::io(format!("stat of '{}'", self.name), e))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| Error::io(format!("truncate of '{}'", self.name), e))
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(format!("flush of '{}'", self.name), e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        let end = offset.saturating_add(len);
        let file_len = self.len()?;
        if punch && end <= file_len {
            let (o, l) = (libc::off_t::try_from(offset), libc::off_t::try_from(len));
            if let (Ok(o), Ok(l)) = (o, l) {
                // SAFETY: fallocate on our own descriptor; no pointers involved.
                let r = unsafe {
                    libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, o, l)
                };
                if r == 0 {
                    return Ok(());
                }
            }
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn extent(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let end = offset.saturating_add(len);
        // SEEK_DATA: where the next data starts; if it is past us, we are in a hole.
        match self.seek(offset, libc::SEEK_DATA) {
            Some(d) if d > offset => Ok((false, (d - offset).min(len))),
            Some(_) => {
                let h = self.seek(offset, libc::SEEK_HOLE).unwrap_or(end);
                Ok((true, h.clamp(offset + 1, end) - offset))
            }
            // ENXIO: no data past offset (a hole to the end), or SEEK_DATA unsupported: report data.
            None => {
                let at_eof = self.len().map(|l| offset >= l).unwrap_or(false);
                let enxio = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
                if enxio || at_eof {
                    Ok((false, len))
                } else {
                    Ok((true, len))
                }
            }
        }
    }

    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn raw_fd(&self) -> Option<i32> {
        Some(self.file.as_raw_fd())
    }
}

/// An in-memory storage, for tests and fuzzing. Its size is capped so that hostile images cannot make it grow
/// without bound. It can also play a power cut: [`MemStorage::crash_after`] makes it stop persisting after a
/// number of writes and flushes; [`MemStorage::durable`] is then what a disk would hold (everything up to the
/// last flush that completed before the cut).
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    cap: u64,
    durable: RwLock<Vec<u8>>,
    /// Writes and flushes left before the power cut; negative: never.
    ops_left: std::sync::atomic::AtomicI64,
}

impl MemStorage {
    /// A storage holding `data` that may grow up to `cap` bytes.
    pub fn new(data: Vec<u8>, cap: u64) -> Self {
        MemStorage {
            durable: RwLock::new(data.clone()),
            data: RwLock::new(data),
            cap,
            ops_left: std::sync::atomic::AtomicI64::new(-1),
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Cuts the power after `n` more writes or flushes: from then on nothing becomes durable.
    pub fn crash_after(&self, n: u64) {
        self.ops_left.store(n as i64, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the power cut has happened.
    pub fn crashed(&self) -> bool {
        self.ops_left.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// What survived: the contents as of the last flush before the power cut.
    pub fn durable(&self) -> Vec<u8> {
        self.durable.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Counts one operation; false once the power is off.
    fn tick(&self) -> bool {
        use std::sync::atomic::Ordering;
        let v = self.ops_left.load(Ordering::SeqCst);
        if v < 0 {
            return true;
        }
        if v == 0 {
            return false;
        }
        self.ops_left.store(v - 1, Ordering::SeqCst);
        true
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self.data.read().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        buf.fill(0);
        if let Ok(start) = usize::try_from(offset) {
            if start < d.len() {
                let n = buf.len().min(d.len() - start);
                buf[..n].copy_from_slice(&d[start..start + n]);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.tick();
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.cap).ok_or_else(|| {
            Error::new(crate::ErrorKind::NoSpace, format!("write at {offset} beyond the in-memory cap"))
        })?;
        let mut d = self.data.write().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().map(|d| d.len() as u64).unwrap_or(0))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if len > self.cap {
            return Err(Error::new(crate::ErrorKind::NoSpace, "resize beyond the in-memory cap"));
        }
        let mut d = self.data.write().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        d.resize(len as usize, 0);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.tick() {
            let d = self.data.read().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?.clone();
            if let Ok(mut g) = self.durable.write() {
                *g = d;
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _punch: bool) -> Result<()> {
        self.tick();
        let l = self.len()?;
        let end = offset.saturating_add(len).min(l.max(offset.saturating_add(len)));
        if end > self.cap {
            return Err(Error::new(crate::ErrorKind::NoSpace, "zeroes beyond the in-memory cap"));
        }
        let mut d = self.data.write().map_err(|_| Error::new(crate::ErrorKind::Io, "poisoned lock"))?;
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].fill(0);
        Ok(())
    }
}
