//! The policies' decisions on fixed workloads, pinned: every hit and miss,
//! every eviction (key and cause, in order), the window's size and the
//! statistics, folded into one fingerprint per policy. The fingerprints were
//! recorded with the shards' previous storage (one `lru::LruCache` per
//! region); a change to how entries are stored must leave them as they are,
//! and a change of policy must record new ones deliberately.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use feature_cache::{EntryOptions, EvictionCause, FeatureCache, ManualClock, Policy, UnitWeigher};

/// FNV-1a over 64-bit words.
#[derive(Debug)]
struct Fingerprint(u64);

impl Fingerprint {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, word: u64) {
        for b in word.to_le_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// xorshift64: the workload's randomness, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A skewed key in `0..n`: the product of two uniform draws.
    fn skewed(&mut self, n: u64) -> u32 {
        let a = self.below(n);
        let b = self.below(n);
        (a * b / n) as u32
    }
}

fn cause_code(c: EvictionCause) -> u64 {
    match c {
        EvictionCause::Capacity => 1,
        EvictionCause::Expired => 2,
        EvictionCause::Explicit => 3,
        EvictionCause::Replaced => 4,
    }
}

type Events = Arc<Mutex<Vec<(u32, EvictionCause)>>>;

fn listen<V: Clone + Send + Sync + 'static>(cache: &FeatureCache<u32, V>) -> Events {
    let events: Events = Arc::default();
    let sink = Arc::clone(&events);
    cache.on_evict(move |k, _, cause| sink.lock().unwrap().push((*k, cause)));
    events
}

fn drain(events: &Events, f: &mut Fingerprint) -> usize {
    let mut events = events.lock().unwrap();
    let n = events.len();
    for (k, cause) in events.drain(..) {
        f.add(u64::from(k));
        f.add(cause_code(cause));
    }
    n
}

fn stats(cache: &FeatureCache<u32, impl Clone + Send + Sync + 'static>, f: &mut Fingerprint) {
    let s = cache.stats();
    for w in [
        s.hits,
        s.misses,
        s.inserts,
        s.evicted_capacity,
        s.evicted_expired,
        s.removed_explicit,
        s.replaced,
        s.entries,
        s.weight,
        cache.window_capacity(),
    ] {
        f.add(w);
    }
}

/// Byte-weighted entries with TTLs and tags, replacements, removals, tag
/// invalidation, expiry purges and capacity changes, on two shards.
fn weighted(policy: Policy) -> (u64, u64, usize) {
    let clock = Arc::new(ManualClock::new());
    let cache: FeatureCache<u32, Vec<u8>> = FeatureCache::builder()
        .capacity(6_000)
        .shards(2)
        .policy(policy)
        .clock(clock.clone())
        .weigher(|_: &u32, v: &Vec<u8>| v.len() as u64)
        .build()
        .unwrap();
    let events = listen(&cache);
    let mut f = Fingerprint::new();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut evicted = 0;
    for step in 0..60_000u64 {
        clock.advance(Duration::from_millis(1));
        let k = rng.skewed(2_000);
        match rng.below(100) {
            0..=79 => match cache.get(&k) {
                Some(v) => f.add(1 + v.len() as u64),
                None => {
                    f.add(0);
                    let len = 1 + rng.below(96) as usize;
                    let mut options = EntryOptions::new();
                    if rng.below(4) == 0 {
                        options = options.ttl(Duration::from_millis(1 + rng.below(400)));
                    }
                    if rng.below(3) == 0 {
                        options = options.tag(format!("t{}", k % 5));
                    }
                    cache.insert_with(k, vec![0; len], options).unwrap();
                }
            },
            80..=89 => {
                // A replacement (or a plain insert of an absent key).
                let len = 1 + rng.below(96) as usize;
                cache.insert(k, vec![1; len]).unwrap();
            }
            90..=94 => f.add(cache.remove(&k).map_or(0, |v| 1 + v.len() as u64)),
            _ => f.add(u64::from(cache.contains(&k))),
        }
        if step % 4_999 == 4_998 {
            f.add(cache.invalidate_tag(&format!("t{}", step % 5)) as u64);
        }
        if step % 7_001 == 7_000 {
            f.add(cache.purge_expired() as u64);
        }
        if step % 15_000 == 14_999 {
            let capacity = [3_000, 9_000, 6_000, 4_500][(step / 15_000) as usize % 4];
            cache.set_capacity(capacity);
        }
        evicted += drain(&events, &mut f);
    }
    stats(&cache, &mut f);
    cache.clear();
    evicted += drain(&events, &mut f);
    (f.0, cache.stats().hits, evicted)
}

/// Unit weights on one shard large enough for the miniature simulations to
/// tune it, a skewed stream whose hot set moves halfway.
fn tuned(policy: Policy) -> (u64, u64, usize) {
    let cache: FeatureCache<u32, u32> = FeatureCache::builder()
        .capacity(4_000)
        .shards(1)
        .policy(policy)
        .weigher(UnitWeigher)
        .build()
        .unwrap();
    let events = listen(&cache);
    let mut f = Fingerprint::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut evicted = 0;
    for step in 0..400_000u32 {
        let shift = if step < 200_000 { 0 } else { 17_000 };
        let k = rng.skewed(40_000) + shift;
        match cache.get(&k) {
            Some(v) => f.add(u64::from(v)),
            None => {
                f.add(u64::MAX);
                cache.insert(k, step).unwrap();
            }
        }
        if step % 50_000 == 49_999 {
            f.add(cache.window_capacity());
        }
        evicted += drain(&events, &mut f);
    }
    stats(&cache, &mut f);
    (f.0, cache.stats().hits, evicted)
}

#[test]
fn weighted_decisions_are_pinned() {
    assert_eq!(
        weighted(Policy::TinyLfu),
        (12_640_803_933_072_203_184, 8_396, 45_608)
    );
    assert_eq!(
        weighted(Policy::TinyLfuHillClimber),
        (11_919_070_301_097_485_900, 8_150, 45_819)
    );
    assert_eq!(
        weighted(Policy::Lru),
        (10_428_920_902_964_694_317, 5_455, 48_511)
    );
}

#[test]
fn tuned_decisions_are_pinned() {
    assert_eq!(
        tuned(Policy::TinyLfu),
        (43_500_760_541_574_206, 96_191, 299_809)
    );
    assert_eq!(
        tuned(Policy::TinyLfuHillClimber),
        (10_232_363_645_268_650_832, 94_977, 301_023)
    );
    assert_eq!(
        tuned(Policy::Lru),
        (9_230_447_561_780_527_207, 75_455, 320_545)
    );
}
