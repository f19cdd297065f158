//! [`Batcher`]: the threads, the submit path and shutdown.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::config::{BatcherConfig, ShutdownMode, Submit};
use crate::queue::{Cut, Queue};
use crate::stats::{BatchOutcome, BatcherStats, Event};
use crate::ticket::{Canceller, Slot, Ticket};
use crate::Error;

/// Gives each request its weight (e.g. its number of tokens), counted
/// against [`BatcherConfig::max_batch_weight`] and
/// [`BatcherConfig::max_queued_weight`].
///
/// Any `Fn(&I) -> u64 + Send + Sync` is a weigher.
pub trait Weigher<I>: Send + Sync {
    /// The weight of `item`.
    fn weigh(&self, item: &I) -> u64;
}

impl<I, F: Fn(&I) -> u64 + Send + Sync> Weigher<I> for F {
    fn weigh(&self, item: &I) -> u64 {
        self(item)
    }
}

type Listener = Arc<dyn Fn(&Event) + Send + Sync>;
type BucketFn<I> = Box<dyn Fn(&I) -> u64 + Send + Sync>;

/// Post-run counters, updated by workers outside the queue lock.
#[derive(Default)]
struct RunCounters {
    finished: AtomicU64,
    panics: AtomicU64,
    wrong_counts: AtomicU64,
    handler_errors: AtomicU64,
    in_flight: AtomicU64,
}

/// State shared by the batcher, its tickets and its threads.
struct Shared<I, O, E> {
    cfg: BatcherConfig,
    queue: Mutex<Queue<I, O, E>>,
    /// Batch formers (workers, or the prepare thread) wait here.
    work: Condvar,
    /// `submit_timeout` waits here for room.
    room: Condvar,
    /// The deadline thread waits here.
    reaper: Condvar,
    weigher: Box<dyn Weigher<I>>,
    bucket_of: Option<BucketFn<I>>,
    listeners: RwLock<Vec<Listener>>,
    has_listeners: AtomicBool,
    run: RunCounters,
}

impl<I, O, E> Shared<I, O, E> {
    fn emit(&self, make: impl FnOnce() -> Event) {
        if !self.has_listeners.load(Ordering::Acquire) {
            return;
        }
        let event = make();
        for l in self.listeners.read().iter() {
            if catch_unwind(AssertUnwindSafe(|| l(&event))).is_err() {
                tracing::warn!("a batcher event listener panicked; ignored");
            }
        }
    }

    /// One batch left flight. When it was the last one, batch formers that
    /// wait for `max_delay` are woken: with nothing running, what is queued
    /// runs at once (unless `wait_when_idle`).
    fn batch_done(&self) {
        let was = self.run.in_flight.fetch_sub(1, Ordering::AcqRel);
        if was == 1 && !self.cfg.wait_when_idle {
            let _q = self.queue.lock();
            self.work.notify_all();
        }
    }

    fn answer_expired(&self, expired: &mut Vec<Arc<Slot<O, E>>>) {
        let now = Instant::now();
        for s in expired.drain(..) {
            let waited = now.saturating_duration_since(s.enqueued);
            tracing::debug!(request = s.id, ?waited, "request expired while queued");
            s.answer(Err(Error::TimedOut { waited }));
            self.emit(|| Event::Expired {
                request: s.id,
                waited,
            });
        }
        self.room.notify_all();
    }

