//! What routing asks of the memory budget: the pressure level now, and whether a tier's
//! memory fits now.
//!
//! This module is the single place where the router meets `mem-budget`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How short memory is right now, from `Normal` to `Critical`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub enum PressureLevel {
    /// Plenty of memory: serve with the chosen local tier.
    #[default]
    Normal,
    /// Memory getting short: offload to an accelerator or the remote tier when configured.
    Elevated,
    /// Memory short: offload; load no new local model.
    High,
    /// Memory nearly gone: serve with the rule-based tier only.
    Critical,
}

impl fmt::Display for PressureLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PressureLevel::Normal => "normal",
            PressureLevel::Elevated => "elevated",
            PressureLevel::High => "high",
            PressureLevel::Critical => "critical",
        })
    }
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
