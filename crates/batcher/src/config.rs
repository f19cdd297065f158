//! Configuration, priorities and per-request options.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;

/// How the weight of a batch is counted against
/// [`BatcherConfig::max_batch_weight`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WeightMode {
    /// The sum of the items' weights (e.g. tokens actually present).
    #[default]
    Sum,
    /// The heaviest item's weight times the number of items: what a padded
    /// encoder pays, since every row is padded to the longest.
    Padded,
}

/// What [`Batcher::shutdown`](crate::Batcher::shutdown) does with requests
/// that are still queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ShutdownMode {
    /// Run everything queued (ignoring `max_delay`; deadlines still apply),
    /// then stop.
    #[default]
    Drain,
    /// Answer everything queued with [`Error::ShutDown`] at once; batches
    /// already taken still finish.
    Fail,
}

/// Limits and policies of a [`Batcher`](crate::Batcher).
///
/// Every field has a documented default; a config read from JSON or TOML may
/// name only the fields it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatcherConfig {
    /// A batch is cut once it holds this many requests. Default 32.
    pub max_batch_size: usize,
    /// A batch is cut before its weight (see `weight_mode`) would pass this.
    /// A single request heavier than this is refused at submit with
    /// [`Error::TooHeavy`]. Can be lowered at run time with
    /// [`Batcher::set_max_batch_weight`](crate::Batcher::set_max_batch_weight).
    /// Default `u64::MAX` (no weight limit).
    pub max_batch_weight: u64,
    /// How a batch's weight is counted. Default [`WeightMode::Sum`].
    pub weight_mode: WeightMode,
    /// A batch is cut once its oldest request has waited this long, even if
    /// it is not full — but only while another batch is in flight: when no
    /// batch is running (nor cut and waiting for a worker), a request is run
    /// at once, so a lone caller never waits for company (see
    /// `wait_when_idle`). Zero means an idle worker always takes whatever is
    /// queued at once. Default 5 ms.
    pub max_delay: Duration,
    /// Wait `max_delay` for a fuller batch even when no batch is in flight.
    /// Off by default: an idle model that waits only adds latency, and while
    /// a batch runs the queue fills on its own. Turn it on where a handler's
    /// fixed cost per batch is much larger than its cost per request.
    /// Default `false`.
    pub wait_when_idle: bool,
    /// At most this many requests wait in the queue; beyond it `submit`
    /// fails with [`Error::Overloaded`]. Default 1024.
    pub max_queued: usize,
    /// At most this much total weight waits in the queue. Default
    /// `u64::MAX` (no limit).
    pub max_queued_weight: u64,
    /// Number of worker threads, i.e. batches that may run at the same time.
    /// Each worker has its own handler (see
    /// [`BatcherBuilder::build`](crate::BatcherBuilder::build)). Default 1.
    pub max_concurrent_batches: usize,
    /// Every full `priority_aging` a request has waited raises its effective
    /// priority by one level, so low priority cannot starve forever.
    /// Zero disables aging. [`Priority::WARMUP`] never ages. Default 100 ms.
    pub priority_aging: Duration,
    /// What shutdown (and dropping the batcher) does with queued requests.
    /// Default [`ShutdownMode::Drain`].
    pub on_shutdown: ShutdownMode,
    /// How many recent queue times are kept for the p50 / p99 in
    /// [`BatcherStats`](crate::BatcherStats). Default 4096.
    pub stats_window: usize,
    /// Prefix of the worker threads' names. Default `"batcher"`.
    pub thread_name: String,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_batch_weight: u64::MAX,
            weight_mode: WeightMode::Sum,
            max_delay: Duration::from_millis(5),
            wait_when_idle: false,
            max_queued: 1024,
            max_queued_weight: u64::MAX,
            max_concurrent_batches: 1,
            priority_aging: Duration::from_millis(100),
            on_shutdown: ShutdownMode::Drain,
            stats_window: 4096,
            thread_name: "batcher".to_string(),
        }
    }
}

impl BatcherConfig {
    /// Checks that every limit is usable.
    pub fn validate(&self) -> Result<(), Error> {
        let positive = |field: &'static str, v: u64| {
            if v == 0 {
                Err(Error::InvalidConfig {
                    field,
                    value: v.to_string(),
                    reason: "must be at least 1",
                })
            } else {
                Ok(())
            }
        };
        positive("max_batch_size", self.max_batch_size as u64)?;
        positive("max_batch_weight", self.max_batch_weight)?;
        positive("max_queued", self.max_queued as u64)?;
        positive("max_queued_weight", self.max_queued_weight)?;
        positive("max_concurrent_batches", self.max_concurrent_batches as u64)?;
        if self.max_concurrent_batches > 1024 {
            return Err(Error::InvalidConfig {
                field: "max_concurrent_batches",
                value: self.max_concurrent_batches.to_string(),
                reason: "must be at most 1024 (one thread each)",
            });
        }
        Ok(())
    }
}

/// A request's priority level: higher runs first, FIFO within a level.
///
/// Level 0 ([`Priority::WARMUP`]) is special: such requests never share a
/// batch with other levels, never age, and are only batched when no request
/// of a higher level is queued, so warm-up work never delays user requests
/// (a warm-up batch that is already running is not interrupted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Priority(pub u8);

impl Priority {
    /// Background warm-up work; see the type's docs.
    pub const WARMUP: Priority = Priority(0);
    /// Low priority user work.
    pub const LOW: Priority = Priority(1);
    /// The default.
    pub const NORMAL: Priority = Priority(2);
    /// Interactive work.
    pub const HIGH: Priority = Priority(3);

    /// Whether this is the warm-up level.
    pub fn is_warmup(self) -> bool {
        self.0 == 0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::NORMAL
    }
}

/// Per-request options for [`Batcher::submit_with`](crate::Batcher::submit_with).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Submit {
    /// Priority level. Default [`Priority::NORMAL`].
    pub priority: Priority,
    /// If the request is still queued at this instant it is answered
    /// [`Error::TimedOut`] and never runs. Default none.
    pub deadline: Option<Instant>,
}

impl Submit {
    /// Options with the given priority and no deadline.
    pub fn priority(priority: Priority) -> Self {
        Self {
            priority,
            deadline: None,
        }
    }

    /// Sets the deadline.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the deadline to `timeout` from now.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.deadline(Instant::now() + timeout)
    }
}