    /// Blocks until a batch is ready and cuts it; `None` once the batcher is
    /// closed and nothing is left queued.
    fn next_cut(&self) -> Option<Cut<I, O, E>> {
        let mut expired = Vec::new();
        let mut q = self.queue.lock();
        loop {
            let now = Instant::now();
            // Read under the queue lock: a worker that brings the count to
            // zero takes this lock before it notifies (`batch_done`), so a
            // former that saw a batch in flight is waiting when it is woken.
            let idle = self.run.in_flight.load(Ordering::Acquire) == 0;
            let r = q.cut(now, idle, &self.cfg, &mut expired);
            if !expired.is_empty() {
                MutexGuard::unlocked(&mut q, || self.answer_expired(&mut expired));
                if r.is_err() {
                    continue;
                }
            }
            match r {
                Ok(cut) => {
                    self.run.in_flight.fetch_add(1, Ordering::AcqRel);
                    drop(q);
                    self.room.notify_all();
                    self.emit(|| Event::Batched {
                        batch: cut.id,
                        requests: cut.slots.iter().map(|s| s.id).collect(),
                        weight: cut.weight,
                        padded_weight: cut.padded_weight,
                        max_queue_time: cut.max_queue_time,
                    });
                    return Some(cut);
                }
                Err(next) => {
                    if q.closed && q.live == 0 {
                        return None;
                    }
                    match next {
                        Some(t) => {
                            self.work.wait_until(&mut q, t);
                        }
                        None => self.work.wait(&mut q),
                    }
                }
            }
        }
    }

    fn reaper_loop(&self) {
        let mut expired = Vec::new();
        let mut q = self.queue.lock();
        while !q.reaper_stop {
            let next = q.expire_due(Instant::now(), &mut expired);
            if !expired.is_empty() {
                MutexGuard::unlocked(&mut q, || self.answer_expired(&mut expired));
                continue;
            }
            match next {
                Some(t) => {
                    self.reaper.wait_until(&mut q, t);
                }
                None => self.reaper.wait(&mut q),
            }
        }
    }
}

impl<I: Send, O: Send, E: Send> Canceller<O, E> for Shared<I, O, E> {
    fn cancel(&self, slot: &Arc<Slot<O, E>>, answer: bool) -> bool {
        let removed = self.queue.lock().cancel(slot);
        if removed {
            self.room.notify_all();
            if answer {
                slot.answer(Err(Error::Cancelled));
            }
            self.emit(|| Event::Cancelled { request: slot.id });
        }
        removed
    }
}

/// Answers every request of a batch exactly once, even if something
/// between cutting and answering unwinds.
struct Answers<O, E> {
    slots: Vec<Arc<Slot<O, E>>>,
}

impl<O, E> Answers<O, E> {
    fn fail_all(&mut self, make: impl Fn() -> Error<E>) {
        for s in self.slots.drain(..) {
            s.answer(Err(make()));
        }
    }
}

impl<O, E> Drop for Answers<O, E> {
    fn drop(&mut self) {
        let n = self.slots.len();
        self.fail_all(|| Error::HandlerPanicked {
            stage: "batcher",
            batch_size: n,
            message: "the batch was abandoned".to_string(),
        });
    }
}

/// A batch on its way to a handler: its input (items or prepared), and
/// what is needed to answer it.
struct Job<P, O, E> {
    input: P,
    id: u64,
    answers: Answers<O, E>,
    mean_queue_time: Duration,
}

