//! Concurrent chat clients against snug's server and llama.cpp's
//! `llama-server` in the same run: aggregate tokens/s, time to first token
//! and inter-token time (p50 / p99), and the ratio of the two.
//!
//! ```sh
//! bash scripts/fetch-model.sh smollm2-135m
//! cargo run --release --example generate_e2e -- --clients 8,16
//! ```
//!
//! Both engines serve the same GGUF over HTTP with the same threads and
//! context per sequence; every client streams a chat (a seeded prompt of
//! 20–500 tokens, `max_tokens` seeded in 32–256) and counts tokens as the
//! chunks come. Only answers a model served count: snug's `snug.tier` and
//! `snug.model` of each answer are checked.

#[path = "embed_server/app.rs"]
mod app;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Concurrent streamed chats: snug beside llama-server.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// A model fetched by scripts/fetch-model.sh.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Concurrent clients, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8,16")]
    clients: Vec<usize>,
    /// Chats per client in each run.
    #[arg(long, default_value_t = 2)]
    requests: usize,
    /// Compute threads of both engines.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Context positions per sequence (both engines).
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Seed of the prompts and max_tokens.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// llama.cpp's bin directory (default: `bash scripts/llama-cpp.sh --print`).
    #[arg(long)]
    llama_bin: Option<PathBuf>,
    /// Skip llama-server (snug alone).
    #[arg(long)]
    no_llama: bool,
    /// Words of the system prompt all clients share in the prefix-reuse
    /// run (0 skips it).
    #[arg(long, default_value_t = 230)]
    shared_system_words: usize,
    /// Pass `--no-repack` to llama-server (its weights stay in the GGUF
    /// layout). Off by default: repacking is llama.cpp's faster
    /// configuration; some VMs fault on the repacked kernels' instructions.
    #[arg(long)]
    llama_no_repack: bool,
}

struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
    served: Option<(String, String)>,
}

const WORDS: &[&str] = &[
    "the", "river", "city", "bright", "quiet", "market", "people", "walk", "along", "old",
    "bridge", "morning", "light", "story", "teacher", "learn", "garden", "window", "music",
    "travel", "mountain", "simple", "question", "answer", "history", "science", "friend",
];

fn prompts(seed: u64, n: usize) -> Vec<(String, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let words = rng.random_range(15..375);
            let text: Vec<&str> = (0..words)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            let prompt = format!("Summarise this text: {}", text.join(" "));
            (prompt, rng.random_range(32..=256))
        })
        .collect()
}

