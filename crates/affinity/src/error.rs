//! The crate's one error type.

/// What can go wrong when planning thread placement.
///
/// The OS refusing to pin is **not** an error: that is
/// [`PinOutcome::Unsupported`](crate::PinOutcome::Unsupported), and the
/// program runs unpinned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An explicit CPU list named a CPU this process may not run on.
    #[error(
        "CPU {cpu} is not one this process may run on (allowed: {allowed}); \
         choose CPUs from the allowed list or use PinStrategy::Auto"
    )]
    CpuNotAllowed {
        /// The CPU asked for.
        cpu: usize,
        /// The CPUs the process may run on, as a kernel CPU list.
        allowed: String,
    },
    /// A configuration value outside what is accepted (an empty explicit
    /// CPU list, a pool of 0 threads).
    #[error("invalid configuration: {field} = {value}: expected {expected}")]
    InvalidConfig {
        /// Which field.
        field: String,
        /// Its value, as text.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// Rayon could not build the pool (thread spawn failed, or the global
    /// pool was already initialised).
    #[error("could not build the {threads}-thread rayon pool; if this is the global pool, build it before any other rayon use")]
    Pool {
        /// Threads asked for.
        threads: usize,
        /// Rayon's error.
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
}

impl Error {
    /// An [`Error::InvalidConfig`] for `field` holding `value`.
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Error {
        Error::InvalidConfig {
            field: field.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[test]
    fn error_chain_prints_each_cause_once() {
        let source = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .spawn_handler(|_| Err(std::io::Error::other("no threads today")))
            .build()
            .expect_err("the spawn handler refuses");
        let cause = source.to_string();
        let e = Error::Pool { threads: 1, source };
        // rayon's own error prints its io::Error and returns it as its
        // source too (three layers, the last two alike): this layer's
        // message holds neither, and the first cause is rayon's error.
        let top = e.to_string();
        assert!(
            top.contains("1-thread") && !top.contains("no threads today"),
            "{top}"
        );
        let first = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(first, Some(cause));
    }
}
