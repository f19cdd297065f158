//! Helpers shared by the snug workspace's examples and benchmarks.
//!
//! The libraries themselves live in `crates/`; this root package only carries
//! the programs in `examples/` and `benches/` and the few helpers they share:
//! seeded workloads, process memory readings and latency percentiles.
//!
//! ```
//! let xs = [5.0, 1.0, 3.0, 2.0, 4.0];
//! assert_eq!(snug::percentile(&xs, 50.0), Some(3.0));
//! ```

/// The `p`-th percentile (0–100, nearest rank) of `values`, or `None` when
/// `values` is empty or `p` is outside 0–100.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Resident set size of this process in bytes (`VmRSS`), and its peak
/// (`VmHWM`), read from `/proc/self/status`. `None` where that file does not
/// exist (non-Linux systems).
pub fn process_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), Some(50.0));
        assert_eq!(percentile(&xs, 99.0), Some(99.0));
        assert_eq!(percentile(&xs, 100.0), Some(100.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&xs, 101.0), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn process_memory_reads_this_process() {
        let (rss, peak) = process_memory().expect("linux has /proc/self/status");
        assert!(rss > 0 && peak >= rss);
    }
}
