//! The kernel NBD client: `qnbd -c DEV` hands one end of a socketpair per connection to the kernel (generic
//! netlink "nbd" family, or the NBD_SET_SOCK/NBD_DO_IT ioctls where netlink is missing) and serves the other
//! end in-process; `qnbd -d DEV` disconnects and waits for the serving process to flush and exit.
//!
//! The kernel side speaks the transmission phase with simple replies only (proto.md "Simple reply
//! message"); there is no handshake on these sockets.

use crate::error::Error;

pub mod netlink;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The block major of nbd devices (linux/major.h NBD_MAJOR).
const NBD_MAJOR: u32 = 43;
/// The logical block size given to the kernel: 512 so MBR/GPT sector numbers mean what they say.
pub const BLOCK_SIZE: u64 = 512;

// linux/nbd.h ioctls: _IO(0xab, n).
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_SET_SIZE: libc::c_ulong = 0xab02;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_CLEAR_QUE: libc::c_ulong = 0xab05;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;
// linux/fs.h: _IO(0x12, 95).
const BLKRRPART: libc::c_ulong = 0x125f;

/// An nbd block device named on the command line.
#[derive(Debug, Clone)]
pub struct Device {
    /// The path given (e.g. /dev/nbd0).
    pub path: PathBuf,
    /// The kernel's name (nbd0).
    pub name: String,
    /// N of nbdN.
    pub index: u32,
}

