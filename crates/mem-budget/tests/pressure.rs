//! Pressure levels with hysteresis from a scripted probe; CPU and thermal
//! readers against fixture trees.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw_detect::{CpuLoadReader, MemoryInfo, MemoryProbe, ThermalReader};
use mem_budget::{PressureConfig, PressureLevel, PressureMonitor, GIB};
use parking_lot::Mutex;

/// Reports `used` per mille of a 10 GiB machine as in use.
#[derive(Debug)]
struct Scripted(AtomicU64);

impl Scripted {
    fn set(&self, used_permille: u64) {
        self.0.store(used_permille, Ordering::Relaxed);
    }
}

impl MemoryProbe for Scripted {
    fn memory(&self) -> hw_detect::Result<MemoryInfo> {
        let total = 10 * GIB;
        let used = total / 1000 * self.0.load(Ordering::Relaxed);
        Ok(MemoryInfo::new(total, total - used, 0, 0, None))
    }
}

#[test]
fn levels_rise_at_once_and_fall_with_hysteresis() {
    let probe = Arc::new(Scripted(AtomicU64::new(500)));
    let monitor = PressureMonitor::new(probe.clone(), PressureConfig::default());
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&changes);
    monitor.on_change(move |c| seen.lock().push((c.from, c.to)));
    let mut levels = Vec::new();
    // Up through every level, wobbling around thresholds, then down.
    for permille in [
        500, 710, 690, 700, 860, 840, 830, 910, 880, 875, 860, 700, 650, 500,
    ] {
        probe.set(permille);
        levels.push(monitor.check_now().unwrap().level);
    }
    use PressureLevel::*;
    // Spelled out: each step against the rule "down only when used +
    // hysteresis is below the threshold of the level left".
    let c = PressureConfig::default();
    let mut prev = Normal;
    for (permille, got) in [
        500, 710, 690, 700, 860, 840, 830, 910, 880, 875, 860, 700, 650, 500,
    ]
    .iter()
    .zip(&levels)
    {
        let f = *permille as f64 / 1000.0;
        prev = c.next_level(prev, f);
        assert_eq!(prev, *got, "at {f}");
    }
    assert_eq!(
        levels,
        vec![
            Normal, Elevated, Elevated, Elevated, High, High, High, Critical, Critical, Critical,
            High, Elevated, Normal, Normal
        ]
    );
    let changes = changes.lock().clone();
    assert_eq!(
        changes,
        vec![
            (Normal, Elevated),
            (Elevated, High),
            (High, Critical),
            (Critical, High),
            (High, Elevated),
            (Elevated, Normal)
        ],
        "one callback per change, no flapping"
    );
}

