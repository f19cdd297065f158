//! The kernels against candle's dequantization.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};

use super::*;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len)
        .map(|i| {
            // Mixed magnitudes per 32 values, a zero block now and then.
            let scale = [1.0f32, 0.01, 7.0, 0.0, 0.3][(i / 32) % 5];
            (rng.random::<f32>() - 0.5) * 2.0 * scale
        })
        .collect()
}

const TYPES: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
    GgmlDType::F16,
    GgmlDType::F32,
];

fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QTensor, Vec<f32>) {
    let w = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (q, deq)
}

/// `x · Wᵀ` in f64 from candle's dequantized weights.
fn reference(deq: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f64> {
    let mut y = vec![0f64; n * rows];
    for i in 0..n {
        for j in 0..rows {
            y[i * rows + j] = (0..cols)
                .map(|t| deq[j * cols + t] as f64 * x[i * cols + t] as f64)
                .sum();
        }
    }
    y
}

/// (max |got - want| / max |want|, rms(got - want) / rms(want)).
fn errors(got: &[f32], want: &[f64]) -> (f64, f64) {
    let scale = want.iter().fold(1e-30f64, |a, v| a.max(v.abs()));
    let max = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    let e2: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let w2: f64 = want.iter().map(|w| w * w).sum::<f64>().max(1e-30);
    (max / scale, (e2 / w2).sqrt())
}

fn shapes(dtype: GgmlDType) -> Vec<(usize, usize)> {
    match dtype {
        // Whole super-blocks only.
        GgmlDType::Q4K | GgmlDType::Q6K => vec![(45, 256), (17, 768), (64, 2048), (3, 1024)],
        // 3 blocks (no whole group of 4), 18 (4 groups + 2: SmolLM2's
        // 576), 20 (Gemma's 640), 48.
        _ => vec![(45, 96), (33, 576), (64, 640), (7, 1536), (1, 32)],
    }
}

fn pools() -> Vec<ComputePool> {
    vec![
        ComputePool::single(),
        ComputePool::new(&PoolConfig {
            threads: Some(3),
            spin_us: 50,
        })
        .unwrap(),
    ]
}

#[test]
fn dequantize_row_equals_candle() {
    for dtype in TYPES {
        for (rows, cols) in shapes(dtype) {
            let (q, deq) = quantized(dtype, rows, cols, 11);
            let m = QMatrix::from_qtensor(&q).unwrap();
            let mut row = vec![0f32; cols];
            for r in [0, rows / 2, rows - 1] {
                m.dequantize_row(r, &mut row).unwrap();
                for (t, (a, b)) in row.iter().zip(&deq[r * cols..(r + 1) * cols]).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs(),
                        "{dtype:?} {rows}x{cols} row {r} value {t}: {a} vs candle {b}"
                    );
                }
            }
        }
    }
}

/// Every kernel this CPU runs, against candle's dequantized matmul, within
/// the error that rounding the activations to int8 brings.
fn check_kernel(kernel: Kernel) {
    let pools = pools();
    for dtype in TYPES {
        for (rows, cols) in shapes(dtype) {
            let (q, deq) = quantized(dtype, rows, cols, 5);
            let m = QMatrix::from_qtensor(&q)
                .unwrap()
                .with_kernel(kernel)
                .unwrap();
            for n in [1usize, 3, 8, 37] {
                let x = random(n * cols, 7 + n as u64);
                let want = reference(&deq, rows, cols, &x, n);
                let mut y = vec![f32::NAN; n * rows];
                m.matmul(&x, n, &mut y, &pools[n % 2]).unwrap();
                let (max, rms) = errors(&y, &want);
                let (tol_max, tol_rms) = match dtype {
                    GgmlDType::F32 | GgmlDType::F16 => (1e-5, 1e-5),
                    _ => (2e-2, 1e-2),
                };
                assert!(
                    max < tol_max && rms < tol_rms,
                    "{kernel:?} {dtype:?} {rows}x{cols} n={n}: max error {max:.2e}, rms {rms:.2e} (of the output's scale)"
                );
            }
        }
    }
}

#[test]
fn portable_kernel_matches_candle() {
    check_kernel(Kernel::Portable);
}

#[test]
fn avx2_kernel_matches_candle() {
    if !Kernel::Avx2.is_available() {
        eprintln!("SKIPPED avx2_kernel_matches_candle: this CPU lacks AVX2 and FMA");
        return;
    }
    check_kernel(Kernel::Avx2);
}

