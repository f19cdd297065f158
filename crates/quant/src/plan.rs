//! Layer-wise planning of formats against a byte target.

use std::collections::BTreeMap;
use std::fmt;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use rand_core_shim::gaussian_rows;
use serde::{Deserialize, Serialize};

use crate::{policy::QuantPolicy, Error, Format, Result};

/// How sensitivity is measured and which tensors stay high precision.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Calibration {
    /// Calibration rows per tensor. Default 64.
    pub samples: usize,
    /// Formats a quantizable tensor may get. Default F32, F16, Q8_0, Q6_K,
    /// Q4_K (Q4_0 is left out: as small as Q4_K, less precise, and slow
    /// batched on CPU; add it for compatibility).
    pub candidates: Vec<Format>,
    /// Tensors kept at [`Calibration::keep_format`]: a name matches when it
    /// equals an entry or contains it. Besides these, every tensor that is
    /// not 2-D, and every name containing `embed`, `norm` (any case) or
    /// ending in `bias`, is kept. Default empty.
    pub keep: Vec<String>,
    /// Format of kept tensors. Default F32.
    pub keep_format: Format,
    /// Seed of the Gaussian calibration inputs. Default 0.
    pub seed: u64,
    /// Recorded activations `[n, in]` per weight name; where absent, `samples`
    /// rows of seeded standard-normal inputs are used. Not serialised.
    #[serde(skip)]
    pub inputs: BTreeMap<String, Tensor>,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            samples: 64,
            candidates: vec![
                Format::F32,
                Format::F16,
                Format::Q8_0,
                Format::Q6_K,
                Format::Q4_K,
            ],
            keep: Vec::new(),
            keep_format: Format::F32,
            seed: 0,
            inputs: BTreeMap::new(),
        }
    }
}

impl Calibration {
    /// The calibration a policy asks for: its sample count, and either every
    /// default candidate (layer-wise) or only the policy's format.
    pub fn from_policy(policy: &QuantPolicy) -> Calibration {
        let mut c = Calibration {
            samples: policy.calibration_samples,
            ..Calibration::default()
        };
        if !policy.layer_wise {
            c.candidates = vec![policy.effective_format()];
        } else if !c.candidates.contains(&policy.effective_format()) {
            c.candidates.push(policy.effective_format());
        }
        c
    }

    /// Whether a tensor is kept at high precision (see [`Calibration::keep`]).
    pub fn is_kept(&self, name: &str, dims: &[usize]) -> bool {
        let lower = name.to_ascii_lowercase();
        dims.len() != 2
            || lower.ends_with("bias")
            || lower.contains("embed")
            || lower.contains("norm")
            || self
                .keep
                .iter()
                .any(|k| name == k || name.contains(k.as_str()))
    }
}

/// One format a tensor may take, with its cost and measured error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FormatCandidate {
    /// The (fitted) format.
    pub format: Format,
    /// Bytes in this format.
    pub bytes: u64,
    /// Relative RMS error of `x·Wᵀ` on the calibration inputs (for kept
    /// tensors that are not 2-D: of the weight itself).
    pub error: f64,
}

/// What each format would cost a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensitivity {
    /// Tensor name.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Kept at high precision (one candidate).
    pub kept: bool,
    /// Candidates, fewest bytes first, each strictly more precise than the last.
    pub candidates: Vec<FormatCandidate>,
}

fn rel_rms(got: &Tensor, want: &Tensor) -> Result<f64> {
    let num = (got - want)?
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let den = want
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(if den > 0.0 {
        (num / den).sqrt()
    } else if num > 0.0 {
        1.0
    } else {
        0.0
    })
}

fn roundtrip(w: &Tensor, format: Format) -> Result<Tensor> {
    if format == Format::F32 {
        return Ok(w.clone());
    }
    Ok(QTensor::quantize(w, format.ggml_dtype())?.dequantize(&Device::Cpu)?)
}

mod rand_core_shim {
    //! Seeded Gaussian rows without a dependency on `rand` (Box–Muller over
    //! SplitMix64).
    use candle_core::{Device, Tensor};

    pub(super) fn gaussian_rows(
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> candle_core::Result<Tensor> {
        let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let n = rows * cols;
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let (u1, u2) = (next(), next());
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            v.push((r * t.cos()) as f32);
            v.push((r * t.sin()) as f32);
        }
        v.truncate(n);
        Tensor::from_vec(v, (rows, cols), &Device::Cpu)
    }
}

