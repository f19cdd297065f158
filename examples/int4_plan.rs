//! The layer-wise INT4 plan of MiniLM against f32 and uniform Q4_K.
//!
//! Calibrates every linear weight with quant's planner (output error per
//! candidate format: Q4_K, Q6_K, Q8_0), plans formats against byte targets
//! between the uniform Q4_K size and the uniform Q8_0 size, loads each plan
//! and embeds the same sentences as the f32 model, and prints the resident
//! bytes and the lowest and mean cosine against f32 for each.
//!
//! ```text
//! cargo run --release --example int4_plan
//! cargo run --release --example int4_plan -- --sentences 500 --mix 0,0.25
//! ```

use clap::Parser;
use models::{LoadOptions, MiniLm};
use quant::Format;

type AnyError = Box<dyn std::error::Error>;

/// Layer-wise INT4 plans against f32.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Sentences to compare on (5 to 60 words each).
    #[arg(long, default_value_t = 2000)]
    sentences: usize,
    /// Targets as the share of the way from the uniform Q4_K size to the
    /// uniform Q8_0 size (0 = as small as Q4_K).
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.25,0.5")]
    mix: Vec<f64>,
}

fn embed_all(m: &MiniLm, texts: &[String]) -> Result<Vec<Vec<f32>>, AnyError> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        out.extend(m.embed(&refs)?);
    }
    Ok(out)
}

fn cosines(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let cos: Vec<f32> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>())
        .collect();
    let min = cos.iter().copied().fold(f32::INFINITY, f32::min);
    (min, cos.iter().sum::<f32>() / cos.len().max(1) as f32)
}

fn main() -> Result<(), AnyError> {
    let args = Args::parse();
    let dir = models::model_dir()?;
    let texts = snug::sentences(args.sentences, 2026, 5, 60);
    let reference = embed_all(
        &MiniLm::load(&dir, &LoadOptions::uniform(Format::F32))?,
        &texts,
    )?;
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("| plan | resident | min cosine | mean cosine | formats |");
    println!("|---|---|---|---|---|");
    let q4 = MiniLm::load(&dir, &LoadOptions::uniform(Format::Q4_K))?;
    let (min, mean) = cosines(&embed_all(&q4, &texts)?, &reference);
    println!(
        "| uniform q4_k | {:.1} MiB | {min:.4} | {mean:.4} | all q4_k |",
        mib(q4.resident_bytes())
    );
    drop(q4);
    let started = std::time::Instant::now();
    let sensitivities = models::minilm_sensitivities(&dir)?;
    eprintln!(
        "calibrated {} tensors in {:.1} s",
        sensitivities.len(),
        started.elapsed().as_secs_f64()
    );
    for &mix in &args.mix {
        let options = models::minilm_int4_plan(&sensitivities, mix)?;
        let m = MiniLm::load(&dir, &options)?;
        let (min, mean) = cosines(&embed_all(&m, &texts)?, &reference);
        let mut counts = std::collections::BTreeMap::new();
        for f in m.formats().values() {
            *counts.entry(f.to_string()).or_insert(0) += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(f, n)| format!("{n} {f}")).collect();
        println!(
            "| int4 plan, mix {mix} | {:.1} MiB | {min:.4} | {mean:.4} | {} |",
            mib(m.resident_bytes()),
            counts.join(", ")
        );
    }
    Ok(())
}
