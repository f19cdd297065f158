//! Generation speed of the GGUF decoders, in the shape of llama.cpp's
//! `llama-bench -p 128,512 -n 128` and `llama-batched-bench -npp 128
//! -ntg 128 -npl 1,4,8,16`: prefill tokens/s for 128- and 512-token prompts,
//! decode tokens/s with one sequence, aggregate decode tokens/s with 4, 8 and
//! 16 sequences, and peak RSS of one sequence filled to context 2048 (a fresh
//! process per model). Greedy decoding; prompts are fixed pseudo-random ids.
//!
//! Beside each model's row it runs the peer in the same run,
//! `scripts/llama-bench.sh MODEL --json` (llama.cpp's `llama-bench`,
//! `llama-batched-bench`, and the peak RSS of `llama-batched-bench -c 2048
//! -npp 2016 -ntg 32 -npl 1`, the same fill as ours; same threads), and prints llama.cpp's row and the ratio ours / theirs
//! (`--no-peer` skips it; a failing peer fails the bench).
//!
//! ```text
//! cargo run --release --example generate_bench
//! cargo run --release --example generate_bench -- --model gemma3-270m --reps 3
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use models::decoder::{Decoder, DecoderConfig, LogitsWanted, SequenceStep};
use snug::{argmax, token_prompt};

#[derive(Parser, Debug)]
#[command(about = "Prefill, decode and batched-decode tokens/s and peak RSS of the GGUF decoders")]
struct Args {
    /// Models to run (smollm2-135m, gemma3-270m); both when absent.
    #[arg(long)]
    model: Vec<String>,
    /// Repetitions of each measurement (the best is reported).
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// Tokens generated per decode measurement.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Batch sizes for aggregate decode.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4usize, 8, 16])]
    batches: Vec<usize>,
    /// Internal: run the peak-RSS child for this model and print VmHWM.
    #[arg(long, hide = true)]
    rss_child: Option<String>,
    /// Context for the peak-RSS measurement.
    #[arg(long, default_value_t = 2048)]
    rss_ctx: usize,
    /// Do not run llama.cpp beside (by default `scripts/llama-bench.sh`
    /// runs after each model, from the repository root).
    #[arg(long)]
    no_peer: bool,
}

/// llama.cpp's figures for one model, from `scripts/llama-bench.sh --json`.
fn peer(name: &str) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/llama-bench.sh"))
        .args([name, "--json"])
        .env("THREADS", rayon::current_num_threads().to_string())
        .current_dir(root)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "the peer run (scripts/llama-bench.sh {name} --json) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The GGUF file of a model `scripts/fetch-model.sh` fetches, found as
/// [`models::gguf_path`] finds it.
fn model_path(name: &str) -> Result<PathBuf, String> {
    models::gguf_path(name).map_err(|e| e.to_string())
}