/// Measures every tensor's error under each candidate format.
/// `on_progress(done, total, name)` is called after each tensor.
pub fn measure(
    tensors: &[(String, Tensor)],
    calibration: &Calibration,
    mut on_progress: impl FnMut(usize, usize, &str),
) -> Result<Vec<Sensitivity>> {
    let mut out = Vec::with_capacity(tensors.len());
    for (i, (name, t)) in tensors.iter().enumerate() {
        let dims = t.dims().to_vec();
        let elements: usize = dims.iter().product();
        let w = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let kept = calibration.is_kept(name, &dims) || elements == 0;
        let in_dim = dims.last().copied().unwrap_or(1);
        let candidates = if kept {
            let format = calibration.keep_format.fit(in_dim);
            let error = if dims.is_empty() || elements == 0 {
                0.0
            } else {
                rel_rms(&roundtrip(&w, format)?, &w)?
            };
            vec![FormatCandidate {
                format,
                bytes: format.bytes_for(elements),
                error,
            }]
        } else {
            let x = match calibration.inputs.get(name) {
                Some(x) => {
                    let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                    if x.dims().len() != 2 || x.dims()[1] != in_dim {
                        return Err(Error::InputMismatch {
                            input: x.dims().to_vec(),
                            in_dim,
                        });
                    }
                    x
                }
                None => gaussian_rows(
                    calibration.samples.max(1),
                    in_dim,
                    calibration.seed ^ i as u64,
                )?,
            };
            let want = x.matmul(&w.t()?)?;
            let mut formats: Vec<Format> = calibration
                .candidates
                .iter()
                .map(|f| f.fit(in_dim))
                .collect();
            formats.sort_by_key(|f| (f.bytes_for(elements), *f));
            formats.dedup();
            let mut cands: Vec<FormatCandidate> = Vec::new();
            for format in formats {
                let got = x.matmul(&roundtrip(&w, format)?.t()?)?;
                cands.push(FormatCandidate {
                    format,
                    bytes: format.bytes_for(elements),
                    error: rel_rms(&got, &want)?,
                });
            }
            pareto(cands)
        };
        out.push(Sensitivity {
            name: name.clone(),
            shape: dims,
            kept,
            candidates,
        });
        on_progress(i + 1, tensors.len(), name);
    }
    Ok(out)
}

/// Keeps candidates that are each strictly more precise than every cheaper one.
fn pareto(mut cands: Vec<FormatCandidate>) -> Vec<FormatCandidate> {
    cands.sort_by(|a, b| a.bytes.cmp(&b.bytes).then(a.error.total_cmp(&b.error)));
    let mut out: Vec<FormatCandidate> = Vec::new();
    for c in cands {
        match out.last() {
            Some(last) if c.error >= last.error => {}
            Some(last) if c.bytes == last.bytes => {}
            _ => out.push(c),
        }
    }
    out
}

/// Chooses a format per tensor so that the total is at most `target_bytes`
/// and the summed error is as small as the greedy rule finds.
///
/// Every tensor starts at its smallest candidate; if that total is over the
/// target the answer is [`Error::TargetTooSmall`] with that total. Then,
/// while bytes remain, the upgrade with the largest error saved per extra
/// byte that still fits is applied (a tensor may jump several formats).
pub fn select(sensitivities: &[Sensitivity], target_bytes: u64) -> Result<QuantPlan> {
    let mut chosen = vec![0usize; sensitivities.len()];
    for s in sensitivities {
        if s.candidates.is_empty() {
            return Err(Error::PlanMismatch {
                name: s.name.clone(),
                reason: "no candidate format; give the calibration at least one candidate".into(),
            });
        }
    }
    let smallest: u64 = sensitivities.iter().map(|s| s.candidates[0].bytes).sum();
    if smallest > target_bytes {
        return Err(Error::TargetTooSmall {
            target: target_bytes,
            smallest,
        });
    }
    let mut total = smallest;
    loop {
        let remaining = target_bytes - total;
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, s) in sensitivities.iter().enumerate() {
            let cur = s.candidates[chosen[i]];
            for (j, c) in s.candidates.iter().enumerate().skip(chosen[i] + 1) {
                let extra = c.bytes - cur.bytes;
                if extra > remaining || c.error >= cur.error {
                    continue;
                }
                let gain = (cur.error - c.error) / extra.max(1) as f64;
                if best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, i, j));
                }
            }
        }
        let Some((_, i, j)) = best else { break };
        total +=
            sensitivities[i].candidates[j].bytes - sensitivities[i].candidates[chosen[i]].bytes;
        chosen[i] = j;
    }
    let entries = sensitivities
        .iter()
        .zip(&chosen)
        .map(|(s, &j)| {
            let c = s.candidates[j];
            PlanEntry {
                name: s.name.clone(),
                shape: s.shape.clone(),
                format: c.format,
                bytes: c.bytes,
                error: c.error,
                kept: s.kept,
            }
        })
        .collect();
    Ok(QuantPlan {
        entries,
        target_bytes,
    })
}

