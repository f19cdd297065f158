//! The crate's one error type.

use std::sync::Arc;

/// Everything that can go wrong in this crate.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {field} = {value}: expected {expected}")]
    InvalidConfig {
        /// The field at fault.
        field: String,
        /// Its value, as text.
        value: String,
        /// What would be accepted instead.
        expected: String,
    },
    /// A single entry weighs more than one shard may hold.
    #[error(
        "entry weighs {weight} units but one shard holds at most {limit}; \
         raise the capacity, use fewer shards, or cache a smaller value"
    )]
    TooHeavy {
        /// The entry's weight.
        weight: u64,
        /// The per-shard capacity.
        limit: u64,
    },
    /// The loader passed to `get_or_insert_with` failed; the failure is not cached.
    #[error("loader failed; the error is not cached, the next call runs the loader again")]
    Loader(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// The loader panicked; waiters get this error instead of hanging.
    #[error("loader panicked; nothing was cached, the next call runs the loader again")]
    LoaderPanicked,
    /// A value could not be encoded or decoded by the disk tier's codec.
    #[error("codec failed on {what}: {message}; check that the codec matches the stored schema")]
    Codec {
        /// What was being encoded or decoded.
        what: String,
        /// The codec's message.
        message: String,
    },
    /// An I/O error in the disk tier.
    #[error("disk tier I/O on {path}; the cache serves from memory until the disk recovers")]
    Io {
        /// The path involved.
        path: String,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
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

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source: Arc::new(source),
        }
    }
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
        let io = Error::io(
            std::path::Path::new("/cache/ab.bin"),
            std::io::Error::other("disk on fire"),
        );
        assert_each_cause_once(&io, 2);
        let loader = Error::Loader(Arc::new(std::io::Error::other("upstream down")));
        assert_each_cause_once(&loader, 2);
    }
}
