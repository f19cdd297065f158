//! hw-detect against fixture trees: fake `/proc` and `/sys` in a tempdir.

use std::path::Path;

use hw_detect::{
    CgroupVersion, CoreKindSource, CpuVendor, Detector, HardwareClass, HardwareProfile, GIB,
};

/// A fake Linux root.
struct Tree(tempfile::TempDir);

impl Tree {
    fn new() -> Self {
        Tree(tempfile::tempdir().unwrap())
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

    fn meminfo(&self, total_kib: u64, avail_kib: u64) -> &Self {
        self.file(
            "proc/meminfo",
            &format!(
                "MemTotal:       {total_kib} kB\nMemFree:        1000 kB\n\
                 MemAvailable:   {avail_kib} kB\nSwapTotal:      2097148 kB\nSwapFree:       2097148 kB\n"
            ),
        )
    }

    fn cpuinfo(&self, vendor: &str, brand: &str, n: usize) -> &Self {
        let mut s = String::new();
        for i in 0..n {
            s += &format!("processor\t: {i}\nvendor_id\t: {vendor}\nmodel name\t: {brand}\n\n");
        }
        self.file("proc/cpuinfo", &s)
    }

    fn cpu(&self, id: usize, siblings: &str) -> &Self {
        self.file(
            &format!("sys/devices/system/cpu/cpu{id}/topology/thread_siblings_list"),
            &format!("{siblings}\n"),
        )
    }

    fn detect(&self) -> HardwareProfile {
        Detector::with_root(self.path()).detect().unwrap()
    }
}

const GIB_KIB: u64 = 1 << 20;

#[test]
fn hybrid_laptop_2p_8e() {
    // i5-1235U: 2 P-cores with Hyper-Threading (CPUs 0-3), 8 E-cores (4-11).
    let t = Tree::new();
    t.meminfo(16 * GIB_KIB - 400_000, 9 * GIB_KIB)
        .cpuinfo("GenuineIntel", "12th Gen Intel(R) Core(TM) i5-1235U", 12)
        .file("sys/devices/system/cpu/online", "0-11\n")
        .file("sys/devices/cpu_core/cpus", "0-3\n")
        .file("sys/devices/cpu_atom/cpus", "4-11\n");
    t.cpu(0, "0-1").cpu(1, "0-1").cpu(2, "2-3").cpu(3, "2-3");
    for c in 4..12 {
        t.cpu(c, &c.to_string());
    }
    let p = t.detect();
    assert_eq!(p.cpu.vendor, CpuVendor::Intel);
    assert_eq!(p.cpu.logical, 12);
    assert_eq!(p.cpu.physical, 10);
    assert_eq!(p.cpu.performance, vec![0, 1, 2, 3]);
    assert_eq!(p.cpu.efficiency, (4..12).collect::<Vec<_>>());
    assert_eq!(
        (p.cpu.performance_physical, p.cpu.efficiency_physical),
        (2, 8)
    );
    assert_eq!(p.cpu.core_kind_source, CoreKindSource::IntelHybrid);
    assert!(p.cpu.is_hybrid() && p.cpu.has_smt());
    assert_eq!(p.class, HardwareClass::IntelHybridLaptop);
    assert_eq!(p.memory.swap_total, 2_097_148 * 1024);
}

#[test]
fn smt_desktop_siblings_are_not_adjacent() {
    // Ryzen 9 7950X: 16 cores, 32 threads, siblings n and n+16; 64 GB.
    let t = Tree::new();
    t.meminfo(64 * GIB_KIB, 60 * GIB_KIB)
        .cpuinfo("AuthenticAMD", "AMD Ryzen 9 7950X 16-Core Processor", 32)
        .file("sys/devices/system/cpu/online", "0-31\n");
    for c in 0..32 {
        let core = c % 16;
        t.cpu(c, &format!("{},{}", core, core + 16));
        // Favoured-core turbo bins differ by a few percent: still one kind.
        let khz = if core < 2 { 5_881_000 } else { 5_480_000 };
        t.file(
            &format!("sys/devices/system/cpu/cpu{c}/cpufreq/cpuinfo_max_freq"),
            &khz.to_string(),
        );
    }
    let p = t.detect();
    assert_eq!((p.cpu.logical, p.cpu.physical), (32, 16));
    assert!(p
        .cpu
        .smt_groups
        .iter()
        .all(|g| g.len() == 2 && g[1] == g[0] + 16));
    assert!(p.cpu.efficiency.is_empty());
    assert_eq!(p.cpu.performance_physical, 16);
    assert_eq!(p.cpu.core_kind_source, CoreKindSource::Uniform);
    assert_eq!(p.class, HardwareClass::HighEnd);
}

#[test]
fn cgroup_v2_container_limited_to_4_gib() {
    let t = Tree::new();
    t.meminfo(64 * GIB_KIB, 50 * GIB_KIB)
        .cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Gold 6338", 4)
        .file("sys/devices/system/cpu/online", "0-3")
        .file("proc/self/cgroup", "0::/\n")
        .file("sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n")
        .file("sys/fs/cgroup/memory.max", "4294967296\n")
        .file("sys/fs/cgroup/memory.current", &(1536u64 << 20).to_string())
        .file(
            "sys/fs/cgroup/memory.stat",
            "anon 805306368\ninactive_file 536870912\nactive_file 0\n",
        );
    let p = t.detect();
    let cg = p.memory.cgroup.expect("cgroup found");
    assert_eq!(cg.version, CgroupVersion::V2);
    assert_eq!(cg.limit, Some(4 * GIB));
    assert_eq!(
        cg.usage,
        Some(1024 << 20),
        "inactive file cache is reclaimable"
    );
    assert_eq!(p.memory.total, 64 * GIB);
    assert_eq!(p.memory.effective_total, 4 * GIB);
    assert_eq!(p.memory.effective_available, 3 * GIB);
    assert_eq!(p.class, HardwareClass::Constrained);
}

#[test]
fn cgroup_v2_nested_limit_is_the_smallest_on_the_path() {
    let t = Tree::new();
    t.meminfo(32 * GIB_KIB, 30 * GIB_KIB)
        .file("proc/self/cgroup", "0::/user.slice/app.scope\n")
        .file("sys/fs/cgroup/cgroup.controllers", "memory\n")
        .file("sys/fs/cgroup/user.slice/memory.max", "8589934592\n")
        .file("sys/fs/cgroup/user.slice/app.scope/memory.max", "max\n")
        .file(
            "sys/fs/cgroup/user.slice/app.scope/memory.current",
            "1073741824\n",
        );
    let p = t.detect();
    assert_eq!(p.memory.cgroup.unwrap().limit, Some(8 * GIB));
    assert_eq!(p.memory.effective_total, 8 * GIB);
    assert_eq!(p.memory.effective_available, 7 * GIB);
    assert_eq!(p.class, HardwareClass::Generic);
}

#[test]
fn cgroup_v1_host_without_limit() {
    let t = Tree::new();
    t.meminfo(24 * GIB_KIB, 23 * GIB_KIB)
        .cpuinfo("AuthenticAMD", "AMD EPYC", 2)
        .file("sys/devices/system/cpu/online", "0-1")
        .file(
            "proc/self/cgroup",
            "4:memory:/process_api/abc\n3:cpuset:/\n0::/\n",
        )
        .file(
            "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes",
            "9223372036854771712\n",
        )
        .file(
            "sys/fs/cgroup/memory/process_api/abc/memory.usage_in_bytes",
            "484343808\n",
        )
        .file(
            "sys/fs/cgroup/memory/process_api/abc/memory.stat",
            "cache 1\ntotal_inactive_file 84343808\n",
        );
    let p = t.detect();
    let cg = p.memory.cgroup.unwrap();
    assert_eq!(cg.version, CgroupVersion::V1);
    assert_eq!(cg.limit, None);
    assert_eq!(cg.usage, Some(400_000_000));
    assert_eq!(p.memory.effective_total, 24 * GIB);
    assert_eq!(p.memory.effective_available, 23 * GIB);
    assert_eq!(p.class, HardwareClass::Generic);
}

#[test]
fn cgroup_v1_with_limit() {
    let t = Tree::new();
    t.meminfo(16 * GIB_KIB, 12 * GIB_KIB)
        .file("proc/self/cgroup", "9:memory:/docker/x\n")
        .file("sys/fs/cgroup/memory/memory.limit_in_bytes", "2147483648\n")
        .file("sys/fs/cgroup/memory/memory.usage_in_bytes", "1073741824\n");
    // The listed path does not exist below the mount (cgroup namespace):
    // the mount's own files are used.
    let p = t.detect();
    assert_eq!(p.memory.cgroup.unwrap().limit, Some(2 * GIB));
    assert_eq!(p.memory.effective_total, 2 * GIB);
    assert_eq!(p.memory.effective_available, GIB);
}

#[test]
fn no_cpufreq_means_uniform_cores() {
    let t = Tree::new();
    t.meminfo(8 * GIB_KIB, 6 * GIB_KIB)
        .cpuinfo("GenuineIntel", "Intel(R) Core(TM) i7-8550U", 8)
        .file("sys/devices/system/cpu/online", "0-7");
    for c in 0..8 {
        t.cpu(c, &format!("{},{}", c % 4, c % 4 + 4));
    }
    let p = t.detect();
    assert_eq!(p.cpu.core_kind_source, CoreKindSource::Uniform);
    assert_eq!(p.cpu.performance, (0..8).collect::<Vec<_>>());
    assert_eq!(
        (p.cpu.logical, p.cpu.physical, p.cpu.performance_physical),
        (8, 4, 4)
    );
    assert!(p.memory.cgroup.is_none());
    // Intel without E-cores is not the hybrid laptop class.
    assert_eq!(p.class, HardwareClass::Generic);
}

#[test]
fn arm_big_little_by_cpufreq() {
    let t = Tree::new();
    t.meminfo(8 * GIB_KIB, 6 * GIB_KIB)
        .file("proc/cpuinfo", "processor\t: 0\nCPU implementer\t: 0x41\n")
        .file("sys/devices/system/cpu/online", "0-7");
    for c in 0..8 {
        let khz = if c < 4 { 1_800_000 } else { 2_400_000 };
        t.file(
            &format!("sys/devices/system/cpu/cpu{c}/cpufreq/cpuinfo_max_freq"),
            &khz.to_string(),
        );
    }
    let p = t.detect();
    assert_eq!(p.cpu.vendor, CpuVendor::Arm);
    assert_eq!(p.cpu.core_kind_source, CoreKindSource::CpufreqClusters);
    assert_eq!(p.cpu.performance, vec![4, 5, 6, 7]);
    assert_eq!(p.cpu.efficiency, vec![0, 1, 2, 3]);
}

#[test]
fn arm_big_little_by_cpu_capacity_when_cpufreq_is_missing() {
    let t = Tree::new();
    t.meminfo(8 * GIB_KIB, 6 * GIB_KIB)
        .file("sys/devices/system/cpu/online", "0-5");
    for c in 0..6 {
        let cap = if c < 2 { 1024 } else { 446 };
        t.file(
            &format!("sys/devices/system/cpu/cpu{c}/cpu_capacity"),
            &cap.to_string(),
        );
    }
    // One CPU with cpufreq is not enough: cpufreq must cover every CPU.
    t.file(
        "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
        "2000000",
    );
    let p = t.detect();
    assert_eq!(p.cpu.core_kind_source, CoreKindSource::CpuCapacity);
    assert_eq!(p.cpu.performance, vec![0, 1]);
    assert_eq!(p.cpu.efficiency, vec![2, 3, 4, 5]);
}

#[test]
fn malformed_files_fall_back_instead_of_panicking() {
    let t = Tree::new();
    t.meminfo(16 * GIB_KIB, 8 * GIB_KIB)
        .file("sys/devices/system/cpu/online", "garbage\n")
        .file(
            "sys/devices/system/cpu/cpu0/topology/thread_siblings_list",
            "zz",
        )
        .file(
            "sys/devices/system/cpu/cpu1/topology/thread_siblings_list",
            "",
        )
        .file(
            "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
            "fast",
        )
        .file(
            "sys/devices/system/cpu/cpu1/cpufreq/cpuinfo_max_freq",
            "2000000",
        )
        .file("sys/devices/cpu_core/cpus", "1-0")
        .file("sys/devices/cpu_atom/cpus", "0")
        .file("proc/self/cgroup", "nonsense\n0::/\n")
        .file("sys/fs/cgroup/cgroup.controllers", "")
        .file("sys/fs/cgroup/memory.max", "lots\n");
    let p = t.detect();
    // `online` is garbage: the cpuN directories are counted instead.
    assert_eq!(p.cpu.logical, 2);
    assert_eq!(p.cpu.physical, 2);
    assert_eq!(p.cpu.core_kind_source, CoreKindSource::Uniform);
    assert_eq!(p.cpu.brand, "unknown");
    assert_eq!(p.memory.cgroup.unwrap().limit, None);
    assert_eq!(p.memory.effective_total, 16 * GIB);
}

#[test]
fn missing_meminfo_is_a_clear_error() {
    let t = Tree::new();
    t.file("sys/devices/system/cpu/online", "0");
    let err = Detector::with_root(t.path())
        .detect()
        .unwrap_err()
        .to_string();
    assert!(err.contains("meminfo") && err.contains("memory"), "{err}");

    t.file("proc/meminfo", "MemFree: 12 kB\n");
    let err = Detector::with_root(t.path())
        .detect()
        .unwrap_err()
        .to_string();
    assert!(err.contains("MemTotal"), "{err}");
}

#[test]
fn meminfo_without_memavailable_uses_free_buffers_cached() {
    let t = Tree::new();
    t.file(
        "proc/meminfo",
        "MemTotal: 8388608 kB\nMemFree: 1048576 kB\nBuffers: 1048576 kB\nCached: 2097152 kB\n",
    );
    assert_eq!(
        Detector::with_root(t.path())
            .detect()
            .unwrap()
            .memory
            .available,
        4 * GIB
    );
}

#[test]
fn refresh_memory_rereads_the_same_tree() {
    let t = Tree::new();
    t.meminfo(16 * GIB_KIB, 8 * GIB_KIB);
    let mut p = t.detect();
    assert_eq!(p.memory.available, 8 * GIB);
    t.meminfo(16 * GIB_KIB, 2 * GIB_KIB);
    p.refresh_memory().unwrap();
    assert_eq!(p.memory.available, 2 * GIB);
    assert!((p.memory.used_fraction() - 0.875).abs() < 1e-9);
}

#[test]
fn nvidia_driver_without_cuda_feature_is_reported_but_not_used() {
    let t = Tree::new();
    t.meminfo(24 * GIB_KIB, 20 * GIB_KIB).file(
        "proc/driver/nvidia/gpus/0000:01:00.0/information",
        "Model: H100\n",
    );
    let p = t.detect();
    assert_eq!(p.accelerators.len(), 1);
    assert_eq!(p.accelerators[0].devices, 1);
    if cfg!(not(feature = "cuda")) {
        assert!(!p.accelerators[0].usable);
        assert_eq!(p.preferred_device(), hw_detect::DeviceKind::Cpu);
        assert_eq!(p.class, HardwareClass::Generic);
    }
}

#[test]
fn profile_round_trips_through_json() {
    let t = Tree::new();
    t.meminfo(16 * GIB_KIB, 8 * GIB_KIB)
        .cpuinfo("AuthenticAMD", "AMD Ryzen 5 7640U", 12);
    let p = t.detect();
    assert_eq!(p.class, HardwareClass::AmdRyzenLaptop);
    let json = serde_json::to_string_pretty(&p).unwrap();
    assert!(json.contains("\"effective_total\"") && json.contains("AmdRyzenLaptop"));
    let back: HardwareProfile = serde_json::from_str(&json).unwrap();
    assert_eq!(back.cpu, p.cpu);
    assert_eq!(back.memory, p.memory);
    assert_eq!(back.class, p.class);
}

#[test]
fn this_machine() {
    let p = HardwareProfile::detect().unwrap();
    assert!(p.cpu.logical >= 1);
    assert!(p.cpu.physical >= 1 && p.cpu.physical <= p.cpu.logical);
    assert_eq!(
        p.cpu.performance.len() + p.cpu.efficiency.len(),
        p.cpu.logical
    );
    assert!(p.memory.effective_available <= p.memory.effective_total);
    if cfg!(target_os = "linux") {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = meminfo
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(p.memory.total, kib * 1024);
        let online = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1);
        assert!(p.cpu.logical >= online);
    }
}
