//! Replays cache traces and prints the hit ratio of feature-cache (LRU, and
//! W-TinyLFU tuned by the hill climber or by miniature simulations) next to
//! moka, quick_cache and plain `lru`.
//!
//! The fixed table (the default) replays the ARC block traces OLTP, P3 and
//! P2 at the capacities peers usually report, and four seeded synthetic
//! workloads that break single-policy caches (a loop slightly larger than the
//! cache, scans mixed into Zipf, a shifting hot set, sudden workload
//! changes). `--trace FILE --caps 25000,50000` replays any trace file in the
//! ARC format instead.
//!
//! Each request of a trace touches `n_blocks` keys from `start_block`; each
//! key is one `get`, and a miss is followed by an `insert` (every entry weighs
//! 1). Our cache runs with one shard so that it is compared whole, as the
//! peers are.
//!
//! ```text
//! cargo run --release --example cache_trace                       # the fixed table
//! cargo run --release --example cache_trace -- --only p3,synthetic --ours-only
//! cargo run --release --example cache_trace -- --trace my.lis.zst --caps 25000,50000
//! ```

use std::fs::File;
use std::io::Read;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, ValueEnum};
use feature_cache::{FeatureCache, Policy, UnitWeigher};

/// Replays cache traces (ARC format, zstd-compressed or plain) and seeded
/// synthetic workloads through feature-cache and its peers; prints hit ratios.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory holding arc-OLTP.lis.zst, arc-P3.lis.zst and arc-P2.lis.zst
    /// (the fixed table).
    #[arg(long, default_value = "traces")]
    traces: PathBuf,
    /// Replay this trace file (lines `start_block n_blocks ignored
    /// request_no`, zstd-compressed or not) instead of the fixed table.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Capacities in entries, comma-separated. With --trace the default is
    /// 25000,50000,100000,200000,400000; for the fixed table they replace
    /// each part's own capacities.
    #[arg(long, value_delimiter = ',')]
    caps: Option<Vec<usize>>,
    /// Parts of the fixed table to replay, comma-separated (all by default).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Part>,
    /// Replay only our default policy (the other columns print as –).
    #[arg(long)]
    ours_only: bool,
    /// Replays of moka per capacity, its best reported (moka's admission is
    /// randomised, so its hit ratio varies between runs).
    #[arg(long, default_value_t = 1)]
    moka_runs: usize,
}

/// A part of the fixed table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Oltp,
    P3,
    P2,
    Synthetic,
}

/// Reads an ARC-format trace, zstd-compressed or plain, into its key stream.
fn load(path: &Path) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let mut raw = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let text = if raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut text = String::new();
        zstd::stream::read::Decoder::new(raw.as_slice())?.read_to_string(&mut text)?;
        text
    } else {
        String::from_utf8(raw).map_err(|e| format!("{}: {e}", path.display()))?
    };
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut f = line.split_whitespace();
        let (Some(start), Some(count)) = (f.next(), f.next()) else {
            continue;
        };
        let start: u64 = start.parse().map_err(|e| format!("line {}: {e}", n + 1))?;
        let count: u64 = count.parse().map_err(|e| format!("line {}: {e}", n + 1))?;
        keys.extend(start..start.saturating_add(count));
    }
    if keys.is_empty() {
        return Err(format!("{}: no requests", path.display()).into());
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

/// SplitMix64: a small seeded generator, so that the synthetic workloads
/// are the same on every machine and with every version of `rand`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Zipf-distributed ranks 0..n (rank 0 the most frequent) by inverse CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for i in 1..=n {
            total += 1.0 / (i as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Self(cdf)
    }

    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        self.0.partition_point(|&c| c < u) as u64
    }
}

/// Key spaces of the synthetic workloads never overlap: each gets its own
/// high bits, and the ranks of a Zipf are scattered within their space.
fn space(id: u64, i: u64) -> u64 {
    (id << 48) | (i.wrapping_mul(0x9e37_79b9) & ((1 << 48) - 1))
}

/// Zipf 0.99 over `10 × cap` keys of space `id`, `len` requests.
fn zipf_phase(out: &mut Vec<u64>, rng: &mut Rng, cap: u64, id: u64, len: u64) {
    let z = Zipf::new((10 * cap) as usize, 0.99);
    out.extend((0..len).map(|_| space(id, z.sample(rng))));
}

/// A hot set of `cap / 2` keys that drifts by one key every four requests
/// (85 % of the requests, uniform over the hot set), the rest uniform over
/// `50 × cap` cold keys: recency predicts reuse, past frequency does not.
fn shifting_phase(out: &mut Vec<u64>, rng: &mut Rng, cap: u64, id: u64, len: u64) {
    let hot = (cap / 2).max(1);
    for i in 0..len {
        let base = i / 4;
        if rng.unit() < 0.85 {
            out.push(space(id, base + rng.below(hot)));
        } else {
            out.push(space(id + 1, rng.below(50 * cap)));
        }
    }
}

