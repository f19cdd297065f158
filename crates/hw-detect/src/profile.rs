//! The profile types: what was found, in plain serialisable structs.

use serde::{Deserialize, Serialize};

/// One GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// Who made the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD`.
    Amd,
    /// Apple silicon (M-series).
    Apple,
    /// Another Arm implementer.
    Arm,
    /// Anything else, or not reported.
    Unknown,
}

impl CpuVendor {
    /// Classifies a vendor string (`vendor_id` on x86, the brand on Apple).
    pub fn from_vendor_and_brand(vendor: &str, brand: &str) -> Self {
        let v = vendor.to_ascii_lowercase();
        let b = brand.to_ascii_lowercase();
        if v.contains("genuineintel") || v == "intel" || b.contains("intel") {
            CpuVendor::Intel
        } else if v.contains("authenticamd") || v == "amd" || b.contains("amd ") {
            CpuVendor::Amd
        } else if v.contains("apple") || b.starts_with("apple") {
            CpuVendor::Apple
        } else if v.contains("arm") || b.contains("cortex") || b.contains("neoverse") {
            CpuVendor::Arm
        } else {
            CpuVendor::Unknown
        }
    }
}

/// How the performance / efficiency split of [`CpuInfo`] was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CoreKindSource {
    /// Linux `/sys/devices/cpu_core/cpus` and `/sys/devices/cpu_atom/cpus`
    /// (Intel hybrid CPUs).
    IntelHybrid,
    /// Per-CPU `cpufreq/cpuinfo_max_freq`: CPUs whose maximum frequency is
    /// below [`EFFICIENCY_RATIO`] of the fastest are efficiency cores.
    CpufreqClusters,
    /// Per-CPU `cpu_capacity` (Arm big.LITTLE), with the same ratio rule.
    CpuCapacity,
    /// macOS `hw.perflevel0` / `hw.perflevel1` sysctls.
    MacPerfLevels,
    /// No source told the cores apart: every core is a performance core.
    Uniform,
}

/// A core whose maximum frequency (or capacity) is below this fraction of the
/// fastest core's is counted as an efficiency core. Cores of one kind differ
/// by a few percent (favoured-core turbo bins); efficiency clusters run at
/// 30–70% of the performance cores.
pub const EFFICIENCY_RATIO: f64 = 0.8;

/// The processor: brand, counts and which logical CPUs are which kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// Marketing name, e.g. `12th Gen Intel(R) Core(TM) i5-1235U`.
    pub brand: String,
    /// Vendor string as the system reports it, e.g. `GenuineIntel`.
    pub vendor_id: String,
    /// The vendor, classified.
    pub vendor: CpuVendor,
    /// Logical CPUs online (hardware threads).
    pub logical: usize,
    /// Physical cores (SMT siblings counted once).
    pub physical: usize,
    /// Logical CPU ids of performance cores, ascending.
    pub performance: Vec<usize>,
    /// Logical CPU ids of efficiency cores, ascending (empty when uniform).
    pub efficiency: Vec<usize>,
    /// Physical performance cores (SMT siblings counted once).
    pub performance_physical: usize,
    /// Physical efficiency cores.
    pub efficiency_physical: usize,
    /// How the kinds were told apart.
    pub core_kind_source: CoreKindSource,
    /// Each physical core's logical CPU ids (SMT siblings share a group),
    /// sorted by first id. Empty where the OS does not expose topology.
    pub smt_groups: Vec<Vec<usize>>,
}

impl CpuInfo {
    /// Whether the CPU has both performance and efficiency cores.
    pub fn is_hybrid(&self) -> bool {
        !self.performance.is_empty() && !self.efficiency.is_empty()
    }

    /// Whether any physical core runs more than one hardware thread.
    pub fn has_smt(&self) -> bool {
        self.smt_groups.iter().any(|g| g.len() > 1)
    }
}

/// Which cgroup interface limited memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// The legacy hierarchy (`memory.limit_in_bytes`).
    V1,
    /// The unified hierarchy (`memory.max`).
    V2,
}

/// Memory accounting of the cgroup this process runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupMemory {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// The hard limit in bytes; `None` when unlimited.
    pub limit: Option<u64>,
    /// Bytes charged to the cgroup now, less reclaimable inactive page cache.
    pub usage: Option<u64>,
}

/// Memory of the machine and of the container the process runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Physical memory the kernel manages (`MemTotal`), bytes.
    pub total: u64,
    /// Memory available for new work without swapping (`MemAvailable`), bytes.
    pub available: u64,
    /// Swap space, bytes.
    pub swap_total: u64,
    /// Unused swap, bytes.
    pub swap_free: u64,
    /// The cgroup's limit and usage, where a cgroup memory controller exists.
    pub cgroup: Option<CgroupMemory>,
    /// `min(total, cgroup limit)`: what this process can ever use.
    pub effective_total: u64,
    /// `min(available, cgroup limit - cgroup usage)`: what it can use now.
    pub effective_available: u64,
}

