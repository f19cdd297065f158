//! Matmul kernels for GGUF block formats, on raw f32 buffers.
//!
//! A decoder read from GGUF keeps its weights in the file's block types;
//! this module multiplies by them without dequantizing:
//!
//! - [`QMatrix`]: a weight matrix `[rows = outputs, cols = inputs]` of type
//!   Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, F16 or F32, built from a candle
//!   [`QTensor`](candle_core::quantized::QTensor)
//!   ([`QMatrix::from_qtensor`]) or raw block bytes ([`QMatrix::from_raw`]),
//!   repacked for the kernels at (almost) the stored size
//!   ([`resident_bytes_for`] knows it from the header).
//! - [`QMatrix::matmul`]: `y[n x rows] = x[n x cols] · Wᵀ` into a caller's
//!   slice, for `n = 1` (decode) up to hundreds (prefill), on a
//!   [`ComputePool`]; [`QMatrix::matmul_rows`] computes only some outputs;
//!   [`QMatrix::dequantize_row`] reads one row (an embedding) as f32.
//! - [`ComputePool`]: persistent threads that spin briefly, then park, with
//!   `run(n_tasks, |task| ..)` for any fork/join work (attention heads too).
//!
//! ## Arithmetic (llama.cpp's)
//! Each call quantizes the activations once: per block of 32 to int8 with
//! an f32 scale `d = max|x| / 127` and the block's `d · Σq` (32-block
//! types), or per 256 with the sums of each 16 (Q4_K, Q6_K). Each weight
//! block then takes an integer dot product with the activation block, and
//! the f32 scales (and offsets or minimums) are applied once per block. The
//! result differs from "dequantize W, multiply in f32" by the rounding of
//! the activations to int8 (a relative error of about 1e-3 of the output's
//! scale) and nothing else.
//!
//! ## Kernels ([`Kernel`])
//! - [`Kernel::Avx512Vnni`] (x86-64 with AVX-512 F/BW/VL and VNNI, detected
//!   at run time): nibbles are expanded with two instructions and fed to
//!   `vpdpbusd` (unsigned weights × signed activations: Q8_0 weights are
//!   stored as `q + 128` and the offset is taken back with the block's
//!   `Σ q_a`); several activation rows share each weight load.
//! - [`Kernel::Avx2`] (x86-64 with AVX2 and FMA, no AVX-512): Q8_0, Q4_1,
//!   Q5_0, Q4_K and Q6_K with `vpmaddubsw`/`vpmaddwd` — Q4_1 in the same
//!   order as the other two kernels (ggml's), Q8_0 as ggml's AVX2 path,
//!   Q5_0/Q4_K/Q6_K in the portable kernel's order (the same floats as
//!   it, bit for bit); Q4_0, F16 and F32 run the portable code.
//! - [`Kernel::Portable`]: the same integer arithmetic in plain Rust, on
//!   every CPU. All three are tested against candle's dequantized matmul.
//!
//! ```
//! use candle_core::{quantized::{GgmlDType, QTensor}, Device, Tensor};
//! use quant::blocks::{ComputePool, QMatrix};
//!
//! let vals: Vec<f32> = (0..96 * 256).map(|i| (i as f32 * 0.61).cos()).collect();
//! let w = Tensor::from_vec(vals, (96, 256), &Device::Cpu)?;
//! let q = QMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4K)?)?;
//! let x: Vec<f32> = (0..2 * 256).map(|i| (i as f32 * 0.37).sin()).collect();
//! let mut y = vec![0f32; 2 * 96];
//! q.matmul(&x, 2, &mut y, &ComputePool::single())?;
//! // Row 0 of W, dequantized, dotted with the first input: the same value,
//! // up to the int8 rounding of the input (each value off by at most half
//! // a step of max|x| / 127).
//! let mut row = vec![0f32; 256];
//! q.dequantize_row(0, &mut row)?;
//! let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
//! let amax = x[..256].iter().fold(0f32, |m, v| m.max(v.abs()));
//! let bound = row.iter().map(|a| a.abs()).sum::<f32>() * amax / 254.0 + 1e-4;
//! assert!((y[0] - want).abs() <= bound, "{} vs {want} (bound {bound})", y[0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod matrix;
mod pool;
mod portable;

