//! Behaviour of the in-memory cache: bounds, TTL, single flight, invalidation,
//! listeners, warming and statistics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use feature_cache::{
    CacheConfig, EntryOptions, Error, EvictionCause, FeatureCache, ManualClock, Policy,
    UnitWeigher, WarmStop,
};
use proptest::prelude::*;

fn bytes_cache(capacity: u64, shards: usize, policy: Policy) -> FeatureCache<u32, Vec<u8>> {
    FeatureCache::builder()
        .capacity(capacity)
        .shards(shards)
        .policy(policy)
        .weigher(|_: &u32, v: &Vec<u8>| v.len() as u64)
        .build()
        .unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u32, usize),
    Get(u32),
    Remove(u32),
    Resize(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..200, 0usize..300).prop_map(|(k, n)| Op::Insert(k, n)),
        4 => (0u32..200).prop_map(Op::Get),
        1 => (0u32..200).prop_map(Op::Remove),
        1 => (0u64..4000).prop_map(Op::Resize),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn weight_never_exceeds_capacity(
        ops in prop::collection::vec(op(), 1..400),
        shards in prop::sample::select(vec![1usize, 2, 4]),
        lfu in any::<bool>(),
    ) {
        let policy = if lfu { Policy::TinyLfu } else { Policy::Lru };
        let cache = bytes_cache(2000, shards, policy);
        for op in ops {
            match op {
                Op::Insert(k, n) => {
                    let r = cache.insert(k, vec![k as u8; n]);
                    if let Err(Error::TooHeavy { weight, limit }) = r {
                        prop_assert!(weight > limit);
                    }
                }
                Op::Get(k) => {
                    if let Some(v) = cache.get(&k) {
                        prop_assert!(v.iter().all(|b| *b == k as u8));
                    }
                }
                Op::Remove(k) => { cache.remove(&k); }
                Op::Resize(c) => cache.set_capacity(c),
            }
            let s = cache.stats();
            prop_assert!(s.weight <= cache.capacity(), "weight {} > capacity {}", s.weight, cache.capacity());
            prop_assert_eq!(s.weight, cache.weight());
        }
    }

    #[test]
    fn never_returned_after_ttl(
        steps in prop::collection::vec((0u32..50, 1u64..100, 0u64..60, any::<bool>()), 1..300),
        lfu in any::<bool>(),
    ) {
        let clock = Arc::new(ManualClock::new());
        let cache: FeatureCache<u32, u64> = FeatureCache::builder()
            .capacity(1000)
            .shards(2)
            .policy(if lfu { Policy::TinyLfu } else { Policy::Lru })
            .clock(clock.clone())
            .build()
            .unwrap();
        // Model: key -> (expiry in ms since start).
        let mut now_ms = 0u64;
        let mut expiry = std::collections::HashMap::new();
        for (k, ttl, advance, purge) in steps {
            cache.insert_with(k, now_ms, EntryOptions::new().ttl(Duration::from_millis(ttl))).unwrap();
            expiry.insert(k, now_ms + ttl);
            clock.advance(Duration::from_millis(advance));
            now_ms += advance;
            if purge { cache.purge_expired(); }
            for (key, exp) in &expiry {
                if now_ms >= *exp {
                    prop_assert!(cache.get(key).is_none(), "key {} returned at {} ms, expired at {} ms", key, now_ms, exp);
                    prop_assert!(!cache.contains(key));
                }
            }
        }
    }
}

#[test]
fn single_flight_runs_loader_once_under_8_callers() {
    for round in 0..20u32 {
        let cache: FeatureCache<u32, u64> = FeatureCache::builder().capacity(100).build().unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (cache, runs, barrier) = (cache.clone(), runs.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache.get_or_insert_with(round, || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        Ok::<_, std::io::Error>(u64::from(round) * 7)
                    })
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), u64::from(round) * 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "round {round}");
    }
}