fn into_job<I, O, E>(cut: Cut<I, O, E>) -> Job<Vec<I>, O, E> {
    let n = cut.slots.len().max(1) as u32;
    Job {
        input: cut.items,
        id: cut.id,
        mean_queue_time: cut.total_queue_time / n,
        answers: Answers { slots: cut.slots },
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs the handler on one job and answers every request in it.
fn run_job<P, I, O, E>(
    shared: &Shared<I, O, E>,
    handler: &mut impl FnMut(P) -> Vec<Result<O, E>>,
    mut job: Job<P, O, E>,
) {
    let n = job.answers.slots.len();
    shared.emit(|| Event::Started {
        batch: job.id,
        size: n,
    });
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| handler(job.input)));
    let run_time = started.elapsed();
    let outcome = match result {
        Ok(results) if results.len() == n => {
            // Counted before answering, so a caller that has its answer
            // sees it in the stats.
            let errors = results.iter().filter(|r| r.is_err()).count() as u64;
            if errors > 0 {
                shared
                    .run
                    .handler_errors
                    .fetch_add(errors, Ordering::Relaxed);
            }
            for (slot, r) in job.answers.slots.drain(..).zip(results) {
                slot.answer(r.map_err(Error::Handler));
            }
            BatchOutcome::Completed
        }
        Ok(results) => {
            let got = results.len();
            drop(results);
            tracing::error!(
                batch = job.id,
                expected = n,
                got,
                "handler returned the wrong number of results"
            );
            shared.run.wrong_counts.fetch_add(1, Ordering::Relaxed);
            job.answers
                .fail_all(|| Error::WrongResultCount { expected: n, got });
            BatchOutcome::WrongResultCount { got }
        }
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            tracing::error!(batch = job.id, size = n, %message, "handler panicked");
            shared.run.panics.fetch_add(1, Ordering::Relaxed);
            job.answers.fail_all(|| Error::HandlerPanicked {
                stage: "handler",
                batch_size: n,
                message: message.clone(),
            });
            BatchOutcome::Panicked
        }
    };
    shared.run.finished.fetch_add(1, Ordering::Relaxed);
    shared.batch_done();
    shared.emit(|| Event::Finished {
        batch: job.id,
        size: n,
        mean_queue_time: job.mean_queue_time,
        run_time,
        outcome,
    });
}

/// Prepared batches waiting for a worker (pipelined mode).
struct Ready<P, O, E> {
    jobs: VecDeque<Job<P, O, E>>,
    done: bool,
}

struct Pipe<P, O, E> {
    ready: Mutex<Ready<P, O, E>>,
    /// Workers wait here for a prepared batch.
    filled: Condvar,
    /// The prepare thread waits here for the hand-off to empty.
    emptied: Condvar,
}

/// How many prepared batches may wait for a worker: one, so batch n+1 is
/// prepared while batch n computes, without cutting batches earlier than
/// needed.
const PREPARED_AHEAD: usize = 1;

/// Collects single requests into batches for a handler running on worker
/// threads. See the [crate docs](crate) for the model of operation.
///
/// `I` is a request, `O` a handler's answer to one request and `E` the
/// handler's error type. Dropping a batcher shuts it down with
/// [`BatcherConfig::on_shutdown`].
pub struct Batcher<I, O, E = std::convert::Infallible> {
    shared: Arc<Shared<I, O, E>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

/// Builds a [`Batcher`]: the config, an optional [`Weigher`] and bucket
/// function, then the handler(s).
pub struct BatcherBuilder<I> {
    config: BatcherConfig,
    weigher: Box<dyn Weigher<I>>,
    bucket_of: Option<BucketFn<I>>,
}

impl<I> fmt::Debug for BatcherBuilder<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatcherBuilder")
            .field("config", &self.config)
            .field("bucketed", &self.bucket_of.is_some())
            .finish()
    }
}

