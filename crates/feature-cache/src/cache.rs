//! The sharded in-memory cache and its handle.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::codec::Codec;
use crate::disk::DiskStore;
use crate::hash::hash_key;
use crate::policy::{Entry, Removed, Shard, Tuning};
use crate::stats::{CacheStats, EvictionCause};
use crate::tuner::Tuner;
use crate::{CacheConfig, Clock, Error, Policy, SystemClock};

/// Gives each entry its weight (bytes, usually) for the capacity bound.
pub trait EntryWeigher<K, V>: Send + Sync {
    /// The weight of `value` stored under `key`.
    fn weigh(&self, key: &K, value: &V) -> u64;

    /// The weight of every entry, when it is the same for all. The cache
    /// then knows how many entries its capacity holds from the start (and
    /// sizes its tuning up front); otherwise it projects that count from
    /// the entries' mean weight once it is half full.
    fn fixed_weight(&self) -> Option<u64> {
        None
    }
}

impl<K, V, F> EntryWeigher<K, V> for F
where
    F: Fn(&K, &V) -> u64 + Send + Sync,
{
    fn weigh(&self, key: &K, value: &V) -> u64 {
        self(key, value)
    }
}

/// Every entry weighs 1: the capacity counts entries.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitWeigher;

impl<K, V> EntryWeigher<K, V> for UnitWeigher {
    fn weigh(&self, _: &K, _: &V) -> u64 {
        1
    }

    fn fixed_weight(&self) -> Option<u64> {
        Some(1)
    }
}

/// Per-entry options for [`FeatureCache::insert_with`] and
/// [`FeatureCache::get_or_insert_with_options`].
#[derive(Debug, Clone, Default)]
pub struct EntryOptions {
    ttl: Option<Duration>,
    tags: Vec<String>,
    load_time: Duration,
}

impl EntryOptions {
    /// Default options: the cache's default TTL, no tags.
    pub fn new() -> Self {
        Self::default()
    }

    /// This entry's time-to-live, overriding the cache's default.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Adds a tag (for example `"minilm@2"`) for [`FeatureCache::invalidate_tag`].
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// How long the value took to compute; each hit adds it to
    /// [`CacheStats::time_saved`]. `get_or_insert_with` records it itself.
    pub fn load_time(mut self, took: Duration) -> Self {
        self.load_time = took;
        self
    }
}

/// A tier consulted between memory and the loader.
trait SecondTier<K, V>: Send + Sync {
    fn load(&self, key: &K) -> Option<(V, Duration)>;
    fn store(&self, key: &K, value: &V, took: Duration);
    fn remove(&self, key: &K);
}

/// Binds a [`DiskStore`] and a [`Codec`] as the cache's second tier; keys are
/// stored by their `Display` text.
#[derive(Debug)]
pub struct DiskTier<C> {
    store: Arc<DiskStore>,
    codec: C,
}

impl<C> DiskTier<C> {
    /// The tier over `store`, encoding values with `codec`.
    pub fn new(store: Arc<DiskStore>, codec: C) -> Self {
        Self { store, codec }
    }
}

impl<K: fmt::Display, V, C: Codec<V>> SecondTier<K, V> for DiskTier<C> {
    fn load(&self, key: &K) -> Option<(V, Duration)> {
        let key = key.to_string();
        let (h, payload) = self.store.get(&key)?;
        match self.codec.decode(&payload) {
            Ok(v) => Some((v, Duration::from_nanos(h.build_nanos))),
            Err(e) => {
                tracing::warn!(%key, error = %e, "disk entry does not decode; removed and rebuilt");
                self.store.remove(&key);
                None
            }
        }
    }

    fn store(&self, key: &K, value: &V, took: Duration) {
        let key = key.to_string();
        match self.codec.encode(value) {
            Ok(bytes) => {
                if let Err(e) = self.store.put(&key, &bytes, took) {
                    tracing::debug!(%key, error = %e, "disk write skipped");
                }
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "value does not encode; kept in memory only")
            }
        }
    }

    fn remove(&self, key: &K) {
        self.store.remove(&key.to_string());
    }
}

