//! The L2 table cache: a bounded LRU of decoded tables, keyed by host offset, behind one mutex.
//!
//! Metadata is cached; guest data never is. Tables are stored decoded (extended L2 tables hold two words per
//! entry) behind an `Arc`. Tables changed by the writer are *pinned* (never evicted) until a metadata commit
//! writes them; readers see them at once, since the data they publish was written before the change (see
//! `write.rs`).
//!
//! A table changes in place ([`L2Cache::modify`]) and is read ([`L2Cache::read`]) under the cache lock, so a
//! reader never sees an extended entry without its subcluster bitmap. (An earlier lock-free design, with
//! per-thread remembered tables and a sequence lock, measured within 3 % of this one on every read and write
//! case of `benches/side-by-side.sh` on 2 cores, so the simpler design stayed.)

use lru::LruCache;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One decoded L2 table: native-endian words, changed only through [`L2Cache::modify`].
#[derive(Debug)]
pub struct Table(Box<[AtomicU64]>);

impl Table {
    /// A table holding `words`.
    pub fn new(words: Vec<u64>) -> Table {
        Table(words.into_iter().map(AtomicU64::new).collect())
    }

    /// Word `i` (panics past the end, like indexing: callers index inside the table's entry count).
    #[inline]
    pub fn word(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }

    /// Sets word `i`; only inside [`L2Cache::modify`], which makes the change visible consistently.
    pub fn set(&self, i: usize, v: u64) {
        self.0[i].store(v, Ordering::Relaxed)
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the table has no words.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A copy of the words.
    pub fn to_vec(&self) -> Vec<u64> {
        self.0.iter().map(|w| w.load(Ordering::Relaxed)).collect()
    }
}

/// A shared decoded L2 table.
pub type L2Table = Arc<Table>;

/// Hashes a cluster-aligned host offset: the keys are this process's own numbers, not an attacker's choice of
/// strings, so a multiply-shift is enough and keeps a cache hit in tens of nanoseconds.
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        // Offsets are multiples of the cluster size: fold the high bits down before the multiply.
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(26);
    }
}

type Fast = BuildHasherDefault<OffsetHasher>;

struct Inner {
    lru: LruCache<u64, L2Table, Fast>,
    pinned: HashMap<u64, L2Table, Fast>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("cached", &self.lru.len()).field("pinned", &self.pinned.len()).finish()
    }
}

/// A bounded cache of clean L2 tables plus the dirty ones waiting to be written.
#[derive(Debug)]
pub struct L2Cache {
    inner: Mutex<Inner>,
    /// Counts changes to tables and to the L1 table (not evictions): a table read from disk is cached only if
    /// none happened during the read.
    generation: AtomicU64,
}

