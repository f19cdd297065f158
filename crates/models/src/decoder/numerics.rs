//! Elementwise numerics as llama.cpp's CPU backend (ggml-cpu) computes them,
//! so that greedy decoding follows the same path as llama.cpp on the same
//! GGUF.
//!
//! A quantized matmul rounds its input to 8 bits per value, so a difference
//! of one part in 10⁴ in an activation flips some of those roundings and
//! comes out of the matmul ten times larger; over 30 layers the two engines
//! drift apart until a near tie between two tokens falls the other way.
//! Where ggml rounds to f16 on purpose, this module rounds the same way:
//!
//! - [`attend_f16`]: ggml's flash attention for f16 K/V on short batches
//!   (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`): Q rounded to
//!   f16, Q·K in f32 with ggml's lane order, an online softmax over the keys
//!   in position order, and the V·softmax accumulator kept in f16 (rounded
//!   after every key).
//! - [`gelu_mul`]: GELU (tanh) through ggml's f16 table: the input rounded
//!   to f16, the result rounded to f16.
//! - [`silu_mul`]: SiLU with ggml's vector `exp` (a polynomial, not libm's).
//! - [`RopeCache`]: RoPE angles accumulated in f32 (`theta *= theta_scale`),
//!   `cosf`/`sinf` of the f32 angle.
//!
//! Every function has an AVX-512 path (chosen at run time) and a portable
//! one that computes the same values.

use std::sync::OnceLock;

use half::f16;

/// Whether the CPU has AVX-512 F (checked once).
#[inline]
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to f16 (to nearest, ties to even) and back.
#[inline]
fn r16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Keys ggml's flash attention takes a batch through its tiled f32 path
/// from: batches of at least this many query rows (`GGML_FA_TILE_Q`).
pub(crate) const FA_TILE_Q: usize = 64;

/// Scratch of [`attend_f16`]: the f16-rounded query and the accumulator.
#[derive(Debug, Default)]
pub(crate) struct AttnScratch {
    q: Vec<f32>,
    acc: Vec<f32>,
}

