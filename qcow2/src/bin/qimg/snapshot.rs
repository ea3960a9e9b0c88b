//! `qimg snapshot -l`: qemu-img's table of internal snapshots. Creating, applying and deleting snapshots
//! (`-c`, `-a`, `-d`) are refused by name: qimg does not write snapshots yet.

/// `qimg snapshot`'s command line.
#[derive(clap::Args)]
pub struct Args {
    /// List the snapshots.
    #[arg(short = 'l', long = "list")]
    pub list: bool,
    /// Create snapshot NAME (not supported).
    #[arg(short = 'c', long = "create", value_name = "NAME")]
    pub create: Option<String>,
    /// Apply snapshot NAME (not supported).
    #[arg(short = 'a', long = "apply", value_name = "NAME")]
    pub apply: Option<String>,
    /// Delete snapshot NAME (not supported).
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
    if ops != 1 {
        return Err("Exactly one of -l, -c, -a, -d must be given".into());
    }
    for (flag, what) in [("-c", &a.create), ("-a", &a.apply), ("-d", &a.delete)] {
        if what.is_some() {
            return Err(format!(
                "snapshot {flag}: creating, applying and deleting internal snapshots is not supported by qimg yet"
            ));
        }
    }
    let n = crate::Naming { image_opts: a.image_opts, force_share: a.force_share };
    let img = crate::open_with(&a.filename, a.format.as_deref(), false, n, true)?;
    if let Some(q) = img.qcow2() {
        print!("{}", crate::info::snapshot_list(q));
    }
    Ok(())
}