/// Bytes of every tensor at `format` (fitted), kept tensors at their kept
/// format: the size a uniform policy would give.
pub fn uniform_bytes(sensitivities: &[Sensitivity], format: Format) -> u64 {
    sensitivities
        .iter()
        .map(|s| {
            let elements: usize = s.shape.iter().product();
            if s.kept {
                s.candidates[0].bytes
            } else {
                format
                    .fit(s.shape.last().copied().unwrap_or(1))
                    .bytes_for(elements)
            }
        })
        .sum()
}

/// [`measure`] then [`select`].
pub fn plan(
    tensors: &[(String, Tensor)],
    calibration: &Calibration,
    target_bytes: u64,
) -> Result<QuantPlan> {
    select(&measure(tensors, calibration, |_, _, _| {})?, target_bytes)
}

/// One tensor's line of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanEntry {
    /// Tensor name.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Chosen (fitted) format.
    pub format: Format,
    /// Bytes in that format.
    pub bytes: u64,
    /// Measured relative RMS error (see [`FormatCandidate::error`]).
    pub error: f64,
    /// Kept at high precision by rule.
    pub kept: bool,
}

/// A format per tensor; serialisable, and printed as a table by `Display`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantPlan {
    /// One entry per tensor, in model order.
    pub entries: Vec<PlanEntry>,
    /// The target it was planned against.
    pub target_bytes: u64,
}

impl QuantPlan {
    /// Total bytes of the chosen formats.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Bytes of the same tensors in f32.
    pub fn f32_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| 4 * e.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// The entry of a tensor.
    pub fn entry(&self, name: &str) -> Option<&PlanEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Mean and max measured error over the tensors that were quantized.
    pub fn error_stats(&self) -> (f64, f64) {
        let q: Vec<f64> = self
            .entries
            .iter()
            .filter(|e| !e.kept)
            .map(|e| e.error)
            .collect();
        if q.is_empty() {
            return (0.0, 0.0);
        }
        (
            q.iter().sum::<f64>() / q.len() as f64,
            q.iter().copied().fold(0.0, f64::max),
        )
    }

    /// The plan as JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// A plan from JSON.
    pub fn from_json(s: &str) -> Result<QuantPlan> {
        Ok(serde_json::from_str(s)?)
    }
}

