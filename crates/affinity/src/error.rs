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
        let source = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .spawn_handler(|_| Err(std::io::Error::other("no threads today")))
            .build()
            .expect_err("the spawn handler refuses");
        let e = Error::Pool { threads: 1, source };
        assert_each_cause_once(&e, 2);
        assert!(e.to_string().contains("1-thread"), "{e}");
    }
}
