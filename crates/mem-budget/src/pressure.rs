//! Pressure levels of memory in use, with hysteresis; CPU load and thermal
//! hints from fixture-testable readers.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hw_detect::{Detector, MemoryInfo, MemoryProbe};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How full the machine's effective memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PressureLevel {
    /// Below the elevated threshold (default 70% in use).
    Normal,
    /// From 70% (default).
    Elevated,
    /// From 85% (default).
    High,
    /// From 90% (default).
    Critical,
}

impl PressureLevel {
    /// What a program should do at this level.
    pub fn action(self) -> &'static str {
        match self {
            PressureLevel::Normal => "OK",
            PressureLevel::Elevated => "reduce input length or clear caches",
            PressureLevel::High => "unload idle models and clear caches",
            PressureLevel::Critical => "unload models and refuse new work until memory is freed",
        }
    }
}

impl fmt::Display for PressureLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PressureLevel::Normal => "normal",
            PressureLevel::Elevated => "elevated",
            PressureLevel::High => "high",
            PressureLevel::Critical => "critical",
        })
    }
}

/// Thresholds of the pressure monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PressureConfig {
    /// Fraction of effective memory in use from which the level is
    /// `Elevated`. Default 0.70.
    pub elevated: f64,
    /// From which it is `High`. Default 0.85.
    pub high: f64,
    /// From which it is `Critical`. Default 0.90.
    pub critical: f64,
    /// A level is left downwards only once use is this far below its
    /// threshold, so it does not flap. Default 0.03.
    pub hysteresis: f64,
    /// CPU busy fraction above which `cpu_maxed` is set. Default 0.90.
    pub cpu_maxed_above: f64,
    /// `thermal_likely` is set when a zone is within this many °C of its
    /// lowest passive/hot/critical trip point. Default 5.
    pub thermal_margin_c: f64,
    /// For zones without such trip points: `thermal_likely` from this
    /// temperature. Default 90 °C.
    pub thermal_fallback_c: f64,
}

impl Default for PressureConfig {
    fn default() -> Self {
        PressureConfig {
            elevated: 0.70,
            high: 0.85,
            critical: 0.90,
            hysteresis: 0.03,
            cpu_maxed_above: 0.90,
            thermal_margin_c: 5.0,
            thermal_fallback_c: 90.0,
        }
    }
}

impl PressureConfig {
    /// The level of `used_fraction` without hysteresis.
    pub fn level_of(&self, used_fraction: f64) -> PressureLevel {
        if used_fraction >= self.critical {
            PressureLevel::Critical
        } else if used_fraction >= self.high {
            PressureLevel::High
        } else if used_fraction >= self.elevated {
            PressureLevel::Elevated
        } else {
            PressureLevel::Normal
        }
    }

    /// The next level from `previous` at `used_fraction`: up at once, down
    /// only once use is `hysteresis` below the threshold of the level left.
    pub fn next_level(&self, previous: PressureLevel, used_fraction: f64) -> PressureLevel {
        let raw = self.level_of(used_fraction);
        if raw >= previous {
            raw
        } else {
            previous.min(self.level_of(used_fraction + self.hysteresis))
        }
    }
}

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
        reader.last.lock().times = reader.read_times().ok();
        reader
    }

    /// The counters now.
    pub fn read_times(&self) -> Result<CpuTimes> {
        let text = fs::read_to_string(&self.path).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        let bad = |found: &str| {
            Error::invalid(
                "/proc/stat",
                format!("{}: {found:?}", self.path.display()),
                "a first line `cpu  user nice system idle [iowait irq softirq steal …]`",
            )
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
        let mut last = self.last.lock();
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

/// One observation of the monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PressureReading {
    /// The level after hysteresis.
    pub level: PressureLevel,
    /// Fraction of effective memory in use.
    pub used_fraction: f64,
    /// The memory reading.
    pub memory: MemoryInfo,
    /// CPU busy fraction since the previous check, where known.
    pub cpu_busy: Option<f64>,
    /// CPU busy above the configured threshold.
    pub cpu_maxed: bool,
    /// A thermal zone near its trip point.
    pub thermal_likely: bool,
}

/// A level change, given to callbacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PressureChange {
    /// The level before.
    pub from: PressureLevel,
    /// The level now.
    pub to: PressureLevel,
    /// The reading that changed it.
    pub reading: PressureReading,
}

type Callback = Arc<dyn Fn(&PressureChange) + Send + Sync>;

struct Inner {
    probe: Arc<dyn MemoryProbe>,
    config: PressureConfig,
    cpu: Option<CpuLoadReader>,
    thermal: Option<ThermalReader>,
    last: Mutex<Option<PressureReading>>,
    callbacks: Mutex<Vec<Callback>>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PressureMonitor")
            .field("probe", &self.probe)
            .field("config", &self.config)
            .field("cpu", &self.cpu)
            .field("thermal", &self.thermal)
            .field("last", &*self.last.lock())
            .field("callbacks", &self.callbacks.lock().len())
            .finish()
    }
}

