//! End-to-end proof on all-MiniLM-L6-v2: throughput and latency against the
//! baselines a user would write, memory against the pre-flight estimate, a
//! memory-pressure run and a leak check — all in one run.
//!
//! ```text
//! cargo run --release --example e2e_bench                 # the full run (~8 minutes on 2 cores)
//! cargo run --release --example e2e_bench -- --quick      # 400 sentences, 4,000 for the leak check
//! ```
//!
//! Options: `--sentences N` (2000), `--corpus FILE` (one sentence per line,
//! instead of the seeded generator), `--leak N` (20000; 0 skips it),
//! `--charts DIR` (where the SVG charts go; default `target/e2e`),
//! `--json FILE` (all figures as JSON; default `target/e2e/e2e_bench.json`),
//! `--no-onnx` (skip the onnxruntime peer).
//!
//! The peers run in the same process run, on the same sentences and thread
//! count: candle-transformers' f32 `BertModel` (one per request at each
//! concurrency, and sorted batches of 32), and onnxruntime with an int8
//! MiniLM (`scripts/onnx-peer.sh`, a child process; its venv is made from
//! PyPI on first use). Ratios are to the best peer row. Every runtime
//! request is checked for the backend that served it, and the quality
//! (cosine to f32 `BertModel`) is checked at every concurrency reported.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::Parser;
use runtime::{Runtime, RuntimeConfig};
use serde::Serialize;

type AnyError = Box<dyn std::error::Error + Send + Sync>;

const CONCURRENCY: [usize; 3] = [1, 8, 32];

#[derive(Debug, Clone, Serialize)]
struct Run {
    mode: String,
    concurrency: usize,
    sentences: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Lowest cosine to f32 BertModel over the run's sentences (runtime and
    /// peer rows whose vectors were kept).
    min_cos: Option<f32>,
    /// Requests served by something other than the model under test (another
    /// tier, the cache); a row with any is not model throughput.
    served_elsewhere: usize,
}

/// The onnxruntime peer's output (`scripts/onnx-peer.sh`).
#[derive(Debug, serde::Deserialize)]
struct PeerRows {
    onnxruntime: String,
    rows: Vec<PeerRow>,
}

#[derive(Debug, serde::Deserialize)]
struct PeerRow {
    mode: String,
    concurrency: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Memory {
    format: String,
    estimate_bytes: u64,
    resident_after_load: u64,
    peak_growth: u64,
    model_resident_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    threads: usize,
    onnxruntime: Option<String>,
    mean_tokens: f64,
    runs: Vec<Run>,
    quality_min_cos_auto: f32,
    quality_mean_cos_auto: f32,
    quality_min_cos_f32: f32,
    auto_format: String,
    max_delay_ms: f64,
    batch_ms: f64,
    memory: Vec<Memory>,
    pressure: Vec<String>,
    leak: Option<(u64, u64, usize)>,
}

/// The end-to-end proof on all-MiniLM-L6-v2: throughput, latency, memory
/// against the estimate, a pressure run and a leak check.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// 400 sentences and 4,000 for the leak check (unless given).
    #[arg(long)]
    quick: bool,
    /// Sentences per run (default 2000; 400 with --quick; with --corpus, at
    /// most this many of its lines, default all).
    #[arg(long)]
    sentences: Option<usize>,
    /// Read the sentences from FILE (one per line) instead of generating them.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Skip the onnxruntime peer (it needs PyPI on first use).
    #[arg(long)]
    no_onnx: bool,
    /// Requests of the leak check, 0 skips it (default 20000; 4000 with --quick).
    #[arg(long)]
    leak: Option<usize>,
    /// Where the SVG charts go.
    #[arg(long, default_value = "target/e2e")]
    charts: PathBuf,
    /// All figures as JSON (default: e2e_bench.json in the charts directory).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: measure memory for one format in a child process.
    #[arg(long, hide = true)]
    memory_child: Option<String>,
}