impl Device {
    /// Checks that `path` is a whole nbd device.
    pub fn open(path: &str) -> crate::error::Result<Device> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let hint = if Path::new("/sys/module/nbd").exists() {
                    "the nbd module is loaded: check the device name (nbds_max)"
                } else {
                    "this kernel has no nbd driver loaded: try modprobe nbd"
                };
                return Err(Error::Kernel(format!("Failed to open {path}: No such file or directory; {hint}")));
            }
            Err(e) => return Err(Error::Kernel(format!("Failed to open {path}: {e}"))),
        };
        if !m.file_type().is_block_device() {
            return Err(Error::Kernel(format!("{path} is not a block device")));
        }
        let (maj, min) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        if maj != NBD_MAJOR {
            return Err(Error::Kernel(format!("{path} is not an NBD device (major {maj}, not {NBD_MAJOR})")));
        }
        let link = std::fs::read_link(format!("/sys/dev/block/{maj}:{min}"))
            .map_err(|e| Error::Kernel(format!("{path}: cannot find it in /sys/dev/block: {e}")))?;
        let name = link.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let index = name
            .strip_prefix("nbd")
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| Error::Kernel(format!("{path} ({name}) is a partition, not a whole NBD device")))?;
        Ok(Device { path: path.into(), name, index })
    }

    fn sys(&self, file: &str) -> PathBuf {
        Path::new("/sys/block").join(&self.name).join(file)
    }

    /// The process (thread) the kernel records as serving the device, if connected.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.sys("pid")).ok()?.trim().parse().ok()
    }

    /// Size in 512-byte sectors as the kernel sees it.
    pub fn sectors(&self) -> u64 {
        std::fs::read_to_string(self.sys("size")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Partition names the kernel found (nbd0p1, ...).
    pub fn partitions(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(Path::new("/sys/block").join(&self.name))
            .map(|d| {
                d.filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
                    .filter(|n| n.starts_with(&format!("{}p", self.name)))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Where the serving process leaves its exit status for `qnbd -d`.
    pub fn status_file(&self) -> PathBuf {
        let dir =
            if Path::new("/run").is_dir() { PathBuf::from("/run/qnbd") } else { std::env::temp_dir().join("qnbd") };
        dir.join(format!("{}.status", self.name))
    }

    /// Records the serving process's outcome (read by `qnbd -d`).
    pub fn write_status(&self, result: &std::result::Result<(), String>) {
        let f = self.status_file();
        if let Some(d) = f.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let line = match result {
            Ok(()) => format!("{} ok\n", std::process::id()),
            Err(e) => format!("{} error: {e}\n", std::process::id()),
        };
        let _ = std::fs::write(f, line);
    }
}

/// A generic netlink socket.
struct Genl {
    fd: OwnedFd,
    seq: u32,
}

impl Genl {
    fn open() -> io::Result<Genl> {
        // SAFETY: plain socket(2) call; the descriptor is owned right away.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, netlink::NETLINK_GENERIC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid "any port, no groups" address.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sa is a valid sockaddr_nl of the length given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 30, tv_usec: 0 };
        // SAFETY: tv is a valid timeval of the length given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Genl { fd, seq: std::process::id() })
    }

    /// Sends a request and collects replies up to its acknowledgement. Returns the generic messages, or the
    /// kernel's error number.
    fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Result<Vec<Vec<u8>>, i32>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = build(seq);
        // SAFETY: msg is a live buffer of msg.len() bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr() as *const libc::c_void, msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        for _ in 0..64 {
            // SAFETY: buf is a live buffer of buf.len() bytes.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let Some(replies) = netlink::parse(&buf[..n as usize]) else {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed netlink reply"));
            };
            for r in replies {
                match r {
                    netlink::Reply::Ack { seq: s, errno } if s == seq => {
                        return Ok(if errno == 0 { Ok(got) } else { Err(errno) });
                    }
                    netlink::Reply::Genl { seq: s, attrs, .. } if s == seq => got.push(attrs),
                    _ => {}
                }
            }
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, "no netlink acknowledgement"))
    }

    /// The nbd family's ID, or `None` when the kernel has no nbd netlink interface.
    fn nbd_family(&mut self) -> io::Result<Option<u16>> {
        match self.request(|seq| netlink::get_family(seq, netlink::NBD_GENL_FAMILY_NAME))? {
            Ok(msgs) => Ok(msgs.iter().find_map(|a| netlink::family_id(a))),
            Err(e) if e == libc::ENOENT => Ok(None),
            Err(e) => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// How `-c` sets the device up.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// Request timeout in seconds (0: the kernel default).
    pub timeout: u64,
    /// Seconds the kernel waits for a dead connection to come back (netlink only; 0: none).
    pub dead_conn_timeout: u64,
    /// Use the ioctls even where netlink works.
    pub force_ioctl: bool,
}

/// How the device was connected.
pub enum Link {
    /// Through netlink: the kernel holds the sockets; nothing to wait for here.
    Netlink,
    /// Through the ioctls: a thread sits in NBD_DO_IT until the device is disconnected.
    Ioctl(std::thread::JoinHandle<io::Result<()>>),
}

fn ioctl(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the NBD and block ioctls used here take an integer argument, not a pointer.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `Err` with a clear message if `dev` is already connected.
pub fn ensure_free(dev: &Device) -> crate::error::Result<()> {
    match dev.pid() {
        Some(_) => Err(busy(dev)),
        None => Ok(()),
    }
}

fn busy(dev: &Device) -> Error {
    Error::Kernel({
        match dev.pid() {
            Some(p) => format!("{} is busy: already connected (served by process {p})", dev.path.display()),
            None => format!("{} is busy: already in use", dev.path.display()),
        }
    })
}

/// Gives `sockets` to the kernel for `dev`, as an export of `size` bytes with transmission `flags`.
pub fn attach(dev: &Device, size: u64, flags: u16, sockets: &[RawFd], o: &AttachOptions) -> crate::error::Result<Link> {
    ensure_free(dev)?;
    let path = dev.path.display();
    // Netlink where it works; the ioctls where the family is missing or netlink is refused to us.
    let netlink = if o.force_ioctl {
        None
    } else {
        match Genl::open().and_then(|mut g| Ok(g.nbd_family()?.map(|f| (g, f)))) {
            Ok(v) => v,
            Err(e) => {
                tracing::info!("netlink unusable ({e}): using the ioctls");
                None
            }
        }
    };
    if let Some((mut g, family)) = netlink {
        let c = netlink::Connect {
            index: dev.index,
            size,
            block_size: BLOCK_SIZE,
            server_flags: u64::from(flags),
            timeout: o.timeout,
            dead_conn_timeout: o.dead_conn_timeout,
            sockets: sockets.to_vec(),
        };
        return match g
            .request(|seq| netlink::connect(family, seq, &c))
            .map_err(|e| Error::Kernel(format!("netlink: {e}")))?
        {
            Ok(_) => Ok(Link::Netlink),
            Err(e) if e == libc::EBUSY => Err(busy(dev)),
            Err(e) => Err(Error::Kernel(format!("Failed to connect {path}: {}", io::Error::from_raw_os_error(e)))),
        };
    }
    let f = File::options()
        .read(true)
        .write(true)
        .open(&dev.path)
        .map_err(|e| Error::Kernel(format!("Failed to open {path}: {e}")))?;
    let fd = f.as_raw_fd();
    let set = |req, arg: u64, what: &str| {
        ioctl(fd, req, arg as libc::c_ulong).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                busy(dev)
            } else {
                Error::Kernel(format!("Failed to set {what} on {path}: {e}"))
            }
        })
    };
    set(NBD_SET_BLKSIZE, BLOCK_SIZE, "the block size")?;
    set(NBD_SET_SIZE, size, "the size")?;
    set(NBD_SET_FLAGS, u64::from(flags), "the flags")?;
    if o.timeout > 0 {
        set(NBD_SET_TIMEOUT, o.timeout, "the timeout")?;
    }
    for s in sockets {
        set(NBD_SET_SOCK, *s as u64, "the socket")?;
    }
    let t = std::thread::Builder::new()
        .name("nbd-do-it".into())
        .spawn(move || {
            let r = ioctl(f.as_raw_fd(), NBD_DO_IT, 0);
            let _ = ioctl(f.as_raw_fd(), NBD_CLEAR_QUE, 0);
            let _ = ioctl(f.as_raw_fd(), NBD_CLEAR_SOCK, 0);
            r
        })
        .map_err(|e| Error::Kernel(format!("cannot start the NBD_DO_IT thread: {e}")))?;
    Ok(Link::Ioctl(t))
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `dev` is usable: connected, its size visible, its partition table read (this process opens
/// the device and asks for a rescan; it does not rely on udev) and every partition's node present, all within
/// one deadline. Returns the partition names.
pub fn wait_ready(dev: &Device, size: u64, limit: Duration) -> crate::error::Result<Vec<String>> {
    let path = dev.path.display();
    let end = Instant::now() + limit;
    let left = || end.saturating_duration_since(Instant::now());
    // An export under one sector has zero sectors: then being connected is all there is to see.
    if !wait_until(left(), || dev.pid().is_some() && (size < 512 || dev.sectors() > 0)) {
        return Err(Error::Kernel(format!("{path} did not come up within {} s", limit.as_secs())));
    }
    // The kernel reads the partition table on the first open after the size is set; BLKRRPART makes sure.
    let f = File::open(&dev.path).map_err(|e| Error::Kernel(format!("Failed to open {path}: {e}")))?;
    if let Err(e) = ioctl(f.as_raw_fd(), BLKRRPART, 0) {
        tracing::info!("BLKRRPART on {path}: {e}");
    }
    drop(f);
    let parts = dev.partitions();
    // Partition nodes sit beside the real device node (DEV may be a symlink such as /dev/disk/by-id/...).
    let real = std::fs::canonicalize(&dev.path).unwrap_or_else(|_| dev.path.clone());
    let dev_dir = real.parent().unwrap_or(Path::new("/dev")).to_path_buf();
    for p in &parts {
        if !wait_until(left(), || dev_dir.join(p).exists()) {
            return Err(Error::Kernel(format!("partition node {} did not appear", dev_dir.join(p).display())));
        }
    }
    Ok(parts)
}

/// Asks the kernel to disconnect `dev` (netlink, else NBD_DISCONNECT), without waiting.
pub fn request_disconnect(dev: &Device) -> crate::error::Result<()> {
    let path = dev.path.display();
    if let Ok(mut g) = Genl::open() {
        if let Ok(Some(family)) = g.nbd_family() {
            match g.request(|seq| netlink::disconnect(family, seq, dev.index)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => tracing::info!("netlink disconnect: {}", io::Error::from_raw_os_error(e)),
                Err(e) => tracing::info!("netlink disconnect: {e}"),
            }
        }
    }
    let f = File::open(&dev.path).map_err(|e| Error::Kernel(format!("Failed to open {path}: {e}")))?;
    ioctl(f.as_raw_fd(), NBD_DISCONNECT, 0).map_err(|e| Error::Kernel(format!("Failed to disconnect {path}: {e}")))?;
    let _ = ioctl(f.as_raw_fd(), NBD_CLEAR_SOCK, 0);
    Ok(())
}

/// Whether process `pid` still runs: gone from /proc, or a zombie waiting to be reaped, both count as exited.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with(['Z', 'X']))
        .unwrap_or(false)
}

/// The process a thread belongs to.
fn tgid(tid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// `qnbd -d`: disconnects `dev`, then waits until the device is released and the serving process has
/// exited, and returns its recorded outcome.
pub fn detach(dev: &Device, limit: Duration) -> crate::error::Result<()> {
    let path = dev.path.display();
    let Some(tid) = dev.pid() else {
        return Err(Error::Kernel(format!("{path} is not connected")));
    };
    let server = tgid(tid).unwrap_or(tid);
    request_disconnect(dev)?;
    if !wait_until(limit, || dev.pid().is_none()) {
        return Err(Error::Kernel(format!("{path} was not released within {} s", limit.as_secs())));
    }
    if !wait_until(limit, || !alive(server)) {
        return Err(Error::Kernel(format!(
            "the server of {path} (process {server}) did not exit within {} s",
            limit.as_secs()
        )));
    }
    match std::fs::read_to_string(dev.status_file()) {
        Ok(s) => {
            let (pid, rest) = s.trim().split_once(' ').unwrap_or(("", ""));
            if pid == server.to_string() {
                if let Some(e) = rest.strip_prefix("error: ") {
                    return Err(Error::Kernel(format!("the server of {path} failed: {e}")));
                }
            }
            Ok(())
        }
        // Served by another program (or its status was never written): the release is all we can check.
        Err(_) => Ok(()),
    }
}