impl<I: Send + 'static> BatcherBuilder<I> {
    /// Starts a builder. Without a weigher every request weighs 1; without
    /// a bucket function all requests share one bucket.
    pub fn new(config: BatcherConfig) -> Self {
        Self {
            config,
            weigher: Box::new(|_: &I| 1u64),
            bucket_of: None,
        }
    }

    /// Sets how a request is weighed (e.g. `|s: &Vec<u32>| s.len() as u64`
    /// for tokens).
    pub fn weigher(mut self, weigher: impl Weigher<I> + 'static) -> Self {
        self.weigher = Box::new(weigher);
        self
    }

    /// Sets the similarity bucket of a request: a batch only ever holds
    /// requests of one bucket (e.g. `|s| (s.len() as u64).div_ceil(32)` so
    /// that sequences of similar length are padded together).
    pub fn bucket_by(mut self, bucket: impl Fn(&I) -> u64 + Send + Sync + 'static) -> Self {
        self.bucket_of = Some(Box::new(bucket));
        self
    }

    /// Starts the batcher with one handler per worker.
    ///
    /// `factory(i)` is called once for each of the
    /// `max_concurrent_batches` workers (`i` = 0, 1, …) on this thread, and
    /// the handler it returns is owned by that worker alone, so a handler
    /// may hold mutable, non-`Sync` state (a model session, scratch
    /// buffers) without a lock. Share read-only state (model weights) by
    /// capturing an `Arc` in each handler. A handler that panicked is kept
    /// and called again for the next batch.
    pub fn build<O, E, F, H>(self, mut factory: F) -> Result<Batcher<I, O, E>, Error<E>>
    where
        O: Send + 'static,
        E: Send + 'static,
        F: FnMut(usize) -> H,
        H: FnMut(Vec<I>) -> Vec<Result<O, E>> + Send + 'static,
    {
        let batcher = self.start()?;
        let shared = Arc::clone(&batcher.shared);
        let n = shared.cfg.max_concurrent_batches;
        for i in 0..n {
            let mut handler = factory(i);
            let s = Arc::clone(&shared);
            batcher.spawn(
                format!("{}-worker-{i}", shared.cfg.thread_name),
                move || {
                    while let Some(cut) = s.next_cut() {
                        run_job(&s, &mut handler, into_job(cut));
                    }
                },
            )?;
        }
        Ok(batcher)
    }

    /// Starts the batcher with a prepare stage on its own thread.
    ///
    /// The prepare thread cuts batches and turns each into the handler's
    /// input (`prepare(items)`, e.g. tokenisation and tensor building); the
    /// workers run `handler(prepared)`. One prepared batch waits ahead, so
    /// batch n+1 is prepared while batch n computes. Handlers come from
    /// `factory` as in [`build`](Self::build). A panic in `prepare` answers
    /// that batch's requests with [`Error::HandlerPanicked`] (stage
    /// `"prepare"`).
    pub fn build_with_prepare<P, O, E, R, F, H>(
        self,
        mut prepare: R,
        mut factory: F,
    ) -> Result<Batcher<I, O, E>, Error<E>>
    where
        P: Send + 'static,
        O: Send + 'static,
        E: Send + 'static,
        R: FnMut(Vec<I>) -> P + Send + 'static,
        F: FnMut(usize) -> H,
        H: FnMut(P) -> Vec<Result<O, E>> + Send + 'static,
    {
        let batcher = self.start()?;
        let shared = Arc::clone(&batcher.shared);
        let pipe = Arc::new(Pipe::<P, O, E> {
            ready: Mutex::new(Ready {
                jobs: VecDeque::new(),
                done: false,
            }),
            filled: Condvar::new(),
            emptied: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let p = Arc::clone(&pipe);
        batcher.spawn(format!("{}-prepare", shared.cfg.thread_name), move || {
            struct Done<P, O, E>(Arc<Pipe<P, O, E>>);
            impl<P, O, E> Drop for Done<P, O, E> {
                fn drop(&mut self) {
                    self.0.ready.lock().done = true;
                    self.0.filled.notify_all();
                }
            }
            let _done = Done(Arc::clone(&p));
            loop {
                {
                    let mut r = p.ready.lock();
                    while r.jobs.len() >= PREPARED_AHEAD {
                        p.emptied.wait(&mut r);
                    }
                }
                let Some(cut) = s.next_cut() else { break };
                let Job {
                    input,
                    id,
                    mut answers,
                    mean_queue_time,
                } = into_job(cut);
                let n = answers.slots.len();
                match catch_unwind(AssertUnwindSafe(|| prepare(input))) {
                    Ok(prepared) => {
                        p.ready.lock().jobs.push_back(Job {
                            input: prepared,
                            id,
                            answers,
                            mean_queue_time,
                        });
                        p.filled.notify_one();
                    }
                    Err(payload) => {
                        let message = panic_message(payload.as_ref());
                        tracing::error!(batch = id, size = n, %message, "prepare panicked");
                        s.run.panics.fetch_add(1, Ordering::Relaxed);
                        answers.fail_all(|| Error::HandlerPanicked {
                            stage: "prepare",
                            batch_size: n,
                            message: message.clone(),
                        });
                        s.run.finished.fetch_add(1, Ordering::Relaxed);
                        s.batch_done();
                        s.emit(|| Event::Finished {
                            batch: id,
                            size: n,
                            mean_queue_time,
                            run_time: Duration::ZERO,
                            outcome: BatchOutcome::Panicked,
                        });
                    }
                }
            }
        })?;
        let n = shared.cfg.max_concurrent_batches;
        for i in 0..n {
            let mut handler = factory(i);
            let s = Arc::clone(&shared);
            let p = Arc::clone(&pipe);
            batcher.spawn(
                format!("{}-worker-{i}", shared.cfg.thread_name),
                move || loop {
                    let job = {
                        let mut r = p.ready.lock();
                        loop {
                            if let Some(job) = r.jobs.pop_front() {
                                break Some(job);
                            }
                            if r.done {
                                break None;
                            }
                            p.filled.wait(&mut r);
                        }
                    };
                    let Some(job) = job else { return };
                    p.emptied.notify_one();
                    run_job(&s, &mut handler, job);
                },
            )?;
        }
        Ok(batcher)
    }

    fn start<O, E>(self) -> Result<Batcher<I, O, E>, Error<E>>
    where
        O: Send + 'static,
        E: Send + 'static,
    {
        self.config.validate().map_err(Error::widen)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::new(&self.config)),
            cfg: self.config,
            work: Condvar::new(),
            room: Condvar::new(),
            reaper: Condvar::new(),
            weigher: self.weigher,
            bucket_of: self.bucket_of,
            listeners: RwLock::new(Vec::new()),
            has_listeners: AtomicBool::new(false),
            run: RunCounters::default(),
        });
        let batcher = Batcher {
            shared: Arc::clone(&shared),
            threads: Mutex::new(Vec::new()),
            reaper: Mutex::new(None),
        };
        let s = Arc::clone(&shared);
        let reaper = std::thread::Builder::new()
            .name(format!("{}-deadlines", shared.cfg.thread_name))
            .spawn(move || s.reaper_loop())
            .map_err(|e| spawn_error(&e))?;
        *batcher.reaper.lock() = Some(reaper);
        Ok(batcher)
    }
}

