//! Images with their backing chains: format probing, relative backing names, loop and depth guards, and the
//! chain-wide read and block status.

use crate::device::{push_piece, BlockDevice, Piece, Source, SpliceFile, Status};
use crate::error::{Error, ErrorKind, Result};
use crate::format::offset::GuestOffset;
use crate::image::{Mapping, Qcow2, Qcow2Options};
use crate::spec::{BackingSpec, ImageSpec};
use crate::storage::{FileStorage, Storage};
use crate::{format::header, limits};
use std::path::Path;
use std::sync::Arc;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A raw file.
    Raw,
    /// qcow2.
    Qcow2,
}

impl Format {
    /// Parses a qemu format name.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::new(ErrorKind::Unsupported, format!("Unknown driver '{s}'"))),
        }
    }

    /// The qemu format name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Which backing and external data file names an image may carry: qnbd and qimg `--backing-policy`, for
/// images from untrusted sources (an upload service, a fuzzing campaign), where a header naming `/etc/shadow`
/// or `/dev/sda` must not be followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Follow any name, as qemu does (the default).
    #[default]
    Any,
    /// Only names relative to the image's folder that stay inside it (no absolute names, no `..`, no
    /// `json:` or protocol names).
    Relative,
    /// No backing file at all; an external data file must be relative, as above.
    None,
}

impl BackingPolicy {
    /// Parses `any`, `relative` or `none`.
    pub fn parse(s: &str) -> Result<BackingPolicy> {
        match s {
            "any" => Ok(BackingPolicy::Any),
            "relative" => Ok(BackingPolicy::Relative),
            "none" => Ok(BackingPolicy::None),
            _ => Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Invalid backing policy '{s}' (any, relative, none)"),
            )),
        }
    }

    /// Whether the image `image` may use `name` from its header as its backing file (`backing`) or data file.
    fn check(self, backing: bool, name: &str, image: &str) -> Result<()> {
        let what = if backing { "backing file" } else { "data file" };
        let refuse = |why: &str| {
            Err(Error::new(
                ErrorKind::Unsupported,
                format!("Could not open '{image}': its {what} '{name}' is refused by --backing-policy: {why}"),
            ))
        };
        match self {
            BackingPolicy::Any => Ok(()),
            BackingPolicy::None if backing => refuse("no backing file is allowed"),
            BackingPolicy::Relative | BackingPolicy::None => {
                if name.starts_with("json:") || name.contains(':') {
                    refuse("only plain relative names are allowed")
                } else if name.starts_with('/') {
                    refuse("absolute names are not allowed")
                } else if name.split('/').any(|c| c == "..") {
                    refuse("names may not leave the image's folder")
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// How to open an image and its chain.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Format of the top image; probed when `None`.
    pub format: Option<Format>,
    /// Open the top image read-write (backing files are always read-only).
    pub writable: bool,
    /// Open the backing chain (qemu-img info does not).
    pub open_backing: bool,
    /// Deepest chain accepted.
    pub max_chain_depth: usize,
    /// L2 cache size per qcow2 image, in bytes.
    pub l2_cache_bytes: Option<u64>,
    /// Internal snapshot to open (read-only).
    pub snapshot: Option<String>,
    /// Backing images already open, shared between the chains opened with the same set: one copy of a
    /// common base (its L2 cache included) serves every overlay on it.
    pub shared: Option<SharedImages>,
    /// Where the metadata commits of a writable qcow2 image run (qnbd's commit helper); `None`: in the
    /// calling thread.
    pub commit_sink: Option<Arc<dyn crate::image::commit::CommitSink>>,
    /// Open every file with `O_DIRECT` (qemu `cache.direct=on`).
    pub direct: bool,
    /// Take qemu-compatible image locks (qemu `file.locking`, on by default).
    pub locking: bool,
    /// Read-only use that lets others write (qemu `-U`/`force-share=on`): no lock that stops a writer.
    pub force_share: bool,
    /// The image will be resized (qemu-img resize takes the "resize" permission, which raw images share
    /// otherwise).
    pub resize: bool,
    /// Which backing and data file names from image headers are followed.
    pub backing_policy: BackingPolicy,
    /// Never sync the files (qemu's `cache.no-flush`, `qemu-img convert`'s default `-t unsafe`).
    pub no_flush: bool,
    /// Metadata only, as `qemu-img info` opens images (qemu's `BDRV_O_NO_IO`): the external data file is not
    /// opened (so an untrusted image can be inspected without touching the file it names) and no guest data
    /// may be read.
    pub metadata_only: bool,
    /// Opened to change its persistent bitmaps (`qimg bitmap`): they are not loaded for tracking, and
    /// nothing marks them in use.
    pub manage_bitmaps: bool,
}

/// Open read-only backing images by file identity (device, inode).
pub type SharedImages = Arc<std::sync::Mutex<std::collections::HashMap<(u64, u64), std::sync::Weak<Image>>>>;

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            writable: false,
            open_backing: true,
            max_chain_depth: limits::DEFAULT_MAX_CHAIN_DEPTH,
            l2_cache_bytes: None,
            snapshot: None,
            shared: None,
            commit_sink: None,
            direct: false,
            locking: true,
            force_share: false,
            resize: false,
            backing_policy: BackingPolicy::Any,
            metadata_only: false,
            manage_bitmaps: false,
            no_flush: false,
        }
    }
}

