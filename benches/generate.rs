//! Generation speed of the GGUF decoders (SmolLM2-135M, Gemma-3-270M) in
//! criterion: prefill of a 128-token prompt, and one decode step of 1 and of
//! 8 sequences (each after a 128-token prompt), greedy. Throughput is tokens
//! per second. llama.cpp's figures on the same machine come beside ours from
//! `cargo run --release --example generate_bench`, which runs
//! `scripts/llama-bench.sh` in the same run.
//!
//! `cargo bench --bench generate` (`-- smollm2` for one model); the models
//! come from `scripts/fetch-model.sh`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use models::decoder::{Decoder, DecoderConfig, LogitsWanted, Sequence, SequenceStep};
use snug::{argmax, token_prompt};

const PROMPT: usize = 128;
/// Decode steps before a sequence is started again (keeps the context, and
/// so the attention cost, in the same range for every sample).
const MAX_STEPS: usize = 256;

/// `b` sequences, each after its prompt, and the next token of each.
fn start(dec: &Decoder, b: usize) -> (Vec<Sequence>, Vec<u32>) {
    let v = dec.config().vocab;
    let mut seqs: Vec<Sequence> = (0..b).map(|_| dec.new_sequence()).collect();
    let next = seqs
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            let l = dec
                .prefill(
                    s,
                    &token_prompt(PROMPT, v, 1000 + i as u64),
                    LogitsWanted::Last,
                )
                .expect("prefill");
            argmax(&l)
        })
        .collect();
    (seqs, next)
}

fn bench(c: &mut Criterion) {
    for name in ["smollm2-135m", "gemma3-270m"] {
        let path = models::gguf_path(name).unwrap_or_else(|e| panic!("{e}"));
        let dec = Decoder::load(
            path,
            DecoderConfig {
                context: Some(2048),
                kv_budget_bytes: 512 << 20,
                ..DecoderConfig::default()
            },
        )
        .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        let v = dec.config().vocab;
        let mut g = c.benchmark_group(format!("generate/{name}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));

        let p = token_prompt(PROMPT, v, 7);
        g.throughput(Throughput::Elements(PROMPT as u64));
        g.bench_function(BenchmarkId::new("prefill", PROMPT), |bch| {
            bch.iter(|| {
                let mut seq = dec.new_sequence();
                dec.prefill(&mut seq, &p, LogitsWanted::Last)
                    .expect("prefill")
            })
        });

        for b in [1usize, 8] {
            g.throughput(Throughput::Elements(b as u64));
            g.bench_function(BenchmarkId::new("decode_step_seqs", b), |bch| {
                bch.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut done = 0u64;
                    while done < iters {
                        let (mut seqs, mut next) = start(&dec, b);
                        let n = (iters - done).min(MAX_STEPS as u64);
                        let t = Instant::now();
                        for _ in 0..n {
                            let toks = next.clone();
                            let mut steps: Vec<SequenceStep<'_>> = seqs
                                .iter_mut()
                                .zip(&toks)
                                .map(|(s, tk)| SequenceStep {
                                    seq: s,
                                    tokens: std::slice::from_ref(tk),
                                    logits: LogitsWanted::Last,
                                })
                                .collect();
                            let logits = dec.step(&mut steps).expect("step");
                            for (i, nx) in next.iter_mut().enumerate() {
                                *nx = argmax(logits.last(i).expect("last row"));
                            }
                        }
                        total += t.elapsed();
                        done += n;
                    }
                    total
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
