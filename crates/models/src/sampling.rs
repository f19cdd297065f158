//! Choosing the next token from logits, and stopping.
//!
//! [`Sampler`] runs llama.cpp's default order: penalties over the recent
//! tokens (repetition, presence, frequency), top-k, top-p, min-p, then
//! temperature and a draw from a small seeded RNG; temperature 0 is greedy
//! (argmax after penalties). Nothing sorts the whole vocabulary: top-k keeps
//! a heap of k during one pass, min-p is a threshold pass, and top-p sorts
//! only the candidates that survive, in growing prefixes.
//!
//! [`StopMatcher`] watches streamed text for stop strings: it holds back a
//! tail that could be the start of a stop string and never emits text at or
//! past a stop.
//!
//! ```
//! use models::{Sampler, SamplingConfig};
//!
//! let mut greedy = Sampler::new(SamplingConfig::greedy())?;
//! assert_eq!(greedy.sample(&[0.1, 2.0, -1.0])?, 1);
//!
//! let cfg = SamplingConfig { seed: Some(7), ..SamplingConfig::default() };
//! let logits = [1.0, 1.2, 0.9, 1.1];
//! let a: Vec<u32> = { let mut s = Sampler::new(cfg.clone())?; (0..8).map(|_| s.sample(&logits).unwrap()).collect() };
//! let b: Vec<u32> = { let mut s = Sampler::new(cfg)?; (0..8).map(|_| s.sample(&logits).unwrap()).collect() };
//! assert_eq!(a, b); // a seed reproduces the draws
//! # Ok::<(), models::Error>(())
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Sampling settings. The defaults are llama.cpp's (`llama-cli`, `llama-server`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingConfig {
    /// Softmax temperature, `>= 0`; 0 means greedy (argmax). Default 0.8.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all. Default 40.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to
    /// at least `top_p`, in `(0, 1]`; 1 keeps all. Default 0.95.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one, in
    /// `[0, 1]`; 0 keeps all. Default 0.05.
    pub min_p: f32,
    /// Divide a positive logit (multiply a negative one) of every token seen
    /// in the last `penalty_last_n` tokens by this, `> 0`; 1 is off. Default 1.
    pub repeat_penalty: f32,
    /// Subtract this from the logit of every token seen in the window
    /// (any finite value). Default 0.
    pub presence_penalty: f32,
    /// Subtract this times its count in the window from each token's logit
    /// (any finite value). Default 0.
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at; 0 turns them off. Default 64.
    pub penalty_last_n: usize,
    /// Seed of the RNG; `None` seeds from the clock. Default `None`.
    pub seed: Option<u64>,
    /// Stop strings: generation ends before the first one seen (see
    /// [`StopMatcher`]); none may be empty. Default none.
    pub stop: Vec<String>,
    /// Token ids that end generation besides the model's end-of-generation
    /// set. Default none.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
            stop: Vec::new(),
            stop_tokens: Vec::new(),
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding: temperature 0, no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every value against its range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, value: String, range: &'static str| {
            Err(Error::invalid(field, value, range))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                self.temperature.to_string(),
                "a finite value >= 0 (0 is greedy)",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p.to_string(), "(0, 1] (1 keeps all)");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p.to_string(), "[0, 1] (0 keeps all)");
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(
                "repeat_penalty",
                self.repeat_penalty.to_string(),
                "a finite value > 0 (1 is off)",
            );
        }
        if !self.presence_penalty.is_finite() {
            return bad(
                "presence_penalty",
                self.presence_penalty.to_string(),
                "a finite value (0 is off)",
            );
        }
        if !self.frequency_penalty.is_finite() {
            return bad(
                "frequency_penalty",
                self.frequency_penalty.to_string(),
                "a finite value (0 is off)",
            );
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return bad("stop", format!("\"\" (entry {i})"), "non-empty strings");
        }
        Ok(())
    }
}

