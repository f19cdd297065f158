//! Pressure levels of memory in use, with hysteresis; CPU load and thermal
//! hints from hw-detect's readers.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hw_detect::{CpuLoadReader, Detector, MemoryInfo, MemoryProbe, ThermalReader};
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
        PressureMonitor::with_machine_readers(Arc::new(Detector::new()), config)
    }

    /// A monitor of `probe`'s memory readings, with this machine's CPU-load
    /// and thermal readers (`/proc/stat` and `/sys/class/thermal` below
    /// `/`): for a program whose memory comes from its own probe (a budget,
    /// a container's limit) while CPU and heat are the machine's.
    pub fn with_machine_readers(
        probe: Arc<dyn MemoryProbe>,
        config: PressureConfig,
    ) -> PressureMonitor {
        PressureMonitor::with_readers(
            probe,
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