/// In-progress loads of one shard, by key.
type Flights<K, V> = HashMap<K, Arc<Flight<V>>>;

type Listener<K, V> = Arc<dyn Fn(&K, &V, EvictionCause) + Send + Sync>;

/// One in-progress load shared by concurrent callers.
struct Flight<V> {
    result: Mutex<Option<Result<V, Error>>>,
    done: Condvar,
}

pub(crate) struct Inner<K: Hash + Eq, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    flights: Box<[Mutex<Flights<K, V>>]>,
    shard_bits: u32,
    weigher: Box<dyn EntryWeigher<K, V>>,
    clock: Arc<dyn Clock>,
    default_ttl: Option<Duration>,
    capacity: AtomicU64,
    policy: Policy,
    listeners: RwLock<Vec<Listener<K, V>>>,
    has_listeners: AtomicBool,
    second: Option<Box<dyn SecondTier<K, V>>>,
    loads: AtomicU64,
    load_failures: AtomicU64,
    disk_hits: AtomicU64,
    /// The miniature simulations (with [`Policy::TinyLfu`], once started).
    tuner: Mutex<Option<Tuner>>,
    /// The tuner's sampling threshold; 0 while no tuner runs.
    tuner_threshold: AtomicU64,
    /// Set once a tuner was started (or found impossible) for this capacity.
    tuner_started: AtomicBool,
    /// The latest tuning, and how many have been published.
    tuning: RwLock<Tuning>,
    tuning_generation: AtomicU64,
    /// Rejected candidates that came back soon, over all shards.
    short_returns: AtomicU64,
}

/// A concurrent, weight-bounded cache with TTL, tags, single-flight loading,
/// warming, statistics and an optional disk tier. Cloning gives another
/// handle to the same cache.
pub struct FeatureCache<K: Hash + Eq, V> {
    pub(crate) inner: Arc<Inner<K, V>>,
}

impl<K: Hash + Eq, V> Clone for FeatureCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Hash + Eq, V> fmt::Debug for FeatureCache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeatureCache")
            .field("shards", &self.inner.shards.len())
            .field("capacity", &self.inner.capacity.load(Ordering::Relaxed))
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// Builds a [`FeatureCache`].
pub struct FeatureCacheBuilder<K: Hash + Eq, V> {
    config: CacheConfig,
    weigher: Box<dyn EntryWeigher<K, V>>,
    clock: Arc<dyn Clock>,
    second: Option<Box<dyn SecondTier<K, V>>>,
}

impl<K: Hash + Eq, V> fmt::Debug for FeatureCacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeatureCacheBuilder")
            .field("config", &self.config)
            .field("disk", &self.second.is_some())
            .finish_non_exhaustive()
    }
}

