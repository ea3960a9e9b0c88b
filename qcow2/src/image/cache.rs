//! The L2 table cache: a bounded LRU of decoded tables, keyed by host offset.
//!
//! Metadata is cached; guest data never is. Tables are stored decoded (native-endian u64 words; extended L2
//! tables hold two words per entry) behind an `Arc`, so a lookup holds the lock only to clone the pointer.
//! Tables changed by the writer are *pinned* (never evicted) until a metadata flush writes them; readers see
//! them at once, since the data they publish was written before the change (see `alloc.rs`).

use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// One decoded L2 table.
pub type L2Table = Arc<Vec<u64>>;

#[derive(Debug)]
struct Inner {
    lru: LruCache<u64, L2Table>,
    pinned: HashMap<u64, L2Table>,
}

/// A bounded cache of clean L2 tables plus the dirty ones waiting to be written.
#[derive(Debug)]
pub struct L2Cache {
    inner: Mutex<Inner>,
}

impl L2Cache {
    /// A cache holding at most `tables` clean tables (at least one).
    pub fn new(tables: usize) -> Self {
        let cap = NonZeroUsize::new(tables.max(1)).unwrap_or(NonZeroUsize::MIN);
        L2Cache { inner: Mutex::new(Inner { lru: LruCache::new(cap), pinned: HashMap::new() }) }
    }

    /// The table at host offset `off`, if cached.
    pub fn get(&self, off: u64) -> Option<L2Table> {
        let mut g = self.inner.lock().ok()?;
        if let Some(t) = g.pinned.get(&off) {
            return Some(t.clone());
        }
        g.lru.get(&off).cloned()
    }

    /// Caches a clean `table` read from disk at host offset `off`, unless a copy is already cached (that copy
    /// may be newer than what the disk held when this one was read).
    pub fn put(&self, off: u64, table: L2Table) {
        if let Ok(mut g) = self.inner.lock() {
            if !g.pinned.contains_key(&off) && !g.lru.contains(&off) {
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
        true
    }

    /// Takes the table at `off` out of the cache (to change it in place).
    pub fn take(&self, off: u64) -> Option<L2Table> {
        let mut g = self.inner.lock().ok()?;
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
