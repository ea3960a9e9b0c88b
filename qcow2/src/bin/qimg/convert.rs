//! `qimg convert -O raw|qcow2`: a copy of any image qnbd reads into a new (or, with `-n`, an existing) raw
//! or qcow2 image, through the same writer and metadata commit qnbd uses.

use qcow2::util::is_zero;
use qcow2::{BlockDevice, Image, Status};
use qcow2::{Format, OpenOptions};
use std::sync::Arc;

/// `qimg convert`'s command line (qemu-img convert's options, short and long).
#[derive(clap::Args)]
pub struct Args {
    /// Input format.
    #[arg(short = 'f', long = "source-format")]
    pub format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    pub out_format: String,
    /// Options of the new image, as for create (cluster_size, compat, lazy_refcounts, extended_l2,
    /// refcount_bits, compression_type, preallocation, data_file, data_file_raw).
    #[arg(short = 'o', long = "target-options")]
    pub options: Vec<String>,
    /// Compressed output clusters (deflate, or zstd with -o compression_type=zstd), compressed on every core.
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// The target exists (a file or a block device): do not create it.
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// With -n: the target reads as zeros, so zero areas need not be written.
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Target cache mode (none or directsync: O_DIRECT; writeback, writethrough, unsafe).
    #[arg(short = 't', long = "target-cache")]
    pub cache: Option<String>,
    /// Source cache mode (none or directsync: O_DIRECT).
    #[arg(short = 'T', long = "source-cache")]
    pub src_cache: Option<String>,
    /// Out-of-order writes (accepted: qimg writes in order).
    #[arg(short = 'W', long = "oob-writes")]
    pub out_of_order: bool,
    /// Parallel requests (accepted; 1 to 16).
    #[arg(short = 'm', long = "parallel")]
    pub parallel: Option<String>,
    /// Copy offloading (accepted: qimg copies through its own buffers).
    #[arg(short = 'C', long = "copy-range-offloading")]
    pub copy_range: bool,
    /// Write at most this many bytes per second (suffixes k, M, G).
    #[arg(short = 'r', long = "rate")]
    pub rate: Option<String>,
    /// Copy unreadable sectors as zeros, with a warning for each.
    #[arg(long = "salvage")]
    pub salvage: bool,
    /// Backing file of the new image: only what the source's top image holds is copied.
    #[arg(short = 'B', long = "backing")]
    pub backing: Option<String>,
    /// Backing file format (with -B).
    #[arg(short = 'F', long = "backing-format")]
    pub backing_fmt: Option<String>,
    /// Convert an internal snapshot of the source (snapshot.name=, snapshot.id= or an ID or name).
    #[arg(short = 'l', long = "source-snapshot")]
    pub snapshot: Option<String>,
    /// Convert an internal snapshot given by ID or name (older qemu-img's -s).
    #[arg(short = 's')]
    pub old_snapshot: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Sparse granularity (bytes of zeros before a hole is made; 0 writes everything).
    #[arg(short = 'S', long = "sparse-size")]
    pub sparse: Option<String>,
    /// Open even if another process is writing it (no lock that stops a writer).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Source names are sets of image options (`driver=qcow2,file.filename=...`).
    #[arg(long = "image-opts", visible_alias = "source-image-opts")]
    pub image_opts: bool,
    /// The target name is a set of image options (needs -n).
    #[arg(long = "target-image-opts")]
    pub target_image_opts: bool,
    /// Objects (accepted: secrets are not used by qimg).
    #[arg(long = "object")]
    pub object: Vec<String>,
    /// Copy the source's persistent dirty bitmaps too (qcow2 target).
    #[arg(long = "bitmaps")]
    pub bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps (with a warning) instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    pub skip_broken_bitmaps: bool,
    /// Input images (several are concatenated), then the output. (Options may come between them, as qemu-img
    /// takes `convert SRC -O raw DST`: the count is checked in `run`, not by the parser, which would want two
    /// names in a row.)
    #[arg(required = true)]
    pub files: Vec<String>,
}