fn chat(
    base: &str,
    model: &str,
    system: Option<&str>,
    prompt: &str,
    max_tokens: usize,
) -> Result<Sample, String> {
    let mut messages = Vec::new();
    if let Some(sys) = system {
        messages.push(serde_json::json!({"role": "system", "content": sys}));
    }
    messages.push(serde_json::json!({"role": "user", "content": prompt}));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let body = serde_json::json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let resp = agent
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .map_err(|e| e.to_string())?;
    let reader = BufReader::new(resp.into_body().into_reader());
    let mut last = None;
    let mut ttft = None;
    let mut gaps = Vec::new();
    let mut chunks = 0usize;
    let mut usage = None;
    let mut served = None;
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if let Some(s) = v.get("snug").filter(|s| s.get("finish_reason").is_some()) {
            served = Some((
                s["tier"].as_str().unwrap_or_default().to_string(),
                s["model"].as_str().unwrap_or_default().to_string(),
            ));
        }
        if let Some(u) = v.get("usage").and_then(|u| u["completion_tokens"].as_u64()) {
            usage = Some(u as usize);
        }
        let content = v["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or_default();
        if !content.is_empty() {
            let now = Instant::now();
            chunks += 1;
            match last {
                None => ttft = Some(now - start),
                Some(t) => gaps.push(now - t),
            }
            last = Some(now);
        }
    }
    Ok(Sample {
        ttft: ttft.ok_or("no content came")?,
        gaps,
        tokens: usage.unwrap_or(chunks),
        served,
    })
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

struct Figures {
    tokens_per_s: f64,
    ttft: (f64, f64),
    itl: (f64, f64),
    counted: usize,
}

fn run_clients(
    base: &str,
    model: &str,
    clients: usize,
    per_client: usize,
    seed: u64,
    check_served: Option<&str>,
) -> Result<Figures, String> {
    run_chats(
        base,
        model,
        None,
        prompts(seed, clients * per_client),
        clients,
        check_served,
    )
}

/// `all` chats (prompt, max_tokens) from `clients` concurrent clients, each
/// with `system` as its system message when given.
fn run_chats(
    base: &str,
    model: &str,
    system: Option<&str>,
    all: Vec<(String, usize)>,
    clients: usize,
    check_served: Option<&str>,
) -> Result<Figures, String> {
    let per_client = all.len() / clients;
    let start = Instant::now();
    let results: Vec<Result<Vec<Sample>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let mine: Vec<(String, usize)> = all[c * per_client..(c + 1) * per_client].to_vec();
                s.spawn(move || {
                    mine.iter()
                        .map(|(p, m)| chat(base, model, system, p, *m))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("client panicked".into())))
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    for r in results {
        samples.extend(r?);
    }
    if let Some(want) = check_served {
        for s in &samples {
            match &s.served {
                Some((tier, m)) if m == want && tier != "rule-based" => {}
                other => return Err(format!("an answer was served by {other:?}, not {want}")),
            }
        }
    }
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
    let mut gaps: Vec<Duration> = samples.iter().flat_map(|s| s.gaps.clone()).collect();
    Ok(Figures {
        tokens_per_s: tokens as f64 / wall,
        ttft: (pct(&mut ttft, 0.5), pct(&mut ttft, 0.99)),
        itl: (pct(&mut gaps, 0.5), pct(&mut gaps, 0.99)),
        counted: samples.len(),
    })
}

fn start_snug(
    args: &Args,
    max_clients: usize,
    prefix_cache_bytes: u64,
) -> Result<(SocketAddr, runtime::Runtime), Box<dyn std::error::Error>> {
    let gguf = models::gguf_path(&args.model)?;
    let mut spec = runtime::GenerativeSpec::new(&args.model, gguf, runtime::router::Tier::Small);
    spec.prefix_cache_bytes = prefix_cache_bytes;
    spec.decoder.context = Some(args.context);
    spec.engine.max_running = max_clients;
    spec.engine.max_queued = 4 * max_clients;
    let probe = models::decoder::Decoder::estimate(&spec.gguf, &spec.decoder, 1, args.context)?;
    spec.decoder.kv_budget_bytes =
        ((probe.kv_bytes_per_sequence as usize) * max_clients * 5).div_ceil(4);
    let rt = runtime::Runtime::builder()
        .threads(args.threads)
        .without_local_model()
        .generative(spec)
        .build()?;
    rt.load(&args.model)?;
    let handle = rt.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let tokio_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        tokio_rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(l, app::app(rt)).await.expect("serve");
        });
    });
    Ok((addr, handle))
}