#[test]
fn loader_error_is_shared_and_not_cached() {
    let cache: FeatureCache<u32, u64> = FeatureCache::builder().capacity(100).build().unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let runs = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (cache, barrier, runs) = (cache.clone(), barrier.clone(), runs.clone());
            std::thread::spawn(move || {
                barrier.wait();
                cache.get_or_insert_with(1, || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(30));
                    Err::<u64, _>(std::io::Error::other("model not found"))
                })
            })
        })
        .collect();
    for h in handles {
        let err = h.join().unwrap().unwrap_err();
        // The loader's own error is the cause, not pasted into the message.
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("model not found"), "{err}");
    }
    assert!(runs.load(Ordering::SeqCst) >= 1);
    assert!(!cache.contains(&1));
    assert_eq!(
        cache
            .get_or_insert_with(1, || Ok::<_, std::io::Error>(5))
            .unwrap(),
        5
    );
}

#[test]
fn panicking_loader_wakes_waiters() {
    let cache: FeatureCache<u32, u64> = FeatureCache::builder().capacity(100).build().unwrap();
    let c2 = cache.clone();
    let leader = std::thread::spawn(move || {
        let _ = c2.get_or_insert_with(9, || -> Result<u64, std::io::Error> {
            std::thread::sleep(Duration::from_millis(50));
            panic!("loader bug")
        });
    });
    std::thread::sleep(Duration::from_millis(10));
    let r = cache.get_or_insert_with(9, || Ok::<_, std::io::Error>(1));
    assert!(leader.join().is_err());
    // Either it waited on the panicking flight or ran its own loader.
    assert!(matches!(r, Err(Error::LoaderPanicked) | Ok(1)), "{r:?}");
    assert_eq!(
        cache
            .get_or_insert_with(9, || Ok::<_, std::io::Error>(2))
            .unwrap(),
        r.unwrap_or(2)
    );
}

#[test]
fn tags_predicates_listener_and_causes() {
    let cache = bytes_cache(100, 1, Policy::Lru);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    cache.on_evict(move |k: &u32, _v: &Vec<u8>, cause| s2.lock().unwrap().push((*k, cause)));
    cache
        .insert_with(1, vec![0; 10], EntryOptions::new().tag("minilm@2"))
        .unwrap();
    cache
        .insert_with(2, vec![0; 10], EntryOptions::new().tag("minilm@2").tag("x"))
        .unwrap();
    cache
        .insert_with(3, vec![0; 10], EntryOptions::new().tag("minilm@3"))
        .unwrap();
    assert_eq!(cache.invalidate_tag("minilm@2"), 2);
    assert!(cache.contains(&3) && !cache.contains(&1) && !cache.contains(&2));
    cache.insert(3, vec![0; 20]).unwrap();
    cache.insert(4, vec![0; 90]).unwrap(); // evicts 3 (LRU) for capacity
    assert_eq!(cache.invalidate_where(|k, _| *k == 4), 1);
    let mut seen = seen.lock().unwrap().clone();
    seen[..2].sort_by_key(|(k, _)| *k); // a tag sweep reports in storage order
    assert_eq!(
        seen,
        vec![
            (1, EvictionCause::Explicit),
            (2, EvictionCause::Explicit),
            (3, EvictionCause::Replaced),
            (3, EvictionCause::Capacity),
            (4, EvictionCause::Explicit),
        ]
    );
    let s = cache.stats();
    assert_eq!(
        (s.removed_explicit, s.replaced, s.evicted_capacity),
        (3, 1, 1)
    );
}

#[test]
fn set_capacity_evicts_at_once_and_too_heavy_is_an_error() {
    let cache = bytes_cache(1000, 2, Policy::TinyLfu);
    for k in 0..100 {
        cache.insert(k, vec![0; 10]).unwrap();
    }
    let before = cache.weight();
    assert!(before > 250 && before <= 1000, "{before}");
    cache.set_capacity(250);
    assert!(cache.weight() <= 250, "{}", cache.weight());
    let err = cache.insert(1000, vec![0; 200]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooHeavy {
                weight: 200,
                limit: 125
            }
        ),
        "{err}"
    );
    assert!(matches!(
        FeatureCache::<u32, u32>::builder()
            .config(CacheConfig {
                shards: 3,
                ..Default::default()
            })
            .weigher(UnitWeigher)
            .build(),
        Err(Error::InvalidConfig { field, .. }) if field == "shards"
    ));
}

