//! Fused CPU kernels for the encoder: they work on row-major f32 buffers and
//! run in parallel over rows (rayon). Each replaces several candle ops (and
//! their intermediate tensors) with one pass over memory.

use rayon::prelude::*;

/// Calls `$f(args)` compiled for AVX2 + FMA when the CPU has them (the
/// crate is built for baseline x86-64, SSE2 only), else the portable build.
macro_rules! dispatch {
    ($f:ident($($a:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast(f: impl FnOnce()) {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the features were detected on this CPU just above.
                unsafe { fast(#[inline(always)] || $f($($a),*)) }
            } else {
                $f($($a),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f($($a),*)
        }
    }};
}

/// Rows per parallel task for the row-wise kernels, at most.
const ROW_CHUNK: usize = 16;

/// Rows per parallel task for `rows` rows: at most [`ROW_CHUNK`], and small
/// enough that a short batch (one sentence of 20 tokens) still gives every
/// thread about four tasks instead of leaving all but one idle.
fn row_chunk(rows: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    rows.div_ceil(tasks).clamp(1, ROW_CHUNK)
}

thread_local! {
    /// Per-thread scratch of the kernels (a layer norm's row, one head's
    /// q/kᵀ/v and scores), kept for the thread's life: small buffers taken
    /// and freed in every task would interleave with the large activation
    /// buffers on the heap and fragment it, so that freed activations could
    /// not be reused by the next layer's.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch, at least `len` floats long (their
/// values are whatever the last use left).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// `erf(x)`, max abs error below 5e-7 in f32 (Abramowitz & Stegun 7.1.26,
/// 1.5e-7 in exact arithmetic, with a fast exp). Branch-free so that it
/// vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_7) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * fast_exp(-a * a);
    y.copysign(x)
}

/// `e^x` for `x <= 0` (down to where it underflows), relative error ~2e-7.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    let y = x * std::f32::consts::LOG2_E;
    // Round to nearest with the 1.5·2^23 trick (vectorises without SSE4.1).
    let n = (y + 12_582_912.0) - 12_582_912.0;
    let f = y - n; // [-0.5, 0.5]
                   // 2^f = e^(f ln2), |f ln2| <= 0.35: degree-6 Taylor, error < 2e-7.
    let l = std::f32::consts::LN_2;
    let g = f * l;
    let p = 1.0
        + g * (1.0
            + g * (0.5
                + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0 + g * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// `x = gelu(x + bias)` in place, with the exact (erf) GELU; `x` rows are
/// `cols` wide.
pub(crate) fn bias_gelu(x: &mut [f32], bias: &[f32], cols: usize) {
    let chunk = row_chunk(x.len() / cols.max(1));
    x.par_chunks_mut(cols * chunk)
        .for_each(|x| dispatch!(gelu_rows(x, bias, cols)));
}

#[inline(always)]
fn gelu_rows(x: &mut [f32], bias: &[f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        for (x, &b) in row.iter_mut().zip(bias) {
            let v = *x + b;
            *x = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// Row-wise layer norm of `x + bias + hidden[.., :h]`, written back over
/// `hidden[.., :h]` (the residual is the row it replaces; columns past `h`
/// are left as they are). `x` rows are `h` wide, `hidden` rows `stride` wide.
pub(crate) fn add_layer_norm(
    x: &[f32],
    bias: &[f32],
    hidden: &mut [f32],
    stride: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let h = gamma.len();
    let chunk = row_chunk(hidden.len() / stride.max(1));
    hidden
        .par_chunks_mut(stride * chunk)
        .zip(x.par_chunks(h * chunk))
        .for_each(|(o, x)| {
            with_scratch(h, |tmp| {
                for (orow, xr) in o.chunks_exact_mut(stride).zip(x.chunks_exact(h)) {
                    for i in 0..h {
                        tmp[i] = xr[i] + bias[i] + orow[i];
                    }
                    norm_into(tmp, gamma, beta, eps, &mut orow[..h]);
                }
            })
        });
}

#[inline(always)]
fn norm_into(v: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for i in 0..v.len() {
        out[i] = (v[i] - mean) * inv * gamma[i] + beta[i];
    }
}

/// Weights per Q8_0 block: one f16 scale for 32 signed bytes.
pub(crate) const Q8_BLOCK: usize = 32;

/// A table of rows stored as Q8_0 blocks (as GGML stores them: per block of
/// 32 values one f16 scale `d = max|x| / 127` and 32 bytes `round(x / d)`),
/// dequantized a row at a time on lookup. 34 bytes per 32 values instead of
/// 128.
#[derive(Debug, Clone, Default)]
pub(crate) struct Q8Rows {
    pub(crate) cols: usize,
    pub(crate) scales: Vec<half::f16>,
    pub(crate) quants: Vec<i8>,
}

impl Q8Rows {
    /// Quantizes `rows × cols` f32 values (`cols` a multiple of 32).
    pub(crate) fn quantize(data: &[f32], cols: usize) -> Q8Rows {
        debug_assert!(cols.is_multiple_of(Q8_BLOCK) && data.len().is_multiple_of(cols));
        let blocks = data.len() / Q8_BLOCK;
        let mut scales = Vec::with_capacity(blocks);
        let mut quants = Vec::with_capacity(data.len());
        for block in data.chunks_exact(Q8_BLOCK) {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            scales.push(half::f16::from_f32(d));
            quants.extend(
                block
                    .iter()
                    .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8),
            );
        }
        Q8Rows {
            cols,
            scales,
            quants,
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        (self.scales.len() * 2 + self.quants.len()) as u64
    }

    /// Row `r` dequantized into `out` (`cols` long).
    #[inline(always)]
    pub(crate) fn row_into(&self, r: usize, out: &mut [f32]) {
        let per_row = self.cols / Q8_BLOCK;
        let q = &self.quants[r * self.cols..][..self.cols];
        let d = &self.scales[r * per_row..][..per_row];
        for ((o, q), d) in out
            .chunks_exact_mut(Q8_BLOCK)
            .zip(q.chunks_exact(Q8_BLOCK))
            .zip(d)
        {
            let d = d.to_f32();
            for (o, &q) in o.iter_mut().zip(q) {
                *o = q as f32 * d;
            }
        }
    }
}

/// The word-embedding table: f32 rows, or Q8_0 rows dequantized on lookup.
#[derive(Debug, Clone)]
pub(crate) enum WordTable {
    /// `vocab × hidden` f32 values.
    F32(Vec<f32>),
    /// Q8_0 rows.
    Q8_0(Q8Rows),
}

impl WordTable {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            WordTable::F32(v) => 4 * v.len() as u64,
            WordTable::Q8_0(q) => q.bytes(),
        }
    }

    /// Row `id` (`out.len()` wide) into `out`.
    #[inline(always)]
    fn row_into(&self, id: usize, out: &mut [f32]) {
        match self {
            WordTable::F32(v) => out.copy_from_slice(&v[id * out.len()..][..out.len()]),
            WordTable::Q8_0(q) => q.row_into(id, out),
        }
    }
}

/// The embedding tables and the norm that follows them.
pub(crate) struct EmbeddingTables<'a> {
    pub(crate) word: &'a WordTable,
    pub(crate) position: &'a [f32],
    pub(crate) token_type: &'a [f32],
    pub(crate) gamma: &'a [f32],
    pub(crate) beta: &'a [f32],
    pub(crate) eps: f32,
}

/// Sum of word, position and token-type embeddings, layer-normed, for packed
/// tokens, into `out` (`ids.len()` rows of `out_stride`; columns past the
/// hidden size are left as they are). Ids are checked by the caller.
pub(crate) fn embed(
    t: &EmbeddingTables<'_>,
    ids: &[u32],
    type_ids: &[u32],
    positions: &[u32],
    out: &mut [f32],
    out_stride: usize,
) {
    let h = t.gamma.len();
    let chunk = row_chunk(ids.len());
    out.par_chunks_mut(out_stride * chunk)
        .enumerate()
        .for_each(|(c, o)| {
            with_scratch(h, |tmp| {
                for (r, orow) in o.chunks_exact_mut(out_stride).enumerate() {
                    let k = c * chunk + r;
                    t.word.row_into(ids[k] as usize, tmp);
                    let p = &t.position[positions[k] as usize * h..][..h];
                    let ty = &t.token_type[type_ids[k] as usize * h..][..h];
                    for i in 0..h {
                        tmp[i] += p[i] + ty[i];
                    }
                    norm_into(tmp, t.gamma, t.beta, t.eps, &mut orow[..h]);
                }
            })
        });
}

/// Shape of the attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShape {
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
}

/// Multi-head self-attention over packed sequences. `qkv` rows are
/// `[q | k | v]` (3·hidden wide, bias not yet added; `bias` is 3·hidden);
/// `seqs` are the (start row, length) of each sequence. Each token attends to
/// the tokens of its own sequence only, so no mask and no padding. The output
/// `out` is `rows × out_stride` (every value written: zeros past hidden).
pub(crate) fn attention(
    qkv: &[f32],
    bias: &[f32],
    seqs: &[(usize, usize)],
    shape: AttentionShape,
    out: &mut [f32],
    out_stride: usize,
) {
    let AttentionShape { heads, head_dim } = shape;
    let hidden = heads * head_dim;
    let w = 3 * hidden;
    let rows = qkv.len() / w;
    // One task per sequence and head, so that a single sentence still
    // spreads its heads over every thread; each task writes its own
    // `len × head_dim` block of the output in place.
    let tasks: Vec<(usize, usize, usize)> = seqs
        .iter()
        .flat_map(|&(start, len)| (0..heads).map(move |hd| (start, len, hd)))
        .collect();
    debug_assert_eq!(out.len(), rows * out_stride);
    if out_stride > hidden {
        out.par_chunks_mut(out_stride)
            .for_each(|row| row[hidden..].fill(0.0));
    }
    let dst = SharedOut(out.as_mut_ptr(), out.len());
    tasks.par_iter().for_each(|&(start, len, hd)| {
        let dst = &dst;
        with_scratch(3 * len * head_dim + len, |scratch| {
            let o = |i: usize| {
                let at = (start + i) * out_stride + hd * head_dim;
                assert!(at + head_dim <= dst.1, "attention row out of the output");
                // SAFETY: in bounds (checked above); tasks write disjoint
                // ranges (one head's columns of one sequence's rows) and
                // `out` outlives the parallel loop.
                unsafe { std::slice::from_raw_parts_mut(dst.0.add(at), head_dim) }
            };
            dispatch!(attend_head(o, scratch, qkv, bias, start, len, hd, shape));
        })
    });
}

/// The attention output, written by the tasks in disjoint ranges.
struct SharedOut(*mut f32, usize);

// SAFETY: the tasks only write disjoint ranges through the pointer (see
// `attention`), and the buffer outlives them.
unsafe impl Sync for SharedOut {}

/// Attention of one head of one sequence: row `i` of the result goes to
/// `out(i)` (`head_dim` wide, overwritten). `scratch` holds q, kᵀ, v and the scores.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_head<'a>(
    out: impl Fn(usize) -> &'a mut [f32],
    scratch: &mut [f32],
    qkv: &[f32],
    bias: &[f32],
    start: usize,
    len: usize,
    hd: usize,
    shape: AttentionShape,
) {
    let AttentionShape { heads, head_dim } = shape;
    let hidden = heads * head_dim;
    let w = 3 * hidden;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let (q, rest) = scratch.split_at_mut(len * head_dim);
    let (kt, rest) = rest.split_at_mut(head_dim * len);
    let (v, s) = rest.split_at_mut(len * head_dim);
    let s = &mut s[..len];
    let qo = hd * head_dim;
    let ko = hidden + qo;
    let vo = 2 * hidden + qo;
    for i in 0..len {
        let row = &qkv[(start + i) * w..(start + i + 1) * w];
        for d in 0..head_dim {
            q[i * head_dim + d] = (row[qo + d] + bias[qo + d]) * scale;
            kt[d * len + i] = row[ko + d] + bias[ko + d];
            v[i * head_dim + d] = row[vo + d] + bias[vo + d];
        }
    }
    for i in 0..len {
        s.iter_mut().for_each(|x| *x = 0.0);
        let qi = &q[i * head_dim..(i + 1) * head_dim];
        for (d, &qd) in qi.iter().enumerate() {
            let kr = &kt[d * len..(d + 1) * len];
            for (sj, &k) in s.iter_mut().zip(kr) {
                *sj += qd * k;
            }
        }
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for x in s.iter_mut() {
            *x = fast_exp(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        let orow = out(i);
        orow.fill(0.0);
        for (j, &p) in s.iter().enumerate() {
            let p = p * inv;
            let vr = &v[j * head_dim..(j + 1) * head_dim];
            for (od, &vd) in orow.iter_mut().zip(vr) {
                *od += p * vd;
            }
        }
    }
}

/// Mean over each sequence's rows (first `h` columns of `stride`-wide rows),
/// L2-normalised.
pub(crate) fn mean_pool_normalize(
    x: &[f32],
    stride: usize,
    h: usize,
    seqs: &[(usize, usize)],
) -> Vec<Vec<f32>> {
    seqs.iter()
        .map(|&(start, len)| {
            let mut acc = vec![0f32; h];
            for r in start..start + len {
                for (a, &v) in acc.iter_mut().zip(&x[r * stride..r * stride + h]) {
                    *a += v;
                }
            }
            let inv_len = 1.0 / len.max(1) as f32;
            acc.iter_mut().for_each(|a| *a *= inv_len);
            let norm = acc.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
            acc.iter_mut().for_each(|a| *a /= norm);
            acc
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_exp_are_accurate() {
        for i in -400..=400 {
            let x = i as f32 / 50.0;
            let e = libm_erf(x as f64);
            assert!(
                (erf(x) as f64 - e).abs() < 5e-7,
                "erf({x}) = {} vs {e}",
                erf(x)
            );
            if x <= 0.0 {
                let r = (x as f64).exp();
                assert!(
                    ((fast_exp(x) as f64) - r).abs() <= 1e-6 * r + 1e-30,
                    "exp({x})"
                );
            }
        }
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
    }

    // erf by its Taylor series (converges fast for |x| <= 3) and the
    // asymptotic tail; an independent reference for the test.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn attention_matches_naive() {
        let shape = AttentionShape {
            heads: 2,
            head_dim: 4,
        };
        let hidden = 8;
        let seqs = [(0usize, 3usize), (3, 1), (4, 2)];
        let rows = 6;
        let qkv: Vec<f32> = (0..rows * 3 * hidden)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0)
            .collect();
        let bias: Vec<f32> = (0..3 * hidden).map(|i| i as f32 / 100.0).collect();
        // Whatever the buffer held before (a reused one) is overwritten.
        let mut out = vec![f32::NAN; rows * 10];
        attention(&qkv, &bias, &seqs, shape, &mut out, 10);
        for &(start, len) in &seqs {
            for hd in 0..2 {
                for i in start..start + len {
                    let get = |r: usize, part: usize, d: usize| {
                        let c = part * hidden + hd * 4 + d;
                        qkv[r * 3 * hidden + c] + bias[c]
                    };
                    let scores: Vec<f64> = (start..start + len)
                        .map(|j| {
                            (0..4)
                                .map(|d| (get(i, 0, d) * get(j, 1, d)) as f64)
                                .sum::<f64>()
                                / 2.0
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for d in 0..4 {
                        let want: f64 = (start..start + len)
                            .map(|j| (scores[j - start] - m).exp() / z * get(j, 2, d) as f64)
                            .sum();
                        let got = out[i * 10 + hd * 4 + d] as f64;
                        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                    }
                }
            }
            for i in start..start + len {
                assert_eq!(&out[i * 10 + 8..i * 10 + 10], &[0.0, 0.0]);
            }
        }
    }

    #[test]
    fn layer_norm_and_pool() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut out = [0.0, 0.0, 9.0, 1.0, 1.0, 9.0];
        add_layer_norm(&x, &[0.0, 0.0], &mut out, 3, &[1.0, 1.0], &[0.0, 0.5], 0.0);
        // Row 0: [1, 2] normed; row 1: [4, 5] normed; the third column of
        // each row (the pad) is left alone.
        assert!((out[0] + 1.0).abs() < 1e-6 && (out[1] - 1.5).abs() < 1e-6 && out[2] == 9.0);
        assert!((out[3] + 1.0).abs() < 1e-6 && (out[4] - 1.5).abs() < 1e-6 && out[5] == 9.0);
        let mut g = [0.0f32, 1.0, -1.0, 2.0];
        bias_gelu(&mut g, &[0.0, 1.0], 2);
        let want = [0.0, 1.954_5, -0.158_655, 2.995_95];
        for (g, w) in g.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
        let p = mean_pool_normalize(&[2.0, 3.0, 9.0, 6.0, 3.0, 9.0], 3, 2, &[(0, 2)]);
        assert!((p[0][0] - 0.8).abs() < 1e-6 && (p[0][1] - 0.6).abs() < 1e-6);
    }
}
