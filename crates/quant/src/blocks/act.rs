//! Activations quantized once per matmul: int8 blocks with f32 scales.
//!
//! Every 32-block weight type (Q4_0, Q4_1, Q5_0, Q8_0) takes activations as
//! GGML's Q8_0 / Q8_1 blocks of 32: `q = round(x · 127 / max|x|)` (ties to
//! even) and the scale `d = max|x| / 127` rounded to f16, as those blocks
//! store it, and also `s = d · Σ q` so that a weight's offset or minimum
//! costs one multiply per block. For Q4_1 (whose activations are Q8_1
//! blocks) `s` is computed from the unrounded scale and rounded to f16 as
//! Q8_1 stores it; for the others it is exact. Rounding as the format does
//! makes each matmul agree with llama.cpp's to float summation order
//! (about 1e-7 relative) instead of about 3e-4. The K-quants (Q4_K, Q6_K) take Q8_K-like blocks of
//! 256 with one scale and the sums of each 16 values (`bsums`).
//!
//! The int8 values of a row may be stored in a permuted order ([`Layout`]) so
//! that a SIMD kernel can expand packed nibbles with two instructions and
//! feed them to `vpdpbusd` unchanged; the portable kernels read
//! [`Layout::Natural`].

/// Q8 block length for the 32-block types.
pub(crate) const QK: usize = 32;
/// Super-block length of the K-quants.
pub(crate) const QKK: usize = 256;

/// Order of the int8 values inside a row of quantized activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Values in input order.
    Natural,
    /// Per group of 4 whole blocks of 32 (128 values): the first 16 values of
    /// blocks 0..4, then the last 16 of blocks 0..4 — the order in which the
    /// low and the high nibbles of four Q4/Q5 blocks come out of one 64-byte
    /// load. Blocks after the last whole group stay in input order.
    Nibble4,
    /// Per super-block of 256, the sub-blocks of 32 in the order
    /// 0, 2, 1, 3, 4, 6, 5, 7: the low nibbles of Q4_K's bytes 0..64 are
    /// sub-blocks 0 and 2, the high nibbles 1 and 3.
    SwapQ4K,
}

/// Where block `b` of 32 values (out of `nb` in the row) goes: the offset of
/// its first 16 values and of its last 16 values.
#[inline]
pub(crate) fn block_dest(layout: Layout, b: usize, nb: usize) -> (usize, usize) {
    match layout {
        Layout::Natural => (QK * b, QK * b + 16),
        Layout::Nibble4 => {
            if b < nb / 4 * 4 {
                let (g, i) = (b / 4, b % 4);
                (128 * g + 16 * i, 128 * g + 64 + 16 * i)
            } else {
                (QK * b, QK * b + 16)
            }
        }
        Layout::SwapQ4K => {
            let (sb, j) = (b / 8, b % 8);
            let p = match j {
                1 => 2,
                2 => 1,
                5 => 6,
                6 => 5,
                j => j,
            };
            let o = QKK * sb + QK * p;
            (o, o + 16)
        }
    }
}

/// Quantized activation rows (a scratch buffer reused between calls).
#[derive(Debug, Default)]
pub(crate) struct Acts {
    /// Rows.
    pub(crate) n: usize,
    /// Values per row.
    pub(crate) k: usize,
    /// `[n][k]` int8 values in `layout` order.
    pub(crate) qs: Vec<i8>,
    /// `[n][k / 32]` (32-blocks) or `[n][k / 256]` (K) scales.
    pub(crate) d: Vec<f32>,
    /// 32-blocks: `[n][k / 32]` `d · Σ q`.
    pub(crate) s: Vec<f32>,
    /// K: `[n][k / 256][16]` sums of each 16 values (natural order of the
    /// 16-groups).
    pub(crate) bsums: Vec<i16>,
}

impl Acts {
    /// Makes room for `n` rows of `k` values (grows, never shrinks).
    pub(crate) fn reset(&mut self, n: usize, k: usize, super_blocks: bool) {
        self.n = n;
        self.k = k;
        grow(&mut self.qs, n * k);
        if super_blocks {
            grow(&mut self.d, n * (k / QKK));
            grow(&mut self.bsums, n * (k / QKK) * 16);
        } else {
            grow(&mut self.d, n * (k / QK));
            grow(&mut self.s, n * (k / QK));
        }
    }
}