#[test]
fn avx512_kernel_matches_candle() {
    if !Kernel::Avx512Vnni.is_available() {
        eprintln!("SKIPPED avx512_kernel_matches_candle: this CPU lacks AVX-512 F/BW/VL/VNNI");
        return;
    }
    check_kernel(Kernel::Avx512Vnni);
}

/// Both kernels do the same integer arithmetic: equal to f32 rounding.
#[test]
fn avx512_kernel_equals_portable() {
    if !Kernel::Avx512Vnni.is_available() {
        eprintln!("SKIPPED avx512_kernel_equals_portable: this CPU lacks AVX-512 F/BW/VL/VNNI");
        return;
    }
    kernel_equals_portable(Kernel::Avx512Vnni);
}

/// The AVX2 kernel too (Q4_1, Q8_0, Q5_0, Q4_K and Q6_K in SIMD, F16/F32
/// and Q4_0 portable).
#[test]
fn avx2_kernel_equals_portable() {
    if !Kernel::Avx2.is_available() {
        eprintln!("SKIPPED avx2_kernel_equals_portable: this CPU lacks AVX2 and FMA");
        return;
    }
    kernel_equals_portable(Kernel::Avx2);
}

fn kernel_equals_portable(kernel: Kernel) {
    let pool = ComputePool::new(&PoolConfig {
        threads: Some(2),
        spin_us: 50,
    })
    .unwrap();
    for dtype in TYPES {
        for (rows, cols) in shapes(dtype) {
            let (q, _) = quantized(dtype, rows, cols, 9);
            let fast = QMatrix::from_qtensor(&q)
                .unwrap()
                .with_kernel(kernel)
                .unwrap();
            let slow = QMatrix::from_qtensor(&q)
                .unwrap()
                .with_kernel(Kernel::Portable)
                .unwrap();
            for n in [1usize, 2, 5, 13] {
                let x = random(n * cols, 3 + n as u64);
                let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                fast.matmul(&x, n, &mut a, &pool).unwrap();
                slow.matmul(&x, n, &mut b, &pool).unwrap();
                let want: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                let (max, _) = errors(&a, &want);
                assert!(max < 1e-5, "{dtype:?} {rows}x{cols} n={n}: {max:.2e}");
            }
        }
    }
}

/// The types whose AVX2 kernels sum in the portable kernel's order.
const AVX2_EXACT: [GgmlDType; 3] = [GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K];

/// Shapes for them: Q5_0 with 1, 3, 9 (a group of eight blocks and one, two
/// groups of four and one), 18, 20 (Gemma's 640) and 64 (2048) blocks per
/// row; the K types with 1 to 8 super-blocks; row counts that are not
/// multiples of the pool's rows per task.
fn avx2_exact_shapes(dtype: GgmlDType) -> Vec<(usize, usize)> {
    match dtype {
        GgmlDType::Q5_0 => vec![
            (7, 32),
            (45, 96),
            (19, 288),
            (33, 576),
            (64, 640),
            (37, 2048),
        ],
        _ => vec![(45, 256), (17, 768), (3, 1024), (37, 2048)],
    }
}

/// Activation rows: one (decode), odd counts, whole and partial groups of
/// the kernels' four.
const AVX2_EXACT_NS: [usize; 7] = [1, 2, 3, 4, 5, 8, 17];

/// The AVX2 Q5_0, Q4_K and Q6_K kernels give the portable kernel's floats
/// bit for bit: the integer dot products are exact whatever the order, and
/// the f32 scaling (per block for Q5_0, per super-block for the K types) is
/// done with the same operations in the same order.
#[test]
fn avx2_q5_0_q4k_q6k_equal_portable_bit_for_bit() {
    if !Kernel::Avx2.is_available() {
        eprintln!(
            "SKIPPED avx2_q5_0_q4k_q6k_equal_portable_bit_for_bit: this CPU lacks AVX2 and FMA"
        );
        return;
    }
    let pools = pools();
    for dtype in AVX2_EXACT {
        for (rows, cols) in avx2_exact_shapes(dtype) {
            let (q, _) = quantized(dtype, rows, cols, 13);
            let fast = QMatrix::from_qtensor(&q)
                .unwrap()
                .with_kernel(Kernel::Avx2)
                .unwrap();
            let slow = QMatrix::from_qtensor(&q)
                .unwrap()
                .with_kernel(Kernel::Portable)
                .unwrap();
            for n in AVX2_EXACT_NS {
                let x = random(n * cols, 60 + n as u64);
                let (mut a, mut b) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
                fast.matmul(&x, n, &mut a, &pools[n % 2]).unwrap();
                slow.matmul(&x, n, &mut b, &pools[n % 2]).unwrap();
                for (t, (g, w)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{dtype:?} {rows}x{cols} n={n} row {} col {}: {g} vs portable {w}",
                        t / rows,
                        t % rows
                    );
                }
            }
        }
    }
}

