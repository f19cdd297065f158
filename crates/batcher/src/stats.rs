//! Statistics and progress events.

use std::time::Duration;

use serde::Serialize;

use crate::config::Priority;

/// A snapshot of a batcher's counters, from [`Batcher::stats`](crate::Batcher::stats).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct BatcherStats {
    /// Requests accepted by `submit`.
    pub submitted: u64,
    /// Requests refused with [`Error::Overloaded`](crate::Error::Overloaded).
    pub rejected: u64,
    /// Requests answered [`Error::TimedOut`](crate::Error::TimedOut) (deadline passed while queued).
    pub timed_out: u64,
    /// Requests removed while queued (cancelled or ticket dropped).
    pub cancelled: u64,
    /// Requests answered [`Error::ShutDown`](crate::Error::ShutDown) at shutdown.
    pub failed_on_shutdown: u64,
    /// Batches cut from the queue.
    pub batches: u64,
    /// Requests taken into batches.
    pub items_batched: u64,
    /// Batches whose handler returned (successfully or not).
    pub batches_finished: u64,
    /// Batches whose handler or prepare stage panicked.
    pub handler_panics: u64,
    /// Batches whose handler returned the wrong number of results.
    pub wrong_result_counts: u64,
    /// Requests the handler answered with its own error.
    pub handler_errors: u64,
    /// Mean requests per batch (0 before the first batch).
    pub mean_batch_size: f64,
    /// Batch sizes: `(upper bound, count)` for the ranges 1, 2, 3–4, 5–8, …
    /// (powers of two); only non-empty ranges are listed.
    pub batch_size_histogram: Vec<(usize, u64)>,
    /// Median time from submit to being taken into a batch, over the last
    /// `stats_window` requests.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub queue_time_p50: Duration,
    /// 99th percentile of the same.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub queue_time_p99: Duration,
    /// Real weight over padded weight (heaviest × count) summed over all
    /// batches: 1.0 means no padding waste. 1.0 before the first batch.
    pub padding_efficiency: f64,
    /// Requests queued now.
    pub queued: usize,
    /// Their total weight.
    pub queued_weight: u64,
    /// Batches running (or prepared and waiting for a worker) now.
    pub in_flight: u64,
    /// The batch weight limit now.
    pub max_batch_weight: u64,
}

/// How a batch ended, in [`Event::Finished`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchOutcome {
    /// The handler returned one result per request (each may still be an error).
    Completed,
    /// The handler or the prepare stage panicked.
    Panicked,
    /// The handler returned this many results instead of one per request.
    WrongResultCount {
        /// Results returned.
        got: usize,
    },
}

/// Progress events, delivered to callbacks registered with
/// [`Batcher::on_event`](crate::Batcher::on_event).
///
/// Callbacks run on the thread that caused the event (the submitting thread
/// for `Queued`, a worker for the others), outside the batcher's lock; a
/// panicking callback is logged and ignored. Events from one thread arrive
/// in order; across threads they may interleave (a request's `Queued` can
/// arrive after the `Batched` that took it).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A request was accepted.
    Queued {
        /// The request (see [`Ticket::id`](crate::Ticket::id)).
        request: u64,
        /// Its priority.
        priority: Priority,
        /// Its weight.
        weight: u64,
        /// Requests queued after it was added.
        queued: usize,
    },
    /// A batch was cut from the queue.
    Batched {
        /// The batch's number.
        batch: u64,
        /// The requests in it, in order.
        requests: Vec<u64>,
        /// Sum of their weights.
        weight: u64,
        /// Heaviest weight × count.
        padded_weight: u64,
        /// The longest any of them waited.
        max_queue_time: Duration,
    },
    /// The handler was called on a batch.
    Started {
        /// The batch's number.
        batch: u64,
        /// Requests in it.
        size: usize,
    },
    /// The handler returned (or panicked) and every request in the batch
    /// has been answered.
    Finished {
        /// The batch's number.
        batch: u64,
        /// Requests in it.
        size: usize,
        /// Mean time its requests waited in the queue.
        mean_queue_time: Duration,
        /// Time spent in the handler.
        run_time: Duration,
        /// How it ended.
        outcome: BatchOutcome,
    },
    /// A queued request passed its deadline and was answered `TimedOut`.
    Expired {
        /// The request.
        request: u64,
        /// How long it had waited.
        waited: Duration,
    },
    /// A queued request was cancelled or its ticket dropped.
    Cancelled {
        /// The request.
        request: u64,
    },
}