use std::cell::RefCell;
use std::ops::Range;

pub use self::matrix::{resident_bytes_for, QMatrix};
pub use self::pool::{default_threads, ComputePool, PoolConfig};

use self::act::{quantize_row_q8_0, quantize_row_q8_k, Acts, Layout};
use self::matrix::{Ty, YPtr};
use crate::{Error, Result};

/// Which implementation a [`QMatrix`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kernel {
    /// Plain Rust, every CPU.
    Portable,
    /// x86-64 AVX-512 F/BW/VL + VNNI.
    Avx512Vnni,
    /// x86-64 AVX2 + FMA: Q8_0, Q4_1, Q5_0, Q4_K and Q6_K in SIMD; Q4_0,
    /// F16 and F32 as [`Kernel::Portable`].
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        if Kernel::Avx512Vnni.is_available() {
            Kernel::Avx512Vnni
        } else if Kernel::Avx2.is_available() {
            Kernel::Avx2
        } else {
            Kernel::Portable
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => avx512::cpu_supports(),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512Vnni => false,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::cpu_supports(),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => false,
        }
    }

    pub(crate) fn check(self) -> Result<()> {
        let (kernel, needs) = match self {
            Kernel::Portable => ("Portable", "nothing"),
            Kernel::Avx512Vnni => ("Avx512Vnni", "x86-64 with AVX-512 F, BW, VL and VNNI"),
            Kernel::Avx2 => ("Avx2", "x86-64 with AVX2 and FMA"),
        };
        if self.is_available() {
            Ok(())
        } else {
            Err(Error::KernelUnavailable { kernel, needs })
        }
    }
}

thread_local! {
    /// The calling thread's quantized activations (one per distinct form in
    /// a fused call), reused between calls.
    static ACTS: RefCell<Vec<Acts>> = const { RefCell::new(Vec::new()) };
}

/// A pointer to scratch that the pool's tasks fill in disjoint parts.
#[derive(Clone, Copy)]
struct ActsPtr(*mut Acts);
// SAFETY: tasks write disjoint rows of the buffers (see `quantize`).
unsafe impl Send for ActsPtr {}
// SAFETY: as above.
unsafe impl Sync for ActsPtr {}
impl ActsPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper).
    fn get(self) -> *mut Acts {
        self.0
    }
}

/// Activation rows per quantization task.
const QUANT_ROWS: usize = 8;

/// Quantizes the `n` rows of `x` for `ty` in `layout` into `acts`.
#[allow(clippy::too_many_arguments)]
fn quantize(
    ty: Ty,
    x: &[f32],
    n: usize,
    k: usize,
    layout: Layout,
    simd: bool,
    acts: &mut Acts,
    pool: &ComputePool,
) {
    let sup = ty.super_blocks();
    acts.reset(n, k, sup);
    let per = k / if sup { act::QKK } else { act::QK };
    let p = ActsPtr(acts);
    let rows = |i0: usize, i1: usize| {
        // SAFETY: each task takes rows `i0..i1`, disjoint from the others',
        // of buffers sized by `reset` above; `acts` outlives the pool run.
        let a = unsafe { &mut *p.get() };
        for i in i0..i1 {
            let xr = &x[i * k..(i + 1) * k];
            let qs = unsafe { std::slice::from_raw_parts_mut(a.qs.as_mut_ptr().add(i * k), k) };
            let d = unsafe { std::slice::from_raw_parts_mut(a.d.as_mut_ptr().add(i * per), per) };
            if sup {
                let bs = unsafe {
                    std::slice::from_raw_parts_mut(a.bsums.as_mut_ptr().add(i * per * 16), per * 16)
                };
                quantize_k_row(xr, layout, simd, qs, d, bs);
            } else {
                let s =
                    unsafe { std::slice::from_raw_parts_mut(a.s.as_mut_ptr().add(i * per), per) };
                quantize_0_row(xr, layout, simd, qs, d, s, ty == Ty::Q4_1);
            }
        }
    };
    if n < 2 * QUANT_ROWS {
        rows(0, n);
    } else {
        pool.run(n.div_ceil(QUANT_ROWS), |t| {
            rows(t * QUANT_ROWS, ((t + 1) * QUANT_ROWS).min(n))
        });
    }
}

