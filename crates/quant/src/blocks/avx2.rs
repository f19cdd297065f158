//! AVX2 + FMA kernel (x86-64 without AVX-512: most laptops, and VMs that
//! hide AVX-512). See the module docs of [`super`].
//!
//! It covers:
//! - Q8_0, as ggml's `ggml_vec_dot_q8_0_q8_0` on AVX2: `|w|` times the
//!   activations with `w`'s signs, eight lanes, one FMA per block.
//! - Q4_1 (SmolLM2's weights) in ggml's own order: the order of
//!   `ggml_vec_dot_q4_1_q8_1`'s AVX2 path, which the portable and AVX-512
//!   kernels follow too, so all three compute the same floats.
//! - Q5_0, Q4_K and Q6_K (with Q8_0, Gemma-3's weights) in the portable
//!   kernel's order, so that these two compute the same floats: the integer
//!   dot products are exact in any order, and the f32 scaling is done per
//!   block (Q5_0) or super-block (K) with the portable kernel's operations,
//!   added to each output in block order (the AVX-512 kernel sums in lanes
//!   instead and differs from both by float rounding).
//!
//! `vpmaddubsw` (unsigned weights × signed activations, two products summed
//! to an i16) then `vpmaddwd` by ones, or by the K types' scales, give the
//! lane sums that `vpdpbusd` gives: no pair saturates an i16 (Q4_1, Q4_K
//! 2 · 15 · 127, Q5_0 2 · 31 · 127, Q6_K 2 · 63 · 127, all < 32768; Q8_0
//! takes `|w| ≤ 128`). Q4_0, F16 and F32 run the portable kernel.

// Rows index several parallel arrays of registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::{Acts, QK, QKK};
use super::matrix::{for_col_groups, for_row_groups, QMatrix, Ty, YPtr, COLS, R};
use crate::vnni::f16_to_f32;

/// Whether this CPU has AVX2 and FMA.
pub(crate) fn cpu_supports() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether `ty` has an AVX2 kernel.
pub(crate) fn supports(ty: Ty) -> bool {
    matches!(ty, Ty::Q4_1 | Ty::Q8_0 | Ty::Q5_0 | Ty::Q4K | Ty::Q6K)
}

/// Weight rows `js` against activation rows `0..n`, into `y`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `supports(m.ty)`; `acts` holds `n` rows
/// quantized for it in natural order; `js` are rows of `m`; no other task
/// writes the cells `(0..n, js)` of `y`.
pub(crate) unsafe fn tile(m: &QMatrix, acts: &Acts, n: usize, js: Range<usize>, y: YPtr) {
    debug_assert!(supports(m.ty));
    let nb = m.nb();
    let wblocks = m.rows * nb;
    assert!(js.end <= m.rows && m.d.len() >= wblocks);
    assert!(acts.qs.len() >= n * m.cols && acts.d.len() >= n * nb);
    let sizes_ok = match m.ty {
        Ty::Q8_0 => acts.s.len() >= n * nb && m.qs.len() >= wblocks * QK,
        Ty::Q4_1 => acts.s.len() >= n * nb && m.qs.len() >= wblocks * 16 && m.m.len() >= wblocks,
        Ty::Q5_0 => {
            acts.s.len() >= n * nb && m.qs.len() >= wblocks * 16 && m.qh.len() >= wblocks * 4
        }
        Ty::Q4K => {
            acts.bsums.len() >= n * nb * 16
                && m.qs.len() >= wblocks * 128
                && m.sc.len() >= wblocks * 16
                && m.m.len() >= wblocks
        }
        Ty::Q6K => {
            acts.bsums.len() >= n * nb * 16
                && m.qs.len() >= wblocks * 128
                && m.qh.len() >= wblocks * 64
                && m.sc.len() >= wblocks * 16
        }
        _ => false,
    };
    assert!(
        sizes_ok,
        "the AVX2 kernel got a {:?} matrix or short buffers",
        m.ty
    );
    if n == 1 && matches!(m.ty, Ty::Q4_1 | Ty::Q8_0) {
        // One activation row (a decode step): four weight rows at a time, as
        // the AVX-512 kernel does (independent accumulator chains, the rows
        // four ahead prefetched); each row's sums in `row::<1>`'s order.
        // SAFETY: forwarded; the sizes were asserted above.
        unsafe {
            for_col_groups(
                js,
                y,
                |j, out| match m.ty {
                    Ty::Q4_1 => q4_1_cols(m, acts, j, out),
                    _ => q8_0_cols(m, acts, j, out),
                },
                |j, i, _, out| row::<1>(m, acts, j, i, out),
            )
        };
        return;
    }
    // SAFETY: forwarded; the sizes were asserted above.
    unsafe {
        for_row_groups(n, js, y, |j, i, r, out| match r {
            4 => row::<4>(m, acts, j, i, out),
            3 => row::<3>(m, acts, j, i, out),
            2 => row::<2>(m, acts, j, i, out),
            _ => row::<1>(m, acts, j, i, out),
        })
    }
}

