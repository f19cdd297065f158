//! The layer-wise INT4 plan of all-MiniLM-L6-v2: quant's planner chooses a
//! format per linear weight (Q4_K, Q6_K or Q8_0) against a byte target near
//! the uniform Q4_K size, so that the weights whose output error Q4_K hurts
//! most are kept more precise.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use quant::{Calibration, Format, Sensitivity};

use crate::minilm::LoadOptions;
use crate::{Error, Result};

/// The default `mix` of [`minilm_int4_plan`], chosen by the procedure of
/// `examples/int4_plan.rs` (2,000 generated sentences of 5 to 60 words
/// against f32): uniform Q4_K gives a lowest cosine of 0.951 there, a share
/// of 0.1 0.963, this share 0.976 (10 weights in Q4_K, 20 in Q6_K, 6 in
/// Q8_0), 0.5 0.993. On the 50 hand-written sentences of the tests, 0.25
/// gives 0.952 where uniform Q4_K gives 0.912.
pub const MINILM_INT4_PLAN_MIX: f64 = 0.25;

/// Formats the plan chooses among: the 4-bit K-quant and the two above it.
pub const INT4_PLAN_CANDIDATES: [Format; 3] = [Format::Q4_K, Format::Q6_K, Format::Q8_0];

/// Calibrates every linear weight of the model in `dir` for the INT4 plan:
/// quant's output error (`x·Wᵀ` on seeded Gaussian rows) under each of
/// [`INT4_PLAN_CANDIDATES`]. Weights are read one at a time from the mapped
/// file, each zero-padded to the width the loader pads to (a multiple of
/// 256, so that the K-quants fit), so the calibration holds one weight in
/// f32 at a time.
pub fn minilm_sensitivities(dir: impl AsRef<Path>) -> Result<Vec<Sensitivity>> {
    let dir = dir.as_ref();
    let path = dir.join("model.safetensors");
    // SAFETY: mapped read-only; each tensor is copied out before the next.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }?;
    let mut names: Vec<String> = st
        .tensors()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("encoder.layer.") && n.ends_with(".weight"))
        .collect();
    names.sort();
    let calibration = Calibration {
        candidates: INT4_PLAN_CANDIDATES.to_vec(),
        ..Calibration::default()
    };
    let mut out = Vec::new();
    for name in names {
        let t = st.load(&name, &Device::Cpu)?.to_dtype(DType::F32)?;
        let &[rows, cols] = t.dims() else { continue };
        let padded = cols.next_multiple_of(256);
        let t = if padded > cols {
            Tensor::cat(
                &[
                    &t,
                    &Tensor::zeros((rows, padded - cols), DType::F32, &Device::Cpu)?,
                ],
                1,
            )?
        } else {
            t
        };
        let mut s = quant::measure(&[(name.clone(), t)], &calibration, |_, _, _| {})?;
        out.append(&mut s);
    }
    if out.is_empty() {
        return Err(Error::BadConfig {
            path,
            reason: "no encoder.layer.*.weight matrix to plan".into(),
        });
    }
    Ok(out)
}

/// The load options of the INT4 plan: formats chosen by [`quant::select`]
/// against a target `mix` of the way from the uniform Q4_K size of the
/// calibrated weights to their uniform Q8_0 size (`0.0`: as small as Q4_K,
/// which is then every weight in Q4_K; `1.0`: up to Q8_0's size). Weights
/// the plan does not name load in Q4_K; the word table is Q8_0 rows.
pub fn minilm_int4_plan(sensitivities: &[Sensitivity], mix: f64) -> Result<LoadOptions> {
    if !(0.0..=1.0).contains(&mix) {
        return Err(Error::invalid(
            "mix",
            mix.to_string(),
            "a share from 0 to 1",
        ));
    }
    let q4 = quant::uniform_bytes(sensitivities, Format::Q4_K);
    let q8 = quant::uniform_bytes(sensitivities, Format::Q8_0);
    let target = q4 + (q8.saturating_sub(q4) as f64 * mix) as u64;
    let plan = quant::select(sensitivities, target)?;
    let mut options = LoadOptions::uniform(Format::Q4_K);
    for e in plan.entries {
        options.plan.insert(e.name, e.format);
    }
    Ok(options)
}