fn spawn_error<E>(e: &std::io::Error) -> Error<E> {
    Error::InvalidConfig {
        field: "max_concurrent_batches",
        value: String::new(),
        reason: if e.kind() == std::io::ErrorKind::OutOfMemory {
            "the OS refused a thread for lack of memory; use fewer workers"
        } else {
            "the OS refused to start a thread; use fewer workers"
        },
    }
}

impl<I, O, E> Batcher<I, O, E>
where
    I: Send + 'static,
    O: Send + 'static,
    E: Send + 'static,
{
    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> Result<(), Error<E>> {
        match std::thread::Builder::new().name(name).spawn(f) {
            Ok(h) => {
                self.threads.lock().push(h);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "could not start a batcher thread");
                self.shutdown_with(ShutdownMode::Fail);
                Err(spawn_error(&e))
            }
        }
    }

    /// Submits a request at [`Priority::NORMAL`](crate::Priority::NORMAL)
    /// with no deadline. Fails fast with [`Error::Overloaded`] when the
    /// queue is full.
    pub fn submit(&self, item: I) -> Result<Ticket<O, E>, Error<E>> {
        self.submit_inner(item, Submit::default(), None)
    }

    /// Submits a request with a priority and an optional deadline. Fails
    /// fast with [`Error::Overloaded`] when the queue is full.
    pub fn submit_with(&self, item: I, options: Submit) -> Result<Ticket<O, E>, Error<E>> {
        self.submit_inner(item, options, None)
    }

    /// Submits several requests at once, with the same options: they are
    /// queued together under one lock, so the worker sees all of them when
    /// it cuts its next batch (a caller's texts batch together instead of
    /// the first running alone while the rest are still being queued). All
    /// or nothing: if one is heavier than the batch weight limit
    /// ([`Error::TooHeavy`]) or the queue lacks room for all of them
    /// ([`Error::Overloaded`]), none is queued. Tickets come back in the
    /// order of `items`.
    ///
    /// ```
    /// use batcher::{BatcherBuilder, BatcherConfig, Submit};
    ///
    /// let sizes = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    /// let seen = std::sync::Arc::clone(&sizes);
    /// let b = BatcherBuilder::new(BatcherConfig::default())
    ///     .build(move |_worker| {
    ///         let seen = std::sync::Arc::clone(&seen);
    ///         move |batch: Vec<u32>| -> Vec<Result<u32, std::convert::Infallible>> {
    ///             seen.lock().push(batch.len());
    ///             batch.iter().map(|x| Ok(x * 2)).collect()
    ///         }
    ///     })
    ///     .unwrap();
    /// let tickets = b.submit_all_with([1, 2, 3], Submit::default()).unwrap();
    /// let out: Vec<u32> = tickets.into_iter().map(|t| t.wait().unwrap()).collect();
    /// assert_eq!(out, [2, 4, 6]);
    /// assert_eq!(*sizes.lock(), [3]); // one batch of all three
    /// ```
    pub fn submit_all_with(
        &self,
        items: impl IntoIterator<Item = I>,
        options: Submit,
    ) -> Result<Vec<Ticket<O, E>>, Error<E>> {
        let s = &*self.shared;
        let items: Vec<(I, u64, u64)> = items
            .into_iter()
            .map(|item| {
                let weight = s.weigher.weigh(&item);
                let bucket = s.bucket_of.as_ref().map_or(0, |f| f(&item));
                (item, weight, bucket)
            })
            .collect();
        let total: u64 = items.iter().map(|i| i.1).fold(0, u64::saturating_add);
        let mut q = s.queue.lock();
        if q.closed {
            return Err(Error::ShutDown);
        }
        if let Some(&(_, weight, _)) = items.iter().find(|i| i.1 > q.max_batch_weight) {
            return Err(Error::TooHeavy {
                weight,
                max_batch_weight: q.max_batch_weight,
            });
        }
        let fits_weight = q.weight.saturating_add(total) <= s.cfg.max_queued_weight;
        if q.live.saturating_add(items.len()) > s.cfg.max_queued || !fits_weight {
            q.counters.rejected += items.len() as u64;
            return Err(Error::Overloaded {
                queued: q.live,
                queued_weight: q.weight,
                max_queued: s.cfg.max_queued,
                max_queued_weight: s.cfg.max_queued_weight,
            });
        }
        let now = Instant::now();
        let mut wake = (false, false);
        let mut queued = Vec::with_capacity(items.len());
        for (item, weight, bucket) in items {
            let (id, slot, w) = enqueue(&mut q, &s.cfg, item, weight, bucket, &options, now);
            wake = (wake.0 || w.worker, wake.1 || w.reaper);
            queued.push((id, weight, slot));
        }
        let live = q.live;
        drop(q);
        if wake.0 {
            s.work.notify_one();
        }
        if wake.1 {
            s.reaper.notify_one();
        }
        let canceller: Arc<dyn Canceller<O, E>> = Arc::clone(&self.shared) as _;
        Ok(queued
            .into_iter()
            .map(|(id, weight, slot)| {
                s.emit(|| Event::Queued {
                    request: id,
                    priority: options.priority,
                    weight,
                    queued: live,
                });
                Ticket::new(slot, Arc::clone(&canceller))
            })
            .collect())
    }

    /// Like [`submit_with`](Self::submit_with), but waits up to `timeout`
    /// for room in the queue before failing with [`Error::Overloaded`].
    pub fn submit_timeout(
        &self,
        item: I,
        options: Submit,
        timeout: Duration,
    ) -> Result<Ticket<O, E>, Error<E>> {
        let until = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        self.submit_inner(item, options, Some(until))
    }

    fn submit_inner(
        &self,
        item: I,
        options: Submit,
        wait_until: Option<Instant>,
    ) -> Result<Ticket<O, E>, Error<E>> {
        let s = &*self.shared;
        let weight = s.weigher.weigh(&item);
        let bucket = s.bucket_of.as_ref().map_or(0, |f| f(&item));
        let mut q = s.queue.lock();
        loop {
            if q.closed {
                return Err(Error::ShutDown);
            }
            if weight > q.max_batch_weight {
                return Err(Error::TooHeavy {
                    weight,
                    max_batch_weight: q.max_batch_weight,
                });
            }
            let fits_weight = q.weight.saturating_add(weight) <= s.cfg.max_queued_weight;
            if q.live < s.cfg.max_queued && fits_weight {
                break;
            }
            let can_ever_fit = weight <= s.cfg.max_queued_weight;
            match wait_until {
                Some(t) if can_ever_fit && Instant::now() < t => {
                    s.room.wait_until(&mut q, t);
                }
                _ => {
                    q.counters.rejected += 1;
                    return Err(Error::Overloaded {
                        queued: q.live,
                        queued_weight: q.weight,
                        max_queued: s.cfg.max_queued,
                        max_queued_weight: s.cfg.max_queued_weight,
                    });
                }
            }
        }
        let (id, slot, wake) = enqueue(
            &mut q,
            &s.cfg,
            item,
            weight,
            bucket,
            &options,
            Instant::now(),
        );
        let queued = q.live;
        drop(q);
        if wake.worker {
            s.work.notify_one();
        }
        if wake.reaper {
            s.reaper.notify_one();
        }
        s.emit(|| Event::Queued {
            request: id,
            priority: options.priority,
            weight,
            queued,
        });
        let canceller: Arc<dyn Canceller<O, E>> = Arc::clone(&self.shared) as _;
        Ok(Ticket::new(slot, canceller))
    }
}