/// Weight row `j` against activation rows `i0..i0 + N`, by type.
///
/// # Safety
/// As for [`tile`] (sizes checked there); rows `i0..i0 + N` exist.
#[target_feature(enable = "avx2,fma")]
unsafe fn row<const N: usize>(m: &QMatrix, acts: &Acts, j: usize, i0: usize, out: &mut [f32; R]) {
    // SAFETY: forwarded.
    unsafe {
        match m.ty {
            Ty::Q8_0 => q8_0_row::<N>(m, acts, j, i0, out),
            Ty::Q4_1 => q4_1_row::<N>(m, acts, j, i0, out),
            Ty::Q5_0 => q5_0_row::<N>(m, acts, j, i0, out),
            Ty::Q4K => q4k_row::<N>(m, acts, j, i0, out),
            Ty::Q6K => q6k_row::<N>(m, acts, j, i0, out),
            _ => unreachable!("`tile` checked the type"),
        }
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

/// [`q4_1_row`]`::<1>` for weight rows `j0..j0 + COLS` against activation
/// row 0, the rows' chains interleaved: each row's value is the same float.
///
/// # Safety
/// As for [`tile`] (sizes checked there), with `n == 1`.
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1_cols(m: &QMatrix, acts: &Acts, j0: usize, out: &mut [f32; COLS]) {
    let nb = m.nb();
    let low = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); COLS];
    let mut summs = [0f32; COLS];
    for b in 0..nb {
        let (sa, da) = (acts.s[b], acts.d[b]);
        // SAFETY: blocks `(j0 + c) * nb + b` have 16 bytes of nibbles;
        // activation row 0 has 32 values at block `b` (the caller's sizes);
        // a prefetch is a hint and never faults.
        unsafe {
            let a = _mm256_loadu_si256(acts.qs.as_ptr().add(b * QK) as *const __m256i);
            for c in 0..COLS {
                let wb = (j0 + c) * nb + b;
                let (dw, mw) = (f16_to_f32(m.d[wb]), f16_to_f32(m.m[wb]));
                if b % 4 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(
                        m.qs.as_ptr().wrapping_add((wb + COLS * nb) * 16) as *const i8
                    );
                }
                let v = _mm_loadu_si128(m.qs.as_ptr().add(wb * 16) as *const __m128i);
                let w = _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_and_si128(v, low)),
                    _mm_and_si128(_mm_srli_epi16::<4>(v), low),
                );
                summs[c] = mw.mul_add(sa, summs[c]);
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);
                let dd = _mm256_set1_ps(dw * da);
                acc[c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot), acc[c]);
            }
        }
    }
    for c in 0..COLS {
        out[c] = hsum_f32x8(acc[c]) + summs[c];
    }
}

