//! A concurrent, byte-bounded cache with TTL, warming, statistics and a
//! versioned disk tier.
//!
//! [`FeatureCache`] keeps feature vectors, embeddings, tokenised inputs or
//! compiled artifacts so that repeated work is not done twice:
//!
//! - **Bounded by weight**: a [`EntryWeigher`] gives each entry its bytes; the
//!   capacity can be changed at run time and is enforced at once.
//! - **Sharded**: keys hash to one of a power-of-two number of shards, each
//!   behind a `parking_lot::Mutex`: a slab of entries on one intrusive
//!   recency list per policy region, with one `hashbrown::HashTable` index
//!   keyed by the key's hash.
//! - **Admission** ([`Policy::TinyLfu`], the default): W-TinyLFU as in
//!   Caffeine (a count-min frequency sketch with aging, an LRU admission
//!   window in front of a segmented main space), plus a memory of rejected
//!   candidates, with the window's size, the tie rule and the aging period
//!   chosen by miniature simulations of a hash-sampled share of the keys.
//!   [`Policy::TinyLfuHillClimber`] sizes the window with Caffeine's hill
//!   climber instead; [`Policy::Lru`] is plain LRU.
//! - **TTL**, **tags** and predicate invalidation; **single-flight**
//!   [`FeatureCache::get_or_insert_with`]; background **warming**;
//!   eviction **listeners**; [`CacheStats`] including time saved.
//! - **Disk tier** ([`DiskStore`]): one checked file per entry, written
//!   atomically, versioned by format and schema, bounded in bytes, degrading
//!   to memory-only on I/O errors.
//!
//! ```
//! use feature_cache::{CacheConfig, EntryOptions, FeatureCache};
//!
//! let cache: FeatureCache<String, Vec<f32>> = FeatureCache::builder()
//!     .config(CacheConfig { capacity: 1 << 20, ..CacheConfig::default() })
//!     .weigher(|_k: &String, v: &Vec<f32>| (v.len() * 4) as u64)
//!     .build()?;
//! let mut runs = 0;
//! let v = cache.get_or_insert_with("hello".to_string(), || {
//!     runs += 1;
//!     Ok::<_, std::io::Error>(vec![0.5; 384])
//! })?;
//! assert_eq!(v.len(), 384);
//! // The second call is a hit: the loader does not run again.
//! let again = cache.get_or_insert_with("hello".to_string(), || {
//!     Ok::<_, std::io::Error>(vec![])
//! })?;
//! assert_eq!(again.len(), 384);
//! assert_eq!(runs, 1);
//! assert_eq!(cache.stats().weight, 384 * 4);
//!
//! cache.insert_with("tagged".into(), vec![1.0], EntryOptions::new().tag("minilm@2"))?;
//! assert_eq!(cache.invalidate_tag("minilm@2"), 1);
//! # Ok::<(), feature_cache::Error>(())
//! ```
//!
//! The crate has no feature flags.

mod cache;
mod clock;
mod codec;
mod config;
mod disk;
mod error;
mod hash;
mod policy;
mod sketch;
mod stats;
mod store;
mod tuner;
mod warm;

pub use cache::{
    DiskTier, EntryOptions, EntryWeigher, FeatureCache, FeatureCacheBuilder, UnitWeigher,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::{Codec, JsonCodec};
pub use config::{CacheConfig, DiskConfig, Policy};
pub use disk::{DiskStats, DiskStore, EntryHeader, FORMAT_VERSION};
pub use error::{Error, Result};
pub use stats::{CacheStats, EvictionCause};
pub use warm::{WarmHandle, WarmReport, WarmStop};
