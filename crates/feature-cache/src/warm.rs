//! Filling the cache ahead of demand on a background thread.

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::FeatureCache;

/// Why warming stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WarmStop {
    /// Every key was visited.
    Completed,
    /// The next entry would not fit without evicting something.
    Full,
    /// [`WarmHandle::cancel`] was called.
    Cancelled,
}

/// What a warming run did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmReport {
    /// Entries loaded and inserted.
    pub loaded: u64,
    /// Keys skipped because they were already cached or being loaded.
    pub skipped: u64,
    /// Keys whose loader failed (nothing cached for them).
    pub failed: u64,
    /// Why it stopped.
    pub stopped: WarmStop,
}

/// A running warm-up; dropping it lets the thread run on to its end.
#[derive(Debug)]
pub struct WarmHandle {
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<WarmReport>>,
}

impl WarmHandle {
    /// Asks the warming thread to stop after the entry it is loading.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Whether the warming thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the warming thread and returns its report (`None` if the
    /// loader panicked).
    pub fn join(mut self) -> Option<WarmReport> {
        self.thread.take()?.join().ok()
    }
}

impl<K, V> FeatureCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Loads `keys` into the cache on a background thread, in order.
    ///
    /// Warming never evicts: it stops as soon as the next entry would not fit
    /// (or at [`WarmHandle::cancel`]). It skips keys already cached or being
    /// loaded by a caller, runs the loader outside every lock and yields
    /// between entries, so user calls never wait behind it.
    pub fn warm<I, F, E>(&self, keys: I, loader: F) -> WarmHandle
    where
        I: IntoIterator<Item = K>,
        I::IntoIter: Send + 'static,
        F: Fn(&K) -> Result<V, E> + Send + 'static,
    {
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let cache = self.clone();
        let keys = keys.into_iter();
        let thread = std::thread::Builder::new()
            .name("feature-cache-warm".into())
            .spawn(move || {
                let mut report = WarmReport {
                    loaded: 0,
                    skipped: 0,
                    failed: 0,
                    stopped: WarmStop::Completed,
                };
                for key in keys {
                    if stop.load(Ordering::Acquire) {
                        report.stopped = WarmStop::Cancelled;
                        break;
                    }
                    if cache.weight() >= cache.capacity() {
                        report.stopped = WarmStop::Full;
                        break;
                    }
                    if cache.contains(&key) || cache.is_loading(&key) {
                        report.skipped += 1;
                        continue;
                    }
                    let start = Instant::now();
                    let Ok(value) = loader(&key) else {
                        report.failed += 1;
                        continue;
                    };
                    if stop.load(Ordering::Acquire) {
                        report.stopped = WarmStop::Cancelled;
                        break;
                    }
                    let took: Duration = start.elapsed();
                    if cache.insert_if_room(key.clone(), value, took) {
                        report.loaded += 1;
                    } else if cache.contains(&key) {
                        report.skipped += 1;
                    } else {
                        report.stopped = WarmStop::Full;
                        break;
                    }
                    std::thread::yield_now();
                }
                tracing::debug!(?report, "warming finished");
                report
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the warming thread; nothing warmed");
                None
            }
        };
        WarmHandle { cancel, thread }
    }
}