/// [`q8_0_row`]`::<1>` for weight rows `j0..j0 + COLS` against activation
/// row 0, the rows' chains interleaved: each row's value is the same float.
///
/// # Safety
/// As for [`tile`] (sizes checked there), with `n == 1`.
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_cols(m: &QMatrix, acts: &Acts, j0: usize, out: &mut [f32; COLS]) {
    let nb = m.nb();
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); COLS];
    for b in 0..nb {
        let da = acts.d[b];
        // SAFETY: blocks `(j0 + c) * nb + b` have 32 quants; activation row
        // 0 has 32 values at block `b`; a prefetch never faults.
        unsafe {
            let a = _mm256_loadu_si256(acts.qs.as_ptr().add(b * QK) as *const __m256i);
            for c in 0..COLS {
                let wb = (j0 + c) * nb + b;
                let dw = f16_to_f32(m.d[wb]);
                _mm_prefetch::<_MM_HINT_T0>(
                    m.qs.as_ptr().wrapping_add((wb + COLS * nb) * QK) as *const i8
                );
                let u = _mm256_loadu_si256(m.qs.as_ptr().add(wb * QK) as *const __m256i);
                let w = _mm256_xor_si256(u, flip);
                let aw = _mm256_sign_epi8(w, w);
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
                let dd = _mm256_set1_ps(dw * da);
                acc[c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot), acc[c]);
            }
        }
    }
    for c in 0..COLS {
        out[c] = hsum_f32x8(acc[c]);
    }
}

/// Blocks the kernels below take in one step: eight, then four, then one.
#[inline]
fn step(left: usize) -> usize {
    if left >= 8 {
        8
    } else if left >= 4 {
        4
    } else {
        1
    }
}

/// Calls `blocks::<G>(b0)` over `0..nb` in steps of [`step`].
macro_rules! in_steps {
    ($nb:expr, |$b0:ident| $call8:expr, $call4:expr, $call1:expr) => {{
        let nb = $nb;
        let mut $b0 = 0;
        while $b0 < nb {
            let g = step(nb - $b0);
            match g {
                8 => $call8,
                4 => $call4,
                _ => $call1,
            }
            $b0 += g;
        }
    }};
}

/// Q5_0 weight row `j` against activation rows `i0..i0 + N`, to the bit
/// the floats of the portable kernel: per block the 32 values `u = q + 16`
/// (nibbles, the fifth bit from `qh`) by `vpmaddubsw` against the block's
/// activations (no pair saturates: 2 · 31 · 127 < 32768), `vpmaddwd` by
/// ones; the eight lane sums of up to eight blocks folded to one integer
/// per block (exact); then, for those blocks at once, `(d_w · d_a) · Σ u·a
/// + (-16 d_w) · s_a` (two multiplies, one multiply, an add: no FMA),
/// added to the row's sum one block after the other, as
/// [`super::portable`] does.
///
/// # Safety
/// As for [`tile`]; rows `i0..i0 + N` exist.
#[target_feature(enable = "avx2,fma")]
unsafe fn q5_0_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let mut sum = [0f32; N];
    // SAFETY: forwarded; the steps stay inside the row's `nb` blocks.
    unsafe {
        in_steps!(
            m.nb(),
            |b0| q5_0_blocks::<N, 8>(m, acts, j, i0, b0, &mut sum),
            q5_0_blocks::<N, 4>(m, acts, j, i0, b0, &mut sum),
            q5_0_blocks::<N, 1>(m, acts, j, i0, b0, &mut sum)
        )
    }
    out[..N].copy_from_slice(&sum);
}

