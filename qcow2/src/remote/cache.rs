//! The local cache of remote objects, shared by every image of a process and by every process using the same
//! cache directory.
//!
//! One object version (identity: endpoint, bucket and key, or URL; version: ETag, else modification time; and
//! size) is three files named by a SHA-256 of all that:
//! - `HASH.data`: a sparse file the size of the object, holding the chunks fetched so far;
//! - `HASH.map`: one byte per 64 KiB chunk, 1 when the chunk is in `HASH.data` and durable there;
//! - `HASH.info`: the URL and version, for people looking at the directory.
//!
//! Order: a fetched range is written to `HASH.data` and is served from this process at once; a group
//! `fdatasync` of `HASH.data` comes before its map bytes are written. A crash (or a power cut keeping any subset
//! of writes since the last sync) can lose map bytes or leave fetched data unmapped, never map a chunk whose data
//! did not reach the disk; a chunk not mapped is fetched again. Other processes read the map for chunks they
//! lack before they fetch them.
//!
//! Size limit: when the directory holds more than the limit, whole object versions that no process has open
//! (each open holds a shared `flock` on its map) are removed, least recently opened first. Versions in use are
//! never cut: a cache smaller than what is open grows past its limit, and says so once.
#![deny(clippy::arithmetic_side_effects)] // offsets come from image metadata and clients

use super::client::{Client, Head};
use crate::error::{Error, ErrorKind, Result};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, Weak};

/// Bytes per chunk: the unit fetched, cached and mapped (a default qcow2 cluster).
pub const CHUNK: u64 = 64 << 10;
/// Longest single GET: longer runs of missing chunks are split.
const MAX_GET_CHUNKS: u64 = 64;
/// Sequential readers get up to this many chunks fetched ahead of them (4 MiB).
const MAX_READAHEAD_CHUNKS: u64 = 64;
/// First readahead once a reader turns sequential (256 KiB); it doubles while the reader stays sequential.
const MIN_READAHEAD_CHUNKS: u64 = 4;
/// Largest object accepted (its map is one byte per chunk: 256 MiB for 16 TiB).
const MAX_OBJECT: u64 = 16 << 40;
/// Fetched bytes between two checks of the directory against its size limit.
const EVICT_CHECK_BYTES: u64 = 256 << 20;

/// Where the cache lives and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The directory (created when missing).
    pub dir: PathBuf,
    /// Bytes of fetched data kept before unused object versions are removed.
    pub max_bytes: u64,
}

impl CacheConfig {
    /// `$QNBD_CACHE_DIR`, else `$XDG_CACHE_HOME/qnbd`, else `~/.cache/qnbd`, else `/var/tmp/qnbd-cache-UID`;
    /// `$QNBD_CACHE_SIZE` (a size such as `20G`), else 20 GiB. A size that does not parse is an error.
    pub fn from_env() -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let dir = env("QNBD_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| env("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("qnbd")))
            .or_else(|| env("HOME").map(|d| PathBuf::from(d).join(".cache/qnbd")))
            .unwrap_or_else(fallback_dir);
        let max_bytes = match env("QNBD_CACHE_SIZE") {
            Some(v) => crate::spec::parse_size("QNBD_CACHE_SIZE", &v)?,
            None => 20 << 30,
        };
        Ok(CacheConfig { dir, max_bytes })
    }
}

/// The folder used when no setting names one: per user, under `/var/tmp`.
fn fallback_dir() -> PathBuf {
    PathBuf::from(format!("/var/tmp/qnbd-cache-{}", nix::unistd::geteuid()))
}

impl Default for CacheConfig {
    /// [`CacheConfig::from_env`]; its defaults where the environment is wrong.
    fn default() -> Self {
        Self::from_env().unwrap_or_else(|_| CacheConfig { dir: fallback_dir(), max_bytes: 20 << 30 })
    }
}

static CONFIG: RwLock<Option<CacheConfig>> = RwLock::new(None);

pub(crate) fn set_config(c: CacheConfig) {
    if let Ok(mut g) = CONFIG.write() {
        *g = Some(c);
    }
}