/// Prefill tokens/s of an `n`-token prompt in one sequence.
fn prefill(dec: &Decoder, n: usize, reps: usize) -> Result<f64, models::Error> {
    let p = token_prompt(n, dec.config().vocab, n as u64);
    let mut best = 0f64;
    for _ in 0..reps {
        let mut seq = dec.new_sequence();
        let t = Instant::now();
        dec.prefill(&mut seq, &p, LogitsWanted::Last)?;
        best = best.max(n as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Aggregate decode tokens/s of `b` sequences, each after a 128-token prompt.
fn decode(dec: &Decoder, b: usize, gen: usize, reps: usize) -> Result<f64, models::Error> {
    let v = dec.config().vocab;
    let mut best = 0f64;
    for _ in 0..reps {
        let mut seqs: Vec<_> = (0..b).map(|_| dec.new_sequence()).collect();
        let mut next = Vec::with_capacity(b);
        for (i, s) in seqs.iter_mut().enumerate() {
            let l = dec.prefill(
                s,
                &token_prompt(128, v, 1000 + i as u64),
                LogitsWanted::Last,
            )?;
            next.push(argmax(&l));
        }
        let t = Instant::now();
        for _ in 0..gen {
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
            let logits = dec.step(&mut steps)?;
            for (i, n) in next.iter_mut().enumerate() {
                *n = argmax(logits.last(i).expect("asked for the last row"));
            }
        }
        best = best.max((b * gen) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn rss_child(name: &str, ctx: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dec = Decoder::load(
        model_path(name)?,
        DecoderConfig {
            context: Some(ctx),
            ..DecoderConfig::default()
        },
    )?;
    let v = dec.config().vocab;
    let mut seq = dec.new_sequence();
    let gen = 32.min(ctx / 2);
    let l = dec.prefill(&mut seq, &token_prompt(ctx - gen, v, 7), LogitsWanted::Last)?;
    let mut t = argmax(&l);
    for _ in 0..gen {
        let mut st = [SequenceStep {
            seq: &mut seq,
            tokens: std::slice::from_ref(&t),
            logits: LogitsWanted::Last,
        }];
        t = argmax(dec.step(&mut st)?.last(0).expect("last row"));
    }
    let peak = hw_detect::ProcessMemory::read().map_or(0, |m| m.peak);
    println!("VmHWM_KiB {}", peak / 1024);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(name) = &args.rss_child {
        return rss_child(name, args.rss_ctx);
    }
    let names = if args.model.is_empty() {
        vec!["smollm2-135m".to_string(), "gemma3-270m".to_string()]
    } else {
        args.model.clone()
    };
    let threads = rayon::current_num_threads();
    let mut head =
        "| model | threads | prefill 128 t/s | prefill 512 t/s | decode 1 seq t/s |".to_string();
    for b in &args.batches {
        head.push_str(&format!(" decode {b} seq t/s |"));
    }
    head.push_str(&format!(" peak RSS ctx {} MiB |", args.rss_ctx));
    println!("{head}");
    println!(
        "{}",
        head.chars()
            .map(|c| if c == '|' { '|' } else { '-' })
            .collect::<String>()
    );
    for name in &names {
        let dec = Decoder::load(
            model_path(name)?,
            DecoderConfig {
                context: Some(2048),
                kv_budget_bytes: 1 << 30,
                ..DecoderConfig::default()
            },
        )?;
        // Warm-up: page the weights in.
        prefill(&dec, 32, 1)?;
        let p128 = prefill(&dec, 128, args.reps)?;
        let p512 = prefill(&dec, 512, args.reps)?;
        let d1 = decode(&dec, 1, args.gen, args.reps)?;
        let mut row = format!("| {name} | {threads} | {p128:.1} | {p512:.1} | {d1:.1} |");
        let mut ours = vec![p128, p512, d1];
        for &b in &args.batches {
            let d = decode(&dec, b, args.gen, args.reps)?;
            row.push_str(&format!(" {d:.1} |"));
            ours.push(d);
        }
        drop(dec);
        let out = Command::new(std::env::current_exe()?)
            .args(["--rss-child", name, "--rss-ctx", &args.rss_ctx.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM_KiB "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|k| format!("{:.1}", k as f64 / 1024.0))
            .unwrap_or_else(|| format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        row.push_str(&format!(" {rss} |"));
        println!("{row}");
        if args.no_peer {
            continue;
        }
        let p = peer(name)?;
        let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        let mut theirs = vec![
            num(&p["prefill_128"]),
            num(&p["prefill_512"]),
            num(&p["decode_1"]),
        ];
        for b in &args.batches {
            theirs.push(num(&p["batched"][b.to_string()]["decode"]));
        }
        let peer_rss = num(&p["peak_rss_ctx2048_mib"]);
        let mut prow = format!("| llama.cpp {name} | {} |", p["threads"]);
        let mut rrow = format!("| ratio snug / llama.cpp | {threads} |");
        for (o, t) in ours.iter().zip(&theirs) {
            prow.push_str(&format!(" {t:.1} |"));
            rrow.push_str(&format!(" {:.2}x |", o / t));
        }
        prow.push_str(&format!(" {peer_rss:.1} (ctx 2048) |"));
        let ours_rss: f64 = rss.parse().unwrap_or(f64::NAN);
        rrow.push_str(&format!(" {:.2}x |", ours_rss / peer_rss));
        println!("{prow}");
        println!("{rrow}");
    }
    Ok(())
}
