//! [`ComputePool`]: a small persistent fork/join pool for per-token work.
//!
//! A decoder step runs a few hundred matmuls of some tens of microseconds
//! each, so the cost of handing work to threads matters. The pool keeps its
//! threads alive; after a job each one spins for [`PoolConfig::spin_us`]
//! waiting for the next (so back-to-back jobs start within a fraction of a
//! microsecond), then parks on a condition variable (an idle pool costs no
//! CPU). The calling thread takes tasks too, and a job returns as soon as its
//! tasks are done: a parked thread that wakes late finds nothing to do and
//! does not delay the caller.
//!
//! Tasks are claimed one at a time from a shared counter (dynamic balance).
//! A task that calls [`ComputePool::run`] again runs the inner job inline on
//! its own thread; two threads that call `run` at once take turns.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Settings of a [`ComputePool`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolConfig {
    /// Threads, the caller included (`None`: the physical cores hw-detect
    /// reports, else `available_parallelism`). Default `None`.
    pub threads: Option<usize>,
    /// How long an idle thread spins for the next job before it parks, in
    /// microseconds. Default 500: longer than the gaps between the matmuls
    /// of a decoder step, short enough that an idle pool goes quiet at once.
    pub spin_us: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            threads: None,
            spin_us: 500,
        }
    }
}

/// The thread count [`PoolConfig::threads`]`: None` stands for.
pub fn default_threads() -> usize {
    hw_detect::HardwareProfile::detect()
        .ok()
        .map(|p| p.cpu.physical)
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// The job being run.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    /// The job's epoch, task count and next task to claim, packed (see
    /// [`pack`]): one word, so that a claim (a compare-and-swap) can only
    /// succeed for the job it read the count of.
    state: AtomicU64,
    /// The current job (valid while any of its tasks is unclaimed or running).
    job: AtomicPtr<Job<'static>>,
    /// Tasks of the current job finished.
    done: AtomicUsize,
    /// A task of the current job panicked.
    panicked: AtomicBool,
    /// Threads parked (or about to park) on `cv`.
    sleepers: AtomicUsize,
    stop: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    spin: Duration,
}

/// Bits of the task index and of the task count in `state`.
const TASK_BITS: u32 = 22;
/// The most tasks one job takes (`run` splits larger ones).
const MAX_TASKS: usize = (1 << TASK_BITS) - 1;

/// Epochs wrap at 2^20 (a thread would have to sleep through a million jobs
/// to mistake one for another).
const EPOCH_MASK: u64 = (1 << (64 - 2 * TASK_BITS)) - 1;

/// `state` from an epoch (wrapping at 2^20), a task count and a task index.
fn pack(epoch: u64, n: usize, task: usize) -> u64 {
    (epoch << (2 * TASK_BITS)) | ((n as u64) << TASK_BITS) | task as u64
}

/// `(epoch, n, task)` of a `state`.
fn unpack(v: u64) -> (u64, usize, usize) {
    let mask = (1u64 << TASK_BITS) - 1;
    (
        v >> (2 * TASK_BITS),
        ((v >> TASK_BITS) & mask) as usize,
        (v & mask) as usize,
    )
}

thread_local! {
    /// Whether this thread is running a pool task (nested `run` goes inline).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

impl Shared {
    /// Idle state: no job, no threads asleep, not stopping.
    fn new(spin: Duration) -> Shared {
        Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            spin,
        }
    }

    /// Claims and runs tasks of the job of `epoch` until none is left.
    fn work(&self, epoch: u64) {
        let mut v = self.state.load(Ordering::Acquire);
        loop {
            let (e, n, task) = unpack(v);
            if e != epoch || task >= n {
                return;
            }
            match self
                .state
                .compare_exchange_weak(v, v + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: the claim succeeded on an unchanged `state`, so
                    // the job is this epoch's, and it lives until all its
                    // tasks (this one too) are done; the next job's pointer
                    // is stored only after that.
                    let f = unsafe { (*self.job.load(Ordering::Acquire)).f };
                    let was = IN_TASK.with(|c| c.replace(true));
                    if catch_unwind(AssertUnwindSafe(|| f(task))).is_err() {
                        self.panicked.store(true, Ordering::Release);
                    }
                    IN_TASK.with(|c| c.set(was));
                    self.done.fetch_add(1, Ordering::AcqRel);
                    v = self.state.load(Ordering::Acquire);
                }
                Err(now) => v = now,
            }
        }
    }

    /// A worker's loop. `seen` is the epoch when the pool started (not when
    /// this thread first runs: it may start after jobs, or the drop, began).
    fn worker(&self, mut seen: u64) {
        loop {
            let start = Instant::now();
            let mut spins = 0u32;
            let epoch = loop {
                let e = unpack(self.state.load(Ordering::Acquire)).0;
                if e != seen {
                    break e;
                }
                spins = spins.wrapping_add(1);
                std::hint::spin_loop();
                if spins.is_multiple_of(256) && start.elapsed() >= self.spin {
                    let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    self.sleepers.fetch_add(1, Ordering::SeqCst);
                    while unpack(self.state.load(Ordering::SeqCst)).0 == seen
                        && !self.stop.load(Ordering::SeqCst)
                    {
                        g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    self.sleepers.fetch_sub(1, Ordering::SeqCst);
                }
            };
            seen = epoch;
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.work(epoch);
        }
    }
}

