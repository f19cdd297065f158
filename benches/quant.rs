//! GEMV (1x4096 · 4096x4096ᵀ) and batch 32 for f32, Q8_0, Q4_K and Q4_0
//! weights through `quant::QLinear`, with the effective GB/s of weight
//! traffic, and the resident-memory cost of candle's repack caches.
//!
//! Then the MiniLM shapes (M rows of activations × K inputs × N outputs) for
//! f32, candle's Q8_0 `QMatMul` and this crate's int8 (AVX-512 VNNI) kernel
//! for Q8_0, as a printed table of ratios and criterion groups at M = 320.
//!
//! `cargo bench --bench quant`

use std::time::{Duration, Instant};

use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quant::{Format, QLinear};
use rand::{Rng, SeedableRng};

const N: usize = 4096;
const FORMATS: [Format; 4] = [Format::F32, Format::Q8_0, Format::Q4_K, Format::Q4_0];

fn tensor(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random::<f32>() - 0.5)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("shape")
}

fn rss() -> u64 {
    snug::process_memory().map(|(rss, _)| rss).unwrap_or(0)
}

/// RSS growth over the first forwards (batch 1 then 32) against the storage
/// size and the crate's estimate.
fn resident_report(w: &Tensor) {
    println!("resident memory after the first forwards (4096x4096):");
    for format in FORMATS {
        let layer = QLinear::from_f32(w.clone(), None, format).expect("layer");
        let before = rss();
        for batch in [1, 32] {
            let x = tensor(batch, N, 9);
            layer.forward(&x).expect("forward");
        }
        let grown = rss().saturating_sub(before);
        let storage = layer.storage_bytes();
        println!(
            "  {format:>5}: storage {:>6.1} MiB, RSS +{:>6.1} MiB after forwards -> resident ~{:.2}x storage; resident_bytes() estimate {:.2}x",
            storage as f64 / 1048576.0,
            grown as f64 / 1048576.0,
            (storage + grown) as f64 / storage as f64,
            layer.resident_bytes() as f64 / storage as f64
        );
    }
}

fn bench(c: &mut Criterion) {
    let w = tensor(N, N, 1);
    resident_report(&w);
    for batch in [1usize, 32] {
        let mut group = c.benchmark_group(format!("quant/gemm_4096_b{batch}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        let x = tensor(batch, N, 2);
        for format in FORMATS {
            let layer = QLinear::from_f32(w.clone(), None, format).expect("layer");
            layer.forward(&x).expect("warm-up forward");
            let bytes = format.bytes_for(N * N);
            // A quick own timing for the GB/s line (criterion prints the time).
            let t = Instant::now();
            let reps = if batch == 1 { 50 } else { 10 };
            for _ in 0..reps {
                layer.forward(&x).expect("forward");
            }
            let per = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "  b{batch} {format:>5}: {:.3} ms per call, {:.1} GB/s of weight traffic ({:.0} % of 31 GB/s)",
                per * 1e3,
                bytes as f64 / per / 1e9,
                bytes as f64 / per / 1e9 / 31.0 * 100.0
            );
            group.throughput(Throughput::Bytes(bytes));
            group.bench_with_input(BenchmarkId::from_parameter(format), &x, |b, x| {
                b.iter(|| layer.forward(x).expect("forward"))
            });
        }
        group.finish();
    }
}

/// The linear layers of all-MiniLM-L6-v2: (K, N).
const MINILM: [(usize, usize); 4] = [(384, 1152), (384, 384), (384, 1536), (1536, 384)];

/// The three ways to compute a MiniLM-shaped layer.
fn minilm_layers(k: usize, n: usize) -> Vec<(&'static str, QLinear)> {
    let w = tensor(n, k, 3);
    let f32 = QLinear::from_f32(w.clone(), None, Format::F32).expect("layer");
    let candle = QLinear::from_f32(w.clone(), None, Format::Q8_0)
        .expect("layer")
        .with_int8_kernel(false);
    let mut v = vec![("f32", f32), ("q8_0 candle", candle)];
    let int8 = QLinear::from_f32(w, None, Format::Q8_0).expect("layer");
    if int8.int8_kernel() {
        v.push(("q8_0 int8", int8));
    }
    v
}

fn time_per_call(layer: &QLinear, x: &Tensor) -> f64 {
    layer.forward(x).expect("warm-up forward");
    let mut best = f64::MAX;
    // Best of 5 rounds of ~50 ms: the machine is shared, the minimum is the
    // least disturbed figure.
    for _ in 0..5 {
        let t = Instant::now();
        let mut reps = 0;
        while t.elapsed() < Duration::from_millis(50) {
            layer.forward(x).expect("forward");
            reps += 1;
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn bench_minilm(c: &mut Criterion) {
    println!(
        "MiniLM shapes, best-of-5 ms per call and GFLOP/s (int8 kernel available: {}):",
        quant::int8_kernel_available()
    );
    for (k, n) in MINILM {
        let layers = minilm_layers(k, n);
        for m in [40usize, 320, 1344] {
            let x = tensor(m, k, 4);
            let times: Vec<(&str, f64)> = layers
                .iter()
                .map(|(name, l)| (*name, time_per_call(l, &x)))
                .collect();
            let f32_t = times[0].1;
            let line: Vec<String> = times
                .iter()
                .map(|(name, t)| {
                    format!(
                        "{name} {:.3} ms ({:.0} GFLOP/s, {:.2}x f32)",
                        t * 1e3,
                        2.0 * (m * k * n) as f64 / t / 1e9,
                        f32_t / t
                    )
                })
                .collect();
            println!("  M={m:>4} K={k:>4} N={n:>4}: {}", line.join("  "));
        }
        let x = tensor(320, k, 4);
        let mut group = c.benchmark_group(format!("quant/minilm_m320_k{k}_n{n}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Elements((2 * 320 * k * n) as u64));
        for (name, layer) in &layers {
            group.bench_with_input(BenchmarkId::from_parameter(name), &x, |b, x| {
                b.iter(|| layer.forward(x).expect("forward"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_minilm, bench);
criterion_main!(benches);
