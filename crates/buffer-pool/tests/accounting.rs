//! Property test of the accounting: whatever the sequence of operations,
//! leased + cached bytes never exceed any budget, a request succeeds exactly
//! when its rounded size fits beside the bytes already leased, the reported
//! in-use bytes equal what the live leases hold, and everything returns on drop.

use std::collections::HashMap;

use buffer_pool::{
    size_class, BufferPool, BufferPoolConfig, BufferPoolStats, Lease, NamedPoolConfig,
};
use proptest::prelude::*;

const KIB: usize = 1024;
const TOTAL: usize = 1024 * KIB;
const BUDGETS: [usize; 2] = [768 * KIB, 512 * KIB];
const NAMES: [&str; 2] = ["activations", "scratch"];

#[derive(Debug, Clone)]
enum Op {
    Acquire { pool: usize, bytes: usize },
    AcquireAll { pool: usize, sizes: Vec<usize> },
    Drop { pick: usize },
    Split { pick: usize, at_blocks: usize },
    Shrink { pick: usize, permille: usize },
    TrimIdle,
    ShrinkTo { quarter: u8 },
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..=256, 1usize..=64 * KIB, 1usize..=600 * KIB]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..2, size()).prop_map(|(pool, bytes)| Op::Acquire { pool, bytes }),
        1 => (0usize..2, prop::collection::vec(size(), 0..4))
            .prop_map(|(pool, sizes)| Op::AcquireAll { pool, sizes }),
        3 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
        1 => (any::<usize>(), 0usize..64).prop_map(|(pick, at_blocks)| Op::Split { pick, at_blocks }),
        1 => (any::<usize>(), 0usize..=1000).prop_map(|(pick, permille)| Op::Shrink { pick, permille }),
        1 => Just(Op::TrimIdle),
        1 => (0u8..=4).prop_map(|quarter| Op::ShrinkTo { quarter }),
    ]
}

/// A live lease, the pool it came from and the buffer it belongs to (pieces
/// of a split share one buffer).
struct Held {
    lease: Lease,
    pool: usize,
    buffer: usize,
}

/// The bytes a request takes from the budget, or `None` when it is larger
/// than the pool's budget and can never be served.
fn class(pool: usize, bytes: usize) -> Option<usize> {
    (bytes <= BUDGETS[pool]).then(|| size_class(bytes).unwrap().min(BUDGETS[pool]))
}