#[test]
fn stats_count_hits_and_time_saved() {
    let cache: FeatureCache<u32, u32> = FeatureCache::builder().capacity(10).build().unwrap();
    cache
        .get_or_insert_with(1, || {
            std::thread::sleep(Duration::from_millis(5));
            Ok::<_, std::io::Error>(1)
        })
        .unwrap();
    for _ in 0..3 {
        assert_eq!(cache.get(&1), Some(1));
    }
    assert_eq!(cache.get(&2), None);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.inserts, s.loads), (3, 2, 1, 1));
    assert!(
        s.time_saved >= Duration::from_millis(15),
        "{:?}",
        s.time_saved
    );
    assert!((s.hit_rate() - 0.6).abs() < 1e-9);
}

#[test]
fn warming_fills_until_full_and_can_be_cancelled() {
    let cache: FeatureCache<u32, u32> = FeatureCache::builder()
        .capacity(64)
        .shards(1)
        .build()
        .unwrap();
    cache.insert(5, 500).unwrap();
    let report = cache.warm(0..1000u32, |k| Ok::<_, ()>(*k)).join().unwrap();
    assert_eq!(report.stopped, WarmStop::Full);
    assert_eq!(cache.len(), 64);
    assert_eq!(cache.stats().evicted_capacity, 0, "warming never evicts");
    assert_eq!(cache.get(&5), Some(500), "existing entry kept");
    assert!(report.skipped >= 1);

    let cache: FeatureCache<u32, u32> =
        FeatureCache::builder().capacity(1_000_000).build().unwrap();
    let handle = cache.warm(0..1_000_000u32, |k| {
        std::thread::sleep(Duration::from_millis(1));
        Ok::<_, ()>(*k)
    });
    // User calls are served while warming runs.
    cache.insert(u32::MAX, 1).unwrap();
    assert_eq!(cache.get(&u32::MAX), Some(1));
    std::thread::sleep(Duration::from_millis(20));
    handle.cancel();
    let report = handle.join().unwrap();
    assert_eq!(report.stopped, WarmStop::Cancelled);
    assert!(report.loaded < 1_000_000);
}

/// Replays a hot set of 500 keys (warmed up first) interleaved with a scan of
/// 100,000 one-hit keys, ten scan keys per hot access, through a 1,000-entry
/// cache; returns the hit ratio of the hot accesses during the scan.
fn hot_hits_during_scan(policy: Policy) -> f64 {
    let cache: FeatureCache<u64, ()> = FeatureCache::builder()
        .capacity(1000)
        .shards(1)
        .policy(policy)
        .weigher(UnitWeigher)
        .build()
        .unwrap();
    let access = |k: u64| {
        let hit = cache.get(&k).is_some();
        if !hit {
            cache.insert(k, ()).unwrap();
        }
        hit
    };
    for _ in 0..20 {
        for k in 0..500 {
            access(k);
        }
    }
    let (mut hot, mut hits) = (0u64, 0u64);
    for i in 0..100_000u64 {
        access(1_000_000 + i);
        if i % 10 == 9 {
            hot += 1;
            hits += u64::from(access(i / 10 % 500));
        }
    }
    hits as f64 / hot as f64
}

#[test]
fn admission_keeps_the_hot_set_through_a_scan() {
    let tiny = hot_hits_during_scan(Policy::TinyLfu);
    let lru = hot_hits_during_scan(Policy::Lru);
    // Each hot key comes back after 5,000 scan keys: plain LRU has evicted
    // it by then; the frequency filter keeps one-hit keys out of main.
    assert!(tiny >= 0.9, "TinyLfu hot hit ratio {tiny:.3}");
    assert!(lru <= 0.1, "Lru hot hit ratio {lru:.3}");
}