/// The AVX2 Q5_0, Q4_K and Q6_K kernels against candle: its dequantized
/// weights in f64 and its `QMatMul::forward` (which quantizes the
/// activations as ggml does), within the tolerance of `check_kernel`.
#[test]
fn avx2_q5_0_q4k_q6k_match_candle() {
    if !Kernel::Avx2.is_available() {
        eprintln!("SKIPPED avx2_q5_0_q4k_q6k_match_candle: this CPU lacks AVX2 and FMA");
        return;
    }
    let pools = pools();
    for dtype in AVX2_EXACT {
        for (rows, cols) in avx2_exact_shapes(dtype) {
            let (q, deq) = quantized(dtype, rows, cols, 17);
            let m = QMatrix::from_qtensor(&q)
                .unwrap()
                .with_kernel(Kernel::Avx2)
                .unwrap();
            let qmm = QMatMul::from_qtensor(q).unwrap();
            for n in AVX2_EXACT_NS {
                let x = random(n * cols, 80 + n as u64);
                let mut y = vec![f32::NAN; n * rows];
                m.matmul(&x, n, &mut y, &pools[n % 2]).unwrap();
                let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
                let theirs: Vec<f64> = qmm
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect();
                let want = reference(&deq, rows, cols, &x, n);
                for (what, want) in [("dequantized", &want), ("QMatMul", &theirs)] {
                    let (max, rms) = errors(&y, want);
                    assert!(
                        max < 2e-2 && rms < 1e-2,
                        "{dtype:?} {rows}x{cols} n={n} vs candle {what}: max error {max:.2e}, rms {rms:.2e}"
                    );
                }
            }
        }
    }
}

/// The AVX2 kernels' f16 → f32 conversion of 1, 4 or 8 scales at a time
/// gives `f16_to_f32`'s bits for all 65536 values (subnormals, infinities
/// and NaNs included).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_f16_conversion_equals_scalar() {
    if !Kernel::Avx2.is_available() {
        eprintln!("SKIPPED avx2_f16_conversion_equals_scalar: this CPU lacks AVX2 and FMA");
        return;
    }
    let all: Vec<u16> = (0..=u16::MAX).collect();
    for (c, h) in all.chunks_exact(8).enumerate() {
        // SAFETY: the CPU has AVX2 (checked above); 8 values at `h`.
        let v = unsafe {
            [
                avx2::f16s_to_f32::<8>(h.as_ptr()),
                avx2::f16s_to_f32::<4>(h.as_ptr()),
                avx2::f16s_to_f32::<1>(h.as_ptr()),
            ]
        };
        for (g, v) in [8usize, 4, 1].into_iter().zip(v) {
            let mut lanes = [0f32; 8];
            // SAFETY: an 8-lane array; AVX2 checked above.
            unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v) };
            for (t, &l) in lanes.iter().enumerate() {
                let want = if t < g {
                    crate::vnni::f16_to_f32(h[t]).to_bits()
                } else {
                    0
                };
                assert_eq!(l.to_bits(), want, "G={g}, f16 {:#06x}", 8 * c + t);
            }
        }
    }
}

#[test]
fn some_rows_equal_the_full_product() {
    let pool = ComputePool::single();
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q6K, GgmlDType::Q4_1] {
        let (rows, cols) = (70, 512);
        let (q, _) = quantized(dtype, rows, cols, 2);
        let m = QMatrix::from_qtensor(&q).unwrap();
        let n = 3;
        let x = random(n * cols, 4);
        let mut full = vec![0f32; n * rows];
        m.matmul(&x, n, &mut full, &pool).unwrap();
        let mut part = vec![0f32; n * 9];
        m.matmul_rows(&x, n, 20..29, &mut part, &pool).unwrap();
        for i in 0..n {
            assert_eq!(
                &part[i * 9..(i + 1) * 9],
                &full[i * rows + 20..i * rows + 29]
            );
        }
    }
}

