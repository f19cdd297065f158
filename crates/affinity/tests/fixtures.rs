//! Strategies, thread counts and cgroup limits against fixture trees: fake
//! `/proc` and `/sys` in a tempdir, profiled by hw-detect.

use std::path::Path;

use affinity::{
    recommended_threads_within, AffinityConfig, CpuLimits, CpuSet, Error, PinMode, PinStrategy,
    ThreadPlacement,
};
use hw_detect::{Detector, HardwareProfile};

/// A fake Linux root.
struct Tree(tempfile::TempDir);

impl Tree {
    fn new() -> Self {
        let t = Tree(tempfile::tempdir().unwrap());
        t.file(
            "proc/meminfo",
            "MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n",
        );
        t
    }

    fn file(&self, rel: &str, content: &str) -> &Self {
        let path = self.0.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        self
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// `n` online CPUs with the given SMT sibling lists (one per CPU).
    fn cpus(&self, vendor: &str, brand: &str, siblings: &[&str]) -> &Self {
        let n = siblings.len();
        let mut info = String::new();
        for i in 0..n {
            info += &format!("processor\t: {i}\nvendor_id\t: {vendor}\nmodel name\t: {brand}\n\n");
        }
        self.file("proc/cpuinfo", &info)
            .file("sys/devices/system/cpu/online", &format!("0-{}\n", n - 1));
        for (i, s) in siblings.iter().enumerate() {
            self.file(
                &format!("sys/devices/system/cpu/cpu{i}/topology/thread_siblings_list"),
                &format!("{s}\n"),
            );
        }
        self
    }

    fn profile(&self) -> HardwareProfile {
        Detector::with_root(self.path()).detect().unwrap()
    }

    fn limits(&self) -> CpuLimits {
        CpuLimits::read_cgroup(self.path())
    }
}

/// i5-1235U: 2 P-cores with Hyper-Threading (0-1, 2-3), 8 E-cores (4-11).
fn hybrid() -> Tree {
    let t = Tree::new();
    let mut sib = vec!["0-1", "0-1", "2-3", "2-3"];
    let singles: Vec<String> = (4..12).map(|c| c.to_string()).collect();
    sib.extend(singles.iter().map(String::as_str));
    t.cpus("GenuineIntel", "12th Gen Intel(R) Core(TM) i5-1235U", &sib)
        .file("sys/devices/cpu_core/cpus", "0-3\n")
        .file("sys/devices/cpu_atom/cpus", "4-11\n");
    t
}

/// 4 cores, 8 threads, siblings numbered 0/4, 1/5, … (as on most Intel and
/// AMD desktops): "even-numbered CPUs" would pick two threads of two cores
/// and miss the other two cores.
fn smt_split_numbering() -> Tree {
    let t = Tree::new();
    t.cpus(
        "AuthenticAMD",
        "AMD Ryzen 5 5600U",
        &["0,4", "1,5", "2,6", "3,7", "0,4", "1,5", "2,6", "3,7"],
    );
    t
}

/// 4 cores, 8 threads, siblings numbered 0/1, 2/3, ….
fn smt_adjacent_numbering() -> Tree {
    let t = Tree::new();
    t.cpus(
        "GenuineIntel",
        "Intel(R) Xeon(R)",
        &["0-1", "0-1", "2-3", "2-3", "4-5", "4-5", "6-7", "6-7"],
    );
    t
}

fn uniform(n: usize) -> Tree {
    let t = Tree::new();
    let sib: Vec<String> = (0..n).map(|c| c.to_string()).collect();
    let sib: Vec<&str> = sib.iter().map(String::as_str).collect();
    t.cpus("GenuineIntel", "Intel(R) Xeon(R)", &sib);
    t
}

fn plan(t: &Tree, strategy: PinStrategy, mode: PinMode) -> Result<ThreadPlacement, Error> {
    let config = AffinityConfig {
        strategy,
        mode,
        ..AffinityConfig::default()
    };
    ThreadPlacement::plan_within(&t.profile(), &config, &t.limits())
}

#[test]
fn auto_on_a_hybrid_cpu_takes_the_performance_cores() {
    let t = hybrid();
    let p = plan(&t, PinStrategy::Auto, PinMode::OneCpuPerThread).unwrap();
    assert_eq!(p.strategy, PinStrategy::PerformanceCoresOnly);
    assert_eq!(p.cpus, CpuSet::new(0..4));
    // One CPU of each P-core first, then the siblings.
    assert_eq!(p.order, vec![0, 2, 1, 3]);
    assert_eq!(p.threads, 2, "2 physical performance cores");
    assert_eq!(p.cpus_for_thread(0), CpuSet::new([0]));
    assert_eq!(p.cpus_for_thread(1), CpuSet::new([2]));
    assert_eq!(p.cpus_for_thread(5), CpuSet::new([2]), "cycles");
    assert_eq!(recommended_threads_within(&t.profile(), &t.limits()), 2);
}

#[test]
fn one_per_physical_core_follows_the_topology_not_parity() {
    let t = smt_split_numbering();
    let p = plan(&t, PinStrategy::Auto, PinMode::WholeSet).unwrap();
    assert_eq!(p.strategy, PinStrategy::OnePerPhysicalCore);
    assert_eq!(p.cpus, CpuSet::new([0, 1, 2, 3]));
    assert_eq!(p.threads, 4);
    assert_eq!(p.cpus_for_thread(3), CpuSet::new([0, 1, 2, 3]), "whole set");

    let t = smt_adjacent_numbering();
    let p = plan(&t, PinStrategy::OnePerPhysicalCore, PinMode::WholeSet).unwrap();
    assert_eq!(p.cpus, CpuSet::new([0, 2, 4, 6]));
    assert_eq!(p.threads, 4);
}

#[test]
fn all_on_smt_keeps_siblings_but_threads_count_cores() {
    let t = smt_split_numbering();
    let p = plan(&t, PinStrategy::All, PinMode::OneCpuPerThread).unwrap();
    assert_eq!(p.cpus, CpuSet::new(0..8));
    assert_eq!(p.order, vec![0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(p.threads, 4);
    let t = smt_adjacent_numbering();
    let p = plan(&t, PinStrategy::All, PinMode::OneCpuPerThread).unwrap();
    assert_eq!(p.order, vec![0, 2, 4, 6, 1, 3, 5, 7]);
}

#[test]
fn auto_on_uniform_cores_takes_all() {
    let t = uniform(6);
    let p = plan(&t, PinStrategy::Auto, PinMode::WholeSet).unwrap();
    assert_eq!(p.strategy, PinStrategy::All);
    assert_eq!(p.cpus, CpuSet::new(0..6));
    assert_eq!(p.threads, 6);
}

#[test]
fn explicit_lists_are_checked_against_the_allowed_cpus() {
    let t = uniform(4);
    let p = plan(&t, PinStrategy::Explicit(vec![3, 1]), PinMode::WholeSet).unwrap();
    assert_eq!(p.cpus, CpuSet::new([1, 3]));
    assert_eq!(p.threads, 2, "no more threads than the cores asked for");
    match plan(&t, PinStrategy::Explicit(vec![1, 9]), PinMode::WholeSet) {
        Err(e @ Error::CpuNotAllowed { cpu: 9, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("CPU 9") && msg.contains("0-3"), "{msg}");
        }
        other => panic!("expected CpuNotAllowed, got {other:?}"),
    }
    assert!(matches!(
        plan(&t, PinStrategy::Explicit(vec![]), PinMode::WholeSet),
        Err(Error::InvalidConfig { field, .. }) if field == "PinStrategy::Explicit"
    ));
    let zero = AffinityConfig {
        threads: Some(0),
        ..AffinityConfig::default()
    };
    assert!(matches!(
        ThreadPlacement::plan_within(&t.profile(), &zero, &t.limits()),
        Err(Error::InvalidConfig { field, .. }) if field == "threads"
    ));
}

#[test]
fn cgroup_v2_quota_caps_threads_rounding_down() {
    let t = uniform(8);
    t.file("proc/self/cgroup", "0::/app/worker\n")
        .file("sys/fs/cgroup/cgroup.controllers", "cpuset cpu memory\n")
        .file("sys/fs/cgroup/app/cpu.max", "max 100000\n")
        .file("sys/fs/cgroup/app/worker/cpu.max", "350000 100000\n");
    let limits = t.limits();
    assert_eq!(limits.quota, Some(3.5));
    assert_eq!(limits.quota_threads(), Some(3));
    assert_eq!(recommended_threads_within(&t.profile(), &limits), 3);

    // A tighter ancestor wins.
    t.file("sys/fs/cgroup/app/cpu.max", "150000 100000\n");
    let limits = t.limits();
    assert_eq!(limits.quota, Some(1.5));
    assert_eq!(recommended_threads_within(&t.profile(), &limits), 1);

    // Half a CPU is still one thread.
    t.file("sys/fs/cgroup/app/cpu.max", "50000 100000\n");
    assert_eq!(recommended_threads_within(&t.profile(), &t.limits()), 1);
}

#[test]
fn cgroup_v2_cpuset_narrows_the_cpus() {
    let t = smt_split_numbering();
    t.file("proc/self/cgroup", "0::/\n")
        .file("sys/fs/cgroup/cgroup.controllers", "cpuset cpu\n")
        .file("sys/fs/cgroup/cpuset.cpus.effective", "1-2,5\n")
        .file("sys/fs/cgroup/cpu.max", "max 100000\n");
    let limits = t.limits();
    assert_eq!(limits.cpuset, Some(CpuSet::new([1, 2, 5])));
    assert_eq!(limits.quota, None);
    // CPUs 1, 2 and 5 sit on two physical cores (5 is 1's sibling).
    assert_eq!(recommended_threads_within(&t.profile(), &limits), 2);
    let p = plan(&t, PinStrategy::All, PinMode::OneCpuPerThread).unwrap();
    assert_eq!(p.cpus, CpuSet::new([1, 2, 5]));
    assert_eq!(p.order, vec![1, 2, 5]);
    let p = plan(&t, PinStrategy::OnePerPhysicalCore, PinMode::WholeSet).unwrap();
    assert_eq!(p.cpus, CpuSet::new([1, 2]));
}

#[test]
fn cgroup_v1_quota_and_cpuset() {
    let t = uniform(8);
    t.file(
        "proc/self/cgroup",
        "4:memory:/docker/abc\n3:cpuset:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n",
    )
    .file(
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
        "250000\n",
    )
    .file(
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
        "100000\n",
    )
    .file("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    .file("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    .file(
        "sys/fs/cgroup/cpuset/docker/abc/cpuset.effective_cpus",
        "0-5\n",
    )
    .file("sys/fs/cgroup/cpuset/cpuset.effective_cpus", "0-7\n");
    let limits = t.limits();
    assert_eq!(limits.quota, Some(2.5));
    assert_eq!(limits.cpuset, Some(CpuSet::new(0..6)));
    assert_eq!(recommended_threads_within(&t.profile(), &limits), 2);
}

#[test]
fn cgroup_v1_inside_a_namespace_reads_the_mount_root() {
    // In a container the listed path is the host's; below the container's
    // mount only the root exists.
    let t = uniform(4);
    t.file(
        "proc/self/cgroup",
        "3:cpuset:/kubepods/pod1\n2:cpu:/kubepods/pod1\n",
    )
    .file("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "100000\n")
    .file("sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    .file("sys/fs/cgroup/cpuset/cpuset.cpus", "2-3\n");
    let limits = t.limits();
    assert_eq!(limits.quota, Some(1.0));
    assert_eq!(limits.cpuset, Some(CpuSet::new([2, 3])));
    assert_eq!(recommended_threads_within(&t.profile(), &limits), 1);
}

#[test]
fn no_cgroup_means_no_limit() {
    let t = uniform(4);
    assert_eq!(t.limits(), CpuLimits::default());
    assert_eq!(recommended_threads_within(&t.profile(), &t.limits()), 4);
}

#[test]
fn a_cpuset_of_efficiency_cores_falls_back_to_them() {
    let t = hybrid();
    t.file("proc/self/cgroup", "0::/\n")
        .file("sys/fs/cgroup/cgroup.controllers", "cpuset\n")
        .file("sys/fs/cgroup/cpuset.cpus.effective", "8-11\n");
    let limits = t.limits();
    assert_eq!(recommended_threads_within(&t.profile(), &limits), 4);
    let p = plan(&t, PinStrategy::Auto, PinMode::WholeSet).unwrap();
    assert_eq!(p.strategy, PinStrategy::PerformanceCoresOnly);
    assert_eq!(p.cpus, CpuSet::new(8..12));
    assert!(
        p.reason.contains("none of CPUs 0-3 is allowed"),
        "{}",
        p.reason
    );
    assert_eq!(p.threads, 4);
}

#[test]
fn the_affinity_mask_caps_threads() {
    let t = smt_split_numbering();
    let limits = CpuLimits {
        affinity: Some(CpuSet::new([0, 1, 4])),
        ..CpuLimits::default()
    };
    // 0 and 4 are one core, 1 another.
    assert_eq!(recommended_threads_within(&t.profile(), &limits), 2);
    // A mask naming no online CPU is ignored rather than leaving nothing.
    let stale = CpuLimits {
        affinity: Some(CpuSet::new([64])),
        ..CpuLimits::default()
    };
    assert_eq!(recommended_threads_within(&t.profile(), &stale), 4);
}

#[test]
fn config_round_trips_and_fills_defaults() {
    let c: AffinityConfig = serde_json::from_str(r#"{"strategy":{"explicit":[0,2]}}"#).unwrap();
    assert_eq!(c.strategy, PinStrategy::Explicit(vec![0, 2]));
    assert_eq!(c.mode, PinMode::WholeSet);
    assert_eq!(c.start_timeout_ms, 5000);
    let c: AffinityConfig =
        serde_json::from_str(r#"{"strategy":"one_per_physical_core"}"#).unwrap();
    assert_eq!(c.strategy, PinStrategy::OnePerPhysicalCore);
    let back: AffinityConfig =
        serde_json::from_str(&serde_json::to_string(&AffinityConfig::default()).unwrap()).unwrap();
    assert_eq!(back, AffinityConfig::default());
}
