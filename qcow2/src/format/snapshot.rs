//! The internal snapshot table (qcow2.rst, "Snapshots").

use super::{be16, be32, be64};
use crate::error::{Error, Result};
use crate::limits;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the date.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size of the snapshot, if the extra data has it.
    pub disk_size: Option<u64>,
    /// icount (-1 when disabled), if the extra data has it.
    pub icount: Option<u64>,
    /// Size of the entry's extra data.
    pub extra_len: u64,
    /// Size of the whole table entry on disk, padding included.
    pub entry_len: u64,
}

/// Parses `count` entries from `buf`, the bytes of the snapshot table.
pub fn parse_table(buf: &[u8], count: u32) -> Result<Vec<Snapshot>> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut off = 0usize;
    for i in 0..count {
        let past = || Error::invalid(format!("snapshot table entry {i} runs past the table"));
        let head = off.checked_add(40).and_then(|end| buf.get(off..end)).ok_or_else(past)?;
        let id_len = be16(head, 12) as usize;
        let name_len = be16(head, 14) as usize;
        let extra = be32(head, 36);
        if extra > limits::MAX_SNAPSHOT_EXTRA_DATA {
            return Err(Error::invalid(format!("snapshot {i}: extra_data_size {extra} is too large")));
        }
        let extra = extra as usize;
        // extra <= 1 KiB and the lengths are 16-bit: no overflow, but say so with checked sums.
        let total = extra.checked_add(id_len).and_then(|n| n.checked_add(name_len)).and_then(|n| n.checked_add(40));
        let total = total.ok_or_else(past)?;
        let entry = off.checked_add(total).and_then(|end| buf.get(off..end)).ok_or_else(past)?;
        let (id_at, name_at) = (40usize.saturating_add(extra), 40usize.saturating_add(extra).saturating_add(id_len));
        let ex = entry.get(40..id_at).ok_or_else(past)?;
        let mut vm_state_size = u64::from(be32(head, 32));
        if ex.len() >= 8 {
            vm_state_size = be64(ex, 0);
        }
        let disk_size = (ex.len() >= 16).then(|| be64(ex, 8));
        let icount = (ex.len() >= 24).then(|| be64(ex, 16));
        let id = String::from_utf8_lossy(entry.get(id_at..name_at).ok_or_else(past)?).into_owned();
        let name = String::from_utf8_lossy(entry.get(name_at..total).ok_or_else(past)?).into_owned();
        let entry_len = total.div_ceil(8).saturating_mul(8);
        out.push(Snapshot {
            l1_table_offset: be64(head, 0),
            l1_size: be32(head, 8),
            id,
            name,
            date_sec: be32(head, 16),
            date_nsec: be32(head, 20),
            vm_clock_nsec: be64(head, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_len: extra as u64,
            entry_len: entry_len as u64,
        });
        off = off.checked_add(entry_len).ok_or_else(past)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_entry_with_extra_data() {
        let mut b = vec![0u8; 40];
        b[0..8].copy_from_slice(&0x30000u64.to_be_bytes());
        b[8..12].copy_from_slice(&1u32.to_be_bytes());
        b[12..14].copy_from_slice(&1u16.to_be_bytes());
        b[14..16].copy_from_slice(&5u16.to_be_bytes());
        b[36..40].copy_from_slice(&24u32.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&(1u64 << 20).to_be_bytes());
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        b.extend_from_slice(b"1snap1");
        let s = parse_table(&b, 1).unwrap();
        assert_eq!(s[0].name, "snap1");
        assert_eq!(s[0].id, "1");
        assert_eq!(s[0].vm_state_size, 7);
        assert_eq!(s[0].disk_size, Some(1 << 20));
        assert!(parse_table(&b, 2).is_err());
    }
}
