//! The crate's error type and the error a backend reports.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::router::Attempted;

/// Errors returned by the router and its configuration checks.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of its allowed range (built by [`Error::invalid`]).
    #[error("invalid configuration: {field} = {value}: expected {expected}")]
    InvalidConfig {
        /// The field, e.g. `breaker.failure_rate`.
        field: String,
        /// The value that was given, formatted.
        value: String,
        /// What the value must be, and what to do.
        expected: String,
    },
    /// No tier in the fallback chain served the request.
    #[error(
        "no tier served the request: {} tier(s) tried or skipped ({}); register a rule-based tier, \
         which never fails, at the end of the chain, or allow a longer deadline",
        trail.len(),
        trail.iter().map(|a| a.to_string()).collect::<Vec<_>>().join("; ")
    )]
    Exhausted {
        /// Every tier of the chain with why it did not serve.
        trail: Vec<Attempted>,
    },
    /// The router was built without any backend.
    #[error(
        "the router has no backends; register at least one tier (a rule-based one never fails)"
    )]
    NoBackends,
}

impl Error {
    /// An [`Error::InvalidConfig`] for `field` holding `value`, which should be `expected`.
    pub fn invalid(
        field: impl Into<String>,
        value: impl fmt::Display,
        expected: impl Into<String>,
    ) -> Error {
        Error::InvalidConfig {
            field: field.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// `std::result::Result` with this crate's [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether a failed call may succeed if it is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// May succeed on retry: connection refused, timeout, HTTP 429 or 5xx, a busy queue.
    Transient,
    /// Will fail again the same way: HTTP 4xx other than 408/429, bad response, bad input.
    Permanent,
}

/// The error a [`Backend`](crate::Backend) returns: a kind (transient or permanent) and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendError {
    /// Transient errors are retried within the deadline; permanent ones are not.
    pub kind: ErrorKind,
    /// What went wrong, for the record of the fallback chain.
    pub message: String,
}

impl BackendError {
    /// A transient error: the router retries it with backoff while the deadline allows.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }

    /// A permanent error: the router moves to the next tier without retrying.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            message: message.into(),
        }
    }

    /// Whether the error may go away on retry.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        };
        write!(f, "{kind} error: {}", self.message)
    }
}

impl std::error::Error for BackendError {}
