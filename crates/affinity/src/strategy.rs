//! Strategies, the configuration, and the [`ThreadPlacement`] they resolve to.

use std::fmt;

use hw_detect::{CpuInfo, HardwareProfile};
use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;
use crate::error::{Error, Result};
use crate::limits::{online_cpus, recommended_threads_within, CpuLimits};
use crate::pin::{pin_current_thread, PinOutcome};

/// Which CPUs compute threads may run on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinStrategy {
    /// Chosen from the hardware profile, first rule that matches:
    ///
    /// 1. a hybrid CPU (performance and efficiency cores) →
    ///    [`PerformanceCoresOnly`](PinStrategy::PerformanceCoresOnly): work
    ///    split evenly across threads waits for the slowest, and an E-core is
    ///    the slowest;
    /// 2. a CPU with SMT (hyper-threads) →
    ///    [`OnePerPhysicalCore`](PinStrategy::OnePerPhysicalCore): two
    ///    threads of one core share its vector units, which a matmul already
    ///    keeps busy;
    /// 3. otherwise [`All`](PinStrategy::All).
    #[default]
    Auto,
    /// The performance cores only (all of them, SMT siblings included).
    PerformanceCoresOnly,
    /// The first logical CPU of each physical core, from the SMT topology
    /// (`thread_siblings_list`), whatever the numbering: on some machines
    /// siblings are 0/1, on others 0/N.
    OnePerPhysicalCore,
    /// Every CPU the process may run on.
    All,
    /// These CPU ids, exactly.
    Explicit(Vec<usize>),
}

impl PinStrategy {
    /// What [`Auto`](PinStrategy::Auto) stands for on this CPU, with the
    /// reason; any other strategy is returned as it is.
    pub fn resolve(&self, cpu: &CpuInfo) -> (PinStrategy, String) {
        if *self != PinStrategy::Auto {
            return (self.clone(), "asked for".to_string());
        }
        if cpu.is_hybrid() {
            (
                PinStrategy::PerformanceCoresOnly,
                format!(
                    "hybrid CPU ({} performance, {} efficiency CPUs): performance cores only",
                    cpu.performance.len(),
                    cpu.efficiency.len()
                ),
            )
        } else if cpu.has_smt() {
            (
                PinStrategy::OnePerPhysicalCore,
                format!(
                    "SMT ({} logical CPUs on {} cores): one CPU per physical core",
                    cpu.logical, cpu.physical
                ),
            )
        } else {
            (
                PinStrategy::All,
                format!("{} uniform cores without SMT: all CPUs", cpu.physical),
            )
        }
    }

    /// The CPUs this strategy selects on this CPU, before any limit.
    /// [`Auto`](PinStrategy::Auto) is resolved first.
    pub fn cpus(&self, cpu: &CpuInfo) -> CpuSet {
        let online = online_cpus(cpu);
        match self.resolve(cpu).0 {
            PinStrategy::PerformanceCoresOnly if !cpu.performance.is_empty() => {
                CpuSet::new(cpu.performance.iter().copied())
            }
            PinStrategy::OnePerPhysicalCore if !cpu.smt_groups.is_empty() => cpu
                .smt_groups
                .iter()
                .filter_map(|g| g.first().copied())
                .collect(),
            PinStrategy::Explicit(list) => CpuSet::new(list),
            _ => online,
        }
    }
}

impl fmt::Display for PinStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinStrategy::Auto => f.write_str("auto"),
            PinStrategy::PerformanceCoresOnly => f.write_str("performance cores only"),
            PinStrategy::OnePerPhysicalCore => f.write_str("one per physical core"),
            PinStrategy::All => f.write_str("all"),
            PinStrategy::Explicit(list) => write!(f, "explicit {}", CpuSet::new(list.clone())),
        }
    }
}

/// How a pool's threads are placed on the chosen CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinMode {
    /// Every thread may run on any CPU of the set; the kernel balances them
    /// within it. Keeps threads off excluded CPUs (E-cores, SMT siblings)
    /// without stranding a thread behind a busy CPU.
    #[default]
    WholeSet,
    /// Thread `i` runs on one CPU only: the `i`-th in spread order (one CPU
    /// of each physical core first, then their siblings), cycling when there
    /// are more threads than CPUs.
    OneCpuPerThread,
}

