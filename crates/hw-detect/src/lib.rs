//! What machine is this?
//!
//! `hw-detect` takes a [`HardwareProfile`]: the CPU (brand, logical and
//! physical cores, which cores are performance and which efficiency cores,
//! SMT siblings), memory (total, available, swap and the **cgroup limit**, so
//! a 4 GiB container is not mistaken for the 64 GiB host it runs on),
//! accelerators as candle sees them, and the [`HardwareClass`] the other snug
//! crates key their budgets and policies on.
//!
//! ```
//! use hw_detect::HardwareProfile;
//!
//! let profile = HardwareProfile::detect()?;
//! assert!(profile.cpu.logical >= 1);
//! assert!(profile.memory.effective_total <= profile.memory.total);
//! println!("{} ({:?}), {} MiB usable", profile.cpu.brand, profile.class,
//!          profile.memory.effective_total >> 20);
//! # Ok::<(), hw_detect::Error>(())
//! ```
//!
//! On Linux every fact is read from `/proc` and `/sys` below a root path, so
//! [`Detector::with_root`] describes a fixture tree as readily as the machine
//! itself. Elsewhere `sysinfo` answers, and on macOS the `hw.perflevel*`
//! sysctls tell the core kinds apart.
//!
//! The same root serves the readers of what changes from moment to moment:
//! [`CpuLoadReader`] (busy share of the CPUs), [`ThermalReader`] (zones
//! near their trip points), [`Detector::cgroup_cpu`] (cpuset and CPU quota)
//! and [`ProcessMemory`] (this process's resident set).
//!
//! Taking a profile reads a few dozen small files (well under a millisecond);
//! [`HardwareProfile::refresh_memory`] rereads only the memory fields, for
//! monitors that poll.
//!
//! # Feature flags
//!
//! - `cuda`: ask candle (built with CUDA) which CUDA devices it can open.
//! - `metal`: ask candle (built with Metal) whether Metal is usable.
//!
//! Without them no candle is built; an NVIDIA driver or Apple silicon is
//! still reported, as an accelerator that this build cannot use.

mod accel;
mod cgroup_cpu;
mod error;
mod load;
mod other;
mod process;
mod profile;
mod sysfs;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::cgroup_cpu::CgroupCpu;
pub use crate::error::{Error, Result};
pub use crate::load::{CpuLoadReader, CpuTimes, ThermalReader, ThermalZone};
pub use crate::process::ProcessMemory;
pub use crate::profile::{
    Accelerator, AcceleratorKind, CgroupMemory, CgroupVersion, ClassThresholds, CoreKindSource,
    CpuInfo, CpuVendor, DeviceKind, HardwareClass, MemoryInfo, EFFICIENCY_RATIO, GIB,
};
pub use crate::sysfs::parse_cpu_list;

/// Where facts come from: the real machine or a fixture tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
enum Source {
    /// This machine through the platform's own interfaces.
    Native,
    /// A Linux-style tree of `/proc` and `/sys` below a root.
    Root { path: PathBuf },
}

/// Takes [`HardwareProfile`]s of this machine or of a fixture tree.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use hw_detect::{Detector, HardwareClass};
///
/// let dir = tempfile::tempdir()?;
/// std::fs::create_dir_all(dir.path().join("proc"))?;
/// std::fs::write(dir.path().join("proc/meminfo"),
///                "MemTotal: 4194304 kB\nMemAvailable: 3145728 kB\n")?;
/// let profile = Detector::with_root(dir.path()).detect()?;
/// assert_eq!(profile.memory.total, 4 << 30);
/// assert_eq!(profile.class, HardwareClass::Constrained);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Detector {
    source: Source,
    thresholds: ClassThresholds,
}

impl Default for Detector {
    fn default() -> Self {
        Detector::new()
    }
}

impl Detector {
    /// A detector for this machine: on Linux it reads below `/`.
    pub fn new() -> Self {
        let source = if cfg!(target_os = "linux") {
            Source::Root {
                path: PathBuf::from("/"),
            }
        } else {
            Source::Native
        };
        Detector {
            source,
            thresholds: ClassThresholds::default(),
        }
    }

