//! AVX-512 VNNI kernels (x86-64). See the module docs of [`super`].

// Rows index several parallel arrays of registers.
#![allow(clippy::needless_range_loop)]
//!
//! Each kernel computes one weight row against `R ≤ 4` activation rows, so
//! that every weight load (and nibble expansion) serves `R` rows. Scales are
//! handled 16 blocks at a time: the 16 f16 weight scales are converted in
//! one instruction, multiplied by the 16 activation scales, and each
//! `vpdpbusd` result (4 or 8 lanes per block) is scaled by a lane
//! permutation of that vector. Offsets (Q4_0's 8, Q5_0's 16, Q8_0's 128)
//! cost one FMA per 16 blocks through the activations' `d · Σ q`. Q4_1 has
//! a kernel of its own that sums in ggml's order (see [`q4_1_row`]).

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::{block_dest, inv_scale, Acts, Layout, QK, QKK};
use super::avx2::hsum_f32x8;
use super::matrix::{for_col_groups, for_row_groups, QMatrix, Ty, YPtr, COLS, R};

/// Whether this CPU has AVX-512 F/BW/VL and VNNI.
pub(crate) fn cpu_supports() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Whether `ty` has an AVX-512 kernel (all supported types have one).
pub(crate) fn supports(_ty: Ty) -> bool {
    true
}

/// Quantizes one row to blocks of 32, as the portable
/// [`super::act::quantize_row_q8_0`] does (same values).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; `qs.len() == x.len()`, `d.len() ==
/// s.len() == x.len() / 32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn quantize_row_q8_0(
    x: &[f32],
    layout: Layout,
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    q8_1: bool,
) {
    let nb = x.len() / QK;
    assert!(qs.len() == x.len() && d.len() >= nb && s.len() >= nb);
    for b in 0..nb {
        // SAFETY: block `b` lies in `x`; `block_dest` offsets + 16 lie in `qs`.
        unsafe {
            let v0 = _mm512_loadu_ps(x.as_ptr().add(b * QK));
            let v1 = _mm512_loadu_ps(x.as_ptr().add(b * QK + 16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let id = _mm512_set1_ps(inv_scale(amax));
            let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
            let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            let (lo, hi) = block_dest(layout, b, nb);
            _mm_storeu_si128(
                qs.as_mut_ptr().add(lo) as *mut __m128i,
                _mm512_cvtsepi32_epi8(q0),
            );
            _mm_storeu_si128(
                qs.as_mut_ptr().add(hi) as *mut __m128i,
                _mm512_cvtsepi32_epi8(q1),
            );
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            (d[b], s[b]) = super::act::block_scales(amax, sum, q8_1);
        }
    }
}

/// Quantizes one row to super-blocks of 256, as the portable
/// [`super::act::quantize_row_q8_k`] does.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; `qs.len() == x.len()`, `d.len() ==
/// x.len() / 256`, `bs.len() == 16 · d.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn quantize_row_q8_k(
    x: &[f32],
    layout: Layout,
    qs: &mut [i8],
    d: &mut [f32],
    bs: &mut [i16],
) {
    let nsb = x.len() / QKK;
    let nb = x.len() / QK;
    assert!(qs.len() == x.len() && d.len() >= nsb && bs.len() >= 16 * nsb);
    for sb in 0..nsb {
        // SAFETY: super-block `sb` lies in `x`; destinations in `qs`.
        unsafe {
            let p = x.as_ptr().add(sb * QKK);
            let mut m = _mm512_setzero_ps();
            for g in 0..16 {
                m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(p.add(16 * g))));
            }
            let amax = _mm512_reduce_max_ps(m);
            let id = inv_scale(amax);
            d[sb] = super::act::q8_k_scale(id);
            let id = _mm512_set1_ps(id);
            for g in 0..16 {
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p.add(16 * g)), id));
                let (lo, hi) = block_dest(layout, sb * 8 + g / 2, nb);
                let at = if g % 2 == 0 { lo } else { hi };
                _mm_storeu_si128(
                    qs.as_mut_ptr().add(at) as *mut __m128i,
                    _mm512_cvtsepi32_epi8(q),
                );
                bs[sb * 16 + g] = _mm512_reduce_add_epi32(q) as i16;
            }
        }
    }
}

