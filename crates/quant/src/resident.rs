//! Estimates of the memory a quantized weight really occupies once used.
//!
//! candle 0.11 keeps a *repacked* copy of some quantized weights next to the
//! stored blocks, built on the first CPU forward and kept as long as the
//! weight lives. This module mirrors candle's rules for when that happens and
//! how big the copy is, so that a memory budget can count it before the first
//! forward.
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

use crate::Format;

/// How the repack-copy estimate is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RepackRules {
    /// x86 level that takes the repacked path (AVX2 + FMA at least).
    pub(crate) x86_tiles: bool,
    /// Q8_0 tiles need a VNNI dot product.
    pub(crate) x86_vnni: bool,
    /// AMX tiles for batched Q4_K.
    pub(crate) x86_amx: bool,
    /// aarch64 interleaved copies.
    pub(crate) arm: bool,
}

fn env_is_one(key: &str) -> bool {
    std::env::var(key).as_deref() == Ok("1")
}

impl RepackRules {
    /// The rules for the CPU this process runs on.
    pub(crate) fn this_cpu() -> RepackRules {
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

    /// Bytes of the repacked copy candle may keep for an `[out, in]` weight.
    pub(crate) fn copy_bytes(&self, format: Format, out: usize, inp: usize) -> u64 {
        let weights = (out * inp) as f64;
        if self.arm {
            return match format {
                Format::Q4_0 | Format::Q4_K | Format::Q6_K | Format::Q8_0 => {
                    format.bytes_for(out * inp)
                }
                _ => 0,
            };
        }
        if !self.x86_tiles || !out.is_multiple_of(16) || !inp.is_multiple_of(256) || inp == 0 {
            return 0;
        }
        let per_weight = match format {
            Format::Q4_K => 0.75 + if self.x86_amx { 1.25 } else { 0.0 },
            Format::Q6_K => 1.25,
            Format::Q8_0 if self.x86_vnni => 34.0 / 32.0,
            _ => 0.0,
        };
        (weights * per_weight) as u64
    }
}

/// Bytes an `[out, in]` weight stored in `format` occupies after its first
/// forwards on this CPU: the stored blocks plus the repacked copy kept for
/// computing. For Q8_0 where [`crate::int8_kernel_available`], that is the
/// int8 kernel's copy (1.25 bytes per weight, output columns padded to 16;
/// candle's copy is then never built); otherwise candle's (see the module
/// docs). `format` should already be fitted ([`Format::fit`]). A bias is not
/// included ([`crate::QLinear::resident_bytes`] adds it, and its copy).
pub fn resident_weight_bytes(format: Format, out: usize, inp: usize) -> u64 {
    if format == Format::Q8_0 && crate::int8_kernel_available() {
        return format.bytes_for(out * inp) + crate::vnni::packed_bytes(out, inp);
    }
    candle_resident_bytes(format, out, inp)
}

/// Storage plus candle's repacked copy on this CPU.
pub(crate) fn candle_resident_bytes(format: Format, out: usize, inp: usize) -> u64 {
    format.bytes_for(out * inp) + RepackRules::this_cpu().copy_bytes(format, out, inp)
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
            x86.copy_bytes(Format::Q8_0, 4096, 4096),
            Format::Q8_0.bytes_for(n)
        );
        assert_eq!(x86.copy_bytes(Format::Q4_K, 4096, 4096), n as u64 * 3 / 4);
        // 384 inputs is not a multiple of 256: no tiles.
        assert_eq!(x86.copy_bytes(Format::Q8_0, 384, 384), 0);
        assert_eq!(x86.copy_bytes(Format::Q4_0, 4096, 4096), 0);
        assert_eq!(x86.copy_bytes(Format::F32, 4096, 4096), 0);
        let amx = RepackRules {
            x86_amx: true,
            ..x86
        };
        assert_eq!(amx.copy_bytes(Format::Q4_K, 4096, 4096), n as u64 * 2);
        let avx2 = RepackRules {
            x86_vnni: false,
            ..x86
        };
        assert_eq!(avx2.copy_bytes(Format::Q8_0, 4096, 4096), 0);
    }
}
