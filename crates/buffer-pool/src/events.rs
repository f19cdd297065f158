//! Events emitted by a pool to registered listeners.

use std::sync::Arc;

/// Why a buffer went back to the operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FreeReason {
    /// Evicted from the cache to make room for a fresh allocation of another
    /// size class under the budget.
    Evicted,
    /// Idle for longer than `idle_ttl`.
    Idle,
    /// Released by `shrink_to`.
    Shrink,
    /// The tail of a lease given back by `Lease::shrink`.
    LeaseShrunk,
    /// A fresh allocation undone because another buffer of the same
    /// `acquire_all` could not be allocated.
    RolledBack,
}

/// What triggered a trim pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrimReason {
    /// Buffers idle for longer than `idle_ttl`.
    Idle,
    /// `shrink_to(fraction)`.
    Shrink,
}

/// An event, passed to listeners registered with `BufferPool::on_event`.
///
/// Listeners run on the thread that caused the event, after the pool's lock
/// has been released, so they may call back into the pool; they should be
/// quick. Cache hits and plain releases emit nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A fresh buffer was allocated from the operating system (a cache miss).
    Alloc {
        /// Pool that allocated.
        pool: Arc<str>,
        /// Capacity of the buffer.
        bytes: usize,
    },
    /// A buffer (or part of one) was released to the operating system.
    Free {
        /// Pool that held it.
        pool: Arc<str>,
        /// Bytes released.
        bytes: usize,
        /// Why.
        reason: FreeReason,
    },
    /// A trim pass released buffers of one pool (after their `Free` events).
    Trim {
        /// Pool trimmed.
        pool: Arc<str>,
        /// Buffers released.
        buffers: usize,
        /// Bytes released.
        bytes: usize,
        /// What triggered it.
        reason: TrimReason,
    },
}

/// A registered listener.
pub(crate) type Listener = Arc<dyn Fn(&PoolEvent) + Send + Sync>;