fn config() -> Result<CacheConfig> {
    match CONFIG.read().ok().and_then(|g| g.clone()) {
        Some(c) => Ok(c),
        None => CacheConfig::from_env(),
    }
}

/// What this process fetched from remote objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// GET requests sent (ranged GETs; HEADs not counted).
    pub gets: u64,
    /// Bytes received by them.
    pub bytes: u64,
    /// Chunks they brought.
    pub chunks: u64,
    /// Chunks fetched although the cache directory already held them (another process fetched them at the
    /// same time): 0 when every chunk was fetched once per directory.
    pub refetched: u64,
    /// GETs that failed (after the client's retries).
    pub errors: u64,
    /// HEAD requests (one per object version opened in this process).
    pub heads: u64,
}

static GETS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static CHUNKS: AtomicU64 = AtomicU64::new(0);
static REFETCHED: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
pub(crate) static HEADS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn global_stats() -> RemoteStats {
    RemoteStats {
        gets: GETS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
        chunks: CHUNKS.load(Ordering::Relaxed),
        refetched: REFETCHED.load(Ordering::Relaxed),
        errors: ERRORS.load(Ordering::Relaxed),
        heads: HEADS.load(Ordering::Relaxed),
    }
}

/// Flush threads running or sleeping in this process.
static FLUSHERS: AtomicUsize = AtomicUsize::new(0);

/// Before a fork: every fetched chunk mapped now, no flush thread running (a child would inherit its locks
/// without it; waits at most a second for them), and the remote runtime shut down (its threads joined): the
/// fork copies no thread's half-done state. Parent and child each make a new runtime when they next read.
pub(crate) fn quiesce() {
    let objects: Vec<Arc<CachedObject>> = match registry().lock() {
        Ok(r) => r.values().filter_map(Weak::upgrade).collect(),
        Err(_) => return,
    };
    for o in &objects {
        o.flush_pending();
    }
    drop(objects);
    let t = std::time::Instant::now();
    while FLUSHERS.load(Ordering::Acquire) > 0 && t.elapsed() < std::time::Duration::from_secs(1) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    super::client::stop_runtime();
}

/// Makes the cache folder (mode 0700 when it is new) and checks it: a folder, not a symbolic link, and for the
/// shared fallback under `/var/tmp`, owned by this user.
fn check_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let shown = dir.display();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create the cache folder '{shown}'"), e))?;
    let m =
        std::fs::symlink_metadata(dir).map_err(|e| Error::io(format!("cannot stat the cache folder '{shown}'"), e))?;
    if !m.is_dir() {
        return Err(Error::invalid(format!("the cache folder '{shown}' is not a folder (a symbolic link is refused)")));
    }
    if dir == fallback_dir() && m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(Error::invalid(format!("the cache folder '{shown}' belongs to another user")));
    }
    Ok(())
}

/// Objects open in this process, by cache file name: opening one twice shares it.
fn registry() -> &'static Mutex<HashMap<String, Weak<CachedObject>>> {
    static R: OnceLock<Mutex<HashMap<String, Weak<CachedObject>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor this `File` owns; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Chunks this reader claimed: released, and the waiting readers woken, when it is dropped (also on an error
/// or a panic).
struct Claim<'a> {
    object: &'a CachedObject,
    chunks: Vec<u64>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut fl = match self.object.inflight.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for c in &self.chunks {
            fl.remove(c);
        }
        drop(fl);
        self.object.done.notify_all();
    }
}

