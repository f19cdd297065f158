//! Miniature simulations that tune W-TinyLFU to the workload.
//!
//! A share of the keys (at most one in sixteen), chosen by hash, is replayed through thirteen
//! small caches of the same policy: twelve, one per setting of three knobs: the
//! window's share of the capacity (1 %, 30 %, 60 %), the sketch's aging
//! period (10 or 20 × the entry count), and how lenient admission is:
//! *strict* (a candidate whose frequency estimate ties the victim's is
//! rejected, and the ghost of rejected candidates is ignored) or *lenient*
//! (ties are admitted, and a rejected candidate that returns while the ghost
//! remembers it enters main directly). Strict admission holds a loop larger
//! than the cache; lenient admission follows recency. The thirteenth has a
//! 99 % window with lenient admission (close to plain LRU), for workloads
//! whose past frequency misleads (a drifting hot set). A miniature holds the
//! same share of the capacity as the share of keys it sees, so it behaves as
//! the full cache would under its setting (spatial sampling, after
//! Waldspurger et al., "Cache Modeling and Optimization using Miniature
//! Simulations", USENIX ATC 2017).
//!
//! After every period (as many sampled requests as a miniature holds
//! entries) each miniature's hits join a decayed score, and the real shards
//! get the settings' mix weighted by a softmax of the scores, with a
//! temperature of half the scores' noise (the square root of the best
//! score). A clear winner gets its setting; near ties blend, so the real
//! cache does not flap between settings whose difference is noise. The
//! window moves at most 5 % of the capacity per period. The first period
//! only fills the miniatures (none of them has hits to tell the settings
//! apart), so its blend, an even mix of every setting, is not published.

use std::time::Duration;

use crate::hash::{fmix64, hash_key};
use crate::policy::{Entry, Removed, Shard, Tuning};
use crate::Clock;

/// Window shares the miniatures replay.
const WINDOWS: [f64; 3] = [0.01, 0.30, 0.60];
/// Admission rules as (tie, ghost): strict rejects a candidate that ties
/// the victim and ignores the ghost; lenient admits ties and lets a
/// remembered rejected candidate enter main.
const ADMISSIONS: [(f64, f64); 2] = [(0.0, 0.0), (1.0, 1.0)];
/// Sketch aging periods, in multiples of the entry count.
const AGINGS: [f64; 2] = [10.0, 20.0];
/// One more miniature beside the grid: a window of 99 % with lenient
/// admission, close to plain LRU. When recency predicts reuse and past
/// frequency does not (a drifting hot set, a sudden change of workload),
/// the main space of a smaller window fills with keys whose counts are
/// stale; this setting is the one that wins there, and it pulls the blend
/// towards a large window.
const RECENCY: Tuning = Tuning {
    window_share: 0.99,
    tie: 1.0,
    aging: 10.0,
    ghost: 1.0,
};
/// Entries a miniature holds at most.
const MINI_ENTRIES: u64 = 8192;
/// The largest share of the keys sampled (bounds the cost per request).
const MAX_RATE: f64 = 1.0 / 16.0;
/// Below this many entries per miniature the sample is too small to tell
/// the settings apart, and the cache is not tuned.
const MIN_MINI_ENTRIES: u64 = 16;
/// Weight of the previous score at the end of a period.
const DECAY: f64 = 0.9;
/// Softmax temperature, in units of the score's noise.
const TEMPERATURE: f64 = 0.5;
/// Periods whose blend is not published (the miniatures are filling).
const WARM_UP_PERIODS: u64 = 1;
const SAMPLE_SALT: u64 = 0x6a09_e667_f3bc_c909;

/// The miniatures and their scores.
#[derive(Debug)]
pub(crate) struct Tuner {
    threshold: u64,
    minis: Vec<Shard<u64, ()>>,
    settings: Vec<Tuning>,
    scores: Vec<f64>,
    hits: Vec<u64>,
    seen: u64,
    period: u64,
    /// Periods ended so far.
    periods: u64,
    removed: Removed<u64, ()>,
}