fn quantize_0_row(
    x: &[f32],
    layout: Layout,
    simd: bool,
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    q8_1: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only when the CPU runs the AVX-512 kernel.
        return unsafe { avx512::quantize_row_q8_0(x, layout, qs, d, s, q8_1) };
    }
    #[cfg(target_arch = "x86_64")]
    if act::avx2::available() {
        // SAFETY: the CPU has AVX2 (checked).
        return unsafe { act::avx2::quantize_row_q8_0(x, layout, qs, d, s, q8_1) };
    }
    let _ = simd;
    quantize_row_q8_0(x, layout, qs, d, s, q8_1)
}

fn quantize_k_row(
    x: &[f32],
    layout: Layout,
    simd: bool,
    qs: &mut [i8],
    d: &mut [f32],
    bs: &mut [i16],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `quantize_0_row`.
        return unsafe { avx512::quantize_row_q8_k(x, layout, qs, d, bs) };
    }
    #[cfg(target_arch = "x86_64")]
    if act::avx2::available() {
        // SAFETY: the CPU has AVX2 (checked).
        return unsafe { act::avx2::quantize_row_q8_k(x, layout, qs, d, bs) };
    }
    let _ = simd;
    quantize_row_q8_k(x, layout, qs, d, bs)
}

/// Weight rows per task: about four tasks per thread for balance, at least
/// [`MIN_ROWS_PER_TASK`] so a task amortises its start.
const MIN_ROWS_PER_TASK: usize = 16;

/// How a matrix wants its activations: `None` for F32/F16 (the f32 rows as
/// they are), else the quantized form's (layout, super-blocks, Q8_1 sums,
/// SIMD quantizer). Matrices with equal keys share one quantization.
type ActKey = Option<(Layout, bool, bool, bool)>;

/// The kernel a matrix runs and the activations it needs.
#[derive(Clone, Copy)]
struct Plan {
    simd: bool,
    #[cfg(target_arch = "x86_64")]
    avx2: bool,
    key: ActKey,
}

fn plan(m: &QMatrix) -> Plan {
    #[cfg(target_arch = "x86_64")]
    let simd = m.kernel == Kernel::Avx512Vnni && avx512::supports(m.ty);
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    #[cfg(target_arch = "x86_64")]
    let avx2 = m.kernel == Kernel::Avx2 && avx2::supports(m.ty);
    let key = if matches!(m.ty, Ty::F32 | Ty::F16) {
        None
    } else {
        let layout = if simd {
            m.ty.simd_layout()
        } else {
            Layout::Natural
        };
        Some((layout, m.ty.super_blocks(), m.ty == Ty::Q4_1, simd))
    };
    Plan {
        simd,
        #[cfg(target_arch = "x86_64")]
        avx2,
        key,
    }
}

/// One matrix of a (fused) matmul: its output rows and where they go.
pub(crate) struct Part<'a> {
    pub(crate) m: &'a QMatrix,
    pub(crate) rows: Range<usize>,
    pub(crate) y: &'a mut [f32],
}

/// Distinct activation quantizations one fused call can hold.
const MAX_KEYS: usize = 4;

/// The body of [`QMatrix::matmul_rows`] (arguments checked).
pub(crate) fn run_matmul(
    m: &QMatrix,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    y: &mut [f32],
    pool: &ComputePool,
) {
    run_parts(&mut [Part { m, rows, y }], x, n, pool);
}

