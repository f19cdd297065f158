//! The runtime under real cgroup memory limits: for each limit a child
//! process in a fresh memory cgroup builds the runtime as a user would and
//! embeds a workload; the table says who served, in which format, the
//! process's and the cgroup's peaks and the OOM kills. Needs root.
//!
//! ```text
//! cargo run --release --example memory_proof
//! cargo run --release --example memory_proof -- --limits-mib 96,256,1024
//! ```

#[path = "memory_proof/proof.rs"]
#[allow(dead_code, unreachable_pub)]
mod proof;

use clap::Parser;

/// Runs the runtime under cgroup memory limits and prints the table.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Limits to run under, MiB.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64,96,128,192,256,384,512,1024,2048"
    )]
    limits_mib: Vec<u64>,
    /// Sentences each child embeds (in requests of eight).
    #[arg(long, default_value_t = 64)]
    texts: usize,
    /// The local model must serve at every limit at least this many times
    /// the smallest peak measured with a format that served.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    /// Run as the child (internal).
    #[arg(long, hide = true)]
    child: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.child {
        return proof::child(args.texts);
    }
    let version = proof::cgroup_version()?;
    let exe = std::env::current_exe()?;
    let texts = args.texts.to_string();
    let mut runs = Vec::new();
    for &mib in &args.limits_mib {
        let run = proof::run_limited(
            version,
            mib << 20,
            &exe,
            &["--child", "--texts", &texts],
            &[],
        )?;
        eprintln!(
            "{mib} MiB: {} ({})",
            run.report.as_ref().map_or("-", |r| r.backend.as_str()),
            run.exit
        );
        runs.push(run);
    }
    println!("cgroup {version:?}, {} texts per run\n", args.texts);
    print!("{}", proof::table(&runs));
    let failures = proof::check(&runs, args.factor);
    if failures.is_empty() {
        println!(
            "\nzero OOM kills; the local model served at every limit >= {} x its peak",
            args.factor
        );
        Ok(())
    } else {
        for f in &failures {
            println!("FAILED: {f}");
        }
        Err(format!("{} failures", failures.len()).into())
    }
}
