//! The error type of the runtime: its own failures, and every sub-crate's.

use std::time::Duration;

fn mib(b: &u64) -> String {
    format!("{:.1} MiB", *b as f64 / (1u64 << 20) as f64)
}

fn variants(t: &[(String, u64)]) -> String {
    t.iter()
        .map(|(l, b)| format!("{l} needs {}", mib(b)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What went wrong in the runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid configuration: {field} = {value}: expected {expected}")]
    InvalidConfig {
        /// The field.
        field: String,
        /// The value given.
        value: String,
        /// What it must be.
        expected: String,
    },
    /// A request's input cannot be served.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No model is registered under this name.
    #[error("no model named {name:?} is registered; the models are: {}", known.join(", "))]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The names registered.
        known: Vec<String>,
    },
    /// A request's KV cache (prompt + max_tokens) can never fit the model's
    /// KV pool.
    #[error(
        "the request needs {needed} KV bytes for {tokens} tokens (prompt + max_tokens), \
         more than the model's KV budget of {budget}; shorten the prompt, lower max_tokens or \
         raise the decoder's kv_budget_bytes"
    )]
    KvTooLarge {
        /// Bytes the sequence would hold at its longest.
        needed: u64,
        /// The KV pool's budget.
        budget: u64,
        /// Prompt + max_tokens.
        tokens: usize,
    },
    /// The model's queue is full: retry later.
    #[error(
        "model {model} is overloaded: {queued} sequences wait, the limit is {max_queued}; \
         retry in a moment or raise its engine's max_queued"
    )]
    Overloaded {
        /// The model.
        model: String,
        /// Sequences waiting.
        queued: usize,
        /// The limit.
        max_queued: usize,
    },
    /// Reading the models file failed.
    #[error("reading the models file {path}")]
    ModelsFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No variant of a model fits the memory budget, even after unloading
    /// idle models.
    #[error(
        "model {model} does not fit: {tried}; {free} is free under the model cap of {cap}; \
         unload or unpin other models, raise max_model, or serve from the remote or rule-based tier",
        tried = variants(.tried), free = mib(.free), cap = mib(.cap)
    )]
    DoesNotFit {
        /// The model.
        model: String,
        /// Each variant tried with the bytes it needs.
        tried: Vec<(String, u64)>,
        /// Bytes free under the model cap now.
        free: u64,
        /// The model cap.
        cap: u64,
    },
    /// A model's loader panicked.
    #[error("loading model {0} panicked; see the log")]
    LoadPanicked(String),
    /// A warm-up was paused by an emergency cleanup.
    #[error("warm-up of {0} paused by an emergency cleanup")]
    Paused(String),
    /// `emergency_cleanup` ran too recently.
    #[error("emergency cleanup ran moments ago; try again in {retry_after:?}")]
    RateLimited {
        /// When it may run again.
        retry_after: Duration,
    },
    /// A tier answered something unusable.
    #[error("backend error: {0}")]
    Backend(String),
    /// Reading input failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// From hw-detect.
    #[error(transparent)]
    Hardware(#[from] hw_detect::Error),
    /// From mem-budget.
    #[error(transparent)]
    Budget(#[from] mem_budget::Error),
    /// From quant.
    #[error(transparent)]
    Quant(#[from] quant::Error),
    /// From affinity.
    #[error(transparent)]
    Affinity(#[from] affinity::Error),
    /// From tier-router: no tier served, with the record of each.
    #[error(transparent)]
    Router(#[from] tier_router::Error),
    /// From feature-cache.
    #[error(transparent)]
    Cache(#[from] feature_cache::Error),
    /// From buffer-pool.
    #[error(transparent)]
    Pool(#[from] buffer_pool::Error),
    /// From batcher.
    #[error(transparent)]
    Batcher(#[from] batcher::Error),
    /// From the model.
    #[error(transparent)]
    Model(#[from] models::Error),
}

impl Error {
    /// An [`Error::InvalidConfig`].
    pub fn invalid(
        field: impl Into<String>,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }

    /// An [`Error::UnknownModel`].
    pub fn unknown_model(name: &str, known: Vec<String>) -> Self {
        Error::UnknownModel {
            name: name.to_string(),
            known,
        }
    }
}

/// A `Result` with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