/// The format-specific part of an image.
pub enum Layer {
    /// A raw file.
    Raw(Arc<dyn Storage>),
    /// A qcow2 image.
    Qcow2(Box<Qcow2>),
}

/// One image of a chain, holding its backing image.
pub struct Image {
    layer: Layer,
    backing: Option<Arc<Image>>,
    filename: Arc<str>,
    size: u64,
    writable: bool,
    /// A raw image whose format was probed: writes that would make it probe as another format are refused.
    probed_raw: bool,
    /// Serialises the check and the write of requests touching the first sector of a probed raw image, so
    /// two partial writes cannot each pass against the old sector and together form a magic.
    probe_lock: std::sync::Mutex<()>,
    /// Under qemu's `compress` filter: every write is stored as compressed clusters. A read-modify-write of a
    /// partial cluster (and a WRITE_ZEROES, which zeroes partial clusters in place) holds the lock exclusively,
    /// a whole-cluster write or a discard shares it, so no write is undone by a merge that read the cluster
    /// before it.
    compress: Option<std::sync::RwLock<()>>,
    /// Smallest request size that avoids a read-modify-write (512 or 4096 with `O_DIRECT`, the cluster size
    /// under the `compress` filter, else 1).
    min_block: u32,
    /// The file is open with `O_DIRECT`.
    direct: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("filename", &self.filename).field("size", &self.size).finish_non_exhaustive()
    }
}

