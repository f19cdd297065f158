//! Configuration: the total budget, the named pools and the trimming policy.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether a buffer is zeroed when its lease ends.
///
/// With [`ZeroOnRelease::On`] every byte a lease could have written is set to
/// zero before the buffer goes back to the cache, so data never leaks from one
/// user of a buffer to the next, and every lease starts out all-zero (fresh
/// buffers are zeroed by the allocator). With [`ZeroOnRelease::Off`] (the
/// default) a reused buffer holds whatever its previous user left in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroOnRelease {
    /// Reused buffers keep their previous contents (fastest).
    #[default]
    Off,
    /// Buffers are zeroed when their lease ends.
    On,
}

/// One named pool within the total budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NamedPoolConfig {
    /// Name used to look the pool up (`BufferPool::pool`). Default `"default"`.
    pub name: String,
    /// Bytes this pool may hold, leased and cached together. `None` (the
    /// default) means the whole total budget. Must not exceed the total.
    pub budget_bytes: Option<usize>,
    /// Zeroing of buffers when their lease ends. Default [`ZeroOnRelease::Off`].
    pub zero_on_release: ZeroOnRelease,
}

impl Default for NamedPoolConfig {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            budget_bytes: None,
            zero_on_release: ZeroOnRelease::Off,
        }
    }
}

impl NamedPoolConfig {
    /// A pool called `name` with `budget_bytes` and no zeroing.
    pub fn new(name: impl Into<String>, budget_bytes: usize) -> Self {
        Self {
            name: name.into(),
            budget_bytes: Some(budget_bytes),
            zero_on_release: ZeroOnRelease::Off,
        }
    }

    /// The same pool with the given zeroing policy.
    pub fn zero_on_release(mut self, zero: ZeroOnRelease) -> Self {
        self.zero_on_release = zero;
        self
    }
}

/// Configuration of a [`BufferPool`](crate::BufferPool).
///
/// ```
/// let cfg: buffer_pool::BufferPoolConfig =
///     serde_json::from_str(r#"{"total_budget_bytes": 1048576, "idle_ttl": 5000}"#).unwrap();
/// assert_eq!(cfg.total_budget_bytes, 1 << 20);
/// assert_eq!(cfg.idle_ttl, std::time::Duration::from_secs(5));
/// assert!(cfg.trim_on_release);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BufferPoolConfig {
    /// Hard limit on bytes held by all pools together, leased plus cached.
    /// Default 256 MiB.
    pub total_budget_bytes: usize,
    /// The named pools. Empty (the default) means one pool called `"default"`
    /// owning the whole total budget. The first pool is the one that
    /// `BufferPool::try_acquire` and friends use.
    pub pools: Vec<NamedPoolConfig>,
    /// Cached buffers idle for longer than this are released to the operating
    /// system. Default 30 s. Serialized as whole milliseconds (a number).
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub idle_ttl: Duration,
    /// Run the idle trim opportunistically when a lease is released, at most
    /// once every `idle_ttl / 4`. Default `true`. A program that may go quiet
    /// for long periods also calls `trim_idle()` or starts
    /// `BufferPool::spawn_trimmer`, because a pool nobody touches trims nothing.
    pub trim_on_release: bool,
}

impl Default for BufferPoolConfig {
    fn default() -> Self {
        Self {
            total_budget_bytes: 256 << 20,
            pools: Vec::new(),
            idle_ttl: Duration::from_secs(30),
            trim_on_release: true,
        }
    }
}

impl BufferPoolConfig {
    /// A configuration with the given total budget and otherwise the defaults.
    pub fn with_budget(total_budget_bytes: usize) -> Self {
        Self {
            total_budget_bytes,
            ..Self::default()
        }
    }

    /// Adds a named pool.
    pub fn pool(mut self, pool: NamedPoolConfig) -> Self {
        self.pools.push(pool);
        self
    }
}
