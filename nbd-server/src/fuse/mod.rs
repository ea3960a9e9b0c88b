//! `qnbd --fuse MOUNTPOINT FILE`: the image as one regular file of its virtual size. MOUNTPOINT is either a
//! regular file (the export is mounted over it, as qemu-storage-daemon's FUSE export does) or a directory (the
//! image appears inside it as one file, as nbdfuse does). `losetup` on that file gives a block device.

use crate::error::Error;
use crate::uring::lock;

mod ring;
mod wire;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use qcow2::BlockDevice;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Largest read or write handed to the device at once (the kernel's FUSE requests are smaller anyway).
const MAX_IO: u32 = 1 << 20;
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

thread_local! {
    /// Each FUSE thread's read buffer (up to [`MAX_IO`]).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The filesystem: one file backed by a block device.
pub struct ImageFs {
    device: Arc<dyn BlockDevice>,
    read_only: bool,
    /// `Some(name)`: the root is a directory holding the file `name`; `None`: the root is the file.
    file_name: Option<String>,
    started: SystemTime,
    uid: u32,
    gid: u32,
    /// Mode bits for group and others too (with allow_other).
    others: bool,
}

impl ImageFs {
    /// A filesystem serving `device`; `file_name` as for [`ImageFs::file_name`].
    pub fn new(device: Arc<dyn BlockDevice>, read_only: bool, file_name: Option<String>) -> ImageFs {
        let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        ImageFs { device, read_only, file_name, started: SystemTime::now(), uid, gid, others: false }
    }

    fn file_ino(&self) -> INodeNo {
        if self.file_name.is_some() {
            FILE_INO
        } else {
            INodeNo::ROOT
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let dir = self.file_name.is_some() && ino == INodeNo::ROOT;
        if !dir && ino != self.file_ino() {
            return None;
        }
        let size = if dir { 0 } else { self.device.size() };
        let perm = match (dir, self.read_only, self.others) {
            (true, _, true) => 0o755,
            (true, _, false) => 0o700,
            (false, true, true) => 0o444,
            (false, false, true) => 0o644,
            (false, true, false) => 0o400,
            (false, false, false) => 0o600,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm,
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Clamps a request to the device's end: (offset, length) inside it.
    fn clamp(&self, offset: u64, len: u64) -> (u64, usize) {
        let size = self.device.size();
        if offset >= size {
            return (offset, 0);
        }
        (offset, len.min(size - offset).min(u64::from(MAX_IO)) as usize)
    }
}

/// The operations, apart from how their answers travel: fuser's `/dev/fuse` loop below and the io_uring
/// transport ([`ring`]) both answer with these.
impl ImageFs {
    /// Flushes the image (nothing to do read-only).
    fn make_durable(&self) -> Result<(), Errno> {
        if self.read_only {
            return Ok(());
        }
        self.device.flush().map_err(eio)
    }

    fn lookup_file(&self, parent: INodeNo, name: &[u8]) -> Result<FileAttr, Errno> {
        match (&self.file_name, parent) {
            (Some(n), INodeNo::ROOT) if name == n.as_bytes() => self.attr(FILE_INO).ok_or(Errno::ENOENT),
            _ => Err(Errno::ENOENT),
        }
    }

    fn set_attr(&self, ino: INodeNo, size: Option<u64>) -> Result<FileAttr, Errno> {
        // The size is the image's: truncating to it (O_TRUNC on a same-size file) is fine, resizing is not.
        if let Some(s) = size {
            if s != self.device.size() {
                return Err(Errno::EPERM);
            }
        }
        self.attr(ino).ok_or(Errno::ENOENT)
    }

    fn open_file(&self, ino: INodeNo, flags: i32) -> Result<FopenFlags, Errno> {
        if ino != self.file_ino() {
            return Err(Errno::EISDIR);
        }
        let wants_write = (flags & libc::O_ACCMODE) != libc::O_RDONLY;
        if wants_write && self.read_only {
            return Err(Errno::EROFS);
        }
        // Direct I/O: every read and write reaches the image, so the page cache never holds stale data
        // and fsync/flush mean what they say.
        Ok(FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES)
    }

    /// Reads up to `size` bytes at `offset` into `buf` (grown if it is shorter); the length read.
    fn read_into(&self, ino: INodeNo, offset: u64, size: u32, buf: &mut [u8]) -> Result<usize, Errno> {
        if ino != self.file_ino() {
            return Err(Errno::EISDIR);
        }
        let (off, n) = self.clamp(offset, u64::from(size));
        let n = n.min(buf.len());
        self.device.read_at(&mut buf[..n], off).map_err(eio)?;
        Ok(n)
    }

    /// Writes `data` at `offset` (`flags`: the file's open flags, for O_SYNC/O_DSYNC); the length written.
    fn write_from(&self, ino: INodeNo, offset: u64, data: &[u8], flags: i32) -> Result<u32, Errno> {
        if ino != self.file_ino() {
            return Err(Errno::EISDIR);
        }
        if self.read_only {
            return Err(Errno::EROFS);
        }
        let size = self.device.size();
        if offset >= size && !data.is_empty() {
            return Err(Errno::ENOSPC);
        }
        let n = (data.len() as u64).min(size - offset.min(size)) as usize;
        let fua = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        self.device.write_at(&data[..n], offset, fua).map_err(eio)?;
        Ok(n as u32)
    }

    /// The directory's entries (`.`, `..`, the file); `ENOTDIR` when the root is the file.
    fn dir_entries(&self, ino: INodeNo) -> Result<[(INodeNo, FileType, &str); 3], Errno> {
        let Some(name) = &self.file_name else {
            return Err(Errno::ENOTDIR);
        };
        if ino != INodeNo::ROOT {
            return Err(Errno::ENOTDIR);
        }
        Ok([
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, name.as_str()),
        ])
    }

    /// statfs: (blocks, block size).
    fn blocks(&self) -> (u64, u32) {
        (self.device.size().div_ceil(4096), 4096)
    }
}

fn eio(e: impl std::fmt::Display) -> Errno {
    tracing::warn!("I/O error: {e}");
    Errno::EIO
}

fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn attr_reply(reply: ReplyAttr, r: Result<FileAttr, Errno>) {
    match r {
        Ok(a) => reply.attr(&TTL, &a),
        Err(e) => reply.error(e),
    }
}

/// fuser's view of the filesystem: the shared [`ImageFs`], and whether to ask for io_uring at INIT.
struct Glue {
    fs: Arc<ImageFs>,
    want_ring: bool,
    /// Only this user's requests are served over the rings (fuser's own check covers `/dev/fuse`).
    owner: Option<u32>,
    /// Made at INIT when the kernel offered io_uring and the reply asked for it; started by [`mount`].
    rings: Arc<std::sync::Mutex<Option<ring::Rings>>>,
}

impl std::ops::Deref for Glue {
    type Target = ImageFs;
    fn deref(&self) -> &ImageFs {
        &self.fs
    }
}

impl fuser::Filesystem for Glue {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Asynchronous direct I/O: an aio or io_uring client's queue of O_DIRECT requests reaches the threads
        // here as a queue, not one at a time (without it the kernel waits for each before sending the next).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        // Requests over io_uring where the kernel offers it (fuse.enable_uring=Y): `ring` registers the
        // queues once the session is up; until all are registered the kernel keeps using /dev/fuse.
        // The rings and their threads are made first: asking for io_uring and then not registering would leave
        // every request waiting.
        if self.want_ring && config.capabilities().contains(fuser::InitFlags::FUSE_OVER_IO_URING) {
            match ring::Rings::prepare(self.fs.clone(), self.owner) {
                Ok(r) => {
                    if config.add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING).is_ok() {
                        *lock(&self.rings) = Some(r);
                    } else {
                        r.abandon();
                    }
                }
                Err(e) => tracing::warn!("FUSE over io_uring unavailable, serving through /dev/fuse: {e}"),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        use std::os::unix::ffi::OsStrExt;
        match self.lookup_file(parent, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        attr_reply(reply, self.attr(ino).ok_or(Errno::ENOENT))
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        attr_reply(reply, self.set_attr(ino, size))
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_file(ino, flags.0) {
            Ok(f) => reply.opened(FileHandle(0), f),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // This thread's buffer, reused: no fresh pages, no zeroing per request (`read_at` fills all of it).
        READ_BUF.with_borrow_mut(|buf| {
            let want = (size.min(MAX_IO)) as usize;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match self.read_into(ino, offset, size, buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(e),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.write_from(ino, offset, data, flags.0) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2): make what was written durable, as a block device's last close does not promise but
        // users of a file expect.
        empty(reply, self.make_durable())
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.make_durable())
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.dir_entries(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, (ino, kind, n)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, n) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        let (blocks, bsize) = self.blocks();
        reply.statfs(blocks, 0, 0, 1, 0, bsize, 255, bsize);
    }
}

/// What `--fuse` mounts.
pub struct FuseOptions {
    /// The mount point (a regular file or a directory).
    pub mountpoint: std::path::PathBuf,
    /// The name of the file shown in a directory mount point.
    pub file_name: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Let every user reach the file (FUSE allow_other); otherwise only the mounting user.
    pub allow_other: bool,
    /// Take requests over io_uring where the kernel offers it (`fuse.enable_uring=Y`).
    pub io_uring: bool,
}

/// How many threads serve `/dev/fuse`, on a machine with `cpus` processors.
///
/// Over the page cache a request's work is copying: threads beyond the processors add no parallelism, only
/// spinning on the image file's inode lock (ext4 and xfs take it exclusively for a buffered write) and
/// switching. Measured on two processors (fio on the exported file, QD32 4 KiB, QD4 1 MiB, four runs each), two
/// threads against four: 1 MiB writes 4240 / 3770 MiB/s, 4 KiB random writes 83k / 71k IOPS, 1 MiB reads
/// 6248 / 5930 MiB/s, 4 KiB random reads even. When a transfer waits for the disk (`O_DIRECT`) or the network, each
/// waiting request holds a thread, so the threads are what keeps requests in flight: with `--cache=none`, 4 KiB
/// random writes QD32 did 11k with two threads, 16.5k with four, 23k with eight, 28k with sixteen.
fn threads(slow_io: bool, cpus: usize) -> usize {
    if slow_io {
        16
    } else {
        cpus.clamp(2, 8)
    }
}

/// Mounts `device`; the returned session serves it on its own threads until unmounted.
pub fn mount(device: Arc<dyn BlockDevice>, o: &FuseOptions) -> crate::error::Result<Mounted> {
    let m = std::fs::metadata(&o.mountpoint)
        .map_err(|e| Error::Fuse(format!("Failed to stat mount point {}: {e}", o.mountpoint.display())))?;
    let file_name = if m.is_dir() {
        if std::fs::read_dir(&o.mountpoint).map(|mut d| d.next().is_some()).unwrap_or(true) {
            return Err(Error::Fuse(format!("mount point {} is not an empty directory", o.mountpoint.display())));
        }
        Some(o.file_name.clone())
    } else if m.is_file() {
        None
    } else {
        return Err(Error::Fuse(format!(
            "mount point {} is neither a regular file nor a directory",
            o.mountpoint.display()
        )));
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("qnbd".into()),
        fuser::MountOption::Subtype("qnbd".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if o.read_only {
        config.mount_options.push(fuser::MountOption::RO);
    }
    config.acl = if o.allow_other { fuser::SessionACL::All } else { fuser::SessionACL::Owner };
    config.n_threads = Some(threads(device.slow_io(), std::thread::available_parallelism().map_or(2, |n| n.get())));
    // Each thread its own /dev/fuse descriptor (FUSE_DEV_IOC_CLONE): its own queue of requests being
    // processed in the kernel, instead of one list all threads lock.
    // (Only where /dev/fuse can be opened again: the clones are opened after the mount, and a failure there
    // would end the session after it was reported ready.)
    config.clone_fd = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_ok();
    let mut fs = ImageFs::new(device, o.read_only, file_name);
    fs.others = o.allow_other;
    let fs = Arc::new(fs);
    let rings = Arc::new(std::sync::Mutex::new(None));
    let owner = (!o.allow_other).then(|| nix::unistd::geteuid().as_raw());
    let glue = Glue { fs, want_ring: o.io_uring, owner, rings: rings.clone() };
    let failed = |e: std::io::Error| Error::Fuse(format!("Failed to mount {} with FUSE: {e}", o.mountpoint.display()));
    // Mounts and answers INIT (preparing the rings when the kernel offers io_uring); the threads serving
    // /dev/fuse start below.
    let session = fuser::Session::new(glue, &o.mountpoint, &config);
    let prepared = lock(&rings).take();
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            if let Some(r) = prepared {
                r.abandon();
            }
            return Err(failed(e));
        }
    };
    let ring = match prepared {
        Some(r) => match r.start(std::os::fd::AsFd::as_fd(&session)) {
            Ok(r) => Some(r),
            Err(e) => {
                // Cannot happen short of running out of descriptors; the kernel waits for the rings, so the
                // session cannot go on.
                return Err(Error::Fuse(format!("FUSE over io_uring: {e}")));
            }
        },
        None => None,
    };
    let session = session.spawn().map_err(failed)?;
    Ok(Mounted { session, ring })
}

/// A mounted export: fuser's session (the `/dev/fuse` threads) and, where the kernel took it, the io_uring
/// queues.
pub struct Mounted {
    /// The `/dev/fuse` threads; finished once the file is unmounted.
    pub session: fuser::BackgroundSession,
    ring: Option<ring::Running>,
}

impl Mounted {
    /// Whether requests travel over io_uring (the kernel offered it at INIT and the rings are registering).
    pub fn over_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Ends the export: waits for fuser's session (dropping it unmounts the file if that has not happened yet),
    /// then for the io_uring threads, which end with the connection; those still serving a few seconds later
    /// (the file was not unmounted) are stopped. fuser's session result, and the requests the rings served.
    pub fn end(self) -> (std::io::Result<()>, Option<u64>) {
        let Mounted { session, ring } = self;
        let ended = if session.guard.is_finished() {
            session.join()
        } else {
            drop(session);
            Ok(())
        };
        let served = ring.map(|r| {
            let served = r.served_total();
            r.join_within(Duration::from_secs(5));
            served.load(std::sync::atomic::Ordering::Relaxed)
        });
        (ended, served)
    }
}

/// Unmounts `path` (lazily if it is still in use, e.g. by a loop device: the session then serves until the
/// last user lets go). Without the privilege to unmount, fusermount3 (or fusermount) does it.
pub fn unmount(path: &std::path::Path) -> crate::error::Result<()> {
    use nix::mount::{umount2, MntFlags};
    let e = match umount2(path, MntFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if e == nix::errno::Errno::EBUSY {
        tracing::warn!("{} is busy: detaching it lazily; serving until its last user lets go", path.display());
        if umount2(path, MntFlags::MNT_DETACH).is_ok() {
            return Ok(());
        }
    }
    for tool in ["fusermount3", "fusermount"] {
        if std::process::Command::new(tool).arg("-u").arg("-z").arg(path).status().is_ok_and(|s| s.success()) {
            return Ok(());
        }
    }
    Err(Error::Fuse(format!("cannot unmount {}: {e}", path.display())))
}
