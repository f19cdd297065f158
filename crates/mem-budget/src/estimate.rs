//! Pre-flight estimates: the answer a program shows before work starts.

use hw_detect::HardwareClass;
use serde::{Deserialize, Serialize};

use crate::activation::{ActivationConfig, Activations, TransformerShape, Workload};
use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::ledger::{Category, MemoryLedger};
use crate::units::{Bytes, MIB};
use crate::weights::{WeightType, WeightsInfo};

/// One named part of an estimate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// What the bytes are for (`weights`, `repacked weights`, …).
    pub name: String,
    /// How many.
    pub bytes: u64,
}

/// Memory an estimate is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// What model weights may still take (model cap, overall cap, machine).
    pub model: u64,
    /// What activations may still take.
    pub activations: u64,
    /// What everything together may still take.
    pub total: u64,
}

impl Room {
    /// Room under a budget with nothing reserved, on a machine with
    /// `available` bytes free (the safety margin is kept back).
    pub fn from_budget(budget: &Budget, available: u64) -> Room {
        let machine = available.saturating_sub(budget.safety_margin);
        let total = budget.overall_cap().min(machine);
        Room {
            model: budget.max_model.min(total),
            activations: budget.max_activations.unwrap_or(u64::MAX).min(total),
            total,
        }
    }

    /// Room left in a ledger now (reads the machine if its reading is old).
    pub fn in_ledger(ledger: &MemoryLedger) -> Result<Room> {
        let model = ledger.available_for(Category::Model)?;
        let activations = ledger.available_for(Category::Activations)?;
        let total = ledger.available_overall()?;
        Ok(Room {
            model,
            activations,
            total,
        })
    }
}

/// What a piece of work will need, and whether it fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    /// Bytes needed in all.
    pub bytes: u64,
    /// The parts that add up to `bytes`.
    pub breakdown: Vec<Part>,
    /// Whether it fits the room it was checked against.
    pub fits: bool,
    /// Room left after it (negative: how much is missing).
    pub headroom: i64,
    /// The most tokens per sequence that fit, where the estimate depends on
    /// tokens and anything fits at all.
    pub max_tokens: Option<u64>,
    /// What to tell a person: `OK`, or what to change.
    pub recommendation: String,
}

fn headroom(room: u64, bytes: u64) -> i64 {
    let d = room as i128 - bytes as i128;
    d.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// The per-request linear model: `total = base + tokens / 100 *
/// per_100_tokens + cache_overhead`, in bytes.
///
/// Defaults per class (MiB): `AppleM1Air` 2000 / 50 / 200, `AppleM1Pro`
/// 3000 / 40 / 300, `IntelHybridLaptop` and `AmdRyzenLaptop` 2500 / 60 / 250,
/// `HighEnd` 3000 / 50 / 300, `Generic` as the laptops, `Constrained` as the
/// Air. Fit it to the machine with [`LinearModel::calibrate`].
///
/// ```
/// use mem_budget::{LinearModel, MIB};
/// use hw_detect::HardwareClass;
///
/// let m = LinearModel::for_class(HardwareClass::AppleM1Air);
/// assert_eq!(m.bytes_for(1000), (2000 + 500 + 200) * MIB);
/// let e = m.estimate(1000, 2600 * MIB);
/// assert!(!e.fits);
/// assert_eq!(e.max_tokens, Some(800));
/// assert_eq!(e.recommendation, "input too long for this machine: at most 800 tokens fit");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinearModel {
    /// Bytes before any token.
    pub base: u64,
    /// Bytes per 100 tokens.
    pub per_100_tokens: u64,
    /// Bytes of cache on top.
    pub cache_overhead: u64,
}

impl Default for LinearModel {
    /// The `Generic` class's constants.
    fn default() -> Self {
        LinearModel::for_class(HardwareClass::Generic)
    }
}