#[test]
fn thresholds_are_configurable_and_actions_follow_levels() {
    let probe = Arc::new(Scripted(AtomicU64::new(550)));
    let config = PressureConfig {
        elevated: 0.5,
        high: 0.6,
        critical: 0.7,
        hysteresis: 0.0,
        ..PressureConfig::default()
    };
    let monitor = PressureMonitor::new(probe.clone(), config);
    assert_eq!(monitor.recommended_action(), "OK");
    assert_eq!(monitor.check_now().unwrap().level, PressureLevel::Elevated);
    assert_eq!(
        monitor.recommended_action(),
        "reduce input length or clear caches"
    );
    probe.set(650);
    monitor.check_now().unwrap();
    assert_eq!(
        monitor.recommended_action(),
        "unload idle models and clear caches"
    );
    probe.set(100);
    assert_eq!(monitor.check_now().unwrap().level, PressureLevel::Normal);
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn cpu_load_from_proc_stat_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let reader = CpuLoadReader::with_root(root);
    assert_eq!(reader.sample(), None, "no file: unknown");
    write(
        root,
        "proc/stat",
        "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\n",
    );
    // No counters when the reader was made: the share since boot, 20%.
    assert_eq!(reader.sample(), Some(0.2), "first sample: share since boot");
    // +950 busy (user+system+irq), +50 idle: 95% busy.
    write(root, "proc/stat", "cpu  900 0 200 850 0 50 0 0 0 0\n");
    let busy = reader.sample().unwrap();
    assert!((busy - 0.95).abs() < 1e-9, "{busy}");
    // +100 idle, +0 busy.
    write(root, "proc/stat", "cpu  900 0 200 950 0 50 0 0 0 0\n");
    assert_eq!(reader.sample(), Some(0.0));
    // No ticks since: the previous fraction stands.
    assert_eq!(reader.sample(), Some(0.0));
    write(root, "proc/stat", "intr 1 2 3\n");
    assert!(reader.read_times().is_err());
    assert_eq!(reader.sample(), None);

    // Through the monitor: cpu_maxed above 90%.
    write(root, "proc/stat", "cpu  0 0 0 0 0 0 0 0\n");
    let probe = Arc::new(Scripted(AtomicU64::new(100)));
    let monitor = PressureMonitor::with_readers(
        probe,
        PressureConfig::default(),
        Some(CpuLoadReader::with_root(root)),
        None,
    );
    assert!(!monitor.check_now().unwrap().cpu_maxed);
    // Sampled when the monitor was made: its first check has a number.
    write(root, "proc/stat", "cpu  100 0 0 900 0 0 0 0\n");
    let fresh = PressureMonitor::with_readers(
        Arc::new(Scripted(AtomicU64::new(100))),
        PressureConfig::default(),
        Some(CpuLoadReader::with_root(root)),
        None,
    );
    write(root, "proc/stat", "cpu  150 0 0 950 0 0 0 0\n");
    assert_eq!(fresh.check_now().unwrap().cpu_busy, Some(0.5));
    write(root, "proc/stat", "cpu  990 0 0 10 0 0 0 0\n");
    let r = monitor.check_now().unwrap();
    assert!(r.cpu_maxed && r.cpu_busy == Some(0.99));
    assert!(monitor.recommended_action().contains("CPU is saturated"));
}

#[test]
fn thermal_trip_points_against_temperatures() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let reader = ThermalReader::with_root(root);
    assert!(reader.zones().is_empty());
    assert!(!reader.likely(5.0, 90.0));
    let z0 = "sys/class/thermal/thermal_zone0";
    write(root, &format!("{z0}/type"), "x86_pkg_temp\n");
    write(root, &format!("{z0}/temp"), "70000\n");
    // An active (fan) trip at 50 °C is ignored; passive at 80, critical at 100.
    write(root, &format!("{z0}/trip_point_0_type"), "active\n");
    write(root, &format!("{z0}/trip_point_0_temp"), "50000\n");
    write(root, &format!("{z0}/trip_point_1_type"), "passive\n");
    write(root, &format!("{z0}/trip_point_1_temp"), "80000\n");
    write(root, &format!("{z0}/trip_point_2_type"), "critical\n");
    write(root, &format!("{z0}/trip_point_2_temp"), "100000\n");
    let zones = reader.zones();
    assert_eq!(zones.len(), 1);
    assert_eq!(zones[0].kind, "x86_pkg_temp");
    assert_eq!(zones[0].trip_c, Some(80.0));
    assert!(
        !reader.likely(5.0, 90.0),
        "70 °C is 10 below the 80 °C trip"
    );
    write(root, &format!("{z0}/temp"), "76000\n");
    assert!(reader.likely(5.0, 90.0), "76 °C is within 5 of 80");
    // A zone without trip points uses the fallback temperature.
    write(root, &format!("{z0}/temp"), "40000\n");
    let z1 = "sys/class/thermal/thermal_zone1";
    write(root, &format!("{z1}/temp"), "91000\n");
    assert!(reader.likely(5.0, 90.0));
    write(root, &format!("{z1}/temp"), "not a number\n");
    assert_eq!(reader.zones().len(), 1, "unreadable zones are skipped");
}

#[test]
fn background_thread_reports_changes_and_stops() {
    let probe = Arc::new(Scripted(AtomicU64::new(100)));
    let monitor = PressureMonitor::new(probe.clone(), PressureConfig::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    monitor.on_change(move |c| {
        let _ = tx.lock().send(c.to);
    });
    let thread = monitor.spawn(Duration::from_millis(5)).unwrap();
    probe.set(950);
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a change within 10 s");
    assert_eq!(got, PressureLevel::Critical);
    let start = Instant::now();
    thread.stop();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "stop wakes the thread"
    );
    assert_eq!(monitor.level(), PressureLevel::Critical);
}
