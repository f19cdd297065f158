//! Continuous batching: sequences join a running step loop between steps
//! and leave it when they finish.
//!
//! A [`ContinuousBatcher`] owns one thread that runs a [`StepHandler`]'s
//! `step` over every running sequence again and again. Each step holds at
//! most [`ContinuousConfig::max_step_tokens`] tokens: every decoding
//! sequence (one pending token) first, in priority order, then prefill
//! chunks of the sequences still reading their prompt with what is left of
//! the budget, so a long prompt never stalls the others' decodes. Queued
//! sequences are admitted between steps, highest priority first, as long as
//! the handler's [`admit`](StepHandler::admit) finds room for them (memory,
//! typically); one that waits longer than
//! [`max_queue_wait`](ContinuousConfig::max_queue_wait) leaves with
//! [`Exit::NoRoom`].
//!
//! Before each step the handler may ask for running sequences to be
//! **preempted** ([`StepHandler::preempt_wanted`]; memory pressure,
//! typically): the loop picks the lowest-priority, latest-joined ones, the
//! handler frees what each holds ([`StepHandler::preempt`]) and they go back
//! to the queue, ahead of those that joined after them, to be admitted again
//! and recompute what they lost. A preempted sequence is still accepted: it
//! leaves once, like any other.
//!
//! Every accepted sequence leaves exactly once, through
//! [`StepHandler::finish`] with its [`Exit`]: done, cancelled (its
//! [`SequenceHandle`] was cancelled or dropped), past its deadline (queued or
//! running), no room, refused by `admit`, failed (the step errored or
//! panicked; the loop goes on), or shut down.
//!
//! ```
//! use batcher::{ContinuousBatcher, ContinuousConfig, Exit, JoinOptions, Progress, Scheduled, StepHandler};
//! use std::sync::mpsc;
//!
//! // Each sequence counts down: a prompt of `prompt` tokens, then `decode` steps.
//! struct Countdown { prompt: usize, decode: usize, done: mpsc::Sender<(usize, Exit)>, id: usize }
//! struct Handler;
//! impl StepHandler for Handler {
//!     type Seq = Countdown;
//!     fn pending_tokens(&self, s: &Countdown) -> usize { if s.prompt > 0 { s.prompt } else { 1 } }
//!     fn step(&mut self, batch: &mut [Scheduled<'_, Countdown>]) -> Vec<Progress> {
//!         batch.iter_mut().map(|b| {
//!             if b.seq.prompt > 0 { b.seq.prompt -= b.tokens; return Progress::Continue; }
//!             b.seq.decode -= 1;
//!             if b.seq.decode == 0 { Progress::Done } else { Progress::Continue }
//!         }).collect()
//!     }
//!     fn finish(&mut self, s: Countdown, exit: Exit) { let _ = s.done.send((s.id, exit)); }
//! }
//!
//! let engine = ContinuousBatcher::new(ContinuousConfig::default(), Handler).unwrap();
//! let (tx, rx) = mpsc::channel();
//! let handles: Vec<_> = (0..3)
//!     .map(|id| engine.join(Countdown { prompt: 100, decode: 5, done: tx.clone(), id }, JoinOptions::default()).unwrap())
//!     .collect();
//! let mut exits: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
//! exits.sort_by_key(|e| e.0);
//! assert!(exits.iter().all(|(_, e)| *e == Exit::Done));
//! drop(handles);
//! assert_eq!(engine.stats().finished, 3);
//! ```

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::config::Priority;
use crate::Error;

/// Limits of a [`ContinuousBatcher`]. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContinuousConfig {
    /// Tokens one step holds at most, over all its sequences. Default 512.
    pub max_step_tokens: usize,
    /// Sequences running at once at most (at most `max_step_tokens`).
    /// Default 16.
    pub max_running: usize,
    /// Tokens of one sequence's prompt read in one step at most. Default 256.
    pub max_prefill_chunk: usize,
    /// Sequences waiting to be admitted at most; beyond it
    /// [`ContinuousBatcher::join`] answers [`Error::QueueFull`]. Default 256.
    pub max_queued: usize,
    /// How long a sequence may wait for [`StepHandler::admit`] to find room
    /// before it leaves with [`Exit::NoRoom`]. Default 30 s.
    #[serde(with = "millis")]
    pub max_queue_wait: Duration,
    /// While sequences wait for room and none runs, how often admission is
    /// tried again (room may be freed outside the loop). Default 5 ms.
    #[serde(with = "millis")]
    pub admit_retry: Duration,
    /// Name of the loop's thread. Default `"continuous"`.
    pub thread_name: String,
}

