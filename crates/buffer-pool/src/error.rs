//! The crate's one error type.

use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong when configuring a pool or leasing from it.
///
/// Every message names the value that was asked for, the limit it ran into
/// and what the caller can do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is inconsistent (a pool budget above the total, two
    /// pools with the same name, a zero budget, ...).
    #[error("invalid configuration: {field} = {value}: expected {expected}")]
    InvalidConfig {
        /// Which field.
        field: String,
        /// Its value, as text.
        value: String,
        /// What is accepted.
        expected: String,
    },

    /// No pool of that name was configured.
    #[error("no buffer pool named {name:?}; configured pools are {known:?}")]
    UnknownPool {
        /// The name that was asked for.
        name: String,
        /// The names that exist.
        known: Vec<String>,
    },

    /// The request does not fit under the budget right now, and did not fit
    /// before the timeout either (`waited` is zero for `try_*` calls).
    #[error(
        "pool {pool:?}: {requested} bytes requested ({rounded} after size-class rounding) but only \
         {free} of the {budget}-byte budget are free after waiting {waited:?}; release leases, \
         raise the budget or wait longer"
    )]
    Exhausted {
        /// Name of the pool asked (shared with the pool: a refusal
        /// allocates nothing).
        pool: Arc<str>,
        /// Bytes asked for (the sum, for `acquire_all`).
        requested: usize,
        /// Bytes that would be taken from the budget after size-class rounding.
        rounded: usize,
        /// Bytes not held by leases (cached buffers count as free: they are
        /// released to make room), the smaller of the pool's and the total's.
        free: usize,
        /// The budget that bound: the pool's, or the total when that is smaller.
        budget: usize,
        /// How long the call waited for releases before giving up.
        waited: Duration,
    },

    /// The request can never be served: it is larger than the pool's budget.
    #[error(
        "pool {pool:?}: {requested} bytes requested ({rounded} after size-class rounding) but the \
         budget is only {budget} bytes; split the work into smaller buffers or raise the budget"
    )]
    TooLarge {
        /// Name of the pool asked.
        pool: Arc<str>,
        /// Bytes asked for (the sum, for `acquire_all`).
        requested: usize,
        /// Bytes after size-class rounding.
        rounded: usize,
        /// The pool's budget (or the total, when smaller).
        budget: usize,
    },

    /// The system allocator refused a fresh allocation.
    #[error("the system allocator could not provide {bytes} bytes; free memory elsewhere or lower the budget")]
    AllocationFailed {
        /// Bytes that were asked of the allocator.
        bytes: usize,
    },

    /// `split_off` at a position past the end of the lease.
    #[error(
        "cannot split a {len}-byte lease at byte {at}; the position must be at most the length"
    )]
    SplitOutOfRange {
        /// Requested split position.
        at: usize,
        /// Length of the lease.
        len: usize,
    },

    /// `split_off` at a position that is not a multiple of the buffer alignment.
    #[error("cannot split a lease at byte {at}: splits must fall on a multiple of {align} bytes so that every piece stays aligned")]
    SplitMisaligned {
        /// Requested split position.
        at: usize,
        /// Required alignment of the split position.
        align: usize,
    },

    /// `shrink` to a length above the current one.
    #[error("cannot shrink a {len}-byte lease to {new_len} bytes; a lease only shrinks, acquire a larger one instead")]
    ShrinkBeyondLength {
        /// Asked-for length.
        new_len: usize,
        /// Current length.
        len: usize,
    },

    /// `shrink_to` with a fraction outside 0.0..=1.0.
    #[error("shrink fraction {fraction} is outside 0.0..=1.0; pass e.g. 0.25 to keep a quarter of the budget")]
    InvalidFraction {
        /// The fraction given.
        fraction: f64,
    },

    /// An element count whose byte size overflows `usize`.
    #[error("{count} elements of {elem_size} bytes overflow the address space; ask for fewer")]
    SizeOverflow {
        /// Elements asked for.
        count: usize,
        /// Size of one element.
        elem_size: usize,
    },

    /// The background trimming thread could not be started.
    #[error("could not start the buffer-pool trimming thread; call trim_idle() yourself instead")]
    Spawn {
        /// The operating system's error.
        #[from]
        source: std::io::Error,
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

/// Shorthand for results of this crate.
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
        let e = Error::Spawn {
            source: std::io::Error::other("no threads today"),
        };
        assert_each_cause_once(&e, 2);
    }
}