impl fmt::Display for QuantPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self
            .entries
            .iter()
            .map(|e| e.name.len())
            .max()
            .unwrap_or(6)
            .max(6);
        writeln!(
            f,
            "{:<w$}  {:>14}  {:>6}  {:>12}  {:>10}",
            "tensor", "shape", "format", "bytes", "error"
        )?;
        for e in &self.entries {
            let shape = e
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x");
            let kept = if e.kept { " (kept)" } else { "" };
            writeln!(
                f,
                "{:<w$}  {:>14}  {:>6}  {:>12}  {:>10.2e}{kept}",
                e.name, shape, e.format, e.bytes, e.error
            )?;
        }
        write!(
            f,
            "total {} bytes (target {}, f32 {})",
            self.total_bytes(),
            self.target_bytes,
            self.f32_bytes()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::gaussian;
    use proptest::prelude::*;

    fn model() -> Vec<(String, Tensor)> {
        vec![
            ("embeddings.word".into(), gaussian(&[64, 256], 1)),
            ("layer.0.dense.weight".into(), gaussian(&[128, 256], 2)),
            ("layer.0.dense.bias".into(), gaussian(&[128], 3)),
            ("layer.0.LayerNorm.weight".into(), gaussian(&[256], 4)),
            ("layer.0.out.weight".into(), gaussian(&[64, 384], 5)),
        ]
    }

    #[test]
    fn plans_within_target_and_keeps_what_it_must() {
        let c = Calibration {
            samples: 16,
            ..Calibration::default()
        };
        let sens = measure(&model(), &c, |_, _, _| {}).unwrap();
        let kept: Vec<bool> = sens.iter().map(|s| s.kept).collect();
        assert_eq!(kept, [true, false, true, true, false]);
        // 384 inputs: Q4_K and Q6_K fit to Q8_0, so three candidates remain.
        let fmts: Vec<Format> = sens[4].candidates.iter().map(|c| c.format).collect();
        assert_eq!(fmts, [Format::Q8_0, Format::F16, Format::F32]);
        let q8 = sens[1]
            .candidates
            .iter()
            .find(|c| c.format == Format::Q8_0)
            .unwrap();
        assert!(q8.error > 0.0 && q8.error < 1e-2, "{}", q8.error);
        let smallest: u64 = sens.iter().map(|s| s.candidates[0].bytes).sum();
        match select(&sens, smallest - 1) {
            Err(Error::TargetTooSmall {
                smallest: s,
                target,
            }) => {
                assert_eq!(s, smallest);
                assert_eq!(target, smallest - 1);
            }
            other => panic!("expected TargetTooSmall, got {other:?}"),
        }
        let tight = select(&sens, smallest).unwrap();
        assert_eq!(
            tight.entry("layer.0.dense.weight").unwrap().format,
            Format::Q4_K
        );
        let roomy = select(&sens, u64::MAX / 2).unwrap();
        assert!(roomy.entries.iter().all(|e| e.format == Format::F32));
        let mid = select(&sens, smallest + 40_000).unwrap();
        assert!(mid.total_bytes() <= smallest + 40_000);
        assert!(mid.error_stats().0 < tight.error_stats().0);
        let table = mid.to_string();
        assert!(
            table.contains("layer.0.dense.weight") && table.contains("(kept)"),
            "{table}"
        );
        assert_eq!(QuantPlan::from_json(&mid.to_json().unwrap()).unwrap(), mid);
    }

    fn arb_sens() -> impl Strategy<Value = Vec<Sensitivity>> {
        let one = (
            1usize..2000,
            prop::collection::vec((1u64..5000, 0.0f64..1.0), 1..5),
            any::<bool>(),
        );
        prop::collection::vec(one, 1..12).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (n, raw, kept))| {
                    let cands = raw
                        .into_iter()
                        .map(|(b, e)| FormatCandidate {
                            format: Format::Q8_0,
                            bytes: b + n as u64,
                            error: e,
                        })
                        .collect();
                    let mut candidates = pareto(cands);
                    if kept {
                        candidates.truncate(1);
                    }
                    Sensitivity {
                        name: format!("t{i}"),
                        shape: vec![n],
                        kept,
                        candidates,
                    }
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn never_exceeds_target(sens in arb_sens(), target in 0u64..60_000) {
            let smallest: u64 = sens.iter().map(|s| s.candidates[0].bytes).sum();
            match select(&sens, target) {
                Ok(p) => {
                    prop_assert!(p.total_bytes() <= target);
                    prop_assert!(smallest <= target);
                }
                Err(Error::TargetTooSmall { smallest: s, .. }) => {
                    prop_assert_eq!(s, smallest);
                    prop_assert!(s > target);
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn real_tensors_never_exceed_target(
            dims in prop::collection::vec((1usize..5, prop::sample::select(vec![32usize, 100, 256, 512])), 1..4),
            frac in 0.0f64..1.2,
        ) {
            let tensors: Vec<(String, Tensor)> = dims.iter().enumerate()
                .map(|(i, (o, inp))| (format!("w{i}"), gaussian(&[o * 16, *inp], i as u64)))
                .collect();
            let c = Calibration { samples: 8, ..Calibration::default() };
            let sens = measure(&tensors, &c, |_, _, _| {}).unwrap();
            let f32_bytes: u64 = tensors.iter().map(|(_, t)| 4 * t.elem_count() as u64).sum();
            let target = (f32_bytes as f64 * frac) as u64;
            match select(&sens, target) {
                Ok(p) => prop_assert!(p.total_bytes() <= target),
                Err(Error::TargetTooSmall { smallest, .. }) => prop_assert!(smallest > target),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