impl<K, V> FeatureCacheBuilder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Uses `config` (capacity, shards, policy, default TTL).
    pub fn config(mut self, config: CacheConfig) -> Self {
        self.config = config;
        self
    }

    /// Capacity in weight units.
    pub fn capacity(mut self, capacity: u64) -> Self {
        self.config.capacity = capacity;
        self
    }

    /// Number of shards (a power of two; 0 for automatic).
    pub fn shards(mut self, shards: usize) -> Self {
        self.config.shards = shards;
        self
    }

    /// Eviction policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config.policy = policy;
        self
    }

    /// Default time-to-live.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.config.default_ttl = Some(ttl);
        self
    }

    /// Weighs entries (default: [`UnitWeigher`], capacity counts entries).
    pub fn weigher(mut self, weigher: impl EntryWeigher<K, V> + 'static) -> Self {
        self.weigher = Box::new(weigher);
        self
    }

    /// The clock TTLs are measured with (default: [`SystemClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Consults `store` between memory and the loader in
    /// [`FeatureCache::get_or_insert_with`], encoding values with `codec`.
    pub fn disk<C: Codec<V> + 'static>(mut self, store: Arc<DiskStore>, codec: C) -> Self
    where
        K: fmt::Display,
    {
        self.second = Some(Box::new(DiskTier::new(store, codec)));
        self
    }

    /// Builds the cache, checking the configuration.
    pub fn build(self) -> Result<FeatureCache<K, V>, Error> {
        let c = &self.config;
        let shards = if c.shards == 0 {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cpus * 4).next_power_of_two().min(64)
        } else if c.shards.is_power_of_two() && c.shards <= 1 << 16 {
            c.shards
        } else {
            return Err(Error::invalid(
                "shards",
                c.shards,
                "a power of two up to 65536, or 0 for automatic",
            ));
        };
        let admission = c.policy != Policy::Lru;
        // With a fixed entry weight the miniatures start now; a cache too
        // small for them runs the hill climber instead.
        let tuner = match (c.policy, self.weigher.fixed_weight()) {
            (Policy::TinyLfu, Some(w)) => Some(Tuner::new(c.capacity, c.capacity / w.max(1))),
            _ => None,
        };
        let climb = c.policy == Policy::TinyLfuHillClimber || matches!(tuner, Some(None));
        let ghost = c.policy == Policy::TinyLfu;
        // The sketch is sized for the entries a shard will hold: known up
        // front with a fixed weight, otherwise grown as the shard fills.
        let fixed = self.weigher.fixed_weight();
        let shard_vec: Vec<_> = (0..shards)
            .map(|i| {
                let cap = shard_capacity(c.capacity, shards, i);
                let entries = fixed.map_or(cap.min(4096), |w| (cap / w.max(1)).min(1 << 20));
                Mutex::new(Shard::new(cap, admission, climb, ghost, entries as usize))
            })
            .collect();
        let tuner_started = tuner.is_some();
        let tuner = tuner.flatten();
        let threshold = tuner.as_ref().map_or(0, Tuner::threshold);
        Ok(FeatureCache {
            inner: Arc::new(Inner {
                shards: shard_vec.into_boxed_slice(),
                flights: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
                shard_bits: shards.trailing_zeros(),
                weigher: self.weigher,
                clock: self.clock,
                default_ttl: c.default_ttl,
                capacity: AtomicU64::new(c.capacity),
                policy: c.policy,
                listeners: RwLock::new(Vec::new()),
                has_listeners: AtomicBool::new(false),
                second: self.second,
                loads: AtomicU64::new(0),
                load_failures: AtomicU64::new(0),
                disk_hits: AtomicU64::new(0),
                tuner: Mutex::new(tuner),
                tuner_threshold: AtomicU64::new(threshold),
                tuner_started: AtomicBool::new(tuner_started),
                tuning: RwLock::new(Tuning::default()),
                tuning_generation: AtomicU64::new(0),
                short_returns: AtomicU64::new(0),
            }),
        })
    }
}

fn shard_capacity(total: u64, shards: usize, i: usize) -> u64 {
    let n = shards as u64;
    total / n + u64::from((i as u64) < total % n)
}

/// Removes a flight and wakes its waiters with an error if its leader never
/// published a result (a panicking loader).
struct FlightGuard<'a, K: Hash + Eq, V> {
    inner: &'a Inner<K, V>,
    key: Option<K>,
    flight: Arc<Flight<V>>,
    shard: usize,
}

impl<K: Hash + Eq, V> FlightGuard<'_, K, V> {
    fn finish(&mut self, result: Result<V, Error>) {
        *self.flight.result.lock() = Some(result);
        if let Some(k) = self.key.take() {
            self.inner.flights[self.shard].lock().remove(&k);
        }
        self.flight.done.notify_all();
    }
}

impl<K: Hash + Eq, V> Drop for FlightGuard<'_, K, V> {
    fn drop(&mut self) {
        if self.key.is_some() {
            self.finish(Err(Error::LoaderPanicked));
        }
    }
}

