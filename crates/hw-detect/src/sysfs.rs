//! Linux readers: `/proc` and `/sys` below a root path, so that tests can
//! point them at fixture trees.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::profile::{
    CgroupMemory, CgroupVersion, CoreKindSource, CpuInfo, CpuVendor, MemoryInfo, EFFICIENCY_RATIO,
};

/// Values at or above this are "no limit" in cgroup v1 (the kernel writes
/// `PAGE_COUNTER_MAX * PAGE_SIZE`, about 2^63).
const CGROUP_V1_UNLIMITED: u64 = 1 << 62;

/// Parses a kernel CPU list such as `0-3,8,10-11`.
///
/// Returns `None` for malformed input (the caller falls back). An empty or
/// all-whitespace list is an empty set.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let text = text.trim();
    let mut cpus = BTreeSet::new();
    if text.is_empty() {
        return Some(Vec::new());
    }
    for part in text.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                // A range wider than any real machine is a corrupt file, not
                // a reason to allocate gigabytes.
                if b < a || b - a > 65_536 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => {
                cpus.insert(part.parse().ok()?);
            }
        }
    }
    Some(cpus.into_iter().collect())
}

/// The directories from a cgroup's own (`cg_path`, as `/proc/self/cgroup`
/// lists it) up to its hierarchy's root, inside `base` (e.g.
/// `sys/fs/cgroup/memory`), own first. Limits are read along this walk: the
/// effective limit is the smallest on the path, and inside a cgroup
/// namespace the listed path may not exist below the mount, so the walk
/// reaches the mount's own files.
///
pub(crate) fn cgroup_dirs(base: &str, cg_path: &str) -> Vec<String> {
    let mut dirs = Vec::new();
    let mut p = cg_path.trim_end_matches('/').to_string();
    loop {
        dirs.push(format!("{base}{p}"));
        match p.rfind('/') {
            Some(i) if !p.is_empty() => p.truncate(i),
            _ => break,
        }
    }
    dirs.push(base.to_string());
    dirs.dedup();
    dirs
}

/// The cgroups a process belongs to, parsed from `/proc/<pid>/cgroup`
/// (`id:controllers:path` lines): the unified (v2) path, and the path of
/// each v1 controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CgroupMembership {
    /// The unified hierarchy's path (`0::<path>`), if listed.
    pub(crate) v2: Option<String>,
    /// `(controller, path)` of each v1 controller listed.
    pub(crate) v1: Vec<(String, String)>,
}

impl CgroupMembership {
    /// Parses the lines; malformed ones are skipped.
    pub(crate) fn parse(text: &str) -> Self {
        let mut m = CgroupMembership::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                m.v2 = Some(path.to_string());
            } else {
                for c in controllers.split(',').filter(|c| !c.is_empty()) {
                    m.v1.push((c.to_string(), path.to_string()));
                }
            }
        }
        m
    }

    /// The path of v1 controller `name`, if listed.
    pub(crate) fn v1_path(&self, name: &str) -> Option<&str> {
        self.v1
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, p)| p.as_str())
    }
}