/// One query row's attention over `n` keys and values (rows of `hd` f32
/// values that hold f16 numbers, in position order), with ggml's
/// flash-attention numerics for f16 K/V. `q_scale` multiplies the query
/// before its rounding to f16 (Gemma's graph scales Q first), `kq_scale`
/// each score (llama's graph passes the scale to the attention op).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_f16(
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    hd: usize,
    q_scale: f32,
    kq_scale: f32,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let n = keys.len() / hd;
    debug_assert_eq!(vals.len(), n * hd);
    debug_assert_eq!(out.len(), hd);
    scratch.q.clear();
    scratch.q.extend(q.iter().map(|&v| r16(v * q_scale)));
    scratch.acc.clear();
    scratch.acc.resize(hd, 0.0);
    let (q16, acc) = (&scratch.q[..], &mut scratch.acc[..]);
    let fast = avx512();
    let mut m = f32::NEG_INFINITY;
    let mut sum = 0f32;
    for j in 0..n {
        let k = &keys[j * hd..(j + 1) * hd];
        let v = &vals[j * hd..(j + 1) * hd];
        let s = dot_ggml(q16, k, fast) * kq_scale;
        let mut ms = 1f32;
        let mut vs = 1f32;
        if s > m {
            let old = m;
            m = s;
            ms = (old - m).exp();
            scale_r16(acc, ms, fast);
        } else {
            vs = (s - m).exp();
        }
        mad_r16(acc, v, vs, fast);
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

/// `Σ q·k` as `ggml_vec_dot_f16` sums it with AVX-512: four 16-lane FMA
/// accumulators over steps of 64, added pairwise (0+2, 1+3, then the two),
/// the lanes reduced as GCC's `_mm512_reduce_add_ps` does, and the tail
/// (past a multiple of 64) added in f64.
#[inline]
fn dot_ggml(q: &[f32], k: &[f32], fast: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: AVX-512 F was detected.
        return unsafe { x86::dot_ggml(q, k) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_f16c() {
        // SAFETY: AVX2, FMA and F16C were detected.
        return unsafe { x86::dot_ggml_avx2(q, k) };
    }
    let _ = fast;
    dot_ggml_portable(q, k)
}

/// [`dot_ggml`] in plain Rust.
fn dot_ggml_portable(q: &[f32], k: &[f32]) -> f32 {
    let n = q.len();
    let np = n & !63;
    let mut acc = [[0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, a) in a.iter_mut().enumerate() {
                let e = i + 16 * j + l;
                *a = q[e].mul_add(k[e], *a);
            }
        }
    }
    let mut lanes = [0f32; 16];
    for (l, x) in lanes.iter_mut().enumerate() {
        *x = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let mut sum = f64::from(reduce16(&lanes));
    for e in np..n {
        sum += f64::from(q[e] * k[e]);
    }
    sum as f32
}

/// GCC's `_mm512_reduce_add_ps`: halves 256, 128, then lanes (0+2)+(1+3).
#[inline]
fn reduce16(x: &[f32; 16]) -> f32 {
    let mut t8 = [0f32; 8];
    for i in 0..8 {
        t8[i] = x[i + 8] + x[i];
    }
    let mut t4 = [0f32; 4];
    for i in 0..4 {
        t4[i] = t8[i + 4] + t8[i];
    }
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// `acc = f16(acc · s)` (`ggml_vec_scale_f16`).
#[inline]
fn scale_r16(acc: &mut [f32], s: f32, fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast && acc.len().is_multiple_of(16) {
        // SAFETY: AVX-512 F was detected; the length is a multiple of 16.
        return unsafe { x86::scale_r16(acc, s) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_f16c() && acc.len().is_multiple_of(8) {
        // SAFETY: AVX2, FMA and F16C were detected; the length is a multiple of 8.
        return unsafe { x86::scale_r16_avx2(acc, s) };
    }
    let _ = fast;
    for a in acc.iter_mut() {
        *a = r16(*a * s);
    }
}

/// `acc = f16(v · s + acc)` (`ggml_vec_mad_f16`: one FMA in f32, then the
/// store to f16).
#[inline]
fn mad_r16(acc: &mut [f32], v: &[f32], s: f32, fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast && acc.len().is_multiple_of(16) {
        // SAFETY: AVX-512 F was detected; the length is a multiple of 16.
        return unsafe { x86::mad_r16(acc, v, s) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_f16c() && acc.len().is_multiple_of(8) {
        // SAFETY: AVX2, FMA and F16C were detected; the length is a multiple of 8.
        return unsafe { x86::mad_r16_avx2(acc, v, s) };
    }
    let _ = fast;
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = r16(x.mul_add(s, *a));
    }
}

const GELU_COEF_A: f32 = 0.044_715;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// ggml's `ggml_gelu_f32` (the tanh form; GCC contracts the inner
/// `1 + a·x·x` into one FMA).
#[inline]
fn gelu_f32(x: f32) -> f32 {
    let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh())
}

/// ggml's `ggml_table_gelu_f16`: GELU of every f16 value, rounded to f16.
fn gelu_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| f16::from_f32(gelu_f32(f16::from_bits(b).to_f32())).to_bits())
            .collect()
    })
}

/// `g = gelu(g) · u` as ggml's `ggml_vec_geglu_f32` computes it with its
/// f16 table: 0 at or below -10, the identity at or above 10.
pub(crate) fn gelu_mul(g: &mut [f32], u: &[f32]) {
    let table = gelu_table();
    for (g, &u) in g.iter_mut().zip(u) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            f16::from_bits(table[f16::from_f32(x).to_bits() as usize]).to_f32() * u
        };
    }
}

/// `g = silu(g) · u` as ggml's `ggml_vec_swiglu_f32` computes it:
/// `x / (1 + exp(-x))` with ggml's vector `exp`.
pub(crate) fn silu_mul(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512 F was detected.
        return unsafe { x86::silu_mul(g, u) };
    }
    for (g, &u) in g.iter_mut().zip(u) {
        let x = *g;
        *g = x / (1.0 + expf_ggml(-x)) * u;
    }
}

/// ggml's `ggml_v_expf` for one lane (its AVX-512 form, with `scalef`).
#[inline]
fn expf_ggml(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.0e4020p-7, 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0)); // 0x1.ffffecp-1
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n)
}