impl Tuner {
    /// Miniatures for a cache of `capacity` weight units expected to hold
    /// `entries` entries; `None` when the cache is too small to sample.
    pub(crate) fn new(capacity: u64, entries: u64) -> Option<Self> {
        let entries = entries.max(1);
        let mini_entries = MINI_ENTRIES.min((entries as f64 * MAX_RATE) as u64);
        if mini_entries < MIN_MINI_ENTRIES {
            return None;
        }
        let rate = mini_entries as f64 / entries as f64;
        let mini_capacity = ((capacity as f64 * rate) as u64).max(1);
        let mut settings = Vec::new();
        for window_share in WINDOWS {
            for (tie, ghost) in ADMISSIONS {
                for aging in AGINGS {
                    settings.push(Tuning {
                        window_share,
                        tie,
                        aging,
                        ghost,
                    });
                }
            }
        }
        settings.push(RECENCY);
        let minis = settings
            .iter()
            .map(|&t| {
                let mut m = Shard::new(mini_capacity, true, false, true, mini_entries as usize);
                m.fix(t);
                m
            })
            .collect();
        let n = settings.len();
        Some(Self {
            threshold: (rate * (1u64 << 32) as f64) as u64,
            minis,
            settings,
            scores: vec![0.0; n],
            hits: vec![0; n],
            seen: 0,
            period: mini_entries,
            periods: 0,
            removed: Vec::new(),
        })
    }

    /// The sampling threshold: a key is replayed when
    /// [`sampled`](Self::sampled) says so.
    pub(crate) fn threshold(&self) -> u64 {
        self.threshold
    }

    /// Whether requests for the key with `hash` are replayed, for a tuner
    /// with `threshold`.
    #[inline]
    pub(crate) fn sampled(hash: u64, threshold: u64) -> bool {
        fmix64(hash ^ SAMPLE_SALT) >> 32 < threshold
    }

    /// Replays one request for a sampled key (a hit, or a miss then an
    /// insert of `weight`) through every miniature. At the end of a period,
    /// returns the new tuning.
    pub(crate) fn record(&mut self, hash: u64, weight: u64, clock: &dyn Clock) -> Option<Tuning> {
        // The miniatures' keys are the real keys' hashes; their own hash of
        // that key feeds their sketch, as `hash_key` does for real keys.
        let mini_hash = hash_key(&hash);
        for (m, hits) in self.minis.iter_mut().zip(&mut self.hits) {
            if m.get(&hash, mini_hash, clock, &mut self.removed).is_some() {
                *hits += 1;
            } else if weight <= m.capacity() {
                let entry = Entry {
                    value: (),
                    weight,
                    expires_at: None,
                    tags: Vec::new(),
                    load_time: Duration::ZERO,
                };
                m.insert(hash, mini_hash, entry, &mut self.removed);
            }
            self.removed.clear();
        }
        self.seen += 1;
        if self.seen < self.period {
            return None;
        }
        self.seen = 0;
        for (score, hits) in self.scores.iter_mut().zip(&mut self.hits) {
            *score = *score * DECAY + *hits as f64;
            *hits = 0;
        }
        self.periods += 1;
        // The first period fills the miniatures; its blend says nothing.
        (self.periods > WARM_UP_PERIODS).then(|| self.blend())
    }