/// The kernels this CPU runs (the portable one always).
fn kernels_here() -> Vec<Kernel> {
    [Kernel::Portable, Kernel::Avx2, Kernel::Avx512Vnni]
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
}

/// A fused call gives each matrix exactly what a lone call gives it, with
/// matrices of mixed types (so several forms of the activations), kernels
/// and row counts, on one thread and on several.
#[test]
fn matmul_many_equals_separate_matmuls_bit_for_bit() {
    let kernels = kernels_here();
    let cols = 512;
    let specs = [
        (GgmlDType::Q4_1, 70),
        (GgmlDType::Q8_0, 3),
        (GgmlDType::Q4K, 33),
        (GgmlDType::Q6K, 129),
        (GgmlDType::Q5_0, 16),
        (GgmlDType::F16, 5),
        (GgmlDType::Q4_1, 1),
    ];
    for pool in pools() {
        for ki in 0..kernels.len() {
            // Each matrix on this kernel, or on the next one (mixed kernels).
            let mats: Vec<QMatrix> = specs
                .iter()
                .enumerate()
                .map(|(i, &(dtype, rows))| {
                    let (q, _) = quantized(dtype, rows, cols, 30 + i as u64);
                    let k = kernels[(ki + i % 2) % kernels.len()];
                    QMatrix::from_qtensor(&q).unwrap().with_kernel(k).unwrap()
                })
                .collect();
            for n in [1, 4, 7, 20] {
                let x = random(n * cols, 40 + n as u64);
                let want: Vec<Vec<f32>> = mats
                    .iter()
                    .map(|m| {
                        let mut y = vec![0f32; n * m.rows()];
                        m.matmul(&x, n, &mut y, &pool).unwrap();
                        y
                    })
                    .collect();
                let mut got: Vec<Vec<f32>> =
                    mats.iter().map(|m| vec![f32::NAN; n * m.rows()]).collect();
                let refs: Vec<&QMatrix> = mats.iter().collect();
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|v| &mut v[..]).collect();
                QMatrix::matmul_many(&refs, &x, n, &mut outs, &pool).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "matrix {i} ({:?}) n {n} kernel {:?}",
                        specs[i].0,
                        mats[i].kernel()
                    );
                }
            }
        }
    }
}