/// Grows `v` to at least `len` values.
fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Round to nearest, ties to even (what `vcvtps2dq` does by default).
#[inline]
fn round_q(v: f32) -> i8 {
    v.round_ties_even().clamp(-127.0, 127.0) as i8
}

/// The inverse scale used by every quantizer: `127 / amax` (0 for a zero block).
#[inline]
pub(crate) fn inv_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        127.0 / amax
    } else {
        0.0
    }
}

/// A Q8_K super-block's scale from its inverse scale `id` (0 for a zero
/// block): `1 / id`, as ggml's `quantize_row_q8_K_ref` stores it (the
/// reciprocal of its `-127 / max`; the sign goes with the values), which is
/// not always the float `amax / 127`.
#[inline]
pub(crate) fn q8_k_scale(id: f32) -> f32 {
    if id > 0.0 {
        1.0 / id
    } else {
        0.0
    }
}

/// The scale and the sum term of one block whose largest magnitude is
/// `amax` and whose int8 values sum to `sum` (see the module docs).
#[inline]
pub(crate) fn block_scales(amax: f32, sum: i32, q8_1: bool) -> (f32, f32) {
    let d = amax / 127.0;
    let d16 = half::f16::from_f32(d).to_f32();
    let s = if q8_1 {
        half::f16::from_f32(d * sum as f32).to_f32()
    } else {
        d16 * sum as f32
    };
    (d16, s)
}

/// Quantizes one row to blocks of 32 (portable). `qs.len() == x.len()`,
/// `d.len() == s.len() == x.len() / 32`; `q8_1` selects Q8_1's sum term.
#[inline(always)]
pub(crate) fn quantize_row_q8_0(
    x: &[f32],
    layout: Layout,
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    q8_1: bool,
) {
    let nb = x.len() / QK;
    for b in 0..nb {
        let blk = &x[b * QK..(b + 1) * QK];
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = inv_scale(amax);
        let (lo, hi) = block_dest(layout, b, nb);
        let mut sum = 0i32;
        for (t, &v) in blk.iter().enumerate() {
            let q = round_q(v * id);
            sum += q as i32;
            qs[if t < 16 { lo + t } else { hi + t - 16 }] = q;
        }
        (d[b], s[b]) = block_scales(amax, sum, q8_1);
    }
}

/// Quantizes one row to super-blocks of 256 (portable). `qs.len() == x.len()`,
/// `d.len() == x.len() / 256`, `bsums.len() == 16 · d.len()`.
#[inline(always)]
pub(crate) fn quantize_row_q8_k(
    x: &[f32],
    layout: Layout,
    qs: &mut [i8],
    d: &mut [f32],
    bsums: &mut [i16],
) {
    let nb = x.len() / QK;
    for (sb, blk) in x.chunks_exact(QKK).enumerate() {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = inv_scale(amax);
        d[sb] = q8_k_scale(id);
        for (g, sixteen) in blk.chunks_exact(16).enumerate() {
            let b = sb * 8 + g / 2;
            let (lo, hi) = block_dest(layout, b, nb);
            let base = if g % 2 == 0 { lo } else { hi };
            let mut sum = 0i32;
            for (t, &v) in sixteen.iter().enumerate() {
                let q = round_q(v * id);
                sum += q as i32;
                qs[base + t] = q;
            }
            bsums[sb * 16 + g] = sum as i16;
        }
    }
}

/// The portable quantizers compiled for AVX2: the same Rust, so the same
/// values to the bit, but the rounding is one `vroundps` per eight values
/// instead of a call to the C library's `rint` per value (x86-64's baseline
/// has no rounding instruction), and the loops vectorize.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{Layout, QK};

    /// Whether this CPU runs these.
    #[inline]
    pub(crate) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    /// [`super::quantize_row_q8_0`].
    ///
    /// # Safety
    /// The CPU has AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn quantize_row_q8_0(
        x: &[f32],
        layout: Layout,
        qs: &mut [i8],
        d: &mut [f32],
        s: &mut [f32],
        q8_1: bool,
    ) {
        debug_assert_eq!(x.len() % QK, 0);
        super::quantize_row_q8_0(x, layout, qs, d, s, q8_1)
    }

    /// [`super::quantize_row_q8_k`].
    ///
    /// # Safety
    /// The CPU has AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn quantize_row_q8_k(
        x: &[f32],
        layout: Layout,
        qs: &mut [i8],
        d: &mut [f32],
        bsums: &mut [i16],
    ) {
        super::quantize_row_q8_k(x, layout, qs, d, bsums)
    }
}
