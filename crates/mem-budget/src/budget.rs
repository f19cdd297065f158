//! Budgets per hardware class.

use hw_detect::{HardwareClass, HardwareProfile};
use serde::{Deserialize, Serialize};

use crate::units::{GIB, MIB};

/// How much memory each part of a program may use, in bytes.
///
/// The table below gives the defaults for the classes it names (sizes in
/// GiB; "8 GB" machines report a little under 8 GiB):
///
/// | class | total | reserved OS | max model | max cache | safety margin |
/// |---|---|---|---|---|---|
/// | `AppleM1Air` | 8 | 2.0 | 2.0 | 1.0 | 1.5 |
/// | `AppleM1Pro` | 16 | 2.5 | 4.0 | 2.0 | 2.0 |
/// | `IntelHybridLaptop` | 16 | 3.0 | 3.0 | 1.5 | 2.0 |
/// | `AmdRyzenLaptop` | 16 | 3.0 | 3.0 | 1.5 | 2.0 |
/// | `HighEnd` | 32 | 4.0 | 6.0 | 3.0 | 3.0 |
///
/// Other classes (`Constrained`, `Generic`, any size) are scaled from the
/// machine's effective (cgroup-aware) total by [`ScaleRatios`].
///
/// The overall cap, what all reservations together may hold, is
/// `total - reserved_os - safety_margin`. Buffers and activations have no cap
/// of their own unless one is set: they share what the overall cap leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Budget {
    /// Memory the budget is for: the machine's effective total.
    pub total: u64,
    /// Left to the operating system and other programs.
    pub reserved_os: u64,
    /// Cap on model weights (and their runtime copies).
    pub max_model: u64,
    /// Cap on caches.
    pub max_cache: u64,
    /// Cap on scratch buffers; `None`: only the overall cap applies.
    pub max_buffers: Option<u64>,
    /// Cap on activations; `None`: only the overall cap applies.
    pub max_activations: Option<u64>,
    /// Kept free on the machine at all times: a reservation is refused when
    /// the machine's available memory less this is smaller than the request.
    pub safety_margin: u64,
}

impl Default for Budget {
    /// The `Generic` budget of a 16 GiB machine.
    fn default() -> Self {
        Budget::for_class(HardwareClass::Generic, 16 * GIB)
    }
}

/// Ratios that scale a budget from the machine's effective total, for the
/// classes the table does not name.
///
/// Defaults: reserved OS 15% (at least 512 MiB, at most 8 GiB), max model
/// 25%, max cache 12.5%, safety margin 10% (at least 256 MiB, at most 8 GiB).
/// A 4 GiB container gets 614 MiB / 1 GiB / 512 MiB / 410 MiB; a 256 GiB
/// server 8 GiB / 64 GiB / 32 GiB / 8 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScaleRatios {
    /// Fraction of the total left to the OS. Default 0.15.
    pub reserved_os: f64,
    /// Floor of the OS reservation, bytes. Default 512 MiB.
    pub reserved_os_min: u64,
    /// Ceiling of the OS reservation, bytes. Default 8 GiB.
    pub reserved_os_max: u64,
    /// Fraction of the total for model weights. Default 0.25.
    pub max_model: f64,
    /// Fraction of the total for caches. Default 0.125.
    pub max_cache: f64,
    /// Fraction of the total kept free as a safety margin. Default 0.10.
    pub safety_margin: f64,
    /// Floor of the safety margin, bytes. Default 256 MiB.
    pub safety_margin_min: u64,
    /// The floor never takes more than this fraction of the total, so that a
    /// small machine or container keeps room for a model. Default 0.20 (a
    /// 128 MiB container keeps 25.6 MiB free, a 1 GiB one 205 MiB, from
    /// 1.25 GiB on the 256 MiB floor holds).
    pub safety_margin_floor_share: f64,
    /// Ceiling of the safety margin, bytes. Default 8 GiB.
    pub safety_margin_max: u64,
}

impl Default for ScaleRatios {
    fn default() -> Self {
        ScaleRatios {
            reserved_os: 0.15,
            reserved_os_min: 512 * MIB,
            reserved_os_max: 8 * GIB,
            max_model: 0.25,
            max_cache: 0.125,
            safety_margin: 0.10,
            safety_margin_min: 256 * MIB,
            safety_margin_floor_share: 0.20,
            safety_margin_max: 8 * GIB,
        }
    }
}

