//! Leaks measured by slope: one process serves many requests (each a new
//! text, so every one runs the model; the cache is held at its 1 MiB floor,
//! full after warm-up), samples its resident memory every `--every`
//! requests, and fits RSS against the request count after `--warmup`
//! requests by least squares. A leak shows as a positive slope; the goal is
//! under 16 bytes per request.
//!
//! With `--generations N` it measures generation instead: N streamed
//! completions on SmolLM2-135M (fetched by `scripts/fetch-model.sh
//! smollm2-135m`), eight at a time so they share steps, each a new prompt
//! of 4–20 words and 1–16 tokens, every answer checked as served by the
//! small local decoder.
//!
//! ```text
//! cargo run --release --example leak_slope
//! cargo run --release --example leak_slope -- --requests 5000 --warmup 1000
//! cargo run --release --example leak_slope -- --generations 5000 --warmup 1000 --every 100
//! ```

use clap::Parser;
use runtime::{Runtime, RuntimeConfig};

/// Fits resident memory against request count.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Requests in all.
    #[arg(long, default_value_t = 50_000)]
    requests: usize,
    /// Requests before the fit starts.
    #[arg(long, default_value_t = 10_000)]
    warmup: usize,
    /// Requests between samples.
    #[arg(long, default_value_t = 250)]
    every: usize,
    /// Weight format.
    #[arg(long, default_value = "q8_0")]
    format: String,
    /// Words per text.
    #[arg(long, default_value_t = 8)]
    words: usize,
    /// Measure this many generations (SmolLM2-135M) instead of embeddings.
    #[arg(long)]
    generations: Option<usize>,
}

/// Least-squares slope of `(x, y)` samples.
fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    let (mx, my) = (
        samples.iter().map(|s| s.0).sum::<f64>() / n,
        samples.iter().map(|s| s.1).sum::<f64>() / n,
    );
    let sxy: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
    let sxx: f64 = samples.iter().map(|s| (s.0 - mx) * (s.0 - mx)).sum();
    sxy / sxx
}

fn range(samples: &[(f64, f64)]) -> (f64, f64) {
    samples
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), s| (lo.min(s.1), hi.max(s.1)))
}

fn generations(args: &Args, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    const MODEL: &str = "smollm2-135m";
    const AT_ONCE: usize = 8;
    let spec = runtime::GenerativeSpec::fetched(MODEL, runtime::router::Tier::Small)?;
    let rt = Runtime::builder()
        .without_local_model()
        .generative(spec)
        .build()?;
    rt.load(MODEL)?;
    let texts = snug::sentences(997, 5, 4, 20);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let start = std::time::Instant::now();
    let mut done = 0;
    let mut tokens = 0;
    while done < n {
        let batch: Vec<_> = (done..(done + AT_ONCE).min(n))
            .map(|i| {
                let prompt = format!("{} {i}", texts[i % texts.len()]);
                let req = runtime::GenerateRequest::text(prompt).max_tokens(1 + i % 16);
                rt.generate(MODEL, req)
            })
            .collect::<Result<_, _>>()?;
        for (k, g) in batch.into_iter().enumerate() {
            let c = g.wait();
            let f = &c.finished;
            if f.served.tier != runtime::router::Tier::Small || f.served.model != MODEL {
                return Err(format!("generation {} served by {:?}", done + k, f.served).into());
            }
            if f.error.is_some() {
                return Err(format!("generation {} failed: {f:?}", done + k).into());
            }
            tokens += f.usage.completion_tokens;
        }
        let before = done;
        done = (done + AT_ONCE).min(n);
        if done / args.every > before / args.every {
            let (rss, _) = snug::process_memory().ok_or("no /proc/self/status")?;
            if done > args.warmup {
                samples.push((done as f64, rss as f64));
            }
            eprintln!(
                "{done} generations, RSS {:.2} MiB, {:.0} s",
                rss as f64 / 1048576.0,
                start.elapsed().as_secs_f64()
            );
        }
    }
    if samples.len() < 2 {
        return Err("too few samples after warm-up: raise --generations or lower --warmup".into());
    }
    let (lo, hi) = range(&samples);
    println!(
        "{n} generations ({tokens} tokens, {MODEL}, {AT_ONCE} at a time) in {:.0} s; {} samples after {} warm-up generations",
        start.elapsed().as_secs_f64(),
        samples.len(),
        args.warmup
    );
    println!(
        "RSS {:.1} to {:.1} MiB; slope {:.2} bytes/generation",
        lo / 1048576.0,
        hi / 1048576.0,
        slope(&samples)
    );
    let g = &rt.status().generative[0];
    println!(
        "after: {} running, {} KV blocks leased, {} KV bytes admitted",
        g.running, g.kv_blocks_used, g.kv_bytes_admitted
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(n) = args.generations {
        return generations(&args, n);
    }
    let format: quant::Format = args.format.parse()?;
    let config = RuntimeConfig {
        format: Some(format),
        formats: vec![format],
        cache_bytes: Some(1 << 20),
        ..RuntimeConfig::default()
    };
    let rt = Runtime::builder()
        .config(config)
        .minilm(models::model_dir()?)
        .build()?;
    rt.load(runtime::MINILM)?;
    let words = snug::sentences(997, 3, args.words, args.words);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let start = std::time::Instant::now();
    for i in 0..args.requests {
        // A text never seen before: the pool's words with the request number.
        let text = format!("{} {i}", words[i % words.len()]);
        let out = rt.embed(&[text.as_str()])?;
        if out.tier != Some(runtime::router::Tier::Small) {
            return Err(format!("request {i} served by {:?}", out.tier).into());
        }
        if (i + 1) % args.every == 0 {
            let (rss, _) = snug::process_memory().ok_or("no /proc/self/status")?;
            if i + 1 > args.warmup {
                samples.push(((i + 1) as f64, rss as f64));
            }
        }
    }
    if samples.len() < 2 {
        return Err("too few samples after warm-up: raise --requests or lower --warmup".into());
    }
    let slope = slope(&samples);
    let (lo, hi) = range(&samples);
    println!(
        "{} requests ({format}, {} words) in {:.0} s; {} samples after {} warm-up requests",
        args.requests,
        args.words,
        start.elapsed().as_secs_f64(),
        samples.len(),
        args.warmup
    );
    println!(
        "RSS {:.1} to {:.1} MiB; slope {slope:.2} bytes/request (goal < 16)",
        lo / 1048576.0,
        hi / 1048576.0
    );
    let cache = rt.cache().stats();
    println!("cache: {} entries, {} bytes", cache.entries, cache.weight);
    Ok(())
}
