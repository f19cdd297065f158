//! Sentence embedding throughput of all-MiniLM-L6-v2 on the CPU, in one run:
//! candle-transformers' `BertModel` one text at a time and in batches of 32
//! sorted by length (the baselines a user would write), against the `models`
//! encoder (packed batches, fused kernels) in f32, Q8_0 and the INT4 plan.
//!
//! `cargo bench --bench models` (needs `scripts/fetch-model.sh`).
//! `SNUG_BENCH_SENTENCES=N` sets the number of sentences (default 400).

use std::time::Instant;

use models::{LoadOptions, MiniLm, Tokens};
use quant::Format;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snug::baseline::Bert;

const WORDS: &[&str] = &[
    "the",
    "model",
    "runs",
    "on",
    "a",
    "small",
    "laptop",
    "with",
    "eight",
    "gigabytes",
    "of",
    "memory",
    "and",
    "every",
    "request",
    "gets",
    "an",
    "answer",
    "quickly",
    "while",
    "cache",
    "keeps",
    "recent",
    "results",
    "weather",
    "today",
    "is",
    "lovely",
    "sunny",
    "outside",
    "he",
    "drove",
    "to",
    "stadium",
    "market",
    "prices",
    "fell",
    "sharply",
    "after",
    "report",
    "was",
    "published",
    "children",
    "played",
    "in",
    "park",
    "near",
    "river",
    "engineers",
    "measured",
    "throughput",
    "latency",
    "under",
    "load",
    "quantization",
    "reduces",
    "size",
    "weights",
    "but",
    "accuracy",
    "must",
    "stay",
    "high",
    "enough",
    "for",
    "search",
    "ranking",
    "translation",
    "summaries",
    "customer",
    "support",
    "tickets",
    "about",
    "billing",
    "errors",
    "passwords",
    "shipping",
    "delays",
    "refunds",
    "internationalization",
    "unbelievable",
];

fn sentences(n: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..n)
        .map(|_| {
            let len = rng.random_range(5..=60);
            let mut s: Vec<&str> = (0..len)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            s.push(".");
            s.join(" ")
        })
        .collect()
}

fn bert_batch(model: &Bert, batch: &[&Tokens]) -> Vec<Vec<f32>> {
    let ids: Vec<&[u32]> = batch.iter().map(|t| t.ids.as_slice()).collect();
    model.embed(&ids).expect("BertModel forward")
}

fn sorted_batches(tokens: &[Tokens], size: usize) -> Vec<Vec<&Tokens>> {
    let mut order: Vec<&Tokens> = tokens.iter().collect();
    order.sort_by_key(|t| t.len());
    order.chunks(size).map(|c| c.to_vec()).collect()
}

fn report(name: &str, n: usize, secs: f64, base: Option<f64>) -> f64 {
    let rate = n as f64 / secs;
    match base {
        Some(b) => println!(
            "{name:<44} {rate:>8.1} sentences/s  ({:.2}x sorted BertModel)",
            rate / b
        ),
        None => println!("{name:<44} {rate:>8.1} sentences/s"),
    }
    rate
}