/// SplitMix64: small, fast, and enough for drawing tokens.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A logit ordered by `total_cmp`, ties broken toward the lower id.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cand {
    logit: f32,
    id: u32,
}

impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cand {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.logit
            .total_cmp(&other.logit)
            .then_with(|| other.id.cmp(&self.id))
    }
}

/// Picks token ids from logits; see the module docs for the order of steps.
#[derive(Debug)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: Rng,
    history: VecDeque<u32>,
    stop_tokens: HashSet<u32>,
    scratch: Vec<f32>,
    cands: Vec<Cand>,
}

impl Sampler {
    /// A sampler for `cfg`; errors name the first value out of range.
    pub fn new(cfg: SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        let seed = cfg.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5EED)
        });
        let stop_tokens = cfg.stop_tokens.iter().copied().collect();
        Ok(Self {
            rng: Rng(seed),
            history: VecDeque::with_capacity(cfg.penalty_last_n.min(4096)),
            stop_tokens,
            scratch: Vec::new(),
            cands: Vec::new(),
            cfg,
        })
    }

    /// Adds the model's end-of-generation tokens (e.g.
    /// [`Tokenizer::eog_tokens`](crate::Tokenizer::eog_tokens)) to the stop tokens.
    pub fn with_stop_tokens(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        self.stop_tokens.extend(ids);
        self
    }

    /// Whether `id` ends generation.
    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_tokens.contains(&id)
    }

    /// The settings.
    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// A matcher for the configured stop strings.
    pub fn stop_matcher(&self) -> StopMatcher {
        StopMatcher {
            stops: self.cfg.stop.clone(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Records tokens the penalties should see (the prompt, or tokens chosen
    /// elsewhere); [`sample`](Self::sample) records its own choices.
    pub fn accept(&mut self, ids: &[u32]) {
        let n = self.cfg.penalty_last_n;
        if n == 0 {
            return;
        }
        for &id in ids {
            if self.history.len() == n {
                self.history.pop_front();
            }
            self.history.push_back(id);
        }
    }

    /// Chooses the next token from `logits` (one per vocabulary token) and
    /// records it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::EmptyLogits { len: 0 });
        }
        let id = self.choose(logits);
        self.accept(&[id]);
        Ok(id)
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut cands = std::mem::take(&mut self.cands);
        let u = self.rng.next_f64();
        let id = {
            let l = penalize(&self.cfg, &self.history, &mut scratch, logits);
            pick(&self.cfg, l, &mut cands, u)
        };
        self.scratch = scratch;
        self.cands = cands;
        id
    }
}

/// `logits` with the penalties for the tokens in `history` applied (a copy
/// in `scratch`), or `logits` itself when no penalty is active.
fn penalize<'a>(
    c: &SamplingConfig,
    history: &VecDeque<u32>,
    scratch: &'a mut Vec<f32>,
    logits: &'a [f32],
) -> &'a [f32] {
    let active = c.penalty_last_n > 0
        && !history.is_empty()
        && (c.repeat_penalty != 1.0 || c.presence_penalty != 0.0 || c.frequency_penalty != 0.0);
    if !active {
        return logits;
    }
    let mut counts: HashMap<u32, u32> = HashMap::with_capacity(history.len());
    for &t in history {
        *counts.entry(t).or_insert(0) += 1;
    }
    scratch.clear();
    scratch.extend_from_slice(logits);
    for (&t, &n) in &counts {
        let Some(l) = scratch.get_mut(t as usize) else {
            continue;
        };
        if c.repeat_penalty != 1.0 {
            *l = if *l > 0.0 {
                *l / c.repeat_penalty
            } else {
                *l * c.repeat_penalty
            };
        }
        *l -= n as f32 * c.frequency_penalty + c.presence_penalty;
    }
    scratch
}