/// Queues one request under the queue's lock: its id, its slot and whom to wake.
fn enqueue<I, O, E>(
    q: &mut Queue<I, O, E>,
    cfg: &BatcherConfig,
    item: I,
    weight: u64,
    bucket: u64,
    options: &Submit,
    now: Instant,
) -> (u64, Arc<Slot<O, E>>, crate::queue::Wake) {
    let id = q.next_id;
    q.next_id += 1;
    let slot = Arc::new(Slot::new(
        id,
        bucket,
        options.priority.0,
        weight,
        now,
        options.deadline,
    ));
    let wake = q.push(item, Arc::clone(&slot), cfg);
    (id, slot, wake)
}

impl<I, O, E> Batcher<I, O, E> {
    /// Changes the batch weight limit at run time (e.g. lowered under memory
    /// pressure). Batches cut from now on respect it; a request already
    /// queued that alone weighs more runs in a batch of its own. New
    /// requests heavier than the limit are refused with
    /// [`Error::TooHeavy`].
    pub fn set_max_batch_weight(&self, max_batch_weight: u64) -> Result<(), Error<E>> {
        if max_batch_weight == 0 {
            return Err(Error::InvalidConfig {
                field: "max_batch_weight",
                value: "0".to_string(),
                reason: "must be at least 1",
            });
        }
        let old = std::mem::replace(
            &mut self.shared.queue.lock().max_batch_weight,
            max_batch_weight,
        );
        tracing::info!(old, new = max_batch_weight, "max_batch_weight changed");
        self.shared.work.notify_all();
        Ok(())
    }

