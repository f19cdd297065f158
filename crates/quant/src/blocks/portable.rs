//! Portable kernels: the same integer arithmetic as the SIMD kernels, one
//! block at a time in plain Rust, on activations in [`Layout::Natural`]
//! order. They run on every CPU and are the reference the SIMD kernels are
//! tested against.
//!
//! [`Layout::Natural`]: super::act::Layout::Natural

use super::act::{Acts, QK, QKK};
use super::matrix::{QMatrix, Ty};
use crate::vnni::f16_to_f32;

/// Σ of `a[t] · b[t]` over 32 values.
#[inline]
fn idot(w: &[i32; 32], a: &[i8]) -> i32 {
    w.iter().zip(a).map(|(&w, &a)| w * a as i32).sum()
}

/// The 32 values of 4-bit block `wb` (GGUF order: the low nibbles are
/// values 0..16, the high ones 16..32) as unsigned ints.
#[inline]
fn unpack_nibbles(m: &QMatrix, wb: usize, w: &mut [i32; 32]) {
    let qs = &m.qs[wb * 16..wb * 16 + 16];
    for t in 0..16 {
        w[t] = (qs[t] & 0xf) as i32;
        w[t + 16] = (qs[t] >> 4) as i32;
    }
}

/// Weight row `j` · activation row `i` (`x` for F16/F32, `acts` otherwise).
pub(crate) fn dot(m: &QMatrix, j: usize, x: &[f32], acts: &Acts, i: usize) -> f32 {
    let k = m.cols;
    let nb = m.nb();
    let h = f16_to_f32;
    match m.ty {
        Ty::F32 => {
            let w = &m.f[j * k..(j + 1) * k];
            w.iter()
                .zip(&x[i * k..(i + 1) * k])
                .map(|(a, b)| a * b)
                .sum()
        }
        Ty::F16 => {
            let w = &m.d[j * k..(j + 1) * k];
            w.iter()
                .zip(&x[i * k..(i + 1) * k])
                .map(|(&a, b)| h(a) * b)
                .sum()
        }
        Ty::Q4_1 => q4_1_ggml(m, j, acts, i),
        Ty::Q4_0 | Ty::Q5_0 | Ty::Q8_0 => {
            let qa = &acts.qs[i * k..(i + 1) * k];
            let (da, sa) = (&acts.d[i * nb..(i + 1) * nb], &acts.s[i * nb..(i + 1) * nb]);
            let mut sum = 0f32;
            let mut w = [0i32; 32];
            for b in 0..nb {
                let wb = j * nb + b;
                let dw = h(m.d[wb]);
                // Values as unsigned ints `u`, the weight being `dw · u + off`.
                let off = match m.ty {
                    Ty::Q8_0 => {
                        for (t, v) in w.iter_mut().enumerate() {
                            *v = m.qs[wb * 32 + t] as i32;
                        }
                        -128.0 * dw
                    }
                    ty => {
                        unpack_nibbles(m, wb, &mut w);
                        match ty {
                            Ty::Q4_0 => -8.0 * dw,
                            _ => {
                                let bits = m.q5_bits(j, b);
                                for (t, v) in w.iter_mut().enumerate() {
                                    *v |= (((bits >> t) & 1) << 4) as i32;
                                }
                                -16.0 * dw
                            }
                        }
                    }
                };
                let q = idot(&w, &qa[b * QK..(b + 1) * QK]);
                sum += dw * da[b] * q as f32 + off * sa[b];
            }
            sum
        }
        Ty::Q4K => {
            let qa = &acts.qs[i * k..(i + 1) * k];
            let mut sum = 0f32;
            let mut w = [0i32; 32];
            for b in 0..nb {
                let wb = j * nb + b;
                let da = acts.d[i * nb + b];
                let bs = &acts.bsums[(i * nb + b) * 16..(i * nb + b + 1) * 16];
                let sc = &m.sc[wb * 16..wb * 16 + 16];
                let qs = &m.qs[wb * 128..wb * 128 + 128];
                let a = &qa[b * QKK..(b + 1) * QKK];
                let (mut dots, mut mins) = (0i32, 0i32);
                for sub in 0..8 {
                    let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
                    for (t, v) in w.iter_mut().enumerate() {
                        *v = if sub % 2 == 0 {
                            bytes[t] & 0xf
                        } else {
                            bytes[t] >> 4
                        } as i32;
                    }
                    dots += sc[sub] as i32 * idot(&w, &a[32 * sub..32 * sub + 32]);
                    mins += sc[8 + sub] as i32 * (bs[2 * sub] as i32 + bs[2 * sub + 1] as i32);
                }
                sum += da * (h(m.d[wb]) * dots as f32 - h(m.m[wb]) * mins as f32);
            }
            sum
        }
        Ty::Q6K => {
            let qa = &acts.qs[i * k..(i + 1) * k];
            let mut sum = 0f32;
            for b in 0..nb {
                let wb = j * nb + b;
                let da = acts.d[i * nb + b];
                let bs = &acts.bsums[(i * nb + b) * 16..(i * nb + b + 1) * 16];
                let a = &qa[b * QKK..(b + 1) * QKK];
                let mut total = 0i32;
                for half in 0..2 {
                    let ql = &m.qs[wb * 128 + 64 * half..];
                    let qh = &m.qh[wb * 64 + 32 * half..];
                    let sc = &m.sc[wb * 16 + 8 * half..];
                    let a = &a[128 * half..];
                    // Per 16-group (natural order) Σ u · a with u = q + 32.
                    let mut g = [0i32; 8];
                    for l in 0..32 {
                        let u1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32;
                        let u2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32;
                        let u3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32;
                        let u4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32;
                        g[l / 16] += u1 * a[l] as i32;
                        g[2 + l / 16] += u2 * a[l + 32] as i32;
                        g[4 + l / 16] += u3 * a[l + 64] as i32;
                        g[6 + l / 16] += u4 * a[l + 96] as i32;
                    }
                    for (t, &gt) in g.iter().enumerate() {
                        let s = sc[t] as i8 as i32;
                        total += s * (gt - 32 * bs[8 * half + t] as i32);
                    }
                }
                sum += h(m.d[wb]) * da * total as f32;
            }
            sum
        }
    }
}

