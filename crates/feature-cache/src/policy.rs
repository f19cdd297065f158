//! One shard's eviction policy: weighted LRU, or W-TinyLFU (an admission
//! window LRU in front of a segmented main space, a frequency sketch deciding
//! who enters main, and a hill climber or the miniatures' tuning sizing the
//! window), after Caffeine, with an optional ghost of rejected candidates.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::hash::hash_key;
use crate::sketch::FrequencySketch;
use crate::stats::EvictionCause;
use crate::store::Store;

/// A stored value with its bookkeeping.
#[derive(Debug)]
pub(crate) struct Entry<V> {
    pub(crate) value: V,
    pub(crate) weight: u64,
    pub(crate) expires_at: Option<Instant>,
    pub(crate) tags: Vec<String>,
    pub(crate) load_time: Duration,
}

impl<V> Entry<V> {
    #[inline]
    pub(crate) fn is_expired(&self, now: &mut Option<Instant>, clock: &dyn crate::Clock) -> bool {
        match self.expires_at {
            None => false,
            Some(at) => *now.get_or_insert_with(|| clock.now()) >= at,
        }
    }
}

/// Evicted or removed entries, handed to listeners after the lock is released.
pub(crate) type Removed<K, V> = Vec<(K, Entry<V>, EvictionCause)>;

/// Per-shard counters, updated under the shard's lock.
#[derive(Debug, Default, Clone)]
pub(crate) struct ShardCounters {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) inserts: u64,
    pub(crate) evictions: [u64; 4],
    pub(crate) time_saved: Duration,
}

/// The W-TinyLFU regions, each with its own recency list (with
/// [`Policy::Lru`](crate::Policy::Lru) every entry is in the window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Region {
    Window = 0,
    Probation = 1,
    Protected = 2,
}

/// Caffeine's climber constants.
const STEP_PERCENT: f64 = 0.0625;
const STEP_DECAY: f64 = 0.98;
const RESTART_THRESHOLD: f64 = 0.05;
/// A candidate at least this frequent is admitted against a hotter victim
/// with probability 1/128 (Caffeine's defence against hash flooding).
const HASHDOS_THRESHOLD: u8 = 6;

/// One shard's storage and policy.
#[derive(Debug)]
pub(crate) struct Shard<K: Hash + Eq, V> {
    admission: bool,
    /// The entries, on one recency list per region, with one index.
    store: Store<K, V>,
    /// The candidates of one [`maintain`](Self::maintain) (slots), kept
    /// between calls for its allocation.
    candidates: VecDeque<u32>,
    window_weight: u64,
    probation_weight: u64,
    protected_weight: u64,
    capacity: u64,
    window_max: u64,
    protected_max: u64,
    sketch: Option<FrequencySketch>,
    hits_in_sample: u64,
    misses_in_sample: u64,
    previous_hit_rate: f64,
    step: f64,
    /// Whether the hill climber sizes the window (otherwise a [`Tuning`]
    /// from the miniature simulations does, or nothing).
    climbing: bool,
    /// Probability of admitting a candidate whose estimate ties the victim's.
    tie: f64,
    /// Share of the main space kept for the protected segment.
    protected_share: f64,
    /// Probability that a candidate the ghost remembers enters main.
    ghost_use: f64,
    rng: u64,
    /// The generation of the last [`Tuning`] applied.
    pub(crate) tuning_generation: u64,
    /// Hashes of candidates that lost their admission duel (with
    /// [`Policy::TinyLfu`](crate::Policy::TinyLfu)).
    ghost: Option<Ghost>,
    pub(crate) counters: ShardCounters,
    /// Rejected candidates requested again within as many requests of
    /// their rejection as the shard holds entries (see
    /// [`Shard::ghost_return`]).
    pub(crate) short_returns: u64,
}

