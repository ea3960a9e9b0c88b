//! The L2 table cache: a bounded LRU of decoded tables, keyed by host offset.
//!
//! Metadata is cached; guest data never is. Tables are stored decoded (extended L2 tables hold two words per
//! entry) behind an `Arc`, so a lookup holds the lock only to clone the pointer. Tables changed by the writer
//! are *pinned* (never evicted) until a metadata flush writes them; readers see them at once, since the data
//! they publish was written before the change (see `alloc.rs`).
//!
//! A table changes in place: its words are atomics, and every change runs under the cache lock inside a
//! sequence count (odd while a change is in progress), so a reader that must see an entry and its subcluster
//! bitmap together reads without a lock and retries if a change overlapped ([`L2Cache::read`]).

use lru::LruCache;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;
use std::sync::atomic::{fence, AtomicU64, Ordering};
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
///
/// Each thread also remembers the table of its last lookup (`HOT`) with the L1 entry that led to it, valid
/// while the cache's *epoch* is unchanged: every L1 change, every eviction and every table replaced bumps the
/// epoch (after the change is visible), so a remembered table is the one the cache holds for that L1 index.
/// Changes inside a table do not bump the epoch: they are made in place and seen through [`L2Cache::read`].
/// A lookup that hits the remembered table takes no lock and no reference.
#[derive(Debug)]
pub struct L2Cache {
    inner: Mutex<Inner>,
    id: u64,
    epoch: AtomicU64,
    /// Counts changes to tables and to the L1 table (not evictions): a table read from disk is cached only if
    /// none happened during the read.
    generation: AtomicU64,
    /// Sequence count of in-place changes: odd while one is in progress (changes run under `inner`).
    seq: AtomicU64,
}

static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

/// A table a thread remembers. It holds the table strongly: at most [`HOT_SLOTS`] tables per thread stay
/// alive after the cache let them go.
struct Hot {
    cache: u64,
    epoch: u64,
    l1_index: u64,
    l1_entry: u64,
    table: L2Table,
}

/// Remembered tables per thread: one per image of a short backing chain.
const HOT_SLOTS: usize = 4;

/// Lock-free attempts of [`L2Cache::read`] before it takes the lock.
const READ_TRIES: usize = 4;

