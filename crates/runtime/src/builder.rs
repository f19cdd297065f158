//! [`RuntimeBuilder`]: detect the machine, plan, register the models, wire
//! the tiers, and start the [`Runtime`].

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::RuntimeConfig;
use crate::embed::{LocalBackend, CACHE_ENTRY_BYTES};
use crate::error::{Error, Result};
use crate::model::{MiniLmFacts, MiniLmVariants, ModelSpec};
use crate::plan::initial_plan;
use crate::registry::Registry;
use crate::runtime::{EmbedRouter, Inner, Runtime, MINILM};

/// Builds a [`Runtime`]: every choice the plan makes can be overridden.
#[derive(Debug, Default)]
pub struct RuntimeBuilder {
    pub(crate) config: RuntimeConfig,
    pub(crate) profile: Option<hw_detect::HardwareProfile>,
    pub(crate) probe: Option<Arc<dyn hw_detect::MemoryProbe>>,
    pub(crate) minilm_dir: Option<PathBuf>,
    pub(crate) with_minilm: bool,
    pub(crate) models: Vec<ModelSpec>,
    pub(crate) generative: Vec<crate::decoder::GenerativeSpec>,
    pub(crate) embedding_dirs: Vec<crate::models_file::EmbeddingEntry>,
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
        self.generative.clear();
        self.embedding_dirs.clear();
        self
    }

    /// Registers another model.
    pub fn model(mut self, spec: ModelSpec) -> Self {
        self.models.push(spec);
        self
    }

    /// Registers a generative model (a GGUF decoder) under its name.
    pub fn generative(mut self, spec: crate::decoder::GenerativeSpec) -> Self {
        self.generative.push(spec);
        self
    }

    /// Registers the models `file` lists (see [`ModelsFile`](crate::ModelsFile)).
    /// Its embedding models replace the bundled MiniLM found on disk.
    pub fn models(mut self, file: crate::models_file::ModelsFile) -> Self {
        if !file.embedding.is_empty() {
            self.with_minilm = false;
            self.minilm_dir = None;
        }
        self.embedding_dirs.extend(file.embedding);
        self.generative.extend(file.generative);
        self
    }

    /// Reads the models from a JSON file (see [`ModelsFile`](crate::ModelsFile)).
    pub fn models_file(self, path: impl AsRef<std::path::Path>) -> Result<Self> {
        let file = crate::models_file::ModelsFile::read(path.as_ref())?;
        Ok(self.models(file))
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
    #[cfg(feature = "remote")]
    #[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
    pub fn remote(mut self, remote: tier_router::RemoteConfig) -> Self {
        self.config.remote = Some(remote);
        self
    }

    /// A remote OpenAI-compatible chat server (`/v1/chat/completions`,
    /// streamed) as a generation tier, e.g. llama.cpp's `llama-server`.
    #[cfg(feature = "remote")]
    #[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
    pub fn remote_generation(mut self, remote: crate::remote::RemoteGenerationConfig) -> Self {
        self.config.remote_generation = Some(remote);
        self
    }

    /// Detects, plans and starts the runtime.
    pub fn build(self) -> Result<Runtime> {
        Runtime::start(self)
    }
}

impl Runtime {
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
        let budget = budget_config.budget_for_memory(profile.class, &profile.memory);
        let ledger = mem_budget::MemoryLedger::with_config(
            budget,
            Arc::clone(&probe),
            mem_budget::LedgerConfig::default(),
        );
        // CPU load and thermal zones are the machine's, whatever probe
        // reports memory: without these readers `status().cpu_percent`
        // would stay empty and `cpu_maxed` / `thermal_likely` never fire.
        let monitor = mem_budget::PressureMonitor::with_machine_readers(
            Arc::clone(&probe),
            config.pressure.clone(),
        );
        if let Err(e) = monitor.check_now() {
            tracing::warn!(error = %e, "first pressure reading failed");
        }
        // Freed activations go back to the OS (see `release_freed_memory`):
        // set before any model buffer is allocated.
        const MAX_MMAP_THRESHOLD: usize = 32 << 20;
        if config.release_freed_memory {
            if config.mmap_threshold == 0 || config.mmap_threshold > MAX_MMAP_THRESHOLD {
                return Err(Error::invalid(
                    "mmap_threshold",
                    config.mmap_threshold.to_string(),
                    format!("1..={MAX_MMAP_THRESHOLD} bytes (malloc's limit)"),
                ));
            }
            if !crate::cleanup::fix_mmap_threshold(config.mmap_threshold) {
                tracing::debug!("malloc's mmap threshold is not settable here");
            }
        }

        // The bundled MiniLM (from the builder, or found on disk) and what it
        // takes in memory, known before anything is loaded.
        let mut embedding_dirs = b.embedding_dirs;
        let default_name = match (b.with_minilm, embedding_dirs.first()) {
            (false, Some(e)) => e.name.clone(),
            _ => MINILM.to_string(),
        };
        let minilm_dir = match (b.with_minilm, b.minilm_dir) {
            (true, Some(dir)) => Some(dir),
            (true, None) => models::model_dir().ok(),
            (false, _) if !embedding_dirs.is_empty() => Some(embedding_dirs.remove(0).dir),
            (false, _) => None,
        };
        let facts = match &minilm_dir {
            Some(dir) => {
                let formats: Vec<quant::Format> = config
                    .format
                    .iter()
                    .chain(&config.formats)
                    .copied()
                    .collect();
                Some(MiniLmFacts::new(dir.clone(), &formats)?)
            }
            None => None,
        };
        let mut plan = initial_plan(
            &profile,
            &config,
            budget,
            &ledger,
            facts.as_ref().map(|f| &f.memory),
        );