/// Q4_1 weight row `j` · activation row `i`, summed in the order of
/// ggml's `ggml_vec_dot_q4_1_q8_1` (its AVX2 path, which the AVX-512 kernel
/// follows too): eight f32 lanes, lane `l` taking each block's integer dot
/// of values `4l..4l + 4` scaled by `d_w · d_a` in one FMA; the minimums
/// `m_w · s_a` summed by scalar FMA; the lanes folded as `hsum_float_8`
/// does ((l + l+4), then (0 + 2) and (1 + 3), then the two). So every CPU
/// computes the same floats as llama.cpp for Q4_1 weights, not only those
/// with AVX-512.
fn q4_1_ggml(m: &QMatrix, j: usize, acts: &Acts, i: usize) -> f32 {
    let (k, nb) = (m.cols, m.nb());
    let qa = &acts.qs[i * k..(i + 1) * k];
    let (da, sa) = (&acts.d[i * nb..(i + 1) * nb], &acts.s[i * nb..(i + 1) * nb]);
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    let mut w = [0i32; 32];
    for b in 0..nb {
        let wb = j * nb + b;
        unpack_nibbles(m, wb, &mut w);
        summs = f16_to_f32(m.m[wb]).mul_add(sa[b], summs);
        let dd = f16_to_f32(m.d[wb]) * da[b];
        let a = &qa[b * QK..(b + 1) * QK];
        for (l, acc) in acc.iter_mut().enumerate() {
            let q: i32 = (4 * l..4 * l + 4).map(|t| w[t] * a[t] as i32).sum();
            *acc = dd.mul_add(q as f32, *acc);
        }
    }
    let s: [f32; 4] = std::array::from_fn(|l| acc[l] + acc[l + 4]);
    let (s0, s1) = (s[0] + s[2], s[1] + s[3]);
    s0 + s1 + summs
}
