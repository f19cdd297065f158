//! Get/insert throughput on a Zipf(0.99) key stream, 1 and 2 threads:
//! feature-cache (W-TinyLFU tuned by miniatures or by the hill climber, and
//! LRU) against `moka::sync::Cache` and `Mutex<lru::LruCache>` in the same run.
//!
//! Each operation is a `get`; on a miss the key is inserted. 100,000
//! distinct keys, capacity 10,000 entries.
//!
//! `cargo bench --bench cache`

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use feature_cache::{FeatureCache, Policy, UnitWeigher};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::Zipf;

const KEYS: u64 = 100_000;
const CAPACITY: u64 = 10_000;
const STREAM: usize = 1 << 20;

fn stream() -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(42);
    let zipf = Zipf::new(KEYS as f64, 0.99).expect("valid Zipf parameters");
    (0..STREAM).map(|_| rng.sample(zipf) as u64).collect()
}

/// Runs `iters` operations on each of `threads` threads; returns wall time.
fn run<C: Sync>(cache: &C, keys: &[u64], threads: usize, iters: u64, op: fn(&C, u64)) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut i = t * keys.len() / threads;
                for _ in 0..iters {
                    op(cache, keys[i]);
                    i += 1;
                    if i == keys.len() {
                        i = 0;
                    }
                }
            });
        }
    });
    start.elapsed()
}

fn ours(policy: Policy) -> FeatureCache<u64, u64> {
    FeatureCache::builder()
        .capacity(CAPACITY)
        .policy(policy)
        .weigher(UnitWeigher)
        .build()
        .expect("valid cache configuration")
}

fn ours_op(c: &FeatureCache<u64, u64>, k: u64) {
    if c.get(&k).is_none() {
        let _ = c.insert(k, k);
    }
}

fn moka_op(c: &moka::sync::Cache<u64, u64>, k: u64) {
    if c.get(&k).is_none() {
        c.insert(k, k);
    }
}

fn lru_op(c: &Mutex<lru::LruCache<u64, u64>>, k: u64) {
    let mut g = c.lock().unwrap_or_else(|e| e.into_inner());
    if g.get(&k).is_none() {
        g.put(k, k);
    }
}

fn bench(c: &mut Criterion) {
    let keys = stream();
    let mut group = c.benchmark_group("cache_zipf099");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(20);
    for threads in [1usize, 2] {
        group.throughput(Throughput::Elements(threads as u64));
        let cache = ours(Policy::TinyLfu);
        group.bench_function(BenchmarkId::new("feature_cache_tinylfu", threads), |b| {
            b.iter_custom(|iters| run(&cache, &keys, threads, iters, ours_op))
        });
        let cache = ours(Policy::TinyLfuHillClimber);
        group.bench_function(
            BenchmarkId::new("feature_cache_tinylfu_climber", threads),
            |b| b.iter_custom(|iters| run(&cache, &keys, threads, iters, ours_op)),
        );
        let cache = ours(Policy::Lru);
        group.bench_function(BenchmarkId::new("feature_cache_lru", threads), |b| {
            b.iter_custom(|iters| run(&cache, &keys, threads, iters, ours_op))
        });
        let cache = moka::sync::Cache::new(CAPACITY);
        group.bench_function(BenchmarkId::new("moka", threads), |b| {
            b.iter_custom(|iters| run(&cache, &keys, threads, iters, moka_op))
        });
        let cap = NonZeroUsize::new(CAPACITY as usize).expect("non-zero capacity");
        let cache = Mutex::new(lru::LruCache::new(cap));
        group.bench_function(BenchmarkId::new("mutex_lru", threads), |b| {
            b.iter_custom(|iters| run(&cache, &keys, threads, iters, lru_op))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
