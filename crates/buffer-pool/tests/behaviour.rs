//! Behaviour of the pool through its public API.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use buffer_pool::{
    BufferPool, BufferPoolConfig, Error, FreeReason, NamedPoolConfig, PoolEvent, TrimReason,
    ZeroOnRelease,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn pool(budget: usize) -> BufferPool {
    BufferPool::new(BufferPoolConfig::with_budget(budget)).unwrap()
}

#[test]
fn released_buffer_is_reused_by_same_class() {
    let p = pool(MIB);
    let a = p.try_acquire(4000).unwrap();
    let addr = a.as_ptr();
    assert_eq!(a.len(), 4000);
    assert_eq!(a.buffer_capacity(), 4096);
    drop(a);
    let b = p.try_acquire(3000).unwrap();
    assert_eq!(b.as_ptr(), addr, "same size class reuses the cached buffer");
    let s = p.stats();
    assert_eq!((s.hits, s.misses), (1, 1));
    assert_eq!(s.in_use_bytes, 4096);
    assert_eq!(s.rounding_loss_bytes, 4096 - 3000);
    assert!((s.utilization_percent - 100.0 * 4096.0 / MIB as f64).abs() < 1e-9);
}

#[test]
fn fresh_buffers_are_zeroed_and_f32_views_aligned() {
    let p = pool(MIB);
    let mut l = p.try_acquire_f32(1001).unwrap();
    assert_eq!(l.len(), 4004);
    assert!(l.iter().all(|&b| b == 0));
    assert_eq!(l.as_ptr() as usize % 64, 0);
    let v = l.as_mut_slice_f32();
    assert_eq!(v.len(), 1001);
    v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
    assert_eq!(l.as_slice_f32()[1000], 1000.0);
    assert_eq!(&l[4..8], &1.0f32.to_ne_bytes());
}

#[test]
fn zero_on_release_clears_data_and_off_keeps_it() {
    let p = BufferPool::new(
        BufferPoolConfig::with_budget(MIB)
            .pool(NamedPoolConfig::new("clean", MIB / 2).zero_on_release(ZeroOnRelease::On))
            .pool(NamedPoolConfig::new("raw", MIB / 2)),
    )
    .unwrap();
    for (name, expect_zero) in [("clean", true), ("raw", false)] {
        let np = p.pool(name).unwrap();
        let mut l = np.try_acquire(10_000).unwrap();
        l.fill(0xAB);
        let mut tail = l.split_off(8192).unwrap();
        tail.fill(0xCD);
        drop(l);
        drop(tail);
        let again = np.try_acquire(10_000).unwrap();
        assert_eq!(np.stats().hits, 1, "{name}");
        assert_eq!(again.iter().all(|&b| b == 0), expect_zero, "{name}");
    }
}

#[test]
fn budget_counts_cached_and_evicts_other_classes() {
    let p = pool(64 * KIB);
    let a = p.try_acquire(32 * KIB).unwrap();
    let b = p.try_acquire(32 * KIB).unwrap();
    assert!(matches!(p.try_acquire(64), Err(Error::Exhausted { .. })));
    drop((a, b));
    let s = p.stats();
    assert_eq!((s.in_use_bytes, s.cached_bytes), (0, 64 * KIB));
    // A 16 KiB request misses; the 32 KiB cached buffers make room.
    let c = p.try_acquire(16 * KIB).unwrap();
    let s = p.stats();
    assert_eq!(s.in_use_bytes, 16 * KIB);
    assert!(s.in_use_bytes + s.cached_bytes <= 64 * KIB);
    assert_eq!(
        s.cached_bytes,
        32 * KIB,
        "exactly one 32 KiB buffer evicted"
    );
    assert_eq!(s.pools[0].evictions, 1);
    drop(c);
}

#[test]
fn pools_share_the_total_and_evict_across_pools() {
    let p = BufferPool::new(
        BufferPoolConfig::with_budget(MIB)
            .pool(NamedPoolConfig::new("a", 768 * KIB))
            .pool(NamedPoolConfig::new("b", 768 * KIB)),
    )
    .unwrap();
    let (a, b) = (p.pool("a").unwrap(), p.pool("b").unwrap());
    drop(a.try_acquire(512 * KIB).unwrap());
    assert_eq!(a.stats().cached_bytes, 512 * KIB);
    // 600 KiB rounds to the 1 MiB class, capped at b's 768 KiB budget.
    let held = b.try_acquire(600 * KIB).unwrap();
    assert_eq!(held.buffer_capacity(), 768 * KIB);
    assert_eq!(a.stats().cached_bytes, 0, "a's cache released for b");
    let s = p.stats();
    assert!(s.in_use_bytes + s.cached_bytes <= MIB);
    // a's own budget leaves room but the total does not.
    let err = a.try_acquire(300 * KIB).unwrap_err();
    match err {
        Error::Exhausted { budget, free, .. } => {
            assert_eq!(budget, MIB);
            assert_eq!(free, 256 * KIB);
        }
        other => panic!("unexpected {other}"),
    }
    drop(held);
}