    /// The batch weight limit now.
    pub fn max_batch_weight(&self) -> u64 {
        self.shared.queue.lock().max_batch_weight
    }

    /// The configuration the batcher was started with.
    pub fn config(&self) -> &BatcherConfig {
        &self.shared.cfg
    }

    /// Registers a progress callback; see [`Event`] for when it runs.
    pub fn on_event(&self, listener: impl Fn(&Event) + Send + Sync + 'static) {
        self.shared.listeners.write().push(Arc::new(listener));
        self.shared.has_listeners.store(true, Ordering::Release);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BatcherStats {
        let s = &*self.shared;
        let (c, queued, queued_weight, max_batch_weight, mut times) = {
            let q = s.queue.lock();
            let c = &q.counters;
            (
                (
                    c.submitted,
                    c.rejected,
                    c.timed_out,
                    c.cancelled,
                    c.failed_on_shutdown,
                    c.batches,
                    c.items_batched,
                    c.size_histogram,
                    c.real_weight,
                    c.padded_weight,
                ),
                q.live,
                q.weight,
                q.max_batch_weight,
                c.queue_times.clone(),
            )
        };
        let (submitted, rejected, timed_out, cancelled, failed, batches, items, hist, real, padded) =
            c;
        times.sort_unstable();
        let pct = |p: usize| {
            if times.is_empty() {
                Duration::ZERO
            } else {
                let rank = (p * times.len()).div_ceil(100).clamp(1, times.len());
                Duration::from_nanos(times[rank - 1])
            }
        };
        BatcherStats {
            submitted,
            rejected,
            timed_out,
            cancelled,
            failed_on_shutdown: failed,
            batches,
            items_batched: items,
            batches_finished: s.run.finished.load(Ordering::Relaxed),
            handler_panics: s.run.panics.load(Ordering::Relaxed),
            wrong_result_counts: s.run.wrong_counts.load(Ordering::Relaxed),
            handler_errors: s.run.handler_errors.load(Ordering::Relaxed),
            mean_batch_size: if batches == 0 {
                0.0
            } else {
                items as f64 / batches as f64
            },
            batch_size_histogram: hist
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(k, &n)| (1usize << k, n))
                .collect(),
            queue_time_p50: pct(50),
            queue_time_p99: pct(99),
            padding_efficiency: if padded == 0 {
                1.0
            } else {
                real as f64 / padded as f64
            },
            queued,
            queued_weight,
            in_flight: s.run.in_flight.load(Ordering::Relaxed),
            max_batch_weight,
        }
    }

