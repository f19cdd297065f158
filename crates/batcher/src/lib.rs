//! Dynamic batching by size, weight and deadline, with priorities,
//! cancellation and backpressure.
//!
//! A [`Batcher`] collects single requests into batches for a handler
//! `FnMut(Vec<I>) -> Vec<Result<O, E>>` (one result per input, in order)
//! running on worker threads. Callers [`submit`](Batcher::submit) one
//! request at a time and get a [`Ticket`] they can [`wait`](Ticket::wait)
//! on, wait on with a timeout, or `.await` (no async runtime needed).
//!
//! A batch is cut when it reaches `max_batch_size` requests, when the next
//! request would take it past `max_batch_weight` (summed or padded, see
//! [`WeightMode`]), or when its oldest request has waited `max_delay`,
//! whichever comes first. Requests may be grouped into similarity buckets
//! (e.g. sequence length rounded to 32), carry a [`Priority`] and a
//! deadline, and be cancelled while queued. Every accepted request gets
//! exactly one answer: its result, [`Error::TimedOut`], [`Error::Cancelled`],
//! [`Error::HandlerPanicked`], [`Error::WrongResultCount`] or
//! [`Error::ShutDown`].
//!
//! ```
//! use std::time::Duration;
//! use batcher::{BatcherBuilder, BatcherConfig, Submit, Priority};
//!
//! let config = BatcherConfig {
//!     max_batch_size: 8,
//!     max_delay: Duration::from_millis(2),
//!     ..BatcherConfig::default()
//! };
//! // Requests are token sequences; weight = tokens, bucket = length / 32.
//! let batcher = BatcherBuilder::new(config)
//!     .weigher(|s: &Vec<u32>| s.len() as u64)
//!     .bucket_by(|s: &Vec<u32>| (s.len() as u64).div_ceil(32))
//!     .build(|_worker| {
//!         |batch: Vec<Vec<u32>>| -> Vec<Result<u64, std::convert::Infallible>> {
//!             batch.iter().map(|s| Ok(s.iter().map(|&t| u64::from(t)).sum())).collect()
//!         }
//!     })
//!     .unwrap();
//!
//! let a = batcher.submit(vec![1, 2, 3]).unwrap();
//! let b = batcher
//!     .submit_with(vec![10, 20], Submit::priority(Priority::HIGH).timeout(Duration::from_secs(5)))
//!     .unwrap();
//! assert_eq!(a.wait().unwrap(), 6);
//! assert_eq!(b.wait().unwrap(), 30);
//! batcher.shutdown();
//! assert_eq!(batcher.stats().submitted, 2);
//! ```
//!
//! See `docs/batcher.md` in the repository for the model of operation and
//! measured figures. The crate has no feature flags.

mod batcher;
mod config;
pub mod continuous;
mod error;
mod queue;
mod stats;
mod ticket;

pub use crate::batcher::{Batcher, BatcherBuilder, Weigher};
pub use crate::config::{BatcherConfig, Priority, ShutdownMode, Submit, WeightMode};
pub use crate::continuous::{
    Admission, ContinuousBatcher, ContinuousConfig, ContinuousStats, Exit, JoinOptions, Progress,
    Scheduled, SequenceHandle, StepHandler,
};
pub use crate::error::Error;
pub use crate::stats::{BatchOutcome, BatcherStats, Event};
pub use crate::ticket::Ticket;