/// Weight rows `js` against all `n` activation rows, into `y`.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI, `acts` holds `n` rows quantized in
/// `m.ty.simd_layout()` (F16/F32: `x` holds `n` rows), `js` lies inside the
/// matrix and `y` covers `n` rows of it; no other task writes these cells.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn tile(
    m: &QMatrix,
    x: &[f32],
    acts: &Acts,
    n: usize,
    js: Range<usize>,
    y: YPtr,
) {
    if n == 1 && matches!(m.ty, Ty::Q4_1 | Ty::Q8_0) {
        // One activation row (a decode step): four weight rows at a time,
        // so that four independent accumulator chains hide the latency of
        // the multiply-adds that one row's chain waits on. Each row's sums
        // run in the same order as in `row::<1>`: the same floats.
        // SAFETY: forwarded from the caller; each group's rows exist.
        unsafe {
            for_col_groups(
                js,
                y,
                |j, out| match m.ty {
                    Ty::Q4_1 => q4_1_cols(m, acts, j, out),
                    _ => q8_0_cols(m, acts, j, out),
                },
                |j, i, _, out| row::<1>(m, x, acts, j, i, out),
            )
        };
        return;
    }
    // SAFETY: forwarded from the caller; rows `i..i + r` exist.
    unsafe {
        for_row_groups(n, js, y, |j, i, r, out| match r {
            4 => row::<4>(m, x, acts, j, i, out),
            3 => row::<3>(m, x, acts, j, i, out),
            2 => row::<2>(m, x, acts, j, i, out),
            _ => row::<1>(m, x, acts, j, i, out),
        })
    }
}

/// Weight row `j` against activation rows `i0..i0 + N`.
///
/// # Safety
/// As for [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn row<const N: usize>(
    m: &QMatrix,
    x: &[f32],
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    // SAFETY: forwarded.
    unsafe {
        match m.ty {
            Ty::F32 => float_row::<N, false>(m, x, j, i0, out),
            Ty::F16 => float_row::<N, true>(m, x, j, i0, out),
            Ty::Q8_0 => q8_0_row::<N>(m, acts, j, i0, out),
            Ty::Q4_1 => q4_1_row::<N>(m, acts, j, i0, out),
            Ty::Q4_0 | Ty::Q5_0 => nibble_row::<N>(m, acts, j, i0, out),
            Ty::Q4K => q4k_row::<N>(m, acts, j, i0, out),
            Ty::Q6K => q6k_row::<N>(m, acts, j, i0, out),
        }
    }
}

/// Mask of the low `n ≤ 16` lanes.
#[inline]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// 16 f16 values (the first `n`, the others 0) as f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_f16(p: *const u16, n: usize) -> __m512 {
    // SAFETY: the caller passes `n` readable values at `p`.
    unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(n), p as *const i16)) }
}

