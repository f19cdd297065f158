//! Tiers: the kinds of backend a request can be served by.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kind of backend that serves a request, from the cheapest local model to the rule-based
/// tier that never fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    /// A small local model.
    Small,
    /// A medium local model.
    Medium,
    /// A large local model.
    Large,
    /// A model served over the network (e.g. an OpenAI-compatible server).
    Remote,
    /// A cheap heuristic that never fails.
    RuleBased,
}

impl Tier {
    /// Whether the tier is a local model (small, medium or large).
    pub fn is_local(self) -> bool {
        matches!(self, Tier::Small | Tier::Medium | Tier::Large)
    }

    /// Rank of a local tier by size (0 small, 1 medium, 2 large); `None` for other tiers.
    pub(crate) fn size_rank(self) -> Option<u8> {
        match self {
            Tier::Small => Some(0),
            Tier::Medium => Some(1),
            Tier::Large => Some(2),
            Tier::Remote | Tier::RuleBased => None,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Small => "small",
            Tier::Medium => "medium",
            Tier::Large => "large",
            Tier::Remote => "remote",
            Tier::RuleBased => "rule-based",
        })
    }
}

/// Where a local tier computes: on the CPU (in the process's RAM budget) or on an accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Placement {
    /// On the CPU, in system memory. The default.
    #[default]
    Cpu,
    /// On a GPU or other accelerator: under memory pressure the router offloads to it.
    Accelerator,
}