/// The synthetic workloads for a cache of `cap` entries, by name.
fn synthetic(cap: u64) -> Vec<(&'static str, Vec<u64>)> {
    let mut out = Vec::new();
    let mut rng = Rng(0x5eed_0000 ^ cap);

    // A loop over 10 % more keys than fit, 20 times: LRU never hits.
    let n = cap + cap / 10;
    out.push(("loop 1.1×", (0..20 * n).map(|i| space(1, i % n)).collect()));

    // Zipf 0.99 over 10 × cap keys, 4 × cap requests at a time, each
    // followed by a scan of cap never-repeated keys; 10 rounds.
    let mut keys = Vec::new();
    let z = Zipf::new((10 * cap) as usize, 0.99);
    let mut fresh = 0;
    for _ in 0..10 {
        keys.extend((0..4 * cap).map(|_| space(2, z.sample(&mut rng))));
        keys.extend((0..cap).map(|j| space(3, fresh + j)));
        fresh += cap;
    }
    out.push(("zipf+scan", keys));

    let mut keys = Vec::new();
    shifting_phase(&mut keys, &mut rng, cap, 4, 30 * cap);
    out.push(("shifting hot set", keys));

    // Frequency, then recency, then frequency again, each on new keys.
    let mut keys = Vec::new();
    zipf_phase(&mut keys, &mut rng, cap, 6, 15 * cap);
    shifting_phase(&mut keys, &mut rng, cap, 7, 15 * cap);
    zipf_phase(&mut keys, &mut rng, cap, 9, 15 * cap);
    out.push(("zipf→hot set→zipf", keys));
    out
}

fn header() {
    println!("| trace | capacity | ours LRU % | ours climber % | ours tuned % | moka % | quick_cache % | lru % | ours tuned − best peer (pp) | ours tuned ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
}

fn row(name: &str, keys: &[u64], cap: usize, args: &Args) {
    let t = Instant::now();
    let tuned = ours(keys, cap, Policy::TinyLfu);
    let ms = t.elapsed().as_millis();
    if args.ours_only {
        println!("| {name} | {cap} | – | – | {tuned:.2} | – | – | – | – | {ms} |");
        return;
    }
    let ours_lru = ours(keys, cap, Policy::Lru);
    let climber = ours(keys, cap, Policy::TinyLfuHillClimber);
    let m = (0..args.moka_runs.max(1))
        .map(|_| moka(keys, cap))
        .fold(f64::MIN, f64::max);
    let q = quick(keys, cap);
    let l = plain_lru(keys, cap);
    let best = m.max(q).max(l);
    println!(
        "| {name} | {cap} | {ours_lru:.2} | {climber:.2} | {tuned:.2} | {m:.2} | {q:.2} | {l:.2} | {:+.2} | {ms} |",
        tuned - best
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.caps.as_ref().is_some_and(|c| c.contains(&0)) {
        return Err("--caps: every capacity must be at least 1".into());
    }
    header();
    if let Some(path) = &args.trace {
        let keys = load(path)?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let caps = args
            .caps
            .clone()
            .unwrap_or_else(|| vec![25_000, 50_000, 100_000, 200_000, 400_000]);
        for cap in caps {
            row(&name, &keys, cap, &args);
        }
        return Ok(());
    }
    let wanted = |p: Part| args.only.is_empty() || args.only.contains(&p);
    let traces: [(Part, &str, &str, &[usize]); 3] = [
        (
            Part::Oltp,
            "oltp",
            "arc-OLTP.lis.zst",
            &[256, 512, 1000, 2000],
        ),
        (
            Part::P3,
            "p3",
            "arc-P3.lis.zst",
            &[25_000, 50_000, 100_000, 200_000, 400_000],
        ),
        (
            Part::P2,
            "p2",
            "arc-P2.lis.zst",
            &[25_000, 50_000, 100_000, 200_000, 400_000],
        ),
    ];
    for (part, name, file, caps) in traces {
        if !wanted(part) {
            continue;
        }
        let keys = load(&args.traces.join(file))?;
        for &cap in args.caps.as_deref().unwrap_or(caps) {
            row(name, &keys, cap, &args);
        }
    }
    if wanted(Part::Synthetic) {
        for &cap in args.caps.as_deref().unwrap_or(&[2_000, 20_000]) {
            for (name, keys) in synthetic(cap as u64) {
                row(name, &keys, cap, &args);
            }
        }
    }
    Ok(())
}