/// A lone activation row (a decode step, where the SIMD kernels take
/// several weight rows at once) gets the same floats as the same row in a
/// batch of two (one weight row at a time), on every kernel this CPU runs.
#[test]
fn one_activation_row_equals_its_row_in_a_batch_bit_for_bit() {
    let pool = ComputePool::single();
    for kernel in kernels_here() {
        for dtype in TYPES {
            for (rows, cols) in shapes(dtype) {
                let (q, _) = quantized(dtype, rows, cols, 61);
                let m = QMatrix::from_qtensor(&q)
                    .unwrap()
                    .with_kernel(kernel)
                    .unwrap();
                let x = random(2 * cols, 62);
                let mut one = vec![0f32; rows];
                m.matmul(&x[..cols], 1, &mut one, &pool).unwrap();
                let mut two = vec![0f32; 2 * rows];
                m.matmul(&x, 2, &mut two, &pool).unwrap();
                for (j, (a, b)) in one.iter().zip(&two[..rows]).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{kernel:?} {dtype:?} {rows}x{cols} row {j}: {a} alone, {b} in a batch"
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_many_rejects_mismatched_buffers() {
    let pool = ComputePool::single();
    let a = QMatrix::from_raw(GgmlDType::Q8_0, 2, 64, &[0; 136]).unwrap();
    let b = QMatrix::from_raw(GgmlDType::Q8_0, 2, 32, &[0; 68]).unwrap();
    let x = [0.0f32; 64];
    let (mut ya, mut yb) = ([0f32; 2], [0f32; 2]);
    let err = QMatrix::matmul_many(&[&a, &b], &x, 1, &mut [&mut ya, &mut yb], &pool).unwrap_err();
    assert!(err.to_string().contains("matrix columns has 32"), "{err}");
    let err = QMatrix::matmul_many(&[&a, &a], &x, 1, &mut [&mut ya[..]], &pool).unwrap_err();
    assert!(err.to_string().contains("outputs has 1"), "{err}");
    let err = QMatrix::matmul_many(&[&a], &x, 1, &mut [&mut yb[..1]], &pool).unwrap_err();
    assert!(err.to_string().contains("needs 2"), "{err}");
    let err = QMatrix::matmul_many(&[&a], &x[..63], 1, &mut [&mut ya[..]], &pool).unwrap_err();
    assert!(err.to_string().contains("63"), "{err}");
}

#[test]
fn resident_bytes_known_from_the_header() {
    for dtype in TYPES {
        for (rows, cols) in shapes(dtype) {
            let (q, _) = quantized(dtype, rows, cols, 1);
            let m = QMatrix::from_qtensor(&q).unwrap();
            assert_eq!(
                m.resident_bytes(),
                resident_bytes_for(dtype, rows, cols).unwrap()
            );
            let stored = (rows * cols / dtype.block_size() * dtype.type_size()) as u64;
            let extra = if dtype == GgmlDType::Q4K {
                rows * cols / 256 * 4
            } else {
                0
            } as u64;
            assert_eq!(m.resident_bytes(), stored + extra, "{dtype:?}");
        }
    }
}

#[test]
fn bad_input_is_an_error_naming_the_values() {
    let err = resident_bytes_for(GgmlDType::Q5_1, 4, 64).unwrap_err();
    assert!(err.to_string().contains("Q5_1"), "{err}");
    let err = QMatrix::from_raw(GgmlDType::Q8_0, 2, 64, &[0; 100]).unwrap_err();
    assert!(
        err.to_string().contains("100 bytes") && err.to_string().contains("136"),
        "{err}"
    );
    assert!(QMatrix::from_raw(GgmlDType::Q4K, 2, 128, &[0; 144]).is_err());
    let m = QMatrix::from_raw(GgmlDType::Q8_0, 2, 64, &[0; 136]).unwrap();
    let pool = ComputePool::single();
    let err = m.matmul(&[0.0; 63], 1, &mut [0.0; 2], &pool).unwrap_err();
    assert!(err.to_string().contains("63"), "{err}");
    let err = m.matmul(&[0.0; 64], 1, &mut [0.0; 3], &pool).unwrap_err();
    assert!(err.to_string().contains("needs 2"), "{err}");
    assert!(m
        .matmul_rows(&[0.0; 64], 1, 1..3, &mut [0.0; 2], &pool)
        .is_err());
    assert!(m.dequantize_row(2, &mut [0.0; 64]).is_err());
    assert!(m.dequantize_row(1, &mut [0.0; 65]).is_err());
}

/// ggml's `ggml_vec_dot_q4_1_q8_1` (its AVX2 path) written out in scalars:
/// eight running sums, one per four values of a block (the low nibbles'
/// values 0..16 in sums 0..4, the high nibbles' 16..32 in sums 4..8), each
/// `fma(dw · da, Σ q·a, sum)` in block order; `fma(m, s, summs)` in block
/// order; then `hsum_float_8`'s folding and the minimums' sum last.
fn ggml_q4_1_dot(m: &QMatrix, j: usize, qs: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let nb = m.nb();
    let h = crate::vnni::f16_to_f32;
    let mut lanes = [0f32; 8];
    let mut summs = 0f32;
    for b in 0..nb {
        let wb = j * nb + b;
        let (dw, mw) = (h(m.d[wb]), h(m.m[wb]));
        summs = mw.mul_add(s[b], summs);
        let w = &m.qs[wb * 16..wb * 16 + 16];
        let a = &qs[b * 32..b * 32 + 32];
        for (l, lane) in lanes.iter_mut().enumerate() {
            let dot: i32 = (0..4)
                .map(|t| {
                    let (byte, hi) = (4 * (l % 4) + t, l >= 4);
                    let q = if hi { w[byte] >> 4 } else { w[byte] & 15 } as i32;
                    q * a[if hi { 16 } else { 0 } + byte] as i32
                })
                .sum();
            *lane = (dw * d[b]).mul_add(dot as f32, *lane);
        }
    }
    let r: [f32; 4] = std::array::from_fn(|i| lanes[i + 4] + lanes[i]);
    ((r[0] + r[2]) + (r[1] + r[3])) + summs
}

/// The AVX-512 Q4_1 kernel gives llama.cpp's floats exactly, not within
/// rounding: the same sums in the same order. (Greedy decoding of a Q4_1
/// model agrees with llama.cpp's only if near ties fall the same way.)
#[test]
fn avx512_q4_1_sums_in_ggml_order_bit_for_bit() {
    if !Kernel::Avx512Vnni.is_available() {
        eprintln!("SKIPPED avx512_q4_1_sums_in_ggml_order_bit_for_bit: this CPU lacks AVX-512 F/BW/VL/VNNI");
        return;
    }
    q4_1_sums_in_ggml_order(Kernel::Avx512Vnni);
}

/// The portable Q4_1 kernel (what a CPU without AVX-512 runs) gives
/// llama.cpp's floats exactly too.
#[test]
fn portable_q4_1_sums_in_ggml_order_bit_for_bit() {
    q4_1_sums_in_ggml_order(Kernel::Portable);
}

/// The AVX2 kernel (CPUs without AVX-512) too.
#[test]
fn avx2_q4_1_sums_in_ggml_order_bit_for_bit() {
    if !Kernel::Avx2.is_available() {
        eprintln!("SKIPPED avx2_q4_1_sums_in_ggml_order_bit_for_bit: this CPU lacks AVX2 and FMA");
        return;
    }
    q4_1_sums_in_ggml_order(Kernel::Avx2);
}

fn q4_1_sums_in_ggml_order(kernel: Kernel) {
    let pool = ComputePool::new(&PoolConfig {
        threads: Some(2),
        spin_us: 50,
    })
    .unwrap();
    for (rows, cols) in [(37usize, 576usize), (16, 1536), (9, 96)] {
        let (q, _) = quantized(GgmlDType::Q4_1, rows, cols, 21);
        let m = QMatrix::from_qtensor(&q)
            .unwrap()
            .with_kernel(kernel)
            .unwrap();
        for n in [1usize, 3, 6] {
            let x = random(n * cols, 40 + n as u64);
            let mut y = vec![0f32; n * rows];
            m.matmul(&x, n, &mut y, &pool).unwrap();
            let nb = cols / 32;
            for i in 0..n {
                let (mut qs, mut d, mut s) = (vec![0i8; cols], vec![0f32; nb], vec![0f32; nb]);
                act::quantize_row_q8_0(
                    &x[i * cols..(i + 1) * cols],
                    act::Layout::Natural,
                    &mut qs,
                    &mut d,
                    &mut s,
                    true,
                );
                for j in 0..rows {
                    let want = ggml_q4_1_dot(&m, j, &qs, &d, &s);
                    let got = y[i * rows + j];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{rows}x{cols} n={n} row {i} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_quantizers_equal_portable_bit_for_bit() {
    if !act::avx2::available() {
        eprintln!("skipped: this CPU has no AVX2");
        return;
    }
    let k = 1024;
    // Random rows, and rows whose scaled values land on exact ties
    // (x · 127 / amax = m + 0.5) where rounding modes differ.
    let mut rows = vec![random(k, 7), random(k, 8)];
    rows.push(
        (0..k)
            .map(|t| ((t % 255) as f32 - 127.0) * 0.5 + 0.5)
            .collect(),
    );
    rows.push(
        (0..k)
            .map(|t| {
                if t % 32 == 0 {
                    127.0
                } else {
                    (t % 64) as f32 - 31.5
                }
            })
            .collect(),
    );
    rows.push(vec![0.0; k]);
    for (r, x) in rows.iter().enumerate() {
        for layout in [
            act::Layout::Natural,
            act::Layout::Nibble4,
            act::Layout::SwapQ4K,
        ] {
            for q8_1 in [false, true] {
                let nb = k / 32;
                let mut a = (vec![0i8; k], vec![0f32; nb], vec![0f32; nb]);
                let mut b = a.clone();
                act::quantize_row_q8_0(x, layout, &mut a.0, &mut a.1, &mut a.2, q8_1);
                // SAFETY: the CPU has AVX2 (checked above).
                unsafe {
                    act::avx2::quantize_row_q8_0(x, layout, &mut b.0, &mut b.1, &mut b.2, q8_1)
                };
                assert_eq!(a.0, b.0, "row {r} {layout:?} q8_1={q8_1}");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!((bits(&a.1), bits(&a.2)), (bits(&b.1), bits(&b.2)));
            }
            let nb = k / 256;
            let mut a = (vec![0i8; k], vec![0f32; nb], vec![0i16; nb * 16]);
            let mut b = a.clone();
            act::quantize_row_q8_k(x, layout, &mut a.0, &mut a.1, &mut a.2);
            // SAFETY: as above.
            unsafe { act::avx2::quantize_row_q8_k(x, layout, &mut b.0, &mut b.1, &mut b.2) };
            assert_eq!(a, b, "row {r} {layout:?} (Q8_K)");
        }
    }
}