/// `lane → [base + lane / per]` permutation indices.
#[inline]
#[target_feature(enable = "avx512f")]
fn spread(base: i32, per: i32) -> __m512i {
    let idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let shift = per.trailing_zeros() as i32;
    _mm512_add_epi32(
        _mm512_set1_epi32(base),
        _mm512_srlv_epi32(idx, _mm512_set1_epi32(shift)),
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn float_row<const N: usize, const HALF: bool>(
    m: &QMatrix,
    x: &[f32],
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let k = m.cols;
    let mut acc = [_mm512_setzero_ps(); N];
    let mut t = 0;
    while t < k {
        let msk = mask16(k - t);
        // SAFETY: lanes `< k - t` of row `j` and of rows `i0..i0 + N` exist.
        unsafe {
            let w = if HALF {
                load_f16(m.d.as_ptr().add(j * k + t), k - t)
            } else {
                _mm512_maskz_loadu_ps(msk, m.f.as_ptr().add(j * k + t))
            };
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(msk, x.as_ptr().add((i0 + r) * k + t));
                *a = _mm512_fmadd_ps(w, xv, *a);
            }
        }
        t += 16;
    }
    for r in 0..N {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
}

/// Q8_0: two blocks (64 bytes of `q + 128`) per `vpdpbusd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let (k, nb) = (m.cols, m.nb());
    let wq = m.qs[j * nb * 32..].as_ptr();
    let wd = m.d[j * nb..].as_ptr();
    let mut acc = [_mm512_setzero_ps(); N];
    let mut off = [_mm512_setzero_ps(); N];
    let zero = _mm512_setzero_si512();
    let mut b0 = 0;
    while b0 < nb {
        let cb = 16.min(nb - b0);
        // SAFETY: blocks `b0..b0 + cb` of weight row `j` and of activation
        // rows `i0..i0 + N` exist; loads past them are masked.
        unsafe {
            let dw = load_f16(wd.add(b0), cb);
            let mut c = [_mm512_setzero_ps(); N];
            for r in 0..N {
                let at = (i0 + r) * nb + b0;
                let da = _mm512_maskz_loadu_ps(mask16(cb), acts.d.as_ptr().add(at));
                let sa = _mm512_maskz_loadu_ps(mask16(cb), acts.s.as_ptr().add(at));
                c[r] = _mm512_mul_ps(dw, da);
                off[r] = _mm512_fmadd_ps(dw, sa, off[r]);
            }
            let mut p = 0;
            while 2 * p < cb {
                let full = 2 * p + 1 < cb;
                let bm: __mmask64 = if full { !0 } else { 0xffff_ffff };
                let w = _mm512_maskz_loadu_epi8(bm, wq.add((b0 + 2 * p) * 32) as *const i8);
                let idx = spread(2 * p as i32, 8);
                for r in 0..N {
                    let a = _mm512_maskz_loadu_epi8(
                        bm,
                        acts.qs.as_ptr().add((i0 + r) * k + (b0 + 2 * p) * 32),
                    );
                    let dot = _mm512_dpbusd_epi32(zero, w, a);
                    acc[r] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot),
                        _mm512_permutexvar_ps(idx, c[r]),
                        acc[r],
                    );
                }
                p += 1;
            }
        }
        b0 += cb;
    }
    for r in 0..N {
        out[r] = _mm512_reduce_add_ps(acc[r]) - 128.0 * _mm512_reduce_add_ps(off[r]);
    }
}

/// [`q8_0_row`]`::<1>` for weight rows `j0..j0 + COLS` against activation
/// row 0, the rows' chains interleaved; each row's value is the same float.
///
/// # Safety
/// As for [`tile`], with `n == 1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_cols(m: &QMatrix, acts: &Acts, j0: usize, out: &mut [f32; COLS]) {
    let nb = m.nb();
    let wq: [*const u8; COLS] = std::array::from_fn(|c| m.qs[(j0 + c) * nb * 32..].as_ptr());
    let wd: [*const u16; COLS] = std::array::from_fn(|c| m.d[(j0 + c) * nb..].as_ptr());
    let mut acc = [_mm512_setzero_ps(); COLS];
    let mut off = [_mm512_setzero_ps(); COLS];
    let zero = _mm512_setzero_si512();
    let mut b0 = 0;
    while b0 < nb {
        let cb = 16.min(nb - b0);
        // SAFETY: blocks `b0..b0 + cb` of the weight rows and of activation
        // row 0 exist; loads past them are masked.
        unsafe {
            let da = _mm512_maskz_loadu_ps(mask16(cb), acts.d.as_ptr().add(b0));
            let sa = _mm512_maskz_loadu_ps(mask16(cb), acts.s.as_ptr().add(b0));
            let mut cs = [_mm512_setzero_ps(); COLS];
            for c in 0..COLS {
                let dw = load_f16(wd[c].add(b0), cb);
                cs[c] = _mm512_mul_ps(dw, da);
                off[c] = _mm512_fmadd_ps(dw, sa, off[c]);
            }
            let mut p = 0;
            while 2 * p < cb {
                let full = 2 * p + 1 < cb;
                let bm: __mmask64 = if full { !0 } else { 0xffff_ffff };
                let idx = spread(2 * p as i32, 8);
                let a = _mm512_maskz_loadu_epi8(bm, acts.qs.as_ptr().add((b0 + 2 * p) * 32));
                for c in 0..COLS {
                    // The same bytes of the row COLS ahead: the next call's
                    // weights, asked of memory before they are needed (a
                    // hint only; it never faults, even past the matrix).
                    _mm_prefetch::<_MM_HINT_T0>(
                        wq[c].wrapping_add((COLS * nb + b0 + 2 * p) * 32) as *const i8
                    );
                    let w = _mm512_maskz_loadu_epi8(bm, wq[c].add((b0 + 2 * p) * 32) as *const i8);
                    let dot = _mm512_dpbusd_epi32(zero, w, a);
                    acc[c] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot),
                        _mm512_permutexvar_ps(idx, cs[c]),
                        acc[c],
                    );
                }
                p += 1;
            }
        }
        b0 += cb;
    }
    for c in 0..COLS {
        out[c] = _mm512_reduce_add_ps(acc[c]) - 128.0 * _mm512_reduce_add_ps(off[c]);
    }
}

