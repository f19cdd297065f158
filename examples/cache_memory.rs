//! What the miniature simulations of `Policy::TinyLfu` cost in memory: the
//! resident-set growth of a cache of unit-weight entries filled past its
//! capacity, tuned by miniatures against tuned by the hill climber (which
//! keeps no miniatures). Each run is a separate process so that one
//! cache's freed memory does not hide the other's.
//!
//! ```text
//! cargo run --release --example cache_memory [CAPACITY ...]
//! ```

use std::process::Command;

use feature_cache::{FeatureCache, Policy, UnitWeigher};

/// Fills a cache of `capacity` entries with `3 × capacity` requests over
/// `2 × capacity` keys; returns the RSS growth in bytes.
fn measure(policy: Policy, capacity: u64) -> Result<u64, Box<dyn std::error::Error>> {
    let (before, _) = snug::process_memory().ok_or("no /proc/self/status")?;
    let cache: FeatureCache<u64, u64> = FeatureCache::builder()
        .capacity(capacity)
        .shards(1)
        .policy(policy)
        .weigher(UnitWeigher)
        .build()?;
    for i in 0..3 * capacity {
        let k = i % (2 * capacity);
        if cache.get(&k).is_none() {
            cache.insert(k, k)?;
        }
    }
    let (after, _) = snug::process_memory().ok_or("no /proc/self/status")?;
    drop(cache);
    Ok(after.saturating_sub(before))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, policy, capacity] = args.as_slice() {
        if flag == "--child" {
            let policy = if policy == "climber" {
                Policy::TinyLfuHillClimber
            } else {
                Policy::TinyLfu
            };
            println!("{}", measure(policy, capacity.parse()?)?);
            return Ok(());
        }
    }
    let capacities: Vec<u64> = if args.is_empty() {
        vec![10_000, 100_000, 400_000]
    } else {
        args.iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("capacities must be entry counts: {e}"))?
    };
    let exe = std::env::current_exe()?;
    let child = |policy: &str, capacity: u64| -> Result<f64, Box<dyn std::error::Error>> {
        let out = Command::new(&exe)
            .args(["--child", policy, &capacity.to_string()])
            .output()?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
        }
        let bytes: u64 = String::from_utf8(out.stdout)?.trim().parse()?;
        Ok(bytes as f64 / f64::from(1 << 20))
    };
    println!("| capacity (entries) | tuned RSS growth (MiB) | climber RSS growth (MiB) | difference (MiB) |");
    println!("|---|---|---|---|");
    for capacity in capacities {
        let tuned = child("tuned", capacity)?;
        let climber = child("climber", capacity)?;
        println!(
            "| {capacity} | {tuned:.1} | {climber:.1} | {:+.1} |",
            tuned - climber
        );
    }
    Ok(())
}
