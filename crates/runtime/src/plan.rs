//! The plan: what the runtime chose for this machine, and why.

use std::fmt;

use serde::Serialize;

use crate::config::RuntimeConfig;

/// Everything the runtime decided from the hardware (or was told), printable
/// as a table and serialisable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The hardware class.
    pub class: hw_detect::HardwareClass,
    /// The CPU's name.
    pub cpu: String,
    /// Effective memory of the machine (cgroup-aware), bytes.
    pub memory_total: u64,
    /// Memory available when the plan was made, bytes.
    pub memory_available: u64,
    /// The memory budget.
    pub budget: mem_budget::Budget,
    /// The weight format local models get first.
    pub format: quant::Format,
    /// Formats tried in order when the first does not fit.
    pub fallback_formats: Vec<quant::Format>,
    /// Compute threads.
    pub threads: usize,
    /// Where they run.
    pub pinning: String,
    /// Bytes of the embedding cache.
    pub cache_bytes: u64,
    /// Bytes of the scratch buffer pool.
    pub pool_bytes: u64,
    /// Tokens per batch at most.
    pub batch_tokens: u64,
    /// Texts per batch at most.
    pub batch_size: usize,
    /// How long a request waits for a batch to fill, milliseconds.
    pub max_delay_ms: u64,
    /// Longest input in tokens that fits the activation budget.
    pub max_input_tokens: u64,
    /// The step and KV budgets of each generative model loaded now (none
    /// until one loads; [`Runtime::reoptimize`](crate::Runtime::reoptimize)
    /// re-plans them).
    pub generation: Vec<crate::decoder::GenerationPlan>,
    /// Why each choice was made.
    pub reasons: Vec<String>,
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<(&str, String)> = vec![
            ("hardware class", format!("{:?}", self.class)),
            ("cpu", self.cpu.clone()),
            (
                "memory (effective)",
                format!(
                    "{} total, {} available",
                    mib(self.memory_total),
                    mib(self.memory_available)
                ),
            ),
            (
                "budget",
                format!(
                    "model {}, cache {}, OS {}, safety margin {}",
                    mib(self.budget.max_model),
                    mib(self.budget.max_cache),
                    mib(self.budget.reserved_os),
                    mib(self.budget.safety_margin)
                ),
            ),
            (
                "weights",
                format!(
                    "{} (then {})",
                    self.format,
                    self.fallback_formats
                        .iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            ("threads", format!("{} ({})", self.threads, self.pinning)),
            ("cache", mib(self.cache_bytes)),
            ("buffer pool", mib(self.pool_bytes)),
            (
                "batches",
                format!(
                    "≤ {} texts, ≤ {} tokens, ≤ {} ms wait",
                    self.batch_size, self.batch_tokens, self.max_delay_ms
                ),
            ),
            ("max input", format!("{} tokens", self.max_input_tokens)),
        ];
        let mut rows = rows;
        for g in &self.generation {
            rows.push((
                "generation",
                format!(
                    "{}: steps ≤ {} tokens (of {}), KV {} (of {}), {} reserved",
                    g.model,
                    g.step_tokens,
                    g.step_tokens_configured,
                    mib(g.kv_budget_bytes),
                    mib(g.kv_budget_configured),
                    mib(g.reserved_bytes)
                ),
            ));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            writeln!(f, "{k:<width$}  {v}")?;
        }
        for r in &self.reasons {
            writeln!(f, "  - {r}")?;
        }
        Ok(())
    }
}

/// Longest input (tokens) whose batch of one fits in `free` bytes, capped
/// at the model's window; `0` without a model's memory facts.
fn max_input_tokens(free: u64, facts: Option<&models::MiniLmMemory>) -> u64 {
    let Some(m) = facts else { return 0 };
    (1..=m.max_tokens as u64)
        .rev()
        .find(|&s| m.batch_bytes(s, 1) <= free)
        .unwrap_or(0)
}

/// The sizes that follow the memory free now; the same rule at start-up
/// and in `reoptimize`.
pub(crate) struct Sizes {
    pub(crate) free: u64,
    pub(crate) cache_bytes: u64,
    pub(crate) batch_tokens: u64,
    pub(crate) max_input_tokens: u64,
}

impl Sizes {
    /// From `available` bytes less the budget's safety margin (`free`): the
    /// cache gets its budget but never more than a quarter of `free`; batches
    /// get the configured tokens, halved under 1 GiB free and quartered under
    /// 256 MiB (never under 256 tokens); the longest input is what one
    /// text's activations fit in `free` less `pending` (the weights of a
    /// model not loaded yet), by the model's memory facts.
    pub(crate) fn for_memory(
        config: &RuntimeConfig,
        budget: &mem_budget::Budget,
        available: u64,
        facts: Option<&models::MiniLmMemory>,
        pending: u64,
    ) -> Sizes {
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
            max_input_tokens: max_input_tokens(free.saturating_sub(pending), facts),
        }
    }
}

pub(crate) fn initial_plan(
    profile: &hw_detect::HardwareProfile,
    config: &RuntimeConfig,
    budget: mem_budget::Budget,
    ledger: &mem_budget::MemoryLedger,
    facts: Option<&models::MiniLmMemory>,
) -> Plan {
    let mut reasons = Vec::new();
    // Plan by need: the most precise format first; the registry loads the
    // first whose estimate fits the memory really available (the machine or
    // cgroup, the ledger) less the safety margin.
    let order: Vec<quant::Format> = match config.format {
        Some(first) => std::iter::once(first)
            .chain(
                config
                    .formats
                    .iter()
                    .copied()
                    .filter(|f| f.bytes_per_weight() < first.bytes_per_weight()),
            )
            .collect(),
        None => config.formats.clone(),
    };
    let format = order.first().copied().unwrap_or(quant::Format::Q8_0);
    let fallback_formats: Vec<quant::Format> = order.iter().skip(1).copied().collect();
    let tried = order
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(", then ");
    reasons.push(match config.format {
        Some(f) => format!("weights {f}: set in the configuration; if it does not fit: {tried}"),
        None => format!(
            "weights: the most precise format that fits the {} MiB available, tried in order {tried}",
            profile.memory.effective_available >> 20
        ),
    });
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
    let sizes = Sizes::for_memory(
        config,
        &budget,
        available,
        facts,
        facts.map_or(0, |f| f.weights),
    );
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
        generation: Vec::new(),
        reasons,
    }
}
