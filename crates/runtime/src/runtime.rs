//! The [`Runtime`]: detect → plan → load within budget → serve → report,
//! clean up in an emergency, re-plan.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::model::{LoadEvent, MiniLmVariants, ModelSpec};
use crate::plan::Plan;
use crate::registry::{ModelStatus, Registry};

/// The name the bundled all-MiniLM-L6-v2 is registered under.
pub const MINILM: &str = "minilm";

type Cache = feature_cache::FeatureCache<String, Arc<Vec<f32>>>;
type EmbedRouter = tier_router::Router<[String], Vec<Vec<f32>>>;

/// Builds a [`Runtime`]: every choice the plan makes can be overridden.
#[derive(Debug, Default)]
pub struct RuntimeBuilder {
    config: RuntimeConfig,
    profile: Option<hw_detect::HardwareProfile>,
    probe: Option<Arc<dyn hw_detect::MemoryProbe>>,
    minilm_dir: Option<PathBuf>,
    with_minilm: bool,
    models: Vec<ModelSpec>,
}

impl RuntimeBuilder {
    /// Uses `config` instead of the defaults.
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    /// Plans for `profile` instead of detecting this machine.
    pub fn profile(mut self, profile: hw_detect::HardwareProfile) -> Self {
        self.profile = Some(profile);
        self
    }

    /// Reads live memory through `probe` instead of the machine (tests, and
    /// programs that account memory their own way).
    pub fn memory_probe(mut self, probe: Arc<dyn hw_detect::MemoryProbe>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Registers the bundled all-MiniLM-L6-v2 from `dir` under [`MINILM`]
    /// and serves `embed` with it. Without this, `build` registers it from
    /// [`models::model_dir`] when that finds the files.
    pub fn minilm(mut self, dir: impl Into<PathBuf>) -> Self {
        self.minilm_dir = Some(dir.into());
        self.with_minilm = true;
        self
    }

    /// Serves without a local model: only the remote and rule-based tiers.
    pub fn without_local_model(mut self) -> Self {
        self.with_minilm = false;
        self.minilm_dir = None;
        self.models.clear();
        self
    }

    /// Registers another model.
    pub fn model(mut self, spec: ModelSpec) -> Self {
        self.models.push(spec);
        self
    }

    /// The weight format of local models (overrides the quant policy).
    pub fn format(mut self, format: quant::Format) -> Self {
        self.config.format = Some(format);
        self
    }

    /// Compute threads (overrides `affinity::recommended_threads`).
    pub fn threads(mut self, threads: usize) -> Self {
        self.config.threads = Some(threads);
        self
    }

    /// Bytes the model budget allows (overrides the hardware table).
    pub fn max_model_bytes(mut self, bytes: u64) -> Self {
        self.config.budget.max_model = Some(bytes);
        self
    }

    /// A remote OpenAI-compatible embeddings server as a fallback tier.
    pub fn remote(mut self, remote: tier_router::RemoteConfig) -> Self {
        self.config.remote = Some(remote);
        self
    }

    /// Detects, plans and starts the runtime.
    pub fn build(self) -> Result<Runtime> {
        Runtime::start(self)
    }
}

pub(crate) struct Inner {
    config: RuntimeConfig,
    profile: hw_detect::HardwareProfile,
    plan: Mutex<Plan>,
    registry: Arc<Registry>,
    monitor: mem_budget::PressureMonitor,
    cache: Cache,
    pool: buffer_pool::BufferPool,
    router: EmbedRouter,
    default_model: Option<String>,
    dim: usize,
    last_emergency: Mutex<Option<Instant>>,
    stop: Arc<AtomicBool>,
    background: Mutex<Vec<JoinHandle<()>>>,
    monitor_thread: Mutex<Option<mem_budget::MonitorThread>>,
}

/// The snug runtime: one per program, shared by reference or clone (it is
/// an `Arc` inside).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("class", &self.inner.profile.class)
            .field("models", &self.inner.registry.names())
            .finish_non_exhaustive()
    }
}

/// Embeddings for a request, and how they were served.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Embeddings {
    /// One unit vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Texts answered from the cache.
    pub cache_hits: usize,
    /// The tier that served the rest (`None` when all were cached).
    pub tier: Option<tier_router::Tier>,
    /// The backend that served the rest.
    pub backend: Option<String>,
    /// What happened at each tier, in words (empty when all were cached).
    pub trail: Vec<String>,
}

