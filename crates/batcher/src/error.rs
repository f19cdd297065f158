//! The crate's one error type.

use std::convert::Infallible;
use std::time::Duration;

/// Everything that can go wrong when submitting a request or waiting for its
/// answer.
///
/// `E` is the handler's own error type: a handler that answers an item with
/// `Err(e)` reaches the caller as [`Error::Handler`]`(e)`. Errors that do not
/// come from a handler (configuration, submission) use the default
/// `E = Infallible`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error<E = Infallible> {
    /// The queue is full; the request was not accepted.
    #[error(
        "queue is full: {queued} requests weighing {queued_weight} are queued, the limits are \
         max_queued = {max_queued} and max_queued_weight = {max_queued_weight}; retry later, use \
         submit_timeout to wait for room, or raise the limits"
    )]
    Overloaded {
        /// Requests queued when this one was refused.
        queued: usize,
        /// Their total weight.
        queued_weight: u64,
        /// The configured item limit.
        max_queued: usize,
        /// The configured weight limit.
        max_queued_weight: u64,
    },
    /// A continuous batcher's queue is full; the sequence was not accepted.
    #[error(
        "queue is full: {queued} sequences wait to be admitted, the limit is max_queued = \
         {max_queued}; retry later or raise max_queued"
    )]
    QueueFull {
        /// Sequences queued when this one was refused.
        queued: usize,
        /// The configured limit.
        max_queued: usize,
    },
    /// The request's deadline passed while it was still queued; it never ran.
    #[error(
        "request waited {waited:?} in the queue and passed its deadline before a batch took it; \
         give it a later deadline, lower the load, or raise max_concurrent_batches"
    )]
    TimedOut {
        /// How long the request had been queued when it expired.
        waited: Duration,
    },
    /// The request was cancelled (by [`Ticket::cancel`](crate::Ticket::cancel))
    /// before a batch took it; it never ran.
    #[error("request was cancelled while queued; it never ran")]
    Cancelled,
    /// The handler (or the prepare stage) panicked while processing the
    /// batch that held this request. The batcher keeps serving.
    #[error(
        "the {stage} stage panicked on a batch of {batch_size} requests: {message}; the batcher \
         keeps serving, fix the handler or resubmit"
    )]
    HandlerPanicked {
        /// `"handler"` or `"prepare"`.
        stage: &'static str,
        /// Size of the batch that was lost.
        batch_size: usize,
        /// The panic payload, when it was a string.
        message: String,
    },
    /// The handler returned a different number of results than the batch
    /// had requests, so no result can be matched to its request.
    #[error(
        "the handler returned {got} results for a batch of {expected} requests; it must return \
         exactly one result per input, in order"
    )]
    WrongResultCount {
        /// Requests in the batch.
        expected: usize,
        /// Results returned.
        got: usize,
    },
    /// The batcher was shut down: either before the request was submitted,
    /// or while it was queued under [`ShutdownMode::Fail`](crate::ShutdownMode::Fail).
    #[error("the batcher is shut down; the request was not run")]
    ShutDown,
    /// A single request weighs more than a whole batch may.
    #[error(
        "request weighs {weight}, more than max_batch_weight = {max_batch_weight}; split the \
         input or raise max_batch_weight"
    )]
    TooHeavy {
        /// The request's weight.
        weight: u64,
        /// The batch weight limit at the time.
        max_batch_weight: u64,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The field's name.
        field: &'static str,
        /// The value given.
        value: String,
        /// What it must be.
        reason: &'static str,
    },
    /// The ticket's answer was already taken (by an earlier
    /// [`wait_timeout`](crate::Ticket::wait_timeout) or poll).
    #[error("the ticket's answer was already taken; a ticket yields its answer once")]
    AnswerTaken,
    /// The handler answered this request with its own error.
    #[error("the handler failed: {0}")]
    Handler(E),
}

impl Error<Infallible> {
    /// Converts a handler-free error into an error over any handler error
    /// type. Every variant except [`Error::Handler`] carries over unchanged.
    pub fn widen<E>(self) -> Error<E> {
        match self {
            Error::Overloaded {
                queued,
                queued_weight,
                max_queued,
                max_queued_weight,
            } => Error::Overloaded {
                queued,
                queued_weight,
                max_queued,
                max_queued_weight,
            },
            Error::QueueFull { queued, max_queued } => Error::QueueFull { queued, max_queued },
            Error::TimedOut { waited } => Error::TimedOut { waited },
            Error::Cancelled => Error::Cancelled,
            Error::HandlerPanicked {
                stage,
                batch_size,
                message,
            } => Error::HandlerPanicked {
                stage,
                batch_size,
                message,
            },
            Error::WrongResultCount { expected, got } => Error::WrongResultCount { expected, got },
            Error::ShutDown => Error::ShutDown,
            Error::TooHeavy {
                weight,
                max_batch_weight,
            } => Error::TooHeavy {
                weight,
                max_batch_weight,
            },
            Error::InvalidConfig {
                field,
                value,
                reason,
            } => Error::InvalidConfig {
                field,
                value,
                reason,
            },
            Error::AnswerTaken => Error::AnswerTaken,
            Error::Handler(never) => match never {},
        }
    }
}