fn check(stats: &BufferPoolStats, held: &[Held]) -> Result<(), TestCaseError> {
    prop_assert!(stats.in_use_bytes + stats.cached_bytes <= TOTAL);
    prop_assert!(stats.high_water_bytes <= TOTAL);
    let mut per_buffer: HashMap<usize, (usize, usize)> = HashMap::new();
    for h in held.iter().filter(|h| h.lease.buffer_capacity() > 0) {
        per_buffer.insert(h.buffer, (h.pool, h.lease.buffer_capacity()));
    }
    for (i, p) in stats.pools.iter().enumerate() {
        prop_assert!(
            p.in_use_bytes + p.cached_bytes <= BUDGETS[i],
            "pool {i}: {p:?}"
        );
        prop_assert!(p.high_water_bytes <= BUDGETS[i]);
        let expect: usize = per_buffer
            .values()
            .filter(|(pool, _)| *pool == i)
            .map(|(_, c)| c)
            .sum();
        prop_assert_eq!(p.in_use_bytes, expect, "pool {} in use", i);
        let buffers = per_buffer.values().filter(|(pool, _)| *pool == i).count();
        prop_assert_eq!(p.leased_buffers, buffers);
        prop_assert!(p.rounding_loss_bytes <= p.in_use_bytes);
    }
    prop_assert_eq!(
        stats.in_use_bytes,
        stats.pools.iter().map(|p| p.in_use_bytes).sum::<usize>()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn accounting_holds(ops in prop::collection::vec(op(), 1..60)) {
        let mut cfg = BufferPoolConfig::with_budget(TOTAL);
        for (name, budget) in NAMES.iter().zip(BUDGETS) {
            cfg = cfg.pool(NamedPoolConfig::new(*name, budget));
        }
        let pool = BufferPool::new(cfg).unwrap();
        let handles = [pool.pool(NAMES[0]).unwrap(), pool.pool(NAMES[1]).unwrap()];
        let mut held: Vec<Held> = Vec::new();
        let mut next_buffer = 0usize;
        let mut granted = 0u64;

        for op in ops {
            let before = pool.stats();
            match op {
                Op::Acquire { pool: i, bytes } => {
                    let c = class(i, bytes).unwrap_or(usize::MAX / 4);
                    let fits = before.pools[i].in_use_bytes + c <= BUDGETS[i]
                        && before.in_use_bytes + c <= TOTAL;
                    let r = handles[i].try_acquire(bytes);
                    prop_assert_eq!(r.is_ok(), fits, "{} bytes in pool {}: {:?}", bytes, i, r);
                    if let Ok(lease) = r {
                        prop_assert_eq!(lease.len(), bytes);
                        prop_assert_eq!(lease.buffer_capacity(), c);
                        if c > 0 { granted += 1; }
                        held.push(Held { lease, pool: i, buffer: next_buffer });
                        next_buffer += 1;
                    }
                }
                Op::AcquireAll { pool: i, sizes } => {
                    let sum: usize = sizes.iter().map(|&b| class(i, b).unwrap_or(usize::MAX / 16)).sum();
                    let fits = before.pools[i].in_use_bytes + sum <= BUDGETS[i]
                        && before.in_use_bytes + sum <= TOTAL;
                    let r = handles[i].acquire_all(&sizes);
                    prop_assert_eq!(r.is_ok(), fits);
                    match r {
                        Ok(leases) => {
                            prop_assert_eq!(leases.len(), sizes.len());
                            for (lease, &bytes) in leases.into_iter().zip(&sizes) {
                                prop_assert_eq!(lease.len(), bytes);
                                if bytes > 0 { granted += 1; }
                                held.push(Held { lease, pool: i, buffer: next_buffer });
                                next_buffer += 1;
                            }
                        }
                        Err(_) => {
                            let after = pool.stats();
                            prop_assert_eq!(after.in_use_bytes, before.in_use_bytes, "nothing taken");
                        }
                    }
                }
                Op::Drop { pick } if !held.is_empty() => {
                    held.swap_remove(pick % held.len());
                }
                Op::Split { pick, at_blocks } if !held.is_empty() => {
                    let k = pick % held.len();
                    let at = (at_blocks * 64).min(held[k].lease.len() / 64 * 64);
                    let len = held[k].lease.len();
                    let rest = held[k].lease.split_off(at).unwrap();
                    prop_assert_eq!(held[k].lease.len() + rest.len(), len);
                    let (pool_i, buffer) = (held[k].pool, held[k].buffer);
                    held.push(Held { lease: rest, pool: pool_i, buffer });
                }
                Op::Shrink { pick, permille } if !held.is_empty() => {
                    let k = pick % held.len();
                    let new_len = held[k].lease.len() * permille / 1000;
                    held[k].lease.shrink(new_len).unwrap();
                    prop_assert_eq!(held[k].lease.len(), new_len);
                }
                Op::TrimIdle => { pool.trim_idle(); }
                Op::ShrinkTo { quarter } => {
                    let f = f64::from(quarter) / 4.0;
                    pool.shrink_to(f).unwrap();
                    let s = pool.stats();
                    for (i, p) in s.pools.iter().enumerate() {
                        let target = (BUDGETS[i] as f64 * f) as usize;
                        prop_assert!(p.cached_bytes == 0 || p.in_use_bytes + p.cached_bytes <= target);
                    }
                }
                _ => {}
            }
            check(&pool.stats(), &held)?;
        }
        let s = pool.stats();
        prop_assert_eq!(s.hits + s.misses, granted);
        drop(held);
        let s = pool.stats();
        prop_assert_eq!(s.in_use_bytes, 0);
        prop_assert_eq!(s.rounding_loss_bytes, 0);
        prop_assert!(s.pools.iter().all(|p| p.leased_buffers == 0));
        pool.shrink_to(0.0).unwrap();
        prop_assert_eq!(pool.stats().cached_bytes, 0);
    }
}