/// A persistent pool of compute threads (see the [module docs](crate::blocks)).
pub struct ComputePool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    submit: Mutex<()>,
    threads: usize,
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePool")
            .field("threads", &self.threads)
            .field("spin", &self.shared.spin)
            .finish()
    }
}

impl ComputePool {
    /// Starts `threads - 1` worker threads (the caller is the last one).
    pub fn new(config: &PoolConfig) -> Result<ComputePool> {
        let threads = config.threads.unwrap_or_else(default_threads).max(1);
        let shared = Arc::new(Shared::new(Duration::from_micros(config.spin_us)));
        let mut pool = ComputePool {
            shared,
            workers: Vec::with_capacity(threads - 1),
            submit: Mutex::new(()),
            threads,
        };
        for index in 1..threads {
            let s = Arc::clone(&pool.shared);
            let h = std::thread::Builder::new()
                .name(format!("snug-compute-{index}"))
                .spawn(move || s.worker(0))
                .map_err(|source| Error::PoolSpawn {
                    index,
                    threads,
                    source,
                })?;
            pool.workers.push(h);
        }
        Ok(pool)
    }

    /// A pool of one thread: `run` calls the tasks in order on the caller.
    pub fn single() -> ComputePool {
        ComputePool {
            shared: Arc::new(Shared::new(Duration::ZERO)),
            workers: Vec::new(),
            submit: Mutex::new(()),
            threads: 1,
        }
    }

    /// Threads that run tasks, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0) .. f(n_tasks - 1)` across the pool's threads and returns
    /// when all are done. A panic in a task is raised again here after the
    /// other tasks finish.
    pub fn run<F: Fn(usize) + Sync>(&self, n_tasks: usize, f: F) {
        self.run_dyn(n_tasks, &f)
    }

    fn run_dyn(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 || IN_TASK.with(|c| c.get()) {
            for t in 0..n_tasks {
                f(t);
            }
            return;
        }
        if n_tasks > MAX_TASKS {
            // More than one word holds: run them as several jobs.
            for start in (0..n_tasks).step_by(MAX_TASKS) {
                let len = MAX_TASKS.min(n_tasks - start);
                self.run_dyn(len, &|t| f(start + t));
            }
            return;
        }
        let _turn = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let job = Job { f };
        s.done.store(0, Ordering::Relaxed);
        // SAFETY (lifetime erasure): the pointer is dereferenced only by
        // threads holding a claimed task of this epoch, and this function
        // does not return before all tasks are done.
        s.job.store(
            &job as *const Job<'_> as *mut Job<'static>,
            Ordering::Release,
        );
        let epoch = (unpack(s.state.load(Ordering::Acquire)).0 + 1) & EPOCH_MASK;
        s.state.store(pack(epoch, n_tasks, 0), Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        s.work(epoch);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < n_tasks {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a task of the compute pool panicked");
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::Release);
        let epoch = (unpack(s.state.load(Ordering::Acquire)).0 + 1) & EPOCH_MASK;
        s.state.store(pack(epoch, 0, 0), Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = ComputePool::new(&PoolConfig {
            threads: Some(4),
            spin_us: 50,
        })
        .unwrap();
        for n in [1usize, 2, 3, 7, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, |t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn parked_threads_wake_for_the_next_job() {
        let pool = ComputePool::new(&PoolConfig {
            threads: Some(3),
            spin_us: 0,
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let ids = Mutex::new(std::collections::HashSet::new());
        let sum = AtomicUsize::new(0);
        pool.run(300, |t| {
            sum.fetch_add(t, Ordering::Relaxed);
            ids.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(Duration::from_micros(200));
        });
        assert_eq!(sum.load(Ordering::Relaxed), 299 * 300 / 2);
        // With 300 tasks of 200 us the workers woke and took some.
        assert!(ids.lock().unwrap().len() > 1);
    }

    #[test]
    fn nested_runs_go_inline_and_panics_reach_the_caller() {
        let pool = ComputePool::new(&PoolConfig {
            threads: Some(2),
            spin_us: 10,
        })
        .unwrap();
        let count = AtomicUsize::new(0);
        pool.run(4, |_| {
            pool.run(3, |_| {
                count.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(count.load(Ordering::Relaxed), 12);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, |t| {
                if t == 5 {
                    panic!("task 5");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let after = AtomicUsize::new(0);
        pool.run(16, |_| {
            after.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(after.load(Ordering::Relaxed), 16);
    }
}
