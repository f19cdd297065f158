//! What the miniature simulations of `Policy::TinyLfu` cost in memory: the
//! resident-set growth of a cache of unit-weight entries filled past its
//! capacity, tuned by miniatures against tuned by the hill climber (which
//! keeps no miniatures). Each run is a separate process so that one
//! cache's freed memory does not hide the other's.
//!
//! ```text
//! cargo run --release --example cache_memory [-- CAPACITY ...]
//! ```

use std::process::Command;

use clap::{Parser, ValueEnum};

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

/// The tuning a child process measures.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Tuning {
    /// `Policy::TinyLfu`, tuned by miniature simulations.
    Tuned,
    /// `Policy::TinyLfuHillClimber`, no miniatures.
    Climber,
}

/// RSS growth of a cache tuned by miniatures against one tuned by the hill
/// climber, each filled past its capacity in a process of its own.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Capacities in entries.
    #[arg(default_values_t = [10_000u64, 100_000, 400_000])]
    capacities: Vec<u64>,
    /// Internal: measure one tuning at the first capacity and print the
    /// growth in bytes (the parent runs itself with this).
    #[arg(long, value_enum, hide = true)]
    child: Option<Tuning>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(tuning) = args.child {
        let policy = match tuning {
            Tuning::Tuned => Policy::TinyLfu,
            Tuning::Climber => Policy::TinyLfuHillClimber,
        };
        println!("{}", measure(policy, args.capacities[0])?);
        return Ok(());
    }
    let capacities = args.capacities;
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
