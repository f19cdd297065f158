//! Many threads acquire and release at random, with timeouts, while another
//! trims and shrinks the cache. The run must finish in bounded time, never
//! exceed a budget, and leave nothing leased.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use buffer_pool::{BufferPool, BufferPoolConfig, Error, NamedPoolConfig, ZeroOnRelease};

const KIB: usize = 1024;
const TOTAL: usize = 2048 * KIB;
const BUDGETS: [usize; 2] = [1536 * KIB, 1024 * KIB];

/// xorshift64*: a small seeded generator, enough for picking operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_acquire_release_with_timeouts_finishes_without_leaks() {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        run();
        tx.send(()).ok();
    });
    match rx.recv_timeout(Duration::from_secs(45)) {
        Ok(()) => {}
        Err(_) => panic!("stress run did not finish within 45 s: a waiter is stuck"),
    }
    worker.join().unwrap();
}

fn run() {
    let cfg = BufferPoolConfig {
        idle_ttl: Duration::from_millis(2),
        ..BufferPoolConfig::with_budget(TOTAL)
            .pool(NamedPoolConfig::new("activations", BUDGETS[0]))
            .pool(NamedPoolConfig::new("scratch", BUDGETS[1]).zero_on_release(ZeroOnRelease::On))
    };
    let pool = BufferPool::new(cfg).unwrap();
    let ok = Arc::new(AtomicU64::new(0));
    let exhausted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let watcher = {
        let pool = pool.clone();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut rng = Rng(7);
            while !stop.load(Ordering::Relaxed) {
                let s = pool.stats();
                assert!(s.in_use_bytes + s.cached_bytes <= TOTAL, "{s:?}");
                for (p, budget) in s.pools.iter().zip(BUDGETS) {
                    assert!(p.in_use_bytes + p.cached_bytes <= budget, "{p:?}");
                }
                match rng.below(4) {
                    0 => drop(pool.shrink_to(0.25).unwrap()),
                    1 => drop(pool.trim_idle()),
                    _ => {}
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };

    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            let (ok, exhausted) = (Arc::clone(&ok), Arc::clone(&exhausted));
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                let pools = [
                    pool.pool("activations").unwrap(),
                    pool.pool("scratch").unwrap(),
                ];
                let mut held = Vec::new();
                for _ in 0..1500 {
                    let p = &pools[rng.below(2) as usize];
                    let bytes = match rng.below(3) {
                        0 => rng.below(4 * KIB as u64) as usize,
                        1 => rng.below(64 * KIB as u64) as usize,
                        _ => rng.below(400 * KIB as u64) as usize,
                    };
                    let timeout = Duration::from_micros(rng.below(2000));
                    let r = match rng.below(6) {
                        0 => p.try_acquire(bytes).map(|l| vec![l]),
                        1 => p.acquire_all_timeout(&[bytes / 2, bytes / 3, 100], timeout),
                        _ => p.acquire_timeout(bytes, timeout).map(|l| vec![l]),
                    };
                    match r {
                        Ok(mut leases) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            for l in &mut leases {
                                if p.name() == "scratch" {
                                    assert!(l.iter().all(|&b| b == 0), "scratch zeroes on release");
                                }
                                l.fill(0x5A);
                                if rng.below(8) == 0 && l.len() >= 128 {
                                    let tail = l.split_off(64).unwrap();
                                    held.push(tail);
                                }
                            }
                            held.extend(leases);
                        }
                        Err(Error::Exhausted { .. }) => {
                            exhausted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                    // Hold up to a few leases; release at random.
                    while held.len() > 3 || (!held.is_empty() && rng.below(2) == 0) {
                        let k = rng.below(held.len() as u64) as usize;
                        held.swap_remove(k);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();

    let s = pool.stats();
    eprintln!(
        "granted {} exhausted {} hits {} misses {} evictions {} high water {} B",
        ok.load(Ordering::Relaxed),
        exhausted.load(Ordering::Relaxed),
        s.hits,
        s.misses,
        s.pools.iter().map(|p| p.evictions).sum::<u64>(),
        s.high_water_bytes
    );
    assert_eq!(s.in_use_bytes, 0, "everything returned: {s:?}");
    assert_eq!(s.rounding_loss_bytes, 0);
    assert!(s.pools.iter().all(|p| p.leased_buffers == 0));
    assert!(ok.load(Ordering::Relaxed) > 0);
    let exhausted_reported: u64 = s.pools.iter().map(|p| p.exhausted).sum();
    assert_eq!(exhausted_reported, exhausted.load(Ordering::Relaxed));
    pool.shrink_to(0.0).unwrap();
    assert_eq!(pool.stats().cached_bytes, 0);
}