thread_local! {
    static HOT: std::cell::RefCell<[Option<Hot>; HOT_SLOTS]> = const { std::cell::RefCell::new([None, None, None, None]) };
    /// How many [`L2Cache::with_hot`] calls this thread is inside: the remembered tables stay put meanwhile.
    static BUSY: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as inside [`L2Cache::with_hot`] (a count: lookups may nest) while alive.
struct Busy;

impl Busy {
    #[inline(always)]
    fn enter() -> Busy {
        BUSY.with(|b| b.set(b.get() + 1));
        Busy
    }
}

impl Drop for Busy {
    #[inline(always)]
    fn drop(&mut self) {
        BUSY.with(|b| b.set(b.get() - 1));
    }
}

impl L2Cache {
    /// A cache holding at most `tables` clean tables (at least one).
    pub fn new(tables: usize) -> Self {
        let cap = NonZeroUsize::new(tables.max(1)).unwrap_or(NonZeroUsize::MIN);
        L2Cache {
            inner: Mutex::new(Inner { lru: LruCache::with_hasher(cap, Fast::default()), pinned: HashMap::default() }),
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data under the lock stays consistent even if a holder panicked: every change is one step.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current epoch; read it before looking up the L1 entry and the table.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The current generation; read it before reading a table from disk (see [`L2Cache::put`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Call after any L1 change: counts a change and invalidates every thread's remembered table.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.forget_hot();
    }

    /// Invalidates every thread's remembered table (evictions and replaced tables).
    fn forget_hot(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Runs `f`, which reads words of cached tables, so that it sees no change half made: lock-free while no
    /// change overlaps it, else under the lock that changes run under. `f` may run more than once and must
    /// tolerate (and not act on) torn values: only the result of a consistent run is returned.
    #[inline(always)]
    pub fn read<R>(&self, f: impl Fn() -> R) -> R {
        let s = self.seq.load(Ordering::Acquire);
        let r = f();
        fence(Ordering::Acquire);
        if s & 1 == 0 && self.seq.load(Ordering::Relaxed) == s {
            return r;
        }
        self.read_again(f)
    }

    #[cold]
    #[inline(never)]
    fn read_again<R>(&self, f: impl Fn() -> R) -> R {
        for _ in 0..READ_TRIES {
            std::hint::spin_loop();
            let s = self.seq.load(Ordering::Acquire);
            if s & 1 == 0 {
                let r = f();
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s {
                    return r;
                }
            }
        }
        let _g = self.lock();
        f()
    }

    /// Runs `f` on the table (and L1 entry) this thread remembered for L1 index `l1_index`, if it is still
    /// the cache's table for it; consistently, as [`L2Cache::read`] does.
    #[inline(always)]
    pub fn with_hot<R>(&self, l1_index: u64, f: impl Fn(&Table, u64) -> R) -> Option<R> {
        let epoch = self.epoch();
        // Only a pointer leaves the thread-local: a result passed out through it was copied several times
        // and cost more than the lookup itself.
        let (table, l1_entry) = HOT.with(|h| {
            let h = h.try_borrow().ok()?;
            let hot = h.iter().flatten().find(|x| x.cache == self.id)?;
            (hot.epoch == epoch && hot.l1_index == l1_index).then_some((Arc::as_ptr(&hot.table), hot.l1_entry))
        })?;
        let _busy = Busy::enter();
        // SAFETY: the slot's `Arc` keeps the table alive until this thread replaces the slot or exits. Neither
        // happens before `_busy` is dropped: `set_hot` replaces nothing while this thread is inside `with_hot`
        // (even if `f` looked up again), and a thread does not exit in the middle of a call.
        let table = unsafe { &*table };
        Some(self.read(|| f(table, l1_entry)))
    }

    /// Remembers `table`, found through L1 entry `l1_entry` at `l1_index` when the epoch was `epoch`, as this
    /// thread's last lookup.
    pub fn set_hot(&self, epoch: u64, l1_index: u64, l1_entry: u64, table: &L2Table) {
        if BUSY.with(|b| b.get()) != 0 {
            return;
        }
        HOT.with(|h| {
            if let Ok(mut h) = h.try_borrow_mut() {
                // This cache's slot, else an empty one, else the slot of the image used least recently
                // (slot 0 is the most recent: entries move down as others are set).
                let i = h
                    .iter()
                    .position(|x| x.as_ref().is_some_and(|x| x.cache == self.id))
                    .or_else(|| h.iter().position(Option::is_none))
                    .unwrap_or(HOT_SLOTS - 1);
                h[..=i].rotate_right(1);
                h[0] = Some(Hot { cache: self.id, epoch, l1_index, l1_entry, table: table.clone() });
            }
        })
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
    /// returned uncached, and remembered tables are forgotten so that no thread keeps using it.
    pub fn put(&self, off: u64, table: L2Table, generation: u64) -> L2Table {
        let mut g = self.lock();
        if let Some(t) = g.pinned.get(&off) {
            return t.clone();
        }
        if let Some(t) = g.lru.get(&off) {
            return t.clone();
        }
        if self.generation() != generation {
            self.forget_hot();
            return table;
        }
        if g.lru.push(off, table.clone()).is_some() {
            self.forget_hot();
        }
        table
    }

    /// Changes the cached table at `off` in place, under the cache lock, and pins it; returns false if the
    /// table is not cached. Readers never see the table missing while it changes, and [`L2Cache::read`]
    /// never returns what it computed from a change half made.
    pub fn modify(&self, off: u64, f: impl FnOnce(&Table)) -> bool {
        let mut g = self.lock();
        let t = match g.pinned.remove(&off) {
            Some(t) => Some(t),
            None => g.lru.pop(&off),
        };
        let Some(t) = t else { return false };
        self.seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        f(&t);
        self.seq.fetch_add(1, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        g.pinned.insert(off, t);
        true
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
        let mut evicted = false;
        for o in offs {
            if let Some(t) = g.pinned.remove(o) {
                evicted |= g.lru.push(*o, t).is_some_and(|(k, _)| k != *o);
            }
        }
        if evicted {
            self.forget_hot();
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

    /// An extended L2 entry is two words: a reader must never see one word of a change without the other,
    /// through the remembered table or a table taken from the cache.
    #[test]
    fn readers_never_see_an_entry_and_its_bitmap_torn_apart() {
        let cache = Arc::new(L2Cache::new(4));
        let off = 65536;
        let mut words = vec![0; 16];
        words[3] = !0;
        cache.put(off, Arc::new(Table::new(words)), cache.generation());
        let rounds = 200_000u64;
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
                    cache.set_hot(cache.epoch(), 0, off, &t);
                    let mut last = 0;
                    let mut seen = 0u64;
                    while last < rounds && seen < 50_000_000 {
                        let (a, b) = match cache.with_hot(0, |t, _| (t.word(2), t.word(3))) {
                            Some(p) => p,
                            None => cache.read(|| (t.word(2), t.word(3))),
                        };
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

    /// The remembered table is the cache's only while the epoch holds: an eviction ends it.
    #[test]
    fn an_eviction_forgets_the_remembered_table() {
        let cache = L2Cache::new(1);
        cache.put(65536, Arc::new(Table::new(vec![7; 8])), cache.generation());
        let t = cache.get(65536).expect("cached");
        cache.set_hot(cache.epoch(), 3, 65536, &t);
        assert_eq!(cache.with_hot(3, |t, e| (t.word(0), e)), Some((7, 65536)));
        assert_eq!(cache.with_hot(4, |t, _| t.word(0)), None, "another L1 index");
        cache.put(2 * 65536, Arc::new(Table::new(vec![9; 8])), cache.generation());
        assert!(cache.get(65536).is_none(), "evicted");
        assert_eq!(cache.with_hot(3, |t, _| t.word(0)), None, "an evicted table is not used");
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
        // A read that began before a change is not cached, and no thread may keep it.
        let epoch = cache.epoch();
        let stale = cache.put(2 * 65536, Arc::new(Table::new(vec![0; 8])), g);
        assert!(cache.get(2 * 65536).is_none());
        cache.set_hot(epoch, 1, 2 * 65536, &stale);
        assert_eq!(cache.with_hot(1, |t, _| t.word(0)), None);
    }
}
