//! Bounded retries with exponential backoff and jitter, within the request's deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// How transient errors are retried on one tier before the router moves to the next.
///
/// The delay before retry `k` (1-based) is `initial_backoff * factor^(k-1)`, capped at
/// `max_backoff`, plus (with `jitter`) a uniformly random extra of up to 100 % of it. A retry
/// whose delay would reach past the deadline is not made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryConfig {
    /// Retries after the first attempt. Default 2 (three attempts in all); 0 turns retries off.
    pub max_retries: usize,
    /// Delay before the first retry, in milliseconds in serde. Default 50 ms.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub initial_backoff: Duration,
    /// Largest delay between attempts, before jitter, in milliseconds in serde. Default 1 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub max_backoff: Duration,
    /// Growth of the delay per retry. Default 2.
    pub factor: f32,
    /// Add random jitter so that clients do not retry in step. Default `true`.
    pub jitter: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            factor: 2.0,
            jitter: true,
        }
    }
}

impl RetryConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(Error::invalid(
                "retry.factor",
                self.factor,
                "a finite number of at least 1 (default 2)",
            ));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(Error::invalid(
                "retry.max_backoff",
                format!("{:?}", self.max_backoff),
                "at least initial_backoff (defaults 1 s and 50 ms)",
            ));
        }
        Ok(())
    }

    /// The delays before each retry, as backon's exponential backoff yields them.
    pub(crate) fn delays(&self) -> impl Iterator<Item = Duration> {
        let mut b = ExponentialBuilder::new()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(self.factor)
            .with_max_times(self.max_retries);
        if self.jitter {
            b = b.with_jitter().with_jitter_seed(jitter_seed());
        }
        b.build()
    }
}

/// A different seed per retry sequence (backon without its `std` feature would otherwise
/// jitter every sequence the same way).
fn jitter_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    n ^ t ^ (Instant::now().elapsed().as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_bounded_in_count() {
        let c = RetryConfig {
            max_retries: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            factor: 2.0,
            jitter: false,
        };
        // backon computes in f32 seconds: compare to the microsecond, rounded to milliseconds.
        let d: Vec<_> = c
            .delays()
            .map(|d| (d.as_micros() as f64 / 1000.0).round() as u64)
            .collect();
        assert_eq!(d, vec![10, 20, 40, 40, 40]);
        let j = RetryConfig { jitter: true, ..c };
        for (k, d) in j.delays().enumerate() {
            let base = [10u128, 20, 40, 40, 40][k];
            let ms = d.as_micros();
            assert!(
                ms + 10 >= base * 1000 && ms <= base * 2000 + 10,
                "retry {k}: {ms} us"
            );
        }
        assert_eq!(
            RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            }
            .delays()
            .count(),
            0
        );
    }
}
