//! Helpers shared by the snug workspace's examples and benchmarks.
//!
//! The libraries themselves live in `crates/`; this root package only carries
//! the programs in `examples/` and `benches/` and the few helpers they share:
//! seeded workloads, process memory readings and latency percentiles.
//!
//! ```
//! let xs = [5.0, 1.0, 3.0, 2.0, 4.0];
//! assert_eq!(snug::percentile(&xs, 50.0), Some(3.0));
//! ```

pub mod baseline;

use rand::{Rng, SeedableRng};

/// Words the seeded workloads draw from: common English, some technical.
const WORDS: &[&str] = &[
    "the",
    "a",
    "model",
    "memory",
    "runs",
    "on",
    "laptop",
    "with",
    "fast",
    "slow",
    "cache",
    "request",
    "batch",
    "token",
    "sentence",
    "embedding",
    "vector",
    "search",
    "query",
    "result",
    "machine",
    "learning",
    "network",
    "layer",
    "weight",
    "precision",
    "integer",
    "float",
    "budget",
    "server",
    "client",
    "latency",
    "throughput",
    "queue",
    "deadline",
    "priority",
    "thread",
    "core",
    "river",
    "mountain",
    "city",
    "children",
    "played",
    "garden",
    "morning",
    "evening",
    "coffee",
    "book",
    "library",
    "students",
    "teacher",
    "history",
    "science",
    "music",
    "painting",
    "weather",
    "rain",
    "sunny",
    "winter",
    "summer",
    "travel",
    "train",
    "station",
    "market",
    "price",
    "bread",
    "quickly",
    "carefully",
    "because",
    "although",
    "however",
    "therefore",
    "while",
    "after",
    "before",
    "during",
    "between",
    "under",
    "over",
    "through",
    "without",
    "about",
    "against",
    "is",
    "was",
    "are",
    "were",
    "has",
    "had",
    "will",
    "would",
    "could",
    "should",
    "might",
    "must",
    "big",
    "small",
    "old",
    "new",
    "good",
    "bad",
    "happy",
    "quiet",
    "loud",
    "bright",
    "dark",
    "photosynthesis",
    "mitochondria",
    "algorithm",
    "quantization",
    "transformer",
    "tokenizer",
    "database",
    "compiler",
    "kernel",
    "processor",
    "bandwidth",
    "allocation",
    "scheduler",
    "economy",
    "government",
    "election",
    "hospital",
    "doctor",
    "patient",
    "medicine",
    "research",
    "football",
    "match",
    "team",
    "player",
    "scored",
    "goal",
    "minute",
    "season",
    "league",
    "dog",
    "cat",
    "bird",
    "horse",
    "fish",
    "tree",
    "flower",
    "ocean",
    "island",
    "forest",
];

/// A deterministic workload: `n` sentences of `min_words..=max_words` words
/// each, drawn from a fixed vocabulary with a seeded RNG.
///
/// ```
/// let a = snug::sentences(3, 7, 5, 60);
/// assert_eq!(a, snug::sentences(3, 7, 5, 60));
/// assert!(a.iter().all(|s| (5..=60).contains(&s.split(' ').count())));
/// ```
pub fn sentences(n: usize, seed: u64, min_words: usize, max_words: usize) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (lo, hi) = (min_words.max(1), max_words.max(min_words.max(1)));
    (0..n)
        .map(|_| {
            let words = rng.random_range(lo..=hi);
            let mut s = String::new();
            for i in 0..words {
                if i > 0 {
                    s.push(' ');
                }
                s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            }
            s
        })
        .collect()
}

/// `n` pseudo-random token ids below `vocab`, fixed by `salt` (xorshift):
/// the prompts of the generation benches. The first 300 ids (where the
/// special tokens sit) are skipped; `vocab` must be above 300.
pub fn token_prompt(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (300 + x % (vocab as u64 - 300)) as u32
        })
        .collect()
}

/// The index of the largest value (the first of equal ones): greedy
/// decoding's next token.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The `p`-th percentile (0–100, nearest rank) of `values`, or `None` when
/// `values` is empty or `p` is outside 0–100.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Resident set size of this process in bytes, and its peak: the reading
/// of [`hw_detect::ProcessMemory`]. `None` where the system does not report
/// it (`/proc/self/status` exists on Linux only).
pub fn process_memory() -> Option<(u64, u64)> {
    hw_detect::ProcessMemory::read().map(|m| (m.rss, m.peak))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), Some(50.0));
        assert_eq!(percentile(&xs, 99.0), Some(99.0));
        assert_eq!(percentile(&xs, 100.0), Some(100.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&xs, 101.0), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn process_memory_reads_this_process() {
        let (rss, peak) = process_memory().expect("linux has /proc/self/status");
        assert!(rss > 0 && peak >= rss);
    }
}