/// Reads `/proc` and `/sys` below `root`.
#[derive(Debug, Clone)]
pub(crate) struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// Reads an optional file; missing or unreadable is `None`.
    fn read_opt(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    fn read_u64_opt(&self, rel: &str) -> Option<u64> {
        let text = self.read_opt(rel)?;
        match text.trim().parse() {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::debug!(path = %self.path(rel).display(), "ignoring unparseable number");
                None
            }
        }
    }

    // ---------------------------------------------------------------- CPU

    /// The online logical CPUs: `/sys/devices/system/cpu/online`, else the
    /// `cpuN` directories, else the `processor` lines of `/proc/cpuinfo`,
    /// else one CPU.
    fn online_cpus(&self) -> Vec<usize> {
        if let Some(list) = self
            .read_opt("sys/devices/system/cpu/online")
            .and_then(|t| parse_cpu_list(&t))
            .filter(|l| !l.is_empty())
        {
            return list;
        }
        let mut from_dirs: Vec<usize> = std::fs::read_dir(self.path("sys/devices/system/cpu"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("cpu")?.parse().ok()
            })
            .collect();
        if !from_dirs.is_empty() {
            from_dirs.sort_unstable();
            return from_dirs;
        }
        let n = self
            .read_opt("proc/cpuinfo")
            .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
            .unwrap_or(0);
        tracing::debug!(n, "no CPU topology in sysfs; counting /proc/cpuinfo");
        (0..n.max(1)).collect()
    }

    fn cpu_file(&self, cpu: usize, rel: &str) -> String {
        format!("sys/devices/system/cpu/cpu{cpu}/{rel}")
    }

    /// Brand and vendor from `/proc/cpuinfo`.
    fn brand_and_vendor(&self) -> (String, String) {
        let info = self.read_opt("proc/cpuinfo").unwrap_or_default();
        let field = |names: &[&str]| -> Option<String> {
            info.lines().find_map(|line| {
                let (k, v) = line.split_once(':')?;
                names
                    .contains(&k.trim())
                    .then(|| v.trim().to_string())
                    .filter(|v| !v.is_empty())
            })
        };
        let brand = field(&["model name", "Model", "Hardware", "cpu model"])
            .unwrap_or_else(|| "unknown".to_string());
        let vendor = field(&["vendor_id", "CPU implementer"]).unwrap_or_default();
        // Arm reports an implementer code; 0x41 is Arm Ltd, 0x61 Apple.
        let vendor = match vendor.as_str() {
            "0x41" => "ARM".to_string(),
            "0x61" => "Apple".to_string(),
            _ => vendor,
        };
        (brand, vendor)
    }

    /// SMT groups from `topology/thread_siblings_list`; a CPU without the
    /// file is its own core.
    fn smt_groups(&self, online: &[usize]) -> Vec<Vec<usize>> {
        let online_set: BTreeSet<usize> = online.iter().copied().collect();
        let mut groups: BTreeSet<Vec<usize>> = BTreeSet::new();
        for &cpu in online {
            let group = self
                .read_opt(&self.cpu_file(cpu, "topology/thread_siblings_list"))
                .and_then(|t| parse_cpu_list(&t))
                .map(|g| {
                    g.into_iter()
                        .filter(|c| online_set.contains(c))
                        .collect::<Vec<_>>()
                })
                .filter(|g| g.contains(&cpu))
                .unwrap_or_else(|| vec![cpu]);
            groups.insert(group);
        }
        groups.into_iter().collect()
    }

    /// Splits online CPUs into (performance, efficiency, source).
    fn core_kinds(&self, online: &[usize]) -> (Vec<usize>, Vec<usize>, CoreKindSource) {
        let online_set: BTreeSet<usize> = online.iter().copied().collect();
        // 1. Intel hybrid PMU devices.
        let core = self
            .read_opt("sys/devices/cpu_core/cpus")
            .and_then(|t| parse_cpu_list(&t));
        let atom = self
            .read_opt("sys/devices/cpu_atom/cpus")
            .and_then(|t| parse_cpu_list(&t));
        if let (Some(p), Some(e)) = (core, atom) {
            let p: Vec<usize> = p.into_iter().filter(|c| online_set.contains(c)).collect();
            let e: Vec<usize> = e.into_iter().filter(|c| online_set.contains(c)).collect();
            if !p.is_empty() {
                return (p, e, CoreKindSource::IntelHybrid);
            }
        }
        // 2. cpufreq maximum frequencies, 3. cpu_capacity.
        for (file, source) in [
            ("cpufreq/cpuinfo_max_freq", CoreKindSource::CpufreqClusters),
            ("cpu_capacity", CoreKindSource::CpuCapacity),
        ] {
            let values: Option<Vec<(usize, u64)>> = online
                .iter()
                .map(|&c| {
                    self.read_u64_opt(&self.cpu_file(c, file))
                        .filter(|&v| v > 0)
                        .map(|v| (c, v))
                })
                .collect();
            let Some(values) = values else { continue };
            let max = values.iter().map(|&(_, v)| v).max().unwrap_or(0);
            let threshold = max as f64 * EFFICIENCY_RATIO;
            let (p, e): (Vec<_>, Vec<_>) =
                values.iter().partition(|&&(_, v)| v as f64 >= threshold);
            let p: Vec<usize> = p.into_iter().map(|&(c, _)| c).collect();
            let e: Vec<usize> = e.into_iter().map(|&(c, _)| c).collect();
            if e.is_empty() {
                // Every CPU reports, and they are alike: the answer is
                // "uniform", from this source; no need to ask the next.
                return (p, e, CoreKindSource::Uniform);
            }
            return (p, e, source);
        }
        (online.to_vec(), Vec::new(), CoreKindSource::Uniform)
    }

    pub(crate) fn cpu(&self) -> CpuInfo {
        let online = self.online_cpus();
        let (brand, vendor_id) = self.brand_and_vendor();
        let smt_groups = self.smt_groups(&online);
        let (performance, efficiency, core_kind_source) = self.core_kinds(&online);
        let perf_set: BTreeSet<usize> = performance.iter().copied().collect();
        let performance_physical = smt_groups
            .iter()
            .filter(|g| g.iter().any(|c| perf_set.contains(c)))
            .count();
        CpuInfo {
            vendor: CpuVendor::from_vendor_and_brand(&vendor_id, &brand),
            brand,
            vendor_id,
            logical: online.len(),
            physical: smt_groups.len().max(1),
            efficiency_physical: smt_groups.len().saturating_sub(performance_physical),
            performance_physical,
            performance,
            efficiency,
            core_kind_source,
            smt_groups,
        }
    }

    // ------------------------------------------------------------- Memory

    fn meminfo(&self) -> Result<BTreeMap<String, u64>> {
        let path = self.path("proc/meminfo");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            what: "the machine's memory",
            source,
        })?;
        let mut fields = BTreeMap::new();
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let Some(Ok(value)) = words.next().map(str::parse::<u64>) else {
                continue;
            };
            let scale = match words.next() {
                Some("kB") => 1024,
                _ => 1,
            };
            fields.insert(key.trim().to_string(), value.saturating_mul(scale));
        }
        if !fields.contains_key("MemTotal") {
            return Err(Error::Parse {
                path,
                expected: "a `MemTotal: <n> kB` line",
                found: text.chars().take(80).collect(),
            });
        }
        Ok(fields)
    }

    /// The cgroup's memory limit and usage, v2 first, then v1.
    fn cgroup(&self) -> Option<CgroupMemory> {
        let membership =
            CgroupMembership::parse(&self.read_opt("proc/self/cgroup").unwrap_or_default());
        let v2_path = membership.v2.clone();
        let v1_path = membership.v1_path("memory").map(str::to_string);
        // v1's memory controller wins when it is mounted: a hybrid host
        // has a v2 line too, but limits memory through v1.
        if self.path("sys/fs/cgroup/memory").is_dir() {
            if let Some(found) = self.cgroup_v1(v1_path.as_deref().unwrap_or("/")) {
                return Some(found);
            }
        }
        if self.path("sys/fs/cgroup/cgroup.controllers").exists()
            || self.path("sys/fs/cgroup/memory.max").exists()
            || v2_path.is_some()
        {
            return self.cgroup_v2(v2_path.as_deref().unwrap_or("/"));
        }
        None
    }

    fn cgroup_v2(&self, cg_path: &str) -> Option<CgroupMemory> {
        let dirs = cgroup_dirs("sys/fs/cgroup", cg_path);
        // The effective limit is the smallest along the path to the root.
        let mut limit: Option<u64> = None;
        let mut own_dir = None;
        for dir in &dirs {
            let Some(text) = self.read_opt(&format!("{dir}/memory.max")) else {
                continue;
            };
            own_dir.get_or_insert_with(|| dir.clone());
            match text.trim() {
                "max" => {}
                t => match t.parse::<u64>() {
                    Ok(v) => limit = Some(limit.map_or(v, |l| l.min(v))),
                    Err(_) => {
                        tracing::warn!(dir = %dir, value = t, "ignoring unparseable memory.max")
                    }
                },
            }
        }
        let own_dir = own_dir.or_else(|| {
            dirs.iter()
                .find(|d| self.path(&format!("{d}/memory.current")).exists())
                .cloned()
        })?;
        let usage = self
            .read_u64_opt(&format!("{own_dir}/memory.current"))
            .map(|current| {
                let inactive =
                    self.stat_field(&format!("{own_dir}/memory.stat"), &["inactive_file"]);
                current.saturating_sub(inactive.unwrap_or(0))
            });
        Some(CgroupMemory {
            version: CgroupVersion::V2,
            limit,
            usage,
        })
    }

    fn cgroup_v1(&self, cg_path: &str) -> Option<CgroupMemory> {
        let dirs = cgroup_dirs("sys/fs/cgroup/memory", cg_path);
        let dir = dirs
            .iter()
            .find(|d| self.path(&format!("{d}/memory.limit_in_bytes")).exists())?;
        let limit = self
            .read_u64_opt(&format!("{dir}/memory.limit_in_bytes"))
            .filter(|&v| v < CGROUP_V1_UNLIMITED);
        let usage = self
            .read_u64_opt(&format!("{dir}/memory.usage_in_bytes"))
            .map(|current| {
                let inactive = self.stat_field(
                    &format!("{dir}/memory.stat"),
                    &["total_inactive_file", "inactive_file"],
                );
                current.saturating_sub(inactive.unwrap_or(0))
            });
        Some(CgroupMemory {
            version: CgroupVersion::V1,
            limit,
            usage,
        })
    }

    fn stat_field(&self, rel: &str, names: &[&str]) -> Option<u64> {
        let text = self.read_opt(rel)?;
        names.iter().find_map(|name| {
            text.lines().find_map(|line| {
                let (k, v) = line.split_once(' ')?;
                (k == *name).then(|| v.trim().parse().ok()).flatten()
            })
        })
    }

    pub(crate) fn memory(&self) -> Result<MemoryInfo> {
        let m = self.meminfo()?;
        let total = m["MemTotal"];
        // Kernels before 3.14 have no MemAvailable: approximate it the way
        // `free` did then.
        let available = m.get("MemAvailable").copied().unwrap_or_else(|| {
            ["MemFree", "Buffers", "Cached"]
                .iter()
                .filter_map(|k| m.get(*k))
                .sum()
        });
        Ok(MemoryInfo::new(
            total,
            available,
            m.get("SwapTotal").copied().unwrap_or(0),
            m.get("SwapFree").copied().unwrap_or(0),
            self.cgroup(),
        ))
    }

    /// NVIDIA GPUs the kernel driver lists in `/proc/driver/nvidia/gpus`.
    pub(crate) fn nvidia_gpus(&self) -> usize {
        std::fs::read_dir(self.path("proc/driver/nvidia/gpus"))
            .map(|dir| dir.flatten().count())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
        assert_eq!(parse_cpu_list("0-99999999999"), None);
    }

    #[test]
    fn cgroup_membership_lists_v1_and_v2_paths() {
        let m = CgroupMembership::parse("4:memory:/app\n3:cpu,cpuacct:/app\n0::/\n");
        assert_eq!(m.v2.as_deref(), Some("/"));
        assert_eq!(m.v1_path("memory"), Some("/app"));
        assert_eq!(m.v1_path("cpuacct"), Some("/app"));
        assert_eq!(m.v1_path("cpuset"), None);
    }

    #[test]
    fn cgroup_dirs_walk_to_the_root() {
        assert_eq!(
            cgroup_dirs("sys/fs/cgroup", "/a/b"),
            vec!["sys/fs/cgroup/a/b", "sys/fs/cgroup/a", "sys/fs/cgroup"]
        );
        assert_eq!(cgroup_dirs("sys/fs/cgroup", "/"), vec!["sys/fs/cgroup"]);
    }
}