        // Compute threads: rayon's global pool (candle's) pinned per plan.
        if config.configure_global_pool {
            let affinity_config = affinity::AffinityConfig {
                strategy: config.pin.clone(),
                threads: Some(plan.threads),
                ..affinity::AffinityConfig::default()
            };
            match affinity::ThreadPlacement::plan(&profile, &affinity_config) {
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
            .weigher(|k: &String, v: &Arc<Vec<f32>>| {
                k.len() as u64 + v.len() as u64 * 4 + CACHE_ENTRY_BYTES
            })
            .build()?;
        let pool = buffer_pool::BufferPool::new(buffer_pool::BufferPoolConfig {
            total_budget_bytes: plan.pool_bytes as usize,
            pools: vec![buffer_pool::NamedPoolConfig::new(
                "scratch",
                plan.pool_bytes as usize,
            )],
            ..buffer_pool::BufferPoolConfig::default()
        })?;

        let registry = Arc::new(Registry::new(
            ledger.clone(),
            config.batch.clone(),
            config.budget.max_model.is_some(),
        ));
        registry.set_batch_tokens(plan.batch_tokens);
        let decoders = Arc::new(crate::decoder::Decoders::new(ledger.clone(), monitor.clone()));
        for spec in b.generative {
            decoders.register(spec)?;
        }

        // Models: the bundled MiniLM (from the builder, or found on disk) and any others.
        let mut default_model = None;
        if let Some(dir) = minilm_dir {
            let mut formats = vec![plan.format];
            formats.extend(plan.fallback_formats.iter().copied());
            let variants = MiniLmVariants {
                dir,
                formats,
                batch_tokens: plan.batch_tokens,
            };
            registry.register(variants.spec(&default_name)?)?;
            default_model = Some(default_name);
            for e in embedding_dirs {
                let more = MiniLmVariants {
                    dir: e.dir,
                    ..variants.clone()
                };
                registry.register(more.spec(&e.name)?)?;
            }
        }
        for spec in b.models {
            let name = spec.name.clone();
            registry.register(spec)?;
            default_model.get_or_insert(name);
        }

        let gate = Arc::new(crate::gate::LedgerGate::new(
            Arc::new(ledger.clone()),
            Arc::new(monitor.clone()),
        ));
        let router_config = tier_router::RouterConfig::default();
        let mut router = EmbedRouter::new(router_config, gate)?;
        // MiniLM's width, or the rule-based tier's (the same 384 by design).
        let dim = facts
            .as_ref()
            .map_or(models::RuleBasedConfig::default().dim, |f| f.memory.hidden);
        if let Some(name) = &default_model {
            let reg = Arc::clone(&registry);
            let pool_for_backend = pool.pool("scratch")?;
            let model = name.clone();
            let backend = LocalBackend {
                registry: reg,
                model: model.clone(),
                pool: pool_for_backend,
            };
            // The router gates the tier by the model cap only where one is
            // configured; otherwise the registry's load decides by need (and
            // a failed load falls to the next tier with the reason).
            let memory = if config.budget.max_model.is_some() {
                registry.smallest_estimate(name).unwrap_or(0)
            } else {
                0
            };
            router = router.with_tier(
                tier_router::TierSpec::new(model, tier_router::Tier::Small, Arc::new(backend))
                    .memory_bytes(memory),
            )?;
        }
        #[cfg(feature = "remote")]
        if let Some(remote) = &config.remote {
            let client = tier_router::RemoteEmbedder::new(remote.clone())?;
            router = router.with_tier(tier_router::TierSpec::new(
                "remote",
                tier_router::Tier::Remote,
                Arc::new(client),
            ))?;
        }
        #[cfg(feature = "remote")]
        let remote_generation = match &config.remote_generation {
            Some(r) => Some(Arc::new(crate::remote::RemoteTier::new(r)?)),
            None => None,
        };
        let rule = models::RuleBasedEmbedder::default();
        let rule_backend = move |texts: &[String],
                                 _d: tier_router::Deadline|
              -> std::result::Result<
            Vec<Vec<f32>>,
            tier_router::BackendError,
        > { Ok(texts.iter().map(|t| rule.embed_one(t)).collect()) };
        router = router.with_tier(tier_router::TierSpec::new(
            "rule-based",
            tier_router::Tier::RuleBased,
            Arc::new(rule_backend),
        ))?;

        let inner = Arc::new(Inner {
            config,
            profile,
            plan: Mutex::new(plan),
            registry,
            decoders,
            monitor,
            cache,
            pool,
            router,
            #[cfg(feature = "remote")]
            remote_generation,
            default_model,
            dim,
            facts,
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
}