impl MemoryInfo {
    /// Builds the effective fields from the raw ones.
    pub fn new(
        total: u64,
        available: u64,
        swap_total: u64,
        swap_free: u64,
        cgroup: Option<CgroupMemory>,
    ) -> Self {
        let available = available.min(total);
        let (mut effective_total, mut effective_available) = (total, available);
        if let Some(cg) = cgroup {
            if let Some(limit) = cg.limit {
                effective_total = effective_total.min(limit);
                let used = cg.usage.unwrap_or(0);
                effective_available = effective_available.min(limit.saturating_sub(used));
            }
        }
        MemoryInfo {
            total,
            available,
            swap_total,
            swap_free,
            cgroup,
            effective_total,
            effective_available,
        }
    }

    /// Fraction of the effective total in use, 0.0–1.0.
    pub fn used_fraction(&self) -> f64 {
        if self.effective_total == 0 {
            return 1.0;
        }
        1.0 - self.effective_available as f64 / self.effective_total as f64
    }
}

/// A kind of accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AcceleratorKind {
    /// An NVIDIA GPU through CUDA.
    Cuda,
    /// An Apple GPU through Metal.
    Metal,
}

/// An accelerator that was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accelerator {
    /// CUDA or Metal.
    pub kind: AcceleratorKind,
    /// Devices of this kind; 0 where the count is unknown.
    pub devices: usize,
    /// Whether candle in this build can run on it (the `cuda` / `metal`
    /// feature is on and candle opened the device).
    pub usable: bool,
    /// How it was found, or what is missing to use it.
    pub note: String,
}

/// Where candle should run: the best usable device, Metal > CUDA > CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DeviceKind {
    /// The first Metal device.
    Metal {
        /// Device ordinal.
        index: usize,
    },
    /// A CUDA device.
    Cuda {
        /// Device ordinal.
        index: usize,
    },
    /// The CPU.
    Cpu,
}

/// The hardware class other crates key their tables on.
///
/// Derived by [`HardwareClass::classify`] from the profile, first rule that
/// matches wins (sizes are the cgroup-aware effective total):
///
/// 1. under 6 GiB → `Constrained`;
/// 2. 30 GiB or more (a "32 GB" machine reports about 31 GiB), or a usable
///    CUDA device → `HighEnd`;
/// 3. Apple silicon: up to 10 GiB → `AppleM1Air`, else `AppleM1Pro`;
/// 4. Intel with efficiency cores (hybrid, i5-class laptops) → `IntelHybridLaptop`;
/// 5. AMD Ryzen → `AmdRyzenLaptop`;
/// 6. anything else → `Generic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HardwareClass {
    /// An 8 GB Apple M1 (or later) Air.
    AppleM1Air,
    /// A 16 GB (or larger, under 30 GiB) Apple M-series Pro.
    AppleM1Pro,
    /// An Intel hybrid (P + E cores) laptop, i5-class, 16 GB.
    IntelHybridLaptop,
    /// An AMD Ryzen laptop, 16 GB.
    AmdRyzenLaptop,
    /// A workstation: 32 GB or more, or a usable CUDA GPU.
    HighEnd,
    /// Under 6 GiB usable (small VMs, containers).
    Constrained,
    /// Anything else.
    Generic,
}

/// Thresholds of [`HardwareClass::classify`], in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClassThresholds {
    /// Below this effective total the class is `Constrained`. Default 6 GiB.
    pub constrained_below: u64,
    /// From this effective total the class is `HighEnd`. Default 30 GiB.
    pub high_end_from: u64,
    /// Apple silicon up to this size is an `AppleM1Air`. Default 10 GiB.
    pub apple_air_up_to: u64,
}

impl Default for ClassThresholds {
    fn default() -> Self {
        ClassThresholds {
            constrained_below: 6 * GIB,
            high_end_from: 30 * GIB,
            apple_air_up_to: 10 * GIB,
        }
    }
}

