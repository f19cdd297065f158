//! Estimates against measurement: each case runs in a fresh child process
//! that builds the runtime with one format, measures the peak resident
//! growth and the peak growth of the bytes allocated (a counting allocator),
//! and prints both beside the estimate, with the estimate's ratio to each
//! (to the bytes allocated for requests only: a load's peak is mostly mapped
//! file pages).
//!
//! The peak resident growth is the larger of two readings:
//!
//! - `VmHWM` after resetting it through `/proc/self/clear_refs`. The kernel
//!   updates that high-water mark only at some events (an unmap, the
//!   reset), so a peak given back by other means (malloc trimming a heap
//!   with `madvise`) can go unseen: alone it reads some small requests at a
//!   fraction of what they allocate.
//! - The exact resident set (`VmRSS`, which this kernel sums over its
//!   per-CPU counters) read before **every** free and shrinking `realloc`
//!   while the case runs, and once after it. Resident memory only falls
//!   inside such calls (munmap of a mapped chunk, a heap trim), so the
//!   largest of these readings is the peak; `--no-sample` leaves them out
//!   (each costs a read of `/proc/self/status`).
//!
//! Two kinds of case:
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
//! cargo run --release --example estimate_truth -- --mmap-threshold 32768
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use clap::Parser;
use runtime::{Runtime, RuntimeConfig};

