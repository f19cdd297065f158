//! What routing asks of the memory budget: the pressure level now, and whether a tier's
//! memory fits now.
//!
//! This module is the single place where the router meets `mem-budget`.

use std::sync::Arc;

use mem_budget::{Category, MemoryLedger, PressureMonitor};
use serde::{Deserialize, Serialize};

/// How short memory is right now, from `Normal` to `Critical` (`mem-budget`'s levels).
pub use mem_budget::PressureLevel;

/// The two questions the router asks of the memory budget before choosing a tier.
pub trait MemoryGate: Send + Sync {
    /// The pressure level now.
    fn pressure(&self) -> PressureLevel;
    /// Bytes that could be reserved now for a model (what is free under the budget).
    fn available_bytes(&self) -> u64;
    /// Whether `bytes` more would fit under the budget now.
    fn fits(&self, bytes: u64) -> bool {
        bytes <= self.available_bytes()
    }
}

/// A fixed answer to [`MemoryGate`]: a pressure level and a number of free bytes, set by the
/// caller (for programs that manage memory themselves, and to pin a routing decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedGate {
    /// The pressure level reported.
    pub pressure: PressureLevel,
    /// The free bytes reported.
    pub available_bytes: u64,
}

impl MemoryGate for FixedGate {
    fn pressure(&self) -> PressureLevel {
        self.pressure
    }
    fn available_bytes(&self) -> u64 {
        self.available_bytes
    }
}

impl Default for FixedGate {
    /// `Normal` pressure and unlimited free bytes.
    fn default() -> Self {
        Self {
            pressure: PressureLevel::Normal,
            available_bytes: u64::MAX,
        }
    }
}

/// The memory gate of a program that uses `mem-budget`: the pressure level is the monitor's
/// last reading, and the free bytes are what the ledger could reserve now in `category`
/// (`Category::Model` by default: a tier's memory is its model's).
#[derive(Debug, Clone)]
pub struct LedgerGate {
    ledger: Arc<MemoryLedger>,
    monitor: Arc<PressureMonitor>,
    category: Category,
}

impl LedgerGate {
    /// A gate over `ledger` and `monitor`, asking for room in `Category::Model`.
    pub fn new(ledger: Arc<MemoryLedger>, monitor: Arc<PressureMonitor>) -> Self {
        Self {
            ledger,
            monitor,
            category: Category::Model,
        }
    }

    /// Asks for room in `category` instead.
    pub fn category(mut self, category: Category) -> Self {
        self.category = category;
        self
    }
}

impl MemoryGate for LedgerGate {
    fn pressure(&self) -> PressureLevel {
        self.monitor.level()
    }

    /// What the ledger could reserve now; 0 when the ledger cannot read the machine's memory
    /// (so that no new model is loaded blind).
    fn available_bytes(&self) -> u64 {
        match self.ledger.available_for(self.category) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "memory ledger unavailable; treating free memory as 0");
                0
            }
        }
    }
}