/// Runs `qimg convert`. A remote target (`s3://BUCKET/KEY`) is written to a temporary file in `$TMPDIR` first,
/// then uploaded with a multipart upload: the object appears whole or not at all.
pub fn run(mut a: Args) -> Result<(), String> {
    if a.files.len() < 2 {
        return Err("Must specify image file name".into());
    }
    let Some(output) = a.files.last().cloned() else { return Err("Expecting image file name".into()) };
    if !qcow2::remote::is_remote(&output) {
        return run_local(a);
    }
    if a.no_create || a.target_image_opts {
        return Err(format!(
            "Could not open '{output}': a remote target is written whole: -n and --target-image-opts do not apply"
        ));
    }
    let spec = qcow2::remote::RemoteSpec::from_url(&output);
    spec.check().map_err(|e| e.to_string())?;
    if !output.starts_with("s3://") {
        return Err(format!("Could not create '{output}': only s3:// names can be written"));
    }
    // A private folder (mode 0700, a name that must not exist yet) holds the staged image.
    let stage = {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let d = std::env::temp_dir().join(format!("qimg-upload-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .map_err(|e| format!("Could not create a staging folder '{}': {e}", d.display()))?;
        d
    };
    let tmp = stage.join("image");
    let staged = tmp.to_string_lossy().into_owned();
    if let Some(last) = a.files.last_mut() {
        last.clone_from(&staged);
    }
    let quiet = a.quiet || !a.progress;
    let r = run_local(a).and_then(|()| {
        if !quiet {
            eprintln!("uploading to {output}");
        }
        qcow2::remote::upload(&tmp, &spec).map_err(|e| e.to_string())
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&stage);
    r
}

fn run_local(a: Args) -> Result<(), String> {
    let (output, inputs) = a.files.split_last().ok_or("Expecting image file name")?;
    let output = output.clone();
    if a.compress && a.out_format != "qcow2" {
        return Err(format!("Compression not supported for this file format ({})", a.out_format));
    }
    if a.backing.is_some() && a.out_format != "qcow2" {
        return Err(format!("'{}' does not support backing files", a.out_format));
    }
    if a.target_is_zero && !a.no_create {
        return Err("--target-is-zero requires use of -n flag".into());
    }
    if a.target_image_opts && !a.no_create {
        return Err("--target-image-opts requires use of -n flag".into());
    }
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err("Use of --skip-broken-bitmaps requires --bitmaps".into());
    }
    if a.bitmaps && inputs.len() > 1 {
        return Err("Copying bitmaps only possible with single source".into());
    }
    if a.bitmaps && a.out_format != "qcow2" {
        return Err(format!("Format driver '{}' does not support bitmaps", a.out_format));
    }
    if a.salvage && a.copy_range {
        return Err("Cannot use copy offloading in salvaging mode".into());
    }
    let snapshot = a.snapshot.clone().or(a.old_snapshot.clone());
    if inputs.len() > 1 && snapshot.is_some() {
        return Err("No support for concatenating multiple snapshot".into());
    }
    if inputs.len() > 1 && a.backing.is_some() {
        return Err(
            "Having a backing file for the target makes no sense when concatenating multiple input images".into()
        );
    }
    if let Some(m) = &a.parallel {
        if !matches!(m.parse::<u32>(), Ok(1..=16)) {
            return Err("Invalid number of coroutines specified. Must be between 1 and 16.".into());
        }
    }
    let rate = a
        .rate
        .as_deref()
        .map(|r| crate::size::parse_size(r).map_err(|_| format!("Invalid rate limit specified: {r}")))
        .transpose()?;
    let out_fmt = Format::parse(&a.out_format).map_err(|_| format!("Unknown file format '{}'", a.out_format))?;
    let direct = |m: &Option<String>, what: &str| -> Result<bool, String> {
        match m.as_deref() {
            None | Some("writeback" | "unsafe" | "writethrough") => Ok(false),
            Some("none" | "off" | "directsync") => Ok(true),
            Some(c) => Err(format!("Invalid {what} cache option: {c}")),
        }
    };
    let (dst_direct, src_direct) = (direct(&a.cache, "cache")?, direct(&a.src_cache, "source cache")?);
    // qemu-img convert's target cache mode is `unsafe` unless -t says otherwise: no syncs at all.
    let no_flush = matches!(a.cache.as_deref(), None | Some("unsafe"));
    let min_sparse = match &a.sparse {
        Some(s) => {
            let n = crate::size::parse_size(s).ok().filter(|n| n % 512 == 0 && *n <= 16 << 20).ok_or(
                "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to \
                 16777216. Select 0 to disable sparse detection (fully allocates output).",
            )?;
            n as usize
        }
        None => SPARSE,
    };
    let n = crate::Naming { image_opts: a.image_opts, force_share: a.force_share };
    let mut images = Vec::with_capacity(inputs.len());
    for input in inputs {
        let img = if src_direct {
            let o = OpenOptions {
                format: a.format.as_deref().map(Format::parse).transpose().map_err(|e| e.to_string())?,
                force_share: a.force_share,
                backing_policy: crate::policy(),
                direct: true,
                ..OpenOptions::default()
            };
            Image::open_spec(&crate::spec(input, a.format.as_deref(), n)?, &o).map_err(|e| e.to_string())?
        } else {
            crate::open_snapshot(input, a.format.as_deref(), n, snapshot.clone())?
        };
        images.push(img);
    }
    // The target's spec: a file name, or with --target-image-opts a set of options.
    let target_spec = if a.target_image_opts {
        qcow2::spec::ImageSpec::parse_opts(&output).map_err(|e| format!("Could not open '{output}': {e}"))?
    } else {
        qcow2::spec::ImageSpec::parse_filename(&output).map_err(|e| format!("Could not open '{output}': {e}"))?
    };
    // Converting an image onto itself would destroy it.
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let target_file = target_spec.file.filename.clone();
    for (input, img) in inputs.iter().zip(&images) {
        if id(&target_file).is_some() && id(&target_file) == id(img.filename()) {
            return Err(format!("Error: the source '{input}' and the target '{output}' are the same file"));
        }
    }
    let src = Sources::new(images)?;
    if !a.no_create {
        let size = src.size().to_string();
        crate::create::run(
            &a.out_format,
            &output,
            Some(&size),
            a.backing.as_deref(),
            a.backing_fmt.as_deref(),
            false,
            &a.options,
            true,
        )?;
    }
    let o = OpenOptions {
        format: if a.target_image_opts { None } else { Some(out_fmt) },
        writable: true,
        // With -B the target's backing file is opened: zero writes must mask it.
        open_backing: a.backing.is_some(),
        direct: dst_direct,
        no_flush,
        backing_policy: crate::policy(),
        ..OpenOptions::default()
    };
    let target = Image::open_spec(&target_spec, &o).map_err(|e| crate::open_error(&output, e))?;
    // qemu-img aligns its writes to the target's allocation unit: a cluster, or a subcluster with
    // extended L2 entries (32 per cluster).
    // Under the compress filter (`--target-image-opts driver=compress,...`) every write is a whole compressed
    // cluster: a cluster is the unit there too.
    let align = target.qcow2().map_or(1, |q| {
        if q.header().extended_l2() && !a.compress && !target_spec.compress {
            q.cluster_size() / 32
        } else {
            q.cluster_size()
        }
    });
    let compress = if a.compress { target.qcow2().map(|q| q.header().compression_type) } else { None };
    // A block device keeps its old contents: it does not read as zeros after "create".
    let block_device = {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(&target_file).map(|m| m.file_type().is_block_device()).unwrap_or(false)
    };
    let co = Options {
        no_create: a.no_create || block_device,
        target_is_zero: a.target_is_zero,
        min_sparse,
        progress: a.progress && !a.quiet,
        align,
        compress,
        top_only: a.backing.is_some(),
        salvage: a.salvage,
        rate,
    };
    copy(&src, &target, &co)?;
    if a.bitmaps {
        copy_bitmaps(&src, &target, a.skip_broken_bitmaps)?;
    }
    Ok(())
}

/// `--bitmaps`: each persistent bitmap of the source's top image is added to the target with its name,
/// granularity and enabled state, and its bits. An inconsistent one fails the conversion, or with
/// `--skip-broken-bitmaps` is left out with a warning.
fn copy_bitmaps(src: &Sources, target: &Image, skip_broken: bool) -> Result<(), String> {
    use qcow2::format::bitmap::{FLAG_AUTO, FLAG_IN_USE};
    let Some(sq) = src.parts.first().and_then(|(_, i)| i.qcow2()) else { return Ok(()) };
    let tq = target.qcow2().ok_or("Format driver 'raw' does not support bitmaps")?;
    let list = sq.bitmaps().map_err(|e| e.to_string())?;
    if list.is_empty() {
        return Ok(());
    }
    if tq.tracks_bitmaps() || !tq.bitmaps().map_err(|e| e.to_string())?.is_empty() {
        return Err(
            "the target has persistent bitmaps of its own: qimg copies bitmaps only into a target without any".into()
        );
    }
    for b in list {
        if b.flags & FLAG_IN_USE != 0 {
            if skip_broken {
                eprintln!("qimg: warning: Skipping inconsistent bitmap '{}'", b.name);
                continue;
            }
            return Err(format!("Cannot copy inconsistent bitmap '{}'", b.name));
        }
        let g = b.granularity().ok_or_else(|| format!("bitmap '{}' has an unsupported granularity", b.name))?;
        let map =
            sq.dirty_map(&b.name).map_err(|e| e.to_string())?.ok_or_else(|| format!("bitmap '{}' vanished", b.name))?;
        tq.bitmap_add(&b.name, g, b.flags & FLAG_AUTO != 0).map_err(|e| e.to_string())?;
        tq.bitmap_merge(&b.name, &map).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Copy granularity: the buffer one read fills.
const CHUNK: u64 = 2 << 20;
/// qemu-img's default sparse detection granularity (-S 4k).
const SPARSE: usize = 4096;

/// The non-zero `min_sparse`-sized blocks of `buf`, coalesced, as ranges of `buf`.
fn nonzero_ranges(buf: &[u8], min_sparse: usize) -> Vec<(usize, usize)> {
    if min_sparse == 0 {
        return vec![(0, buf.len())];
    }
    let mut out = Vec::new();
    let mut i = 0usize;
    while i < buf.len() {
        while i < buf.len() && is_zero(&buf[i..(i + min_sparse).min(buf.len())]) {
            i += min_sparse;
        }
        let start = i;
        while i < buf.len() && !is_zero(&buf[i..(i + min_sparse).min(buf.len())]) {
            i += min_sparse;
        }
        let end = i.min(buf.len());
        if end > start {
            out.push((start, end));
        }
    }
    out
}

/// The source images, read one after the other as one disk (qemu-img convert's concatenation of several
/// sources).
pub struct Sources {
    /// Each image with the guest offset where it starts.
    parts: Vec<(u64, Arc<Image>)>,
    size: u64,
}

impl Sources {
    /// The images, in order.
    pub fn new(images: Vec<Arc<Image>>) -> Result<Sources, String> {
        let mut parts = Vec::with_capacity(images.len());
        let mut size = 0u64;
        for i in images {
            let n = i.size();
            parts.push((size, i));
            size = size.checked_add(n).ok_or("the sources are too large together")?;
        }
        Ok(Sources { parts, size })
    }

    /// The concatenated size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The part holding `pos` (< size): its start and image. The last part starting at or before `pos` holds
    /// it (an empty image shares its start with the next one, which then comes later in the list).
    fn part(&self, pos: u64) -> (u64, &Image) {
        let i = self.parts.partition_point(|(start, _)| *start <= pos).saturating_sub(1);
        let (start, img) = &self.parts[i];
        (*start, img)
    }

    /// Block status at `pos`, clipped to the part that holds it. With `salvage`, a range whose status cannot
    /// be read (bad metadata) is taken as data, one 64 KiB piece at a time, so the reads report what fails.
    fn block_status(&self, pos: u64, len: u64, salvage: bool) -> Result<Status, String> {
        let (start, img) = self.part(pos);
        let local = pos - start;
        let left = len.min(img.size() - local);
        match img.block_status(local, left) {
            Ok(mut st) => {
                st.len = st.len.min(img.size() - local).max(1);
                Ok(st)
            }
            Err(e) if !salvage => Err(format!("error while reading block status at offset {pos}: {e}")),
            Err(_) => Ok(Status {
                len: left.min(65536 - local % 65536).max(1),
                depth: 0,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: None,
                file: None,
                alloc_depth: 1,
            }),
        }
    }

    /// Reads across parts.
    fn read_at(&self, buf: &mut [u8], pos: u64) -> qcow2::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = pos + done as u64;
            let (start, img) = self.part(at);
            let local = at - start;
            let n = ((img.size() - local) as usize).min(buf.len() - done);
            img.read_at(&mut buf[done..done + n], local)?;
            done += n;
        }
        Ok(())
    }

    /// `read_at`, or with `--salvage` a read that replaces the sectors it cannot read by zeros, with a warning
    /// for each (qemu-img's salvage mode).
    fn read_salvaging(&self, buf: &mut [u8], pos: u64, salvage: bool) -> Result<(), String> {
        match self.read_at(buf, pos) {
            Ok(()) => Ok(()),
            Err(e) if !salvage => Err(format!("error while reading at byte {pos}: {e}")),
            Err(_) => {
                for (i, sector) in buf.chunks_mut(512).enumerate() {
                    let at = pos + i as u64 * 512;
                    if let Err(e) = self.read_at(sector, at) {
                        eprintln!("qimg: warning: error while reading offset {at}: {e}");
                        sector.fill(0);
                    }
                }
                Ok(())
            }
        }
    }
}

/// A filled buffer on its way to the writer: guest offset, data, and the ranges of it to write.
struct Filled {
    offset: u64,
    buf: Vec<u8>,
    ranges: Vec<(usize, usize)>,
    /// With `-c`: each cluster of `buf` compressed (`None`: all zeros, or not smaller once compressed).
    compressed: Option<Vec<Option<Vec<u8>>>>,
}

/// How `convert` writes its target.
pub struct Options {
    /// `-n`: the target exists (a file or a block device) and is not created.
    pub no_create: bool,
    /// `--target-is-zero` (with `-n`): the target reads as zeros already, so zero areas are skipped.
    pub target_is_zero: bool,
    /// `-S`: zero runs of at least this many bytes become holes; 0 writes every byte (fully allocated).
    pub min_sparse: usize,
    /// `-p` (and not `-q`).
    pub progress: bool,
    /// Write whole blocks of this many bytes (the target's cluster size for qcow2, as qemu-img aligns its
    /// writes), so no new cluster is left partly a hole in the file.
    pub align: u64,
    /// `-c`: write compressed clusters of this type (the target's cluster size is `align`).
    pub compress: Option<qcow2::format::header::CompressionType>,
    /// `-B`: the target has a backing file; only what the source's top image holds is copied (what it leaves
    /// to its backing chain is left to the target's), and zero areas are written as zeros, as qemu-img does.
    pub top_only: bool,
    /// `--salvage`: unreadable sectors are copied as zeros, with a warning.
    pub salvage: bool,
    /// `-r`: at most this many bytes written per second.
    pub rate: Option<u64>,
}

/// `-r`: sleeps so that `done` bytes take at least `done / rate` seconds since `start`.
pub fn throttle(start: std::time::Instant, done: u64, rate: Option<u64>) {
    let Some(rate) = rate.filter(|&r| r > 0) else {
        return;
    };
    let due = std::time::Duration::from_secs_f64(done as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
}

/// Progress as qemu-img prints it: a bar on a terminal, else qemu's "    (x.xx/100%)" lines, each ending in a
/// carriage return (the last in a newline).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    total: u64,
    shown: u64,
}

impl Progress {
    /// A progress display for `total` bytes, shown if `on`.
    pub fn new(total: u64, on: bool) -> Progress {
        use std::io::IsTerminal;
        let tty = on && std::io::stdout().is_terminal();
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "    ({percent_precise}/100%) {wide_bar} {bytes}/{total_bytes}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let p = Progress { bar, plain: on && !tty, total, shown: u64::MAX };
        p.print(0);
        p
    }

    fn print(&self, pos: u64) {
        if self.plain {
            use std::io::Write;
            let pct = if self.total == 0 { 100.0 } else { pos as f64 * 100.0 / self.total as f64 };
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }

    /// `pos` bytes are done.
    pub fn set(&mut self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
        // qemu prints when the percentage moves by at least one.
        let step = pos.saturating_mul(100).checked_div(self.total).unwrap_or(0);
        if self.plain && step != self.shown {
            self.shown = step;
            self.print(pos);
        }
    }

    /// The end of a command that printed its own messages after the progress lines (compare): a newline.
    pub fn end(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
        if self.plain {
            println!();
        }
    }

    /// All done.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish();
        }
        if self.plain {
            println!("    (100.00/100%)");
        }
    }
}

/// Copies `img` into `target` (already created, opened writable): data is read by a thread that maps and
/// reads ahead while this one writes in order. Zero areas are skipped when the target reads as zeros already
/// (a new image, or `--target-is-zero`), written as zeroes otherwise, and written as data with `-S 0`.
pub fn copy(img: &Sources, target: &Image, o: &Options) -> Result<(), String> {
    use std::sync::mpsc::sync_channel;
    let size = img.size();
    if target.size() < size {
        return Err(format!("Error: the target ({} bytes) is smaller than the source ({size} bytes)", target.size()));
    }
    // A target with a backing file does not read as zeros where nothing is written.
    let zero_init = (!o.no_create || o.target_is_zero) && !o.top_only;
    let top_only = o.top_only;
    let mut progress = Progress::new(size, o.progress);
    const DEPTH: usize = 4;
    /// A zero run the target must be told about (not zero-initialised), or a filled buffer.
    enum Work {
        Data(Filled),
        Zero(u64, u64),
    }
    // With -c, clusters are compressed by a worker per core between the reader and the writer, which puts
    // the chunks back in order (by their sequence numbers) before writing them.
    let workers =
        if o.compress.is_some() { std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16) } else { 0 };
    let (tx, rx) = sync_channel::<(u64, Work)>(DEPTH);
    let buffers = DEPTH + 2 + 2 * workers;
    let (back_tx, back_rx) = sync_channel::<Vec<u8>>(buffers);
    for _ in 0..buffers {
        let _ = back_tx.send(vec![0u8; CHUNK as usize]);
    }
    let align = o.align.max(1);
    // Zero detection works in whole target blocks.
    let min_sparse = if o.min_sparse == 0 { 0 } else { o.min_sparse.max(align as usize) };
    let salvage = o.salvage;
    let started = std::time::Instant::now();
    // Shared by the writers (see below); declared here to outlive their scope.
    let rx = &std::sync::Mutex::new(Some(rx));
    let back_tx = &std::sync::Mutex::new(Some(back_tx));
    let failed = &std::sync::atomic::AtomicBool::new(false);
    let shared = &std::sync::Mutex::new((&mut progress, 0u64, 0u64));
    let result = std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<(), String> {
            let mut pos = 0u64;
            let mut seq = 0u64;
            while pos < size {
                let st = img.block_status(pos, (size - pos).min(1 << 30), salvage)?;
                let mut run_end = pos + st.len.max(1).min(size - pos);
                let status_end = run_end;
                if top_only && (st.depth > 0 || !st.present) {
                    // Left to the backing file, in the source as in the target.
                    pos = run_end;
                    continue;
                }
                if !st.zero || min_sparse == 0 {
                    // Whole target blocks: from the start of the block holding `pos` (a zero run before it
                    // ended inside it) to the end of the block holding the run's end.
                    run_end = run_end.div_ceil(align).saturating_mul(align).min(size);
                    let mut p = pos - pos % align;
                    while p < run_end {
                        let Ok(mut buf) = back_rx.recv() else {
                            return Ok(());
                        };
                        let n = (run_end - p).min(CHUNK) as usize;
                        buf.resize(n, 0);
                        // Known zeros only inside the zero run itself: the rounding to whole target blocks
                        // reaches into the neighbouring runs, which are read.
                        if st.zero && p >= pos && p + n as u64 <= status_end {
                            buf.fill(0);
                        } else {
                            img.read_salvaging(&mut buf, p, salvage)?;
                        }
                        let ranges = nonzero_ranges(&buf, min_sparse);
                        seq += 1;
                        let filled = Filled { offset: p, buf, ranges, compressed: None };
                        if tx.send((seq, Work::Data(filled))).is_err() {
                            return Ok(());
                        }
                        p += n as u64;
                    }
                } else if !zero_init {
                    seq += 1;
                    if tx.send((seq, Work::Zero(pos, run_end - pos))).is_err() {
                        return Ok(());
                    }
                }
                pos = run_end;
            }
            Ok(())
        });
        // Writers: one, in order (a qcow2 target's clusters are laid out in guest order, as qemu-img
        // writes them without -W); a raw target has no layout to keep, so two write at once.
        let writers = if target.qcow2().is_none() { 2 } else { 1 };
        let next_item = || -> Result<Option<(u64, Work)>, String> {
            let g = rx.lock().map_err(|_| "writer lock poisoned".to_string())?;
            Ok(g.as_ref().and_then(|r| r.recv().ok()))
        };
        let write_one = |w: Work| -> Result<(), String> {
            let r = match &w {
                Work::Zero(off, len) => target
                    .write_zeroes(*off, *len, true, false)
                    .map_err(|e| format!("error while writing at byte {off}: {e}")),
                Work::Data(f) => match &f.compressed {
                    Some(c) => write_compressed(target, f, c, align, size, zero_init),
                    None => write_ranges(target, f, zero_init),
                },
            };
            if let Err(e) = r {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
            let (end, bytes, buf) = match w {
                Work::Zero(off, len) => (off + len, 0, None),
                Work::Data(f) => {
                    let n = f.ranges.iter().map(|(a, b)| (b - a) as u64).sum::<u64>();
                    (f.offset + f.buf.len() as u64, n, Some(f.buf))
                }
            };
            let done = {
                let mut g = shared.lock().map_err(|_| "progress lock poisoned".to_string())?;
                g.1 = g.1.max(end);
                g.2 += bytes;
                let pos = g.1;
                g.0.set(pos);
                g.2
            };
            throttle(started, done, o.rate);
            if let (Some(buf), Ok(g)) = (buf, back_tx.lock()) {
                if let Some(b) = g.as_ref() {
                    let _ = b.send(buf);
                }
            }
            Ok(())
        };
        let write_loop = move || -> Result<(), String> {
            while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                let Some((_, w)) = next_item()? else { return Ok(()) };
                write_one(w)?;
            }
            Ok(())
        };
        if let Some(kind) = o.compress {
            let (ctx, crx) = std::sync::mpsc::channel::<(u64, Work)>();
            let compressors: Vec<_> = (0..workers)
                .map(|_| {
                    let ctx = ctx.clone();
                    s.spawn(move || -> Result<(), String> {
                        while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                            let Some((seq, mut w)) = next_item()? else { return Ok(()) };
                            if let Work::Data(f) = &mut w {
                                f.compressed = Some(compress_clusters(&f.buf, kind, align));
                            }
                            if ctx.send((seq, w)).is_err() {
                                return Ok(());
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            drop(ctx);
            // In sequence order: chunks that arrive early wait (at most the number of buffers).
            let mut pending = std::collections::BTreeMap::new();
            let mut want = 1u64;
            let mut werr = None;
            'recv: for (seq, w) in crx.iter() {
                pending.insert(seq, w);
                while let Some(w) = pending.remove(&want) {
                    if let Err(e) = write_one(w) {
                        werr = Some(e);
                        break 'recv;
                    }
                    want += 1;
                }
            }
            failed.store(werr.is_some(), std::sync::atomic::Ordering::Relaxed);
            drop(crx);
            drop(pending);
            if let Ok(mut g) = rx.lock() {
                g.take();
            }
            for h in compressors {
                if let Err(e) = h.join().unwrap_or_else(|_| Err("compression thread failed".into())) {
                    werr.get_or_insert(e);
                }
            }
            if let Ok(mut g) = back_tx.lock() {
                g.take();
            }
            let r = reader.join().unwrap_or_else(|_| Err("reader thread failed".into()));
            return match werr {
                Some(e) => Err(e),
                None => r,
            };
        }
        let extra: Vec<_> = (1..writers).map(|_| s.spawn(write_loop)).collect();
        let mut werr = write_loop().err();
        for h in extra {
            if let Err(e) = h.join().unwrap_or_else(|_| Err("writer thread failed".into())) {
                werr.get_or_insert(e);
            }
        }
        // Closing both channels stops the reader wherever it waits.
        if let Ok(mut g) = rx.lock() {
            g.take();
        }
        if let Ok(mut g) = back_tx.lock() {
            g.take();
        }
        let r = reader.join().unwrap_or_else(|_| Err("reader thread failed".into()));
        match werr {
            Some(e) => Err(e),
            None => r,
        }
    });
    result?;
    target.flush().map_err(|e| format!("error while flushing the target: {e}"))?;
    progress.finish();
    Ok(())
}

/// `-c`: each cluster of a chunk compressed (in a compression worker); `None` for an all-zero cluster or
/// one that does not shrink below a cluster (qemu's rule). The image's last cluster, if partial, is padded
/// with zeros first, as qemu does.
fn compress_clusters(buf: &[u8], kind: qcow2::format::header::CompressionType, cs: u64) -> Vec<Option<Vec<u8>>> {
    buf.chunks(cs as usize)
        .map(|p| if is_zero(p) { None } else { qcow2::image::compressed::compress_cluster(kind, p, cs) })
        .collect()
}

/// `-c`: writes a chunk's clusters, compressed where [`compress_clusters`] could, as they are otherwise;
/// all-zero clusters are skipped (or zeroed when the target does not read as zeros).
fn write_compressed(
    target: &Image,
    f: &Filled,
    compressed: &[Option<Vec<u8>>],
    cs: u64,
    size: u64,
    zero_init: bool,
) -> Result<(), String> {
    let q = target.qcow2().ok_or("-c needs a qcow2 target")?;
    let pieces: Vec<&[u8]> = f.buf.chunks(cs as usize).collect();
    for (i, (piece, c)) in pieces.iter().zip(compressed.iter().cloned().chain(std::iter::repeat(None))).enumerate() {
        let off = f.offset + i as u64 * cs;
        let err = |e: qcow2::Error| format!("error while writing at byte {off}: {e}");
        if is_zero(piece) {
            if !zero_init {
                target.write_zeroes(off, piece.len() as u64, true, false).map_err(err)?;
            }
            continue;
        }
        match c {
            Some(c) if off + cs <= size.div_ceil(cs) * cs => q.write_compressed(off, &c).map_err(err)?,
            _ => target.write_at(piece, off, false).map_err(err)?,
        }
    }
    Ok(())
}

/// Writes the non-zero ranges of a filled buffer; the gaps between them are zeroed when the target does not
/// read as zeros already.
fn write_ranges(target: &Image, f: &Filled, zero_init: bool) -> Result<(), String> {
    let mut at = 0usize;
    let err = |off: u64, e: qcow2::Error| format!("error while writing at byte {off}: {e}");
    for &(a, b) in &f.ranges {
        if !zero_init && a > at {
            let off = f.offset + at as u64;
            target.write_zeroes(off, (a - at) as u64, true, false).map_err(|e| err(off, e))?;
        }
        let off = f.offset + a as u64;
        target.write_at(&f.buf[a..b], off, false).map_err(|e| err(off, e))?;
        at = b;
    }
    if !zero_init && at < f.buf.len() {
        let off = f.offset + at as u64;
        target.write_zeroes(off, (f.buf.len() - at) as u64, true, false).map_err(|e| err(off, e))?;
    }
    Ok(())
}
