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
//! Token ids come from the model's own tokenizer read from the GGUF file
//! (`models::Tokenizer`, which gives llama.cpp's `llama-tokenize` ids on the
//! golden strings of `crates/models/tests/data`), or from `--ids FILE` (a list
//! such as `llama-tokenize --ids` writes).

use std::path::PathBuf;
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
    /// Token ids of the text (a `[1, 2, ...]` list) instead of tokenizing it here.
    #[arg(long)]
    ids: Option<PathBuf>,
}

/// The GGUF file of a model `scripts/fetch-model.sh` fetches, found as
/// [`models::gguf_path`] finds it.
fn model_path(name: &str) -> Result<PathBuf, String> {
    models::gguf_path(name).map_err(|e| e.to_string())
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
        None => {
            let text = std::fs::read_to_string(&args.file)
                .map_err(|e| format!("reading {}: {e}", args.file.display()))?;
            models::Tokenizer::from_gguf_file(&gguf)
                .and_then(|t| t.encode(&text, true, true))
                .map_err(|e| e.to_string())?
        }
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
