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
    /// An explicit CPU list was empty.
    #[error(
        "PinStrategy::Explicit was given no CPUs; name at least one CPU or use PinStrategy::Auto"
    )]
    EmptyCpuList,
    /// A thread count of zero was configured.
    #[error("a pool of 0 threads was asked for; ask for at least 1 or leave `threads` unset for the recommended count")]
    ZeroThreads,
    /// Rayon could not build the pool (thread spawn failed, or the global
    /// pool was already initialised).
    #[error("could not build the {threads}-thread rayon pool: {source}; if this is the global pool, build it before any other rayon use")]
    Pool {
        /// Threads asked for.
        threads: usize,
        /// Rayon's error.
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