impl LinearModel {
    /// The default constants for `class`.
    pub fn for_class(class: HardwareClass) -> LinearModel {
        let (base, per, cache) = match class {
            HardwareClass::AppleM1Air | HardwareClass::Constrained => (2000, 50, 200),
            HardwareClass::AppleM1Pro => (3000, 40, 300),
            HardwareClass::HighEnd => (3000, 50, 300),
            _ => (2500, 60, 250),
        };
        LinearModel {
            base: base * MIB,
            per_100_tokens: per * MIB,
            cache_overhead: cache * MIB,
        }
    }

    /// Bytes a request of `tokens` needs.
    pub fn bytes_for(&self, tokens: u64) -> u64 {
        let per = (tokens as u128 * self.per_100_tokens as u128 / 100).min(u64::MAX as u128) as u64;
        self.base
            .saturating_add(per)
            .saturating_add(self.cache_overhead)
    }

    /// The most tokens that fit in `available` bytes (`None`: not even an
    /// empty request fits).
    pub fn max_tokens(&self, available: u64) -> Option<u64> {
        let fixed = self.base.saturating_add(self.cache_overhead);
        let left = available.checked_sub(fixed)?;
        if self.per_100_tokens == 0 {
            return Some(u64::MAX);
        }
        Some((left as u128 * 100 / self.per_100_tokens as u128).min(u64::MAX as u128) as u64)
    }

    /// The estimate for a request of `tokens` against `available` bytes.
    pub fn estimate(&self, tokens: u64, available: u64) -> Estimate {
        let bytes = self.bytes_for(tokens);
        let max_tokens = self.max_tokens(available);
        let fits = bytes <= available;
        let recommendation = if fits {
            "OK".to_string()
        } else {
            match max_tokens {
                Some(n) => format!("input too long for this machine: at most {n} tokens fit"),
                None => format!(
                    "even an empty request needs {}, only {} is free; unload models or use a smaller tier",
                    Bytes(self.base.saturating_add(self.cache_overhead)),
                    Bytes(available)
                ),
            }
        };
        Estimate {
            bytes,
            breakdown: vec![
                Part {
                    name: "base".into(),
                    bytes: self.base,
                },
                Part {
                    name: "tokens".into(),
                    bytes: bytes - self.base - self.cache_overhead,
                },
                Part {
                    name: "cache".into(),
                    bytes: self.cache_overhead,
                },
            ],
            fits,
            headroom: headroom(available, bytes),
            max_tokens,
            recommendation,
        }
    }

    /// Fits `base` and `per_100_tokens` by least squares to measured
    /// `(tokens, peak bytes)` pairs; `cache_overhead` is kept and the fitted
    /// intercept is `base + cache_overhead` (if the intercept is smaller than
    /// the cache overhead, the cache overhead becomes the intercept and base 0).
    ///
    /// Errors when fewer than two distinct token counts are given or the
    /// fitted slope is negative.
    pub fn calibrate(&self, measurements: &[(u64, u64)]) -> Result<LinearModel> {
        let n = measurements.len();
        let fail = |reason: String| Error::Calibration { points: n, reason };
        let nf = n as f64;
        let mx = measurements.iter().map(|m| m.0 as f64).sum::<f64>() / nf;
        let my = measurements.iter().map(|m| m.1 as f64).sum::<f64>() / nf;
        let sxx: f64 = measurements.iter().map(|m| (m.0 as f64 - mx).powi(2)).sum();
        let sxy: f64 = measurements
            .iter()
            .map(|m| (m.0 as f64 - mx) * (m.1 as f64 - my))
            .sum();
        if n < 2 || sxx <= 0.0 {
            return Err(fail(
                "need at least two measurements at different token counts".into(),
            ));
        }
        let slope = sxy / sxx;
        if slope < 0.0 {
            return Err(fail(format!(
                "the fitted slope is negative ({slope:.1} bytes per token): peak memory fell as inputs grew; \
                 measure peaks over a wider range of lengths"
            )));
        }
        let intercept = (my - slope * mx).max(0.0).round() as u64;
        let cache = self.cache_overhead.min(intercept);
        Ok(LinearModel {
            base: intercept - cache,
            per_100_tokens: (slope * 100.0).round() as u64,
            cache_overhead: cache,
        })
    }
}

