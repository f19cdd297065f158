//! Ledger invariants under arbitrary operation sequences, single- and
//! multi-threaded: use never exceeds a cap, and returns to zero.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hw_detect::{MemoryInfo, MemoryProbe};
use mem_budget::{Budget, Category, LedgerConfig, MemoryLedger, Reservation, MIB};
use proptest::prelude::*;

/// A probe whose available memory moves as the test scripts it.
#[derive(Debug)]
struct Scripted(AtomicU64);

impl MemoryProbe for Scripted {
    fn memory(&self) -> hw_detect::Result<MemoryInfo> {
        Ok(MemoryInfo::new(
            1 << 40,
            self.0.load(Ordering::Relaxed),
            0,
            0,
            None,
        ))
    }
}

fn budget() -> Budget {
    Budget {
        total: 1000 * MIB,
        reserved_os: 100 * MIB,
        max_model: 400 * MIB,
        max_cache: 200 * MIB,
        max_buffers: Some(300 * MIB),
        max_activations: None,
        safety_margin: 100 * MIB,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Reserve(usize, u64),
    Grow(usize, u64),
    Shrink(usize, u64),
    Split(usize, u64),
    Drop(usize),
    Machine(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize, 0..300u64).prop_map(|(c, m)| Op::Reserve(c, m * MIB)),
        (any::<usize>(), 0..200u64).prop_map(|(i, m)| Op::Grow(i, m * MIB)),
        (any::<usize>(), 0..200u64).prop_map(|(i, m)| Op::Shrink(i, m * MIB)),
        (any::<usize>(), 0..100u64).prop_map(|(i, m)| Op::Split(i, m * MIB)),
        any::<usize>().prop_map(Op::Drop),
        (200..2000u64).prop_map(|m| Op::Machine(m * MIB)),
    ]
}

fn check_caps(ledger: &MemoryLedger) -> Result<(), TestCaseError> {
    let s = ledger.stats();
    let sum: u64 = s.categories.iter().map(|c| c.used).sum();
    prop_assert_eq!(sum, s.used);
    prop_assert!(s.used <= s.cap, "overall {} > {}", s.used, s.cap);
    for c in &s.categories {
        prop_assert!(c.used <= c.cap, "{:?} {} > {}", c.category, c.used, c.cap);
        prop_assert!(c.high_water <= c.cap);
    }
    Ok(())
}

fn apply(ledger: &MemoryLedger, probe: &Scripted, held: &mut Vec<Reservation>, op: &Op) {
    match *op {
        Op::Reserve(c, b) => {
            if let Ok(r) = ledger.try_reserve(Category::ALL[c], b) {
                held.push(r);
            }
        }
        Op::Grow(i, b) if !held.is_empty() => {
            let n = held.len();
            let _ = held[i % n].grow(b);
        }
        Op::Shrink(i, b) if !held.is_empty() => {
            let n = held.len();
            held[i % n].shrink(b);
        }
        Op::Split(i, b) if !held.is_empty() => {
            let n = held.len();
            if let Ok(r) = held[i % n].split(b) {
                held.push(r);
            }
        }
        Op::Drop(i) if !held.is_empty() => {
            let n = held.len();
            drop(held.swap_remove(i % n));
        }
        Op::Machine(avail) => probe.0.store(avail, Ordering::Relaxed),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// One thread: the ledger's books match the live reservations exactly.
    #[test]
    fn books_match_live_reservations(ops in proptest::collection::vec(op(), 1..80)) {
        let probe = Arc::new(Scripted(AtomicU64::new(2000 * MIB)));
        let config = LedgerConfig { probe_max_age_ms: 0, ..LedgerConfig::default() };
        let ledger = MemoryLedger::with_config(budget(), probe.clone(), config);
        let mut held = Vec::new();
        for op in &ops {
            apply(&ledger, &probe, &mut held, op);
            check_caps(&ledger)?;
            for c in Category::ALL {
                let live: u64 = held.iter().filter(|r| r.category() == c).map(Reservation::bytes).sum();
                prop_assert_eq!(ledger.used(c), live);
            }
            prop_assert_eq!(ledger.stats().live, held.len() as u64);
        }
        drop(held);
        let s = ledger.stats();
        prop_assert_eq!((s.used, s.live), (0, 0));
    }

    /// Several threads at once: no cap is ever exceeded and everything
    /// returns to zero.
    #[test]
    fn caps_hold_across_threads(per_thread in proptest::collection::vec(proptest::collection::vec(op(), 1..60), 2..5)) {
        let probe = Arc::new(Scripted(AtomicU64::new(2000 * MIB)));
        let ledger = MemoryLedger::with_config(budget(), probe.clone(), LedgerConfig::default());
        let failures = std::thread::scope(|s| {
            let handles: Vec<_> = per_thread
                .iter()
                .map(|ops| {
                    let ledger = ledger.clone();
                    let probe = probe.clone();
                    s.spawn(move || -> Result<(), TestCaseError> {
                        let mut held = Vec::new();
                        for op in ops {
                            apply(&ledger, &probe, &mut held, op);
                            check_caps(&ledger)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("worker panicked")).collect::<Vec<_>>()
        });
        for f in failures {
            f?;
        }
        let s = ledger.stats();
        prop_assert_eq!((s.used, s.live), (0, 0));
        for c in &s.categories {
            prop_assert_eq!(c.used, 0);
        }
    }
}

/// Blocking reservations from several threads all get through as others
/// release, within a bounded time.
#[test]
fn blocking_reservations_take_turns() {
    let probe = Arc::new(Scripted(AtomicU64::new(2000 * MIB)));
    let ledger = MemoryLedger::with_config(budget(), probe, LedgerConfig::default());
    std::thread::scope(|s| {
        for _ in 0..4 {
            let ledger = ledger.clone();
            s.spawn(move || {
                for _ in 0..20 {
                    // 150 MiB of a 200 MiB cache cap: one holder at a time.
                    let r = ledger
                        .reserve_timeout(Category::Cache, 150 * MIB, Duration::from_secs(20))
                        .expect("turn within the timeout");
                    assert!(ledger.used(Category::Cache) <= 200 * MIB);
                    drop(r);
                }
            });
        }
    });
    let s = ledger.stats();
    assert_eq!(s.used, 0);
    assert_eq!(s.category(Category::Cache).high_water, 150 * MIB);
}
