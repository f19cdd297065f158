//! The error type of this crate.

use std::path::PathBuf;

use crate::ledger::Category;
use crate::units::Bytes;

/// What went wrong: a refusal, a bad model file, or a probe that failed.
///
/// Every message names the value that was asked for, the limit it met and
/// what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A reservation was refused: the ledger's cap or the machine's free
    /// memory (above the safety margin) is smaller than the request.
    #[error(
        "cannot reserve {} for {category}: {} is free under the {category} cap of {} \
         ({} under the overall cap), and the machine has {} available above the {} safety margin; {suggestion}",
        Bytes(*requested), Bytes(*free_in_category), Bytes(*category_cap),
        Bytes(*free_overall), Bytes(*free_in_machine), Bytes(*safety_margin)
    )]
    Refused {
        /// The category asked for.
        category: Category,
        /// Bytes asked for.
        requested: u64,
        /// Bytes still free under the category's cap.
        free_in_category: u64,
        /// The category's cap.
        category_cap: u64,
        /// Bytes still free under the overall cap.
        free_overall: u64,
        /// Bytes the machine has available now, less the safety margin and
        /// less reservations made since the reading.
        free_in_machine: u64,
        /// The safety margin kept free on the machine.
        safety_margin: u64,
        /// What to do about it.
        suggestion: String,
    },
    /// `reserve_timeout` waited its whole timeout without the bytes coming free.
    #[error("waited {waited_ms} ms for {} of {category} without it coming free", Bytes(*requested))]
    TimedOut {
        /// The category asked for.
        category: Category,
        /// Bytes asked for.
        requested: u64,
        /// How long the caller waited.
        waited_ms: u64,
        /// The refusal seen last.
        #[source]
        last: Box<Error>,
    },
    /// Reading the machine's memory failed.
    #[error("cannot read the machine's memory to admit a reservation; check that /proc/meminfo is readable or give the ledger another probe")]
    Probe(#[from] hw_detect::Error),
    /// A model file could not be opened or read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A model file's header is malformed, truncated or claims absurd sizes.
    #[error(
        "bad {format} header: {reason}; the file is truncated, corrupted or not a {format} file"
    )]
    Header {
        /// `safetensors` or `GGUF`.
        format: &'static str,
        /// What was wrong, with the offending value and the limit.
        reason: String,
    },
    /// The file is neither safetensors nor GGUF.
    #[error("{path}: not a safetensors or GGUF file (first bytes {first:02x?}); give a .safetensors or .gguf model")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        first: Vec<u8>,
    },
    /// A dtype or GGML type id this crate does not know.
    #[error("unknown {format} tensor type {name:?} in tensor {tensor:?}; supported: {supported}")]
    UnknownDtype {
        /// `safetensors` or `GGUF`.
        format: &'static str,
        /// The type's name or numeric id.
        name: String,
        /// The tensor that uses it.
        tensor: String,
        /// The types that are understood.
        supported: &'static str,
    },
    /// A calibration could not fit the linear model.
    #[error("cannot calibrate from {points} measurement(s): {reason}")]
    Calibration {
        /// Number of measurements given.
        points: usize,
        /// Why the fit failed.
        reason: String,
    },
    /// A configuration value outside its documented range.
    #[error("invalid configuration: {field} = {value}: expected {expected}")]
    InvalidConfig {
        /// Which field (or file).
        field: String,
        /// Its value, as text.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// [`Reservation::split`](crate::Reservation::split) asked for more
    /// bytes than the reservation holds.
    #[error("cannot split {} from a reservation of {}; split at most the bytes it holds", Bytes(*requested), Bytes(*held))]
    SplitTooLarge {
        /// Bytes asked for.
        requested: u64,
        /// Bytes the reservation holds.
        held: u64,
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

    pub(crate) fn header(format: &'static str, reason: impl Into<String>) -> Error {
        Error::Header {
            format,
            reason: reason.into(),
        }
    }

    /// Whether this is a refusal for lack of memory (now or before a timeout).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Refused { .. } | Error::TimedOut { .. })
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
        let read = hw_detect::Error::Read {
            path: "/proc/meminfo".into(),
            what: "the memory size",
            source: std::io::Error::other("disk on fire"),
        };
        assert_each_cause_once(&Error::Probe(read), 3);
        let io = Error::Io {
            path: "model.gguf".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert_each_cause_once(&io, 2);
        let refused = Error::Refused {
            category: Category::Model,
            requested: 2 << 30,
            free_in_category: 1 << 30,
            category_cap: 3 << 30,
            free_overall: 1 << 30,
            free_in_machine: 1 << 30,
            safety_margin: 1 << 29,
            suggestion: "choose int4".into(),
        };
        let timed_out = Error::TimedOut {
            category: Category::Model,
            requested: 2 << 30,
            waited_ms: 50,
            last: Box::new(refused),
        };
        assert_each_cause_once(&timed_out, 2);
    }
}
