//! Quantize a safetensors model for this machine and save it as GGUF.
//!
//! ```text
//! cargo run --release --example quantize -- <model.safetensors> \
//!     (--target-bytes N | --policy auto) [-o out.gguf] [--samples N]
//! ```
//!
//! Calibrates every weight (output error of `x·Wᵀ` per candidate format),
//! plans formats against the byte target (with `--policy auto`: the size the
//! machine's policy format would give), converts, saves, reloads to check the
//! artifact, and prints the plan, the sizes and the errors.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::{ArgGroup, Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use quant::{
    load_safetensors, measure, quantize_tensors, select, sha256_file, uniform_bytes, Calibration,
    QuantPolicy, QuantizedModel,
};

fn bar(len: usize, what: &str) -> ProgressBar {
    if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(len as u64);
        b.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_prefix(what.to_string());
        b
    } else {
        ProgressBar::hidden()
    }
}

/// The byte target's source when no explicit target is given.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum PolicyChoice {
    /// The size the machine's policy format would give.
    Auto,
}

/// Quantizes a safetensors model for this machine and saves it as GGUF.
#[derive(Debug, Parser)]
#[command(version, about)]
#[command(group(ArgGroup::new("size").required(true).args(["target_bytes", "policy"])))]
struct Args {
    /// The safetensors model to quantize.
    input: PathBuf,
    /// Plan formats to fit this many bytes of weights.
    #[arg(long)]
    target_bytes: Option<u64>,
    /// Plan to the size the machine's quantization policy gives.
    #[arg(long, value_enum)]
    policy: Option<PolicyChoice>,
    /// Where to write the GGUF (default: the input with .gguf).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Calibration rows per weight (default: the policy's).
    #[arg(long)]
    samples: Option<usize>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let Args {
        input,
        target_bytes: target,
        policy: _,
        output: out,
        samples,
    } = Args::parse();
    let input = input.display().to_string();
    let out = out.map_or_else(
        || format!("{}.gguf", input.trim_end_matches(".safetensors")),
        |p| p.display().to_string(),
    );

    let profile = hw_detect::HardwareProfile::detect()?;
    let policy = QuantPolicy::for_profile(&profile);
    let mut calibration = Calibration::from_policy(&policy);
    if let Some(n) = samples {
        calibration.samples = n;
    }
    eprintln!(
        "machine: {:?}, {} MiB available; policy {} (layer-wise {}, {} calibration rows)",
        profile.class,
        profile.memory.effective_available >> 20,
        policy.effective_format(),
        policy.layer_wise,
        calibration.samples
    );

    let t0 = Instant::now();
    let source_sha256 = sha256_file(&input)?;
    let tensors = load_safetensors(&input)?;
    let pb = bar(tensors.len(), "calibrate");
    let sens = measure(&tensors, &calibration, |_, _, name| {
        pb.inc(1);
        pb.set_message(name.to_string());
    })?;
    pb.finish_and_clear();
    let t_cal = t0.elapsed();
    let target = target.unwrap_or_else(|| uniform_bytes(&sens, policy.effective_format()));
    let plan = select(&sens, target)?;
    let pb = bar(tensors.len(), "convert");
    let t1 = Instant::now();
    let model = quantize_tensors(&tensors, &plan, source_sha256, |_, _, name| {
        pb.inc(1);
        pb.set_message(name.to_string());
    })?;
    pb.finish_and_clear();
    let t_conv = t1.elapsed();
    model.save_gguf(&out)?;
    let back = QuantizedModel::load_gguf(&out)?;
    back.check_current(&input)?;

    println!("{plan}");
    let (mean, max) = plan.error_stats();
    let file = std::fs::metadata(&out)?.len();
    println!(
        "size: f32 {:.2} MiB -> planned {:.2} MiB ({:.2}x smaller); GGUF file {:.2} MiB; resident after first forwards ~{:.2} MiB",
        plan.f32_bytes() as f64 / 1048576.0,
        plan.total_bytes() as f64 / 1048576.0,
        plan.f32_bytes() as f64 / plan.total_bytes() as f64,
        file as f64 / 1048576.0,
        back.resident_bytes() as f64 / 1048576.0
    );
    println!("relative output error over quantized tensors: mean {mean:.3e}, max {max:.3e}");
    println!(
        "calibration {:.2} s, conversion {:.2} s; wrote {out} (reloaded and checked)",
        t_cal.as_secs_f64(),
        t_conv.as_secs_f64()
    );
    Ok(())
}