/// Overrides of single budget fields; `None` keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BudgetOverrides {
    /// Replaces [`Budget::reserved_os`].
    pub reserved_os: Option<u64>,
    /// Replaces [`Budget::max_model`].
    pub max_model: Option<u64>,
    /// Replaces [`Budget::max_cache`].
    pub max_cache: Option<u64>,
    /// Sets [`Budget::max_buffers`].
    pub max_buffers: Option<u64>,
    /// Sets [`Budget::max_activations`].
    pub max_activations: Option<u64>,
    /// Replaces [`Budget::safety_margin`].
    pub safety_margin: Option<u64>,
}

/// How budgets are made: the scaling ratios and any overrides.
///
/// ```
/// use mem_budget::{BudgetConfig, GIB};
/// use hw_detect::HardwareClass;
///
/// let config: BudgetConfig =
///     serde_json::from_str(r#"{"overrides": {"max_model": 1073741824}}"#)?;
/// let budget = config.budget(HardwareClass::AppleM1Air, 8 * GIB);
/// assert_eq!(budget.max_model, GIB);
/// assert_eq!(budget.max_cache, GIB); // from the table
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BudgetConfig {
    /// Ratios for classes outside the table.
    pub ratios: ScaleRatios,
    /// Field overrides applied last.
    pub overrides: BudgetOverrides,
}

impl BudgetConfig {
    /// The budget for `class` on a machine whose effective total is `total`.
    pub fn budget(&self, class: HardwareClass, total: u64) -> Budget {
        let mut b =
            Budget::table(class, total).unwrap_or_else(|| Budget::scaled(total, &self.ratios));
        let o = &self.overrides;
        b.reserved_os = o.reserved_os.unwrap_or(b.reserved_os);
        b.max_model = o.max_model.unwrap_or(b.max_model);
        b.max_cache = o.max_cache.unwrap_or(b.max_cache);
        b.max_buffers = o.max_buffers.or(b.max_buffers);
        b.max_activations = o.max_activations.or(b.max_activations);
        b.safety_margin = o.safety_margin.unwrap_or(b.safety_margin);
        b
    }
}

impl BudgetConfig {
    /// The budget for `class` on a machine whose memory is `memory`: as
    /// [`BudgetConfig::budget`] for its effective total, except that when a
    /// cgroup limit is what binds (the process lives in a container smaller
    /// than the machine) nothing is reserved for the operating system and
    /// other programs, which live outside the cgroup: the limit is this
    /// process's alone. An override of `reserved_os` still wins.
    ///
    /// ```
    /// use mem_budget::{BudgetConfig, MIB, GIB};
    /// use hw_detect::{CgroupMemory, CgroupVersion, HardwareClass, MemoryInfo};
    ///
    /// let cg = CgroupMemory { version: CgroupVersion::V1, limit: Some(256 * MIB), usage: Some(8 * MIB) };
    /// let memory = MemoryInfo::new(24 * GIB, 20 * GIB, 0, 0, Some(cg));
    /// let b = BudgetConfig::default().budget_for_memory(HardwareClass::Constrained, &memory);
    /// assert_eq!(b.reserved_os, 0);
    /// assert!(b.overall_cap() >= 200 * MIB, "{}", b.overall_cap());
    /// ```
    pub fn budget_for_memory(
        &self,
        class: HardwareClass,
        memory: &hw_detect::MemoryInfo,
    ) -> Budget {
        let mut b = self.budget(class, memory.effective_total);
        let cgroup_binds = memory
            .cgroup
            .and_then(|c| c.limit)
            .is_some_and(|limit| limit < memory.total);
        if cgroup_binds && self.overrides.reserved_os.is_none() {
            b.reserved_os = 0;
        }
        b
    }
}

fn gib(x: f64) -> u64 {
    (x * GIB as f64) as u64
}

impl Budget {
    /// The default budget for `class` on a machine with `total` bytes
    /// (effective, cgroup-aware).
    pub fn for_class(class: HardwareClass, total: u64) -> Budget {
        BudgetConfig::default().budget(class, total)
    }

    /// The default budget for a profiled machine.
    pub fn from_profile(profile: &HardwareProfile) -> Budget {
        Budget::for_class(profile.class, profile.memory.effective_total)
    }