/// One remote object version with its cache files.
pub(crate) struct CachedObject {
    client: Client,
    head: Head,
    data: File,
    /// Holds a shared `flock` while open (eviction takes an exclusive one).
    map: File,
    n_chunks: u64,
    /// Chunks present in `data` (fetched by this process, or mapped by any).
    present: Vec<AtomicU64>,
    /// The chunks some reader is fetching.
    inflight: Mutex<HashSet<u64>>,
    done: Condvar,
    /// Chunk ranges fetched and not yet in the map: written there after a sync of `data`.
    pending: Mutex<Vec<(u64, u64)>>,
    /// The process that has a flush thread on its way (0: none). A fork's child has no such thread.
    flush_scheduled: AtomicU32,
    /// A sync of the data failed: nothing is mapped any more (Linux reports a writeback error once, so a later
    /// successful sync does not prove the earlier writes).
    sync_failed: AtomicBool,
    /// This object, for its flush threads.
    me: OnceLock<Weak<CachedObject>>,
    /// The chunk after the last one read, and the readahead for a reader continuing there.
    seq_next: AtomicU64,
    readahead: AtomicU64,
    /// Set when a GET found the object changed: every later read fails.
    changed: OnceLock<String>,
    fetched_since_check: AtomicU64,
    /// A failed GET was shown (once per object).
    warned: AtomicBool,
    dir: PathBuf,
    max_bytes: u64,
}

impl CachedObject {
    /// HEADs the object and opens (or creates) its cache files.
    pub fn open(client: Client, url: &str) -> Result<Arc<CachedObject>> {
        use sha2::Digest;
        let head = client.head()?;
        if head.size > MAX_OBJECT {
            return Err(Error::unsupported(format!("the object is {} bytes; qnbd reads at most 16 TiB", head.size)));
        }
        let mut h = sha2::Sha256::new();
        for part in [client.identity.as_bytes(), head.version.as_bytes(), &head.size.to_le_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let name: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let poisoned = || Error::new(ErrorKind::Io, "remote cache registry poisoned");
        {
            let mut reg = registry().lock().map_err(|_| poisoned())?;
            reg.retain(|_, w| w.strong_count() > 0);
            if let Some(o) = reg.get(&name).and_then(Weak::upgrade) {
                return Ok(o);
            }
        }
        let cfg = config()?;
        // The files are opened and locked without the registry held (a lock may wait for another process); a
        // racing open of the same version in this process keeps whichever registered first.
        let opened = Self::open_files(client, head, &name, url, &cfg)?;
        let o = {
            let mut reg = registry().lock().map_err(|_| poisoned())?;
            if let Some(o) = reg.get(&name).and_then(Weak::upgrade) {
                return Ok(o);
            }
            let o = Arc::new(opened);
            let _ = o.me.set(Arc::downgrade(&o));
            reg.insert(name, Arc::downgrade(&o));
            o
        };
        o.evict_if_needed(true);
        Ok(o)
    }

    fn open_files(client: Client, head: Head, name: &str, url: &str, cfg: &CacheConfig) -> Result<CachedObject> {
        use std::os::unix::fs::MetadataExt;
        let dir = &cfg.dir;
        check_dir(dir)?;
        let path = |ext: &str| dir.join(format!("{name}.{ext}"));
        let n_chunks = head.size.div_ceil(CHUNK);
        let open = |p: &PathBuf| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .map_err(|e| Error::io(format!("cannot open the cache file '{}'", p.display()), e))
        };
        // The map first. Alone, a process locks it exclusively while it checks (and if needed resets) the
        // files; while others have this version open it shares their lock and takes the files as they made
        // them. A map an evictor removed after we opened it is opened again.
        let mut attempts = 0u32;
        let (map, exclusive) = loop {
            let map = open(&path("map"))?;
            let exclusive = flock(&map, libc::LOCK_EX | libc::LOCK_NB).is_ok();
            if !exclusive {
                flock(&map, libc::LOCK_SH).map_err(|e| Error::io("cannot lock the cache map", e))?;
            }
            let linked = map.metadata().map(|m| m.nlink() > 0).unwrap_or(false);
            if linked {
                break (map, exclusive);
            }
            attempts = attempts.saturating_add(1);
            if attempts > 10 {
                return Err(Error::new(ErrorKind::Io, "the cache map keeps being removed"));
            }
        };
        let data = open(&path("data"))?;
        let data_len = data.metadata().map_err(|e| Error::io("stat of the cache data", e))?.len();
        let map_len = map.metadata().map_err(|e| Error::io("stat of the cache map", e))?.len();
        if (data_len != head.size || map_len != n_chunks) && !exclusive {
            return Err(Error::new(
                ErrorKind::Io,
                format!("the cache entry '{}' has the wrong size while another process uses it", path("map").display()),
            ));
        }
        if data_len != head.size || map_len != n_chunks {
            // New, or left inconsistent: start this version over (map cleared before the data is resized).
            map.set_len(0).map_err(|e| Error::io("cannot reset the cache map", e))?;
            map.sync_all().map_err(|e| Error::io("cannot sync the cache map", e))?;
            data.set_len(0).map_err(|e| Error::io("cannot reset the cache data", e))?;
            data.set_len(head.size).map_err(|e| Error::io("cannot size the cache data", e))?;
            map.set_len(n_chunks).map_err(|e| Error::io("cannot size the cache map", e))?;
            let info = format!("{url}\nversion {}\nsize {}\n", head.version, head.size);
            let _ = std::fs::write(path("info"), info);
        }
        // Read what earlier fetches left; bytes other than 1 count as missing.
        let words = usize::try_from(n_chunks.div_ceil(64))
            .map_err(|_| Error::unsupported("the object is too large for this machine"))?;
        let present: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < n_chunks {
            let n = usize::try_from((n_chunks.saturating_sub(at)).min(buf.len() as u64)).unwrap_or(buf.len());
            let b = &mut buf[..n];
            map.read_exact_at(b, at).map_err(|e| Error::io("cannot read the cache map", e))?;
            for (i, &v) in b.iter().enumerate() {
                if v == 1 {
                    set_bit(&present, at.saturating_add(i as u64));
                }
            }
            at = at.saturating_add(n as u64);
        }
        // Mark it used (eviction removes the least recently opened first), then share the lock.
        let _ = map.set_modified(std::time::SystemTime::now());
        if exclusive {
            flock(&map, libc::LOCK_SH).map_err(|e| Error::io("cannot lock the cache map", e))?;
        }
        Ok(CachedObject {
            client,
            head,
            data,
            map,
            n_chunks,
            present,
            inflight: Default::default(),
            done: Condvar::new(),
            pending: Default::default(),
            flush_scheduled: AtomicU32::new(0),
            sync_failed: AtomicBool::new(false),
            me: OnceLock::new(),
            seq_next: AtomicU64::new(u64::MAX),
            readahead: AtomicU64::new(MIN_READAHEAD_CHUNKS),
            changed: OnceLock::new(),
            fetched_since_check: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            dir: cfg.dir.clone(),
            max_bytes: cfg.max_bytes,
        })
    }

