//! Miniature simulations that tune W-TinyLFU to the workload.
//!
//! A share of the keys (at most one in sixteen), chosen by hash, is replayed
//! through thirteen small caches of the same policy: twelve, one per
//! setting of three knobs: the window's share of the capacity (1 %, 30 %,
//! 60 %), the main space's setting (the sketch's aging period of 20 × the
//! entry count with a protected segment of 80 % of the main space, or aging
//! 10 × with a protected segment of 95 %), and how lenient admission is:
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
//! window moves 5 % of the capacity per period towards the blend's share,
//! faster (doubling up to 40 %) only after two periods in a row whose own
//! hits back that direction by a clear margin, so a sustained change is
//! followed within a few periods and a passing phase is not. A period in
//! which at least 3 % of the real shards' requests were short returns
//! (rejected candidates requested again within as many requests as the
//! cache holds entries) grows the window by 20 % at once, when the blend and
//! the period's own hits both favour a larger window. The first period
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
/// The main space's settings as (sketch aging period, in multiples of the
/// entry count; protected segment's share of the main space): a longer
/// memory than Caffeine's with its protected share (20, 80 %), or Caffeine's
/// aging with a larger protected segment (10, 95 %), which holds more of the
/// frequent set when the cache is large next to it.
const MAINS: [(f64, f64); 2] = [(20.0, 0.80), (10.0, 0.95)];
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
    step: 1.0,
    protected: crate::policy::PROTECTED_SHARE,
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
/// Most the window moves per period, as a share of the capacity, unless
/// the evidence is sustained (see [`Tuner::step`]).
pub(crate) const TUNING_STEP: f64 = crate::policy::TUNING_STEP;
/// The share of the best miniature's hits in a period that a move of the
/// window must promise for that period to count as evidence for it.
const MOMENTUM_ENTER: f64 = 0.08;
/// The promise that keeps an established streak of evidence going.
const MOMENTUM_STAY: f64 = 0.04;
/// Periods of evidence in a row before the step grows.
const MOMENTUM_PERIODS: u64 = 2;
/// The largest step, as a share of the capacity.
const MOMENTUM_MAX_STEP: f64 = 0.4;
/// The share of a period's requests (in the real shards) that must be
/// short returns (rejected candidates requested again within as many
/// requests as the cache holds entries) for the window to grow at once by
/// [`SHORT_RETURN_STEP`] towards a larger target (when the period's own
/// miniature hits also favour a larger window).
const SHORT_RETURNS: f64 = 0.03;
/// How far the window grows on a period with that many short returns.
const SHORT_RETURN_STEP: f64 = 0.2;
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
    /// The window share the real shards hold after the tunings published
    /// so far (each moved it towards its target by at most its step).
    window: f64,
    /// Each miniature's hits in the period that just ended.
    last: Vec<f64>,
    streak: u64,
    /// Rejected candidates that returned soon, in the real shards: the
    /// count at the end of the last period, and the last period's.
    short_mark: u64,
    short: u64,
    /// Real requests per period (the sampled period over the rate).
    requests: f64,
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
                for (aging, protected) in MAINS {
                    settings.push(Tuning {
                        window_share,
                        tie,
                        aging,
                        ghost,
                        step: 1.0,
                        protected,
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
            window: crate::policy::INITIAL_WINDOW,
            last: vec![0.0; n],
            streak: 0,
            short_mark: 0,
            short: 0,
            requests: mini_entries as f64 / rate,
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
    pub(crate) fn record(
        &mut self,
        hash: u64,
        weight: u64,
        short_returns: u64,
        clock: &dyn Clock,
    ) -> Option<Tuning> {
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
        self.short = short_returns.wrapping_sub(self.short_mark);
        self.short_mark = short_returns;
        for ((score, hits), last) in self
            .scores
            .iter_mut()
            .zip(&mut self.hits)
            .zip(&mut self.last)
        {
            *score = *score * DECAY + *hits as f64;
            *last = *hits as f64;
            *hits = 0;
        }
        self.periods += 1;
        // The first period fills the miniatures; its blend says nothing.
        if self.periods <= WARM_UP_PERIODS {
            return None;
        }
        let mut tuning = self.blend();
        tuning.step = self.step(tuning.window_share);
        let now = self.window;
        self.window = now + (tuning.window_share - now).clamp(-tuning.step, tuning.step);
        Some(tuning)
    }

    /// The best score at each window share of the grid, as (share, score),
    /// by share.
    fn curve(&self, scores: &[f64]) -> Vec<(f64, f64)> {
        let mut curve: Vec<(f64, f64)> = Vec::new();
        for (t, &s) in self.settings.iter().zip(scores) {
            match curve.iter_mut().find(|(w, _)| *w == t.window_share) {
                Some((_, best)) => *best = best.max(s),
                None => curve.push((t.window_share, s)),
            }
        }
        curve.sort_by(|a, b| a.0.total_cmp(&b.0));
        curve
    }

    /// The score the curve gives the window share `w` (linear between the
    /// grid's shares).
    fn score_at(curve: &[(f64, f64)], w: f64) -> f64 {
        let mut prev = curve[0];
        if w <= prev.0 {
            return prev.1;
        }
        for &(x, y) in &curve[1..] {
            if w <= x {
                return prev.1 + (y - prev.1) * (w - prev.0) / (x - prev.0);
            }
            prev = (x, y);
        }
        prev.1
    }

    /// How far the window may move on this tuning, towards `target`.
    ///
    /// The window moves by [`TUNING_STEP`] unless the period that just
    /// ended is itself clear evidence for the move: its own hits (not the
    /// decayed scores) put the best window share on the same side of the
    /// window as the blend's target, and promise more than
    /// [`MOMENTUM_ENTER`] of the best miniature's hits over the window the
    /// shards hold now. After [`MOMENTUM_PERIODS`] such periods in a row the
    /// step doubles with each further one (while the promise stays above
    /// [`MOMENTUM_STAY`]), up to [`MOMENTUM_MAX_STEP`]; any other period
    /// starts the count again. A workload whose need is sustained (a
    /// drifting hot set, a switch to another workload) is followed within
    /// a few periods; a phase that one or two periods contradict moves the
    /// window at the slow rate, so the cache does not trade its frequent
    /// set for a phase that is already over.
    fn step(&mut self, target: f64) -> f64 {
        let raw = self.curve(&self.last);
        let (best_share, best) =
            raw.iter()
                .copied()
                .fold((0.0, 0.0), |a, c| if c.1 > a.1 { c } else { a });
        let promise = if best > 0.0 {
            (best - Self::score_at(&raw, self.window)) / best
        } else {
            0.0
        };
        let agrees = (target - self.window).signum() == (best_share - self.window).signum()
            && target != self.window;
        let sustained = self.streak >= MOMENTUM_PERIODS && promise > MOMENTUM_STAY;
        // Short returns in the real shards: their rate over the period is
        // direct evidence for a larger window, counted over every request
        // rather than the sample; acted on when the period's own hits also
        // put the best window above the shards'.
        if target > self.window && agrees && self.short as f64 >= SHORT_RETURNS * self.requests {
            self.streak += 1;
            return SHORT_RETURN_STEP;
        }
        self.streak = if agrees && (promise > MOMENTUM_ENTER || sustained) {
            self.streak + 1
        } else {
            0
        };
        if self.streak < MOMENTUM_PERIODS {
            return TUNING_STEP;
        }
        let doublings = (self.streak - MOMENTUM_PERIODS + 1).min(16) as i32;
        (TUNING_STEP * 2f64.powi(doublings)).min(MOMENTUM_MAX_STEP)
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
            step: crate::policy::TUNING_STEP,
            protected: mix(|t| t.protected),
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
        t.scores[10] = 1000.0; // window 60 %, lenient admission, aging 20
        let clear = t.blend();
        assert!((clear.window_share - 0.6).abs() < 1e-6, "{clear:?}");
        assert!((clear.tie - 1.0).abs() < 1e-6);
        assert!((clear.ghost - 1.0).abs() < 1e-6);
        assert!((clear.aging - 20.0).abs() < 1e-6);
        assert!((clear.protected - 0.8).abs() < 1e-6);
        t.scores[12] = 1000.0; // the recency setting ties the winner
        let pair = t.blend();
        assert!((pair.window_share - 0.795).abs() < 1e-6, "{pair:?}");
        t.scores[9] = 2000.0; // window 60 %, strict admission, protected 95 %
        let protect = t.blend();
        assert!((protect.protected - 0.95).abs() < 1e-6, "{protect:?}");
        assert!(protect.tie.abs() < 1e-6 && (protect.aging - 10.0).abs() < 1e-6);
        t.scores = vec![500.0; 13];
        let even = t.blend();
        let mean_window = (WINDOWS.iter().sum::<f64>() * 4.0 + 0.99) / 13.0;
        assert!((even.window_share - mean_window).abs() < 1e-9, "{even:?}");
        assert!((even.tie - 7.0 / 13.0).abs() < 1e-9);
        assert!((even.ghost - 7.0 / 13.0).abs() < 1e-9);
        assert!((even.aging - 190.0 / 13.0).abs() < 1e-9);
        assert!((even.protected - 11.3 / 13.0).abs() < 1e-9);
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
                if let Some(tuning) = t.record(hash, 1, 0, &clock) {
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
                if let Some(tuning) = t.record(hash, 1, 0, &clock) {
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
                if let Some(tuning) = t.record(hash, 1, 0, &clock) {
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

    /// Request `i` of a drifting hot set: 85 % of the requests go to a hot
    /// set of 4,000 keys that drifts by one key every four requests, the
    /// rest to 400,000 cold keys.
    fn drifting_hot_set_key(i: u64) -> u64 {
        let r = fmix64(i ^ 0x5eed);
        if r % 100 < 85 {
            i / 4 + (r >> 32) % 4_000
        } else {
            (1 << 40) + (r >> 32) % 400_000
        }
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
            let hash = fmix64(drifting_hot_set_key(i));
            if Tuner::sampled(hash, t.threshold()) {
                if let Some(tuning) = t.record(hash, 1, 0, &clock) {
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

    /// The last period's hits: `recency` for the 99 % window's setting,
    /// `other` for every other one.
    fn last_period(t: &mut Tuner, other: f64, recency: f64) {
        for (h, setting) in t.last.iter_mut().zip(&t.settings) {
            *h = if setting.window_share > 0.9 {
                recency
            } else {
                other
            };
        }
    }

    #[test]
    fn the_step_grows_only_while_each_period_is_evidence_for_the_move() {
        let mut t = Tuner::new(100_000, 100_000).expect("large enough");
        // One period whose own hits favour the 99 % window by half is not
        // enough; the second in a row doubles the step, and every further
        // one doubles it again up to the largest step.
        last_period(&mut t, 500.0, 1_000.0);
        let steps: Vec<f64> = (0..5).map(|_| t.step(0.99)).collect();
        assert_eq!(steps, vec![0.05, 0.1, 0.2, 0.4, 0.4]);
        // A period of near ties (2 % apart) ends the streak.
        last_period(&mut t, 980.0, 1_000.0);
        assert_eq!(t.step(0.99), TUNING_STEP);
        last_period(&mut t, 500.0, 1_000.0);
        assert_eq!(t.step(0.99), TUNING_STEP);
        assert_eq!(t.step(0.99), 0.1);
        // Once established, a smaller promise (6 %) keeps it going.
        last_period(&mut t, 940.0, 1_000.0);
        assert_eq!(t.step(0.99), 0.2);
        // A period whose hits point the other way than the blend's target
        // (the decayed scores still favour a large window, the last period
        // a small one) is no evidence, however large its promise.
        last_period(&mut t, 1_000.0, 500.0);
        assert_eq!(t.step(0.99), TUNING_STEP);
        assert_eq!(t.step(0.99), TUNING_STEP);
    }

    #[test]
    fn short_returns_grow_the_window_at_once() {
        let mut t = Tuner::new(100_000, 100_000).expect("large enough");
        // Near ties in the miniatures: the slow step.
        last_period(&mut t, 980.0, 1_000.0);
        assert_eq!(t.step(0.99), TUNING_STEP);
        // 3 % of the period's requests were short returns: the window
        // grows by the short-return step at once.
        t.short = (SHORT_RETURNS * t.requests).ceil() as u64;
        assert_eq!(t.step(0.99), SHORT_RETURN_STEP);
        // Not towards a smaller target, not when the period's own hits
        // favour a smaller window, and not below the rate.
        assert_eq!(t.step(0.005), TUNING_STEP);
        t.window = 0.5;
        last_period(&mut t, 1_000.0, 500.0);
        assert_eq!(t.step(0.99), TUNING_STEP);
        last_period(&mut t, 980.0, 1_000.0);
        t.short = (SHORT_RETURNS * t.requests) as u64 - 1;
        assert_eq!(t.step(0.99), TUNING_STEP);
    }

    #[test]
    fn a_drifting_hot_set_moves_the_window_within_a_few_periods() {
        // The workload of the test above: the recency setting wins every
        // period, so after two periods of evidence the window moves faster
        // than 5 % of the capacity per period. At 5 % it would need 18
        // published periods to grow from 1 % to 90 %.
        let clock = SystemClock;
        let mut t = Tuner::new(8_000, 8_000).expect("large enough");
        let mut reached = None;
        for i in 0..30 * 8_000u64 {
            let hash = fmix64(drifting_hot_set_key(i));
            if Tuner::sampled(hash, t.threshold())
                && t.record(hash, 1, 0, &clock).is_some()
                && t.window > 0.9
                && reached.is_none()
            {
                reached = Some(t.periods);
            }
        }
        let reached = reached.expect("the window never reached 90 %");
        assert!(
            reached <= 12,
            "the window reached 90 % after {reached} periods"
        );
    }
}
