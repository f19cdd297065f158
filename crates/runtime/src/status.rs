//! [`Status`]: a snapshot of the runtime and the machine.

use serde::Serialize;

use crate::registry::ModelStatus;
use crate::runtime::{rss, Runtime};

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

/// The circuit breaker of one tier, in [`Status::breakers`].
#[derive(Debug, Clone, Serialize)]
pub struct TierBreaker {
    /// What the tier serves.
    pub serves: crate::generate::ModelKind,
    /// The tier's name (for the remote generation tier, its model's).
    pub name: String,
    /// Its kind.
    pub tier: tier_router::Tier,
    /// Its breaker's state and counters.
    pub breaker: tier_router::BreakerStats,
}

/// A snapshot of the runtime and the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// CPU busy since the previous status (the first: since the runtime
    /// started), percent; `None` only where `/proc/stat` cannot be read.
    pub cpu_percent: Option<f64>,
    /// Effective memory in use, percent.
    pub memory_percent: f64,
    /// Effective memory available, bytes.
    pub available_bytes: u64,
    /// The pressure level.
    pub pressure: mem_budget::PressureLevel,
    /// Throttling risks.
    pub throttling: Throttling,
    /// Registered embedding models.
    pub models: Vec<ModelStatus>,
    /// Registered generative models: sequences running and queued, KV
    /// blocks used and free, tokens/s.
    pub generative: Vec<crate::decoder::GenerativeStatus>,
    /// The circuit breakers of the tiers: the embedding router's, then the
    /// remote generation tier's when one is configured.
    pub breakers: Vec<TierBreaker>,
    /// The ledger's accounting.
    pub ledger: mem_budget::LedgerStats,
    /// The embedding cache.
    pub cache: feature_cache::CacheStats,
    /// The scratch buffer pool.
    pub pool: buffer_pool::BufferPoolStats,
    /// Resident memory of this process, bytes (Linux).
    pub process_rss: Option<u64>,
    /// What to do now.
    pub recommended_action: String,
}

impl Runtime {
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
        #[allow(unused_mut)]
        let mut breakers: Vec<TierBreaker> = inner
            .router
            .stats()
            .into_iter()
            .map(|(name, tier, breaker)| TierBreaker {
                serves: crate::generate::ModelKind::Embedding,
                name,
                tier,
                breaker,
            })
            .collect();
        #[cfg(feature = "remote")]
        if let Some(r) = &inner.remote_generation {
            breakers.push(TierBreaker {
                serves: crate::generate::ModelKind::Generative,
                name: r.model().to_string(),
                tier: tier_router::Tier::Remote,
                breaker: r.breaker().stats(),
            });
        }
        Status {
            breakers,
            cpu_percent: cpu,
            memory_percent: used * 100.0,
            available_bytes: avail,
            pressure: level,
            throttling,
            models: inner.registry.status(),
            generative: inner.decoders.status(),
            ledger: inner.registry.ledger().stats(),
            cache: inner.cache.stats(),
            pool: inner.pool.stats(),
            process_rss: Some(rss()).filter(|&r| r > 0),
            recommended_action,
        }
    }
}
