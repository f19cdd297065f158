//! Acquire + release of 4 KiB, 64 KiB and 4 MiB buffers from a `BufferPool`,
//! against a fresh `vec![0u8; n]` and a fresh `Vec::with_capacity(n)` in the
//! same run.
//!
//! Every variant writes one byte per 4 KiB page of the buffer before letting
//! it go: `vec![0; n]` is served by `calloc`, which for large sizes maps fresh
//! pages lazily, so a variant that never touches its memory would time only
//! the bookkeeping. Variants:
//!
//! * `pool_reuse`: lease from a warm pool, touch, drop (contents not cleared);
//! * `pool_reuse_zeroed`: the same with `ZeroOnRelease::On`, so every lease
//!   starts all-zero like `vec![0; n]` (the clearing happens on release);
//! * `vec_zeroed`: `vec![0u8; n]`, touch, drop;
//! * `vec_with_capacity`: `Vec::with_capacity(n)`, touch the spare capacity, drop.
//!
//! After criterion's report the bench prints, for each size, the median time
//! of each variant over its own loop, the ratios against `vec_zeroed`, the
//! cost of the page-touch loop alone (on a buffer kept across calls), and
//! the untouched acquire+release of the pool against an untouched
//! `vec![0u8; n]` (allocation cost alone).
//!
//! Run: `cargo bench --bench buffer_pool`

use std::hint::black_box;
use std::time::{Duration, Instant};

use buffer_pool::{BufferPool, BufferPoolConfig, NamedPoolConfig, ZeroOnRelease};
use criterion::{BenchmarkId, Criterion, Throughput};

const SIZES: [(usize, &str); 3] = [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (4 << 20, "4MiB")];
const PAGE: usize = 4096;

fn touch(buf: &mut [u8]) {
    for i in (0..buf.len()).step_by(PAGE) {
        buf[i] = i as u8 | 1;
    }
    black_box(buf.as_ptr());
}

fn pools() -> (BufferPool, BufferPool) {
    let plain = BufferPool::new(BufferPoolConfig::with_budget(64 << 20)).unwrap();
    let zeroed = BufferPool::new(
        BufferPoolConfig::with_budget(64 << 20)
            .pool(NamedPoolConfig::new("zeroed", 64 << 20).zero_on_release(ZeroOnRelease::On)),
    )
    .unwrap();
    (plain, zeroed)
}

fn pool_once(pool: &BufferPool, n: usize) {
    let mut lease = pool.try_acquire(black_box(n)).unwrap();
    touch(&mut lease);
}

fn vec_zeroed_once(n: usize) {
    let mut v = vec![0u8; black_box(n)];
    touch(&mut v);
    drop(black_box(v));
}

fn vec_with_capacity_once(n: usize) {
    let mut v: Vec<u8> = Vec::with_capacity(black_box(n));
    let spare = v.spare_capacity_mut();
    for i in (0..n).step_by(PAGE) {
        spare[i].write(i as u8 | 1);
    }
    black_box(v.as_ptr());
    drop(black_box(v));
}

fn bench(c: &mut Criterion, plain: &BufferPool, zeroed: &BufferPool) {
    for (n, label) in SIZES {
        let mut g = c.benchmark_group(format!("buffer_pool/{label}"));
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_function(BenchmarkId::from_parameter("pool_reuse"), |b| {
            b.iter(|| pool_once(plain, n))
        });
        g.bench_function(BenchmarkId::from_parameter("pool_reuse_zeroed"), |b| {
            b.iter(|| pool_once(zeroed, n))
        });
        g.bench_function(BenchmarkId::from_parameter("vec_zeroed"), |b| {
            b.iter(|| vec_zeroed_once(n))
        });
        g.bench_function(BenchmarkId::from_parameter("vec_with_capacity"), |b| {
            b.iter(|| vec_with_capacity_once(n))
        });
        g.finish();
    }
}

/// Median nanoseconds per call of `f` over 7 rounds of `iters` calls.
fn median_ns(iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters / 4 + 1 {
        f();
    }
    let rounds: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    snug::percentile(&rounds, 50.0).unwrap_or(f64::NAN)
}

fn summary(plain: &BufferPool, zeroed: &BufferPool) {
    println!("\ntouched (one byte per page written before release), median ns per call:");
    println!("size     pool_reuse pool_zeroed vec_zeroed with_capacity touch_only  vec_zeroed/pool_reuse vec_zeroed/pool_zeroed");
    for (n, label) in SIZES {
        let iters = if n >= 1 << 20 { 200 } else { 20_000 };
        let p = median_ns(iters, || pool_once(plain, n));
        let z = median_ns(iters, || pool_once(zeroed, n));
        let v = median_ns(iters, || vec_zeroed_once(n));
        let w = median_ns(iters, || vec_with_capacity_once(n));
        let mut kept = vec![0u8; n];
        let t = median_ns(iters, || touch(&mut kept));
        println!(
            "{label:<7} {p:>11.0} {z:>11.0} {v:>10.0} {w:>13.0} {t:>10.0} {:>22.1}x {:>22.1}x",
            v / p,
            v / z
        );
    }
    println!("\nuntouched (acquire and release only), median ns per call:");
    println!("size     pool_reuse vec_zeroed  vec_zeroed/pool_reuse");
    for (n, label) in SIZES {
        let iters = if n >= 1 << 20 { 200 } else { 20_000 };
        let p = median_ns(iters, || {
            drop(black_box(plain.try_acquire(black_box(n)).unwrap()))
        });
        let v = median_ns(iters, || drop(black_box(vec![0u8; black_box(n)])));
        println!("{label:<7} {p:>11.0} {v:>10.0} {:>22.1}x", v / p);
    }
    let s = plain.stats();
    println!(
        "pool stats: hits {} misses {} rounding loss of the 4 MiB class {} bytes per lease",
        s.hits,
        s.misses,
        buffer_pool::size_class(4 << 20).unwrap() - (4 << 20)
    );
}

fn main() {
    let (plain, zeroed) = pools();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(800))
        .sample_size(20)
        .configure_from_args();
    bench(&mut c, &plain, &zeroed);
    c.final_summary();
    summary(&plain, &zeroed);
}