/// Options of one `embed` call.
#[derive(Debug, Clone, Default)]
pub struct EmbedOptions {
    /// Deadline (default: the configured request timeout).
    pub timeout: Option<Duration>,
}

/// Throttling risks in [`Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Throttling {
    /// Memory in use above 85% of the effective total.
    pub memory_critical: bool,
    /// CPU busy above 90%.
    pub cpu_maxed: bool,
    /// A thermal zone near its trip point.
    pub thermal_likely: bool,
}

/// A snapshot of the runtime and the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// CPU busy since the previous status, percent (unknown on the first).
    pub cpu_percent: Option<f64>,
    /// Effective memory in use, percent.
    pub memory_percent: f64,
    /// Effective memory available, bytes.
    pub available_bytes: u64,
    /// The pressure level.
    pub pressure: mem_budget::PressureLevel,
    /// Throttling risks.
    pub throttling: Throttling,
    /// Registered models.
    pub models: Vec<ModelStatus>,
    /// The ledger's accounting.
    pub ledger: mem_budget::LedgerStats,
    /// The embedding cache.
    pub cache: feature_cache::CacheStats,
    /// The scratch buffer pool.
    pub pool: buffer_pool::Stats,
    /// Resident memory of this process, bytes (Linux).
    pub process_rss: Option<u64>,
    /// What to do now.
    pub recommended_action: String,
}

/// What `emergency_cleanup` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CleanupReport {
    /// Resident memory before, bytes (Linux; else 0).
    pub rss_before: u64,
    /// Resident memory after, bytes.
    pub rss_after: u64,
    /// Cache entries dropped.
    pub cache_entries_cleared: usize,
    /// Bytes the cache held before.
    pub cache_bytes_cleared: u64,
    /// Bytes the pool released.
    pub pool_bytes_released: u64,
    /// Models unloaded.
    pub models_unloaded: Vec<String>,
    /// Bytes of reservations released by unloading.
    pub reserved_bytes_released: u64,
}

/// What `reoptimize` decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Reoptimized {
    /// The plan already suits the memory free now.
    Optimal,
    /// The plan changed.
    Adjusted {
        /// The plan before.
        previous: Box<Plan>,
        /// The plan now.
        new: Box<Plan>,
    },
}