/// Blocks `b0..b0 + G` (`G ≤ 8`) of [`q5_0_row`].
///
/// # Safety
/// As for [`q5_0_row`]; the blocks exist.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn q5_0_blocks<const N: usize, const G: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    b0: usize,
    sum: &mut [f32; N],
) {
    let (k, nb) = (m.cols, m.nb());
    let whole = nb / 4 * 4;
    let low = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let zero = _mm256_setzero_si256();
    let mut w = [zero; G];
    // SAFETY: blocks `b0..b0 + G` of weight row `j` have 16 bytes of
    // nibbles and 4 of high bits in the row's `qh`; activation rows
    // `i0..i0 + N` have 32 values and a scale and sum at each (the sizes
    // `tile` checked).
    unsafe {
        let qh = m.qh.as_ptr().add(j * nb * 4);
        for t in 0..G {
            let b = b0 + t;
            let wb = j * nb + b;
            let bits = if b < whole {
                // Regrouped per four blocks (see `QMatrix::q5_bits`).
                let (g, t4) = (b / 4, b % 4);
                let lo = (qh.add(16 * g + 2 * t4) as *const u16).read_unaligned();
                let hi = (qh.add(16 * g + 8 + 2 * t4) as *const u16).read_unaligned();
                lo as u32 | (hi as u32) << 16
            } else {
                (qh.add(4 * b) as *const u32).read_unaligned()
            };
            let v = _mm_loadu_si128(m.qs.as_ptr().add(wb * 16) as *const __m128i);
            let u = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_and_si128(v, low)),
                _mm_and_si128(_mm_srli_epi16::<4>(v), low),
            );
            w[t] = _mm256_or_si256(u, bit4_of(bits));
        }
        let dwv = f16s_to_f32::<G>(m.d.as_ptr().add(j * nb + b0));
        let ow = _mm256_mul_ps(dwv, _mm256_set1_ps(-16.0));
        for r in 0..N {
            let mut dots = [zero; 8];
            for t in 0..G {
                let a = _mm256_loadu_si256(
                    acts.qs.as_ptr().add((i0 + r) * k + (b0 + t) * QK) as *const __m256i
                );
                dots[t] = _mm256_madd_epi16(_mm256_maddubs_epi16(w[t], a), ones);
            }
            let q = _mm256_cvtepi32_ps(sum_each_i32x8(&dots));
            let at = (i0 + r) * nb + b0;
            let da = load_first::<G>(acts.d.as_ptr().add(at));
            let sa = load_first::<G>(acts.s.as_ptr().add(at));
            let t = _mm256_add_ps(
                _mm256_mul_ps(_mm256_mul_ps(dwv, da), q),
                _mm256_mul_ps(ow, sa),
            );
            add_in_order::<G>(t, &mut sum[r]);
        }
    }
}

/// The first `G ≤ 8` floats at `p` (the other lanes 0).
///
/// # Safety
/// `G` floats are readable at `p`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_first<const G: usize>(p: *const f32) -> __m256 {
    // SAFETY: the caller's; masked lanes are not read.
    unsafe {
        if G >= 8 {
            _mm256_loadu_ps(p)
        } else {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(G as i32), lanes))
        }
    }
}

/// The first `G` (1, 4 or 8) f16 values at `p` as f32 (the other lanes 0),
/// exactly as [`f16_to_f32`] converts each: the exponent re-biased by a
/// multiply by 2^112 (exact for normal and subnormal values alike); any
/// infinity or NaN goes to [`f16_to_f32`] itself.
///
/// # Safety
/// `G` values are readable at `p`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn f16s_to_f32<const G: usize>(p: *const u16) -> __m256 {
    // SAFETY: the caller's: `G` values at `p`.
    let h = unsafe {
        if G >= 8 {
            _mm_loadu_si128(p as *const __m128i)
        } else if G >= 4 {
            _mm_loadl_epi64(p as *const __m128i)
        } else {
            _mm_cvtsi32_si128(p.read_unaligned() as i32)
        }
    };
    let h = _mm256_cvtepu16_epi32(h);
    let em = _mm256_and_si256(h, _mm256_set1_epi32(0x7fff));
    if _mm256_movemask_epi8(_mm256_cmpgt_epi32(em, _mm256_set1_epi32(0x7bff))) != 0 {
        let mut v = [0f32; 8];
        for (t, v) in v[..G].iter_mut().enumerate() {
            // SAFETY: as above.
            *v = f16_to_f32(unsafe { p.add(t).read_unaligned() });
        }
        // SAFETY: an 8-lane array.
        return unsafe { _mm256_loadu_ps(v.as_ptr()) };
    }
    let sign = _mm256_slli_epi32::<16>(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)));
    let mag = _mm256_mul_ps(
        _mm256_castsi256_ps(_mm256_slli_epi32::<13>(em)),
        _mm256_set1_ps(f32::from_bits((127 + 112) << 23)),
    );
    _mm256_or_ps(mag, _mm256_castsi256_ps(sign))
}

