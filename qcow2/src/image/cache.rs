//! The L2 table cache: a bounded LRU of decoded tables, keyed by host offset.
//!
//! Metadata is cached; guest data never is. Tables are stored decoded (native-endian u64 words; extended L2
//! tables hold two words per entry) behind an `Arc`, so a lookup holds the lock only to clone the pointer.
//! Tables changed by the writer are *pinned* (never evicted) until a metadata flush writes them; readers see
//! them at once, since the data they publish was written before the change (see `alloc.rs`).

use lru::LruCache;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One decoded L2 table.
pub type L2Table = Arc<Vec<u64>>;

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
/// Each thread also remembers the table of its last lookup (`HOT`), valid while the cache's generation is
/// unchanged: every change to a cached table and every L1 change bumps the generation (after the change is
/// visible), so a remembered table is never stale. A lookup that hits it takes no lock and no reference.
#[derive(Debug)]
pub struct L2Cache {
    inner: Mutex<Inner>,
    id: u64,
    generation: AtomicU64,
}

static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

/// A table remembered weakly: it neither keeps a dropped image's tables alive nor makes the writer copy a
/// table it changes (`Arc::make_mut` moves the data out when only weak references remain).
struct Hot {
    cache: u64,
    generation: u64,
    l1_index: u64,
    table: std::sync::Weak<Vec<u64>>,
}

/// Remembered tables per thread: one per image of a short backing chain.
const HOT_SLOTS: usize = 4;

thread_local! {
    static HOT: std::cell::RefCell<[Option<Hot>; HOT_SLOTS]> = const { std::cell::RefCell::new([None, None, None, None]) };
}

impl L2Cache {
    /// A cache holding at most `tables` clean tables (at least one).
    pub fn new(tables: usize) -> Self {
        let cap = NonZeroUsize::new(tables.max(1)).unwrap_or(NonZeroUsize::MIN);
        L2Cache {
            inner: Mutex::new(Inner { lru: LruCache::with_hasher(cap, Fast::default()), pinned: HashMap::default() }),
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
        }
    }

    /// The current generation; read it before looking up the L1 entry and the table.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Invalidates every thread's remembered table: call after any L1 change (table changes call it here).
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Runs `f` on the table this thread remembered for L1 index `l1_index`, if it is still current.
    #[inline]
    pub fn with_hot<R>(&self, generation: u64, l1_index: u64, f: impl FnOnce(&[u64]) -> R) -> Option<R> {
        HOT.with(|h| {
            let h = h.try_borrow().ok()?;
            let hot = h.iter().flatten().find(|x| x.cache == self.id)?;
            if hot.generation != generation || hot.l1_index != l1_index {
                return None;
            }
            let t = hot.table.upgrade()?;
            Some(f(&t))
        })
    }

    /// Remembers `table` as this thread's last lookup, made when the generation was `generation`.
    pub fn set_hot(&self, generation: u64, l1_index: u64, table: &L2Table) {
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
                h[0] = Some(Hot { cache: self.id, generation, l1_index, table: Arc::downgrade(table) });
            }
        })
    }

    /// The table at host offset `off`, if cached.
    pub fn get(&self, off: u64) -> Option<L2Table> {
        let mut g = self.inner.lock().ok()?;
        if !g.pinned.is_empty() {
            if let Some(t) = g.pinned.get(&off) {
                return Some(t.clone());
            }
        }
        g.lru.get(&off).cloned()
    }

    /// Caches a clean `table` read from disk at host offset `off` when the generation was `generation` before
    /// the read, unless a copy is already cached (that copy may be newer than what the disk held when this one
    /// was read) or anything changed meanwhile (a table changed, written and evicted during the read would
    /// otherwise come back old).
    pub fn put(&self, off: u64, table: L2Table, generation: u64) {
        if let Ok(mut g) = self.inner.lock() {
            if self.generation() == generation && !g.pinned.contains_key(&off) && !g.lru.contains(&off) {
                g.lru.put(off, table);
            }
        }
    }

    /// Changes the cached table at `off` in place, under the cache lock, and pins it; returns false if the
    /// table is not cached. Readers never see the table missing while it changes.
    pub fn modify(&self, off: u64, f: impl FnOnce(&mut Vec<u64>)) -> bool {
        let Ok(mut g) = self.inner.lock() else { return false };
        let t = match g.pinned.remove(&off) {
            Some(t) => Some(t),
            None => g.lru.pop(&off),
        };
        let Some(mut t) = t else { return false };
        f(Arc::make_mut(&mut t));
        g.pinned.insert(off, t);
        self.changed();
        true
    }

    /// Takes the table at `off` out of the cache (to change it in place).
    pub fn take(&self, off: u64) -> Option<L2Table> {
        let mut g = self.inner.lock().ok()?;
        self.changed();
        if let Some(t) = g.pinned.remove(&off) {
            return Some(t);
        }
        g.lru.pop(&off)
    }

    /// Stores a changed table, pinned until [`L2Cache::mark_clean`].
    pub fn pin(&self, off: u64, table: L2Table) {
        if let Ok(mut g) = self.inner.lock() {
            g.lru.pop(&off);
            g.pinned.insert(off, table);
            self.changed();
        }
    }

    /// Number of pinned (dirty) tables.
    pub fn pinned(&self) -> usize {
        self.inner.lock().map(|g| g.pinned.len()).unwrap_or(0)
    }

    /// The dirty tables, to be written; they stay pinned until [`L2Cache::mark_clean`].
    pub fn dirty(&self) -> Vec<(u64, L2Table)> {
        self.inner.lock().map(|g| g.pinned.iter().map(|(k, v)| (*k, v.clone())).collect()).unwrap_or_default()
    }

    /// Moves the tables at `offs` from the pinned set to the clean LRU.
    pub fn mark_clean(&self, offs: &[u64]) {
        if let Ok(mut g) = self.inner.lock() {
            for o in offs {
                if let Some(t) = g.pinned.remove(o) {
                    g.lru.put(*o, t);
                }
            }
        }
    }

    /// Number of clean tables the cache may hold.
    pub fn capacity(&self) -> usize {
        self.inner.lock().map(|g| g.lru.cap().get()).unwrap_or(0)
    }
}
