//! Pinning on the real machine: the calling thread and every thread of a
//! rayon pool, read back from the kernel.

use std::sync::mpsc;
use std::time::Duration;

use affinity::{
    current_affinity, pin_current_thread, AffinityConfig, CpuSet, PinMode, PinOutcome, PinStrategy,
    ThreadPlacement,
};

/// Runs `f` on its own thread and fails if it takes longer than 30 s.
fn within_timeout<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("test body did not finish within 30 s (or panicked)")
}

fn profile() -> hw_detect::HardwareProfile {
    hw_detect::HardwareProfile::detect().unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn pinning_the_current_thread_restricts_it_and_can_be_undone() {
    within_timeout(|| {
        let original = current_affinity().expect("linux reports the mask");
        // The last CPU this thread may run on: a real restriction wherever
        // more than one CPU is allowed.
        let target = CpuSet::new([original.max().unwrap()]);
        let out = pin_current_thread(&target);
        assert_eq!(
            out,
            PinOutcome::Pinned {
                cpus: target.clone()
            }
        );
        assert_eq!(current_affinity().as_ref(), Some(&target));
        // The thread runs on that CPU (sched_getcpu), however often it yields.
        for _ in 0..20 {
            std::thread::yield_now();
            // SAFETY: sched_getcpu takes no arguments and only returns a number.
            let cpu = unsafe { libc::sched_getcpu() };
            assert_eq!(usize::try_from(cpu).ok(), target.max());
        }
        assert_eq!(current_affinity().as_ref(), Some(&target));

        // Restore the original mask.
        assert!(pin_current_thread(&original).is_pinned());
        assert_eq!(current_affinity(), Some(original));
    });
}

#[cfg(target_os = "linux")]
#[test]
fn every_pool_thread_runs_where_the_plan_says() {
    within_timeout(|| {
        let allowed = current_affinity().expect("linux reports the mask");
        for mode in [PinMode::OneCpuPerThread, PinMode::WholeSet] {
            let config = AffinityConfig {
                strategy: PinStrategy::Explicit(allowed.as_slice().to_vec()),
                mode,
                threads: Some(allowed.len().min(4)),
                ..AffinityConfig::default()
            };
            let placement = ThreadPlacement::plan(&profile(), &config).unwrap();
            let pinned = placement.build_pool().unwrap();
            let outcomes = pinned.outcomes();
            assert_eq!(outcomes.len(), placement.threads);
            assert!(pinned.all_pinned(), "{outcomes:?}");
            for (i, o) in outcomes.iter().enumerate() {
                assert_eq!(
                    o,
                    &PinOutcome::Pinned {
                        cpus: placement.cpus_for_thread(i)
                    }
                );
            }
            // Ask each thread, from inside the pool, what the kernel says.
            let seen = pinned
                .pool()
                .broadcast(|ctx| (ctx.index(), current_affinity()));
            assert_eq!(seen.len(), placement.threads);
            for (i, mask) in seen {
                assert_eq!(
                    mask,
                    Some(placement.cpus_for_thread(i)),
                    "thread {i} ({mode:?})"
                );
            }
            if mode == PinMode::OneCpuPerThread && allowed.len() >= 2 {
                // Distinct threads on distinct CPUs.
                assert_ne!(placement.cpus_for_thread(0), placement.cpus_for_thread(1));
            }
        }
    });
}

#[test]
fn refusal_is_an_outcome_and_the_pool_still_works() {
    within_timeout(|| {
        // CPU 4000 exists on no test machine: every pool thread is refused
        // (EINVAL on Linux; unsupported elsewhere), and the pool computes anyway.
        let placement = ThreadPlacement {
            requested: PinStrategy::Explicit(vec![4000]),
            strategy: PinStrategy::Explicit(vec![4000]),
            reason: "test".into(),
            cpus: CpuSet::new([4000]),
            order: vec![4000],
            threads: 2,
            mode: PinMode::WholeSet,
            start_timeout_ms: 5000,
        };
        let pinned = placement.build_pool().unwrap();
        let outcomes = pinned.outcomes();
        assert_eq!(outcomes.len(), 2);
        for o in &outcomes {
            assert!(matches!(o, PinOutcome::Unsupported { .. }), "{o:?}");
        }
        assert!(!pinned.all_pinned());
        let total: u64 = pinned.pool().install(|| {
            use rayon::prelude::*;
            (0..10_000u64).into_par_iter().map(|x| x * 2).sum()
        });
        assert_eq!(total, 99_990_000);
    });
}

#[test]
fn the_recommended_count_fits_this_process() {
    let p = profile();
    let n = affinity::recommended_threads(&p);
    assert!(n >= 1);
    assert!(n <= p.cpu.logical, "{n} threads > {} CPUs", p.cpu.logical);
    if let Some(mask) = affinity::process_affinity() {
        assert!(n <= mask.len(), "{n} threads > {} allowed CPUs", mask.len());
    }
}
