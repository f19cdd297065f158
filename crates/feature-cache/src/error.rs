//! The crate's one error type.

use std::sync::Arc;

/// Everything that can go wrong in this crate.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid cache configuration: {field} = {value}; {hint}")]
    InvalidConfig {
        /// The field at fault.
        field: &'static str,
        /// Its value, as text.
        value: String,
        /// What would be accepted instead.
        hint: &'static str,
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
    #[error("loader failed: {0}; the error is not cached, the next call runs the loader again")]
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
    #[error(
        "disk tier I/O on {path}: {source}; the cache serves from memory until the disk recovers"
    )]
    Io {
        /// The path involved.
        path: String,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source: Arc::new(source),
        }
    }
}
