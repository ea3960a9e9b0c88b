//! A power-cut model of the files behind an image, for tests.
//!
//! Every write and sync to a [`CrashFile`] is recorded. What a disk may hold after a power cut is everything
//! made durable by a completed sync, plus **any subset** of the writes issued since, each of them possibly
//! torn at 512-byte sectors (a disk cache keeps or loses sectors independently, in any order). A crash can
//! happen between any two operations; since the set of writes pending only grows until the next sync, the
//! states reachable at the moment a sync is issued (before it completes) include every state reachable
//! earlier in the same window. So [`CrashDisk`] samples crash states each time any of its files is synced,
//! and again when the test asks ([`CrashDisk::sample_now`]).
//!
//! The files of one disk (an image and its external data file) lose their unsynced writes independently.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;
use std::sync::{Arc, Mutex};

/// Sector size at which writes tear.
pub const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct FileState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
}

/// A small deterministic generator (xorshift64*), so a failing case replays from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }
}

#[derive(Debug)]
struct DiskState {
    files: Vec<FileState>,
    rng: Rng,
    /// Crash states per sample.
    per_sample: usize,
    /// Sampled states not yet taken by the test.
    states: Vec<CrashState>,
    /// How many syncs were seen.
    syncs: u64,
    /// Enumerate every subset of the pending writes (whole, not torn) when there are few enough.
    exhaustive: bool,
    cap: u64,
}

/// The contents of every file of a disk after one simulated power cut.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// One buffer per file, in the order the files were added.
    pub files: Vec<Vec<u8>>,
    /// A description for failure messages: where the cut happened and what survived.
    pub how: String,
}

/// Several files that lose power together.
#[derive(Debug)]
pub struct CrashDisk {
    state: Mutex<DiskState>,
}

impl CrashDisk {
    /// A disk with no files yet; `per_sample` crash states are drawn at each sample point. Files may grow
    /// up to `cap` bytes.
    pub fn new(seed: u64, per_sample: usize, cap: u64) -> Arc<CrashDisk> {
        Arc::new(CrashDisk {
            state: Mutex::new(DiskState {
                files: Vec::new(),
                rng: Rng::new(seed),
                per_sample,
                states: Vec::new(),
                syncs: 0,
                exhaustive: false,
                cap,
            }),
        })
    }

    /// Adds a file holding `data`, all of it durable.
    pub fn add_file(self: &Arc<Self>, data: Vec<u8>) -> Arc<CrashFile> {
        let mut st = self.lock();
        st.files.push(FileState { durable: data.clone(), current: data, pending: Vec::new() });
        Arc::new(CrashFile { disk: self.clone(), index: st.files.len() - 1 })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, each sample is every subset of the pending writes (of all files together) when there
    /// are at most 12 of them; with more, `per_sample` random states as before.
    pub fn set_exhaustive(&self, on: bool) {
        self.lock().exhaustive = on;
    }

    /// Draws crash states from what is durable and pending right now.
    pub fn sample_now(&self, label: &str) {
        let mut st = self.lock();
        sample(&mut st, label);
    }

    /// Takes the states sampled so far.
    pub fn take_states(&self) -> Vec<CrashState> {
        std::mem::take(&mut self.lock().states)
    }

    /// The current (not necessarily durable) contents of file `i`.
    pub fn current(&self, i: usize) -> Vec<u8> {
        self.lock().files.get(i).map(|f| f.current.clone()).unwrap_or_default()
    }
}

fn apply_write(d: &mut Vec<u8>, offset: u64, data: &[u8], sectors: Option<&[bool]>) {
    let end = offset as usize + data.len();
    if d.len() < end {
        d.resize(end, 0);
    }
    match sectors {
        None => d[offset as usize..end].copy_from_slice(data),
        Some(keep) => {
            // Sector k of the write covers the part of it inside absolute sector (offset / 512 + k).
            let first = offset / SECTOR;
            for (k, kept) in keep.iter().enumerate() {
                if !kept {
                    continue;
                }
                let s0 = ((first + k as u64) * SECTOR).max(offset);
                let s1 = ((first + k as u64 + 1) * SECTOR).min(offset + data.len() as u64);
                if s0 < s1 {
                    let (a, b) = ((s0 - offset) as usize, (s1 - offset) as usize);
                    d[s0 as usize..s1 as usize].copy_from_slice(&data[a..b]);
                }
            }
        }
    }
}

/// Every subset of the pending writes of all files, each kept whole.
fn sample_all(st: &mut DiskState, label: &str) -> bool {
    let writes: Vec<(usize, usize)> =
        st.files.iter().enumerate().flat_map(|(i, f)| f.pending.iter().enumerate().map(move |(j, _)| (i, j))).collect();
    if writes.len() > 12 {
        return false;
    }
    for mask in 0u32..(1 << writes.len()) {
        let mut how = format!("{label}, subset {mask:#b} of");
        let files = st
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mut d = f.durable.clone();
                for (j, p) in f.pending.iter().enumerate() {
                    let bit = writes.iter().position(|&w| w == (i, j)).unwrap_or(0);
                    let keep = mask & (1 << bit) != 0;
                    match p {
                        Pending::Write { offset, data } => {
                            how.push_str(&format!(
                                " f{i}w{j}@{offset:#x}+{}{}",
                                data.len(),
                                if keep { "" } else { "(lost)" }
                            ));
                            if keep {
                                apply_write(&mut d, *offset, data, None);
                            }
                        }
                        Pending::SetLen(l) if keep => d.resize(*l as usize, 0),
                        Pending::SetLen(_) => {}
                    }
                }
                d
            })
            .collect();
        st.states.push(CrashState { files, how });
    }
    true
}

