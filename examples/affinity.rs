//! Where compute threads run: the topology, the chosen strategy and thread
//! count, a pinned rayon pool, and a fixed f32 matmul timed on pinned and
//! unpinned pools, first on a quiet machine, then while a busy-spinning
//! thread competes for one core.
//!
//! ```text
//! cargo run --release --example affinity             # 896×896, 30 runs each
//! cargo run --release --example affinity -- --size 768 --runs 50
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use affinity::{
    current_affinity, pin_current_thread, recommended_threads, AffinityConfig, CpuLimits, CpuSet,
    PinMode, PinOutcome, ThreadPlacement,
};
use clap::Parser;
use rayon::prelude::*;

/// Rows of C per parallel task.
const ROW_BLOCK: usize = 16;
/// Depth of the k-blocks (a 64-row panel of B stays in L2).
const K_BLOCK: usize = 64;

/// C = A·B for n×n row-major matrices, on the current rayon pool: tasks of
/// ROW_BLOCK rows, k-blocked, inner loop over contiguous rows (vectorised).
fn matmul(a: &[f32], b: &[f32], c: &mut [f32], n: usize) {
    c.par_chunks_mut(ROW_BLOCK * n)
        .enumerate()
        .for_each(|(block, c_rows)| {
            c_rows.fill(0.0);
            for k0 in (0..n).step_by(K_BLOCK) {
                let k1 = (k0 + K_BLOCK).min(n);
                for (r, c_row) in c_rows.chunks_mut(n).enumerate() {
                    let i = block * ROW_BLOCK + r;
                    let a_row = &a[i * n..(i + 1) * n];
                    for k in k0..k1 {
                        let aik = a_row[k];
                        let b_row = &b[k * n..(k + 1) * n];
                        for (cv, bv) in c_row.iter_mut().zip(b_row) {
                            *cv += aik * bv;
                        }
                    }
                }
            }
        });
}

/// A deterministic n×n matrix with entries in [-1, 1).
fn matrix(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n * n)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Config {
    name: &'static str,
    pool: rayon::ThreadPool,
}