fn model_dir() -> Result<PathBuf, AnyError> {
    if let Ok(d) = models::model_dir() {
        return Ok(d);
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let status = Command::new("bash")
        .arg(format!("{root}/scripts/fetch-model.sh"))
        .current_dir(root)
        .status()?;
    if !status.success() {
        return Err("scripts/fetch-model.sh failed".into());
    }
    Ok(models::model_dir()?)
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Runs `work(i)` for every i in 0..n from `threads` threads, each taking the
/// next index; returns wall seconds and each call's latency.
fn drive(n: usize, threads: usize, work: &(dyn Fn(usize) + Sync)) -> (f64, Vec<f64>) {
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(n));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let t = Instant::now();
                    work(i);
                    mine.push(t.elapsed().as_secs_f64() * 1e3);
                }
                latencies.lock().unwrap().extend(mine);
            });
        }
    });
    (
        start.elapsed().as_secs_f64(),
        latencies.into_inner().unwrap(),
    )
}

fn run(mode: &str, concurrency: usize, n: usize, secs: f64, lat: &[f64]) -> Run {
    Run {
        mode: mode.to_string(),
        concurrency,
        sentences: n,
        per_sec: n as f64 / secs,
        p50_ms: snug::percentile(lat, 50.0).unwrap_or(0.0),
        p99_ms: snug::percentile(lat, 99.0).unwrap_or(0.0),
        min_cos: None,
        served_elsewhere: 0,
    }
}

fn print_run(r: &Run) {
    let cos = r
        .min_cos
        .map_or(String::new(), |c| format!("   min cos {c:.4}"));
    let elsewhere = if r.served_elsewhere > 0 {
        format!(
            "   {} served elsewhere: NOT model throughput",
            r.served_elsewhere
        )
    } else {
        String::new()
    };
    println!(
        "  {:<42} c={:<3} {:>7.1} sentences/s   p50 {:>7.2} ms   p99 {:>7.2} ms{cos}{elsewhere}",
        r.mode, r.concurrency, r.per_sec, r.p50_ms, r.p99_ms
    );
}

/// Lowest cosine between `out` and `reference`, over every sentence.
fn min_cos(out: &[Vec<f32>], reference: &[Vec<f32>]) -> f32 {
    out.iter()
        .zip(reference)
        .map(|(a, b)| {
            if a.len() == b.len() {
                cos(a, b)
            } else {
                f32::NEG_INFINITY
            }
        })
        .fold(f32::INFINITY, f32::min)
}

/// Runs the onnxruntime peer on `texts` with `threads` intra-op threads.
/// Its one-caller vectors come back for the quality check. A peer that
/// fails fails the bench.
fn onnx_peer(
    texts: &[String],
    tokenizer: &Path,
    threads: usize,
    work: &Path,
) -> Result<(PeerRows, Vec<Vec<f32>>), AnyError> {
    let root = env!("CARGO_MANIFEST_DIR");
    let sentences = work.join("sentences.txt");
    let vectors = work.join("onnx-vectors.f32");
    let mut body = String::new();
    for t in texts {
        body.push_str(&t.replace('\n', " "));
        body.push('\n');
    }
    std::fs::write(&sentences, body)?;
    let callers = CONCURRENCY.map(|c| c.to_string()).join(",");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/onnx-peer.sh"))
        .arg("--sentences")
        .arg(&sentences)
        .arg("--tokenizer")
        .arg(tokenizer)
        .args(["--threads", &threads.to_string(), "--callers", &callers])
        .arg("--vectors")
        .arg(&vectors)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "the onnxruntime peer (scripts/onnx-peer.sh) failed with {}; --no-onnx skips it",
            out.status
        )
        .into());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or("the onnxruntime peer printed no figures")?;
    let rows: PeerRows = serde_json::from_str(line)?;
    let raw = std::fs::read(&vectors)?;
    let floats: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if floats.len() != texts.len() * 384 {
        return Err(format!(
            "the onnxruntime peer wrote {} floats, expected {} ({} sentences × 384)",
            floats.len(),
            texts.len() * 384,
            texts.len()
        )
        .into());
    }
    Ok((rows, floats.chunks(384).map(<[f32]>::to_vec).collect()))
}

