//! `qimg snapshot`: qemu-img's table of internal snapshots (`-l`, the default), and creating, applying and
//! deleting them (`-c`, `-a`, `-d`), each one atomic switch of the header (`qcow2::image::snapshots`).

use qcow2::Image;

/// `qimg snapshot`'s command line.
#[derive(clap::Args)]
pub struct Args {
    /// List the snapshots.
    #[arg(short = 'l', long = "list")]
    pub list: bool,
    /// Create snapshot NAME.
    #[arg(short = 'c', long = "create", value_name = "NAME")]
    pub create: Option<String>,
    /// Revert the image to snapshot NAME (an ID or a name).
    #[arg(short = 'a', long = "apply", value_name = "NAME")]
    pub apply: Option<String>,
    /// Delete the snapshot named NAME.
    #[arg(short = 'd', long = "delete", value_name = "NAME")]
    pub delete: Option<String>,
    /// Format of the image.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Open the image even if another process writes it.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILENAME is a set of image options.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Objects (accepted: secrets are not used by qimg).
    #[arg(long = "object")]
    pub object: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Runs `qimg snapshot`.
pub fn run(a: Args) -> Result<(), String> {
    let ops = [a.list, a.create.is_some(), a.apply.is_some(), a.delete.is_some()].iter().filter(|&&x| x).count();
    if ops > 1 {
        return Err("Cannot mix '-l', '-a', '-c', '-d'\nTry 'qemu-img snapshot --help' for more info".into());
    }
    let n = crate::Naming { image_opts: a.image_opts, force_share: a.force_share };
    let change = [("create", &a.create), ("apply", &a.apply), ("delete", &a.delete)]
        .into_iter()
        .find_map(|(what, name)| name.as_ref().map(|n| (what, n.clone())));
    let Some((what, name)) = change else {
        let img = crate::open_with(&a.filename, a.format.as_deref(), false, n, true)?;
        if let Some(q) = img.qcow2() {
            print!("{}", crate::info::snapshot_list(q));
        }
        return Ok(());
    };
    let spec = crate::spec(&a.filename, a.format.as_deref(), crate::Naming { force_share: false, ..n })?;
    let o = crate::change_options(a.format.as_deref(), false)?;
    let img = Image::open_spec(&spec, &o).map_err(|e| crate::open_error(&a.filename, e))?;
    let fail = |e: String| format!("Could not {what} snapshot '{name}': {e}");
    let q = img.qcow2().ok_or_else(|| fail("Operation not supported".into()))?;
    let r = match what {
        "create" => {
            // qemu-img takes the time in microseconds.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            q.snapshot_create(&name, (now.as_secs() as u32, now.subsec_micros() * 1000))
        }
        "apply" => q.snapshot_apply(&name),
        _ => q.snapshot_delete(&name),
    };
    r.map_err(|e| fail(e.to_string()))
}