/// `*sum += v[t]` for `t` in `0..G`, one after the other.
#[inline]
#[target_feature(enable = "avx2")]
fn add_in_order<const G: usize>(v: __m256, sum: &mut f32) {
    let mut lanes = [0f32; 8];
    // SAFETY: an 8-lane array.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    for &x in &lanes[..G] {
        *sum += x;
    }
}

/// The 32 bits of `bits` as bytes: `0x10` where the bit is set, else 0
/// (byte `t` from bit `t`).
#[inline]
#[target_feature(enable = "avx2")]
fn bit4_of(bits: u32) -> __m256i {
    let spread = _mm256_setr_epi64x(
        0,
        0x0101_0101_0101_0101,
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, sel), sel);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Lane `t` = the sum of the eight lanes of `v[t]` (integer, exact).
#[inline]
#[target_feature(enable = "avx2")]
fn sum_each_i32x8(v: &[__m256i; 8]) -> __m256i {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    // 128-bit halves: [v0..v3 of lanes 0..4 | of lanes 4..8], same for v4..v7.
    let h03 = _mm256_hadd_epi32(h01, h23);
    let h47 = _mm256_hadd_epi32(h45, h67);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(h03, h47),
        _mm256_permute2x128_si256::<0x31>(h03, h47),
    )
}

/// Q4_K weight row `j` against activation rows `i0..i0 + N`, to the bit
/// the floats of the portable kernel: per 32 bytes of nibbles, the low
/// nibbles (sub-block `2c`) and the high ones (`2c + 1`) by `vpmaddubsw`
/// against their activations (2 · 15 · 127 < 32768), `vpmaddwd` by the
/// sub-block's 6-bit scale; the minimums by `vpmaddwd` of the
/// activations' sums of 16 with the minimums; both summed in i32 (exact),
/// then, up to eight super-blocks at once, `d_a · (d · Σ - dmin · Σ_min)`
/// added to the row's sum one super-block after the other.
///
/// # Safety
/// As for [`tile`]; rows `i0..i0 + N` exist.
#[target_feature(enable = "avx2,fma")]
unsafe fn q4k_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let mut sum = [0f32; N];
    // SAFETY: forwarded; the steps stay inside the row's `nb` super-blocks.
    unsafe {
        in_steps!(
            m.nb(),
            |b0| q4k_blocks::<N, 8>(m, acts, j, i0, b0, &mut sum),
            q4k_blocks::<N, 4>(m, acts, j, i0, b0, &mut sum),
            q4k_blocks::<N, 1>(m, acts, j, i0, b0, &mut sum)
        )
    }
    out[..N].copy_from_slice(&sum);
}

