//! An int8 matmul for Q8_0 weights on x86-64 CPUs with AVX-512 VNNI.
//!
//! It computes exactly what candle's Q8_0 `vec_dot` computes — the weight in
//! blocks of 32 int8 with an f16 scale, each activation row quantized per
//! block of 32 to int8 with an f16 scale (`d = max|x| / 127`,
//! `q = round(x / d)`), and `y = Σ_blocks d_w·d_a·Σ q_w·q_a` — so results
//! equal candle's to float rounding (only the order in which the per-block
//! terms are summed differs), but with a layout and a micro-kernel built for
//! the `vpdpbusd` instruction (64 int8 multiply-adds per instruction).
//!
//! ## Layout ([`PackedQ8`])
//! Output columns are taken in groups of 16 (the last group zero-padded).
//! For each group and each K-block of 32, the 16 × 32 weights are stored as
//! eight 64-byte chunks; chunk `q` holds, for column `c` of the group, the
//! four weights `k = 32·b + 4·q .. + 4` at bytes `4·c .. 4·c + 4`. One aligned
//! 512-bit load is then the `b` operand of `vpdpbusd` for 16 columns × 4 k.
//! Next to it: the 16 weight scales (f32) of the group and block, and
//! `-128 · Σ w` per column and block (see below).
//!
//! ## The u8 offset
//! `vpdpbusd` multiplies *unsigned* bytes by signed bytes. Activations are
//! stored as `u8 = q_a + 128`, so the instruction sums `(q_a + 128)·q_w`; the
//! integer accumulator of each block starts at `-128 · Σ q_w`, which cancels
//! the offset exactly (all in i32, no overflow: |Σ| ≤ 32·255·128).
//!
//! ## Micro-kernel
//! [`MR`] rows × [`NR`] groups (4 × 48 columns): 12 i32 accumulators run over
//! one block (8 `vpdpbusd` each), are converted to f32 and added with
//! `d_w·d_a` into 12 f32 accumulators. Work is split over rows and column
//! panels with rayon.
//!
//! Other architectures compile the packing code only; `matmul` answers
//! `None` there and the caller uses candle.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]

use rayon::prelude::*;

/// Rows per micro-tile.
const MR: usize = 4;
/// Groups of 16 columns per micro-tile.
const NR: usize = 3;
/// Rows per parallel task (a multiple of [`MR`]).
const ROW_BLOCK: usize = 64;
/// Q8_0 block length.
const QK: usize = 32;
/// Bytes of one stored Q8_0 block: f16 scale + 32 int8.
const BLOCK_BYTES: usize = 34;

/// 64 bytes, aligned for 512-bit loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Chunk([u8; 64]);

/// Whether this CPU can run the kernel (AVX-512 F/BW and VNNI).
pub(crate) fn cpu_supports() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The f32 value of IEEE half-precision bits (exact).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        // Subnormal: man · 2^-24, exact in f32.
        (0, m) => return sign_factor(h) * (m as f32) * (1.0 / 16_777_216.0),
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

fn sign_factor(h: u16) -> f32 {
    if h & 0x8000 != 0 {
        -1.0
    } else {
        1.0
    }
}

