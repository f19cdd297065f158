//! The error type of this crate.

use std::path::PathBuf;

/// Why the machine could not be described.
///
/// Missing or malformed optional files (cpufreq, cgroup, topology) never
/// produce an error: the profile falls back to a documented default and logs
/// the fact. An error is returned only where nothing sensible can be assumed,
/// such as a memory size that cannot be read at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file that must exist could not be read.
    #[error("cannot read {path}; hw-detect needs it to know {what}")]
    Read {
        /// The file that was read.
        path: PathBuf,
        /// What the file was needed for.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file that must be understood held something else.
    #[error("cannot parse {path}: expected {expected}, found {found:?}")]
    Parse {
        /// The file that was read.
        path: PathBuf,
        /// What the reader expected there.
        expected: &'static str,
        /// What it found (truncated to 80 characters).
        found: String,
    },
    /// The operating system's own interface refused to answer.
    #[error("the system refused to report {what}: {reason}")]
    System {
        /// What was asked.
        what: &'static str,
        /// The reason the system gave.
        reason: String,
    },
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod chain_tests {
    use super::*;

    /// Every cause's message appears once in the report an error-chain
    /// printer makes (each layer, then `: `, then its cause): no layer pastes
    /// its cause into its own message.
    fn assert_each_cause_once(e: &(dyn std::error::Error + 'static), depth: usize) {
        let layers: Vec<String> = std::iter::successors(Some(e), |e| e.source())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(layers.len(), depth, "{layers:?}");
        let report = layers.join(": ");
        let once = |cause: &String| report.matches(cause.as_str()).count() == 1;
        assert!(layers[1..].iter().all(once), "{report}");
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        let e = Error::Read {
            path: "/proc/meminfo".into(),
            what: "the memory size",
            source: std::io::Error::other("disk on fire"),
        };
        assert_each_cause_once(&e, 2);
        assert!(e.to_string().contains("/proc/meminfo"), "{e}");
    }
}
