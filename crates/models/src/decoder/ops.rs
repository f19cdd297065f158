//! Row-wise f32 kernels of the decoder's forward pass.
//!
//! They run on the decoder's [`ComputePool`](quant::blocks::ComputePool)
//! (the threads that run the matmuls, spinning between them), and inline
//! on the caller when the work is one task's worth: a decode step's few rows
//! cost less than any hand-off to another thread.

use super::linear::pool;
use super::numerics;

/// f32 values per parallel task (below twice this, the caller does it all).
const FLOATS_PER_TASK: usize = 8192;

/// Runs `f` over `chunk`-long pieces of `x` (the last may be shorter), on
/// the compute pool when there is more than one task's worth.
fn for_chunks(x: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let chunk = chunk.max(1);
    let n = x.len().div_ceil(chunk);
    if n <= 1 {
        if !x.is_empty() {
            f(0, x);
        }
        return;
    }
    let len = x.len();
    let p = SyncMut(x.as_mut_ptr());
    let p = &p;
    pool().run(n, |t| {
        let start = t * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: task t alone takes elements start..end of `x`, which
        // outlives the pool run.
        let piece = unsafe { std::slice::from_raw_parts_mut(p.0.add(start), end - start) };
        f(t, piece);
    });
}

struct SyncMut(*mut f32);
// SAFETY: tasks touch disjoint ranges (see `for_chunks`).
unsafe impl Sync for SyncMut {}

/// Elements per task for rows of width `d`: whole rows, about
/// [`FLOATS_PER_TASK`] values.
fn rows_chunk(d: usize) -> usize {
    d.max(1) * (FLOATS_PER_TASK / d.max(1)).max(1)
}

/// `out[r] = x[r] / rms(x[r]) * w` for each row of width `w.len()`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let chunk = rows_chunk(d);
    for_chunks(out, chunk, |t, o| {
        let x = &x[t * chunk..t * chunk + o.len()];
        for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            norm_row(x, w, eps, o);
        }
    });
}

/// In-place RMSNorm of every `w.len()`-wide piece of `x` (per-head norms).
pub(crate) fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for_chunks(x, rows_chunk(d), |_, x| {
        for row in x.chunks_exact_mut(d) {
            let s = inv_rms(row, eps);
            for (v, w) in row.iter_mut().zip(w) {
                *v = *v * s * w;
            }
        }
    });
}

/// `1 / sqrt(mean(x²) + eps)`, the squares summed in f64 (as llama.cpp's
/// CPU backend does, so both round the same way).
#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|v| f64::from(v * v)).sum();
    let mean = (ss / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

#[inline]
fn norm_row(x: &[f32], w: &[f32], eps: f32, o: &mut [f32]) {
    let s = inv_rms(x, eps);
    for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
        *o = x * s * w;
    }
}

/// `x += y`.
pub(crate) fn add_inplace(x: &mut [f32], y: &[f32]) {
    for_chunks(x, 4 * FLOATS_PER_TASK, |t, x| {
        let y = &y[t * 4 * FLOATS_PER_TASK..];
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    });
}

/// `g = silu(g) * u` (llama.cpp's numerics: [`numerics::silu_mul`]).
pub(crate) fn silu_mul(g: &mut [f32], u: &[f32]) {
    for_chunks(g, FLOATS_PER_TASK, |t, g| {
        let u = &u[t * FLOATS_PER_TASK..t * FLOATS_PER_TASK + g.len()];
        numerics::silu_mul(g, u)
    });
}

/// `g = gelu_tanh(g) * u` (llama.cpp's numerics: [`numerics::gelu_mul`]).
pub(crate) fn gelu_mul(g: &mut [f32], u: &[f32]) {
    for_chunks(g, FLOATS_PER_TASK, |t, g| {
        let u = &u[t * FLOATS_PER_TASK..t * FLOATS_PER_TASK + g.len()];
        numerics::gelu_mul(g, u)
    });
}

/// RoPE angles for a set of positions: `cos`/`sin` tables of
/// `positions.len() x rope_dims/2`, as llama.cpp computes them
/// ([`numerics::RopeCache`]).
#[derive(Debug, Default)]
pub(crate) struct RopeTable(numerics::RopeCache);

impl RopeTable {
    /// Fills the table for `positions` with base `base` over `rope_dims`.
    pub(crate) fn fill(&mut self, positions: &[usize], rope_dims: usize, base: f32) {
        self.0.fill(positions, rope_dims, base);
    }

    /// Rotates every head of every row of `x` (`rows x n_heads*head_dim`).
    pub(crate) fn apply(&self, x: &mut [f32], head_dim: usize, adjacent: bool) {
        let c = &self.0;
        let half = c.half;
        let n_rows = c.cos.len() / half.max(1);
        let width = x.len() / n_rows.max(1);
        if width == 0 {
            return;
        }
        let chunk = rows_chunk(width);
        let per = chunk / width;
        for_chunks(x, chunk, |t, rows| {
            for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                let r = t * per + i;
                let cos = &c.cos[r * half..(r + 1) * half];
                let sin = &c.sin[r * half..(r + 1) * half];
                numerics::rope_rows(row, head_dim, cos, sin, adjacent);
            }
        });
    }
}

#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators so that the loop vectorises without -ffast-math.
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((a, x), y) in acc.iter_mut().zip(x).zip(y) {
            *a += x * y;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a * x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norms() {
        let mut t = RopeTable::default();
        t.fill(&[0, 3], 4, 10_000.0);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        t.apply(&mut x, 4, true);
        // Position 0 is the identity.
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        // Position 3, pair 0 rotated by 3 rad.
        let (s, c) = 3f32.sin_cos();
        assert!((x[4] - (c - 2.0 * s)).abs() < 1e-5);
        assert!((x[5] - (s + 2.0 * c)).abs() < 1e-5);
        let n0: f32 = x[..4].iter().map(|v| v * v).sum();
        let n1: f32 = x[4..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut o = [0f32; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut o);
        let rms = (o.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }
}
