//! What bounds the CPUs this process may use: its affinity mask and its
//! cgroup (cpuset and CPU bandwidth quota); and the thread count that follows.

use std::path::Path;

use hw_detect::{CpuInfo, HardwareProfile};
use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;

/// The limits on where and how much this process may compute.
///
/// [`CpuLimits::detect`] reads them from the running process;
/// [`CpuLimits::read_cgroup`] reads the cgroup half from a fixture tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuLimits {
    /// The process's affinity mask (`sched_getaffinity`); `None` where the OS
    /// cannot say.
    pub affinity: Option<CpuSet>,
    /// The cgroup's effective cpuset; `None` without a cpuset controller.
    pub cpuset: Option<CpuSet>,
    /// The cgroup's CPU bandwidth quota in CPUs (`quota / period`, e.g. 1.5);
    /// `None` when unlimited.
    pub quota: Option<f64>,
}

impl CpuLimits {
    /// Reads this process's limits: its affinity mask, and its cgroup below
    /// `/` on Linux.
    pub fn detect() -> Self {
        let mut limits = if cfg!(target_os = "linux") {
            CpuLimits::read_cgroup("/")
        } else {
            CpuLimits::default()
        };
        limits.affinity = crate::pin::process_affinity();
        limits
    }

    /// Reads the cgroup limits (cpuset and CPU quota) of the process whose
    /// `/proc/self/cgroup` and `/sys/fs/cgroup` lie below `root`; the
    /// affinity mask is left `None`.
    ///
    /// The reading is `hw_detect::Detector::cgroup_cpu`'s (cgroup v1 where
    /// its controllers are mounted, else v2; the quota is the smallest along
    /// the path from the process's cgroup to the root).
    pub fn read_cgroup(root: impl AsRef<Path>) -> Self {
        let cg = hw_detect::Detector::with_root(root).cgroup_cpu();
        CpuLimits {
            affinity: None,
            cpuset: cg.cpuset.map(CpuSet::new),
            quota: cg.quota,
        }
    }

    /// The CPUs of `online` this process may run on: those also in the
    /// affinity mask and the cpuset, where known. When the limits exclude
    /// every online CPU (a stale or foreign reading) the online CPUs are
    /// returned unchanged rather than nothing.
    pub fn allowed(&self, online: &CpuSet) -> CpuSet {
        let mut set = online.clone();
        for limit in [&self.affinity, &self.cpuset].into_iter().flatten() {
            let narrowed = set.intersection(limit);
            if narrowed.is_empty() {
                tracing::debug!(%limit, %set, "CPU limit excludes every online CPU; ignoring it");
            } else {
                set = narrowed;
            }
        }
        set
    }

    /// Threads the CPU quota allows: `floor(quota)`, at least 1; `None` when
    /// there is no quota.
    ///
    /// Rounding down: parallel compute threads that together use more than
    /// the quota are all throttled at the end of each period, and a matmul
    /// split across them waits for the throttled ones.
    pub fn quota_threads(&self) -> Option<usize> {
        self.quota.map(|q| (q.floor() as usize).max(1))
    }
}

/// The online logical CPUs of a profile: its performance and efficiency CPUs.
pub(crate) fn online_cpus(cpu: &CpuInfo) -> CpuSet {
    let set = CpuSet::new(cpu.performance.iter().chain(&cpu.efficiency).copied());
    if set.is_empty() {
        CpuSet::new(0..cpu.logical.max(1))
    } else {
        set
    }
}

/// The number of compute threads to use on this machine, now.
///
/// The rule (llama.cpp's): one thread per **physical performance core**,
/// counting only cores the process may run on, and never more than the
/// cgroup's CPU quota allows; at least 1. See [`recommended_threads_within`].
///
/// ```
/// let profile = hw_detect::HardwareProfile::detect()?;
/// let n = affinity::recommended_threads(&profile);
/// assert!(n >= 1 && n <= profile.cpu.logical);
/// # Ok::<(), hw_detect::Error>(())
/// ```
pub fn recommended_threads(profile: &HardwareProfile) -> usize {
    recommended_threads_within(profile, &CpuLimits::detect())
}

/// [`recommended_threads`] under given limits.
///
/// 1. Allowed CPUs: the profile's online CPUs ∩ affinity ∩ cpuset.
/// 2. Count the physical cores (SMT groups) holding an allowed performance
///    CPU; if none (a cpuset of efficiency cores only), the physical cores
///    holding any allowed CPU. Without SMT topology, count CPUs instead.
/// 3. Cap by [`CpuLimits::quota_threads`]; at least 1.
pub fn recommended_threads_within(profile: &HardwareProfile, limits: &CpuLimits) -> usize {
    let cpu = &profile.cpu;
    let allowed = limits.allowed(&online_cpus(cpu));
    let perf: CpuSet = cpu.performance.iter().copied().collect();
    let allowed_perf = allowed.intersection(&perf);
    let cores_holding = |set: &CpuSet| -> usize {
        if cpu.smt_groups.is_empty() {
            set.len()
        } else {
            cpu.smt_groups
                .iter()
                .filter(|g| g.iter().any(|&c| set.contains(c)))
                .count()
        }
    };
    let mut n = cores_holding(&allowed_perf);
    if n == 0 {
        n = cores_holding(&allowed);
    }
    if let Some(q) = limits.quota_threads() {
        n = n.min(q);
    }
    n.max(1)
}
