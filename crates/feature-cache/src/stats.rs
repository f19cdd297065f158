//! Eviction causes and statistics snapshots.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why an entry left the cache; passed to eviction listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EvictionCause {
    /// Evicted to stay within capacity (including after `set_capacity`).
    Capacity = 0,
    /// Its time-to-live ran out.
    Expired = 1,
    /// Removed by `remove`, an invalidation or `clear`.
    Explicit = 2,
    /// Overwritten by an insert of the same key.
    Replaced = 3,
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheStats {
    /// Lookups that found a live entry.
    pub hits: u64,
    /// Lookups that found nothing (or only an expired entry).
    pub misses: u64,
    /// Entries inserted (including replacements).
    pub inserts: u64,
    /// Entries evicted to stay within capacity.
    pub evicted_capacity: u64,
    /// Entries dropped because their TTL ran out.
    pub evicted_expired: u64,
    /// Entries removed explicitly (remove, invalidation, clear).
    pub removed_explicit: u64,
    /// Entries overwritten by a newer insert of the same key.
    pub replaced: u64,
    /// Live entries now.
    pub entries: u64,
    /// Total weight (bytes, with a byte weigher) held now.
    pub weight: u64,
    /// The capacity in weight units.
    pub capacity: u64,
    /// Loader runs by `get_or_insert_with` (after memory and disk missed).
    pub loads: u64,
    /// Loader runs that failed.
    pub load_failures: u64,
    /// Values served from the disk tier instead of running the loader.
    pub disk_hits: u64,
    /// Sum of the recorded load times of every hit: work not done twice.
    /// Serialized as whole milliseconds (a number).
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub time_saved: Duration,
}

impl CacheStats {
    /// Hits over lookups (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}