/// `j · 2^floor(n)` without intermediate overflow (`vscalefps`).
#[inline]
fn scalef(j: f32, n: f32) -> f32 {
    let mut e = n.floor() as i32;
    let mut v = j;
    while e > 127 {
        v *= 2f32.powi(127);
        e -= 127;
    }
    while e < -126 {
        v *= 2f32.powi(-126);
        e += 126;
    }
    v * 2f32.powi(e)
}

/// RoPE cos/sin for a set of positions, as ggml's `ggml_rope_cache_init`
/// computes them: `theta_scale = powf(base, -2/dims)`, the angle multiplied
/// by it in f32 from pair to pair, `cosf`/`sinf` of that f32 angle.
#[derive(Debug, Default)]
pub(crate) struct RopeCache {
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    pub(crate) half: usize,
}

impl RopeCache {
    /// Fills the table for `positions` with base `base` over `rope_dims`.
    pub(crate) fn fill(&mut self, positions: &[usize], rope_dims: usize, base: f32) {
        let half = rope_dims / 2;
        self.half = half;
        self.cos.resize(positions.len() * half, 0.0);
        self.sin.resize(positions.len() * half, 0.0);
        let theta_scale = base.powf(-2.0 / rope_dims as f32);
        for (t, &p) in positions.iter().enumerate() {
            let mut theta = p as f32;
            for i in 0..half {
                self.cos[t * half + i] = theta.cos();
                self.sin[t * half + i] = theta.sin();
                theta *= theta_scale;
            }
        }
    }
}

/// Rotates every head of one row by the angles `cos`/`sin` (pairs
/// `(2i, 2i+1)` when `adjacent`, else `(i, i + half)`), as ggml's
/// `rotate_pairs` compiles (GCC fuses the first product of each line:
/// `x0·cos - (x1·sin)`, `x0·sin + (x1·cos)`).
pub(crate) fn rope_rows(
    row: &mut [f32],
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    adjacent: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if fma() {
        // SAFETY: FMA was detected.
        return unsafe { x86::rope_rows(row, head_dim, cos, sin, adjacent) };
    }
    rope_rows_body(row, head_dim, cos, sin, adjacent);
}

#[inline(always)]
fn rope_rows_body(row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], adjacent: bool) {
    let half = cos.len();
    for head in row.chunks_exact_mut(head_dim) {
        if adjacent {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a.mul_add(cos[i], -(b * sin[i]));
                head[2 * i + 1] = a.mul_add(sin[i], b * cos[i]);
            }
        } else {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a.mul_add(cos[i], -(b * sin[i]));
                head[i + half] = a.mul_add(sin[i], b * cos[i]);
            }
        }
    }
}

