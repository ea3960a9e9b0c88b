//! Changing the backing file an image names (`qimg rebase`), crash-safe: every state a power cut can leave
//! names either the old backing file with its format or the new one with its format, never one with the
//! other's format (which would read a qcow2 file as raw, or the reverse).
//!
//! The new name is written first to free space in cluster 0 (past the extensions and the old name). Then one
//! write of the first sector switches `backing_file_offset`/`backing_file_size` (header bytes 8-19) and, when the
//! format changes, the backing format extension: rewritten in place, or added after the last extension, when it
//! lies inside that sector. A sector is written whole or not at all (the crash model's unit), so that write is
//! the commit point. A format change the first sector cannot hold is refused by name.

use super::commit::{MetaCommit, Stage};
use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header;

const SECTOR: u64 = 512;

fn pad8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

impl Qcow2 {
    /// Names `name` (with format `fmt`, or the current format when `None`) as the backing file, or none.
    /// Only the header changes: the caller has made the guest-visible data right first (`qimg rebase` safe
    /// mode). The image must be reopened to use the new backing file.
    pub fn set_backing(&self, name: Option<&str>, fmt: Option<&str>) -> Result<()> {
        let h = &self.header;
        let cs = self.cluster_size();
        let mut sector = vec![0u8; SECTOR as usize];
        self.file.read_at(&mut sector, 0)?;
        let Some(name) = name else {
            // No backing file: the pointer goes, and a backing format extension in the first sector is retired
            // in the same write (one that is not stays: qemu ignores a format without a file).
            put(&mut sector, 8, &0u64.to_be_bytes());
            put(&mut sector, 16, &0u32.to_be_bytes());
            if let Some((at, _)) = h.backing_format_at.filter(|(at, _)| at + 4 <= SECTOR) {
                put(&mut sector, at, &RETIRED.to_be_bytes());
            }
            return self.commit_sector(sector);
        };
        if name.is_empty() || name.len() > crate::limits::MAX_BACKING_NAME as usize {
            return Err(Error::new(ErrorKind::InvalidArgument, format!("backing file name '{name}' is too long")));
        }
        let end = h.extensions_end;
        if end == 0 || h.version < 2 {
            return Err(Error::unsupported("the header's extensions fill cluster 0: its backing file cannot change"));
        }
        let old_name_end = h.backing_file_offset + u64::from(h.backing_file_size);
        // The format: unchanged, rewritten in place, or a new extension where the end marker is.
        let mut new_end = end;
        let mut fmt_write: Option<(u64, Vec<u8>)> = None;
        if let Some(f) = fmt.filter(|f| Some(*f) != h.backing_format.as_deref()) {
            let data = f.as_bytes();
            match h.backing_format_at {
                Some((at, len)) if pad8(data.len() as u64) <= pad8(u64::from(len)) => {
                    let mut w = Vec::new();
                    w.extend_from_slice(&header::EXT_BACKING_FORMAT.to_be_bytes());
                    w.extend_from_slice(&(data.len() as u32).to_be_bytes());
                    w.extend_from_slice(data);
                    w.resize((8 + pad8(u64::from(len))) as usize, 0);
                    fmt_write = Some((at, w));
                }
                Some((at, _)) => {
                    // Too long for the old one: retire it and add a new one at the end.
                    let mut w = Vec::new();
                    w.extend_from_slice(&RETIRED.to_be_bytes());
                    fmt_write = Some((at, w));
                    new_end = end + 8 + pad8(data.len() as u64);
                }
                None => new_end = end + 8 + pad8(data.len() as u64),
            }
        }
        let appended = new_end != end;
        let dest = pad8((new_end + 8).max(old_name_end));
        if dest + name.len() as u64 > cs {
            return Err(Error::unsupported("cluster 0 has no room for the new backing file name"));
        }
        let fits = |at: u64, len: u64| at + len <= SECTOR;
        if fmt_write.as_ref().is_some_and(|(at, w)| !fits(*at, w.len() as u64))
            || (appended && !fits(end, new_end + 8 - end))
        {
            return Err(Error::unsupported(
                "the backing format extension lies past the first sector: qimg cannot change it in one atomic write",
            ));
        }
        // 1. The new name, in space nothing points at.
        let mut c = MetaCommit::new(self.has_separate_data());
        c.add(Stage::Tables, dest, name.as_bytes().to_vec());
        self.run_commit(&c)?;
        if dest < SECTOR {
            self.file.read_at(&mut sector, 0)?;
        }
        // 2. One write of the first sector: the name pointer and the format.
        put(&mut sector, 8, &dest.to_be_bytes());
        put(&mut sector, 16, &(name.len() as u32).to_be_bytes());
        if let Some((at, w)) = fmt_write {
            put(&mut sector, at, &w);
        }
        if let (true, Some(f)) = (appended, fmt) {
            let mut w = Vec::new();
            w.extend_from_slice(&header::EXT_BACKING_FORMAT.to_be_bytes());
            w.extend_from_slice(&(f.len() as u32).to_be_bytes());
            w.extend_from_slice(f.as_bytes());
            w.resize((8 + pad8(f.len() as u64)) as usize, 0);
            w.extend_from_slice(&[0u8; 8]);
            put(&mut sector, end, &w);
        }
        self.commit_sector(sector)
    }

    fn commit_sector(&self, sector: Vec<u8>) -> Result<()> {
        let mut c = MetaCommit::new(self.has_separate_data());
        c.add(Stage::Pointers, 0, sector);
        self.run_commit(&c)
    }
}

/// The type written over a backing format extension that is dropped (no extension has it).
const RETIRED: u32 = 0x716e_6265;

fn put(buf: &mut [u8], at: u64, bytes: &[u8]) {
    let at = at as usize;
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}
