//! The error type of the runtime: its own failures, and every sub-crate's.

/// What went wrong in the runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A request's input cannot be served.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Reading input failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A `Result` with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