impl L2Cache {
    /// A cache holding at most `tables` clean tables (at least one).
    pub fn new(tables: usize) -> Self {
        let cap = NonZeroUsize::new(tables.max(1)).unwrap_or(NonZeroUsize::MIN);
        L2Cache {
            inner: Mutex::new(Inner { lru: LruCache::with_hasher(cap, Fast::default()), pinned: HashMap::default() }),
            generation: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data under the lock stays consistent even if a holder panicked: every change is one step.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current generation; read it before reading a table from disk (see [`L2Cache::put`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Call after any L1 change: counts a change.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Runs `f`, which reads words of cached tables, under the lock that changes run under: it sees no
    /// change half made.
    #[inline]
    pub fn read<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = self.lock();
        f()
    }

    /// Runs `f` on the cached table at `off` under the cache lock (one lock, no reference count); `None` if
    /// the table is not cached.
    #[inline]
    pub fn with<R>(&self, off: u64, f: impl FnOnce(&Table) -> R) -> Option<R> {
        let mut g = self.lock();
        if !g.pinned.is_empty() {
            if let Some(t) = g.pinned.get(&off) {
                return Some(f(t));
            }
        }
        g.lru.get(&off).map(|t| f(t))
    }

    /// The table at host offset `off`, if cached.
    pub fn get(&self, off: u64) -> Option<L2Table> {
        let mut g = self.lock();
        if !g.pinned.is_empty() {
            if let Some(t) = g.pinned.get(&off) {
                return Some(t.clone());
            }
        }
        g.lru.get(&off).cloned()
    }

    /// Caches a clean `table` read from disk at host offset `off` when the generation was `generation` before
    /// the read, and returns the table to use: the cached copy if there is one already (it may be newer than
    /// what the disk held when this one was read, and it is the one changes go to). If anything changed during
    /// the read (a table changed, written and evicted meanwhile would otherwise come back old), `table` is
    /// returned uncached.
    pub fn put(&self, off: u64, table: L2Table, generation: u64) -> L2Table {
        let mut g = self.lock();
        if let Some(t) = g.pinned.get(&off) {
            return t.clone();
        }
        if let Some(t) = g.lru.get(&off) {
            return t.clone();
        }
        if self.generation() != generation {
            return table;
        }
        g.lru.push(off, table.clone());
        table
    }

    /// Changes the cached table at `off` in place, under the cache lock, and pins it; returns false if the
    /// table is not cached. Readers never see the table missing while it changes, and [`L2Cache::read`]
    /// never sees a change half made.
    pub fn modify(&self, off: u64, f: impl FnOnce(&Table)) -> bool {
        let mut g = self.lock();
        let t = match g.pinned.remove(&off) {
            Some(t) => Some(t),
            None => g.lru.pop(&off),
        };
        let Some(t) = t else { return false };
        f(&t);
        self.generation.fetch_add(1, Ordering::AcqRel);
        g.pinned.insert(off, t);
        true
    }

    /// Like [`L2Cache::modify`], but if the table at `off` is no longer cached (readers evicted it), `loaded`
    /// (a current copy the caller read under the writer lock) is changed and pinned instead.
    pub fn modify_loaded(&self, off: u64, loaded: &L2Table, f: impl FnOnce(&Table)) {
        let mut g = self.lock();
        let t = match g.pinned.remove(&off) {
            Some(t) => t,
            None => g.lru.pop(&off).unwrap_or_else(|| loaded.clone()),
        };
        f(&t);
        self.generation.fetch_add(1, Ordering::AcqRel);
        g.pinned.insert(off, t);
    }

    /// Stores a new table, pinned until [`L2Cache::mark_clean`].
    pub fn pin(&self, off: u64, table: L2Table) {
        let mut g = self.lock();
        g.lru.pop(&off);
        g.pinned.insert(off, table);
        self.changed();
    }

    /// Number of pinned (dirty) tables.
    pub fn pinned(&self) -> usize {
        self.lock().pinned.len()
    }

    /// The dirty tables, to be written; they stay pinned until [`L2Cache::mark_clean`].
    pub fn dirty(&self) -> Vec<(u64, L2Table)> {
        self.lock().pinned.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Moves the tables at `offs` from the pinned set to the clean LRU.
    pub fn mark_clean(&self, offs: &[u64]) {
        let mut g = self.lock();
        for o in offs {
            if let Some(t) = g.pinned.remove(o) {
                g.lru.push(*o, t);
            }
        }
    }

    /// Number of clean tables the cache may hold.
    pub fn capacity(&self) -> usize {
        self.lock().lru.cap().get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An extended L2 entry is two words: a reader must never see one word of a change without the other.
    #[test]
    fn readers_never_see_an_entry_and_its_bitmap_torn_apart() {
        let cache = Arc::new(L2Cache::new(4));
        let off = 65536;
        let mut words = vec![0; 16];
        words[3] = !0;
        cache.put(off, Arc::new(Table::new(words)), cache.generation());
        let rounds = 100_000u64;
        let writer = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                for k in 1..=rounds {
                    assert!(cache.modify(off, |t| {
                        t.set(2, k);
                        t.set(3, !k);
                    }));
                }
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    let t = cache.get(off).expect("cached");
                    let mut last = 0;
                    let mut seen = 0u64;
                    while last < rounds && seen < 50_000_000 {
                        let (a, b) = cache.read(|| (t.word(2), t.word(3)));
                        assert_eq!(b, !a, "torn entry: {a:#x} with bitmap {b:#x}");
                        assert!(a >= last, "went back from {last} to {a}");
                        last = a;
                        seen += 1;
                    }
                })
            })
            .collect();
        writer.join().expect("writer");
        for r in readers {
            r.join().expect("reader");
        }
        assert_eq!(cache.get(off).map(|t| (t.word(2), t.word(3))), Some((rounds, !rounds)));
    }

    /// Two threads that read the same table from disk end up with the one cached copy: a private copy would
    /// never see the writer's changes.
    #[test]
    fn a_table_read_twice_is_shared_and_a_stale_read_is_not_remembered() {
        let cache = L2Cache::new(4);
        let g = cache.generation();
        let a = cache.put(65536, Arc::new(Table::new(vec![1; 8])), g);
        let b = cache.put(65536, Arc::new(Table::new(vec![1; 8])), g);
        assert!(Arc::ptr_eq(&a, &b), "the second reader gets the cached copy");
        assert!(cache.modify(65536, |t| t.set(0, 5)));
        assert_eq!(b.word(0), 5, "and sees the change");
        // A read that began before a change is not cached.
        let _stale = cache.put(2 * 65536, Arc::new(Table::new(vec![0; 8])), g);
        assert!(cache.get(2 * 65536).is_none());
    }
}
