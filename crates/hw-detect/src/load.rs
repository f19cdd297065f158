//! The machine's load and heat now: CPU busy share from `/proc/stat` and
//! thermal zones from `/sys/class/thermal`, both below a root path so that
//! fixture trees test them.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// CPU time counters of `/proc/stat`'s first line, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTimes {
    /// Ticks spent busy (everything but idle and iowait).
    pub busy: u64,
    /// All ticks.
    pub total: u64,
}

/// Reads CPU load from `<root>/proc/stat` as the busy share of the ticks
/// between two samples.
///
/// The counters are read once when the reader is made, so the first
/// [`sample`](CpuLoadReader::sample) already has a delta to measure.
#[derive(Debug)]
pub struct CpuLoadReader {
    path: PathBuf,
    last: Mutex<LastSample>,
}

/// The counters and the fraction of the previous sample.
#[derive(Debug, Default)]
struct LastSample {
    times: Option<CpuTimes>,
    fraction: Option<f64>,
}

impl CpuLoadReader {
    /// A reader of `<root>/proc/stat`, sampled once now.
    pub fn with_root(root: impl AsRef<Path>) -> CpuLoadReader {
        let reader = CpuLoadReader {
            path: root.as_ref().join("proc/stat"),
            last: Mutex::new(LastSample::default()),
        };
        let first = reader.read_times().ok();
        reader
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .times = first;
        reader
    }

    /// The counters now.
    pub fn read_times(&self) -> Result<CpuTimes> {
        let text = fs::read_to_string(&self.path).map_err(|source| Error::Read {
            path: self.path.clone(),
            what: "the CPU load",
            source,
        })?;
        let bad = |found: &str| Error::Parse {
            path: self.path.clone(),
            expected: "a first line `cpu  user nice system idle [iowait irq softirq steal …]`",
            found: found.chars().take(80).collect(),
        };
        let line = text.lines().next().unwrap_or("");
        let mut fields = line.split_whitespace();
        if fields.next() != Some("cpu") {
            return Err(bad(line));
        }
        let values: Vec<u64> = fields
            .take(8) // guest times are already counted in user and nice
            .map(|f| f.parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(line))?;
        if values.len() < 4 {
            return Err(bad(line));
        }
        let total = values.iter().fold(0u64, |a, &v| a.saturating_add(v));
        let idle = values[3].saturating_add(values.get(4).copied().unwrap_or(0));
        Ok(CpuTimes {
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// The busy fraction (0–1) since the previous sample (or since the
    /// reader was made). When no ticks passed since then, or the reader
    /// had no earlier counters, the previous fraction, or else the share
    /// since boot. `None` only when the file cannot be read (logged) or
    /// counts no ticks at all.
    pub fn sample(&self) -> Option<f64> {
        let now = match self.read_times() {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "cpu load unavailable");
                return None;
            }
        };
        let share = |busy: u64, total: u64| {
            (total > 0).then(|| (busy as f64 / total as f64).clamp(0.0, 1.0))
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let delta = last.times.and_then(|prev| {
            share(
                now.busy.saturating_sub(prev.busy),
                now.total.checked_sub(prev.total)?,
            )
        });
        let fraction = delta
            .or(last.fraction)
            .or_else(|| share(now.busy, now.total));
        *last = LastSample {
            times: Some(now),
            fraction,
        };
        fraction
    }
}

/// One thermal zone of `/sys/class/thermal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThermalZone {
    /// The zone's `type` (`x86_pkg_temp`, `acpitz`, …).
    pub kind: String,
    /// Temperature now, °C.
    pub temp_c: f64,
    /// The lowest passive, hot or critical trip point, °C.
    pub trip_c: Option<f64>,
}

/// Reads thermal zones below `<root>/sys/class/thermal`.
#[derive(Debug, Clone)]
pub struct ThermalReader {
    dir: PathBuf,
}

impl ThermalReader {
    /// A reader of `<root>/sys/class/thermal`.
    pub fn with_root(root: impl AsRef<Path>) -> ThermalReader {
        ThermalReader {
            dir: root.as_ref().join("sys/class/thermal"),
        }
    }

    /// Every zone whose temperature can be read (empty where Linux exposes
    /// none, as in most VMs and containers).
    pub fn zones(&self) -> Vec<ThermalZone> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let milli = |p: PathBuf| -> Option<f64> {
            let v: f64 = fs::read_to_string(p).ok()?.trim().parse().ok()?;
            Some(v / 1000.0)
        };
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("thermal_zone"))
            })
            .collect();
        dirs.sort();
        dirs.into_iter()
            .filter_map(|d| {
                let temp_c = milli(d.join("temp"))?;
                let kind = fs::read_to_string(d.join("type"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                let mut trip_c: Option<f64> = None;
                for i in 0..64 {
                    let Ok(ty) = fs::read_to_string(d.join(format!("trip_point_{i}_type"))) else {
                        break;
                    };
                    if !matches!(ty.trim(), "passive" | "hot" | "critical") {
                        continue;
                    }
                    if let Some(t) =
                        milli(d.join(format!("trip_point_{i}_temp"))).filter(|&t| t > 0.0)
                    {
                        trip_c = Some(trip_c.map_or(t, |m| m.min(t)));
                    }
                }
                Some(ThermalZone {
                    kind,
                    temp_c,
                    trip_c,
                })
            })
            .collect()
    }

    /// Whether any zone is within `margin_c` of its trip point (or, without
    /// one, at `fallback_c` or hotter).
    pub fn likely(&self, margin_c: f64, fallback_c: f64) -> bool {
        self.zones().iter().any(|z| match z.trip_c {
            Some(trip) => z.temp_c >= trip - margin_c,
            None => z.temp_c >= fallback_c,
        })
    }
}