/// Whether the CPU has AVX2, FMA and F16C (checked once): the paths of
/// [`dot_ggml`], [`scale_r16`] and [`mad_r16`] for CPUs without AVX-512,
/// which compute the same values (the same per-lane FMAs and roundings, in
/// two 8-lane halves of each 16-lane register).
#[inline]
fn avx2_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has FMA (checked once).
#[inline]
fn fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::rope_rows`] compiled with FMA.
    ///
    /// # Safety
    /// The CPU has FMA.
    #[target_feature(enable = "fma")]
    pub(super) unsafe fn rope_rows(
        row: &mut [f32],
        head_dim: usize,
        cos: &[f32],
        sin: &[f32],
        adjacent: bool,
    ) {
        super::rope_rows_body(row, head_dim, cos, sin, adjacent);
    }

    /// See [`super::dot_ggml`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `k.len() >= q.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_ggml(q: &[f32], k: &[f32]) -> f32 {
        let n = q.len();
        assert!(k.len() >= n);
        let np = n & !63;
        let mut acc = [_mm512_setzero_ps(); 4];
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut i = 0;
        while i < np {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 16 j + 16 <= np <= n.
                unsafe {
                    let x = _mm512_loadu_ps(kp.add(i + 16 * j));
                    let y = _mm512_loadu_ps(qp.add(i + 16 * j));
                    *a = _mm512_fmadd_ps(x, y, *a);
                }
            }
            i += 64;
        }
        let a02 = _mm512_add_ps(acc[0], acc[2]);
        let a13 = _mm512_add_ps(acc[1], acc[3]);
        let a = _mm512_add_ps(a02, a13);
        let mut lanes = [0f32; 16];
        // SAFETY: 16 f32 fit in `lanes`.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
        let mut sum = f64::from(super::reduce16(&lanes));
        for e in np..n {
            sum += f64::from(q[e] * k[e]);
        }
        sum as f32
    }

    /// [`dot_ggml`] with AVX2: each 16-lane accumulator as two halves.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `k.len() >= q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_ggml_avx2(q: &[f32], k: &[f32]) -> f32 {
        let n = q.len();
        assert!(k.len() >= n);
        let np = n & !63;
        let mut acc = [_mm256_setzero_ps(); 8];
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut i = 0;
        while i < np {
            for (h, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8 h + 8 <= np <= n.
                unsafe {
                    let x = _mm256_loadu_ps(kp.add(i + 8 * h));
                    let y = _mm256_loadu_ps(qp.add(i + 8 * h));
                    *a = _mm256_fmadd_ps(x, y, *a);
                }
            }
            i += 64;
        }
        // Accumulator j of the 16-lane form is halves 2j and 2j + 1.
        let mut lanes = [0f32; 16];
        for half in 0..2 {
            let a02 = _mm256_add_ps(acc[half], acc[4 + half]);
            let a13 = _mm256_add_ps(acc[2 + half], acc[6 + half]);
            // SAFETY: 8 f32 fit at lanes[8 half..].
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * half), _mm256_add_ps(a02, a13)) };
        }
        let mut sum = f64::from(super::reduce16(&lanes));
        for e in np..n {
            sum += f64::from(q[e] * k[e]);
        }
        sum as f32
    }

    /// [`super::scale_r16`] with AVX2 and F16C.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `acc.len()` is a multiple of 8.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn scale_r16_avx2(acc: &mut [f32], s: f32) {
        let vs = _mm256_set1_ps(s);
        for c in acc.chunks_exact_mut(8) {
            // SAFETY: `c` holds 8 f32.
            unsafe {
                let y = _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), vs);
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y);
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
    }

    /// [`super::mad_r16`] with AVX2, FMA and F16C.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `acc.len()` is a multiple of 8 and
    /// `v` is as long.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn mad_r16_avx2(acc: &mut [f32], v: &[f32], s: f32) {
        assert!(v.len() >= acc.len());
        let vs = _mm256_set1_ps(s);
        for (c, x) in acc.chunks_exact_mut(8).zip(v.chunks_exact(8)) {
            // SAFETY: `c` and `x` hold 8 f32 each.
            unsafe {
                let y =
                    _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr()), vs, _mm256_loadu_ps(c.as_ptr()));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y);
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
    }

    /// See [`super::scale_r16`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `acc.len()` is a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scale_r16(acc: &mut [f32], s: f32) {
        let vs = _mm512_set1_ps(s);
        for c in acc.chunks_exact_mut(16) {
            // SAFETY: `c` holds 16 f32.
            unsafe {
                let y = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), vs);
                let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y);
                _mm512_storeu_ps(c.as_mut_ptr(), _mm512_cvtph_ps(h));
            }
        }
    }

    /// See [`super::mad_r16`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `acc.len()` is a multiple of 16 and `v` is
    /// as long.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn mad_r16(acc: &mut [f32], v: &[f32], s: f32) {
        assert!(v.len() >= acc.len());
        let vs = _mm512_set1_ps(s);
        for (c, x) in acc.chunks_exact_mut(16).zip(v.chunks_exact(16)) {
            // SAFETY: `c` and `x` hold 16 f32 each.
            unsafe {
                let y =
                    _mm512_fmadd_ps(_mm512_loadu_ps(x.as_ptr()), vs, _mm512_loadu_ps(c.as_ptr()));
                let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y);
                _mm512_storeu_ps(c.as_mut_ptr(), _mm512_cvtph_ps(h));
            }
        }
    }

    /// ggml's `ggml_v_expf` (AVX-512).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn v_expf(x: __m512) -> __m512 {
        let r = _mm512_set1_ps(f32::from_bits(0x4b40_0000));
        let z = _mm512_fmadd_ps(x, _mm512_set1_ps(f32::from_bits(0x3fb8_aa3b)), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(
            n,
            _mm512_set1_ps(f32::from_bits(0x35bf_be8e)),
            _mm512_fnmadd_ps(n, _mm512_set1_ps(f32::from_bits(0x3f31_7200)), x),
        );
        let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(
                    _mm512_set1_ps(f32::from_bits(0x3c07_2010)),
                    b,
                    _mm512_set1_ps(f32::from_bits(0x3d2b_9f17)),
                ),
                u,
                _mm512_fmadd_ps(
                    _mm512_set1_ps(f32::from_bits(0x3e2a_af33)),
                    b,
                    _mm512_set1_ps(f32::from_bits(0x3eff_fedb)),
                ),
            ),
            u,
            _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3f7f_fff6)),
                b,
                _mm512_set1_ps(1.0),
            ),
        );
        let res = _mm512_scalef_ps(j, n);
        if d == 0 {
            return res;
        }
        let zero = _mm512_setzero_ps();
        let alt = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
            _mm512_set1_ps(f32::INFINITY),
            zero,
        );
        _mm512_mask_blend_ps(d, res, alt)
    }

    /// ggml's `ggml_vec_swiglu_f32` (AVX-512): 16 lanes at a time, the tail
    /// with libm's `expf` as ggml's scalar tail does.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        assert!(u.len() >= g.len());
        let one = _mm512_set1_ps(1.0);
        let n = g.len() & !15;
        for (c, w) in g[..n].chunks_exact_mut(16).zip(u.chunks_exact(16)) {
            // SAFETY: `c` and `w` hold 16 f32 each.
            unsafe {
                let x = _mm512_loadu_ps(c.as_ptr());
                let e = v_expf(_mm512_sub_ps(_mm512_setzero_ps(), x));
                let s = _mm512_div_ps(x, _mm512_add_ps(one, e));
                _mm512_storeu_ps(
                    c.as_mut_ptr(),
                    _mm512_mul_ps(s, _mm512_loadu_ps(w.as_ptr())),
                );
            }
        }
        for (g, &u) in g[n..].iter_mut().zip(&u[n..]) {
            let x = *g;
            *g = x / (1.0 + (-x).exp()) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_exp_matches_libm_closely() {
        for i in -2000..2000 {
            let x = i as f32 * 0.043;
            let (a, b) = (expf_ggml(x), x.exp());
            assert!((a - b).abs() <= b * 4e-7, "{x}: {a} vs {b}");
        }
    }

    /// The AVX2 paths (CPUs without AVX-512) give the portable values bit
    /// for bit, which are the AVX-512 ones.
    #[test]
    fn avx2_attention_numerics_equal_portable() {
        if !avx2_f16c() {
            eprintln!(
                "SKIPPED avx2_attention_numerics_equal_portable: this CPU lacks AVX2, FMA or F16C"
            );
            return;
        }
        let vals = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * 0.37 + seed).sin() * 3.1).powi(3))
                .collect()
        };
        for n in [64usize, 128, 200, 256] {
            let (q, k) = (vals(n, 0.5), vals(n, 1.7));
            // SAFETY: detected above.
            let fast = unsafe { x86::dot_ggml_avx2(&q, &k) };
            assert_eq!(
                fast.to_bits(),
                dot_ggml(&q, &k, false).to_bits(),
                "dot n={n}"
            );
            if n % 8 == 0 {
                let v = vals(n, 2.9);
                let (mut a, mut b) = (vals(n, 4.1), vals(n, 4.1));
                unsafe { x86::mad_r16_avx2(&mut a, &v, 0.731) };
                for (b, &x) in b.iter_mut().zip(&v) {
                    *b = r16(x.mul_add(0.731, *b));
                }
                assert_eq!(a, b, "mad n={n}");
                unsafe { x86::scale_r16_avx2(&mut a, 0.377) };
                for b in b.iter_mut() {
                    *b = r16(*b * 0.377);
                }
                assert_eq!(a, b, "scale n={n}");
            }
        }
    }
}