/// Runs several matmuls of the same input as one job of the pool: the
/// activations are quantized once per distinct [`ActKey`], and the tasks of
/// every part are claimed from one counter, so the threads meet once at the
/// end instead of once per matrix. Each output value is computed exactly as
/// by a lone call (the same kernel on the same activations).
///
/// Arguments are checked by the callers: every part's `m.cols * n ==
/// x.len()`, `rows` inside `m`, `y.len() == n * rows.len()`, `n > 0`.
pub(crate) fn run_parts(parts: &mut [Part<'_>], x: &[f32], n: usize, pool: &ComputePool) {
    if parts.is_empty() {
        return;
    }
    // Keys beyond MAX_KEYS run as a separate call.
    let plans: Vec<Plan> = parts.iter().map(|p| plan(p.m)).collect();
    let mut keys: Vec<(Ty, ActKey)> = Vec::with_capacity(MAX_KEYS);
    let mut slot = Vec::with_capacity(parts.len());
    for (p, pl) in parts.iter().zip(&plans) {
        let found = keys.iter().position(|(_, k)| *k == pl.key);
        match found {
            Some(i) => slot.push(i),
            None if keys.len() < MAX_KEYS => {
                keys.push((p.m.ty, pl.key));
                slot.push(keys.len() - 1);
            }
            None => {
                let (head, tail) = parts.split_at_mut(slot.len());
                run_parts(head, x, n, pool);
                run_parts(tail, x, n, pool);
                return;
            }
        }
    }

    let total: usize = parts.iter().map(|p| p.rows.len()).sum();
    let per_task = total.div_ceil(4 * pool.threads()).max(MIN_ROWS_PER_TASK);
    // (part, first row, end row) of each task.
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    let outs: Vec<YPtr> = parts
        .iter_mut()
        .map(|p| YPtr {
            ptr: p.y.as_mut_ptr(),
            stride: p.rows.len(),
            col0: p.rows.start,
        })
        .collect();
    for (i, p) in parts.iter().enumerate() {
        let mut j = p.rows.start;
        while j < p.rows.end {
            let e = (j + per_task).min(p.rows.end);
            tasks.push((i, j, e));
            j = e;
        }
    }

    ACTS.with(|cell| {
        let mut guard = cell.try_borrow_mut();
        let mut own;
        let all: &mut Vec<Acts> = match guard.as_deref_mut() {
            Ok(a) => a,
            // Re-entered on this thread (cannot happen through the public
            // API, kept safe anyway): fresh buffers.
            Err(_) => {
                own = Vec::new();
                &mut own
            }
        };
        if all.len() < keys.len() {
            all.resize_with(keys.len(), Acts::default);
        }
        for (a, &(ty, key)) in all.iter_mut().zip(&keys) {
            if let Some((layout, _, _, simd)) = key {
                let k = parts[0].m.cols;
                quantize(ty, x, n, k, layout, simd, a, pool);
            }
        }
        let all: &[Acts] = all;
        let parts: &[Part<'_>] = parts;
        pool.run(tasks.len(), |t| {
            let (i, j0, j1) = tasks[t];
            let m = parts[i].m;
            let acts = &all[slot[i]];
            let out = outs[i];
            let js = j0..j1;
            #[cfg(target_arch = "x86_64")]
            if plans[i].simd {
                // SAFETY: `supports` checked the CPU; sizes were checked by
                // the caller; tasks write disjoint columns of `y`.
                unsafe { avx512::tile(m, x, acts, n, js, out) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if plans[i].avx2 {
                // SAFETY: `Kernel::Avx2` is set only where the CPU has AVX2
                // and FMA (`with_kernel` checks); `supports` checked the
                // type; the activations are in natural order (`simd` is
                // false); tasks write disjoint columns of `y`.
                unsafe { avx2::tile(m, acts, n, js, out) };
                return;
            }
            m.portable_tile(x, acts, 0, n, js, out);
        });
    });
}

#[cfg(test)]
mod tests;