/// The system allocator, counting the bytes live and their peak, so that
/// each case also reports the peak of what the code allocated (heap only:
/// mapped file pages are not allocations) beside the resident growth.
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counters are
// only observed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live =
                LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sample_resident();
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A realloc may move the block (freeing the old one) or shrink it.
        sample_resident();
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = (new_size - layout.size()) as u64;
                let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub((layout.size() - new_size) as u64, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Whether frees sample the resident set (only while a case runs).
static SAMPLING: AtomicBool = AtomicBool::new(false);
/// The largest resident set sampled, kB.
static SAMPLED_KIB: AtomicU64 = AtomicU64::new(0);

/// `VmRSS` now, kB, read from `/proc/self/status` without allocating (it
/// runs inside the allocator). `None` when the file cannot be read.
fn resident_kib_now() -> Option<u64> {
    let mut buf = [0u8; 4096];
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/status".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    let mut len = 0;
    while len < buf.len() {
        // SAFETY: reads into the unfilled rest of `buf`.
        let n = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    let text = &buf[..len];
    let at = text.windows(6).position(|w| w == b"VmRSS:")? + 6;
    let digits = text[at..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit());
    let mut kib = 0u64;
    for d in digits {
        kib = kib * 10 + u64::from(d - b'0');
    }
    Some(kib)
}

/// While a case runs: records the resident set before memory may be given
/// back (see the module docs).
#[inline]
fn sample_resident() {
    if SAMPLING.load(Ordering::Relaxed) {
        if let Some(kib) = resident_kib_now() {
            SAMPLED_KIB.fetch_max(kib, Ordering::Relaxed);
        }
    }
}

/// Runs `f` as a measured case: the peak resident growth in bytes over the
/// resident set at its start (the larger of `VmHWM` and the sampled exact
/// readings), `VmHWM`'s reading alone, and `f`'s result.
fn measure<T>(sample: bool, f: impl FnOnce() -> T) -> Result<(u64, u64, T), AnyError> {
    std::fs::write("/proc/self/clear_refs", "5")?;
    let base = resident_kib_now().ok_or("no /proc/self/status")? * 1024;
    SAMPLED_KIB.store(0, Ordering::Relaxed);
    SAMPLING.store(sample, Ordering::Relaxed);
    let out = f();
    SAMPLING.store(false, Ordering::Relaxed);
    let (now, hwm) = snug::process_memory().ok_or("no /proc/self/status")?;
    let sampled = (SAMPLED_KIB.load(Ordering::Relaxed) * 1024).max(now);
    let by_hwm = hwm.saturating_sub(base);
    Ok((sampled.max(hwm).saturating_sub(base), by_hwm, out))
}

/// Starts a peak measurement: returns the bytes live now. The heap is
/// trimmed first (free pages returned to the OS), so that the growth is what
/// the case needs and is not hidden by free memory earlier work left
/// resident: the estimates are bounds for that worst case.
fn reset_peak() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

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
    /// malloc's mmap threshold the runtime fixes, in bytes
    /// (`RuntimeConfig::mmap_threshold`); the runtime's default when not given.
    #[arg(long)]
    mmap_threshold: Option<usize>,
    /// Read the peak from `VmHWM` only, without sampling the resident set
    /// before each free.
    #[arg(long)]
    no_sample: bool,
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
    /// `VmHWM`'s growth alone.
    hwm: u64,
    /// Peak growth of the bytes allocated (heap, no mapped file pages).
    allocated: u64,
    tokens: u64,
}

fn texts(batch: usize, words: usize) -> Vec<String> {
    // Exactly `words` words each, distinct per text.
    snug::sentences(batch, 7 + words as u64, words, words)
}

fn runtime(format: &str, mmap_threshold: Option<usize>) -> Result<Runtime, AnyError> {
    let format: quant::Format = format.parse()?;
    let defaults = RuntimeConfig::default();
    let config = RuntimeConfig {
        mmap_threshold: mmap_threshold.unwrap_or(defaults.mmap_threshold),
        format: Some(format),
        formats: vec![format],
        // The largest cases take longer than the default 30 s; a timeout
        // would hand them to the fallback tier.
        request_timeout: std::time::Duration::from_secs(900),
        // `SNUG_RELEASE_FREED_MEMORY=0` leaves malloc's threshold as glibc
        // moves it, to see what the estimates meet without the fix.
        release_freed_memory: std::env::var("SNUG_RELEASE_FREED_MEMORY").as_deref() != Ok("0"),
        ..defaults
    };
    Ok(Runtime::builder()
        .config(config)
        .minilm(models::model_dir()?)
        .build()?)
}

fn child(args: &Args, kind: &str) -> Result<(), AnyError> {
    let dir = models::model_dir()?;
    let rt = runtime(&args.format, args.mmap_threshold)?;
    let case = match kind {
        "load" => {
            let e = runtime::minilm_estimate(&dir, args.format.parse()?, 1)?;
            let estimate = e.load_peak.max(e.weights) + e.overhead;
            let live = reset_peak();
            let (measured, hwm, loaded) = measure(!args.no_sample, || rt.load(runtime::MINILM))?;
            loaded?;
            Case {
                estimate,
                measured,
                hwm,
                allocated: PEAK.load(Ordering::Relaxed).saturating_sub(live),
                tokens: 0,
            }
        }
        "request" => {
            rt.load(runtime::MINILM)?;
            // Requests first, as in a serving process: threads, pools and
            // the tokenizer are warm and the code paths of long and batched
            // inputs have run once (their pages of the binary are resident,
            // which is not the request's memory). Other texts than the
            // measured ones, so the cache does not answer them.
            for (batch, words) in [(1, 200), (8, 60)] {
                let warm = snug::sentences(batch, 1_000 + words as u64, words, words);
                let refs: Vec<&str> = warm.iter().map(String::as_str).collect();
                rt.embed(&refs)?;
            }
            let texts = texts(args.batch, args.word_count);
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let est = rt.estimate(&refs)?;
            let live = reset_peak();
            let (measured, hwm, out) = measure(!args.no_sample, || rt.embed(&refs))?;
            let out = out?;
            let allocated = PEAK.load(Ordering::Relaxed).saturating_sub(live);
            if out.tier != Some(runtime::router::Tier::Small) {
                return Err(format!("served by {:?}, not the model", out.tier).into());
            }
            Case {
                estimate: est.estimate.bytes,
                measured,
                hwm,
                allocated,
                tokens: est.tokens,
            }
        }
        other => return Err(format!("unknown child kind {other:?}").into()),
    };
    println!("CASE {}", serde_json::to_string(&case)?);
    Ok(())
}

fn run_child(args: &Args, extra: &[String]) -> Result<Case, AnyError> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(extra);
    if let Some(t) = args.mmap_threshold {
        cmd.arg("--mmap-threshold").arg(t.to_string());
    }
    if args.no_sample {
        cmd.arg("--no-sample");
    }
    let out = cmd.output()?;
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
    println!(
        "| case | tokens | estimate | measured | estimate / measured | VmHWM alone | allocated | estimate / allocated |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (mut worst_low, mut worst_high) = (f64::INFINITY, 0f64);
    let (mut alloc_low, mut alloc_high) = (f64::INFINITY, 0f64);
    let mut report = |name: String, c: &Case, request: bool| {
        let ratio = c.estimate as f64 / c.measured.max(1) as f64;
        worst_low = worst_low.min(ratio);
        worst_high = worst_high.max(ratio);
        // Against the bytes allocated (exact): requests only, as a load's
        // peak is mostly mapped file pages, which are not allocations.
        let by_alloc = if request {
            let r = c.estimate as f64 / c.allocated.max(1) as f64;
            alloc_low = alloc_low.min(r);
            alloc_high = alloc_high.max(r);
            format!("{r:.3}")
        } else {
            "—".to_string()
        };
        println!(
            "| {name} | {} | {:.2} MiB | {:.2} MiB | {ratio:.2} | {:.2} MiB | {:.2} MiB | {by_alloc} |",
            c.tokens,
            mib(c.estimate),
            mib(c.measured),
            mib(c.hwm),
            mib(c.allocated)
        );
    };
    for f in &args.formats {
        let c = run_child(
            &args,
            &[
                "--child".into(),
                "load".into(),
                "--format".into(),
                f.clone(),
            ],
        )?;
        let label = runtime::variant_label(f.parse()?);
        report(format!("load {label}"), &c, false);
        for &w in &args.words {
            for &b in &args.batches {
                let c = run_child(
                    &args,
                    &[
                        "--child".into(),
                        "request".into(),
                        "--format".into(),
                        f.clone(),
                        "--batch".into(),
                        b.to_string(),
                        "--word-count".into(),
                        w.to_string(),
                    ],
                )?;
                report(format!("{label} {b} x {w} words"), &c, true);
            }
        }
    }
    println!("\nestimate / measured: lowest {worst_low:.2}, highest {worst_high:.2} (goal: 1.00 to 1.15)");
    println!("requests, estimate / allocated: lowest {alloc_low:.3}, highest {alloc_high:.3}");
    Ok(())
}