fn main() {
    let dir = models::model_dir().unwrap_or_else(|e| panic!("{e}"));
    let n: usize = std::env::var("SNUG_BENCH_SENTENCES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let texts = sentences(n);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();

    let f32_model = MiniLm::load(&dir, &LoadOptions::default()).unwrap();
    let t = Instant::now();
    let tokens = f32_model.tokenize(&refs).unwrap();
    let tok_secs = t.elapsed().as_secs_f64();
    let total_tokens: usize = tokens.iter().map(Tokens::len).sum();
    println!(
        "{n} sentences (5-60 words, seeded), mean {:.1} tokens; tokenisation {:.1} ms ({:.0} sentences/s); {} threads",
        total_tokens as f64 / n as f64,
        tok_secs * 1e3,
        n as f64 / tok_secs,
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );

    let bert = Bert::load(&dir).expect("load BertModel");
    let batches = sorted_batches(&tokens, 32);
    bert_batch(&bert, &batches[0]);

    let one_n = n.min(200);
    let t = Instant::now();
    for tk in &tokens[..one_n] {
        bert_batch(&bert, &[tk]);
    }
    report(
        "BertModel, one at a time",
        one_n,
        t.elapsed().as_secs_f64(),
        None,
    );
    let t = Instant::now();
    for b in &batches {
        bert_batch(&bert, b);
    }
    let base = report(
        "BertModel, sorted batches of 32",
        n,
        t.elapsed().as_secs_f64(),
        None,
    );

    let plans: Vec<(&str, LoadOptions)> = vec![
        ("models f32", LoadOptions::default()),
        (
            "models Q8_0 (default options)",
            LoadOptions::uniform(Format::Q8_0),
        ),
        (
            "models Q8_0 (unpadded, k=384)",
            LoadOptions {
                pad_inputs: false,
                ..LoadOptions::uniform(Format::Q8_0)
            },
        ),
        (
            "models INT4 plan (Q4_K on 1536-in, Q8_0)",
            LoadOptions {
                pad_inputs: false,
                ..LoadOptions::uniform(Format::Q4_K)
            },
        ),
    ];
    for (name, opts) in plans {
        let m = MiniLm::load(&dir, &opts).unwrap();
        let owned: Vec<Vec<Tokens>> = batches
            .iter()
            .map(|b| b.iter().map(|t| (*t).clone()).collect())
            .collect();
        m.embed_tokens(&owned[0]).unwrap(); // first forward: candle repacks quantized weights
        m.reset_profile();
        let t = Instant::now();
        for b in &owned {
            m.embed_tokens(b).unwrap();
        }
        report(
            &format!("{name}, sorted batches of 32"),
            n,
            t.elapsed().as_secs_f64(),
            Some(base),
        );
        let p = m.profile();
        let tot = p.total().as_secs_f64();
        let pct = |ns: u64| 100.0 * ns as f64 / 1e9 / tot;
        println!(
            "    profile: matmul {:.0}%  attention {:.0}%  gelu {:.0}%  add+layernorm {:.0}%  embed {:.0}%  pool {:.0}%   weights {:.1} MiB, resident {:.1} MiB",
            pct(p.matmul_ns), pct(p.attention_ns), pct(p.gelu_ns), pct(p.layer_norm_ns), pct(p.embed_ns), pct(p.pool_ns),
            m.weight_bytes() as f64 / 1048576.0, m.resident_bytes() as f64 / 1048576.0
        );
    }
    // One sentence at a time: what a lone caller pays per request.
    let m = MiniLm::load(&dir, &LoadOptions::uniform(Format::Q8_0)).unwrap();
    m.embed_tokens(&tokens[..1]).unwrap();
    let mut lat = Vec::with_capacity(one_n);
    let t = Instant::now();
    for tk in &tokens[..one_n] {
        let s = Instant::now();
        m.embed_tokens(std::slice::from_ref(tk)).unwrap();
        lat.push(s.elapsed().as_secs_f64() * 1e3);
    }
    report(
        "models Q8_0, one at a time",
        one_n,
        t.elapsed().as_secs_f64(),
        None,
    );
    println!(
        "    p50 {:.2} ms, p99 {:.2} ms per sentence",
        snug::percentile(&lat, 50.0).unwrap_or(0.0),
        snug::percentile(&lat, 99.0).unwrap_or(0.0)
    );
    // Packing: unsorted batches cost the encoder no padding.
    let m = MiniLm::load(&dir, &LoadOptions::uniform(Format::Q8_0)).unwrap();
    m.embed_tokens(&tokens[..32]).unwrap();
    let t = Instant::now();
    for b in tokens.chunks(32) {
        m.embed_tokens(b).unwrap();
    }
    report(
        "models Q8_0, unsorted batches of 32",
        n,
        t.elapsed().as_secs_f64(),
        Some(base),
    );
}
