//! Readers for systems without `/proc` and `/sys`: sysinfo for memory and
//! the CPU brand, and on macOS the `hw.perflevel*` sysctls for core kinds.

use crate::error::{Error, Result};
use crate::profile::{CoreKindSource, CpuInfo, CpuVendor, MemoryInfo};

/// Performance levels as macOS reports them: `hw.perflevel0.*` are the
/// performance cores, `hw.perflevel1.*` the efficiency cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
pub(crate) struct MacPerfLevels {
    /// `hw.perflevel0.physicalcpu`.
    pub(crate) p_physical: usize,
    /// `hw.perflevel0.logicalcpu`.
    pub(crate) p_logical: usize,
    /// `hw.perflevel1.physicalcpu` (0 when the key is absent).
    pub(crate) e_physical: usize,
    /// `hw.perflevel1.logicalcpu` (0 when the key is absent).
    pub(crate) e_logical: usize,
}

/// Parses the output of
/// `sysctl hw.perflevel0.physicalcpu hw.perflevel0.logicalcpu hw.perflevel1.physicalcpu hw.perflevel1.logicalcpu`
/// (`name: value` lines). Returns `None` when the performance level is
/// missing (Intel Macs have no `hw.perflevel*` keys).
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
pub(crate) fn parse_macos_perflevels(text: &str) -> Option<MacPerfLevels> {
    let mut levels = MacPerfLevels::default();
    let mut seen_p = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':').or_else(|| line.split_once('=')) else {
            continue;
        };
        let Ok(value) = value.trim().parse::<usize>() else {
            continue;
        };
        match key.trim() {
            "hw.perflevel0.physicalcpu" => {
                levels.p_physical = value;
                seen_p = true;
            }
            "hw.perflevel0.logicalcpu" => levels.p_logical = value,
            "hw.perflevel1.physicalcpu" => levels.e_physical = value,
            "hw.perflevel1.logicalcpu" => levels.e_logical = value,
            _ => {}
        }
    }
    if !seen_p || levels.p_physical == 0 {
        return None;
    }
    if levels.p_logical == 0 {
        levels.p_logical = levels.p_physical;
    }
    if levels.e_logical == 0 {
        levels.e_logical = levels.e_physical;
    }
    Some(levels)
}

impl MacPerfLevels {
    /// The CPU description these levels give. macOS numbers no CPUs for
    /// affinity, so the ids are a convention: performance first.
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    pub(crate) fn apply(&self, cpu: &mut CpuInfo) {
        let p = self.p_logical;
        let e = self.e_logical;
        cpu.logical = p + e;
        cpu.physical = self.p_physical + self.e_physical;
        cpu.performance = (0..p).collect();
        cpu.efficiency = (p..p + e).collect();
        cpu.performance_physical = self.p_physical;
        cpu.efficiency_physical = self.e_physical;
        cpu.core_kind_source = CoreKindSource::MacPerfLevels;
    }
}

fn system() -> Result<sysinfo::System> {
    sysinfo::System::new().map_err(|e| Error::System {
        what: "memory and CPUs",
        reason: e.to_string(),
    })
}

/// Memory through sysinfo (no cgroup on these systems).
pub(crate) fn memory() -> Result<MemoryInfo> {
    let mut sys = system()?;
    sys.refresh_memory();
    Ok(MemoryInfo::new(
        sys.total_memory(),
        sys.available_memory(),
        sys.total_swap(),
        sys.free_swap(),
        None,
    ))
}

/// The CPU through sysinfo, and on macOS the perflevel sysctls.
pub(crate) fn cpu() -> Result<CpuInfo> {
    let mut sys = system()?;
    sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
    let (brand, vendor_id) = sys
        .cpus()
        .first()
        .map(|c| {
            (
                c.brand().trim().to_string(),
                c.vendor_id().trim().to_string(),
            )
        })
        .unwrap_or_else(|| ("unknown".into(), String::new()));
    let logical = sys
        .cpus()
        .len()
        .max(std::thread::available_parallelism().map_or(1, usize::from));
    let physical = sysinfo::System::physical_core_count().unwrap_or(logical);
    #[allow(unused_mut)]
    let mut cpu = CpuInfo {
        vendor: CpuVendor::from_vendor_and_brand(&vendor_id, &brand),
        brand,
        vendor_id,
        logical,
        physical,
        performance: (0..logical).collect(),
        efficiency: Vec::new(),
        performance_physical: physical,
        efficiency_physical: 0,
        core_kind_source: CoreKindSource::Uniform,
        smt_groups: Vec::new(),
    };
    #[cfg(target_os = "macos")]
    {
        let out = std::process::Command::new("sysctl")
            .args([
                "hw.perflevel0.physicalcpu",
                "hw.perflevel0.logicalcpu",
                "hw.perflevel1.physicalcpu",
                "hw.perflevel1.logicalcpu",
            ])
            .output();
        match out {
            Ok(out) => {
                if let Some(levels) = parse_macos_perflevels(&String::from_utf8_lossy(&out.stdout))
                {
                    levels.apply(&mut cpu);
                }
            }
            Err(e) => tracing::debug!(error = %e, "sysctl unavailable; cores taken as alike"),
        }
    }
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn m1_air_perflevels() {
        let out = "hw.perflevel0.physicalcpu: 4\nhw.perflevel0.logicalcpu: 4\n\
                   hw.perflevel1.physicalcpu: 4\nhw.perflevel1.logicalcpu: 4\n";
        let levels = parse_macos_perflevels(out).unwrap();
        assert_eq!(
            levels,
            MacPerfLevels {
                p_physical: 4,
                p_logical: 4,
                e_physical: 4,
                e_logical: 4
            }
        );
        let mut cpu = cpu().unwrap();
        levels.apply(&mut cpu);
        assert_eq!(cpu.performance, vec![0, 1, 2, 3]);
        assert_eq!(cpu.efficiency, vec![4, 5, 6, 7]);
        assert_eq!((cpu.logical, cpu.physical), (8, 8));
        assert_eq!(cpu.core_kind_source, CoreKindSource::MacPerfLevels);
    }

    #[test]
    fn intel_mac_has_no_perflevels() {
        // sysctl prints errors on stderr and nothing on stdout.
        assert_eq!(parse_macos_perflevels(""), None);
        assert_eq!(
            parse_macos_perflevels("hw.perflevel0.physicalcpu: x\n"),
            None
        );
    }

    #[test]
    fn m3_pro_with_only_physical_keys() {
        let out = "hw.perflevel0.physicalcpu=6\nhw.perflevel1.physicalcpu=6\n";
        let l = parse_macos_perflevels(out).unwrap();
        assert_eq!((l.p_logical, l.e_logical), (6, 6));
    }

    #[test]
    fn sysinfo_agrees_with_the_machine() {
        let mem = memory().unwrap();
        assert!(mem.total > 0 && mem.available <= mem.total);
        let cpu = cpu().unwrap();
        assert!(cpu.logical >= 1 && cpu.physical >= 1);
    }
}
