//! Reusable buffers under a hard byte budget, with RAII leases and backpressure.
//!
//! A [`BufferPool`] hands out [`Lease`]s: byte buffers (viewable as `f32`)
//! that go back to the pool when dropped, also while a panic unwinds. Freed
//! buffers are kept in a cache and handed out again to the next request of
//! the same [size class](size_class), which is much cheaper than asking the
//! system allocator for fresh zeroed memory each time.
//!
//! # Model of operation
//!
//! * **One hard budget, several named pools.** `total_budget_bytes` bounds
//!   everything the pool holds; each named pool (e.g. `activations`,
//!   `scratch`) has its own budget within the total. Both count leased *and*
//!   cached bytes: `in_use + cached <= budget` at all times.
//! * **Size classes.** Requests are rounded up to 64 B, then powers of two up
//!   to 1 MiB, then 1.25× steps (see [`size_class`]); the bytes lost to
//!   rounding are reported in [`BufferPoolStats`].
//! * **Hits, misses, eviction.** A request takes a cached buffer of its class
//!   when there is one (hit); otherwise it allocates a fresh zeroed buffer
//!   (miss), first evicting cached buffers of other classes, oldest first,
//!   when the allocation would exceed a budget. Cached bytes are therefore
//!   always available to a request: only leased bytes make it wait.
//! * **Backpressure.** [`NamedPool::try_acquire`] answers at once;
//!   [`NamedPool::acquire_timeout`] waits for releases and then fails with
//!   [`Error::Exhausted`]; [`NamedPool::acquire_all`] takes a job's whole set
//!   of buffers or none.
//! * **Giving memory back.** Cached buffers idle for `idle_ttl` (30 s by
//!   default) are released to the OS by [`BufferPool::trim_idle`], which runs
//!   opportunistically when a lease is released (at most every `idle_ttl / 4`)
//!   and can also run on a thread ([`BufferPool::spawn_trimmer`]);
//!   [`BufferPool::shrink_to`] releases cached buffers down to a fraction of
//!   the budget (the emergency path).
//! * **Hygiene.** [`ZeroOnRelease::On`] zeroes a buffer when its lease ends.
//! * **Events.** [`BufferPool::on_event`] registers a callback for
//!   allocations, releases to the OS and trims.
//!
//! ```
//! use std::time::Duration;
//! use buffer_pool::{BufferPool, BufferPoolConfig, Error, NamedPoolConfig, ZeroOnRelease};
//!
//! let pool = BufferPool::new(
//!     BufferPoolConfig::with_budget(8 << 20)
//!         .pool(NamedPoolConfig::new("activations", 6 << 20))
//!         .pool(NamedPoolConfig::new("scratch", 2 << 20).zero_on_release(ZeroOnRelease::On)),
//! )?;
//! let scratch = pool.pool("scratch")?;
//!
//! let mut lease = scratch.try_acquire_f32(1000)?; // 4000 bytes, rounded to 4 KiB
//! lease.as_mut_slice_f32()[0] = 1.5;
//! assert_eq!(lease.as_slice_f32().len(), 1000);
//! drop(lease); // back to the cache, zeroed
//!
//! let again = scratch.try_acquire(4000)?; // a hit: same buffer, no allocation
//! assert_eq!(again[0..4], [0, 0, 0, 0]);
//! assert_eq!(scratch.stats().hits, 1);
//!
//! // The budget is hard: 2 MiB are left in `scratch`, minus the 4 KiB lease.
//! let err = scratch.acquire_timeout(2 << 20, Duration::from_millis(10)).unwrap_err();
//! assert!(matches!(err, Error::Exhausted { .. }));
//! # Ok::<(), buffer_pool::Error>(())
//! ```
//!
//! # Feature flags
//!
//! None. The crate depends on `std`, `parking_lot`, `thiserror`, `tracing`
//! and `serde` only.

mod class;
mod config;
mod error;
mod events;
mod lease;
mod pool;
mod raw;
mod stats;

pub use class::{size_class, LARGE_GRANULE, MIN_CLASS, POW2_LIMIT};
pub use config::{BufferPoolConfig, NamedPoolConfig, ZeroOnRelease};
pub use error::{Error, Result};
pub use events::{FreeReason, PoolEvent, TrimReason};
pub use lease::Lease;
pub use pool::{BufferPool, NamedPool, Trimmer};
pub use stats::{BufferPoolStats, PoolStats, TrimReport};