    /// A detector that reads a Linux-style `/proc` and `/sys` below `root`.
    pub fn with_root(root: impl AsRef<Path>) -> Self {
        Detector {
            source: Source::Root {
                path: root.as_ref().to_path_buf(),
            },
            thresholds: ClassThresholds::default(),
        }
    }

    /// Uses other class thresholds than the documented defaults.
    pub fn thresholds(mut self, thresholds: ClassThresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// Takes a full profile.
    pub fn detect(&self) -> Result<HardwareProfile> {
        let (cpu, memory, nvidia) = match &self.source {
            Source::Root { path } => {
                let fs = sysfs::Sysfs::new(path);
                (fs.cpu(), fs.memory()?, fs.nvidia_gpus())
            }
            Source::Native => (other::cpu()?, other::memory()?, 0),
        };
        let accelerators = accel::detect(nvidia, cpu.vendor);
        let class = HardwareClass::classify(&cpu, &memory, &accelerators, &self.thresholds);
        Ok(HardwareProfile {
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            cpu,
            memory,
            accelerators,
            class,
            source: self.source.clone(),
        })
    }

    /// Reads the memory fields only.
    pub fn memory(&self) -> Result<MemoryInfo> {
        match &self.source {
            Source::Root { path } => sysfs::Sysfs::new(path).memory(),
            Source::Native => other::memory(),
        }
    }

    /// The limits this process's cgroup puts on CPU (cpuset, bandwidth
    /// quota); none where the source is not a Linux tree.
    pub fn cgroup_cpu(&self) -> CgroupCpu {
        match &self.source {
            Source::Root { path } => CgroupCpu::read(path),
            Source::Native => CgroupCpu::default(),
        }
    }

    /// The root path this detector reads below, where it reads a tree.
    pub fn root(&self) -> Option<&Path> {
        match &self.source {
            Source::Root { path } => Some(path.as_path()),
            Source::Native => None,
        }
    }
}

/// A source of live memory readings.
///
/// `mem-budget` admits reservations against it; tests give it fixed or
/// scripted readings instead of the machine's.
pub trait MemoryProbe: Send + Sync + std::fmt::Debug {
    /// The memory situation now.
    fn memory(&self) -> Result<MemoryInfo>;
}

impl MemoryProbe for Detector {
    fn memory(&self) -> Result<MemoryInfo> {
        Detector::memory(self)
    }
}

/// Everything snug needs to know about the machine it runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    /// Operating system (`linux`, `macos`, `windows`, …).
    pub os: String,
    /// CPU architecture (`x86_64`, `aarch64`, …).
    pub arch: String,
    /// The processor.
    pub cpu: CpuInfo,
    /// Memory, cgroup-aware.
    pub memory: MemoryInfo,
    /// Accelerators found (usable or not in this build).
    pub accelerators: Vec<Accelerator>,
    /// The class other crates key their tables on.
    pub class: HardwareClass,
    /// Where the facts came from (kept so `refresh_memory` rereads the same).
    #[serde(default = "native_source", skip_serializing)]
    source: Source,
}

fn native_source() -> Source {
    Detector::new().source
}

impl HardwareProfile {
    /// Profiles this machine.
    pub fn detect() -> Result<HardwareProfile> {
        Detector::new().detect()
    }

    /// Rereads the memory fields only (cheap; for monitors). The class is
    /// left as it was: it describes the machine, not the moment.
    pub fn refresh_memory(&mut self) -> Result<()> {
        let detector = Detector {
            source: self.source.clone(),
            thresholds: ClassThresholds::default(),
        };
        self.memory = detector.memory()?;
        Ok(())
    }

    /// The device candle should use: the first usable of Metal, CUDA, CPU.
    pub fn preferred_device(&self) -> DeviceKind {
        let usable = |kind| self.accelerators.iter().any(|a| a.kind == kind && a.usable);
        if usable(AcceleratorKind::Metal) {
            DeviceKind::Metal { index: 0 }
        } else if usable(AcceleratorKind::Cuda) {
            DeviceKind::Cuda { index: 0 }
        } else {
            DeviceKind::Cpu
        }
    }
}
