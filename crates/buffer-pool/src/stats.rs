//! Statistics snapshots.

use serde::Serialize;

/// A snapshot of one named pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStats {
    /// Pool name.
    pub name: String,
    /// Bytes the pool may hold, leased plus cached.
    pub budget_bytes: usize,
    /// Bytes of buffers currently leased (capacities, after rounding).
    pub in_use_bytes: usize,
    /// Bytes of free buffers kept for reuse (not yet released to the OS).
    pub cached_bytes: usize,
    /// Number of cached buffers.
    pub cached_buffers: usize,
    /// Number of buffers currently leased.
    pub leased_buffers: usize,
    /// Highest `in_use_bytes + cached_bytes` seen.
    pub high_water_bytes: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests served by a fresh allocation.
    pub misses: u64,
    /// Cached buffers released to make room for other size classes.
    pub evictions: u64,
    /// Bytes released by idle trimming and `shrink_to` (cumulative).
    pub trimmed_bytes: u64,
    /// Calls that failed with `Exhausted`.
    pub exhausted: u64,
    /// Calls that had to wait for releases (successful or not).
    pub waits: u64,
    /// Bytes of leased buffers beyond what was asked for: size-class rounding.
    pub rounding_loss_bytes: usize,
    /// `in_use_bytes` as a percentage of `budget_bytes`.
    pub utilization_percent: f64,
}

impl PoolStats {
    /// Fraction of requests served from the cache (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// A snapshot of the whole pool: the total budget and every named pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BufferPoolStats {
    /// Hard limit on bytes held by all pools together.
    pub total_budget_bytes: usize,
    /// Bytes leased, all pools.
    pub in_use_bytes: usize,
    /// Bytes cached, all pools.
    pub cached_bytes: usize,
    /// Highest `in_use_bytes + cached_bytes` seen, all pools together.
    pub high_water_bytes: usize,
    /// Cache hits, all pools.
    pub hits: u64,
    /// Fresh allocations, all pools.
    pub misses: u64,
    /// Size-class rounding loss of leased buffers, all pools.
    pub rounding_loss_bytes: usize,
    /// `in_use_bytes` as a percentage of `total_budget_bytes`.
    pub utilization_percent: f64,
    /// Per-pool snapshots, in configuration order.
    pub pools: Vec<PoolStats>,
}

/// What a trim pass (`trim_idle`, `shrink_to`) released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TrimReport {
    /// Buffers released to the operating system.
    pub buffers: usize,
    /// Bytes released.
    pub bytes: usize,
}