#[test]
fn exhausted_reports_request_free_budget_and_wait() {
    let p = pool(MIB);
    let _held = p.try_acquire(768 * KIB).unwrap();
    let t = Duration::from_millis(30);
    let err = p.acquire_timeout(300 * KIB, t).unwrap_err();
    match &err {
        Error::Exhausted {
            requested,
            rounded,
            free,
            budget,
            waited,
            ..
        } => {
            assert_eq!(*requested, 300 * KIB);
            assert_eq!(*rounded, 512 * KIB);
            assert_eq!(*free, 0);
            assert_eq!(*budget, MIB);
            assert!(*waited >= t);
        }
        other => panic!("unexpected {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("307200") && msg.contains("1048576"), "{msg}");
    let s = p.stats().pools[0].clone();
    assert_eq!((s.exhausted, s.waits), (1, 1));
}

#[test]
fn too_large_fails_without_waiting() {
    let p = pool(MIB);
    let start = Instant::now();
    let err = p
        .acquire_timeout(MIB + 1, Duration::from_secs(30))
        .unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { requested, budget, .. } if requested == MIB + 1 && budget == MIB)
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    // A request within the budget whose class is above it is capped, and served.
    let l = p.try_acquire(MIB - 1).unwrap();
    assert_eq!(l.buffer_capacity(), MIB);
    assert!(matches!(
        p.try_acquire_f32(usize::MAX),
        Err(Error::SizeOverflow { .. })
    ));
}

#[test]
fn acquire_timeout_is_woken_by_a_release() {
    let p = pool(MIB);
    let held = p.try_acquire(MIB).unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
    });
    let l = p
        .acquire_timeout(512 * KIB, Duration::from_secs(20))
        .unwrap();
    assert_eq!(l.len(), 512 * KIB);
    t.join().unwrap();
    assert_eq!(p.stats().pools[0].waits, 1);
}

#[test]
fn acquire_all_is_all_or_nothing() {
    let p = pool(MIB);
    let held = p.try_acquire(512 * KIB).unwrap();
    let err = p.acquire_all(&[256 * KIB, 512 * KIB]).unwrap_err();
    assert!(matches!(err, Error::Exhausted { requested, .. } if requested == 768 * KIB));
    assert_eq!(
        p.stats().in_use_bytes,
        512 * KIB,
        "nothing taken on failure"
    );
    drop(held);
    let got = p.acquire_all(&[256 * KIB, 0, 512 * KIB]).unwrap();
    assert_eq!(
        got.iter().map(|l| l.len()).collect::<Vec<_>>(),
        [256 * KIB, 0, 512 * KIB]
    );
    assert_eq!(p.stats().in_use_bytes, 768 * KIB);
    assert!(matches!(
        p.acquire_all(&[MIB, 64]),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn jobs_needing_two_buffers_never_deadlock() {
    // Room for one job's pair at a time; each job holds its pair briefly.
    let p = pool(MIB);
    let done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let pair = p
                        .acquire_all_timeout(&[512 * KIB, 400 * KIB], Duration::from_secs(20))
                        .unwrap();
                    std::thread::yield_now();
                    drop(pair);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 80);
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn lease_returns_on_panic() {
    let p = pool(MIB);
    let p2 = p.clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _l = p2.try_acquire(100 * KIB).unwrap();
        panic!("job failed");
    }));
    assert!(r.is_err());
    let s = p.stats();
    assert_eq!(s.in_use_bytes, 0);
    assert_eq!(s.cached_bytes, 128 * KIB);
    assert_eq!(s.pools[0].leased_buffers, 0);
}

