//! The L2 table cache: a bounded LRU of decoded tables, keyed by host offset.
//!
//! Metadata is cached; guest data never is. Tables are stored decoded (native-endian u64 words; extended L2
//! tables hold two words per entry) behind an `Arc`, so a lookup holds the lock only to clone the pointer.

use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// One decoded L2 table.
pub type L2Table = Arc<[u64]>;

/// A bounded cache of L2 tables.
#[derive(Debug)]
pub struct L2Cache {
    lru: Mutex<LruCache<u64, L2Table>>,
}

impl L2Cache {
    /// A cache holding at most `tables` tables (at least one).
    pub fn new(tables: usize) -> Self {
        let cap = NonZeroUsize::new(tables.max(1)).unwrap_or(NonZeroUsize::MIN);
        L2Cache {
            lru: Mutex::new(LruCache::new(cap)),
        }
    }

    /// The table at host offset `off`, if cached.
    pub fn get(&self, off: u64) -> Option<L2Table> {
        self.lru.lock().ok()?.get(&off).cloned()
    }

    /// Caches `table` at host offset `off`.
    pub fn put(&self, off: u64, table: L2Table) {
        if let Ok(mut l) = self.lru.lock() {
            l.put(off, table);
        }
    }

    /// Drops the table at `off`.
    pub fn remove(&self, off: u64) {
        if let Ok(mut l) = self.lru.lock() {
            l.pop(&off);
        }
    }

    /// Number of tables the cache may hold.
    pub fn capacity(&self) -> usize {
        self.lru.lock().map(|l| l.cap().get()).unwrap_or(0)
    }
}
