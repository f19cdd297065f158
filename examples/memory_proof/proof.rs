//! The runtime under real kernel memory limits: each run is a child process
//! placed in a fresh memory cgroup (v1 `memory.limit_in_bytes`, or v2
//! `memory.max`) before it starts, that builds the runtime as a user would
//! (the machine detected, MiniLM found on disk), embeds a workload and
//! reports who served it; the parent reads the cgroup's peak and OOM-kill
//! count. Shared by `examples/memory_proof.rs` and `tests/memory_proof.rs`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The line a child prints its report on.
const REPORT: &str = "MEMORY-PROOF ";

/// What a child reports.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    /// Tier that served the last request (`small`, `rule_based`, ...).
    pub tier: String,
    /// Backend that served it (`minilm`, `rule-based`, ...).
    pub backend: String,
    /// The variant (format) the model loaded in, if it loaded.
    pub variant: Option<String>,
    /// Peak resident memory of the process (`VmHWM`), bytes.
    pub peak_rss: u64,
    /// Texts embedded.
    pub texts: usize,
    /// The effective total the runtime saw (cgroup-aware), bytes.
    pub memory_total: u64,
}

/// One run's outcome.
#[derive(Debug, Clone)]
pub struct Run {
    /// The limit, bytes.
    pub limit: u64,
    /// The child's report (absent when it died).
    pub report: Option<ChildReport>,
    /// The cgroup's peak usage, bytes (includes page cache).
    pub cgroup_peak: Option<u64>,
    /// OOM kills the cgroup counted.
    pub oom_kills: u64,
    /// How the child ended, in words.
    pub exit: String,
    /// What the child printed.
    pub stdout: String,
}

impl Run {
    /// Whether the local model served.
    pub fn local(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.tier == "small")
    }
}

/// The cgroup interface this machine offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `/sys/fs/cgroup/memory/` (legacy).
    V1,
    /// `/sys/fs/cgroup/` with `cgroup.controllers` (unified).
    V2,
}

/// Which cgroup interface can be used here, or why none can.
pub fn cgroup_version() -> Result<Version, String> {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to this process's effective user.
    let uid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    if uid != 0 {
        return Err("making a memory cgroup needs root (CI runs as root); run as root".into());
    }
    if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        || Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists()
    {
        return Ok(Version::V1);
    }
    let controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map_err(|e| format!("no cgroup v1 memory hierarchy and no cgroup v2 root: {e}"))?;
    if controllers.split_whitespace().any(|c| c == "memory") {
        Ok(Version::V2)
    } else {
        Err("cgroup v2 without the memory controller at the root".into())
    }
}

struct Cgroup {
    dir: PathBuf,
    version: Version,
}

impl Cgroup {
    fn create(version: Version, name: &str, limit: u64) -> Result<Cgroup, String> {
        let dir = match version {
            Version::V1 => PathBuf::from("/sys/fs/cgroup/memory").join(name),
            Version::V2 => PathBuf::from("/sys/fs/cgroup").join(name),
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cg = Cgroup { dir, version };
        let write = |file: &str, value: &str| -> Result<(), String> {
            std::fs::write(cg.dir.join(file), value)
                .map_err(|e| format!("writing {value} to {}/{file}: {e}", cg.dir.display()))
        };
        match version {
            Version::V1 => {
                write("memory.limit_in_bytes", &limit.to_string())?;
                // No swap either, where the kernel accounts it.
                if cg.dir.join("memory.memsw.limit_in_bytes").exists() {
                    write("memory.memsw.limit_in_bytes", &limit.to_string())?;
                }
            }
            Version::V2 => {
                write("memory.max", &limit.to_string())?;
                if cg.dir.join("memory.swap.max").exists() {
                    write("memory.swap.max", "0")?;
                }
            }
        }
        Ok(cg)
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(file)).ok()
    }

    fn peak(&self) -> Option<u64> {
        let file = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        self.read(file)?.trim().parse().ok()
    }

    fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        self.read(file)
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// Runs `exe args` in a fresh cgroup limited to `limit` bytes: the child is
/// moved into the cgroup by a shell before it `exec`s the program, so all
/// of its memory is charged there.
pub fn run_limited(
    version: Version,
    limit: u64,
    exe: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Result<Run, String> {
    let name = format!("snug-proof-{}-{}", std::process::id(), limit >> 20);
    let cg = Cgroup::create(version, &name, limit)?;
    let script = format!("echo $$ > '{}' && exec \"$0\" \"$@\"", cg.procs().display());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .find_map(|l| l.strip_prefix(REPORT))
        .and_then(|j| serde_json::from_str::<ChildReport>(j).ok());
    let exit = match out.status.code() {
        Some(0) => "ok".to_string(),
        Some(c) => format!(
            "exit {c}: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        None => {
            use std::os::unix::process::ExitStatusExt as _;
            format!("killed by signal {}", out.status.signal().unwrap_or(0))
        }
    };
    Ok(Run {
        limit,
        report,
        cgroup_peak: cg.peak(),
        oom_kills: cg.oom_kills(),
        exit,
        stdout: stdout.into_owned(),
    })
}

/// The words the children's texts are made of.
const WORDS: [&str; 20] = [
    "memory",
    "limits",
    "small",
    "container",
    "model",
    "serves",
    "requests",
    "quietly",
    "without",
    "falling",
    "over",
    "when",
    "pressure",
    "rises",
    "and",
    "the",
    "kernel",
    "counts",
    "every",
    "page",
];

/// The child's work: build the runtime as a user would, embed `texts`
/// sentences of about twenty words in requests of eight, and print the
/// report line.
pub fn child(texts: usize) -> Result<(), Box<dyn std::error::Error>> {
    let rt = runtime::Runtime::builder().build()?;
    let sentences: Vec<String> = (0..texts)
        .map(|i| {
            (0..20)
                .map(|j| WORDS[(i * 7 + j * 3) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
                + &format!(" {i}")
        })
        .collect();
    let mut last = None;
    for chunk in sentences.chunks(8) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        last = Some(rt.embed(&refs)?);
    }
    let last = last.ok_or("no texts to embed")?;
    let variant = rt
        .status()
        .models
        .into_iter()
        .find(|m| m.name == runtime::MINILM)
        .and_then(|m| m.variant);
    let tier = match last.tier {
        Some(runtime::router::Tier::Small) => "small",
        Some(runtime::router::Tier::RuleBased) => "rule_based",
        Some(t) => return Err(format!("unexpected tier {t:?}").into()),
        None => "cache",
    };
    let report = ChildReport {
        tier: tier.to_string(),
        backend: last.backend.unwrap_or_default(),
        variant,
        peak_rss: vm_hwm().unwrap_or(0),
        texts,
        memory_total: rt.plan().memory_total,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{REPORT}{}", serde_json::to_string(&report)?)?;
    out.flush()?;
    Ok(())
}

/// `VmHWM` of this process, bytes.
pub fn vm_hwm() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Checks the two promises over `runs`: no OOM kill and every child ended
/// well at every limit; the local model served at every limit at least
/// `factor` times the smallest peak measured with a format that served.
/// Returns the failures, in words.
pub fn check(runs: &[Run], factor: f64) -> Vec<String> {
    let mut failures = Vec::new();
    for r in runs {
        if r.oom_kills > 0 {
            failures.push(format!("{} MiB: {} OOM kills", r.limit >> 20, r.oom_kills));
        }
        if r.exit != "ok" || r.report.is_none() {
            failures.push(format!("{} MiB: child {}", r.limit >> 20, r.exit));
        }
    }
    let smallest_peak = runs
        .iter()
        .filter(|r| r.local())
        .filter_map(|r| r.report.as_ref().map(|c| c.peak_rss))
        .min();
    match smallest_peak {
        None => failures.push("the local model served at no limit".into()),
        Some(peak) => {
            for r in runs {
                if r.limit as f64 >= factor * peak as f64 && !r.local() {
                    failures.push(format!(
                        "{} MiB is at least {factor} x the peak of {} MiB, yet {} served",
                        r.limit >> 20,
                        peak >> 20,
                        r.report.as_ref().map_or("nothing", |c| c.backend.as_str())
                    ));
                }
            }
        }
    }
    failures
}

/// The table: limit -> served by / format / peaks / OOM kills.
pub fn table(runs: &[Run]) -> String {
    let mut s = String::from(
        "| limit | served by | format | process peak (VmHWM) | cgroup peak | OOM kills | exit |\n|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let (by, format, peak) = match &r.report {
            Some(c) => (
                format!("{} ({})", c.backend, c.tier),
                c.variant.clone().unwrap_or_else(|| "-".into()),
                format!("{:.1} MiB", c.peak_rss as f64 / 1048576.0),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        s.push_str(&format!(
            "| {} MiB | {by} | {format} | {peak} | {} | {} | {} |\n",
            r.limit >> 20,
            r.cgroup_peak
                .map_or("-".into(), |p| format!("{:.1} MiB", p as f64 / 1048576.0)),
            r.oom_kills,
            r.exit
        ));
    }
    s
}

/// The line a generation child prints its report on.
const GEN_REPORT: &str = "GENERATION-PROOF ";

/// What a generation child reports.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GenReport {
    /// Clients that got a final event.
    pub answered: usize,
    /// Of those, served by the local decoder (any finish reason).
    pub local: usize,
    /// Of those, answered by the rule-based tier.
    pub rule_based: usize,
    /// Finish reasons and how many of each, in words (`length: 14`).
    pub reasons: Vec<(String, usize)>,
    /// The most sequences seen running at once.
    pub max_running: usize,
    /// KV bytes one request of the workload reserves (seen while exactly
    /// one ran; 0 when never seen).
    pub kv_per_sequence: u64,
    /// Sequences preempted under critical pressure.
    pub preempted: u64,
    /// Peak resident memory of the process (`VmHWM`), bytes.
    pub peak_rss: u64,
    /// The effective total the runtime saw (cgroup-aware), bytes.
    pub memory_total: u64,
    /// The first final event's error, if any had one.
    pub first_error: Option<String>,
    /// Seconds the whole workload took.
    pub secs: f64,
}

/// The generation child: builds the runtime as a user would, with
/// SmolLM2-135M registered, and sends `clients` concurrent completions
/// (a prompt of about `prompt_words` words, `max_tokens` each); waits for
/// every final event and prints the report line. A completion may wait
/// up to ten minutes for room (`max_queue_wait`): the limit decides how
/// many run at once, and the others wait their turn.
pub fn generate_child(
    clients: usize,
    prompt_words: usize,
    max_tokens: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    const MODEL: &str = "smollm2-135m";
    let mut spec = runtime::GenerativeSpec::fetched(MODEL, runtime::router::Tier::Small)?;
    spec.engine.max_queue_wait = Duration::from_secs(600);
    let rt = runtime::Runtime::builder()
        .without_local_model()
        .generative(spec)
        .build()?;
    // The generation prompts use the first seventeen.
    let words = &WORDS[..17];
    let generations: Vec<_> = (0..clients)
        .map(|i| {
            let text: Vec<&str> = (0..prompt_words)
                .map(|j| words[(i * 5 + j * 3) % words.len()])
                .collect();
            let req = runtime::GenerateRequest::text(format!("{} {i}", text.join(" ")))
                .max_tokens(max_tokens);
            rt.generate(MODEL, req)
        })
        .collect::<Result<_, _>>()?;
    let start = std::time::Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (max_running, kv_per_sequence) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut most = 0;
            let mut kv = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                if let Some(g) = rt.status().generative.first() {
                    most = most.max(g.running);
                    if g.running == 1 {
                        kv = kv.max(g.kv_bytes_admitted);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (most, kv)
        });
        let finals: Vec<_> = generations.into_iter().map(|g| g.wait()).collect();
        done.store(true, std::sync::atomic::Ordering::Release);
        let seen = watcher.join().unwrap_or((0, 0));
        (finals, seen)
    });
    let (finals, (max_running, kv_per_sequence)) = (max_running, kv_per_sequence);
    let mut reasons: Vec<(String, usize)> = Vec::new();
    let mut report = GenReport {
        answered: finals.len(),
        max_running,
        kv_per_sequence,
        ..GenReport::default()
    };
    report.secs = start.elapsed().as_secs_f64();
    report.first_error = finals.iter().find_map(|c| c.finished.error.clone());
    for c in &finals {
        match c.finished.served.tier {
            runtime::router::Tier::RuleBased => report.rule_based += 1,
            _ => report.local += 1,
        }
        let r = format!("{:?}", c.finished.reason).to_lowercase();
        match reasons.iter_mut().find(|(k, _)| *k == r) {
            Some((_, n)) => *n += 1,
            None => reasons.push((r, 1)),
        }
    }
    reasons.sort();
    report.reasons = reasons;
    report.preempted = rt.status().generative.first().map_or(0, |g| g.preempted);
    report.peak_rss = vm_hwm().unwrap_or(0);
    report.memory_total = rt.plan().memory_total;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{GEN_REPORT}{}", serde_json::to_string(&report)?)?;
    out.flush()?;
    Ok(())
}

/// A generation child's report from its output.
pub fn gen_report(stdout: &str) -> Option<GenReport> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(GEN_REPORT))
        .and_then(|j| serde_json::from_str(j).ok())
}