impl Default for ContinuousConfig {
    fn default() -> Self {
        ContinuousConfig {
            max_step_tokens: 512,
            max_running: 16,
            max_prefill_chunk: 256,
            max_queued: 256,
            max_queue_wait: Duration::from_secs(30),
            admit_retry: Duration::from_millis(5),
            thread_name: "continuous".to_string(),
        }
    }
}

impl ContinuousConfig {
    /// Checks every value against its range.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, value: usize, reason: &'static str| {
            Err(Error::InvalidConfig {
                field,
                value: value.to_string(),
                reason,
            })
        };
        if self.max_step_tokens == 0 {
            return bad("max_step_tokens", 0, "at least 1");
        }
        if self.max_running == 0 || self.max_running > self.max_step_tokens {
            return bad(
                "max_running",
                self.max_running,
                "at least 1 and at most max_step_tokens (each running sequence decodes one token a step)",
            );
        }
        if self.max_prefill_chunk == 0 {
            return bad("max_prefill_chunk", 0, "at least 1");
        }
        Ok(())
    }
}

/// What [`StepHandler::admit`] decides for a queued sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// It runs from the next step on.
    Admit,
    /// No room now: it stays at the head of the queue (sequences behind it
    /// wait too, so a large one is not starved by small ones).
    Wait,
    /// It can never run: it leaves with [`Exit::Refused`] and this reason.
    Refuse(String),
}

/// What a step did for one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// It goes on to the next step.
    Continue,
    /// It is finished: it leaves with [`Exit::Done`].
    Done,
    /// It failed: it leaves with [`Exit::Failed`] and this message.
    Failed(String),
}

/// Why a sequence left the loop (given to [`StepHandler::finish`], once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "exit")]
#[non_exhaustive]
pub enum Exit {
    /// The handler said it was done.
    Done,
    /// Its handle was cancelled or dropped.
    Cancelled,
    /// Its deadline passed (queued or running).
    Deadline,
    /// It waited `max_queue_wait` without `admit` finding room.
    NoRoom {
        /// How long it waited, in milliseconds.
        waited_ms: u64,
    },
    /// `admit` refused it.
    Refused {
        /// The handler's reason.
        reason: String,
    },
    /// Its step failed or panicked; the loop goes on.
    Failed {
        /// What happened.
        message: String,
    },
    /// The batcher was shut down before it finished.
    Shutdown,
}

/// One sequence's part of a step: `tokens` of its pending work to run now
/// (its whole pending count, or a prefill chunk of it).
#[derive(Debug)]
pub struct Scheduled<'a, S> {
    /// The sequence.
    pub seq: &'a mut S,
    /// Tokens of its pending work this step holds (at least 1).
    pub tokens: usize,
}