impl<K, V> FeatureCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A builder with [`CacheConfig::default`] and a [`UnitWeigher`].
    pub fn builder() -> FeatureCacheBuilder<K, V> {
        FeatureCacheBuilder {
            config: CacheConfig::default(),
            weigher: Box::new(UnitWeigher),
            clock: Arc::new(SystemClock),
            second: None,
        }
    }

    #[inline]
    fn shard_of(&self, hash: u64) -> usize {
        if self.inner.shard_bits == 0 {
            0
        } else {
            (hash >> (64 - self.inner.shard_bits)) as usize
        }
    }

    fn notify(&self, removed: Removed<K, V>) {
        if removed.is_empty() {
            return;
        }
        let explicit_keys: Vec<&K> = removed
            .iter()
            .filter(|(_, _, c)| *c == EvictionCause::Explicit)
            .map(|(k, _, _)| k)
            .collect();
        if let Some(second) = &self.inner.second {
            for k in explicit_keys {
                second.remove(k);
            }
        }
        if !self.inner.has_listeners.load(Ordering::Acquire) {
            return;
        }
        let listeners = self.inner.listeners.read().clone();
        for (k, e, cause) in &removed {
            for l in &listeners {
                l(k, &e.value, *cause);
            }
        }
    }

    /// The value under `key` if present and not expired (a clone: store
    /// `Arc`s for large values).
    pub fn get(&self, key: &K) -> Option<V> {
        let hash = hash_key(key);
        let mut removed = Vec::new();
        let v = self.inner.shards[self.shard_of(hash)].lock().get(
            key,
            hash,
            &*self.inner.clock,
            &mut removed,
        );
        self.notify(removed);
        let (v, weight) = v?;
        self.replay(hash, weight);
        Some(v)
    }

    /// Feeds one request (a hit, or a miss and its insert) to the miniature
    /// simulations when its key is in their sample, and publishes the
    /// tuning they choose at the end of a period.
    #[inline]
    fn replay(&self, hash: u64, weight: u64) {
        let threshold = self.inner.tuner_threshold.load(Ordering::Relaxed);
        if threshold == 0 || !Tuner::sampled(hash, threshold) {
            return;
        }
        // A request that finds the simulations busy with another thread's
        // is not replayed: callers never wait on the tuner (one thread, or
        // a trace replay, never finds it busy, so it sees every request).
        let Some(mut tuner) = self.inner.tuner.try_lock() else {
            return;
        };
        let Some(tuner) = tuner.as_mut() else { return };
        let short = self.inner.short_returns.load(Ordering::Relaxed);
        if let Some(tuning) = tuner.record(hash, weight, short, &*self.inner.clock) {
            *self.inner.tuning.write() = tuning;
            self.inner.tuning_generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Starts the miniature simulations of a cache whose entry weight
    /// varies, once a shard is half full: the entry count the capacity
    /// holds is projected from that shard's mean weight. A cache too small
    /// to sample runs the hill climber instead.
    fn start_tuner(&self, entries: u64) {
        if self
            .inner
            .tuner_started
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let capacity = self.capacity();
        match Tuner::new(capacity, entries) {
            Some(tuner) => {
                let threshold = tuner.threshold();
                *self.inner.tuner.lock() = Some(tuner);
                self.inner
                    .tuner_threshold
                    .store(threshold, Ordering::Relaxed);
                tracing::debug!(capacity, entries, "feature-cache tuning started");
            }
            None => {
                for shard in self.inner.shards.iter() {
                    shard.lock().set_climbing(true);
                }
            }
        }
    }

    /// Whether a live entry is stored under `key` (does not count as an access).
    pub fn contains(&self, key: &K) -> bool {
        let hash = hash_key(key);
        self.inner.shards[self.shard_of(hash)]
            .lock()
            .peek(key, hash, &*self.inner.clock)
            .is_some()
    }

    /// Stores `value` under `key` with the default options.
    pub fn insert(&self, key: K, value: V) -> Result<(), Error> {
        self.insert_with(key, value, EntryOptions::default())
    }

    /// Stores `value` under `key` with a TTL, tags and a recorded load time.
    pub fn insert_with(&self, key: K, value: V, options: EntryOptions) -> Result<(), Error> {
        let weight = self.inner.weigher.weigh(&key, &value);
        let hash = hash_key(&key);
        let expires_at = options
            .ttl
            .or(self.inner.default_ttl)
            .map(|ttl| self.inner.clock.now() + ttl);
        let entry = Entry {
            value,
            weight,
            expires_at,
            tags: options.tags,
            load_time: options.load_time,
        };
        let mut removed = Vec::new();
        let mut projected = None;
        let new = {
            let mut shard = self.inner.shards[self.shard_of(hash)].lock();
            if weight > shard.capacity() {
                return Err(Error::TooHeavy {
                    weight,
                    limit: shard.capacity(),
                });
            }
            let generation = self.inner.tuning_generation.load(Ordering::Acquire);
            if shard.tuning_generation != generation {
                shard.tuning_generation = generation;
                shard.tune(*self.inner.tuning.read());
            }
            let before = shard.short_returns;
            let new = shard.insert(key, hash, entry, &mut removed);
            if shard.short_returns != before {
                self.inner.short_returns.fetch_add(1, Ordering::Relaxed);
            }
            if self.inner.policy == Policy::TinyLfu
                && !self.inner.tuner_started.load(Ordering::Relaxed)
                && shard.weight().saturating_mul(2) >= shard.capacity()
            {
                let shards = self.inner.shards.len() as u64;
                projected = Some(shard.projected_entries().saturating_mul(shards));
            }
            new
        };
        self.notify(removed);
        if let Some(entries) = projected {
            self.start_tuner(entries);
        }
        if new {
            self.replay(hash, weight);
        }
        Ok(())
    }

    /// Inserts only if the entry fits without evicting anything (used by warming).
    pub(crate) fn insert_if_room(&self, key: K, value: V, took: Duration) -> bool {
        let weight = self.inner.weigher.weigh(&key, &value);
        let hash = hash_key(&key);
        let expires_at = self
            .inner
            .default_ttl
            .map(|ttl| self.inner.clock.now() + ttl);
        let mut removed = Vec::new();
        let mut shard = self.inner.shards[self.shard_of(hash)].lock();
        if shard.weight() + weight > shard.capacity()
            || shard.peek(&key, hash, &*self.inner.clock).is_some()
        {
            return false;
        }
        let entry = Entry {
            value,
            weight,
            expires_at,
            tags: Vec::new(),
            load_time: took,
        };
        shard.insert(key, hash, entry, &mut removed);
        drop(shard);
        self.notify(removed);
        true
    }

    /// Removes `key` (from the disk tier too); returns the value if it was live.
    pub fn remove(&self, key: &K) -> Option<V> {
        let hash = hash_key(key);
        let taken = self.inner.shards[self.shard_of(hash)]
            .lock()
            .remove(key, hash);
        if let Some(second) = &self.inner.second {
            second.remove(key);
        }
        let (k, e) = taken?;
        let mut now = None;
        let live = !e.is_expired(&mut now, &*self.inner.clock);
        let value = e.value.clone();
        if self.inner.has_listeners.load(Ordering::Acquire) {
            for l in self.inner.listeners.read().iter() {
                l(&k, &e.value, EvictionCause::Explicit);
            }
        }
        live.then_some(value)
    }

    /// Removes every entry for which `pred(key, value)` holds; returns how many.
    pub fn invalidate_where(&self, mut pred: impl FnMut(&K, &V) -> bool) -> usize {
        self.remove_matching(|k, e| pred(k, &e.value), EvictionCause::Explicit)
    }

    /// Removes every entry carrying `tag`; returns how many.
    pub fn invalidate_tag(&self, tag: &str) -> usize {
        self.remove_matching(
            |_, e| e.tags.iter().any(|t| t == tag),
            EvictionCause::Explicit,
        )
    }

    /// Removes every expired entry now; returns how many.
    pub fn purge_expired(&self) -> usize {
        let now = self.inner.clock.now();
        self.remove_matching(
            |_, e| e.expires_at.is_some_and(|at| now >= at),
            EvictionCause::Expired,
        )
    }

    /// Removes every entry (from the disk tier too).
    pub fn clear(&self) {
        self.remove_matching(|_, _| true, EvictionCause::Explicit);
    }

    fn remove_matching(
        &self,
        mut pred: impl FnMut(&K, &Entry<V>) -> bool,
        cause: EvictionCause,
    ) -> usize {
        let mut total = 0;
        for shard in self.inner.shards.iter() {
            let mut removed = Vec::new();
            shard.lock().remove_where(&mut pred, cause, &mut removed);
            total += removed.len();
            self.notify(removed);
        }
        total
    }

    /// Changes the capacity and evicts down to it at once (for example to a
    /// quarter in a memory emergency).
    pub fn set_capacity(&self, capacity: u64) {
        self.inner.capacity.store(capacity, Ordering::Relaxed);
        // The miniatures are sized for the capacity: start them afresh.
        let mut climb = self.inner.policy == Policy::TinyLfuHillClimber;
        if self.inner.policy == Policy::TinyLfu {
            let mut tuner = self.inner.tuner.lock();
            *tuner = match self.inner.weigher.fixed_weight() {
                Some(w) => {
                    let t = Tuner::new(capacity, capacity / w.max(1));
                    climb = t.is_none();
                    self.inner.tuner_started.store(true, Ordering::Release);
                    t
                }
                None => {
                    self.inner.tuner_started.store(false, Ordering::Release);
                    None
                }
            };
            let threshold = tuner.as_ref().map_or(0, Tuner::threshold);
            self.inner
                .tuner_threshold
                .store(threshold, Ordering::Relaxed);
            *self.inner.tuning.write() = Tuning::default();
            self.inner.tuning_generation.fetch_add(1, Ordering::Release);
        }
        let n = self.inner.shards.len();
        for (i, shard) in self.inner.shards.iter().enumerate() {
            let mut removed = Vec::new();
            let mut shard = shard.lock();
            shard.set_climbing(climb);
            shard.set_capacity(shard_capacity(capacity, n, i), &mut removed);
            drop(shard);
            self.notify(removed);
        }
    }

    /// The capacity in weight units.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity.load(Ordering::Relaxed)
    }

    /// Registers a callback run for every entry that leaves the cache, with
    /// the cause. It runs on the thread that caused the removal, after the
    /// shard's lock is released.
    pub fn on_evict(&self, listener: impl Fn(&K, &V, EvictionCause) + Send + Sync + 'static) {
        self.inner.listeners.write().push(Arc::new(listener));
        self.inner.has_listeners.store(true, Ordering::Release);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let mut s = CacheStats {
            capacity: self.capacity(),
            loads: self.inner.loads.load(Ordering::Relaxed),
            load_failures: self.inner.load_failures.load(Ordering::Relaxed),
            disk_hits: self.inner.disk_hits.load(Ordering::Relaxed),
            ..CacheStats::default()
        };
        for shard in self.inner.shards.iter() {
            let sh = shard.lock();
            let c = &sh.counters;
            s.hits += c.hits;
            s.misses += c.misses;
            s.inserts += c.inserts;
            s.evicted_capacity += c.evictions[EvictionCause::Capacity as usize];
            s.evicted_expired += c.evictions[EvictionCause::Expired as usize];
            s.removed_explicit += c.evictions[EvictionCause::Explicit as usize];
            s.replaced += c.evictions[EvictionCause::Replaced as usize];
            s.time_saved += c.time_saved;
            s.entries += sh.len() as u64;
            s.weight += sh.weight();
        }
        s
    }

    /// The admission windows' current total target size (W-TinyLFU only;
    /// shows where the tuning or the hill climber has moved it).
    pub fn window_capacity(&self) -> u64 {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().window_max())
            .sum()
    }

    /// The value under `key`, or the one `loader` produces, stored with the
    /// default options. See [`get_or_insert_with_options`](Self::get_or_insert_with_options).
    pub fn get_or_insert_with<F, E>(&self, key: K, loader: F) -> Result<V, Error>
    where
        F: FnOnce() -> Result<V, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.get_or_insert_with_options(key, EntryOptions::default(), loader)
    }

    /// The value under `key`: from memory, else from the disk tier, else from
    /// `loader` (then stored in both). Concurrent callers for the same missing
    /// key run the loader once and all get its result, or its error, which is
    /// not cached.
    pub fn get_or_insert_with_options<F, E>(
        &self,
        key: K,
        options: EntryOptions,
        loader: F,
    ) -> Result<V, Error>
    where
        F: FnOnce() -> Result<V, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let hash = hash_key(&key);
        let si = self.shard_of(hash);
        let (flight, leader) = {
            let mut flights = self.inner.flights[si].lock();
            match flights.get(&key) {
                Some(f) => (Arc::clone(f), false),
                None => {
                    let f = Arc::new(Flight {
                        result: Mutex::new(None),
                        done: Condvar::new(),
                    });
                    flights.insert(key.clone(), Arc::clone(&f));
                    (f, true)
                }
            }
        };
        if !leader {
            let mut slot = flight.result.lock();
            while slot.is_none() {
                flight.done.wait(&mut slot);
            }
            return slot.clone().unwrap_or(Err(Error::LoaderPanicked));
        }
        let mut guard = FlightGuard {
            inner: &self.inner,
            key: Some(key.clone()),
            flight,
            shard: si,
        };
        // Another leader may have finished between our miss and our flight.
        if let Some(v) = self.inner.shards[si]
            .lock()
            .peek(&key, hash, &*self.inner.clock)
        {
            let v = v.value.clone();
            guard.finish(Ok(v.clone()));
            return Ok(v);
        }
        if let Some(second) = &self.inner.second {
            if let Some((v, took)) = second.load(&key) {
                self.inner.disk_hits.fetch_add(1, Ordering::Relaxed);
                let opts = EntryOptions {
                    load_time: took,
                    ..options
                };
                if let Err(e) = self.insert_with(key, v.clone(), opts) {
                    tracing::debug!(error = %e, "disk value not kept in memory");
                }
                guard.finish(Ok(v.clone()));
                return Ok(v);
            }
        }
        self.inner.loads.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let result = loader();
        let took = start.elapsed();
        match result {
            Ok(v) => {
                if let Some(second) = &self.inner.second {
                    second.store(&key, &v, took);
                }
                let opts = EntryOptions {
                    load_time: took,
                    ..options
                };
                if let Err(e) = self.insert_with(key, v.clone(), opts) {
                    tracing::debug!(error = %e, "loaded value not kept in memory");
                }
                guard.finish(Ok(v.clone()));
                Ok(v)
            }
            Err(e) => {
                self.inner.load_failures.fetch_add(1, Ordering::Relaxed);
                let err = Error::Loader(Arc::from(e.into()));
                guard.finish(Err(err.clone()));
                Err(err)
            }
        }
    }

    /// Whether a `get_or_insert_with` load of `key` is in progress.
    pub(crate) fn is_loading(&self, key: &K) -> bool {
        let si = self.shard_of(hash_key(key));
        self.inner.flights[si].lock().contains_key(key)
    }

    /// Total weight held now.
    pub fn weight(&self) -> u64 {
        self.inner.shards.iter().map(|s| s.lock().weight()).sum()
    }

    /// Live and not yet reclaimed entries now.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether the cache holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