/// Watches memory pressure (and CPU load and heat) and calls back on level
/// changes. Cheap to clone: clones share state and callbacks.
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
/// use mem_budget::{PressureConfig, PressureLevel, PressureMonitor, GIB};
/// use hw_detect::{MemoryInfo, MemoryProbe};
///
/// #[derive(Debug)]
/// struct Scripted(AtomicU64);
/// impl MemoryProbe for Scripted {
///     fn memory(&self) -> hw_detect::Result<MemoryInfo> {
///         Ok(MemoryInfo::new(10 * GIB, self.0.load(Ordering::Relaxed), 0, 0, None))
///     }
/// }
///
/// let probe = Arc::new(Scripted(AtomicU64::new(5 * GIB)));
/// let monitor = PressureMonitor::new(probe.clone(), PressureConfig::default());
/// assert_eq!(monitor.check_now()?.level, PressureLevel::Normal);
/// probe.0.store(GIB / 2, Ordering::Relaxed); // 95% in use
/// assert_eq!(monitor.check_now()?.level, PressureLevel::Critical);
/// assert_eq!(monitor.recommended_action(), "unload models and refuse new work until memory is freed");
/// # Ok::<(), mem_budget::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PressureMonitor {
    inner: Arc<Inner>,
}

impl PressureMonitor {
    /// A monitor of `probe`'s readings, without CPU or thermal readers.
    pub fn new(probe: Arc<dyn MemoryProbe>, config: PressureConfig) -> PressureMonitor {
        PressureMonitor::with_readers(probe, config, None, None)
    }

    /// A monitor with CPU-load and thermal readers.
    pub fn with_readers(
        probe: Arc<dyn MemoryProbe>,
        config: PressureConfig,
        cpu: Option<CpuLoadReader>,
        thermal: Option<ThermalReader>,
    ) -> PressureMonitor {
        PressureMonitor {
            inner: Arc::new(Inner {
                probe,
                config,
                cpu,
                thermal,
                last: Mutex::new(None),
                callbacks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A monitor of this machine: `hw_detect::Detector` for memory, and
    /// `/proc/stat` and `/sys/class/thermal` below `/`.
    pub fn for_this_machine(config: PressureConfig) -> PressureMonitor {
        PressureMonitor::with_readers(
            Arc::new(Detector::new()),
            config,
            Some(CpuLoadReader::with_root("/")),
            Some(ThermalReader::with_root("/")),
        )
    }

    /// Calls `f` on every level change (from any thread that checks).
    pub fn on_change(&self, f: impl Fn(&PressureChange) + Send + Sync + 'static) {
        self.inner.callbacks.lock().push(Arc::new(f));
    }

    /// Reads the machine now, updates the level and calls back if it changed.
    pub fn check_now(&self) -> Result<PressureReading> {
        let inner = &self.inner;
        let memory = inner.probe.memory()?;
        let used_fraction = memory.used_fraction();
        let cpu_busy = inner.cpu.as_ref().and_then(CpuLoadReader::sample);
        let thermal_likely = inner.thermal.as_ref().is_some_and(|t| {
            t.likely(
                inner.config.thermal_margin_c,
                inner.config.thermal_fallback_c,
            )
        });
        let (reading, change) = {
            let mut last = inner.last.lock();
            let previous = last.as_ref().map_or(PressureLevel::Normal, |r| r.level);
            let level = inner.config.next_level(previous, used_fraction);
            let reading = PressureReading {
                level,
                used_fraction,
                memory,
                cpu_busy,
                cpu_maxed: cpu_busy.is_some_and(|b| b > inner.config.cpu_maxed_above),
                thermal_likely,
            };
            *last = Some(reading.clone());
            let change = (level != previous).then(|| PressureChange {
                from: previous,
                to: level,
                reading: reading.clone(),
            });
            (reading, change)
        };
        if let Some(change) = change {
            tracing::info!(from = %change.from, to = %change.to, used = used_fraction, "memory pressure changed");
            let callbacks: Vec<Callback> = inner.callbacks.lock().clone();
            for cb in callbacks {
                cb(&change);
            }
        }
        Ok(reading)
    }

    /// The level of the last check (`Normal` before any).
    pub fn level(&self) -> PressureLevel {
        self.inner
            .last
            .lock()
            .as_ref()
            .map_or(PressureLevel::Normal, |r| r.level)
    }

    /// The last reading, if any check was made.
    pub fn last_reading(&self) -> Option<PressureReading> {
        self.inner.last.lock().clone()
    }

    /// What to do now, after the last check: the level's action, plus CPU
    /// and thermal advice when those flags are set.
    pub fn recommended_action(&self) -> String {
        let Some(r) = self.last_reading() else {
            return PressureLevel::Normal.action().to_string();
        };
        let mut out = r.level.action().to_string();
        if r.cpu_maxed {
            out.push_str("; the CPU is saturated: lower concurrency or batch size");
        }
        if r.thermal_likely {
            out.push_str(
                "; the machine is near a thermal limit: expect throttling, prefer smaller models",
            );
        }
        out
    }

    /// Checks every `interval` on a background thread until the returned
    /// handle is dropped or stopped.
    pub fn spawn(&self, interval: Duration) -> Result<MonitorThread> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let monitor = self.clone();
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("snug-pressure".into())
            .spawn(move || loop {
                if let Err(e) = monitor.check_now() {
                    tracing::warn!(error = %e, "pressure check failed");
                }
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock();
                if !*stopped {
                    cv.wait_for(&mut stopped, interval);
                }
                if *stopped {
                    break;
                }
            })
            .map_err(|source| Error::Io {
                path: PathBuf::from("<thread spawn>"),
                source,
            })?;
        Ok(MonitorThread {
            stop,
            handle: Some(handle),
        })
    }
}

/// The background thread of [`PressureMonitor::spawn`]; stops and joins
/// when dropped.
#[derive(Debug)]
pub struct MonitorThread {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl MonitorThread {
    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock() = true;
        cv.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for MonitorThread {
    fn drop(&mut self) {
        self.halt();
    }
}