/// [`q4_1_row`]`::<1>` for weight rows `j0..j0 + COLS` against activation
/// row 0, the rows' chains interleaved; each row's value is the same float
/// (ggml's order, as there).
///
/// # Safety
/// As for [`tile`], with `n == 1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_1_cols(m: &QMatrix, acts: &Acts, j0: usize, out: &mut [f32; COLS]) {
    let nb = m.nb();
    let wq: [*const u8; COLS] = std::array::from_fn(|c| m.qs[(j0 + c) * nb * 16..].as_ptr());
    let wd: [*const u16; COLS] = std::array::from_fn(|c| m.d[(j0 + c) * nb..].as_ptr());
    let wm: [*const u16; COLS] = std::array::from_fn(|c| m.m[(j0 + c) * nb..].as_ptr());
    let low = _mm_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_ps(); COLS];
    let mut summs = [0f32; COLS];
    let (mut dw, mut mw) = ([[0f32; 16]; COLS], [[0f32; 16]; COLS]);
    let mut b0 = 0;
    while b0 < nb {
        let cb = 16.min(nb - b0);
        // SAFETY: blocks `b0..b0 + cb` of the weight rows and of activation
        // row 0 exist; the scale loads past them are masked.
        unsafe {
            for c in 0..COLS {
                _mm512_storeu_ps(dw[c].as_mut_ptr(), load_f16(wd[c].add(b0), cb));
                _mm512_storeu_ps(mw[c].as_mut_ptr(), load_f16(wm[c].add(b0), cb));
            }
            for t in 0..cb {
                let b = b0 + t;
                let sa = *acts.s.get_unchecked(b);
                let da = *acts.d.get_unchecked(b);
                let a = _mm256_loadu_si256(acts.qs.as_ptr().add(b * 32) as *const __m256i);
                for c in 0..COLS {
                    if b % 4 == 0 {
                        // A cache line (four blocks) of the row COLS ahead,
                        // as in `q8_0_cols`.
                        _mm_prefetch::<_MM_HINT_T0>(
                            wq[c].wrapping_add((COLS * nb + b) * 16) as *const i8
                        );
                    }
                    let v = _mm_loadu_si128(wq[c].add(b * 16) as *const __m128i);
                    let w = _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_and_si128(v, low)),
                        _mm_and_si128(_mm_srli_epi16::<4>(v), low),
                    );
                    summs[c] = mw[c][t].mul_add(sa, summs[c]);
                    let xy = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, w, a));
                    let dd = _mm256_set1_ps(dw[c][t] * da);
                    acc[c] = _mm256_fmadd_ps(dd, xy, acc[c]);
                }
            }
        }
        b0 += cb;
    }
    for c in 0..COLS {
        out[c] = hsum_f32x8(acc[c]) + summs[c];
    }
}

