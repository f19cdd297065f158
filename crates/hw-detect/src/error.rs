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
    #[error("cannot read {path}: {source}; hw-detect needs it to know {what}")]
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