#[test]
fn split_pieces_are_disjoint_and_return_together() {
    let p = pool(MIB);
    let mut head = p.try_acquire(1000).unwrap();
    assert!(matches!(
        head.split_off(100),
        Err(Error::SplitMisaligned { at: 100, align: 64 })
    ));
    assert!(matches!(
        head.split_off(1024),
        Err(Error::SplitOutOfRange { .. })
    ));
    let mut mid = head.split_off(256).unwrap();
    let mut tail = mid.split_off(512).unwrap();
    assert_eq!((head.len(), mid.len(), tail.len()), (256, 512, 232));
    head.fill(1);
    mid.as_mut_slice_f32().fill(2.0);
    tail.fill(3);
    assert!(head.iter().all(|&b| b == 1) && tail.iter().all(|&b| b == 3));
    assert!(mid.as_slice_f32().iter().all(|&x| x == 2.0));
    assert_eq!(tail.as_ptr() as usize % 64, 0);
    drop(head);
    drop(mid);
    assert_eq!(
        p.stats().in_use_bytes,
        1024,
        "still leased while a piece lives"
    );
    let t = std::thread::spawn(move || drop(tail));
    t.join().unwrap();
    let s = p.stats();
    assert_eq!((s.in_use_bytes, s.cached_bytes), (0, 1024));
}

#[test]
fn shrink_returns_bytes_to_the_budget() {
    let p = pool(8 * MIB);
    let mut l = p.try_acquire(4 * MIB).unwrap();
    l.as_mut_slice_f32()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = i as f32);
    assert!(matches!(
        l.shrink(5 * MIB),
        Err(Error::ShrinkBeyondLength { .. })
    ));
    l.shrink(4000).unwrap();
    assert_eq!(l.len(), 4000);
    assert_eq!(l.buffer_capacity(), 4096);
    assert_eq!(l.as_ptr() as usize % 64, 0);
    assert!(l
        .as_slice_f32()
        .iter()
        .enumerate()
        .all(|(i, &x)| x == i as f32));
    let s = p.stats();
    assert_eq!((s.in_use_bytes, s.rounding_loss_bytes), (4096, 96));
    l.shrink(0).unwrap();
    assert!(l.is_empty());
    let s = p.stats();
    assert_eq!((s.in_use_bytes, s.cached_bytes), (0, 4096));
}

#[test]
fn idle_buffers_are_trimmed_explicitly_and_on_release() {
    let cfg = BufferPoolConfig {
        idle_ttl: Duration::from_millis(40),
        ..BufferPoolConfig::with_budget(MIB)
    };
    let p = BufferPool::new(cfg).unwrap();
    drop(p.try_acquire(64 * KIB).unwrap());
    assert_eq!(p.trim_idle().buffers, 0, "not idle long enough yet");
    std::thread::sleep(Duration::from_millis(60));
    let r = p.trim_idle();
    assert_eq!((r.buffers, r.bytes), (1, 64 * KIB));
    assert_eq!(p.stats().cached_bytes, 0);
    assert_eq!(p.stats().pools[0].trimmed_bytes, 64 * KIB as u64);

    // Opportunistic: a later release trims what has been idle for the ttl.
    drop(p.try_acquire(64 * KIB).unwrap());
    std::thread::sleep(Duration::from_millis(60));
    drop(p.try_acquire(4 * KIB).unwrap());
    let s = p.stats();
    assert_eq!(
        s.cached_bytes,
        4 * KIB,
        "the idle 64 KiB buffer was trimmed on release"
    );
}