/// Recently rejected candidates, remembered by hash: one that is requested
/// again while remembered enters the main space directly (its return is the
/// evidence of reuse the frequency sketch had not yet seen). Holds up to half
/// the shard's projected entry count, oldest forgotten first.
#[derive(Debug, Default)]
struct Ghost {
    set: HashMap<u64, u64, std::hash::BuildHasherDefault<crate::hash::MixHasher>>,
    order: VecDeque<u64>,
}

impl Ghost {
    /// Remembers `hash`, rejected at request `tick` of the shard.
    fn remember(&mut self, hash: u64, tick: u64, limit: usize) {
        if self.set.insert(hash, tick).is_none() {
            self.order.push_back(hash);
        }
        while self.order.len() > limit {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Forgets `hash`; the request count at its rejection if it was
    /// remembered.
    fn take(&mut self, hash: u64) -> Option<u64> {
        // The queue keeps a taken hash until it reaches the front: it counts
        // towards the limit until then, and if the same hash was remembered
        // again meanwhile, popping the old copy forgets the new one early.
        // That needs two rejections of one key within one ghost length, and
        // is cheaper than tracking positions.
        self.set.remove(&hash)
    }
}

/// Settings the miniature simulations choose for the real shards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Tuning {
    /// Target share of the capacity for the window.
    pub(crate) window_share: f64,
    /// Probability of admitting a candidate that ties the victim.
    pub(crate) tie: f64,
    /// Sketch aging period in multiples of the expected entry count.
    pub(crate) aging: f64,
    /// Probability that a rejected candidate requested again while the
    /// ghost remembers it enters main directly.
    pub(crate) ghost: f64,
    /// Most the window moves towards `window_share` on this tuning, as a
    /// share of the capacity.
    pub(crate) step: f64,
    /// Share of the main space kept for the protected segment.
    pub(crate) protected: f64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            window_share: INITIAL_WINDOW,
            tie: 0.0,
            aging: crate::sketch::DEFAULT_AGING,
            ghost: 1.0,
            step: TUNING_STEP,
            protected: PROTECTED_SHARE,
        }
    }
}

/// Most a new [`Tuning`] moves the window at once by default, as a share of
/// capacity.
pub(crate) const TUNING_STEP: f64 = 0.05;

/// Starting share of the window in admission mode (Caffeine: 1%).
pub(crate) const INITIAL_WINDOW: f64 = 0.01;
/// Share of the main space kept for the protected segment (Caffeine: 80%).
pub(crate) const PROTECTED_SHARE: f64 = 0.80;

impl<K: Hash + Eq + Clone, V: Clone> Shard<K, V> {
    /// A shard of `capacity` weight units. With `admission`, W-TinyLFU whose
    /// window the hill climber sizes when `climb` is set, with a ghost of
    /// rejected candidates when `ghost` is set; otherwise LRU.
    pub(crate) fn new(
        capacity: u64,
        admission: bool,
        climb: bool,
        ghost: bool,
        sketch_width: usize,
    ) -> Self {
        let mut s = Self {
            admission,
            store: Store::default(),
            candidates: VecDeque::new(),
            window_weight: 0,
            probation_weight: 0,
            protected_weight: 0,
            capacity,
            window_max: capacity,
            protected_max: 0,
            sketch: admission.then(|| FrequencySketch::new(sketch_width)),
            hits_in_sample: 0,
            misses_in_sample: 0,
            previous_hit_rate: 0.0,
            step: 0.0,
            climbing: climb,
            tie: 0.0,
            protected_share: PROTECTED_SHARE,
            ghost_use: 1.0,
            rng: 0x9e37_79b9_7f4a_7c15,
            tuning_generation: 0,
            ghost: (admission && ghost).then(Ghost::default),
            counters: ShardCounters::default(),
            short_returns: 0,
        };
        s.reset_partition();
        s
    }

