//! What bounds the CPUs this process may use: its affinity mask and its
//! cgroup (cpuset and CPU bandwidth quota); and the thread count that follows.

use std::path::{Path, PathBuf};

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
    /// cgroup v1 (`cpuset.effective_cpus`, `cpu.cfs_quota_us` /
    /// `cpu.cfs_period_us`) is read where its controllers are mounted, else
    /// v2 (`cpuset.cpus.effective`, `cpu.max`). The quota is the smallest
    /// along the path from the process's cgroup to the root.
    pub fn read_cgroup(root: impl AsRef<Path>) -> Self {
        let cg = Cgroup::new(root.as_ref());
        CpuLimits {
            affinity: None,
            cpuset: cg.cpuset(),
            quota: cg.quota(),
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

/// Reads cgroup files below a root path.
struct Cgroup {
    root: PathBuf,
    /// The unified (v2) hierarchy path from `/proc/self/cgroup`.
    v2: Option<String>,
    /// The v1 path of the `cpu` controller.
    v1_cpu: Option<String>,
    /// The v1 path of the `cpuset` controller.
    v1_cpuset: Option<String>,
}

impl Cgroup {
    fn new(root: &Path) -> Self {
        let membership = hw_detect::CgroupMembership::parse(
            &std::fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default(),
        );
        let v1 = |c: &str| membership.v1_path(c).map(str::to_string);
        let (v2, v1_cpu, v1_cpuset) = (membership.v2.clone(), v1("cpu"), v1("cpuset"));
        Cgroup {
            root: root.to_path_buf(),
            v2,
            v1_cpu,
            v1_cpuset,
        }
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel)).ok()
    }

    /// Existing directories from the cgroup's own up to the hierarchy's
    /// root, inside `base`. Inside a cgroup namespace the listed path may not
    /// exist below the mount; the walk then reaches the mount's root.
    fn dirs(&self, base: &str, cg_path: &str) -> Vec<String> {
        let mut dirs = hw_detect::cgroup_dirs(base, cg_path);
        dirs.retain(|d| self.root.join(d).is_dir());
        dirs
    }

    /// The v1 mount of a controller, where mounted.
    fn v1_base(&self, names: &[&str]) -> Option<String> {
        names
            .iter()
            .map(|n| format!("sys/fs/cgroup/{n}"))
            .find(|b| self.root.join(b).is_dir())
    }

    fn cpuset(&self) -> Option<CpuSet> {
        let parse = |text: String| CpuSet::parse(&text).filter(|s| !s.is_empty());
        if let Some(base) = self.v1_base(&["cpuset"]) {
            let path = self.v1_cpuset.as_deref().unwrap_or("/");
            for dir in self.dirs(&base, path) {
                for file in ["cpuset.effective_cpus", "cpuset.cpus"] {
                    if let Some(set) = self.read(&format!("{dir}/{file}")).and_then(parse) {
                        return Some(set);
                    }
                }
            }
            return None;
        }
        let path = self.v2.as_deref()?;
        self.dirs("sys/fs/cgroup", path)
            .into_iter()
            .find_map(|dir| {
                self.read(&format!("{dir}/cpuset.cpus.effective"))
                    .and_then(parse)
            })
    }

    fn quota(&self) -> Option<f64> {
        let mut quota: Option<f64> = None;
        let mut take = |q: f64| quota = Some(quota.map_or(q, |old: f64| old.min(q)));
        if let Some(base) = self.v1_base(&["cpu", "cpu,cpuacct", "cpuacct,cpu"]) {
            let path = self.v1_cpu.as_deref().unwrap_or("/");
            for dir in self.dirs(&base, path) {
                let num = |f: &str| -> Option<i64> {
                    self.read(&format!("{dir}/{f}"))
                        .and_then(|t| t.trim().parse().ok())
                };
                if let (Some(q), Some(p)) = (num("cpu.cfs_quota_us"), num("cpu.cfs_period_us")) {
                    // -1 is "no quota".
                    if q > 0 && p > 0 {
                        take(q as f64 / p as f64);
                    }
                }
            }
            return quota;
        }
        let path = self.v2.as_deref()?;
        for dir in self.dirs("sys/fs/cgroup", path) {
            let Some(text) = self.read(&format!("{dir}/cpu.max")) else {
                continue;
            };
            let mut words = text.split_whitespace();
            let (Some(q), p) = (words.next(), words.next()) else {
                continue;
            };
            // "max" is "no quota"; the period defaults to 100 ms.
            let p: f64 = p.and_then(|p| p.parse().ok()).unwrap_or(100_000.0);
            match q.parse::<f64>() {
                Ok(q) if q > 0.0 && p > 0.0 => take(q / p),
                Ok(_) => {}
                Err(_) if q == "max" => {}
                Err(_) => tracing::debug!(dir = %dir, value = q, "ignoring unparseable cpu.max"),
            }
        }
        quota
    }
}
