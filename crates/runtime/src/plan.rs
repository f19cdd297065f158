//! The plan: what the runtime chose for this machine, and why.

use std::fmt;

use serde::Serialize;

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