/// A Q8_0 weight `[n, k]` repacked for the kernel.
pub(crate) struct PackedQ8 {
    n: usize,
    k: usize,
    /// K-blocks per row (`k / 32`).
    nb: usize,
    /// Groups of 16 output columns.
    groups: usize,
    /// `[group][block][quad]` chunks.
    w: Vec<Chunk>,
    /// `[group][block][16]` weight scales.
    scales: Vec<f32>,
    /// `[group][block][16]` `-128 · Σ q_w`.
    corr: Vec<i32>,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQ8")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Bytes of the packed copy of an `[n, k]` weight (see [`PackedQ8::bytes`]).
pub(crate) fn packed_bytes(n: usize, k: usize) -> u64 {
    let cols = n.div_ceil(16) * 16;
    let nb = k / QK;
    // int8 weights + f32 scale + i32 correction per column and block.
    (cols * k + cols * nb * 8) as u64
}

impl PackedQ8 {
    /// candle's Q8_0 blocks again (`[n][k/32]` blocks of 34 bytes: the f16
    /// scale, then 32 int8 values), exactly as [`Self::from_q8_0`] read
    /// them: the scales came from f16, so they convert back without loss.
    pub(crate) fn to_q8_0(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.n * self.nb * BLOCK_BYTES];
        for col in 0..self.n {
            let (g, c) = (col / 16, col % 16);
            for b in 0..self.nb {
                let blk = &mut out
                    [(col * self.nb + b) * BLOCK_BYTES..(col * self.nb + b + 1) * BLOCK_BYTES];
                let at = (g * self.nb + b) * 16 + c;
                blk[..2]
                    .copy_from_slice(&half::f16::from_f32(self.scales[at]).to_bits().to_le_bytes());
                for q in 0..8 {
                    let chunk = &self.w[(g * self.nb + b) * 8 + q].0;
                    blk[2 + 4 * q..2 + 4 * q + 4].copy_from_slice(&chunk[4 * c..4 * c + 4]);
                }
            }
        }
        out
    }

    /// Repacks candle's Q8_0 blocks (`[n][k/32]` blocks of 34 bytes, as
    /// `QTensor::data` gives them). `None` when the sizes do not match.
    pub(crate) fn from_q8_0(data: &[u8], n: usize, k: usize) -> Option<PackedQ8> {
        if n == 0 || k == 0 || !k.is_multiple_of(QK) || data.len() != n * (k / QK) * BLOCK_BYTES {
            return None;
        }
        let nb = k / QK;
        let groups = n.div_ceil(16);
        let mut w = vec![Chunk([0; 64]); groups * nb * 8];
        let mut scales = vec![0f32; groups * nb * 16];
        let mut corr = vec![0i32; groups * nb * 16];
        for col in 0..n {
            let (g, c) = (col / 16, col % 16);
            for b in 0..nb {
                let blk = &data[(col * nb + b) * BLOCK_BYTES..(col * nb + b + 1) * BLOCK_BYTES];
                let at = (g * nb + b) * 16 + c;
                scales[at] = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                let qs = &blk[2..];
                corr[at] = -128 * qs.iter().map(|&v| v as i8 as i32).sum::<i32>();
                for q in 0..8 {
                    let chunk = &mut w[(g * nb + b) * 8 + q].0;
                    chunk[4 * c..4 * c + 4].copy_from_slice(&qs[4 * q..4 * q + 4]);
                }
            }
        }
        Some(PackedQ8 {
            n,
            k,
            nb,
            groups,
            w,
            scales,
            corr,
        })
    }

    /// Bytes this copy occupies.
    pub(crate) fn bytes(&self) -> u64 {
        (self.w.len() * 64 + self.scales.len() * 4 + self.corr.len() * 4) as u64
    }

    /// `out[m, n] = x[m, k] · Wᵀ (+ bias)` in a new buffer. `None` when the
    /// CPU lacks the instructions or the sizes do not match (the caller
    /// falls back).
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Option<Vec<f32>> {
        let mut out = vec![0f32; m * self.n];
        let mut scratch = Int8Scratch::default();
        self.matmul_into(x, m, bias, &mut out, &mut scratch)
            .then_some(out)
    }