impl HardwareClass {
    /// Classifies a machine by the documented rule (see the type's docs).
    pub fn classify(
        cpu: &CpuInfo,
        memory: &MemoryInfo,
        accelerators: &[Accelerator],
        t: &ClassThresholds,
    ) -> HardwareClass {
        let size = memory.effective_total;
        let cuda = accelerators
            .iter()
            .any(|a| a.kind == AcceleratorKind::Cuda && a.usable);
        if size < t.constrained_below {
            HardwareClass::Constrained
        } else if size >= t.high_end_from || cuda {
            HardwareClass::HighEnd
        } else if cpu.vendor == CpuVendor::Apple {
            if size <= t.apple_air_up_to {
                HardwareClass::AppleM1Air
            } else {
                HardwareClass::AppleM1Pro
            }
        } else if cpu.vendor == CpuVendor::Intel && cpu.is_hybrid() {
            HardwareClass::IntelHybridLaptop
        } else if cpu.vendor == CpuVendor::Amd && cpu.brand.to_ascii_lowercase().contains("ryzen") {
            HardwareClass::AmdRyzenLaptop
        } else {
            HardwareClass::Generic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(vendor: CpuVendor, brand: &str, p: usize, e: usize) -> CpuInfo {
        CpuInfo {
            brand: brand.into(),
            vendor_id: String::new(),
            vendor,
            logical: p + e,
            physical: p + e,
            performance: (0..p).collect(),
            efficiency: (p..p + e).collect(),
            performance_physical: p,
            efficiency_physical: e,
            core_kind_source: CoreKindSource::Uniform,
            smt_groups: Vec::new(),
        }
    }

    fn mem(gib: f64) -> MemoryInfo {
        let b = (gib * GIB as f64) as u64;
        MemoryInfo::new(b, b / 2, 0, 0, None)
    }

    fn class(c: &CpuInfo, gib: f64, acc: &[Accelerator]) -> HardwareClass {
        HardwareClass::classify(c, &mem(gib), acc, &ClassThresholds::default())
    }

    #[test]
    fn each_class_by_the_documented_rule() {
        let apple = cpu(CpuVendor::Apple, "Apple M1", 4, 4);
        let intel_hybrid = cpu(
            CpuVendor::Intel,
            "12th Gen Intel(R) Core(TM) i5-1235U",
            2,
            8,
        );
        let intel_plain = cpu(CpuVendor::Intel, "Intel(R) Core(TM) i5-8250U", 4, 0);
        let ryzen = cpu(CpuVendor::Amd, "AMD Ryzen 5 5600U", 6, 0);
        let epyc = cpu(CpuVendor::Amd, "AMD EPYC", 2, 0);
        assert_eq!(class(&apple, 8.0, &[]), HardwareClass::AppleM1Air);
        assert_eq!(class(&apple, 16.0, &[]), HardwareClass::AppleM1Pro);
        assert_eq!(class(&apple, 64.0, &[]), HardwareClass::HighEnd);
        assert_eq!(
            class(&intel_hybrid, 15.5, &[]),
            HardwareClass::IntelHybridLaptop
        );
        assert_eq!(class(&intel_plain, 15.5, &[]), HardwareClass::Generic);
        assert_eq!(class(&ryzen, 15.3, &[]), HardwareClass::AmdRyzenLaptop);
        assert_eq!(class(&epyc, 23.5, &[]), HardwareClass::Generic);
        assert_eq!(class(&ryzen, 31.1, &[]), HardwareClass::HighEnd);
        // Small machines are constrained whatever the CPU.
        assert_eq!(class(&apple, 4.0, &[]), HardwareClass::Constrained);
        assert_eq!(class(&intel_hybrid, 5.9, &[]), HardwareClass::Constrained);
        // A usable CUDA GPU makes a workstation; one this build cannot use does not.
        let gpu = |usable| Accelerator {
            kind: AcceleratorKind::Cuda,
            devices: 1,
            usable,
            note: String::new(),
        };
        assert_eq!(class(&epyc, 16.0, &[gpu(true)]), HardwareClass::HighEnd);
        assert_eq!(class(&epyc, 16.0, &[gpu(false)]), HardwareClass::Generic);
    }

    #[test]
    fn vendor_strings() {
        assert_eq!(
            CpuVendor::from_vendor_and_brand("GenuineIntel", ""),
            CpuVendor::Intel
        );
        assert_eq!(
            CpuVendor::from_vendor_and_brand("AuthenticAMD", ""),
            CpuVendor::Amd
        );
        assert_eq!(
            CpuVendor::from_vendor_and_brand("Apple", "Apple M2"),
            CpuVendor::Apple
        );
        assert_eq!(
            CpuVendor::from_vendor_and_brand("", "Apple M1 Pro"),
            CpuVendor::Apple
        );
        assert_eq!(CpuVendor::from_vendor_and_brand("ARM", ""), CpuVendor::Arm);
        assert_eq!(CpuVendor::from_vendor_and_brand("", ""), CpuVendor::Unknown);
    }

    #[test]
    fn effective_memory_respects_the_cgroup() {
        let cg = CgroupMemory {
            version: CgroupVersion::V2,
            limit: Some(4 * GIB),
            usage: Some(5 * GIB),
        };
        let m = MemoryInfo::new(64 * GIB, 50 * GIB, 0, 0, Some(cg));
        assert_eq!(m.effective_total, 4 * GIB);
        assert_eq!(
            m.effective_available, 0,
            "over the limit: nothing is available"
        );
        assert!((m.used_fraction() - 1.0).abs() < 1e-12);
    }
}