fn stats(ms: &[f64]) -> String {
    let p = |q| snug::percentile(ms, q).unwrap_or(f64::NAN);
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ms.iter().copied().fold(0.0, f64::max);
    format!(
        "median {:6.1} ms   p10 {:6.1}   p90 {:6.1}   min {:6.1}   max {:6.1}",
        p(50.0),
        p(10.0),
        p(90.0),
        min,
        max
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// Times every config `runs` times, interleaved so that drift in the
/// machine's load falls on all of them alike. Returns ms per config.
fn measure(configs: &[Config], a: &[f32], b: &[f32], n: usize, runs: usize) -> Vec<Vec<f64>> {
    let mut c = vec![0f32; n * n];
    let mut times = vec![Vec::with_capacity(runs); configs.len()];
    for cfg in configs {
        // Warm up: page in, spin up the threads.
        for _ in 0..2 {
            cfg.pool.install(|| matmul(a, b, &mut c, n));
        }
    }
    for _ in 0..runs {
        for (i, cfg) in configs.iter().enumerate() {
            let t = Instant::now();
            cfg.pool.install(|| matmul(a, b, &mut c, n));
            times[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times
}

/// Topology, thread placement, and a matmul timed on pinned and unpinned
/// pools, quiet and with a competing busy thread.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Side of the square f32 matrices (a positive multiple of the row block).
    #[arg(long, default_value_t = 896)]
    size: usize,
    /// Timed runs per pool.
    #[arg(long, default_value_t = 30)]
    runs: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (n, runs) = (args.size, args.runs);
    if n == 0 || !n.is_multiple_of(ROW_BLOCK) || runs == 0 {
        return Err(format!(
            "matrix size must be a positive multiple of {ROW_BLOCK}, runs positive"
        )
        .into());
    }

    // --- Topology and plan ---------------------------------------------
    let profile = hw_detect::HardwareProfile::detect()?;
    let cpu = &profile.cpu;
    println!(
        "CPU        {} ({} logical, {} physical)",
        cpu.brand, cpu.logical, cpu.physical
    );
    println!(
        "kinds      performance {} | efficiency {} (from {:?})",
        CpuSet::new(cpu.performance.clone()),
        CpuSet::new(cpu.efficiency.clone()),
        cpu.core_kind_source
    );
    println!("SMT groups {:?}", cpu.smt_groups);
    let limits = CpuLimits::detect();
    println!(
        "limits     affinity {} | cpuset {} | quota {}",
        limits
            .affinity
            .as_ref()
            .map_or("n/a".into(), ToString::to_string),
        limits
            .cpuset
            .as_ref()
            .map_or("none".into(), ToString::to_string),
        limits
            .quota
            .map_or("none".into(), |q| format!("{q:.2} CPUs")),
    );
    println!("threads    {} recommended", recommended_threads(&profile));

    let whole = ThreadPlacement::plan(&profile, &AffinityConfig::default())?;
    let per_cpu = ThreadPlacement::plan(
        &profile,
        &AffinityConfig {
            mode: PinMode::OneCpuPerThread,
            ..AffinityConfig::default()
        },
    )?;
    println!(
        "strategy   {} -> {} ({}); CPUs {}, spread order {:?}, {} threads",
        whole.requested, whole.strategy, whole.reason, whole.cpus, whole.order, whole.threads
    );
    let threads = whole.threads;

    let pinned_whole = whole.build_pool()?;
    let pinned_per_cpu = per_cpu.build_pool()?;
    for (label, pool) in [
        ("whole set", &pinned_whole),
        ("one CPU per thread", &pinned_per_cpu),
    ] {
        let masks = pool
            .pool()
            .broadcast(|ctx| (ctx.index(), current_affinity()));
        println!("pinned ({label}):");
        for ((i, mask), outcome) in masks.into_iter().zip(pool.outcomes()) {
            println!(
                "  thread {i}: {outcome:?}; kernel mask now {}",
                mask.map_or("n/a".into(), |m| m.to_string())
            );
        }
    }

    // --- Workload ---------------------------------------------------------
    let a = matrix(n, 1);
    let b = matrix(n, 2);
    let unpinned = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let configs = [
        Config {
            name: "unpinned",
            pool: unpinned,
        },
        Config {
            name: "pinned, whole set",
            pool: pinned_whole.into_pool(),
        },
        Config {
            name: "pinned, one CPU per thread",
            pool: pinned_per_cpu.into_pool(),
        },
    ];
    // Same answer everywhere.
    let mut reference = vec![0f32; n * n];
    configs[0]
        .pool
        .install(|| matmul(&a, &b, &mut reference, n));
    for cfg in &configs[1..] {
        let mut c = vec![0f32; n * n];
        cfg.pool.install(|| matmul(&a, &b, &mut c, n));
        assert_eq!(c, reference, "{} computed another product", cfg.name);
    }
    println!(
        "\nworkload   f32 matmul {n}x{n} ({:.0} MFLOP), {threads} threads, {runs} runs per config, interleaved",
        2.0 * (n as f64).powi(3) / 1e6
    );

    for contended in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let spinner = if contended {
            // A busy-spinning thread on the last CPU the process may run on.
            let last = current_affinity().and_then(|m| m.max());
            let stop = Arc::clone(&stop);
            Some(std::thread::spawn(move || {
                let outcome = last.map(|c| pin_current_thread(&CpuSet::new([c])));
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                outcome
            }))
        } else {
            None
        };
        let load_before = loadavg();
        let times = measure(&configs, &a, &b, n, runs);
        stop.store(true, Ordering::Relaxed);
        let spinner = spinner.map(|h| match h.join() {
            Ok(Some(PinOutcome::Pinned { cpus })) => format!("pinned to CPU {cpus}"),
            Ok(Some(other)) => format!("unpinned: {other:?}"),
            _ => "unpinned".to_string(),
        });
        match spinner {
            Some(how) => println!("\nwith a busy-spinning thread ({how})"),
            None => println!("\nquiet"),
        }
        println!("  load average before {load_before}, after {}", loadavg());
        let base = snug::percentile(&times[0], 50.0).unwrap_or(f64::NAN);
        for (cfg, t) in configs.iter().zip(&times) {
            let med = snug::percentile(t, 50.0).unwrap_or(f64::NAN);
            println!(
                "  {:<28} {}   x{:.2} of unpinned",
                cfg.name,
                stats(t),
                med / base
            );
        }
    }
    Ok(())
}