    /// `out[m, n] = x[m, k] · Wᵀ (+ bias)`, the activations quantized into
    /// `scratch` (grown to [`scratch_bytes_per_row`] `· m` where shorter).
    /// `false` when the CPU lacks the instructions or the sizes do not match
    /// (nothing is written; the caller falls back).
    pub(crate) fn matmul_into(
        &self,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        scratch: &mut Int8Scratch,
    ) -> bool {
        if !cpu_supports()
            || x.len() != m * self.k
            || out.len() != m * self.n
            || bias.is_some_and(|b| b.len() != self.n)
            || m == 0
        {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let (a, sa) = scratch.take(m * self.k, m * self.nb);
            quantize_rows(x, self.k, a, sa);
            self.run(a, sa, m, bias, out);
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (bias, out, scratch);
            false
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn run(&self, a: &[u8], sa: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        let panels = self.groups.div_ceil(NR);
        let row_blocks = m.div_ceil(ROW_BLOCK);
        // Enough tasks for rayon to balance: about 4 per thread.
        let want = 4 * rayon::current_num_threads().max(1);
        let per_task = (panels * row_blocks).div_ceil(want).clamp(1, panels);
        let panel_chunks = panels.div_ceil(per_task);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..row_blocks * panel_chunks)
            .into_par_iter()
            .for_each(|task| {
                let (rb, pc) = (task / panel_chunks, task % panel_chunks);
                let rows = rb * ROW_BLOCK..((rb + 1) * ROW_BLOCK).min(m);
                let panel_range = pc * per_task..((pc + 1) * per_task).min(panels);
                for p in panel_range {
                    let g0 = p * NR;
                    let ng = NR.min(self.groups - g0);
                    let mut r = rows.start;
                    while r < rows.end {
                        let mr = MR.min(rows.end - r);
                        let t = Tile {
                            a: a[r * self.k..].as_ptr(),
                            sa: sa[r * self.nb..].as_ptr(),
                            w: self.w[g0 * self.nb * 8..].as_ptr(),
                            scales: self.scales[g0 * self.nb * 16..].as_ptr(),
                            corr: self.corr[g0 * self.nb * 16..].as_ptr(),
                            bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()),
                            // SAFETY: row `r` and the panel's columns lie inside
                            // `out`; tasks write disjoint row × column rectangles.
                            out: unsafe { out_ptr.get().add(r * self.n) },
                            k: self.k,
                            nb: self.nb,
                            n: self.n,
                            col0: g0 * 16,
                        };
                        // SAFETY: `cpu_supports()` was checked in `matmul`; the
                        // pointers in `t` cover `mr` rows × `ng` groups (checked
                        // sizes in `matmul`, `groups` from `from_q8_0`).
                        unsafe { dispatch(&t, mr, ng) };
                        r += mr;
                    }
                }
            });
    }
}

/// A raw pointer that may cross to rayon's threads (they write disjoint parts).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint regions of one buffer that outlives the
// parallel loop (see `PackedQ8::run`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Pointers for one micro-tile.
#[cfg(target_arch = "x86_64")]
struct Tile {
    /// First activation row (u8, row stride `k`).
    a: *const u8,
    /// Its block scales (row stride `nb`).
    sa: *const f32,
    /// First group's chunks (group stride `nb · 8`).
    w: *const Chunk,
    /// First group's scales (group stride `nb · 16`).
    scales: *const f32,
    /// First group's corrections (group stride `nb · 16`).
    corr: *const i32,
    /// Bias of all `n` columns, or null.
    bias: *const f32,
    /// Output row of the first activation row (row stride `n`).
    out: *mut f32,
    k: usize,
    nb: usize,
    n: usize,
    /// First output column of the tile.
    col0: usize,
}

/// Runs the micro-kernel instantiated for `mr` rows and `ng` groups.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VNNI; `t` covers `mr ≤ MR` rows and `ng ≤ NR`
/// groups.
#[cfg(target_arch = "x86_64")]
unsafe fn dispatch(t: &Tile, mr: usize, ng: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (mr, ng) {
            (4, 3) => tile::<4, 3>(t),
            (4, 2) => tile::<4, 2>(t),
            (4, 1) => tile::<4, 1>(t),
            (3, 3) => tile::<3, 3>(t),
            (3, 2) => tile::<3, 2>(t),
            (3, 1) => tile::<3, 1>(t),
            (2, 3) => tile::<2, 3>(t),
            (2, 2) => tile::<2, 2>(t),
            (2, 1) => tile::<2, 1>(t),
            (1, 3) => tile::<1, 3>(t),
            (1, 2) => tile::<1, 2>(t),
            (1, 1) => tile::<1, 1>(t),
            _ => unreachable!("tile sizes are bounded by MR = 4 and NR = 3"),
        }
    }
}