/// Every key is requested twice, about 3,000 distinct keys apart (a get, and
/// an insert on a miss), through a cache of 8,000 entries: a workload where
/// recency wins. Returns the hit ratio over the last half and the window's
/// share of the capacity at the end.
fn recency_workload(cache: &FeatureCache<u64, u64>) -> (f64, f64) {
    let n = 600_000u64;
    let mut hits = 0u64;
    for i in 0..n {
        let key = if i % 2 == 0 {
            i / 2
        } else {
            (i / 2).saturating_sub(1_500)
        };
        let hit = cache.get(&key).is_some();
        if !hit {
            cache.insert(key, key).unwrap();
        }
        if i >= n / 2 {
            hits += u64::from(hit);
        }
    }
    let window = cache.window_capacity() as f64 / cache.capacity() as f64;
    (hits as f64 / (n / 2) as f64, window)
}

#[test]
fn tuning_widens_the_window_when_recency_wins() {
    let build = |policy| {
        FeatureCache::builder()
            .capacity(8_000)
            .shards(2)
            .policy(policy)
            .weigher(UnitWeigher)
            .build()
            .unwrap()
    };
    let (tuned_hits, tuned_window) = recency_workload(&build(Policy::TinyLfu));
    let (lru_hits, _) = recency_workload(&build(Policy::Lru));
    // Plain LRU hits every repeat (half the requests); the tuned cache must
    // have found a window that holds the repeats too.
    assert!(lru_hits > 0.49, "LRU {lru_hits:.3}");
    assert!(tuned_window > 0.5, "window share {tuned_window:.3}");
    assert!(
        tuned_hits > 0.45,
        "tuned {tuned_hits:.3} against LRU {lru_hits:.3}"
    );
}

#[test]
fn tuning_starts_for_weighted_entries_once_half_full() {
    // Entries of 100 bytes in a 800,000-byte cache: the count (8,000) is
    // only known once the cache has filled, from the mean weight.
    let cache: FeatureCache<u64, u64> = FeatureCache::builder()
        .capacity(800_000)
        .shards(2)
        .policy(Policy::TinyLfu)
        .weigher(|_: &u64, _: &u64| 100)
        .build()
        .unwrap();
    let (hits, window) = recency_workload(&cache);
    assert!(window > 0.5, "window share {window:.3}");
    assert!(hits > 0.45, "hit ratio {hits:.3}");
}

#[test]
fn the_hill_climber_policy_still_runs() {
    let cache: FeatureCache<u64, u64> = FeatureCache::builder()
        .capacity(8_000)
        .shards(1)
        .policy(Policy::TinyLfuHillClimber)
        .weigher(UnitWeigher)
        .build()
        .unwrap();
    let before = cache.window_capacity();
    let _ = recency_workload(&cache);
    assert_ne!(cache.window_capacity(), before, "the climber never moved");
}

/// A loop over 10 % more keys than fit, 20 times (a get, and an insert on a
/// miss); returns the hit ratio over the last half.
fn loop_workload(cache: &FeatureCache<u64, u64>) -> f64 {
    let n = 8_800u64;
    let mut hits = 0u64;
    for i in 0..20 * n {
        let key = i % n;
        let hit = cache.get(&key).is_some();
        if !hit {
            cache.insert(key, key).unwrap();
        }
        if i >= 10 * n {
            hits += u64::from(hit);
        }
    }
    hits as f64 / (10 * n) as f64
}

#[test]
fn tuning_holds_a_loop_larger_than_the_cache() {
    let build = |policy| {
        FeatureCache::builder()
            .capacity(8_000)
            .shards(1)
            .policy(policy)
            .weigher(UnitWeigher)
            .build()
            .unwrap()
    };
    // LRU evicts each key just before the loop comes back to it; strict
    // admission keeps most of the loop resident (at most 8,000 of 8,800
    // keys, 91 %).
    let lru = loop_workload(&build(Policy::Lru));
    let tuned = loop_workload(&build(Policy::TinyLfu));
    assert!(lru < 0.01, "LRU {lru:.3}");
    assert!(tuned > 0.80, "tuned {tuned:.3}");
}