/// The model side of a [`ContinuousBatcher`]: runs steps and receives every
/// sequence when it leaves. It lives on the loop's thread.
pub trait StepHandler: Send + 'static {
    /// A sequence's state.
    type Seq: Send + 'static;

    /// Tokens the sequence would run next: its unread prompt, or 1 while
    /// decoding. Zero means it has nothing left: it leaves with
    /// [`Exit::Done`].
    fn pending_tokens(&self, seq: &Self::Seq) -> usize;

    /// Whether a queued sequence may start now (memory, typically). The
    /// default admits everything.
    fn admit(&mut self, seq: &mut Self::Seq) -> Admission {
        let _ = seq;
        Admission::Admit
    }

    /// How many of the `running` sequences should be preempted before the
    /// next step (see the [module docs](self)). Called once per loop turn;
    /// the default is 0 (never).
    fn preempt_wanted(&mut self, running: usize) -> usize {
        let _ = running;
        0
    }

    /// Frees what a running sequence holds as it is preempted: it goes back
    /// to the queue and is admitted again through [`admit`](Self::admit).
    /// The handler makes it recompute what it lost (its
    /// [`pending_tokens`](Self::pending_tokens) must be at least 1 after
    /// this). The default does nothing.
    fn preempt(&mut self, seq: &mut Self::Seq) {
        let _ = seq;
    }

    /// Runs one step; returns one [`Progress`] per scheduled sequence, in
    /// order. Any other count fails every sequence of the step; a panic
    /// fails them too and the loop goes on.
    fn step(&mut self, batch: &mut [Scheduled<'_, Self::Seq>]) -> Vec<Progress>;

    /// Receives a sequence as it leaves, with why: called exactly once per
    /// accepted sequence.
    fn finish(&mut self, seq: Self::Seq, exit: Exit);
}

/// Per-sequence options of [`ContinuousBatcher::join`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinOptions {
    /// Higher runs first (admission and the step budget). Default normal.
    pub priority: Priority,
    /// The sequence leaves with [`Exit::Deadline`] once this passes, queued
    /// or running. Default none.
    pub deadline: Option<Instant>,
}

/// Counters of a [`ContinuousBatcher`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ContinuousStats {
    /// Sequences accepted by `join`.
    pub joined: u64,
    /// Sequences refused by `join` (queue full).
    pub rejected: u64,
    /// Sequences that left, by any exit.
    pub finished: u64,
    /// Of those, cancelled.
    pub cancelled: u64,
    /// Of those, past their deadline.
    pub deadline: u64,
    /// Of those, without room (waited too long, or refused by `admit`).
    pub no_room: u64,
    /// Of those, failed (step error or panic).
    pub failed: u64,
    /// Times a running sequence was preempted back to the queue.
    pub preempted: u64,
    /// Steps run.
    pub steps: u64,
    /// Steps that panicked.
    pub step_panics: u64,
    /// Tokens run, over all steps.
    pub tokens: u64,
    /// Of those, decode tokens (sequences with one pending token).
    pub decode_tokens: u64,
    /// Of those, prompt tokens (prefill chunks).
    pub prefill_tokens: u64,
    /// Sequences running now.
    pub running: usize,
    /// Sequences queued now.
    pub queued: usize,
    /// Tokens one step holds at most now (see
    /// [`ContinuousBatcher::set_max_step_tokens`]).
    pub step_tokens: usize,
}

struct Entry<S> {
    seq: S,
    id: u64,
    priority: Priority,
    deadline: Option<Instant>,
    joined: Instant,
    cancel: Arc<AtomicBool>,
}

struct Shared<S> {
    incoming: Vec<Entry<S>>,
    queued: usize,
    shutdown: bool,
    stats: ContinuousStats,
}

struct Inner<S> {
    state: Mutex<Shared<S>>,
    wake: Condvar,
    config: ContinuousConfig,
    /// The step budget now: `config.max_step_tokens` until
    /// [`ContinuousBatcher::set_max_step_tokens`] lowers it.
    step_tokens: AtomicUsize,
}

/// A continuous-batching step loop over a [`StepHandler`] (see the
/// [module docs](self)). Dropping it shuts it down.
pub struct ContinuousBatcher<S: Send + 'static> {
    inner: Arc<Inner<S>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl<S: Send + 'static> std::fmt::Debug for ContinuousBatcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContinuousBatcher")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A joined sequence: cancel it with [`cancel`](SequenceHandle::cancel) or
/// by dropping the handle; it leaves the loop before the next step.
pub struct SequenceHandle {
    id: u64,
    cancel: Arc<AtomicBool>,
    wake: Arc<dyn Fn() + Send + Sync>,
    detached: bool,
}

