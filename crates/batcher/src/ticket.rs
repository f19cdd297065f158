//! The caller's handle on one request: [`Ticket`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::Error;

/// Slot states. Every move out of `QUEUED` happens under the queue's lock,
/// so exactly one party (worker, reaper, canceller, shutdown) owns the
/// answer.
pub(crate) const QUEUED: u8 = 0;
pub(crate) const BATCHED: u8 = 1;
pub(crate) const CANCELLED: u8 = 2;
pub(crate) const EXPIRED: u8 = 3;
pub(crate) const FAILED: u8 = 4;

/// Shared between the queue and the ticket: immutable facts about the
/// request, its state and, once answered, its answer.
pub(crate) struct Slot<O, E> {
    pub(crate) id: u64,
    pub(crate) bucket: u64,
    pub(crate) level: u8,
    pub(crate) weight: u64,
    pub(crate) enqueued: Instant,
    pub(crate) deadline: Option<Instant>,
    pub(crate) state: AtomicU8,
    answer: Mutex<Answer<O, E>>,
    ready: Condvar,
}

struct Answer<O, E> {
    result: Option<Result<O, Error<E>>>,
    taken: bool,
    waker: Option<Waker>,
}

impl<O, E> Slot<O, E> {
    pub(crate) fn new(
        id: u64,
        bucket: u64,
        level: u8,
        weight: u64,
        enqueued: Instant,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            id,
            bucket,
            level,
            weight,
            enqueued,
            deadline,
            state: AtomicU8::new(QUEUED),
            answer: Mutex::new(Answer {
                result: None,
                taken: false,
                waker: None,
            }),
            ready: Condvar::new(),
        }
    }

    pub(crate) fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    pub(crate) fn set_state(&self, s: u8) {
        self.state.store(s, Ordering::Release);
    }

    /// Stores the answer and wakes whoever waits. Called exactly once per
    /// accepted request by the party that moved it out of `QUEUED`.
    pub(crate) fn answer(&self, result: Result<O, Error<E>>) {
        let waker = {
            let mut a = self.answer.lock();
            debug_assert!(
                a.result.is_none() && !a.taken,
                "request {} answered twice",
                self.id
            );
            if a.result.is_some() || a.taken {
                tracing::error!(request = self.id, "second answer ignored");
                return;
            }
            a.result = Some(result);
            a.waker.take()
        };
        self.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn take(a: &mut Answer<O, E>) -> Option<Result<O, Error<E>>> {
        if let Some(r) = a.result.take() {
            a.taken = true;
            Some(r)
        } else if a.taken {
            Some(Err(Error::AnswerTaken))
        } else {
            None
        }
    }
}

/// The part of the batcher a ticket needs: removing its request.
pub(crate) trait Canceller<O, E>: Send + Sync {
    /// Removes a queued request; true if it was still queued.
    fn cancel(&self, slot: &Arc<Slot<O, E>>, answer: bool) -> bool;
}

/// The handle on one accepted request.
///
/// Wait for the answer with [`wait`](Ticket::wait) (blocking),
/// [`wait_timeout`](Ticket::wait_timeout), or `.await` (a ticket is a
/// [`Future`]; no async runtime is needed). Dropping a ticket whose request is
/// still queued removes the request; once a batch has taken it, it runs and
/// its answer is discarded.
pub struct Ticket<O, E = std::convert::Infallible> {
    slot: Arc<Slot<O, E>>,
    queue: Arc<dyn Canceller<O, E>>,
}

impl<O, E> Ticket<O, E> {
    pub(crate) fn new(slot: Arc<Slot<O, E>>, queue: Arc<dyn Canceller<O, E>>) -> Self {
        Self { slot, queue }
    }

    /// The request's id (as seen in [`Event`](crate::Event)s).
    pub fn id(&self) -> u64 {
        self.slot.id
    }

    /// Whether the answer is available without waiting.
    pub fn is_ready(&self) -> bool {
        let a = self.slot.answer.lock();
        a.result.is_some() || a.taken
    }

    /// Removes the request if it is still queued: it is then answered
    /// [`Error::Cancelled`] and never runs; returns `true`. Returns `false`
    /// when a batch has already taken it (its answer will come) or it was
    /// already answered.
    pub fn cancel(&self) -> bool {
        self.slot.state() == QUEUED && self.queue.cancel(&self.slot, true)
    }

    /// Blocks until the answer arrives.
    ///
    /// An accepted request is always answered, so this returns once the
    /// request has run, expired, been cancelled, or been failed at shutdown.
    pub fn wait(self) -> Result<O, Error<E>> {
        let mut a = self.slot.answer.lock();
        loop {
            if let Some(r) = Slot::take(&mut a) {
                return r;
            }
            self.slot.ready.wait(&mut a);
        }
    }

    /// Blocks until the answer arrives or `timeout` passes. `None` means no
    /// answer yet: the request stays where it is and the ticket can be waited
    /// on again (or cancelled). After an answer has been returned, further
    /// waits return [`Error::AnswerTaken`].
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<O, Error<E>>> {
        let until = Instant::now().checked_add(timeout);
        let mut a = self.slot.answer.lock();
        loop {
            if let Some(r) = Slot::take(&mut a) {
                return Some(r);
            }
            match until {
                Some(t) => {
                    if self.slot.ready.wait_until(&mut a, t).timed_out() {
                        return Slot::take(&mut a);
                    }
                }
                None => self.slot.ready.wait(&mut a),
            }
        }
    }
}

impl<O, E> Future for Ticket<O, E> {
    type Output = Result<O, Error<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut a = self.slot.answer.lock();
        if let Some(r) = Slot::take(&mut a) {
            return Poll::Ready(r);
        }
        match &mut a.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<O, E> Drop for Ticket<O, E> {
    fn drop(&mut self) {
        if self.slot.state() == QUEUED {
            self.queue.cancel(&self.slot, false);
        }
    }
}

impl<O, E> fmt::Debug for Ticket<O, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.slot.state() {
            QUEUED => "queued",
            BATCHED => "batched",
            CANCELLED => "cancelled",
            EXPIRED => "expired",
            _ => "failed",
        };
        f.debug_struct("Ticket")
            .field("id", &self.slot.id)
            .field("state", &state)
            .field("answered", &self.is_ready())
            .finish()
    }
}