/// How to place compute threads. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AffinityConfig {
    /// Which CPUs. Default [`PinStrategy::Auto`].
    pub strategy: PinStrategy,
    /// How threads spread over them. Default [`PinMode::WholeSet`].
    pub mode: PinMode,
    /// Threads in a pool; default `None`:
    /// [`recommended_threads`](crate::recommended_threads), and no more than
    /// the physical cores of the chosen CPUs.
    pub threads: Option<usize>,
    /// How long building a pool waits for its threads to start and report
    /// their pinning, in milliseconds. Default 5000.
    pub start_timeout_ms: u64,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            strategy: PinStrategy::Auto,
            mode: PinMode::WholeSet,
            threads: None,
            start_timeout_ms: 5000,
        }
    }
}

/// A resolved plan: which CPUs, how many threads, and which thread goes where.
///
/// ```
/// use affinity::{AffinityConfig, CpuLimits, ThreadPlacement, PinStrategy};
///
/// let profile = hw_detect::HardwareProfile::detect()?;
/// let placement = ThreadPlacement::plan(&profile, &AffinityConfig::default())?;
/// assert_ne!(placement.strategy, PinStrategy::Auto, "Auto is resolved");
/// assert!(placement.threads >= 1);
/// assert!(!placement.cpus.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadPlacement {
    /// The strategy asked for.
    pub requested: PinStrategy,
    /// The strategy used ([`PinStrategy::Auto`] resolved).
    pub strategy: PinStrategy,
    /// Why that strategy and these CPUs, in words.
    pub reason: String,
    /// The CPUs threads may run on: the strategy's, within the limits.
    pub cpus: CpuSet,
    /// The same CPUs in spread order: one CPU of each physical core first
    /// (by the SMT topology), then the second hardware threads, and so on.
    pub order: Vec<usize>,
    /// Threads a pool gets.
    pub threads: usize,
    /// How threads are placed on `cpus`.
    pub mode: PinMode,
    /// See [`AffinityConfig::start_timeout_ms`].
    pub start_timeout_ms: u64,
}

impl ThreadPlacement {
    /// Plans placement for this process (its affinity mask and cgroup are read now).
    pub fn plan(profile: &HardwareProfile, config: &AffinityConfig) -> Result<ThreadPlacement> {
        ThreadPlacement::plan_within(profile, config, &CpuLimits::detect())
    }

    /// Plans placement under given limits.
    ///
    /// An explicit CPU list must lie within the CPUs the process may run on
    /// ([`Error::CpuNotAllowed`] otherwise). A derived set that the limits
    /// exclude entirely falls back to the allowed CPUs, and says so in
    /// `reason`.
    pub fn plan_within(
        profile: &HardwareProfile,
        config: &AffinityConfig,
        limits: &CpuLimits,
    ) -> Result<ThreadPlacement> {
        let cpu = &profile.cpu;
        let allowed = limits.allowed(&online_cpus(cpu));
        let (strategy, mut reason) = config.strategy.resolve(cpu);
        let wanted = strategy.cpus(cpu);
        let cpus = match &strategy {
            PinStrategy::Explicit(list) => {
                if list.is_empty() {
                    return Err(Error::invalid(
                        "PinStrategy::Explicit",
                        "[]",
                        "at least one CPU, or PinStrategy::Auto",
                    ));
                }
                if let Some(&bad) = list.iter().find(|&&c| !allowed.contains(c)) {
                    return Err(Error::CpuNotAllowed {
                        cpu: bad,
                        allowed: allowed.to_string(),
                    });
                }
                wanted
            }
            _ => {
                let within = wanted.intersection(&allowed);
                if within.is_empty() {
                    reason += &format!(
                        "; none of CPUs {wanted} is allowed, so the allowed CPUs {allowed} instead"
                    );
                    allowed
                } else {
                    within
                }
            }
        };
        let order = spread_order(&cpus, &cpu.smt_groups);
        let threads = match config.threads {
            Some(0) => {
                return Err(Error::invalid(
                    "threads",
                    0,
                    "at least 1, or unset for the recommended count",
                ))
            }
            Some(n) => n,
            None => {
                let cores = physical_cores_holding(&cpus, &cpu.smt_groups);
                recommended_threads_within(profile, limits)
                    .min(cores)
                    .max(1)
            }
        };
        Ok(ThreadPlacement {
            requested: config.strategy.clone(),
            strategy,
            reason,
            cpus,
            order,
            threads,
            mode: config.mode,
            start_timeout_ms: config.start_timeout_ms,
        })
    }