impl std::fmt::Debug for SequenceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceHandle")
            .field("id", &self.id)
            .field("cancelled", &self.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl SequenceHandle {
    /// The sequence's number (in order of joining).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Cancels the sequence: it leaves with [`Exit::Cancelled`] before the
    /// next step (unless it has left already).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
        (self.wake)();
    }

    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Lets the sequence run to its end without this handle: dropping it
    /// then no longer cancels.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for SequenceHandle {
    fn drop(&mut self) {
        if !self.detached {
            self.cancel();
        }
    }
}

impl<S: Send + 'static> ContinuousBatcher<S> {
    /// Starts the loop's thread with `handler`.
    pub fn new<H: StepHandler<Seq = S>>(
        config: ContinuousConfig,
        handler: H,
    ) -> Result<Self, Error> {
        config.validate()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(Shared {
                incoming: Vec::new(),
                queued: 0,
                shutdown: false,
                stats: ContinuousStats::default(),
            }),
            wake: Condvar::new(),
            step_tokens: AtomicUsize::new(config.max_step_tokens),
            config,
        });
        let loop_inner = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name(inner.config.thread_name.clone())
            .spawn(move || run_loop(loop_inner, handler))
            .map_err(|e| Error::InvalidConfig {
                field: "thread_name",
                value: e.to_string(),
                reason: "the loop's thread could not be started",
            })?;
        Ok(ContinuousBatcher {
            inner,
            thread: Mutex::new(Some(thread)),
            next_id: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Queues `seq`; it joins the running loop between steps once admitted.
    /// Refused with [`Error::QueueFull`] when `max_queued` wait already, or
    /// [`Error::ShutDown`]; a refused sequence is dropped, never finished.
    pub fn join(&self, seq: S, options: JoinOptions) -> Result<SequenceHandle, Error> {
        let cancel = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.inner.state.lock();
            if st.shutdown {
                return Err(Error::ShutDown);
            }
            if st.queued >= self.inner.config.max_queued {
                st.stats.rejected += 1;
                return Err(Error::QueueFull {
                    queued: st.queued,
                    max_queued: self.inner.config.max_queued,
                });
            }
            st.queued += 1;
            st.stats.joined += 1;
            st.incoming.push(Entry {
                seq,
                id,
                priority: options.priority,
                deadline: options.deadline,
                joined: Instant::now(),
                cancel: Arc::clone(&cancel),
            });
        }
        self.inner.wake.notify_all();
        let weak = Arc::downgrade(&self.inner);
        Ok(SequenceHandle {
            id,
            cancel,
            wake: Arc::new(move || {
                if let Some(i) = weak.upgrade() {
                    // Take the lock so the loop cannot miss the wake-up
                    // between its check and its wait.
                    drop(i.state.lock());
                    i.wake.notify_all();
                }
            }),
            detached: false,
        })
    }

    /// The counters now.
    pub fn stats(&self) -> ContinuousStats {
        let mut stats = self.inner.state.lock().stats.clone();
        stats.step_tokens = self.max_step_tokens();
        stats
    }

    /// Tokens one step holds at most now: the configured
    /// [`max_step_tokens`](ContinuousConfig::max_step_tokens) unless
    /// [`set_max_step_tokens`](Self::set_max_step_tokens) changed it.
    pub fn max_step_tokens(&self) -> usize {
        self.inner.step_tokens.load(Ordering::Relaxed)
    }

    /// Changes the step budget of the running loop (to follow the memory
    /// free now, typically) and returns the one before. It applies from the
    /// next step planned; a step already planned runs as planned. `tokens`
    /// must be at least 1 and at most the configured
    /// [`max_step_tokens`](ContinuousConfig::max_step_tokens), which the
    /// handler sized its scratch for. Below
    /// [`max_running`](ContinuousConfig::max_running), at most `tokens`
    /// sequences run at once (those running already finish; decodes go
    /// first, in priority order, so a lower-priority one may wait a step).
    ///
    /// ```
    /// # use batcher::{ContinuousBatcher, ContinuousConfig, Exit, Progress, Scheduled, StepHandler};
    /// # struct H;
    /// # impl StepHandler for H {
    /// #     type Seq = ();
    /// #     fn pending_tokens(&self, _: &()) -> usize { 1 }
    /// #     fn step(&mut self, b: &mut [Scheduled<'_, ()>]) -> Vec<Progress> { vec![Progress::Done; b.len()] }
    /// #     fn finish(&mut self, _: (), _: Exit) {}
    /// # }
    /// let engine = ContinuousBatcher::new(ContinuousConfig::default(), H).unwrap();
    /// assert_eq!(engine.set_max_step_tokens(128).unwrap(), 512);
    /// assert_eq!(engine.stats().step_tokens, 128);
    /// assert!(engine.set_max_step_tokens(1024).is_err()); // above the configured 512
    /// ```
    pub fn set_max_step_tokens(&self, tokens: usize) -> Result<usize, Error> {
        if tokens == 0 || tokens > self.inner.config.max_step_tokens {
            return Err(Error::InvalidConfig {
                field: "max_step_tokens",
                value: format!(
                    "{tokens} (configured {})",
                    self.inner.config.max_step_tokens
                ),
                reason: "at least 1 and at most the configured max_step_tokens",
            });
        }
        Ok(self.inner.step_tokens.swap(tokens, Ordering::Relaxed))
    }

    /// The configuration.
    pub fn config(&self) -> &ContinuousConfig {
        &self.inner.config
    }

    /// Stops the loop: every queued and running sequence leaves with
    /// [`Exit::Shutdown`]; returns once the thread has ended.
    pub fn shutdown(&self) {
        self.inner.state.lock().shutdown = true;
        self.inner.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl<S: Send + 'static> Drop for ContinuousBatcher<S> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_string())
}

struct Loop<H: StepHandler> {
    inner: Arc<Inner<H::Seq>>,
    handler: H,
    queue: VecDeque<Entry<H::Seq>>,
    running: Vec<Entry<H::Seq>>,
}

impl<H: StepHandler> Loop<H> {
    fn leave(&mut self, e: Entry<H::Seq>, exit: Exit, was_queued: bool) {
        {
            let mut st = self.inner.state.lock();
            if was_queued {
                st.queued -= 1;
            }
            st.stats.queued = st.queued;
            st.stats.running = self.running.len();
            let s = &mut st.stats;
            s.finished += 1;
            match &exit {
                Exit::Cancelled => s.cancelled += 1,
                Exit::Deadline => s.deadline += 1,
                Exit::NoRoom { .. } | Exit::Refused { .. } => s.no_room += 1,
                Exit::Failed { .. } => s.failed += 1,
                _ => {}
            }
        }
        let handler = &mut self.handler;
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| handler.finish(e.seq, exit))) {
            tracing::error!(message = %panic_message(&*p), "continuous batcher: finish panicked");
        }
    }

    /// Sequences cancelled, past their deadline or waiting too long leave.
    fn sweep(&mut self, now: Instant) {
        let max_wait = self.inner.config.max_queue_wait;
        let mut i = 0;
        while i < self.queue.len() {
            let e = &self.queue[i];
            let exit = if e.cancel.load(Ordering::Acquire) {
                Some(Exit::Cancelled)
            } else if e.deadline.is_some_and(|d| now >= d) {
                Some(Exit::Deadline)
            } else if now.duration_since(e.joined) >= max_wait {
                Some(Exit::NoRoom {
                    waited_ms: now.duration_since(e.joined).as_millis() as u64,
                })
            } else {
                None
            };
            match exit {
                Some(x) => {
                    let e = self.queue.remove(i).expect("index in range");
                    self.leave(e, x, true);
                }
                None => i += 1,
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            let e = &self.running[i];
            let exit = if e.cancel.load(Ordering::Acquire) {
                Some(Exit::Cancelled)
            } else if e.deadline.is_some_and(|d| now >= d) {
                Some(Exit::Deadline)
            } else if self.handler.pending_tokens(&e.seq) == 0 {
                Some(Exit::Done)
            } else {
                None
            };
            match exit {
                Some(x) => {
                    let e = self.running.remove(i);
                    self.leave(e, x, false);
                }
                None => i += 1,
            }
        }
    }

    /// Preempts the sequences the handler asks for: lowest priority first,
    /// then the latest joined. They go back to the queue, ahead of every
    /// queued sequence of their priority that joined after them.
    fn preempt(&mut self, now: Instant) {
        let handler = &mut self.handler;
        let running = self.running.len();
        let wanted = catch_unwind(AssertUnwindSafe(|| handler.preempt_wanted(running)))
            .unwrap_or_else(|p| {
                tracing::error!(message = %panic_message(&*p), "continuous batcher: preempt_wanted panicked");
                0
            })
            .min(running);
        for _ in 0..wanted {
            let Some(victim) = (0..self.running.len()).min_by_key(|&i| {
                (
                    self.running[i].priority,
                    std::cmp::Reverse(self.running[i].id),
                )
            }) else {
                break;
            };
            let mut e = self.running.remove(victim);
            let handler = &mut self.handler;
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| handler.preempt(&mut e.seq))) {
                let message = format!("preempting it panicked: {}", panic_message(&*p));
                self.leave(e, Exit::Failed { message }, false);
                continue;
            }
            e.joined = now;
            let pos = self
                .queue
                .iter()
                .position(|q| q.priority < e.priority || (q.priority == e.priority && q.id > e.id))
                .unwrap_or(self.queue.len());
            self.queue.insert(pos, e);
            let mut st = self.inner.state.lock();
            st.queued += 1;
            st.stats.preempted += 1;
        }
    }

    fn admit(&mut self) {
        let max_running = self
            .inner
            .config
            .max_running
            .min(self.inner.step_tokens.load(Ordering::Relaxed));
        while self.running.len() < max_running {
            let Some(head) = self.queue.front_mut() else {
                break;
            };
            let handler = &mut self.handler;
            let decision = catch_unwind(AssertUnwindSafe(|| handler.admit(&mut head.seq)))
                .unwrap_or_else(|p| {
                    Admission::Refuse(format!("admit panicked: {}", panic_message(&*p)))
                });
            match decision {
                Admission::Admit => {
                    let e = self.queue.pop_front().expect("head exists");
                    self.inner.state.lock().queued -= 1;
                    self.running.push(e);
                }
                Admission::Wait => break,
                Admission::Refuse(reason) => {
                    let e = self.queue.pop_front().expect("head exists");
                    self.leave(e, Exit::Refused { reason }, true);
                }
            }
        }
    }

    /// Plans a step: decodes first, then prefill chunks, within the budget.
    /// Returns `(index into running, tokens)`, in running order.
    fn plan(&self) -> Vec<(usize, usize)> {
        let cfg = &self.inner.config;
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        // Higher priority first, then who joined first.
        order.sort_by_key(|&i| {
            (
                std::cmp::Reverse(self.running[i].priority),
                self.running[i].id,
            )
        });
        let pending: Vec<usize> = self
            .running
            .iter()
            .map(|e| self.handler.pending_tokens(&e.seq))
            .collect();
        let mut budget = self.inner.step_tokens.load(Ordering::Relaxed);
        let mut plan = Vec::new();
        for &i in &order {
            if pending[i] == 1 && budget > 0 {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for &i in &order {
            if pending[i] > 1 && budget > 0 {
                let n = pending[i].min(cfg.max_prefill_chunk).min(budget);
                plan.push((i, n));
                budget -= n;
            }
        }
        plan.sort_unstable();
        plan
    }

    fn step(&mut self, plan: &[(usize, usize)]) {
        let total: usize = plan.iter().map(|p| p.1).sum();
        let decode = plan.iter().filter(|p| p.1 == 1).count();
        let mut scheduled: Vec<Scheduled<'_, H::Seq>> = Vec::with_capacity(plan.len());
        {
            let mut rest: &mut [Entry<H::Seq>] = &mut self.running;
            let mut base = 0;
            for &(i, tokens) in plan {
                let (_, tail) = rest.split_at_mut(i - base);
                let (head, tail) = tail.split_first_mut().expect("planned index exists");
                scheduled.push(Scheduled {
                    seq: &mut head.seq,
                    tokens,
                });
                rest = tail;
                base = i + 1;
            }
        }
        let handler = &mut self.handler;
        let n = scheduled.len();
        let outcome = catch_unwind(AssertUnwindSafe(|| handler.step(&mut scheduled)));
        drop(scheduled);
        let (progress, panicked) = match outcome {
            Ok(p) if p.len() == n => (p, false),
            Ok(p) => {
                let msg = format!(
                    "the step returned {} results for {n} sequences; it must return one per sequence",
                    p.len()
                );
                (vec![Progress::Failed(msg); n], false)
            }
            Err(p) => {
                let msg = format!("the step panicked: {}", panic_message(&*p));
                (vec![Progress::Failed(msg); n], true)
            }
        };
        {
            let mut st = self.inner.state.lock();
            let s = &mut st.stats;
            s.steps += 1;
            s.step_panics += u64::from(panicked);
            s.tokens += total as u64;
            s.decode_tokens += decode as u64;
            s.prefill_tokens += (total - decode) as u64;
        }
        // Leave in reverse index order so earlier indices stay valid.
        for (&(i, _), p) in plan.iter().zip(progress).rev() {
            let exit = match p {
                Progress::Continue => continue,
                Progress::Done => Exit::Done,
                Progress::Failed(message) => Exit::Failed { message },
            };
            let e = self.running.remove(i);
            self.leave(e, exit, false);
        }
    }

    /// Until when the loop may sleep while nothing runs.
    fn sleep_until(&self, now: Instant) -> Option<Instant> {
        let cfg = &self.inner.config;
        let mut until: Option<Instant> = None;
        let mut earliest = |t: Instant| {
            until = Some(until.map_or(t, |u: Instant| u.min(t)));
        };
        for e in &self.queue {
            if let Some(d) = e.deadline {
                earliest(d);
            }
            earliest(e.joined + cfg.max_queue_wait);
        }
        if !self.queue.is_empty() {
            earliest(now + cfg.admit_retry);
        }
        until
    }

    fn run(mut self) {
        loop {
            let now = Instant::now();
            {
                let mut st = self.inner.state.lock();
                if st.shutdown {
                    drop(st);
                    break;
                }
                let mut incoming = std::mem::take(&mut st.incoming);
                drop(st);
                for e in incoming.drain(..) {
                    // Keep the queue ordered: priority, then arrival.
                    let pos = self
                        .queue
                        .iter()
                        .position(|q| q.priority < e.priority)
                        .unwrap_or(self.queue.len());
                    self.queue.insert(pos, e);
                }
            }
            self.sweep(now);
            self.preempt(now);
            self.admit();
            {
                let mut st = self.inner.state.lock();
                st.stats.running = self.running.len();
                st.stats.queued = st.queued;
            }
            let plan = self.plan();
            if plan.is_empty() {
                let mut st = self.inner.state.lock();
                if st.shutdown || !st.incoming.is_empty() {
                    continue;
                }
                let cancelled = self
                    .queue
                    .iter()
                    .chain(&self.running)
                    .any(|e| e.cancel.load(Ordering::Acquire));
                if cancelled {
                    continue;
                }
                match self.sleep_until(now) {
                    Some(t) => {
                        self.inner.wake.wait_until(&mut st, t);
                    }
                    None => self.inner.wake.wait(&mut st),
                }
                continue;
            }
            self.step(&plan);
        }
        for e in std::mem::take(&mut self.queue) {
            self.leave(e, Exit::Shutdown, true);
        }
        for e in std::mem::take(&mut self.running) {
            self.leave(e, Exit::Shutdown, false);
        }
        let mut st = self.inner.state.lock();
        for e in std::mem::take(&mut st.incoming) {
            drop(st);
            self.leave(e, Exit::Shutdown, true);
            st = self.inner.state.lock();
        }
        st.stats.running = 0;
        st.stats.queued = st.queued;
    }
}

fn run_loop<H: StepHandler>(inner: Arc<Inner<H::Seq>>, handler: H) {
    Loop {
        inner,
        handler,
        queue: VecDeque::new(),
        running: Vec::new(),
    }
    .run();
}

/// Durations as milliseconds (a number) in serde.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        Duration::try_from_secs_f64(ms / 1e3).map_err(serde::de::Error::custom)
    }
}