/// Q4_0, Q5_0: four blocks (64 bytes of nibbles) per load, the low
/// and the high nibbles each one `vpdpbusd` against activations in
/// [`Layout::Nibble4`]; the blocks after the last group of four one at a
/// time in 256-bit registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn nibble_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let (k, nb) = (m.cols, m.nb());
    let ty = m.ty;
    let wq = m.qs[j * nb * 16..].as_ptr();
    let wd = m.d[j * nb..].as_ptr();
    let qh = if ty == Ty::Q5_0 {
        m.qh[j * nb * 4..].as_ptr()
    } else {
        std::ptr::null()
    };
    // Weight = dw · u + offset; offset = -8 dw or -16 dw.
    let off_factor = if ty == Ty::Q5_0 { -16.0 } else { -8.0 };
    let low = _mm512_set1_epi8(0x0f);
    let bit4 = _mm512_set1_epi8(0x10);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); N];
    let mut off = [_mm512_setzero_ps(); N];
    let whole = nb / 4 * 4;
    let mut b0 = 0;
    while b0 < whole {
        let cb = 16.min(whole - b0);
        // SAFETY: blocks `b0..b0 + cb` (whole groups) of weight row `j` and
        // activation rows `i0..i0 + N` exist; scale loads past them masked.
        unsafe {
            let dw = load_f16(wd.add(b0), cb);
            let ow = _mm512_mul_ps(dw, _mm512_set1_ps(off_factor));
            let mut c = [_mm512_setzero_ps(); N];
            for r in 0..N {
                let at = (i0 + r) * nb + b0;
                let da = _mm512_maskz_loadu_ps(mask16(cb), acts.d.as_ptr().add(at));
                let sa = _mm512_maskz_loadu_ps(mask16(cb), acts.s.as_ptr().add(at));
                c[r] = _mm512_mul_ps(dw, da);
                off[r] = _mm512_fmadd_ps(ow, sa, off[r]);
            }
            for g in 0..cb / 4 {
                let b = b0 + 4 * g;
                let v = _mm512_loadu_si512(wq.add(b * 16) as *const __m512i);
                let mut lo = _mm512_and_si512(v, low);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                if ty == Ty::Q5_0 {
                    let kl = (qh.add(b * 4) as *const u64).read_unaligned();
                    let kh = (qh.add(b * 4 + 8) as *const u64).read_unaligned();
                    lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(kl, bit4));
                    hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(kh, bit4));
                }
                let idx = spread(4 * g as i32, 4);
                for r in 0..N {
                    let a = acts.qs.as_ptr().add((i0 + r) * k + b * 32);
                    let dot =
                        _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(a as *const __m512i));
                    let dot = _mm512_dpbusd_epi32(
                        dot,
                        hi,
                        _mm512_loadu_si512(a.add(64) as *const __m512i),
                    );
                    acc[r] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot),
                        _mm512_permutexvar_ps(idx, c[r]),
                        acc[r],
                    );
                }
            }
        }
        b0 += cb;
    }
    for r in 0..N {
        out[r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(off[r]);
    }
    // The last nb % 4 blocks, in natural order.
    let low = _mm_set1_epi8(0x0f);
    for b in whole..nb {
        // SAFETY: block `b` of the weight row and activation rows exists.
        unsafe {
            let v = _mm_loadu_si128(wq.add(b * 16) as *const __m128i);
            let lo = _mm_and_si128(v, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
            let mut w = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi);
            if ty == Ty::Q5_0 {
                let bits = (qh.add(b * 4) as *const u32).read_unaligned();
                w = _mm256_or_si256(w, _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10)));
            }
            let dw = crate::vnni::f16_to_f32(*wd.add(b));
            let ow = off_factor * dw;
            for r in 0..N {
                let a = _mm256_loadu_si256(
                    acts.qs.as_ptr().add((i0 + r) * k + b * 32) as *const __m256i
                );
                let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a);
                let at = (i0 + r) * nb + b;
                out[r] += dw * acts.d[at] * hsum_i32x8(dot) as f32 + ow * acts.s[at];
            }
        }
    }
}