/// Super-blocks `b0..b0 + G` (`G ≤ 8`) of [`q4k_row`].
///
/// # Safety
/// As for [`q4k_row`]; the super-blocks exist.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn q4k_blocks<const N: usize, const G: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    b0: usize,
    sum: &mut [f32; N],
) {
    let (k, nb) = (m.cols, m.nb());
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let mut dots = [[zero; 8]; N];
    let mut mins = [[zero; 8]; N];
    // `vpshufb` indices: byte `t` of the scales, zero-extended, in each i16.
    let pick = |t: i16| _mm256_set1_epi16(t | 0x8000u16 as i16);
    // SAFETY: super-blocks `b0..b0 + G` of weight row `j` have 128 bytes of
    // nibbles and 16 scales and minimums; activation rows `i0..i0 + N` have
    // 256 values, a scale and 16 sums at each (the sizes `tile` checked).
    unsafe {
        for c in 0..G {
            let wb = j * nb + b0 + c;
            let sc = m.sc.as_ptr().add(wb * 16);
            let scales = _mm256_broadcastsi128_si256(_mm_loadl_epi64(sc as *const __m128i));
            let q = m.qs.as_ptr().add(wb * 128);
            let mut acc = [zero; N];
            for h in 0..4 {
                let v = _mm256_loadu_si256(q.add(32 * h) as *const __m256i);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                let slo = _mm256_shuffle_epi8(scales, pick(2 * h as i16));
                let shi = _mm256_shuffle_epi8(scales, pick(2 * h as i16 + 1));
                for r in 0..N {
                    let a = acts.qs.as_ptr().add((i0 + r) * k + (b0 + c) * QKK + 64 * h);
                    let a0 = _mm256_loadu_si256(a as *const __m256i);
                    let a1 = _mm256_loadu_si256(a.add(32) as *const __m256i);
                    let p = _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), slo),
                        _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), shi),
                    );
                    acc[r] = _mm256_add_epi32(acc[r], p);
                }
            }
            // Minimums as i16, each twice: [m0 m0 m1 m1 .. m7 m7], against
            // the sums of each 16 activations.
            let mn = _mm_cvtepu8_epi16(_mm_loadl_epi64(sc.add(8) as *const __m128i));
            let mn2 = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_unpacklo_epi16(mn, mn)),
                _mm_unpackhi_epi16(mn, mn),
            );
            for r in 0..N {
                let ai = (i0 + r) * nb + b0 + c;
                let bs = _mm256_loadu_si256(acts.bsums.as_ptr().add(ai * 16) as *const __m256i);
                dots[r][c] = acc[r];
                mins[r][c] = _mm256_madd_epi16(bs, mn2);
            }
        }
        let dvv = f16s_to_f32::<G>(m.d.as_ptr().add(j * nb + b0));
        let mvv = f16s_to_f32::<G>(m.m.as_ptr().add(j * nb + b0));
        for r in 0..N {
            let da = load_first::<G>(acts.d.as_ptr().add((i0 + r) * nb + b0));
            let dot = _mm256_cvtepi32_ps(sum_each_i32x8(&dots[r]));
            let mn = _mm256_cvtepi32_ps(sum_each_i32x8(&mins[r]));
            let t = _mm256_mul_ps(
                da,
                _mm256_sub_ps(_mm256_mul_ps(dvv, dot), _mm256_mul_ps(mvv, mn)),
            );
            add_in_order::<G>(t, &mut sum[r]);
        }
    }
}

/// `vpshufb` indices that put byte `2c` of a register in bytes 0..8 and
/// byte `2c + 1` in bytes 8..16, for `c` in 0..8 (Q6_K's scales of two
/// groups of 16).
const SCALE_PAIRS: [[u8; 16]; 8] = {
    let mut t = [[0u8; 16]; 8];
    let mut c = 0;
    while c < 8 {
        let mut i = 0;
        while i < 16 {
            t[c][i] = (2 * c + i / 8) as u8;
            i += 1;
        }
        c += 1;
    }
    t
};

/// Q6_K weight row `j` against activation rows `i0..i0 + N`, to the bit
/// the floats of the portable kernel: per half super-block the 128 values
/// `u = q + 32` (4 low bits from `ql`, 2 high from `qh`) in input order as
/// four registers, each by `vpmaddubsw` against its activations
/// (2 · 63 · 127 < 32768) and `vpmaddwd` by the scales of its two groups
/// of 16; the `- 32` through the activations' sums of 16 times the scales;
/// all in i32 (exact); then, up to eight super-blocks at once, `(d · d_a) ·
/// Σ` added to the row's sum one super-block after the other.
///
/// # Safety
/// As for [`tile`]; rows `i0..i0 + N` exist.
#[target_feature(enable = "avx2,fma")]
unsafe fn q6k_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let mut sum = [0f32; N];
    // SAFETY: forwarded; the steps stay inside the row's `nb` super-blocks.
    unsafe {
        in_steps!(
            m.nb(),
            |b0| q6k_blocks::<N, 8>(m, acts, j, i0, b0, &mut sum),
            q6k_blocks::<N, 4>(m, acts, j, i0, b0, &mut sum),
            q6k_blocks::<N, 1>(m, acts, j, i0, b0, &mut sum)
        )
    }
    out[..N].copy_from_slice(&sum);
}

