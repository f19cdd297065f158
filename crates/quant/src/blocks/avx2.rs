//! AVX2 + FMA kernel (x86-64 without AVX-512: most laptops, and VMs that
//! hide AVX-512). See the module docs of [`super`].
//!
//! It covers Q8_0 (as ggml's `ggml_vec_dot_q8_0_q8_0` on AVX2: `|w|` times
//! the activations with `w`'s signs, eight lanes, one FMA per block) and
//! Q4_1 (SmolLM2's weights), this one in ggml's own order: the order of
//! `ggml_vec_dot_q4_1_q8_1`'s AVX2 path, which the portable and AVX-512
//! kernels follow too, so all three compute the same floats. `vpmaddubsw`
//! then `vpmaddwd` by ones give the same eight lane sums of four products as
//! `vpdpbusd` (no pair of nibble × int8 products can saturate an i16:
//! 2 · 15 · 128 < 32768). Other types run the portable kernel.

// Rows index several parallel arrays of registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::{Acts, QK};
use super::matrix::{for_row_groups, QMatrix, Ty, YPtr, R};
use crate::vnni::f16_to_f32;

/// Whether this CPU has AVX2 and FMA.
pub(crate) fn cpu_supports() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether `ty` has an AVX2 kernel.
pub(crate) fn supports(ty: Ty) -> bool {
    matches!(ty, Ty::Q4_1 | Ty::Q8_0)
}

/// Weight rows `js` against activation rows `0..n`, into `y`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `m` is Q4_1 or Q8_0; `acts` holds `n` rows
/// quantized for it in natural order; `js` are rows of `m`; no other task writes the
/// cells `(0..n, js)` of `y`.
pub(crate) unsafe fn tile(m: &QMatrix, acts: &Acts, n: usize, js: Range<usize>, y: YPtr) {
    debug_assert!(supports(m.ty));
    let nb = m.nb();
    let per_block = if m.ty == Ty::Q8_0 { QK } else { 16 };
    assert!(acts.qs.len() >= n * m.cols && acts.d.len() >= n * nb && acts.s.len() >= n * nb);
    assert!(js.end <= m.rows && m.qs.len() >= m.rows * nb * per_block);
    let q8 = m.ty == Ty::Q8_0;
    // SAFETY: forwarded; the sizes were asserted above.
    unsafe {
        for_row_groups(n, js, y, |j, i, r, out| match (q8, r) {
            (true, 4) => q8_0_row::<4>(m, acts, j, i, out),
            (true, 3) => q8_0_row::<3>(m, acts, j, i, out),
            (true, 2) => q8_0_row::<2>(m, acts, j, i, out),
            (true, _) => q8_0_row::<1>(m, acts, j, i, out),
            (false, 4) => q4_1_row::<4>(m, acts, j, i, out),
            (false, 3) => q4_1_row::<3>(m, acts, j, i, out),
            (false, 2) => q4_1_row::<2>(m, acts, j, i, out),
            (false, _) => q4_1_row::<1>(m, acts, j, i, out),
        })
    }
}

/// Q4_1 weight row `j` against activation rows `i0..i0 + N`.
///
/// # Safety
/// As for [`tile`]; rows `i0..i0 + N` exist.
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let (k, nb) = (m.cols, m.nb());
    let low = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut summs = [0f32; N];
    for b in 0..nb {
        let wb = j * nb + b;
        let (dw, mw) = (f16_to_f32(m.d[wb]), f16_to_f32(m.m[wb]));
        // SAFETY: block `wb` has 16 bytes of nibbles; activation row
        // `i0 + r` has 32 values at block `b` (the caller's sizes).
        unsafe {
            let v = _mm_loadu_si128(m.qs.as_ptr().add(wb * 16) as *const __m128i);
            let w = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_and_si128(v, low)),
                _mm_and_si128(_mm_srli_epi16::<4>(v), low),
            );
            for r in 0..N {
                let at = (i0 + r) * nb + b;
                summs[r] = mw.mul_add(acts.s[at], summs[r]);
                let a = _mm256_loadu_si256(
                    acts.qs.as_ptr().add((i0 + r) * k + b * QK) as *const __m256i
                );
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);
                let dd = _mm256_set1_ps(dw * acts.d[at]);
                acc[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot), acc[r]);
            }
        }
    }
    for r in 0..N {
        out[r] = hsum_f32x8(acc[r]) + summs[r];
    }
}

/// Q8_0 weight row `j` (stored as `q + 128`) against activation rows
/// `i0..i0 + N`: `vpmaddubsw` of `|q|` by the activations carrying `q`'s
/// signs (no pair saturates: 2 · 128 · 127 < 32768), `vpmaddwd` by ones,
/// one FMA per block by `d_w · d_a`.
///
/// # Safety
/// As for [`tile`]; rows `i0..i0 + N` exist.
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let (k, nb) = (m.cols, m.nb());
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let wb = j * nb + b;
        let dw = f16_to_f32(m.d[wb]);
        // SAFETY: block `wb` has 32 quants; activation row `i0 + r` has 32
        // values at block `b` (the caller's sizes).
        unsafe {
            let u = _mm256_loadu_si256(m.qs.as_ptr().add(wb * QK) as *const __m256i);
            let w = _mm256_xor_si256(u, flip);
            let aw = _mm256_sign_epi8(w, w);
            for r in 0..N {
                let at = (i0 + r) * nb + b;
                let a = _mm256_loadu_si256(
                    acts.qs.as_ptr().add((i0 + r) * k + b * QK) as *const __m256i
                );
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
                let dd = _mm256_set1_ps(dw * acts.d[at]);
                acc[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot), acc[r]);
            }
        }
    }
    for r in 0..N {
        out[r] = hsum_f32x8(acc[r]);
    }
}

/// ggml's `hsum_float_8`: lanes `i` and `i + 4` added, then lanes 0 + 2 and
/// 1 + 3, then those two (the Q4_1 kernels depend on this order; the
/// AVX-512 kernels use it too).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_f32x8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
