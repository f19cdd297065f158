//! Rayon pools whose threads pin themselves as they start.

use std::sync::Arc;
use std::time::Duration;

use rayon::{ThreadPool, ThreadPoolBuilder};
use report::Slots;

use crate::error::{Error, Result};
use crate::pin::PinOutcome;
use crate::strategy::ThreadPlacement;

/// A rayon pool built under a [`ThreadPlacement`], with what each thread's pinning
/// did.
///
/// Run work on it with [`ThreadPool::install`] (candle's CPU kernels and
/// `par_iter` then use its threads) or build the global pool instead with
/// [`ThreadPlacement::build_global`].
#[derive(Debug)]
pub struct PinnedPool {
    pool: ThreadPool,
    slots: Arc<Slots>,
}

impl PinnedPool {
    /// The pool.
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// The pool, without the report.
    pub fn into_pool(self) -> ThreadPool {
        self.pool
    }

    /// What each thread's pinning did, by thread index;
    /// [`PinOutcome::Pending`] for a thread that has not started yet.
    pub fn outcomes(&self) -> Vec<PinOutcome> {
        self.slots.snapshot()
    }

    /// Whether every thread is pinned.
    pub fn all_pinned(&self) -> bool {
        self.outcomes().iter().all(PinOutcome::is_pinned)
    }
}

impl ThreadPlacement {
    /// Builds a pool of [`threads`](ThreadPlacement::threads) threads named
    /// `affinity-<i>`, each pinned as the plan says, and waits (up to
    /// `start_timeout_ms`) for every thread to report.
    ///
    /// A thread the OS will not pin runs unpinned and reports
    /// [`PinOutcome::Unsupported`]; that is not an error.
    pub fn build_pool(&self) -> Result<PinnedPool> {
        self.pin_pool(ThreadPoolBuilder::new().thread_name(|i| format!("affinity-{i}")))
    }

    /// Like [`build_pool`](ThreadPlacement::build_pool) from the caller's builder
    /// (thread names, stack size, …). The plan sets `num_threads` and
    /// `start_handler`, replacing any the builder had.
    pub fn pin_pool(&self, builder: ThreadPoolBuilder) -> Result<PinnedPool> {
        let (builder, slots) = self.prepare(builder);
        let pool = builder.build().map_err(|source| Error::Pool {
            threads: self.threads,
            source,
        })?;
        slots.wait_all(Duration::from_millis(self.start_timeout_ms));
        Ok(PinnedPool { pool, slots })
    }

    /// Builds rayon's **global** pool under this plan (what candle uses
    /// unless told otherwise) and returns each thread's outcome. Call it
    /// before anything else uses rayon: once the global pool exists it
    /// cannot be rebuilt ([`Error::Pool`]).
    pub fn build_global(&self) -> Result<Vec<PinOutcome>> {
        let (builder, slots) =
            self.prepare(ThreadPoolBuilder::new().thread_name(|i| format!("affinity-{i}")));
        builder.build_global().map_err(|source| Error::Pool {
            threads: self.threads,
            source,
        })?;
        slots.wait_all(Duration::from_millis(self.start_timeout_ms));
        Ok(slots.snapshot())
    }

    fn prepare(&self, builder: ThreadPoolBuilder) -> (ThreadPoolBuilder, Arc<Slots>) {
        let slots = Arc::new(Slots::new(self.threads));
        let plan = self.clone();
        let report = Arc::clone(&slots);
        let builder = builder
            .num_threads(self.threads)
            .start_handler(move |index| {
                let outcome = plan.pin_current_thread(index);
                report.set(index, outcome);
            });
        (builder, slots)
    }
}

mod report {
    //! Per-thread outcome slots and a wait for all of them.

    use std::sync::{Condvar, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use crate::pin::PinOutcome;

    #[derive(Debug)]
    pub(super) struct Slots {
        outcomes: Mutex<Vec<Option<PinOutcome>>>,
        filled: Condvar,
    }

    impl Slots {
        pub(super) fn new(n: usize) -> Self {
            Slots {
                outcomes: Mutex::new(vec![None; n]),
                filled: Condvar::new(),
            }
        }

        pub(super) fn set(&self, index: usize, outcome: PinOutcome) {
            let mut slots = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = slots.get_mut(index) {
                *slot = Some(outcome);
            }
            self.filled.notify_all();
        }

        /// Waits until every slot is filled or `timeout` passes.
        pub(super) fn wait_all(&self, timeout: Duration) {
            let deadline = Instant::now() + timeout;
            let mut slots = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
            while slots.iter().any(Option::is_none) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let started = slots.iter().filter(|s| s.is_some()).count();
                    tracing::warn!(
                        started,
                        threads = slots.len(),
                        "pool threads had not all started; their pinning is reported as pending"
                    );
                    return;
                }
                slots = self
                    .filled
                    .wait_timeout(slots, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }

        pub(super) fn snapshot(&self) -> Vec<PinOutcome> {
            self.outcomes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|s| s.clone().unwrap_or(PinOutcome::Pending))
                .collect()
        }
    }
}
