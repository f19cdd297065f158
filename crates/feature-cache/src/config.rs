//! Configuration of the memory cache and the disk tier.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which eviction policy each shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Policy {
    /// Plain least-recently-used eviction.
    Lru,
    /// W-TinyLFU: new entries enter a small LRU window; when they leave it a
    /// frequency sketch decides whether they replace the main space's
    /// eviction candidate. The window's size adapts to the workload (hill
    /// climbing), so recency-friendly workloads still get LRU behaviour.
    #[default]
    TinyLfu,
}

/// Configuration of a [`FeatureCache`](crate::FeatureCache).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheConfig {
    /// Capacity in weight units: bytes with a byte weigher, entries with
    /// [`UnitWeigher`](crate::UnitWeigher). Default: 256 MiB.
    pub capacity: u64,
    /// Number of shards, a power of two; 0 picks one from the CPU count
    /// (four per logical CPU, at most 64). Default: 0.
    pub shards: usize,
    /// Eviction policy. Default: [`Policy::TinyLfu`].
    pub policy: Policy,
    /// Time-to-live of entries inserted without their own. Default: none.
    pub default_ttl: Option<Duration>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 256 << 20,
            shards: 0,
            policy: Policy::TinyLfu,
            default_ttl: None,
        }
    }
}

/// Configuration of a [`DiskStore`](crate::DiskStore).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskConfig {
    /// The directory holding the entry files (created if missing).
    /// Default: `feature-cache` in the working directory.
    pub dir: PathBuf,
    /// Most bytes of entry files kept; least recently used files go first.
    /// Default: 1 GiB.
    pub max_bytes: u64,
    /// Describes the shape of the stored values (model name, version,
    /// dimensions…). Its hash is written into every entry; on open, entries
    /// written under another schema are deleted. Default: empty.
    pub schema: String,
    /// fsync each file before its rename and the directory after it, so a
    /// power cut cannot leave a renamed but empty file. Default: true.
    pub fsync: bool,
    /// Wait before the first retry after a disk error. Default: 1 s.
    pub retry_initial: Duration,
    /// Longest wait between retries (the wait doubles up to it). Default: 60 s.
    pub retry_max: Duration,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("feature-cache"),
            max_bytes: 1 << 30,
            schema: String::new(),
            fsync: true,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}
