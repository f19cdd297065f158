//! What fixing malloc's mmap threshold costs (`RuntimeConfig::release_freed_memory`).
//!
//! One process, the runtime with Q8_0 weights, sentences served in
//! alternating rounds under several settings of glibc's mmap (and trim)
//! threshold: small ones map and unmap every activation buffer above them,
//! 32 MiB serves every buffer from the heap (as glibc ends up after raising
//! its threshold on its own). Rounds alternate so that load from elsewhere on
//! the machine falls on every setting alike; each round serves its sentences
//! at one caller and at eight callers.
//!
//! ```text
//! cargo run --release --example malloc_threshold
//! cargo run --release --example malloc_threshold -- --sentences 500 --rounds 4
//! ```

use std::time::Instant;

use clap::Parser;
use runtime::{Runtime, RuntimeConfig};

type AnyError = Box<dyn std::error::Error>;

/// Throughput with the fixed mmap threshold against malloc's heap.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Sentences per round (5 to 60 words, seeded).
    #[arg(long, default_value_t = 1000)]
    sentences: usize,
    /// Rounds per setting.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Thresholds to compare, in bytes (mmap and trim threshold alike).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "32768,262144,1048576,33554432"
    )]
    thresholds: Vec<i32>,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_threshold(bytes: i32) {
    // SAFETY: mallopt only sets glibc's own parameters under its lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
        libc::mallopt(libc::M_TRIM_THRESHOLD, bytes);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_threshold(_bytes: i32) {}

/// Sentences per second serving `texts` from `callers` threads, one text a request.
fn serve(rt: &Runtime, texts: &[String], callers: usize) -> Result<f64, AnyError> {
    let start = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| -> Result<(), AnyError> {
        let workers: Vec<_> = (0..callers)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(t) = texts.get(i) else { return Ok(()) };
                        let out = rt.embed(&[t.as_str()]).map_err(|e| e.to_string())?;
                        if out.tier != Some(runtime::router::Tier::Small) || out.cache_hits > 0 {
                            return Err(format!("sentence {i} not served by the model: tier {:?}, cache hits {}, trail {:?}", out.tier, out.cache_hits, out.trail));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "a caller panicked")??;
        }
        Ok(())
    })?;
    Ok(texts.len() as f64 / start.elapsed().as_secs_f64())
}

fn main() -> Result<(), AnyError> {
    let args = Args::parse();
    let config = RuntimeConfig {
        format: Some(quant::Format::Q8_0),
        formats: vec![quant::Format::Q8_0],
        ..RuntimeConfig::default()
    };
    let rt = Runtime::builder()
        .config(config)
        .minilm(models::model_dir()?)
        .build()?;
    rt.load(runtime::MINILM)?;
    let settings: Vec<(String, i32)> = args
        .thresholds
        .iter()
        .map(|&b| (format!("threshold {} KiB", b >> 10), b))
        .collect();
    let mut results = vec![(Vec::new(), Vec::new()); settings.len()];
    for round in 0..args.rounds {
        for (k, (name, bytes)) in settings.iter().enumerate() {
            set_threshold(*bytes);
            // Distinct sentences per pass: nothing is answered from the cache.
            let seed = 100 + 4 * (round * settings.len() + k) as u64;
            let one = serve(&rt, &snug::sentences(args.sentences, seed, 5, 60), 1)?;
            let eight = serve(&rt, &snug::sentences(args.sentences, seed + 1, 5, 60), 8)?;
            println!("round {round} {name}: one caller {one:.1}/s, 8 callers {eight:.1}/s");
            results[k].0.push(one);
            results[k].1.push(eight);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut med: Vec<(f64, f64)> = Vec::new();
    for (name_bytes, (one, eight)) in settings.iter().zip(results.iter_mut()) {
        let m = (median(one), median(eight));
        println!(
            "{}: median one caller {:.1}/s, 8 callers {:.1}/s",
            name_bytes.0, m.0, m.1
        );
        med.push(m);
    }
    let last = med[med.len() - 1];
    for ((name, _), m) in settings.iter().zip(&med) {
        println!(
            "{name} / the last: one caller {:.3}×, 8 callers {:.3}×",
            m.0 / last.0,
            m.1 / last.1
        );
    }
    Ok(())
}
