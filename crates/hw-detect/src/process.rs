//! This process's memory: resident set and its peak.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The memory this process holds, from `/proc/self/status`.
///
/// The kernel reports both figures in kB there, so no page size enters
/// the reading.
///
/// ```
/// if let Some(m) = hw_detect::ProcessMemory::read() {
///     assert!(m.rss > 0 && m.peak >= m.rss);
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessMemory {
    /// Resident set size now, bytes (`VmRSS`).
    pub rss: u64,
    /// The highest resident set size so far, bytes (`VmHWM`).
    pub peak: u64,
}

impl ProcessMemory {
    /// This process's memory now; `None` where `/proc/self/status` does not
    /// exist (systems other than Linux) or lacks the fields.
    pub fn read() -> Option<ProcessMemory> {
        ProcessMemory::read_from(Path::new("/proc/self/status"))
    }

    /// The memory of the process whose `status` file is at `path`.
    pub fn read_from(path: &Path) -> Option<ProcessMemory> {
        parse_status(&std::fs::read_to_string(path).ok()?)
    }
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text.
fn parse_status(status: &str) -> Option<ProcessMemory> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    };
    Some(ProcessMemory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_in_kib() {
        let text = "Name:\tsnug\nVmPeak:\t 9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(
            parse_status(text),
            Some(ProcessMemory {
                rss: 1 << 20,
                peak: 2 << 20
            })
        );
        assert_eq!(parse_status("Name:\tsnug\nVmRSS:\t1 kB\n"), None);
        assert_eq!(parse_status("VmRSS:\tlots kB\nVmHWM:\t1 kB\n"), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn reads_this_process() {
        let m = ProcessMemory::read().expect("linux has /proc/self/status");
        assert!(m.rss > 0 && m.peak >= m.rss, "{m:?}");
    }
}
