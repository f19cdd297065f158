//! The runtime under real cgroup memory limits: for each limit a child
//! process in a fresh memory cgroup builds the runtime as a user would and
//! embeds a workload; the table says who served, in which format, the
//! process's and the cgroup's peaks and the OOM kills. Needs root.
//!
//! ```text
//! cargo run --release --example memory_proof
//! cargo run --release --example memory_proof -- --limits-mib 96,256,1024
//! ```
//!
//! With `--generate` each child serves generation instead: SmolLM2-135M
//! (fetched by `scripts/fetch-model.sh smollm2-135m`) and `--clients`
//! concurrent completions; the table says how many were answered, by whom,
//! how many ran at once (the KV the limit left room for), the finish
//! reasons, the peaks and the OOM kills.
//!
//! ```text
//! cargo run --release --example memory_proof -- --generate --limits-mib 176,192,208,224,256,512
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
    /// Serve generation in each child instead of embeddings.
    #[arg(long)]
    generate: bool,
    /// Concurrent completions each generation child sends.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Words in each completion's prompt.
    #[arg(long, default_value_t = 160)]
    prompt_words: usize,
    /// max_tokens of each completion.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Run as the child (internal).
    #[arg(long, hide = true)]
    child: bool,
}

fn generation(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.child {
        return proof::generate_child(args.clients, args.prompt_words, args.max_tokens);
    }
    let version = proof::cgroup_version()?;
    let exe = std::env::current_exe()?;
    let (clients, words, max) = (
        args.clients.to_string(),
        args.prompt_words.to_string(),
        args.max_tokens.to_string(),
    );
    println!(
        "cgroup {version:?}, {} concurrent completions of ~{} words, max_tokens {}\n",
        args.clients, args.prompt_words, args.max_tokens
    );
    println!("| limit | answered | local | rule-based | at once (most) | KV per sequence | finish reasons | preempted | process peak (VmHWM) | cgroup peak | OOM kills | exit |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    for &mib in &args.limits_mib {
        let run = proof::run_limited(
            version,
            mib << 20,
            &exe,
            &[
                "--generate",
                "--child",
                "--clients",
                &clients,
                "--prompt-words",
                &words,
                "--max-tokens",
                &max,
            ],
            &[],
        )?;
        let mib_of = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
        let cg = run.cgroup_peak.map_or("-".into(), mib_of);
        match proof::gen_report(&run.stdout) {
            Some(r) => {
                let reasons: Vec<String> =
                    r.reasons.iter().map(|(k, n)| format!("{k} {n}")).collect();
                println!(
                    "| {mib} MiB | {} | {} | {} | {} | {} | {} | {} | {} | {cg} | {} | {} |",
                    r.answered,
                    r.local,
                    r.rule_based,
                    r.max_running,
                    if r.kv_per_sequence == 0 {
                        "-".to_string()
                    } else {
                        mib_of(r.kv_per_sequence)
                    },
                    reasons.join(", "),
                    r.preempted,
                    mib_of(r.peak_rss),
                    run.oom_kills,
                    run.exit
                );
                if let Some(e) = &r.first_error {
                    eprintln!("{mib} MiB: {:.1} s; first error: {e}", r.secs);
                }
                if r.answered != args.clients {
                    failures.push(format!(
                        "{mib} MiB: {} of {} answered",
                        r.answered, args.clients
                    ));
                }
            }
            None => println!(
                "| {mib} MiB | - | - | - | - | - | - | - | - | {cg} | {} | {} |",
                run.oom_kills, run.exit
            ),
        }
        if run.oom_kills > 0 || run.exit != "ok" {
            failures.push(format!(
                "{mib} MiB: {} OOM kills, child {}",
                run.oom_kills, run.exit
            ));
        }
    }
    if failures.is_empty() {
        println!("\nzero OOM kills; every completion answered at every limit");
        Ok(())
    } else {
        for f in &failures {
            println!("FAILED: {f}");
        }
        Err(format!("{} failures", failures.len()).into())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.generate {
        return generation(&args);
    }
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