/// Q4_1 in ggml's own order (`ggml_vec_dot_q4_1_q8_1`, its AVX2 path), so
/// that each output is the very float llama.cpp computes, not one within
/// rounding of it: per block, one 256-bit `vpdpbusd` of the 32 nibbles (low
/// nibbles in bytes 0..16, high in 16..32) against the block's activations
/// in natural order; the eight i32 sums, as f32, times `dw · da` added by
/// one FMA into eight running sums; `m · s` summed by scalar FMAs in block
/// order; at the end the eight lanes folded as ggml's `hsum_float_8` folds
/// them, and the minimums' sum added last. The order matters for greedy
/// decoding: a near tie between two tokens falls the way llama.cpp's does.
/// Each weight row still serves `N` activation rows per expansion.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
unsafe fn q4_1_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let (k, nb) = (m.cols, m.nb());
    let wq = m.qs[j * nb * 16..].as_ptr();
    let wd = m.d[j * nb..(j + 1) * nb].as_ptr();
    let wm = m.m[j * nb..(j + 1) * nb].as_ptr();
    let low = _mm_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_ps(); N];
    let mut summs = [0f32; N];
    let (mut dw, mut mw) = ([0f32; 16], [0f32; 16]);
    let mut b0 = 0;
    while b0 < nb {
        let cb = 16.min(nb - b0);
        // SAFETY: blocks `b0..b0 + cb` of weight row `j` and of activation
        // rows `i0..i0 + N` exist (16 bytes of nibbles, 32 int8 values, one
        // scale each); the scale loads past them are masked.
        unsafe {
            // The f16 scales and minimums as f32 (exact, as ggml's table).
            _mm512_storeu_ps(dw.as_mut_ptr(), load_f16(wd.add(b0), cb));
            _mm512_storeu_ps(mw.as_mut_ptr(), load_f16(wm.add(b0), cb));
            for t in 0..cb {
                let b = b0 + t;
                let v = _mm_loadu_si128(wq.add(b * 16) as *const __m128i);
                let w = _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_and_si128(v, low)),
                    _mm_and_si128(_mm_srli_epi16::<4>(v), low),
                );
                for r in 0..N {
                    let at = (i0 + r) * nb + b;
                    summs[r] = mw[t].mul_add(*acts.s.get_unchecked(at), summs[r]);
                    let a = _mm256_loadu_si256(
                        acts.qs.as_ptr().add((i0 + r) * k + b * 32) as *const __m256i
                    );
                    let xy = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, w, a));
                    let dd = _mm256_set1_ps(dw[t] * *acts.d.get_unchecked(at));
                    acc[r] = _mm256_fmadd_ps(dd, xy, acc[r]);
                }
            }
        }
        b0 += cb;
    }
    for r in 0..N {
        out[r] = hsum_f32x8(acc[r]) + summs[r];
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512vl")]
fn hsum_i32x8(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Q4_K: per super-block two 64-byte loads, four `vpdpbusd` (sub-blocks
/// 0+2, 1+3, 4+6, 5+7 against activations in [`Layout::SwapQ4K`]), the
/// 6-bit scales applied in i32, the minimums through the activations'
/// sums of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let (k, nb) = (m.cols, m.nb());
    let low = _mm512_set1_epi8(0x0f);
    let zero = _mm512_setzero_si512();
    let (i02, i13, i46, i57) = (spread2(0, 2), spread2(1, 3), spread2(4, 6), spread2(5, 7));
    let mut acc = [_mm512_setzero_ps(); N];
    let mut mins = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let wb = j * nb + b;
        // SAFETY: super-block `b` of weight row `j` and activation rows exists.
        unsafe {
            let q = m.qs.as_ptr().add(wb * 128);
            let q0 = _mm512_loadu_si512(q as *const __m512i);
            let q1 = _mm512_loadu_si512(q.add(64) as *const __m512i);
            let l0 = _mm512_and_si512(q0, low);
            let h0 = _mm512_and_si512(_mm512_srli_epi16::<4>(q0), low);
            let l1 = _mm512_and_si512(q1, low);
            let h1 = _mm512_and_si512(_mm512_srli_epi16::<4>(q1), low);
            let scm = _mm_loadu_si128(m.sc.as_ptr().add(wb * 16) as *const __m128i);
            let s32 = _mm512_cvtepu8_epi32(scm);
            let (s02, s13) = (
                _mm512_permutexvar_epi32(i02, s32),
                _mm512_permutexvar_epi32(i13, s32),
            );
            let (s46, s57) = (
                _mm512_permutexvar_epi32(i46, s32),
                _mm512_permutexvar_epi32(i57, s32),
            );
            // Minimums as i16, each twice: [m0 m0 m1 m1 .. m7 m7].
            let mn = _mm_cvtepu8_epi16(_mm_srli_si128::<8>(scm));
            let mn2 = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_unpacklo_epi16(mn, mn)),
                _mm_unpackhi_epi16(mn, mn),
            );
            let d = crate::vnni::f16_to_f32(m.d[wb]);
            let dmin = crate::vnni::f16_to_f32(m.m[wb]);
            for r in 0..N {
                let ai = (i0 + r) * nb + b;
                let a = acts.qs.as_ptr().add((i0 + r) * k + b * QKK);
                let a0 = _mm512_loadu_si512(a as *const __m512i);
                let a1 = _mm512_loadu_si512(a.add(64) as *const __m512i);
                let a2 = _mm512_loadu_si512(a.add(128) as *const __m512i);
                let a3 = _mm512_loadu_si512(a.add(192) as *const __m512i);
                let p0 = _mm512_mullo_epi32(_mm512_dpbusd_epi32(zero, l0, a0), s02);
                let p1 = _mm512_mullo_epi32(_mm512_dpbusd_epi32(zero, h0, a1), s13);
                let p2 = _mm512_mullo_epi32(_mm512_dpbusd_epi32(zero, l1, a2), s46);
                let p3 = _mm512_mullo_epi32(_mm512_dpbusd_epi32(zero, h1, a3), s57);
                let t = _mm512_add_epi32(_mm512_add_epi32(p0, p1), _mm512_add_epi32(p2, p3));
                let da = acts.d[ai];
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d * da), acc[r]);
                let bs = _mm256_loadu_si256(acts.bsums.as_ptr().add(ai * 16) as *const __m256i);
                let mm = _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, mn2));
                mins[r] = _mm256_fmadd_ps(mm, _mm256_set1_ps(dmin * da), mins[r]);
            }
        }
    }
    for r in 0..N {
        out[r] = _mm512_reduce_add_ps(acc[r]) - hsum_f32x8(mins[r]);
    }
}