    fn reset_partition(&mut self) {
        if self.admission {
            let cap = self.capacity as f64;
            self.window_max = ((cap * INITIAL_WINDOW) as u64).max(1).min(self.capacity);
            let main = self.capacity - self.window_max;
            self.protected_max = (main as f64 * self.protected_share) as u64;
            self.step = -STEP_PERCENT * cap;
        } else {
            self.window_max = self.capacity;
            self.protected_max = 0;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.store.len()
    }

    pub(crate) fn weight(&self) -> u64 {
        self.window_weight + self.probation_weight + self.protected_weight
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The admission window's current target size (for diagnostics).
    pub(crate) fn window_max(&self) -> u64 {
        self.window_max
    }

    fn weight_mut(&mut self, r: Region) -> &mut u64 {
        match r {
            Region::Window => &mut self.window_weight,
            Region::Probation => &mut self.probation_weight,
            Region::Protected => &mut self.protected_weight,
        }
    }

    /// The region holding `key`.
    #[cfg(test)]
    fn locate(&self, key: &K) -> Option<Region> {
        let i = self.store.find(hash_key(key), key)?;
        Some(self.store.region(i))
    }

    /// Removes the entry in slot `i`.
    fn take(&mut self, i: u32) -> (K, Entry<V>) {
        let r = self.store.region(i);
        let (k, e) = self.store.remove(i);
        *self.weight_mut(r) -= e.weight;
        (k, e)
    }

    /// Moves the entry in slot `i` to the most recently used end of `to`.
    fn move_to(&mut self, i: u32, to: Region) {
        let from = self.store.region(i);
        let w = self.store.entry(i).weight;
        *self.weight_mut(from) -= w;
        *self.weight_mut(to) += w;
        self.store.move_to_front(i, to);
    }

    /// Looks `key` up; a hit counts as an access and returns the value with
    /// its weight. Expired entries are removed (into `removed`) and reported
    /// as a miss.
    pub(crate) fn get(
        &mut self,
        key: &K,
        hash: u64,
        clock: &dyn crate::Clock,
        removed: &mut Removed<K, V>,
    ) -> Option<(V, u64)> {
        let Some(i) = self.store.find(hash, key) else {
            self.record(false);
            return None;
        };
        let mut now = None;
        let e = self.store.entry(i);
        if e.is_expired(&mut now, clock) {
            let (k, e) = self.take(i);
            self.counters.evictions[EvictionCause::Expired as usize] += 1;
            removed.push((k, e, EvictionCause::Expired));
            self.record(false);
            return None;
        }
        let v = (e.value.clone(), e.weight);
        self.counters.time_saved += e.load_time;
        match self.store.region(i) {
            Region::Probation => {
                // A second access in main: promote to protected.
                self.move_to(i, Region::Protected);
                self.demote_protected_overflow();
            }
            r => self.store.move_to_front(i, r),
        }
        if let Some(s) = &mut self.sketch {
            s.increment(hash);
        }
        self.record(true);
        Some(v)
    }

    /// Like `get` but without counting an access or a hit/miss.
    pub(crate) fn peek(&self, key: &K, hash: u64, clock: &dyn crate::Clock) -> Option<&Entry<V>> {
        let i = self.store.find(hash, key)?;
        let e = self.store.entry(i);
        let mut now = None;
        (!e.is_expired(&mut now, clock)).then_some(e)
    }

    /// Inserts or replaces `key`; evictions go to `removed`. True when the
    /// key was not stored before.
    ///
    /// Here and in the other methods that take one, `hash` is
    /// [`hash_key`]`(key)`: the store's index is keyed by it, and the
    /// sketch and the ghost count it.
    pub(crate) fn insert(
        &mut self,
        key: K,
        hash: u64,
        entry: Entry<V>,
        removed: &mut Removed<K, V>,
    ) -> bool {
        debug_assert_eq!(hash, hash_key(&key), "the hash of another key");
        self.counters.inserts += 1;
        if let Some(s) = &mut self.sketch {
            s.increment(hash);
        }
        let found = self.store.find(hash, &key);
        match found {
            Some(i) => {
                // Replaced in place: the most recently used of its region.
                let r = self.store.region(i);
                let w = entry.weight;
                let (k, old) = self.store.replace(i, key, entry);
                let region_weight = self.weight_mut(r);
                *region_weight = *region_weight - old.weight + w;
                self.counters.evictions[EvictionCause::Replaced as usize] += 1;
                removed.push((k, old, EvictionCause::Replaced));
                if r == Region::Protected {
                    self.demote_protected_overflow();
                }
            }
            None => {
                // A rejected candidate that came back goes straight to main
                // (with the probability the tuning gives the ghost).
                let r = if self.ghost_return(hash) && self.use_ghost() {
                    Region::Probation
                } else {
                    Region::Window
                };
                *self.weight_mut(r) += entry.weight;
                self.store.push(r, key, hash, entry);
            }
        }
        self.grow_sketch();
        self.maintain(removed);
        found.is_none()
    }

    /// Whether the ghost remembered `hash` (it forgets it now). A return
    /// within as many requests of the rejection as the shard holds entries
    /// counts as a *short return*: a larger window would have kept the key
    /// until it came back, so their rate is evidence for a larger window
    /// that the sketch's stale counts hide.
    fn ghost_return(&mut self, hash: u64) -> bool {
        let Some(rejected_at) = self.ghost.as_mut().and_then(|g| g.take(hash)) else {
            return false;
        };
        let now = self.counters.hits + self.counters.misses;
        if now.saturating_sub(rejected_at) <= self.projected_entries() {
            self.short_returns += 1;
        }
        true
    }

    /// Removes `key` explicitly.
    pub(crate) fn remove(&mut self, key: &K, hash: u64) -> Option<(K, Entry<V>)> {
        let i = self.store.find(hash, key)?;
        self.counters.evictions[EvictionCause::Explicit as usize] += 1;
        Some(self.take(i))
    }

    /// Removes every entry for which `pred` holds, with `cause`: the
    /// window's, then probation's, then protected's, each most recently used
    /// first.
    pub(crate) fn remove_where(
        &mut self,
        mut pred: impl FnMut(&K, &Entry<V>) -> bool,
        cause: EvictionCause,
        removed: &mut Removed<K, V>,
    ) {
        for r in [Region::Window, Region::Probation, Region::Protected] {
            let slots: Vec<u32> = self
                .store
                .iter(r)
                .filter(|(_, k, e)| pred(k, e))
                .map(|(i, _, _)| i)
                .collect();
            for i in slots {
                let (k, e) = self.take(i);
                self.counters.evictions[cause as usize] += 1;
                removed.push((k, e, cause));
            }
        }
    }

    /// Sets a new capacity and evicts down to it at once.
    pub(crate) fn set_capacity(&mut self, capacity: u64, removed: &mut Removed<K, V>) {
        self.capacity = capacity;
        self.reset_partition();
        self.demote_protected_overflow();
        self.maintain(removed);
    }

    /// Sizes the sketch for the entry count the shard will hold when full:
    /// the capacity itself with unit weights, otherwise projected from the
    /// entries' mean weight so far.
    fn grow_sketch(&mut self) {
        let len = self.len();
        let projected = usize::try_from(self.projected_entries()).unwrap_or(usize::MAX);
        if let Some(s) = &mut self.sketch {
            if len > s.expected() {
                s.grow(projected.clamp(len, len.saturating_mul(4)));
            }
        }
    }

    /// The entry count the shard will hold when full, projected from the
    /// mean weight of the entries it holds now.
    pub(crate) fn projected_entries(&self) -> u64 {
        let p = self.len() as u128 * u128::from(self.capacity) / u128::from(self.weight().max(1));
        u64::try_from(p).unwrap_or(u64::MAX)
    }

    fn demote_protected_overflow(&mut self) {
        while self.protected_weight > self.protected_max {
            let Some(i) = self.store.lru(Region::Protected) else {
                break;
            };
            self.move_to(i, Region::Probation);
        }
    }

    /// Evicts the entry in slot `i` for capacity.
    fn evict(&mut self, i: u32, removed: &mut Removed<K, V>) {
        let (k, e) = self.take(i);
        self.counters.evictions[EvictionCause::Capacity as usize] += 1;
        removed.push((k, e, EvictionCause::Capacity));
    }

    /// Moves the window's least recently used entries to probation while it
    /// is over its size; with `candidates`, their slots are queued there.
    fn shrink_window(&mut self, candidates: bool) {
        while self.window_weight > self.window_max {
            let Some(i) = self.store.lru(Region::Window) else {
                break;
            };
            if candidates {
                self.candidates.push_back(i);
            }
            self.move_to(i, Region::Probation);
        }
    }

    /// Restores the size invariants after an insert or a resize.
    fn maintain(&mut self, removed: &mut Removed<K, V>) {
        if !self.admission {
            while self.weight() > self.capacity {
                let Some(i) = self.store.lru(Region::Window) else {
                    break;
                };
                self.evict(i, removed);
            }
            return;
        }
        // Window overflow moves to probation; those entries are the candidates.
        self.candidates.clear();
        self.shrink_window(true);
        while self.weight() > self.capacity {
            // Drop candidates that already left (evicted as victims). No
            // entry is stored during this loop, so a candidate's slot is
            // not reused: it holds the candidate exactly while it is in
            // probation.
            while self
                .candidates
                .front()
                .is_some_and(|&c| !self.store.holds_in(c, Region::Probation))
            {
                self.candidates.pop_front();
            }
            let candidate = self.candidates.front().copied();
            // The victim: probation's LRU unless only candidates remain there,
            // then protected's LRU, then the window's.
            let victim = if self.store.region_len(Region::Probation) > self.candidates.len() {
                self.store.lru(Region::Probation)
            } else if let Some(i) = self.store.lru(Region::Protected) {
                Some(i)
            } else if candidate.is_none() {
                self.store.lru(Region::Window)
            } else {
                None
            };
            match (candidate, victim) {
                (None, None) => break,
                (Some(c), None) => {
                    self.candidates.pop_front();
                    self.evict(c, removed);
                }
                (None, Some(v)) => self.evict(v, removed),
                (Some(c), Some(v)) => {
                    self.candidates.pop_front();
                    if self.admit(c, v) {
                        self.evict(v, removed);
                    } else {
                        let hash = self.store.hash(c);
                        self.evict(c, removed);
                        if self.ghost.is_some() {
                            let limit = usize::try_from(self.projected_entries() / 2)
                                .unwrap_or(usize::MAX)
                                .max(1);
                            let tick = self.counters.hits + self.counters.misses;
                            if let Some(g) = &mut self.ghost {
                                g.remember(hash, tick, limit);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Whether the candidate in slot `candidate` enters main in place of
    /// the victim in slot `victim`.
    fn admit(&mut self, candidate: u32, victim: u32) -> bool {
        let Some(s) = &self.sketch else { return true };
        let cf = s.frequency(self.store.hash(candidate));
        let vf = s.frequency(self.store.hash(victim));
        if cf > vf || (cf == vf && self.tie > 0.0 && self.random_unit() < self.tie) {
            true
        } else if cf >= HASHDOS_THRESHOLD {
            self.random_unit() < 1.0 / 128.0
        } else {
            false
        }
    }

    /// Whether a candidate the ghost remembered enters main this time.
    fn use_ghost(&mut self) -> bool {
        self.ghost_use >= 1.0 || (self.ghost_use > 0.0 && self.random_unit() < self.ghost_use)
    }

    /// A pseudo-random number in [0, 1) (xorshift64).
    fn random_unit(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Turns the hill climber on or off.
    pub(crate) fn set_climbing(&mut self, on: bool) {
        self.climbing = on && self.admission;
        self.hits_in_sample = 0;
        self.misses_in_sample = 0;
    }

    /// Fixes the window at `share` of the capacity, the protected segment at
    /// 80 % of the rest, and the tie rule, ghost use and sketch aging (a
    /// miniature's fixed setting).
    pub(crate) fn fix(&mut self, tuning: Tuning) {
        self.apply(tuning, 1.0);
    }

    /// Applies a tuning from the miniature simulations: the tie rule, the
    /// ghost's use and the aging period at once, the window moved towards its target by at most
    /// the tuning's step (each new tuning moves it one step further).
    pub(crate) fn tune(&mut self, tuning: Tuning) {
        self.apply(tuning, tuning.step);
    }

    /// Applies `tuning`, moving the window by at most `max_step` of the
    /// capacity.
    fn apply(&mut self, tuning: Tuning, max_step: f64) {
        if !self.admission {
            return;
        }
        self.tie = tuning.tie;
        self.ghost_use = tuning.ghost;
        self.protected_share = tuning.protected;
        if let Some(s) = &mut self.sketch {
            s.set_aging(tuning.aging);
        }
        let cap = self.capacity as f64;
        let target = cap * tuning.window_share;
        let step = cap * max_step;
        let now = self.window_max as f64;
        self.set_window((now + (target - now).clamp(-step, step)) as u64);
    }

    /// Sets the window's size; the protected segment gets 80 % of the rest.
    /// A smaller window hands its oldest entries to probation at once; a
    /// larger one fills with new arrivals.
    fn set_window(&mut self, size: u64) {
        self.window_max = size.clamp(1, self.capacity.max(1));
        self.protected_max =
            (self.capacity.saturating_sub(self.window_max) as f64 * self.protected_share) as u64;
        self.demote_protected_overflow();
        self.shrink_window(false);
    }

    /// Counts a hit or miss; in admission mode feeds the hill climber.
    #[inline]
    fn record(&mut self, hit: bool) {
        if hit {
            self.counters.hits += 1;
        } else {
            self.counters.misses += 1;
        }
        if !self.climbing {
            return;
        }
        let Some(s) = &self.sketch else { return };
        if hit {
            self.hits_in_sample += 1;
        } else {
            self.misses_in_sample += 1;
        }
        let requests = self.hits_in_sample + self.misses_in_sample;
        if requests >= s.sample_size() {
            self.climb(requests);
        }
    }

    /// One step of the hill climber: keep moving the window in the direction
    /// that improved the hit rate; restart with a large step when the
    /// workload changes.
    fn climb(&mut self, requests: u64) {
        let hit_rate = self.hits_in_sample as f64 / requests as f64;
        let change = hit_rate - self.previous_hit_rate;
        let amount = if change >= 0.0 { self.step } else { -self.step };
        let next = if change.abs() >= RESTART_THRESHOLD {
            STEP_PERCENT * self.capacity as f64 * amount.signum()
        } else {
            STEP_DECAY * amount
        };
        self.previous_hit_rate = hit_rate;
        self.step = next;
        self.hits_in_sample = 0;
        self.misses_in_sample = 0;
        let amount = amount as i64;
        if amount > 0 {
            self.increase_window(amount.unsigned_abs());
        } else if amount < 0 {
            self.decrease_window(amount.unsigned_abs());
        }
    }

    /// Moves the boundary towards the window. No entry moves: the window
    /// fills with new arrivals while the main space, now over its share,
    /// gives up its least recently used entries to them.
    fn increase_window(&mut self, amount: u64) {
        let quota = amount.min(self.protected_max);
        self.protected_max -= quota;
        self.window_max += quota;
        self.demote_protected_overflow();
    }

    fn decrease_window(&mut self, amount: u64) {
        let mut quota = amount.min(self.window_max.saturating_sub(1));
        self.protected_max += quota;
        self.window_max -= quota;
        while quota > 0 {
            let Some(i) = self.store.lru(Region::Window) else {
                break;
            };
            // One heavier than what is left stays the window's LRU.
            let w = self.store.entry(i).weight;
            if w > quota {
                break;
            }
            quota -= w;
            self.move_to(i, Region::Probation);
        }
        self.protected_max -= quota;
        self.window_max += quota;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SystemClock;

    fn entry() -> Entry<()> {
        Entry {
            value: (),
            weight: 1,
            expires_at: None,
            tags: Vec::new(),
            load_time: Duration::ZERO,
        }
    }

    /// A shard of 10 whose main space holds keys 0..10, each seen six
    /// times; then key 100 is inserted and pushed out of the one-entry
    /// window by key 101, loses its duel, and is inserted again.
    fn returning_candidate(ghost: bool) -> Option<Region> {
        let clock = SystemClock;
        let mut removed = Vec::new();
        let mut s: Shard<u64, ()> = Shard::new(10, true, false, ghost, 16);
        for _ in 0..6 {
            for k in 0..10u64 {
                if s.get(&k, hash_key(&k), &clock, &mut removed).is_none() {
                    s.insert(k, hash_key(&k), entry(), &mut removed);
                }
            }
        }
        for k in [100u64, 101, 100] {
            s.insert(k, hash_key(&k), entry(), &mut removed);
        }
        assert!(
            removed.iter().any(|(k, _, _)| *k == 100),
            "key 100 was never rejected"
        );
        s.locate(&100)
    }

    #[test]
    fn a_rejected_candidate_that_returns_enters_main() {
        assert_eq!(returning_candidate(true), Some(Region::Probation));
        assert_eq!(returning_candidate(false), Some(Region::Window));
    }

    /// Short returns counted when key 100 is rejected (as in
    /// `returning_candidate`) and requested again after `requests` hits on
    /// the resident keys; and whether it came back through the ghost.
    fn short_returns_after(requests: u64) -> (u64, Option<Region>) {
        let clock = SystemClock;
        let mut removed = Vec::new();
        let mut s: Shard<u64, ()> = Shard::new(10, true, false, true, 16);
        for _ in 0..6 {
            for k in 0..10u64 {
                if s.get(&k, hash_key(&k), &clock, &mut removed).is_none() {
                    s.insert(k, hash_key(&k), entry(), &mut removed);
                }
            }
        }
        for k in [100u64, 101] {
            assert!(s.get(&k, hash_key(&k), &clock, &mut removed).is_none());
            s.insert(k, hash_key(&k), entry(), &mut removed);
        }
        assert_eq!(s.locate(&100), None, "key 100 was not rejected");
        let resident: Vec<u64> = (0..10u64).filter(|k| s.locate(k).is_some()).collect();
        for i in 0..requests {
            let k = resident[(i % resident.len() as u64) as usize];
            assert!(s.get(&k, hash_key(&k), &clock, &mut removed).is_some());
        }
        assert!(s.get(&100, hash_key(&100), &clock, &mut removed).is_none());
        s.insert(100, hash_key(&100), entry(), &mut removed);
        (s.short_returns, s.locate(&100))
    }

    #[test]
    fn a_rejected_candidate_that_returns_soon_is_a_short_return() {
        // Within the shard's entry count (10) of requests: a short return.
        assert_eq!(short_returns_after(0), (1, Some(Region::Probation)));
        assert_eq!(short_returns_after(8), (1, Some(Region::Probation)));
        // Later, it still enters main through the ghost, but is not one.
        assert_eq!(short_returns_after(20), (0, Some(Region::Probation)));
    }

    #[test]
    fn the_tuning_sizes_the_protected_segment() {
        let mut s: Shard<u64, ()> = Shard::new(1_000, true, false, true, 1_000);
        let tuning = Tuning {
            window_share: 0.2,
            protected: 0.95,
            ..Tuning::default()
        };
        s.fix(tuning);
        assert_eq!(s.window_max, 200);
        assert!(
            (759..=760).contains(&s.protected_max),
            "{}",
            s.protected_max
        );
        s.fix(Tuning {
            protected: 0.8,
            ..tuning
        });
        assert!(
            (639..=640).contains(&s.protected_max),
            "{}",
            s.protected_max
        );
    }
}
