//! What routing asks of the memory budget: the pressure level now, and whether a tier's
//! memory fits now.
//!
//! The router knows no memory accountant: a program answers these two questions through a
//! [`MemoryGate`] of its own (the snug runtime's `LedgerGate` answers them from mem-budget's
//! ledger and pressure monitor), or with a [`FixedGate`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// How short memory is right now, from `Normal` to `Critical`; the router orders its chain by
/// it (see [`Router::route`](crate::Router::route)).
///
/// Serialized and displayed in lower case (`"normal"`, `"elevated"`, `"high"`, `"critical"`),
/// as mem-budget's levels are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PressureLevel {
    /// Memory is plentiful: local tiers first.
    Normal,
    /// Memory is getting short: accelerator and remote tiers before CPU-local ones.
    Elevated,
    /// Memory is short: as `Elevated`, and no CPU-local model that is not already loaded.
    High,
    /// Memory is nearly gone: only the rule-based tier serves.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_print_and_serialize_in_lower_case_in_order() {
        let all = [
            PressureLevel::Normal,
            PressureLevel::Elevated,
            PressureLevel::High,
            PressureLevel::Critical,
        ];
        let names: Vec<String> = all.iter().map(|l| l.to_string()).collect();
        assert_eq!(names, ["normal", "elevated", "high", "critical"]);
        for (level, name) in all.iter().zip(&names) {
            let json = serde_json::to_string(level).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<PressureLevel>(&json).unwrap(),
                *level
            );
        }
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }
}