/// Top-k, min-p, top-p, temperature, then the draw at `u` in [0, 1).
fn pick(cfg: &SamplingConfig, logits: &[f32], cands: &mut Vec<Cand>, u: f64) -> u32 {
    let (top_k, top_p, min_p) = (cfg.top_k, cfg.top_p, cfg.min_p);
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    // Top-k: one pass with a min-heap of the k best.
    cands.clear();
    let n = logits.len();
    if top_k > 0 && top_k < n {
        let mut heap: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(top_k + 1);
        for (i, &l) in logits.iter().enumerate() {
            if l.is_nan() {
                continue;
            }
            let c = Cand {
                logit: l,
                id: i as u32,
            };
            if heap.len() < top_k {
                heap.push(Reverse(c));
            } else if heap.peek().is_some_and(|m| c > m.0) {
                heap.pop();
                heap.push(Reverse(c));
            }
        }
        cands.extend(heap.into_iter().map(|r| r.0));
    } else {
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| Cand {
                    logit: l,
                    id: i as u32,
                }),
        );
    }
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    if cands.is_empty() || max == f32::NEG_INFINITY {
        // Nothing has probability: fall back to greedy.
        return argmax(logits);
    }
    // Normaliser of the distribution top-p is measured against.
    let z: f64 = cands.iter().map(|c| ((c.logit - max) as f64).exp()).sum();

    // Min-p is a threshold relative to the best, unchanged by top-p's
    // renormalisation, so it can cut the candidates before top-p sorts.
    if min_p > 0.0 {
        let thr = max + min_p.ln();
        cands.retain(|c| c.logit >= thr);
    }
    // Top-p: sort growing prefixes (largest first) until the mass is reached.
    let keep = if top_p < 1.0 {
        top_p_prefix(cands, max, z, top_p as f64)
    } else {
        cands.len()
    };
    cands.truncate(keep.max(1));

    // Temperature and the draw.
    let t = cfg.temperature as f64;
    let total: f64 = cands
        .iter()
        .map(|c| (((c.logit - max) as f64) / t).exp())
        .sum();
    let mut r = u * total;
    for c in cands.iter() {
        let w = (((c.logit - max) as f64) / t).exp();
        if r < w {
            return c.id;
        }
        r -= w;
    }
    cands[cands.len() - 1].id
}

/// Index of the largest logit (the lowest id among ties; NaN never wins).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_l = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if !found || l > best_l {
            best = i;
            best_l = l;
            found = true;
        }
    }
    best as u32
}

/// Sorts `cands` best first far enough to find the shortest prefix whose
/// probability (against normaliser `z` at `max`) reaches `p`; returns its
/// length. Sorts prefixes of 64, 128, ... so a peaked distribution costs one
/// small selection.
fn top_p_prefix(cands: &mut [Cand], max: f32, z: f64, p: f64) -> usize {
    let n = cands.len();
    let mut m = 64.min(n);
    let mut sorted = 0;
    let mut cum = 0.0;
    loop {
        if m < n {
            cands[sorted..].select_nth_unstable_by(m - sorted - 1, |a, b| b.cmp(a));
        }
        cands[sorted..m].sort_unstable_by(|a, b| b.cmp(a));
        for (i, c) in cands[sorted..m].iter().enumerate() {
            cum += ((c.logit - max) as f64).exp() / z;
            if cum >= p {
                return sorted + i + 1;
            }
        }
        if m == n {
            return n;
        }
        sorted = m;
        m = (m * 2).min(n);
    }
}

/// What [`StopMatcher::push`] lets out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text safe to show: never contains a stop string or any text after one.
    pub text: String,
    /// A stop string was seen: generation should end.
    pub stopped: bool,
}

