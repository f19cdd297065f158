//! Configuration of the memory cache and the disk tier.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which eviction policy each shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Policy {
    /// Plain least-recently-used eviction.
    Lru,
    /// W-TinyLFU tuned by miniature simulations: new entries enter an LRU
    /// window; when they leave it a frequency sketch decides whether they
    /// replace the main space's eviction candidate, and a candidate that
    /// lost and is requested again soon after (its hash is remembered, up to
    /// half the entry count) enters the main space directly. One key in up
    /// to sixteen (chosen by hash) is also replayed through thirteen small
    /// caches, one per setting of the window's size, the tie rule and the
    /// main space's (the sketch's aging, the protected segment's share) plus
    /// one close to plain LRU, and the real cache follows the settings that hit
    /// most, so workloads that favour recency get a large window and ones
    /// that favour frequency a small one. This bookkeeping lies outside the
    /// weight bound (measured: about 1.3 MiB of RSS at 10,000 entries, 13 MiB
    /// at 100,000, 32 MiB at 400,000), and a sampled request costs a few
    /// microseconds more. A cache of fewer than 256 entries is not sampled
    /// and runs the hill climber instead.
    #[default]
    TinyLfu,
    /// W-TinyLFU as in Caffeine, whose window the hill climber sizes
    /// (sampling the hit rate once per sketch period): no miniatures and no
    /// memory of rejected candidates, so less memory and work per request,
    /// but slower and less sure to find the right window.
    TinyLfuHillClimber,
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
    /// Serialized as whole milliseconds (a number).
    #[serde(with = "serde_with::As::<Option<serde_with::DurationMilliSeconds<f64>>>")]
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
    /// Serialized as whole milliseconds (a number), as is `retry_max`.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub retry_initial: Duration,
    /// Longest wait between retries (the wait doubles up to it). Default: 60 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_serialize_as_milliseconds() {
        let disk = serde_json::to_value(DiskConfig::default()).unwrap();
        assert_eq!(disk["retry_initial"], serde_json::json!(1000.0));
        assert_eq!(disk["retry_max"], serde_json::json!(60000.0));
        let cache = CacheConfig {
            default_ttl: Some(Duration::from_millis(1500)),
            ..CacheConfig::default()
        };
        let json = serde_json::to_value(&cache).unwrap();
        assert_eq!(json["default_ttl"], serde_json::json!(1500.0));
        assert_eq!(serde_json::from_value::<CacheConfig>(json).unwrap(), cache);
        let stats = crate::CacheStats {
            time_saved: Duration::from_millis(250),
            ..crate::CacheStats::default()
        };
        assert_eq!(
            serde_json::to_value(&stats).unwrap()["time_saved"],
            serde_json::json!(250.0)
        );
    }
}