/// The micro-kernel: `R` rows × `G` groups of 16 columns.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VNNI and `t` covers `R` rows and `G` groups.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize, const G: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    let (k, nb) = (t.k, t.nb);
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    for b in 0..nb {
        // SAFETY (whole block): every offset below stays inside the buffers
        // described by `Tile` — rows `< R`, groups `< G`, blocks `< nb`,
        // bytes `< k` per row; chunk loads are 64-byte aligned (`Chunk`).
        unsafe {
            let mut ci = [[_mm512_setzero_si512(); G]; R];
            for j in 0..G {
                let c = _mm512_loadu_si512(t.corr.add((j * nb + b) * 16) as *const __m512i);
                for row in ci.iter_mut() {
                    row[j] = c;
                }
            }
            for q in 0..8 {
                let mut wv = [_mm512_setzero_si512(); G];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_load_si512(t.w.add((j * nb + b) * 8 + q) as *const __m512i);
                }
                for (i, row) in ci.iter_mut().enumerate() {
                    let four = (t.a.add(i * k + b * QK + 4 * q) as *const i32).read_unaligned();
                    let av = _mm512_set1_epi32(four);
                    for j in 0..G {
                        row[j] = _mm512_dpbusd_epi32(row[j], av, wv[j]);
                    }
                }
            }
            for j in 0..G {
                let sw = _mm512_loadu_ps(t.scales.add((j * nb + b) * 16));
                for i in 0..R {
                    let d = _mm512_mul_ps(sw, _mm512_set1_ps(*t.sa.add(i * nb + b)));
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ci[i][j]), d, acc[i][j]);
                }
            }
        }
    }
    for j in 0..G {
        let col = t.col0 + j * 16;
        let valid = t.n.saturating_sub(col).min(16);
        let mask: __mmask16 = if valid == 16 {
            0xffff
        } else {
            (1u16 << valid) - 1
        };
        // SAFETY: masked loads and stores touch only the `valid` columns of
        // rows `< R`, inside `bias` (length n) and `out` (stride n).
        unsafe {
            let bias = if t.bias.is_null() {
                _mm512_setzero_ps()
            } else {
                _mm512_maskz_loadu_ps(mask, t.bias.add(col))
            };
            for (i, row) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(t.out.add(i * t.n + col), mask, _mm512_add_ps(row[j], bias));
            }
        }
    }
}

/// Bytes per activation row of `k` values the kernel quantizes into its
/// scratch: `k` bytes (`u8 = q + 128`) and one f32 scale per block of 32.
pub(crate) fn scratch_bytes_per_row(k: usize) -> u64 {
    (k + 4 * (k / QK)) as u64
}

/// The kernel's working memory: the quantized activations and their block
/// scales, kept by the caller across calls so that a forward pass of many
/// layers allocates them once. Grows to the largest call; never shrinks.
#[derive(Debug, Default)]
pub(crate) struct Int8Scratch {
    a: Vec<u8>,
    sa: Vec<f32>,
}

impl Int8Scratch {
    /// The first `a` bytes and `sa` scales, grown where shorter (their
    /// values are whatever the last call left; every one is written before
    /// it is read).
    fn take(&mut self, a: usize, sa: usize) -> (&mut [u8], &mut [f32]) {
        // Exactly what is asked for (no amortised doubling): the scratch's
        // size is part of a forward pass's memory estimate.
        if self.a.len() < a {
            self.a.reserve_exact(a - self.a.len());
            self.a.resize(a, 0);
        }
        if self.sa.len() < sa {
            self.sa.reserve_exact(sa - self.sa.len());
            self.sa.resize(sa, 0.0);
        }
        (&mut self.a[..a], &mut self.sa[..sa])
    }

    /// Grows to what a call of `rows` rows of `k` values takes.
    pub(crate) fn reserve(&mut self, rows: usize, k: usize) {
        self.take(rows * k, rows * (k / QK));
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        (self.a.capacity() + 4 * self.sa.capacity()) as u64
    }
}

