//! GEMV (1x4096 · 4096x4096ᵀ) and batch 32 for f32, Q8_0, Q4_K and Q4_0
//! weights through `quant::QLinear`, with the effective GB/s of weight
//! traffic, and the resident-memory cost of candle's repack caches.
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

criterion_group!(benches, bench);
criterion_main!(benches);