/// The goals, as ratios to the best peer row of this run.
fn summary(runs: &[Run]) {
    let peer = |r: &&Run| ["(a)", "(b)", "(o)"].iter().any(|p| r.mode.starts_with(p));
    let best = |pred: &dyn Fn(&Run) -> bool| -> Option<&Run> {
        runs.iter()
            .filter(peer)
            .filter(|r| pred(r))
            .max_by(|a, b| a.per_sec.total_cmp(&b.per_sec))
    };
    let single = |r: &Run| r.concurrency == 1 && !r.mode.contains("batches");
    println!("\ngoals (ratios to the best peer row of this run):");
    for tag in ["(d)", "(e)"] {
        let ours = |c: usize| {
            runs.iter()
                .find(|r| r.mode.starts_with(tag) && r.concurrency == c)
        };
        let Some(name) = ours(1).map(|r| r.mode.clone()) else {
            continue;
        };
        println!("  {name}:");
        if let (Some(d1), Some(p1)) = (ours(1), best(&single)) {
            println!(
                "    one caller: {:.1}/s, p50 {:.2} ms vs {} {:.1}/s, p50 {:.2} ms: throughput {:.2}×, p50 {:.2}× (goal: throughput ≥ 1×, p50 ≤ 1×)",
                d1.per_sec, d1.p50_ms, p1.mode, p1.per_sec, p1.p50_ms, d1.per_sec / p1.per_sec, d1.p50_ms / p1.p50_ms
            );
        }
        let onnx_single = runs.iter().find(|r| r.mode.starts_with("(o)") && single(r));
        if let (Some(o1), Some(d1)) = (onnx_single, ours(1)) {
            println!(
                "    one caller vs onnxruntime one caller: {:.1}/s vs {:.1}/s ({:.2}×), p50 {:.2} ms vs {:.2} ms ({:.2}×)",
                d1.per_sec, o1.per_sec, d1.per_sec / o1.per_sec, d1.p50_ms, o1.p50_ms, d1.p50_ms / o1.p50_ms
            );
        }
        if let (Some(d8), Some(pb)) = (ours(8), best(&|_| true)) {
            println!(
                "    8 callers: {:.1}/s vs the best peer configuration ({}, c={}) {:.1}/s: {:.2}× (goal ≥ 1.5×); p99 {:.1} ms = {:.2}× p50 (goal ≤ 3×)",
                d8.per_sec, pb.mode, pb.concurrency, pb.per_sec, d8.per_sec / pb.per_sec, d8.p99_ms, d8.p99_ms / d8.p50_ms.max(1e-9)
            );
        }
        let worst = runs
            .iter()
            .filter(|r| r.mode.starts_with(tag))
            .filter_map(|r| r.min_cos)
            .fold(f32::INFINITY, f32::min);
        println!("    quality: min cosine {worst:.4} over every sentence of every concurrency (goal ≥ 0.99)");
    }
    let elsewhere: usize = runs.iter().map(|r| r.served_elsewhere).sum();
    if elsewhere > 0 {
        println!("  WARNING: {elsewhere} runtime requests were not served by the local MiniLM: those rows are not model throughput");
    } else {
        println!(
            "  every runtime request was served by the local MiniLM (no cache hit, no other tier)"
        );
    }
}

fn bench_config() -> RuntimeConfig {
    let mut c = RuntimeConfig::default();
    if let Ok(w) = std::env::var("SNUG_BATCH_WORKERS") {
        c.batch.workers = w.parse().unwrap_or(1);
    }
    // `SNUG_RELEASE_FREED_MEMORY=0` leaves malloc's mmap threshold as glibc
    // moves it, to measure what fixing it costs.
    if std::env::var("SNUG_RELEASE_FREED_MEMORY").as_deref() == Ok("0") {
        c.release_freed_memory = false;
    }
    c
}