/// qemu's `path_combine`: a relative `name` is taken relative to the folder of `base`.
pub fn resolve_relative(base: &str, name: &str) -> String {
    if name.starts_with('/') || crate::remote::is_remote(name) {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// Guesses the format of a file from its first bytes, as qemu's probe does. A format qemu knows and qnbd
/// does not read is refused by name (never served as raw).
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    use crate::format::probe::{detect, Detected, PROBE_BYTES};
    let mut first = vec![0u8; storage.len()?.min(PROBE_BYTES as u64) as usize];
    storage.read_at(&mut first, 0)?;
    match detect(&first) {
        Detected::Qcow2 => Ok(Format::Qcow2),
        Detected::Raw => Ok(Format::Raw),
        Detected::Other(name) => Err(Error::unsupported(format!(
            "the image is in the '{name}' format, which qnbd does not support (only qcow2 and raw)"
        ))),
    }
}

fn file_id(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The identity of one file of a chain, for loop detection and sharing: device and inode of a local file; for
/// a remote object a device number no file has and a hash of its name and options (stable in this process).
fn chain_id(file: &crate::spec::FileSpec, path: &str) -> Option<(u64, u64)> {
    match &file.remote {
        Some(r) => {
            // By URL alone: an overlay names its remote backing file by URL, whatever options opened the base.
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            r.url.hash(&mut h);
            Some((u64::MAX, h.finish()))
        }
        None => file_id(path),
    }
}

/// A file of a chain, opened: local (lockable) or a remote object.
enum Opened {
    File(FileStorage),
    Remote(crate::remote::RemoteStorage),
}

impl Opened {
    fn storage(&self) -> &dyn Storage {
        match self {
            Opened::File(f) => f,
            Opened::Remote(r) => r,
        }
    }

    fn into_arc(self) -> Arc<dyn Storage> {
        match self {
            Opened::File(f) => Arc::new(f),
            Opened::Remote(r) => Arc::new(r),
        }
    }
}

/// What the caller knows of one image of the chain while opening it.
struct Opening<'a> {
    spec: &'a ImageSpec,
    writable: bool,
    depth: usize,
    /// The name to show and to resolve relative backing names against.
    path: String,
}

impl Image {
    /// Opens the image named `name` (a file name, `json:{...}` or `file:NAME`; see [`ImageSpec`]) and, unless
    /// told not to, its whole backing chain.
    pub fn open(name: &str, opts: &OpenOptions) -> Result<Arc<Image>> {
        Self::open_spec(&ImageSpec::parse_filename(name)?, opts)
    }

    /// Opens the image `spec` describes (`--image-opts`, `json:`) and its chain.
    pub fn open_spec(spec: &ImageSpec, opts: &OpenOptions) -> Result<Arc<Image>> {
        let mut seen = Vec::new();
        let writable = opts.writable && spec.read_only != Some(true);
        let mut spec = spec.clone();
        // qemu-nbd -f wins over the driver of a json: name.
        if opts.format.is_some() {
            spec.format = opts.format;
        }
        let path = spec.file.filename.clone();
        let img = Self::open_at(Opening { spec: &spec, writable, depth: 0, path }, opts, &mut seen)?;
        if spec.compress {
            return Self::compressing(img, writable);
        }
        Ok(img)
    }

    /// The image under qemu's `compress` filter (block/compress.c): writes become compressed clusters, and
    /// the cluster is the request alignment it reports, as qemu's filter does.
    fn compressing(mut img: Arc<Image>, writable: bool) -> Result<Arc<Image>> {
        let cs = match &img.layer {
            Layer::Qcow2(q) if writable && q.has_data_file() => {
                return Err(Error::unsupported("Compression is not supported with an external data file"));
            }
            Layer::Qcow2(q) => q.cluster_size(),
            Layer::Raw(_) => return Err(Error::unsupported("Compression is not supported for underlying format: raw")),
        };
        if writable {
            let Some(m) = Arc::get_mut(&mut img) else {
                return Err(Error::new(ErrorKind::InvalidArgument, "the compressed image is already open"));
            };
            m.compress = Some(Default::default());
            m.min_block = m.min_block.max(u32::try_from(cs).unwrap_or(u32::MAX));
        }
        Ok(img)
    }

    /// A write under the `compress` filter: cluster by cluster, each stored compressed where that makes it
    /// smaller than a cluster and as it is otherwise (qemu's qcow2_co_pwritev_compressed_task); a partial
    /// cluster is read, merged and written whole (qemu's block layer aligns the request the same way), and
    /// the image's last cluster, if the size cuts it, is padded with zeros before it is compressed.
    fn write_compressing(&self, q: &Qcow2, lock: &std::sync::RwLock<()>, buf: &[u8], offset: u64) -> Result<()> {
        let cs = q.cluster_size();
        let kind = q.header().compression_type;
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "write past the end"))?;
        let mut pos = offset;
        while pos < end {
            let c0 = pos - pos % cs;
            let c1 = c0.saturating_add(cs).min(self.size);
            let n = c1.min(end) - pos;
            let from = (pos - offset) as usize;
            let part = &buf[from..from + n as usize];
            let whole;
            let (_shared, _alone);
            let data: &[u8] = if pos == c0 && n == c1 - c0 {
                _shared = lock.read().unwrap_or_else(|e| e.into_inner());
                part
            } else {
                _alone = lock.write().unwrap_or_else(|e| e.into_inner());
                let mut c = vec![0u8; (c1 - c0) as usize];
                self.read_at(&mut c, c0)?;
                let at = (pos - c0) as usize;
                c[at..at + part.len()].copy_from_slice(part);
                whole = c;
                &whole
            };
            match crate::image::compressed::compress_cluster(kind, data, cs) {
                Some(c) => q.write_compressed(c0, &c)?,
                None => q.write(data, c0, &|b, o| self.read_backing(b, o))?,
            }
            pos += n;
        }
        Ok(())
    }

    fn open_at(o: Opening<'_>, opts: &OpenOptions, seen: &mut Vec<(u64, u64)>) -> Result<Arc<Image>> {
        let (writable, path, o_file) = (o.writable, o.path.clone(), o.spec.file.clone());
        let img = Self::open_one(o, opts, seen)?;
        if let (Some(shared), Some(id), false) = (&opts.shared, chain_id(&o_file, &path), writable) {
            if let Ok(mut m) = shared.lock() {
                m.retain(|_, w| w.strong_count() > 0);
                m.entry(id).or_insert_with(|| Arc::downgrade(&img));
            }
        }
        Ok(img)
    }

    /// Opens one file of the chain with the options and locks its role needs.
    fn open_file(
        file: &crate::spec::FileSpec,
        writable: bool,
        spec: &ImageSpec,
        opts: &OpenOptions,
    ) -> Result<FileStorage> {
        let fo = crate::storage::FileOptions {
            writable,
            direct: spec.cache_direct.unwrap_or(opts.direct),
            host_device: file.host_device,
            no_flush: opts.no_flush,
        };
        FileStorage::open_with(&file.filename, &fo)
    }

    /// Takes qemu's locks for this role (see [`crate::lock`]).
    fn lock(
        s: &Opened,
        u: crate::lock::Use,
        file: &crate::spec::FileSpec,
        spec: &ImageSpec,
        opts: &OpenOptions,
    ) -> Result<()> {
        // A remote object has no lock: it is read-only, and the cache checks its version.
        let Opened::File(s) = s else { return Ok(()) };
        if !file.locking.unwrap_or(opts.locking) {
            return Ok(());
        }
        let u = if spec.force_share.unwrap_or(opts.force_share) { crate::lock::Use::shared_reader() } else { u };
        crate::lock::apply(s.file(), u, &file.filename)
    }

    fn open_one(o: Opening<'_>, opts: &OpenOptions, seen: &mut Vec<(u64, u64)>) -> Result<Arc<Image>> {
        let Opening { spec, writable, depth, path } = o;
        if depth > opts.max_chain_depth {
            return Err(Error::new(
                ErrorKind::BackingChain,
                format!("backing chain is deeper than {} images (at '{path}')", opts.max_chain_depth),
            ));
        }
        if writable && spec.force_share.unwrap_or(opts.force_share) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "force-share=on can only be used with read-only images",
            ));
        }
        if let Some(id) = chain_id(&spec.file, &path) {
            if seen.contains(&id) {
                return Err(Error::new(ErrorKind::BackingChain, format!("backing chain loops back to '{path}'")));
            }
            seen.push(id);
            if depth > 0 && !writable {
                if let Some(shared) = &opts.shared {
                    let hit = shared.lock().ok().and_then(|m| m.get(&id).and_then(|w| w.upgrade()));
                    if let Some(img) = hit {
                        return Ok(img);
                    }
                }
            }
        }
        let file = match &spec.file.remote {
            Some(_) if writable => {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!("Could not open '{path}': remote images are read-only (use an overlay, or -r)"),
                ))
            }
            Some(r) => Opened::Remote(crate::remote::RemoteStorage::open(r)?),
            None => Opened::File(Self::open_file(&spec.file, writable, spec, opts)?),
        };
        let (format, probed) = match spec.format {
            Some(f) => (f, false),
            None => (probe(file.storage()).map_err(|e| e.context(format!("Could not open '{path}'")))?, true),
        };
        let min_block = u32::try_from(file.storage().alignment()).unwrap_or(4096);
        let direct = file.storage().alignment() > 1;
        let filename: Arc<str> = Arc::from(path.as_str());
        match format {
            Format::Raw => {
                let mut role =
                    if depth == 0 { crate::lock::Use::raw_top(writable) } else { crate::lock::Use::shared_reader() };
                if opts.resize && writable {
                    role.perm = role.perm.with(crate::lock::Perms::RESIZE);
                }
                Self::lock(&file, role, &spec.file, spec, opts)
                    .map_err(|e| e.context(format!("Could not open '{path}'")))?;
                let mut storage: Arc<dyn Storage> = file.into_arc();
                if spec.offset.is_some() || spec.size.is_some() {
                    storage = Arc::new(crate::storage::SliceStorage::new(storage, spec.offset, spec.size)?);
                }
                // qemu sizes block nodes in 512-byte sectors: a raw file's size rounds up to a sector.
                let size = storage.len()?.div_ceil(512) * 512;
                if probed && depth == 0 && writable {
                    eprintln!(
                        "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
                         Automatically detecting the format is dangerous for raw images, write operations on \
                         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the \
                         restrictions."
                    );
                }
                let probed_raw = probed && writable;
                let min_block = if probed_raw { min_block.max(512) } else { min_block };
                Ok(Arc::new(Image {
                    layer: Layer::Raw(storage),
                    backing: None,
                    filename,
                    size,
                    writable,
                    probed_raw,
                    probe_lock: Default::default(),
                    compress: None,
                    min_block,
                    direct,
                }))
            }
            Format::Qcow2 => {
                Self::lock(&file, crate::lock::Use::qcow2(writable), &spec.file, spec, opts)
                    .map_err(|e| e.context(format!("Could not open '{path}'")))?;
                let storage: Arc<dyn Storage> = file.into_arc();
                let hdr_opts = Qcow2Options {
                    l2_cache_bytes: spec.l2_cache_size.or(opts.l2_cache_bytes),
                    snapshot: if depth == 0 { opts.snapshot.clone() } else { None },
                    writable,
                    commit_sink: opts.commit_sink.clone(),
                    metadata_only: opts.metadata_only,
                    manage_bitmaps: opts.manage_bitmaps && depth == 0,
                };
                let q = Self::open_qcow2(storage, writable, spec, opts, &hdr_opts)
                    .map_err(|e| e.context(format!("Could not open '{path}'")))?;
                let h = q.header();
                if writable && h.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
                    return Err(Error::corrupt(format!(
                        "Could not open '{path}': the image is marked corrupt; it can only be opened read-only"
                    )));
                }
                let backing = match (&spec.backing, &h.backing_file, opts.open_backing) {
                    (_, _, false) | (BackingSpec::None, _, _) | (BackingSpec::Header, None, _) => None,
                    (BackingSpec::Image(b), _, true) => {
                        let bpath = b.file.filename.clone();
                        Some(Self::open_at(
                            Opening { spec: b, writable: false, depth: depth + 1, path: bpath },
                            opts,
                            seen,
                        )?)
                    }
                    (BackingSpec::Header, Some(name), true) => {
                        opts.backing_policy.check(true, name, &path)?;
                        let mut bspec = ImageSpec::parse_filename(name)
                            .map_err(|e| e.context(format!("Could not open backing file of '{path}'")))?;
                        if !name.starts_with("json:") {
                            bspec.file.filename = resolve_relative(&path, &bspec.file.filename);
                            // A relative name in a remote image names an object beside it.
                            if bspec.file.remote.is_none() && crate::remote::is_remote(&bspec.file.filename) {
                                bspec.file.remote = Some(crate::remote::RemoteSpec::from_url(&bspec.file.filename));
                            }
                        }
                        if bspec.format.is_none() {
                            bspec.format = h.backing_format.as_deref().map(Format::parse).transpose()?;
                        }
                        let bpath = bspec.file.filename.clone();
                        Some(
                            Self::open_at(
                                Opening { spec: &bspec, writable: false, depth: depth + 1, path: bpath },
                                opts,
                                seen,
                            )
                            .map_err(|e| {
                                if e.kind() == ErrorKind::BackingChain {
                                    e
                                } else {
                                    e.context(format!("Could not open backing file of '{path}'"))
                                }
                            })?,
                        )
                    }
                };
                // qemu sizes block nodes in whole 512-byte sectors (`total_sectors = size / 512`): a header size
                // that is not a multiple of 512 (qemu never writes one) loses its tail, as in qemu.
                let size = q.size() / 512 * 512;
                q.set_has_backing(backing.is_some());
                Ok(Arc::new(Image {
                    layer: Layer::Qcow2(Box::new(q)),
                    backing,
                    filename,
                    size,
                    writable,
                    probed_raw: false,
                    probe_lock: Default::default(),
                    compress: None,
                    min_block,
                    direct,
                }))
            }
        }
    }

    fn open_qcow2(
        storage: Arc<dyn Storage>,
        writable: bool,
        spec: &ImageSpec,
        opts: &OpenOptions,
        o: &Qcow2Options,
    ) -> Result<Qcow2> {
        // The external data file name comes from the header; read it first.
        // Cluster 0 holds the header and its extensions: read the cluster size first (bytes 20-23), then that
        // cluster only, not the most a header may span (reading past what is needed also pulls a preallocated
        // file's unwritten extents into the page cache, where they turn into data for SEEK_DATA).
        let len = storage.len()?;
        let mut head = vec![0u8; len.min(4096) as usize];
        storage.read_at(&mut head, 0)?;
        let cluster = head
            .get(20..24)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            .filter(|b| (9..=21).contains(b))
            .map_or(limits::MAX_HEADER_BYTES, |b| 1u64 << b);
        let want = len.min(cluster).min(limits::MAX_HEADER_BYTES) as usize;
        let first = if want <= head.len() {
            head.truncate(want);
            head
        } else {
            let mut b = vec![0u8; want];
            storage.read_at(&mut b, 0)?;
            b
        };
        let h = header::Header::parse(&first)?;
        let data_spec = match (&spec.data_file, &h.data_file) {
            (Some(d), _) => Some(d.clone()),
            (None, Some(_)) if opts.metadata_only && !writable => None,
            (None, Some(name)) => {
                opts.backing_policy.check(false, name, &spec.file.filename)?;
                if name.starts_with("json:") || name.contains("://") {
                    return Err(Error::unsupported(format!("data file '{name}' uses a protocol qnbd cannot open")));
                }
                // qemu opens the data file name as written (relative to the working directory), unlike
                // backing file names; under a backing policy it is confined to the image's folder.
                let filename = if opts.backing_policy == BackingPolicy::Any {
                    name.clone()
                } else {
                    resolve_relative(&spec.file.filename, name)
                };
                Some(crate::spec::FileSpec { filename, ..Default::default() })
            }
            (None, None) => None,
        };
        let data = match data_spec {
            Some(d) => {
                let f = Opened::File(Self::open_file(&d, writable, spec, opts)?);
                Self::lock(&f, crate::lock::Use::qcow2(writable), &d, spec, opts)?;
                Some(f.into_arc())
            }
            None => None,
        };
        Qcow2::open(storage, data, o)
    }

    /// Creates a new qcow2 overlay file at `path` (which must not exist yet) backed by this image, named by
    /// its absolute path, and opens it read-write with `opts` (the backing image itself is shared through
    /// `opts.shared` when set).
    pub fn create_overlay(self: &Arc<Image>, path: &Path, opts: &OpenOptions) -> Result<Arc<Image>> {
        use std::io::Write;
        let backing = if crate::remote::is_remote(self.filename()) {
            self.filename().to_string()
        } else {
            std::fs::canonicalize(self.filename())
                .map_err(|e| Error::io(format!("cannot resolve '{}'", self.filename()), e))?
                .to_string_lossy()
                .into_owned()
        };
        let co = crate::image::create::CreateOptions {
            size: self.size,
            backing_file: Some(backing),
            backing_format: Some(self.format().name().to_string()),
            ..Default::default()
        };
        let bytes = crate::image::create::build(&co)?;
        let name = path.to_string_lossy().into_owned();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create '{name}'"), e))?;
        let written = f.write_all(&bytes).map_err(|e| Error::io(format!("cannot write '{name}'"), e));
        drop(f);
        let o = OpenOptions { format: Some(Format::Qcow2), writable: true, snapshot: None, ..opts.clone() };
        let r = written.and_then(|_| Image::open(&name, &o));
        if r.is_err() {
            // Nothing half-made is left behind.
            let _ = std::fs::remove_file(path);
        }
        r
    }

    /// Builds an image from an already open layer (tests, fuzzing, in-memory images). It is writable when
    /// the layer is a qcow2 image opened for writing.
    pub fn from_layer(layer: Layer, backing: Option<Arc<Image>>, filename: &str) -> Result<Arc<Image>> {
        let (size, writable) = match &layer {
            Layer::Raw(s) => (s.len()?, false),
            Layer::Qcow2(q) => {
                q.set_has_backing(backing.is_some());
                (q.size(), q.is_writable())
            }
        };
        Ok(Arc::new(Image {
            layer,
            backing,
            filename: Arc::from(filename),
            size,
            writable,
            probed_raw: false,
            probe_lock: Default::default(),
            compress: None,
            min_block: 1,
            direct: false,
        }))
    }

    /// The file name as opened (backing names resolved against the overlay's folder).
    pub fn filename(&self) -> &str {
        &self.filename
    }

    /// The format of this image.
    pub fn format(&self) -> Format {
        match self.layer {
            Layer::Raw(_) => Format::Raw,
            Layer::Qcow2(_) => Format::Qcow2,
        }
    }

    /// The format-specific layer.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    /// The qcow2 layer, if this is a qcow2 image.
    pub fn qcow2(&self) -> Option<&Qcow2> {
        match &self.layer {
            Layer::Qcow2(q) => Some(q),
            Layer::Raw(_) => None,
        }
    }

    /// Whether the chain has a usable persistent bitmap `name` (the first image that has one by that name
    /// decides); an error when that bitmap is inconsistent.
    pub fn has_bitmap(&self, name: &str) -> Result<bool> {
        let mut cur = self;
        loop {
            if let Some(q) = cur.qcow2() {
                if q.has_usable_bitmap(name)? {
                    return Ok(true);
                }
            }
            match cur.backing() {
                Some(b) => cur = b,
                None => return Ok(false),
            }
        }
    }

    /// The backing image.
    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
    }

    /// The storage of the image file itself.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        match &self.layer {
            Layer::Raw(s) => s,
            Layer::Qcow2(q) => q.file_storage(),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfBounds,
                format!("range {offset}+{len} is outside the image ({} bytes)", self.size),
            )),
        }
    }

    /// Reads from the backing image, or zeros where there is none (including past a shorter backing file).
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) if offset < b.size => {
                let n = (buf.len() as u64).min(b.size - offset) as usize;
                b.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The status of this layer alone (no backing) for the run at `offset`: (data, zero, compressed,
    /// offset, len). Neither data nor zero means "ask the backing file".
    fn layer_status(&self, offset: u64, len: u64) -> Result<(bool, bool, bool, Option<u64>, u64)> {
        match &self.layer {
            Layer::Raw(s) => {
                let (data, n) = s.extent(offset, len)?;
                Ok((data, !data, false, Some(s.host_offset(offset)), n))
            }
            Layer::Qcow2(q) => {
                let (m, n) = q.mapping(GuestOffset(offset), len)?;
                Ok(match m {
                    Mapping::Data { host } => {
                        let host = host.get();
                        if q.metadata_preallocated() {
                            // qemu recurses into the host file for data clusters of metadata-preallocated
                            // images: a hole there reads as zeros.
                            let (data, hn) = q.data_storage().extent(host, n)?;
                            (true, !data, false, Some(host), hn.clamp(1, n))
                        } else {
                            (true, false, false, Some(host), n)
                        }
                    }
                    Mapping::Zero { host } => (false, true, false, host.map(|h| h.get()), n),
                    Mapping::Unallocated { host } => (false, false, false, host.map(|h| h.get()), n),
                    Mapping::Compressed { .. } => (true, false, true, None, n),
                })
            }
        }
    }

    /// Plans `len` bytes at `offset` of this layer and its backing chain (the range inside this layer);
    /// `top` is the same offset in the device the plan is for (pieces only `read_at` can produce are read
    /// there).
    /// Plans this layer's part of a read; `Ok(false)` when `cached_only` and an L2 table is not in the cache.
    fn plan_layer(&self, offset: u64, len: u64, top: u64, out: &mut Vec<Piece>, cached_only: bool) -> Result<bool> {
        let q = match &self.layer {
            Layer::Raw(s) => return plan_file(s, offset, top, len, true, out).map(|()| true),
            Layer::Qcow2(q) => q,
        };
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (m, n) = if cached_only {
                match q.mapping_cached(GuestOffset(pos), len - done)? {
                    Some(m) => m,
                    None => return Ok(false),
                }
            } else {
                q.mapping(GuestOffset(pos), len - done)?
            };
            match m {
                // Holes of the host file count only with metadata preallocation (as in `layer_status`).
                Mapping::Data { host } => {
                    plan_file(q.data_storage(), host.get(), top + done, n, q.metadata_preallocated(), out)?
                }
                Mapping::Zero { .. } => push_piece(out, n, Source::Zero),
                Mapping::Compressed { .. } => push_piece(out, n, Source::Read { offset: top + done }),
                Mapping::Unallocated { .. } => match &self.backing {
                    // Past the end of a shorter backing file: zeros (as `read_backing`).
                    Some(b) if pos < b.size => {
                        let k = n.min(b.size - pos);
                        if !b.plan_layer(pos, k, top + done, out, cached_only)? {
                            return Ok(false);
                        }
                        push_piece(out, n - k, Source::Zero);
                    }
                    _ => push_piece(out, n, Source::Zero),
                },
            }
            done += n;
        }
        Ok(true)
    }

    /// The file that holds this layer's host offsets (the external data file for qcow2 with one).
    fn data_filename(&self) -> Arc<str> {
        if let Layer::Qcow2(q) = &self.layer {
            if let Some(df) = &q.header().data_file {
                return Arc::from(df.as_str());
            }
        }
        self.filename.clone()
    }
}