    /// The settings weighted by a softmax of their scores.
    fn blend(&self) -> Tuning {
        let best = self.scores.iter().copied().fold(0.0, f64::max);
        let temperature = TEMPERATURE * best.max(1.0).sqrt();
        let weights: Vec<f64> = self
            .scores
            .iter()
            .map(|s| ((s - best) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mix = |f: fn(&Tuning) -> f64| -> f64 {
            self.settings
                .iter()
                .zip(&weights)
                .map(|(t, w)| f(t) * w)
                .sum::<f64>()
                / total
        };
        Tuning {
            window_share: mix(|t| t.window_share),
            tie: mix(|t| t.tie),
            aging: mix(|t| t.aging),
            ghost: mix(|t| t.ghost),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SystemClock;

    #[test]
    fn too_small_caches_are_not_tuned() {
        assert!(Tuner::new(100, 100).is_none());
        let t = Tuner::new(10_000, 10_000).expect("large enough");
        assert_eq!(t.minis.len(), 13);
        assert_eq!(t.period, 625);
        // One key in sixteen is sampled.
        let sampled = (0..80_000u64)
            .filter(|&k| Tuner::sampled(fmix64(k), t.threshold()))
            .count();
        assert!((4_500..5_500).contains(&sampled), "{sampled} of 80,000");
    }

    #[test]
    fn blend_follows_a_clear_winner_and_mixes_ties() {
        let mut t = Tuner::new(100_000, 100_000).expect("large enough");
        t.scores = vec![100.0; 13];
        t.scores[11] = 1000.0; // window 60 %, lenient admission, aging 20
        let clear = t.blend();
        assert!((clear.window_share - 0.6).abs() < 1e-6, "{clear:?}");
        assert!((clear.tie - 1.0).abs() < 1e-6);
        assert!((clear.ghost - 1.0).abs() < 1e-6);
        assert!((clear.aging - 20.0).abs() < 1e-6);
        t.scores[12] = 1000.0; // the recency setting ties the winner
        let pair = t.blend();
        assert!((pair.window_share - 0.795).abs() < 1e-6, "{pair:?}");
        t.scores = vec![500.0; 13];
        let even = t.blend();
        let mean_window = (WINDOWS.iter().sum::<f64>() * 4.0 + 0.99) / 13.0;
        assert!((even.window_share - mean_window).abs() < 1e-9, "{even:?}");
        assert!((even.tie - 7.0 / 13.0).abs() < 1e-9);
        assert!((even.ghost - 7.0 / 13.0).abs() < 1e-9);
        assert!((even.aging - 190.0 / 13.0).abs() < 1e-9);
    }

    #[test]
    fn the_first_period_is_not_published() {
        let clock = SystemClock;
        let mut t = Tuner::new(10_000, 10_000).expect("large enough");
        let mut published = Vec::new();
        let mut key = 0u64;
        while published.len() < 2 {
            key += 1;
            let hash = fmix64(key % 3_000);
            if Tuner::sampled(hash, t.threshold()) {
                if let Some(tuning) = t.record(hash, 1, &clock) {
                    published.push(t.periods);
                    let _ = tuning;
                }
            }
            assert!(key < 1_000_000, "no tuning published");
        }
        assert_eq!(published, vec![2, 3]);
    }

    #[test]
    fn a_loop_larger_than_the_cache_moves_the_tuning_to_strict_admission() {
        // A loop over 10 % more keys than fit: admitting ties or returning
        // rejected candidates replaces keys the loop needs next; strict
        // admission keeps most of the loop resident.
        let clock = SystemClock;
        let mut t = Tuner::new(8_000, 8_000).expect("large enough");
        let mut last = None;
        for i in 0..20 * 8_800u64 {
            let hash = fmix64(i % 8_800);
            if Tuner::sampled(hash, t.threshold()) {
                if let Some(tuning) = t.record(hash, 1, &clock) {
                    last = Some(tuning);
                }
            }
        }
        let last = last.expect("at least one period ended");
        assert!(
            last.tie < 0.05 && last.ghost < 0.05 && last.window_share < 0.05,
            "the tuning did not follow the loop: {last:?}, scores {:?}",
            t.scores
        );
    }

    #[test]
    fn a_recency_workload_moves_the_tuning_to_a_large_window() {
        // Every key is requested twice, about 3,000 distinct keys apart, in
        // a cache of 8,000 entries: a 60 % window (4,800 entries) holds the
        // repeats; a 1 % or 30 % one hands them to a main space full of
        // keys seen twice, where a key seen once loses every duel.
        let clock = SystemClock;
        let mut t = Tuner::new(8_000, 8_000).expect("large enough");
        let mut last = None;
        for i in 0..400_000u64 {
            let key = if i % 2 == 0 {
                i / 2
            } else {
                (i / 2).saturating_sub(1_500)
            };
            let hash = fmix64(key);
            if Tuner::sampled(hash, t.threshold()) {
                if let Some(tuning) = t.record(hash, 1, &clock) {
                    last = Some(tuning);
                }
            }
        }
        let last = last.expect("at least one period ended");
        assert!(
            last.window_share > 0.55,
            "the window did not follow the workload: {last:?}, scores {:?}",
            t.scores
        );
    }

    #[test]
    fn a_drifting_hot_set_moves_the_tuning_to_the_recency_setting() {
        // 85 % of the requests go to a hot set of 4,000 keys that drifts by
        // one key every four requests, the rest to 400,000 cold keys, in a
        // cache of 8,000 entries: a key stays hot for 16,000 requests, so
        // the counts in a frequency-filtered main space go stale, and only
        // a window close to the whole cache keeps up.
        let clock = SystemClock;
        let mut t = Tuner::new(8_000, 8_000).expect("large enough");
        let mut last = None;
        for i in 0..30 * 8_000u64 {
            let r = fmix64(i ^ 0x5eed);
            let key = if r % 100 < 85 {
                i / 4 + (r >> 32) % 4_000
            } else {
                (1 << 40) + (r >> 32) % 400_000
            };
            let hash = fmix64(key);
            if Tuner::sampled(hash, t.threshold()) {
                if let Some(tuning) = t.record(hash, 1, &clock) {
                    last = Some(tuning);
                }
            }
        }
        let last = last.expect("at least one period ended");
        assert!(
            last.window_share > 0.9 && last.tie > 0.9,
            "the tuning did not follow the drifting hot set: {last:?}, scores {:?}",
            t.scores
        );
    }
}
