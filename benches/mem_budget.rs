//! `MemoryLedger::try_reserve` + drop of the `Reservation`, uncontended and
//! with 2 threads contending on one ledger, against the baseline a program
//! would otherwise write: a `Mutex<u64>` counter checked against a cap.
//!
//! The ledger's machine check reuses a reading up to 50 ms old (the
//! default), so the probe is not on the hot path; the probe here is
//! `hw_detect::Detector`, the real one.
//!
//! `cargo bench --bench mem_budget`

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hw_detect::{Detector, HardwareProfile};
use mem_budget::{Budget, Category, MemoryLedger};

/// Runs `iters` pairs on each of `threads` threads; returns wall time.
fn run<F: Fn() + Sync>(threads: usize, iters: u64, pair: F) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..iters {
                    pair();
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let profile = HardwareProfile::detect().expect("profile");
    let ledger = MemoryLedger::new(Budget::from_profile(&profile), Detector::new());
    let cap = ledger.cap(Category::Buffers);
    let baseline = Mutex::new(0u64);

    let mut group = c.benchmark_group("reserve_drop_pair");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for threads in [1usize, 2] {
        group.bench_with_input(BenchmarkId::new("ledger", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                run(t, iters, || {
                    let r = ledger
                        .try_reserve(Category::Buffers, black_box(4096))
                        .expect("4 KiB fits");
                    drop(black_box(r));
                })
            })
        });
        group.bench_with_input(
            BenchmarkId::new("mutex_counter", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    run(t, iters, || {
                        {
                            let mut used = baseline.lock().unwrap();
                            assert!(*used + 4096 <= cap);
                            *used += black_box(4096);
                        }
                        *baseline.lock().unwrap() -= 4096;
                    })
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