    /// The table's row for `class`, if it has one.
    pub fn table(class: HardwareClass, total: u64) -> Option<Budget> {
        let (os, model, cache, margin) = match class {
            HardwareClass::AppleM1Air => (2.0, 2.0, 1.0, 1.5),
            HardwareClass::AppleM1Pro => (2.5, 4.0, 2.0, 2.0),
            HardwareClass::IntelHybridLaptop | HardwareClass::AmdRyzenLaptop => {
                (3.0, 3.0, 1.5, 2.0)
            }
            HardwareClass::HighEnd => (4.0, 6.0, 3.0, 3.0),
            _ => return None,
        };
        Some(Budget {
            total,
            reserved_os: gib(os),
            max_model: gib(model),
            max_cache: gib(cache),
            max_buffers: None,
            max_activations: None,
            safety_margin: gib(margin),
        })
    }

    /// A budget scaled from `total` by `ratios`.
    pub fn scaled(total: u64, ratios: &ScaleRatios) -> Budget {
        let frac = |f: f64| (total as f64 * f.clamp(0.0, 1.0)) as u64;
        let clamp = |v: u64, lo: u64, hi: u64| v.max(lo).min(hi.max(lo));
        Budget {
            total,
            reserved_os: clamp(
                frac(ratios.reserved_os),
                ratios.reserved_os_min,
                ratios.reserved_os_max,
            ),
            max_model: frac(ratios.max_model),
            max_cache: frac(ratios.max_cache),
            max_buffers: None,
            max_activations: None,
            safety_margin: clamp(
                frac(ratios.safety_margin),
                ratios
                    .safety_margin_min
                    .min(frac(ratios.safety_margin_floor_share)),
                ratios.safety_margin_max,
            ),
        }
    }

    /// What all reservations together may hold:
    /// `total - reserved_os - safety_margin` (never negative).
    pub fn overall_cap(&self) -> u64 {
        self.total
            .saturating_sub(self.reserved_os)
            .saturating_sub(self.safety_margin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_match_the_issue() {
        let air = Budget::for_class(HardwareClass::AppleM1Air, 8 * GIB);
        assert_eq!(
            (
                air.reserved_os,
                air.max_model,
                air.max_cache,
                air.safety_margin
            ),
            (2 * GIB, 2 * GIB, GIB, 3 * GIB / 2)
        );
        assert_eq!(air.overall_cap(), 8 * GIB - 2 * GIB - 3 * GIB / 2);
        let pro = Budget::for_class(HardwareClass::AppleM1Pro, 16 * GIB);
        assert_eq!((pro.reserved_os, pro.max_model), (5 * GIB / 2, 4 * GIB));
        let intel = Budget::for_class(HardwareClass::IntelHybridLaptop, 16 * GIB);
        let ryzen = Budget::for_class(HardwareClass::AmdRyzenLaptop, 16 * GIB);
        assert_eq!(intel, ryzen);
        assert_eq!(intel.max_cache, 3 * GIB / 2);
        let high = Budget::for_class(HardwareClass::HighEnd, 32 * GIB);
        assert_eq!((high.max_model, high.safety_margin), (6 * GIB, 3 * GIB));
    }

    #[test]
    fn scaled_budgets_are_sensible_small_and_large() {
        let small = Budget::for_class(HardwareClass::Constrained, 4 * GIB);
        assert_eq!(small.max_model, GIB);
        assert_eq!(small.max_cache, GIB / 2);
        assert!(small.reserved_os >= 512 * MIB && small.reserved_os < GIB);
        assert!(small.overall_cap() > 2 * GIB && small.overall_cap() < 4 * GIB);
        let big = Budget::for_class(HardwareClass::Generic, 256 * GIB);
        assert_eq!(big.reserved_os, 8 * GIB, "OS reservation capped");
        assert_eq!(big.safety_margin, 8 * GIB, "margin capped");
        assert_eq!(big.max_model, 64 * GIB);
        assert_eq!(big.overall_cap(), 240 * GIB);
        let tiny = Budget::for_class(HardwareClass::Constrained, 512 * MIB);
        assert_eq!(tiny.overall_cap(), 0, "a 512 MiB box has nothing to give");
    }

    #[test]
    fn overrides_replace_single_fields() {
        let config = BudgetConfig {
            overrides: BudgetOverrides {
                safety_margin: Some(GIB),
                max_activations: Some(100 * MIB),
                ..Default::default()
            },
            ..Default::default()
        };
        let b = config.budget(HardwareClass::HighEnd, 32 * GIB);
        assert_eq!(b.safety_margin, GIB);
        assert_eq!(b.max_activations, Some(100 * MIB));
        assert_eq!(b.max_model, 6 * GIB);
        let json = serde_json::to_string(&config).unwrap();
        let back: BudgetConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
    }
}
