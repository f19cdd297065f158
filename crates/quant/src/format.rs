//! Weight formats and their sizes.

use candle_core::quantized::GgmlDType;
use mem_budget::WeightType;
use serde::{Deserialize, Serialize};

/// A storage format for a weight.
///
/// Sizes per weight (bytes): F32 4, F16 2, Q8_0 34/32 = 1.0625,
/// Q6_K 210/256 ≈ 0.82, Q4_K 144/256 = 0.5625, Q4_0 18/32 = 0.5625.
///
/// Block formats need the input (last) dimension to be a multiple of their
/// block: 256 for the K-quants (Q4_K, Q6_K), 32 for Q8_0 and Q4_0. Where it is
/// not, [`Format::fit`] picks the **next format that fits, never a less
/// precise one**: Q4_K / Q6_K → Q8_0 (fast on CPU, and its error is smaller,
/// so any error bound stays true; Q4_0 would be as small but is not repacked
/// by candle and is ~7x slower at batch 32) → F16; Q8_0 / Q4_0 → F16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(non_camel_case_types)] // the names ggml and GGUF users know
pub enum Format {
    /// 32-bit float, unquantized.
    F32,
    /// 16-bit float.
    F16,
    /// 8-bit blocks of 32 with an f16 scale ("INT8").
    Q8_0,
    /// 6-bit K-quant, super-blocks of 256.
    Q6_K,
    /// 4-bit K-quant, super-blocks of 256 ("INT4").
    Q4_K,
    /// 4-bit blocks of 32 with an f16 scale (compatibility; slow batched on CPU).
    Q4_0,
}

impl Format {
    /// Every format, most precise first.
    pub const ALL: [Format; 6] = [
        Format::F32,
        Format::F16,
        Format::Q8_0,
        Format::Q6_K,
        Format::Q4_K,
        Format::Q4_0,
    ];

    /// The candle dtype of this format.
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            Format::F32 => GgmlDType::F32,
            Format::F16 => GgmlDType::F16,
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q6_K => GgmlDType::Q6K,
            Format::Q4_K => GgmlDType::Q4K,
            Format::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// The format of a candle dtype, `None` for dtypes this crate does not offer.
    pub fn from_ggml_dtype(dtype: GgmlDType) -> Option<Format> {
        Some(match dtype {
            GgmlDType::F32 => Format::F32,
            GgmlDType::F16 => Format::F16,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q6K => Format::Q6_K,
            GgmlDType::Q4K => Format::Q4_K,
            GgmlDType::Q4_0 => Format::Q4_0,
            _ => return None,
        })
    }

    /// This format in mem-budget's vocabulary of stored types, the one the
    /// workspace sizes memory with (every format is one of its types).
    pub fn weight_type(self) -> WeightType {
        match self {
            Format::F32 => WeightType::F32,
            Format::F16 => WeightType::F16,
            Format::Q8_0 => WeightType::Q8_0,
            Format::Q6_K => WeightType::Q6_K,
            Format::Q4_K => WeightType::Q4_K,
            Format::Q4_0 => WeightType::Q4_0,
        }
    }

    /// The format of a stored type, `None` for types this crate does not
    /// offer.
    pub fn from_weight_type(t: WeightType) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.weight_type() == t)
    }

    /// Weights per block (1 for float formats).
    pub fn block_size(self) -> usize {
        self.ggml_dtype().block_size()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml_dtype().type_size()
    }

    /// Average bytes per weight.
    pub fn bytes_per_weight(self) -> f64 {
        self.block_bytes() as f64 / self.block_size() as f64
    }

    /// Bits per weight.
    pub fn bits_per_weight(self) -> f64 {
        self.bytes_per_weight() * 8.0
    }

    /// Whether a tensor whose last dim is `in_dim` can be stored in this format.
    pub fn fits(self, in_dim: usize) -> bool {
        in_dim > 0 && in_dim.is_multiple_of(self.block_size())
    }

    /// The format actually used for a tensor whose last dim is `in_dim`:
    /// `self` where it fits, else the next more precise format that fits
    /// (see the type's docs). Always returns a format (F16 fits anything).
    pub fn fit(self, in_dim: usize) -> Format {
        let mut f = self;
        loop {
            if f.fits(in_dim) || matches!(f, Format::F32 | Format::F16) {
                return f;
            }
            f = match f {
                Format::Q4_K | Format::Q6_K => Format::Q8_0,
                _ => Format::F16,
            };
        }
    }

    /// Bytes a tensor of `elements` weights takes in this format (rounded up
    /// to whole blocks). The caller is expected to have applied [`Format::fit`].
    pub fn bytes_for(self, elements: usize) -> u64 {
        let bs = self.block_size();
        (elements.div_ceil(bs) * self.block_bytes()) as u64
    }

    /// Whether candle keeps a repacked copy of this format after the first
    /// CPU forward (Q8_0, Q4_K, Q6_K on x86_64 and aarch64).
    pub fn is_repacked(self) -> bool {
        matches!(self, Format::Q8_0 | Format::Q4_K | Format::Q6_K)
            && cfg!(any(target_arch = "x86_64", target_arch = "aarch64"))
    }

    /// Short lower-case name (`q8_0`, `q4_k`, …).
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Q8_0 => "q8_0",
            Format::Q6_K => "q6_k",
            Format::Q4_K => "q4_k",
            Format::Q4_0 => "q4_0",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let l = s.to_ascii_lowercase();
        Format::ALL
            .into_iter()
            .find(|f| f.name() == l || (l == "int8" && *f == Format::Q8_0) || (l == "int4" && *f == Format::Q4_K))
            .ok_or_else(|| format!("unknown format `{s}`; use one of f32, f16, q8_0 (int8), q6_k, q4_k (int4), q4_0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_weight_types_of_the_same_size() {
        for f in Format::ALL {
            let t = f.weight_type();
            assert_eq!(Format::from_weight_type(t), Some(f));
            // candle's block sizes and mem-budget's agree, so an estimate
            // from a file header and quant's own sizes are one figure.
            for elements in [256usize, 4096 * 4096] {
                assert_eq!(
                    t.bytes_for(elements as u64),
                    Some(f.bytes_for(elements)),
                    "{f:?}"
                );
            }
        }
        assert_eq!(Format::from_weight_type(WeightType::Q5_K), None);
    }

    #[test]
    fn sizes_and_fallbacks() {
        assert_eq!(Format::Q8_0.bytes_per_weight(), 34.0 / 32.0);
        assert_eq!(Format::Q4_K.bytes_per_weight(), 144.0 / 256.0);
        assert_eq!(Format::Q6_K.bytes_per_weight(), 210.0 / 256.0);
        assert_eq!(Format::Q4_0.bytes_per_weight(), 18.0 / 32.0);
        assert_eq!(Format::Q4_K.fit(384), Format::Q8_0);
        assert_eq!(Format::Q4_K.fit(1536), Format::Q4_K);
        assert_eq!(Format::Q6_K.fit(96), Format::Q8_0);
        assert_eq!(Format::Q4_K.fit(100), Format::F16);
        assert_eq!(Format::Q8_0.fit(100), Format::F16);
        assert_eq!(Format::F32.fit(7), Format::F32);
        assert_eq!(Format::Q4_0.fit(0), Format::F16);
        assert_eq!(Format::Q8_0.bytes_for(4096 * 4096), 4096 * 4096 / 32 * 34);
        assert_eq!("int4".parse::<Format>(), Ok(Format::Q4_K));
        assert!("q3".parse::<Format>().is_err());
    }
}
