//! The runtime's settings: every choice the plan makes can be overridden.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the runtime batches requests for a local model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchSettings {
    /// Texts per batch at most. Default 64.
    pub max_batch_size: usize,
    /// Tokens per batch at most (the batcher's weight limit); the plan lowers
    /// it when memory is short. Default 4096.
    pub max_batch_tokens: u64,
    /// How long the oldest request may wait for others to join its batch
    /// while another batch is running. With nothing running a request runs
    /// at once (unless `wait_when_idle`). Default 4 ms.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub max_delay: Duration,
    /// Wait `max_delay` for company even when the model is idle. Default
    /// `false`: a lone request never waits.
    pub wait_when_idle: bool,
    /// Requests waiting at most; beyond it `embed` answers `Overloaded`.
    /// Default 8192.
    pub max_queued: usize,
    /// Group requests into batches of similar length: a text's bucket is its
    /// token count divided by this. `None` (the default) puts every length in
    /// one bucket: the reference models run batches packed, without padding,
    /// so mixing lengths wastes nothing and fuller batches run faster.
    pub bucket_tokens: Option<u64>,
    /// Batches that may run at the same time per model. With one, a request
    /// that arrives while a batch runs waits for it; with two, the next batch
    /// starts beside it and the two share the compute threads. Default 1.
    pub workers: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_batch_size: 64,
            max_batch_tokens: 4096,
            max_delay: Duration::from_millis(4),
            wait_when_idle: false,
            max_queued: 8192,
            bucket_tokens: None,
            workers: 1,
        }
    }
}

/// Every knob of a [`Runtime`](crate::Runtime). `None` means "let the plan
/// decide from the hardware"; the chosen values are in
/// [`Runtime::plan`](crate::Runtime::plan).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeConfig {
    /// Overrides of the memory budget (bytes per field).
    pub budget: mem_budget::BudgetOverrides,
    /// Weight format for local models, tried first (then the smaller ones of
    /// [`RuntimeConfig::formats`]). Default: none, so the order of `formats`
    /// decides.
    pub format: Option<quant::Format>,
    /// Formats a local model may load in, most precise first: a model loads
    /// in the first whose estimate fits the memory available less the
    /// safety margin. Default f32, q8_0, q4_k.
    pub formats: Vec<quant::Format>,
    /// Compute threads. Default: `affinity::recommended_threads`.
    pub threads: Option<usize>,
    /// Where compute threads run. Default `PinStrategy::Auto`.
    pub pin: affinity::PinStrategy,
    /// Whether to build rayon's global pool (which candle computes on) with
    /// `threads` pinned threads. Default `true`; a program that builds its
    /// own global pool turns it off.
    pub configure_global_pool: bool,
    /// Bytes of the embedding cache. Default: the budget's `max_cache`.
    pub cache_bytes: Option<u64>,
    /// Time to live of cached embeddings. Default 1 hour.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub cache_ttl: Duration,
    /// Bytes of the scratch buffer pool. Default 64 MiB, at most an eighth
    /// of the model budget.
    pub pool_bytes: Option<u64>,
    /// Batching of local models.
    pub batch: BatchSettings,
    /// Unload a model idle this long (unless pinned). Default 10 minutes.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub keep_alive: Duration,
    /// `emergency_cleanup` runs at most once per this interval. Default 10 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub emergency_min_interval: Duration,
    /// Pressure thresholds and hysteresis.
    pub pressure: mem_budget::PressureConfig,
    /// How often the pressure monitor samples. Default 500 ms.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub monitor_interval: Duration,
    /// A remote OpenAI-compatible embeddings server to fall back to (or to
    /// offload to under memory pressure). Default none. (Feature `remote`.)
    #[cfg(feature = "remote")]
    #[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
    pub remote: Option<tier_router::RemoteConfig>,
    /// A remote OpenAI-compatible chat server as a generation tier: after
    /// the local decoders (before them under memory pressure), before the
    /// rule-based tier, guarded by a circuit breaker. Default none.
    /// (Feature `remote`.)
    #[cfg(feature = "remote")]
    #[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
    pub remote_generation: Option<crate::remote::RemoteGenerationConfig>,
    /// How long an `embed` call may take before local work is abandoned and
    /// the fallback tiers answer. Default 30 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub request_timeout: Duration,
    /// Texts per `embed` call at most. Default 4096.
    pub max_texts: usize,
    /// Bytes per text at most; longer texts are refused with a pointer to
    /// the chunker. Default 256 KiB.
    pub max_text_bytes: usize,
    /// How `auto` generation picks a tier from the prompt, `max_tokens` and
    /// the caller's difficulty.
    pub complexity: tier_router::ComplexityConfig,
    /// `max_tokens` of one generation at most. Default 4096.
    pub max_generate_tokens: usize,
    /// Return freed activation buffers to the OS at once (Linux with glibc):
    /// the runtime fixes malloc's mmap threshold at
    /// [`RuntimeConfig::mmap_threshold`] bytes, so every buffer at least that
    /// large is its own mapping, unmapped when freed. Without it glibc raises
    /// the threshold after the first large free, later batches' buffers come
    /// from the heap, and freed ones stay resident: peak RSS then exceeds
    /// the bytes live by 10–80% and varies from run to run, so no estimate
    /// can be both close and never below. The setting is process-wide (it is
    /// malloc's); a program that tunes malloc itself turns this off. Default
    /// `true`; no effect on other platforms.
    pub release_freed_memory: bool,
    /// The mmap threshold of [`RuntimeConfig::release_freed_memory`] in bytes.
    /// Default 32 KiB: every activation buffer of a batch of more than a few
    /// tokens is its own mapping, so the request estimates hold for small
    /// batches too; the encoder allocates its activations once per forward
    /// (a handful of buffers, not ten a layer), so the mappings cost no
    /// measurable throughput; see `docs/runtime.md` for what other values gave.
    pub mmap_threshold: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            budget: mem_budget::BudgetOverrides::default(),
            format: None,
            formats: vec![quant::Format::F32, quant::Format::Q8_0, quant::Format::Q4_K],
            threads: None,
            pin: affinity::PinStrategy::Auto,
            configure_global_pool: true,
            cache_bytes: None,
            cache_ttl: Duration::from_secs(3600),
            pool_bytes: None,
            batch: BatchSettings::default(),
            keep_alive: Duration::from_secs(600),
            emergency_min_interval: Duration::from_secs(10),
            pressure: mem_budget::PressureConfig::default(),
            monitor_interval: Duration::from_millis(500),
            #[cfg(feature = "remote")]
            remote: None,
            #[cfg(feature = "remote")]
            remote_generation: None,
            request_timeout: Duration::from_secs(30),
            max_texts: 4096,
            max_text_bytes: 256 * 1024,
            complexity: tier_router::ComplexityConfig::default(),
            max_generate_tokens: 4096,
            release_freed_memory: true,
            mmap_threshold: 32 << 10,
        }
    }
}