/// The estimate for loading a model and running one forward pass.
///
/// `target`: store the weights as this type (`None`: as in the file).
/// The weights and their repacked copies go to the model room, activations
/// to the activation room, and the sum must fit the total room. When it does
/// not, the recommendation names the largest sequence length that fits, or
/// else the widest candidate type whose weights fit.
///
/// ```
/// use mem_budget::*;
///
/// let info = WeightsInfo {
///     format: WeightFormat::Safetensors,
///     tensors: vec![TensorInfo { name: "w".into(), shape: vec![1024, 1024],
///                                dtype: WeightType::F32, bytes: 4 << 20 }],
///     metadata: Default::default(),
///     header_bytes: 100,
/// };
/// let shape = TransformerShape { architecture: TransformerKind::Encoder, hidden: 1024,
///     layers: 1, heads: 16, kv_heads: 16, intermediate: 4096, vocab: 0 };
/// let room = Room { model: GIB, activations: GIB, total: GIB };
/// // A CPU with AVX-512 VNNI, where candle keeps a Q8_0 copy of each weight.
/// let repack = RepackRules { x86_tiles: true, x86_vnni: true, x86_amx: false, arm: false };
/// let config = ActivationConfig { repack, ..ActivationConfig::default() };
/// let e = estimate_model(&info, Some(WeightType::Q8_0), &shape,
///                        Workload { batch: 1, seq: 128 }, &config, room);
/// assert!(e.fits);
/// // 1 Mi weights in Q8_0 is 34 B per 32; the repacked copy doubles it.
/// assert_eq!(e.breakdown[0].bytes, 1_114_112);
/// assert_eq!(e.breakdown[1].bytes, 1_114_112);
/// ```
pub fn estimate_model(
    weights: &WeightsInfo,
    target: Option<WeightType>,
    shape: &TransformerShape,
    work: Workload,
    config: &ActivationConfig,
    room: Room,
) -> Estimate {
    let stored = target.map_or(weights.stored_bytes(), |q| weights.bytes_as(q));
    let repack = config.repack.extra_bytes(weights, target);
    let model = stored.saturating_add(repack);
    let act = Activations::estimate(shape, work, config);
    let bytes = model.saturating_add(act.total);
    let fits_with = |a: u64| {
        model <= room.model && a <= room.activations && model.saturating_add(a) <= room.total
    };
    let fits = fits_with(act.total);
    let max_tokens = if model <= room.model && model <= room.total {
        // Activations grow monotonically with the sequence: binary search.
        let (mut lo, mut hi) = (0u64, work.seq.max(1).saturating_mul(2).max(1 << 20));
        let ok = |s: u64| {
            fits_with(
                Activations::estimate(
                    shape,
                    Workload {
                        batch: work.batch,
                        seq: s,
                    },
                    config,
                )
                .total,
            )
        };
        if !ok(0) {
            None
        } else {
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if ok(mid) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            Some(lo)
        }
    } else {
        None
    };
    let recommendation = if fits {
        "OK".to_string()
    } else if let Some(n) = max_tokens.filter(|&n| n > 0) {
        format!(
            "input too long for this machine: at most {n} tokens fit (batch {}; {} needed, {} free)",
            work.batch,
            Bytes(bytes),
            Bytes(room.total)
        )
    } else {
        let fitting = WeightType::CANDIDATES.iter().find(|&&q| {
            let m = weights
                .bytes_as(q)
                .saturating_add(config.repack.extra_bytes(weights, Some(q)));
            m <= room.model && m <= room.total
        });
        match fitting {
            Some(q) => format!(
                "model needs {} with its runtime copies, {} is free for models; choose {q} or a smaller model tier",
                Bytes(model),
                Bytes(room.model.min(room.total))
            ),
            None => format!(
                "model does not fit this machine at any quantization ({} free for models); use a smaller or remote tier",
                Bytes(room.model.min(room.total))
            ),
        }
    };
    Estimate {
        bytes,
        breakdown: vec![
            Part {
                name: "weights".into(),
                bytes: stored,
            },
            Part {
                name: "repacked weights".into(),
                bytes: repack,
            },
            Part {
                name: "attention scores".into(),
                bytes: act.attention_scores,
            },
            Part {
                name: "other activations".into(),
                bytes: act.layer_other,
            },
            Part {
                name: "kv cache".into(),
                bytes: act.kv_cache,
            },
            Part {
                name: "logits".into(),
                bytes: act.logits,
            },
            Part {
                name: "runtime overhead".into(),
                bytes: act.total.saturating_sub(
                    act.attention_scores + act.layer_other + act.kv_cache + act.logits,
                ),
            },
        ],
        fits,
        headroom: headroom(room.total, bytes),
        max_tokens,
        recommendation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::GIB;

    #[test]
    fn class_constants() {
        let pro = LinearModel::for_class(HardwareClass::AppleM1Pro);
        assert_eq!(
            (pro.base, pro.per_100_tokens, pro.cache_overhead),
            (3000 * MIB, 40 * MIB, 300 * MIB)
        );
        let intel = LinearModel::for_class(HardwareClass::IntelHybridLaptop);
        assert_eq!(intel, LinearModel::for_class(HardwareClass::AmdRyzenLaptop));
        assert_eq!(intel.per_100_tokens, 60 * MIB);
        assert_eq!(
            LinearModel::for_class(HardwareClass::HighEnd).base,
            3000 * MIB
        );
    }

    #[test]
    fn calibrate_recovers_a_line() {
        let truth = LinearModel {
            base: 100 * MIB,
            per_100_tokens: 7 * MIB,
            cache_overhead: 20 * MIB,
        };
        let points: Vec<(u64, u64)> = [10u64, 100, 250, 500, 1000]
            .iter()
            .map(|&t| (t, truth.bytes_for(t)))
            .collect();
        let fit = LinearModel::for_class(HardwareClass::Generic)
            .calibrate(&points)
            .unwrap();
        // Generic's cache overhead (250 MiB) exceeds the intercept (120 MiB).
        assert_eq!(fit.cache_overhead + fit.base, 120 * MIB);
        assert!((fit.per_100_tokens as i64 - (7 * MIB) as i64).abs() < 2);
        let fit = truth.calibrate(&points).unwrap();
        assert!((fit.base as i64 - (100 * MIB) as i64).abs() < 1024);
        assert!(truth.calibrate(&[(10, 5)]).is_err());
        assert!(truth.calibrate(&[(10, 5), (10, 9)]).is_err());
        let err = truth.calibrate(&[(10, 500), (100, 5)]).unwrap_err();
        assert!(err.to_string().contains("negative"), "{err}");
    }

    #[test]
    fn empty_request_that_cannot_fit() {
        let m = LinearModel::for_class(HardwareClass::AppleM1Air);
        let e = m.estimate(10, GIB);
        assert!(!e.fits && e.max_tokens.is_none());
        assert!(e.headroom < 0);
        assert!(
            e.recommendation.contains("even an empty request"),
            "{}",
            e.recommendation
        );
        let ok = m.estimate(10, 8 * GIB);
        assert_eq!(ok.recommendation, "OK");
        assert_eq!(ok.breakdown.iter().map(|p| p.bytes).sum::<u64>(), ok.bytes);
    }

    #[test]
    fn room_from_budget_keeps_the_margin() {
        let b = Budget::for_class(HardwareClass::AppleM1Air, 8 * GIB);
        let r = Room::from_budget(&b, 3 * GIB);
        assert_eq!(r.total, 3 * GIB / 2);
        assert_eq!(r.model, 3 * GIB / 2);
        let r = Room::from_budget(&b, 16 * GIB);
        assert_eq!((r.model, r.total), (2 * GIB, b.overall_cap()));
    }
}
