//! The repacked copies candle keeps of quantized weights.
//!
//! candle 0.11 keeps a *repacked* copy of some quantized weights next to the
//! stored blocks, built on the first CPU forward and kept as long as the
//! weight lives. This module mirrors candle's rules for when that happens and
//! how big the copy is, so that a memory budget can count it before the first
//! forward. It is the one model of those copies: `quant` sizes its layers
//! with it too.
//!
//! x86_64 (tiles of 16 output rows × 256 inputs; only where `out % 16 == 0`
//! and `in % 256 == 0`, and the CPU has AVX2 + FMA):
//!
//! | format | copy, bytes per weight | condition |
//! |---|---|---|
//! | Q4_K | 0.75 | always |
//! | Q4_K | + 1.25 (AMX tiles) | batch ≥ 32 on a CPU with AMX-INT8, unless `MISTRALRS_FORCE_AVXVNNI=1` / `MISTRALRS_FORCE_AVX2=1` |
//! | Q6_K | 1.25 | batched forwards (batch > 1) |
//! | Q8_0 | 1.0625 | AVX-512 VNNI or AVX-VNNI |
//!
//! aarch64: Q4_0, Q4_K, Q6_K, Q8_0 are interleaved into a copy of the same
//! size as the stored blocks (counted as 1× storage).
//!
//! The estimate is an upper bound ("after the worst forward"), matching
//! candle's behaviour: GEMV and batched forwards may each build a copy.

use serde::{Deserialize, Serialize};

use crate::weights::{WeightType, WeightsInfo};

/// Which of candle's repacked copies a CPU builds (see the module docs).
///
/// [`Default`] is [`RepackRules::this_cpu`].
///
/// ```
/// use mem_budget::{RepackRules, WeightType};
///
/// let avx512 = RepackRules { x86_tiles: true, x86_vnni: true, x86_amx: false, arm: false };
/// // Q8_0 tiles: a copy as large as the stored blocks (34 bytes per 32 weights).
/// assert_eq!(avx512.copy_bytes(WeightType::Q8_0, 4096, 4096), 4096 * 4096 / 32 * 34);
/// // 384 inputs is not a whole number of 256-wide tiles: no copy.
/// assert_eq!(avx512.copy_bytes(WeightType::Q8_0, 384, 384), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepackRules {
    /// The CPU takes candle's x86 repacked path (AVX2 + FMA at least).
    pub x86_tiles: bool,
    /// It has a VNNI dot product (AVX-512 VNNI or AVX-VNNI): Q8_0 tiles.
    pub x86_vnni: bool,
    /// It has AMX-INT8 tiles: batched Q4_K gets a second copy.
    pub x86_amx: bool,
    /// aarch64: interleaved copies.
    pub arm: bool,
}

impl Default for RepackRules {
    fn default() -> Self {
        RepackRules::this_cpu()
    }
}

fn env_is_one(key: &str) -> bool {
    std::env::var(key).as_deref() == Ok("1")
}

impl RepackRules {
    /// The rules for the CPU this process runs on.
    pub fn this_cpu() -> RepackRules {
        #[cfg(target_arch = "x86_64")]
        {
            let force_avx2 = env_is_one("MISTRALRS_FORCE_AVX2");
            let force_vnni = env_is_one("MISTRALRS_FORCE_AVXVNNI");
            let avx512vnni = !force_avx2
                && !force_vnni
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni");
            let avxvnni = !force_avx2
                && (force_vnni || std::arch::is_x86_feature_detected!("avxvnni"))
                && std::arch::is_x86_feature_detected!("avx2");
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            // CPUID leaf 7, EDX bits 24 (AMX-TILE) and 25 (AMX-INT8).
            let amx = avx512vnni && {
                let info = std::arch::x86_64::__cpuid_count(7, 0);
                info.edx & (1 << 25) != 0 && info.edx & (1 << 24) != 0
            };
            RepackRules {
                x86_tiles: avx512vnni || avxvnni || avx2,
                x86_vnni: avx512vnni || avxvnni,
                x86_amx: amx,
                arm: false,
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            let _ = env_is_one;
            RepackRules {
                x86_tiles: false,
                x86_vnni: false,
                x86_amx: false,
                arm: true,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            let _ = env_is_one;
            RepackRules {
                x86_tiles: false,
                x86_vnni: false,
                x86_amx: false,
                arm: false,
            }
        }
    }

    /// Bytes of the repacked copy candle may keep for an `[out, in]` weight
    /// stored as `dtype`.
    pub fn copy_bytes(&self, dtype: WeightType, out: u64, inp: u64) -> u64 {
        let weights = out.saturating_mul(inp);
        if self.arm {
            return match dtype {
                WeightType::Q4_0 | WeightType::Q4_K | WeightType::Q6_K | WeightType::Q8_0 => {
                    dtype.bytes_for(weights).unwrap_or(0)
                }
                _ => 0,
            };
        }
        if !self.x86_tiles || !out.is_multiple_of(16) || !inp.is_multiple_of(256) || inp == 0 {
            return 0;
        }
        let per_weight = match dtype {
            WeightType::Q4_K => 0.75 + if self.x86_amx { 1.25 } else { 0.0 },
            WeightType::Q6_K => 1.25,
            WeightType::Q8_0 if self.x86_vnni => 34.0 / 32.0,
            _ => 0.0,
        };
        (weights as f64 * per_weight) as u64
    }

    /// Bytes of the copies for every tensor of `weights` stored as `target`
    /// (`None`: as stored). A tensor of rank 2 or more is an `[out, in]`
    /// matrix with `in` its innermost dimension and `out` the product of the
    /// others; vectors (norms, biases) are never repacked.
    pub fn extra_bytes(&self, weights: &WeightsInfo, target: Option<WeightType>) -> u64 {
        weights
            .tensors
            .iter()
            .filter(|t| t.shape.len() >= 2)
            .map(|t| {
                let ty = target.map_or(t.dtype, |q| t.type_as(q));
                let (outer, inner) = t.shape.split_at(t.shape.len() - 1);
                self.copy_bytes(ty, outer.iter().product(), inner[0])
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sizes_follow_candles_rules() {
        let x86 = RepackRules {
            x86_tiles: true,
            x86_vnni: true,
            x86_amx: false,
            arm: false,
        };
        let n = 4096 * 4096;
        assert_eq!(
            x86.copy_bytes(WeightType::Q8_0, 4096, 4096),
            WeightType::Q8_0.bytes_for(n).unwrap()
        );
        assert_eq!(x86.copy_bytes(WeightType::Q4_K, 4096, 4096), n * 3 / 4);
        // 384 inputs is not a multiple of 256: no tiles.
        assert_eq!(x86.copy_bytes(WeightType::Q8_0, 384, 384), 0);
        assert_eq!(x86.copy_bytes(WeightType::Q4_0, 4096, 4096), 0);
        assert_eq!(x86.copy_bytes(WeightType::F32, 4096, 4096), 0);
        let amx = RepackRules {
            x86_amx: true,
            ..x86
        };
        assert_eq!(amx.copy_bytes(WeightType::Q4_K, 4096, 4096), n * 2);
        let avx2 = RepackRules {
            x86_vnni: false,
            ..x86
        };
        assert_eq!(avx2.copy_bytes(WeightType::Q8_0, 4096, 4096), 0);
    }
}
