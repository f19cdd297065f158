//! The cgroup's limits on CPU: its effective cpuset and its CPU bandwidth
//! quota, read below a root path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sysfs::{cgroup_dirs, parse_cpu_list, CgroupMembership};

/// What the process's cgroup allows in CPU.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let write = |rel: &str, text: &str| -> std::io::Result<()> {
///     let p = dir.path().join(rel);
///     std::fs::create_dir_all(p.parent().unwrap())?;
///     std::fs::write(p, text)
/// };
/// write("proc/self/cgroup", "0::/app\n")?;
/// write("sys/fs/cgroup/cgroup.controllers", "cpuset cpu\n")?;
/// write("sys/fs/cgroup/app/cpu.max", "150000 100000\n")?;
/// write("sys/fs/cgroup/app/cpuset.cpus.effective", "0-3\n")?;
/// let cpu = hw_detect::Detector::with_root(dir.path()).cgroup_cpu();
/// assert_eq!(cpu.quota, Some(1.5));
/// assert_eq!(cpu.cpuset, Some(vec![0, 1, 2, 3]));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CgroupCpu {
    /// The cgroup's effective cpuset, ascending; `None` without a cpuset
    /// controller (or an empty one).
    pub cpuset: Option<Vec<usize>>,
    /// The CPU bandwidth quota in CPUs (`quota / period`, e.g. 1.5), the
    /// smallest along the path from the process's cgroup to the root;
    /// `None` when unlimited.
    pub quota: Option<f64>,
}

impl CgroupCpu {
    /// Reads the limits of the process whose `/proc/self/cgroup` and
    /// `/sys/fs/cgroup` lie below `root`.
    ///
    /// cgroup v1 (`cpuset.effective_cpus`, `cpu.cfs_quota_us` /
    /// `cpu.cfs_period_us`) is read where its controllers are mounted, else
    /// v2 (`cpuset.cpus.effective`, `cpu.max`).
    pub(crate) fn read(root: &Path) -> CgroupCpu {
        let cg = Cgroup::new(root);
        CgroupCpu {
            cpuset: cg.cpuset(),
            quota: cg.quota(),
        }
    }
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
        let membership = CgroupMembership::parse(
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
        let mut dirs = cgroup_dirs(base, cg_path);
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

    fn cpuset(&self) -> Option<Vec<usize>> {
        let parse = |text: String| parse_cpu_list(&text).filter(|s| !s.is_empty());
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