/// Indices `[a × 8, b × 8]`.
#[inline]
#[target_feature(enable = "avx512f")]
fn spread2(a: i32, b: i32) -> __m512i {
    _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(a), _mm512_set1_epi32(b))
}

/// Q6_K: per half super-block one 64-byte load of the low 4 bits and one
/// 32-byte load of the high 2 bits, merged to two 64-byte vectors of
/// `q + 32` in input order; the `- 32` through the activations' sums of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k_row<const N: usize>(
    m: &QMatrix,
    acts: &Acts,
    j: usize,
    i0: usize,
    out: &mut [f32; R],
) {
    let (k, nb) = (m.cols, m.nb());
    let low = _mm512_set1_epi8(0x0f);
    let two = _mm512_set1_epi8(0x30);
    let zero = _mm512_setzero_si512();
    // Shift counts for the two 256-bit halves (16-bit lanes).
    let sh_lo = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
    let sh_hi = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
    let idx = [spread(0, 4), spread(4, 4), spread(8, 4), spread(12, 4)];
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        let wb = j * nb + b;
        // SAFETY: super-block `b` of weight row `j` and activation rows exists.
        unsafe {
            let scm = _mm_loadu_si128(m.sc.as_ptr().add(wb * 16) as *const __m128i);
            let s32 = _mm512_cvtepi8_epi32(scm);
            let s16 = _mm256_cvtepi8_epi16(scm);
            let mut t = [zero; N];
            for half in 0..2 {
                let ql =
                    _mm512_loadu_si512(m.qs.as_ptr().add(wb * 128 + 64 * half) as *const __m512i);
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    m.qh.as_ptr().add(wb * 64 + 32 * half) as *const __m256i,
                ));
                let lo = _mm512_or_si512(
                    _mm512_and_si512(ql, low),
                    _mm512_and_si512(_mm512_sllv_epi16(qh, sh_lo), two),
                );
                let hi = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low),
                    _mm512_and_si512(_mm512_srlv_epi16(qh, sh_hi), two),
                );
                let slo = _mm512_permutexvar_epi32(idx[2 * half], s32);
                let shi = _mm512_permutexvar_epi32(idx[2 * half + 1], s32);
                for r in 0..N {
                    let a = acts.qs.as_ptr().add((i0 + r) * k + b * QKK + 128 * half);
                    let pl = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(a as *const __m512i));
                    let ph = _mm512_dpbusd_epi32(
                        zero,
                        hi,
                        _mm512_loadu_si512(a.add(64) as *const __m512i),
                    );
                    t[r] = _mm512_add_epi32(
                        t[r],
                        _mm512_add_epi32(_mm512_mullo_epi32(pl, slo), _mm512_mullo_epi32(ph, shi)),
                    );
                }
            }
            let d = crate::vnni::f16_to_f32(m.d[wb]);
            for r in 0..N {
                let ai = (i0 + r) * nb + b;
                let bs = _mm256_loadu_si256(acts.bsums.as_ptr().add(ai * 16) as *const __m256i);
                let corr =
                    _mm512_zextsi256_si512(_mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, s16)));
                let tt = _mm512_sub_epi32(t[r], corr);
                acc[r] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(tt),
                    _mm512_set1_ps(d * acts.d[ai]),
                    acc[r],
                );
            }
        }
    }
    for r in 0..N {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
}