/// Finds stop strings in streamed text.
///
/// ```
/// use models::StopMatcher;
///
/// let mut m = StopMatcher::new(vec!["\nUser:".to_string()]);
/// let a = m.push("Sure.\nUs");   // "\nUs" could start the stop: held back
/// assert_eq!((a.text.as_str(), a.stopped), ("Sure.", false));
/// let b = m.push("er: next");
/// assert_eq!((b.text.as_str(), b.stopped), ("", true));
/// ```
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds streamed text; returns what can be shown now.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.stopped {
            return StopOutput {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        // The earliest complete stop ends the text.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(pos) = first {
            let out = self.held[..pos].to_string();
            self.held.clear();
            self.stopped = true;
            return StopOutput {
                text: out,
                stopped: true,
            };
        }
        // Hold back the longest tail that is a proper prefix of some stop.
        let mut hold = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(self.held.len());
            for k in (hold + 1..=max).rev() {
                let start = self.held.len() - k;
                if self.held.is_char_boundary(start)
                    && s.as_bytes().starts_with(&self.held.as_bytes()[start..])
                {
                    hold = k;
                    break;
                }
            }
        }
        let cut = self.held.len() - hold;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutput {
            text: out,
            stopped: false,
        }
    }

    /// Ends the stream: the text held back (none when stopped).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_values_are_named() {
        for (cfg, field) in [
            (
                SamplingConfig {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingConfig {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingConfig {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingConfig {
                    min_p: -1.0,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingConfig {
                    repeat_penalty: 0.0,
                    ..Default::default()
                },
                "repeat_penalty",
            ),
            (
                SamplingConfig {
                    presence_penalty: f32::NAN,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingConfig {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
        ] {
            let e = Sampler::new(cfg).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(field), "{msg}");
            assert!(msg.contains("expected"), "{msg}");
        }
    }

    #[test]
    fn repetition_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(SamplingConfig {
            repeat_penalty: 2.0,
            ..SamplingConfig::greedy()
        })
        .unwrap();
        let logits = [3.0, 2.0, 0.0];
        assert_eq!(s.sample(&logits).unwrap(), 0);
        // 0 was seen: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut s = Sampler::new(SamplingConfig {
            frequency_penalty: 0.5,
            presence_penalty: 0.2,
            ..SamplingConfig::greedy()
        })
        .unwrap();
        s.accept(&[0, 0]);
        // 3.0 - 2 * 0.5 - 0.2 = 1.8 < 2.0
        assert_eq!(s.sample(&[3.0, 2.0]).unwrap(), 1);
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        // One dominant token: min-p 0.5 leaves only it, whatever the seed.
        for seed in 0..50 {
            let mut s = Sampler::new(SamplingConfig {
                seed: Some(seed),
                top_k: 0,
                top_p: 1.0,
                min_p: 0.5,
                temperature: 1.0,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(s.sample(&[0.0, 5.0, 4.0, 0.0]).unwrap(), 1);
        }
        // Top-p 0.5 over [0.7, 0.2, 0.1]: the first alone reaches it.
        let l = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        for seed in 0..50 {
            let mut s = Sampler::new(SamplingConfig {
                seed: Some(seed),
                top_k: 0,
                top_p: 0.5,
                min_p: 0.0,
                temperature: 1.0,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(s.sample(&l).unwrap(), 0);
        }
    }

    #[test]
    fn top_p_prefix_on_a_large_flat_vocabulary() {
        let n = 1000;
        let mut c: Vec<Cand> = (0..n).map(|i| Cand { logit: 0.0, id: i }).collect();
        let z = n as f64;
        // Half the mass of a flat distribution: 500 tokens.
        assert_eq!(top_p_prefix(&mut c, 0.0, z, 0.5), 500);
    }

    #[test]
    fn stop_matcher_holds_back_partial_matches() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E").text, "abc ");
        assert_eq!(m.push("N").text, "");
        let o = m.push("x");
        assert_eq!(o.text, "ENx");
        assert!(!o.stopped);
        let o = m.push("yEND tail");
        assert_eq!(o.text, "y");
        assert!(o.stopped);
        assert_eq!(m.finish(), "");
    }
}
