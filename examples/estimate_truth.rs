//! Estimates against measurement: each case runs in a fresh child process
//! that builds the runtime with one format, measures the peak resident
//! growth (`VmHWM` after resetting it through `/proc/self/clear_refs`) and
//! prints it beside the estimate. Two kinds of case:
//!
//! - **load**: `Runtime::load` (file mapped, weights built, first forward)
//!   against the variant's load estimate, `max(load peak, weights) +
//!   tokenizer`;
//! - **request**: one `embed` of `batch` texts of `words` words on a loaded
//!   model against `Runtime::estimate` for the same texts (which reads no
//!   weights).
//!
//! ```text
//! cargo run --release --example estimate_truth
//! cargo run --release --example estimate_truth -- --formats q8_0 --batches 1,8 --words 20
//! ```

use clap::Parser;
use runtime::{Runtime, RuntimeConfig};

type AnyError = Box<dyn std::error::Error>;

/// Measures estimates against peak resident growth, one child per case.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Formats to measure.
    #[arg(long, value_delimiter = ',', default_value = "f32,q8_0,q4_k")]
    formats: Vec<String>,
    /// Texts per request.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128,256")]
    batches: Vec<usize>,
    /// Words per text.
    #[arg(long, value_delimiter = ',', default_value = "20,60,200")]
    words: Vec<usize>,
    /// Run one case as the child (internal): `load` or `request`.
    #[arg(long, hide = true)]
    child: Option<String>,
    /// The child's format (internal).
    #[arg(long, hide = true, default_value = "q8_0")]
    format: String,
    /// The child's texts (internal).
    #[arg(long, hide = true, default_value_t = 1)]
    batch: usize,
    /// The child's words per text (internal).
    #[arg(long, hide = true, default_value_t = 20)]
    word_count: usize,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Case {
    estimate: u64,
    measured: u64,
    tokens: u64,
}

fn texts(batch: usize, words: usize) -> Vec<String> {
    // Exactly `words` words each, distinct per text.
    snug::sentences(batch, 7 + words as u64, words, words)
}

fn runtime(format: &str) -> Result<Runtime, AnyError> {
    let format: quant::Format = format.parse()?;
    let config = RuntimeConfig {
        format: Some(format),
        formats: vec![format],
        ..RuntimeConfig::default()
    };
    Ok(Runtime::builder()
        .config(config)
        .minilm(models::model_dir()?)
        .build()?)
}

fn child(args: &Args, kind: &str) -> Result<(), AnyError> {
    let dir = models::model_dir()?;
    let rt = runtime(&args.format)?;
    let case = match kind {
        "load" => {
            let e = runtime::minilm_estimate(&dir, args.format.parse()?, 1)?;
            let estimate = e.load_peak.max(e.weights) + e.overhead;
            std::fs::write("/proc/self/clear_refs", "5")?;
            let (base, _) = snug::process_memory().ok_or("no /proc/self/status")?;
            rt.load(runtime::MINILM)?;
            let (_, peak) = snug::process_memory().ok_or("no /proc/self/status")?;
            Case {
                estimate,
                measured: peak.saturating_sub(base),
                tokens: 0,
            }
        }
        "request" => {
            rt.load(runtime::MINILM)?;
            // One small request first: threads, pools and the tokenizer are
            // warm, as in a serving process.
            rt.embed(&["the runtime is warm now"])?;
            let texts = texts(args.batch, args.word_count);
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let est = rt.estimate(&refs)?;
            std::fs::write("/proc/self/clear_refs", "5")?;
            let (base, _) = snug::process_memory().ok_or("no /proc/self/status")?;
            let out = rt.embed(&refs)?;
            let (_, peak) = snug::process_memory().ok_or("no /proc/self/status")?;
            if out.tier != Some(runtime::router::Tier::Small) {
                return Err(format!("served by {:?}, not the model", out.tier).into());
            }
            Case {
                estimate: est.estimate.bytes,
                measured: peak.saturating_sub(base),
                tokens: est.tokens,
            }
        }
        other => return Err(format!("unknown child kind {other:?}").into()),
    };
    println!("CASE {}", serde_json::to_string(&case)?);
    Ok(())
}

fn run_child(extra: &[String]) -> Result<Case, AnyError> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(extra)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CASE "))
        .ok_or_else(|| {
            format!(
                "child {extra:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(serde_json::from_str(line)?)
}

fn main() -> Result<(), AnyError> {
    let args = Args::parse();
    if let Some(kind) = &args.child {
        return child(&args, kind);
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("| case | tokens | estimate | measured | estimate / measured |");
    println!("|---|---|---|---|---|");
    let (mut worst_low, mut worst_high) = (f64::INFINITY, 0f64);
    let mut report = |name: String, c: &Case| {
        let ratio = c.estimate as f64 / c.measured.max(1) as f64;
        worst_low = worst_low.min(ratio);
        worst_high = worst_high.max(ratio);
        println!(
            "| {name} | {} | {:.2} MiB | {:.2} MiB | {ratio:.2} |",
            c.tokens,
            mib(c.estimate),
            mib(c.measured)
        );
    };
    for f in &args.formats {
        let c = run_child(&[
            "--child".into(),
            "load".into(),
            "--format".into(),
            f.clone(),
        ])?;
        report(format!("load {f}"), &c);
        for &w in &args.words {
            for &b in &args.batches {
                let c = run_child(&[
                    "--child".into(),
                    "request".into(),
                    "--format".into(),
                    f.clone(),
                    "--batch".into(),
                    b.to_string(),
                    "--word-count".into(),
                    w.to_string(),
                ])?;
                report(format!("{f} {b} x {w} words"), &c);
            }
        }
    }
    println!("\nestimate / measured: lowest {worst_low:.2}, highest {worst_high:.2} (goal: 1.00 to 1.15)");
    Ok(())
}