/// The child process of the memory measurement: loads one plan through the
/// runtime, serves the sentences at concurrency 8, prints a JSON line.
fn memory_child(format: &str, n: usize) -> Result<(), AnyError> {
    let dir = model_dir()?;
    let texts = snug::sentences(n, 42, 5, 60);
    let format: quant::Format = format.parse()?;
    let mut config = bench_config();
    config.format = Some(format);
    config.budget.max_model = Some(u64::MAX / 4);
    let rt = Runtime::builder().config(config).minilm(&dir).build()?;
    let estimate = runtime::minilm_estimate(&dir, format, rt.plan().batch_tokens)?.total;
    // Reset the peak (VmHWM) to the current size: growth from here is the model's.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let (base, _) = snug::process_memory().ok_or("no /proc/self/status")?;
    rt.load(runtime::MINILM)?;
    let (after_load, _) = snug::process_memory().ok_or("no /proc/self/status")?;
    drive(texts.len(), 8, &|i| {
        rt.embed(&[texts[i].as_str()]).expect("embed");
    });
    let (_, peak) = snug::process_memory().ok_or("no /proc/self/status")?;
    let model = rt.status().models.into_iter().next().ok_or("no model")?;
    let m = Memory {
        format: format.to_string(),
        estimate_bytes: estimate,
        resident_after_load: after_load.saturating_sub(base),
        peak_growth: peak.saturating_sub(base),
        model_resident_bytes: model.resident_bytes,
    };
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

fn main() -> Result<(), AnyError> {
    let args = Args::parse();
    if let Some(format) = &args.memory_child {
        return memory_child(format, args.sentences.unwrap_or(2000));
    }
    let quick = args.quick;
    let n: usize = args.sentences.unwrap_or(if quick { 400 } else { 2000 });
    let leak_n: usize = args.leak.unwrap_or(if quick { 4000 } else { 20_000 });
    let charts: PathBuf = args.charts;
    let json_path: PathBuf = args.json.unwrap_or_else(|| charts.join("e2e_bench.json"));
    std::fs::create_dir_all(&charts)?;

    let dir = model_dir()?;
    let texts: Vec<String> = match &args.corpus {
        Some(path) => {
            let body = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the corpus {}: {e}", path.display()))?;
            let lines: Vec<String> = body
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(args.sentences.unwrap_or(usize::MAX))
                .map(str::to_string)
                .collect();
            if lines.is_empty() {
                return Err(format!("the corpus {} has no sentences", path.display()).into());
            }
            lines
        }
        None => snug::sentences(n, 42, 5, 60),
    };
    let n = texts.len();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokenizer = models::MiniLm::load(&dir, &models::LoadOptions::default())?;
    let tokens = tokenizer.tokenize(&refs)?;
    let mean_tokens = tokens.iter().map(|t| t.len()).sum::<usize>() as f64 / n as f64;
    let profile = hw_detect::HardwareProfile::detect()?;
    let source = match &args.corpus {
        Some(p) => format!("from {}", p.display()),
        None => "5–60 words, seeded".to_string(),
    };
    println!(
        "{n} sentences ({source}), mean {mean_tokens:.1} tokens; {} ({} logical CPUs), class {:?}\n",
        profile.cpu.brand, profile.cpu.logical, profile.class
    );

    // The runtime with its auto plan configures the global thread pool.
    let auto = Runtime::builder()
        .config(bench_config())
        .minilm(&dir)
        .build()?;
    let plan = auto.plan();
    println!(
        "auto plan: weights {}, {} threads, batches ≤ {} tokens, ≤ {} ms wait\n",
        plan.format, plan.threads, plan.batch_tokens, plan.max_delay_ms
    );
    let mut f32_config = bench_config();
    f32_config.format = Some(quant::Format::F32);
    f32_config.configure_global_pool = false;
    let f32_rt = Runtime::builder().config(f32_config).minilm(&dir).build()?;

    let mut runs = Vec::new();
    println!("throughput and latency (every sentence a separate request):");
    // (b) first: it also gives the reference embeddings.
    let bert = snug::baseline::Bert::load(&dir)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| tokens[i].len());
    let mut reference = vec![Vec::new(); n];
    bert.embed(&[&tokens[order[0]].ids])?; // warm
    let start = Instant::now();
    let mut batch_lat = Vec::new();
    for chunk in order.chunks(32) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| tokens[i].ids.as_slice()).collect();
        let out = bert.embed(&batch)?;
        let done = start.elapsed().as_secs_f64() * 1e3;
        for (&i, v) in chunk.iter().zip(out) {
            reference[i] = v;
            batch_lat.push(done);
        }
    }
    let secs_b = start.elapsed().as_secs_f64();
    let base_b = run(
        "(b) BertModel, sorted batches of 32",
        1,
        n,
        secs_b,
        &batch_lat,
    );
    print_run(&base_b);
    runs.push(base_b.clone());

    // (o) onnxruntime, int8 MiniLM, in a child process on the same sentences.
    let mut onnx_version = None;
    if args.no_onnx {
        println!("  (o) onnxruntime: skipped (--no-onnx)");
    } else {
        let (peer, vectors) =
            onnx_peer(&texts, &dir.join("tokenizer.json"), plan.threads, &charts)?;
        let quality = min_cos(&vectors, &reference);
        for r in peer.rows {
            let mut row = Run {
                mode: format!("(o) {}", r.mode),
                concurrency: r.concurrency,
                sentences: n,
                per_sec: r.per_sec,
                p50_ms: r.p50_ms,
                p99_ms: r.p99_ms,
                min_cos: None,
                served_elsewhere: 0,
            };
            if r.concurrency == 1 && !r.mode.contains("batches") {
                row.min_cos = Some(quality);
            }
            print_run(&row);
            runs.push(row);
        }
        onnx_version = Some(peer.onnxruntime);
    }

    // (a) BertModel per request, threads sharing one model (tokenising included).
    for c in CONCURRENCY {
        let (secs, lat) = drive(n, c, &|i| {
            let t = tokenizer.tokenize(&[refs[i]]).expect("tokenize");
            bert.embed(&[&t[0].ids]).expect("embed");
        });
        let r = run("(a) BertModel, one per request", c, n, secs, &lat);
        print_run(&r);
        runs.push(r);
    }

    // (c) the runtime with f32 weights, (d) with its auto plan, (e) with
    // int8 (Q8_0) weights when the auto plan chose another format. The cache
    // is cleared before each run: every sentence is computed.
    let mut f32_out = vec![Vec::new(); n];
    let mut auto_out = vec![Vec::new(); n];
    let mut q8_out = vec![Vec::new(); n];
    let q8_rt = if plan.format == quant::Format::Q8_0 {
        None
    } else {
        let mut c = bench_config();
        c.format = Some(quant::Format::Q8_0);
        c.configure_global_pool = false;
        Some(Runtime::builder().config(c).minilm(&dir).build()?)
    };
    let mut variants = vec![
        ("(c) runtime, f32 weights", &f32_rt, &mut f32_out),
        ("(d) runtime, auto plan", &auto, &mut auto_out),
    ];
    if let Some(rt) = &q8_rt {
        variants.push(("(e) runtime, q8_0 weights", rt, &mut q8_out));
    }
    for (label, rt, sink) in variants {
        rt.load(runtime::MINILM)?;
        rt.embed(&["warm the batcher"])?;
        for c in CONCURRENCY {
            rt.cache().clear();
            let results: Vec<Mutex<Vec<f32>>> = (0..n).map(|_| Mutex::new(Vec::new())).collect();
            let elsewhere = AtomicUsize::new(0);
            let (secs, lat) = drive(n, c, &|i| {
                let out = rt.embed(&[refs[i]]).expect("embed");
                // Only the local MiniLM counts: not the cache, not another tier.
                if out.cache_hits > 0 || out.backend.as_deref() != Some(runtime::MINILM) {
                    elsewhere.fetch_add(1, Ordering::Relaxed);
                }
                *results[i].lock().unwrap() = out.vectors.into_iter().next().unwrap_or_default();
            });
            let out: Vec<Vec<f32>> = results
                .into_iter()
                .map(|r| r.into_inner().unwrap())
                .collect();
            let mut r = run(label, c, n, secs, &lat);
            r.min_cos = Some(min_cos(&out, &reference));
            r.served_elsewhere = elsewhere.into_inner();
            print_run(&r);
            runs.push(r);
            *sink = out;
        }
    }
    let cosines = |out: &[Vec<f32>]| -> (f32, f32) {
        let c: Vec<f32> = out.iter().zip(&reference).map(|(a, b)| cos(a, b)).collect();
        (
            c.iter().copied().fold(f32::INFINITY, f32::min),
            c.iter().sum::<f32>() / c.len() as f32,
        )
    };
    let (min_auto, mean_auto) = cosines(&auto_out);
    let (min_f32, _) = cosines(&f32_out);
    let auto_8 = runs
        .iter()
        .find(|r| r.mode.starts_with("(d)") && r.concurrency == 8)
        .map_or(0.0, |r| r.per_sec);
    println!(
        "\nauto plan at concurrency 8: {:.1} sentences/s = {:.2}× (b) in the same run",
        auto_8,
        auto_8 / base_b.per_sec
    );
    summary(&runs);
    println!("quality vs BertModel f32: auto plan min cosine {min_auto:.5} (mean {mean_auto:.5}); runtime f32 min {min_f32:.6}");

    // One batch's time: 8 typical sentences through the auto plan's model.
    let model = models::MiniLm::load(&dir, &models::LoadOptions::uniform(plan.format))?;
    let eight: Vec<models::Tokens> = order
        .iter()
        .skip(n / 2)
        .take(8)
        .map(|&i| tokens[i].clone())
        .collect();
    model.embed_tokens(&eight)?;
    let t = Instant::now();
    for _ in 0..5 {
        model.embed_tokens(&eight)?;
    }
    let batch_ms = t.elapsed().as_secs_f64() * 1e3 / 5.0;
    drop(model);
    let p99_8 = runs
        .iter()
        .find(|r| r.mode.starts_with("(d)") && r.concurrency == 8)
        .map_or(0.0, |r| r.p99_ms);
    println!(
        "latency: auto plan p99 at concurrency 8 is {p99_8:.1} ms; max_delay {} ms + one batch of 8 ({batch_ms:.1} ms) = {:.1} ms",
        plan.max_delay_ms,
        plan.max_delay_ms as f64 + batch_ms
    );

    // Memory: each plan in a fresh process.
    println!("\nmemory per plan (fresh process each; growth from just before the load):");
    let exe = std::env::current_exe()?;
    let mut memory = Vec::new();
    for format in ["f32", "q8_0", "q4_k"] {
        let out = Command::new(&exe)
            .args(["--memory-child", format, "--sentences", &n.to_string()])
            .output()?;
        let line = String::from_utf8_lossy(&out.stdout);
        let Some(json) = line.lines().rev().find(|l| l.starts_with('{')) else {
            return Err(format!(
                "the memory child for {format} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        };
        let m: serde_json::Value = serde_json::from_str(json)?;
        let m = Memory {
            format: format.to_string(),
            estimate_bytes: m["estimate_bytes"].as_u64().unwrap_or(0),
            resident_after_load: m["resident_after_load"].as_u64().unwrap_or(0),
            peak_growth: m["peak_growth"].as_u64().unwrap_or(0),
            model_resident_bytes: m["model_resident_bytes"].as_u64().unwrap_or(0),
        };
        let ratio = m.estimate_bytes as f64 / m.peak_growth.max(1) as f64;
        println!(
            "  {:<5} weights {:>6.1} MiB   RSS after load +{:>6.1} MiB   peak +{:>6.1} MiB   estimate {:>6.1} MiB ({:+.1}% of peak{})",
            m.format,
            m.model_resident_bytes as f64 / 1048576.0,
            m.resident_after_load as f64 / 1048576.0,
            m.peak_growth as f64 / 1048576.0,
            m.estimate_bytes as f64 / 1048576.0,
            (ratio - 1.0) * 100.0,
            if m.estimate_bytes < m.peak_growth { ", BELOW" } else { "" }
        );
        memory.push(m);
    }

    // Memory pressure: a budget too small for the f32 model.
    println!("\nmemory pressure:");
    let mut pressure = Vec::new();
    let f32_est = runtime::minilm_estimate(&dir, quant::Format::F32, plan.batch_tokens)?.total;
    let q8_est = runtime::minilm_estimate(&dir, quant::Format::Q8_0, plan.batch_tokens)?.total;
    for (label, cap) in [
        (
            "cap between the q8_0 and f32 estimates",
            (f32_est + q8_est) / 2,
        ),
        ("cap of 8 MiB: no format fits", 8 << 20),
    ] {
        let mut c = bench_config();
        c.configure_global_pool = false;
        c.format = Some(quant::Format::F32);
        c.budget.max_model = Some(cap);
        let rt = Runtime::builder().config(c).minilm(&dir).build()?;
        let answered = AtomicUsize::new(0);
        let tiers = Mutex::new(std::collections::BTreeMap::<String, usize>::new());
        let (secs, _) = drive(n, 8, &|i| {
            let out = rt.embed(&[refs[i]]).expect("every request is answered");
            answered.fetch_add(out.vectors.len(), Ordering::Relaxed);
            *tiers
                .lock()
                .unwrap()
                .entry(out.backend.unwrap_or_else(|| "cache".into()))
                .or_default() += 1;
        });
        let variant = rt
            .status()
            .models
            .into_iter()
            .next()
            .and_then(|m| m.variant)
            .unwrap_or_else(|| "none".into());
        let line = format!(
            "{label} ({:.1} MiB): loaded variant {variant}; {}/{n} answered in {secs:.1} s, by {:?}",
            cap as f64 / 1048576.0,
            answered.load(Ordering::Relaxed),
            tiers.into_inner().unwrap()
        );
        println!("  {line}");
        pressure.push(line);
    }

    // Leak check: RSS after 2,000 requests vs after `leak_n` (cache off, so
    // growth can only be a leak).
    let leak = if leak_n >= 2000 {
        let mut c = bench_config();
        c.configure_global_pool = false;
        c.cache_bytes = Some(1 << 20);
        let rt = Runtime::builder().config(c).minilm(&dir).build()?;
        let stream = snug::sentences(leak_n, 7, 5, 60);
        let first = 2000.min(leak_n);
        drive(first, 8, &|i| {
            rt.embed(&[stream[i].as_str()]).expect("embed");
        });
        let (rss_first, _) = snug::process_memory().unwrap_or((0, 0));
        drive(leak_n - first, 8, &|i| {
            rt.embed(&[stream[first + i].as_str()]).expect("embed");
        });
        let (rss_end, _) = snug::process_memory().unwrap_or((0, 0));
        println!(
            "\nleak check: RSS {:.1} MiB after {first} requests, {:.1} MiB after {leak_n} ({:+.2}%; goal within 5%)",
            rss_first as f64 / 1048576.0,
            rss_end as f64 / 1048576.0,
            (rss_end as f64 / rss_first.max(1) as f64 - 1.0) * 100.0
        );
        Some((rss_first, rss_end, leak_n))
    } else {
        None
    };

    let report = Report {
        machine: profile.cpu.brand.clone(),
        threads: plan.threads,
        onnxruntime: onnx_version,
        mean_tokens,
        runs,
        quality_min_cos_auto: min_auto,
        quality_mean_cos_auto: mean_auto,
        quality_min_cos_f32: min_f32,
        auto_format: plan.format.to_string(),
        max_delay_ms: plan.max_delay_ms as f64,
        batch_ms,
        memory,
        pressure,
        leak,
    };
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    charts::throughput(&report, &charts.join("e2e-throughput.svg"))?;
    charts::memory(&report, &charts.join("e2e-memory.svg"))?;
    println!(
        "\nfigures: {}; charts: {}/e2e-throughput.svg, e2e-memory.svg",
        json_path.display(),
        charts.display()
    );
    Ok(())
}

mod charts {
    use super::*;
    use plotters::prelude::*;

    pub(super) fn throughput(r: &Report, path: &Path) -> Result<(), AnyError> {
        let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
        root.fill(&WHITE)?;
        let max = r.runs.iter().map(|x| x.per_sec).fold(0.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "all-MiniLM-L6-v2: sentences/s vs concurrency",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0u32..34u32, 0.0..max)?;
        chart
            .configure_mesh()
            .x_desc("concurrent callers")
            .y_desc("sentences / s")
            .draw()?;
        let colors = [RED, BLUE, GREEN, CYAN, MAGENTA];
        for (k, prefix) in ["(a)", "(c)", "(d)", "(o) onnxruntime int8, one"]
            .iter()
            .enumerate()
        {
            let pts: Vec<(u32, f64)> = r
                .runs
                .iter()
                .filter(|x| x.mode.starts_with(prefix))
                .map(|x| (x.concurrency as u32, x.per_sec))
                .collect();
            let label = r
                .runs
                .iter()
                .find(|x| x.mode.starts_with(prefix))
                .map_or(String::new(), |x| x.mode.clone());
            let color = colors[k];
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        if let Some(b) = r.runs.iter().find(|x| x.mode.starts_with("(b)")) {
            let color = colors[4];
            chart
                .draw_series(LineSeries::new(
                    vec![(0, b.per_sec), (33, b.per_sec)],
                    color.stroke_width(1),
                ))?
                .label(b.mode.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
        Ok(())
    }

    pub(super) fn memory(r: &Report, path: &Path) -> Result<(), AnyError> {
        let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
        root.fill(&WHITE)?;
        let mib = |b: u64| b as f64 / 1048576.0;
        let max = r
            .memory
            .iter()
            .map(|m| mib(m.estimate_bytes.max(m.peak_growth)))
            .fold(0.0, f64::max)
            * 1.2;
        let n = r.memory.len() as u32;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "estimated vs measured peak memory growth per plan (MiB)",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0u32..(3 * n), 0.0..max.max(1.0))?;
        let names: Vec<String> = r.memory.iter().map(|m| m.format.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(3 * n as usize)
            .x_label_formatter(&|x| {
                if x % 3 == 1 {
                    names.get((x / 3) as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("MiB")
            .draw()?;
        for (i, m) in r.memory.iter().enumerate() {
            let x = 3 * i as u32;
            chart.draw_series([
                Rectangle::new([(x, 0.0), (x + 1, mib(m.estimate_bytes))], BLUE.filled()),
                Rectangle::new([(x + 1, 0.0), (x + 2, mib(m.peak_growth))], RED.filled()),
            ])?;
        }
        chart
            .draw_series([Rectangle::new([(0, 0.0), (0, 0.0)], BLUE.filled())])?
            .label("estimate")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.filled()));
        chart
            .draw_series([Rectangle::new([(0, 0.0), (0, 0.0)], RED.filled())])?
            .label("measured peak growth")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], RED.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