fn sample(st: &mut DiskState, label: &str) {
    if st.exhaustive && sample_all(st, label) {
        return;
    }
    for n in 0..st.per_sample {
        let mut files = Vec::with_capacity(st.files.len());
        let mut how = format!("{label}, state {n}:");
        let DiskState { files: fs, rng, .. } = st;
        for (i, f) in fs.iter().enumerate() {
            let mut d = f.durable.clone();
            // The first state of a sample keeps nothing pending, the second everything, the rest a random
            // subset, some torn.
            for (j, p) in f.pending.iter().enumerate() {
                match p {
                    Pending::Write { offset, data } => {
                        let keep = match n {
                            0 => false,
                            1 => true,
                            _ => rng.chance(1, 2),
                        };
                        if !keep {
                            continue;
                        }
                        let first = offset / SECTOR;
                        let last = (offset + data.len() as u64).div_ceil(SECTOR);
                        let nsec = (last - first) as usize;
                        if n >= 2 && nsec > 1 && rng.chance(1, 3) {
                            let sectors: Vec<bool> = (0..nsec).map(|_| rng.chance(1, 2)).collect();
                            how.push_str(&format!(" f{i}w{j}@{offset:#x}+{}torn", data.len()));
                            apply_write(&mut d, *offset, data, Some(&sectors));
                        } else {
                            how.push_str(&format!(" f{i}w{j}@{offset:#x}+{}", data.len()));
                            apply_write(&mut d, *offset, data, None);
                        }
                    }
                    // A length change is metadata of the host file system: kept or not, as a whole.
                    Pending::SetLen(l) => {
                        if n == 1 || (n >= 2 && rng.chance(1, 2)) {
                            d.resize(*l as usize, 0);
                        }
                    }
                }
            }
            files.push(d);
        }
        st.states.push(CrashState { files, how });
    }
}

/// One file of a [`CrashDisk`].
#[derive(Debug)]
pub struct CrashFile {
    disk: Arc<CrashDisk>,
    index: usize,
}

impl CrashFile {
    fn with<R>(&self, f: impl FnOnce(&mut FileState, u64) -> R) -> R {
        let mut st = self.disk.lock();
        let cap = st.cap;
        f(&mut st.files[self.index], cap)
    }
}

impl Storage for CrashFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.with(|f, _| {
            buf.fill(0);
            if let Ok(start) = usize::try_from(offset) {
                if start < f.current.len() {
                    let n = buf.len().min(f.current.len() - start);
                    buf[..n].copy_from_slice(&f.current[start..start + n]);
                }
            }
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.with(|f, cap| {
            let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= cap);
            let Some(end) = end else {
                return Err(Error::new(ErrorKind::NoSpace, "write past the crash model's capacity"));
            };
            if f.current.len() < end as usize {
                f.current.resize(end as usize, 0);
            }
            f.current[offset as usize..end as usize].copy_from_slice(buf);
            f.pending.push(Pending::Write { offset, data: buf.to_vec() });
            Ok(())
        })
    }

    fn len(&self) -> Result<u64> {
        Ok(self.with(|f, _| f.current.len() as u64))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.with(|f, cap| {
            if len > cap {
                return Err(Error::new(ErrorKind::NoSpace, "length past the crash model's capacity"));
            }
            f.current.resize(len as usize, 0);
            f.pending.push(Pending::SetLen(len));
            Ok(())
        })
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.disk.lock();
        st.syncs += 1;
        let label = format!("at sync {} of file {}", st.syncs, self.index);
        sample(&mut st, &label);
        let f = &mut st.files[self.index];
        f.durable = f.current.clone();
        f.pending.clear();
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _punch: bool) -> Result<()> {
        let len = usize::try_from(len).map_err(|_| Error::new(ErrorKind::NoSpace, "zeroes too long"))?;
        self.write_at(&vec![0u8; len], offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_holds_nothing_everything_and_torn_subsets_of_the_pending_writes() {
        let disk = CrashDisk::new(7, 40, 1 << 20);
        let f = disk.add_file(vec![1u8; 2048]);
        f.write_at(&[2u8; 1536], 0).unwrap();
        f.write_at(&[3u8; 100], 1800).unwrap();
        f.flush().unwrap();
        let states = disk.take_states();
        assert_eq!(states.len(), 40);
        assert_eq!(states[0].files[0], vec![1u8; 2048]);
        let mut all = vec![2u8; 1536];
        all.extend_from_slice(&[1u8; 264]);
        all.extend_from_slice(&[3u8; 100]);
        all.extend_from_slice(&[1u8; 148]);
        assert_eq!(states[1].files[0], all);
        // Some state keeps the first sector of the first write but not its second (torn), and every state
        // is made of whole sectors of old or new bytes.
        let torn = states.iter().any(|s| s.files[0][0] == 2 && s.files[0][512] == 1);
        assert!(torn, "no torn state in 40 samples");
        for s in &states {
            for sec in s.files[0][..1536].chunks(512) {
                assert!(sec.iter().all(|&b| b == sec[0]), "{}", s.how);
            }
        }
        // After the sync, everything is durable.
        disk.sample_now("after");
        assert!(disk.take_states().iter().all(|s| s.files[0] == all));
    }
}