/// Quantizes rows of `k` floats as candle's Q8_0 `from_float` does, to
/// `u8 = q + 128` in `a` (row-major, `x.len()` bytes) and the f16-rounded
/// scales as f32 in `sa` (`x.len() / 32`). The CPU must support the kernel.
#[cfg(target_arch = "x86_64")]
fn quantize_rows(x: &[f32], k: usize, a: &mut [u8], sa: &mut [f32]) {
    let nb = k / QK;
    const ROWS: usize = 16;
    a.par_chunks_mut(ROWS * k)
        .zip(sa.par_chunks_mut(ROWS * nb))
        .enumerate()
        .for_each(|(c, (a, sa))| {
            let x = &x[c * ROWS * k..(c * ROWS * k + a.len()).min(x.len())];
            // SAFETY: the caller checked `cpu_supports()`; the slices hold
            // whole rows of `k` (a multiple of 32) and `k / 32` scales.
            unsafe { quantize_blocks(x, a, sa) };
        });
}

/// Quantizes consecutive blocks of 32: `x.len() == a.len() == 32 · sa.len()`.
///
/// # Safety
/// The CPU has AVX-512 F/BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quantize_blocks(x: &[f32], a: &mut [u8], sa: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(x.len() == a.len() && x.len() == sa.len() * QK);
    let half = _mm512_set1_ps(0.5);
    let one = _mm512_set1_ps(1.0);
    let sign = _mm512_set1_ps(-0.0);
    let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
    for (b, s) in sa.iter_mut().enumerate() {
        // SAFETY: block `b` lies inside `x` and `a` (asserted above).
        unsafe {
            let v = [
                _mm512_loadu_ps(x.as_ptr().add(b * QK)),
                _mm512_loadu_ps(x.as_ptr().add(b * QK + 16)),
            ];
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            // candle: d = amax / 127, id = 1 / d (from the f32 d), scale
            // stored as f16 (round to nearest even, as `half` does).
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let dh = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_set1_ps(d),
            );
            *s = _mm512_cvtss_f32(_mm512_cvtph_ps(dh));
            let idv = _mm512_set1_ps(id);
            for (h, xv) in v.into_iter().enumerate() {
                let y = _mm512_mul_ps(xv, idv);
                // `f32::round` (half away from zero): truncate, then step
                // away from zero where the dropped fraction is ≥ 0.5 (the
                // fraction `y - trunc(y)` is exact).
                let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                let frac = _mm512_abs_ps(_mm512_sub_ps(y, t));
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
                let away = _mm512_or_ps(_mm512_and_ps(y, sign), one);
                let r = _mm512_mask_add_ps(t, up, t, away);
                // `as i8` saturates and maps NaN to 0.
                let r = _mm512_max_ps(_mm512_min_ps(r, hi), lo);
                let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y);
                let q = _mm512_maskz_cvtps_epi32(ordered, r);
                let u = _mm512_add_epi32(q, _mm512_set1_epi32(128));
                _mm_storeu_si128(
                    a.as_mut_ptr().add(b * QK + 16 * h) as *mut __m128i,
                    _mm512_cvtepi32_epi8(u),
                );
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len)
            .map(|i| {
                // Mixed magnitudes, exact halves and a zero block now and then.
                let scale = [1.0f32, 1e-3, 40.0, 0.0][(i / 32) % 4];
                (rng.random::<f32>() - 0.5) * 2.0 * scale
            })
            .collect()
    }

    fn q8(v: &[f32], rows: usize, cols: usize) -> QTensor {
        let t = Tensor::from_vec(v.to_vec(), (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()
    }

    /// Σ_b d_w·d_a·Σ q_w·q_a in f64, from candle's own quantized blocks.
    fn reference(x: &[f32], m: usize, k: usize, w: &[u8], n: usize) -> Vec<f64> {
        let xq = q8(x, m, k).data().unwrap().into_owned();
        let nb = k / QK;
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for b in 0..nb {
                    let xa = &xq[(i * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let wa = &w[(j * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let dot: i32 = (0..QK)
                        .map(|t| xa[2 + t] as i8 as i32 * wa[2 + t] as i8 as i32)
                        .sum();
                    let d = f16_to_f32(u16::from_le_bytes([xa[0], xa[1]])) as f64
                        * f16_to_f32(u16::from_le_bytes([wa[0], wa[1]])) as f64;
                    s += d * dot as f64;
                }
                y[i * n + j] = s;
            }
        }
        y
    }

    /// Whether a test of the int8 kernel itself must stand down on this CPU;
    /// if so it says so on stderr, with the reason, so a run on a CPU
    /// without AVX-512 VNNI shows which tests did not run (the portable
    /// tests below run everywhere).
    fn skip_without_kernel(test: &str) -> bool {
        if cpu_supports() {
            return false;
        }
        eprintln!(
            "SKIPPED quant::vnni::{test}: this CPU lacks AVX-512 F/BW/VNNI, so the int8 kernel \
             cannot run here (Q8_0 layers fall back to candle, tested by \
             fallback_matches_the_scalar_reference)"
        );
        true
    }

    fn max_rel(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(1e-30f64, |a, v| a.max(v.abs()));
        got.iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn f16_conversion_is_exact() {
        for bits in [
            0u16, 0x8000, 0x0001, 0x03ff, 0x0400, 0x3c00, 0xc000, 0x7bff, 0x7c00, 0xfc00,
        ] {
            let x = f16_to_f32(bits);
            let want = match bits {
                0x0001 => 2f32.powi(-24),
                0x03ff => 1023.0 * 2f32.powi(-24),
                0x0400 => 2f32.powi(-14),
                0x3c00 => 1.0,
                0xc000 => -2.0,
                0x7bff => 65504.0,
                0x7c00 => f32::INFINITY,
                0xfc00 => f32::NEG_INFINITY,
                0x8000 => -0.0,
                _ => 0.0,
            };
            assert_eq!(x.to_bits(), want.to_bits(), "{bits:#x}");
        }
    }

    #[test]
    fn quantizes_activations_bit_for_bit_like_candle() {
        if skip_without_kernel("quantizes_activations_bit_for_bit_like_candle") {
            return;
        }
        let (m, k) = (5, 256);
        let mut x = random(m * k, 3);
        // Exact halves after scaling: 127 / 127 · {0.5, 1.5, 2.5, -0.5}.
        x[0] = 127.0;
        x[1..5].copy_from_slice(&[0.5, 1.5, 2.5, -0.5]);
        let mut scratch = Int8Scratch::default();
        let (a, sa) = scratch.take(m * k, m * k / QK);
        quantize_rows(&x, k, a, sa);
        let want = q8(&x, m, k).data().unwrap().into_owned();
        for blk in 0..m * k / QK {
            let wb = &want[blk * BLOCK_BYTES..][..BLOCK_BYTES];
            assert_eq!(
                sa[blk].to_bits(),
                f16_to_f32(u16::from_le_bytes([wb[0], wb[1]])).to_bits()
            );
            for t in 0..QK {
                assert_eq!(
                    a[blk * QK + t] as i32 - 128,
                    wb[2 + t] as i8 as i32,
                    "block {blk} lane {t}"
                );
            }
        }
    }

    #[test]
    fn rejects_mismatched_sizes() {
        assert!(PackedQ8::from_q8_0(&[0; 34], 1, 64).is_none());
        if !cpu_supports() {
            // Without the instructions matmul always declines, so the
            // caller takes candle's path.
            let p = PackedQ8::from_q8_0(&[0; 34], 1, 32).unwrap();
            assert!(p.matmul(&[0.0; 32], 1, None).is_none());
        }
        assert!(PackedQ8::from_q8_0(&[0; 34], 1, 33).is_none());
        let p = PackedQ8::from_q8_0(&[0; 34], 1, 32).unwrap();
        assert!(p.matmul(&[0.0; 31], 1, None).is_none());
        assert!(p.matmul(&[0.0; 32], 1, Some(&[0.0, 1.0])).is_none());
        assert_eq!(p.bytes(), packed_bytes(1, 32));
    }

    /// Against candle's `QMatMul` where it takes the `vec_dot` path. (Where
    /// `k % 256 == 0` and `n % 16 == 0` candle's repacked kernel quantizes
    /// activations per 256 values instead (Q8_K), a coarser arithmetic.)
    #[test]
    fn matches_candle_qmatmul() {
        if skip_without_kernel("matches_candle_qmatmul") {
            return;
        }
        for (m, k, n) in [
            (40, 384, 1152),
            (7, 1536, 392),
            (1, 512, 40),
            (33, 1536, 384 + 8),
        ] {
            let w = random(n * k, 1);
            let x = random(m * k, 2);
            let qt = q8(&w, n, k);
            let data = qt.data().unwrap().into_owned();
            let p = PackedQ8::from_q8_0(&data, n, k).unwrap();
            let got = p.matmul(&x, m, None).unwrap();
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let want: Vec<f64> = QMatMul::from_qtensor(qt)
                .unwrap()
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let e = max_rel(&got, &want);
            assert!(e < 1e-5, "m={m} k={k} n={n}: max relative error {e}");
        }
    }

    /// The packed layout (portable code, checked on every CPU): chunk `q`
    /// of a group and block holds, for column `c`, the four weights
    /// `k = 32·b + 4·q .. + 4` at bytes `4·c .. 4·c + 4`; next to it each
    /// column's scale and `-128 · Σ q_w`; padded columns are zero.
    #[test]
    fn packs_columns_in_groups_of_16() {
        let (n, k) = (19, 64);
        let data = q8(&random(n * k, 5), n, k).data().unwrap().into_owned();
        let p = PackedQ8::from_q8_0(&data, n, k).unwrap();
        let nb = k / QK;
        assert_eq!((p.groups, p.nb, p.bytes()), (2, nb, packed_bytes(n, k)));
        // Unpacking gives candle's blocks back, byte for byte.
        assert_eq!(p.to_q8_0(), data);
        for col in 0..32 {
            let (g, c) = (col / 16, col % 16);
            for b in 0..nb {
                let at = (g * nb + b) * 16 + c;
                let qs: Vec<u8> = (0..8)
                    .flat_map(|q| p.w[(g * nb + b) * 8 + q].0[4 * c..4 * c + 4].to_vec())
                    .collect();
                if col >= n {
                    assert!(qs.iter().all(|&v| v == 0) && p.scales[at] == 0.0 && p.corr[at] == 0);
                    continue;
                }
                let blk = &data[(col * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                assert_eq!(&qs[..], &blk[2..], "column {col} block {b}");
                let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                assert_eq!(p.scales[at].to_bits(), d.to_bits());
                let sum: i32 = blk[2..].iter().map(|&v| v as i8 as i32).sum();
                assert_eq!(p.corr[at], -128 * sum);
            }
        }
    }

    /// The path every CPU has: candle's Q8_0 `vec_dot` (shapes it does not
    /// repack), which Q8_0 layers take where the int8 kernel cannot run,
    /// against the same f64 reference the kernel is held to.
    #[test]
    fn fallback_matches_the_scalar_reference() {
        for (m, k, n) in [(3, 96, 40), (5, 384, 24), (1, 32, 7)] {
            let w = random(n * k, 11);
            let x = random(m * k, 12);
            let qt = q8(&w, n, k);
            let data = qt.data().unwrap().into_owned();
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let got: Vec<f32> = QMatMul::from_qtensor(qt)
                .unwrap()
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let e = max_rel(&got, &reference(&x, m, k, &data, n));
            assert!(e < 1e-5, "m={m} k={k} n={n}: max relative error {e}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
        #[test]
        fn matches_scalar_reference(m in 1usize..14, kb in 1usize..10, n in 1usize..75, seed in 0u64..1000, with_bias: bool) {
            // Checked once per case; on a CPU without the kernel every case
            // says it is skipped and passes (prop_assume would reject them
            // all and fail the run).
            if skip_without_kernel("matches_scalar_reference") {
                return Ok(());
            }
            let k = kb * QK;
            let w = random(n * k, seed);
            let x = random(m * k, seed + 1);
            let data = q8(&w, n, k).data().unwrap().into_owned();
            let p = PackedQ8::from_q8_0(&data, n, k).unwrap();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
            let got = p.matmul(&x, m, with_bias.then_some(&bias[..])).unwrap();
            let mut want = reference(&x, m, k, &data, n);
            if with_bias {
                for (i, v) in want.iter_mut().enumerate() {
                    *v += bias[i % n] as f64;
                }
            }
            let e = max_rel(&got, &want);
            prop_assert!(e < 1e-5, "m={} k={} n={}: max relative error {}", m, k, n, e);
        }
    }
}
