//! Perplexity of a GGUF decoder over a text file, by llama.cpp's method
//! (`llama-perplexity`): the text is tokenized whole (with BOS when the model
//! adds one), cut into non-overlapping chunks of `--ctx` tokens, the first
//! token of each chunk replaced by BOS when the model adds BOS, and only the
//! second half of each chunk is scored. The last line is `PPL = <value>`.
//!
//! ```text
//! cargo run --release --example perplexity -- --model smollm2-135m \
//!     --file /usr/share/common-licenses/GPL-3 --ctx 512
//! ```
//!
//! Token ids come from llama.cpp's `llama-tokenize` (built by
//! `scripts/llama-cpp.sh`), or from `--ids FILE` (a list such as
//! `llama-tokenize --ids` writes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use models::decoder::{Decoder, DecoderConfig, LogitsWanted, SequenceStep};

#[derive(Parser, Debug)]
#[command(about = "Perplexity of a GGUF decoder over a text file (llama.cpp's method)")]
struct Args {
    /// Model name: smollm2-135m or gemma3-270m (files under models/).
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// A GGUF file (overrides --model).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// The text to score.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    file: PathBuf,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Tokens per step (the prefill chunk).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Score at most this many chunks (all when absent).
    #[arg(long)]
    chunks: Option<usize>,
    /// Token ids of the text (a `[1, 2, ...]` list) instead of running llama-tokenize.
    #[arg(long)]
    ids: Option<PathBuf>,
}

/// `models/<name>/<file>` for the models `scripts/fetch-model.sh` fetches.
fn model_path(name: &str) -> Result<PathBuf, String> {
    let file = match name {
        "smollm2-135m" => "models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3-270m" => "models/gemma3-270m/gemma-3-270m-q4_k_m.gguf",
        other => {
            return Err(format!(
                "--model {other}: expected smollm2-135m or gemma3-270m (or pass --gguf PATH)"
            ))
        }
    };
    let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
    for dir in cwd.ancestors() {
        let p = dir.join(file);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "{file} not found; run scripts/fetch-model.sh {name}"
    ))
}

fn parse_ids(text: &str) -> Result<Vec<u32>, String> {
    text.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().map_err(|e| format!("token id {s:?}: {e}")))
        .collect()
}

fn llama_tokenize(gguf: &Path, file: &Path) -> Result<Vec<u32>, String> {
    let bin = match std::env::var_os("LLAMA_CPP_BIN") {
        Some(b) => PathBuf::from(b),
        None => {
            let out = Command::new("bash")
                .args(["scripts/llama-cpp.sh", "--print"])
                .output()
                .map_err(|e| format!("running scripts/llama-cpp.sh --print: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let out = Command::new(bin.join("llama-tokenize"))
        .arg("-m")
        .arg(gguf)
        .arg("-f")
        .arg(file)
        .args(["--ids", "--log-disable"])
        .output()
        .map_err(|e| format!("running llama-tokenize: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .ok_or("llama-tokenize printed no id list")?;
    parse_ids(line)
}

fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
    row[target] as f64 - mx - sum.ln()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let gguf = match &args.gguf {
        Some(p) => p.clone(),
        None => model_path(&args.model)?,
    };
    if args.ctx < 4 {
        return Err(format!("--ctx {}: need at least 4 tokens", args.ctx).into());
    }
    let opts = DecoderConfig {
        max_step_tokens: args.batch.max(1),
        context: Some(args.ctx),
        ..DecoderConfig::default()
    };
    let t0 = Instant::now();
    let dec = Decoder::load(&gguf, opts)?;
    let cfg = dec.config().clone();
    eprintln!(
        "loaded {} ({:?}, {} layers) in {:.2}s",
        gguf.display(),
        cfg.arch,
        cfg.n_layers,
        t0.elapsed().as_secs_f64()
    );
    let tokens = match &args.ids {
        Some(p) => parse_ids(&std::fs::read_to_string(p)?)?,
        None => llama_tokenize(&gguf, &args.file)?,
    };
    let n_ctx = args.ctx;
    let mut n_chunk = tokens.len() / n_ctx;
    if let Some(c) = args.chunks {
        n_chunk = n_chunk.min(c);
    }
    if n_chunk == 0 {
        return Err(format!(
            "{} tokens are fewer than one chunk of --ctx {n_ctx}",
            tokens.len()
        )
        .into());
    }
    eprintln!("{} tokens, {n_chunk} chunks of {n_ctx}", tokens.len());
    let first = n_ctx / 2;
    let mut nll = 0f64;
    let mut count = 0usize;
    let t1 = Instant::now();
    for c in 0..n_chunk {
        let mut toks = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if cfg.add_bos {
            if let Some(b) = cfg.bos {
                toks[0] = b;
            }
        }
        let mut seq = dec.new_sequence();
        let mut pos = 0;
        while pos < n_ctx {
            let end = (pos + args.batch).min(n_ctx);
            let want = if end > first {
                LogitsWanted::All
            } else {
                LogitsWanted::None
            };
            let mut steps = [SequenceStep {
                seq: &mut seq,
                tokens: &toks[pos..end],
                logits: want,
            }];
            let logits = dec.step(&mut steps)?;
            if want == LogitsWanted::All {
                let rows = logits.rows(0);
                let v = logits.vocab();
                for j in pos.max(first)..end.min(n_ctx - 1) {
                    let row = &rows[(j - pos) * v..(j - pos + 1) * v];
                    nll -= log_softmax_at(row, toks[j + 1] as usize);
                    count += 1;
                }
            }
            pos = end;
        }
        println!(
            "[{}/{n_chunk}] ppl so far {:.4} ({:.1} tokens/s)",
            c + 1,
            (nll / count as f64).exp(),
            ((c + 1) * n_ctx) as f64 / t1.elapsed().as_secs_f64()
        );
    }
    println!("PPL = {:.4}", (nll / count as f64).exp());
    Ok(())
}