#[test]
fn background_trimmer_releases_idle_buffers() {
    let cfg = BufferPoolConfig {
        idle_ttl: Duration::from_millis(10),
        trim_on_release: false,
        ..BufferPoolConfig::with_budget(MIB)
    };
    let p = BufferPool::new(cfg).unwrap();
    let trimmer = p.spawn_trimmer(Duration::from_millis(5)).unwrap();
    drop(p.try_acquire(64 * KIB).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.stats().cached_bytes > 0 {
        assert!(
            Instant::now() < deadline,
            "trimmer did not trim within 20 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(trimmer);
}

#[test]
fn shrink_to_keeps_a_fraction_of_the_budget() {
    let p =
        BufferPool::new(BufferPoolConfig::with_budget(MIB).pool(NamedPoolConfig::new("x", MIB)))
            .unwrap();
    let leases: Vec<_> = (0..7).map(|_| p.try_acquire(100 * KIB).unwrap()).collect();
    let keep = p.try_acquire(64 * KIB).unwrap();
    drop(leases);
    assert_eq!(p.stats().cached_bytes, 7 * 128 * KIB);
    assert!(matches!(
        p.shrink_to(1.5),
        Err(Error::InvalidFraction { .. })
    ));
    assert!(matches!(
        p.shrink_to(f64::NAN),
        Err(Error::InvalidFraction { .. })
    ));
    let r = p.shrink_to(0.25).unwrap();
    let s = p.stats();
    assert!(s.in_use_bytes + s.cached_bytes <= MIB / 4);
    assert_eq!(r.bytes, 7 * 128 * KIB - s.cached_bytes);
    assert_eq!(s.in_use_bytes, 64 * KIB, "leases untouched");
    p.shrink_to(0.0).unwrap();
    assert_eq!(p.stats().cached_bytes, 0);
    drop(keep);
}

#[test]
fn listeners_see_alloc_free_and_trim() {
    let p = pool(64 * KIB);
    let seen: Arc<Mutex<Vec<PoolEvent>>> = Arc::default();
    let sink = Arc::clone(&seen);
    p.on_event(move |e| sink.lock().unwrap().push(e.clone()));
    drop(p.try_acquire(64 * KIB).unwrap()); // alloc
    drop(p.try_acquire(64 * KIB).unwrap()); // hit: no event
    drop(p.try_acquire(32 * KIB).unwrap()); // alloc after evicting the 64 KiB buffer
    p.shrink_to(0.0).unwrap(); // free + trim
    let events = seen.lock().unwrap().clone();
    let name: Arc<str> = Arc::from("default");
    assert_eq!(
        events,
        vec![
            PoolEvent::Alloc {
                pool: name.clone(),
                bytes: 64 * KIB
            },
            PoolEvent::Free {
                pool: name.clone(),
                bytes: 64 * KIB,
                reason: FreeReason::Evicted
            },
            PoolEvent::Alloc {
                pool: name.clone(),
                bytes: 32 * KIB
            },
            PoolEvent::Free {
                pool: name.clone(),
                bytes: 32 * KIB,
                reason: FreeReason::Shrink
            },
            PoolEvent::Trim {
                pool: name,
                buffers: 1,
                bytes: 32 * KIB,
                reason: TrimReason::Shrink
            },
        ]
    );
}

#[test]
fn configuration_is_checked() {
    let bad =
        |cfg: BufferPoolConfig| matches!(BufferPool::new(cfg), Err(Error::InvalidConfig { .. }));
    assert!(bad(BufferPoolConfig::with_budget(0)));
    assert!(bad(
        BufferPoolConfig::with_budget(MIB).pool(NamedPoolConfig::new("a", 2 * MIB))
    ));
    assert!(bad(
        BufferPoolConfig::with_budget(MIB).pool(NamedPoolConfig::new("a", 0))
    ));
    assert!(bad(BufferPoolConfig::with_budget(MIB)
        .pool(NamedPoolConfig::new("a", 1))
        .pool(NamedPoolConfig::new("a", 1))));
    let p = pool(MIB);
    assert_eq!(p.pool_names(), ["default"]);
    let err = p.pool("nope").unwrap_err();
    assert!(err.to_string().contains("nope") && err.to_string().contains("default"));
    let cfg = BufferPoolConfig::with_budget(3 * MIB)
        .pool(NamedPoolConfig::new("s", MIB).zero_on_release(ZeroOnRelease::On));
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(
        serde_json::from_str::<BufferPoolConfig>(&json).unwrap(),
        cfg
    );
    let d = BufferPoolConfig::default();
    assert_eq!(
        (d.total_budget_bytes, d.idle_ttl),
        (256 * MIB, Duration::from_secs(30))
    );
    assert!(serde_json::from_str::<BufferPoolConfig>(r#"{"idle_ttl": -1}"#).is_err());
    // Durations are milliseconds, as numbers.
    let v: serde_json::Value = serde_json::to_value(&d).unwrap();
    assert_eq!(v["idle_ttl"], serde_json::json!(30000.0));
}

#[test]
fn zero_byte_requests_hold_nothing() {
    let p = pool(MIB);
    let mut l = p.try_acquire(0).unwrap();
    assert!(l.is_empty() && l.pool_name().is_none());
    assert!(l.as_slice_f32().is_empty());
    assert!(l.split_off(0).unwrap().is_empty());
    let s = p.stats();
    assert_eq!((s.hits, s.misses, s.in_use_bytes), (0, 0, 0));
}
