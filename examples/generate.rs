//! Streams a GGUF decoder's continuation of a prompt to the terminal as the
//! tokens come, then prints tokens/s.
//!
//! ```sh
//! bash scripts/fetch-model.sh smollm2-135m
//! cargo run --release --example generate -- --model smollm2-135m --prompt "Name the capital city of France."
//! cargo run --release --example generate -- --model gemma3-270m --raw --prompt "The capital of France is"
//! ```
//!
//! Instruct models with a chat template in their GGUF (SmolLM2) get the
//! prompt as one user message through that template unless `--raw` is given;
//! greedy by default (`--temperature` above 0 samples, with `--seed`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use models::decoder::{Decoder, DecoderConfig, LogitsWanted, SequenceStep};
use models::{ChatTemplate, Message, Sampler, SamplingConfig, Tokenizer};

/// Generate text with a GGUF decoder, streamed.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// A model fetched by scripts/fetch-model.sh (smollm2-135m, gemma3-270m).
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// A GGUF file instead of --model.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// The prompt.
    #[arg(
        long,
        default_value = "What is the capital of France? Answer with one word."
    )]
    prompt: String,
    /// Use the prompt as it is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p (1: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed for sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeat the flag for several).
    #[arg(long)]
    stop: Vec<String>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("generate: error: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let path = match &args.gguf {
        Some(p) => p.clone(),
        None => models::gguf_path(&args.model)?,
    };
    let t_load = Instant::now();
    let tok = Tokenizer::from_gguf_file(&path)?;
    let dec = Decoder::load(&path, DecoderConfig::default())?;
    eprintln!(
        "loaded {} in {:.2} s",
        path.display(),
        t_load.elapsed().as_secs_f64()
    );

    let text = if args.raw || tok.chat_template().is_none() {
        args.prompt.clone()
    } else {
        ChatTemplate::from_tokenizer(&tok)?.render(&[Message::new("user", &args.prompt)], true)?
    };
    let prompt = tok.encode(&text, true, true)?;

    let cfg = if args.temperature <= 0.0 {
        SamplingConfig {
            stop: args.stop.clone(),
            ..SamplingConfig::greedy()
        }
    } else {
        SamplingConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            stop: args.stop.clone(),
            ..SamplingConfig::default()
        }
    };
    let mut sampler = Sampler::new(cfg)?.with_stop_tokens(tok.eog_tokens());
    sampler.accept(&prompt);
    let mut stops = sampler.stop_matcher();
    let mut stream = tok.stream_decoder(false);
    let mut out = std::io::stdout().lock();

    let t_prefill = Instant::now();
    let mut seq = dec.new_sequence();
    let mut logits = dec.prefill(&mut seq, &prompt, LogitsWanted::Last)?;
    let prefill_s = t_prefill.elapsed().as_secs_f64();

    let t_decode = Instant::now();
    let mut generated = 0usize;
    let mut reason = "length";
    while generated < args.max_tokens {
        let id = sampler.sample(&logits)?;
        if sampler.is_stop_token(id) {
            reason = "stop token";
            break;
        }
        generated += 1;
        let shown = stops.push(&stream.push(id)?);
        out.write_all(shown.text.as_bytes())?;
        out.flush()?;
        if shown.stopped {
            reason = "stop string";
            break;
        }
        if generated == args.max_tokens || seq.len() + 1 >= dec.context() {
            break;
        }
        let mut step = [SequenceStep {
            seq: &mut seq,
            tokens: std::slice::from_ref(&id),
            logits: LogitsWanted::Last,
        }];
        let l = dec.step(&mut step)?;
        logits = l.last(0).ok_or("the step returned no logits")?.to_vec();
    }
    let tail = stops.push(&stream.finish());
    out.write_all(tail.text.as_bytes())?;
    if !tail.stopped {
        out.write_all(stops.finish().as_bytes())?;
    }
    writeln!(out)?;
    let decode_s = t_decode.elapsed().as_secs_f64();
    eprintln!(
        "prompt {} tokens in {:.2} s ({:.1} tokens/s); generated {} tokens in {:.2} s ({:.1} tokens/s); finished by {}",
        prompt.len(),
        prefill_s,
        prompt.len() as f64 / prefill_s.max(1e-9),
        generated,
        decode_s,
        generated as f64 / decode_s.max(1e-9),
        reason
    );
    Ok(())
}