/// The pre-flight answer for a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestEstimate {
    /// Texts in the request.
    pub texts: usize,
    /// Tokens in all (after truncation).
    pub tokens: u64,
    /// Tokens of the longest text.
    pub longest: u64,
    /// The memory estimate against the room left now.
    pub estimate: mem_budget::Estimate,
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// Returns freed heap memory to the OS where the allocator allows.
fn release_to_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap and takes its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Runtime {
    /// A builder with the defaults: detect the machine, plan from it.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            with_minilm: true,
            ..RuntimeBuilder::default()
        }
    }

    fn start(b: RuntimeBuilder) -> Result<Runtime> {
        let config = b.config;
        let profile = match b.profile {
            Some(p) => p,
            None => hw_detect::HardwareProfile::detect()?,
        };
        let probe: Arc<dyn hw_detect::MemoryProbe> = b
            .probe
            .unwrap_or_else(|| Arc::new(hw_detect::Detector::new()));
        let budget_config = mem_budget::BudgetConfig {
            overrides: config.budget,
            ..Default::default()
        };
        let budget = budget_config.budget(profile.class, profile.memory.effective_total);
        let ledger = mem_budget::MemoryLedger::with_config(
            budget,
            Arc::clone(&probe),
            mem_budget::LedgerConfig::default(),
        );
        let monitor = mem_budget::PressureMonitor::new(Arc::clone(&probe), config.pressure.clone());
        if let Err(e) = monitor.check_now() {
            tracing::warn!(error = %e, "first pressure reading failed");
        }

        let mut plan = initial_plan(&profile, &config, budget, &ledger);

        // Compute threads: rayon's global pool (candle's) pinned per plan.
        if config.configure_global_pool {
            let affinity_config = affinity::AffinityConfig {
                strategy: config.pin.clone(),
                threads: Some(plan.threads),
                ..affinity::AffinityConfig::default()
            };
            match affinity::Placement::plan(&profile, &affinity_config) {
                Ok(placement) => {
                    plan.pinning = format!(
                        "{:?} on CPUs {}: {}",
                        placement.strategy, placement.cpus, placement.reason
                    );
                    match placement.build_global() {
                        Ok(outcomes) => {
                            let pinned = outcomes
                                .iter()
                                .filter(|o| matches!(o, affinity::PinOutcome::Pinned { .. }))
                                .count();
                            plan.reasons.push(format!(
                                "{pinned} of {} compute threads pinned",
                                outcomes.len()
                            ));
                        }
                        Err(e) => plan
                            .reasons
                            .push(format!("global thread pool left as it was: {e}")),
                    }
                }
                Err(e) => plan.reasons.push(format!("threads unpinned: {e}")),
            }
        }

        let cache = feature_cache::FeatureCache::builder()
            .capacity(plan.cache_bytes)
            .default_ttl(config.cache_ttl)
            .weigher(|k: &String, v: &Arc<Vec<f32>>| (k.len() + v.len() * 4 + 96) as u64)
            .build()?;
        let pool = buffer_pool::BufferPool::new(buffer_pool::BufferPoolConfig {
            total_budget_bytes: plan.pool_bytes as usize,
            pools: vec![buffer_pool::NamedPoolConfig::new(
                "scratch",
                plan.pool_bytes as usize,
            )],
            ..buffer_pool::BufferPoolConfig::default()
        })?;

        let registry = Arc::new(Registry::new(ledger.clone(), config.batch.clone()));
        registry.set_batch_tokens(plan.batch_tokens);

        // Models: the bundled MiniLM (from the builder, or found on disk) and any others.
        let mut default_model = None;
        let minilm_dir = match (b.with_minilm, b.minilm_dir) {
            (true, Some(dir)) => Some(dir),
            (true, None) => models::model_dir().ok(),
            (false, _) => None,
        };
        if let Some(dir) = minilm_dir {
            let mut formats = vec![plan.format];
            formats.extend(plan.fallback_formats.iter().copied());
            let variants = MiniLmVariants {
                dir,
                formats,
                batch_tokens: plan.batch_tokens,
            };
            registry.register(variants.spec(MINILM)?)?;
            default_model = Some(MINILM.to_string());
        }
        for spec in b.models {
            let name = spec.name.clone();
            registry.register(spec)?;
            default_model.get_or_insert(name);
        }

        let gate = Arc::new(tier_router::LedgerGate::new(
            Arc::new(ledger.clone()),
            Arc::new(monitor.clone()),
        ));
        let router_config = tier_router::RouterConfig::default();
        let mut router = EmbedRouter::new(router_config, gate)?;
        let dim = 384;
        if let Some(name) = &default_model {
            let reg = Arc::clone(&registry);
            let pool_for_backend = pool.pool("scratch")?;
            let model = name.clone();
            let backend = LocalBackend {
                registry: reg,
                model: model.clone(),
                pool: pool_for_backend,
            };
            let memory = registry.smallest_estimate(name).unwrap_or(0);
            router.add_tier(
                tier_router::TierSpec::new(model, tier_router::Tier::Small, Arc::new(backend))
                    .memory_bytes(memory),
            )?;
        }
        if let Some(remote) = &config.remote {
            let client = tier_router::RemoteEmbedder::new(remote.clone())?;
            router.add_tier(tier_router::TierSpec::new(
                "remote",
                tier_router::Tier::Remote,
                Arc::new(client),
            ))?;
        }
        let rule = models::RuleBasedEmbedder::default();
        let rule_backend = move |texts: &[String],
                                 _d: tier_router::Deadline|
              -> std::result::Result<
            Vec<Vec<f32>>,
            tier_router::BackendError,
        > { Ok(texts.iter().map(|t| rule.embed_one(t)).collect()) };
        router.add_tier(tier_router::TierSpec::new(
            "rule-based",
            tier_router::Tier::RuleBased,
            Arc::new(rule_backend),
        ))?;

        let inner = Arc::new(Inner {
            config,
            profile,
            plan: Mutex::new(plan),
            registry,
            monitor,
            cache,
            pool,
            router,
            default_model,
            dim,
            last_emergency: Mutex::new(None),
            stop: Arc::new(AtomicBool::new(false)),
            background: Mutex::new(Vec::new()),
            monitor_thread: Mutex::new(None),
        });
        let rt = Runtime { inner };
        rt.start_background()?;
        tracing::info!(plan = %rt.plan(), "runtime ready");
        Ok(rt)
    }

    fn start_background(&self) -> Result<()> {
        let inner = &self.inner;
        match inner.monitor.spawn(inner.config.monitor_interval) {
            Ok(t) => *inner.monitor_thread.lock() = Some(t),
            Err(e) => tracing::warn!(error = %e, "pressure monitor thread not started"),
        }
        // Keep-alive: unload models idle past keep_alive.
        let registry = Arc::clone(&inner.registry);
        let stop = Arc::clone(&inner.stop);
        let keep_alive = inner.config.keep_alive;
        let tick = (keep_alive / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let handle = std::thread::Builder::new()
            .name("snug-keepalive".into())
            .spawn(move || {
                let mut next = Instant::now() + tick;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(tick));
                    if Instant::now() >= next {
                        registry.unload_idle(keep_alive, "idle");
                        next = Instant::now() + tick;
                    }
                }
            })?;
        inner.background.lock().push(handle);
        Ok(())
    }

    /// The plan: what was chosen for this machine and why.
    pub fn plan(&self) -> Plan {
        self.inner.plan.lock().clone()
    }

    /// The hardware profile the plan was made from.
    pub fn profile(&self) -> &hw_detect::HardwareProfile {
        &self.inner.profile
    }

    /// The configuration the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Length of the vectors `embed` returns.
    pub fn dim(&self) -> usize {
        self.inner.dim
    }

    /// Calls `f` at each stage of every model load and unload.
    pub fn on_load_event(&self, f: impl Fn(&LoadEvent) + Send + Sync + 'static) {
        self.inner.registry.on_load_event(f);
    }

    /// Keeps `name` loaded: it is never unloaded for being idle, evicted for
    /// another model, or unloaded in an emergency.
    pub fn pin(&self, name: &str) -> Result<()> {
        self.inner.registry.pin(name, true)
    }

    /// Undoes [`Runtime::pin`].
    pub fn unpin(&self, name: &str) -> Result<()> {
        self.inner.registry.pin(name, false)
    }

    /// Loads `name` now (it would otherwise load on first use).
    pub fn load(&self, name: &str) -> Result<()> {
        self.inner.registry.get(name).map(drop)
    }

    /// Unloads `name`; returns the bytes its reservation held.
    pub fn unload(&self, name: &str) -> u64 {
        self.inner.registry.unload(name, "asked")
    }

    /// Loads `names` on a background thread at low priority. User requests
    /// never wait for it: loads happen outside the registry's lock, the
    /// thread runs at the lowest CPU priority the OS gives, and
    /// `emergency_cleanup` pauses it.
    pub fn warmup(&self, names: &[&str]) -> Result<JoinHandle<Vec<Result<()>>>> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        for n in &names {
            self.inner.registry.version(n)?;
        }
        let registry = Arc::clone(&self.inner.registry);
        Ok(std::thread::Builder::new()
            .name("snug-warmup".into())
            .spawn(move || {
                lower_thread_priority();
                names
                    .iter()
                    .map(|n| {
                        if registry.warmups_paused.load(Ordering::Relaxed) {
                            return Err(Error::Paused(n.clone()));
                        }
                        registry.get(n).map(drop)
                    })
                    .collect()
            })?)
    }

    /// Embeds texts with the default model (the first registered, MiniLM
    /// when it is present): one unit vector per text, from the cache, the
    /// local model through its batcher, the remote tier or the rule-based
    /// tier, whichever the router's chain reaches first.
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings> {
        self.embed_with(texts, &EmbedOptions::default())
    }

    /// Embeds texts with options.
    pub fn embed_with(&self, texts: &[&str], options: &EmbedOptions) -> Result<Embeddings> {
        let inner = &self.inner;
        if texts.is_empty() {
            return Err(Error::InvalidInput(
                "no texts to embed: pass at least one".into(),
            ));
        }
        if texts.len() > inner.config.max_texts {
            return Err(Error::InvalidInput(format!(
                "{} texts in one request, over the limit of {}; split the request",
                texts.len(),
                inner.config.max_texts
            )));
        }
        if let Some((i, t)) = texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > inner.config.max_text_bytes)
        {
            return Err(Error::InvalidInput(format!(
                "text {i} is {} bytes, over the limit of {}; split long documents with runtime::chunk::Chunker",
                t.len(),
                inner.config.max_text_bytes
            )));
        }
        let model = inner.default_model.clone();
        let version = match &model {
            Some(m) => inner.registry.version(m)?,
            None => "rule-based".to_string(),
        };
        // 1. The cache.
        let key = |t: &str| format!("{version}\u{1f}{t}");
        let mut out: Vec<Option<Vec<f32>>> = texts
            .iter()
            .map(|t| inner.cache.get(&key(t)).map(|v| v.to_vec()))
            .collect();
        let hits = out.iter().filter(|v| v.is_some()).count();
        let misses: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
        if misses.is_empty() {
            return Ok(Embeddings {
                vectors: out.into_iter().flatten().collect(),
                cache_hits: hits,
                tier: None,
                backend: None,
                trail: Vec::new(),
            });
        }
        // 2. The router picks the tier; 3. the tier serves.
        let miss_texts: Vec<String> = misses.iter().map(|&i| texts[i].to_string()).collect();
        let words: usize = miss_texts
            .iter()
            .map(|t| t.split_whitespace().count())
            .max()
            .unwrap_or(0);
        let features = tier_router::TaskFeatures::with_tokens((words * 4).div_ceil(3) + 2);
        let timeout = options.timeout.unwrap_or(inner.config.request_timeout);
        let deadline = tier_router::Deadline::after(timeout);
        let served = inner.router.serve(&features, &miss_texts[..], deadline)?;
        if served.response.len() != miss_texts.len() {
            return Err(Error::Backend(format!(
                "tier {} answered {} vectors for {} texts",
                served.backend,
                served.response.len(),
                miss_texts.len()
            )));
        }
        // 4. Only the model's own answers are cached under its version.
        let cacheable = model.as_deref() == Some(served.backend.as_str());
        for (&i, v) in misses.iter().zip(served.response) {
            if cacheable {
                if let Err(e) = inner.cache.insert(key(texts[i]), Arc::new(v.clone())) {
                    tracing::debug!(error = %e, "embedding not cached");
                }
            }
            out[i] = Some(v);
        }
        Ok(Embeddings {
            vectors: out.into_iter().flatten().collect(),
            cache_hits: hits,
            tier: Some(served.tier),
            backend: Some(served.backend),
            trail: served.trail.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// The pre-flight answer for embedding `texts` in one batch: whether it
    /// fits the memory left now, and if not, the longest input that does.
    pub fn estimate(&self, texts: &[&str]) -> Result<RequestEstimate> {
        let inner = &self.inner;
        let Some(model) = inner.default_model.as_ref() else {
            return Err(Error::InvalidInput(
                "no local model is registered to estimate for".into(),
            ));
        };
        let loaded = inner.registry.get(model)?;
        let tokens = loaded.model.tokenize(texts)?;
        let total: u64 = tokens.iter().map(|t| t.len() as u64).sum();
        let longest = tokens.iter().map(|t| t.len() as u64).max().unwrap_or(0);
        let shape = minilm_shape();
        let work = mem_budget::Workload {
            batch: texts.len().max(1) as u64,
            seq: longest.max(1),
        };
        let act = mem_budget::Activations::estimate(
            &shape,
            work,
            &mem_budget::ActivationConfig::default(),
        );
        let room = mem_budget::Room::in_ledger(inner.registry.ledger())?;
        let fits = act.total <= room.activations.min(room.total);
        let max_tokens = (1..=loaded.model.max_tokens() as u64).rev().find(|&s| {
            let a = mem_budget::Activations::estimate(
                &shape,
                mem_budget::Workload {
                    batch: work.batch,
                    seq: s,
                },
                &mem_budget::ActivationConfig::default(),
            );
            a.total <= room.activations.min(room.total)
        });
        let recommendation = if fits {
            "OK".to_string()
        } else {
            match max_tokens {
                Some(n) => format!("input too long for this machine: at most {n} tokens per text fit for {} texts", texts.len()),
                None => "memory is too short for any input now: free memory (emergency cleanup) or use the remote tier".to_string(),
            }
        };
        let headroom = room.activations.min(room.total) as i128 - act.total as i128;
        Ok(RequestEstimate {
            texts: texts.len(),
            tokens: total,
            longest,
            estimate: mem_budget::Estimate {
                bytes: act.total,
                breakdown: vec![
                    mem_budget::Part {
                        name: "attention scores".into(),
                        bytes: act.attention_scores,
                    },
                    mem_budget::Part {
                        name: "layer activations".into(),
                        bytes: act.layer_other,
                    },
                ],
                fits,
                headroom: headroom.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                max_tokens,
                recommendation,
            },
        })
    }

    /// A snapshot: CPU, memory, pressure, models, cache, pool, batchers.
    pub fn status(&self) -> Status {
        let inner = &self.inner;
        let reading = inner
            .monitor
            .check_now()
            .ok()
            .or_else(|| inner.monitor.last_reading());
        let (cpu, used, avail, level, cpu_maxed, thermal) = match &reading {
            Some(r) => (
                r.cpu_busy.map(|c| c * 100.0),
                r.used_fraction,
                r.memory.effective_available,
                r.level,
                r.cpu_maxed,
                r.thermal_likely,
            ),
            None => (None, 0.0, 0, inner.monitor.level(), false, false),
        };
        let throttling = Throttling {
            memory_critical: used > 0.85,
            cpu_maxed,
            thermal_likely: thermal,
        };
        let recommended_action = if throttling.memory_critical {
            "memory critical: call emergency_cleanup (clears caches, unloads idle models)"
                .to_string()
        } else if cpu_maxed {
            "CPU maxed: lower concurrency or batch size".to_string()
        } else if thermal {
            "thermal throttling likely: lower the thread count".to_string()
        } else {
            level.action().to_string()
        };
        Status {
            cpu_percent: cpu,
            memory_percent: used * 100.0,
            available_bytes: avail,
            pressure: level,
            throttling,
            models: inner.registry.status(),
            ledger: inner.registry.ledger().stats(),
            cache: inner.cache.stats(),
            pool: inner.pool.stats(),
            process_rss: Some(rss()).filter(|&r| r > 0),
            recommended_action,
        }
    }

    /// Frees what can be freed now: pauses warm-ups, clears the cache,
    /// shrinks the pool to 25%, unloads idle unpinned models and returns
    /// freed heap to the OS. At most once per `emergency_min_interval`.
    pub fn emergency_cleanup(&self) -> Result<CleanupReport> {
        let inner = &self.inner;
        {
            let mut last = inner.last_emergency.lock();
            if let Some(at) = *last {
                let since = at.elapsed();
                if since < inner.config.emergency_min_interval {
                    return Err(Error::RateLimited {
                        retry_after: inner.config.emergency_min_interval - since,
                    });
                }
            }
            *last = Some(Instant::now());
        }
        let rss_before = rss();
        inner.registry.warmups_paused.store(true, Ordering::Relaxed);
        let cache_stats = inner.cache.stats();
        inner.cache.clear();
        let pool_released = match inner.pool.shrink_to(0.25) {
            Ok(r) => r.bytes as u64,
            Err(e) => {
                tracing::warn!(error = %e, "pool not shrunk");
                0
            }
        };
        let loaded = || -> Vec<String> {
            let models = inner.registry.status().into_iter();
            models
                .filter(|m| m.state == "loaded")
                .map(|m| m.name)
                .collect()
        };
        let before = loaded();
        let released = inner.registry.unload_idle(Duration::ZERO, "emergency");
        let after = loaded();
        release_to_os();
        let report = CleanupReport {
            rss_before,
            rss_after: rss(),
            cache_entries_cleared: cache_stats.entries as usize,
            cache_bytes_cleared: cache_stats.weight,
            pool_bytes_released: pool_released,
            models_unloaded: before.into_iter().filter(|m| !after.contains(m)).collect(),
            reserved_bytes_released: released,
        };
        inner
            .registry
            .warmups_paused
            .store(false, Ordering::Relaxed);
        tracing::warn!(?report, "emergency cleanup");
        Ok(report)
    }

    /// Re-plans from the memory free now: batch tokens, cache capacity and
    /// the longest input, applied at once.
    pub fn reoptimize(&self) -> Result<Reoptimized> {
        let inner = &self.inner;
        let memory = inner.registry.ledger().probe().memory()?;
        let previous = self.plan();
        let mut new = previous.clone();
        new.memory_available = memory.effective_available;
        let sizes = Sizes::for_memory(
            &inner.config,
            inner.registry.ledger().budget(),
            memory.effective_available,
        );
        new.cache_bytes = sizes.cache_bytes;
        new.batch_tokens = sizes.batch_tokens;
        new.max_input_tokens = sizes.max_input_tokens;
        let free = sizes.free;
        new.reasons = vec![format!("re-planned for {} MiB free", free >> 20)];
        let changed = new.cache_bytes != previous.cache_bytes
            || new.batch_tokens != previous.batch_tokens
            || new.max_input_tokens != previous.max_input_tokens;
        if !changed {
            inner.plan.lock().memory_available = memory.effective_available;
            return Ok(Reoptimized::Optimal);
        }
        inner.cache.set_capacity(new.cache_bytes);
        inner.registry.set_batch_tokens(new.batch_tokens);
        *inner.plan.lock() = new.clone();
        Ok(Reoptimized::Adjusted {
            previous: Box::new(previous),
            new: Box::new(new),
        })
    }

    /// The embedding cache (for statistics, invalidation and warming).
    pub fn cache(&self) -> &feature_cache::FeatureCache<String, Arc<Vec<f32>>> {
        &self.inner.cache
    }

    /// The memory ledger.
    pub fn ledger(&self) -> &mem_budget::MemoryLedger {
        self.inner.registry.ledger()
    }

    /// The tier router (statistics, breaker states).
    pub fn router(&self) -> &tier_router::Router<[String], Vec<Vec<f32>>> {
        &self.inner.router
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.background.lock().drain(..) {
            let _ = h.join();
        }
        if let Some(t) = self.monitor_thread.lock().take() {
            t.stop();
        }
        for name in self.registry.names() {
            self.registry.unload(&name, "shutdown");
        }
    }
}

/// Longest input (tokens) whose activations fit in `free` bytes, for MiniLM
/// at batch 1, capped at its 256-token window.
fn max_input_tokens(free: u64) -> u64 {
    let shape = minilm_shape();
    (1..=256u64)
        .rev()
        .find(|&s| {
            mem_budget::Activations::estimate(
                &shape,
                mem_budget::Workload { batch: 1, seq: s },
                &mem_budget::ActivationConfig::default(),
            )
            .total
                <= free
        })
        .unwrap_or(0)
}

fn minilm_shape() -> mem_budget::TransformerShape {
    mem_budget::TransformerShape {
        architecture: mem_budget::Architecture::Encoder,
        hidden: 384,
        layers: 6,
        heads: 12,
        kv_heads: 12,
        intermediate: 1536,
        vocab: 30522,
    }
}

/// The sizes that follow the memory free now; the same rule at start-up
/// and in `reoptimize`.
struct Sizes {
    free: u64,
    cache_bytes: u64,
    batch_tokens: u64,
    max_input_tokens: u64,
}

impl Sizes {
    /// From `available` bytes less the budget's safety margin (`free`): the
    /// cache gets its budget but never more than a quarter of `free`; batches
    /// get the configured tokens, halved under 1 GiB free and quartered under
    /// 256 MiB (never under 256 tokens); the longest input is what one
    /// text's activations fit in `free`.
    fn for_memory(config: &RuntimeConfig, budget: &mem_budget::Budget, available: u64) -> Sizes {
        let free = available.saturating_sub(budget.safety_margin);
        let cache_bytes = config
            .cache_bytes
            .unwrap_or(budget.max_cache)
            .min(free / 4)
            .max(1 << 20);
        let base = config.batch.max_batch_tokens;
        let batch_tokens = if free < (256 << 20) {
            (base / 4).max(256)
        } else if free < (1 << 30) {
            (base / 2).max(256)
        } else {
            base
        };
        Sizes {
            free,
            cache_bytes,
            batch_tokens,
            max_input_tokens: max_input_tokens(free),
        }
    }
}

fn initial_plan(
    profile: &hw_detect::HardwareProfile,
    config: &RuntimeConfig,
    budget: mem_budget::Budget,
    ledger: &mem_budget::MemoryLedger,
) -> Plan {
    let mut reasons = Vec::new();
    let policy = quant::QuantPolicy::for_profile(profile);
    let format = config.format.unwrap_or(policy.format);
    reasons.push(match config.format {
        Some(f) => format!("weights {f}: set in the configuration"),
        None => format!(
            "weights {format}: the quant policy for {:?} with {} MiB available",
            profile.class,
            profile.memory.effective_available >> 20
        ),
    });
    // If the first choice does not fit, smaller formats are tried in turn.
    let fallback_formats: Vec<quant::Format> = [quant::Format::Q8_0, quant::Format::Q4_K]
        .into_iter()
        .filter(|f| f.bytes_per_weight() < format.bytes_per_weight())
        .collect();
    let threads = config
        .threads
        .unwrap_or_else(|| affinity::recommended_threads(profile))
        .max(1);
    reasons.push(format!(
        "{threads} compute threads: {}",
        if config.threads.is_some() {
            "set in the configuration"
        } else {
            "physical performance cores this process may use"
        }
    ));
    let pool_bytes = config
        .pool_bytes
        .unwrap_or((64u64 << 20).min(budget.max_model / 8).max(1 << 20));
    let available = ledger
        .probe()
        .memory()
        .map_or(profile.memory.effective_available, |m| {
            m.effective_available
        });
    let sizes = Sizes::for_memory(config, &budget, available);
    Plan {
        class: profile.class,
        cpu: profile.cpu.brand.clone(),
        memory_total: profile.memory.effective_total,
        memory_available: profile.memory.effective_available,
        budget,
        format,
        fallback_formats,
        threads,
        pinning: "not configured".into(),
        cache_bytes: sizes.cache_bytes,
        pool_bytes,
        batch_tokens: sizes.batch_tokens,
        batch_size: config.batch.max_batch_size,
        max_delay_ms: config.batch.max_delay.as_millis() as u64,
        max_input_tokens: sizes.max_input_tokens,
        reasons,
    }
}

fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's id only changes its nice value.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// The local tier: the registry's model through its batcher.
struct LocalBackend {
    registry: Arc<Registry>,
    model: String,
    pool: buffer_pool::NamedPool,
}

impl tier_router::Backend<[String], Vec<Vec<f32>>> for LocalBackend {
    fn call(
        &self,
        texts: &[String],
        deadline: tier_router::Deadline,
    ) -> std::result::Result<Vec<Vec<f32>>, tier_router::BackendError> {
        use tier_router::BackendError;
        let loaded = self.registry.get(&self.model).map_err(|e| match e {
            Error::DoesNotFit { .. } => BackendError::permanent(e.to_string()),
            other => BackendError::permanent(other.to_string()),
        })?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens = loaded
            .model
            .tokenize(&refs)
            .map_err(|e| BackendError::permanent(e.to_string()))?;
        let dim = loaded.model.dim();
        // Scratch for the answers: bounded by the pool, so a flood of large
        // requests waits here instead of growing memory.
        let wait = deadline.remaining().unwrap_or(Duration::from_secs(30));
        let mut scratch = self
            .pool
            .acquire_f32_timeout(texts.len() * dim, wait)
            .map_err(|e| BackendError::transient(e.to_string()))?;
        let mut submit = batcher::Submit::default();
        if let Some(at) = deadline.instant() {
            submit = submit.deadline(at);
        }
        let mut tickets = Vec::with_capacity(tokens.len());
        for t in tokens {
            match loaded.batcher.submit_with(t, submit) {
                Ok(ticket) => tickets.push(ticket),
                // Dropping the tickets taken so far cancels them.
                Err(e) => return Err(BackendError::transient(e.to_string())),
            }
        }
        let out = scratch.as_mut_slice_f32();
        for (i, ticket) in tickets.into_iter().enumerate() {
            let v = ticket.wait().map_err(|e| match e {
                batcher::Error::TimedOut { .. } | batcher::Error::Overloaded { .. } => {
                    BackendError::transient(e.to_string())
                }
                other => BackendError::permanent(other.to_string()),
            })?;
            if v.len() != dim {
                return Err(BackendError::permanent(format!(
                    "model answered {} dims, expected {dim}",
                    v.len()
                )));
            }
            out[i * dim..(i + 1) * dim].copy_from_slice(&v);
        }
        Ok(out[..texts.len() * dim]
            .chunks(dim)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn is_loaded(&self) -> bool {
        self.registry.is_loaded_or_loading(&self.model)
    }
}