    pub fn url(&self) -> &str {
        &self.client.url
    }

    pub fn size(&self) -> u64 {
        self.head.size
    }

    fn is_present(&self, chunk: u64) -> bool {
        let (w, bit) = (chunk / 64, chunk % 64);
        usize::try_from(w)
            .ok()
            .and_then(|w| self.present.get(w))
            .is_some_and(|a| a.load(Ordering::Acquire) & (1u64 << bit) != 0)
    }

    fn missing(&self, first: u64, last: u64) -> impl Iterator<Item = u64> + '_ {
        (first..=last).filter(|&c| !self.is_present(c))
    }

    /// Reads `buf` at `offset`: what the cache lacks is fetched first; bytes past the object read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(why) = self.changed.get() {
            return Err(Error::new(ErrorKind::Io, why.clone()));
        }
        let end = offset.saturating_add(buf.len() as u64).min(self.head.size);
        if offset >= end {
            buf.fill(0);
            return Ok(());
        }
        let (first, last) = (offset / CHUNK, end.saturating_sub(1) / CHUNK);
        let uncached = self.ensure(first, last)?;
        let n = usize::try_from(end.saturating_sub(offset)).unwrap_or(buf.len()).min(buf.len());
        let (have, past) = buf.split_at_mut(n);
        self.data
            .read_exact_at(have, offset)
            .map_err(|e| Error::io(format!("cannot read the cache of '{}'", self.url()), e))?;
        // Ranges the cache could not keep (its disk full) come from the fetched bytes.
        for (start, bytes) in uncached {
            let from = start.max(offset);
            let to = start.saturating_add(bytes.len() as u64).min(end);
            if from < to {
                let (src, dst) = (from.saturating_sub(start), from.saturating_sub(offset));
                let len = to.saturating_sub(from);
                let (Ok(src), Ok(dst), Ok(len)) = (usize::try_from(src), usize::try_from(dst), usize::try_from(len))
                else {
                    continue;
                };
                if let (Some(d), Some(s)) =
                    (have.get_mut(dst..dst.saturating_add(len)), bytes.get(src..src.saturating_add(len)))
                {
                    d.copy_from_slice(s);
                }
            }
        }
        past.fill(0);
        Ok(())
    }

    /// Makes chunks `first..=last` present: fetched by this thread, or waited for while another fetches them.
    /// Returns the fetched runs the cache could not keep (`(offset, bytes)`), for this read to use directly.
    fn ensure(&self, first: u64, last: u64) -> Result<Vec<(u64, bytes::Bytes)>> {
        let mut uncached: Vec<(u64, bytes::Bytes)> = Vec::new();
        let covered = |c: u64, u: &[(u64, bytes::Bytes)]| {
            u.iter().any(|(s, b)| {
                let at = c.saturating_mul(CHUNK);
                *s <= at && at < s.saturating_add(b.len() as u64)
            })
        };
        let sequential = self.seq_next.swap(last.saturating_add(1), Ordering::Relaxed) == first;
        let ra = if sequential {
            let r = self.readahead.load(Ordering::Relaxed);
            self.readahead.store(r.saturating_mul(2).min(MAX_READAHEAD_CHUNKS), Ordering::Relaxed);
            r
        } else {
            self.readahead.store(MIN_READAHEAD_CHUNKS, Ordering::Relaxed);
            0
        };
        let poisoned = || Error::new(ErrorKind::Io, "remote cache lock poisoned");
        // Another reader's fetch ends within its client's timeouts and retries; this bound is only a backstop.
        let started = std::time::Instant::now();
        let mut last_err = None;
        // A few rounds: a chunk another reader failed to fetch (or could not keep) is fetched by this one.
        for round in 0..5 {
            if self.missing(first, last).all(|c| covered(c, &uncached)) {
                return Ok(uncached);
            }
            if round == 0 {
                self.load_map(first, last)?;
                if self.missing(first, last).all(|c| covered(c, &uncached)) {
                    return Ok(uncached);
                }
            }
            let (claim, theirs) = {
                let mut fl = self.inflight.lock().map_err(|_| poisoned())?;
                let mut claim = Claim { object: self, chunks: Vec::new() };
                let mut theirs = false;
                for c in self.missing(first, last).filter(|&c| !covered(c, &uncached)) {
                    if fl.insert(c) {
                        claim.chunks.push(c);
                    } else {
                        theirs = true;
                    }
                }
                // Readahead: the chunks after the request, when this reader is sequential and nobody has them.
                if !claim.chunks.is_empty() && ra > 0 {
                    let stop = last.saturating_add(ra).min(self.n_chunks.saturating_sub(1));
                    for c in last.saturating_add(1)..=stop {
                        if self.is_present(c) || !fl.insert(c) {
                            break;
                        }
                        claim.chunks.push(c);
                    }
                }
                (claim, theirs)
            };
            if !claim.chunks.is_empty() {
                let r = self.fetch(&claim.chunks);
                drop(claim); // released and waiters woken, also on an error
                match r {
                    Ok(u) => uncached.extend(u),
                    // A failed readahead alone does not fail the read: only the chunks it asked for matter.
                    Err(e) => {
                        if self.missing(first, last).any(|c| !covered(c, &uncached)) {
                            return Err(e);
                        }
                    }
                }
            }
            if theirs {
                let mut fl = self.inflight.lock().map_err(|_| poisoned())?;
                while (first..=last).any(|c| fl.contains(&c)) {
                    if started.elapsed() > std::time::Duration::from_secs(300) {
                        last_err = Some(Error::new(
                            ErrorKind::Io,
                            format!("Could not read '{}': another read's fetch did not end", self.url()),
                        ));
                        break;
                    }
                    fl = self.done.wait_timeout(fl, std::time::Duration::from_secs(1)).map_err(|_| poisoned())?.0;
                }
                if let Some(e) = last_err.take() {
                    return Err(e);
                }
            }
        }
        if self.missing(first, last).all(|c| covered(c, &uncached)) {
            return Ok(uncached);
        }
        Err(Error::new(
            ErrorKind::Io,
            format!("Could not read '{}': fetching chunks {first}..={last} failed", self.url()),
        ))
    }

    /// Chunks other processes fetched: the map bytes for `first..=last`.
    fn load_map(&self, first: u64, last: u64) -> Result<()> {
        let n = usize::try_from(last.saturating_sub(first).saturating_add(1)).unwrap_or(0);
        let mut b = vec![0u8; n];
        self.map.read_exact_at(&mut b, first).map_err(|e| Error::io("cannot read the cache map", e))?;
        for (i, &v) in b.iter().enumerate() {
            if v == 1 {
                set_bit(&self.present, first.saturating_add(i as u64));
            }
        }
        Ok(())
    }

    /// Fetches the chunks `mine` (claimed by this thread): one GET per run of adjacent chunks. Runs the cache
    /// cannot keep (a write to its disk failed: full) are returned, to be served from memory this once.
    fn fetch(&self, mine: &[u64]) -> Result<Vec<(u64, bytes::Bytes)>> {
        let mut sorted = mine.to_vec();
        sorted.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new(); // chunk ranges [a, b)
        for &c in &sorted {
            match runs.last_mut() {
                Some((a, b)) if *b == c && c.saturating_sub(*a) < MAX_GET_CHUNKS => *b = c.saturating_add(1),
                _ => runs.push((c, c.saturating_add(1))),
            }
        }
        let bytes: Vec<(u64, u64)> =
            runs.iter().map(|&(a, b)| (a.saturating_mul(CHUNK), b.saturating_mul(CHUNK).min(self.head.size))).collect();
        let results = self.client.get_many(&bytes, &self.head)?;
        let mut first_err = None;
        let mut uncached = Vec::new();
        let mut fetched = false;
        for ((r, &(start, _)), &(a, b)) in results.into_iter().zip(&bytes).zip(&runs) {
            GETS.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(got) => {
                    BYTES.fetch_add(got.len() as u64, Ordering::Relaxed);
                    CHUNKS.fetch_add(b.saturating_sub(a), Ordering::Relaxed);
                    if let Err(e) = self.data.write_all_at(&got, start) {
                        static SHOWN: AtomicBool = AtomicBool::new(false);
                        if !SHOWN.swap(true, Ordering::Relaxed) {
                            eprintln!(
                                "qnbd: cannot write the cache of '{}' ({e}): fetched data is served without being kept",
                                self.url()
                            );
                        }
                        uncached.push((start, got));
                        continue;
                    }
                    self.fetched_since_check.fetch_add(got.len() as u64, Ordering::Relaxed);
                    for c in a..b {
                        set_bit(&self.present, c);
                    }
                    if let Ok(mut p) = self.pending.lock() {
                        p.push((a, b));
                        fetched = true;
                    }
                }
                Err((e, changed)) => {
                    ERRORS.fetch_add(1, Ordering::Relaxed);
                    if changed && self.changed.set(e.to_string()).is_ok() {
                        eprintln!("qnbd: {e}; every read of it fails from now on");
                    } else if !self.warned.swap(true, Ordering::Relaxed) {
                        eprintln!("qnbd: {e} (the request fails with EIO; later failures are counted, not shown)");
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        if fetched {
            self.schedule_flush();
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(uncached),
        }
    }

    /// Writes the map bytes of fetched chunks after syncing their data, shortly, in a background thread: the
    /// fetches of a burst share one `fdatasync`.
    fn schedule_flush(&self) {
        let pid = std::process::id();
        if self.flush_scheduled.swap(pid, Ordering::AcqRel) == pid {
            return;
        }
        let Some(me) = self.me.get().cloned() else {
            self.flush_scheduled.store(0, Ordering::Release);
            self.flush_pending();
            return;
        };
        FLUSHERS.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new().name("qnbd-cache-sync".into()).spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            if let Some(o) = me.upgrade() {
                o.flush_scheduled.store(0, Ordering::Release);
                o.flush_pending();
                o.evict_if_needed(false);
            }
            FLUSHERS.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            FLUSHERS.fetch_sub(1, Ordering::AcqRel);
            self.flush_scheduled.store(0, Ordering::Release);
            self.flush_pending();
        }
    }

    /// Syncs the data of every pending range, then maps it.
    fn flush_pending(&self) {
        let ranges = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        if ranges.is_empty() || self.sync_failed.load(Ordering::Acquire) {
            return;
        }
        if self.data.sync_data().is_err() {
            // Not durable: left unmapped (served by this process, fetched again by the next), and nothing is
            // mapped from now on.
            self.sync_failed.store(true, Ordering::Release);
            return;
        }
        for (a, b) in ranges {
            let n = usize::try_from(b.saturating_sub(a)).unwrap_or(0);
            let mut old = vec![0u8; n];
            if self.map.read_exact_at(&mut old, a).is_ok() {
                let dup = old.iter().filter(|&&v| v == 1).count() as u64;
                REFETCHED.fetch_add(dup, Ordering::Relaxed);
            }
            let _ = self.map.write_all_at(&vec![1u8; n], a);
        }
    }

    /// Removes unused object versions, least recently opened first, while the folder is over its limit.
    /// Checked at open (`force`) and after every [`EVICT_CHECK_BYTES`] fetched.
    fn evict_if_needed(&self, force: bool) {
        use std::os::unix::fs::MetadataExt;
        if !force {
            if self.fetched_since_check.load(Ordering::Relaxed) < EVICT_CHECK_BYTES {
                return;
            }
            self.fetched_since_check.store(0, Ordering::Relaxed);
        }
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        let mut objects = Vec::new();
        let mut total = 0u64;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("data") {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            let used = m.blocks().saturating_mul(512);
            total = total.saturating_add(used);
            let stem = p.with_extension("");
            let opened = std::fs::metadata(stem.with_extension("map")).and_then(|m| m.modified()).ok();
            objects.push((opened, stem, used));
        }
        if total <= self.max_bytes {
            return;
        }
        objects.sort_by_key(|o| o.0);
        for (_, stem, used) in objects {
            if total <= self.max_bytes {
                break;
            }
            let Ok(map) = File::open(stem.with_extension("map")) else { continue };
            if flock(&map, libc::LOCK_EX | libc::LOCK_NB).is_err() {
                continue; // open somewhere
            }
            // Still the file at that name (not one a racing opener replaced after we opened ours).
            let same = match (map.metadata(), std::fs::symlink_metadata(stem.with_extension("map"))) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            // The data goes first: a map without its data is reset by the next open.
            let _ = std::fs::remove_file(stem.with_extension("data"));
            let _ = std::fs::remove_file(stem.with_extension("info"));
            let _ = std::fs::remove_file(stem.with_extension("map"));
            total = total.saturating_sub(used);
        }
        if total > self.max_bytes {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "qnbd: the remote cache '{}' holds {total} bytes, over its limit of {}: the rest is in use",
                    self.dir.display(),
                    self.max_bytes
                );
            }
        }
    }
}

impl Drop for CachedObject {
    fn drop(&mut self) {
        self.flush_pending();
    }
}

fn set_bit(bits: &[AtomicU64], chunk: u64) {
    if let Some(a) = usize::try_from(chunk / 64).ok().and_then(|w| bits.get(w)) {
        a.fetch_or(1u64 << (chunk % 64), Ordering::AcqRel);
    }
}