/// Super-blocks `b0..b0 + G` (`G ≤ 8`) of [`q6k_row`].
///
/// # Safety
/// As for [`q6k_row`]; the super-blocks exist.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn q6k_blocks<const N: usize, const G: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    b0: usize,
    sum: &mut [f32; N],
) {
    let (k, nb) = (m.cols, m.nb());
    let low = _mm256_set1_epi8(0x0f);
    let two = _mm256_set1_epi8(0x30);
    let zero = _mm256_setzero_si256();
    let mut tots = [[zero; 8]; N];
    // SAFETY: super-blocks `b0..b0 + G` of weight row `j` have 128 bytes of
    // `ql`, 64 of `qh` and 16 scales; activation rows `i0..i0 + N` have 256
    // values, a scale and 16 sums at each (the sizes `tile` checked);
    // `SCALE_PAIRS` rows are 16 bytes.
    unsafe {
        for c in 0..G {
            let wb = j * nb + b0 + c;
            let scm = _mm_loadu_si128(m.sc.as_ptr().add(wb * 16) as *const __m128i);
            let mut tot = [zero; N];
            for half in 0..2 {
                let ql = m.qs.as_ptr().add(wb * 128 + 64 * half);
                let ql0 = _mm256_loadu_si256(ql as *const __m256i);
                let ql1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let qh =
                    _mm256_loadu_si256(m.qh.as_ptr().add(wb * 64 + 32 * half) as *const __m256i);
                // Values 0..32, 32..64, 64..96, 96..128 of the half; the
                // 16-bit shifts move no bit of one byte into the kept bits
                // 4 and 5 of another.
                let u = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, low),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, low),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low),
                        _mm256_and_si256(qh, two),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), two),
                    ),
                ];
                let mut s = [zero; 4];
                for (q, s) in s.iter_mut().enumerate() {
                    let idx = _mm_loadu_si128(SCALE_PAIRS[4 * half + q].as_ptr() as *const __m128i);
                    *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scm, idx));
                }
                for r in 0..N {
                    let a = acts
                        .qs
                        .as_ptr()
                        .add((i0 + r) * k + (b0 + c) * QKK + 128 * half);
                    let mut p = [zero; 4];
                    for q in 0..4 {
                        let av = _mm256_loadu_si256(a.add(32 * q) as *const __m256i);
                        p[q] = _mm256_madd_epi16(_mm256_maddubs_epi16(u[q], av), s[q]);
                    }
                    let p = _mm256_add_epi32(
                        _mm256_add_epi32(p[0], p[1]),
                        _mm256_add_epi32(p[2], p[3]),
                    );
                    tot[r] = _mm256_add_epi32(tot[r], p);
                }
            }
            let s16 = _mm256_cvtepi8_epi16(scm);
            for r in 0..N {
                let ai = (i0 + r) * nb + b0 + c;
                let bs = _mm256_loadu_si256(acts.bsums.as_ptr().add(ai * 16) as *const __m256i);
                let corr = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, s16));
                tots[r][c] = _mm256_sub_epi32(tot[r], corr);
            }
        }
        let dvv = f16s_to_f32::<G>(m.d.as_ptr().add(j * nb + b0));
        for r in 0..N {
            let da = load_first::<G>(acts.d.as_ptr().add((i0 + r) * nb + b0));
            let tot = _mm256_cvtepi32_ps(sum_each_i32x8(&tots[r]));
            add_in_order::<G>(_mm256_mul_ps(_mm256_mul_ps(dvv, da), tot), &mut sum[r]);
        }
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