    /// Shuts down with the configured [`BatcherConfig::on_shutdown`] mode.
    pub fn shutdown(&self) {
        self.shutdown_with(self.shared.cfg.on_shutdown);
    }

    /// Stops accepting requests (`submit` then fails with
    /// [`Error::ShutDown`]), drains or fails what is queued per `mode`, and
    /// joins the threads. Batches already taken finish. Calling it again is
    /// harmless (a later `Fail` still fails whatever a drain left queued).
    pub fn shutdown_with(&self, mode: ShutdownMode) {
        let s = &*self.shared;
        let mut failed = Vec::new();
        {
            let mut q = s.queue.lock();
            q.closed = true;
            if mode == ShutdownMode::Fail {
                q.fail_all(&mut failed);
            }
        }
        if !failed.is_empty() {
            tracing::info!(
                requests = failed.len(),
                "shutdown failed the queued requests"
            );
        }
        for slot in failed {
            slot.answer(Err(Error::ShutDown));
        }
        s.work.notify_all();
        s.room.notify_all();
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut *self.threads.lock());
        for h in threads {
            if h.thread().id() == me {
                continue;
            }
            if h.join().is_err() {
                tracing::error!("a batcher thread panicked");
            }
        }
        s.queue.lock().reaper_stop = true;
        s.reaper.notify_all();
        if let Some(h) = self.reaper.lock().take() {
            if h.thread().id() != me && h.join().is_err() {
                tracing::error!("the batcher's deadline thread panicked");
            }
        }
    }
}

impl<I, O, E> Drop for Batcher<I, O, E> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl<I, O, E> fmt::Debug for Batcher<I, O, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = self.shared.queue.lock();
        f.debug_struct("Batcher")
            .field("queued", &q.live)
            .field("queued_weight", &q.weight)
            .field("max_batch_weight", &q.max_batch_weight)
            .field("closed", &q.closed)
            .field("config", &self.shared.cfg)
            .finish()
    }
}
