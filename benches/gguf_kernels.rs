//! `quant::blocks` matmuls at the real shapes of SmolLM2-135M and
//! Gemma-3-270M, against candle's `QMatMul::forward` on the same block data
//! in the same run, for n = 1, 8, 32, 128 activation rows (fewer for the
//! logits matrices, which only ever see the last positions), and the
//! portable kernel (`snug-portable`) where this CPU runs another; throughput is
//! reported as bytes of weights read per second. Then the fork/join
//! overhead of `ComputePool::run` against rayon.
//!
//! `cargo bench --bench gguf_kernels`
//! (`-- pool` for the pool only, `-- q4_1` for one type, ...)

use std::time::Duration;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quant::blocks::{ComputePool, Kernel, PoolConfig, QMatrix};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// (label, type, outputs, inputs, batch sizes).
const CASES: &[(&str, GgmlDType, usize, usize, &[usize])] = &[
    (
        "smollm2_ffn_up_576x1536",
        GgmlDType::Q4_1,
        1536,
        576,
        &[1, 8, 32, 128],
    ),
    (
        "smollm2_ffn_down_1536x576",
        GgmlDType::Q4_1,
        576,
        1536,
        &[1, 8, 32, 128],
    ),
    (
        "smollm2_logits_576x49152",
        GgmlDType::Q8_0,
        49152,
        576,
        &[1, 8, 32],
    ),
    (
        "gemma_ffn_up_640x2048",
        GgmlDType::Q5_0,
        2048,
        640,
        &[1, 8, 32, 128],
    ),
    (
        "gemma_ffn_down_2048x640",
        GgmlDType::Q6K,
        640,
        2048,
        &[1, 8, 32, 128],
    ),
    (
        "gemma_attn_out_1024x640",
        GgmlDType::Q4K,
        640,
        1024,
        &[1, 8, 32, 128],
    ),
    (
        "gemma_attn_v_640x256",
        GgmlDType::Q8_0,
        256,
        640,
        &[1, 8, 32, 128],
    ),
    (
        "gemma_logits_640x262144",
        GgmlDType::Q8_0,
        262144,
        640,
        &[1, 8],
    ),
];

/// Random block bytes with small, valid f16 scales.
fn blocks(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = dtype.type_size();
    let nblocks = rows * cols / dtype.block_size();
    let mut data: Vec<u8> = (0..nblocks * size).map(|_| rng.random()).collect();
    // f16 offsets of the scales in each block.
    let scales: &[usize] = match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q4K => &[0, 2],
        GgmlDType::Q6K => &[208],
        _ => &[0],
    };
    for b in data.chunks_exact_mut(size) {
        for &at in scales {
            // 0x1c00..0x1fff: about 0.004 .. 0.008.
            let h: u16 = 0x1c00 | (rng.random::<u16>() & 0x3ff);
            b[at..at + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    data
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn kernels(c: &mut Criterion) {
    let pool = ComputePool::new(&PoolConfig {
        threads: Some(threads()),
        ..PoolConfig::default()
    })
    .expect("pool");
    for &(label, dtype, rows, cols, ns) in CASES {
        let data = blocks(dtype, rows, cols, 1);
        let ours = QMatrix::from_raw(dtype, rows, cols, &data).expect("matrix");
        // The portable kernel beside the detected one, where they differ.
        let portable = (ours.kernel() != Kernel::Portable).then(|| {
            QMatrix::from_raw(dtype, rows, cols, &data)
                .and_then(|m| m.with_kernel(Kernel::Portable))
                .expect("matrix")
        });
        // On an AVX-512 CPU, the AVX2 kernel too (what AVX2-only CPUs run).
        let avx2 =
            (ours.kernel() == Kernel::Avx512Vnni && Kernel::Avx2.is_available()).then(|| {
                QMatrix::from_raw(dtype, rows, cols, &data)
                    .and_then(|m| m.with_kernel(Kernel::Avx2))
                    .expect("matrix")
            });
        let theirs = QMatMul::from_qtensor(
            qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu).expect("qtensor"),
        )
        .expect("qmatmul");
        let bytes = (data.len()) as u64;
        drop(data);
        let mut group = c.benchmark_group(format!("gguf/{dtype:?}/{label}").to_lowercase());
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        group.throughput(Throughput::Bytes(bytes));
        for &n in ns {
            let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random::<f32>() - 0.5).collect();
            let mut y = vec![0f32; n * rows];
            group.bench_with_input(BenchmarkId::new("snug", n), &n, |b, &n| {
                b.iter(|| ours.matmul(&x, n, &mut y, &pool).expect("matmul"))
            });
            if let Some(p) = &portable {
                group.bench_with_input(BenchmarkId::new("snug-portable", n), &n, |b, &n| {
                    b.iter(|| p.matmul(&x, n, &mut y, &pool).expect("matmul"))
                });
            }
            if let Some(p) = &avx2 {
                group.bench_with_input(BenchmarkId::new("snug-avx2", n), &n, |b, &n| {
                    b.iter(|| p.matmul(&x, n, &mut y, &pool).expect("matmul"))
                });
            }
            let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).expect("x");
            group.bench_with_input(BenchmarkId::new("candle", n), &n, |b, _| {
                b.iter(|| theirs.forward(&xt).expect("forward"))
            });
        }
        group.finish();
    }
}

/// Fork/join of `tasks` near-empty tasks: our pool against rayon's.
fn pool_overhead(c: &mut Criterion) {
    let threads = threads();
    let pool = ComputePool::new(&PoolConfig {
        threads: Some(threads),
        ..PoolConfig::default()
    })
    .expect("pool");
    let rayon = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon");
    let mut group = c.benchmark_group("gguf/pool_fork_join");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let sink: Vec<std::sync::atomic::AtomicU64> = (0..64).map(|_| Default::default()).collect();
    for tasks in [threads, 8, 64] {
        group.bench_with_input(
            BenchmarkId::new("compute_pool", tasks),
            &tasks,
            |b, &tasks| {
                b.iter(|| {
                    pool.run(tasks, |t| {
                        sink[t % 64].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    })
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("rayon", tasks), &tasks, |b, &tasks| {
            b.iter(|| {
                rayon.install(|| {
                    (0..tasks).into_par_iter().for_each(|t| {
                        sink[t % 64].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    })
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pool_overhead, kernels);
criterion_main!(benches);