    /// The CPUs pool thread `index` is pinned to under this plan.
    pub fn cpus_for_thread(&self, index: usize) -> CpuSet {
        match self.mode {
            PinMode::WholeSet => self.cpus.clone(),
            PinMode::OneCpuPerThread => match self.order.len() {
                0 => self.cpus.clone(),
                n => CpuSet::new([self.order[index % n]]),
            },
        }
    }

    /// Pins the calling thread as pool thread `index` would be.
    pub fn pin_current_thread(&self, index: usize) -> PinOutcome {
        pin_current_thread(&self.cpus_for_thread(index))
    }
}

/// Physical cores (SMT groups) that hold a CPU of `cpus`; the number of CPUs
/// where no topology is known.
fn physical_cores_holding(cpus: &CpuSet, groups: &[Vec<usize>]) -> usize {
    if groups.is_empty() {
        return cpus.len().max(1);
    }
    let n = groups
        .iter()
        .filter(|g| g.iter().any(|&c| cpus.contains(c)))
        .count();
    // CPUs that no group lists count as cores of their own.
    let listed: CpuSet = groups.iter().flatten().copied().collect();
    (n + cpus.iter().filter(|&c| !listed.contains(c)).count()).max(1)
}

/// `cpus` ordered so that the first of them are on distinct physical cores:
/// rank 0 of every SMT group (groups by first CPU), then rank 1, …; CPUs that
/// no group lists come last.
pub(crate) fn spread_order(cpus: &CpuSet, groups: &[Vec<usize>]) -> Vec<usize> {
    let members: Vec<Vec<usize>> = groups
        .iter()
        .map(|g| {
            let mut g: Vec<usize> = g.iter().copied().filter(|&c| cpus.contains(c)).collect();
            g.sort_unstable();
            g
        })
        .filter(|g| !g.is_empty())
        .collect();
    let mut order = Vec::with_capacity(cpus.len());
    let mut seen = std::collections::BTreeSet::new();
    let deepest = members.iter().map(Vec::len).max().unwrap_or(0);
    for rank in 0..deepest {
        for g in &members {
            if let Some(&c) = g.get(rank) {
                if seen.insert(c) {
                    order.push(c);
                }
            }
        }
    }
    order.extend(cpus.iter().filter(|c| !seen.contains(c)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `cores` physical cores of 1–`smt` threads each, numbered either
    /// adjacently (0/1) or split (0/N).
    fn topology(cores: usize, smt: usize, split: bool) -> Vec<Vec<usize>> {
        (0..cores)
            .map(|c| {
                (0..smt)
                    .map(|t| if split { c + t * cores } else { c * smt + t })
                    .collect()
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn spread_order_puts_distinct_cores_first(
            cores in 1usize..16,
            smt in 1usize..4,
            split in any::<bool>(),
            keep in proptest::collection::vec(any::<bool>(), 64),
        ) {
            let groups = topology(cores, smt, split);
            let all: Vec<usize> = groups.iter().flatten().copied().collect();
            let cpus: CpuSet = all.iter().copied().filter(|&c| keep[c % 64]).collect();
            let order = spread_order(&cpus, &groups);
            // A permutation of the set.
            prop_assert_eq!(CpuSet::new(order.clone()), cpus.clone());
            prop_assert_eq!(order.len(), cpus.len());
            // The first k CPUs are on k different cores, k = cores holding a CPU.
            let k = physical_cores_holding(&cpus, &groups);
            let core_of = |c: usize| groups.iter().position(|g| g.contains(&c)).unwrap();
            let first: std::collections::BTreeSet<usize> =
                order.iter().take(k).map(|&c| core_of(c)).collect();
            prop_assert_eq!(first.len(), k.min(cpus.len()));
        }
    }

    #[test]
    fn cpus_without_topology_come_last() {
        let groups = vec![vec![0, 1], vec![2, 3]];
        let order = spread_order(&CpuSet::new([0, 1, 2, 3, 9]), &groups);
        assert_eq!(order, vec![0, 2, 1, 3, 9]);
        assert_eq!(physical_cores_holding(&CpuSet::new([1, 9]), &groups), 2);
        assert_eq!(physical_cores_holding(&CpuSet::new([5, 6]), &[]), 2);
    }
}