struct Llama(Child);
impl Drop for Llama {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_llama(args: &Args, np: usize) -> Result<(Llama, String), Box<dyn std::error::Error>> {
    let bin = match &args.llama_bin {
        Some(b) => b.clone(),
        None => {
            let out = Command::new("bash")
                .args(["scripts/llama-cpp.sh", "--print"])
                .output()?;
            if !out.status.success() {
                return Err("llama.cpp is not built: run bash scripts/llama-cpp.sh".into());
            }
            PathBuf::from(String::from_utf8(out.stdout)?.trim())
        }
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let gguf = models::gguf_path(&args.model)?;
    let child = Command::new(bin.join("llama-server"))
        .arg("-m")
        .arg(&gguf)
        .args(["-np", &np.to_string(), "-t", &args.threads.to_string()])
        .args(["-c", &(args.context * np).to_string()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(if args.llama_no_repack {
            &["--no-repack"][..]
        } else {
            &[][..]
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut llama = Llama(child);
    let base = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    loop {
        if let Ok(Some(status)) = llama.0.try_wait() {
            return Err(format!("llama-server exited at start: {status}").into());
        }
        if let Ok(r) = ureq::get(format!("{base}/health")).call() {
            if r.status().as_u16() == 200 {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err("llama-server did not become healthy in 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((llama, base))
}

fn print(name: &str, clients: usize, f: &Figures) {
    println!(
        "{name:<14} {clients:>3} clients  {:>7.1} tok/s  TTFT p50 {:>7.0} ms p99 {:>7.0} ms  inter-token p50 {:>6.1} ms p99 {:>7.1} ms  ({} answers)",
        f.tokens_per_s, f.ttft.0, f.ttft.1, f.itl.0, f.itl.1, f.counted
    );
}

/// Peak RSS growth since start-up beside what the runtime planned for: the
/// ledger's high-water mark (weights and scratch reserved at load, and the
/// KV the running sequences hold: each its length so far and up to
/// `KV_GROW_TOKENS` more).
fn memory(rt: &runtime::Runtime, base_rss: u64) {
    let Some((_, peak)) = snug::process_memory() else {
        return;
    };
    let st = rt.status();
    let planned = st.ledger.high_water;
    let grown = peak.saturating_sub(base_rss);
    let g = &st.generative[0];
    println!(
        "snug memory: peak RSS growth {:.1} MiB, planned (ledger high water) {:.1} MiB: plan / peak {:.2}; KV admitted now {} B, preempted {}",
        grown as f64 / 1048576.0,
        planned as f64 / 1048576.0,
        planned as f64 / grown.max(1) as f64,
        g.kv_bytes_admitted,
        g.preempted
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let max_clients = args.clients.iter().copied().max().unwrap_or(8);
    // Peak RSS from here on is the runtime's (and this program's clients').
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (base_rss, _) = snug::process_memory().ok_or("no /proc/self/status")?;
    let (snug, rt) = start_snug(&args, max_clients, 32 << 20)?;
    let snug_base = format!("http://{snug}");
    eprintln!("snug serving {} on {snug_base}", args.model);
    for &clients in &args.clients {
        let s = run_clients(
            &snug_base,
            &args.model,
            clients,
            args.requests,
            args.seed,
            Some(&args.model),
        )?;
        print("snug", clients, &s);
        memory(&rt, base_rss);
        if args.no_llama {
            continue;
        }
        let (llama, base) = start_llama(&args, 8)?;
        let l = run_clients(&base, &args.model, clients, args.requests, args.seed, None)?;
        drop(llama);
        print("llama-server", clients, &l);
        println!(
            "ratio snug / llama-server at {clients} clients: tokens/s {:.2}, TTFT p99 {:.2}",
            s.tokens_per_s / l.tokens_per_s,
            s.ttft.1 / l.ttft.1
        );
    }
    if args.shared_system_words > 0 {
        shared_prefix(&args, &snug_base, &rt)?;
    }
    Ok(())
}

/// Eight clients with one shared system prompt: snug with prefix reuse
/// beside snug without it (a second server), the same chats.
fn shared_prefix(
    args: &Args,
    base: &str,
    rt: &runtime::Runtime,
) -> Result<(), Box<dyn std::error::Error>> {
    const CLIENTS: usize = 8;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let system: Vec<&str> = (0..args.shared_system_words)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect();
    let system = format!(
        "You are a helpful assistant. Background: {}",
        system.join(" ")
    );
    let chats: Vec<(String, usize)> = (0..CLIENTS * args.requests)
        .map(|i| (format!("Question {i}: what is this about?"), 32))
        .collect();
    let (off_addr, off_rt) = start_snug(args, CLIENTS, 0)?;
    let off_base = format!("http://{off_addr}");
    let stat = |rt: &runtime::Runtime| rt.status().generative[0].clone();
    let before = stat(rt);
    let on = run_chats(
        base,
        &args.model,
        Some(&system),
        chats.clone(),
        CLIENTS,
        Some(&args.model),
    )?;
    let after = stat(rt);
    let off_before = stat(&off_rt);
    let off = run_chats(
        &off_base,
        &args.model,
        Some(&system),
        chats,
        CLIENTS,
        Some(&args.model),
    )?;
    let off_after = stat(&off_rt);
    let computed = after.prompt_tokens - before.prompt_tokens;
    let saved = after.prefix_tokens_saved - before.prefix_tokens_saved;
    let off_computed = off_after.prompt_tokens - off_before.prompt_tokens;
    println!(
        "shared system prompt, {CLIENTS} clients x {} chats: prefix reuse on: TTFT p50 {:.0} ms p99 {:.0} ms, {computed} prompt tokens computed, {saved} reused ({} hits of {} lookups); off: TTFT p50 {:.0} ms p99 {:.0} ms, {off_computed} computed; TTFT p50 ratio on/off {:.2}",
        args.requests,
        on.ttft.0,
        on.ttft.1,
        after.prefix_hits - before.prefix_hits,
        after.prefix_lookups - before.prefix_lookups,
        off.ttft.0,
        off.ttft.1,
        on.ttft.0 / off.ttft.0
    );
    Ok(())
}
