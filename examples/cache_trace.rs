//! Replays the ARC block traces (OLTP, P3) and prints the hit ratio of
//! feature-cache (LRU, and W-TinyLFU tuned by the hill climber or by miniature
//! simulations) next to moka,
//! quick_cache and plain `lru`, at the capacities the peers usually report.
//!
//! Each request touches `n_blocks` keys from `start_block`; each key is one
//! `get`, and a miss is followed by an `insert` (every entry weighs 1).
//! Our cache runs with one shard so that it is compared whole, as the peers are.
//!
//! ```text
//! cargo run --release --example cache_trace [TRACE_DIR] [oltp|p3] [--ours-only]
//! ```
//! TRACE_DIR defaults to `../shared/traces` (relative to the repository root).

use std::fs::File;
use std::io::Read;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use feature_cache::{FeatureCache, Policy, UnitWeigher};

fn load(path: &Path) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    zstd::stream::read::Decoder::new(file)?.read_to_string(&mut text)?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut f = line.split_whitespace();
        let (Some(start), Some(count)) = (f.next(), f.next()) else {
            continue;
        };
        let start: u64 = start.parse().map_err(|e| format!("line {}: {e}", n + 1))?;
        let count: u64 = count.parse().map_err(|e| format!("line {}: {e}", n + 1))?;
        keys.extend(start..start + count);
    }
    Ok(keys)
}

/// Replays `keys` through `access` (a lookup that inserts on a miss and
/// says whether it hit); returns the hit ratio in percent.
fn replay(keys: &[u64], mut access: impl FnMut(u64) -> bool) -> f64 {
    let hits = keys.iter().filter(|&&k| access(k)).count();
    100.0 * hits as f64 / keys.len() as f64
}

fn ours(keys: &[u64], cap: usize, policy: Policy) -> f64 {
    let cache: FeatureCache<u64, ()> = FeatureCache::builder()
        .capacity(cap as u64)
        .shards(1)
        .policy(policy)
        .weigher(UnitWeigher)
        .build()
        .expect("valid configuration");
    replay(keys, |k| {
        let hit = cache.get(&k).is_some();
        if !hit {
            let _ = cache.insert(k, ());
        }
        hit
    })
}

fn moka(keys: &[u64], cap: usize) -> f64 {
    let cache = moka::sync::Cache::new(cap as u64);
    replay(keys, |k| {
        let hit = cache.get(&k).is_some();
        if !hit {
            cache.insert(k, ());
        }
        hit
    })
}

fn quick(keys: &[u64], cap: usize) -> f64 {
    let mut cache = quick_cache::unsync::Cache::new(cap);
    replay(keys, |k| {
        let hit = cache.get(&k).is_some();
        if !hit {
            cache.insert(k, ());
        }
        hit
    })
}

fn plain_lru(keys: &[u64], cap: usize) -> f64 {
    let mut cache = lru::LruCache::new(NonZeroUsize::new(cap).expect("capacity > 0"));
    replay(keys, |k| {
        let hit = cache.get(&k).is_some();
        if !hit {
            cache.put(k, ());
        }
        hit
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .iter()
        .find(|a| !matches!(a.as_str(), "oltp" | "p3" | "--ours-only"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/traces"));
    let only = args.iter().find(|a| matches!(a.as_str(), "oltp" | "p3"));
    // `--ours-only` skips the LRU policy and the peers (their columns print as –):
    // a quick loop while tuning the admission policy.
    let ours_only = args.iter().any(|a| a == "--ours-only");
    let traces: [(&str, &str, &[usize]); 2] = [
        ("oltp", "arc-OLTP.lis.zst", &[256, 512, 1000, 2000]),
        (
            "p3",
            "arc-P3.lis.zst",
            &[25_000, 50_000, 100_000, 200_000, 400_000],
        ),
    ];
    println!("| trace | capacity | ours LRU % | ours climber % | ours tuned % | moka % | quick_cache % | lru % | ours tuned − best peer (pp) | ours tuned ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, file, caps) in traces {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let keys = load(&dir.join(file))?;
        for &cap in caps {
            if ours_only {
                let t = Instant::now();
                let ours_adm = ours(&keys, cap, Policy::TinyLfu);
                let ms = t.elapsed().as_millis();
                println!("| {name} | {cap} | – | – | {ours_adm:.2} | – | – | – | – | {ms} |");
                continue;
            }
            let ours_lru = ours(&keys, cap, Policy::Lru);
            let ours_climber = ours(&keys, cap, Policy::TinyLfuHillClimber);
            let t = Instant::now();
            let ours_adm = ours(&keys, cap, Policy::TinyLfu);
            let ms = t.elapsed().as_millis();
            let m = moka(&keys, cap);
            let q = quick(&keys, cap);
            let l = plain_lru(&keys, cap);
            let best = m.max(q).max(l);
            println!(
                "| {name} | {cap} | {ours_lru:.2} | {ours_climber:.2} | {ours_adm:.2} | {m:.2} | {q:.2} | {l:.2} | {:+.2} | {ms} |",
                ours_adm - best
            );
        }
    }
    Ok(())
}
