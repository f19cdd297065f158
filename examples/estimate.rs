//! Pre-flight memory estimate of a model file, read from its header only.
//!
//! ```text
//! cargo run --release --example estimate -- <model.safetensors|model.gguf> [--batch N] [--seq N] [--json]
//! ```
//!
//! Prints the weight bytes as stored and under each candidate quantization
//! (with candle's repacked copy after the first forward), the activation
//! estimate for one forward pass of `--batch` sequences of `--seq` tokens,
//! and whether each fits this machine's budget right now. The transformer's
//! shape comes from GGUF metadata or a `config.json` next to the file.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use hw_detect::{Detector, HardwareProfile};
use mem_budget::{
    estimate_model, estimate_weights, ActivationConfig, Activations, Budget, Bytes, Estimate,
    MemoryLedger, Room, TransformerShape, WeightType, Workload,
};
use serde::Serialize;

#[derive(Serialize)]
struct Row {
    storage: String,
    weights: u64,
    repacked: u64,
    estimate: Option<Estimate>,
}

#[derive(Serialize)]
struct Report {
    file: PathBuf,
    format: mem_budget::WeightFormat,
    tensors: usize,
    params: u64,
    header_parse_ms: f64,
    class: hw_detect::HardwareClass,
    budget: Budget,
    room: Room,
    shape: Option<TransformerShape>,
    workload: Workload,
    activations: Option<Activations>,
    rows: Vec<Row>,
}

/// Pre-flight memory estimate of a model file, from its header only.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The model: a .safetensors or .gguf file.
    file: PathBuf,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args {
        file,
        batch,
        seq,
        json,
    } = Args::parse();

    let started = Instant::now();
    let info = estimate_weights(&file)?;
    let header_parse_ms = started.elapsed().as_secs_f64() * 1e3;

    let shape = TransformerShape::from_gguf(&info).or_else(|| {
        let config = file.with_file_name("config.json");
        let text = std::fs::read_to_string(config).ok()?;
        TransformerShape::from_hf_config(&text).ok()
    });

    let profile = HardwareProfile::detect()?;
    let budget = Budget::from_profile(&profile);
    let ledger = MemoryLedger::new(budget, Detector::new());
    let room = Room::in_ledger(&ledger)?;
    let config = ActivationConfig::default();
    let workload = Workload { batch, seq };
    let activations = shape.map(|s| Activations::estimate(&s, workload, &config));

    let mut targets: Vec<Option<WeightType>> = vec![None];
    targets.extend(WeightType::CANDIDATES.iter().map(|&t| Some(t)));
    let rows = targets
        .into_iter()
        .map(|t| Row {
            storage: t.map_or("as stored".to_string(), |t| t.to_string()),
            weights: t.map_or(info.stored_bytes(), |t| info.bytes_as(t)),
            repacked: config.repack.extra_bytes(&info, t),
            estimate: shape.map(|s| estimate_model(&info, t, &s, workload, &config, room)),
        })
        .collect();

    let report = Report {
        file,
        format: info.format,
        tensors: info.tensors.len(),
        params: info.params(),
        header_parse_ms,
        class: profile.class,
        budget,
        room,
        shape,
        workload,
        activations,
        rows,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {:?}, {} tensors, {} weights (header read in {:.2} ms)",
        report.file.display(),
        report.format,
        report.tensors,
        report.params,
        report.header_parse_ms
    );
    println!(
        "machine: {:?}; room now: model {}, activations {}, total {}",
        report.class,
        Bytes(room.model),
        Bytes(room.activations),
        Bytes(room.total)
    );
    match (&report.shape, &report.activations) {
        (Some(s), Some(a)) => println!(
            "shape: {:?}, hidden {}, {} layers, {} heads ({} kv), ffn {}; batch {batch} x {seq} tokens: \
             activations {} (scores {}, other {}, kv cache {}, logits {})",
            s.architecture,
            s.hidden,
            s.layers,
            s.heads,
            s.kv_heads,
            s.intermediate,
            Bytes(a.total),
            Bytes(a.attention_scores),
            Bytes(a.layer_other),
            Bytes(a.kv_cache),
            Bytes(a.logits)
        ),
        _ => println!("shape: unknown (no GGUF metadata, no config.json next to the file): activations not estimated"),
    }
    println!(
        "\n{:<10} {:>12} {:>12} {:>12} {:>5} {:>10}  recommendation",
        "storage", "weights", "+repack", "total", "fits", "max tokens"
    );
    for r in &report.rows {
        let (total, fits, max, rec) = match &r.estimate {
            Some(e) => (
                Bytes(e.bytes).to_string(),
                if e.fits { "yes" } else { "no" },
                e.max_tokens.map_or("-".into(), |n| n.to_string()),
                e.recommendation.clone(),
            ),
            None => ("-".into(), "?", "-".into(), String::new()),
        };
        println!(
            "{:<10} {:>12} {:>12} {:>12} {:>5} {:>10}  {}",
            r.storage,
            Bytes(r.weights).to_string(),
            Bytes(r.repacked).to_string(),
            total,
            fits,
            max,
            rec
        );
    }
    Ok(())
}