/// Plans `len` bytes of storage `s` from `at` (`top` in the device): file pieces, zeros for the file's holes
/// where `holes` (as block status reports them), or pieces for `read_at` when the storage has no descriptor.
fn plan_file(s: &Arc<dyn Storage>, at: u64, top: u64, len: u64, holes: bool, out: &mut Vec<Piece>) -> Result<()> {
    if s.raw_fd().is_none() && s.direct_fd().is_none() {
        push_piece(out, len, Source::Read { offset: top });
        return Ok(());
    }
    let mut done = 0u64;
    while done < len {
        let (data, n) = if holes { s.extent(at + done, len - done)? } else { (true, len - done) };
        let n = n.clamp(1, len - done);
        let source = if data { Source::File { file: SpliceFile::new(s), offset: at + done } } else { Source::Zero };
        push_piece(out, n, source);
        done += n;
    }
    Ok(())
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let q = match &self.layer {
            Layer::Raw(s) => return s.read_at(buf, offset),
            Layer::Qcow2(q) => q,
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (m, n) = q.mapping(GuestOffset(pos), (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + n as usize];
            match m {
                Mapping::Data { host } => q.data_storage().read_at(chunk, host.get())?,
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Compressed { desc, in_cluster } => q.read_compressed(desc, in_cluster, chunk)?,
                Mapping::Unallocated { .. } => self.read_backing(chunk, pos)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    fn plan_read(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<()> {
        self.check_range(offset, len)?;
        self.plan_layer(offset, len, offset, out, false).map(|_| ())
    }

    fn metadata_hole(&self, offset: u64, len: u64) -> Option<bool> {
        let end = offset.checked_add(len).filter(|&e| e <= self.size)?;
        let Layer::Qcow2(q) = &self.layer else { return Some(false) };
        let mut pos = offset;
        while pos < end {
            let (m, n) = q.mapping(GuestOffset(pos), end - pos).ok()?;
            let n = n.clamp(1, end - pos);
            match m {
                Mapping::Zero { .. } => return Some(true),
                Mapping::Unallocated { .. } => match &self.backing {
                    Some(b) if pos < b.size => {
                        let k = n.min(b.size - pos);
                        if b.metadata_hole(pos, k)? || k < n {
                            return Some(true);
                        }
                    }
                    _ => return Some(true),
                },
                Mapping::Data { .. } | Mapping::Compressed { .. } => {}
            }
            pos += n;
        }
        Some(false)
    }

    fn plan_read_cached(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<bool> {
        self.check_range(offset, len)?;
        self.plan_layer(offset, len, offset, out, true)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        self.check_range(offset, len.min(1))?;
        let mut img = self;
        let mut depth = 0u32;
        let mut n = len.min(self.size - offset).max(1);
        loop {
            let (data, zero, compressed, host, run) = img.layer_status(offset, n)?;
            n = run;
            let file = host.map(|_| img.data_filename());
            if data || zero {
                return Ok(Status {
                    len: n,
                    depth,
                    present: true,
                    zero,
                    data,
                    compressed,
                    offset: host,
                    file,
                    alloc_depth: depth + 1,
                });
            }
            match &img.backing {
                Some(b) if offset < b.size => {
                    n = n.min(b.size - offset);
                    img = b;
                    depth += 1;
                }
                // qemu: unallocated with no backing data (none at all, or past its end) reads as zeros.
                other => {
                    return Ok(Status {
                        alloc_depth: if other.is_some() { depth + 2 } else { 0 },
                        len: n,
                        depth,
                        present: false,
                        zero: true,
                        data: false,
                        compressed: false,
                        offset: host,
                        file,
                    })
                }
            }
        }
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check_writable(offset, buf.len() as u64)?;
        let _first_sector = self.probed_first_sector(offset)?;
        self.check_probed_write(buf, offset)?;
        match (&self.layer, &self.compress) {
            (Layer::Raw(s), _) => s.write_at(buf, offset)?,
            (Layer::Qcow2(q), Some(lock)) => self.write_compressing(q, lock, buf, offset)?,
            (Layer::Qcow2(q), None) => q.write(buf, offset, &|b, o| self.read_backing(b, o))?,
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_quick(&self, buf: &[u8], offset: u64) -> Option<Result<()>> {
        self.check_writable(offset, buf.len() as u64).ok()?;
        // Compressed writes take `write_at` (they compress, and may read).
        if (self.probed_raw && offset < crate::format::probe::PROBE_BYTES as u64) || self.compress.is_some() {
            return None;
        }
        match &self.layer {
            Layer::Raw(s) => Some(s.write_at(buf, offset)),
            Layer::Qcow2(q) => q.write_quick(buf, offset, &|b, o| self.read_backing(b, o)),
        }
    }

    fn plan_write_cached(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> bool {
        if self.check_writable(offset, len).is_err() || len == 0 || self.compress.is_some() {
            return false;
        }
        // A probed raw image's first sector is checked against format magics by `write_at`.
        if self.probed_raw && offset < crate::format::probe::PROBE_BYTES as u64 {
            return false;
        }
        match &self.layer {
            Layer::Raw(s) if s.direct_fd().is_some() => {
                push_piece(out, len, Source::File { file: SpliceFile::new(s), offset });
                true
            }
            Layer::Raw(_) => false,
            Layer::Qcow2(q) => {
                let mut runs = Vec::new();
                if q.data_storage().direct_fd().is_none() || !q.plan_write_cached(offset, len, &mut runs) {
                    return false;
                }
                for (host, n) in runs {
                    push_piece(out, n, Source::File { file: SpliceFile::new(q.data_storage()), offset: host });
                }
                true
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        // Zeros can complete a magic too ("QED\0"): the first sector is checked as for a write.
        let _first_sector = self.probed_first_sector(offset)?;
        self.check_probed_zeroes(offset, len)?;
        let _alone = self.compress.as_ref().map(|l| l.write().unwrap_or_else(|e| e.into_inner()));
        match &self.layer {
            Layer::Raw(s) => s.write_zeroes(offset, len, may_unmap)?,
            Layer::Qcow2(q) => {
                q.write_zeroes(offset, len, may_unmap, &|b, o| self.read_backing(b, o), self.backing.is_some())?
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn can_fast_zero(&self) -> bool {
        match &self.layer {
            Layer::Raw(_) => true,
            // Zero clusters are a metadata update on v3 (qcow2.rst, Standard Cluster Descriptor bit 0).
            Layer::Qcow2(q) => q.header().version >= 3,
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        let _first_sector = self.probed_first_sector(offset)?;
        self.check_probed_zeroes(offset, len)?;
        let _shared = self.compress.as_ref().map(|l| l.read().unwrap_or_else(|e| e.into_inner()));
        match &self.layer {
            Layer::Raw(s) => s.write_zeroes(offset, len, true),
            Layer::Qcow2(q) => q.discard(offset, len, self.backing.is_some()),
        }
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            match &self.layer {
                Layer::Raw(s) => s.flush()?,
                Layer::Qcow2(q) => q.flush()?,
            }
        }
        Ok(())
    }

    fn min_block_size(&self) -> u32 {
        self.min_block
    }

    fn direct_io(&self) -> bool {
        self.direct
    }

    fn slow_io(&self) -> bool {
        self.direct || self.storage().is_remote() || self.backing.as_ref().is_some_and(|b| b.slow_io())
    }

    fn dirty_run(&self, bitmap: &str, offset: u64, len: u64) -> Result<Option<(bool, u64)>> {
        // The first image of the chain that has the bitmap answers (qemu-nbd -B looks down the chain too).
        let mut cur = self;
        loop {
            if let Some(q) = cur.qcow2() {
                if let Some(r) = q.dirty_run(bitmap, offset, len)? {
                    return Ok(Some(r));
                }
            }
            match cur.backing() {
                Some(b) => cur = b,
                None => return Ok(None),
            }
        }
    }
}

impl Image {
    /// qemu's `raw_co_pwritev` rule for a raw image whose format was probed: a write to its first sector must
    /// leave it probing as raw, or a guest could make the next open read it as qcow2 with a backing file
    /// of its choosing (a host file). Refused with EPERM.
    fn check_probed_write(&self, buf: &[u8], offset: u64) -> Result<()> {
        use crate::format::probe::{detect, Detected, PROBE_BYTES};
        let Layer::Raw(s) = &self.layer else {
            return Ok(());
        };
        if !self.probed_raw || offset >= PROBE_BYTES as u64 || buf.is_empty() {
            return Ok(());
        }
        let mut first = [0u8; PROBE_BYTES];
        s.read_at(&mut first, 0)?;
        let at = offset as usize;
        let n = buf.len().min(PROBE_BYTES - at);
        first[at..at + n].copy_from_slice(&buf[..n]);
        match detect(&first) {
            Detected::Raw => Ok(()),
            Detected::Qcow2 => Err(self.probe_refusal("qcow2")),
            Detected::Other(name) => Err(self.probe_refusal(name)),
        }
    }

    /// The lock for a request on the first sector of a probed raw image (`None` for anything else).
    fn probed_first_sector(&self, offset: u64) -> Result<Option<std::sync::MutexGuard<'_, ()>>> {
        if !self.probed_raw || offset >= crate::format::probe::PROBE_BYTES as u64 {
            return Ok(None);
        }
        self.probe_lock.lock().map(Some).map_err(|_| Error::new(ErrorKind::Io, "probe lock poisoned"))
    }

    /// [`Image::check_probed_write`] for zeroing `[offset, offset + len)` (write-zeroes and discard).
    fn check_probed_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let limit = crate::format::probe::PROBE_BYTES as u64;
        if !self.probed_raw || offset >= limit || len == 0 {
            return Ok(());
        }
        let n = len.min(limit - offset) as usize;
        self.check_probed_write(&vec![0u8; n], offset)
    }

    fn probe_refusal(&self, name: &str) -> Error {
        Error::new(
            ErrorKind::NotPermitted,
            format!(
                "write to block 0 of '{}' refused: the format was probed as raw and the write would make it probe as \
                 {name} (give the format, -f raw, to allow it)",
                self.filename
            ),
        )
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::new(ErrorKind::ReadOnly, "the image is read-only"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::new(ErrorKind::NoSpace, format!("write at {offset}+{len} past the end"))),
        }
    }
}

/// Whether `path` names an existing file.
pub fn exists(path: &str) -> bool {
    Path::new(path).exists()
}
